"""unCLIP's diffusion prior (DALL·E 2) as a Task: a caption → a contrastive image embedding.

The prior (:mod:`dalle_jax.models.prior`) learns the distribution of the image
embeddings of the contrastive model trained here (the reranker) given a caption; the
unCLIP decoder then draws an image from such an embedding. The contrastive run
(``config.prior.reranker_run``) is frozen: its towers embed each training batch as it is
read (:class:`dalle_jax.data.embeddings.EmbeddedBatches`) and its tokenizer is the
prior's, so the prior reads the same tokens the text tower does (no BPE-dropout: the
text embedding is of the plain tokens, as at sampling time).

Loss: continuous time ``t ~ U(0, 1)``, ``z = α x + σ ε`` with x the unit image
embedding scaled by sqrt(D), the plain MSE of the model's prediction in its own
parameterisation (``config.diffusion.prediction``, x0 by default as in unCLIP: the
embedding itself). Each row's text (tokens and text embedding) is dropped with
probability ``config.prior.text_drop_prob`` (unCLIP's 10%), which trains the
unconditional model that classifier-free guidance needs.

Metrics: the cosine of the predicted clean embedding (renormalised) with the image's
embedding (``x0_image_cosine``) and with the caption's (``x0_text_cosine``), beside the
caption's own cosine with the image (``text_image_cosine``: what using the text
embedding as the image embedding would score). Evaluation batches also sample each row's
embedding from noise (``config.prior.eval_sample_steps`` DDIM steps at the configured
guidance) and report its cosines (``sample_image_cosine``, ``sample_text_cosine``).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dalle_jax import errors
from dalle_jax.data import embeddings as embeddings_lib
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.diffusion import parameterization
from dalle_jax.diffusion import sampler as diffusion_sampler
from dalle_jax.diffusion import schedules
from dalle_jax.models import prior as prior_lib
from dalle_jax.stages import contrastive as contrastive_stage
from dalle_jax.train import metrics as metrics_lib

# What a training batch holds once embedded; the pipeline's other keys stay on the host.
BATCH_KEYS = ("text_tokens", "image_embedding", "text_embedding", "mask")


def model_config(config, reranker_config) -> prior_lib.PriorConfig:
    """The prior's config from its run config (``config.model``, ``config.train``) and
    the contrastive run's (embedding size, caption length and vocabulary)."""
    m = config.model
    return prior_lib.PriorConfig(
        embed_dim=reranker_config.model.embed_dim,
        text_len=reranker_config.text.text_len,
        vocab_size=reranker_config.text.vocab_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        head_dim=m.head_dim,
        mlp_ratio=m.mlp_ratio,
        pad_id=0,  # dalle_jax.data.text_tokenizer.PAD_ID
        dtype=jnp.dtype(config.train.compute_dtype),
        remat_policy=config.train.remat_policy)


def bundle_init(config, reranker_config):
    """``rng -> variables`` (logically boxed) of the prior a run config describes on the
    contrastive run of ``reranker_config``: what placing its parameters needs
    (:func:`dalle_jax.inference.runs.load_variables`, a bundle's part)."""
    model = prior_lib.DiffusionPrior(model_config(config, reranker_config))
    return lambda rng: prior_lib.init_variables(model, rng)


def normalize(x: jax.Array) -> jax.Array:
    """Rows divided by their L2 norm (float32)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


def denoiser(model: prior_lib.DiffusionPrior, params):
    """The sampler's denoiser: ``cond`` is ``{"tokens": [B, L], "text_embedding": [B, D],
    "keep_text": [B] bool}``."""
    def denoise(z, logsnr, cond):
        return model.apply({"params": params}, z, logsnr, cond["tokens"],
                           cond["text_embedding"], keep_text=cond["keep_text"])
    return denoise


def conditions(tokens: jax.Array, text_embedding: jax.Array) -> tuple[dict, dict]:
    """(cond, uncond) of the captions: the same rows with the text kept and dropped."""
    rows = tokens.shape[0]
    cond = {"tokens": tokens, "text_embedding": text_embedding,
            "keep_text": jnp.ones((rows,), bool)}
    return cond, {**cond, "keep_text": jnp.zeros((rows,), bool)}


def start_noise(keys: jax.Array, embed_dim: int) -> jax.Array:
    """Each row's starting noise [B, D], from ``fold_in(keys[i], 0)``."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (embed_dim,)))(keys)


def sample_embeddings(model: prior_lib.DiffusionPrior, params, tokens: jax.Array,
                      text_embedding: jax.Array, keys: jax.Array, *,
                      schedule: schedules.Schedule, prediction: str, steps: int,
                      eta: float = 0.0, guidance_scale: float = 1.0) -> jax.Array:
    """Unit image embeddings [B, D] for captions (tokens [B, L] and their unit text
    embeddings [B, D]) by DDIM over ``steps`` steps (``eta`` 0 deterministic, 1 DDPM
    ancestral), one ``lax.scan``.

    ``guidance_scale`` w: classifier-free guidance, ``uncond + w (cond − uncond)``; the
    conditional and unconditional rows run in one pass of a doubled batch (w = 1, a
    Python number: the conditional model alone, one pass). ``keys`` [B], one per row
    (its starting noise from ``fold_in(key, 0)``, its step noise from ``fold_in(key,
    1)``), so a row's result does not depend on its batch. The sample, a scaled
    embedding, is returned divided by its norm. No clipping: the components of a scaled
    unit vector are not bounded by 1.
    """
    z = start_noise(keys, model.config.embed_dim)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    cond, uncond = conditions(tokens, text_embedding)
    x0 = diffusion_sampler.sample(denoiser(model, params), schedule, z, step_keys,
                                  steps=steps, kind=prediction, eta=eta, cond=cond,
                                  uncond=uncond, guidance_scale=guidance_scale,
                                  clip_x0=False)
    return normalize(x0)


class _Selected:
    """The batches of ``batches`` with only ``keys``; position and clean-up are the
    wrapped iterator's."""

    def __init__(self, batches, keys):
        self.batches = batches
        self.keys = tuple(keys)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        return {k: batch[k] for k in self.keys}

    def get_state(self) -> dict[str, Any]:
        return self.batches.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.batches.set_state(state)

    def close(self) -> None:
        self.batches.close()


class PriorTask:
    """The training core's view of the diffusion prior.

    ``reranker``: the contrastive model (a :class:`dalle_jax.inference.reranker.Reranker`)
    to embed with instead of loading ``config.prior.reranker_run`` (tests)."""

    def __init__(self, config, workdir, mesh, *, reranker=None):
        del mesh
        self.config = config
        self.workdir = workdir
        p = config.prior
        self._reranker = reranker
        self.reranker_config = (reranker.config if reranker is not None
                                else contrastive_stage.named_run_config(
                                    config, "prior.reranker_run"))
        image_size = self.reranker_config.data.image_size
        if config.data.image_size != image_size:
            raise errors.ConfigError("data.image_size", f"must be the contrastive run's "
                                     f"image size {image_size} (prior.reranker_run), got "
                                     f"{config.data.image_size}")
        if not 0.0 <= p.text_drop_prob < 1.0:
            raise errors.ConfigError("prior.text_drop_prob", f"must lie in [0, 1), got "
                                     f"{p.text_drop_prob}")
        try:
            parameterization.validate_kind(config.diffusion.prediction)
        except ValueError as e:
            raise errors.ConfigError("diffusion.prediction", str(e)) from None
        self.prediction = config.diffusion.prediction
        self.schedule = schedules.from_config(config.diffusion.schedule)
        self.model_config = model_config(config, self.reranker_config)
        self.model = prior_lib.DiffusionPrior(self.model_config)
        sample = config.diffusion.sample
        self.guidance_scale = float(sample.get("guidance_scale", 1.0))
        self.eval_sample_steps = int(p.get("eval_sample_steps", 0))
        self.flops_per_example = 3 * self._forward_flops()

    def _forward_flops(self) -> float:
        cfg = self.model_config
        variables = jax.eval_shape(self.init, jax.random.key(0))
        z = jax.ShapeDtypeStruct((1, cfg.embed_dim), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.float32)
        tokens = jax.ShapeDtypeStruct((1, cfg.text_len), jnp.int32)
        return metrics_lib.counted_flops(
            lambda v, z, t, tokens: self.model.apply(v, z, t, tokens, z), variables, z, t,
            tokens)

    @property
    def reranker(self):
        """The frozen contrastive model, loaded on first use."""
        if self._reranker is None:
            from dalle_jax.inference import reranker as reranker_lib  # pylint: disable=g-import-not-at-top
            self._reranker = reranker_lib.Reranker.load_run(self.config.prior.reranker_run)
        return self._reranker

    # --- Task ---------------------------------------------------------------------------

    def init(self, rng):
        return prior_lib.init_variables(self.model, rng)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and types of a training batch of ``batch_size`` rows."""
        cfg = self.model_config
        embedding = jax.ShapeDtypeStruct((batch_size, cfg.embed_dim), jnp.float32)
        return {"text_tokens": jax.ShapeDtypeStruct((batch_size, cfg.text_len), jnp.int32),
                "image_embedding": embedding, "text_embedding": embedding,
                "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

    def loss(self, params, model_state, batch, rng, *, train: bool, step):
        del step
        cfg = self.model_config
        image_e = batch["image_embedding"].astype(jnp.float32)
        text_e = batch["text_embedding"].astype(jnp.float32)
        tokens = batch["text_tokens"].astype(jnp.int32)
        weights = batch["mask"].astype(jnp.float32)
        count = jnp.maximum(jnp.sum(weights), 1.0)
        b = image_e.shape[0]
        t_rng, noise_rng, drop_rng, sample_rng = jax.random.split(rng, 4)

        def mean(values):
            return jnp.sum(values * weights) / count

        x = image_e * cfg.scale
        t = jax.random.uniform(t_rng, (b,))
        logsnr = self.schedule.logsnr(t)
        alpha, sigma = schedules.alpha_sigma(logsnr)
        eps = jax.random.normal(noise_rng, x.shape)
        z = alpha[:, None] * x + sigma[:, None] * eps
        if train:
            keep = jax.random.uniform(drop_rng, (b,)) >= self.config.prior.text_drop_prob
        else:
            keep = jnp.ones((b,), bool)
        prediction = self.model.apply({"params": params}, z, logsnr, tokens, text_e,
                                      keep_text=keep, train=train)
        target = parameterization.target(x, eps, logsnr, self.prediction)
        per_example = jnp.mean((prediction - target) ** 2, axis=-1)
        x0, _ = parameterization.to_x0_eps(prediction, z, logsnr, self.prediction)
        x0 = normalize(x0)
        metrics = {"x0_image_cosine": mean(jnp.sum(x0 * image_e, -1)),
                   "x0_text_cosine": mean(jnp.sum(x0 * text_e, -1)),
                   "text_image_cosine": mean(jnp.sum(text_e * image_e, -1)),
                   "text_kept": mean(keep.astype(jnp.float32))}
        if not train and self.eval_sample_steps:
            sampled = sample_embeddings(
                self.model, params, tokens, text_e, jax.random.split(sample_rng, b),
                schedule=self.schedule, prediction=self.prediction,
                steps=self.eval_sample_steps, guidance_scale=self.guidance_scale)
            metrics["sample_image_cosine"] = mean(jnp.sum(sampled * image_e, -1))
            metrics["sample_text_cosine"] = mean(jnp.sum(sampled * text_e, -1))
        return jnp.sum(per_example * weights) / count, metrics, model_state

    # --- data -------------------------------------------------------------------------

    def _batches(self, split: str, train: bool):
        reranker = self.reranker
        images = pipeline_lib.make_pipeline(self.config, split, train=train,
                                            text_tokenizer=reranker.text_tokenizer)
        return _Selected(embeddings_lib.EmbeddedBatches(images, reranker, images=True,
                                                        texts=True), BATCH_KEYS)

    def train_data(self):
        return self._batches("train", train=True)

    def eval_data(self):
        return self._batches(self.config.prior.eval_split, train=False)

    def summaries(self, params, model_state, batch) -> dict[str, Any]:
        del params, model_state, batch
        return {}


def make_task(config, workdir, mesh):
    return PriorTask(config, workdir, mesh)
