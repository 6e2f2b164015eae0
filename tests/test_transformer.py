"""Stage 2: the transformer's masks, embeddings, heads, loss, cache and sharding."""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dalle_jax.models import transformer as tr
from dalle_jax.stages import transformer as stage2
from dalle_jax.train import defaults
from dalle_jax.train import sharding as sharding_lib

TEXT_LEN, H, W = 6, 4, 4
SMALL = tr.TransformerConfig(text_vocab_size=50, text_len=TEXT_LEN, image_vocab_size=40,
                             image_height=H, image_width=W, num_layers=4, num_heads=2,
                             head_dim=8, attention="dalle", conv_kernel=3)


def _visible(kind, a, k=3):
    return set(np.flatnonzero(tr.image_mask(kind, H, W, k)[a]).tolist())


def test_image_masks_on_a_4x4_grid():
    # Row: the previous w + 1 = 5 positions including itself; the farthest is the same
    # column of the previous row, and the window wraps around the row's start.
    assert _visible("row", 10) == {6, 7, 8, 9, 10}
    assert _visible("row", 8) == {4, 5, 6, 7, 8}
    assert _visible("row", 2) == {0, 1, 2}
    # Column: earlier positions of its own column.
    assert _visible("column", 10) == {2, 6, 10}
    assert _visible("column", 3) == {3}
    # Causal 3x3 convolution: the row above (three columns) and the left neighbour.
    assert _visible("conv", 10) == {5, 6, 7, 9, 10}
    # ... wrapping around the grid's left edge to the last column of the row above.
    assert _visible("conv", 8) == {4, 5, 7, 8}
    assert _visible("dense", 5) == set(range(6))
    for kind in tr.ATTENTION_KINDS:  # every pattern is causal and sees itself
        mask = tr.image_mask(kind, H, W, 3)
        assert not np.triu(mask, 1).any()
        assert mask.diagonal().all()


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


def test_image_positions_do_not_see_the_future(small):
    model, params, text, image = small
    base = model.apply({"params": params}, text, image)[1]
    later = image.at[:, 9].set((image[:, 9] + 1) % SMALL.image_vocab_size)
    out = model.apply({"params": params}, text, later)[1]
    # Position a predicts token a from tokens < a: changing token 9 moves only a ≥ 10.
    np.testing.assert_allclose(out[:, :10], base[:, :10], atol=1e-6)
    assert float(jnp.max(jnp.abs(out[:, 10:] - base[:, 10:]))) > 1e-4


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


@pytest.mark.parametrize("attention", ["dense", "dalle", ("conv", "column", "row", "dense")])
def test_cached_decoding_matches_the_full_pass_at_every_step(attention):
    # conv_kernel 5 on the 4x4 grid: a 3-row conv window, clipped at the top of the grid.
    cfg = tr.TransformerConfig(**{**SMALL.__dict__, "attention": attention,
                                  "conv_kernel": 3 if attention == "dalle" else 5})
    model = tr.Transformer(cfg)
    rng = np.random.default_rng(1)
    text = jnp.asarray(rng.integers(0, cfg.text_vocab_size, (2, TEXT_LEN)), jnp.int32)
    image = jnp.asarray(rng.integers(0, cfg.image_vocab_size, (2, H * W)), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(2), text, image)["params"])
    full = model.apply({"params": params}, text, image)[1]
    for primed in (0, 5):  # prefill with the text only, and with some image positions
        _, prefill_logits, cache = model.apply({"params": params}, text, image[:, :primed],
                                               mode="prefill")
        np.testing.assert_allclose(prefill_logits, full[:, :primed], atol=1e-5)
        cache = tr.decode_cache(cache, cfg)
        layer_params = tr.decode_params(params, cfg)
        decode = jax.jit(lambda c, tok, a: model.apply({"params": layer_params}, None, tok,
                                                       mode="decode", cache=c, position=a))
        for a in range(primed, H * W):
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
    expected = model.apply({"params": params}, text, image, mode="prefill")
    got = unscanned.apply({"params": layer_params}, text, image, mode="prefill")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, expected)
    assert tr.decode_params(layer_params, cfg) is layer_params


@pytest.mark.parametrize("kind", tr.ATTENTION_KINDS)
@pytest.mark.parametrize("grid,kernel", [((4, 4), 3), ((4, 4), 11), ((5, 7), 5), ((1, 6), 3)])
def test_decode_windows_read_only_what_the_mask_allows(kind, grid, kernel):
    h, w = grid
    window = tr.decode_window(kind, h, w, kernel)
    mask = tr.image_mask(kind, h, w, kernel)
    expected_size = {"dense": h * w, "row": min(w + 1, h * w), "column": h,
                     "conv": min(kernel // 2 + 1, h) * w}[kind]
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


def test_the_12b_preset_builds_abstractly_and_shards():
    from configs import transformer_shapes  # pylint: disable=g-import-not-at-top
    config = transformer_shapes.get_config("size=12b")
    cfg = stage2.model_config(config)
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
