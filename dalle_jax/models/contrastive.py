"""A contrastive text–image model: two towers, one embedding space, two losses.

The reranker of DALL·E (section 2.5 of the paper draws many samples per caption and keeps
those a contrastive model scores best), trained in the project:

* Image tower: the space-to-depth backbone of :mod:`dalle_jax.models.space_to_depth`
  (one width per halving), then the final grid's features flattened and projected to
  ``embed_dim``. Flattening rather than average-pooling keeps where things are, which a
  caption like "in the top left" is about.
* Text tower: token and position embeddings, pre-LN transformer blocks
  (:class:`dalle_jax.models.transformer.Block`) under a causal mask, and the final
  layer norm's output at the last caption token (the one that has seen the whole
  caption; padding comes after it), projected to ``embed_dim``.
* Both embeddings are L2-normalised. The logits of image i and caption j are
  ``t · ⟨z_img_i, z_txt_j⟩ + b`` with a learnable ``log t`` and ``b``.

Losses: the pairwise sigmoid loss (SigLIP, Zhai et al. 2023), the default, and the
softmax (InfoNCE) loss of CLIP (Radford et al. 2021). :func:`sigmoid_loss_chunked` is
the sigmoid loss on a mesh: each device scores its images against one device's
captions at a time while the captions travel round the ring of batch shards, so no
device holds more than a [local batch, local batch] block of logits.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dalle_jax.models import space_to_depth
from dalle_jax.models import transformer as transformer_lib

LOSSES = ("sigmoid", "softmax")


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    image_size: int = 32
    image_widths: tuple[int, ...] = (32, 64, 128)  # one per halving
    image_blocks: int = 1
    text_vocab_size: int = 512
    text_len: int = 20
    text_layers: int = 2
    text_heads: int = 4
    text_head_dim: int = 32
    mlp_ratio: int = 4
    embed_dim: int = 128
    init_temperature: float = 10.0
    init_bias: float = -10.0
    pad_id: int = 0
    dtype: Any = jnp.float32

    def __post_init__(self):
        factor = 2 ** len(self.image_widths)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by "
                             f"2^{len(self.image_widths)} (one halving per image width)")

    @property
    def text_width(self) -> int:
        return self.text_heads * self.text_head_dim

    def text_block_config(self) -> transformer_lib.TransformerConfig:
        """The settings :class:`transformer_lib.Block` reads (width, heads, MLP, dtype)."""
        return transformer_lib.TransformerConfig(
            text_vocab_size=self.text_vocab_size, text_len=self.text_len,
            image_vocab_size=1, image_height=1, image_width=1, num_layers=self.text_layers,
            num_heads=self.text_heads, head_dim=self.text_head_dim,
            mlp_ratio=self.mlp_ratio, attention="dense", pad_id=self.pad_id,
            dtype=self.dtype)


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


class ImageTower(nn.Module):
    config: ContrastiveConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """uint8 or [0, 1] float images [B, H, W, 3] → unit embeddings fp32 [B, D]."""
        cfg = self.config
        x = images.astype(jnp.float32)
        if jnp.issubdtype(images.dtype, jnp.integer):
            x = x / 255.0
        x = 2.0 * x - 1.0
        features = space_to_depth.Encoder(cfg.image_widths, cfg.image_blocks,
                                          cfg.image_widths[-1], dtype=cfg.dtype,
                                          name="backbone")(x)
        b, h, w, c = features.shape
        project = transformer_lib.Projection((h * w * c,), (cfg.embed_dim,), ("mlp",),
                                             ("embed",), jnp.float32, name="project")
        return _normalize(project(features.reshape(b, h * w * c)))


class TextTower(nn.Module):
    config: ContrastiveConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """int tokens [B, text_len] (padding after the caption) → unit embeddings [B, D]."""
        cfg = self.config
        block_cfg = cfg.text_block_config()
        init = nn.initializers.normal(0.02)
        embedding = self.param("token_embedding", nn.with_logical_partitioning(
            init, ("vocab", "embed")), (cfg.text_vocab_size, cfg.text_width))
        position = self.param("position_embedding", nn.with_logical_partitioning(
            init, ("length", "embed")), (cfg.text_len, cfg.text_width))
        x = (jnp.take(embedding, tokens, axis=0) + position[None]).astype(cfg.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        causal = {0: jnp.tril(jnp.ones((cfg.text_len, cfg.text_len), bool))}
        for i in range(cfg.text_layers):
            x, _ = transformer_lib.Block(block_cfg, name=f"layer_{i}")(x, 0, causal)
        x = transformer_lib.layer_norm(cfg.dtype, name="ln_final")(x).astype(jnp.float32)
        length = jnp.sum(tokens != cfg.pad_id, axis=-1)
        last = jnp.take_along_axis(x, jnp.maximum(length - 1, 0)[:, None, None], axis=1)[:, 0]
        project = transformer_lib.Projection((cfg.text_width,), (cfg.embed_dim,),
                                             ("embed",), ("mlp",), jnp.float32,
                                             name="project")
        return _normalize(project(last))


class ContrastiveModel(nn.Module):
    """The two towers and the logit scale and bias. ``__call__`` returns
    (image embeddings, text embeddings, log t, b)."""

    config: ContrastiveConfig

    def setup(self):
        cfg = self.config
        self.image_tower = ImageTower(cfg)
        self.text_tower = TextTower(cfg)
        self.log_temperature = self.param(
            "log_temperature", nn.with_logical_partitioning(
                nn.initializers.constant(math.log(cfg.init_temperature)), ()), ())
        self.bias = self.param("bias", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.init_bias), ()), ())

    def embed_images(self, images: jax.Array) -> jax.Array:
        return self.image_tower(images)

    def embed_texts(self, tokens: jax.Array) -> jax.Array:
        return self.text_tower(tokens)

    def __call__(self, images: jax.Array, tokens: jax.Array):
        return (self.image_tower(images), self.text_tower(tokens), self.log_temperature,
                self.bias)


# --- losses -----------------------------------------------------------------------------


def logits(z_img: jax.Array, z_txt: jax.Array, log_temperature, bias) -> jax.Array:
    """[B_img, B_txt] pair logits ``t · z_img z_txtᵀ + b``."""
    return jnp.exp(log_temperature) * (z_img @ z_txt.T) + bias


def sigmoid_loss(z_img: jax.Array, z_txt: jax.Array, log_temperature, bias,
                 weights: jax.Array | None = None) -> jax.Array:
    """The pairwise sigmoid loss: −Σ_ij log σ(y_ij · logit_ij) / n, with y = +1 on the
    diagonal (matching pairs) and −1 elsewhere; ``weights`` [B] drop padding rows from
    both sides, n is the number of real rows."""
    b = z_img.shape[0]
    w = jnp.ones((b,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    signs = 2.0 * jnp.eye(b) - 1.0
    terms = -jax.nn.log_sigmoid(signs * logits(z_img, z_txt, log_temperature, bias))
    return jnp.sum(terms * w[:, None] * w[None, :]) / jnp.maximum(jnp.sum(w), 1.0)


def softmax_loss(z_img: jax.Array, z_txt: jax.Array, log_temperature, bias=0.0,
                 weights: jax.Array | None = None) -> jax.Array:
    """CLIP's symmetric InfoNCE loss: the mean of the image→text and text→image
    cross-entropies of the matching pair, over real rows (``weights``; padding rows are
    not candidates either). A bias shifts every logit of a row alike and cancels."""
    del bias
    b = z_img.shape[0]
    w = jnp.ones((b,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    scores = logits(z_img, z_txt, log_temperature, 0.0)
    scores = jnp.where(w[None, :] > 0, scores, -1e30)  # padding captions are no candidates
    i2t = jax.nn.log_softmax(scores, axis=1)
    scores_t = jnp.where(w[:, None] > 0, scores, -1e30)
    t2i = jax.nn.log_softmax(scores_t, axis=0)
    diagonal = jnp.diagonal(i2t) + jnp.diagonal(t2i)
    return -jnp.sum(0.5 * diagonal * w) / jnp.maximum(jnp.sum(w), 1.0)


def sigmoid_loss_chunked(z_img: jax.Array, z_txt: jax.Array, log_temperature, bias,
                         weights: jax.Array, mesh, axes: Sequence[str]) -> jax.Array:
    """:func:`sigmoid_loss` of a batch sharded over the mesh ``axes``, computed block
    by block: each device keeps its images and scores them against the captions of one
    device at a time, passing the captions on round the ring (``ppermute``) after each
    block. Memory per device is one [B/n, B/n] block, not the [B, B] matrix; the result
    equals the unchunked loss."""
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes:
        return sigmoid_loss(z_img, z_txt, log_temperature, bias, weights)
    n = math.prod(mesh.shape[a] for a in axes)
    spec = jax.sharding.PartitionSpec(axes)
    scalar = jax.sharding.PartitionSpec()

    def local(z_i, z_t, w, log_t, b):
        ring = [(j, (j + 1) % n) for j in range(n)]
        signs = 2.0 * jnp.eye(z_i.shape[0]) - 1.0

        def block(carry, k):
            total, z_t, w_t = carry
            own = (k == 0)  # at step k the captions came from device me − k
            y = jnp.where(own, signs, -1.0)
            terms = -jax.nn.log_sigmoid(y * logits(z_i, z_t, log_t, b))
            total = total + jnp.sum(terms * w[:, None] * w_t[None, :])
            z_t = jax.lax.ppermute(z_t, axes, ring)
            w_t = jax.lax.ppermute(w_t, axes, ring)
            return (total, z_t, w_t), None

        (total, _, _), _ = jax.lax.scan(block, (jnp.zeros((), jnp.float32), z_t, w),
                                        jnp.arange(n))
        return jax.lax.psum(total, axes), jax.lax.psum(jnp.sum(w), axes)

    total, count = jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec, spec, scalar, scalar),
        out_specs=(scalar, scalar), check_vma=False)(
            z_img, z_txt, weights.astype(jnp.float32), log_temperature, bias)
    return total / jnp.maximum(count, 1.0)
