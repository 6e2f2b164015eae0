"""Stage 1: the image tokenizer — DALL·E's discrete VAE or a VQ-VAE — as a Task.

dVAE (paper, appendix A): the encoder's logits at each grid position are relaxed with
gumbel-softmax at a temperature annealed 1 → 1/16 (cosine); the decoder sees the
relaxed one-hot and outputs a logit-Laplace distribution over mapped pixels; the KL to
the uniform prior is weighted by β rising 0 → 6.6 (cosine); the whole loss is
normalised per pixel (so the effective KL weight is β / (3·f²) per position).
Encoding is the argmax of the logits, without noise.

Optionally (``stage1.marginal_kl_weight``, 0 in the paper's configs) the dVAE also pays
for the KL from the batch's mean code distribution to the uniform one, weighted per
grid position like the paper's KL. Early in a short run every position tends to settle
on the same certain code; this term makes that costly without asking any one position
to be uncertain (docs/experiments/stage1.md, "Stage 1: quality on captioned shapes").

VQ-VAE: the same backbone with the encoder's last layer producing ``code_dim``
features, snapped to an EMA codebook (:mod:`dalle_jax.models.vqvae`), a commitment loss
weighted 0.25 and a logit-Laplace or MSE reconstruction loss.

The models themselves are in :mod:`dalle_jax.models.image_tokenizers`; loading a
trained run for inference is :mod:`dalle_jax.inference.image_tokenizer`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.models import dvae as dvae_lib
from dalle_jax.models import image_tokenizers
from dalle_jax.train import metrics as metrics_lib


def cosine_anneal(step, start: float, end: float, steps: int) -> jax.Array:
    """``start`` at step 0 to ``end`` at ``steps`` along a half cosine, then ``end``."""
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def logit_laplace_nll(stats: jax.Array, x_mapped: jax.Array) -> jax.Array:
    """Per-element negative log-likelihood of mapped pixels under the decoder's
    logit-Laplace distribution f(x|μ,b) = exp(−|logit x − μ| / b) / (2 b x (1 − x))."""
    channels = x_mapped.shape[-1]
    mu, log_b = stats[..., :channels], stats[..., channels:]
    logit_x = jnp.log(x_mapped) - jnp.log1p(-x_mapped)
    return (jnp.abs(logit_x - mu) * jnp.exp(-log_b) + log_b + jnp.log(2.0)
            + jnp.log(x_mapped) + jnp.log1p(-x_mapped))


def _per_example_mean(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1).mean(-1)


def _marginal_kl(log_q: jax.Array, weights: jax.Array) -> jax.Array:
    """KL from the batch's mean code distribution (real examples, every position) to
    the uniform one: ln K − H(q̄). It is 0 when the batch as a whole spreads over every
    code, whatever each position's own certainty, and ln K when all positions favour
    the same code; so penalising it counters codebook collapse without pushing each
    position towards uniform (which the per-position KL to the prior does)."""
    vocab = log_q.shape[-1]
    q = jnp.exp(log_q).reshape(log_q.shape[0], -1, vocab)
    w = weights / jnp.maximum(weights.sum(), 1.0)
    q_mean = jnp.einsum("bnk,b->k", q, w) / q.shape[1]
    entropy = -jnp.sum(q_mean * jnp.log(jnp.maximum(q_mean, 1e-30)))
    return math.log(vocab) - entropy


def _code_usage(codes: jax.Array, weights: jax.Array, vocab_size: int) -> dict[str, jax.Array]:
    one_hot = jax.nn.one_hot(codes.reshape(codes.shape[0], -1), vocab_size)
    counts = jnp.einsum("bnk,b->k", one_hot, weights)
    probs = counts / jnp.maximum(counts.sum(), 1.0)
    return {"perplexity": jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10))),
            "codes_used": jnp.mean((counts > 0).astype(jnp.float32))}


class ImageTokenizerTask:
    """The training core's view of stage 1."""

    def __init__(self, config, workdir, mesh):
        del mesh
        self.config = config
        self.workdir = workdir
        m = config.model
        self.model = image_tokenizers.from_config(m, jnp.dtype(config.train.compute_dtype))
        size = config.data.image_size
        factor = dvae_lib.downsample_factor(m.group_count)
        if size % factor:
            raise ValueError(f"data.image_size {size} is not divisible by the downsample "
                             f"factor {factor} of model.group_count={m.group_count}")
        self.image_shape = (size, size, 3)
        self.flops_per_example = 3 * self._forward_flops()

    def _forward_flops(self) -> float:
        """Forward FLOPs of one image, counted by XLA on the lowered computation."""
        variables = jax.eval_shape(self.init, jax.random.key(0))
        images = jax.ShapeDtypeStruct((1,) + self.image_shape, jnp.float32)
        return metrics_lib.counted_flops(
            lambda v, x: self.model.apply(v, x, train=False, mutable=False), variables, images)

    def init(self, rng):
        return init_variables(self.model, self.config.data.image_size, rng)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and types of a training batch of ``batch_size`` rows."""
        return {"image": jax.ShapeDtypeStruct((batch_size,) + self.image_shape, jnp.uint8),
                "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

    def loss(self, params, model_state, batch, rng, *, train: bool, step):
        s = self.config.stage1
        x = batch["image"].astype(jnp.float32) / 255.0
        x_mapped = dvae_lib.map_pixels(x)
        weights = batch["mask"].astype(jnp.float32)
        num_real = jnp.maximum(weights.sum(), 1.0)
        temperature = cosine_anneal(step, s.temperature_start, s.temperature_end,
                                    s.temperature_steps)
        gumbel_rng, vq_rng = jax.random.split(rng)
        variables = {"params": params, **model_state}
        rngs = {"gumbel": gumbel_rng, "vq": vq_rng}
        if train and model_state:  # the VQ codebook learns from this batch
            (stats, codes, aux), new_state = self.model.apply(
                variables, x_mapped, train=True, temperature=temperature, rngs=rngs,
                mutable=list(model_state))
        else:
            stats, codes, aux = self.model.apply(
                variables, x_mapped, train=train, temperature=temperature, rngs=rngs)
            new_state = model_state

        recon = dvae_lib.reconstruction(stats)
        mse = _per_example_mean((recon - x) ** 2)
        metrics = {
            "recon_mse": jnp.sum(mse * weights) / num_real,
            "psnr": jnp.sum(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)) * weights) / num_real,
            "temperature": temperature,
        }
        if self.config.model.recon_loss == "mse":
            recon_loss = mse
        else:
            recon_loss = _per_example_mean(logit_laplace_nll(stats, x_mapped))
        per_example = recon_loss
        pixels = math.prod(self.image_shape)
        if self.config.model.kind == "dvae":
            log_q = jax.nn.log_softmax(aux["logits"], -1)
            kl = jnp.sum(jnp.exp(log_q) * (log_q + math.log(self.config.model.vocab_size)),
                         axis=(1, 2, 3))
            beta = cosine_anneal(step, 0.0, s.kl_weight, s.kl_warmup_steps)
            per_example = per_example + beta * kl / pixels  # normalised per pixel
            metrics.update(kl=jnp.sum(kl * weights) / num_real, beta=beta)
            marginal_kl = _marginal_kl(log_q, weights)
            metrics["marginal_perplexity"] = self.config.model.vocab_size * jnp.exp(-marginal_kl)
            # A batch term, charged to every real example per grid position like the KL
            # above, so the mean over real examples adds it once.
            positions = math.prod(log_q.shape[1:3])
            per_example = per_example + (s.marginal_kl_weight * positions
                                         * marginal_kl / pixels)
        else:
            per_example = per_example + s.commitment_weight * aux["commitment"]
            metrics["commitment"] = aux["commitment"]
        metrics["recon_loss"] = jnp.sum(recon_loss * weights) / num_real
        metrics.update(_code_usage(codes, weights, self.config.model.vocab_size))
        loss = jnp.sum(per_example * weights) / num_real
        return loss, metrics, new_state

    # --- data -------------------------------------------------------------------------

    def train_data(self):
        return pipeline_lib.make_pipeline(self.config, "train", train=True)

    def eval_data(self):
        return pipeline_lib.make_pipeline(self.config, self.config.stage1.eval_split,
                                          train=False)

    def summaries(self, params, model_state, batch):
        """Originals above their reconstructions (codes decoded, no noise)."""
        images = batch["image"][:8]
        variables = {"params": params, **model_state}
        stats = self.model.apply(variables, dvae_lib.map_pixels(
            jnp.asarray(images, jnp.float32) / 255.0), train=False)[0]
        recon = np.asarray(jnp.round(dvae_lib.reconstruction(stats) * 255.0)).astype(np.uint8)
        return {"reconstructions": np.concatenate([images, recon])}


def init_variables(model: nn.Module, image_size: int, rng: jax.Array) -> dict[str, Any]:
    """The variables of a stage-1 ``model`` for ``image_size`` images: ``params`` and,
    for the VQ-VAE, the ``vq`` codebook collection (with logical partitioning boxes)."""
    params_rng, vq_rng = jax.random.split(rng)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return model.init({"params": params_rng, "vq": vq_rng, "gumbel": vq_rng}, images,
                      train=False)


def make_task(config, workdir, mesh):
    return ImageTokenizerTask(config, workdir, mesh)
