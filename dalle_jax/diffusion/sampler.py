"""DDIM / DDPM sampling, DDIM inversion and classifier-free guidance.

A denoiser is ``denoise(z, logsnr, cond) -> prediction``: z [B, ...], logsnr [B]
float32, cond any pytree with leading dimension B (or None); the prediction is of
the kind (eps, x0 or v) the sampler is told. The model is continuous-time, so any
number of steps is just a coarser or finer uniform grid in t, and each run of the
sampler is one ``lax.scan`` over that grid.

Grid ends: a time t in (0, 1] is the noise level ``schedule.logsnr(t)`` (finite for
every schedule here). t = 0 is the data itself (alpha = 1, sigma = 0): the last
sampling step returns the x0 estimate rather than a slightly noised z, and encoding
starts from z = x0 there. The denoiser is only ever evaluated at finite log-SNR: at
t = 0 (the plain-inversion guess of the first encoding step) it sees
``schedule.logsnr(0)``, the schedule's cleanest level.

Noise for step i is ``normal(fold_in(key, i), z.shape)`` over the whole batch, so a
sample does not depend on how the batch is sharded; with one key per row it is each
row's ``normal(fold_in(key[r], i))``, so a row does not depend on its batch either.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from dalle_jax.diffusion import parameterization as param_lib
from dalle_jax.diffusion.parameterization import batch_broadcast
from dalle_jax.diffusion.schedules import Schedule, alpha_sigma

Denoiser = Callable[[jax.Array, jax.Array, Any], jax.Array]


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def time_grid(steps: int, t_start: float = 1.0, t_end: float = 0.0) -> np.ndarray:
    """``steps + 1`` times uniform in t from ``t_start`` down to ``t_end``."""
    _check_steps(steps)
    if not 0 <= t_end < t_start <= 1:
        raise ValueError(f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, "
                         f"t_end={t_end}")
    return np.linspace(t_start, t_end, int(steps) + 1)


def _grid_logsnr(schedule: Schedule, times: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Log-SNR at each grid time as the denoiser sees it, and as the update uses it
    (the same, except +inf at t = 0: the data)."""
    model = schedule.logsnr(jnp.asarray(times, jnp.float32))
    update = jnp.where(jnp.asarray(times) == 0, jnp.inf, model)
    return model, update


def ddim_step(z_t, x0, eps, logsnr_t, logsnr_s, eta, noise) -> jax.Array:
    """One DDIM update from noise level t to the less noisy s, generalised by eta.

    ``z_s = alpha_s x0 + sqrt(sigma_s² - c²) eps + c noise`` with
    ``c² = eta² sigma_s² (1 - SNR_t / SNR_s)``, which in the variance-preserving case
    equals DDIM's ``eta² (sigma_s² / sigma_t²)(1 - alpha_t² / alpha_s²)``. At eta = 0 the
    step is deterministic (DDIM); at eta = 1 it draws from the DDPM posterior
    q(z_s | z_t, x0). ``logsnr_s = +inf`` steps onto the data: z_s = x0. ``noise=None``
    drops the noise term (for eta = 0). ``z_t`` is not needed beyond what x0 and eps
    already say (``z_t = alpha_t x0 + sigma_t eps``); it is taken to match q's
    conditioning.
    """
    del z_t
    alpha_s, sigma_s = alpha_sigma(batch_broadcast(logsnr_s, x0))
    logsnr_t = batch_broadcast(logsnr_t, x0)
    logsnr_s = batch_broadcast(logsnr_s, x0)
    c2 = jnp.square(eta) * jnp.square(sigma_s) * -jnp.expm1(logsnr_t - logsnr_s)
    z_s = alpha_s * x0 + jnp.sqrt(jnp.maximum(jnp.square(sigma_s) - c2, 0.0)) * eps
    if noise is not None:
        z_s = z_s + jnp.sqrt(c2) * noise
    return z_s


def _is_one(scale) -> bool:
    return isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale == 1


def guided(denoise: Denoiser, kind: str, guidance_scale) -> Callable:
    """Classifier-free guidance: ``model(z, logsnr, cond, uncond)`` predicting
    ``uncond + w (cond - uncond)``.

    The conditional and unconditional rows go through one call of ``denoise`` on a
    doubled batch (cond rows first). The combination is taken on the prediction as
    it comes: every conversion between kinds is affine in the prediction for fixed z
    with weights summing to one, so guiding v, eps or x0 gives the same result and
    ``kind`` is only checked. With ``guidance_scale == 1`` (a Python number) there is
    no unconditional pass at all and ``uncond`` is ignored.
    """
    param_lib.validate_kind(kind)
    if _is_one(guidance_scale):
        return lambda z, logsnr, cond, uncond=None: denoise(z, logsnr, cond)

    def model(z, logsnr, cond, uncond):
        if uncond is None:
            raise ValueError("classifier-free guidance (guidance_scale != 1) needs uncond")
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
        prediction = denoise(jnp.concatenate([z, z], axis=0),
                             jnp.concatenate([logsnr, logsnr], axis=0), both)
        batch = z.shape[0]
        with_cond, without = prediction[:batch], prediction[batch:]
        return without + guidance_scale * (with_cond - without)

    return model


def step_noise(key: jax.Array, i, z: jax.Array) -> jax.Array:
    """The noise of step ``i``: from one key for the whole batch, or from each row's
    own key when ``key`` holds one per row."""
    if key.ndim == 0:
        return jax.random.normal(jax.random.fold_in(key, i), z.shape, z.dtype)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), z.shape[1:],
                                                z.dtype))(key)


def sample(denoise: Denoiser, schedule: Schedule, z_T, key, *, steps: int,
           kind: str = "v", eta=0.0, cond=None, uncond=None, guidance_scale=1.0,
           t_start: float = 1.0, clip_x0: bool = True) -> jax.Array:
    """Denoises ``z_T`` (noised to level ``t_start``) in ``steps`` steps and returns
    the x0 estimate of the last step.

    ``eta`` 0 is DDIM, 1 DDPM's ancestral sampler. ``t_start < 1`` starts from a
    partially noised input (SDEdit). ``clip_x0`` clips each x0 estimate to [-1, 1]
    and recomputes eps from it and z so that the step stays on the same line.
    Traceable under jit with ``steps`` static.

    ``key`` is one key for the batch, or one per row ([B] keys: each row's noise is
    then its own, whatever the batch it is drawn in).
    """
    param_lib.validate_kind(kind)
    times = time_grid(steps, t_start, 0.0)
    model_logsnr, update_logsnr = _grid_logsnr(schedule, times)
    model = guided(denoise, kind, guidance_scale)
    batch = z_T.shape[0]
    deterministic = isinstance(eta, (int, float)) and eta == 0

    def step(carry, inputs):
        z, _ = carry
        i, logsnr_t, logsnr_s = inputs
        logsnr = jnp.full((batch,), logsnr_t, jnp.float32)
        prediction = model(z, logsnr, cond, uncond).astype(z.dtype)
        x0, eps = param_lib.to_x0_eps(prediction, z, logsnr, kind)
        if clip_x0:
            alpha, sigma = alpha_sigma(batch_broadcast(logsnr, z))
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (z - alpha * x0) / sigma
        noise = None if deterministic else step_noise(key, i, z)
        z_s = ddim_step(z, x0, eps, logsnr, jnp.full((batch,), logsnr_s), eta, noise)
        return (z_s.astype(z.dtype), x0.astype(z.dtype)), None

    inputs = (jnp.arange(steps), model_logsnr[:-1], update_logsnr[1:])
    (_, x0), _ = jax.lax.scan(step, (z_T, jnp.zeros_like(z_T)), inputs)
    return x0


def ddpm_sample(denoise: Denoiser, schedule: Schedule, z_T, key, *, steps: int,
                kind: str = "v", cond=None, uncond=None, guidance_scale=1.0,
                t_start: float = 1.0, clip_x0: bool = True) -> jax.Array:
    """DDPM's ancestral sampler: :func:`sample` with eta = 1."""
    return sample(denoise, schedule, z_T, key, steps=steps, kind=kind, eta=1.0, cond=cond,
                  uncond=uncond, guidance_scale=guidance_scale, t_start=t_start,
                  clip_x0=clip_x0)


def encode(denoise: Denoiser, schedule: Schedule, x0, *, steps: int, kind: str = "v",
           cond=None, uncond=None, guidance_scale=1.0, t_end: float = 1.0,
           fixed_point_iters: int = 3) -> jax.Array:
    """DDIM inversion: the z at ``t_end`` from which deterministic sampling
    (``sample(..., eta=0, clip_x0=False, t_start=t_end)`` with the same steps) returns
    ``x0``.

    Walks the sampling grid backwards from the data. Each step solves the DDIM update
    ``z_s = alpha_s x0(z_t) + sigma_s eps(z_t)`` for z_t. The plain inversion (the
    estimates taken at z_s instead) is the first guess, refined by
    ``fixed_point_iters`` fixed-point iterations of the same equation written for z_t:
    ``z_t <- (alpha_t / alpha_s) z_s - (alpha_t sigma_s / alpha_s - sigma_t) eps(z_t)``
    where SNR_t >= 1, and
    ``z_t <- (sigma_t / sigma_s) z_s - (alpha_s sigma_t / sigma_s - alpha_t) x0(z_t)``
    where SNR_t < 1, each the form that contracts fast at that noise level.
    """
    param_lib.validate_kind(kind)
    if isinstance(fixed_point_iters, bool) or int(fixed_point_iters) != fixed_point_iters \
            or fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters must be a non-negative integer, got "
                         f"{fixed_point_iters!r}")
    times = time_grid(steps, t_end, 0.0)[::-1]
    model_logsnr, update_logsnr = _grid_logsnr(schedule, times)
    model = guided(denoise, kind, guidance_scale)
    batch = x0.shape[0]

    def estimates(z, logsnr):
        logsnr = jnp.full((batch,), logsnr, jnp.float32)
        prediction = model(z, logsnr, cond, uncond).astype(z.dtype)
        return param_lib.to_x0_eps(prediction, z, logsnr, kind)

    def step(z_s, inputs):
        seen_s, logsnr_s, logsnr_t = inputs
        alpha_s, sigma_s = alpha_sigma(logsnr_s)
        alpha_t, sigma_t = alpha_sigma(logsnr_t)
        ratio = alpha_t / alpha_s
        offset = sigma_t - alpha_t * sigma_s / alpha_s
        z_t = ratio * z_s + offset * estimates(z_s, seen_s)[1]
        # Below SNR 1 the eps form contracts by about 1 - alpha_t / alpha_s per
        # iteration, next to no progress on a step into pure noise; there the same
        # equation is iterated through x0, whose estimate hardly depends on z_t.
        by_x0 = (logsnr_t < 0) & (sigma_s > 0)
        safe_sigma_s = jnp.where(by_x0, sigma_s, 1.0)

        def refine(_, z):
            x0_hat, eps_hat = estimates(z, logsnr_t)
            through_eps = ratio * z_s + offset * eps_hat
            through_x0 = (sigma_t / safe_sigma_s * z_s
                          - (alpha_s * sigma_t / safe_sigma_s - alpha_t) * x0_hat)
            return jnp.where(by_x0, through_x0, through_eps)

        z_t = jax.lax.fori_loop(0, int(fixed_point_iters), refine, z_t)
        return z_t.astype(z_s.dtype), None

    inputs = (model_logsnr[:-1], update_logsnr[:-1], update_logsnr[1:])
    z, _ = jax.lax.scan(step, jnp.asarray(x0), inputs)
    return z


def sharded(fn: Callable, mesh: Mesh, batch_axes: Sequence[str] = ("data", "fsdp")
            ) -> Callable:
    """``fn(z_T, key, cond, uncond)`` jitted with the batch dimension of z_T, cond,
    uncond and the result split over the mesh axes ``batch_axes`` (those the mesh
    has) and the key replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    batch = NamedSharding(mesh, PartitionSpec(axes or None))
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(fn, in_shardings=(batch, replicated, batch, batch),
                     out_shardings=batch)

    def run(z_T, key, cond=None, uncond=None):
        return jitted(z_T, key, cond, uncond)

    return run


def make_sampler(denoise: Denoiser, schedule: Schedule, *, mesh: Mesh | None = None,
                 batch_axes: Sequence[str] = ("data", "fsdp"), steps: int, kind: str,
                 eta, guidance_scale, clip_x0: bool, t_start: float = 1.0) -> Callable:
    """A jitted ``fn(z_T, key, cond=None, uncond=None) -> x0`` for fixed settings,
    sharded over the batch when a mesh is given. Parameters reach the denoiser by
    closure."""
    param_lib.validate_kind(kind)
    _check_steps(steps)

    def fn(z_T, key, cond=None, uncond=None):
        return sample(denoise, schedule, z_T, key, steps=steps, kind=kind, eta=eta,
                      cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                      t_start=t_start, clip_x0=clip_x0)

    if mesh is None:
        jitted = jax.jit(fn)

        def run(z_T, key, cond=None, uncond=None):
            return jitted(z_T, key, cond, uncond)

        return run
    return sharded(fn, mesh, batch_axes)
