"""Captioned shapes: procedurally rendered text-to-image scenes.

A scene holds one or two coloured shapes on a noisy dark-grey background, with a
caption that names each object (optional size word, colour, shape) and its
layout: the 3x3 cell of a lone object, or the spatial relation between two.

Everything here is pure numpy (plus zlib for PNG bytes) and depends only on the
`np.random.Generator` it is given, so a dataset built from one generator per
example (see `split_scene`) is reproducible whatever the order or parallelism.

Geometry conventions: pixel (row i, column j) covers [j, j+1) x [i, i+1) in
continuous image coordinates; centres are (x, y) in those coordinates; each shape
is drawn inside a square box of side `2 * half_size` centred on its centre.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import struct
from typing import Sequence
import zlib

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 205, 40),
    "purple": (145, 60, 190),
    "orange": (240, 135, 30),
    "cyan": (40, 195, 205),
    "white": (240, 240, 240),
}
COLOURS = tuple(PALETTE)
SIZES = ("small", "large")

# Nine layout phrases of a lone object, row-major over the 3x3 grid of cells.
CELL_PHRASES = (
    "in the top left corner", "at the top", "in the top right corner",
    "on the left", "in the center", "on the right",
    "in the bottom left corner", "at the bottom", "in the bottom right corner",
)
# Canonical relations of a two-object scene; the subject is mentioned first.
RELATIONS = ("above", "below", "left of", "right of")

CAPTION_PREFIXES = ("", "a picture of ", "an image of ", "a drawing of ", "there is ")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_PHRASES = {
    "above": ("above", "over"),
    "below": ("below", "under"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}

Pair = tuple[str, str]  # (colour, shape)
ALL_PAIRS: tuple[Pair, ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
DEFAULT_HOLDOUT: tuple[Pair, ...] = (
    ("green", "triangle"), ("purple", "circle"), ("orange", "square"),
)
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2, "holdout": 3}

# Appearance.
SIZE_FRACTION = {"small": 0.2, "large": 0.4}  # box side as a fraction of the image width
SIZE_JITTER = 0.08  # relative
COLOUR_JITTER = 12  # per channel, inclusive
BACKGROUND_LEVELS = (10, 50)  # inclusive range of the grey level
BACKGROUND_NOISE = 8  # per pixel, inclusive
SUPERSAMPLING = 4  # 4x4 coverage samples per pixel of an object's box
PNG_COMPRESS_LEVEL = 1

# Layout, as fractions of the image width. Two objects are separated along their
# relation's axis by at least the sum of their half sizes plus OBJECT_GAP, which
# both keeps their boxes apart and, with the dominance ratio, makes the relation
# unambiguous.
IMAGE_MARGIN = 0.02  # between any box and the image border
CELL_MARGIN = 0.05  # between a lone object's centre and the 3x3 grid lines
OBJECT_GAP = 0.03
RELATION_MIN_OFFSET = 0.15  # centres differ at least this much along the relation's axis
RELATION_DOMINANCE = 2.0  # ...and at least this many times more than along the other axis

TWO_OBJECT_PROBABILITY = 0.5
SIZE_WORD_PROBABILITY = 0.75
MAX_PLACEMENT_TRIES = 100


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One drawn shape and the labels that describe it."""

    shape: str
    colour: str
    size: str
    rgb: np.ndarray  # uint8[3]: the jittered colour actually drawn
    centre: tuple[float, float]  # (x, y) in pixels: the centre of the shape's box
    half_size: float  # half the side of the shape's box, in pixels

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)

    def pixel_bbox(self) -> tuple[float, float, float, float]:
        """Tight (ymin, xmin, ymax, xmax) of the shape itself, in pixels."""
        half_x, half_y = (self.half_size * e for e in _SHAPE_EXTENT[self.shape])
        x, y = self.centre
        return (y - half_y, x - half_x, y + half_y, x + half_x)

    def bbox(self, image_size: int) -> tuple[float, float, float, float]:
        """Tight (ymin, xmin, ymax, xmax) normalised to [0, 1]."""
        return tuple(v / image_size for v in self.pixel_bbox())


@dataclasses.dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8[H, W, 3]
    caption: str
    layout: str  # a CELL_PHRASES entry (one object) or a RELATIONS entry (two)
    objects: tuple[SceneObject, ...]  # the caption's subject first


# --- Shape geometry, in box units: the box spans [-1, 1] on both axes, y down.

# Distance of each edge's line from the star's centre, per unit outer radius.
_STAR_EDGE_DISTANCE = math.cos(math.radians(72))
# Outer radius and vertical shift that make the star (apex up) exactly as wide as
# the box and vertically centred in it: tips span x in +-R cos 18, y in [-R, R cos 36].
_STAR_RADIUS = 1 / math.cos(math.radians(18))
_STAR_SHIFT = _STAR_RADIUS * (1 - math.cos(math.radians(36))) / 2
_STAR_NORMALS = tuple(
    (math.cos(math.radians(a)), math.sin(math.radians(a))) for a in range(-18, 342, 72)
)
# Tight half extents (x, y) of each shape in box units.
_SHAPE_EXTENT = {
    "circle": (1.0, 1.0),
    "square": (1.0, 1.0),
    "triangle": (1.0, 1.0),
    "diamond": (1.0, 1.0),
    "star": (1.0, _STAR_RADIUS - _STAR_SHIFT),
}


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether the points (u, v), in box units, lie inside `shape` (broadcasts)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":  # apex (0, -1), base from (-1, 1) to (1, 1)
        return (v <= 1.0) & (2.0 * np.abs(u) <= v + 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "star":
        # The ten edges of a pentagram lie on five lines; the star is exactly the set
        # of points on the centre's side of at least four of them.
        v = v - _STAR_SHIFT
        limit = _STAR_EDGE_DISTANCE * _STAR_RADIUS
        inside_count = sum(
            (u * nx + v * ny <= limit).astype(np.uint8) for nx, ny in _STAR_NORMALS
        )
        return inside_count >= 4
    raise ValueError(f"unknown shape {shape!r}")


# --- Rendering.


def render_background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Dark grey of a random level plus per-pixel grey noise, as uint8[H, W, 3]."""
    level = rng.integers(BACKGROUND_LEVELS[0], BACKGROUND_LEVELS[1], endpoint=True)
    noise = rng.integers(
        -BACKGROUND_NOISE, BACKGROUND_NOISE, size=(image_size, image_size),
        dtype=np.int16, endpoint=True,
    )
    grey = np.clip(noise + level, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def draw_object(image: np.ndarray, obj: SceneObject) -> None:
    """Blends `obj` into `image` in place, anti-aliased by supersampled coverage."""
    height, width, _ = image.shape
    x, y = obj.centre
    half = obj.half_size
    col0, col1 = max(0, math.floor(x - half)), min(width, math.ceil(x + half))
    row0, row1 = max(0, math.floor(y - half)), min(height, math.ceil(y + half))
    offsets = (np.arange(SUPERSAMPLING) + 0.5) / SUPERSAMPLING
    xs = (np.arange(col0, col1)[:, None] + offsets).reshape(-1)
    ys = (np.arange(row0, row1)[:, None] + offsets).reshape(-1)
    inside = shape_mask(obj.shape, (xs[None, :] - x) / half, (ys[:, None] - y) / half)
    # Coverage as a count of the S*S samples inside each pixel; summing the sample
    # rows first and then the columns is much faster than one 2-axis reduction.
    rows, cols = row1 - row0, col1 - col0
    samples = SUPERSAMPLING * SUPERSAMPLING
    count = inside.view(np.uint8).reshape(rows, SUPERSAMPLING, cols * SUPERSAMPLING)
    count = count.sum(axis=1, dtype=np.uint16).reshape(rows, cols, SUPERSAMPLING)
    count = count.sum(axis=2, dtype=np.uint16)[:, :, None]
    region = image[row0:row1, col0:col1].astype(np.uint16)
    blended = (region * (samples - count) + obj.rgb * count + samples // 2) // samples
    image[row0:row1, col0:col1] = blended.astype(np.uint8)


def encode_png(image: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Lossless PNG bytes of a uint8[H, W, 3] image, a pure function of its pixels.

    Rows are stored unfiltered and deflated at a low level: on these noisy
    backgrounds that is several times faster than Pillow's or TensorFlow's
    encoders and compresses about as well.
    """
    height, width, channels = image.shape
    if image.dtype != np.uint8 or channels != 3:
        raise ValueError(f"expected uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
    rows = np.zeros((height, 1 + width * channels), np.uint8)  # leading 0: filter "none"
    rows[:, 1:] = image.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"".join((
        _PNG_SIGNATURE,
        _png_chunk(b"IHDR", header),
        _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)),
        _png_chunk(b"IEND", b""),
    ))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    checksum = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", checksum)


# --- Layout.


def cell_index(centre: tuple[float, float], image_size: int) -> int:
    """Row-major index of the 3x3 cell containing `centre` (indexes CELL_PHRASES)."""
    x, y = centre
    col = min(2, max(0, int(3 * x // image_size)))
    row = min(2, max(0, int(3 * y // image_size)))
    return 3 * row + col


def relation_holds(
    relation: str,
    subject: tuple[float, float],
    other: tuple[float, float],
    image_size: int,
    min_offset: float = RELATION_MIN_OFFSET,
    dominance: float = RELATION_DOMINANCE,
) -> bool:
    """Whether the centre `subject` is `relation` the centre `other`, with margin.

    The offset along the relation's axis must point the right way, be at least
    `min_offset * image_size`, and be `dominance` times the offset along the
    other axis.
    """
    dx, dy = other[0] - subject[0], other[1] - subject[1]
    along, across = {
        "above": (dy, dx), "below": (-dy, dx), "left of": (dx, dy), "right of": (-dx, dy),
    }[relation]
    return along >= min_offset * image_size and along >= dominance * abs(across)


def _sample_object_look(
    rng: np.random.Generator, pair: Pair, image_size: int
) -> tuple[str, np.ndarray, float]:
    """Size class, jittered rgb and half size (in pixels) of an object to draw."""
    size = SIZES[rng.integers(len(SIZES))]
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER, size=3, endpoint=True)
    rgb = np.clip(np.array(PALETTE[pair[0]]) + jitter, 0, 255).astype(np.uint8)
    scale = 1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    half_size = 0.5 * SIZE_FRACTION[size] * image_size * scale
    return size, rgb, half_size


def _place_in_cell(
    rng: np.random.Generator, cell: int, half_size: float, image_size: int
) -> tuple[float, float]:
    """A centre well inside `cell` whose box stays inside the image."""
    cell_side = image_size / 3
    low_limit = half_size + IMAGE_MARGIN * image_size
    high_limit = image_size - low_limit
    centre = []
    for cell_coordinate in (cell % 3, cell // 3):
        low = max(low_limit, (cell_coordinate + CELL_MARGIN * 3) * cell_side)
        high = min(high_limit, (cell_coordinate + 1 - CELL_MARGIN * 3) * cell_side)
        if low > high:
            raise ValueError(f"an object of half size {half_size} does not fit cell {cell}")
        centre.append(rng.uniform(low, high))
    return (centre[0], centre[1])


def _place_related(
    rng: np.random.Generator,
    relation: str,
    subject_half: float,
    other_half: float,
    image_size: int,
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Centres for two objects satisfying `relation`, or None if they cannot fit."""
    margin = IMAGE_MARGIN * image_size
    axis = 0 if relation in ("left of", "right of") else 1
    subject_leads = relation in ("left of", "above")
    lead_half, trail_half = (
        (subject_half, other_half) if subject_leads else (other_half, subject_half)
    )
    # Along the axis: the trailing centre is `distance` past the leading one.
    min_distance = max(
        RELATION_MIN_OFFSET * image_size, lead_half + trail_half + OBJECT_GAP * image_size
    )
    max_distance = (image_size - trail_half - margin) - (lead_half + margin)
    if max_distance < min_distance:
        return None
    distance = rng.uniform(min_distance, max_distance)
    lead_along = rng.uniform(lead_half + margin, image_size - trail_half - margin - distance)
    trail_along = lead_along + distance
    # Across the axis: within the image and within distance / dominance of each other.
    lead_across = rng.uniform(lead_half + margin, image_size - lead_half - margin)
    spread = distance / RELATION_DOMINANCE
    low = max(trail_half + margin, lead_across - spread)
    high = min(image_size - trail_half - margin, lead_across + spread)
    if low > high:
        return None
    trail_across = rng.uniform(low, high)
    lead = (lead_along, lead_across) if axis == 0 else (lead_across, lead_along)
    trail = (trail_along, trail_across) if axis == 0 else (trail_across, trail_along)
    return (lead, trail) if subject_leads else (trail, lead)


def _describe(rng: np.random.Generator, obj: SceneObject) -> str:
    words = ["a"]
    if rng.random() < SIZE_WORD_PROBABILITY:
        synonyms = SIZE_WORDS[obj.size]
        words.append(synonyms[rng.integers(len(synonyms))])
    words += [obj.colour, obj.shape]
    return " ".join(words)


def _choose(rng: np.random.Generator, options: Sequence):
    return options[rng.integers(len(options))]


def sample_scene(
    rng: np.random.Generator,
    image_size: int,
    pairs: Sequence[Pair] = ALL_PAIRS,
    required_pairs: Sequence[Pair] = (),
) -> Scene:
    """Draws one captioned scene.

    Args:
      rng: the only source of randomness.
      image_size: height and width of the square image.
      pairs: the (colour, shape) pairs objects may have.
      required_pairs: if given, one object (the lone one, or either of two) has one
        of these pairs; the other object still comes from `pairs`.
    """
    two_objects = rng.random() < TWO_OBJECT_PROBABILITY
    num_objects = 2 if two_objects else 1
    chosen = [_choose(rng, pairs) for _ in range(num_objects)]
    if required_pairs:
        chosen[rng.integers(num_objects)] = _choose(rng, required_pairs)
    # Two objects with the same colour and shape would make the caption ambiguous.
    while two_objects and chosen[0] == chosen[1]:
        chosen[1] = _choose(rng, pairs)

    for _ in range(MAX_PLACEMENT_TRIES):
        looks = [_sample_object_look(rng, pair, image_size) for pair in chosen]
        if two_objects:
            layout = _choose(rng, RELATIONS)
            centres = _place_related(rng, layout, looks[0][2], looks[1][2], image_size)
            if centres is None:
                continue
        else:
            cell = int(rng.integers(len(CELL_PHRASES)))
            layout = CELL_PHRASES[cell]
            centres = (_place_in_cell(rng, cell, looks[0][2], image_size),)
        break
    else:
        raise RuntimeError(f"could not place objects in a {image_size}px image")

    objects = tuple(
        SceneObject(shape=shape, colour=colour, size=size, rgb=rgb, centre=centre,
                    half_size=half_size)
        for (colour, shape), (size, rgb, half_size), centre in zip(chosen, looks, centres)
    )
    image = render_background(rng, image_size)
    for obj in objects:
        draw_object(image, obj)

    caption = _choose(rng, CAPTION_PREFIXES) + _describe(rng, objects[0])
    if two_objects:
        caption += f" {_choose(rng, RELATION_PHRASES[layout])} {_describe(rng, objects[1])}"
    else:
        caption += f" {layout}"
    return Scene(image=image, caption=caption, layout=layout, objects=objects)


@functools.lru_cache(maxsize=None)
def training_pairs(holdout_pairs: tuple[Pair, ...]) -> tuple[Pair, ...]:
    """All (colour, shape) pairs except the held-out ones."""
    unknown = set(holdout_pairs) - set(ALL_PAIRS)
    if unknown:
        raise ValueError(f"unknown (colour, shape) pairs: {sorted(unknown)}")
    allowed = tuple(p for p in ALL_PAIRS if p not in set(holdout_pairs))
    if len(allowed) < 2:  # two-object scenes need two distinct pairs
        raise ValueError("holding out all but one (colour, shape) pair leaves too few")
    return allowed


def split_scene(
    split: str,
    index: int,
    *,
    image_size: int = 64,
    holdout_pairs: Sequence[Pair] = DEFAULT_HOLDOUT,
    seed: int = 0,
) -> Scene:
    """Scene `index` of `split`, drawn from its own generator.

    Train, validation and test scenes never contain a holdout pair; every holdout
    scene contains at least one.
    """
    holdout_pairs = tuple(tuple(p) for p in holdout_pairs)
    allowed = training_pairs(holdout_pairs)
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    if split == "holdout":
        return sample_scene(rng, image_size, ALL_PAIRS, required_pairs=holdout_pairs)
    return sample_scene(rng, image_size, allowed)
