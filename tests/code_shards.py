"""Code shards of captioned shapes for stage-2 tests, without a trained stage-1 model.

Each image is tokenized by a fixed stand-in tokenizer: the mean colour of every
``patch × patch`` block, quantised to ``levels`` steps per channel (``levels³`` codes).
The codes depend on the caption (colours, positions) the way a learned tokenizer's
would, so a transformer can learn them from the caption.
"""
from __future__ import annotations

import os

import numpy as np

from dalle_jax.data import code_records
from dalle_jax.data import shapes


def patch_codes(image: np.ndarray, patch: int, levels: int) -> np.ndarray:
    h, w, _ = image.shape
    blocks = image.reshape(h // patch, patch, w // patch, patch, 3).mean(axis=(1, 3))
    q = np.minimum((blocks / 256.0 * levels).astype(np.int64), levels - 1)
    return (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]


def write_code_shards(directory: str, splits: dict[str, int], *, name: str = "shapes",
                      image_size: int = 32, patch: int = 8, levels: int = 4,
                      num_shards: int = 2) -> dict:
    """Writes ``<name>-<split>.codes-*`` shards and metadata for each split; returns the
    grid and vocabulary."""
    os.makedirs(directory, exist_ok=True)
    grid = image_size // patch
    for split, count in splits.items():
        scenes = [shapes.split_scene(split, i, image_size=image_size) for i in range(count)]
        entries = []
        for s in range(num_shards):
            file = code_records.shard_name(name, split, s, num_shards)
            part = scenes[s::num_shards]
            written = code_records.write_shard(directory, file, (
                code_records.encode_record(patch_codes(scene.image, patch, levels),
                                           scene.caption, f"{split}-{s}-{i}")
                for i, scene in enumerate(part)))
            entries.append({"file": file, "num_examples": written})
        code_records.write_metadata(directory, name, split, shards=entries,
                                    code_shape=[grid, grid], vocab_size=levels ** 3)
    return {"grid": (grid, grid), "vocab_size": levels ** 3}
