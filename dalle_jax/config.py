"""Config files, command-line overrides and the resolved config of a run.

Every entry point takes ``--config=configs/<file>.py[:arg]`` plus overrides such as
``--config.data.image_size=32``. A config file exposes ``get_config(arg=None)``; its
``arg`` is a small comma-separated string parsed by :func:`parse_arg`.

Overrides are checked when the flags are parsed, before any work starts: an unknown
key or a value of the wrong type stops the program with a message naming the key.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import re
import sys
from typing import Any, Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging
from etils import epath
import ml_collections
from ml_collections import config_flags

from dalle_jax import errors
from dalle_jax import files
from dalle_jax import signals
from dalle_jax import validate

CONFIG_FILE_NAME = "config.json"
DEBUG_ENV = "DALLE_JAX_DEBUG"


def define_flags() -> None:
    """Defines ``--config`` and ``--workdir`` on the global absl flags (once)."""
    if "config" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/input_shapes.py or configs/input_shapes.py:runlocal.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory of the run (local path or gs://...).")
    define_debug_flag()


def define_debug_flag() -> None:
    """``--debug``: the traceback of a refused command (for jobs without ``--config``)."""
    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, "Show the traceback of a refused command (also "
                          f"{DEBUG_ENV}=1).")


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """Whether a refused command should show its traceback."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    if "debug" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.debug:
        return True
    return any(a in ("--debug", "--debug=true", "--debug=True") for a in argv)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses the ``:arg`` part of ``--config=file.py:arg`` against typed defaults.

    ``"runlocal,res=32"`` with defaults ``runlocal=False, res=64`` gives
    ``ConfigDict(runlocal=True, res=32)``. A bare name sets a bool to True.
    """
    parsed = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        name, has_value, value = item.partition("=")
        if name not in defaults:
            raise ValueError(
                f"unknown config argument {name!r} in {arg!r}; known: {sorted(defaults)}")
        default = defaults[name]
        if not has_value:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {name!r} needs a value ({name}=...)")
            parsed[name] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {name}={value!r} is not a bool")
            parsed[name] = value.lower() in ("true", "1")
        else:
            try:
                parsed[name] = type(default)(value)
            except ValueError as e:
                raise ValueError(
                    f"config argument {name}={value!r} is not a {type(default).__name__}") from e
    return parsed


def _override_keys(argv: Sequence[str]) -> list[str]:
    return [m.group(1) for a in argv if (m := re.match(r"--config\.([^=\s]+)", a))]


def _config_spec(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path.py[:arg]`` the way ``--config`` does, without flags."""
    path, _, arg = spec.partition(":")
    # A name of its own per file, so that a config file may load another (configs/demo.py
    # builds on the stage configs).
    name = "_dalle_jax_config_" + re.sub(r"\W", "_", os.path.abspath(path))
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or not epath.Path(path).exists():
        raise FileNotFoundError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(module_spec)
    # Registered while it runs: dataclasses and typing look modules up by name.
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    finally:
        if previous is None:
            del sys.modules[name]
        else:
            sys.modules[name] = previous


def check_override_keys(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
    """Raises ``KeyError`` naming the first override key that the config lacks."""
    for key in keys:
        node = config
        for depth, part in enumerate(key.split(".")):
            if isinstance(node, ml_collections.ConfigDict) and part in node:
                node = node[part]
                continue
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, known, n=1)
            where = ".".join(key.split(".")[:depth]) or "the config"
            msg = f"unknown config key {key!r}: {where} has no field {part!r}"
            if close:
                msg += f" (did you mean {close[0]!r}?)"
            raise KeyError(msg)


def job_name() -> str | None:
    """The running job, ``train`` for ``python -m dalle_jax.tools.train``; else None."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "") or ""
    prefix = "dalle_jax.tools."
    return name[len(prefix):] if name.startswith(prefix) else None


def check_job_fields(config: ml_collections.ConfigDict, job: str, spec: str) -> None:
    """Raises ``KeyError`` when ``config`` lacks a top-level field that ``job`` reads."""
    from dalle_jax import tools  # pylint: disable=g-import-not-at-top
    missing = [f for f in tools.CONFIG_FIELDS.get(job, ()) if f not in config]
    if missing:
        raise KeyError(
            f"{spec.partition(':')[0]} is not a config for dalle_jax.tools.{job}: it has no "
            f"{', '.join(repr(f) for f in missing)}; use {tools.CONFIG_KINDS[job]}")


def flags_parser(argv: Sequence[str]) -> list[str]:
    """absl ``flags_parser``: a bad command line ends in one clear line and exit 2.

    Loads the config file, checks that it suits the job and that every override names
    a field, parses the flags, then validates every config value and the workdir
    (:mod:`dalle_jax.validate`) before the job starts any work.
    """
    try:
        job = job_name()
        spec = _config_spec(argv)
        config = None  # the config file as it is, without the overrides
        if spec is not None:
            config = load_config_file(spec)
            if job is not None:
                check_job_fields(config, job, spec)
            check_override_keys(config, _override_keys(argv))
        remaining = flags.FLAGS(list(argv))
        if job is not None and "config" in flags.FLAGS:
            validate.check_command(job, flags.FLAGS.config,
                                   flags.FLAGS.workdir if "workdir" in flags.FLAGS else None,
                                   remaining[1:], defaults=config)
        return remaining
    except Exception as e:  # pylint: disable=broad-except
        if debug_requested(argv):
            raise
        message = _one_line_error(e)
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def _one_line_error(e: Exception) -> str:
    if isinstance(e, errors.UserError):
        return str(e)
    if isinstance(e, KeyError):
        return str(e.args[0])
    if isinstance(e, flags.Error):  # a value of the wrong type, named by absl with its key
        return str(e)
    if isinstance(e, (ValueError, FileNotFoundError)):  # a bad ':arg' or a missing file
        return f"--config: {e}"
    # A config file that fails to load: its own error, on one line.
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"--config: {type(e).__name__}: {first}"


class _LibraryInfoFilter(logging.Filter):
    """Drops the INFO chatter of orbax and tfds; their warnings still show."""

    _QUIET = ("/orbax/", "/tensorflow_datasets/")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(
            part in record.pathname for part in self._QUIET)


def run(main: Callable[[list[str]], Any]) -> None:
    """``absl.app.run`` for the entry points.

    Config-aware flag errors (:func:`flags_parser`); a :class:`~dalle_jax.errors.UserError`
    raised by the job is one line and exit 2; a stop signal (:mod:`dalle_jax.signals`)
    ends the job at a safe point with exit 0; library INFO logs are quiet.
    """
    if not signals.installed():
        signals.install(before_start=True)
    absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())

    def guarded(argv):
        signals.started()
        try:
            with signals.interruptible():
                return main(argv)
        except signals.Stop as stop:
            print(f"stopped by {stop.name}; nothing is half-written: rerun the same "
                  "command to continue", flush=True)
            return 0
        except errors.UserError as e:
            if debug_requested():
                raise
            sys.stderr.write(f"error: {e}\n")
            sys.exit(2)

    app.run(guarded, flags_parser=flags_parser)


def write_config(config: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> epath.Path:
    """Writes the resolved config to ``<workdir>/config.json`` atomically."""
    text = json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True)
    return files.atomic_write(epath.Path(workdir) / CONFIG_FILE_NAME, text + "\n")


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """A config from the JSON :func:`write_config` wrote, its lists as tuples again
    (raises ``json.JSONDecodeError`` for text that is not JSON)."""
    return ml_collections.ConfigDict(_tuples(json.loads(text)))


def read_config(workdir: str | epath.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run wrote (:func:`write_config`), its lists as tuples again."""
    path = epath.Path(workdir) / CONFIG_FILE_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a run directory?")
    return config_from_json(path.read_text())
