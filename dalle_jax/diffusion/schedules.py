"""Variance-preserving noise schedules over continuous time t in [0, 1].

A schedule is a strictly decreasing log signal-to-noise ratio ``logsnr(t)``: t = 0 is
(almost) clean data, t = 1 (almost) pure noise. The noised input is
``z_t = alpha_t x0 + sigma_t eps`` with ``alpha² = sigmoid(logsnr)`` and
``sigma² = sigmoid(-logsnr)``, so ``alpha² + sigma² = 1`` and
``logsnr = log(alpha² / sigma²)``. Writing schedules in log-SNR makes a model trained
on one usable with any other and any number of sampling steps.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

SCHEDULES = ("cosine", "linear")


def alpha_sigma(logsnr) -> tuple[jax.Array, jax.Array]:
    """Signal and noise scales of a log-SNR: ``sqrt(sigmoid(±logsnr))``.

    Computing each from its own sigmoid (not ``sigma = sqrt(1 - alpha²)``) keeps both
    accurate at the extremes; ``logsnr = +inf`` gives exactly (1, 0), the data itself.
    """
    logsnr = jnp.asarray(logsnr)
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


class Schedule(Protocol):
    """A strictly decreasing ``logsnr(t)`` on [0, 1] and its inverse."""

    logsnr_min: float
    logsnr_max: float

    def logsnr(self, t) -> jax.Array: ...

    def t_of_logsnr(self, logsnr) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
    """The cosine schedule (Nichol & Dhariwal 2021) in log-SNR, optionally shifted.

    ``logsnr(t) = -2 log tan(a t + b) + shift`` with ``b = atan(exp(-logsnr_max / 2))``
    and ``a = atan(exp(-logsnr_min / 2)) - b``, so before the shift it runs from
    ``logsnr_max`` at t = 0 to ``logsnr_min`` at t = 1; after it the ends are
    ``logsnr_max + shift`` and ``logsnr_min + shift`` (``logsnr_min``/``logsnr_max``
    name the unshifted range). A negative shift adds noise at every t, which higher
    resolutions need (simple diffusion, Hoogeboom et al. 2023): see
    :func:`resolution_shift`.
    """

    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    shift: float = 0.0

    def __post_init__(self):
        values = (self.logsnr_min, self.logsnr_max, self.shift)
        if not all(math.isfinite(v) for v in values) or self.logsnr_min >= self.logsnr_max:
            raise ValueError(f"cosine schedule needs finite logsnr_min < logsnr_max and a "
                             f"finite shift, got {values}")

    @property
    def _b(self) -> float:
        return math.atan(math.exp(-self.logsnr_max / 2))

    @property
    def _b_end(self) -> float:
        """``pi/2 - (a + b)``: the distance of ``a t + b`` from pi/2 at t = 1."""
        return math.atan(math.exp(self.logsnr_min / 2))

    @property
    def _a(self) -> float:
        return math.atan(math.exp(-self.logsnr_min / 2)) - self._b

    @property
    def _t_mid(self) -> float:
        """Where ``a t + b = pi/4`` (unshifted log-SNR 0)."""
        return (math.pi / 4 - self._b) / self._a

    def logsnr(self, t) -> jax.Array:
        t = jnp.asarray(t, jnp.float32)
        # Past u = a t + b = pi/4 use tan(u) = 1 / tan(pi/2 - u), with pi/2 - u formed
        # from 1 - t: near t = 1, u is close to pi/2 and its float32 rounding would
        # otherwise cost ~1e-3 in log-SNR.
        near_zero = -2 * jnp.log(jnp.tan(self._b + self._a * t))
        near_one = 2 * jnp.log(jnp.tan(self._b_end + self._a * (1 - t)))
        return jnp.where(t < self._t_mid, near_zero, near_one) + self.shift

    def t_of_logsnr(self, logsnr) -> jax.Array:
        logsnr = jnp.asarray(logsnr, jnp.float32) - self.shift
        return (jnp.arctan(jnp.exp(-logsnr / 2)) - self._b) / self._a


def resolution_shift(resolution: int, base_resolution: int = 64) -> float:
    """The log-SNR shift that gives ``resolution`` the noise level per pixel that
    ``base_resolution`` has unshifted: ``2 log(base / resolution)``."""
    return 2 * math.log(base_resolution / resolution)


@dataclasses.dataclass(frozen=True)
class LinearSchedule:
    """DDPM's linear betas in continuous time (the VP SDE of Song et al. 2021).

    ``alpha²(t) = exp(-(beta_min t + (beta_max - beta_min) t² / 2))``. At t = 0 the
    log-SNR is +inf, so t is clipped to ``[t_min, 1]`` before evaluating: ``logsnr(0)``
    is the finite ``logsnr_max = logsnr(t_min)``.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-5

    def __post_init__(self):
        if not (0 <= self.beta_min <= self.beta_max and self.beta_max > 0
                and 0 < self.t_min < 1):
            raise ValueError(f"linear schedule needs 0 <= beta_min <= beta_max, beta_max > 0 "
                             f"and 0 < t_min < 1, got beta_min={self.beta_min}, "
                             f"beta_max={self.beta_max}, t_min={self.t_min}")

    def _exponent(self, t):
        """``-log alpha²(t)``."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    @property
    def logsnr_min(self) -> float:
        return -math.log(math.expm1(self._exponent(1.0)))

    @property
    def logsnr_max(self) -> float:
        return -math.log(math.expm1(self._exponent(self.t_min)))

    def logsnr(self, t) -> jax.Array:
        t = jnp.clip(jnp.asarray(t, jnp.float32), self.t_min, 1.0)
        # log(alpha² / (1 - alpha²)) = -log(exp(g) - 1), exact for small g too.
        return -jnp.log(jnp.expm1(self._exponent(t)))

    def t_of_logsnr(self, logsnr) -> jax.Array:
        g = jax.nn.softplus(-jnp.asarray(logsnr, jnp.float32))  # -log alpha²
        # The positive root of (beta_max - beta_min)/2 t² + beta_min t - g = 0, written
        # without the cancellation of -b + sqrt(b² + ...) (and valid for equal betas).
        d = self.beta_max - self.beta_min
        return 2 * g / (self.beta_min + jnp.sqrt(self.beta_min ** 2 + 2 * d * g))


def _field(cfg: Any, name: str, default):
    value = cfg.get(name, None)
    return default if value is None else value


def from_config(cfg: Any) -> Schedule:
    """The schedule a config (a ConfigDict or mapping) names: ``name`` is "cosine"
    (fields ``logsnr_min``, ``logsnr_max``, ``shift``) or "linear" (``beta_min``,
    ``beta_max``); missing fields keep the class defaults."""
    name = _field(cfg, "name", "cosine")
    if name == "cosine":
        defaults = CosineSchedule()
        return CosineSchedule(
            logsnr_min=float(_field(cfg, "logsnr_min", defaults.logsnr_min)),
            logsnr_max=float(_field(cfg, "logsnr_max", defaults.logsnr_max)),
            shift=float(_field(cfg, "shift", defaults.shift)))
    if name == "linear":
        defaults = LinearSchedule()
        return LinearSchedule(beta_min=float(_field(cfg, "beta_min", defaults.beta_min)),
                              beta_max=float(_field(cfg, "beta_max", defaults.beta_max)))
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
