"""DALL·E's decoder-only transformer over one stream of [caption tokens | image tokens].

Layout of a sequence of length ``L = text_len + h·w``::

    position   0 … text_len−1            text_len            text_len + a   (a = 1 … h·w−1)
    input      text tokens (pad → a      start-of-image      image token a − 1
               learned per-position pad)
    predicts   the next text token       image token 0       image token a

Embeddings: text token (or that position's pad vector) + text position; image token
(or the start-of-image vector) + row embedding + column embedding of the image position
``a`` (the grid cell whose token the position predicts).

Each layer is pre-LayerNorm attention then a GELU MLP of ``mlp_ratio · d``. Attention
is one softmax over text and image keys; the pattern of each layer is a boolean
[L, L] mask (:func:`attention_mask`): text → text causal, image → text always visible,
image → image dense-causal or one of the paper's sparse patterns (row, column,
causal convolution). The masks are applied to dense scores, so a masked layer costs the
same as a dense one. Layers are stacked with ``nn.scan`` (compile time does not grow with
depth) and optionally rematerialised.

Two output heads: text positions project onto the text vocabulary and image positions
onto the image vocabulary, in fp32, so text positions can never emit image tokens (and
vice versa) and no FLOPs go to logits the loss ignores.

Three entry points share the parameters: ``Transformer.__call__`` (training,
evaluation), ``Transformer.prefill`` (the same pass, also returning every layer's keys
and values) and ``Transformer.decode`` (one image position against a key/value cache,
``model.apply(..., method="decode")``). Decoding reads the parameters one layer at a
time (:func:`decode_params`) and a cache split into text and image keys
(:func:`decode_cache`); each layer reads only the image keys its pattern can see
(:func:`decode_window`) — a row layer the previous ``w + 1``, a column layer its column,
a convolutional layer the ``(k // 2)·w + k // 2 + 1`` keys ending at the query — so the
sparse patterns make decoding cheaper.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.models import remat as remat_lib

ATTENTION_KINDS = ("dense", "row", "column", "conv")
# How the convolutional layer's k × k neighbourhood wraps at the grid's edges (see
# image_mask): "raster" is the paper's; "wrap_columns", around the grid's columns, is
# the pattern of models trained before "raster" existed.
CONV_MASKS = ("raster", "wrap_columns")
Cache = tuple[jax.Array, jax.Array]  # prefill: keys, values [layers, B, heads, L, head_dim]
# decode: per layer (text keys, text values [B, heads, text_len, head_dim],
# image keys, image values [B, heads, h·w, head_dim])
DecodeCache = tuple[tuple[jax.Array, jax.Array, jax.Array, jax.Array], ...]


def dalle_layer_schedule(num_layers: int) -> tuple[str, ...]:
    """The paper's schedule: for layers i = 1 … n−1 column attention where
    (i − 2) mod 4 == 0, else row attention; the last layer convolutional."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, num_layers)]
    return tuple(kinds) + ("conv",)


def layer_schedule(attention: str | Sequence[str], num_layers: int) -> tuple[str, ...]:
    """Per-layer attention kinds from config: a preset name (``"dense"``, ``"dalle"``,
    or any single kind for every layer) or one kind per layer."""
    if isinstance(attention, str):
        if attention == "dalle":
            return dalle_layer_schedule(num_layers)
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"model.attention must be 'dalle', one of {ATTENTION_KINDS} "
                             f"or a list of those per layer; got {attention!r}")
        return (attention,) * num_layers
    kinds = tuple(attention)
    if len(kinds) != num_layers:
        raise ValueError(f"model.attention lists {len(kinds)} kinds for {num_layers} layers")
    for kind in kinds:
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {kind!r}; expected one of "
                             f"{ATTENTION_KINDS}")
    return kinds


def image_mask(kind: str, height: int, width: int, conv_kernel: int = 11,
               conv_mask: str = "raster") -> np.ndarray:
    """bool [N, N] over image positions (N = h·w, raster order): may position ``a``
    attend to position ``b``? Always causal (b ≤ a).

    * dense: every earlier position.
    * row: the previous ``w + 1`` positions including itself (a − w ≤ b ≤ a), so the
      farthest is the same column of the previous row; the window wraps around row ends.
    * column: earlier positions of its own column (including itself).
    * conv: the causal ``k × k`` neighbourhood, ``k // 2`` rows up and ``k // 2`` columns
      to either side. The paper (figure 11) calls it "a causal convolutional attention
      pattern with wraparound behavior (similar to the row attention)": with
      ``conv_mask="raster"`` (the default) the neighbourhood is a fixed set of raster
      offsets a − b = r·w + c (0 ≤ r ≤ k // 2, |c| ≤ k // 2), so a query near a row's end
      sees the start of the next row as the row mask does, and on a grid at least k
      wide every query far enough from the top sees k·(k // 2) + k // 2 + 1 keys (61
      for k = 11).
      ``"wrap_columns"`` measures the column distance around the grid (a torus)
      instead; its number of keys varies with the column.
    """
    n = height * width
    a = np.arange(n)[:, None]
    b = np.arange(n)[None, :]
    causal = b <= a
    if kind == "dense":
        return causal
    if kind == "row":
        return causal & (a - b <= width)
    if kind == "column":
        return causal & ((a - b) % width == 0)
    if kind == "conv":
        half = _conv_half(conv_kernel)
        if conv_mask == "raster":
            offsets = [r * width + c for r in range(half + 1) for c in range(-half, half + 1)]
            return causal & np.isin(a - b, offsets)
        if conv_mask == "wrap_columns":
            row_gap = a // width - b // width
            col_gap = np.abs(a % width - b % width)
            col_gap = np.minimum(col_gap, width - col_gap)
            return causal & (row_gap <= half) & (col_gap <= half)
        raise ValueError(f"conv_mask must be one of {CONV_MASKS}, got {conv_mask!r}")
    raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}")


def _conv_half(conv_kernel: int) -> int:
    if conv_kernel < 1 or conv_kernel % 2 == 0:
        raise ValueError(f"conv_kernel must be a positive odd number, got {conv_kernel}")
    return conv_kernel // 2


def attention_mask(kind: str, text_len: int, height: int, width: int,
                   conv_kernel: int = 11, conv_mask: str = "raster") -> np.ndarray:
    """bool [L, L] for the whole stream (query, key): text → text causal, text → image
    never, image → text always, image → image by ``kind``."""
    n = height * width
    length = text_len + n
    mask = np.zeros((length, length), bool)
    mask[:text_len, :text_len] = np.tril(np.ones((text_len, text_len), bool))
    mask[text_len:, :text_len] = True
    mask[text_len:, text_len:] = image_mask(kind, height, width, conv_kernel, conv_mask)
    return mask


@dataclasses.dataclass(frozen=True)
class DecodeWindow:
    """The image keys one decode step of a layer reads: for the query at image position
    ``a``, keys ``start[a] + j · stride`` for j < ``size``, of which ``allowed[a, j]``
    are visible (exactly the visible keys of :func:`image_mask`'s row ``a``)."""

    size: int
    stride: int
    start: np.ndarray  # int32 [h·w]
    allowed: np.ndarray  # bool [h·w, size]


def decode_window(kind: str, height: int, width: int, conv_kernel: int = 11,
                  conv_mask: str = "raster") -> DecodeWindow:
    """The smallest read of each kind: dense all keys; row the ``w + 1`` keys ending at
    the query; column the query's column; conv (raster) the ``(k // 2)·w + k // 2 + 1``
    keys ending at the query, its largest offset; conv (wrap_columns) the ``k // 2 + 1``
    grid rows ending at the query's row. Checked to cover every key :func:`image_mask`
    allows."""
    n = height * width
    a = np.arange(n)

    def ending_at_query(span):  # the keys a − span … a, shifted to stay inside the grid
        size = min(span + 1, n)
        return size, 1, np.clip(a - span, 0, n - size)

    if kind == "dense":
        size, stride, start = n, 1, np.zeros(n, np.int64)
    elif kind == "row":
        size, stride, start = ending_at_query(width)
    elif kind == "column":
        size, stride, start = height, width, a % width
    elif kind == "conv" and conv_mask == "raster":
        half = _conv_half(conv_kernel)
        size, stride, start = ending_at_query(half * width + half)
    elif kind == "conv":
        rows = min(_conv_half(conv_kernel) + 1, height)
        size, stride = rows * width, 1
        start = np.clip(a // width - (rows - 1), 0, height - rows) * width
    else:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of "
                         f"{ATTENTION_KINDS}")
    mask = image_mask(kind, height, width, conv_kernel, conv_mask)
    keys = start[:, None] + stride * np.arange(size)[None, :]
    allowed = np.take_along_axis(mask, keys, axis=1)
    if not np.array_equal(allowed.sum(1), mask.sum(1)):  # a window missing a visible key
        raise AssertionError(f"the {kind} decode window misses keys of its mask")
    return DecodeWindow(size, stride, start.astype(np.int32), allowed)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    text_vocab_size: int = 16_384
    text_len: int = 256
    image_vocab_size: int = 8192
    image_height: int = 32  # code grid
    image_width: int = 32
    num_layers: int = 64
    num_heads: int = 62
    head_dim: int = 64
    mlp_ratio: int = 4
    attention: str | tuple[str, ...] = "dalle"
    conv_kernel: int = 11
    conv_mask: str = "raster"  # CONV_MASKS: how the convolutional neighbourhood wraps
    pad_id: int = 0
    dtype: Any = jnp.float32  # compute; parameters stay float32
    remat_policy: str = "none"
    # False: the layers are a Python loop (parameters layer_0 … layer_{n−1}) instead of
    # nn.scan (one stacked ``layers``): no per-layer stacking of saved activations and
    # gradients, so small models train faster, but compile time grows with depth.
    scan_layers: bool = True

    def __post_init__(self):
        if self.conv_mask not in CONV_MASKS:
            raise ValueError(f"conv_mask must be one of {CONV_MASKS}, got {self.conv_mask!r}")

    @property
    def d_model(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def image_len(self) -> int:
        return self.image_height * self.image_width

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def schedule(self) -> tuple[str, ...]:
        return layer_schedule(self.attention, self.num_layers)

    def mask_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(masks bool [K, L, L] of the K distinct kinds used, kind index per layer)."""
        schedule = self.schedule
        kinds = sorted(set(schedule), key=ATTENTION_KINDS.index)
        masks = np.stack([attention_mask(k, self.text_len, self.image_height,
                                         self.image_width, self.conv_kernel, self.conv_mask)
                          for k in kinds])
        index = np.array([kinds.index(k) for k in schedule], np.int32)
        return masks, index

    def decode_window(self, kind: str) -> DecodeWindow:
        return decode_window(kind, self.image_height, self.image_width, self.conv_kernel,
                             self.conv_mask)

    def flops_per_example(self, *, train: bool = True) -> float:
        """Model FLOPs of one sequence, counted analytically for the model as built:
        2 per multiply-add of every matmul (projections, MLP, both heads) and the two
        attention products over all L keys (masks do not skip work); ×3 for training
        (forward + backward)."""
        d, length = self.d_model, self.seq_len
        per_layer = 2 * length * (4 * d * d + 2 * self.mlp_ratio * d * d)
        per_layer += 2 * 2 * length * length * d  # q·k and p·v
        heads = 2 * d * ((self.text_len - 1) * self.text_vocab_size
                         + self.image_len * self.image_vocab_size)
        forward = self.num_layers * per_layer + heads
        return 3 * forward if train else forward


class Projection(nn.Module):
    """``einsum(equation, x, kernel) + bias`` with logical axis names on both.

    The default equation contracts the trailing ``in_shape`` axes of ``x`` into
    ``out_shape``; attention passes its own at the call to read and write head-major
    [B, heads, L, head_dim] or token-major activations with the same parameters.
    (Written out rather than ``nn.DenseGeneral``, whose initialiser works on a flattened
    kernel that a multi-axis sharding annotation does not fit.)
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, equation: str | None = None,
                 bias_shape: tuple[int, ...] | None = None) -> jax.Array:
        """``bias_shape``: how the bias broadcasts in the output (default: trailing)."""
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                   self.in_axes + self.out_axes),
            self.in_shape + self.out_shape, jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               self.out_axes),
                          self.out_shape, jnp.float32)
        if equation is None:
            letters = "abcdefgh"
            ins = letters[:len(self.in_shape)]
            outs = letters[len(self.in_shape):len(self.in_shape) + len(self.out_shape)]
            equation = f"...{ins},{ins}{outs}->...{outs}"
        y = jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))
        bias = bias.astype(self.dtype)
        if bias_shape is not None:
            bias = bias.reshape(bias_shape)
        return y + bias


def layer_norm(dtype, name: str | None = None):
    """Layer norm over ``embed`` (scale and bias float32, logical axis names)."""
    return nn.LayerNorm(
        dtype=dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


_MASKED = -1e30  # added to the scores of masked keys (exp underflows to exactly 0)


class Block(nn.Module):
    """One layer: pre-LN attention + MLP. ``__call__`` runs a whole stream (training,
    prefill); :meth:`decode` runs one token against the layer's cache. Both read the
    same parameters."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        d, heads = (cfg.d_model,), (cfg.num_heads, cfg.head_dim)
        self.ln_attn = layer_norm(cfg.dtype)
        self.query = Projection(d, heads, ("embed",), ("heads", "kv"), cfg.dtype)
        self.key = Projection(d, heads, ("embed",), ("heads", "kv"), cfg.dtype)
        self.value = Projection(d, heads, ("embed",), ("heads", "kv"), cfg.dtype)
        self.out = Projection(heads, d, ("heads", "kv"), ("embed",), cfg.dtype)
        self.ln_mlp = layer_norm(cfg.dtype)
        hidden = (cfg.mlp_ratio * cfg.d_model,)
        self.mlp_in = Projection(d, hidden, ("embed",), ("mlp",), cfg.dtype)
        self.mlp_out = Projection(hidden, d, ("mlp",), ("embed",), cfg.dtype)

    def _qkv(self, x, **layout):
        h = self.ln_attn(x)
        q = self.query(h, **layout) * jnp.asarray(self.config.head_dim ** -0.5,
                                                  self.config.dtype)
        return q, self.key(h, **layout), self.value(h, **layout)

    def _mlp(self, x, attended, out_equation):
        x = x + self.out(attended, out_equation)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = nn.gelu(self.mlp_in(self.ln_mlp(x)))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        x = x + self.mlp_out(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def __call__(self, x, layer_kind, masks):
        """x [B, L, d]; ``masks[layer_kind]`` is this layer's bool [L, L] pattern.
        Returns (x, (keys, values) [B, heads, L, head_dim]).

        Head-major attention; the mask enters as an additive bias, so the backward pass
        keeps nothing of it per example.
        """
        cfg = self.config
        q, k, v = self._qkv(x, equation="bld,dhk->bhlk",
                            bias_shape=(1, cfg.num_heads, 1, cfg.head_dim))
        length = x.shape[1]
        allowed = masks[layer_kind][:length, :length]
        bias = jnp.where(allowed, 0.0, _MASKED).astype(jnp.float32)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores + bias, axis=-1).astype(cfg.dtype)
        attended = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        return self._mlp(x, attended, "bhld,hdo->blo"), (k, v)

    def decode(self, x, cache, position, kind: str):
        """x [B, 1, d] at image position ``position``; ``cache`` this layer's (text keys,
        text values, image keys, image values) of :func:`decode_cache`; ``kind`` its
        attention pattern. Returns (x, cache with this position's key and value).

        Attends to every text key and to the image keys of the pattern's
        :func:`decode_window`. Projections are token-major here: for one token per row
        XLA's CPU matrix-vector product would transpose every kernel on every step to
        produce head-major output.
        """
        cfg = self.config
        text_k, text_v, image_k, image_v = cache
        q, k, v = (t[:, 0] for t in self._qkv(x, equation="bld,dhk->blhk"))
        start = (0, 0, position, 0)  # q, k, v: [B, heads, head_dim]
        image_k = jax.lax.dynamic_update_slice(image_k, k[:, :, None].astype(image_k.dtype),
                                               start)
        image_v = jax.lax.dynamic_update_slice(image_v, v[:, :, None].astype(image_v.dtype),
                                               start)
        window = cfg.decode_window(kind)
        allowed = jax.lax.dynamic_index_in_dim(jnp.asarray(window.allowed), position, 0,
                                               keepdims=False)
        if window.size == cfg.image_len:
            keys, values = image_k, image_v
        else:
            # A gather: XLA on CPU copies the whole cache on every step when a dynamic
            # slice reads a cache that the same step updates in place.
            slots = jnp.asarray(window.start)[position] + window.stride * jnp.arange(
                window.size)
            keys, values = (jnp.take(c, slots, axis=2, mode="clip")
                            for c in (image_k, image_v))
        scores = jnp.concatenate([
            jnp.einsum("bhd,bhkd->bhk", q, text_k.astype(cfg.dtype),
                       preferred_element_type=jnp.float32),
            jnp.einsum("bhd,bhkd->bhk", q, keys.astype(cfg.dtype),
                       preferred_element_type=jnp.float32)
            + jnp.where(allowed, 0.0, _MASKED),
        ], axis=-1)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        attended = (jnp.einsum("bhk,bhkd->bhd", probs[..., :cfg.text_len],
                               text_v.astype(cfg.dtype))
                    + jnp.einsum("bhk,bhkd->bhd", probs[..., cfg.text_len:],
                                 values.astype(cfg.dtype)))
        x = self._mlp(x, attended[:, None], "blhd,hdo->blo")
        return x, (text_k, text_v, image_k, image_v)


class Transformer(nn.Module):
    """The stage-2 model. See the module docstring for the stream layout.

    Parameters: the embedding tables, the layers — ``layers`` (each array stacked
    [num_layers, …]) when ``config.scan_layers``, else ``layer_0`` … ``layer_{n−1}`` —
    ``ln_final``, ``text_head`` and ``image_head``.
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        d = cfg.d_model
        embed_init = nn.initializers.normal(0.02)

        def table(name, shape, axes):
            return self.param(name, nn.with_logical_partitioning(embed_init, axes), shape)

        self.text_embedding = table("text_embedding", (cfg.text_vocab_size, d),
                                    ("vocab", "embed"))
        self.text_pad_embedding = table("text_pad_embedding", (cfg.text_len, d),
                                        ("length", "embed"))
        self.text_position_embedding = table("text_position_embedding", (cfg.text_len, d),
                                             ("length", "embed"))
        self.image_embedding = table("image_embedding", (cfg.image_vocab_size, d),
                                     ("vocab", "embed"))
        self.start_of_image_embedding = table("start_of_image_embedding", (1, d),
                                              (None, "embed"))
        self.image_row_embedding = table("image_row_embedding", (cfg.image_height, d),
                                         (None, "embed"))
        self.image_column_embedding = table("image_column_embedding", (cfg.image_width, d),
                                            (None, "embed"))
        block = Block
        if cfg.remat_policy != "none":  # remat wraps __call__ only: decode runs as is
            block = nn.remat(Block, policy=remat_lib.policy(cfg.remat_policy),
                             prevent_cse=False)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast), length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        # Named layer_0 … layer_{n−1}: the unscanned stack, and the layers that a decode
        # step runs whether or not the model scans (decode_params).
        self.layer = [block(cfg) for _ in range(cfg.num_layers)]
        self.ln_final = layer_norm(cfg.dtype)
        self.text_head = Projection((d,), (cfg.text_vocab_size,), ("embed",), ("vocab",),
                                     jnp.float32)
        self.image_head = Projection((d,), (cfg.image_vocab_size,), ("embed",), ("vocab",),
                                      jnp.float32)

    # --- training --------------------------------------------------------------------

    def __call__(self, text: jax.Array, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``text`` int [B, text_len] and ``image`` int [B, n] (the first n ≤ h·w image
        tokens, or [B, h, w]) → (text logits [B, text_len − 1, text_vocab] predicting
        text tokens 1 …, image logits [B, n, image_vocab] predicting image tokens
        0 … n − 1)."""
        x, _ = self._layers(self._embed_stream(text, image))
        return self._heads(x)

    def prefill(self, text: jax.Array, image: jax.Array):
        """:meth:`__call__` that also returns the cache: (text logits, image logits,
        (keys, values) each [layers, B, heads, text_len + n, head_dim])."""
        x, cache = self._layers(self._embed_stream(text, image))
        return (*self._heads(x), cache)

    def _image_position_embedding(self, a):
        w = self.config.image_width
        return (jnp.take(self.image_row_embedding, a // w, axis=0)
                + jnp.take(self.image_column_embedding, a % w, axis=0))

    def _embed_stream(self, text, image):
        cfg = self.config
        if text.shape[-1] != cfg.text_len:
            raise ValueError(f"text must have {cfg.text_len} tokens per row; "
                             f"got shape {text.shape}")
        image = image.reshape(image.shape[0], -1)
        n = image.shape[1]
        if n > cfg.image_len:
            raise ValueError(f"at most {cfg.image_len} image tokens; got {n}")
        text_x = jnp.where((text == cfg.pad_id)[..., None], self.text_pad_embedding[None],
                           jnp.take(self.text_embedding, text, axis=0))
        text_x = text_x + self.text_position_embedding[None]
        inputs = jnp.take(self.image_embedding, image[:, :max(n - 1, 0)], axis=0)
        start = jnp.broadcast_to(self.start_of_image_embedding[None],
                                 (image.shape[0], 1, cfg.d_model))
        image_x = jnp.concatenate([start, inputs], axis=1)[:, :n]
        image_x = image_x + self._image_position_embedding(jnp.arange(n))[None]
        x = jnp.concatenate([text_x, image_x], axis=1)
        return nn.with_logical_constraint(x.astype(cfg.dtype), ("batch", "length", "embed"))

    def _layers(self, x):
        masks, kinds = self.config.mask_table()
        masks = jnp.asarray(masks)
        if self.config.scan_layers:
            return self.layers(x, jnp.asarray(kinds), masks)
        caches = []
        for layer, kind in zip(self.layer, kinds):
            x, cache = layer(x, int(kind), masks)
            caches.append(cache)
        return x, tuple(jnp.stack(c) for c in zip(*caches))

    def _heads(self, x):
        x = self.ln_final(x).astype(jnp.float32)
        text_len = self.config.text_len
        return self.text_head(x[:, :text_len - 1]), self.image_head(x[:, text_len:])

    # --- sampling --------------------------------------------------------------------

    def decode(self, token: jax.Array, cache: DecodeCache, position: jax.Array | int):
        """One decode step: ``token`` int [B], the image token before image position
        ``position`` (ignored at position 0, whose input is the start-of-image vector),
        and the cache of :func:`decode_cache`. Returns (image logits [B, image_vocab],
        the cache with this position's keys and values).

        Parameters (:func:`decode_params`): the embedding tables, ``ln_final``,
        ``image_head`` and one entry per layer, ``layer_0`` … ``layer_{n−1}``, each one
        :class:`Block`'s own arrays —

            ln_attn, ln_mlp      scale, bias [d]
            query, key, value    kernel [d, heads, head_dim], bias [heads, head_dim]
            out                  kernel [heads, head_dim, d], bias [d]
            mlp_in               kernel [d, mlp_ratio·d], bias [mlp_ratio·d]
            mlp_out              kernel [mlp_ratio·d, d], bias [d]

        — so each step reads a layer's weights in place instead of slicing the scanned
        ``layers`` stack; ``text_head`` is not read.
        """
        cfg = self.config
        a = jnp.asarray(position, jnp.int32)
        previous = jnp.take(self.image_embedding,
                            jnp.clip(token, 0, cfg.image_vocab_size - 1), axis=0)
        x = jnp.where(a == 0, self.start_of_image_embedding[0][None, :], previous)
        x = (x + self._image_position_embedding(a)[None, :])[:, None, :]
        x = nn.with_logical_constraint(x.astype(cfg.dtype), ("batch", "length", "embed"))
        new_cache = []
        for layer, kind, layer_cache in zip(self.layer, cfg.schedule, cache):
            x, layer_cache = layer.decode(x, layer_cache, a, kind)
            new_cache.append(layer_cache)
        x = self.ln_final(x).astype(jnp.float32)
        return self.image_head(x[:, 0]), tuple(new_cache)


def decode_params(params, config: TransformerConfig):
    """The parameters a decode step reads: the scanned stack ``layers`` ([layers, …]
    arrays) split into ``layer_0`` … ``layer_{n−1}``. Made once per sampling call, so a
    decode step reads each layer's weights in place rather than slicing the stack on
    every token."""
    if not config.scan_layers:
        return params  # already one entry per layer
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(config.num_layers):
        params[f"layer_{i}"] = jax.tree.map(lambda p, i=i: p[i], stacked)
    return params


def decode_cache(cache: Cache, config: TransformerConfig) -> DecodeCache:
    """A prefill's cache ([layers, B, heads, text_len + n, head_dim]) as the decode
    steps read it: per layer the text keys and values, and the image keys and values
    padded with zeros to all ``h·w`` positions."""
    keys, values = cache
    text_len, pad = config.text_len, config.seq_len - keys.shape[3]
    widths = ((0, 0), (0, 0), (0, pad), (0, 0))
    return tuple(
        (keys[i, :, :, :text_len], values[i, :, :, :text_len],
         jnp.pad(keys[i, :, :, text_len:], widths), jnp.pad(values[i, :, :, text_len:], widths))
        for i in range(config.num_layers))
