"""unCLIP's diffusion prior (DALL·E 2): a caption → the contrastive model's image embedding.

A decoder-only transformer under a causal mask over one sequence of ``text_len + 4``
positions (Ramesh et al. 2022)::

    position   0 … L−1        L                 L + 1        L + 2               L + 3
    input      text tokens    text embedding    timestep     noised image        query
                              (projected)       (log-SNR)    embedding (proj.)   (learnt)

The query's output, layer-normed and projected to ``embed_dim``, is the prediction: of
the clean image embedding by default (unCLIP predicts x0 directly; the stage may train
eps or v instead, see :mod:`dalle_jax.diffusion.parameterization`).

The diffused variable is the contrastive model's unit image embedding scaled by
``sqrt(embed_dim)``, so that each component has about unit variance, the scale the
noise schedules assume; the text embedding enters at the same scale. A sample is turned
back into an embedding by dividing it by its norm.

Text positions holding padding (``pad_id``) read a learnt null vector, one per position.
Classifier-free guidance: where ``keep_text`` is False every text position reads its
null vector and the text embedding is replaced by a learnt null embedding, so the
output does not depend on the caption at all: the unconditional model (the empty
caption's), trained by dropping the text of a share of the rows.

The timestep enters as sinusoidal features of its log-SNR
(:func:`dalle_jax.models.unet.logsnr_features`) through a two-layer MLP. The layers are
:class:`dalle_jax.models.transformer.Block` (pre-LN attention and GELU MLP), unrolled,
optionally rematerialised; parameters are float32 whatever the compute dtype.
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
from dalle_jax.models import transformer as transformer_lib
from dalle_jax.models import unet as unet_lib

EXTRA_POSITIONS = 4  # text embedding, timestep, noised image embedding, query


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    embed_dim: int = 128  # D: the contrastive model's embedding
    text_len: int = 20  # the contrastive model's caption length and vocabulary
    vocab_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    mlp_ratio: int = 4
    pad_id: int = 0
    dtype: Any = jnp.float32  # compute; parameters stay float32
    remat_policy: str = "none"  # remat.POLICIES name, applied to every layer

    def __post_init__(self):
        sizes = (self.embed_dim, self.text_len, self.vocab_size, self.num_layers,
                 self.num_heads, self.head_dim, self.mlp_ratio)
        if min(sizes) < 1:
            raise ValueError(f"the prior's sizes must be positive, got {self}")
        remat_lib.policy(self.remat_policy)  # a ValueError for an unknown name

    @property
    def width(self) -> int:
        """The transformer's width d: ``num_heads · head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def seq_len(self) -> int:
        return self.text_len + EXTRA_POSITIONS

    @property
    def scale(self) -> float:
        """``sqrt(embed_dim)``: unit embedding → the diffused variable."""
        return math.sqrt(self.embed_dim)

    def block_config(self) -> transformer_lib.TransformerConfig:
        """The settings :class:`transformer_lib.Block` reads (width, heads, MLP, dtype)."""
        return transformer_lib.TransformerConfig(
            text_vocab_size=self.vocab_size, text_len=self.seq_len, image_vocab_size=1,
            image_height=1, image_width=1, num_layers=self.num_layers,
            num_heads=self.num_heads, head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
            attention="dense", pad_id=self.pad_id, dtype=self.dtype,
            remat_policy=self.remat_policy)


class DiffusionPrior(nn.Module):
    """The prior; see the module docstring. Parameters: the tables ``token_embedding``,
    ``null_token_embedding`` [text_len, d], ``null_text_embedding``, ``query_embedding``
    and ``position_embedding`` (no weight decay by the optimizer's default patterns), the
    projections ``text_in``, ``time_in``, ``time_out`` and ``noised_in``, ``layer_0`` …
    ``layer_{n−1}``, ``ln_final`` and ``out``."""

    config: PriorConfig

    @nn.compact
    def __call__(self, z: jax.Array, logsnr: jax.Array, tokens: jax.Array,
                 text_embedding: jax.Array, *, keep_text: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        """z [B, D] the noised scaled image embedding; logsnr [B] (or a scalar); tokens
        int [B, text_len] (the contrastive model's); text_embedding [B, D] unit;
        keep_text bool [B] (None: keep every row's). Returns the prediction fp32 [B, D]."""
        del train  # no dropout
        cfg = self.config
        d, batch = cfg.width, z.shape[0]
        if tokens.shape[-1] != cfg.text_len:
            raise ValueError(f"tokens must have {cfg.text_len} per row; got shape "
                             f"{tokens.shape}")
        init = nn.initializers.normal(0.02)

        def table(name, shape, axes):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape)

        def project(name, size_in, size_out, axes_in, axes_out, dtype=cfg.dtype):
            return transformer_lib.Projection((size_in,), (size_out,), (axes_in,),
                                              (axes_out,), dtype, name=name)

        tokens_table = table("token_embedding", (cfg.vocab_size, d), ("vocab", "embed"))
        null_text = table("null_token_embedding", (cfg.text_len, d), ("length", "embed"))
        null_embedding = table("null_text_embedding", (1, d), (None, "embed"))
        query = table("query_embedding", (1, d), (None, "embed"))
        position = table("position_embedding", (cfg.seq_len, d), ("length", "embed"))

        keep = (jnp.ones((batch, 1), bool) if keep_text is None
                else jnp.asarray(keep_text, bool).reshape(batch, 1))
        # Padding and dropped captions read the null vector of their position.
        real = (tokens != cfg.pad_id) & keep
        text_x = jnp.where(real[:, :, None], jnp.take(tokens_table, tokens, axis=0),
                           null_text[None])  # [B, L, d]
        text_e = project("text_in", cfg.embed_dim, d, "mlp", "embed")(
            text_embedding.astype(jnp.float32) * cfg.scale)  # [B, d]
        text_e = jnp.where(keep, text_e, null_embedding)

        logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), (batch,))
        time = unet_lib.logsnr_features(logsnr, d)
        time = nn.gelu(project("time_in", time.shape[-1], d, None, "mlp")(time))
        time = project("time_out", d, d, "mlp", "embed")(time)
        noised = project("noised_in", cfg.embed_dim, d, "mlp", "embed")(z)

        x = jnp.concatenate([
            text_x.astype(cfg.dtype), text_e[:, None].astype(cfg.dtype),
            time[:, None].astype(cfg.dtype), noised[:, None].astype(cfg.dtype),
            jnp.broadcast_to(query[None], (batch, 1, d)).astype(cfg.dtype)], axis=1)
        x = x + position[None].astype(cfg.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        block = transformer_lib.Block
        if cfg.remat_policy != "none":
            block = nn.remat(block, policy=remat_lib.policy(cfg.remat_policy),
                             prevent_cse=False)
        causal = jnp.asarray(np.tril(np.ones((cfg.seq_len, cfg.seq_len), bool))[None])
        block_cfg = cfg.block_config()
        for i in range(cfg.num_layers):
            x, _ = block(block_cfg, name=f"layer_{i}")(x, 0, causal)
        out = transformer_lib.layer_norm(cfg.dtype, name="ln_final")(x[:, -1])
        return project("out", d, cfg.embed_dim, "embed", "mlp", jnp.float32)(
            out.astype(jnp.float32))


def init_variables(model: DiffusionPrior, rng: jax.Array) -> dict[str, Any]:
    """The prior's variables (logically boxed), from a one-row batch."""
    cfg = model.config
    z = jnp.zeros((1, cfg.embed_dim), jnp.float32)
    return model.init(rng, z, jnp.zeros((1,), jnp.float32),
                      jnp.zeros((1, cfg.text_len), jnp.int32), z,
                      keep_text=jnp.ones((1,), bool))
