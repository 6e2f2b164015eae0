"""A small stage for testing the training core: an MLP that maps an image and its
caption to a 2x2-pooled copy of the image.

Data is either the real input pipeline (``config.data.source`` as in the shapes
config) or ``"synthetic"``: global batch k is a pure function of k, and each process
takes its rows of it, so runs with different process counts see the same batches.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle_jax.config import parse_arg
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data import sources
from dalle_jax.data import text_tokenizer
from dalle_jax.models import remat
from dalle_jax.train.defaults import core_config


def get_config(arg=None):
    """Toy stage config: python -m dalle_jax.tools.train --config=tests/toy_task.py ..."""
    arg = parse_arg(arg, synthetic=False)
    config = core_config()
    config.task = "tests.toy_task"
    config.batch_size = 16
    config.total_steps = 12
    config.optimizer.warmup_steps = 2
    config.optimizer.learning_rate = 3e-3
    config.train.log_every = 1
    config.train.ema_decay = 0.9
    config.checkpoint.save_every = 4
    config.model = ml_collections.ConfigDict(dict(embed=32, mlp=512, vocab=64))
    config.data = ml_collections.ConfigDict(dict(
        source="synthetic" if arg.synthetic else "captioned_shapes",
        data_dir="", name="captioned_shapes", image_size=16, num_train=256,
        num_validation=32, num_test=16, num_holdout=16,
        holdout_pairs=(("green", "triangle"),), dataset_seed=0, preprocess="resize",
        shuffle_buffer=64, image_key="image", caption_key="caption",
        eval_batches=2))  # of the synthetic data
    config.text = ml_collections.ConfigDict(dict(
        tokenizer_path="", vocab_size=64, model_type="bpe", text_len=32, bpe_dropout=0.1))
    return config


class ToyBlock(nn.Module):
    """The part that is rematerialised when config.train.remat_policy asks."""
    embed: int
    mlp: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(dtype=self.dtype, scale_init=nn.with_logical_partitioning(
            nn.initializers.ones, ("embed",)))(x)
        x = nn.Dense(self.mlp, dtype=self.dtype, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
        return nn.gelu(x)


class ToyModel(nn.Module):
    embed: int
    mlp: int
    vocab: int
    dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, image, text_tokens):
        x = image.reshape(image.shape[0], -1).astype(self.dtype) / 255.0
        x = nn.Dense(self.mlp, dtype=self.dtype, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
        x = nn.Dense(self.embed, dtype=self.dtype, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("mlp", "embed")))(nn.gelu(x))
        text = nn.Embed(self.vocab, self.embed, embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")))(text_tokens)
        x = x + text.mean(axis=1).astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "embed"))
        block = ToyBlock
        if self.remat_policy != "none":
            block = nn.remat(ToyBlock, policy=remat.policy(self.remat_policy))
        x = block(self.embed, self.mlp, self.dtype, name="block")(x)
        out = nn.Dense(image.size // image.shape[0] // 4, dtype=self.dtype,
                       kernel_init=nn.with_logical_partitioning(
                           nn.initializers.lecun_normal(), ("mlp", "embed")))(x)
        return out.astype(jnp.float32)  # the loss in fp32 whatever the compute dtype


class SyntheticData:
    """Global batch k is a function of (seed, k); this process takes its rows."""

    def __init__(self, *, global_batch: int, image_size: int, text_len: int, vocab: int,
                 seed: int, process_index: int, process_count: int,
                 num_batches: int | None = None):
        self.rows = global_batch // process_count
        self.offset = process_index * self.rows
        self.global_batch, self.image_size = global_batch, image_size
        self.text_len, self.vocab, self.seed = text_len, vocab, seed
        self.num_batches = num_batches
        self.index = 0
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.num_batches is not None and self.index >= self.num_batches:
            raise StopIteration
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        size = self.image_size
        image = rng.integers(0, 256, (self.global_batch, size, size, 3), dtype=np.uint8)
        tokens = rng.integers(1, self.vocab, (self.global_batch, self.text_len),
                              dtype=np.int32)
        rows = slice(self.offset, self.offset + self.rows)
        return {"image": image[rows], "text_tokens": tokens[rows],
                "mask": np.ones((self.rows,), bool)}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])

    def close(self):
        self.closed = True


class ToyTask:
    def __init__(self, config, workdir, mesh):
        del mesh
        self.config = config
        self.workdir = workdir
        self.model = ToyModel(config.model.embed, config.model.mlp, config.model.vocab,
                              dtype=jnp.dtype(config.train.compute_dtype),
                              remat_policy=config.train.remat_policy)
        size = config.data.image_size
        pixels = size * size * 3
        m, e, v = config.model.mlp, config.model.embed, config.model.vocab
        del v
        # Matmul FLOPs of forward and backward (3x forward), per example.
        self.flops_per_example = 3 * 2 * (pixels * m + m * e + e * m + m * pixels // 4)
        self._tokenizer = None

    def _synthetic(self, num_batches=None):
        c = self.config
        return SyntheticData(
            global_batch=c.batch_size, image_size=c.data.image_size,
            text_len=c.text.text_len, vocab=c.model.vocab, seed=c.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_batches=num_batches)

    def _text(self):
        if self._tokenizer is None:
            captions = sources.iter_captions(sources.make_source(self.config.data, "train"))
            self._tokenizer = text_tokenizer.train_or_load_text_tokenizer(
                self.config.text, self.workdir, captions, progress=False)
        return self._tokenizer

    def init(self, rng):
        c = self.config
        size = c.data.image_size
        image = jnp.zeros((1, size, size, 3), jnp.uint8)
        tokens = jnp.zeros((1, c.text.text_len), jnp.int32)
        return self.model.init(rng, image, tokens)

    def batch_spec(self, batch_size):
        c = self.config
        size = c.data.image_size
        return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
                "text_tokens": jax.ShapeDtypeStruct((batch_size, c.text.text_len),
                                                    jnp.int32),
                "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

    def loss(self, params, model_state, batch, rng, *, train, step):
        del rng, train, step
        image = batch["image"]
        prediction = self.model.apply({"params": params}, image, batch["text_tokens"])
        b, h, w, _ = image.shape
        target = image.astype(jnp.float32).reshape(b, h // 2, 2, w // 2, 2, 3).mean((2, 4))
        target = target.reshape(b, -1) / 255.0
        mask = batch["mask"].astype(jnp.float32)
        per_example = jnp.mean((prediction - target) ** 2, axis=-1)
        loss = jnp.sum(per_example * mask) / jnp.maximum(mask.sum(), 1.0)
        return loss, {"mse": loss}, model_state

    def train_data(self):
        if self.config.data.source == "synthetic":
            return self._synthetic()
        return pipeline_lib.make_pipeline(self.config, "train", train=True,
                                          text_tokenizer=self._text())

    def eval_data(self):
        if self.config.data.source == "synthetic":
            return self._synthetic(num_batches=self.config.data.eval_batches)
        return pipeline_lib.make_pipeline(self.config, "validation", train=False,
                                          text_tokenizer=self._text())

    def summaries(self, params, model_state, batch):
        del params, model_state
        return {"inputs": batch["image"][:4]}


def make_task(config, workdir, mesh):
    return ToyTask(config, workdir, mesh)


def restore_run(workdir, config, step=None):
    """The train state (on host) and this process's data state saved in ``workdir`` at
    ``step`` (the latest by default), restored on 8 devices as ``config`` lays them out."""
    from dalle_jax.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
    from dalle_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    from dalle_jax.train import trainer  # pylint: disable=g-import-not-at-top
    mesh = sharding_lib.make_mesh(config.mesh)
    training = trainer.build(config, ToyTask(config, None, mesh), mesh,
                             sharding_lib.logical_rules(config.sharding))
    checkpoints = checkpoint_lib.Checkpointer(f"{workdir}/checkpoints", save_interval_steps=1)
    try:
        state, data_state, saved_step = checkpoints.restore(training.abstract_state, step)
    finally:
        checkpoints.close()
    return jax.device_get(state), data_state, saved_step
