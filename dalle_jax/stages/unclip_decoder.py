"""unCLIP's decoder (DALL·E 2): a diffusion U-Net that draws an image from its
contrastive image embedding, as a Task.

The embedding is the frozen image tower of the contrastive model trained here (the
reranker, ``config.decoder.reranker_run``), computed as the batch is read
(:mod:`dalle_jax.data.embeddings`). The U-Net (:mod:`dalle_jax.models.unet`) reads it
twice, as unCLIP's decoder does: projected and added to the time embedding (every
block's FiLM), and projected into ``decoder.context_tokens`` tokens that every
attention layer attends to beside the image's positions. The embedding is given scaled
by √D (unit-variance components); for classifier-free guidance it is replaced by zeros
in a fraction ``decoder.embedding_drop_prob`` of the rows (unCLIP: 10%), so the same
model is also the unconditional one (a zero context: :func:`condition`).

Loss: continuous time ``t ~ U(0, 1)``, ``z = α x + σ ε`` on the image in [−1, 1], the
plain MSE of the prediction in its own parameterisation (``config.diffusion.prediction``,
v by default).

Sampling (:func:`decode`) is the diffusion core's DDIM with η (η > 0 gives the
variations their diversity) and guidance; :func:`invert` is DDIM inversion under the
same embedding, from which η = 0 decoding returns the image.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import errors
from dalle_jax.data import embeddings as embeddings_lib
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.diffusion import parameterization
from dalle_jax.diffusion import sampler as diffusion_sampler
from dalle_jax.diffusion import schedules
from dalle_jax.models import unet as unet_lib
from dalle_jax.stages import contrastive as contrastive_stage
from dalle_jax.stages.upsampler import to_uint8, to_unit
from dalle_jax.train import metrics as metrics_lib

SUMMARY_STEPS = 10  # DDIM steps of the image summaries
SUMMARY_IMAGES = 4


def model_config(config, embed_dim: int) -> unet_lib.UNetConfig:
    """The U-Net's config from a run config and the embedding's width."""
    m = config.model
    return unet_lib.UNetConfig(
        out_channels=3,
        base_width=m.base_width,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_levels=tuple(m.attention_levels),
        head_dim=m.head_dim,
        dropout=m.dropout,
        context_dim=embed_dim,
        context_tokens=config.decoder.context_tokens,
        num_groups=m.num_groups,
        dtype=jnp.dtype(config.train.compute_dtype),
        remat_policy=config.train.remat_policy)


def condition(embedding: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """The U-Net's context from unit embeddings [B, D]: scaled by √D, and zero in the
    rows where ``keep`` [B] is False (the unconditional model)."""
    context = embedding.astype(jnp.float32) * math.sqrt(embedding.shape[-1])
    if keep is not None:
        context = jnp.where(keep[:, None], context, 0.0)
    return context


def denoiser(model: unet_lib.UNet, params):
    """The sampler's denoiser: ``cond`` is ``{"context": [B, D]}`` (:func:`condition`)."""
    def denoise(z, logsnr, cond):
        return model.apply({"params": params}, z, logsnr, context=cond["context"])
    return denoise


def _conds(embeddings: jax.Array):
    cond = {"context": condition(embeddings)}
    return cond, {"context": jnp.zeros_like(cond["context"])}


def start_noise(keys: jax.Array, size: int) -> jax.Array:
    """Each row's starting noise [B, size, size, 3] from its key."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0),
                                                (size, size, 3)))(keys)


def decode(model: unet_lib.UNet, params, embeddings: jax.Array, keys: jax.Array, *,
           schedule: schedules.Schedule, prediction: str, size: int, steps: int,
           eta: float = 0.0, guidance_scale: float = 1.0,
           z_T: jax.Array | None = None) -> jax.Array:
    """Unit image embeddings [B, D] → uint8 images [B, size, size, 3] by DDIM over
    ``steps`` steps (``eta`` 0 deterministic, 1 DDPM ancestral) with classifier-free
    guidance at ``guidance_scale`` (1: the conditional model alone, 0: unconditional).

    ``keys`` [B]: each row's starting noise and sampling noise, so a row's image does not
    depend on its batch. ``z_T`` [B, size, size, 3] replaces the starting noise (an
    inversion, :func:`invert`); the x0 estimates are then not clipped, so that η = 0
    returns the inverted image.
    """
    cond, uncond = _conds(embeddings)
    inverted = z_T is not None
    if not inverted:
        z_T = start_noise(keys, size)
    sample_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    x0 = diffusion_sampler.sample(denoiser(model, params), schedule, z_T, sample_keys,
                                  steps=steps, kind=prediction, eta=eta, cond=cond,
                                  uncond=uncond, guidance_scale=guidance_scale,
                                  clip_x0=not inverted)
    return to_uint8(x0)


def decode_float(model: unet_lib.UNet, params, embeddings: jax.Array, z_T: jax.Array, *,
                 schedule: schedules.Schedule, prediction: str, steps: int,
                 guidance_scale: float = 1.0) -> jax.Array:
    """Deterministic (η = 0, unclipped) decoding of ``z_T`` to images in [−1, 1], float:
    the inverse of :func:`invert`."""
    cond, uncond = _conds(embeddings)
    return diffusion_sampler.sample(denoiser(model, params), schedule, z_T,
                                    jax.random.key(0), steps=steps, kind=prediction,
                                    eta=0.0, cond=cond, uncond=uncond,
                                    guidance_scale=guidance_scale, clip_x0=False)


def invert(model: unet_lib.UNet, params, images: jax.Array, embeddings: jax.Array, *,
           schedule: schedules.Schedule, prediction: str, steps: int,
           guidance_scale: float = 1.0) -> jax.Array:
    """DDIM inversion of uint8 (or [−1, 1] float) images [B, S, S, 3] under their
    embeddings: the z_T from which η = 0 decoding with the same steps and guidance
    returns them."""
    x = to_unit(images) if jnp.issubdtype(images.dtype, jnp.integer) else images
    cond, uncond = _conds(embeddings)
    return diffusion_sampler.encode(denoiser(model, params), schedule, x, steps=steps,
                                    kind=prediction, cond=cond, uncond=uncond,
                                    guidance_scale=guidance_scale)


def init_variables(model: unet_lib.UNet, rng: jax.Array, size: int) -> dict[str, Any]:
    """The U-Net's variables (logically boxed), from inputs of ``size`` px."""
    z = jnp.zeros((1, size, size, 3), jnp.float32)
    context = jnp.zeros((1, model.config.context_dim), jnp.float32)
    return model.init({"params": rng}, z, jnp.zeros((1,), jnp.float32), context=context)


class UnclipDecoderTask:
    """The training core's view of the unCLIP decoder."""

    def __init__(self, config, workdir, mesh):
        del mesh
        self.config = config
        self.workdir = workdir
        d = config.decoder
        r = contrastive_stage.named_run_config(config, "decoder.reranker_run")
        self.image_size = config.data.image_size
        if r.data.image_size != self.image_size:
            raise errors.ConfigError("data.image_size", f"is {self.image_size} but the "
                                     f"contrastive run {d.reranker_run} embeds "
                                     f"{r.data.image_size} px images")
        self.embed_dim = int(r.model.embed_dim)
        if not 0.0 <= d.embedding_drop_prob < 1.0:
            raise errors.ConfigError("decoder.embedding_drop_prob", "must lie in [0, 1)")
        parameterization.validate_kind(config.diffusion.prediction)
        self.prediction = config.diffusion.prediction
        self.schedule = schedules.from_config(config.diffusion.schedule)
        try:
            self.model_config = model_config(config, self.embed_dim)
        except ValueError as e:
            raise errors.ConfigError("model", str(e)) from None
        self.model = unet_lib.UNet(self.model_config)
        multiple = unet_lib.min_size_multiple(self.model_config)
        if self.image_size % multiple:
            raise errors.ConfigError("data.image_size", f"{self.image_size} is not a multiple "
                                     f"of {multiple}, which the U-Net's levels need")
        self._reranker = None
        self._summary_decode = None
        self.flops_per_example = 3 * self._forward_flops()

    def _forward_flops(self) -> float:
        variables = jax.eval_shape(self.init, jax.random.key(0))
        size = self.image_size
        z = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.float32)
        c = jax.ShapeDtypeStruct((1, self.embed_dim), jnp.float32)
        return metrics_lib.counted_flops(
            lambda v, z, t, c: self.model.apply(v, z, t, context=c), variables, z, t, c)

    @property
    def reranker(self):
        """The frozen contrastive model (loaded on first use)."""
        if self._reranker is None:
            from dalle_jax.inference import reranker as reranker_lib  # pylint: disable=g-import-not-at-top
            self._reranker = reranker_lib.Reranker.load_run(self.config.decoder.reranker_run)
        return self._reranker

    # --- Task ---------------------------------------------------------------------------

    def init(self, rng):
        return init_variables(self.model, rng, self.image_size)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and types of a training batch of ``batch_size`` rows."""
        s = self.image_size
        return {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.uint8),
                "image_embedding": jax.ShapeDtypeStruct((batch_size, self.embed_dim),
                                                        jnp.float32),
                "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

    def loss(self, params, model_state, batch, rng, *, train: bool, step):
        del step
        x = to_unit(batch["image"])
        weights = batch["mask"].astype(jnp.float32)
        count = jnp.maximum(jnp.sum(weights), 1.0)
        b = x.shape[0]
        drop_rng, t_rng, noise_rng, dropout_rng = jax.random.split(rng, 4)
        keep = jax.random.uniform(drop_rng, (b,)) >= self.config.decoder.embedding_drop_prob
        context = condition(batch["image_embedding"], keep)

        t = jax.random.uniform(t_rng, (b,))
        logsnr = self.schedule.logsnr(t)
        alpha, sigma = schedules.alpha_sigma(logsnr)
        eps = jax.random.normal(noise_rng, x.shape)
        z = alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps
        prediction = self.model.apply({"params": params}, z, logsnr, context=context,
                                      train=train, rngs={"dropout": dropout_rng})
        target = parameterization.target(x, eps, logsnr, self.prediction)
        per_example = jnp.mean((prediction - target) ** 2, axis=(1, 2, 3))
        x0, _ = parameterization.to_x0_eps(prediction, z, logsnr, self.prediction)
        x0_mse = jnp.mean((jnp.clip(x0, -1, 1) - x) ** 2, axis=(1, 2, 3))
        kept = weights * keep
        metrics = {"x0_mse": jnp.sum(x0_mse * weights) / count,
                   "embedding_kept": jnp.sum(kept) / count}
        return jnp.sum(per_example * weights) / count, metrics, model_state

    # --- data -------------------------------------------------------------------------

    def _data(self, split: str, train: bool):
        images = pipeline_lib.make_pipeline(self.config, split, train=train)
        return embeddings_lib.EmbeddedBatches(images, self.reranker, images=True)

    def train_data(self):
        return self._data("train", train=True)

    def eval_data(self):
        return self._data(self.config.decoder.eval_split, train=False)

    def summaries(self, params, model_state, batch):
        """Rows of originals and their decodings (DDIM at the run's guidance scale)."""
        del model_state
        sample = self.config.diffusion.sample
        if self._summary_decode is None:
            self._summary_decode = jax.jit(lambda p, e, keys: decode(
                self.model, p, e, keys, schedule=self.schedule, prediction=self.prediction,
                size=self.image_size, steps=SUMMARY_STEPS, eta=float(sample.eta),
                guidance_scale=float(sample.guidance_scale)))
        emb = jnp.asarray(batch["image_embedding"][:SUMMARY_IMAGES])
        keys = jax.random.split(jax.random.key(0), len(emb))
        ours = np.asarray(self._summary_decode(params, emb, keys))
        return {"original_decoded": np.concatenate(
            [np.asarray(batch["image"][:SUMMARY_IMAGES]), ours])}


def make_task(config, workdir, mesh):
    return UnclipDecoderTask(config, workdir, mesh)
