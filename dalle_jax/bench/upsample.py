"""The diffusion upsampler: sampling speed at the demo's size, and the demo's figures.

- Sampling: the upsampler's jitted DDIM scan on one batch of stage-1-sized images
  (32 px → 128 px at the demo's sizes), images/s at each number of steps, medians of
  repeats on this host's devices; a trained run's weights or random ones (the cost does
  not depend on them).
- From ``make demo-upsample``: the upsampler's training time (its stage in
  ``demo_report.json``) and its evaluation (``evaluation.json``): PSNR and SSIM against
  bicubic on held-out images, the consistency of its outputs with its inputs, and the
  attribute checker's rates on generated images before and after it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from dalle_jax.bench import record
from dalle_jax.bench.generate import median_time
from dalle_jax.inference import runs
from dalle_jax.inference import upsampler as upsampler_lib
from dalle_jax.models import unet as unet_lib
from dalle_jax.stages import upsampler as stage


def summary(config: ml_collections.ConfigDict) -> str:
    b = config.bench
    source = config.run or "random weights at the demo's sizes"
    return (f"{source}; batch {b.batch_size}, DDIM steps "
            f"{', '.join(str(s) for s in b.steps)}, medians of {b.repeats}")


def _upsampler(config: ml_collections.ConfigDict) -> upsampler_lib.Upsampler:
    if config.run:
        return upsampler_lib.Upsampler.load_run(config.run)
    u = config.upsampler
    model = unet_lib.UNet(stage.model_config(u))
    params = nn.meta.unbox(jax.jit(lambda k: stage.init_variables(model, k))(
        jax.random.key(0)))["params"]
    return upsampler_lib.Upsampler(u, params, runs.local_batch_mesh(), 0)


def _fidelity_figures(fidelity: dict[str, Any]) -> list[dict]:
    figures = []
    for kind, name, label in (("one_object", "colour_cell", "one object: colour + cell"),
                              ("one_object", "shape", "one object: shape"),
                              ("two_objects", "colours_relation",
                               "two objects: colours + relation")):
        low = fidelity["low_res"]["rates"][kind][name]
        up = fidelity["upsampled"]["rates"][kind][name]
        figures.append(record.figure(
            f"fidelity after upsampling: {label}", 100 * (up - low), "points", at_least=0.0,
            note=f"{100 * low:.1f}% at {fidelity['low_res']['image_size']} px -> "
                 f"{100 * up:.1f}% at {fidelity['upsampled']['image_size']} px, "
                 f"{fidelity['images']} generated images"))
    return figures


def _demo_figures(report_path: str, evaluation_path: str) -> tuple[list[dict], dict]:
    details: dict[str, Any] = {}
    seconds = None
    if os.path.exists(report_path):
        with open(report_path) as f:
            stage_report = json.load(f).get("stages", {}).get("upsampler", {})
        seconds = stage_report.get("seconds")
    figures = [record.figure("upsampler training (make demo-upsample)", seconds, "s",
                             at_most=900, note="" if seconds is not None else
                             f"no upsampler stage in {report_path}: run make demo-upsample")]
    evaluation = {}
    if os.path.exists(evaluation_path):
        with open(evaluation_path) as f:
            evaluation = json.load(f).get("upsampler") or {}
    held = evaluation.get("held_out")
    if not held:
        figures.append(record.figure(
            "PSNR gain over bicubic (held out)", None, "dB", at_least=1.0,
            note=f"no upsampler evaluation in {evaluation_path}: run make demo-upsample"))
        return figures, details
    details["held_out"] = held
    d, b = held["diffusion"], held["bicubic"]
    where = f"{held['images']} {evaluation.get('split', '')} images, {held['steps']} DDIM steps"
    figures += [
        record.figure("PSNR gain over bicubic (held out)", held["psnr_gain_db"], "dB",
                      at_least=1.0, note=f"{d['psnr']:.2f} dB against bicubic's "
                                         f"{b['psnr']:.2f}; {where}"),
        record.figure("SSIM (held out), diffusion", d["ssim"], "",
                      note=f"bicubic {b['ssim']:.4f}"),
        record.figure("consistency: output downsampled vs input", d["consistency_psnr"], "dB",
                      at_least=35.0, note=f"bicubic {b['consistency_psnr']:.2f} dB"),
    ]
    if evaluation.get("fidelity"):
        details["fidelity"] = {k: evaluation["fidelity"][k] for k in ("low_res", "upsampled")}
        figures += _fidelity_figures(evaluation["fidelity"])
    return figures, details


def measure(config: ml_collections.ConfigDict, *, workdir: str,
            log: Callable[[str], Any] = print) -> dict[str, Any]:
    os.makedirs(workdir, exist_ok=True)
    b = config.bench
    upsampler = _upsampler(config)
    low = np.random.default_rng(0).integers(
        0, 256, (b.batch_size, upsampler.low_size, upsampler.low_size, 3), dtype=np.uint8)
    figures, timings = [], {}
    for steps in b.steps:
        log(f"{steps} DDIM steps, batch {b.batch_size}")
        run = lambda: upsampler.upsample(low, steps=steps)
        run()  # compile
        seconds, times = median_time(run, b.repeats)
        timings[str(steps)] = times
        figures.append(record.figure(
            f"upsample {upsampler.low_size} -> {upsampler.high_size} px, {steps} DDIM steps",
            b.batch_size / seconds, "images/s",
            note=f"{seconds:.2f} s per batch of {b.batch_size}, "
                 f"{seconds / steps / b.batch_size * 1e3:.1f} ms per image and step"))
    demo_figures, demo = _demo_figures(config.demo_report, config.demo_evaluation)
    return {"figures": figures + demo_figures,
            "details": {"run": config.run, "batch_size": b.batch_size, "seconds": timings,
                        "parameters": unet_lib.count_params(upsampler.params),
                        "demo": demo},
            "machine": {}}
