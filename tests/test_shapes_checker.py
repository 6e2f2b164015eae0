"""The captioned-shapes attribute checker: captions parsed, pixels read, rendered
images pass with their own captions and fail with captions altered one attribute at
a time."""
import itertools

import numpy as np
import pytest

from dalle_jax.data import shapes
from dalle_jax.evaluation import shapes_checker as checker

# Scenes rendered directly (no tfds build); the holdout split adds the pairs the
# other splits never draw.
NUM_TEST_SCENES = 240
NUM_HOLDOUT_SCENES = 60
TRUE_CAPTION_MIN_RATE = 0.99
WRONG_CAPTION_MAX_RATE = 0.10
REVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


@pytest.fixture(scope="module", params=[32, 64], ids=lambda size: f"{size}px")
def rendered(request):
    """(scenes, readings) at one image size, each image read once."""
    size = request.param
    scenes = [shapes.split_scene("test", i, image_size=size) for i in range(NUM_TEST_SCENES)]
    scenes += [
        shapes.split_scene("holdout", i, image_size=size) for i in range(NUM_HOLDOUT_SCENES)
    ]
    return scenes, [checker.read_image(scene.image) for scene in scenes]


def _rates(scenes, readings, captions):
    """Per group ("one_object", "two_objects"), the pass rate of each criterion over
    the scenes whose altered caption is not None."""
    results = {"one_object": [], "two_objects": []}
    for scene, reading, caption in zip(scenes, readings, captions):
        if caption is None:
            continue
        group = "one_object" if len(scene.objects) == 1 else "two_objects"
        results[group].append(checker.check_reading(reading, checker.parse_caption(caption)))
    return {
        group: {
            criterion: np.mean([r[criterion] for r in rs if r[criterion] is not None])
            for criterion in (*checker.CRITERIA, "all")
            if any(r[criterion] is not None for r in rs)
        }
        for group, rs in results.items()
    }, {group: len(rs) for group, rs in results.items()}


# --- Alterations of a rendered caption, one attribute at a time.


def _object_words(caption: str, obj: shapes.SceneObject) -> str:
    """The "colour shape" words of `obj`, which occur once in its scene's caption."""
    words = f"{obj.colour} {obj.shape}"
    assert caption.count(words) == 1, caption
    return words


def _other_colour(scene, rng):
    obj = scene.objects[rng.integers(len(scene.objects))]
    colour = rng.choice([c for c in shapes.COLOURS if c != obj.colour])
    return scene.caption.replace(_object_words(scene.caption, obj), f"{colour} {obj.shape}")


def _other_shape(scene, rng):
    obj = scene.objects[rng.integers(len(scene.objects))]
    shape = rng.choice([s for s in shapes.SHAPES if s != obj.shape])
    return scene.caption.replace(_object_words(scene.caption, obj), f"{obj.colour} {shape}")


def _other_size(scene, rng):
    """The size word of an object that has one swapped for the other size's; None
    when the caption names no size."""
    for obj in rng.permutation(scene.objects):
        words = _object_words(scene.caption, obj)
        for word in shapes.SIZE_WORDS[obj.size]:
            if f" {word} {words}" in scene.caption:
                other = next(s for s in shapes.SIZES if s != obj.size)
                new_word = rng.choice(shapes.SIZE_WORDS[other])
                return scene.caption.replace(f" {word} {words}", f" {new_word} {words}")
    return None


def _other_cell(scene, rng):
    if len(scene.objects) != 1:
        return None
    assert scene.caption.endswith(scene.layout), scene.caption
    cell = rng.choice([p for p in shapes.CELL_PHRASES if p != scene.layout])
    return scene.caption[: -len(scene.layout)] + cell


def _reverse_relation(scene, rng):
    if len(scene.objects) != 2:
        return None
    for phrase in sorted(shapes.RELATION_PHRASES[scene.layout], key=len, reverse=True):
        if f" {phrase} a " in scene.caption:
            reverse = rng.choice(shapes.RELATION_PHRASES[REVERSE[scene.layout]])
            return scene.caption.replace(f" {phrase} a ", f" {reverse} a ")
    raise AssertionError(scene.caption)


ALTERATIONS = {
    "colour": _other_colour,
    "shape": _other_shape,
    "size": _other_size,
    "cell": _other_cell,
    "relation": _reverse_relation,
}


# --- Accuracy and discrimination on rendered scenes.


def test_rendered_images_pass_with_their_own_captions(rendered):
    scenes, readings = rendered
    rates, counts = _rates(scenes, readings, [s.caption for s in scenes])
    assert min(counts.values()) >= 100, counts
    assert set(rates["one_object"]) == {*checker.CRITERIA, "all"} - {"relation"}
    assert set(rates["two_objects"]) == {*checker.CRITERIA, "all"} - {"cell"}
    for group, group_rates in rates.items():
        for criterion, rate in group_rates.items():
            assert rate >= TRUE_CAPTION_MIN_RATE, (group, criterion, rate)


@pytest.mark.parametrize("criterion", list(ALTERATIONS))
def test_captions_altered_in_one_attribute_fail_it(rendered, criterion):
    scenes, readings = rendered
    rng = np.random.default_rng(list(ALTERATIONS).index(criterion))
    captions = [ALTERATIONS[criterion](scene, rng) for scene in scenes]
    for scene, caption in zip(scenes, captions):
        assert caption is None or caption != scene.caption
    rates, counts = _rates(scenes, readings, captions)
    groups = [g for g, n in counts.items() if n > 0]
    assert groups
    for group in groups:
        assert counts[group] >= 50, counts
        assert rates[group][criterion] <= WRONG_CAPTION_MAX_RATE, (group, rates[group])
        assert rates[group]["all"] <= WRONG_CAPTION_MAX_RATE, (group, rates[group])
        # Altering one attribute leaves the object count as it was.
        assert rates[group]["count"] >= TRUE_CAPTION_MIN_RATE, (group, rates[group])


def test_readings_locate_and_size_objects_to_a_fraction_of_a_pixel(rendered):
    scenes, readings = rendered
    for scene, reading in zip(scenes[:100], readings[:100]):
        assert len(reading.objects) == len(scene.objects), scene.caption
        for obj in scene.objects:
            found = min(reading.objects, key=lambda f: np.hypot(
                f.centre[0] - obj.centre[0], f.centre[1] - obj.centre[1]))
            assert np.hypot(found.centre[0] - obj.centre[0],
                            found.centre[1] - obj.centre[1]) < 0.5, scene.caption
            assert found.half_size == pytest.approx(obj.half_size, rel=0.1), scene.caption
            assert (found.colour, found.shape, found.size) == (obj.colour, obj.shape, obj.size)
            assert found.cell == shapes.cell_index(obj.centre, scene.image.shape[0])


def test_score_splits_rates_by_object_count(rendered):
    scenes, readings = rendered
    scenes = scenes[:40]
    images = np.stack([s.image for s in scenes])
    rates = checker.score(images, [s.caption for s in scenes])
    ones = sum(len(s.objects) == 1 for s in scenes)
    assert rates["one_object"]["n"] == ones
    assert rates["two_objects"]["n"] == len(scenes) - ones
    assert rates["overall"]["n"] == len(scenes)
    assert rates["overall"]["all"] == 1.0
    assert np.isnan(rates["two_objects"]["cell"]) and np.isnan(rates["one_object"]["relation"])
    # A list of images does as well as a batch; shuffled captions do much worse.
    np.testing.assert_equal(checker.score(list(images), [s.caption for s in scenes]), rates)
    shuffled = checker.score(images, [s.caption for s in scenes[1:] + scenes[:1]])
    assert shuffled["overall"]["all"] < 0.2


# --- Captions.


def _object_phrases():
    """Every way the renderer can describe one object's size (none, or any word)."""
    return [(None, "")] + [
        (size, f"{word} ") for size, words in shapes.SIZE_WORDS.items() for word in words
    ]


def test_parse_every_one_object_template():
    for prefix, (size, size_words), (cell, phrase) in itertools.product(
        shapes.CAPTION_PREFIXES, _object_phrases(), enumerate(shapes.CELL_PHRASES)
    ):
        caption = f"{prefix}a {size_words}purple diamond {phrase}"
        assert checker.parse_caption(caption) == checker.Prompt(
            objects=(checker.AskedObject("purple", "diamond", size),), cell=cell
        ), caption


def test_parse_every_two_object_template():
    phrases = [(r, p) for r, ps in shapes.RELATION_PHRASES.items() for p in ps]
    for prefix, (size0, words0), (relation, phrase), (size1, words1) in itertools.product(
        shapes.CAPTION_PREFIXES, _object_phrases(), phrases, _object_phrases()
    ):
        caption = f"{prefix}a {words0}cyan star {phrase} a {words1}orange triangle"
        assert checker.parse_caption(caption) == checker.Prompt(
            objects=(checker.AskedObject("cyan", "star", size0),
                     checker.AskedObject("orange", "triangle", size1)),
            relation=relation,
        ), caption


def test_parse_every_colour_and_shape_and_rendered_captions():
    for colour, shape in shapes.ALL_PAIRS:
        prompt = checker.parse_caption(f"a {colour} {shape} at the top")
        assert prompt.objects == (checker.AskedObject(colour, shape),)
    for index in range(200):
        scene = shapes.split_scene("train", index, image_size=32)
        prompt = checker.parse_caption(scene.caption)
        assert [(o.colour, o.shape) for o in prompt.objects] == [o.pair for o in scene.objects]
        for asked, obj in zip(prompt.objects, scene.objects):
            assert asked.size in (None, obj.size)
        if len(scene.objects) == 1:
            assert (prompt.cell, prompt.relation) == (shapes.CELL_PHRASES.index(scene.layout), None)
        else:
            assert (prompt.cell, prompt.relation) == (None, scene.layout)


def test_parse_tolerates_case_spacing_a_full_stop_and_no_cell():
    assert checker.parse_caption("  A Big  RED circle   On the left. ") == checker.Prompt(
        objects=(checker.AskedObject("red", "circle", "large"),), cell=3
    )
    assert checker.parse_caption("a white square") == checker.Prompt(
        objects=(checker.AskedObject("white", "square"),)
    )


@pytest.mark.parametrize("caption", [
    "", "a red", "a pink circle on the left", "a red hexagon", "a red circle somewhere",
    "a red circle above", "a red circle next to a blue square", "two red circles",
    "a huge red circle in the center",
])
def test_parse_rejects_other_text(caption):
    with pytest.raises(ValueError, match="not a captioned-shapes caption"):
        checker.parse_caption(caption)


def test_parse_rejects_non_strings():
    with pytest.raises(ValueError, match="must be a str"):
        checker.parse_caption(b"a red circle")


# --- Images without objects, odd images, bad input.


@pytest.mark.parametrize("size", [32, 64])
def test_blank_backgrounds_show_no_objects(size):
    rng = np.random.default_rng(size)
    for _ in range(20):
        reading = checker.read_image(shapes.render_background(rng, size))
        assert reading.objects == () and reading.relation is None
        level = reading.background[0]
        assert shapes.BACKGROUND_LEVELS[0] - 1 <= level <= shapes.BACKGROUND_LEVELS[1] + 1
    blank = shapes.render_background(rng, size)
    for caption in ("a red circle in the center", "a blue square above a small white star"):
        result = checker.check(blank, caption)
        assert result["count"] is False and result["all"] is False
        assert result["colour"] is False and result["shape"] is False
    assert checker.check(blank, "a red circle in the center")["cell"] is False
    assert checker.check(blank, "a red circle below a white star")["relation"] is False


@pytest.mark.parametrize("value", [0, 255, (220, 40, 40)])
def test_flat_images_show_no_objects(value):
    image = np.empty((32, 32, 3), np.uint8)
    image[...] = value
    assert checker.read_image(image).objects == ()


def test_random_noise_does_not_crash():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    result = checker.check(image, "a red circle above a blue square")
    assert set(result) == {*checker.CRITERIA, "all"}


def _scene_image(size, *objects):
    image = shapes.render_background(np.random.default_rng(0), size)
    for shape, colour, centre, half_size in objects:
        rgb = np.array(shapes.PALETTE[colour], np.uint8)
        shapes.draw_object(image, shapes.SceneObject(shape, colour, "large", rgb, centre,
                                                     half_size))
    return image


def test_look_alike_objects_cannot_satisfy_a_relation_and_its_reverse():
    image = _scene_image(64, ("circle", "red", (32, 14), 10), ("circle", "red", (32, 50), 10))
    for relation in ("above", "below"):
        result = checker.check(image, f"a red circle {relation} a red circle")
        assert result["count"] and result["colour"] and result["shape"]
        assert result["relation"] is False and result["all"] is False


def test_an_extra_object_fails_only_the_count():
    image = _scene_image(64, ("square", "blue", (14, 14), 10), ("star", "white", (50, 50), 10))
    result = checker.check(image, "a large blue square in the top left corner")
    assert result == {"count": False, "colour": True, "shape": True, "size": True,
                      "cell": True, "relation": None, "all": False}
    result = checker.check(image, "a large white star in the bottom right corner")
    assert result["colour"] and result["shape"] and result["cell"] and not result["count"]


def test_swapped_attributes_do_not_pass():
    # A red circle and a blue square, captioned as a red square and a blue circle:
    # both pairings match two attributes, neither matches the caption.
    image = _scene_image(64, ("circle", "red", (14, 32), 10), ("square", "blue", (50, 32), 10))
    assert checker.check(image, "a red circle left of a blue square")["all"]
    result = checker.check(image, "a red square left of a blue circle")
    assert result["count"] and not result["colour"] and not result["shape"]
    assert not result["all"]


@pytest.mark.parametrize("image, match", [
    (np.zeros((32, 32, 3), np.float32), "dtype float32"),
    (np.zeros((32, 32), np.uint8), r"shape \[32, 32\]"),
    (np.zeros((2, 32, 32, 3), np.uint8), r"shape \[2, 32, 32, 3\]"),
    (np.zeros((32, 32, 4), np.uint8), r"shape \[32, 32, 4\]"),
    (np.zeros((32, 48, 3), np.uint8), "square"),
    (np.zeros((4, 4, 3), np.uint8), "at least 8x8"),
    ([[[0, 0, 0]]], "numpy"),
])
def test_bad_images_are_rejected(image, match):
    with pytest.raises(ValueError, match=match):
        checker.read_image(image)
    with pytest.raises(ValueError, match=match):
        checker.check(image, "a red circle in the center")


def test_score_rejects_mismatched_input():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        checker.score(images, ["a red circle"])
    with pytest.raises(ValueError, match="a batch of images"):
        checker.score(images[0], ["a red circle"] * 32)
    with pytest.raises(ValueError, match="dtype float32"):
        checker.score(images.astype(np.float32), ["a red circle"] * 2)
