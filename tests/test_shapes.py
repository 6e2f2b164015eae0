"""Captioned-shapes dataset: renderer invariants, captions vs labels vs pixels, builder."""
import io
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dalle_jax.data import shapes
from dalle_jax.data import shapes_tfds

SPLITS = ("train", "validation", "test", "holdout")
SMALL_BUILD = dict(
    image_size=64, num_train=240, num_validation=60, num_test=60, num_holdout=120
)
TINY_BUILD = dict(
    image_size=32, num_train=80, num_validation=20, num_test=20, num_holdout=20
)
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

_OBJECT = r"a (?:(?P<size{n}>\w+) )?(?P<colour{n}>\w+) (?P<shape{n}>\w+)"
_PREFIXES = "|".join(re.escape(p) for p in shapes.CAPTION_PREFIXES if p)
_RELATION_PHRASES = "|".join(
    re.escape(p) for phrases in shapes.RELATION_PHRASES.values() for p in phrases
)
ONE_OBJECT_CAPTION = re.compile(
    rf"(?:{_PREFIXES})?{_OBJECT.format(n=0)} "
    rf"(?P<cell>{'|'.join(map(re.escape, shapes.CELL_PHRASES))})"
)
TWO_OBJECT_CAPTION = re.compile(
    rf"(?:{_PREFIXES})?{_OBJECT.format(n=0)} (?P<relation>{_RELATION_PHRASES}) "
    rf"{_OBJECT.format(n=1)}"
)
RELATION_OF_PHRASE = {
    p: relation for relation, phrases in shapes.RELATION_PHRASES.items() for p in phrases
}


def _read_split(builder, split):
    """Decoded examples of `split`, read from its files as the input pipeline does."""
    files = builder.info.splits[split].filepaths
    records = tf.data.TFRecordDataset(files).map(builder.info.features.deserialize_example)
    return list(tfds.as_numpy(records))


def _record_files(data_dir):
    return {
        path.relative_to(data_dir): path.read_bytes()
        for path in sorted(pathlib.Path(data_dir).rglob("*.tfrecord*"))
    }


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    builder = shapes_tfds.build_captioned_shapes(
        tmp_path_factory.mktemp("shapes"), **SMALL_BUILD
    )
    return builder, {split: _read_split(builder, split) for split in SPLITS}


@pytest.fixture(scope="module")
def tiny_build_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tiny_seed0")
    shapes_tfds.build_captioned_shapes(data_dir, **TINY_BUILD)
    return data_dir


# --- Renderer, no tfds.


@pytest.mark.parametrize(
    "shape, area",
    [("circle", np.pi), ("square", 4.0), ("triangle", 2.0), ("diamond", 2.0),
     # Pentagram of outer radius R: 10 triangles (centre, tip, valley).
     ("star", 5 * shapes._STAR_RADIUS**2 * np.sin(np.radians(36))
      * np.sin(np.radians(18)) / np.sin(np.radians(126)))],
)
def test_shape_masks_have_the_expected_area_and_extent(shape, area):
    grid = (np.arange(1000) + 0.5) / 500 - 1.0  # [-1, 1] in box units
    inside = shapes.shape_mask(shape, grid[None, :], grid[:, None])
    assert inside.mean() * 4.0 == pytest.approx(area, rel=0.01)
    rows, cols = np.nonzero(inside)
    half_x, half_y = shapes._SHAPE_EXTENT[shape]
    assert grid[cols].min() == pytest.approx(-half_x, abs=0.01)
    assert grid[cols].max() == pytest.approx(half_x, abs=0.01)
    assert grid[rows].min() == pytest.approx(-half_y, abs=0.01)
    assert grid[rows].max() == pytest.approx(half_y, abs=0.01)


def test_triangle_and_star_point_up():
    for shape in ("triangle", "star"):
        assert shapes.shape_mask(shape, np.array(0.0), np.array(-0.9))
        assert not shapes.shape_mask(shape, np.array(-0.9), np.array(-0.9))


def test_draw_object_is_antialiased_and_exact_inside():
    image = np.full((32, 32, 3), 20, np.uint8)
    rgb = np.array([220, 40, 40], np.uint8)
    obj = shapes.SceneObject("circle", "red", "large", rgb, (15.3, 16.7), 6.4)
    shapes.draw_object(image, obj)
    red = image[:, :, 0]
    assert (image[16, 15] == rgb).all()
    assert (image[0, 0] == 20).all()
    edges = (red > 20) & (red < 220)
    assert edges.sum() >= 10  # a circle of radius 6.4 px has ~40 partly covered pixels
    # Partial coverage mixes the two colours on every channel alike.
    mixed = image[edges].astype(float)
    alpha = (mixed[:, 0] - 20) / 200
    assert np.allclose(mixed[:, 1], 20 + alpha * 20, atol=1)


def test_png_round_trip():
    image = shapes.split_scene("train", 3, image_size=32).image
    png = shapes.encode_png(image)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), image)
    np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), image)


def test_split_scene_is_a_pure_function_of_its_arguments():
    a = shapes.split_scene("validation", 17, image_size=64, seed=3)
    b = shapes.split_scene("validation", 17, image_size=64, seed=3)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.caption == b.caption
    c = shapes.split_scene("validation", 17, image_size=64, seed=4)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("image_size", [32, 64, 256])
def test_many_scenes_keep_layout_invariants(image_size):
    count = 60 if image_size == 256 else 600
    for index in range(count):
        scene = shapes.split_scene("train", index, image_size=image_size)
        _check_scene_labels(
            scene.image, scene.caption, scene.layout,
            [obj.centre for obj in scene.objects],
            [obj.bbox(image_size) for obj in scene.objects],
            [obj.pair for obj in scene.objects],
            [obj.size for obj in scene.objects],
            [obj.rgb for obj in scene.objects],
        )


def test_sizes_are_about_one_and_two_fifths_of_the_width():
    sides = {"small": [], "large": []}
    for index in range(400):
        for obj in shapes.split_scene("test", index, image_size=100).objects:
            sides[obj.size].append(2 * obj.half_size / 100)
    assert 0.18 <= min(sides["small"]) and max(sides["small"]) <= 0.22
    assert 0.36 <= min(sides["large"]) and max(sides["large"]) <= 0.44


def test_caption_vocabulary_is_covered():
    captions = [shapes.split_scene("train", i, image_size=32).caption for i in range(1500)]
    text = " ".join(captions)
    for word in (*shapes.SHAPES, *shapes.COLOURS, "over", "under", "big", "tiny"):
        assert f" {word}" in text
    for phrase in (*shapes.CELL_PHRASES, *RELATION_OF_PHRASE, "there is", "a drawing of"):
        assert phrase in text
    assert text == text.lower()


def test_unknown_holdout_pair_is_rejected():
    with pytest.raises(ValueError, match="unknown"):
        shapes.split_scene("train", 0, holdout_pairs=[("pink", "circle")])


# --- The tfds builder.


def test_builder_is_registered_with_presets():
    builder = tfds.builder("captioned_shapes/128px", data_dir="/nonexistent")
    assert isinstance(builder, shapes_tfds.CaptionedShapes)
    assert builder.builder_config.image_size == 128
    assert builder.info.features["image"].shape == (128, 128, 3)
    assert tfds.builder("captioned_shapes", data_dir="/nonexistent").builder_config.name == "64px"


def test_config_names_encode_parameters():
    defaults = dict(
        num_train=50_000, num_validation=2_000, num_test=2_000, num_holdout=2_000,
        holdout_pairs=shapes.DEFAULT_HOLDOUT, seed=0,
    )
    assert shapes_tfds.config_name(32, **defaults) == "32px"
    variants = {
        shapes_tfds.config_name(64, **{**defaults, **change})
        for change in ({}, {"seed": 1}, {"num_test": 10}, {"holdout_pairs": [("red", "star")]})
    }
    variants.add(shapes_tfds.config_name(48, **defaults))
    assert len(variants) == 5


@pytest.mark.slow
def test_same_seed_gives_identical_files_in_another_process(tiny_build_dir, tmp_path):
    other_dir = tmp_path / "tiny_seed0_again"
    script = (
        "import sys; from dalle_jax.data import shapes_tfds; "
        f"shapes_tfds.build_captioned_shapes(sys.argv[1], **{TINY_BUILD!r})"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(
        [sys.executable, "-c", script, str(other_dir)], cwd=REPO_ROOT, env=env, check=True,
        capture_output=True,
    )
    expected, actual = _record_files(tiny_build_dir), _record_files(other_dir)
    assert len(expected) == 4
    assert expected == actual


def test_different_seed_gives_different_files(tiny_build_dir, tmp_path):
    shapes_tfds.build_captioned_shapes(tmp_path, **{**TINY_BUILD, "seed": 1})
    seed0, seed1 = _record_files(tiny_build_dir), _record_files(tmp_path)
    assert len(seed0) == len(seed1) == 4
    for path in seed0:
        seed1_path = pathlib.Path(str(path).replace("seed0", "seed1"))
        assert seed0[path] != seed1[seed1_path]


def test_rebuild_reuses_the_prepared_dataset(small_build):
    builder, _ = small_build
    files = builder.info.splits["train"].filepaths
    written = [os.stat(f).st_mtime_ns for f in files]
    again = shapes_tfds.build_captioned_shapes(builder.data_dir_root, **SMALL_BUILD)
    assert again.data_dir == builder.data_dir
    assert [os.stat(f).st_mtime_ns for f in files] == written


def test_splits_have_requested_sizes_and_ids(small_build):
    builder, examples = small_build
    assert builder.info.splits["train"].num_examples == SMALL_BUILD["num_train"]
    for split in SPLITS:
        ids = [e["id"].decode() for e in examples[split]]
        assert ids == [f"{split}/{i}" for i in range(len(ids))]
    assert len(examples["holdout"]) == SMALL_BUILD["num_holdout"]


def test_examples_agree_with_captions_labels_and_pixels(small_build):
    builder, examples = small_build
    features = builder.info.features["objects"]
    shape_names, colour_names, size_names = (
        features[key].names for key in ("shape", "colour", "size")
    )
    num_two_object = 0
    for split in SPLITS:
        for example in examples[split]:
            objects = example["objects"]
            num_two_object += len(objects["shape"]) == 2
            _check_scene_labels(
                example["image"], example["caption"].decode(), example["layout"].decode(),
                [tuple(c) for c in objects["centre"]],
                [tuple(b) for b in objects["bbox"]],
                [(colour_names[c], shape_names[s])
                 for c, s in zip(objects["colour"], objects["shape"])],
                [size_names[s] for s in objects["size"]],
                list(objects["rgb"]),
            )
    total = sum(len(v) for v in examples.values())
    assert 0.3 * total < num_two_object < 0.7 * total


def test_holdout_pairs_only_in_holdout_split(small_build):
    builder, examples = small_build
    features = builder.info.features["objects"]
    holdout = set(shapes.DEFAULT_HOLDOUT)
    for split in SPLITS:
        for example in examples[split]:
            objects = example["objects"]
            pairs = {
                (features["colour"].int2str(c), features["shape"].int2str(s))
                for c, s in zip(objects["colour"], objects["shape"])
            }
            assert bool(pairs & holdout) == (split == "holdout"), (split, example["caption"])


def test_dataset_images_have_antialiased_edges(small_build):
    _, examples = small_build
    for example in examples["test"][:20]:
        image = example["image"].astype(int)
        rgb = example["objects"]["rgb"][0].astype(int)
        channel = int(np.argmax(np.abs(rgb - 30)))
        background = np.median(image[:, :, channel])
        low, high = sorted((background, rgb[channel]))
        values = image[:, :, channel]
        partial = (values > low + shapes.BACKGROUND_NOISE + 2) & (values < high - 2)
        assert partial.sum() >= 4, example["caption"]


def _check_scene_labels(image, caption, layout, centres, bboxes, pairs, sizes, rgbs):
    """Asserts that a caption, its structured labels and the pixels all agree."""
    size = image.shape[0]
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    two_objects = len(pairs) == 2
    match = (TWO_OBJECT_CAPTION if two_objects else ONE_OBJECT_CAPTION).fullmatch(caption)
    assert match, caption
    for n, (pair, size_class) in enumerate(zip(pairs, sizes)):
        assert (match[f"colour{n}"], match[f"shape{n}"]) == pair, caption
        if match[f"size{n}"] is not None:
            assert match[f"size{n}"] in shapes.SIZE_WORDS[size_class], caption

    if two_objects:
        assert RELATION_OF_PHRASE[match["relation"]] == layout, caption
        # The subject's offset from the other object: clearly along the named axis.
        dx, dy = np.subtract(centres[0], centres[1])
        along, across = {
            "left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx),
        }[layout]
        assert along >= 0.15 * size and along > abs(across), caption
        assert shapes.relation_holds(layout, centres[0], centres[1], size), caption
        # Boxes apart (a gap along the relation's axis).
        (ymin0, xmin0, ymax0, xmax0), (ymin1, xmin1, ymax1, xmax1) = bboxes
        assert xmax0 < xmin1 or xmax1 < xmin0 or ymax0 < ymin1 or ymax1 < ymin0, caption
    else:
        assert match["cell"] == layout, caption
        col, row = (int(3 * coordinate // size) for coordinate in centres[0])
        assert shapes.CELL_PHRASES[3 * row + col] == layout, caption
        assert shapes.cell_index(centres[0], size) == 3 * row + col
        # The centre stays clear of the grid lines, so the phrase is unambiguous.
        for coordinate in centres[0]:
            offset_in_cell = (coordinate * 3 / size) % 1.0
            assert 0.1 < offset_in_cell < 0.9, caption

    for centre, bbox, (colour, _), rgb in zip(centres, bboxes, pairs, rgbs):
        ymin, xmin, ymax, xmax = bbox
        assert 0.0 < xmin < centre[0] / size < xmax < 1.0
        assert 0.0 < ymin < centre[1] / size < ymax < 1.0
        # Some pixel next to the centre is fully covered, so shows exactly the
        # object's colour, whose nearest palette entry is the labelled colour.
        col, row = int(centre[0]), int(centre[1])
        patch = image[row - 1:row + 2, col - 1:col + 2].reshape(-1, 3)
        assert (patch == rgb).all(axis=1).any(), caption
        distances = {
            name: np.abs(rgb.astype(int) - np.array(value)).max()
            for name, value in shapes.PALETTE.items()
        }
        assert min(distances, key=distances.get) == colour
        assert distances[colour] <= shapes.COLOUR_JITTER
