"""Where generated images go: one PNG per image, a grid per prompt, ``samples.jsonl``.

    <output>/images/<ppp>_<prompt>/<ii>.png     every image (ppp: the prompt's number)
    <output>/grids/<ppp>_<prompt>.png           each prompt's images, the prompt above
    <output>/samples.jsonl                      one record per image, "file" first
    <output>/candidates/<ppp>_<prompt>/<cc>.png every candidate, when reranking keeps all
    <output>/candidates.jsonl                   their records (score, rank)

Every file is written atomically (a temporary name, then a rename).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Sequence

import numpy as np

from dalle_jax import files
from dalle_jax import visualize

RECORDS = "samples.jsonl"
CANDIDATE_RECORDS = "candidates.jsonl"


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "unconditional"


def prompt_names(prompts: Sequence[str]) -> list[str]:
    return [f"{i:03d}_{slug(p)}" for i, p in enumerate(prompts)]


def image_file(name: str, index: int, count: int) -> str:
    """The path of image ``index`` of the prompt ``name``, relative to the output."""
    return f"images/{name}/{index:0{max(2, len(str(count - 1)))}d}.png"


def save_images(output: str, names: Sequence[str], rows, images: np.ndarray,
                count: int) -> None:
    """Writes ``images`` of the (prompt index, image index) ``rows``."""
    for (p, j), image in zip(rows, images):
        visualize.save_png(image, os.path.join(output, image_file(names[p], j, count)))


def save_grids(output: str, result, names: Sequence[str], cols: int | None = None) -> None:
    """One grid per prompt of a :class:`~dalle_jax.inference.text_to_image.Generation`."""
    count = result.images.shape[1]
    cols = cols or min(count, max(1, math.ceil(math.sqrt(count * 2))))
    for p, prompt in enumerate(result.prompts):
        labels = [f"#{j}" if result.scores is None else f"#{j} {result.scores[p, j]:.3f}"
                  for j in range(count)]
        grid = visualize.captioned_grid(
            result.images[p], labels, cols=cols, cell_size=128,
            caption_lines=1, title=prompt or "(no prompt)")
        visualize.save_png(grid, os.path.join(output, "grids", f"{names[p]}.png"))


def save_records(output: str, result, names: Sequence[str]) -> str:
    """``samples.jsonl``: each record of ``result`` with its image's file."""
    count = result.images.shape[1]
    lines = [json.dumps({"file": image_file(names[r["prompt_index"]], r["index"], count), **r})
             for r in result.records]
    return str(files.atomic_write(os.path.join(output, RECORDS), "\n".join(lines) + "\n"))


def save_candidates(output: str, candidates, names: Sequence[str]) -> str:
    """Every candidate of a reranked request (``Generation.candidates``) as
    ``candidates/<prompt>/<candidate>.png``, and ``candidates.jsonl``."""
    count = candidates.images.shape[1]
    lines = []
    for r, image in zip(candidates.records,
                        candidates.images.reshape((-1,) + candidates.images.shape[2:])):
        file = image_file(names[r["prompt_index"]], r["candidate"], count).replace(
            "images/", "candidates/", 1)
        visualize.save_png(image, os.path.join(output, file))
        lines.append(json.dumps({"file": file, **r}))
    return str(files.atomic_write(os.path.join(output, CANDIDATE_RECORDS),
                                  "\n".join(lines) + "\n"))


def save_low_res(output: str, result, names: Sequence[str]) -> None:
    """The stage-1 images of an upsampled request (``Generation.low_res``) as
    ``low_res/<prompt>/<index>.png``, beside their 4x versions under ``images/``."""
    count = result.low_res.shape[1]
    for r, image in zip(result.records,
                        result.low_res.reshape((-1,) + result.low_res.shape[2:])):
        file = image_file(names[r["prompt_index"]], r["index"], count).replace(
            "images/", "low_res/", 1)
        visualize.save_png(image, os.path.join(output, file))


def save_all(output: str, result, cols: int | None = None) -> list[str]:
    """Images, grids and records of ``result``; returns the prompts' names."""
    names = prompt_names(result.prompts)
    rows = [(r["prompt_index"], r["index"]) for r in result.records]
    save_images(output, names, rows, result.images.reshape((-1,) + result.images.shape[2:]),
                result.images.shape[1])
    save_grids(output, result, names, cols)
    save_records(output, result, names)
    if result.candidates is not None:
        save_candidates(output, result.candidates, names)
    if result.low_res is not None:
        save_low_res(output, result, names)
    return names
