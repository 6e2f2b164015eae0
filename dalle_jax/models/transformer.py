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

One module serves three modes: ``"full"`` (training, evaluation), ``"prefill"`` (a full
pass that also returns every layer's keys and values) and ``"decode"`` (one image
position against a key/value cache). Decoding reads the parameters one layer at a time
(:func:`decode_params`) and a cache split into text and image keys
(:func:`decode_cache`); each layer reads only the image keys its pattern can see —
a row layer the previous ``w + 1``, a column layer its column, a convolutional layer
the ``k // 2 + 1`` rows above — so the sparse patterns make decoding cheaper.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.train import step as step_lib

ATTENTION_KINDS = ("dense", "row", "column", "conv")
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


def image_mask(kind: str, height: int, width: int, conv_kernel: int = 11) -> np.ndarray:
    """bool [N, N] over image positions (N = h·w, raster order): may position ``a``
    attend to position ``b``? Always causal (b ≤ a).

    * dense: every earlier position.
    * row: the previous ``w + 1`` positions including itself (a − w ≤ b ≤ a), so the
      farthest is the same column of the previous row; the window wraps around row ends.
    * column: earlier positions of its own column (including itself).
    * conv: the causal ``k × k`` neighbourhood: at most ``k // 2`` rows up, with a
      column distance of at most ``k // 2`` measured around the grid (wrapping).
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
        if conv_kernel < 1 or conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be a positive odd number, got {conv_kernel}")
        half = conv_kernel // 2
        row_gap = a // width - b // width
        col_gap = np.abs(a % width - b % width)
        col_gap = np.minimum(col_gap, width - col_gap)
        return causal & (row_gap <= half) & (col_gap <= half)
    raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}")


def attention_mask(kind: str, text_len: int, height: int, width: int,
                   conv_kernel: int = 11) -> np.ndarray:
    """bool [L, L] for the whole stream (query, key): text → text causal, text → image
    never, image → text always, image → image by ``kind``."""
    n = height * width
    length = text_len + n
    mask = np.zeros((length, length), bool)
    mask[:text_len, :text_len] = np.tril(np.ones((text_len, text_len), bool))
    mask[text_len:, :text_len] = True
    mask[text_len:, text_len:] = image_mask(kind, height, width, conv_kernel)
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


def decode_window(kind: str, height: int, width: int, conv_kernel: int = 11) -> DecodeWindow:
    """The smallest read of each kind: dense all keys; row the ``w + 1`` keys ending at
    the query; column the query's column; conv the ``k // 2 + 1`` grid rows ending at
    the query's row. Checked to cover every key :func:`image_mask` allows."""
    n = height * width
    a = np.arange(n)
    if kind == "dense":
        size, stride, start = n, 1, np.zeros(n, np.int64)
    elif kind == "row":
        size, stride = min(width + 1, n), 1
        start = np.clip(a - width, 0, n - size)
    elif kind == "column":
        size, stride, start = height, width, a % width
    elif kind == "conv":
        rows = min(conv_kernel // 2 + 1, height)
        size, stride = rows * width, 1
        start = np.clip(a // width - (rows - 1), 0, height - rows) * width
    else:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of "
                         f"{ATTENTION_KINDS}")
    mask = image_mask(kind, height, width, conv_kernel)
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
    pad_id: int = 0
    dtype: Any = jnp.float32  # compute; parameters stay float32
    remat_policy: str = "none"
    # False: the layers are a Python loop (parameters layer_0 … layer_{n−1}) instead of
    # nn.scan (one stacked ``layers``): no per-layer stacking of saved activations and
    # gradients, so small models train faster, but compile time grows with depth.
    scan_layers: bool = True

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
                                         self.image_width, self.conv_kernel) for k in kinds])
        index = np.array([kinds.index(k) for k in schedule], np.int32)
        return masks, index

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


class _Projection(nn.Module):
    """``einsum(equation, x, kernel) + bias`` with logical axis names on both.

    The default equation contracts the trailing ``in_shape`` axes of ``x`` into
    ``out_shape``; attention passes its own to read and write head-major
    [B, heads, L, head_dim] activations. (Written out rather than ``nn.DenseGeneral``,
    whose initialiser works on a flattened kernel that a multi-axis sharding annotation
    does not fit.)
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    dtype: Any = jnp.float32
    equation: str | None = None
    bias_shape: tuple[int, ...] | None = None  # how the bias broadcasts in the output

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                   self.in_axes + self.out_axes),
            self.in_shape + self.out_shape, jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               self.out_axes),
                          self.out_shape, jnp.float32)
        equation = self.equation
        if equation is None:
            letters = "abcdefgh"
            ins = letters[:len(self.in_shape)]
            outs = letters[len(self.in_shape):len(self.in_shape) + len(self.out_shape)]
            equation = f"...{ins},{ins}{outs}->...{outs}"
        y = jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))
        bias = bias.astype(self.dtype)
        if self.bias_shape is not None:
            bias = bias.reshape(self.bias_shape)
        return y + bias


def _layer_norm(dtype, name=None):
    return nn.LayerNorm(
        dtype=dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


_MASKED = -1e30  # added to the scores of masked keys (exp underflows to exactly 0)


class Block(nn.Module):
    """Pre-LN attention + MLP.

    ``full`` / ``prefill``: one layer of the scanned stack, called as
    ``(x, layer_kind, masks)``. Attention runs head-major ([B, heads, L, head_dim]);
    masks enter as an additive [L, L] bias, so the backward pass keeps nothing of them
    per example.

    ``decode``: one layer of its own (``kind`` static), called as ``(x [B, 1, d],
    layer cache, position)``. It writes its key and value at the image position and
    attends to every text key and to the image keys of its :func:`decode_window`.
    Projections are token-major here: for one token per row XLA's CPU matrix-vector
    product would transpose every kernel on every step to produce head-major output.
    """

    config: TransformerConfig
    mode: str  # full | prefill | decode
    kind: str = "dense"  # decode only

    def setup(self):
        cfg = self.config
        d, heads = (cfg.d_model,), (cfg.num_heads, cfg.head_dim)
        if self.mode == "decode":
            qkv = dict(equation="bld,dhk->blhk")
            out_equation = "blhd,hdo->blo"
        else:
            qkv = dict(equation="bld,dhk->bhlk", bias_shape=(1, cfg.num_heads, 1,
                                                              cfg.head_dim))
            out_equation = "bhld,hdo->blo"
        self.ln_attn = _layer_norm(cfg.dtype)
        self.query = _Projection(d, heads, ("embed",), ("heads", "kv"), cfg.dtype, **qkv)
        self.key = _Projection(d, heads, ("embed",), ("heads", "kv"), cfg.dtype, **qkv)
        self.value = _Projection(d, heads, ("embed",), ("heads", "kv"), cfg.dtype, **qkv)
        self.out = _Projection(heads, d, ("heads", "kv"), ("embed",), cfg.dtype,
                               equation=out_equation)
        self.ln_mlp = _layer_norm(cfg.dtype)
        hidden = (cfg.mlp_ratio * cfg.d_model,)
        self.mlp_in = _Projection(d, hidden, ("embed",), ("mlp",), cfg.dtype)
        self.mlp_out = _Projection(hidden, d, ("mlp",), ("embed",), cfg.dtype)

    def _qkv(self, x):
        h = self.ln_attn(x)
        q = self.query(h) * jnp.asarray(self.config.head_dim ** -0.5, self.config.dtype)
        return q, self.key(h), self.value(h)

    def _mlp(self, x, attended):
        x = x + self.out(attended)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = nn.gelu(self.mlp_in(self.ln_mlp(x)))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        x = x + self.mlp_out(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def __call__(self, *args):
        if self.mode == "decode":
            return self._decode(*args)
        return self._full(*args)

    def _full(self, x, layer_kind, masks):
        dtype = self.config.dtype
        q, k, v = self._qkv(x)
        length = x.shape[1]
        allowed = masks[layer_kind][:length, :length]
        bias = jnp.where(allowed, 0.0, _MASKED).astype(jnp.float32)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores + bias, axis=-1).astype(dtype)
        attended = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        return self._mlp(x, attended), ((k, v) if self.mode == "prefill" else None)

    def _decode(self, x, cache, position):
        cfg = self.config
        dtype = cfg.dtype
        text_k, text_v, image_k, image_v = cache
        q, k, v = (t[:, 0] for t in self._qkv(x))  # [B, heads, head_dim]
        start = (0, 0, position, 0)
        image_k = jax.lax.dynamic_update_slice(image_k, k[:, :, None].astype(image_k.dtype),
                                               start)
        image_v = jax.lax.dynamic_update_slice(image_v, v[:, :, None].astype(image_v.dtype),
                                               start)
        window = decode_window(self.kind, cfg.image_height, cfg.image_width,
                               cfg.conv_kernel)
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
            jnp.einsum("bhd,bhkd->bhk", q, text_k.astype(dtype),
                       preferred_element_type=jnp.float32),
            jnp.einsum("bhd,bhkd->bhk", q, keys.astype(dtype),
                       preferred_element_type=jnp.float32)
            + jnp.where(allowed, 0.0, _MASKED),
        ], axis=-1)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        attended = (jnp.einsum("bhk,bhkd->bhd", probs[..., :cfg.text_len],
                               text_v.astype(dtype))
                    + jnp.einsum("bhk,bhkd->bhd", probs[..., cfg.text_len:],
                                 values.astype(dtype)))
        x = self._mlp(x, attended[:, None])
        return x, (text_k, text_v, image_k, image_v)


class Transformer(nn.Module):
    """The stage-2 model. See the module docstring for the stream layout."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, text: jax.Array | None, image: jax.Array, *, mode: str = "full",
                 cache: Cache | None = None, position: jax.Array | int = 0):
        """
        full / prefill: ``text`` int [B, text_len] and ``image`` int [B, n] (the first
          n ≤ h·w image tokens, or [B, h, w]). Returns (text logits [B, text_len − 1,
          text_vocab] predicting tokens 1…, image logits [B, n, image_vocab] predicting
          image tokens 0 … n−1) — and in prefill the cache [layers, B, heads, text_len + n, head_dim].
        decode: ``image`` int [B], the token before image position ``position``
          (ignored at position 0, whose input is the start-of-image vector), and the
          cache made by :func:`decode_cache`; the parameters are the per-layer ones of
          :func:`decode_params`. Returns (image logits [B, image_vocab], cache).
        """
        cfg = self.config
        if mode not in ("full", "prefill", "decode"):
            raise ValueError(f"mode must be full, prefill or decode; got {mode!r}")
        d = cfg.d_model
        embed_init = nn.initializers.normal(0.02)

        def table(name, shape, axes):
            return self.param(name, nn.with_logical_partitioning(embed_init, axes), shape)

        text_embedding = table("text_embedding", (cfg.text_vocab_size, d), ("vocab", "embed"))
        text_pad = table("text_pad_embedding", (cfg.text_len, d), ("length", "embed"))
        text_position = table("text_position_embedding", (cfg.text_len, d), ("length", "embed"))
        image_embedding = table("image_embedding", (cfg.image_vocab_size, d), ("vocab", "embed"))
        start_of_image = table("start_of_image_embedding", (1, d), (None, "embed"))
        row_embedding = table("image_row_embedding", (cfg.image_height, d), (None, "embed"))
        col_embedding = table("image_column_embedding", (cfg.image_width, d), (None, "embed"))

        def image_position_embedding(a):
            return (jnp.take(row_embedding, a // cfg.image_width, axis=0)
                    + jnp.take(col_embedding, a % cfg.image_width, axis=0))

        if mode == "decode":
            a = jnp.asarray(position, jnp.int32)
            token = jnp.clip(image, 0, cfg.image_vocab_size - 1)
            x = jnp.where(a == 0, start_of_image[0][None, :],
                          jnp.take(image_embedding, token, axis=0))
            x = (x + image_position_embedding(a)[None, :])[:, None, :]
        else:
            if text.shape[-1] != cfg.text_len:
                raise ValueError(f"text must have {cfg.text_len} tokens per row; "
                                 f"got shape {text.shape}")
            image = image.reshape(image.shape[0], -1)
            n = image.shape[1]
            if n > cfg.image_len:
                raise ValueError(f"at most {cfg.image_len} image tokens; got {n}")
            text_x = jnp.where((text == cfg.pad_id)[..., None], text_pad[None],
                               jnp.take(text_embedding, text, axis=0)) + text_position[None]
            inputs = jnp.take(image_embedding, image[:, :max(n - 1, 0)], axis=0)
            image_x = jnp.concatenate(
                [jnp.broadcast_to(start_of_image[None], (image.shape[0], 1, d)), inputs],
                axis=1)[:, :n]
            image_x = image_x + image_position_embedding(jnp.arange(n))[None]
            x = jnp.concatenate([text_x, image_x], axis=1)
        x = nn.with_logical_constraint(x.astype(cfg.dtype), ("batch", "length", "embed"))

        block = Block
        if cfg.remat_policy != "none" and mode != "decode":
            block = nn.remat(Block, policy=step_lib.remat_policy(cfg.remat_policy),
                             prevent_cse=False)
        if mode == "decode":
            new_cache = []
            for i, kind in enumerate(cfg.schedule):
                x, layer_cache = Block(cfg, mode, kind, name=f"layer_{i}")(
                    x, cache[i], a)
                new_cache.append(layer_cache)
            new_cache = tuple(new_cache)
        elif not cfg.scan_layers:
            masks, kinds = cfg.mask_table()
            masks = jnp.asarray(masks)
            caches = []
            for i in range(cfg.num_layers):
                x, layer_cache = block(cfg, mode, name=f"layer_{i}")(x, int(kinds[i]), masks)
                caches.append(layer_cache)
            new_cache = (tuple(jnp.stack(c) for c in zip(*caches)) if mode == "prefill"
                         else None)
        else:
            stack = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast), length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            masks, kinds = cfg.mask_table()
            x, new_cache = stack(cfg, mode, name="layers")(x, jnp.asarray(kinds),
                                                          jnp.asarray(masks))
        x = _layer_norm(cfg.dtype, "ln_final")(x).astype(jnp.float32)

        image_head = _Projection((d,), (cfg.image_vocab_size,), ("embed",), ("vocab",),
                                 jnp.float32, name="image_head")
        if mode == "decode":
            return image_head(x[:, 0]), new_cache
        text_head = _Projection((d,), (cfg.text_vocab_size,), ("embed",), ("vocab",),
                                jnp.float32, name="text_head")
        text_logits = text_head(x[:, :cfg.text_len - 1])
        image_logits = image_head(x[:, cfg.text_len:])
        if mode == "prefill":
            return text_logits, image_logits, new_cache
        return text_logits, image_logits


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
