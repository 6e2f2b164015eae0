"""A U-Net for diffusion models (SR3 / improved DDPM / GLIDE layout), in Flax Linen (NHWC).

Used by the 4× super-resolution upsampler (the noised image with the upsampled
low-resolution image concatenated on channels) and by image-embedding-conditioned
decoders (a ``context`` vector added to the embedding).

Layout, for levels ``l = 0 … L−1`` of width ``base_width · channel_mult[l]``:

* 3×3 input conv; the down path runs ``num_res_blocks`` residual blocks per level (self-
  attention after each at the levels in ``attention_levels``), then a strided 3×3 conv
  (2× down) between levels; every block's and downsample's output is kept as a skip.
* Middle: block, attention (when the last level has attention), block.
* Up path: ``num_res_blocks + 1`` blocks per level, each taking one skip concatenated on
  channels, then nearest ×2 and a 3×3 conv between levels.
* Out: GroupNorm → swish → zero-initialised 3×3 conv, in float32.

Conditioning: log-SNR (the diffusion time) and, optionally, the log-SNR of the
conditioning augmentation go through sinusoidal features (:func:`logsnr_features`) and
their own MLPs; a ``context`` vector is projected; the three are summed into one
embedding that every block reads through FiLM (adaptive group norm). With
``context_tokens`` the context is also projected into that many tokens, which every
attention layer attends to beside the image's positions (unCLIP's decoder). Every block's
last conv, every attention output and the final conv start at zero, so at
initialisation each block is the identity and the model outputs zeros.

Nothing at a resolution depends on H or W (GroupNorm statistics are per example), so a
model trained on crops runs on whole images whose sides are multiples of
:func:`min_size_multiple`. At ``UNetConfig(base_width=64, channel_mult=(1, 2, 2, 4),
num_res_blocks=2)`` the model has 17,494,467 parameters for RGB in and out (17,496,195
with a 3-channel conditioning image).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.models import remat as remat_lib

KERNEL_AXES = (None, None, "conv_in", "conv_out")
BIAS_AXES = ("conv_out",)
NORM_AXES = ("conv_in",)  # GroupNorm parameters, over the channels a conv then reads
# The final conv writes out_channels (3, or 6 with learned variances), which no tensor
# axis splits evenly, so its output dimension stays whole.
OUT_KERNEL_AXES = (None, None, "conv_in", None)
# Sinusoidal features of a log-SNR: sin and cos at frequencies (radians per unit of
# log-SNR) spaced geometrically between these. Over the working range [−20, 20] the
# slowest turns by 0.8 rad, a monotone code of the level; the fastest has period 0.13,
# finer than the spacing of any sampling schedule's steps.
LOGSNR_FREQUENCIES = (0.02, 50.0)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    out_channels: int = 3
    base_width: int = 64  # channels at the top resolution
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)  # one level each; 2× down between levels
    num_res_blocks: int = 2  # per level on the way down; the up path has one more
    attention_levels: tuple[int, ...] = ()  # self-attention after each block there
    head_dim: int = 64
    dropout: float = 0.0
    embed_dim: int = 0  # the embedding width; 0: 4 · base_width
    noise_level_cond: bool = False  # also embed the augmentation's log-SNR
    context_dim: int = 0  # > 0: a conditioning vector [B, context_dim]
    context_tokens: int = 0  # > 0: the context also projected into this many tokens that
    # every attention layer's queries can attend to (unCLIP's decoder; needs attention)
    num_groups: int = 32  # GroupNorm groups, lowered to divide the channels where needed
    dtype: Any = jnp.float32  # compute
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"  # remat.POLICIES name, applied to the residual blocks

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_levels",
                           tuple(int(a) for a in self.attention_levels))
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be positive integers, got "
                             f"{self.channel_mult}")
        bad = [a for a in self.attention_levels if not 0 <= a < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} are not levels of channel_mult "
                             f"{self.channel_mult} (0 … {len(self.channel_mult) - 1})")
        if self.num_res_blocks < 0 or self.base_width < 1 or self.head_dim < 1:
            raise ValueError("num_res_blocks must be ≥ 0 and base_width, head_dim ≥ 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.context_tokens < 0 or (self.context_tokens and not self.context_dim):
            raise ValueError("context_tokens must be ≥ 0, and > 0 only with context_dim > 0")
        if self.context_tokens and not self.attention_levels:
            raise ValueError("context_tokens need attention: set attention_levels")
        remat_lib.policy(self.remat_policy)  # a ValueError for an unknown name

    @property
    def time_embed_dim(self) -> int:
        return self.embed_dim or 4 * self.base_width


def min_size_multiple(config: UNetConfig) -> int:
    """H and W must be multiples of this: one halving between consecutive levels."""
    return 2 ** (len(config.channel_mult) - 1)


def count_params(variables) -> int:
    """Number of scalars in a (boxed or plain, concrete or abstract) variables tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(variables)))


def logsnr_features(logsnr: jax.Array, num_features: int) -> jax.Array:
    """float32 [B, 2 · (num_features // 2)]: sin and cos of ``logsnr`` [B] at the
    frequencies of :data:`LOGSNR_FREQUENCIES`. Computed in float32 whatever the compute
    dtype: the fast frequencies reach hundreds of radians."""
    freqs = jnp.asarray(np.geomspace(*LOGSNR_FREQUENCIES, num_features // 2), jnp.float32)
    angles = logsnr.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _boxed(init, axes):
    return nn.with_logical_partitioning(init, axes)


def conv(features: int, cfg: UNetConfig, name: str, *, kernel_size: int = 3,
         stride: int = 1, zero: bool = False, axes=KERNEL_AXES) -> nn.Conv:
    """A k×k conv padded by k // 2 (so stride 2 halves even sides exactly), LeCun-normal
    or zero kernel, zero bias."""
    pad = kernel_size // 2
    init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype, kernel_init=_boxed(init, axes),
                   bias_init=_boxed(nn.initializers.zeros, axes[-1:]), name=name)


def dense(features: int, axes: tuple[str | None, str | None], cfg: UNetConfig,
          name: str) -> nn.Dense:
    """A Dense layer with LeCun-normal kernel and zero bias, named by logical ``axes``."""
    return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=_boxed(nn.initializers.lecun_normal(), axes),
                    bias_init=_boxed(nn.initializers.zeros, axes[-1:]), name=name)


def group_norm(channels: int, cfg: UNetConfig, name: str) -> nn.GroupNorm:
    """GroupNorm with the most groups ≤ ``num_groups`` that divide ``channels``."""
    groups = max(g for g in range(1, min(cfg.num_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(num_groups=groups, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        scale_init=_boxed(nn.initializers.ones, NORM_AXES),
                        bias_init=_boxed(nn.initializers.zeros, NORM_AXES), name=name)


class ScalarEmbedding(nn.Module):
    """A log-SNR [B] → [B, embed_dim]: sinusoidal features (``base_width`` of them),
    Dense → swish → Dense."""

    config: UNetConfig

    @nn.compact
    def __call__(self, logsnr: jax.Array) -> jax.Array:
        cfg = self.config
        h = logsnr_features(logsnr, cfg.base_width)
        h = nn.swish(dense(cfg.time_embed_dim, (None, "mlp"), cfg, "dense_0")(h))
        return dense(cfg.time_embed_dim, ("mlp", "embed"), cfg, "dense_1")(h)


class ResBlock(nn.Module):
    """GroupNorm → swish → 3×3 conv → GroupNorm · (1 + scale) + shift → swish → dropout →
    zero-initialised 3×3 conv, added to the input (1×1 conv where the width changes).

    ``scale`` and ``shift`` come from a Dense of the (swished) embedding: the adaptive
    group norm of improved DDPM / GLIDE. The sum is not rescaled by 1/√2: the zero conv
    already makes each block the identity at initialisation, so activations keep their
    scale through the depth without it.
    """

    channels: int
    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        h = nn.swish(group_norm(x.shape[-1], cfg, "norm_0")(x))
        h = conv(self.channels, cfg, "conv_0")(h)
        film = dense(2 * self.channels, ("embed", "conv_out"), cfg, "film")(emb)
        scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
        h = group_norm(self.channels, cfg, "norm_1")(h) * (1 + scale) + shift
        h = nn.Dropout(cfg.dropout, deterministic=not train)(nn.swish(h))
        h = conv(self.channels, cfg, "conv_1", zero=True)(h)
        if x.shape[-1] != self.channels:
            x = conv(self.channels, cfg, "skip", kernel_size=1)(x)
        return x + h


class HeadProjection(nn.Module):
    """``einsum(equation, x, kernel) + bias`` where the kernel's first ``num_in`` axes
    are contracted and the bias covers the rest (several output axes: heads × head_dim)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    num_in: int
    zero: bool
    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, equation: str) -> jax.Array:
        cfg, n = self.config, self.num_in
        init = (nn.initializers.zeros if self.zero else nn.initializers.lecun_normal(
            in_axis=tuple(range(n)), out_axis=tuple(range(n, len(self.shape)))))
        kernel = self.param("kernel", _boxed(init, self.axes), self.shape, cfg.param_dtype)
        bias = self.param("bias", _boxed(nn.initializers.zeros, self.axes[n:]),
                          self.shape[n:], cfg.param_dtype)
        y = jnp.einsum(equation, x.astype(cfg.dtype), kernel.astype(cfg.dtype))
        return y + bias.astype(cfg.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H·W positions, GroupNorm first, added to the
    input through a zero-initialised output projection. ``channels // head_dim`` heads
    (at least one, of ``channels // heads`` each); scores and softmax in float32.

    ``extra`` [B, N, E] tokens (the projected context), layer-normed and projected by
    this layer to keys and values, are attended to beside the positions (GLIDE's and
    unCLIP's conditioning tokens)."""

    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, extra: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        b, height, width, c = x.shape
        heads = max(1, c // cfg.head_dim)
        if c % heads:
            raise ValueError(f"{c} channels do not split into {heads} attention heads of "
                             f"head_dim {cfg.head_dim}")
        d = c // heads
        h = group_norm(c, cfg, "norm")(x).reshape(b, height * width, c)
        qkv = HeadProjection((c, 3, heads, d), ("embed", None, "heads", "kv"), 1, False,
                             cfg, name="qkv")(h, "bnc,cthd->bnthd")
        q, k, v = qkv[:, :, 0] * jnp.asarray(d ** -0.5, cfg.dtype), qkv[:, :, 1], qkv[:, :, 2]
        if extra is not None:
            e = nn.LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             scale_init=_boxed(nn.initializers.ones, ("embed",)),
                             bias_init=_boxed(nn.initializers.zeros, ("embed",)),
                             name="context_norm")(extra)
            kv = HeadProjection((extra.shape[-1], 2, heads, d), ("embed", None, "heads", "kv"),
                                1, False, cfg, name="context_kv")(e, "bne,ethd->bnthd")
            k = jnp.concatenate([kv[:, :, 0], k], axis=1)
            v = jnp.concatenate([kv[:, :, 1], v], axis=1)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        out = HeadProjection((heads, d, c), ("heads", "kv", "embed"), 2, True, cfg,
                             name="out")(attended, "bqhd,hdc->bqc")
        return x + out.reshape(x.shape)


class UNet(nn.Module):
    """The diffusion U-Net; see the module docstring. Parameters: ``input_conv``,
    ``time_embed`` (and ``noise_level_embed``, ``context_proj``, ``context_tokens``), ``down_{l}_block_{i}``,
    ``down_{l}_attn_{i}``, ``down_{l}_downsample``, ``middle_block_{0,1}``,
    ``middle_attn``, ``up_{l}_block_{i}``, ``up_{l}_attn_{i}``, ``up_{l}_upsample``,
    ``out_norm``, ``out_conv``."""

    config: UNetConfig

    @nn.compact
    def __call__(self, z: jax.Array, logsnr: jax.Array, *, cond_image: jax.Array | None = None,
                 noise_level: jax.Array | None = None, context: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        """z [B, H, W, C] noised image; logsnr [B] (or a scalar); cond_image
        [B, H, W, Cc] concatenated to z on channels (the upsampled low-resolution image;
        any Cc, or absent); noise_level [B] (or a scalar), the log-SNR of the
        conditioning augmentation, required iff ``noise_level_cond``; context
        [B, context_dim], required iff ``context_dim > 0``; ``train`` enables dropout
        (rng ``"dropout"``). Returns [B, H, W, out_channels] in float32."""
        cfg = self.config
        self._check_inputs(z, cond_image, noise_level, context)
        batch = z.shape[0]
        emb = ScalarEmbedding(cfg, name="time_embed")(jnp.broadcast_to(logsnr, (batch,)))
        if cfg.noise_level_cond:
            emb = emb + ScalarEmbedding(cfg, name="noise_level_embed")(
                jnp.broadcast_to(noise_level, (batch,)))
        tokens = None
        if cfg.context_dim:
            emb = emb + dense(cfg.time_embed_dim, (None, "embed"), cfg, "context_proj")(
                context.astype(cfg.dtype))
            if cfg.context_tokens:
                tokens = dense(cfg.context_tokens * cfg.time_embed_dim, (None, "embed"), cfg,
                               "context_tokens")(context.astype(cfg.dtype))
                tokens = tokens.reshape(batch, cfg.context_tokens, cfg.time_embed_dim)
        emb = nn.swish(emb)  # what every block's FiLM reads

        block = ResBlock
        if cfg.remat_policy != "none":  # static_argnums counts self: train is argument 3
            block = nn.remat(ResBlock, policy=remat_lib.policy(cfg.remat_policy),
                             static_argnums=(3,))
        widths = [cfg.base_width * m for m in cfg.channel_mult]
        last = len(widths) - 1

        x = z.astype(cfg.dtype)
        if cond_image is not None:
            x = jnp.concatenate([x, cond_image.astype(cfg.dtype)], axis=-1)
        h = conv(cfg.base_width, cfg, "input_conv")(x)
        skips = [h]
        for level, width in enumerate(widths):
            for i in range(cfg.num_res_blocks):
                h = block(width, cfg, name=f"down_{level}_block_{i}")(h, emb, train)
                if level in cfg.attention_levels:
                    h = SelfAttention(cfg, name=f"down_{level}_attn_{i}")(h, tokens)
                skips.append(h)
            if level < last:
                h = conv(width, cfg, f"down_{level}_downsample", stride=2)(h)
                skips.append(h)

        h = block(widths[-1], cfg, name="middle_block_0")(h, emb, train)
        if last in cfg.attention_levels:
            h = SelfAttention(cfg, name="middle_attn")(h, tokens)
        h = block(widths[-1], cfg, name="middle_block_1")(h, emb, train)

        for level in reversed(range(len(widths))):
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = block(widths[level], cfg, name=f"up_{level}_block_{i}")(h, emb, train)
                if level in cfg.attention_levels:
                    h = SelfAttention(cfg, name=f"up_{level}_attn_{i}")(h, tokens)
            if level > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = conv(widths[level], cfg, f"up_{level}_upsample")(h)

        h = nn.swish(group_norm(h.shape[-1], cfg, "out_norm")(h))
        h = conv(cfg.out_channels, cfg, "out_conv", zero=True, axes=OUT_KERNEL_AXES)(h)
        return h.astype(jnp.float32)

    def _check_inputs(self, z, cond_image, noise_level, context):
        cfg = self.config
        if z.ndim != 4:
            raise ValueError(f"z must be [B, H, W, C], got shape {z.shape}")
        multiple = min_size_multiple(cfg)
        if z.shape[1] % multiple or z.shape[2] % multiple:
            raise ValueError(f"H and W must be multiples of {multiple} for "
                             f"{len(cfg.channel_mult)} levels; got {z.shape[1]}×{z.shape[2]}")
        if cond_image is not None and cond_image.shape[:3] != z.shape[:3]:
            raise ValueError(f"cond_image {cond_image.shape} must match z {z.shape} in "
                             f"batch, height and width")
        if cfg.noise_level_cond and noise_level is None:
            raise ValueError("config.noise_level_cond is set: pass noise_level [B], the "
                             "log-SNR of the conditioning augmentation")
        if not cfg.noise_level_cond and noise_level is not None:
            raise ValueError("noise_level given, but config.noise_level_cond is False: the "
                             "model has no noise-level embedding")
        if cfg.context_dim and context is None:
            raise ValueError(f"config.context_dim is {cfg.context_dim}: pass context "
                             f"[B, {cfg.context_dim}]")
        if not cfg.context_dim and context is not None:
            raise ValueError("context given, but config.context_dim is 0: the model has no "
                             "context projection")
        if context is not None and context.shape != (z.shape[0], cfg.context_dim):
            raise ValueError(f"context must be [{z.shape[0]}, {cfg.context_dim}], got "
                             f"{context.shape}")
