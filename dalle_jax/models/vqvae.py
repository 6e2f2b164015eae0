"""A VQ-VAE on the dVAE's backbone: the encoder's features snap to an EMA codebook.

The encoder and decoder are the dVAE's (:mod:`dalle_jax.models.dvae`), the encoder's
last layer producing ``code_dim`` features instead of logits; the quantiser is
:class:`dalle_jax.models.vq.VectorQuantizer` (its codebook lives in the ``"vq"``
collection, model state to the training core). Gradients pass straight through the
quantiser; the commitment loss is returned for the stage to weight.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dalle_jax.models import dvae
from dalle_jax.models import space_to_depth
from dalle_jax.models import vq


class VQVAE(nn.Module):
    """Encoder, EMA vector quantiser and decoder; the same interface as
    :class:`dalle_jax.models.dvae.DiscreteVAE`."""

    vocab_size: int
    n_hid: int
    n_blk_per_group: int
    group_count: int
    n_init: int
    code_dim: int = 64
    vq_decay: float = 0.99
    vq_restart_threshold: float = 1.0
    vq_normalize: bool = False
    # "dvae": the dVAE's encoder and decoder; "space_to_depth": the backbone of
    # :mod:`dalle_jax.models.space_to_depth` with ``widths`` (one per halving, so
    # ``len(widths) == group_count - 1``) and ``n_blk_per_group`` blocks per width.
    backbone: str = "dvae"
    widths: tuple[int, ...] = ()
    dtype: Any = jnp.float32

    def setup(self):
        if self.backbone == "space_to_depth":
            self.encoder = space_to_depth.Encoder(self.widths, self.n_blk_per_group,
                                                  self.code_dim, dtype=self.dtype)
            self.decoder = space_to_depth.Decoder(self.widths, self.n_blk_per_group, 3,
                                                  dtype=self.dtype)
        else:
            self.encoder = dvae.Encoder(self.n_hid, self.n_blk_per_group, self.group_count,
                                        self.code_dim, dtype=self.dtype)
            self.decoder = dvae.Decoder(self.n_init, self.n_hid, self.n_blk_per_group,
                                        self.group_count, 3, dtype=self.dtype)
        self.quantizer = vq.VectorQuantizer(
            self.vocab_size, self.code_dim, decay=self.vq_decay,
            restart_threshold=self.vq_restart_threshold, normalize=self.vq_normalize)

    def encode(self, x_mapped: jax.Array) -> jax.Array:
        """Codes int32 [B, h, w]: the nearest codebook entry of each feature vector."""
        return self.quantizer.codes(self.encoder(x_mapped))

    def decode(self, codes: jax.Array) -> jax.Array:
        """Decoder statistics [B, H, W, 6] of int codes [B, h, w]."""
        return self.decoder(self.quantizer.lookup(codes))

    def __call__(self, x_mapped: jax.Array, *, train: bool,
                 temperature: jax.Array | float = 1.0):
        """(decoder statistics, codes, VQ statistics); ``temperature`` is unused (the
        dVAE's relaxation), taken so that both models are called alike."""
        del temperature
        quantized, codes, stats = self.quantizer(self.encoder(x_mapped), train=train)
        return self.decoder(quantized.astype(self.dtype)), codes, stats
