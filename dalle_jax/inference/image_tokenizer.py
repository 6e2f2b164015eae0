"""A trained image tokenizer as a library: load a stage-1 run, encode images, decode codes.

    tokenizer = ImageTokenizerRun.load("runs/dvae_shapes")
    codes = tokenizer.encode(images)            # uint8 or [0, 1] floats -> int32 [B, h, w]
    images = tokenizer.decode(codes)            # uint8 [B, H, W, 3]

Loads parameters only (the EMA when the run kept them, and a VQ-VAE's codebook).
Encoding and decoding are jitted and run on this process's local devices, the batch
split over them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax.inference import runs
from dalle_jax.models import dvae as dvae_lib
from dalle_jax.models import image_tokenizers
from dalle_jax.models import openai_dvae
from dalle_jax.stages import image_tokenizer as stage1
from dalle_jax.train import sharding as sharding_lib

STAGE1_TASK = stage1.__name__  # the task of a stage-1 run's config.json


def check_images(images: Any, image_size: int) -> np.ndarray:
    """Host-side checks of an image batch (uint8, or floats in [0, 1]); returns it as
    numpy, or raises ``ValueError`` saying what is wrong."""
    images = np.asarray(images)
    expected = (image_size, image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"images must be [B, {image_size}, {image_size}, 3], "
                         f"got {images.shape}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1]; got dtype {images.dtype}")
    if np.isnan(images).any():
        raise ValueError("images contain NaN")
    if images.size and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"float images must lie in [0, 1]; got [{images.min()}, {images.max()}]")
    return images.astype(np.float32)


@dataclasses.dataclass
class ImageTokenizerRun:
    config: ml_collections.ConfigDict
    model: nn.Module  # a module of dalle_jax.models.image_tokenizers
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
        if not (epath.Path(workdir) / config_lib.CONFIG_FILE_NAME).exists():
            raise runs.RunError(f"{workdir} is not a stage-1 run: it has no "
                                f"{config_lib.CONFIG_FILE_NAME}")
        run_config = config_lib.read_config(workdir)
        task = run_config.get("task", "")
        if task != STAGE1_TASK:
            raise runs.RunError(f"{workdir} is a run of {task or 'no stage'}, not a stage-1 "
                                f"run ({STAGE1_TASK})")
        if config is None:
            config = run_config
        model = image_tokenizers.from_config(config.model)
        loaded = runs.load_variables(
            workdir, config,
            lambda rng: stage1.init_variables(model, config.data.image_size, rng),
            runs.local_batch_mesh(), step)
        return cls(config, model, loaded.variables, loaded.step)

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
                       group_count=encoder.group_count, n_init=decoder.n_init,
                       straight_through=False),
            data=dict(image_size=image_size)))
        factor = dvae_lib.downsample_factor(encoder.group_count)
        if image_size % factor:
            raise errors.ConfigError(
                "data.image_size", f"must be a multiple of the converted dVAE's downsample "
                f"factor {factor}, got {image_size}")
        return cls(run_config, image_tokenizers.from_config(run_config.model),
                   {"params": params}, 0)

    @functools.cached_property
    def _mesh(self) -> jax.sharding.Mesh:
        return runs.local_batch_mesh()

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
            pixels = (images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8
                      else images)
            return dvae_lib.in_chunks(
                lambda x: self.model.apply(variables, x, method="encode"),
                dvae_lib.map_pixels(pixels), self.encode_chunk_size,
                num_shards=self._mesh.size)
        return jax.jit(encode)

    @functools.cached_property
    def _decode(self):
        def decode(variables, codes):
            stats = self.model.apply(variables, codes, method="decode")
            return jnp.round(dvae_lib.reconstruction(stats) * 255.0).astype(jnp.uint8)
        return jax.jit(decode)

    def encode(self, images: Any) -> np.ndarray:
        """Images [B, H, W, 3] at the run's image size (uint8, or floats in [0, 1]) →
        int32 codes [B, h, w]: the argmax / nearest entry, no noise."""
        images = check_images(images, self.image_size)
        per_device = -(-len(images) // self._mesh.size)
        if self.encode_chunk_size > 0 and per_device > self.encode_chunk_size and (
                per_device % self.encode_chunk_size):
            raise ValueError(
                f"encode_chunk_size {self.encode_chunk_size} does not divide the "
                f"{per_device} images per device of a batch of {len(images)} over "
                f"{self._mesh.size} device(s)")
        codes = self._encode(self._device_variables, self._split_batch(images))
        return np.asarray(codes)[:len(images)]

    def decode(self, codes: Any) -> np.ndarray:
        """int codes [B, h, w] in [0, vocab_size) → uint8 images [B, H, W, 3]. Anything
        else is refused (one-hot would silently turn an out-of-range code into zeros)."""
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.shape[1:] != (self.grid_size, self.grid_size):
            raise ValueError(f"codes must be [B, {self.grid_size}, {self.grid_size}], "
                             f"got {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers; got dtype {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise ValueError(f"codes must be in [0, {self.vocab_size}), got values in "
                             f"[{codes.min()}, {codes.max()}]")
        images = self._decode(self._device_variables, self._split_batch(codes.astype(np.int32)))
        return np.asarray(images)[:len(codes)]
