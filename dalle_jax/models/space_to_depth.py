"""A stage-1 backbone for small images and CPUs: space-to-depth instead of pooling.

The dVAE's backbone (:mod:`dalle_jax.models.dvae`) keeps its first group at full
resolution and narrows each residual branch to a quarter of the group's width: at
32 px and ``n_hid`` 32 its 3×3 convolutions are 8 channels wide over 32×32 positions.
Such convolutions are matrix products with 8 output columns, and on a CPU they run at
12–16% of the peak (docs/experiments/demo.md). This backbone trades resolution for
width, as a patch embedding does:

* Encoder: each halving is a space-to-depth (every 2×2 block of positions becomes one
  position with four times the channels) followed by a 1×1 conv to the level's width,
  then ``n_blocks`` residual blocks at that width. No convolution runs at full
  resolution. A ReLU and a 1×1 conv give ``out_features`` per code.
* Decoder, the mirror: a 1×1 conv to the deepest width, then for each level its
  residual blocks, a ReLU, a 1×1 conv to four times the next width and a depth-to-space;
  the last depth-to-space gives the pixels' statistics (``2 · output_channels``), each
  pixel a linear read of the features of its 2×2 block.
* Block: ``x + post_gain · conv3(relu(conv3(relu(x))))``, both 3×3 convolutions the
  full width, ``post_gain = 1 / (number of blocks)²`` as in the dVAE.

``widths`` lists the width after each halving, shallowest first; the downsample factor
is ``2 ** len(widths)``. The parameters carry the dVAE's logical axis names.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dalle_jax.models import dvae

Dtype = Any


def space_to_depth(x: jax.Array, factor: int = 2) -> jax.Array:
    """[B, H, W, C] → [B, H/f, W/f, f·f·C]: each f×f block of positions as one."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // factor, w // factor,
                                                 factor * factor * c)


def depth_to_space(x: jax.Array, factor: int = 2) -> jax.Array:
    """The inverse of :func:`space_to_depth`: [B, h, w, f·f·C] → [B, h·f, w·f, C]."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, factor, factor, c // (factor * factor))
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * factor, w * factor,
                                                 c // (factor * factor))


class _Block(nn.Module):
    """Residual block of two full-width 3×3 convolutions."""

    width: int
    post_gain: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = dvae.conv(self.width, 3, self.dtype, jnp.float32, "conv_1")(nn.relu(x))
        y = dvae.conv(self.width, 3, self.dtype, jnp.float32, "conv_2")(nn.relu(y))
        return x + self.post_gain * y


def _gain(widths: tuple[int, ...], n_blocks: int) -> float:
    return 1.0 / (len(widths) * max(n_blocks, 1)) ** 2


class Encoder(nn.Module):
    """Mapped pixels [B, H, W, 3] → fp32 [B, H/f, W/f, out_features], f = 2^len(widths)."""

    widths: tuple[int, ...]
    n_blocks: int
    out_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gain = _gain(self.widths, self.n_blocks)
        x = x.astype(self.dtype)
        for level, width in enumerate(self.widths, start=1):
            x = dvae.conv(width, 1, self.dtype, jnp.float32, f"embed_{level}")(
                space_to_depth(x))
            for i in range(1, self.n_blocks + 1):
                x = _Block(width, gain, self.dtype, name=f"block_{level}_{i}")(x)
        x = dvae.conv(self.out_features, 1, self.dtype, jnp.float32, "output")(nn.relu(x))
        return x.astype(jnp.float32)


class Decoder(nn.Module):
    """Codes' features [B, h, w, C] → fp32 [B, h·f, w·f, 2·output_channels]."""

    widths: tuple[int, ...]
    n_blocks: int
    output_channels: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        gain = _gain(self.widths, self.n_blocks)
        deepest_first = tuple(reversed(self.widths))
        x = dvae.conv(deepest_first[0], 1, self.dtype, jnp.float32, "input")(
            z.astype(self.dtype))
        for level, width in enumerate(deepest_first, start=1):
            for i in range(1, self.n_blocks + 1):
                x = _Block(width, gain, self.dtype, name=f"block_{level}_{i}")(x)
            shallower = (deepest_first[level] if level < len(deepest_first)
                         else 2 * self.output_channels)
            x = depth_to_space(dvae.conv(4 * shallower, 1, self.dtype, jnp.float32,
                                         f"unembed_{level}")(nn.relu(x)))
        return x.astype(jnp.float32)
