"""DALL·E's discrete VAE (stage 1), exactly as OpenAI released it, in Flax Linen (NHWC).

Architecture (Ramesh et al. 2021; the released ``dall_e`` package):

* Pixels are mapped into (ε, 1−ε), ε = 0.1, before the encoder (:func:`map_pixels`).
* Encoder: 7×7 conv (3 → n_hid), ``group_count`` groups of ``n_blk_per_group`` residual
  blocks with widths 2^(g−1)·n_hid (1, 2, 4, 8 × n_hid for 4 groups), a 2×2 max-pool
  after every group but the last, then ReLU and a 1×1 conv to ``vocab_size`` logits.
  256 px → 32×32 codes at the defaults (downsample factor 2^(group_count−1) = 8).
* Decoder: 1×1 conv (C → n_init), groups with widths 8, 4, 2, 1 × n_hid,
  nearest-neighbour ×2 upsampling after every group but the last, then ReLU and a 1×1
  conv to 2·output_channels: logit-Laplace means μ, then log-scales ln b.
* Block: ``out = id_path(x) + post_gain · res_path(x)``; ``id_path`` is a 1×1 conv only
  where the channel count changes; ``res_path`` is four ReLU→conv pairs, the first three
  at n_out/4 channels, with kernel sizes 3,3,3,1 (encoder) or 1,3,3,3 (decoder);
  ``post_gain = 1 / (group_count · n_blk_per_group)²``.
* Convs pad by (k−1)/2 and start from w ~ N(0, 1/sqrt(n_in·k²)), b = 0.
* Reconstruction = unmap(sigmoid(μ)).

Module and parameter names mirror the release (``input``, ``group_1/block_1/id_path``,
``.../res_path/conv_1``, ``output/conv``), so importing its weights is a rename plus an
OIHW → HWIO transpose (see :mod:`dalle_jax.models.openai_dvae`). At the defaults the
encoder has 53,786,240 parameters and the decoder 43,829,766.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

LOGIT_LAPLACE_EPS = 0.1
KERNEL_AXES = (None, None, "conv_in", "conv_out")
BIAS_AXES = ("conv_out",)

Dtype = Any


def map_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
    """Maps pixels in [0, 1] into (eps, 1 − eps), the support of the logit-Laplace."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
    """Inverse of :func:`map_pixels`, clipped to [0, 1]."""
    return jnp.clip((x - eps) / (1 - 2 * eps), 0, 1)


def downsample_factor(group_count: int) -> int:
    """Pixels per code along each side: one halving after every group but the last."""
    return 2 ** (group_count - 1)


def post_gain(group_count: int, n_blk_per_group: int) -> float:
    """The residual branch's scale: 1 / (number of blocks)²."""
    return 1.0 / (group_count * n_blk_per_group) ** 2


class _PointwiseConv(nn.Module):
    """A 1×1 conv as a matmul over channels, with ``nn.Conv``'s parameters (kernel
    [1, 1, in, out], bias [out])."""

    features: int
    kernel_init: Any
    bias_init: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        y = jnp.einsum("bhwc,co->bhwo", x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
        return y + bias.astype(self.dtype)


def conv(features: int, kernel_size: int, dtype: Dtype, param_dtype: Dtype,
         name: str) -> nn.Module:
    """A k×k convolution (a matmul when k = 1) with the release's initialisation and
    padding and the logical axes of :data:`KERNEL_AXES`."""
    # std 1/sqrt(fan_in) with fan_in = k·k·n_in is variance scaling 1.0 over fan_in with
    # a plain (not truncated) normal: the release's init.
    kernel_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    pad = (kernel_size - 1) // 2
    if kernel_size == 1:
        return _PointwiseConv(
            features, nn.with_logical_partitioning(kernel_init, KERNEL_AXES),
            nn.with_logical_partitioning(nn.initializers.zeros, BIAS_AXES), dtype,
            param_dtype, name=name)
    return nn.Conv(
        features, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)),
        dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, BIAS_AXES),
        name=name)


class _ResPath(nn.Module):
    """Four ReLU→conv pairs; the bottleneck is n_out/4 wide."""

    n_out: int
    kernel_sizes: tuple[int, int, int, int]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_hid = self.n_out // 4
        widths = (n_hid, n_hid, n_hid, self.n_out)
        for i, (width, k) in enumerate(zip(widths, self.kernel_sizes), start=1):
            x = conv(width, k, self.dtype, self.param_dtype, f"conv_{i}")(nn.relu(x))
        return x


class _Block(nn.Module):
    """Residual block: id_path (1×1 conv only where widths change) + post_gain · res."""

    n_out: int
    kernel_sizes: tuple[int, int, int, int]
    post_gain: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x
        if x.shape[-1] != self.n_out:
            identity = conv(self.n_out, 1, self.dtype, self.param_dtype, "id_path")(x)
        res = _ResPath(self.n_out, self.kernel_sizes, self.dtype, self.param_dtype,
                       name="res_path")(x)
        return identity + self.post_gain * res


class _Group(nn.Module):
    """n_blocks blocks of one width, then an optional 2× down- or upsampling."""

    n_out: int
    n_blocks: int
    kernel_sizes: tuple[int, int, int, int]
    post_gain: float
    resample: str | None  # "pool", "upsample" or None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(1, self.n_blocks + 1):
            x = _Block(self.n_out, self.kernel_sizes, self.post_gain, self.dtype,
                       self.param_dtype, name=f"block_{i}")(x)
        if self.resample == "pool":
            x = max_pool_2x2(x)
        elif self.resample == "upsample":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return x


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2×2 max-pool with stride 2 of NHWC ``x`` (even H and W).

    Same values as ``nn.max_pool``, computed as two pairwise maxima: first of row pairs,
    then of neighbouring columns, which a reshape lays side by side in the channel axis.
    Every step is an element-wise maximum over contiguous channel vectors. On the CPU
    that took 5.8 ms on a [1, 256, 256, 256] input, against 16.0 ms for a max-reduction
    over a [.., 2, .., 2, ..] reshape and 32.0 ms for ``reduce_window``, and it made the
    released encoder 1.17× faster at 256 px (docs/experiments/stage1.md). The gradient is an
    element-wise mask rather than ``reduce_window``'s argmax bookkeeping (four index
    arrays the size of the input and a scatter). Ties share the gradient.
    """
    b, h, w, c = x.shape
    rows = x.reshape(b, h // 2, 2, w, c)
    rows = jnp.maximum(rows[:, :, 0], rows[:, :, 1])
    cols = rows.reshape(b, h // 2, w // 2, 2 * c)
    return jnp.maximum(cols[..., :c], cols[..., c:])


class _Output(nn.Module):
    """ReLU then a 1×1 conv (the release's ``output`` Sequential)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv(self.features, 1, self.dtype, self.param_dtype, "conv")(nn.relu(x))


class Encoder(nn.Module):
    """Mapped pixels [B, H, W, 3] → fp32 logits [B, H/f, W/f, vocab_size], f = 2^(G−1)."""

    n_hid: int = 256
    n_blk_per_group: int = 2
    group_count: int = 4
    vocab_size: int = 8192
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gain = post_gain(self.group_count, self.n_blk_per_group)
        x = conv(self.n_hid, 7, self.dtype, self.param_dtype, "input")(
            x.astype(self.dtype))
        for g in range(1, self.group_count + 1):
            last = g == self.group_count
            x = _Group(2 ** (g - 1) * self.n_hid, self.n_blk_per_group, (3, 3, 3, 1), gain,
                       None if last else "pool", self.dtype, self.param_dtype,
                       name=f"group_{g}")(x)
        x = _Output(self.vocab_size, self.dtype, self.param_dtype, name="output")(x)
        return x.astype(jnp.float32)


class Decoder(nn.Module):
    """Codes [B, h, w, C] (one-hot or relaxed) → fp32 [B, h·f, w·f, 2·output_channels].

    The first ``output_channels`` channels are the logit-Laplace means μ, the rest the
    log-scales ln b.
    """

    n_init: int = 128
    n_hid: int = 256
    n_blk_per_group: int = 2
    group_count: int = 4
    output_channels: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        gain = post_gain(self.group_count, self.n_blk_per_group)
        x = conv(self.n_init, 1, self.dtype, self.param_dtype, "input")(z.astype(self.dtype))
        for g in range(1, self.group_count + 1):
            last = g == self.group_count
            width = 2 ** (self.group_count - g) * self.n_hid
            x = _Group(width, self.n_blk_per_group, (1, 3, 3, 3), gain,
                       None if last else "upsample", self.dtype, self.param_dtype,
                       name=f"group_{g}")(x)
        x = _Output(2 * self.output_channels, self.dtype, self.param_dtype, name="output")(x)
        return x.astype(jnp.float32)


def in_chunks(fn: Callable[[jax.Array], Any], x: jax.Array, chunk_size: int,
              num_shards: int = 1) -> Any:
    """``fn(x)`` computed ``chunk_size`` examples at a time, in one program.

    ``fn`` must treat the examples of its batch independently (as an inference pass
    does). Each of ``num_shards`` equal slices of the batch (one per device its leading
    axis is sharded over) is cut into chunks; ``lax.map`` runs step k on chunk k of every
    slice at once, so no example leaves its device. Smaller chunks keep fewer
    activations live: for the released dVAE encoder at 256 px on the CPU, chunks of one
    image are the fastest (docs/experiments/stage1.md). ``chunk_size`` 0, or a whole slice, is one
    call of ``fn``.
    """
    batch = x.shape[0]
    if batch % num_shards:
        raise ValueError(f"batch {batch} does not split into {num_shards} shards")
    per_shard = batch // num_shards
    if chunk_size <= 0 or chunk_size >= per_shard:
        return fn(x)
    if per_shard % chunk_size:
        raise ValueError(f"chunk size {chunk_size} does not divide the {per_shard} "
                         f"examples of each of {num_shards} shard(s)")
    steps = per_shard // chunk_size

    def to_steps(a):  # [S·n·c, ...] → [n, S·c, ...]
        a = a.reshape(num_shards, steps, chunk_size, *a.shape[1:]).swapaxes(0, 1)
        return a.reshape(steps, num_shards * chunk_size, *a.shape[3:])

    def from_steps(a):  # [n, S·c, ...] → [S·n·c, ...]
        a = a.reshape(steps, num_shards, chunk_size, *a.shape[2:]).swapaxes(0, 1)
        return a.reshape(batch, *a.shape[3:])

    return jax.tree.map(from_steps, jax.lax.map(fn, to_steps(x)))


def reconstruction(stats: jax.Array) -> jax.Array:
    """Pixels in [0, 1] from the decoder's statistics: unmap(sigmoid(μ))."""
    return unmap_pixels(jax.nn.sigmoid(stats[..., :stats.shape[-1] // 2]))


class DiscreteVAE(nn.Module):
    """The dVAE as one module: the encoder's logits pick a code per grid position.

    ``encode`` and ``decode`` are the inference paths (argmax codes; decoder statistics
    of one-hot codes); calling the module runs the training pass, where the codes are
    relaxed with gumbel-softmax at ``temperature`` (paper, appendix A) and
    ``straight_through`` sends the hard one-hot forward with the relaxed gradients.
    """

    vocab_size: int
    n_hid: int
    n_blk_per_group: int
    group_count: int
    n_init: int
    straight_through: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.n_hid, self.n_blk_per_group, self.group_count,
                               self.vocab_size, dtype=self.dtype)
        self.decoder = Decoder(self.n_init, self.n_hid, self.n_blk_per_group,
                               self.group_count, 3, dtype=self.dtype)

    def encode(self, x_mapped: jax.Array) -> jax.Array:
        """Codes int32 [B, h, w]: the argmax of the logits, no noise."""
        return jnp.argmax(self.encoder(x_mapped), -1).astype(jnp.int32)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Decoder statistics [B, H, W, 6] of int codes [B, h, w]."""
        return self.decoder(jax.nn.one_hot(codes, self.vocab_size, dtype=self.dtype))

    def __call__(self, x_mapped: jax.Array, *, train: bool,
                 temperature: jax.Array | float = 1.0):
        """(decoder statistics, codes, {"logits"}) for mapped pixels [B, H, W, 3]."""
        logits = self.encoder(x_mapped)
        codes = jnp.argmax(logits, -1).astype(jnp.int32)
        if train:
            gumbel = jax.random.gumbel(self.make_rng("gumbel"), logits.shape, jnp.float32)
            relaxed = jax.nn.softmax((logits + gumbel) / temperature, axis=-1)
            if self.straight_through:
                hard = jax.nn.one_hot(jnp.argmax(logits + gumbel, -1), self.vocab_size,
                                      dtype=jnp.float32)
                relaxed = hard + relaxed - jax.lax.stop_gradient(relaxed)
        else:
            relaxed = jax.nn.one_hot(codes, self.vocab_size, dtype=jnp.float32)
        return self.decoder(relaxed.astype(self.dtype)), codes, {"logits": logits}
