"""A trained contrastive model as a library: embeddings and reranking scores.

    reranker = Reranker.load_run("runs/contrastive_shapes")   # or bundle.reranker
    z_img = reranker.embed_images(images)        # uint8 [B, H, W, 3] -> [B, D], unit
    z_txt = reranker.embed_texts(reranker.tokenize(["a red circle"]))
    scores = reranker.scores(images, ["a red circle"] * len(images))   # cosines [B]

Embeddings are L2-normalised, so a score is the cosine of image and caption (the
model's logit is ``t · score + b``, the same order). Images are embedded in batches
sharded over the mesh's batch axis. :func:`rank` orders candidates by score.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from dalle_jax import config as config_lib
from dalle_jax.data import text_tokenizer as text_tokenizer_lib
from dalle_jax.inference import runs
from dalle_jax.models import contrastive as contrastive_lib
from dalle_jax.stages import contrastive as stage
from dalle_jax.train import sharding as sharding_lib


@dataclasses.dataclass
class Reranker:
    config: ml_collections.ConfigDict  # the contrastive run's config
    params: Any
    text_tokenizer: text_tokenizer_lib.TextTokenizer
    mesh: jax.sharding.Mesh
    step: int | None = None
    batch_size: int = 256  # images per embedding call (rounded up to fill the devices)

    def __post_init__(self):
        self.model_config = stage.model_config(self.config)
        self.model = contrastive_lib.ContrastiveModel(self.model_config)
        rules = sharding_lib.logical_rules(self.config.sharding)
        batch = sharding_lib.batch_sharding(self.mesh)
        replicated = sharding_lib.replicated(self.mesh)

        def under_rules(fn):
            @functools.wraps(fn)
            def wrapped(*args):
                with nn.logical_axis_rules(rules):
                    return fn(*args)
            return wrapped

        self._embed_images = jax.jit(under_rules(lambda p, x: self.model.apply(
            {"params": p}, x, method="embed_images")), out_shardings=replicated)
        self._embed_texts = jax.jit(under_rules(lambda p, t: self.model.apply(
            {"params": p}, t, method="embed_texts")), out_shardings=replicated)
        self._batch = batch

    @classmethod
    def load_run(cls, workdir: str, config: ml_collections.ConfigDict | None = None, *,
                 mesh: jax.sharding.Mesh | None = None, step: int | None = None
                 ) -> "Reranker":
        """The contrastive run's checkpoint at ``step`` (the latest by default)."""
        if config is None:
            config = config_lib.read_config(workdir)
        if config.get("task") != stage.__name__:
            raise runs.RunError(f"{workdir} is a run of {config.get('task') or 'no stage'}, "
                                f"not of the contrastive model ({stage.__name__})")
        mesh = runs.local_batch_mesh() if mesh is None else mesh
        model = contrastive_lib.ContrastiveModel(stage.model_config(config))
        loaded = runs.load_variables(
            workdir, config, lambda rng: stage.init_variables(model, rng), mesh, step)
        path = text_tokenizer_lib.text_tokenizer_path(config.text, workdir)
        tokenizer = text_tokenizer_lib.TextTokenizer(path, config.text.text_len)
        return cls(config, loaded.variables["params"], tokenizer, mesh, loaded.step)

    @property
    def image_size(self) -> int:
        return self.model_config.image_size

    @property
    def embed_dim(self) -> int:
        return self.model_config.embed_dim

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return self.text_tokenizer.encode(list(prompts))[0]

    def _in_batches(self, fn, x: np.ndarray) -> np.ndarray:
        shards = sharding_lib.batch_shard_count(self.mesh)
        size = -(-min(self.batch_size, max(len(x), 1)) // shards) * shards
        out = []
        for start in range(0, len(x), size):
            chunk = x[start:start + size]
            pad = size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
            out.append(np.asarray(fn(self.params, jax.device_put(chunk, self._batch)))
                       [:size - pad])
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(out)

    def embed_images(self, images: Any) -> np.ndarray:
        """uint8 images [B, H, W, 3] at the model's size → unit embeddings [B, D]."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"the reranker takes [B, {self.image_size}, {self.image_size}, "
                             f"3] images, got {list(images.shape)}")
        return self._in_batches(self._embed_images, images)

    def embed_texts(self, tokens: Any) -> np.ndarray:
        """Caption tokens [B, text_len] (this model's tokenizer) → unit embeddings [B, D]."""
        return self._in_batches(self._embed_texts, np.asarray(tokens, np.int32))

    def scores(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        """The cosine of each image with its prompt (``prompts[i]`` for ``images[i]``)."""
        unique = list(dict.fromkeys(prompts))
        z_txt = self.embed_texts(self.tokenize(unique))
        index = np.array([unique.index(p) for p in prompts])
        return np.sum(self.embed_images(images) * z_txt[index], -1)


def rank(scores: np.ndarray) -> np.ndarray:
    """Indices that order ``scores`` (along the last axis) from best to worst; ties keep
    the earlier one."""
    return np.argsort(-np.asarray(scores), axis=-1, kind="stable")
