"""Scale: the paper's 12B transformer compiled ahead of time for TPU slices on this host.

Nothing runs on a TPU: libtpu describes each slice (:mod:`dalle_jax.train.aot`) and
XLA:TPU compiles the real train step for it, so the per-chip memory is the compiler's
own figure and a step that does not fit is one the compiler refused. Measured:

- the 12B config at the paper's global batch on each slice of ``config.bench.slices``,
  with the config's mesh, rules and remat policy and the fewest accumulation
  micro-batches that fit: per-chip memory against the chip's HBM, and the compile time
  on this host;
- the smallest slice of ``config.bench.smallest_generation`` that holds it at that batch,
  with the fewest accumulation micro-batches under each of ``config.bench.policies``;
- per slice of ``config.bench.largest_model_slices``, the largest model of the paper's
  shape (its layers and heads in the paper's proportion, 62 heads per 64 layers,
  ``head_dim`` 64) that fits at that batch, bisected over the layer count.
"""
from __future__ import annotations

from importlib import metadata
import json
from typing import Any, Callable

import ml_collections

from dalle_jax.bench import record
from dalle_jax.train import aot

GIB = 2**30


def summary(config: ml_collections.ConfigDict) -> str:
    m = config.model
    return (f"the {m.num_layers}-layer, {m.num_heads}-head transformer at global batch "
            f"{config.batch_size} on {', '.join(config.bench.slices)}; smallest "
            f"{config.bench.smallest_generation} slice; largest model of its shape on "
            f"{', '.join(config.bench.largest_model_slices)}")


def paper_shape(config, layers: int):
    """``config`` with ``layers`` layers and heads in the paper's ratio (62 per 64),
    rounded to a multiple of the tensor axis."""
    tensor = max(1, int(config.mesh.tensor))
    heads = max(tensor, round(62 * layers / 64 / tensor) * tensor)
    return aot.with_updates(config, **{"model.num_layers": layers, "model.num_heads": heads})


def _fit_note(report: aot.TrainReport, slice_: aot.Slice) -> str:
    mesh = " x ".join(f"{a} {n}" for a, n in report.mesh.items())
    headroom = (slice_.hbm_bytes - report.step.memory.total) / GIB
    return (f"{report.parameters / 1e9:.2f} B params; mesh {mesh}; remat "
            f"{report.remat_policy}, {report.num_microbatches} micro-batch(es); "
            f"headroom {headroom:.2f} GiB; compiled in {report.step.compile_seconds:.0f} s")


def _smallest_slice(config, log) -> tuple[dict | None, list]:
    """Slices of the generation from the largest down, until one holds nothing."""
    bench = config.bench
    found, tried = None, []
    smaller_fails = False
    for chips in bench.smallest_chips:
        name = f"{bench.smallest_generation}-{chips}"
        slice_ = aot.topology(name)
        log(f"{name}: searching {', '.join(bench.policies)}")
        result = aot.search(config, slice_.devices, slice_.hbm_bytes,
                            policies=tuple(bench.policies), largest_batch=False, log=log)
        tried.append({"slice": name, "tried": result.tried})
        if result.report is None:
            smaller_fails = True
            break
        found = {"slice": name, "chips": slice_.chips, "remat_policy": result.remat_policy,
                 "num_microbatches": result.num_microbatches,
                 "total": result.report.step.memory.total, "hbm_bytes": slice_.hbm_bytes}
    if found is not None:
        found["next_smaller_fails"] = smaller_fails
    return found, tried


def _largest_model(config, slice_: aot.Slice, log) -> dict:
    """Bisects the layer count (steps of ``config.bench.layer_step``) of the paper's
    shape; each size takes the fewest micro-batches that fit under the config's policy."""
    bench = config.bench
    step = bench.layer_step
    attempts = []

    def fitting(layers):
        candidate = paper_shape(config, layers)
        log(f"{slice_.name}: {layers} layers, {candidate.model.num_heads} heads")
        result = aot.search(candidate, slice_.devices, slice_.hbm_bytes,
                            policies=(config.train.remat_policy,), largest_batch=False,
                            log=log)
        attempts.append({"layers": layers, "heads": candidate.model.num_heads,
                         "tried": result.tried,
                         "parameters": result.report.parameters if result.report else None})
        return result.report

    low = config.model.num_layers
    best = fitting(low)
    if best is None:
        return {"slice": slice_.name, "attempts": attempts, "report": None}
    high = None
    layers = low * 2
    while layers <= bench.max_layers:
        report = fitting(layers)
        if report is None:
            high = layers
            break
        low, best, layers = layers, report, layers * 2
    while high is not None and high - low > step:
        middle = (low + high) // 2 // step * step
        if middle in (low, high):
            break
        report = fitting(middle)
        if report is None:
            high = middle
        else:
            low, best = middle, report
    return {"slice": slice_.name, "layers": low,
            "heads": paper_shape(config, low).model.num_heads, "report": best,
            "does_not_fit_layers": high, "attempts": attempts}


def measure(config: ml_collections.ConfigDict, *, workdir: str,
            log: Callable[[str], Any] = print) -> dict[str, Any]:
    del workdir
    bench = config.bench
    figures, details = [], {"fits": [], "smallest": None, "largest_models": []}
    first_compile = None
    for name in bench.slices:
        slice_ = aot.topology(name)
        log(f"{name}: {slice_.chips} chips, the fewest micro-batches that fit")
        result = aot.search(config, slice_.devices, slice_.hbm_bytes,
                            policies=(config.train.remat_policy,), largest_batch=False,
                            log=log)
        report = result.report
        entry = {"slice": name, "chips": slice_.chips, "hbm_bytes": slice_.hbm_bytes,
                 "tried": result.tried}
        if report is None:
            total, note = None, (f"does not fit with remat {config.train.remat_policy} and "
                                 "any accumulation")
        else:
            total, note = report.step.memory.total, _fit_note(report, slice_)
            entry.update(mesh=report.mesh, memory=vars(report.step.memory), total=total,
                         num_microbatches=report.num_microbatches,
                         compile_seconds=report.step.compile_seconds,
                         parameters=report.parameters,
                         rules=[list(r) for r in report.rules])
            first_compile = first_compile or (name, report.step.compile_seconds)
        details["fits"].append(entry)
        figures.append(record.figure(
            f"{config.model.num_layers}-layer model at batch {config.batch_size} on {name} "
            f"({slice_.chips} chips): memory per chip",
            None if total is None else total / GIB, "GiB",
            at_most=slice_.hbm_bytes / GIB, note=note))

    found, tried = _smallest_slice(config, log)
    details["smallest"] = {"found": found, "tried": tried}
    note = ("none of " + ", ".join(f"{bench.smallest_generation}-{c}"
                                   for c in bench.smallest_chips) if found is None else
            f"{found['slice']}: remat {found['remat_policy']}, {found['num_microbatches']} "
            f"micro-batch(es), {found['total'] / GIB:.2f} of {found['hbm_bytes'] / GIB:.0f} "
            f"GiB per chip; " + ("the next size down does not fit"
                                  if found["next_smaller_fails"] else
                                  "no smaller size was tried"))
    figures.append(record.figure(
        f"smallest {bench.smallest_generation} slice for it at batch {config.batch_size}",
        None if found is None else found["chips"], "chips", note=note))

    for name in bench.largest_model_slices:
        slice_ = aot.topology(name)
        result = _largest_model(config, slice_, log)
        report = result.pop("report")
        if report is not None:
            result.update(parameters=report.parameters, total=report.step.memory.total,
                          num_microbatches=report.num_microbatches)
        details["largest_models"].append(result)
        figures.append(record.figure(
            f"largest model of the paper's shape on {name} at batch {config.batch_size}",
            None if report is None else report.parameters / 1e9, "B params",
            note="the 12B config does not fit" if report is None else (
                f"{result['layers']} layers x {result['heads']} heads of "
                f"{config.model.head_dim}; "
                f"{report.num_microbatches} micro-batch(es), remat {report.remat_policy}; "
                f"{report.step.memory.total / GIB:.2f} GiB per chip; "
                + (f"{result['does_not_fit_layers']} layers do not fit"
                   if result["does_not_fit_layers"] else
                   f"every size up to {bench.max_layers} layers fits"))))
    if first_compile:
        figures.append(record.figure(f"compile time on this host ({first_compile[0]})",
                                     first_compile[1], "s",
                                     note="XLA:TPU compiling the train step on this CPU"))
    # As the record's JSON holds it (tuples become lists).
    details = json.loads(json.dumps(details))
    return {"figures": figures, "details": details,
            "machine": {"libtpu": _libtpu_version()}}


def _libtpu_version() -> str:
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return "not installed"

