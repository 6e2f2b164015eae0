"""Low-resolution inputs for a super-resolution model, made from the data as it is read.

Each batch of high-resolution images gets its low-resolution counterpart, degraded the
way the upsampler's inputs will be at generation time (the unCLIP upsamplers' recipe,
plus one step of ours):

1. an area downsample by the upsampling factor (the mean of each factor × factor
   block, which is also how the evaluation takes an output back down);
2. for a ``blur_prob`` share of each batch, a Gaussian blur of standard deviation
   ``blur_sigma`` pixels;
3. for a ``round_trip_prob`` share, a round trip through the stage-1 image tokenizer
   (encode to codes, decode), since at generation time the input is a stage-1 decoding
   and its artefacts are what the upsampler must learn to see through.

The shares are exact (``round(p · B)`` rows drawn at random), so that the round trip, a
jitted function, always sees one batch shape and compiles once.

The random choices of batch ``k`` come from ``(seed, process, k)``, and the iterator's
state holds ``k`` beside the wrapped pipeline's, so a resumed run makes the same pairs.
Noise-conditioning augmentation happens in the training step, on the device.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from scipy import ndimage

STATE_VERSION = 1


def area_downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """The mean of each ``factor`` × ``factor`` block of [B, H, W, C] images, as float32
    in the input's units; H and W must be multiples of ``factor``."""
    b, h, w, c = images.shape
    if h % factor or w % factor:
        raise ValueError(f"images of {h}x{w} do not split into {factor}x{factor} blocks")
    blocks = np.asarray(images, np.float32).reshape(b, h // factor, factor, w // factor,
                                                    factor, c)
    return blocks.mean(axis=(2, 4))


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """[B, H, W, C] images blurred over H and W (reflected at the borders)."""
    return ndimage.gaussian_filter(np.asarray(images, np.float32), (0, sigma, sigma, 0),
                                   mode="reflect", truncate=3.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def _share(rng: np.random.Generator, count: int, fraction: float) -> np.ndarray:
    """``round(fraction · count)`` rows of ``count``, drawn at random (bool [count])."""
    chosen = np.zeros(count, bool)
    chosen[rng.permutation(count)[:int(round(fraction * count))]] = True
    return chosen


def degrade(images: np.ndarray, rng: np.random.Generator, *, factor: int,
            blur_sigma: float = 0.0, blur_prob: float = 0.0,
            round_trip: Callable[[np.ndarray], np.ndarray] | None = None,
            round_trip_prob: float = 0.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """uint8 [B, H, W, 3] → the uint8 low-resolution inputs [B, H/f, W/f, 3], and which
    rows were blurred and which went through the round trip (bool [B] each)."""
    low = area_downsample(images, factor)
    count = len(images)
    blurred = _share(rng, count, blur_prob if blur_sigma > 0 else 0.0)
    if blurred.any():
        low[blurred] = gaussian_blur(low[blurred], blur_sigma)
    low = to_uint8(low)
    tripped = _share(rng, count, round_trip_prob if round_trip is not None else 0.0)
    if tripped.any():
        low[tripped] = round_trip(low[tripped])
    return low, {"blurred": blurred, "round_trip": tripped}


class LowResPairs:
    """Adds ``low_res`` (uint8 [B, H/f, W/f, 3]) to each batch of an image iterator.

    ``round_trip`` maps uint8 low-resolution images to their stage-1 reconstructions;
    None leaves that step out. The iterator's position (:meth:`get_state`) is the wrapped
    one's and the number of batches made.
    """

    def __init__(self, batches, *, factor: int, seed: int, process_index: int = 0,
                 blur_sigma: float = 0.0, blur_prob: float = 0.0,
                 round_trip: Callable[[np.ndarray], np.ndarray] | None = None,
                 round_trip_prob: float = 0.0):
        self.batches = batches
        self.factor = factor
        self.seed = seed
        self.process_index = process_index
        self.options = dict(blur_sigma=blur_sigma, blur_prob=blur_prob,
                            round_trip=round_trip, round_trip_prob=round_trip_prob)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.batches)
        rng = np.random.default_rng([self.seed, self.process_index, self.count])
        self.count += 1
        low, _ = degrade(batch["image"], rng, factor=self.factor, **self.options)
        return {**batch, "low_res": low}

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "batches_made": self.count,
                "images": self.batches.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"cannot restore the low-resolution pairs from a state of "
                             f"version {state.get('version')!r}")
        self.batches.set_state(state["images"])
        self.count = int(state["batches_made"])

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
