"""The contrastive text–image model (the reranker) as a Task of the training core.

Trains :class:`dalle_jax.models.contrastive.ContrastiveModel` on image–caption pairs of
any image source (captioned shapes, image–caption shards, tfds), captions tokenized by
the project's BPE tokenizer (BPE-dropout in training). The loss is the pairwise sigmoid
loss (``config.contrastive.loss = "sigmoid"``), computed block by block round the ring
of batch shards on a mesh, or CLIP's softmax loss (``"softmax"``).

Evaluation batches also report in-batch retrieval: image→text and text→image
Recall@1/5/10 among the batch's pairs (``config.contrastive.eval_batch_size`` of them;
captions that are equal count as the same). The evaluation command measures retrieval
over a whole split and zero-shot classification (dalle_jax.evaluation.contrastive).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax import stages
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data import text_tokenizer
from dalle_jax.models import contrastive as contrastive_lib
from dalle_jax.train import metrics as metrics_lib
from dalle_jax.train import sharding as sharding_lib

RECALL_AT = (1, 5, 10)


def model_config(config) -> contrastive_lib.ContrastiveConfig:
    """The model's config from a run config (``config.model``, ``config.text``, data)."""
    m = config.model
    return contrastive_lib.ContrastiveConfig(
        image_size=config.data.image_size,
        image_widths=tuple(m.image_widths),
        image_blocks=m.image_blocks,
        text_vocab_size=config.text.vocab_size,
        text_len=config.text.text_len,
        text_layers=m.text_layers,
        text_heads=m.text_heads,
        text_head_dim=m.text_head_dim,
        mlp_ratio=m.mlp_ratio,
        embed_dim=m.embed_dim,
        init_temperature=m.init_temperature,
        init_bias=m.init_bias,
        pad_id=text_tokenizer.PAD_ID,
        dtype=jnp.dtype(config.train.compute_dtype))


def recalls(z_img: jax.Array, z_txt: jax.Array, same: jax.Array,
            weights: jax.Array | None = None, ks=RECALL_AT) -> dict[str, jax.Array]:
    """Recall@k both ways of paired embeddings (row i of each is one pair): a caption is
    retrieved at k when one of the k images it scores highest is a match of it, an image
    when one of its k best captions is. ``same`` bool [B, B] says which pairs match
    (equal captions do); ``weights`` [B] leave padding rows out of both sides."""
    real = jnp.ones(z_img.shape[:1], bool) if weights is None else weights > 0
    same = same & real[None, :] & real[:, None]
    scores = jnp.where(real[None, :] & real[:, None], z_img @ z_txt.T, -jnp.inf)
    count = jnp.maximum(jnp.sum(real), 1)
    out = {}
    for k in ks:
        k_eff = min(k, scores.shape[0])
        _, best_captions = jax.lax.top_k(scores, k_eff)  # per image
        _, best_images = jax.lax.top_k(scores.T, k_eff)  # per caption
        hit_t = jnp.take_along_axis(same, best_captions, axis=1).any(1)
        hit_i = jnp.take_along_axis(same.T, best_images, axis=1).any(1)
        out[f"image_to_text_r@{k}"] = jnp.sum(hit_t & real) / count
        out[f"text_to_image_r@{k}"] = jnp.sum(hit_i & real) / count
    return out


def in_batch_recalls(z_img: jax.Array, z_txt: jax.Array, tokens: jax.Array,
                     weights: jax.Array, ks=RECALL_AT) -> dict[str, jax.Array]:
    """:func:`recalls` among the batch's real pairs; rows with equal tokens match."""
    same = jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)
    return recalls(z_img, z_txt, same, weights, ks)


class ContrastiveTask:
    """The training core's view of the contrastive model."""

    def __init__(self, config, workdir, mesh):
        self.config = config
        self.workdir = workdir
        self.mesh = mesh
        c = config.contrastive
        if c.loss not in contrastive_lib.LOSSES:
            raise errors.ConfigError("contrastive.loss", f"must be one of "
                                     f"{', '.join(contrastive_lib.LOSSES)}; got {c.loss!r}")
        self.model_config = model_config(config)
        self.model = contrastive_lib.ContrastiveModel(self.model_config)
        self._tokenizer = None
        self.flops_per_example = 3 * self._forward_flops()

    def _forward_flops(self) -> float:
        cfg = self.model_config
        variables = jax.eval_shape(self.init, jax.random.key(0))
        images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.uint8)
        tokens = jax.ShapeDtypeStruct((1, cfg.text_len), jnp.int32)
        return metrics_lib.counted_flops(lambda v, x, t: self.model.apply(v, x, t),
                                         variables, images, tokens)

    @property
    def text_tokenizer(self) -> text_tokenizer.TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = stages.run_text_tokenizer(
                self.config, self.workdir, self.model_config.text_vocab_size)
        return self._tokenizer

    # --- Task ---------------------------------------------------------------------------

    def init(self, rng):
        return init_variables(self.model, rng)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and types of a training batch of ``batch_size`` rows."""
        cfg = self.model_config
        return {"image": jax.ShapeDtypeStruct(
                    (batch_size, cfg.image_size, cfg.image_size, 3), jnp.uint8),
                "text_tokens": jax.ShapeDtypeStruct((batch_size, cfg.text_len), jnp.int32),
                "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

    def loss(self, params, model_state, batch, rng, *, train: bool, step):
        del rng, step
        tokens = batch["text_tokens"].astype(jnp.int32)
        weights = batch["mask"].astype(jnp.float32)
        z_img, z_txt, log_t, bias = self.model.apply({"params": params}, batch["image"],
                                                     tokens)
        if self.config.contrastive.loss == "sigmoid":
            if self.mesh is not None:
                loss = contrastive_lib.sigmoid_loss_chunked(
                    z_img, z_txt, log_t, bias, weights, self.mesh, sharding_lib.BATCH_AXES)
            else:
                loss = contrastive_lib.sigmoid_loss(z_img, z_txt, log_t, bias, weights)
        else:
            loss = contrastive_lib.softmax_loss(z_img, z_txt, log_t, bias, weights)
        count = jnp.maximum(jnp.sum(weights), 1.0)
        positive = jnp.sum(jnp.exp(log_t) * jnp.sum(z_img * z_txt, -1) * weights) / count
        metrics = {"temperature": jnp.exp(log_t), "bias": bias,
                   "positive_logit": positive + bias}
        if not train:  # the [B, B] scores of a batch: evaluation batches only
            metrics.update(in_batch_recalls(z_img, z_txt, tokens, weights))
        return loss, metrics, model_state

    def _pipeline(self, split: str, train: bool, **overrides):
        return pipeline_lib.make_pipeline(self.config, split, train=train,
                                          text_tokenizer=self.text_tokenizer, **overrides)

    def train_data(self):
        return self._pipeline("train", train=True)

    def eval_data(self):
        c = self.config.contrastive
        return self._pipeline(c.eval_split, train=False,
                              batch_size=c.eval_batch_size // jax.process_count())

    def summaries(self, params, model_state, batch) -> dict[str, Any]:
        del params, model_state, batch
        return {}


def named_run_config(config, key: str):
    """The config of the contrastive run that ``config`` names at ``key`` (e.g.
    ``"decoder.reranker_run"``: unCLIP's decoder and prior read its frozen towers); a
    ConfigError naming the key when none is named or it is not a contrastive run."""
    section, name = key.rsplit(".", 1)
    run = config[section].get(name)
    if not run:
        raise errors.ConfigError(key, "is required: the contrastive run whose embeddings "
                                 "condition the model, e.g. runs/demo/reranker")
    try:
        run_config = config_lib.read_config(run)
    except (FileNotFoundError, ValueError):
        raise errors.ConfigError(key, f"{run} is not a training run: it has no readable "
                                 f"{config_lib.CONFIG_FILE_NAME}") from None
    task = run_config.get("task") or ""
    if task != __name__:
        raise errors.ConfigError(key, f"{run} is a run of {task or 'no stage'}, not of the "
                                 f"contrastive model ({__name__})")
    return run_config


def init_variables(model: contrastive_lib.ContrastiveModel, rng: jax.Array) -> dict:
    cfg = model.config
    return model.init(rng, jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.uint8),
                      jnp.zeros((1, cfg.text_len), jnp.int32))


def make_task(config, workdir, mesh):
    return ContrastiveTask(config, workdir, mesh)
