"""The 4× diffusion upsampler (DALL·E 2's cascade, after the stage-1 decoder) as a Task.

A U-Net (:mod:`dalle_jax.models.unet`) denoises the high-resolution image given the
low-resolution one, upsampled (bicubic) and concatenated on the channels; no text.
Training pairs are made from the data as it is read (:mod:`dalle_jax.data.super_resolution`):
area downsample, Gaussian blur with a probability, and a round trip through the stage-1
image tokenizer with a probability (``config.upsampler.image_tokenizer_run``). On the
device, each row's low-resolution input then gets noise-conditioning augmentation: noise
at a time ``t_aug ~ U(0, noise_aug_max)`` of the diffusion schedule, whose log-SNR the
model is told; at sampling time the level is chosen (0 by default, i.e. a clean input).

The model trains on random crops of ``crop_size`` high-resolution pixels (aligned to the
low-resolution grid) and, being fully convolutional, upsamples whole images.

Loss: continuous time ``t ~ U(0, 1)``, ``z = α x + σ ε``, the plain MSE of the model's
prediction in its own parameterisation (``config.diffusion.prediction``, v by
default: the x0 MSE weighted by 1 + SNR, see :mod:`dalle_jax.diffusion.parameterization`).

With ``config.upsampler.residual`` the diffused image ``x`` is the residual of the high-
resolution image over the bicubic upsampling of its input (before the augmentation's
noise), added back after sampling. Where the noise hides everything, the best guess of
a residual is 0, i.e. bicubic, rather than a whole image the model must draw from its
input channels; a small model trained briefly then keeps the input's colours and levels
(docs/experiments/upsampler.md).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import errors
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data import super_resolution
from dalle_jax.diffusion import parameterization
from dalle_jax.diffusion import sampler as diffusion_sampler
from dalle_jax.diffusion import schedules
from dalle_jax.models import unet as unet_lib
from dalle_jax.train import metrics as metrics_lib

SUMMARY_STEPS = 10  # DDIM steps of the image summaries
SUMMARY_IMAGES = 4


def model_config(config) -> unet_lib.UNetConfig:
    """The U-Net's config from a run config (``config.model``, ``config.train``)."""
    m = config.model
    return unet_lib.UNetConfig(
        out_channels=3,
        base_width=m.base_width,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_levels=tuple(m.attention_levels),
        head_dim=m.head_dim,
        dropout=m.dropout,
        noise_level_cond=True,
        num_groups=m.num_groups,
        dtype=jnp.dtype(config.train.compute_dtype),
        remat_policy=config.train.remat_policy)


def sizes(config) -> tuple[int, int]:
    """(low, high) resolutions of a run config: the data's and a factor below it."""
    high = config.data.image_size
    factor = config.upsampler.factor
    if high % factor:
        raise errors.ConfigError("upsampler.factor", f"{factor} does not divide "
                                 f"data.image_size {high}")
    return high // factor, high


def to_unit(images: jax.Array) -> jax.Array:
    """uint8 → float32 in [−1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: jax.Array) -> jax.Array:
    return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def upsample_input(low: jax.Array, factor: int) -> jax.Array:
    """[B, h, w, C] → bicubic [B, h·f, w·f, C]: the conditioning image."""
    b, h, w, c = low.shape
    return jax.image.resize(low, (b, h * factor, w * factor, c), "bicubic")


def augment_input(low: jax.Array, t_aug: jax.Array, noise: jax.Array,
                  schedule: schedules.Schedule) -> tuple[jax.Array, jax.Array]:
    """Noise-conditioning augmentation of low-resolution inputs in [−1, 1]: each row
    noised to its time ``t_aug`` [B] of ``schedule``; returns the noised input and the
    log-SNR the model is given."""
    logsnr = schedule.logsnr(t_aug)
    alpha, sigma = schedules.alpha_sigma(logsnr)
    return alpha[:, None, None, None] * low + sigma[:, None, None, None] * noise, logsnr


def crop_pairs(rng: jax.Array, high: jax.Array, cond: jax.Array, size: int,
               factor: int) -> tuple[jax.Array, jax.Array]:
    """The same random ``size`` × ``size`` window of each row of ``high`` and ``cond``
    ([B, H, W, C] both), its corner on the low-resolution grid."""
    b, h, w, _ = high.shape
    if size >= h and size >= w:
        return high, cond
    ry, rx = jax.random.split(rng)
    ys = jax.random.randint(ry, (b,), 0, (h - size) // factor + 1) * factor
    xs = jax.random.randint(rx, (b,), 0, (w - size) // factor + 1) * factor

    def crop(x, y0, x0):
        return jax.lax.dynamic_slice(x, (y0, x0, 0), (size, size, x.shape[-1]))
    crop_rows = jax.vmap(crop)
    return crop_rows(high, ys, xs), crop_rows(cond, ys, xs)


def denoiser(model: unet_lib.UNet, params):
    """The sampler's denoiser: ``cond`` is ``{"image": [B, H, W, 3], "noise_level": [B]}``."""
    def denoise(z, logsnr, cond):
        return model.apply({"params": params}, z, logsnr, cond_image=cond["image"],
                           noise_level=cond["noise_level"])
    return denoise


def upsample(model: unet_lib.UNet, params, low: jax.Array, keys: jax.Array, *,
             schedule: schedules.Schedule, prediction: str, factor: int, steps: int,
             eta: float = 0.0, noise_level: float = 0.0, residual: bool = False,
             t_start: float = 1.0) -> jax.Array:
    """uint8 low-resolution images [B, h, w, 3] → uint8 [B, h·f, w·f, 3] by DDIM
    (``eta`` 0: deterministic given the keys, 1: DDPM ancestral) over ``steps`` steps.

    ``keys`` [B] are one per image (its starting noise, its augmentation noise and its
    sampling noise), so an image's result does not depend on its batch. ``noise_level``
    in [0, 1) is the augmentation time of the input. ``residual``: the model draws the
    residual over bicubic (see the module's docstring). ``t_start`` < 1 starts the
    sampler from the bicubic upsampling noised to that time (SDEdit), not from noise:
    fewer steps, and nearer bicubic the lower it is.
    """
    low = to_unit(low)
    b, h, w, c = low.shape
    start_keys, aug_keys, sample_keys = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys)
                                         for i in range(3))
    aug_noise = jax.vmap(lambda k: jax.random.normal(k, (h, w, c)))(aug_keys)
    t_aug = jnp.full((b,), noise_level, jnp.float32)
    low_aug, aug_logsnr = augment_input(low, t_aug, aug_noise, schedule)
    cond = {"image": upsample_input(low_aug, factor), "noise_level": aug_logsnr}
    z = jax.vmap(lambda k: jax.random.normal(k, (h * factor, w * factor, c)))(start_keys)
    base = upsample_input(low, factor)
    if t_start < 1.0:
        alpha, sigma = schedules.alpha_sigma(schedule.logsnr(jnp.asarray(t_start)))
        z = sigma * z + (0.0 if residual else alpha * base)  # the residual of bicubic is 0
    x0 = diffusion_sampler.sample(denoiser(model, params), schedule, z, sample_keys,
                                  steps=steps, kind=prediction, eta=eta, cond=cond,
                                  clip_x0=True, t_start=t_start)
    if residual:
        x0 = x0 + base
    return to_uint8(x0)


def init_variables(model: unet_lib.UNet, rng: jax.Array) -> dict[str, Any]:
    """The U-Net's variables (logically boxed), from inputs of the smallest size it takes."""
    size = unet_lib.min_size_multiple(model.config)
    z = jnp.zeros((1, size, size, 3), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    return model.init({"params": rng}, z, t, cond_image=z, noise_level=t)


class UpsamplerTask:
    """The training core's view of the upsampler."""

    def __init__(self, config, workdir, mesh):
        del mesh
        self.config = config
        self.workdir = workdir
        u = config.upsampler
        self.low_size, self.high_size = sizes(config)
        self.factor = u.factor
        parameterization.validate_kind(config.diffusion.prediction)
        self.prediction = config.diffusion.prediction
        self.residual = bool(u.get("residual", False))
        self.schedule = schedules.from_config(config.diffusion.schedule)
        self.model_config = model_config(config)
        self.model = unet_lib.UNet(self.model_config)
        multiple = unet_lib.min_size_multiple(self.model_config)
        self.crop_size = u.crop_size or self.high_size
        for name, size in (("upsampler.crop_size", self.crop_size),
                           ("data.image_size", self.high_size)):
            if size % multiple:
                raise errors.ConfigError(name, f"{size} is not a multiple of {multiple}, "
                                         "which the U-Net's levels need")
        if self.crop_size > self.high_size or self.crop_size % self.factor:
            raise errors.ConfigError("upsampler.crop_size", f"must be a multiple of the "
                                     f"factor {self.factor} no larger than data.image_size "
                                     f"{self.high_size}, got {self.crop_size}")
        if not 0.0 <= u.noise_aug_max < 1.0:
            raise errors.ConfigError("upsampler.noise_aug_max", "must lie in [0, 1)")
        self._round_trip = None
        self._summary_sample = None
        self.flops_per_example = 3 * self._forward_flops()

    def _forward_flops(self) -> float:
        variables = jax.eval_shape(self.init, jax.random.key(0))
        size, b = self.crop_size, 1
        z = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
        t = jax.ShapeDtypeStruct((b,), jnp.float32)
        return metrics_lib.counted_flops(
            lambda v, z, t: self.model.apply(v, z, t, cond_image=z, noise_level=t),
            variables, z, t)

    # --- Task ---------------------------------------------------------------------------

    def init(self, rng):
        return init_variables(self.model, rng)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and types of a training batch of ``batch_size`` rows."""
        high, low = self.high_size, self.low_size
        return {"image": jax.ShapeDtypeStruct((batch_size, high, high, 3), jnp.uint8),
                "low_res": jax.ShapeDtypeStruct((batch_size, low, low, 3), jnp.uint8),
                "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}

    def loss(self, params, model_state, batch, rng, *, train: bool, step):
        del step
        high = to_unit(batch["image"])
        low = to_unit(batch["low_res"])
        weights = batch["mask"].astype(jnp.float32)
        count = jnp.maximum(jnp.sum(weights), 1.0)
        b = high.shape[0]
        crop_rng, t_rng, noise_rng, aug_rng, aug_noise_rng, dropout_rng = jax.random.split(rng, 6)

        t_aug = jax.random.uniform(aug_rng, (b,), maxval=self.config.upsampler.noise_aug_max)
        low_aug, aug_logsnr = augment_input(
            low, t_aug, jax.random.normal(aug_noise_rng, low.shape), self.schedule)
        # The conditioning image and the bicubic base, cropped with the image.
        inputs = jnp.concatenate([upsample_input(low_aug, self.factor),
                                  upsample_input(low, self.factor)], -1)
        high, inputs = crop_pairs(crop_rng, high, inputs, self.crop_size, self.factor)
        cond, base = inputs[..., :3], inputs[..., 3:]
        image = high
        if self.residual:
            high = high - base

        t = jax.random.uniform(t_rng, (b,))
        logsnr = self.schedule.logsnr(t)
        alpha, sigma = schedules.alpha_sigma(logsnr)
        eps = jax.random.normal(noise_rng, high.shape)
        z = alpha[:, None, None, None] * high + sigma[:, None, None, None] * eps
        prediction = self.model.apply({"params": params}, z, logsnr, cond_image=cond,
                                      noise_level=aug_logsnr, train=train,
                                      rngs={"dropout": dropout_rng})
        target = parameterization.target(high, eps, logsnr, self.prediction)
        per_example = jnp.mean((prediction - target) ** 2, axis=(1, 2, 3))
        x0, _ = parameterization.to_x0_eps(prediction, z, logsnr, self.prediction)
        if self.residual:
            x0 = x0 + base
        x0_mse = jnp.mean((jnp.clip(x0, -1, 1) - image) ** 2, axis=(1, 2, 3))
        metrics = {"x0_mse": jnp.sum(x0_mse * weights) / count,
                   "noise_aug_t": jnp.sum(t_aug * weights) / count}
        return jnp.sum(per_example * weights) / count, metrics, model_state

    # --- data -------------------------------------------------------------------------

    def _pairs(self, split: str, train: bool):
        u = self.config.upsampler
        images = pipeline_lib.make_pipeline(self.config, split, train=train)
        return super_resolution.LowResPairs(
            images, factor=self.factor,
            seed=self.config.seed if train else self.config.seed + 1,
            process_index=jax.process_index(), blur_sigma=u.blur_sigma,
            blur_prob=u.blur_prob, round_trip=self.round_trip(),
            round_trip_prob=u.round_trip_prob)

    def round_trip(self):
        """The stage-1 round trip of uint8 low-resolution images, or None when the
        config names no stage-1 run (``upsampler.image_tokenizer_run``)."""
        u = self.config.upsampler
        if not u.image_tokenizer_run or u.round_trip_prob <= 0:
            if u.round_trip_prob > 0:
                raise errors.ConfigError(
                    "upsampler.image_tokenizer_run", "names the stage-1 run whose round "
                    "trip the low-resolution inputs take (or set "
                    "upsampler.round_trip_prob=0)")
            return None
        if self._round_trip is None:
            from dalle_jax.inference import image_tokenizer  # pylint: disable=g-import-not-at-top
            run = image_tokenizer.ImageTokenizerRun.load(u.image_tokenizer_run)
            if run.image_size != self.low_size:
                raise errors.ConfigError(
                    "upsampler.image_tokenizer_run", f"{u.image_tokenizer_run} makes "
                    f"{run.image_size} px images but the upsampler's input is "
                    f"{self.low_size} px (data.image_size / upsampler.factor)")
            self._round_trip = lambda low: run.decode(run.encode(low))
        return self._round_trip

    def train_data(self):
        return self._pairs("train", train=True)

    def eval_data(self):
        return self._pairs(self.config.upsampler.eval_split, train=False)

    def summaries(self, params, model_state, batch):
        """Rows of bicubic upsampling, the model's upsampling (DDIM, whole images) and
        the original, for a few images."""
        del model_state
        if self._summary_sample is None:
            self._summary_sample = jax.jit(lambda p, low, keys: upsample(
                self.model, p, low, keys, schedule=self.schedule,
                prediction=self.prediction, factor=self.factor, steps=SUMMARY_STEPS,
                residual=self.residual))
        low = np.asarray(batch["low_res"][:SUMMARY_IMAGES])
        keys = jax.random.split(jax.random.key(0), len(low))
        ours = np.asarray(self._summary_sample(params, low, keys))
        bicubic = np.asarray(to_uint8(upsample_input(to_unit(jnp.asarray(low)),
                                                     self.factor)))
        return {"bicubic_ours_original": np.concatenate(
            [bicubic, ours, np.asarray(batch["image"][:SUMMARY_IMAGES])])}


def make_task(config, workdir, mesh):
    return UpsamplerTask(config, workdir, mesh)
