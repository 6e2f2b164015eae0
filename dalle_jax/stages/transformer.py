"""Stage 2: the DALL·E transformer over [caption tokens | image tokens] as a Task.

Trains from the code shards of the encoding job (``config.data.source = "codes"``), or
from images encoded on the fly by a frozen stage-1 run named by
``config.stage2.image_tokenizer`` (any other ``config.data.source``). Captions are
tokenized with the run's BPE tokenizer (BPE-dropout in training) and dropped with
probability ``config.stage2.caption_dropout`` so that classifier-free guidance works.

Loss (paper, section 2.2): the cross-entropy of text tokens and of image tokens, each
normalised by the number of tokens of its kind in the batch (text: real, non-padding
targets), weighted 1/8 and 7/8 by default.
"""
from __future__ import annotations

import math
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dalle_jax import stages
from dalle_jax import visualize
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data import text_tokenizer
from dalle_jax.models import transformer as transformer_lib
from dalle_jax.sampling import sampler as sampler_lib
from dalle_jax.train import sharding as sharding_lib


def model_config(config) -> transformer_lib.TransformerConfig:
    """The transformer's config from a run config (``config.model``, ``config.text``)."""
    m = config.model
    attention = m.attention if isinstance(m.attention, str) else tuple(m.attention)
    if "conv_mask" not in m:  # the config of a run made before the option existed
        raise ValueError(
            "config.model has no conv_mask: runs configured before it existed trained "
            "their convolutional layer with conv_mask='wrap_columns'; load them with a "
            "config that sets it")
    return transformer_lib.TransformerConfig(
        text_vocab_size=config.text.vocab_size,
        text_len=config.text.text_len,
        image_vocab_size=m.image_vocab_size,
        image_height=m.image_grid[0],
        image_width=m.image_grid[1],
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        head_dim=m.head_dim,
        mlp_ratio=m.mlp_ratio,
        attention=attention,
        conv_kernel=m.conv_kernel,
        conv_mask=m.conv_mask,
        pad_id=text_tokenizer.PAD_ID,
        dtype=jnp.dtype(config.train.compute_dtype),
        remat_policy=config.train.remat_policy,
        scan_layers=m.scan_layers)


def sequence_loss(text_logits: jax.Array, image_logits: jax.Array, text: jax.Array,
                  codes: jax.Array, weights: jax.Array, *, text_weight: float,
                  image_weight: float, pad_id: int = text_tokenizer.PAD_ID
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted two-kind loss and its parts.

    ``text_logits`` [B, T−1, Vt] predict ``text[:, 1:]`` (padding targets excluded);
    ``image_logits`` [B, N, Vi] predict ``codes`` [B, N]; ``weights`` [B] are 1 for real
    rows and 0 for padding rows. Each cross-entropy is a mean over its own tokens.
    """
    targets = text[:, 1:]
    text_w = (targets != pad_id).astype(jnp.float32) * weights[:, None]
    text_ce = optax.softmax_cross_entropy_with_integer_labels(
        text_logits.astype(jnp.float32), targets)
    image_w = jnp.broadcast_to(weights[:, None], codes.shape).astype(jnp.float32)
    image_ce = optax.softmax_cross_entropy_with_integer_labels(
        image_logits.astype(jnp.float32), codes)
    text_loss = jnp.sum(text_ce * text_w) / jnp.maximum(jnp.sum(text_w), 1.0)
    image_loss = jnp.sum(image_ce * image_w) / jnp.maximum(jnp.sum(image_w), 1.0)
    loss = text_weight * text_loss + image_weight * image_loss
    image_accuracy = jnp.sum((jnp.argmax(image_logits, -1) == codes) * image_w) / \
        jnp.maximum(jnp.sum(image_w), 1.0)
    return loss, {
        "text_loss": text_loss,
        "image_loss": image_loss,
        "bits_per_image_token": image_loss / math.log(2.0),
        "image_accuracy": image_accuracy,
        "text_tokens": jnp.sum(text_w),
    }


class _Encoding:
    """A data iterator whose images are replaced by the codes of a frozen tokenizer."""

    def __init__(self, inner, image_tokenizer):
        self.inner = inner
        self.image_tokenizer = image_tokenizer

    def _encode(self, batch):
        batch = dict(batch)
        batch["codes"] = np.asarray(self.image_tokenizer.encode(batch.pop("image")))
        return batch

    def __iter__(self):
        return self

    def __next__(self):
        return self._encode(next(self.inner))

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)

    def close(self):
        self.inner.close()


class TransformerTask:
    """The training core's view of stage 2."""

    def __init__(self, config, workdir, mesh):
        self.config = config
        self.workdir = workdir
        self.mesh = mesh
        self.model_config = model_config(config)
        self.model = transformer_lib.Transformer(self.model_config)
        self.flops_per_example = self.model_config.flops_per_example(train=True)
        s = config.stage2
        if abs(s.text_loss_weight + s.image_loss_weight - 1.0) > 1e-6:
            logging.warning("stage2 loss weights sum to %g, not 1",
                            s.text_loss_weight + s.image_loss_weight)
        self._tokenizer = None
        self._image_tokenizer = None

    # --- helpers ------------------------------------------------------------------------

    def _check_data(self):
        """Code shards must match the model's grid and vocabulary."""
        data = self.config.data
        if data.source != "codes":
            if not self.config.stage2.image_tokenizer:
                raise ValueError(
                    f"config.data.source={data.source!r} gives images: set "
                    "config.stage2.image_tokenizer to a stage-1 run to encode them on the "
                    "fly, or encode the dataset first and train from its code shards "
                    "(config.data.source='codes')")
            return
        if not data.data_dir:
            raise ValueError("config.data.data_dir must name the code shards directory "
                             "(the encoding job's --config.encode.output_dir)")
        from dalle_jax.data import code_records  # pylint: disable=g-import-not-at-top
        metadata = code_records.read_metadata(data.data_dir, data.name, "train")
        cfg = self.model_config
        grid = tuple(metadata.get("code_shape", ()))
        if grid != (cfg.image_height, cfg.image_width):
            raise ValueError(f"the code shards in {data.data_dir} hold {grid} grids but "
                             f"config.model.image_grid is {(cfg.image_height, cfg.image_width)}")
        if metadata.get("vocab_size", 0) > cfg.image_vocab_size:
            raise ValueError(f"the code shards use {metadata['vocab_size']} codes but "
                             f"config.model.image_vocab_size is {cfg.image_vocab_size}")

    @property
    def text_tokenizer(self) -> text_tokenizer.TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = stages.run_text_tokenizer(
                self.config, self.workdir, self.model_config.text_vocab_size)
        return self._tokenizer

    @property
    def image_tokenizer(self):
        """The frozen stage-1 run (for on-the-fly encoding and sample summaries), or None."""
        if self._image_tokenizer is None and self.config.stage2.image_tokenizer:
            from dalle_jax.inference.image_tokenizer import ImageTokenizerRun  # pylint: disable=g-import-not-at-top
            self._image_tokenizer = ImageTokenizerRun.load(self.config.stage2.image_tokenizer)
            cfg = self.model_config
            if (self._image_tokenizer.grid_size != cfg.image_height
                    or self._image_tokenizer.vocab_size > cfg.image_vocab_size):
                raise ValueError(
                    f"the image tokenizer {self.config.stage2.image_tokenizer} makes "
                    f"{self._image_tokenizer.grid_size}² grids of "
                    f"{self._image_tokenizer.vocab_size} codes; the model expects "
                    f"{cfg.image_height}x{cfg.image_width} and {cfg.image_vocab_size}")
        return self._image_tokenizer

    # --- Task ---------------------------------------------------------------------------

    def init(self, rng):
        return init_variables(self.model, rng)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and types of a training batch of ``batch_size`` rows (code shards)."""
        cfg = self.model_config
        return {"text_tokens": jax.ShapeDtypeStruct((batch_size, cfg.text_len), jnp.int32),
                "codes": jax.ShapeDtypeStruct(
                    (batch_size, cfg.image_height, cfg.image_width), jnp.int32),
                "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

    def lower_sample_step(self, params, mesh, rules, rows: int):
        """The KV-cached sampler over ``rows`` prompts with the config's settings, lowered
        for ``mesh`` from ``params``' shapes (ahead-of-time compiles, dalle_jax.train.aot)."""
        cfg = self.model_config
        s = self.config.stage2.sample
        settings = sampler_lib.SamplingSettings(
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            guidance_scale=s.guidance_scale)
        batch = sharding_lib.batch_sharding(mesh)
        text = jax.ShapeDtypeStruct((rows, cfg.text_len), jnp.int32, sharding=batch)
        prime = jax.ShapeDtypeStruct((rows, cfg.image_len), jnp.int32, sharding=batch)
        keys = jax.ShapeDtypeStruct((rows, 2), jnp.uint32, sharding=batch)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return sampler_lib.sample_cached.lower(self.model, params, text, prime, keys,
                                                   settings=settings)

    def loss(self, params, model_state, batch, rng, *, train: bool, step):
        del rng, train, step
        text = batch["text_tokens"].astype(jnp.int32)
        codes = batch["codes"].astype(jnp.int32).reshape(text.shape[0], -1)
        weights = batch["mask"].astype(jnp.float32)
        text_logits, image_logits = self.model.apply({"params": params}, text, codes)
        s = self.config.stage2
        loss, metrics = sequence_loss(text_logits, image_logits, text, codes, weights,
                                      text_weight=s.text_loss_weight,
                                      image_weight=s.image_loss_weight)
        return loss, metrics, model_state

    def _pipeline(self, split: str, train: bool):
        pipeline = pipeline_lib.make_pipeline(
            self.config, split, train=train, text_tokenizer=self.text_tokenizer,
            with_captions=True,
            caption_dropout=self.config.stage2.caption_dropout if train else 0.0)
        if self.config.data.source != "codes":
            return _Encoding(pipeline, self.image_tokenizer)
        return pipeline

    def train_data(self):
        self._check_data()
        return self._pipeline("train", train=True)

    def eval_data(self):
        self._check_data()
        return self._pipeline(self.config.stage2.eval_split, train=False)

    def summaries(self, params, model_state, batch) -> dict[str, np.ndarray]:
        """Samples for the first captions of the batch, decoded by the stage-1 run."""
        del model_state
        s = self.config.stage2
        if not s.summary_prompts or self.image_tokenizer is None:
            return {}
        prompts = int(s.summary_prompts)
        captions = [str(c) for c in batch.get("caption", [])][:prompts]
        text = np.asarray(batch["text_tokens"])[:len(captions)]
        sampler = sampler_lib.Sampler(self.model_config, params)
        settings = sampler_lib.SamplingSettings(
            temperature=s.sample.temperature, top_k=s.sample.top_k, top_p=s.sample.top_p,
            guidance_scale=s.sample.guidance_scale)
        codes = sampler.sample(text, seed=0, num_samples=s.summary_samples, settings=settings)
        images = self.image_tokenizer.decode(codes)
        labels = [c or "(no caption)" for c in captions for _ in range(s.summary_samples)]
        grid = visualize.captioned_grid(list(images), labels, cols=s.summary_samples)
        return {"samples": grid}


def init_variables(model: transformer_lib.Transformer, rng: jax.Array) -> dict[str, Any]:
    """The transformer's variables (with logical partitioning boxes)."""
    cfg = model.config
    return model.init(rng, jnp.zeros((1, cfg.text_len), jnp.int32),
                      jnp.zeros((1, cfg.image_len), jnp.int32))


def make_task(config, workdir, mesh):
    return TransformerTask(config, workdir, mesh)
