"""Vector quantisation with an EMA codebook (VQ-VAE: van den Oord 2017, Razavi 2019).

Each encoder output vector snaps to its nearest codebook entry; gradients pass
straight through to the encoder; a commitment loss keeps encoder outputs near their
entries. The codebook is not learned by gradients: in training each entry moves to the
exponential moving average of the vectors assigned to it (decay 0.99), with Laplace
smoothing of the cluster counts, and entries that fall out of use are restarted from
random encoder outputs of the current batch. With restarts on, every entry starts
"dead", so the first training step seeds the whole codebook from encoder outputs (a
codebook far from the encoder's range otherwise pulls the encoder towards it through
the commitment loss before the decoder has learned to read anything).

``normalize=True`` compares and stores unit vectors (cosine distance, as in
ViT-VQGAN), which keeps encoder outputs and entries on one scale.

The codebook and its statistics live in the ``"vq"`` variable collection, which the
training core carries as model state (mutable in training, read-only otherwise).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class VectorQuantizer(nn.Module):
    codebook_size: int
    code_dim: int
    decay: float = 0.99
    epsilon: float = 1e-5  # Laplace smoothing of the cluster counts
    # An entry whose EMA count of assigned vectors per step drops below this is
    # restarted from a random encoder output of the batch; 0 disables restarts.
    restart_threshold: float = 1.0
    normalize: bool = False

    def setup(self):
        init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
        self.codebook = self.variable(
            "vq", "codebook", lambda: self._unit(init(self.make_rng("params"),
                                                      (self.codebook_size, self.code_dim))))
        start = 0.0 if self.restart_threshold > 0 else 1.0
        self.cluster_size = self.variable(
            "vq", "cluster_size", lambda: jnp.full((self.codebook_size,), start, jnp.float32))
        self.embed_sum = self.variable("vq", "embed_sum",
                                       lambda: self.codebook.value * start)

    def _unit(self, x: jax.Array) -> jax.Array:
        if not self.normalize:
            return x
        return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))

    def codes(self, z: jax.Array) -> jax.Array:
        """Nearest codebook entry of each vector: int32 [...]."""
        flat = self._unit(z.reshape(-1, self.code_dim).astype(jnp.float32))
        codebook = self.codebook.value
        distances = (jnp.sum(flat ** 2, -1, keepdims=True) - 2 * flat @ codebook.T
                     + jnp.sum(codebook ** 2, -1)[None])
        return jnp.argmin(distances, -1).astype(jnp.int32).reshape(z.shape[:-1])

    def lookup(self, codes: jax.Array) -> jax.Array:
        """Codebook vectors of int codes: [..., code_dim]."""
        return jnp.take(self.codebook.value, codes, axis=0)

    def __call__(self, z: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array,
                                                              dict[str, Any]]:
        """Returns (straight-through quantised z, codes, {commitment, perplexity, ...}).

        In training (with the ``"vq"`` collection mutable) the codebook is updated
        from this batch after the codes are chosen.
        """
        z = self._unit(z.astype(jnp.float32))
        codes = self.codes(z)
        quantized = self.lookup(codes)
        commitment = jnp.mean((z - jax.lax.stop_gradient(quantized)) ** 2)
        straight_through = z + jax.lax.stop_gradient(quantized - z)

        one_hot = jax.nn.one_hot(codes.reshape(-1), self.codebook_size, dtype=jnp.float32)
        counts = one_hot.sum(0)
        probs = counts / jnp.maximum(counts.sum(), 1.0)
        stats = {
            "commitment": commitment,
            "perplexity": jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10))),
            "codes_used": jnp.mean((counts > 0).astype(jnp.float32)),
        }
        if train and self.is_mutable_collection("vq"):
            self._ema_update(z.reshape(-1, self.code_dim), one_hot, counts)
        return straight_through, codes, stats

    def _ema_update(self, flat: jax.Array, one_hot: jax.Array, counts: jax.Array) -> None:
        flat = jax.lax.stop_gradient(flat)
        cluster_size = self.decay * self.cluster_size.value + (1 - self.decay) * counts
        embed_sum = self.decay * self.embed_sum.value + (1 - self.decay) * (one_hot.T @ flat)
        total = cluster_size.sum()
        smoothed = ((cluster_size + self.epsilon)
                    / (total + self.codebook_size * self.epsilon) * total)
        codebook = self._unit(embed_sum / smoothed[:, None])
        if self.restart_threshold > 0:
            dead = cluster_size < self.restart_threshold
            picks = jax.random.randint(self.make_rng("vq"), (self.codebook_size,), 0,
                                       flat.shape[0])
            fresh = flat[picks]
            codebook = jnp.where(dead[:, None], fresh, codebook)
            cluster_size = jnp.where(dead, self.restart_threshold, cluster_size)
            embed_sum = jnp.where(dead[:, None], fresh * self.restart_threshold, embed_sum)
        self.codebook.value = codebook
        self.cluster_size.value = cluster_size
        self.embed_sum.value = embed_sum
