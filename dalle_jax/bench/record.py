"""The JSON record of one benchmark run: what ran, on which code and machine, its figures.

A record is self-contained, so that the results page renders from records alone::

  {"benchmark": "dvae", "title": ..., "description": ..., "command": "python -m ...",
   "config_file": "configs/bench_dvae.py", "config": {...resolved...},
   "config_summary": "256 px, batch 8, ...", "runlocal": false,
   "git": {"commit": "<sha>" | null, "dirty": bool | null},
   "machine": {"cpu": ..., "cpu_count": ..., "python": ..., "jax": ..., "jaxlib": ...,
               "device_kind": ..., ...},
   "date": "2026-11-27T10:00:00+00:00", "duration_s": 412.0,
   "figures": [FIGURE, ...], "known_gap": "one line", "details": {...}}

A figure is ``{"name", "value", "unit", "target": {"op": ">=" | "<=", "value"} | null,
"met": bool | null, "note"}``; ``met`` is null where there is no target or no value.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from typing import Any, Iterable, Mapping

import ml_collections

from dalle_jax import files

FORMAT_VERSION = 1


def figure(name: str, value: float | None, unit: str, *, at_least: float | None = None,
           at_most: float | None = None, note: str = "") -> dict[str, Any]:
    """One measured figure, with its target (at most one of ``at_least``/``at_most``)."""
    if at_least is not None and at_most is not None:
        raise ValueError(f"{name}: a target is either at_least or at_most, not both")
    target = ({"op": ">=", "value": at_least} if at_least is not None else
              {"op": "<=", "value": at_most} if at_most is not None else None)
    met = None
    if target is not None and value is not None:
        met = bool(value >= at_least) if at_least is not None else bool(value <= at_most)
    return {"name": name, "value": None if value is None else float(value), "unit": unit,
            "target": target, "met": met, "note": note}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(**extra: Any) -> dict[str, Any]:
    """The host, the Python stack and JAX's first device (plus ``extra`` versions)."""
    import jax  # pylint: disable=g-import-not-at-top
    import jaxlib  # pylint: disable=g-import-not-at-top

    device = jax.devices()[0]
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "device_platform": device.platform,
            "device_kind": getattr(device, "device_kind", device.platform),
            "device_count": jax.device_count(), **extra}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The commit checked out in the working directory and whether tracked files differ.

    ``exclude`` names the paths a run writes (its records and the page): rewriting a
    tracked result must not make the next benchmark of the same run read as dirty.
    """
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    top = (_git("rev-parse", "--show-toplevel") or "").strip()
    pathspec = [":(top)"]
    for path in exclude:
        relative = os.path.relpath(os.path.abspath(path), top) if top else ".."
        if not relative.startswith(".."):
            pathspec.append(f":(exclude,top){relative}")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *pathspec)
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def resolved(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def make(*, benchmark: str, title: str, description: str, command: str, config_file: str,
         config: ml_collections.ConfigDict, config_summary: str, git: Mapping[str, Any],
         machine_info: Mapping[str, Any], date: str, duration_s: float,
         figures: list[dict[str, Any]], details: Mapping[str, Any]) -> dict[str, Any]:
    """The record of one run (the module docstring gives its fields)."""
    return {"format_version": FORMAT_VERSION, "benchmark": benchmark, "title": title,
            "description": description, "command": command, "config_file": config_file,
            "config": resolved(config), "config_summary": config_summary,
            "runlocal": bool(config.get("runlocal", False)), "git": dict(git),
            "machine": dict(machine_info), "date": date, "duration_s": duration_s,
            "figures": figures, "known_gap": config.get("known_gap", ""),
            "details": dict(details)}


def path(output_dir: str | os.PathLike, benchmark: str) -> str:
    return os.path.join(os.fspath(output_dir), f"{benchmark}.json")


def write(record: Mapping[str, Any], output_dir: str | os.PathLike) -> str:
    """Writes ``<output_dir>/<benchmark>.json`` atomically; returns its path."""
    target = path(output_dir, record["benchmark"])
    files.atomic_write(target, json.dumps(record, indent=2) + "\n")
    return target


def read_all(output_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every record in ``output_dir`` by benchmark name (other files are ignored)."""
    records = {}
    if not os.path.isdir(output_dir):
        return records
    for name in sorted(os.listdir(output_dir)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(output_dir, name)) as f:
            record = json.load(f)
        if isinstance(record, dict) and "benchmark" in record and "figures" in record:
            records[record["benchmark"]] = record
    return records
