"""Benchmarks: one module per benchmark, the JSON record of a run, the results page.

``python -m dalle_jax.tools.bench <input|dvae|transformer|checkpoint|generate|scale|upsample|all|report>`` runs them;
each benchmark reads ``configs/bench_<name>.py`` (its targets included) and writes
``benchmarks/<name>.json``, from which ``BENCHMARKS.md`` is rendered.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str  # the command's argument, the config's and the record's name
    title: str
    description: str
    module: str  # exposes summary(config) -> str and measure(config, *, workdir, log)


BENCHMARKS = {b.name: b for b in (
    Benchmark("input", "Input pipeline",
              "The training pipeline on one process (read, shuffle, decode, augment, batch, "
              "tokenize captions with BPE-dropout): examples/s on captioned shapes and on "
              "the JPEG photo path.",
              "dalle_jax.bench.input"),
    Benchmark("dvae", "Stage 1: dVAE encoder against dall_e",
              "The released dVAE architecture's encoder, this project's (jitted, whole "
              "batch and in chunks as the encoding job runs it) against OpenAI's dall_e "
              "(PyTorch) with the same random weights, fp32, side by side in one process.",
              "dalle_jax.bench.dvae"),
    Benchmark("transformer", "Stage 2: transformer training and sampling",
              "The training core's jitted step (MFU against the device's peak: published, "
              "or on a CPU a measured matmul), KV-cached against uncached sampling, and "
              "the cost of classifier-free guidance, on one device with random weights.",
              "dalle_jax.bench.transformer"),
    Benchmark("checkpoint", "Checkpoint checksums",
              "What the sha256 of every checkpoint file costs: hashing a saved step on the "
              "background thread, verifying it before a resume, the training thread's "
              "time in save() with and without, and hashing one host's share of the 12B "
              "preset's checkpoint.",
              "dalle_jax.bench.checkpoint"),
    Benchmark("generate", "Generation and the demo",
              "Text to image from a bundle: the sampler alone, decoding to pixels, the "
              "generate path with PNG writing and the generate command as a fresh process, "
              "side by side at one batch size; and the time of each stage of make demo.",
              "dalle_jax.bench.generate"),
    Benchmark("scale", "Scale: the 12B model on TPU slices",
              "The paper's 12B transformer at the paper's global batch of 1024, its train "
              "step compiled ahead of time for TPU slices on this CPU host (libtpu; "
              "tools/compile): per-chip memory against HBM with the config's mesh and "
              "rules, the smallest v5e slice that holds it, and the largest model of the "
              "paper's shape each slice holds.",
              "dalle_jax.bench.scale"),
    Benchmark("upsample", "DALL·E 2: the 4x diffusion upsampler",
              "DDIM sampling from the demo's 32 px to 128 px at 10, 25 and 50 steps "
              "(images/s), and from make demo-upsample: the upsampler's training time, "
              "PSNR and SSIM against bicubic on held-out images, the consistency of its "
              "outputs with its inputs, and the fidelity of generated images before and "
              "after it.",
              "dalle_jax.bench.upsample"),
)}
