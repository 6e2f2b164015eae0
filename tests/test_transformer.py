"""Stage 2: the transformer's masks, embeddings, heads, loss, cache and sharding."""
from __future__ import annotations

import dataclasses
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dalle_jax import config as config_lib
from dalle_jax.models import remat
from dalle_jax.models import transformer as tr
from dalle_jax.stages import transformer as stage2
from dalle_jax.train import defaults
from dalle_jax.train import optimizer as optimizer_lib
from dalle_jax.train import sharding as sharding_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_LEN, H, W = 6, 4, 4
SMALL = tr.TransformerConfig(text_vocab_size=50, text_len=TEXT_LEN, image_vocab_size=40,
                             image_height=H, image_width=W, num_layers=4, num_heads=2,
                             head_dim=8, attention="dalle", conv_kernel=3)


def _pictures(block: str) -> list[np.ndarray]:
    """Side-by-side masks drawn one query per line ('x' visible key, '.' masked), keys
    in raster order; what follows '#' is a comment."""
    lines = [line.split("#")[0].split() for line in block.strip().splitlines()]
    return [np.array([[c == "x" for c in line[i]] for line in lines])
            for i in range(len(lines[0]))]


# The paper's figure 11 draws its masks on a 4x4 grid with a 3x3 kernel.
DENSE_4x4, ROW_4x4, COLUMN_4x4 = _pictures("""
    x...............  x...............  x...............  #  0
    xx..............  xx..............  .x..............  #  1
    xxx.............  xxx.............  ..x.............  #  2
    xxxx............  xxxx............  ...x............  #  3
    xxxxx...........  xxxxx...........  x...x...........  #  4
    xxxxxx..........  .xxxxx..........  .x...x..........  #  5
    xxxxxxx.........  ..xxxxx.........  ..x...x.........  #  6
    xxxxxxxx........  ...xxxxx........  ...x...x........  #  7
    xxxxxxxxx.......  ....xxxxx.......  x...x...x.......  #  8
    xxxxxxxxxx......  .....xxxxx......  .x...x...x......  #  9
    xxxxxxxxxxx.....  ......xxxxx.....  ..x...x...x.....  # 10
    xxxxxxxxxxxx....  .......xxxxx....  ...x...x...x....  # 11
    xxxxxxxxxxxxx...  ........xxxxx...  x...x...x...x...  # 12
    xxxxxxxxxxxxxx..  .........xxxxx..  .x...x...x...x..  # 13
    xxxxxxxxxxxxxxx.  ..........xxxxx.  ..x...x...x...x.  # 14
    xxxxxxxxxxxxxxxx  ...........xxxxx  ...x...x...x...x  # 15
""")
# Convolutional, raster (offsets 0, 1 and w − 1 … w + 1 for k = 3) and wrap_columns,
# for k = 3 and for k = 5, wider than the grid.
CONV3_4x4, CONV3_WRAP_4x4, CONV5_4x4, CONV5_WRAP_4x4 = _pictures("""
    x...............  x...............  x...............  x...............  #  0
    xx..............  xx..............  xx..............  xx..............  #  1
    .xx.............  .xx.............  xxx.............  xxx.............  #  2
    x.xx............  x.xx............  xxxx............  xxxx............  #  3
    xx.xx...........  xx.xx...........  xxxxx...........  xxxxx...........  #  4
    xxx.xx..........  xxx.xx..........  xxxxxx..........  xxxxxx..........  #  5
    .xxx.xx.........  .xxx.xx.........  xxxxxxx.........  xxxxxxx.........  #  6
    ..xxx.xx........  x.xxx.xx........  xxxxxxxx........  xxxxxxxx........  #  7
    ...xxx.xx.......  ....xx.xx.......  xxxxxxxxx.......  xxxxxxxxx.......  #  8
    ....xxx.xx......  ....xxx.xx......  xxxxxxxxxx......  xxxxxxxxxx......  #  9
    .....xxx.xx.....  .....xxx.xx.....  xxxxxxxxxxx.....  xxxxxxxxxxx.....  # 10
    ......xxx.xx....  ....x.xxx.xx....  .xxxxxxxxxxx....  xxxxxxxxxxxx....  # 11
    .......xxx.xx...  ........xx.xx...  ..xxxxxxxxxxx...  ....xxxxxxxxx...  # 12
    ........xxx.xx..  ........xxx.xx..  ...xxxxxxxxxxx..  ....xxxxxxxxxx..  # 13
    .........xxx.xx.  .........xxx.xx.  ....xxxxxxxxxxx.  ....xxxxxxxxxxx.  # 14
    ..........xxx.xx  ........x.xxx.xx  .....xxxxxxxxxxx  ....xxxxxxxxxxxx  # 15
""")
# A grid of 3 rows of 5.
DENSE_3x5, ROW_3x5, COLUMN_3x5, CONV3_3x5, CONV3_WRAP_3x5 = _pictures("""
    x..............  x..............  x..............  x..............  x..............  #  0
    xx.............  xx.............  .x.............  xx.............  xx.............  #  1
    xxx............  xxx............  ..x............  .xx............  .xx............  #  2
    xxxx...........  xxxx...........  ...x...........  ..xx...........  ..xx...........  #  3
    xxxxx..........  xxxxx..........  ....x..........  x..xx..........  x..xx..........  #  4
    xxxxxx.........  xxxxxx.........  x....x.........  xx..xx.........  xx..xx.........  #  5
    xxxxxxx........  .xxxxxx........  .x....x........  xxx..xx........  xxx..xx........  #  6
    xxxxxxxx.......  ..xxxxxx.......  ..x....x.......  .xxx..xx.......  .xxx..xx.......  #  7
    xxxxxxxxx......  ...xxxxxx......  ...x....x......  ..xxx..xx......  ..xxx..xx......  #  8
    xxxxxxxxxx.....  ....xxxxxx.....  ....x....x.....  ...xxx..xx.....  x..xxx..xx.....  #  9
    xxxxxxxxxxx....  .....xxxxxx....  x....x....x....  ....xxx..xx....  .....xx..xx....  # 10
    xxxxxxxxxxxx...  ......xxxxxx...  .x....x....x...  .....xxx..xx...  .....xxx..xx...  # 11
    xxxxxxxxxxxxx..  .......xxxxxx..  ..x....x....x..  ......xxx..xx..  ......xxx..xx..  # 12
    xxxxxxxxxxxxxx.  ........xxxxxx.  ...x....x....x.  .......xxx..xx.  .......xxx..xx.  # 13
    xxxxxxxxxxxxxxx  .........xxxxxx  ....x....x....x  ........xxx..xx  .....x..xxx..xx  # 14
""")
# 5 rows of 3 and k = 5, wider than a row: raster keeps offsets 0 … 8; wrap_columns the
# whole rows up to two above.
CONV5_5x3, CONV5_WRAP_5x3 = _pictures("""
    x..............  x..............  #  0
    xx.............  xx.............  #  1
    xxx............  xxx............  #  2
    xxxx...........  xxxx...........  #  3
    xxxxx..........  xxxxx..........  #  4
    xxxxxx.........  xxxxxx.........  #  5
    xxxxxxx........  xxxxxxx........  #  6
    xxxxxxxx.......  xxxxxxxx.......  #  7
    xxxxxxxxx......  xxxxxxxxx......  #  8
    .xxxxxxxxx.....  ...xxxxxxx.....  #  9
    ..xxxxxxxxx....  ...xxxxxxxx....  # 10
    ...xxxxxxxxx...  ...xxxxxxxxx...  # 11
    ....xxxxxxxxx..  ......xxxxxxx..  # 12
    .....xxxxxxxxx.  ......xxxxxxxx.  # 13
    ......xxxxxxxxx  ......xxxxxxxxx  # 14
""")


@pytest.mark.parametrize("grid, kind, kernel, conv_mask, expected", [
    ((4, 4), "dense", 3, "raster", DENSE_4x4),
    ((4, 4), "row", 3, "raster", ROW_4x4),
    ((4, 4), "column", 3, "raster", COLUMN_4x4),
    ((4, 4), "conv", 3, "raster", CONV3_4x4),
    ((4, 4), "conv", 3, "wrap_columns", CONV3_WRAP_4x4),
    ((4, 4), "conv", 5, "raster", CONV5_4x4),
    ((4, 4), "conv", 5, "wrap_columns", CONV5_WRAP_4x4),
    ((3, 5), "dense", 3, "raster", DENSE_3x5),
    ((3, 5), "row", 3, "raster", ROW_3x5),
    ((3, 5), "column", 3, "raster", COLUMN_3x5),
    ((3, 5), "conv", 3, "raster", CONV3_3x5),
    ((3, 5), "conv", 3, "wrap_columns", CONV3_WRAP_3x5),
    # k = 7 is wider and taller than the grid: every earlier position is a neighbour.
    ((3, 5), "conv", 7, "raster", DENSE_3x5),
    ((3, 5), "conv", 7, "wrap_columns", DENSE_3x5),
    ((5, 3), "conv", 5, "raster", CONV5_5x3),
    ((5, 3), "conv", 5, "wrap_columns", CONV5_WRAP_5x3),
])
def test_image_masks_match_the_drawn_patterns(grid, kind, kernel, conv_mask, expected):
    got = tr.image_mask(kind, *grid, kernel, conv_mask)
    assert got.shape == expected.shape
    wrong = [a for a in range(len(got)) if not np.array_equal(got[a], expected[a])]
    assert not wrong, f"queries {wrong}: got {np.flatnonzero(got[wrong[0]])}"


def _conv_keys_by_loop(h, w, k):
    """The raster convolutional mask from its definition: each kernel cell (dr rows up,
    dc columns across) is the raster offset dr·w − dc from the query."""
    mask = np.zeros((h * w, h * w), bool)
    for a in range(h * w):
        for dr in range(k // 2 + 1):
            for dc in range(-(k // 2), k // 2 + 1):
                b = a - dr * w + dc
                if 0 <= b <= a:
                    mask[a, b] = True
    return mask


def test_raster_conv_mask_sees_the_same_61_keys_everywhere_at_32x32():
    raster = tr.image_mask("conv", 32, 32, 11)
    np.testing.assert_array_equal(raster, _conv_keys_by_loop(32, 32, 11))
    counts = raster.sum(1)
    # 5 rows of 11 above and the 6 ending at the query, once the offsets fit the grid.
    assert (counts[5 * 32 + 5:] == 61).all()
    assert counts.max() == 61
    # The column-wrapping reading sees 56 keys in the first column, 66 in the last.
    wrapped = tr.image_mask("conv", 32, 32, 11, "wrap_columns").sum(1)[5 * 32:]
    assert (wrapped.min(), wrapped.max()) == (56, 66)
    with pytest.raises(ValueError, match="conv_mask must be one of"):
        tr.image_mask("conv", 4, 4, 3, "torus")
    with pytest.raises(ValueError, match="conv_mask must be one of"):
        tr.TransformerConfig(conv_mask="torus")


def test_stream_mask_text_and_image_blocks():
    mask = tr.attention_mask("row", TEXT_LEN, H, W, 3)
    assert mask.shape == (TEXT_LEN + H * W,) * 2
    np.testing.assert_array_equal(mask[:TEXT_LEN, :TEXT_LEN], np.tril(np.ones((6, 6), bool)))
    assert not mask[:TEXT_LEN, TEXT_LEN:].any()  # text never sees the image
    assert mask[TEXT_LEN:, :TEXT_LEN].all()  # every image position sees all text


def test_paper_layer_schedule():
    assert tr.dalle_layer_schedule(8) == ("row", "column", "row", "row", "row", "column",
                                          "row", "conv")
    schedule = tr.dalle_layer_schedule(64)
    assert schedule[-1] == "conv" and schedule.count("column") == 16
    with pytest.raises(ValueError, match="3 kinds for 4 layers"):
        tr.layer_schedule(["row", "row", "dense"], 4)
    with pytest.raises(ValueError, match="unknown attention kind 'diagonal'"):
        tr.layer_schedule(["row", "row", "dense", "diagonal"], 4)


@pytest.fixture(scope="module")
def small():
    model = tr.Transformer(SMALL)
    rng = np.random.default_rng(0)
    text = rng.integers(1, SMALL.text_vocab_size, (3, TEXT_LEN)).astype(np.int32)
    text[:, 4:] = 0  # padding at the end of each caption
    image = rng.integers(0, SMALL.image_vocab_size, (3, H * W)).astype(np.int32)
    variables = model.init(jax.random.key(0), text, image)
    params = nn.unbox(variables["params"])
    return model, params, jnp.asarray(text), jnp.asarray(image)


def test_two_heads_and_shapes(small):
    model, params, text, image = small
    text_logits, image_logits = model.apply({"params": params}, text, image)
    assert text_logits.shape == (3, TEXT_LEN - 1, SMALL.text_vocab_size)
    assert image_logits.shape == (3, H * W, SMALL.image_vocab_size)
    assert text_logits.dtype == image_logits.dtype == jnp.float32
    # Separate heads: text positions only have text-vocabulary outputs and image
    # positions only image-vocabulary outputs.
    assert params["text_head"]["kernel"].shape == (SMALL.d_model, SMALL.text_vocab_size)
    assert params["image_head"]["kernel"].shape == (SMALL.d_model, SMALL.image_vocab_size)
    # Layers are stacked on a leading axis (scanned), not unrolled.
    assert params["layers"]["query"]["kernel"].shape[0] == SMALL.num_layers


def test_per_position_pad_embedding(small):
    model, params, text, image = small
    base = model.apply({"params": params}, text, image)[1]
    # The token-embedding row of the pad id is never used.
    changed = jax.tree.map(lambda x: x, params)
    changed["text_embedding"] = params["text_embedding"].at[0].add(
        jax.random.normal(jax.random.key(7), (SMALL.d_model,)))
    np.testing.assert_array_equal(model.apply({"params": changed}, text, image)[1], base)
    # Each padded position uses its own learned vector: changing position 4's moves
    # what position 4 predicts; position 3 holds a real token, so changing its pad
    # vector changes nothing.
    text_base = model.apply({"params": params}, text, image)[0]
    for position, moves in ((4, True), (3, False)):
        changed = dict(params)
        # (a random direction: LayerNorm would erase a constant shift)
        changed["text_pad_embedding"] = params["text_pad_embedding"].at[position].add(
            jax.random.normal(jax.random.key(position), (SMALL.d_model,)))
        out = model.apply({"params": changed}, text, image)[0]
        if moves:
            assert float(jnp.max(jnp.abs(out[:, 4] - text_base[:, 4]))) > 1e-3
            np.testing.assert_array_equal(out[:, :4], text_base[:, :4])  # causal
        else:
            np.testing.assert_array_equal(out, text_base)


@pytest.mark.slow
def test_image_position_embedding_is_row_plus_column_on_a_non_square_grid():
    # 3 rows of 5: with one-hot row and column vectors, the input at image position a
    # shows which row and which column embedding it received.
    cfg = dataclasses.replace(SMALL, image_height=3, image_width=5)
    model = tr.Transformer(cfg)
    text = jnp.ones((1, TEXT_LEN), jnp.int32)
    image = jnp.zeros((1, 15), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), text, image)["params"])
    eye = np.eye(cfg.d_model, dtype=np.float32)
    params = dict(params, image_row_embedding=eye[:3], image_column_embedding=eye[3:8],
                  image_embedding=np.zeros_like(params["image_embedding"]),
                  start_of_image_embedding=np.zeros_like(params["start_of_image_embedding"]))
    embed = lambda module, t, i: module._embed_stream(t, i)  # pylint: disable=protected-access
    x = np.asarray(model.apply({"params": params}, text, image, method=embed))[0, TEXT_LEN:]
    cells = [(row, col) for row in range(3) for col in range(5)]  # raster order
    for a, (row, col) in enumerate(cells):
        np.testing.assert_array_equal(x[a], eye[row] + eye[3 + col], err_msg=f"position {a}")


def test_image_positions_do_not_see_the_future(small):
    model, params, text, image = small
    base = model.apply({"params": params}, text, image)[1]
    later = image.at[:, 9].set((image[:, 9] + 1) % SMALL.image_vocab_size)
    out = model.apply({"params": params}, text, later)[1]
    # Position a predicts token a from tokens < a: changing token 9 moves only a ≥ 10.
    np.testing.assert_allclose(out[:, :10], base[:, :10], atol=1e-6)
    assert float(jnp.max(jnp.abs(out[:, 10:] - base[:, 10:]))) > 1e-4


@pytest.mark.slow
def test_loss_weighting_on_a_hand_computed_example():
    text_logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]]))  # B=1, T−1=2
    text = jnp.array([[2, 1, 0]])  # targets: 1, then pad (excluded)
    image_logits = jnp.log(jnp.array([[[0.1, 0.9], [0.5, 0.5], [0.8, 0.2]]]))
    codes = jnp.array([[1, 0, 0]])
    loss, m = stage2.sequence_loss(text_logits, image_logits, text, codes, jnp.ones((1,)),
                                   text_weight=0.125, image_weight=0.875)
    text_loss = -math.log(0.25)
    image_loss = -(math.log(0.9) + math.log(0.5) + math.log(0.8)) / 3
    assert float(m["text_loss"]) == pytest.approx(text_loss, rel=1e-6)
    assert float(m["image_loss"]) == pytest.approx(image_loss, rel=1e-6)
    assert float(m["bits_per_image_token"]) == pytest.approx(image_loss / math.log(2), rel=1e-6)
    assert float(loss) == pytest.approx(0.125 * text_loss + 0.875 * image_loss, rel=1e-6)
    # Each kind is normalised by its own count over the batch; padding rows count for
    # nothing.
    two = stage2.sequence_loss(
        jnp.concatenate([text_logits, text_logits]), jnp.concatenate([image_logits] * 2),
        jnp.array([[2, 1, 0], [2, 1, 1]]), jnp.concatenate([codes, codes]),
        jnp.array([1.0, 0.0]), text_weight=0.125, image_weight=0.875)[1]
    assert float(two["text_loss"]) == pytest.approx(text_loss, rel=1e-6)
    assert float(two["text_tokens"]) == 1.0


@pytest.mark.parametrize("attention, kernel, conv_mask, grid", [
    pytest.param("dense", 3, "raster", (4, 4), marks=pytest.mark.slow),
    ("dalle", 3, "raster", (4, 4)),
    ("dalle", 3, "wrap_columns", (4, 4)),
    # k = 5 on a 4x4 grid: windows clipped at the top of the grid.
    (("conv", "column", "row", "dense"), 5, "raster", (4, 4)),
    pytest.param(("conv", "column", "row", "dense"), 5, "wrap_columns", (4, 4),
                 marks=pytest.mark.slow),
    (("conv", "column", "row", "conv"), 3, "raster", (3, 5)),
])
def test_cached_decoding_matches_the_full_pass_at_every_step(attention, kernel, conv_mask,
                                                             grid):
    cfg = dataclasses.replace(SMALL, attention=attention, conv_kernel=kernel,
                              conv_mask=conv_mask, image_height=grid[0], image_width=grid[1])
    n = cfg.image_len
    model = tr.Transformer(cfg)
    rng = np.random.default_rng(1)
    text = jnp.asarray(rng.integers(0, cfg.text_vocab_size, (2, TEXT_LEN)), jnp.int32)
    image = jnp.asarray(rng.integers(0, cfg.image_vocab_size, (2, n)), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(2), text, image)["params"])
    full = jax.jit(model.apply)({"params": params}, text, image)[1]
    layer_params = tr.decode_params(params, cfg)
    decode = jax.jit(lambda c, tok, a: model.apply({"params": layer_params}, tok, c, a,
                                                   method="decode"))
    prefill = jax.jit(lambda t, i: model.apply({"params": params}, t, i, method="prefill"))
    for primed in (0, 5):  # prefill with the text only, and with some image positions
        _, prefill_logits, cache = prefill(text, image[:, :primed])
        np.testing.assert_allclose(prefill_logits, full[:, :primed], atol=1e-5)
        cache = tr.decode_cache(cache, cfg)
        for a in range(primed, n):
            previous = image[:, a - 1] if a else jnp.zeros((2,), jnp.int32)
            logits, cache = decode(cache, previous, a)
            np.testing.assert_allclose(logits, full[:, a], atol=1e-5,
                                       err_msg=f"{attention}: position {a}")


def test_unscanned_layers_compute_what_the_scan_computes(small):
    model, params, text, image = small
    cfg = dataclasses.replace(model.config, scan_layers=False)
    unscanned = tr.Transformer(cfg)
    abstract = jax.eval_shape(unscanned.init, jax.random.key(0), text, image)["params"]
    assert "layers" not in abstract and f"layer_{cfg.num_layers - 1}" in abstract
    layer_params = tr.decode_params(params, model.config)  # the stack split per layer
    assert jax.tree.structure(nn.unbox(abstract)) == jax.tree.structure(layer_params)
    expected = model.apply({"params": params}, text, image, method="prefill")
    got = unscanned.apply({"params": layer_params}, text, image, method="prefill")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, expected)
    assert tr.decode_params(layer_params, cfg) is layer_params


@pytest.mark.parametrize("kind, conv_mask", [(k, "raster") for k in tr.ATTENTION_KINDS]
                         + [("conv", "wrap_columns")])
@pytest.mark.parametrize("grid,kernel", [((4, 4), 3), ((4, 4), 11), ((5, 7), 5), ((1, 6), 3),
                                         ((32, 32), 11)])
def test_decode_windows_read_only_what_the_mask_allows(kind, conv_mask, grid, kernel):
    h, w = grid
    window = tr.decode_window(kind, h, w, kernel, conv_mask)
    mask = tr.image_mask(kind, h, w, kernel, conv_mask)
    half = kernel // 2
    expected_size = {"dense": h * w, "row": min(w + 1, h * w), "column": h,
                     "conv": min(half * w + half + 1, h * w) if conv_mask == "raster"
                     else min(half + 1, h) * w}[kind]
    assert window.size == expected_size
    for a in range(h * w):
        keys = window.start[a] + window.stride * np.arange(window.size)
        assert keys.min() >= 0 and keys.max() < h * w
        visible = set(np.flatnonzero(mask[a]))
        assert set(keys[window.allowed[a]]) == visible  # every visible key, nothing else
        assert a in visible


@pytest.mark.parametrize("scan_layers", [True, False])
def test_sharded_forward_equals_single_device(small, scan_layers):
    model, params, text, image = small
    expected = model.apply({"params": params}, text, image)
    if not scan_layers:
        model = tr.Transformer(dataclasses.replace(model.config, scan_layers=False))
        params = tr.decode_params(params, SMALL)
    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2, dcn_data=1)))
    rules = defaults.DEFAULT_RULES
    abstract = jax.eval_shape(model.init, jax.random.key(0), text, image)["params"]
    shardings = sharding_lib.logical_shardings(abstract, mesh, rules)
    sharded = jax.device_put(params, shardings)
    batch = sharding_lib.batch_sharding(mesh)
    text8 = jnp.tile(text, (8, 1))[:8]
    image8 = jnp.tile(image, (8, 1))[:8]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = jax.jit(lambda p, t, i: model.apply({"params": p}, t, i))(
            sharded, jax.device_put(text8, batch), jax.device_put(image8, batch))
    # The query projection really is split over the tensor axis.
    if scan_layers:
        assert sharded["layers"]["query"]["kernel"].sharding.spec[2] == "tensor"
    else:
        assert sharded["layer_0"]["query"]["kernel"].sharding.spec[1] == "tensor"
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g)[:3], e, atol=1e-5)


def test_the_12b_photos_config_builds_abstractly_and_shards():
    config = config_lib.load_config_file(os.path.join(REPO, "configs", "transformer_photos.py"))
    cfg = stage2.model_config(config)
    assert cfg.schedule == tr.dalle_layer_schedule(64)
    assert (cfg.conv_kernel, cfg.conv_mask) == (11, "raster")
    # The paper's schedule: warm-up to 4.5e-4 over 5000 updates, then five halvings.
    lr = optimizer_lib.learning_rate_schedule(config.optimizer, config.total_steps)
    assert float(lr(5_000)) == pytest.approx(4.5e-4)
    rates = [float(lr(step)) for step in range(5_000, config.total_steps, 1_000)]
    assert sorted(set(rates), reverse=True) == pytest.approx([4.5e-4 / 2 ** i for i in range(6)])
    assert rates == sorted(rates, reverse=True)
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.d_model) == (64, 62, 64, 3968)
    assert (cfg.text_len, cfg.text_vocab_size, cfg.image_len, cfg.image_vocab_size) == (
        256, 16384, 1024, 8192)
    model = tr.Transformer(cfg)
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jnp.zeros((1, 256), jnp.int32), jnp.zeros((1, 1024), jnp.int32))
    count = sum(x.size for x in jax.tree.leaves(nn.unbox(abstract["params"])))
    assert 12.0e9 < count < 12.4e9, count
    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2, dcn_data=1)))
    shardings = sharding_lib.logical_shardings(abstract["params"], mesh,
                                               defaults.DEFAULT_RULES)
    sizes = dict(jax.tree_util.tree_flatten_with_path(
        jax.tree.map(lambda a: a.size, nn.unbox(abstract["params"])))[0])
    # Every large array is split over both the fsdp and the tensor axis.
    for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]:
        if sizes[path] > 4 << 20:
            axes = {a for s in sharding.spec if s for a in (s if isinstance(s, tuple) else (s,))}
            assert axes == {"fsdp", "tensor"}, (jax.tree_util.keystr(path), sharding.spec)
    flops = cfg.flops_per_example(train=True)
    assert flops == pytest.approx(6 * count * cfg.seq_len, rel=0.2)


def _lowered(cfg, batch=2):
    model = tr.Transformer(cfg)
    text = jnp.zeros((batch, cfg.text_len), jnp.int32)
    image = jnp.zeros((batch, cfg.image_len), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), text, image)
    return jax.jit(lambda v, t, i: model.apply(v, t, i)).lower(abstract, text, image)


def _flops(lowered):
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]


def test_masked_attention_costs_what_dense_attention_costs():
    dense = _flops(_lowered(tr.TransformerConfig(**{**SMALL.__dict__, "attention": "dense"})))
    paper = _flops(_lowered(SMALL))
    assert paper <= dense * 1.01, (paper, dense)


def test_compiled_program_does_not_grow_with_depth():
    # Layers are one scanned body: 2 and 16 layers lower to programs of the same size.
    two = _lowered(tr.TransformerConfig(**{**SMALL.__dict__, "num_layers": 2})).as_text()
    sixteen = _lowered(tr.TransformerConfig(**{**SMALL.__dict__, "num_layers": 16})).as_text()
    assert len(sixteen) < 1.1 * len(two), (len(two), len(sixteen))


def test_remat_keeps_gradients_and_bf16_keeps_fp32_logits(small):
    _, params, text, image = small

    def grads(cfg):
        model = tr.Transformer(cfg)

        def loss(p):
            _, logits = model.apply({"params": p}, text, image)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
                logits, image[..., None], -1)[..., 0])
        return jax.jit(jax.grad(loss))(params)

    plain = grads(SMALL)
    remat = grads(tr.TransformerConfig(**{**SMALL.__dict__, "remat_policy": "full"}))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, remat)
    bf16 = tr.Transformer(tr.TransformerConfig(**{**SMALL.__dict__, "dtype": jnp.bfloat16}))
    text_logits, image_logits = bf16.apply({"params": params}, text, image)
    assert text_logits.dtype == image_logits.dtype == jnp.float32
    full = tr.Transformer(SMALL).apply({"params": params}, text, image)[1]
    np.testing.assert_allclose(image_logits, full, atol=0.05)


def test_remat_policies_by_name():
    # (That models import nothing from train/ is tests/test_package.py's check.)
    assert remat.policy("none") is None
    assert remat.policy("dots") is jax.checkpoint_policies.checkpoint_dots
    with pytest.raises(ValueError, match=r"remat_policy must be one of \['dots', "):
        remat.policy("sometimes")
    with pytest.raises(ValueError, match="remat_policy must be one of"):
        tr.Transformer(dataclasses.replace(SMALL, remat_policy="sometimes")).init(
            jax.random.key(0), jnp.zeros((1, TEXT_LEN), jnp.int32),
            jnp.zeros((1, H * W), jnp.int32))
