"""A trained diffusion upsampler as a library: low-resolution images in, 4× images out.

    upsampler = Upsampler.load_run("runs/upsampler_shapes")   # or bundle.upsampler
    high = upsampler.upsample(low, steps=25)      # uint8 [B, h, w, 3] -> [B, 4h, 4w, 3]

Sampling is DDIM over ``steps`` steps of the run's continuous-time schedule, with
``eta`` from 0 (deterministic) to 1 (DDPM ancestral), one jitted scan per batch, the
batch split over the mesh's batch axes. ``noise_level`` in [0, 1) noises the input to
that time of the schedule first (noise-conditioning augmentation; 0 by default). Image
``i`` is drawn with ``keys[i]`` (by default, from ``seed`` and its index), so its result
does not depend on the batch it is in.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax.diffusion import schedules
from dalle_jax.inference import runs
from dalle_jax.models import unet as unet_lib
from dalle_jax.stages import upsampler as stage
from dalle_jax.train import sharding as sharding_lib


class UpsampleError(errors.UserError, ValueError):
    """Settings or images the upsampler cannot take."""


@dataclasses.dataclass(frozen=True)
class UpsampleSettings:
    steps: int = 25
    eta: float = 0.0
    noise_level: float = 0.0
    t_start: float = 1.0  # < 1: start from bicubic noised to this time (SDEdit)

    def check(self) -> None:
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1:
            raise UpsampleError(f"upsample steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise UpsampleError(f"upsample eta must lie in [0, 1], got {self.eta}")
        if not 0.0 <= self.noise_level < 1.0:
            raise UpsampleError(f"upsample noise_level must lie in [0, 1), got "
                                f"{self.noise_level}")
        if not 0.0 < self.t_start <= 1.0:
            raise UpsampleError(f"upsample t_start must lie in (0, 1], got {self.t_start}")


@dataclasses.dataclass
class Upsampler:
    config: ml_collections.ConfigDict  # the upsampler run's config
    params: Any
    mesh: jax.sharding.Mesh
    step: int | None = None
    batch_size: int = 32  # images per sampling call (rounded up to fill the devices)

    def __post_init__(self):
        self.model_config = stage.model_config(self.config)
        self.model = unet_lib.UNet(self.model_config)
        self.schedule = schedules.from_config(self.config.diffusion.schedule)
        self.prediction = self.config.diffusion.prediction
        self.low_size, self.high_size = stage.sizes(self.config)
        self.factor = int(self.config.upsampler.factor)
        sample = self.config.diffusion.get("sample", {})
        self.default_settings = UpsampleSettings(
            steps=int(sample.get("steps", 25)), eta=float(sample.get("eta", 0.0)),
            noise_level=float(sample.get("noise_level", 0.0)),
            t_start=float(sample.get("t_start", 1.0)))
        self._rules = sharding_lib.logical_rules(self.config.sharding)
        self._batch = sharding_lib.batch_sharding(self.mesh)
        self._samplers: dict[UpsampleSettings, Any] = {}  # compiled, by settings

    @classmethod
    def load_run(cls, workdir: str, config: ml_collections.ConfigDict | None = None, *,
                 mesh: jax.sharding.Mesh | None = None, step: int | None = None
                 ) -> "Upsampler":
        """The upsampler run's checkpoint at ``step`` (the latest by default; its EMA
        parameters when the run kept them)."""
        if config is None:
            try:
                config = config_lib.read_config(workdir)
            except FileNotFoundError:
                raise runs.RunError(f"{workdir} is not a training run: it has no "
                                    f"{config_lib.CONFIG_FILE_NAME}") from None
        if config.get("task") != stage.__name__:
            raise runs.RunError(f"{workdir} is a run of {config.get('task') or 'no stage'}, "
                                f"not of the upsampler ({stage.__name__})")
        mesh = runs.local_batch_mesh() if mesh is None else mesh
        model = unet_lib.UNet(stage.model_config(config))
        loaded = runs.load_variables(
            workdir, config, lambda rng: stage.init_variables(model, rng), mesh, step)
        return cls(config, loaded.variables["params"], mesh, loaded.step)

    def settings(self, steps: int | None = None, eta: float | None = None,
                 noise_level: float | None = None,
                 t_start: float | None = None) -> UpsampleSettings:
        """The run's sampling defaults (``config.diffusion.sample``) with overrides,
        checked."""
        d = self.default_settings
        try:
            settings = UpsampleSettings(
                steps=d.steps if steps is None else steps,
                eta=d.eta if eta is None else float(eta),
                noise_level=d.noise_level if noise_level is None else float(noise_level),
                t_start=d.t_start if t_start is None else float(t_start))
        except (TypeError, ValueError):
            raise UpsampleError(f"upsample eta, noise_level and t_start must be numbers, got "
                                f"{eta!r}, {noise_level!r} and {t_start!r}") from None
        settings.check()
        return dataclasses.replace(settings, steps=int(settings.steps))

    def _sampler(self, settings: UpsampleSettings):
        if settings in self._samplers:
            return self._samplers[settings]

        def run(params, low, keys):
            with nn.logical_axis_rules(self._rules):
                return stage.upsample(self.model, params, low, keys, schedule=self.schedule,
                                      prediction=self.prediction, factor=self.factor,
                                      steps=settings.steps, eta=settings.eta,
                                      noise_level=settings.noise_level,
                                      t_start=settings.t_start,
                                      residual=bool(self.config.upsampler.get("residual",
                                                                              False)))
        self._samplers[settings] = jax.jit(run, out_shardings=self._batch)
        return self._samplers[settings]

    def upsample(self, images: Any, *, keys: jax.Array | None = None, seed: int = 0,
                 steps: int | None = None, eta: float | None = None,
                 noise_level: float | None = None,
                 t_start: float | None = None) -> np.ndarray:
        """uint8 images [B, h, w, 3] at the run's low resolution → uint8 [B, f·h, f·w, 3].

        ``keys`` [B] (one per image) or else ``seed``: image ``i`` is drawn with
        ``fold_in(key(seed), i)``."""
        images = np.asarray(images)
        size = self.low_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise UpsampleError(f"the upsampler takes [B, {size}, {size}, 3] images, got "
                                f"{list(images.shape)}")
        if images.dtype != np.uint8:
            raise UpsampleError(f"the upsampler takes uint8 images, got {images.dtype}")
        settings = self.settings(steps, eta, noise_level, t_start)
        if keys is None:
            base = jax.random.key(seed)
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.arange(len(images)))
        elif len(keys) != len(images):
            raise UpsampleError(f"{len(keys)} keys for {len(images)} images")
        sample = self._sampler(settings)
        shards = sharding_lib.batch_shard_count(self.mesh)
        chunk = -(-min(self.batch_size, max(len(images), 1)) // shards) * shards
        out = []
        for start in range(0, len(images), chunk):
            low = images[start:start + chunk]
            k = keys[start:start + chunk]
            pad = chunk - len(low)
            if pad:
                low = np.concatenate([low, np.repeat(low[-1:], pad, 0)])
                k = jax.numpy.concatenate([k, jax.numpy.repeat(k[-1:], pad, 0)])
            out.append(np.asarray(sample(self.params, jax.device_put(low, self._batch),
                                         jax.device_put(k, self._batch)))[:chunk - pad])
        if not out:
            return np.zeros((0, self.high_size, self.high_size, 3), np.uint8)
        return np.concatenate(out)
