"""Evaluation of the diffusion upsampler: held-out images and generated ones.

- Held out: each image is taken down by the area downsample (the training pairs'), then
  brought back up by the upsampler and by bicubic interpolation. Both are scored
  against the original with PSNR and SSIM; PSNR favours blur (a regression to the mean
  scores better than any sharp guess), so both are reported. They are reported beside
  the consistency that no original is needed for: the output downsampled again,
  against the input (SR3).
- Generated (captioned shapes): the attribute checker reads the upsampled images and
  the stage-1 images they came from, so fidelity is compared at both sizes
  (:func:`dalle_jax.evaluation.evaluate.upsampled_fidelity`).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from dalle_jax.data import super_resolution
from dalle_jax.stages import upsampler as stage


def psnr(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 [B, H, W, C] images (capped at 100 dB)."""
    err = (np.asarray(images, np.float64) - np.asarray(references, np.float64)) ** 2
    mse = err.reshape(len(err), -1).mean(-1)
    return np.minimum(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)), 100.0)


def ssim(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per-image SSIM of uint8 [B, H, W, C] images (an 11-pixel Gaussian window of
    σ 1.5, the usual constants: ``tf.image.ssim``)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.image.ssim(tf.constant(np.asarray(images)), tf.constant(np.asarray(references)),
                         max_val=255).numpy().astype(np.float64)


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """uint8 images taken down by the area downsample of the training pairs."""
    return super_resolution.to_uint8(super_resolution.area_downsample(images, factor))


def bicubic(low: np.ndarray, factor: int) -> np.ndarray:
    """uint8 images brought up by bicubic interpolation (the upsampler's conditioning)."""
    up = stage.upsample_input(jnp.asarray(low, jnp.float32), factor)
    return super_resolution.to_uint8(np.asarray(up))


def _summary(values: np.ndarray) -> float:
    return round(float(np.mean(values)), 3)


def held_out(upsampler, images: np.ndarray, *, steps: int | None = None, seed: int = 0,
             eta: float | None = None, t_start: float | None = None) -> dict[str, Any]:
    """PSNR and SSIM at the high resolution, of the upsampler and of bicubic, and the
    consistency (the output downsampled against the input) of both, on uint8 images
    [N, H, W, 3] at the upsampler's high resolution."""
    factor = upsampler.factor
    low = downsample(images, factor)
    ours = upsampler.upsample(low, seed=seed, steps=steps, eta=eta, t_start=t_start)
    cubic = bicubic(low, factor)
    settings = upsampler.settings(steps, eta, t_start=t_start)
    report = {"images": len(images), "steps": settings.steps, "eta": settings.eta,
              "t_start": settings.t_start,
              "low_size": upsampler.low_size, "high_size": upsampler.high_size}
    for name, up in (("diffusion", ours), ("bicubic", cubic)):
        report[name] = {"psnr": _summary(psnr(up, images)),
                        "ssim": round(float(np.mean(ssim(up, images))), 4),
                        "consistency_psnr": _summary(psnr(downsample(up, factor), low))}
    report["psnr_gain_db"] = round(report["diffusion"]["psnr"] - report["bicubic"]["psnr"], 3)
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    """The headline lines of the upsampler's part of an evaluation report."""
    h = report["held_out"]
    start = "" if h.get("t_start", 1.0) == 1.0 else f" from t {h['t_start']:g}"
    lines = [f"upsampler {h['low_size']} -> {h['high_size']} px ({report['split']}, "
             f"{h['images']} images, {h['steps']} DDIM steps{start}):      diffusion   bicubic"]
    for label, key, unit in (("PSNR", "psnr", " dB"), ("SSIM", "ssim", ""),
                             ("consistency (down again vs input)", "consistency_psnr", " dB")):
        lines.append(f"  {label:<44}{h['diffusion'][key]:>9}{unit:<3}"
                     f"{h['bicubic'][key]:>8}{unit}")
    fid = report.get("fidelity")
    if fid:
        lines.append(f"  fidelity of generated images, stage-1 size -> upsampled "
                     f"({fid['images']} images)")
        for label, kind, name in (("one object: colour + cell", "one_object", "colour_cell"),
                                  ("one object: shape", "one_object", "shape"),
                                  ("two objects: colours + relation", "two_objects",
                                   "colours_relation")):
            low, up = (fid[k]["rates"][kind][name] for k in ("low_res", "upsampled"))
            lines.append(f"    {label:<34}{100 * low:6.1f}% -> {100 * up:6.1f}%")
    return lines
