r"""Runs the benchmarks and renders their results page.

  python -m dalle_jax.tools.bench all        # every benchmark, then BENCHMARKS.md (make bench)
  python -m dalle_jax.tools.bench input      # one benchmark: input, dvae or transformer
  python -m dalle_jax.tools.bench dvae --config=configs/bench_dvae.py --config.repeats=3
  python -m dalle_jax.tools.bench all --config_arg=runlocal   # every one at smoke size
  python -m dalle_jax.tools.bench report     # BENCHMARKS.md from the records alone

A benchmark reads ``--config`` (default ``configs/bench_<name>.py``, relative to the
working directory; overrides as for every job, ``--config.<field>=<value>``), writes
its record to ``<output_dir>/<name>.json`` and renders the page from every record there.
By default records go to ``benchmarks/`` (where results are committed) and the page is
``BENCHMARKS.md``; a ``:runlocal`` (smoke) config defaults to ``runs/bench_smoke/``
with the page beside its records, so that a smoke run never replaces results. Data a
benchmark builds lives under ``--workdir``.

``all`` runs each ``<config_dir>/bench_<name>.py[:<config_arg>]`` in its own process,
one after the other, so that none inherits another's threads or memory, and continues
past a failure (its exit status is then 1).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

from absl import flags

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax import validate
from dalle_jax.bench import BENCHMARKS

config_lib.define_flags()
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where records go (default: benchmarks/, or runs/bench_smoke/ for a "
    ":runlocal config).")
_PAGE = flags.DEFINE_string(
    "page", None, "The page rendered from the records (default: BENCHMARKS.md for "
    "benchmarks/, else <output_dir>/BENCHMARKS.md).")
_CONFIG_DIR = flags.DEFINE_string(
    "config_dir", "configs", "Where `all` finds bench_<name>.py.")
_CONFIG_ARG = flags.DEFINE_string(
    "config_arg", "", "The ':arg' `all` gives every config, e.g. runlocal.")

RESULTS_DIR = "benchmarks"
RESULTS_PAGE = "BENCHMARKS.md"
SMOKE_DIR = os.path.join("runs", "bench_smoke")
DEFAULT_WORKDIR = os.path.join("/tmp", "dalle_jax_bench")
COMMANDS = (*BENCHMARKS, "all", "report")


def output_dir(runlocal: bool) -> str:
    return _OUTPUT_DIR.value or (SMOKE_DIR if runlocal else RESULTS_DIR)


def page_path(records_dir: str) -> str:
    if _PAGE.value:
        return _PAGE.value
    if os.path.normpath(records_dir) == RESULTS_DIR:
        return RESULTS_PAGE
    return os.path.join(records_dir, RESULTS_PAGE)


def _with_default_config(argv: list[str]) -> list[str]:
    """``argv`` with ``--config=configs/bench_<name>.py`` after the benchmark's name when
    one is named without a config (overrides must follow the config they change)."""
    positional = [i for i, a in enumerate(argv) if i and not a.startswith("-")]
    if not positional:
        return argv
    name = argv[positional[0]]
    has_file = any(a == "--config" or a.startswith("--config=") for a in argv)
    if name == "all" and (has_file or any(a.startswith("--config.") for a in argv)):
        sys.stderr.write(
            "error: --config: `all` reads <config_dir>/bench_<name>.py for every benchmark: "
            "name one benchmark to pass --config or overrides, or give every config an "
            "argument with --config_arg\n")
        sys.exit(2)
    if name in BENCHMARKS and not has_file:
        default = f"--config={os.path.join('configs', f'bench_{name}.py')}"
        return [*argv[:positional[0] + 1], default, *argv[positional[0] + 1:]]
    return argv


def _render(records_dir: str) -> None:
    from dalle_jax.bench import report  # pylint: disable=g-import-not-at-top
    print(f"wrote {report.write(records_dir, page_path(records_dir))}", flush=True)


def _run_one(name: str) -> None:
    from dalle_jax.bench import report, runner  # pylint: disable=g-import-not-at-top
    config = flags.FLAGS.config
    runlocal = bool(config.get("runlocal", False))
    records_dir = output_dir(runlocal)
    command = shlex.join(["python", "-m", "dalle_jax.tools.bench", *sys.argv[1:]])
    result, path = runner.run(
        name, config, command=command, config_file=flags.FLAGS["config"].config_filename,
        workdir=flags.FLAGS.workdir or DEFAULT_WORKDIR, output_dir=records_dir,
        written_paths=[page_path(records_dir)], log=lambda line: print(line, flush=True))
    print()
    print(report.render_section(result, record_path=path, page_dir=os.getcwd()))
    print(f"\nwrote {path}", flush=True)
    _render(records_dir)


def _run_all() -> int:
    specs = {}
    for name in BENCHMARKS:
        spec = os.path.join(_CONFIG_DIR.value, f"bench_{name}.py")
        specs[name] = f"{spec}:{_CONFIG_ARG.value}" if _CONFIG_ARG.value else spec
    # Every config is read and checked (dalle_jax.validate) up front: a bad --config_arg
    # or config value fails before any timing starts.
    runlocal = {}
    for name, spec in specs.items():
        try:
            config = config_lib.load_config_file(spec)
        except (ValueError, FileNotFoundError) as e:
            raise errors.UserError(f"--config_arg: {spec}: {e}") from e
        try:
            validate.check_config("bench", config, defaults=config_lib.load_config_file(spec))
        except errors.UserError as e:
            raise errors.UserError(f"{spec}: {e}") from e
        runlocal[name] = bool(config.get("runlocal", False))
    if len(set(runlocal.values())) > 1:
        raise errors.UserError(f"--config_arg: the configs disagree on runlocal: {runlocal}")
    records_dir = output_dir(any(runlocal.values()))
    passed = [f"--{flag}={flags.FLAGS[flag].value}" for flag in ("output_dir", "page", "workdir")
              if flags.FLAGS[flag].present]
    failed = []
    for name, spec in specs.items():
        argv = [sys.executable, "-m", "dalle_jax.tools.bench", name, f"--config={spec}", *passed]
        print(f"\n=== {name}: {shlex.join(['python', *argv[1:]])}", flush=True)
        if subprocess.run(argv, check=False).returncode != 0:
            failed.append(name)
    _render(records_dir)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv):
    command = argv[1]  # one of COMMANDS, checked before main (dalle_jax.validate)
    if command == "all":
        sys.exit(_run_all())
    if command == "report":
        _render(_OUTPUT_DIR.value or RESULTS_DIR)
        return
    _run_one(command)


if __name__ == "__main__":
    sys.argv = _with_default_config(sys.argv)
    config_lib.run(main)
