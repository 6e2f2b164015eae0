r"""Stage-2 transformer speed: training throughput and MFU, cached sampling, guidance.

  python -m dalle_jax.tools.bench_transformer --output=/tmp/bench_transformer.json

The model is ``configs/transformer_shapes.py:size=bench`` unless ``--config`` names
another (d = 512, 8 layers of 8 heads × 64, 64 text + 16×16 image tokens), with random
weights and random tokens, all on one device. Measured side by side in one process:

- training: the training core's jitted step (``trainer.build``: loss, gradients,
  clipping, AdamW, EMA) for each compute dtype and batch size. MFU divides the analytic
  model FLOPs (``TransformerConfig.flops_per_example``) per second by the device's peak
  in that dtype (``metrics.peak_flops_per_device``: the published figure, or on CPU a
  jitted 1024² matmul, re-measured in every round);
- sampling: image tokens/s of ``sample_cached`` (prefill + one decode per position,
  the whole 16×16 grid) against ``sample_uncached`` (the whole stream recomputed for
  every token). The uncached step does the same work at every position, so it is timed
  over the last ``--uncached_positions`` positions only;
- guidance: cached sampling with guidance scale 3 (conditional and unconditional rows
  in one pass) against scale 1.

Every case is compiled and run once first; then each round runs every case once
(interleaved, so all see the same machine state) and the tables give medians.
``--quick`` shrinks the model and the schedule to a few seconds (the smoke test).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle_jax import config as config_lib
from dalle_jax.models import transformer as transformer_lib
from dalle_jax.sampling import sampler as sampler_lib
from dalle_jax.stages import transformer as stage2
from dalle_jax.tools import machine
from dalle_jax.train import metrics as metrics_lib
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import step as step_lib
from dalle_jax.train import trainer

config_lib.define_flags()
_OUTPUT = flags.DEFINE_string("output", None, "Also write the results as JSON here.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds (medians are reported).")
_UNCACHED_REPEATS = flags.DEFINE_integer(
    "uncached_repeats", 3, "Rounds that also time uncached sampling (the slow path).")
_UNCACHED_POSITIONS = flags.DEFINE_integer(
    "uncached_positions", 8, "Image positions per timed uncached run (the last ones).")
_TRAIN_BATCH_SIZES = flags.DEFINE_list(
    "train_batch_sizes", ["8", "32"], "Training batch sizes; the first is the headline.")
_SAMPLE_BATCH_SIZES = flags.DEFINE_list(
    "sample_batch_sizes", ["1", "16"], "Sampling batch sizes (images per call).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Training compute dtypes.")
_QUICK = flags.DEFINE_bool("quick", False, "A tiny model and one round (smoke test).")

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs",
                              "transformer_shapes.py") + ":size=bench"
MFU_TARGET = 0.65  # fp32, batch 8
SPEEDUP_TARGET = 10.0  # cached over uncached image tokens/s
GUIDANCE_TARGET = 1.2  # guided over unguided sampling time


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What to measure and how often."""

    repeats: int = 5
    uncached_repeats: int = 3
    uncached_positions: int = 8
    train_batch_sizes: tuple[int, ...] = (8, 32)
    sample_batch_sizes: tuple[int, ...] = (1, 16)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")


QUICK_SCHEDULE = Schedule(repeats=1, uncached_repeats=1, uncached_positions=2,
                          train_batch_sizes=(2,), sample_batch_sizes=(1,))


def quick_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with a tiny model: d = 64, 2 layers, 8 text + 4×4 image tokens."""
    config = copy.deepcopy(config)
    config.text.update(text_len=8, vocab_size=64)
    config.model.update(image_grid=(4, 4), image_vocab_size=64, num_layers=2, num_heads=2,
                        head_dim=32, conv_kernel=3)
    return config


def machine_description(device: jax.Device) -> dict[str, Any]:
    return {"cpu": machine.cpu_model(), "cpu_count": os.cpu_count(), "device": str(device),
            "device_kind": getattr(device, "device_kind", device.platform),
            "jax": jax.__version__, "python": platform.python_version()}


def _timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - start


class _SyntheticTask(stage2.TransformerTask):
    """Stage 2's model, init and loss, fed synthetic batches (no data to check)."""

    def _check_data(self):
        pass


class _TrainCase:
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


def measure(config: ml_collections.ConfigDict, schedule: Schedule = Schedule(),
            device: jax.Device | None = None, log: Callable[[str], Any] = print
            ) -> dict[str, Any]:
    """Training, sampling and guidance timings of ``config``'s stage-2 model on ``device``
    (default: the first), as a JSON-ready dict."""
    device = device or jax.devices()[0]
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_description(device)}

    # ------------------------------------------------------------------ cases
    cases: dict[str, Callable[[], Any]] = {}
    train_cases = {}
    for dtype in schedule.dtypes:
        for batch_size in schedule.train_batch_sizes:
            case = _TrainCase(config, dtype, batch_size, device)
            train_cases[(dtype, batch_size)] = case
            cases[f"train {dtype} batch {batch_size}"] = case.step
    # Sampling runs in the config's own compute dtype.
    cfg = stage2.model_config(config)
    model = transformer_lib.Transformer(cfg)
    init = jax.jit(lambda key: step_lib.unbox(model.init(
        key, jnp.zeros((1, cfg.text_len), jnp.int32),
        jnp.zeros((1, cfg.image_len), jnp.int32)))["params"])
    params = jax.device_put(init(jax.random.key(config.seed)), device)
    key = jax.random.key(0)
    plain = sampler_lib.SamplingSettings()
    guided = sampler_lib.SamplingSettings(guidance_scale=3.0)
    positions = max(1, min(schedule.uncached_positions, cfg.image_len))
    uncached_names = []
    for batch_size in schedule.sample_batch_sizes:
        text, prime = _sample_inputs(cfg, batch_size, device)
        for name, settings in (("cached", plain), ("guided", guided)):
            cases[f"sample {name} batch {batch_size}"] = (
                lambda text=text, prime=prime, settings=settings: sampler_lib.sample_cached(
                    model, params, text, prime, key, settings=settings))
        # The uncached step recomputes the full stream whatever the position: the last
        # `positions` positions cost what any `positions` positions do.
        name = f"sample uncached batch {batch_size}"
        cases[name] = (lambda text=text, prime=prime: sampler_lib.sample_uncached(
            model, params, text, prime, key, settings=plain,
            prime_positions=cfg.image_len - positions))
        uncached_names.append(name)

    # ------------------------------------------------------------------ timing
    peak_dtypes = tuple(dict.fromkeys(schedule.dtypes))
    compile_s = {}
    for name, run in cases.items():
        compile_s[name] = _timed(run)
        log(f"compiled and ran {name} in {compile_s[name]:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in cases}
    peaks: dict[str, list[float]] = {dtype: [] for dtype in peak_dtypes}
    peak_source = {}
    for round_index in range(schedule.repeats):
        for dtype in peak_dtypes:
            flops, peak_source[dtype] = metrics_lib.peak_flops_per_device(
                jnp.dtype(dtype), device)
            peaks[dtype].append(flops)
        for name, run in cases.items():
            if name in uncached_names and round_index >= schedule.uncached_repeats:
                continue
            times[name].append(_timed(run))
        log(f"round {round_index + 1}/{schedule.repeats} done")
    median = {name: statistics.median(values) for name, values in times.items()}
    peak = {dtype: statistics.median(values) for dtype, values in peaks.items()}

    # ------------------------------------------------------------------ results
    results["model"] = {
        "d_model": cfg.d_model, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
        "head_dim": cfg.head_dim, "text_len": cfg.text_len,
        "image_grid": [cfg.image_height, cfg.image_width],
        "text_vocab_size": cfg.text_vocab_size, "image_vocab_size": cfg.image_vocab_size,
        "seq_len": cfg.seq_len, "attention": list(cfg.schedule),
        "train_flops_per_example": cfg.flops_per_example(train=True),
        "forward_flops_per_example": cfg.flops_per_example(train=False),
    }
    results["schedule"] = dataclasses.asdict(schedule)
    results["peak"] = {dtype: {"flops_per_s": peak[dtype], "source": peak_source[dtype],
                               "samples": peaks[dtype]} for dtype in peak_dtypes}
    results["train"] = []
    for (dtype, batch_size), case in train_cases.items():
        name = f"train {dtype} batch {batch_size}"
        seconds = median[name]
        flops = case.task.flops_per_example * batch_size / seconds
        results["train"].append({
            "dtype": dtype, "batch_size": batch_size, "step_s": seconds,
            "step_s_all": times[name], "examples_per_s": batch_size / seconds,
            "flops_per_s": flops, "mfu_percent": 100 * flops / peak[dtype],
            "compile_and_first_step_s": compile_s[name]})
    results["sampling"] = []
    for batch_size in schedule.sample_batch_sizes:
        cached = median[f"sample cached batch {batch_size}"]
        guided_s = median[f"sample guided batch {batch_size}"]
        uncached = median[f"sample uncached batch {batch_size}"]
        cached_rate = batch_size * cfg.image_len / cached
        uncached_rate = batch_size * positions / uncached
        results["sampling"].append({
            "batch_size": batch_size, "image_tokens": cfg.image_len,
            "cached_s": cached, "cached_tokens_per_s": cached_rate,
            "uncached_positions_timed": positions,
            "uncached_repeats": len(times[f"sample uncached batch {batch_size}"]),
            "uncached_s": uncached, "uncached_tokens_per_s": uncached_rate,
            "cached_speedup": cached_rate / uncached_rate,
            "guided_s": guided_s, "guidance_overhead": guided_s / cached})
    headline = next((r for r in results["train"] if r["dtype"] == "float32"), None)
    results["targets"] = {
        "fp32_mfu_at_least_65_percent": (None if headline is None
                                         else headline["mfu_percent"] >= 100 * MFU_TARGET),
        "cached_speedup_at_least_10x": all(r["cached_speedup"] >= SPEEDUP_TARGET
                                           for r in results["sampling"]),
        "guidance_overhead_at_most_1_2x": all(r["guidance_overhead"] <= GUIDANCE_TARGET
                                              for r in results["sampling"]),
    }
    results["total_s"] = time.perf_counter() - started
    return results


def format_report(results: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    m, model, schedule = results["machine"], results["model"], results["schedule"]
    lines = [
        f"machine: {m['cpu']}, {m['cpu_count']} cores; jax {m['jax']} on {m['device']}",
        f"model: d {model['d_model']}, {model['num_layers']} layers, "
        f"{model['num_heads']} heads x {model['head_dim']}, {model['text_len']} text + "
        f"{model['image_grid'][0]}x{model['image_grid'][1]} image tokens; "
        f"{metrics_lib.format_number(model['train_flops_per_example'] / 1e9, 3)} GFLOP per "
        "training example",
        f"medians of {schedule['repeats']} interleaved rounds after a compile + first run; "
        f"total {results['total_s']:.0f} s",
        "",
        "| training step | step (s) | examples/s | GFLOP/s | peak GFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["train"]:
        peak = results["peak"][r["dtype"]]
        lines.append(
            f"| {r['dtype']}, batch {r['batch_size']} | {r['step_s']:.3f} | "
            f"{r['examples_per_s']:.2f} | {r['flops_per_s'] / 1e9:.1f} | "
            f"{peak['flops_per_s'] / 1e9:.1f} ({peak['source']}) | {r['mfu_percent']:.1f}% |")
    lines += [
        "",
        "| sampling | cached tokens/s | uncached tokens/s | cached speed-up | "
        "guided (scale 3) / unguided |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results["sampling"]:
        lines.append(
            f"| batch {r['batch_size']}, {r['image_tokens']} image tokens | "
            f"{r['cached_tokens_per_s']:.1f} | {r['uncached_tokens_per_s']:.2f} | "
            f"{r['cached_speedup']:.1f}x | {r['guidance_overhead']:.2f}x |")
    if results["sampling"]:
        r = results["sampling"][0]
        lines.append(f"(uncached: the last {r['uncached_positions_timed']} positions, "
                     f"median of {r['uncached_repeats']})")
    lines.append("")
    for target, met in results["targets"].items():
        lines.append(f"{target}: {'met' if met else 'not met' if met is not None else '-'}")
    return "\n".join(lines)


def main(argv):
    del argv
    config = flags.FLAGS.config
    if config is None:
        config = config_lib.load_config_file(DEFAULT_CONFIG)
    if _QUICK.value:
        config, schedule = quick_config(config), QUICK_SCHEDULE
    else:
        schedule = Schedule(
            repeats=_REPEATS.value, uncached_repeats=_UNCACHED_REPEATS.value,
            uncached_positions=_UNCACHED_POSITIONS.value,
            train_batch_sizes=tuple(int(b) for b in _TRAIN_BATCH_SIZES.value),
            sample_batch_sizes=tuple(int(b) for b in _SAMPLE_BATCH_SIZES.value),
            dtypes=tuple(_DTYPES.value))
    results = measure(config, schedule)
    print()
    print(format_report(results))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    config_lib.run(main)
