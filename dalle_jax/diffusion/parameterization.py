"""What the denoiser predicts: the noise eps, the data x0, or the velocity v.

With ``z = alpha x0 + sigma eps`` (variance preserving, ``alpha² + sigma² = 1``) and
``v = alpha eps - sigma x0``, any one prediction together with z gives the other two:
the conversions below are affine in the prediction for a fixed z.

The loss weighting: training minimises the plain mean squared error in the
prediction's own space (v by default). Measured on the x0 estimate, that is the x0
MSE weighted by :func:`x0_weight`: SNR for eps, 1 for x0, SNR + 1 for v. The v
weighting follows eps's at high SNR but, unlike it, does not vanish at low SNR (it
tends to x0's weight 1 there), and converting v back to x0 and eps divides by
nothing, so it is exact at every noise level.

``logsnr`` always has shape [B] and is broadcast over the trailing dimensions of z.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dalle_jax.diffusion.schedules import alpha_sigma

PREDICTIONS = ("eps", "x0", "v")


def validate_kind(kind: str) -> None:
    """Raises ValueError unless ``kind`` is one of :data:`PREDICTIONS`."""
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction kind {kind!r}; choose one of "
                         f"{', '.join(PREDICTIONS)}")


def batch_broadcast(values, like) -> jax.Array:
    """``values`` of shape [B] reshaped to [B, 1, 1, ...] to broadcast against
    ``like`` of shape [B, ...] (a scalar broadcasts as it is)."""
    values = jnp.asarray(values)
    return jnp.reshape(values, values.shape + (1,) * (jnp.ndim(like) - values.ndim))


def _scales(logsnr, like) -> tuple[jax.Array, jax.Array]:
    return alpha_sigma(batch_broadcast(logsnr, like))


def to_x0_eps(prediction, z, logsnr, kind: str) -> tuple[jax.Array, jax.Array]:
    """The (x0, eps) estimates a prediction of ``kind`` implies at z.

    From eps, x0 = (z - sigma eps) / alpha divides by alpha and amplifies errors at
    low SNR; from x0, eps = (z - alpha x0) / sigma does the same at high SNR; v
    converts with no division.
    """
    validate_kind(kind)
    alpha, sigma = _scales(logsnr, z)
    if kind == "eps":
        return (z - sigma * prediction) / alpha, prediction
    if kind == "x0":
        return prediction, (z - alpha * prediction) / sigma
    return alpha * z - sigma * prediction, sigma * z + alpha * prediction


def from_x0_eps(x0, eps, logsnr, kind: str) -> jax.Array:
    """The prediction of ``kind`` that (x0, eps) amount to."""
    validate_kind(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    alpha, sigma = _scales(logsnr, x0)
    return alpha * eps - sigma * x0


def convert(prediction, z, logsnr, src: str, dst: str) -> jax.Array:
    """A prediction of kind ``src`` at z rewritten as kind ``dst``."""
    validate_kind(dst)
    if src == dst:
        validate_kind(src)
        return prediction
    return from_x0_eps(*to_x0_eps(prediction, z, logsnr, src), logsnr, dst)


def target(x0, eps, logsnr, kind: str) -> jax.Array:
    """The regression target of a denoiser of ``kind`` for ``z = alpha x0 + sigma eps``."""
    return from_x0_eps(x0, eps, logsnr, kind)


def x0_weight(logsnr, kind: str) -> jax.Array:
    """The weight w(logsnr) with ``|pred - target|² = w |x0_hat - x0|²`` when the
    estimates share z: SNR for eps, 1 for x0, SNR + 1 for v (shape of logsnr)."""
    validate_kind(kind)
    logsnr = jnp.asarray(logsnr, jnp.float32)
    if kind == "eps":
        return jnp.exp(logsnr)
    if kind == "x0":
        return jnp.ones_like(logsnr)
    return jnp.exp(logsnr) + 1
