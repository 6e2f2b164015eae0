"""Every command the documentation shows runs as written, as far as its config goes.

Collects each ``python -m dalle_jax.tools.<job> ...`` from the README, BENCHMARKS.md,
the launcher, the Makefile, the config files and the package's docstrings, and checks
that the job exists, its ``--config`` file loads with its ``:arg``, the config is one
that job reads (it has the fields the job needs) and every ``--config.*`` override
names an existing field with a value of the right type, exactly as the job's own flag
parsing would take it.
"""
from __future__ import annotations

import importlib.util
import pathlib
import re
import shlex

from absl import flags
from ml_collections import config_flags
import pytest

from dalle_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ["README.md", "BENCHMARKS.md", "Makefile", "launch/tpu_run.sh",
           *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.py")),
           *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "dalle_jax").rglob("*.py"))]
_COMMAND = re.compile(r"python3? -m dalle_jax\.tools\.(\w+)([^\n`|;&)]*)")


def _logical_lines(text: str) -> str:
    """Joins shell continuations (a backslash at the end of a line)."""
    return re.sub(r"\\\n\s*", " ", text)


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for source in SOURCES:
        path = ROOT / source
        if not path.exists():
            continue
        for match in _COMMAND.finditer(_logical_lines(path.read_text())):
            job, rest = match.group(1), match.group(2)
            try:
                args = shlex.split(rest)
            except ValueError:  # an unbalanced quote ends the command in prose
                args = rest.split()
            found.append((source, job, args))
    return found


COMMANDS = documented_commands()


def test_the_documentation_shows_commands():
    jobs = {job for _, job, _ in COMMANDS}
    assert {"train", "demo", "train_text_tokenizer", "encode_dataset"} <= jobs, jobs


def _config_args(args: list[str]) -> tuple[str | None, list[str]]:
    spec, overrides = None, []
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(args):
            spec = args[i + 1]
        elif arg.startswith("--config."):
            overrides.append(arg)
    return spec, overrides


@pytest.mark.parametrize("source, job, args", COMMANDS,
                         ids=[f"{s}:{j}:{i}" for i, (s, j, _) in enumerate(COMMANDS)])
def test_documented_command_parses(source, job, args):
    assert importlib.util.find_spec(f"dalle_jax.tools.{job}") is not None, (
        f"{source} names dalle_jax.tools.{job}, which does not exist")
    spec, overrides = _config_args(args)
    if spec is None or "<" in spec or "..." in spec:
        return  # no config, or a placeholder such as configs/<stage>.py
    path = spec.partition(":")[0]
    assert (ROOT / path).exists(), f"{source}: {job} takes {path}, which does not exist"
    config = config_lib.load_config_file(str(ROOT / spec))
    config_lib.check_job_fields(config, job, spec)
    config_lib.check_override_keys(config, [o.split("=", 1)[0][len("--config."):]
                                            for o in overrides])
    # The overrides' values parse as the job's flags would parse them.
    argv = ["job", f"--config={ROOT / spec}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    values(argv)


def test_a_config_for_another_job_is_named_in_one_line():
    config = config_lib.load_config_file(str(ROOT / "configs/input_photos.py"))
    with pytest.raises(KeyError, match=r"configs/input_photos.py is not a config for "
                                       r"dalle_jax.tools.train: it has no 'task'"):
        config_lib.check_job_fields(config, "train", "configs/input_photos.py")
