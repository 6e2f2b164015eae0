"""Stage-2 transformer speed: training throughput and MFU, cached sampling, guidance.

The model is the config's stage-2 model with random weights and random tokens, all on
one device. Measured side by side in one process:

- training: the training core's jitted step (``trainer.build``: loss, gradients,
  clipping, AdamW, EMA) for each compute dtype and batch size of ``config.bench``. MFU
  divides the analytic model FLOPs (``TransformerConfig.flops_per_example``) per second
  by the device's peak in that dtype (``metrics.peak_flops_per_device``: the published
  figure, or on a CPU a jitted 1024² matmul, re-measured in every round);
- sampling: image tokens/s of ``sample_cached`` (prefill + one decode per position,
  the whole grid) against ``sample_uncached`` (the whole stream recomputed for every
  token). The uncached step does the same work at every position, so it is timed over
  the last ``config.bench.uncached_positions`` positions only;
- guidance: cached sampling at ``config.bench.guidance_scale`` (conditional and
  unconditional rows in one pass) against scale 1.

Every case is compiled and run once first; then each round runs every case once
(interleaved, so all see the same machine state) and the figures are medians.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle_jax.bench import record
from dalle_jax.models import transformer as transformer_lib
from dalle_jax.sampling import sampler as sampler_lib
from dalle_jax.stages import transformer as stage2
from dalle_jax.train import metrics as metrics_lib
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import step as step_lib
from dalle_jax.train import trainer


def summary(config: ml_collections.ConfigDict) -> str:
    m, b = config.model, config.bench
    cfg = stage2.model_config(config)
    return (f"d {cfg.d_model}, {m.num_layers} layers of {m.num_heads} heads × {m.head_dim}, "
            f"{config.text.text_len} text + {m.image_grid[0]}×{m.image_grid[1]} image tokens, "
            f"attention {m.attention!r}, "
            f"{'scanned' if m.get('scan_layers', True) else 'unrolled'} layers; training "
            f"{', '.join(b.dtypes)} at batch {', '.join(map(str, b.train_batch_sizes))}; "
            f"sampling at batch {', '.join(map(str, b.sample_batch_sizes))}; medians of "
            f"{b.repeats} rounds (uncached: {b.uncached_repeats} rounds of the last "
            f"{b.uncached_positions} positions)")


def _timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - start


class _SyntheticTask(stage2.TransformerTask):
    """Stage 2's model, init and loss, fed synthetic batches (no data to check)."""

    def _check_data(self):
        pass


class TrainCase:
    """One compiled training step (dtype, batch size) on one device, and its state."""

    def __init__(self, config, dtype: str, batch_size: int, device: jax.Device):
        config = copy.deepcopy(config)
        config.train.compute_dtype = dtype
        config.batch_size = batch_size
        config.mesh.update(data=1, fsdp=1, tensor=1, dcn_data=1)
        self.dtype, self.batch_size = dtype, batch_size
        self.task = _SyntheticTask(config, workdir=None, mesh=None)
        self.mesh = sharding_lib.make_mesh(config.mesh, [device])
        self.rules = sharding_lib.logical_rules(config.sharding)
        self.training = trainer.build(config, self.task, self.mesh, self.rules)
        cfg = self.task.model_config
        rng = np.random.default_rng(batch_size)
        batch = {
            "text_tokens": rng.integers(0, cfg.text_vocab_size, (batch_size, cfg.text_len),
                                        dtype=np.int32),
            "codes": rng.integers(0, cfg.image_vocab_size,
                                  (batch_size, cfg.image_height, cfg.image_width),
                                  dtype=np.int32),
            "mask": np.ones((batch_size,), np.float32),
        }
        self.batch = jax.device_put(batch, sharding_lib.batch_sharding(self.mesh))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            self.state = self.training.init(jax.random.key(config.seed))
        self.rng = jax.device_put(np.asarray(self.state.rng),
                                  sharding_lib.replicated(self.mesh))

    def step(self) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            self.state, metrics = self.training.train_step(self.state, self.batch, self.rng)
        return self.state, metrics


def _sample_inputs(cfg: transformer_lib.TransformerConfig, batch_size: int,
                   device: jax.Device):
    rng = np.random.default_rng(batch_size)
    text = rng.integers(1, cfg.text_vocab_size, (batch_size, cfg.text_len), dtype=np.int32)
    prime = np.zeros((batch_size, cfg.image_len), np.int32)
    return jax.device_put(text, device), jax.device_put(prime, device)


def measure(config: ml_collections.ConfigDict, *, workdir: str | None = None,
            log: Callable[[str], Any] = print, device: jax.Device | None = None
            ) -> dict[str, Any]:
    """Training, sampling and guidance timings on ``device`` (default: the first):
    ``{"figures", "details", "machine"}``."""
    del workdir  # nothing to build: weights and tokens are random
    device = device or jax.devices()[0]
    bench, targets = config.bench, config.targets

    # ------------------------------------------------------------------ cases
    cases: dict[str, Callable[[], Any]] = {}
    train_cases = {}
    for dtype in bench.dtypes:
        for batch_size in bench.train_batch_sizes:
            case = TrainCase(config, dtype, batch_size, device)
            train_cases[(dtype, batch_size)] = case
            cases[f"train {dtype} batch {batch_size}"] = case.step
    # Sampling runs in the config's own compute dtype.
    cfg = stage2.model_config(config)
    model = transformer_lib.Transformer(cfg)
    init = jax.jit(lambda key: step_lib.unbox(stage2.init_variables(model, key))["params"])
    params = jax.device_put(init(jax.random.key(config.seed)), device)
    plain = sampler_lib.SamplingSettings()
    guided = sampler_lib.SamplingSettings(guidance_scale=bench.guidance_scale)
    positions = max(1, min(bench.uncached_positions, cfg.image_len))
    uncached_names = []
    for batch_size in bench.sample_batch_sizes:
        text, prime = _sample_inputs(cfg, batch_size, device)
        keys = jax.device_put(sampler_lib.row_keys(0, batch_size), device)
        for name, settings in (("cached", plain), ("guided", guided)):
            cases[f"sample {name} batch {batch_size}"] = (
                lambda text=text, prime=prime, keys=keys, settings=settings:
                sampler_lib.sample_cached(model, params, text, prime, keys, settings=settings))
        # The uncached step recomputes the full stream whatever the position: the last
        # `positions` positions cost what any `positions` positions do.
        name = f"sample uncached batch {batch_size}"
        cases[name] = (lambda text=text, prime=prime, keys=keys: sampler_lib.sample_uncached(
            model, params, text, prime, keys, settings=plain,
            prime_positions=cfg.image_len - positions))
        uncached_names.append(name)

    # ------------------------------------------------------------------ timing
    peak_dtypes = tuple(dict.fromkeys(bench.dtypes))
    compile_s = {}
    for name, run in cases.items():
        compile_s[name] = _timed(run)
        log(f"compiled and ran {name} in {compile_s[name]:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in cases}
    peaks: dict[str, list[float]] = {dtype: [] for dtype in peak_dtypes}
    peak_source = {}
    for round_index in range(bench.repeats):
        for dtype in peak_dtypes:
            flops, peak_source[dtype] = metrics_lib.peak_flops_per_device(
                jnp.dtype(dtype), device)
            peaks[dtype].append(flops)
        for name, run in cases.items():
            if name in uncached_names and round_index >= bench.uncached_repeats:
                continue
            times[name].append(_timed(run))
        log(f"round {round_index + 1}/{bench.repeats} done")
    median = {name: statistics.median(values) for name, values in times.items()}
    peak = {dtype: statistics.median(values) for dtype, values in peaks.items()}

    # ------------------------------------------------------------------ figures
    figures = []
    train = []
    headline = ("float32", bench.train_batch_sizes[0])  # the MFU target's case
    for (dtype, batch_size), case in train_cases.items():
        name = f"train {dtype} batch {batch_size}"
        seconds = median[name]
        flops = case.task.flops_per_example * batch_size / seconds
        mfu = 100 * flops / peak[dtype]
        train.append({
            "dtype": dtype, "batch_size": batch_size, "step_s": seconds,
            "step_s_all": times[name], "examples_per_s": batch_size / seconds,
            "flops_per_s": flops, "mfu_percent": mfu,
            "compile_and_first_step_s": compile_s[name]})
        figures.append(record.figure(
            f"training MFU, {dtype}, batch {batch_size}", mfu, "%",
            at_least=(targets.min_mfu_percent if (dtype, batch_size) == headline else None),
            note=f"{seconds:.3f} s / step, {batch_size / seconds:.2f} examples/s, "
                 f"{flops / 1e9:,.1f} model GFLOP/s of {peak[dtype] / 1e9:,.1f} peak "
                 f"({peak_source[dtype]})"))
    sampling = []
    for batch_size in bench.sample_batch_sizes:
        cached = median[f"sample cached batch {batch_size}"]
        guided_s = median[f"sample guided batch {batch_size}"]
        uncached = median[f"sample uncached batch {batch_size}"]
        cached_rate = batch_size * cfg.image_len / cached
        uncached_rate = batch_size * positions / uncached
        uncached_rounds = len(times[f"sample uncached batch {batch_size}"])
        sampling.append({
            "batch_size": batch_size, "image_tokens": cfg.image_len,
            "cached_s": cached, "cached_tokens_per_s": cached_rate,
            "uncached_positions_timed": positions, "uncached_repeats": uncached_rounds,
            "uncached_s": uncached, "uncached_tokens_per_s": uncached_rate,
            "cached_speedup": cached_rate / uncached_rate,
            "guided_s": guided_s, "guidance_overhead": guided_s / cached})
        figures += [
            record.figure(f"cached sampling, batch {batch_size}", cached_rate,
                          "image tokens/s",
                          note=f"{cfg.image_len} image tokens in {cached:.3g} s, prefill "
                               "included"),
            record.figure(f"cached over uncached sampling, batch {batch_size}",
                          cached_rate / uncached_rate, "×",
                          at_least=targets.min_cached_speedup,
                          note=f"uncached {uncached_rate:,.2f} image tokens/s (the last "
                               f"{positions} positions, median of {uncached_rounds})"),
            record.figure(f"guided (scale {bench.guidance_scale:g}) over unguided sampling "
                          f"time, batch {batch_size}", guided_s / cached, "×",
                          at_most=targets.max_guidance_overhead,
                          note=f"{guided_s:.3g} s against {cached:.3g} s"),
        ]
    details = {
        "model": {
            "d_model": cfg.d_model, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "head_dim": cfg.head_dim, "text_len": cfg.text_len,
            "image_grid": [cfg.image_height, cfg.image_width],
            "text_vocab_size": cfg.text_vocab_size, "image_vocab_size": cfg.image_vocab_size,
            "seq_len": cfg.seq_len, "attention": list(cfg.schedule),
            "train_flops_per_example": cfg.flops_per_example(train=True),
            "forward_flops_per_example": cfg.flops_per_example(train=False),
        },
        "device": str(device),
        "peak": {dtype: {"flops_per_s": peak[dtype], "source": peak_source[dtype],
                         "samples": peaks[dtype]} for dtype in peak_dtypes},
        "train": train, "sampling": sampling, "compile_and_first_run_s": compile_s,
    }
    return {"figures": figures, "details": details, "machine": {}}
