"""Encoder throughput: this project's dVAE encoder (jitted) against dall_e's (PyTorch).

Both run side by side in one process with the same weights (a random dall_e encoder at
``config.model``'s sizes, converted by the project's converter), fp32,
``config.batch_size`` images of ``config.model.image_size`` px. Each is timed
``config.repeats`` times after ``config.warmup`` runs, interleaved so that all see the
same machine state; figures are medians. A second JAX row runs the batch as
``lax.map`` over chunks of ``config.chunk_size`` images inside one jitted program
(``dvae.in_chunks``, as the encoding job runs with ``config.encode.chunk_size``). Each
row also counts minor page faults per batch (``GLIBC_TUNABLES`` is recorded: the
allocator's settings change it).

Without torch or dall_e the JAX rows are measured alone, from random JAX weights.
With ``config.torch_device="cuda"`` the PyTorch encoder runs on the GPU too (the JAX
one on JAX's default device); both then compute in full fp32 (no TF32 in cuDNN, JAX's
matmul precision ``highest``), and each timed run ends with its device's
synchronisation.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from dalle_jax.bench import record
from dalle_jax.models import dvae
from dalle_jax.models import openai_dvae


def summary(config: ml_collections.ConfigDict) -> str:
    m = config.model
    return (f"{m.image_size} px, batch {config.batch_size}, fp32, n_hid {m.n_hid}, "
            f"{m.n_blk_per_group} blocks per group, vocabulary {m.vocab_size}; chunks of "
            f"{config.chunk_size}; median of {config.repeats} after {config.warmup} warm-up "
            f"runs; dall_e on {config.torch_device}")


def _time(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _torch_or_reason() -> tuple[Any, str]:
    try:
        return openai_dvae.require_torch_and_dall_e(), ""
    except ImportError as e:
        return None, str(e)


def measure(config: ml_collections.ConfigDict, *, workdir: str,
            log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Every encoder's batch times and page faults: ``{"figures", "details", "machine"}``."""
    del workdir  # nothing to build: the inputs are random
    model = config.model
    torch, missing = _torch_or_reason()
    if torch is None:
        log(f"dall_e comparison skipped, JAX side only: {missing}")
    # Four groups, as dall_e fixes them (256 px → 32×32 codes).
    encoder = dvae.Encoder(n_hid=model.n_hid, n_blk_per_group=model.n_blk_per_group,
                           vocab_size=model.vocab_size)
    size = model.image_size
    pixels = np.asarray(dvae.map_pixels(
        np.random.default_rng(config.seed).random((config.batch_size, size, size, 3),
                                                  np.float32)))
    runs: dict[str, Callable[[], Any]] = {}
    details: dict[str, Any] = {}
    # The allocator's settings move the page-fault counts (and dall_e's times).
    machine_extra: dict[str, Any] = {
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "(unset)")}

    if torch is not None:
        from dall_e.encoder import Encoder as TorchEncoder  # pylint: disable=g-import-not-at-top

        threads = config.threads or os.cpu_count()
        torch.set_num_threads(threads)
        torch.manual_seed(config.seed)
        device = torch.device(config.torch_device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("torch_device=cuda, but torch sees no CUDA device")
            torch.backends.cudnn.allow_tf32 = False  # fp32, as the JAX side below
            torch.backends.cuda.matmul.allow_tf32 = False
            jax.config.update("jax_default_matmul_precision", "highest")
        torch_encoder = TorchEncoder(n_hid=model.n_hid, n_blk_per_group=model.n_blk_per_group,
                                     vocab_size=model.vocab_size).eval()
        state = {name: t.numpy() for name, t in torch_encoder.state_dict().items()}
        params = openai_dvae.state_dict_to_params(
            state, openai_dvae.module_param_shapes(encoder, 3), "encoder")
        torch_encoder.to(device)
        pixels_nchw = torch.from_numpy(
            np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).to(device)

        def run_torch():
            with torch.no_grad():
                logits = torch_encoder(pixels_nchw)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return logits

        runs["torch"] = run_torch
        machine_extra["torch"] = torch.__version__
        details["torch"] = {"device": str(device), "threads": threads}
    else:
        params = jax.jit(encoder.init)(jax.random.key(config.seed),
                                       pixels[:1])["params"]
        details["torch"] = {"skipped": missing}

    params = jax.device_put(params)
    pixels_nhwc = jax.device_put(pixels)
    apply = jax.jit(encoder.apply)
    chunk = config.chunk_size

    @jax.jit
    def apply_in_chunks(variables, x):
        # As the encoding job runs with config.encode.chunk_size: one chunk at a time
        # inside the same program, for fewer live activations and the same arithmetic.
        return dvae.in_chunks(lambda c: encoder.apply(variables, c), x, chunk)

    runs["jax"] = lambda: apply({"params": params}, pixels_nhwc).block_until_ready()
    if chunk and chunk < config.batch_size:  # in_chunks refuses a chunk that does not divide
        runs["jax_chunked"] = lambda: apply_in_chunks(
            {"params": params}, pixels_nhwc).block_until_ready()

    jax_names = [name for name in runs if name != "torch"]
    compile_s = {name: _time(runs[name]) for name in jax_names}
    log("compiled and ran " + ", ".join(f"{n} in {s:.1f} s" for n, s in compile_s.items()))
    diff = None
    if "torch" in runs:
        reference = runs["torch"]().cpu().numpy().transpose(0, 2, 3, 1)
        diff = max(float(np.abs(np.asarray(runs[name]()) - reference).max())
                   for name in jax_names)
    for _ in range(config.warmup):
        for run in runs.values():
            run()
    # Interleaved, so that every implementation sees the same machine state.
    times = {name: [] for name in runs}
    faults = {name: [] for name in runs}
    for round_index in range(config.repeats):
        for name, run in runs.items():
            before = _minor_faults()
            times[name].append(_time(run))
            faults[name].append(_minor_faults() - before)
        log(f"round {round_index + 1}/{config.repeats} done")
    medians = {name: statistics.median(values) for name, values in times.items()}
    rate = {name: config.batch_size / seconds for name, seconds in medians.items()}

    # The target belongs to the program the encoding job runs: chunked when it chunks.
    shipped = "jax_chunked" if "jax_chunked" in runs else "jax"
    labels = {"torch": "dall_e (PyTorch, no_grad)", "jax": "dalle_jax (jit, whole batch)",
              "jax_chunked": f"dalle_jax (jit, lax.map over chunks of {chunk})"}
    figures = []
    for name in runs:
        # Minor page faults: first touches of fresh pages, as when large buffers go back
        # to the kernel between calls and come back zeroed.
        figures.append(record.figure(
            f"{labels[name]}: images/s", rate[name], "images/s",
            note=f"{medians[name]:.3g} s / batch; "
                 f"{statistics.median(faults[name]):,.0f} minor page faults / batch"))
    for name in jax_names:
        speedup = rate[name] / rate["torch"] if "torch" in rate else None
        target = config.targets.min_speedup if name == shipped else None
        figures.append(record.figure(
            f"{labels[name]}: speed-up over dall_e", speedup, "×", at_least=target,
            note="" if speedup is not None else "dall_e not installed"))
    if diff is not None:
        figures.append(record.figure("max abs logit difference to dall_e", diff, ""))
    details.update({
        "labels": {name: labels[name] for name in runs},
        "seconds_per_batch": times, "median_seconds_per_batch": medians,
        "images_per_s": rate, "minor_page_faults_per_batch": faults,
        "compile_and_first_run_s": compile_s, "max_abs_logit_diff": diff,
        "jax_device": str(jax.devices()[0]),
    })
    return {"figures": figures, "details": details, "machine": machine_extra}
