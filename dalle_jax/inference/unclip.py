"""unCLIP's decoder as a library: images from contrastive image embeddings, and
variations of an image (DALL·E 2).

    decoder = UnclipDecoder.load_run("runs/unclip_decoder")      # or TextToImage's
    images = decoder.decode(embeddings, seed=0)                    # [N, D] -> uint8 images
    variations = decoder.variations("image.png", num_images=8)     # uint8 [8, S, S, 3]

A variation embeds the image with the frozen contrastive model's image tower (the
reranker the decoder was trained on), then decodes that embedding with K seeds: DDIM
with η > 0 (the run's default η) gives them their diversity. With ``from_inversion``
the decoding starts from the image's DDIM inversion under its embedding instead of
from noise, so η = 0 returns the image itself and η > 0 strays from it by η.

Sampling is one jitted scan per batch, the batch split over the mesh's batch axes;
image ``i`` is drawn with ``keys[i]`` (by default ``fold_in(key(seed), i)``), so its
result does not depend on the batch it is in.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax.diffusion import schedules
from dalle_jax.inference import reranker as reranker_lib
from dalle_jax.inference import runs
from dalle_jax.models import unet as unet_lib
from dalle_jax.stages import unclip_decoder as stage
from dalle_jax.train import sharding as sharding_lib


class UnclipError(errors.UserError, ValueError):
    """Settings, embeddings or images the unCLIP decoder cannot take."""


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    steps: int = 25
    eta: float = 1.0
    guidance_scale: float = 3.0

    def check(self) -> None:
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1:
            raise UnclipError(f"decoder steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise UnclipError(f"decoder eta must lie in [0, 1], got {self.eta}")
        if not (np.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise UnclipError(f"decoder guidance_scale must be a number ≥ 0, got "
                              f"{self.guidance_scale}")


def read_image(image: Any, size: int, *, name: str = "the image") -> np.ndarray:
    """An image to embed as uint8 [size, size, 3]: a path, a PIL image or a uint8 array.
    Anything else, or an image of another size, raises :class:`UnclipError` (the
    embedding of a resized image is not the embedding of the image the user has)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise UnclipError(f"{name} {path} not found")
        try:
            with Image.open(path) as opened:
                opened.load()
                array = np.asarray(opened.convert("RGB"), np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UnclipError(f"{name} {path} is not an image PIL can read "
                              f"({type(e).__name__})") from None
    elif isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), np.uint8)
    else:
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] == 4:
            array = array[..., :3]
        if array.ndim != 3 or array.shape[-1] != 3:
            raise UnclipError(f"{name} must be an image [H, W, 3], got shape "
                              f"{list(array.shape)}")
        if array.dtype != np.uint8:
            raise UnclipError(f"{name} must be uint8 pixels, got {array.dtype}")
    if array.shape[:2] != (size, size):
        raise UnclipError(f"{name} is {array.shape[1]}x{array.shape[0]} px; the unCLIP "
                          f"decoder takes {size}x{size} images (resize it to that first)")
    return array


@dataclasses.dataclass
class UnclipDecoder:
    config: ml_collections.ConfigDict  # the decoder run's config
    params: Any
    reranker: reranker_lib.Reranker  # the frozen contrastive model it was trained on
    mesh: jax.sharding.Mesh
    step: int | None = None
    batch_size: int = 64  # images per sampling call (rounded up to fill the devices)

    def __post_init__(self):
        self.embed_dim = int(self.reranker.embed_dim)
        self.model_config = stage.model_config(self.config, self.embed_dim)
        self.model = unet_lib.UNet(self.model_config)
        self.schedule = schedules.from_config(self.config.diffusion.schedule)
        self.prediction = self.config.diffusion.prediction
        self.image_size = int(self.config.data.image_size)
        if self.reranker.image_size != self.image_size:
            raise UnclipError(f"the reranker embeds {self.reranker.image_size} px images but "
                              f"the decoder draws {self.image_size} px ones")
        sample = self.config.diffusion.get("sample", {})
        self.default_settings = DecodeSettings(
            steps=int(sample.get("steps", 25)), eta=float(sample.get("eta", 1.0)),
            guidance_scale=float(sample.get("guidance_scale", 3.0)))
        self._rules = sharding_lib.logical_rules(self.config.sharding)
        self._batch = sharding_lib.batch_sharding(self.mesh)
        self._compiled: dict[Any, Any] = {}

    @classmethod
    def load_run(cls, workdir: str, reranker: reranker_lib.Reranker | None = None, *,
                 mesh: jax.sharding.Mesh | None = None, step: int | None = None
                 ) -> "UnclipDecoder":
        """The decoder run's checkpoint at ``step`` (the latest by default; its EMA
        parameters when the run kept them), with the contrastive run its config names
        unless ``reranker`` is given."""
        try:
            config = config_lib.read_config(workdir)
        except FileNotFoundError:
            raise runs.RunError(f"{workdir} is not a training run: it has no "
                                f"{config_lib.CONFIG_FILE_NAME}") from None
        if config.get("task") != stage.__name__:
            raise runs.RunError(f"{workdir} is a run of {config.get('task') or 'no stage'}, "
                                f"not of the unCLIP decoder ({stage.__name__})")
        mesh = runs.local_batch_mesh() if mesh is None else mesh
        if reranker is None:
            reranker = reranker_lib.Reranker.load_run(config.decoder.reranker_run, mesh=mesh)
        model = unet_lib.UNet(stage.model_config(config, reranker.embed_dim))
        size = int(config.data.image_size)
        loaded = runs.load_variables(
            workdir, config, lambda rng: stage.init_variables(model, rng, size), mesh, step)
        return cls(config, loaded.variables["params"], reranker, mesh, loaded.step)

    def settings(self, steps: int | None = None, eta: float | None = None,
                 guidance_scale: float | None = None) -> DecodeSettings:
        """The run's sampling defaults (``config.diffusion.sample``) with overrides,
        checked."""
        d = self.default_settings
        try:
            settings = DecodeSettings(
                steps=d.steps if steps is None else steps,
                eta=d.eta if eta is None else float(eta),
                guidance_scale=d.guidance_scale if guidance_scale is None
                else float(guidance_scale))
        except (TypeError, ValueError):
            raise UnclipError(f"decoder eta and guidance_scale must be numbers, got {eta!r} "
                              f"and {guidance_scale!r}") from None
        settings.check()
        return dataclasses.replace(settings, steps=int(settings.steps))

    # --- compiled functions, by settings ------------------------------------------------

    def _jit(self, key, fn):
        if key not in self._compiled:
            def run(*args):
                with nn.logical_axis_rules(self._rules):
                    return fn(*args)
            self._compiled[key] = jax.jit(run, out_shardings=self._batch)
        return self._compiled[key]

    def _decoder(self, s: DecodeSettings, inverted: bool):
        def fn(params, emb, keys, z_T=None):
            return stage.decode(self.model, params, emb, keys, schedule=self.schedule,
                                prediction=self.prediction, size=self.image_size,
                                steps=s.steps, eta=s.eta, guidance_scale=s.guidance_scale,
                                z_T=z_T)
        return self._jit(("decode", s, inverted), fn)

    def _inverter(self, s: DecodeSettings):
        def fn(params, images, emb):
            return stage.invert(self.model, params, images, emb, schedule=self.schedule,
                                prediction=self.prediction, steps=s.steps,
                                guidance_scale=s.guidance_scale)
        return self._jit(("invert", s.steps, s.guidance_scale), fn)

    def _in_batches(self, fn, *arrays):
        """``fn(params, *chunks)`` over chunks of the leading axis, padded to fill the
        devices, concatenated."""
        n = len(arrays[0])
        shards = sharding_lib.batch_shard_count(self.mesh)
        chunk = -(-min(self.batch_size, max(n, 1)) // shards) * shards
        out = []
        for start in range(0, n, chunk):
            parts = [a[start:start + chunk] for a in arrays]
            pad = chunk - len(parts[0])
            if pad:
                parts = [jnp.concatenate([p, jnp.repeat(p[-1:], pad, 0)]) for p in parts]
            out.append(np.asarray(fn(self.params,
                                     *[jax.device_put(p, self._batch) for p in parts]))
                       [:chunk - pad])
        return out

    def _keys(self, keys, seed: int, n: int) -> jax.Array:
        if keys is None:
            base = jax.random.key(seed)
            return jax.vmap(lambda i: jax.random.fold_in(base, i))(np.arange(n))
        if len(keys) != n:
            raise UnclipError(f"{len(keys)} keys for {n} embeddings")
        return keys

    def _embeddings(self, embeddings: Any) -> np.ndarray:
        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.embed_dim:
            raise UnclipError(f"the decoder takes embeddings [N, {self.embed_dim}], got "
                              f"{list(emb.shape)}")
        if not np.isfinite(emb).all():
            raise UnclipError("the embeddings hold NaN or infinite values")
        return emb

    # --- public ---------------------------------------------------------------------

    def embed(self, images: Any) -> np.ndarray:
        """uint8 images [N, S, S, 3] → their unit contrastive embeddings [N, D]."""
        return self.reranker.embed_images(images)

    def decode(self, embeddings: Any, *, keys: jax.Array | None = None, seed: int = 0,
               steps: int | None = None, eta: float | None = None,
               guidance_scale: float | None = None,
               z_T: Any = None) -> np.ndarray:
        """Unit image embeddings [N, D] → uint8 images [N, S, S, 3]. ``z_T`` [N, S, S, 3]
        (an :meth:`invert` result) replaces the starting noise."""
        emb = self._embeddings(embeddings)
        s = self.settings(steps, eta, guidance_scale)
        keys = self._keys(keys, seed, len(emb))
        if not len(emb):
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        if z_T is None:
            out = self._in_batches(self._decoder(s, False), jnp.asarray(emb), keys)
        else:
            z_T = jnp.asarray(z_T, jnp.float32)
            if z_T.shape != (len(emb), self.image_size, self.image_size, 3):
                raise UnclipError(f"z_T must be [{len(emb)}, {self.image_size}, "
                                  f"{self.image_size}, 3], got {list(z_T.shape)}")
            out = self._in_batches(self._decoder(s, True), jnp.asarray(emb), keys, z_T)
        return np.concatenate(out)

    def invert(self, images: Any, embeddings: Any | None = None, *,
               steps: int | None = None, guidance_scale: float | None = None) -> np.ndarray:
        """DDIM inversion of uint8 images [N, S, S, 3] under their embeddings (computed
        when not given): float32 [N, S, S, 3], from which η = 0 decoding with the same
        steps and guidance scale returns the images."""
        images = np.asarray(images)
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
            raise UnclipError(f"the decoder inverts uint8 [N, {size}, {size}, 3] images, got "
                              f"{images.dtype} {list(images.shape)}")
        emb = self.embed(images) if embeddings is None else self._embeddings(embeddings)
        s = self.settings(steps, 0.0, guidance_scale)
        return np.concatenate(self._in_batches(self._inverter(s), jnp.asarray(images),
                                               jnp.asarray(emb)))

    def variations(self, image: Any, num_images: int = 8, *, seed: int = 0,
                   keys: jax.Array | None = None, steps: int | None = None, eta: float | None = None,
                   guidance_scale: float | None = None,
                   from_inversion: bool = False) -> np.ndarray:
        """``num_images`` variations of ``image`` (a path, PIL image or uint8 [S, S, 3]):
        its embedding decoded with keys ``fold_in(key(seed), k)`` (or ``keys``
        [num_images]); ``from_inversion``
        starts each from the image's DDIM inversion. uint8 [num_images, S, S, 3]."""
        if isinstance(num_images, bool) or int(num_images) != num_images or num_images < 1:
            raise UnclipError(f"num_images must be a positive integer, got {num_images!r}")
        pixels = read_image(image, self.image_size, name="the image to vary")
        emb = np.repeat(self.embed(pixels[None]), int(num_images), 0)
        z_T = None
        if from_inversion:
            z = self.invert(pixels[None], emb[:1], steps=steps, guidance_scale=guidance_scale)
            z_T = np.repeat(z, int(num_images), 0)
        return self.decode(emb, keys=keys, seed=seed, steps=steps, eta=eta,
                           guidance_scale=guidance_scale, z_T=z_T)
