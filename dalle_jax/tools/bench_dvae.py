r"""Encoder throughput: this project's dVAE encoder (jitted) against dall_e's (PyTorch).

  python -m dalle_jax.tools.bench_dvae --config=configs/dvae_openai.py

Both run side by side in one process on the CPU with the same weights (a random dall_e
encoder at ``config.model``'s sizes, converted), fp32, ``config.bench.batch_size``
images of ``config.model.image_size`` px. Each is timed ``repeats`` times after
``warmup`` runs, interleaved so that all see the same machine state; the table gives
medians. A second JAX row runs the batch as ``lax.map`` over chunks of
``config.bench.chunk_size`` images inside one jitted program (``dvae.in_chunks``, as the
encoding job runs with ``config.encode.chunk_size``). Each row also gives the
median count of minor page faults per batch (with ``GLIBC_TUNABLES`` echoed, since the
allocator's settings change it). Needs torch and dall_e (see configs/dvae_openai.py).

On a GPU machine, ``--config.bench.torch_device=cuda`` runs the PyTorch encoder there
too (the JAX one runs on JAX's default device). Both then compute in full fp32: TF32 is
turned off in cuDNN and JAX's matmul precision is set to ``highest``, and each timed
run ends with its device's synchronisation.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Callable

from absl import flags
import jax
import numpy as np

from dalle_jax import config as config_lib
from dalle_jax.models import dvae
from dalle_jax.models import openai_dvae
from dalle_jax.tools import machine

config_lib.define_flags()


def _time(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv):
    del argv
    config = flags.FLAGS.config
    bench, model = config.bench, config.model
    torch = openai_dvae.require_torch_and_dall_e()
    from dall_e.encoder import Encoder as TorchEncoder

    threads = bench.threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(bench.seed)
    device = torch.device(bench.get("torch_device", "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("bench.torch_device=cuda, but torch sees no CUDA device")
        torch.backends.cudnn.allow_tf32 = False  # fp32, as the JAX side below
        torch.backends.cuda.matmul.allow_tf32 = False
        jax.config.update("jax_default_matmul_precision", "highest")
    torch_encoder = TorchEncoder(n_hid=model.n_hid, n_blk_per_group=model.n_blk_per_group,
                                 vocab_size=model.vocab_size).eval()
    encoder, _ = openai_dvae.modules_from_config(model)
    expected = openai_dvae.module_param_shapes(encoder, 3)
    state = {name: tensor.numpy() for name, tensor in torch_encoder.state_dict().items()}
    params = jax.device_put(openai_dvae.state_dict_to_params(state, expected, "encoder"))

    size = model.image_size
    pixels = dvae.map_pixels(
        np.random.default_rng(bench.seed).random((bench.batch_size, size, size, 3),
                                                 np.float32))
    pixels_nhwc = jax.device_put(np.asarray(pixels))
    pixels_nchw = torch.from_numpy(
        np.ascontiguousarray(np.asarray(pixels).transpose(0, 3, 1, 2))).to(device)
    torch_encoder.to(device)

    apply = jax.jit(encoder.apply)
    chunk = bench.chunk_size

    @jax.jit
    def apply_in_chunks(variables, pixels):
        # As the encoding job runs with config.encode.chunk_size: one chunk at a time
        # inside the same program, for fewer live activations and the same arithmetic.
        return dvae.in_chunks(lambda x: encoder.apply(variables, x), pixels, chunk)

    def run_torch():
        with torch.no_grad():
            logits = torch_encoder(pixels_nchw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return logits

    runs = {"torch": run_torch,
            "jax": lambda: apply({"params": params}, pixels_nhwc).block_until_ready()}
    if chunk and chunk < bench.batch_size:  # in_chunks refuses a chunk that does not divide
        runs["jax_chunked"] = lambda: apply_in_chunks(
            {"params": params}, pixels_nhwc).block_until_ready()
    compile_s = {name: _time(run) for name, run in runs.items() if name != "torch"}
    reference = runs["torch"]().cpu().numpy().transpose(0, 2, 3, 1)
    diff = max(float(np.abs(np.asarray(runs[name]()) - reference).max()) for name in compile_s)
    for _ in range(bench.warmup):
        for run in runs.values():
            run()
    # Interleaved, so that every implementation sees the same machine state.
    times = {name: [] for name in runs}
    faults = {name: [] for name in runs}
    for _ in range(bench.repeats):
        for name, run in runs.items():
            before = _minor_faults()
            times[name].append(_time(run))
            faults[name].append(_minor_faults() - before)
    medians = {name: statistics.median(values) for name, values in times.items()}
    rate = {name: bench.batch_size / seconds for name, seconds in medians.items()}

    print(f"dVAE encoder, {size} px, batch {bench.batch_size}, fp32, "
          f"n_hid {model.n_hid}, vocab {model.vocab_size}; median of {bench.repeats} "
          f"after {bench.warmup} warm-up runs; GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    print(f"machine: {machine.cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} "
          f"({device}, {threads} threads), jax {jax.__version__} "
          f"({jax.devices()[0].device_kind}); "
          f"max abs logit diff to dall_e {diff:.1e}; XLA compile + first run "
          + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in compile_s.items()))
    print()
    labels = {"torch": "dall_e (PyTorch, no_grad)", "jax": "dalle_jax (jit)",
              "jax_chunked": f"dalle_jax (jit, lax.map over chunks of {chunk})"}
    # Minor page faults per batch: first touches of fresh pages, as when large buffers
    # go back to the kernel between calls and come back zeroed.
    print("| encoder | s / batch | images / s | vs dall_e | minor page faults / batch |")
    print("|---|---:|---:|---:|---:|")
    for name in runs:
        print(f"| {labels[name]} | {medians[name]:.2f} | {rate[name]:.2f} | "
              f"{rate[name] / rate['torch']:.2f}× | {statistics.median(faults[name]):,.0f} |")

if __name__ == "__main__":
    config_lib.run(main)
