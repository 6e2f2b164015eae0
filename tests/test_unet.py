"""The diffusion U-Net: shapes, conditioning, zero init, remat, bf16, sharding."""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dalle_jax.models import unet
from dalle_jax.train import defaults
from dalle_jax.train import sharding as sharding_lib

B, H, W, COND, CONTEXT = 2, 16, 16, 3, 8
# Attention at level 1 (and so in the middle): 32 channels in 8 heads of 4. Every axis a
# logical name shards splits over a tensor axis of 4.
SMALL = unet.UNetConfig(base_width=16, channel_mult=(1, 2), num_res_blocks=1,
                        attention_levels=(1,), head_dim=4, num_groups=8,
                        noise_level_cond=True, context_dim=CONTEXT)
# One level, no conditioning but the image: five residual blocks, quick to compile.
TINY = unet.UNetConfig(base_width=16, channel_mult=(1,), num_res_blocks=1, num_groups=8)


def _inputs(h=H, w=W, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    return dict(z=jax.random.normal(k[0], (B, h, w, 3)),
                logsnr=jax.random.uniform(k[1], (B,), minval=-10, maxval=10),
                cond_image=jax.random.normal(k[2], (B, h, w, COND)),
                noise_level=jax.random.uniform(k[3], (B,), minval=0, maxval=5),
                context=jax.random.normal(k[4], (B, CONTEXT)))


def _init_fn(cfg, inputs):
    args = dict(inputs)
    z, logsnr = args.pop("z"), args.pop("logsnr")
    # An rbg key: its initialisers compile a few times faster on the CPU than threefry's.
    return lambda: unet.UNet(cfg).init(jax.random.key(0, impl="rbg"), z, logsnr, **args)


@functools.cache  # one compiled function per configuration for the whole module
def _apply(cfg, train=False):
    model = unet.UNet(cfg)

    @jax.jit
    def apply(params, inputs, rng=None):
        args = dict(inputs)
        return model.apply({"params": params}, args.pop("z"), args.pop("logsnr"), **args,
                           train=train, rngs=None if rng is None else {"dropout": rng})
    return apply


def _perturb(params, only_zero=True, seed=1):
    """Gaussian noise (std 0.1) on every all-zero leaf (or on every leaf)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x if only_zero and np.any(np.asarray(x))
        else x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), params)


def _random_params(cfg, inputs):
    """Parameters of the right shapes, all random, without compiling an init."""
    abstract = nn.unbox(jax.eval_shape(_init_fn(cfg, inputs))["params"])
    return _perturb(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract),
                    only_zero=False)


def _mesh():
    return sharding_lib.make_mesh(ml_collections.ConfigDict(
        dict(data=2, fsdp=1, tensor=4, dcn_data=1)))


@pytest.fixture(scope="module")
def small():
    """SMALL's variables from a jitted init laid out by the logical rules on a
    (data 2, fsdp 1, tensor 4) mesh, and its parameters copied to the host (what the
    other tests run on one device): one init compiled for the whole module."""
    inputs = _inputs()
    init = _init_fn(SMALL, inputs)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(jax.eval_shape(init)),
                                            _mesh(), defaults.DEFAULT_RULES)
    variables = jax.jit(init, out_shardings=shardings)()
    return variables, jax.device_get(nn.unbox(variables["params"])), inputs


def _diff(a, b):
    return float(jnp.max(jnp.abs(a - b)))


def test_shape_dtype_and_any_size_with_the_same_params(small):
    _, params, inputs = small
    out = _apply(SMALL)(params, inputs)
    assert out.shape == (B, H, W, 3) and out.dtype == jnp.float32
    # Without attention the parameters are those of SMALL less its *_attn entries, and
    # nothing depends on H or W: parameters made at 16×16 run at 32×24.
    local = dataclasses.replace(SMALL, attention_levels=())
    local_params = {k: v for k, v in _perturb(params).items() if "attn" not in k}
    bigger = _apply(local)(local_params, _inputs(32, 24))
    assert bigger.shape == (B, 32, 24, 3) and bigger.dtype == jnp.float32
    assert np.all(np.isfinite(bigger)) and np.any(np.asarray(bigger))


def test_every_parameter_is_boxed_with_known_logical_names(small):
    variables, _, _ = small
    known = {name for name, _ in defaults.DEFAULT_RULES}
    boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(boxes) > 30
    for box in boxes:
        assert isinstance(box, nn.LogicallyPartitioned), type(box)
        assert len(box.names) == box.value.ndim
        assert set(box.names) - {None} <= known, box.names


def test_zero_at_init_blocks_are_identity_and_every_input_conditions(small):
    _, params, inputs = small
    apply = _apply(SMALL)
    assert not np.any(np.asarray(apply(params, inputs)))  # exactly zero: the zero out conv

    def changed(p, **change):
        return _diff(apply(p, inputs), apply(p, {**inputs, **change}))

    other = dict(logsnr=inputs["logsnr"] + 3.0, noise_level=inputs["noise_level"] + 1.0,
                 context=-inputs["context"], cond_image=-inputs["cond_image"])
    # Only the final conv perturbed: every block and projection still adds zero, so the
    # output sees the pixels but no embedding.
    out_only = dict(params, out_conv=_perturb(params["out_conv"]))
    assert changed(out_only, cond_image=other["cond_image"]) > 1e-3
    for name in ("logsnr", "noise_level", "context"):
        assert changed(out_only, **{name: other[name]}) == 0.0, name
    perturbed = _perturb(params)
    for name, value in other.items():
        assert changed(perturbed, **{name: value}) > 1e-3, name


def test_missing_or_unexpected_inputs_and_bad_sizes_raise(small):
    _, params, inputs = small
    model = unet.UNet(SMALL)

    def run(cfg=SMALL, **change):
        args = {**inputs, **change}
        args = {k: v for k, v in args.items() if v is not None}
        jax.eval_shape(lambda p: unet.UNet(cfg).apply(
            {"params": p}, args.pop("z"), args.pop("logsnr"), **args), params)

    with pytest.raises(ValueError, match="noise_level_cond is set: pass noise_level"):
        run(noise_level=None)
    with pytest.raises(ValueError, match=r"context_dim is 8: pass context \[B, 8\]"):
        run(context=None)
    with pytest.raises(ValueError, match=r"context must be \[2, 8\]"):
        run(context=jnp.zeros((B, CONTEXT + 1)))
    plain = dataclasses.replace(SMALL, noise_level_cond=False, context_dim=0)
    with pytest.raises(ValueError, match="noise_level given, but"):
        run(plain, context=None)
    with pytest.raises(ValueError, match="context given, but"):
        run(plain, noise_level=None)
    with pytest.raises(ValueError, match="multiples of 2"):
        run(**{k: v for k, v in _inputs(H, W - 1).items() if k != "context"})
    with pytest.raises(ValueError, match="cond_image"):
        run(cond_image=jnp.zeros((B, H // 2, W // 2, COND)))
    assert model.config.time_embed_dim == 64
    assert unet.min_size_multiple(unet.UNetConfig()) == 8
    with pytest.raises(ValueError, match="attention_levels"):
        unet.UNetConfig(channel_mult=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="remat_policy"):
        unet.UNetConfig(remat_policy="sometimes")


def test_remat_keeps_outputs_and_gradients_with_dropout():
    inputs = {k: v for k, v in _inputs(8, 8).items() if k in ("z", "logsnr", "cond_image")}
    # No blocks on the way down: the middle two and one up block (with a 1×1 skip conv).
    cfg = dataclasses.replace(TINY, dropout=0.2, num_res_blocks=0)
    params = _random_params(cfg, inputs)
    rngs = jax.random.split(jax.random.key(3, impl="rbg"))

    def value_and_grad(cfg):
        apply = _apply(cfg, train=True)
        return jax.jit(jax.value_and_grad(
            lambda p, rng: jnp.mean(apply(p, inputs, rng) ** 2)))

    remat_cfg = dataclasses.replace(cfg, remat_policy="full")
    jaxpr = str(jax.make_jaxpr(lambda p: _apply(remat_cfg, train=True)(p, inputs, rngs[0]))(
        params))
    assert jaxpr.count("remat") >= 3  # the three blocks are rematerialised
    plain = value_and_grad(cfg)
    plain_loss, plain_grads = plain(params, rngs[0])
    remat_loss, remat_grads = value_and_grad(remat_cfg)(params, rngs[0])
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain_grads,
                 remat_grads)
    # Dropout is on: another dropout key gives another loss.
    assert abs(float(plain(params, rngs[1])[0]) - float(plain_loss)) > 1e-6


def test_bf16_compute_keeps_float32_output_close():
    inputs = {k: v for k, v in _inputs().items() if k in ("z", "logsnr", "cond_image")}
    params = _random_params(TINY, inputs)
    full = _apply(TINY)(params, inputs)
    half = _apply(dataclasses.replace(TINY, dtype=jnp.bfloat16))(params, inputs)
    assert half.dtype == jnp.float32
    assert _diff(half, full) < 0.05 * float(jnp.max(jnp.abs(full)))


def test_attention_at_every_level_and_in_the_middle():
    cfg = dataclasses.replace(SMALL, attention_levels=(0, 1), head_dim=8)
    inputs = _inputs()
    params = _random_params(cfg, inputs)
    assert {"down_0_attn_0", "down_1_attn_0", "middle_attn", "up_0_attn_1",
            "up_1_attn_1"} <= set(params)
    # 16 channels of head_dim 8 at level 0: 2 heads; 32 at level 1: 4 heads.
    assert params["down_0_attn_0"]["qkv"]["kernel"].shape == (16, 3, 2, 8)
    assert params["middle_attn"]["out"]["kernel"].shape == (4, 8, 32)
    out = _apply(cfg)(params, inputs)
    assert out.shape == (B, H, W, 3) and np.all(np.isfinite(out))


def test_sharded_init_and_forward_on_a_tensor_parallel_mesh(small):
    variables, params, inputs = small
    sharded = nn.unbox(variables["params"])
    assert sharding_lib.indivisible_arrays(sharded) == []
    assert sharded["down_1_block_0"]["conv_0"]["kernel"].sharding.spec == P(
        None, None, None, "tensor")
    assert sharded["middle_attn"]["qkv"]["kernel"].sharding.spec == P(
        "fsdp", None, "tensor", None)
    assert all(a is None for a in sharded["out_conv"]["kernel"].sharding.spec)

    mesh, rules = _mesh(), defaults.DEFAULT_RULES
    perturbed = _perturb(params)
    on_mesh = jax.device_put(perturbed, jax.tree.map(lambda a: a.sharding, sharded))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = _apply(SMALL)(on_mesh, jax.device_put(inputs, sharding_lib.batch_sharding(mesh)))
    expected = _apply(SMALL)(perturbed, inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_count_params(small):
    variables, params, _ = small
    total = sum(x.size for x in jax.tree.leaves(params))
    assert unet.count_params(variables) == unet.count_params(params) == total
    # The figure the module docstring quotes, counted from shapes alone.
    big = unet.UNet(unet.UNetConfig(base_width=64, channel_mult=(1, 2, 2, 4),
                                    num_res_blocks=2))
    abstract = jax.eval_shape(big.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                              jnp.zeros((1,)))
    assert unet.count_params(abstract) == 17_494_467
