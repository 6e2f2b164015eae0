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
) -> np.ndarray:
    """Lays ``images`` (uint8[N, H, W, 3]) out in rows of ``cols`` with captions below.

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
    sheet = Image.new("RGB", (cols * cell_w + padding, rows * cell_h + padding), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x = padding + (i % cols) * cell_w
        y = padding + (i // cols) * cell_h
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
