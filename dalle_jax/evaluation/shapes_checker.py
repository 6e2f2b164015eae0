"""An attribute checker for captioned-shapes images, judged from pixels alone.

`read_image` finds the objects an image shows and reads each one's colour, shape,
size class, centre and 3x3 cell; `parse_caption` reads what a caption asks for;
`check` compares the two criterion by criterion and `score` turns many checks into
rates. No model is involved and no dataset label is read: only the pixels of the
image judged and the words of its caption.

How an image is read:

1. Background: the per-channel median of the pixels that stand out least; the
   renderer's background is a dark grey with a little per-pixel noise.
2. Objects: every pixel is explained as a blend of the background with the palette
   colour that fits it best, which gives its coverage `alpha`. Pixels at least
   `SEED_ALPHA` covered form seeds (8-connected). The renderer keeps two objects'
   boxes at least `OBJECT_GAP` apart along their relation's axis, so no two
   neighbouring pixels can both be that well covered by different objects; specks
   cut off a thin tip by the threshold are merged into their body. Every visibly
   changed pixel then belongs to its nearest seed.
3. Colour: the palette colour nearest the median of an object's most strongly
   coloured pixels (those fully covered show the drawn colour exactly).
4. Shape: coverage-weighted moments of the object, taken against its own colour.
   Normalised complex moments of orders 3, 4 and 5 (|sum w z^k| / sum w |z|^k, z
   the offset from the centroid) separate the five shapes: only the triangle has a
   third-order moment, only the star (and, less, the triangle) a fifth-order one,
   and the fourth-order moment's sign tells an axis-aligned square from a diamond
   (a square turned by 45 degrees), with the circle at zero; compactness (area
   squared against the polar moment, 1 for a disc) sets the circle and the star
   further apart from the rest. Each object goes to the nearest of the five
   prototypes, computed once from `shapes.shape_mask` itself.
5. Size and centre: the shape's area in box units gives the half size of the box
   it was drawn in; its size class is the nearer (in ratio) of the renderer's two.
   The box centre is the centroid less the shape's known centroid offset (a
   triangle's centroid sits a third of the half size below its box centre).
6. Layout: the cell of a centre is `shapes.cell_index`; the relation of two
   centres is the axis along which they differ most, which is what
   `shapes.relation_holds` asks of the renderer's layouts, with a looser
   dominance and minimum offset.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from dalle_jax.data import shapes

# Criteria reported by `check`, in order; `all` is the conjunction of the others.
CRITERIA = ("count", "colour", "shape", "size", "cell", "relation")

# Segmentation, as coverage fractions of a pixel.
# Across a gap of g pixels between two boxes, two neighbouring pixels' coverages add
# up to at most 2 - g, so with the renderer's gap (0.96 px at 32 px) they cannot
# both reach 0.6: cores of different objects never touch.
SEED_ALPHA = 0.6
LINK_ALPHA = 0.25  # a speck joined to a core by pixels this covered is part of it
FRAGMENT_PIXELS = 2  # a core this small is a speck (the smallest object's has ~6)
VISIBLE_STRENGTH = 24.0  # Euclidean rgb distance from the background that is not noise
CORE_FRACTION = 0.9  # pixels this close to an object's strongest give its colour
MIN_AREA_FRACTION = 0.002  # of the image area: smaller blobs are specks, not objects
MIN_AREA_PIXELS = 3.0
# Weaker coverage is mostly background noise (up to ~0.07 for the dimmest colour):
# it is left out of the moments, which stay unbiased enough on the rim.
COVERAGE_FLOOR = 0.1

# Layout judged on read centres. The renderer's layouts clear these by far
# (RELATION_MIN_OFFSET, RELATION_DOMINANCE); a generated image gets some slack.
CHECK_RELATION_MIN_OFFSET = 0.05  # of the image size, along the relation's axis
CHECK_RELATION_DOMINANCE = 1.0  # along the axis at least as far as across it


# --- Captions.


@dataclasses.dataclass(frozen=True)
class AskedObject:
    """One object a caption asks for; `size` is None when the caption names none."""

    colour: str
    shape: str
    size: str | None = None


@dataclasses.dataclass(frozen=True)
class Prompt:
    """What a caption asks for.

    `objects` lists the subject first. `cell` (an index into `shapes.CELL_PHRASES`)
    is given for a lone object whose caption places it; `relation` (a
    `shapes.RELATIONS` entry, the first object's relation to the second) for two.
    """

    objects: tuple[AskedObject, ...]
    cell: int | None = None
    relation: str | None = None


_SIZE_OF_WORD = {word: size for size, words in shapes.SIZE_WORDS.items() for word in words}
_RELATION_OF_PHRASE = {
    phrase: relation
    for relation, phrases in shapes.RELATION_PHRASES.items()
    for phrase in phrases
}


def _alternation(words: Iterable[str]) -> str:
    # Longest first, so that "to the left of" is tried before "left of".
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


def _object_pattern(n: int) -> str:
    return (
        rf"an? (?:(?P<size{n}>{_alternation(_SIZE_OF_WORD)}) )?"
        rf"(?P<colour{n}>{_alternation(shapes.COLOURS)}) "
        rf"(?P<shape{n}>{_alternation(shapes.SHAPES)})"
    )


_PREFIX = rf"(?:(?:{_alternation(p.strip() for p in shapes.CAPTION_PREFIXES if p.strip())}) )?"
_ONE_OBJECT = re.compile(
    rf"{_PREFIX}{_object_pattern(0)}(?: (?P<cell>{_alternation(shapes.CELL_PHRASES)}))?"
)
_TWO_OBJECTS = re.compile(
    rf"{_PREFIX}{_object_pattern(0)} (?P<relation>{_alternation(_RELATION_OF_PHRASE)}) "
    rf"{_object_pattern(1)}"
)


def parse_caption(caption: str) -> Prompt:
    """The objects, sizes, cell and relation a captioned-shapes caption asks for.

    Accepts every caption the renderer writes (any prefix, optional size word,
    any synonym), case- and whitespace-insensitively, with or without a final
    full stop; a lone object's cell phrase may be left out. Raises ValueError for
    anything else.
    """
    if not isinstance(caption, str):
        raise ValueError(f"a caption must be a str, got {type(caption).__name__}")
    text = " ".join(caption.lower().split()).rstrip(".").rstrip()
    for pattern, count in ((_ONE_OBJECT, 1), (_TWO_OBJECTS, 2)):
        match = pattern.fullmatch(text)
        if match is None:
            continue
        objects = tuple(
            AskedObject(
                colour=match[f"colour{n}"],
                shape=match[f"shape{n}"],
                size=_SIZE_OF_WORD[match[f"size{n}"]] if match[f"size{n}"] else None,
            )
            for n in range(count)
        )
        if count == 1:
            cell = shapes.CELL_PHRASES.index(match["cell"]) if match["cell"] else None
            return Prompt(objects=objects, cell=cell)
        return Prompt(objects=objects, relation=_RELATION_OF_PHRASE[match["relation"]])
    raise ValueError(
        f"not a captioned-shapes caption: {caption!r} (expected e.g. 'a small red circle "
        "in the top left corner' or 'a blue square above a large white star')"
    )


# --- Images.


@dataclasses.dataclass(frozen=True)
class FoundObject:
    """One object read from an image's pixels."""

    colour: str
    shape: str
    size: str
    centre: tuple[float, float]  # (x, y) in pixels: the centre of the shape's box
    cell: int  # index into shapes.CELL_PHRASES
    half_size: float  # half the side of the box the shape fills, in pixels
    area: float  # coverage-weighted, in pixels
    rgb: tuple[int, int, int]  # the median of its most strongly coloured pixels
    # The shape features (compactness, |m3|, Re m4, |m5|) it was classified by.
    features: tuple[float, ...] = dataclasses.field(compare=False, repr=False, default=())


@dataclasses.dataclass(frozen=True)
class Reading:
    """What an image shows: its objects, top to bottom, then left to right."""

    image_size: int
    background: tuple[float, float, float]
    objects: tuple[FoundObject, ...]

    @property
    def relation(self) -> str | None:
        """The first object's relation to the second, when there are exactly two."""
        if len(self.objects) != 2:
            return None
        return relation_between(self.objects[0].centre, self.objects[1].centre)


def relation_between(subject: tuple[float, float], other: tuple[float, float]) -> str:
    """The `shapes.RELATIONS` entry along whose axis `subject` differs most from `other`."""
    dx, dy = subject[0] - other[0], subject[1] - other[1]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def _validated(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy uint8[H, W, 3] image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8[H, W, 3] image, got dtype {image.dtype} (convert floats in "
            "[0, 1] with (x * 255).round().astype(np.uint8))"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8[H, W, 3] image, got shape {list(image.shape)}")
    if image.shape[0] != image.shape[1] or image.shape[0] < 8:
        raise ValueError(
            f"expected a square image of at least 8x8 pixels, got {list(image.shape)}"
        )
    return image


def _background(pixels: np.ndarray) -> np.ndarray:
    """Per-channel median of the pixels that are not clearly part of an object."""
    first = np.median(pixels.reshape(-1, 3), axis=0)
    quiet = np.linalg.norm(pixels - first, axis=-1) < VISIBLE_STRENGTH
    quiet = ~ndimage.binary_dilation(~quiet, structure=np.ones((3, 3), bool))
    if quiet.sum() < 0.1 * quiet.size:
        return first
    return np.median(pixels[quiet], axis=0)


def _palette_alpha(offset: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Each pixel's coverage by the palette colour whose blend with the background
    explains it best (least residual)."""
    directions = np.array(list(shapes.PALETTE.values()), np.float32) - background  # [C, 3]
    norms = np.maximum((directions * directions).sum(-1), 1.0)
    alphas = np.einsum("hwk,ck->hwc", offset, directions) / norms  # [H, W, C]
    residual = offset[:, :, None, :] - alphas[..., None] * directions
    residual = (residual * residual).sum(-1) + 1e9 * (alphas <= 0)
    best = np.argmin(residual, axis=-1)
    return np.take_along_axis(alphas, best[..., None], axis=-1)[..., 0]


def _seeds(alpha: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels of the objects' well-covered cores, with specks next to a bigger core
    (the last pixels of a thin tip, cut off by the threshold) merged into it."""
    eight = np.ones((3, 3), bool)
    seeds, count = ndimage.label(alpha >= SEED_ALPHA, structure=eight)
    if count <= 1:
        return seeds, count
    sizes = np.bincount(seeds.ravel(), minlength=count + 1)
    if sizes[1:].min() > FRAGMENT_PIXELS:
        return seeds, count
    links, _ = ndimage.label(alpha >= LINK_ALPHA, structure=eight)
    link_of_seed = np.zeros(count + 1, int)
    link_of_seed[seeds.ravel()] = links.ravel()  # a seed lies inside one link component
    mapping = np.arange(count + 1)
    for seed in range(1, count + 1):
        if sizes[seed] > FRAGMENT_PIXELS:
            continue
        linked = np.flatnonzero(link_of_seed == link_of_seed[seed])
        largest = linked[np.argmax(sizes[linked])]
        if sizes[largest] > FRAGMENT_PIXELS:
            mapping[seed] = largest
    seeds = mapping[seeds]
    kept = np.unique(seeds[seeds > 0])
    relabel = np.zeros(count + 1, int)
    relabel[kept] = np.arange(1, len(kept) + 1)
    return relabel[seeds], len(kept)


def _moment_features(weights: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple:
    """(area, centroid x, centroid y, feature vector) of a coverage map.

    Features: compactness (1 for a disc), |m3|, Re m4, |m5|, where m_k is the
    normalised complex moment sum w z^k / sum w |z|^k about the centroid.
    """
    area = weights.sum()
    cx, cy = (weights * xs).sum() / area, (weights * ys).sum() / area
    z = (xs - cx) + 1j * (ys - cy)
    r = np.abs(z)
    # A pixel's own extent adds 1/6 px^2 to the polar moment of its coverage.
    polar = (weights * r * r).sum() + area / 6.0
    compactness = area * area / (2 * math.pi * polar)
    moments = []
    for k in (3, 4, 5):
        moments.append((weights * z**k).sum() / max((weights * r**k).sum(), 1e-9))
    features = (compactness, abs(moments[0]), moments[1].real, abs(moments[2]))
    return area, cx, cy, np.array(features)


@functools.lru_cache(maxsize=None)
def _prototypes() -> dict[str, tuple[float, float, np.ndarray]]:
    """Per shape, from `shapes.shape_mask` on a fine grid in box units:
    (area, centroid offset below the box centre, feature vector)."""
    grid_size = 800
    grid = (np.arange(grid_size) + 0.5) / (grid_size / 2) - 1.0  # [-1, 1]
    xs, ys = np.meshgrid(grid, grid)
    pixel = 2.0 / grid_size
    prototypes = {}
    for shape in shapes.SHAPES:
        inside = shapes.shape_mask(shape, xs, ys).astype(np.float64)
        # In grid pixels, so the pixel-extent correction is negligible as it should be.
        area, _, cy, features = _moment_features(inside, xs / pixel, ys / pixel)
        prototypes[shape] = (area * pixel * pixel, cy * pixel, features)
    return prototypes


# Feature scales for the nearest-prototype distance: compactness varies less.
_FEATURE_WEIGHTS = np.array([4.0, 1.0, 1.0, 1.0])


def _classify(features: np.ndarray) -> str:
    prototypes = _prototypes()
    return min(
        shapes.SHAPES,
        key=lambda s: float((_FEATURE_WEIGHTS * (features - prototypes[s][2]) ** 2).sum()),
    )


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(
        shapes.COLOURS,
        key=lambda c: float(((rgb - np.array(shapes.PALETTE[c], np.float64)) ** 2).sum()),
    )


def _size_class(half_size: float, image_size: int) -> str:
    """The size whose box side (a SIZE_FRACTION of the width) is nearest in ratio."""
    side = 2 * half_size / image_size
    return min(shapes.SIZES, key=lambda s: abs(math.log(side / shapes.SIZE_FRACTION[s])))


def read_image(image: np.ndarray) -> Reading:
    """The objects a captioned-shapes image shows, read from its pixels alone.

    Args:
      image: uint8[S, S, 3].

    Raises:
      ValueError: for anything but a square uint8 RGB image.
    """
    image = _validated(image)
    image_size = image.shape[0]
    pixels = image.astype(np.float32)
    background = _background(pixels)
    offset = pixels - background
    strength = np.linalg.norm(offset, axis=-1)
    seeds, count = _seeds(_palette_alpha(offset, background))
    if count == 0:
        return Reading(image_size, tuple(map(float, background)), ())

    # Every visibly changed pixel (and its neighbours, for the faintest edges) goes
    # to the object whose core is nearest.
    visible = ndimage.binary_dilation(
        strength >= VISIBLE_STRENGTH, structure=np.ones((3, 3), bool)
    )
    _, (near_rows, near_cols) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    owner = np.where(visible | (seeds > 0), seeds[near_rows, near_cols], 0)
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float64) + 0.5
    min_area = max(MIN_AREA_PIXELS, MIN_AREA_FRACTION * image_size * image_size)
    prototypes = _prototypes()

    found = []
    for label, region in enumerate(ndimage.find_objects(owner), start=1):
        if region is None:
            continue
        mine = owner[region] == label
        if not mine.any():
            continue
        local_offset = offset[region][mine]
        local_strength = strength[region][mine]
        core = local_strength >= CORE_FRACTION * local_strength.max()
        rgb = np.median(pixels[region][mine][core], axis=0)
        direction = rgb - background
        norm = float((direction * direction).sum())
        if norm < VISIBLE_STRENGTH**2:
            continue
        # Coverage against the object's own colour.
        coverage = np.minimum(local_offset @ direction / norm, 1.0)
        coverage = np.where(coverage >= COVERAGE_FLOOR, coverage, 0.0)
        area, cx, cy, features = _moment_features(
            coverage, xs[region][mine], ys[region][mine]
        )
        if area < min_area:
            continue
        shape = _classify(features)
        unit_area, centroid_offset, _ = prototypes[shape]
        half_size = math.sqrt(area / unit_area)
        centre = (float(cx), float(cy - centroid_offset * half_size))
        found.append(FoundObject(
            colour=_nearest_colour(rgb),
            shape=shape,
            size=_size_class(half_size, image_size),
            centre=centre,
            cell=shapes.cell_index(centre, image_size),
            half_size=half_size,
            area=float(area),
            rgb=tuple(int(round(v)) for v in np.clip(rgb, 0, 255)),
            features=tuple(float(f) for f in features),
        ))
    found.sort(key=lambda o: (o.centre[1], o.centre[0]))
    return Reading(image_size, tuple(map(float, background)), tuple(found))


# --- Judging.


def _object_matches(asked: AskedObject, seen: FoundObject | None) -> dict[str, bool]:
    if seen is None:
        return {"colour": False, "shape": False, "size": False}
    return {
        "colour": asked.colour == seen.colour,
        "shape": asked.shape == seen.shape,
        "size": asked.size is None or asked.size == seen.size,
    }


def _relation_holds(relation: str, subject: FoundObject, other: FoundObject, size: int) -> bool:
    return shapes.relation_holds(
        relation, subject.centre, other.centre, size,
        min_offset=CHECK_RELATION_MIN_OFFSET, dominance=CHECK_RELATION_DOMINANCE,
    )


def check_reading(reading: Reading, prompt: Prompt) -> dict[str, bool | None]:
    """`check` on an image already read and a caption already parsed."""
    asked, seen = prompt.objects, reading.objects
    # Each asked object is matched to a distinct found one (or to nothing when too few
    # were found). Of all such matchings, those agreeing on the most attributes count,
    # and a criterion holds only if it holds under every one of them: a reading that
    # fits the caption equally well two ways must fit it both ways, so that swapped
    # attributes or two look-alike objects cannot pass for what was asked.
    slots: list[FoundObject | None] = list(seen) + [None] * max(0, len(asked) - len(seen))
    matches = [[_object_matches(a, s) for s in slots] for a in asked]
    agreement = np.array([[sum(m.values()) for m in row] for row in matches])
    best_score, best = -1, []
    for chosen in itertools.permutations(range(len(slots)), len(asked)):
        total = int(agreement[range(len(asked)), chosen].sum())
        if total > best_score:
            best_score, best = total, [chosen]
        elif total == best_score:
            best.append(chosen)

    def holds(attribute: str) -> bool:
        return all(matches[i][j][attribute] for chosen in best for i, j in enumerate(chosen))

    result: dict[str, bool | None] = {
        "count": len(seen) == len(asked),
        "colour": holds("colour"),
        "shape": holds("shape"),
        "size": holds("size") if any(a.size is not None for a in asked) else None,
        "cell": None,
        "relation": None,
    }
    if len(asked) == 1 and prompt.cell is not None:
        result["cell"] = all(
            slots[j] is not None and slots[j].cell == prompt.cell for (j,) in best
        )
    if len(asked) == 2 and prompt.relation is not None:
        result["relation"] = all(
            slots[i] is not None and slots[j] is not None
            and _relation_holds(prompt.relation, slots[i], slots[j], reading.image_size)
            for i, j in best
        )
    result["all"] = all(v for v in result.values() if v is not None)
    return result


def check(image: np.ndarray, caption: str) -> dict[str, bool | None]:
    """Whether `image` shows what `caption` asks for, criterion by criterion.

    Returns a dict of `CRITERIA` plus "all":
      count: as many objects as asked for.
      colour, shape: every asked object, matched to a distinct found object, has
        its colour (shape). The matching is the one that agrees on the most
        attributes; where several agree equally, every criterion (including the
        layout ones) must hold under all of them.
      size: likewise for the size words; None when the caption names no size.
      cell: the lone object lies in the asked 3x3 cell; None for two-object
        captions or when no cell is named.
      relation: the first asked object stands in the asked relation to the second
        (along that axis at least as far as across it); None for one object.
      all: every criterion that is not None holds.
    A criterion that cannot be judged (an asked object not found) is False.
    """
    return check_reading(read_image(image), parse_caption(caption))


def judge(images: Sequence[np.ndarray], captions: Sequence[str]) -> list[dict[str, Any]]:
    """Each image checked against its caption: ``{"kind": "one_object" | "two_objects",
    "check": check(image, caption)}``."""
    judged = []
    for image, caption in zip(images, captions):
        prompt = parse_caption(caption)
        judged.append({"kind": "one_object" if len(prompt.objects) == 1 else "two_objects",
                       "check": check_reading(read_image(image), prompt)})
    return judged


def score(
    images: np.ndarray | Sequence[np.ndarray], captions: Sequence[str]
) -> dict[str, dict[str, float | int]]:
    """Rates of each criterion of `check` over many (image, caption) pairs.

    Returns {"one_object": {...}, "two_objects": {...}, "overall": {...}}, each with
    "n" (the number of pairs) and, per criterion, the fraction of the pairs it
    applies to that pass (NaN where it applies to none).
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise ValueError(f"expected a batch of images, got one of shape {list(images.shape)}")
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    groups: dict[str, list[dict[str, bool | None]]] = {
        "one_object": [], "two_objects": [], "overall": [],
    }
    for image, caption in zip(images, captions):
        prompt = parse_caption(caption)
        result = check_reading(read_image(np.asarray(image)), prompt)
        groups["one_object" if len(prompt.objects) == 1 else "two_objects"].append(result)
        groups["overall"].append(result)
    return {name: _rates(results) for name, results in groups.items()}


def _rates(results: Sequence[Mapping[str, bool | None]]) -> dict[str, float | int]:
    rates: dict[str, float | int] = {"n": len(results)}
    for criterion in (*CRITERIA, "all"):
        judged = [r[criterion] for r in results if r[criterion] is not None]
        rates[criterion] = float(np.mean(judged)) if judged else float("nan")
    return rates


# --- the demo's composite bars ---------------------------------------------------------

# Composite criteria of the demo's quality bars: (name, prompt kind, criteria).
COMPOSITES = (
    ("colour", "one_object", ("colour",)),
    ("colour_cell", "one_object", ("colour", "cell")),
    ("shape", "one_object", ("shape",)),
    ("all", "one_object", ("all",)),
    ("colours", "two_objects", ("colour",)),
    ("colours_relation", "two_objects", ("colour", "relation")),
    ("shapes", "two_objects", ("shape",)),
    ("all", "two_objects", ("all",)),
)


def composite_rates(results: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """The demo's bars from per-image checks: for each prompt kind, the fraction of its
    images passing every criterion of each composite."""
    out: dict[str, dict[str, float | int]] = {}
    for kind in ("one_object", "two_objects"):
        rows = [r for r in results if r["kind"] == kind]
        out[kind] = {"images": len(rows)}
        for name, composite_kind, criteria in COMPOSITES:
            if composite_kind != kind:
                continue
            judged = [all(r["check"][c] for c in criteria) for r in rows
                      if all(r["check"][c] is not None for c in criteria)]
            out[kind][name] = float(np.mean(judged)) if judged else float("nan")
    return out


def image_checks(images: np.ndarray, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`judge` of each image against its record's prompt, with the record's
    prompt and index (the input of :func:`composite_rates`)."""
    judged = judge(images, [r["prompt"] for r in records])
    return [{"prompt": r["prompt"], "index": r["index"], **j} for r, j in zip(records, judged)]
