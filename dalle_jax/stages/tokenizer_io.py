"""A trained image tokenizer as a library: load a stage-1 run, encode images, decode codes.

    tokenizer = ImageTokenizerRun.load("runs/dvae_shapes")
    codes = tokenizer.encode(images_uint8)      # int32 [B, h, w]
    images = tokenizer.decode(codes)            # uint8 [B, H, W, 3]

Uses the EMA parameters when the run kept them. Encoding and decoding are jitted and
run on this process's local devices, the batch split over them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle_jax import config as config_lib
from dalle_jax.models import dvae as dvae_lib
from dalle_jax.models import openai_dvae
from dalle_jax.stages import image_tokenizer as stage1
from dalle_jax.train import checkpoint as checkpoint_lib
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import trainer


def _local_batch_mesh() -> jax.sharding.Mesh:
    """This process's devices, all along the batch axis."""
    return sharding_lib.make_mesh(
        ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), jax.local_devices())


@dataclasses.dataclass
class ImageTokenizerRun:
    config: ml_collections.ConfigDict
    model: stage1.ImageTokenizer
    variables: Any
    step: int
    # Images per encoder pass on each device inside one jitted call (see
    # dalle_jax.models.dvae.in_chunks); 0: the device's whole share of the batch.
    encode_chunk_size: int = 0

    @property
    def vocab_size(self) -> int:
        return self.config.model.vocab_size

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def grid_size(self) -> int:
        return self.image_size // dvae_lib.downsample_factor(self.config.model.group_count)

    @classmethod
    def load(cls, workdir: str, config: ml_collections.ConfigDict | None = None,
             step: int | None = None) -> "ImageTokenizerRun":
        """The run's checkpoint at ``step`` (the latest by default), with ``config`` or
        else the config the run wrote.

        ``workdir`` may also be a conversion of OpenAI's released dVAE (a directory with
        ``architecture.json``, see :mod:`dalle_jax.models.openai_dvae`); its images are
        ``config.data.image_size`` pixels (256, the release's, without a config).
        """
        if (epath.Path(workdir) / openai_dvae.ARCHITECTURE_FILE).exists():
            return cls.from_openai_conversion(workdir, config)
        if config is None:
            path = epath.Path(workdir) / config_lib.CONFIG_FILE_NAME
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: is {workdir} a stage-1 run?")
            config = ml_collections.ConfigDict(json.loads(path.read_text()))
            config.data.holdout_pairs = tuple(tuple(p) for p in config.data.holdout_pairs)
        mesh = _local_batch_mesh()
        task = stage1.ImageTokenizerTask(config, workdir, mesh)
        training = trainer.build(config, task, mesh, sharding_lib.logical_rules(config.sharding))
        checkpoints = checkpoint_lib.Checkpointer(epath.Path(workdir) / "checkpoints",
                                                  save_interval_steps=1)
        try:
            state, _, step = checkpoints.restore(training.abstract_state, step)
        finally:
            checkpoints.close()
        params = state.ema_params if state.ema_params is not None else state.params
        return cls(config, task.model, {"params": params, **state.model_state}, step)

    @classmethod
    def from_openai_conversion(cls, directory: str,
                               config: ml_collections.ConfigDict | None = None
                               ) -> "ImageTokenizerRun":
        """OpenAI's dVAE converted by ``dalle_jax.tools.convert_openai_dvae``."""
        encoder, decoder, params = openai_dvae.load_converted(directory)
        image_size = config.data.image_size if config is not None else 256
        run_config = ml_collections.ConfigDict(dict(
            model=dict(kind="dvae", vocab_size=encoder.vocab_size, n_hid=encoder.n_hid,
                       n_blk_per_group=encoder.n_blk_per_group,
                       group_count=encoder.group_count, n_init=decoder.n_init),
            data=dict(image_size=image_size)))
        factor = dvae_lib.downsample_factor(encoder.group_count)
        if image_size % factor:
            raise ValueError(f"image size {image_size} is not divisible by the dVAE's "
                             f"downsample factor {factor}")
        model = stage1.ImageTokenizer(
            kind="dvae", vocab_size=encoder.vocab_size, n_hid=encoder.n_hid,
            n_blk_per_group=encoder.n_blk_per_group, group_count=encoder.group_count,
            n_init=decoder.n_init)
        return cls(run_config, model, {"params": params}, 0)

    @functools.cached_property
    def _mesh(self) -> jax.sharding.Mesh:
        return _local_batch_mesh()

    @functools.cached_property
    def _device_variables(self):
        return jax.device_put(self.variables, sharding_lib.replicated(self._mesh))

    def _split_batch(self, array: np.ndarray) -> jax.Array:
        """``array`` padded to a multiple of the local device count, its batch split over
        the local devices."""
        pad = -len(array) % self._mesh.size
        if pad:
            array = np.concatenate([array, np.zeros((pad,) + array.shape[1:], array.dtype)])
        return jax.device_put(array, sharding_lib.batch_sharding(self._mesh))

    @functools.cached_property
    def _encode(self):
        def encode(variables, images):
            x = dvae_lib.map_pixels(images.astype(jnp.float32) / 255.0)
            return dvae_lib.in_chunks(
                lambda x: self.model.apply(variables, x, method=stage1.ImageTokenizer.encode),
                x, self.encode_chunk_size, num_shards=self._mesh.size)
        return jax.jit(encode)

    @functools.cached_property
    def _decode(self):
        def decode(variables, codes):
            stats = self.model.apply(variables, codes, method=stage1.ImageTokenizer.decode)
            return jnp.round(stage1.reconstruction(stats) * 255.0).astype(jnp.uint8)
        return jax.jit(decode)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] at the run's image size → int32 codes [B, h, w]."""
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, 3], "
                             f"got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        per_device = -(-len(images) // self._mesh.size)
        if self.encode_chunk_size > 0 and per_device > self.encode_chunk_size and (
                per_device % self.encode_chunk_size):
            raise ValueError(
                f"encode_chunk_size {self.encode_chunk_size} does not divide the "
                f"{per_device} images per device of a batch of {len(images)} over "
                f"{self._mesh.size} device(s)")
        codes = self._encode(self._device_variables, self._split_batch(images))
        return np.asarray(codes)[:len(images)]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes [B, h, w] → uint8 images [B, H, W, 3]."""
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.shape[1:] != (self.grid_size, self.grid_size):
            raise ValueError(f"codes must be [B, {self.grid_size}, {self.grid_size}], "
                             f"got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise ValueError(f"codes must be in [0, {self.vocab_size}), got values in "
                             f"[{codes.min()}, {codes.max()}]")
        images = self._decode(self._device_variables, self._split_batch(codes.astype(np.int32)))
        return np.asarray(images)[:len(codes)]
