"""Runs one benchmark and writes its record: the code and machine, then the figures."""
from __future__ import annotations

import importlib
import os
import time
from typing import Any, Callable, Iterable

import ml_collections

from dalle_jax.bench import BENCHMARKS
from dalle_jax.bench import record


def run(name: str, config: ml_collections.ConfigDict, *, command: str, config_file: str,
        workdir: str, output_dir: str, written_paths: Iterable[str] = (),
        log: Callable[[str], Any] = print) -> tuple[dict[str, Any], str]:
    """Measures benchmark ``name`` with ``config``; returns its record and the JSON's path.

    ``workdir`` holds data a benchmark builds (under ``<workdir>/<name>``);
    ``written_paths`` are files that runs rewrite (the page), left out of the dirty check
    with ``output_dir``.
    """
    benchmark = BENCHMARKS[name]
    module = importlib.import_module(benchmark.module)
    # The code's state before the run: the state the figures belong to.
    git = record.git_state(exclude=[output_dir, *written_paths])
    date = record.now()
    start = time.perf_counter()
    measured = module.measure(config, workdir=os.path.join(workdir, name), log=log)
    duration = time.perf_counter() - start
    result = record.make(
        benchmark=name, title=benchmark.title, description=benchmark.description,
        command=command, config_file=config_file, config=config,
        config_summary=module.summary(config), git=git,
        machine_info=record.machine(**measured["machine"]), date=date,
        duration_s=duration, figures=measured["figures"], details=measured["details"])
    return result, record.write(result, output_dir)
