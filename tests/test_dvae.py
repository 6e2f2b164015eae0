"""The dVAE modules: released sizes and names, shapes, init, pixel mapping, input checks."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.models import dvae

SMALL_ENCODER = dvae.Encoder(n_hid=16, vocab_size=64)
SMALL_DECODER = dvae.Decoder(n_init=8, n_hid=16)


def _abstract_params(module: nn.Module, input_shape: tuple[int, ...]):
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(input_shape))
    return nn.unbox(variables["params"])


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def random_params(module: nn.Module, input_shape: tuple[int, ...], seed: int = 0):
    """Release-like random params drawn in numpy (XLA:CPU takes seconds to compile init)."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if leaf.ndim == 1:  # biases: small but nonzero, so that they are exercised
            return jnp.asarray(rng.normal(0, 0.01, leaf.shape), jnp.float32)
        fan_in = np.prod(leaf.shape[:3])
        return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape), jnp.float32)

    return jax.tree.map(draw, _abstract_params(module, input_shape))


@pytest.fixture(scope="module")
def small_params():
    return (random_params(SMALL_ENCODER, (1, 64, 64, 3), 0),
            random_params(SMALL_DECODER, (1, 8, 8, 64), 1))


def test_parameter_counts_match_the_release():
    assert _count(_abstract_params(dvae.Encoder(), (1, 256, 256, 3))) == 53_786_240
    assert _count(_abstract_params(dvae.Decoder(), (1, 32, 32, 8192))) == 43_829_766


def test_output_shapes_and_downsample_factor():
    assert dvae.downsample_factor(4) == 8
    out = jax.eval_shape(
        lambda x: SMALL_ENCODER.init_with_output(jax.random.key(0), x)[0],
        jnp.zeros((2, 64, 64, 3)))
    assert out.shape == (2, 8, 8, 64) and out.dtype == jnp.float32
    out = jax.eval_shape(
        lambda z: SMALL_DECODER.init_with_output(jax.random.key(0), z)[0],
        jnp.zeros((2, 8, 8, 64)))
    assert out.shape == (2, 64, 64, 6) and out.dtype == jnp.float32
    # Three groups: downsample 4.
    encoder = dvae.Encoder(n_hid=8, group_count=3, vocab_size=32)
    out = jax.eval_shape(lambda x: encoder.init_with_output(jax.random.key(0), x)[0],
                         jnp.zeros((1, 32, 32, 3)))
    assert out.shape == (1, 8, 8, 32)


def test_bf16_compute_keeps_fp32_params_and_outputs(small_params):
    encoder = dvae.Encoder(n_hid=16, vocab_size=64, dtype=jnp.bfloat16)
    variables = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
    logits = jax.jit(encoder.apply)({"params": small_params[0]}, jnp.zeros((1, 64, 64, 3)))
    assert logits.dtype == jnp.float32


def test_post_gain():
    assert dvae.post_gain(4, 2) == 1 / 64


def test_param_names_and_id_paths_mirror_the_release():
    encoder = _abstract_params(dvae.Encoder(), (1, 256, 256, 3))
    decoder = _abstract_params(dvae.Decoder(), (1, 32, 32, 8192))
    for params in (encoder, decoder):
        assert set(params) == {"input", "group_1", "group_2", "group_3", "group_4", "output"}
        assert set(params["output"]) == {"conv"}
        assert set(params["group_1"]["block_1"]["res_path"]) == {
            "conv_1", "conv_2", "conv_3", "conv_4"}
    with_id = lambda params: {  # noqa: E731
        (g, b) for g in range(1, 5) for b in (1, 2)
        if "id_path" in params[f"group_{g}"][f"block_{b}"]}
    assert with_id(encoder) == {(2, 1), (3, 1), (4, 1)}
    assert with_id(decoder) == {(1, 1), (2, 1), (3, 1), (4, 1)}
    # Kernel sizes and shapes (HWIO) of the residual paths.
    res = encoder["group_2"]["block_1"]["res_path"]
    assert [res[f"conv_{i}"]["kernel"].shape for i in range(1, 5)] == [
        (3, 3, 256, 128), (3, 3, 128, 128), (3, 3, 128, 128), (1, 1, 128, 512)]
    res = decoder["group_1"]["block_1"]["res_path"]
    assert [res[f"conv_{i}"]["kernel"].shape[:2] for i in range(1, 5)] == [
        (1, 1), (3, 3), (3, 3), (3, 3)]
    assert encoder["input"]["kernel"].shape == (7, 7, 3, 256)
    assert decoder["output"]["conv"]["kernel"].shape == (1, 1, 256, 6)


def test_params_carry_logical_axis_names():
    variables = jax.eval_shape(SMALL_ENCODER.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    boxed = variables["params"]["group_2"]["block_1"]["id_path"]
    assert boxed["kernel"].names == (None, None, "conv_in", "conv_out")
    assert boxed["bias"].names == ("conv_out",)


def test_conv_init_statistics():
    encoder = dvae.Encoder(n_hid=128, n_blk_per_group=1, group_count=1, vocab_size=8)
    params = nn.unbox(jax.jit(encoder.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    params = params["params"]
    kernel = np.asarray(params["group_1"]["block_1"]["res_path"]["conv_2"]["kernel"])
    fan_in = np.prod(kernel.shape[:3])  # 3·3·32
    assert abs(kernel.mean()) < 0.1 / np.sqrt(fan_in)
    assert kernel.std() == pytest.approx(1 / np.sqrt(fan_in), rel=0.05)
    assert np.abs(kernel).max() > 3 / np.sqrt(fan_in)  # a plain normal, not truncated at 2σ
    assert not np.asarray(params["input"]["bias"]).any()


@pytest.mark.slow
def test_max_pool_matches_flax_and_routes_the_gradient_to_the_maximum():
    x = jax.random.normal(jax.random.key(0), (2, 6, 8, 3))
    np.testing.assert_array_equal(dvae.max_pool_2x2(x),
                                  nn.max_pool(x, (2, 2), strides=(2, 2)))
    grad = jax.grad(lambda x: dvae.max_pool_2x2(x).sum())(x)
    winners = x == jnp.repeat(jnp.repeat(dvae.max_pool_2x2(x), 2, 1), 2, 2)
    np.testing.assert_array_equal(grad, winners.astype(grad.dtype))
    # Ties share the gradient: a window of four equal values gives each a quarter, and
    # one whose two largest are equal gives each of them half.
    ties = jnp.array([[1.0, 1.0, 0.0, 3.0], [1.0, 1.0, 3.0, 2.0]]).reshape(1, 2, 4, 1)
    grad = jax.grad(lambda x: dvae.max_pool_2x2(x).sum())(ties)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[0.25, 0.25, 0, 0.5], [0.25, 0.25, 0.5, 0]])


def test_pointwise_convs_compute_what_a_1x1_conv_computes():
    layer = dvae.conv(5, 1, jnp.float32, jnp.float32, "c")
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    params = nn.unbox(layer.init(jax.random.key(2), x)["params"])
    params["bias"] = jnp.arange(5.0)
    assert params["kernel"].shape == (1, 1, 3, 5)
    expected = nn.Conv(5, (1, 1)).apply({"params": params}, x)
    np.testing.assert_allclose(layer.apply({"params": params}, x), expected, atol=1e-6)


def test_map_unmap_round_trip():
    x = jnp.linspace(0, 1, 101)
    mapped = dvae.map_pixels(x)
    assert float(mapped.min()) == pytest.approx(0.1) and float(mapped.max()) == pytest.approx(0.9)
    np.testing.assert_allclose(dvae.unmap_pixels(mapped), x, atol=1e-6)
    assert float(dvae.unmap_pixels(jnp.array(0.0))) == 0.0  # clipped
    assert float(dvae.unmap_pixels(jnp.array(1.0))) == 1.0


def test_in_chunks_keeps_every_example_on_its_device():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = jax.device_put(jnp.arange(8 * 6 * 5, dtype=jnp.float32).reshape(48, 5), sharding)

    def per_example(x):  # one output row per input row, and a second output
        return {"sum": x.sum(-1), "scaled": x * 2 + 1}

    expected = per_example(x)
    chunked = jax.jit(lambda x: dvae.in_chunks(per_example, x, 2, num_shards=8))
    out = chunked(x)
    np.testing.assert_array_equal(out["sum"], expected["sum"])
    np.testing.assert_array_equal(out["scaled"], expected["scaled"])
    hlo = chunked.lower(x).compile().as_text()
    assert " while(" in hlo  # three chunks per device, one after another
    for collective in ("all-gather", "all-to-all", "all-reduce", "collective-permute"):
        assert collective not in hlo, collective
    assert out["sum"].sharding.spec == sharding.spec
    with pytest.raises(ValueError, match="chunk size 4 does not divide the 6 examples"):
        dvae.in_chunks(per_example, x, 4, num_shards=8)
    with pytest.raises(ValueError, match="batch 48 does not split into 5 shards"):
        dvae.in_chunks(per_example, x, 1, num_shards=5)
    assert dvae.in_chunks(per_example, x, 0)["sum"].shape == (48,)
