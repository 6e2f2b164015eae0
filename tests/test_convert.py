"""The image-folder / manifest converter and the record format it writes."""
import collections
import csv
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from dalle_jax.data import convert as convert_lib
from dalle_jax.data import image_records
from dalle_jax.data import preprocess
from dalle_jax.data import shard_files

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RED = (220, 30, 30)


def _noise(height, width, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _png_declaring_size(width, height) -> bytes:
    """A tiny, valid-looking PNG whose header claims ``width`` × ``height`` pixels."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


def _rotated_jpeg() -> bytes:
    """96 wide × 64 high as stored, red top-left corner, EXIF orientation 6."""
    pixels = np.full((64, 96, 3), 40, np.uint8)
    pixels[:24, :24] = RED
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise
    return _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def _rgba_png() -> bytes:
    pixels = np.zeros((64, 80, 4), np.uint8)
    pixels[..., :3] = 90
    pixels[:, :40, 3] = 255  # left half opaque grey, right half fully transparent
    return _encode(Image.fromarray(pixels, "RGBA"), "PNG")


def _truncated_jpeg() -> bytes:
    data = _encode(Image.fromarray(_noise(128, 128, seed=1)), "JPEG", quality=90)
    return data[: len(data) // 2]


# id → (image bytes, caption file bytes or None, stored caption)
GOOD = {
    "rgb.jpg": (_encode(Image.fromarray(_noise(64, 96, seed=2)), "JPEG"),
                b"  a noisy photo \n", "a noisy photo"),
    "sub/dir/rgb.png": (_encode(Image.fromarray(_noise(72, 80, seed=3)), "PNG"),
                        "un café à paris".encode(), "un café à paris"),
    "gray.png": (_encode(Image.fromarray(_noise(64, 64, 1, seed=4)), "PNG"),
                 b"a grey square", "a grey square"),
    "grey.jpg": (_encode(Image.fromarray(_noise(70, 64, 1, seed=5)), "JPEG"),
                 b"a grey jpeg", "a grey jpeg"),
    "cmyk.jpg": (_encode(Image.new("CMYK", (80, 64), (0, 255, 255, 0)), "JPEG"),
                 b"a red cmyk field", "a red cmyk field"),
    "rgba.png": (_rgba_png(), b"half transparent", "half transparent"),
    "rotated.JPG": (_rotated_jpeg(), b"a rotated photo", "a rotated photo"),
    "sub/palette.gif": (_encode(Image.fromarray(_noise(64, 64, seed=6)).convert("P"), "GIF"),
                        b"a palette gif", "a palette gif"),
}
KEPT_AS_IS = ("rgb.jpg", "sub/dir/rgb.png", "gray.png", "grey.jpg")
BAD = {  # id → (image bytes, caption file bytes or None, expected reason)
    "truncated.jpg": (_truncated_jpeg(), b"cut short", "unreadable"),
    "text.jpg": (b"this is not a picture\n", b"text", "not_an_image"),
    "huge.png": (_png_declaring_size(20_000, 20_000), b"a bomb", "too_many_pixels"),
    "tiny.png": (_encode(Image.fromarray(_noise(32, 32, seed=7)), "PNG"), b"tiny", "too_small"),
    "blank.png": (_encode(Image.fromarray(_noise(64, 64, seed=8)), "PNG"), b" \n\t ",
                  "empty_caption"),
    "latin1.png": (_encode(Image.fromarray(_noise(64, 64, seed=9)), "PNG"), b"caf\xe9",
                   "caption_not_utf8"),
    "sub/orphan.png": (_encode(Image.fromarray(_noise(64, 64, seed=10)), "PNG"), None,
                       "missing_caption"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for image_id, (image_bytes, caption, _) in {**GOOD, **BAD}.items():
        path = root / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes)
        if caption is not None:
            path.with_suffix(".txt").write_bytes(caption)
    (root / "README.md").write_text("not an image extension: ignored")
    (root / "sub" / "stray.txt").write_text("a caption without an image: ignored")
    return root


def _convert(tmp_dir, **kwargs):
    settings = {"output_dir": str(tmp_dir), "name": "images", "num_workers": 2, **kwargs}
    return convert_lib.convert(**settings)


@pytest.fixture(scope="module")
def converted(corpus, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("records")
    report = _convert(output_dir, input_dir=str(corpus), num_shards=3)
    return output_dir, report


def _read_split(output_dir, name="images", split="train"):
    """id → parsed record (numpy values), in file order."""
    dataset = tf.data.TFRecordDataset(image_records.shard_paths(str(output_dir), name, split))
    examples = {}
    for serialized in dataset:
        example = {k: v.numpy() for k, v in image_records.parse_record(serialized).items()}
        examples[example["id"].decode()] = example
    return examples


def _expected_skips(reasons):
    """The report's skip counts for inputs expected to fail for ``reasons``."""
    counts = collections.Counter(reasons)
    return {reason: counts[reason] for reason in convert_lib.SKIP_REASONS}


def test_report_counts_each_reason(converted):
    _, report = converted
    assert report["skipped"] == _expected_skips(reason for _, _, reason in BAD.values())
    assert report["written"] == len(GOOD)
    assert report["inputs"] == len(GOOD) + len(BAD)
    assert report["skipped_ids"]["too_many_pixels"] == ["huge.png"]
    assert report["skipped_ids"]["missing_caption"] == ["sub/orphan.png"]


def test_good_images_round_trip(converted, corpus):
    output_dir, _ = converted
    examples = _read_split(output_dir)
    assert sorted(examples) == sorted(GOOD)
    for image_id, (_, _, caption) in GOOD.items():
        example = examples[image_id]
        assert example["caption"].decode("utf-8") == caption
        decoded = preprocess.decode_image(example["image"]).numpy()
        assert decoded.shape == (example["height"], example["width"], 3)

    for image_id in KEPT_AS_IS:
        original = (corpus / image_id).read_bytes()
        assert examples[image_id]["image"] == original
        expected = np.asarray(Image.open(io.BytesIO(original)).convert("RGB")).astype(int)
        decoded = preprocess.decode_image(examples[image_id]["image"]).numpy().astype(int)
        # libjpeg builds upsample chroma slightly differently; PNG decodes exactly.
        tolerance = 6 if image_id.endswith(".jpg") else 0
        assert np.abs(decoded - expected).max() <= tolerance, image_id


def test_other_images_become_upright_rgb_png(converted):
    examples = _read_split(converted[0])
    for image_id in set(GOOD) - set(KEPT_AS_IS):
        stored = Image.open(io.BytesIO(examples[image_id]["image"]))
        assert (stored.format, stored.mode) == ("PNG", "RGB"), image_id

    rotated = examples["rotated.JPG"]
    assert (rotated["height"], rotated["width"]) == (96, 64)
    pixels = preprocess.decode_image(rotated["image"]).numpy().astype(int)
    # Stored top-left corner, turned 90° clockwise, is the displayed top-right one.
    assert np.abs(pixels[5, -5] - RED).max() < 30
    assert np.abs(pixels[5, 5] - 40).max() < 30

    cmyk = preprocess.decode_image(examples["cmyk.jpg"]["image"]).numpy().astype(int)
    assert cmyk.shape == (64, 80, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 50

    rgba = preprocess.decode_image(examples["rgba.png"]["image"]).numpy()
    assert (rgba[:, :40] == 90).all() and (rgba[:, 40:] == 255).all()


def test_metadata_and_shards(converted):
    output_dir, report = converted
    metadata = image_records.read_metadata(str(output_dir), "images", "train")
    assert metadata["num_examples"] == len(GOOD)
    assert metadata["report"] == report
    assert metadata["conversion"]["num_shards"] == 3
    assert [s["file"] for s in metadata["shards"]] == [
        f"images-train.tfrecord-0000{i}-of-00003" for i in range(3)]
    paths = image_records.shard_paths(str(output_dir), "images", "train")
    assert paths == [str(output_dir / s["file"]) for s in metadata["shards"]]
    for path, shard in zip(paths, metadata["shards"]):
        assert sum(1 for _ in tf.data.TFRecordDataset(path)) == shard["num_examples"]
    assert sorted(os.listdir(output_dir)) == sorted(
        [s["file"] for s in metadata["shards"]] + ["images-train.json"])


def test_same_seed_same_bytes_whatever_the_workers(corpus, tmp_path):
    def shard_bytes(directory):
        paths = image_records.shard_paths(str(directory), "images", "train")
        return [open(path, "rb").read() for path in paths]

    _convert(tmp_path / "a", input_dir=str(corpus), num_shards=4, seed=7, num_workers=1)
    _convert(tmp_path / "b", input_dir=str(corpus), num_shards=4, seed=7, num_workers=3)
    _convert(tmp_path / "c", input_dir=str(corpus), num_shards=4, seed=8)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert shard_bytes(tmp_path / "a") != shard_bytes(tmp_path / "c")


def test_failed_conversion_leaves_earlier_output_intact(corpus, tmp_path, monkeypatch):
    _convert(tmp_path, input_dir=str(corpus), num_shards=3)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    write_records = shard_files.write_records
    shards_written = []

    def fail_on_second_shard(path, serialized_records):
        if shards_written:
            raise OSError("disk full")
        shards_written.append(path)
        return write_records(path, serialized_records)

    monkeypatch.setattr(shard_files, "write_records", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        _convert(tmp_path, input_dir=str(corpus), num_shards=3, seed=1)
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before  # same files, same bytes, no temporary leftovers


def test_metadata_of_another_format_or_a_newer_version_is_refused(converted, tmp_path):
    output_dir, _ = converted
    metadata = json.loads((output_dir / "images-train.json").read_text())
    newer = {**metadata, "format_version": image_records.FORMAT_VERSION + 1}
    (tmp_path / "images-train.json").write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="format version 2; this version of dalle_jax "
                                         "reads up to 1"):
        image_records.read_metadata(str(tmp_path), "images", "train")
    (tmp_path / "images-train.json").write_text(json.dumps({**metadata,
                                                            "format": "dalle_jax.codes"}))
    with pytest.raises(ValueError, match="is dalle_jax.codes metadata, not "
                                         "dalle_jax.image_caption"):
        image_records.read_metadata(str(tmp_path), "images", "train")
    with pytest.raises(FileNotFoundError, match="convert the images first"):
        image_records.read_metadata(str(tmp_path), "other", "train")


def test_reconversion_with_fewer_shards_removes_old_ones(corpus, tmp_path):
    _convert(tmp_path, input_dir=str(corpus), num_shards=3)
    _convert(tmp_path, input_dir=str(corpus), num_shards=2)
    assert sorted(os.listdir(tmp_path)) == [
        "images-train.json", "images-train.tfrecord-00000-of-00002",
        "images-train.tfrecord-00001-of-00002"]


def test_pixel_limit_is_configurable(tmp_path):
    (tmp_path / "in").mkdir()
    for side in (64, 80):  # 80 x 80 trips Pillow's own check, which only warns below 2x
        Image.fromarray(_noise(side, side)).save(tmp_path / "in" / f"{side}.png")
        (tmp_path / "in" / f"{side}.txt").write_text(f"side {side}")
    report = _convert(tmp_path / "out", input_dir=str(tmp_path / "in"),
                      max_pixels=64 * 64, num_shards=1)
    assert report["written"] == 1
    assert report["skipped_ids"] == {"too_many_pixels": ["80.png"]}


def _manifest_rows(corpus, manifest_dir):
    """(path as written in the manifest, caption bytes, expected reason or None)."""
    def relative(image_id):
        return os.path.relpath(corpus / image_id, manifest_dir)

    return [
        (relative("rgb.jpg"), b"a photo, with a comma", None),
        (relative("sub/dir/rgb.png"), b"two\nlines", None),
        (str(corpus / "cmyk.jpg"), b"an absolute path", None),
        (relative("missing.jpg"), b"not there", "missing_file"),
        (relative("gray.png"), b"   ", "empty_caption"),
        (relative("text.jpg"), b"text", "not_an_image"),
        (relative("tiny.png"), b"caf\xe9 in latin-1", "caption_not_utf8"),
    ]


def _check_manifest_conversion(rows, report, output_dir):
    assert report["skipped"] == _expected_skips(reason for _, _, reason in rows if reason)
    examples = _read_split(output_dir)
    good = {path: caption.decode() for path, caption, reason in rows if reason is None}
    assert {k: v["caption"].decode() for k, v in examples.items()} == good


def _as_text(caption: bytes) -> str:
    """Caption bytes as str, invalid UTF-8 kept as surrogates to be written back as-is."""
    return caption.decode("utf-8", "surrogateescape")


def test_csv_manifest(corpus, tmp_path):
    rows = _manifest_rows(corpus, manifest_dir=corpus)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["path", "caption", "source"])
    for path, caption, _ in rows:
        writer.writerow([path, _as_text(caption), "test"])
    manifest = corpus / "manifest.csv"
    manifest.write_bytes(buffer.getvalue().encode("utf-8", "surrogateescape"))
    report = _convert(tmp_path, manifest=str(manifest), num_shards=2)
    _check_manifest_conversion(rows, report, tmp_path)


def test_jsonl_manifest(corpus, tmp_path):
    rows = _manifest_rows(corpus, manifest_dir=tmp_path)
    manifest = tmp_path / "manifest.jsonl"
    lines = [json.dumps({"path": path, "caption": _as_text(caption)}, ensure_ascii=False)
             for path, caption, _ in rows]
    manifest.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape") + b"\n\n")
    report = _convert(tmp_path / "out", manifest=str(manifest), num_shards=2)
    _check_manifest_conversion(rows, report, tmp_path / "out")


def test_malformed_manifest_is_an_error_naming_the_line(tmp_path):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"path": "a.jpg", "caption": "ok"}\n{"caption": "no path"}\n')
    with pytest.raises(ValueError, match="line 2"):
        _convert(tmp_path / "out", manifest=str(manifest))


def _run_cli(*overrides):
    command = [sys.executable, "-m", "dalle_jax.tools.convert_images",
               "--config=configs/convert_images.py", *overrides]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli(corpus, tmp_path):
    result = _run_cli(f"--config.input_dir={corpus}", f"--config.output_dir={tmp_path}",
                      "--config.num_shards=2", "--config.name=cli")
    assert result.returncode == 0, result.stderr
    assert "| written" in result.stdout and "| skipped: too_small" in result.stdout
    metadata = image_records.read_metadata(str(tmp_path), "cli", "train")
    assert len(metadata["shards"]) == 2
    assert metadata["num_examples"] == len(GOOD)


@pytest.mark.slow
def test_cli_names_the_missing_key(tmp_path):
    result = _run_cli(f"--config.output_dir={tmp_path}")
    assert result.returncode != 0
    assert "config.input_dir" in result.stderr and "config.manifest" in result.stderr
    assert not os.listdir(tmp_path)
