"""Converts captioned images into sharded TFRecords (the format of :mod:`image_records`).

Inputs, one of:

* a folder, searched recursively, where each image has a same-name ``.txt`` caption
  beside it (``cats/001.jpg`` + ``cats/001.txt``);
* a CSV manifest with a header row naming the columns ``path`` and ``caption``;
* a JSONL manifest, one ``{"path": ..., "caption": ...}`` object per line.

Manifest paths are relative to the manifest's folder, or absolute.

Images that TensorFlow decodes correctly as they are (JPEG or PNG, RGB or grayscale,
no EXIF rotation) keep their original bytes; anything else is turned upright and
re-encoded as an RGB PNG. Captions are stripped of surrounding whitespace only.

Bad inputs are skipped and counted under one of ``SKIP_REASONS``; the counts form the
report that :func:`convert` returns, prints and stores in the split's metadata.

The output replaces an existing split all at once or not at all
(:class:`dalle_jax.data.image_records.SplitWriter`).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import io
import itertools
import json
import os
import warnings
from typing import Callable, Iterable, Iterator, TypeVar

from absl import logging
import numpy as np
from PIL import Image, ImageFile, ImageOps
import tensorflow as tf
import tqdm

from dalle_jax.data import image_records

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
SKIP_REASONS = (
    "unreadable",  # I/O error, or a truncated or corrupt image
    "not_an_image",  # not a format Pillow recognises
    "too_many_pixels",  # over max_pixels (read from the header, before decoding)
    "too_small",  # shorter side below min_size
    "empty_caption",  # empty or whitespace only
    "caption_not_utf8",
    "missing_file",  # named in a manifest, absent on disk
    "missing_caption",  # folder mode: an image with no .txt beside it
)
# Skipped ids kept in the report per reason, enough to find and inspect the culprits.
MAX_SKIPPED_IDS = 20

_EXIF_ORIENTATION_TAG = 0x0112
_KEPT_FORMATS = ("JPEG", "PNG")
_KEPT_MODES = ("RGB", "L")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


@dataclasses.dataclass(frozen=True)
class _Source:
    """One input example, before anything is read."""

    id: str
    image_path: str
    caption_path: str | None = None  # folder mode: the .txt beside the image
    caption_text: str | None = None  # manifest mode: the caption as written
    listed_in_manifest: bool = False


class _Skip(Exception):
    """Raised while reading an example that cannot be used; carries the reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------- inputs

def _is_url(path: str) -> bool:
    return "://" in path


def _absolute(path: str) -> str:
    return path.rstrip("/") if _is_url(path) else os.path.abspath(path)


def _child_path(directory: str, name: str) -> str:
    if _is_url(directory):
        return directory.rstrip("/") + "/" + name
    return os.path.join(directory, name)


def _folder_sources(input_dir: str) -> list[_Source]:
    """Every file with an image extension under ``input_dir``, sorted by id."""
    root = _absolute(input_dir)
    sources = []
    for dir_path, _, file_names in tf.io.gfile.walk(root):
        dir_path = str(dir_path)
        present = set(file_names)
        for file_name in file_names:
            stem, extension = os.path.splitext(file_name)
            if extension.lower() not in IMAGE_EXTENSIONS:
                continue
            image_path = _child_path(dir_path, file_name)
            caption_name = stem + ".txt"
            sources.append(_Source(
                id=image_path[len(root):].lstrip("/"),
                image_path=image_path,
                caption_path=(_child_path(dir_path, caption_name)
                              if caption_name in present else None)))
    return sorted(sources, key=lambda source: source.id)


def _csv_rows(text: str, manifest: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    if "path" not in columns or "caption" not in columns:
        raise ValueError(
            f"{manifest}: the header row must name the columns 'path' and 'caption'; "
            f"it has {columns}")
    for row in reader:
        yield reader.line_num, row


def _jsonl_rows(text: str, manifest: str) -> Iterator[tuple[int, dict]]:
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest}, line {line_number}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{manifest}, line {line_number}: not a JSON object")
        yield line_number, row


def _manifest_sources(manifest: str) -> list[_Source]:
    """The rows of a CSV or JSONL manifest, in manifest order.

    A malformed manifest (no path/caption columns, a line that is not a JSON object,
    a row without a path) is an error, raised before any image is read; problems of
    single examples are counted like any other.
    """
    extension = os.path.splitext(manifest)[1].lower()
    if extension == ".csv":
        parse_rows = _csv_rows
    elif extension in (".jsonl", ".json"):
        parse_rows = _jsonl_rows
    else:
        raise ValueError(f"manifest must be a .csv or .jsonl file, got {manifest}")
    with tf.io.gfile.GFile(manifest, "rb") as f:
        # Bytes that are not UTF-8 survive as surrogates, so that one bad caption is
        # skipped as caption_not_utf8 instead of failing the whole manifest.
        text = f.read().decode("utf-8-sig", errors="surrogateescape")
    base_dir = _absolute(manifest).rsplit("/", 1)[0]
    sources = []
    for line_number, row in parse_rows(text, manifest):
        path, caption = row.get("path"), row.get("caption")
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"{manifest}, line {line_number}: no path")
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"{manifest}, line {line_number}: the caption is not a string")
        is_absolute = os.path.isabs(path) or _is_url(path)
        sources.append(_Source(
            id=path,
            image_path=path if is_absolute else _child_path(base_dir, path),
            caption_text=caption or "",
            listed_in_manifest=True))
    return sources


# -------------------------------------------------------------------- one example

def _read_bytes(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def _read_caption(source: _Source) -> str:
    if source.caption_text is not None:
        text = source.caption_text
    elif source.caption_path is None:
        raise _Skip("missing_caption")
    else:
        try:
            data = _read_bytes(source.caption_path)
        except (tf.errors.OpError, OSError):
            raise _Skip("unreadable") from None
        try:
            # A byte-order mark is an artefact of the editor, not part of the caption.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise _Skip("caption_not_utf8") from None
    try:
        text.encode("utf-8")  # manifest captions carry undecodable bytes as surrogates
    except UnicodeEncodeError:
        raise _Skip("caption_not_utf8") from None
    text = text.strip()
    if not text:
        raise _Skip("empty_caption")
    return text


def _read_image_file(source: _Source) -> bytes:
    try:
        return _read_bytes(source.image_path)
    except tf.errors.NotFoundError:
        raise _Skip("missing_file" if source.listed_in_manifest else "unreadable") from None
    except (tf.errors.OpError, OSError, UnicodeError):  # UnicodeError: a path not in UTF-8
        raise _Skip("unreadable") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert("RGB") clips 16-bit samples at 255 instead of scaling them.
        samples = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(samples.astype(np.uint8), "L")
    if "A" in image.mode or "transparency" in image.info:
        # Transparent areas become white, not whatever colour they happen to store.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _decode_checked(data: bytes, max_pixels: int, min_size: int) -> tuple[bytes, int, int]:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size  # from the header: nothing decoded yet
        if width * height > max_pixels:
            raise _Skip("too_many_pixels")
        if min(width, height) < min_size:
            raise _Skip("too_small")
        image.load()  # decodes everything, so truncated files fail here
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        if image.format in _KEPT_FORMATS and image.mode in _KEPT_MODES and orientation == 1:
            return data, height, width
        upright = _to_rgb(ImageOps.exif_transpose(image))
    encoded = io.BytesIO()
    upright.save(encoded, format="PNG")
    return encoded.getvalue(), upright.height, upright.width


def _load_image(data: bytes, max_pixels: int, min_size: int) -> tuple[bytes, int, int]:
    """(image bytes to store, height, width) of an upright, checked image."""
    try:
        return _decode_checked(data, max_pixels, min_size)
    except _Skip:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _Skip("too_many_pixels") from None
    except Image.UnidentifiedImageError:
        raise _Skip("not_an_image") from None
    except Exception:  # Pillow's decoders raise many exception types on corrupt data
        raise _Skip("unreadable") from None


def _convert_one(source: _Source, *, max_pixels: int,
                 min_size: int) -> tuple[_Source, bytes | None, str | None]:
    """(source, serialized record or None, skip reason or None)."""
    try:
        caption = _read_caption(source)
        image_bytes, height, width = _load_image(
            _read_image_file(source), max_pixels, min_size)
    except _Skip as skip:
        return source, None, skip.reason
    record = image_records.encode_record(image_bytes, caption, source.id, height, width)
    return source, record, None


# ------------------------------------------------------------------------- output

_In = TypeVar("_In")
_Out = TypeVar("_Out")


def _ordered_map(fn: Callable[[_In], _Out], items: Iterable[_In],
                 executor: concurrent.futures.Executor,
                 max_in_flight: int) -> Iterator[_Out]:
    """``map(fn, items)`` on ``executor``, in input order, holding few results at once."""
    pending = collections.deque()
    for item in items:
        if len(pending) >= max_in_flight:
            yield pending.popleft().result()
        pending.append(executor.submit(fn, item))
    while pending:
        yield pending.popleft().result()


@contextlib.contextmanager
def _strict_pillow(max_pixels: int):
    """Pillow's global settings for a conversion, restored afterwards.

    Its decompression-bomb check fires at ``max_pixels`` and raises instead of warning,
    and truncated files fail to load even if other code has allowed them.
    """
    previous = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = previous


class _Tally:
    """Counts of written and skipped examples while a conversion runs."""

    def __init__(self):
        self.written = 0
        self.skipped = {reason: 0 for reason in SKIP_REASONS}
        self.skipped_ids: dict[str, list[str]] = {reason: [] for reason in SKIP_REASONS}

    def kept_records(self, results: Iterable[tuple[_Source, bytes | None, str | None]],
                     progress: tqdm.tqdm) -> Iterator[bytes]:
        """The records of ``results``, counting the skipped ones as they pass."""
        for source, record, reason in results:
            progress.update(1)
            if reason is None:
                self.written += 1
                yield record
            else:
                self.skipped[reason] += 1
                if len(self.skipped_ids[reason]) < MAX_SKIPPED_IDS:
                    self.skipped_ids[reason].append(source.id)
                progress.set_postfix(skipped=sum(self.skipped.values()), refresh=False)

    def report(self) -> dict:
        return {
            "written": self.written,
            "skipped": dict(self.skipped),
            "inputs": self.written + sum(self.skipped.values()),
            "skipped_ids": {r: ids for r, ids in self.skipped_ids.items() if ids},
        }


def format_report(report: dict, title: str = "conversion") -> str:
    """The report as a two-column text table."""
    rows = [("written", report["written"])]
    rows += [(f"skipped: {reason}", count) for reason, count in report["skipped"].items()]
    label_width = max(len(title), *(len(label) for label, _ in rows))
    count_width = max(5, len(str(report["inputs"])))
    rule = f"+-{'-' * label_width}-+-{'-' * count_width}-+"

    def line(label, count):
        return f"| {label:<{label_width}} | {count:>{count_width}} |"

    lines = [rule, line(title, "count"), rule]
    lines += [line(label, count) for label, count in rows]
    lines += [rule, line("inputs", report["inputs"]), rule]
    return "\n".join(lines)


def _shard_sizes(num_inputs: int, num_shards: int) -> list[int]:
    """Contiguous, near-equal blocks of the shuffled inputs, one per shard."""
    bounds = [index * num_inputs // num_shards for index in range(num_shards + 1)]
    return [end - start for start, end in zip(bounds, bounds[1:])]


def convert(*, output_dir: str, name: str, split: str = "train",
            input_dir: str | None = None, manifest: str | None = None,
            num_shards: int = 8, max_pixels: int = 64_000_000, min_size: int = 64,
            seed: int = 0, num_workers: int | None = None) -> dict:
    """Converts ``input_dir`` or ``manifest`` into the split ``name``/``split``.

    Returns the report: ``{"written": int, "skipped": {reason: int for every reason
    in SKIP_REASONS}, "inputs": int, "skipped_ids": {reason: [up to MAX_SKIPPED_IDS
    ids]}}``; it is also printed as a table and stored in the split's metadata.
    ``num_workers`` threads decode images (default: one per CPU core); the output
    depends only on the inputs and the settings, never on the workers' timing.
    """
    if (input_dir is None) == (manifest is None):
        raise ValueError("give exactly one of input_dir and manifest")
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    num_workers = num_workers or os.cpu_count() or 1

    if input_dir is not None:
        if not tf.io.gfile.isdir(input_dir):
            raise FileNotFoundError(f"input_dir is not a folder: {input_dir}")
        sources = _folder_sources(input_dir)
    else:
        if not tf.io.gfile.exists(manifest):
            raise FileNotFoundError(f"manifest not found: {manifest}")
        sources = _manifest_sources(manifest)
    order = np.random.default_rng(seed).permutation(len(sources))
    shuffled = [sources[index] for index in order]

    tally = _Tally()
    convert_fn = functools.partial(_convert_one, max_pixels=max_pixels, min_size=min_size)
    with image_records.SplitWriter(output_dir, name, split, num_shards) as writer:
        with (_strict_pillow(max_pixels),
              concurrent.futures.ThreadPoolExecutor(num_workers) as executor,
              tqdm.tqdm(total=len(shuffled), desc=f"{name}-{split}", unit="img") as progress):
            results = _ordered_map(convert_fn, shuffled, executor, 4 * num_workers)
            for index, size in enumerate(_shard_sizes(len(shuffled), num_shards)):
                shard_results = itertools.islice(results, size)
                writer.write_shard(index, tally.kept_records(shard_results, progress))
        report = tally.report()
        writer.commit({
            "report": report,
            "conversion": {
                "input_dir": input_dir and _absolute(input_dir),
                "manifest": manifest and _absolute(manifest),
                "num_shards": num_shards,
                "max_pixels": max_pixels, "min_size": min_size, "seed": seed,
            },
        })

    if report["written"] == 0:
        logging.warning("no examples written to %s: see the report", output_dir)
    print(format_report(report, title=f"{name}-{split}"), flush=True)
    return report
