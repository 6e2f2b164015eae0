"""Image grids with captions: for the demo, image summaries and sample sheets."""
from __future__ import annotations

import io
import textwrap
from typing import Sequence

from etils import epath
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dalle_jax import files


def captioned_grid(
    images: np.ndarray,
    captions: Sequence[str],
    *,
    cols: int,
    cell_size: int = 160,
    font_size: int = 11,
    caption_lines: int = 4,
    padding: int = 6,
    title: str | None = None,
) -> np.ndarray:
    """Lays ``images`` (uint8[N, H, W, 3]) out in rows of ``cols`` with captions below,
    and ``title`` (wrapped, at most two lines) above them all.

    Images are scaled to ``cell_size`` with nearest-neighbour sampling so that the
    pixels of small images stay visible. Returns uint8[H', W', 3].
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8[N, H, W, 3], got {images.dtype}{images.shape}")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    font = ImageFont.load_default(size=font_size)
    line_height = font_size + 3
    chars_per_line = max(8, int(cell_size / (0.55 * font_size)))
    rows = -(-len(images) // cols)
    cell_w = cell_size + padding
    cell_h = cell_size + caption_lines * line_height + 2 * padding
    width = cols * cell_w + padding
    title_lines = []
    if title:
        title_font = ImageFont.load_default(size=font_size + 3)
        title_lines = textwrap.wrap(title, max(8, int(width / (0.55 * (font_size + 3)))))[:2]
    top = len(title_lines) * (line_height + 3) + (padding if title_lines else 0)
    sheet = Image.new("RGB", (width, top + rows * cell_h + padding), "white")
    draw = ImageDraw.Draw(sheet)
    for j, line in enumerate(title_lines):
        draw.text((padding, padding + j * (line_height + 3)), line, fill="black",
                  font=title_font)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x = padding + (i % cols) * cell_w
        y = top + padding + (i // cols) * cell_h
        tile = Image.fromarray(image).resize((cell_size, cell_size), Image.NEAREST)
        sheet.paste(tile, (x, y))
        lines = textwrap.wrap(caption, chars_per_line) or [""]
        if len(lines) > caption_lines:
            lines = lines[:caption_lines]
            lines[-1] = lines[-1][: chars_per_line - 1] + "…"
        for j, line in enumerate(lines):
            draw.text((x, y + cell_size + 3 + j * line_height), line, fill="black", font=font)
    return np.asarray(sheet)


def save_png(image: np.ndarray, path: str | epath.PathLike) -> epath.Path:
    """Writes uint8[H, W, 3] as a PNG, atomically (temporary name, then rename)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
    return files.atomic_write(path, buffer.getvalue())


def prompt_rows(images: np.ndarray, prompts: Sequence[str], *, cell_size: int = 64,
                label_width: int = 200, font_size: int = 11, padding: int = 4) -> np.ndarray:
    """One row per prompt: the prompt (wrapped) on the left, its images to the right.
    ``images`` is uint8[P, N, H, W, 3]. Returns uint8[H', W', 3]."""
    images = np.asarray(images)
    if images.ndim != 5 or images.dtype != np.uint8 or len(images) != len(prompts):
        raise ValueError(f"images must be uint8[{len(prompts)}, N, H, W, 3], got "
                         f"{images.dtype}{images.shape}")
    font = ImageFont.load_default(size=font_size)
    line_height = font_size + 3
    count = images.shape[1]
    row_h = cell_size + padding
    sheet = Image.new("RGB", (label_width + count * (cell_size + padding) + padding,
                              len(prompts) * row_h + padding), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(8, int((label_width - 2 * padding) / (0.55 * font_size)))
    max_lines = max(1, cell_size // line_height)
    for p, (row, prompt) in enumerate(zip(images, prompts)):
        y = padding + p * row_h
        lines = textwrap.wrap(prompt, chars)[:max_lines] or [""]
        for j, line in enumerate(lines):
            draw.text((padding, y + j * line_height), line, fill="black", font=font)
        for i, image in enumerate(row):
            tile = Image.fromarray(image).resize((cell_size, cell_size), Image.NEAREST)
            sheet.paste(tile, (label_width + i * (cell_size + padding), y))
    return np.asarray(sheet)


def examples_grid(batch, *, cols: int, pad_id: int = 0) -> np.ndarray:
    """A grid of a batch of training examples, each captioned with its caption and its
    number of text tokens (those that are not ``pad_id``)."""
    lengths = (np.asarray(batch["text_tokens"]) != pad_id).sum(-1)
    labels = [f"{c} [{n} tokens]" for c, n in zip(batch["caption"], lengths)]
    return captioned_grid(batch["image"], labels, cols=cols)
