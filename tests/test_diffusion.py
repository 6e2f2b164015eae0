"""Diffusion core: schedules, parameterisations, and samplers checked against an
analytic denoiser (Gaussian data, whose posterior mean and probability-flow ODE are
known in closed form); guidance, sharding and bad input."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import pytest

from dalle_jax.diffusion import parameterization as par
from dalle_jax.diffusion import sampler as sam
from dalle_jax.diffusion import schedules as sch

COSINE = sch.CosineSchedule()
LINEAR = sch.LinearSchedule()
SCHEDULE_CASES = {"cosine": COSINE, "shifted": sch.CosineSchedule(-15.0, 10.0, shift=-1.5),
                  "linear": LINEAR}
MU, S, DIM = 0.3, 0.5, 16  # data: x0 ~ N(MU, S²) in each of DIM dimensions


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("name", SCHEDULE_CASES)
def test_schedule_is_variance_preserving_decreasing_and_invertible(name):
    schedule = SCHEDULE_CASES[name]
    t = np.linspace(0.0, 1.0, 2001, dtype=np.float32)

    @jax.jit
    def profile(t):
        logsnr = schedule.logsnr(t)
        return logsnr, sch.alpha_sigma(logsnr), schedule.t_of_logsnr(logsnr)

    logsnr, (alpha, sigma), t_back = profile(t)
    assert np.isfinite(logsnr).all()
    assert (np.diff(np.asarray(logsnr)) < 0).all()
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, atol=2e-6)
    inner = t >= 1e-4  # the linear schedule clips t below its t_min
    np.testing.assert_allclose(t_back[inner], t[inner], atol=1e-4)


def test_cosine_endpoints_and_shift():
    schedule = sch.CosineSchedule(logsnr_min=-15.0, logsnr_max=10.0)
    np.testing.assert_allclose(schedule.logsnr(jnp.array([0.0, 1.0])), [10.0, -15.0],
                               rtol=1e-5)
    np.testing.assert_allclose(COSINE.logsnr(jnp.array([0.0, 1.0])), [20.0, -20.0], rtol=1e-5)
    shifted = sch.CosineSchedule(logsnr_min=-15.0, logsnr_max=10.0, shift=-2.0)
    t = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(shifted.logsnr(t), schedule.logsnr(t) - 2.0, atol=1e-5)
    np.testing.assert_allclose(shifted.logsnr(jnp.array([0.0, 1.0])), [8.0, -17.0], rtol=1e-5)
    assert sch.resolution_shift(128, 64) == pytest.approx(-2 * math.log(2))
    assert sch.resolution_shift(64) == 0.0


def test_linear_schedule_matches_ddpm_betas_and_is_finite_at_zero():
    t = np.linspace(0.0, 1.0, 101)
    alpha2 = np.exp(-(0.1 * t + (20.0 - 0.1) * t ** 2 / 2))
    alpha, _ = sch.alpha_sigma(LINEAR.logsnr(t[1:]))
    np.testing.assert_allclose(alpha ** 2, alpha2[1:], rtol=1e-5)
    assert float(LINEAR.logsnr(0.0)) == pytest.approx(LINEAR.logsnr_max, rel=1e-5)
    assert float(LINEAR.logsnr(1.0)) == pytest.approx(LINEAR.logsnr_min, rel=1e-5)
    assert np.isfinite(LINEAR.logsnr_max) and LINEAR.logsnr_max > 10


def test_schedule_from_config():
    cfg = ml_collections.ConfigDict({"name": "cosine", "logsnr_min": -10.0,
                                     "logsnr_max": 12.0, "shift": -1.0})
    assert sch.from_config(cfg) == sch.CosineSchedule(-10.0, 12.0, -1.0)
    linear = sch.from_config({"name": "linear", "beta_min": 0.2, "beta_max": 10.0})
    assert linear == sch.LinearSchedule(beta_min=0.2, beta_max=10.0)
    with pytest.raises(ValueError, match="cosine, linear"):
        sch.from_config({"name": "sqrt"})
    with pytest.raises(ValueError, match="logsnr_min < logsnr_max"):
        sch.CosineSchedule(logsnr_min=5.0, logsnr_max=-5.0)


# ---------------------------------------------------------- parameterisations

def _noised(seed, logsnr_range, batch=64):
    """x0, eps, logsnr and z = alpha x0 + sigma eps (float32, made in numpy)."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, (batch, 4, 4, 3)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    logsnr = rng.uniform(*logsnr_range, batch).astype(np.float32)
    alpha, sigma = _np_alpha_sigma(logsnr.astype(np.float64)[:, None, None, None])
    return x0, eps, logsnr, (alpha * x0 + sigma * eps).astype(np.float32)


# Dividing by alpha (eps) or sigma (x0) loses float32 precision at the far end.
@pytest.mark.parametrize("kind, logsnr_range",
                         [("v", (-10, 10)), ("eps", (-4, 10)), ("x0", (-10, 4))])
def test_prediction_round_trip(kind, logsnr_range):
    x0, eps, logsnr, z = _noised(0, logsnr_range)

    @jax.jit
    def there_and_back(x0, eps, logsnr, z):
        prediction = par.from_x0_eps(x0, eps, logsnr, kind)
        return prediction, par.to_x0_eps(prediction, z, logsnr, kind)

    prediction, (x0_back, eps_back) = there_and_back(x0, eps, logsnr, z)
    assert prediction.shape == x0.shape
    np.testing.assert_allclose(x0_back, x0, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(eps_back, eps, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(par.target(x0, eps, logsnr, kind), prediction, atol=1e-6)


def test_v_definition_and_conversions_between_every_pair():
    x0, eps, logsnr, z = _noised(1, (-4, 4))
    alpha, sigma = _np_alpha_sigma(logsnr.astype(np.float64)[:, None, None, None])
    np.testing.assert_allclose(par.from_x0_eps(x0, eps, logsnr, "v"),
                               alpha * eps - sigma * x0, atol=1e-6)

    @jax.jit
    def every_pair(x0, eps, logsnr, z):
        return {(src, dst): (par.convert(par.target(x0, eps, logsnr, src), z, logsnr, src,
                                         dst), par.target(x0, eps, logsnr, dst))
                for src in par.PREDICTIONS for dst in par.PREDICTIONS}

    for (src, dst), (got, want) in every_pair(x0, eps, logsnr, z).items():
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"{src} -> {dst}")


@pytest.mark.parametrize("kind", par.PREDICTIONS)
def test_x0_weight_is_the_mse_weighting_of_each_kind(kind):
    x0, eps, logsnr, z = _noised(2, (-5, 5))
    x0_hat = x0 + 0.1 * np.random.default_rng(3).standard_normal(x0.shape, np.float32)

    @jax.jit
    def both_sides(x0, eps, logsnr, z, x0_hat):
        alpha, sigma = sch.alpha_sigma(par.batch_broadcast(logsnr, x0))
        eps_hat = (z - alpha * x0_hat) / sigma  # the eps estimate that goes with z
        mse = lambda a, b: jnp.sum(jnp.square(a - b), axis=(1, 2, 3))
        in_own_space = mse(par.from_x0_eps(x0_hat, eps_hat, logsnr, kind),
                           par.target(x0, eps, logsnr, kind))
        return in_own_space, par.x0_weight(logsnr, kind) * mse(x0_hat, x0)

    in_own_space, weighted_x0_mse = both_sides(x0, eps, logsnr, z, x0_hat)
    np.testing.assert_allclose(in_own_space, weighted_x0_mse, rtol=1e-4)
    if kind == "v":
        np.testing.assert_allclose(par.x0_weight(logsnr, "v"),
                                   1 + par.x0_weight(logsnr, "eps"), rtol=1e-6)


# ------------------------------------------------- the analytic Gaussian denoiser

def gaussian_denoiser(kind: str, mu=MU, s=S, calls: list | None = None):
    """The exact E[x0 | z] and E[eps | z] for x0 ~ N(m, s²), as a prediction of kind;
    m is ``cond`` when one is given (the unconditional rows pass zeros)."""
    def denoise(z, logsnr, cond):
        if calls is not None:
            calls.append(z.shape[0])
        alpha, sigma = sch.alpha_sigma(par.batch_broadcast(logsnr, z))
        m = mu if cond is None else cond
        variance = alpha ** 2 * s ** 2 + sigma ** 2
        x0 = m + alpha * s ** 2 * (z - alpha * m) / variance
        eps = sigma * (z - alpha * m) / variance
        return par.from_x0_eps(x0, eps, logsnr, kind)
    return denoise


def _np_alpha_sigma(logsnr):
    return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def _np_posterior(z, logsnr):
    alpha, sigma = _np_alpha_sigma(logsnr)
    variance = alpha ** 2 * S ** 2 + sigma ** 2
    return (MU + alpha * S ** 2 * (z - alpha * MU) / variance,
            sigma * (z - alpha * MU) / variance)


def _grid_logsnr(schedule, steps, t_start=1.0):
    """The float32 log-SNRs the sampler uses, in float64."""
    times = sam.time_grid(steps, t_start)
    return np.asarray(schedule.logsnr(jnp.asarray(times, jnp.float32)), np.float64)


def reference_ddim(z_T, schedule, steps, t_start=1.0):
    """Deterministic DDIM in float64, step by step: each step is affine in z."""
    z = np.asarray(z_T, np.float64)
    logsnr = _grid_logsnr(schedule, steps, t_start)
    for i in range(steps):
        x0, eps = _np_posterior(z, logsnr[i])
        if i == steps - 1:
            return x0
        alpha_s, sigma_s = _np_alpha_sigma(logsnr[i + 1])
        z = alpha_s * x0 + sigma_s * eps


def exact_flow(z_T, schedule, t_start=1.0):
    """The probability-flow ODE from t_start to the data for Gaussian data: z_t has
    marginal N(alpha mu, alpha² s² + sigma²) and the flow maps quantiles to quantiles."""
    alpha, sigma = _np_alpha_sigma(float(schedule.logsnr(t_start)))
    z = np.asarray(z_T, np.float64)
    return MU + S * (z - alpha * MU) / np.sqrt(alpha ** 2 * S ** 2 + sigma ** 2)


@functools.lru_cache(maxsize=None)
def jitted_sample(schedule, kind="v", steps=20, eta=0.0, clip_x0=False, t_start=1.0,
                  guidance_scale=1.0, conditional=False):
    denoise = gaussian_denoiser(kind)
    fn = functools.partial(sam.sample, denoise, schedule, steps=steps, kind=kind, eta=eta,
                           clip_x0=clip_x0, t_start=t_start, guidance_scale=guidance_scale)
    if conditional:
        return jax.jit(lambda z, key, cond, uncond: fn(z, key, cond=cond, uncond=uncond))
    return jax.jit(lambda z, key: fn(z, key))


def _z(seed, batch=8):
    return jax.random.normal(jax.random.key(seed), (batch, DIM))


@pytest.mark.parametrize("schedule_name, kind, tolerance", [
    ("cosine", "v", 1e-5), ("cosine", "x0", 1e-5), ("linear", "v", 1e-5),
    ("linear", "eps", 1e-4),  # x0 = (z - sigma eps) / alpha at alpha ~ 7e-3
])
def test_ddim_matches_the_discrete_reference(schedule_name, kind, tolerance):
    schedule = SCHEDULE_CASES[schedule_name]
    z_T = _z(0)
    got = jitted_sample(schedule, kind, steps=20)(z_T, jax.random.key(1))
    np.testing.assert_allclose(got, reference_ddim(z_T, schedule, 20), atol=tolerance)
    partial = jitted_sample(schedule, kind, steps=10, t_start=0.6)(z_T, jax.random.key(1))
    np.testing.assert_allclose(partial, reference_ddim(z_T, schedule, 10, 0.6),
                               atol=tolerance)


def test_ddim_converges_to_the_probability_flow_ode():
    z_T = _z(2)
    exact = exact_flow(z_T, COSINE)
    errors = [float(np.max(np.abs(jitted_sample(COSINE, steps=n)(z_T, jax.random.key(0))
                                  - exact))) for n in (50, 200, 800)]
    # DDIM is a first-order solver: four times the steps, a quarter of the error.
    assert errors[0] > 3 * errors[1] > 9 * errors[2], errors
    assert errors[2] < 4e-3, errors


def test_ddim_step_at_eta_one_is_the_ddpm_posterior():
    x0, eps, _, _ = _noised(4, (0, 1), batch=6)
    logsnr_t = np.linspace(-6.0, 4.0, 6, dtype=np.float32)
    logsnr_s = logsnr_t + np.linspace(0.2, 5.0, 6, dtype=np.float32)
    # q(z_s | z_t, x0) in float64, from alpha_{t|s} = alpha_t / alpha_s.
    a_t, s_t = _np_alpha_sigma(logsnr_t.astype(np.float64)[:, None, None, None])
    a_s, s_s = _np_alpha_sigma(logsnr_s.astype(np.float64)[:, None, None, None])
    z_t = (a_t * x0 + s_t * eps).astype(np.float32)
    a_ts = a_t / a_s
    s2_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2
    posterior_mean = a_ts * s_s ** 2 / s_t ** 2 * z_t + a_s * s2_ts / s_t ** 2 * x0
    posterior_std = np.sqrt(s2_ts * s_s ** 2 / s_t ** 2) * np.ones(x0.shape)

    step = jax.jit(sam.ddim_step)
    ones = np.ones_like(x0)
    mean = step(z_t, x0, eps, logsnr_t, logsnr_s, 1.0, None)
    spread = step(z_t, x0, eps, logsnr_t, logsnr_s, 1.0, ones) - mean
    np.testing.assert_allclose(mean, posterior_mean, atol=1e-5)
    np.testing.assert_allclose(spread, posterior_std, rtol=1e-4, atol=1e-6)
    # eta = 0 is deterministic, and a step onto the data (logsnr_s = inf) returns x0.
    np.testing.assert_array_equal(step(z_t, x0, eps, logsnr_t, logsnr_s, 0.0, ones),
                                  step(z_t, x0, eps, logsnr_t, logsnr_s, 0.0, None))
    np.testing.assert_allclose(step(z_t, x0, eps, logsnr_t, np.full(6, np.inf, np.float32),
                                    1.0, ones), x0, atol=1e-7)


@functools.lru_cache(maxsize=None)
def jitted_encode(schedule, steps, fixed_point_iters, t_end=1.0):
    return jax.jit(functools.partial(sam.encode, gaussian_denoiser("v"), schedule,
                                     steps=steps, fixed_point_iters=fixed_point_iters,
                                     t_end=t_end))


@pytest.mark.parametrize("schedule_name", ["cosine", "linear"])
def test_encode_then_sample_reconstructs(schedule_name):
    schedule = SCHEDULE_CASES[schedule_name]
    x0 = jax.random.uniform(jax.random.key(5), (8, DIM), minval=-1, maxval=1)
    decode = jitted_sample(schedule, steps=50)
    errors = {}
    for iters in (0, 3):
        z = jitted_encode(schedule, 50, iters)(x0)
        errors[iters] = float(jnp.max(jnp.abs(decode(z, jax.random.key(0)) - x0)))
    assert errors[3] < 1e-4, errors
    assert errors[0] > 100 * errors[3], errors  # the plain inversion alone is far off
    # Part of the way (SDEdit-style variations start from such a z).
    z = jitted_encode(schedule, 30, 3, t_end=0.6)(x0)
    back = jitted_sample(schedule, steps=30, t_start=0.6)(z, jax.random.key(0))
    np.testing.assert_allclose(back, x0, atol=1e-4)


def reference_chain(schedule, steps, eta):
    """Mean and standard deviation of the sampler's output for Gaussian data and
    z_T ~ N(0, 1), in float64: every step is affine in z plus independent noise."""
    logsnr = _grid_logsnr(schedule, steps)
    mean, var = 0.0, 1.0
    for i in range(steps):
        alpha_t, sigma_t = _np_alpha_sigma(logsnr[i])
        variance = alpha_t ** 2 * S ** 2 + sigma_t ** 2
        gain_x0, gain_eps = alpha_t * S ** 2 / variance, sigma_t / variance
        centred = mean - alpha_t * MU
        if i == steps - 1:
            return MU + gain_x0 * centred, math.sqrt(gain_x0 ** 2 * var)
        alpha_s, sigma_s = _np_alpha_sigma(logsnr[i + 1])
        c2 = eta ** 2 * sigma_s ** 2 * -math.expm1(logsnr[i] - logsnr[i + 1])
        kept = math.sqrt(max(sigma_s ** 2 - c2, 0.0))
        mean = alpha_s * (MU + gain_x0 * centred) + kept * gain_eps * centred
        var = (alpha_s * gain_x0 + kept * gain_eps) ** 2 * var + c2


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_sampling_reaches_the_data_distribution(eta):
    samples = jitted_sample(COSINE, steps=50, eta=eta)(_z(6, batch=4000), jax.random.key(7))
    mean, std = float(jnp.mean(samples)), float(jnp.std(samples))
    assert abs(mean - MU) < 0.01 and abs(std - S) < 0.05, (mean, std)
    # The rest is the 50-step chain's own shortfall, exactly as computed in float64:
    # 64000 draws estimate a standard deviation to about 0.0014.
    chain_mean, chain_std = reference_chain(COSINE, 50, eta)
    assert abs(mean - chain_mean) < 0.006 and abs(std - chain_std) < 0.005, (
        (mean, std), (chain_mean, chain_std))


def test_ddpm_sample_is_sample_at_eta_one():
    z_T, key = _z(8), jax.random.key(9)
    ddpm = jax.jit(functools.partial(sam.ddpm_sample, gaussian_denoiser("v"), COSINE,
                                     steps=5))(z_T, key)
    ancestral = jitted_sample(COSINE, steps=5, eta=1.0, clip_x0=True)(z_T, key)
    np.testing.assert_allclose(ddpm, ancestral, atol=1e-6)
    deterministic = jitted_sample(COSINE, steps=5, eta=0.0, clip_x0=True)(z_T, key)
    assert not np.allclose(ddpm, deterministic, atol=1e-3)


# ------------------------------------------------------------------- guidance

COND = jnp.full((8, DIM), MU)
UNCOND = jnp.zeros((8, DIM))


def test_guidance_scale_one_is_the_conditional_model_on_a_single_batch():
    calls = []
    denoise = gaussian_denoiser("v", calls=calls)
    key, z_T = jax.random.key(0), _z(10)
    plain = jax.jit(lambda z, c: sam.sample(denoise, COSINE, z, key, steps=4, cond=c))(
        z_T, COND)
    guided = jax.jit(lambda z, c, u: sam.sample(denoise, COSINE, z, key, steps=4, cond=c,
                                                uncond=u, guidance_scale=1.0))(
        z_T, COND, UNCOND)
    np.testing.assert_array_equal(guided, plain)
    assert calls == [8, 8]
    calls.clear()
    jax.jit(lambda z, c, u: sam.sample(denoise, COSINE, z, key, steps=4, cond=c,
                                       uncond=u, guidance_scale=2.0))(z_T, COND, UNCOND)
    assert calls == [16]


@pytest.mark.parametrize("kind", par.PREDICTIONS)
def test_guided_prediction_combines_cond_and_uncond(kind):
    denoise = gaussian_denoiser(kind)
    z, logsnr = _z(11), jnp.linspace(-3.0, 3.0, 8)

    @jax.jit
    def predictions(z, logsnr, cond, uncond):
        got = sam.guided(denoise, kind, 3.0)(z, logsnr, cond, uncond)
        as_v = sam.guided(gaussian_denoiser("v"), "v", 3.0)(z, logsnr, cond, uncond)
        return (got, denoise(z, logsnr, cond), denoise(z, logsnr, uncond),
                par.convert(got, z, logsnr, kind, "v"), as_v)

    got, with_cond, without, got_as_v, as_v = predictions(z, logsnr, COND, UNCOND)
    np.testing.assert_allclose(got, without + 3.0 * (with_cond - without), atol=1e-5)
    # The same guidance in any other parameterisation.
    np.testing.assert_allclose(got_as_v, as_v, atol=1e-4)


def test_larger_guidance_pushes_samples_further_along_the_condition():
    z_T = _z(12, batch=512)
    cond, uncond = jnp.full((512, DIM), MU), jnp.zeros((512, DIM))
    means = [float(jnp.mean(jitted_sample(COSINE, steps=20, guidance_scale=w,
                                          conditional=True)(z_T, jax.random.key(0),
                                                            cond, uncond)))
             for w in (1.0, 2.0, 4.0)]
    assert abs(means[0] - MU) < 0.03
    assert means[0] < means[1] < means[2], means
    assert means[2] > MU + 0.3, means


# ------------------------------------------------------- sharding, steps, input

def test_sharded_sampling_equals_single_device():
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(8, 1), ("data", "fsdp"))
    settings = dict(steps=6, kind="v", eta=0.5, guidance_scale=2.0, clip_x0=True)
    denoise = gaussian_denoiser("v")
    z_T, key = _z(13, batch=16), jax.random.key(14)
    cond, uncond = jnp.full((16, DIM), MU), jnp.zeros((16, DIM))
    single = sam.make_sampler(denoise, COSINE, **settings)(z_T, key, cond, uncond)
    spread = sam.make_sampler(denoise, COSINE, mesh=mesh, **settings)(z_T, key, cond, uncond)
    np.testing.assert_allclose(spread, single, atol=1e-6)
    assert len(spread.sharding.device_set) == 8
    assert {shard.data.shape for shard in spread.addressable_shards} == {(2, DIM)}


def test_one_scan_of_length_steps_and_a_single_step_is_the_clipped_x0():
    denoise = gaussian_denoiser("v", mu=0.9, s=1.0)  # often past 1, so clipping bites
    z_T, key = 3 * _z(15), jax.random.key(0)
    jaxpr = jax.make_jaxpr(lambda z: sam.sample(denoise, COSINE, z, key, steps=7))(z_T)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [7]
    one = sam.sample(denoise, COSINE, z_T, key, steps=1, t_start=0.7)
    logsnr = jnp.full((8,), COSINE.logsnr(0.7))
    x0, _ = par.to_x0_eps(denoise(z_T, logsnr, None), z_T, logsnr, "v")
    assert float(jnp.max(jnp.abs(x0))) > 1
    np.testing.assert_allclose(one, jnp.clip(x0, -1, 1), atol=1e-6)


def test_bad_input_is_refused():
    denoise, z_T, key = gaussian_denoiser("v"), _z(16), jax.random.key(0)
    with pytest.raises(ValueError, match="eps, x0, v"):
        sam.sample(denoise, COSINE, z_T, key, steps=4, kind="score")
    with pytest.raises(ValueError, match="eps, x0, v"):
        par.to_x0_eps(z_T, z_T, jnp.zeros(8), "noise")
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            sam.sample(denoise, COSINE, z_T, key, steps=steps)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sam.encode(denoise, COSINE, z_T, steps=0)
    with pytest.raises(ValueError, match="t_end < t_start"):
        sam.sample(denoise, COSINE, z_T, key, steps=4, t_start=0.0)
    with pytest.raises(ValueError, match="needs uncond"):
        sam.sample(denoise, COSINE, z_T, key, steps=4, cond=COND, guidance_scale=2.0)


def test_per_row_keys_make_each_row_independent_of_its_batch():
    """One key per row: a row's ancestral sample is the same alone or in a batch."""
    schedule = sch.CosineSchedule()
    denoise = lambda z, logsnr, cond: 0.5 * z
    keys = jax.random.split(jax.random.key(3), 4)
    z = jax.random.normal(jax.random.key(4), (4, 6))
    run = jax.jit(lambda z, k: sam.sample(denoise, schedule, z, k, steps=8, eta=1.0,
                                              kind="x0", clip_x0=False))
    whole = run(z, keys)
    alone = run(z[2:3], keys[2:3])
    np.testing.assert_allclose(np.asarray(whole[2:3]), np.asarray(alone), atol=1e-6)
    assert not np.allclose(np.asarray(whole[0]), np.asarray(whole[1]))
