"""Stage 1 pieces: schedules, the logit-Laplace loss, the EMA vector quantiser, the task."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax import errors
from dalle_jax.config import load_config_file
from dalle_jax.models import dvae
from dalle_jax.models import image_tokenizers
from dalle_jax.models import space_to_depth
from dalle_jax.models import vq as vq_lib
from dalle_jax.stages import image_tokenizer as stage1
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import trainer


def test_cosine_anneal_follows_the_paper_schedules():
    temperature = [float(stage1.cosine_anneal(s, 1.0, 1 / 16, 100)) for s in (0, 50, 100, 200)]
    assert temperature == pytest.approx([1.0, (1 + 1 / 16) / 2, 1 / 16, 1 / 16])
    beta = [float(stage1.cosine_anneal(s, 0.0, 6.6, 10)) for s in (0, 5, 10)]
    assert beta == pytest.approx([0.0, 3.3, 6.6])


def test_logit_laplace_nll_is_the_negative_log_density():
    x = jnp.array([[0.15, 0.5, 0.85]])
    mu, log_b = jnp.array([[0.3, -0.2, 1.0]]), jnp.array([[-0.5, 0.0, 0.7]])
    nll = stage1.logit_laplace_nll(jnp.concatenate([mu, log_b], -1), x)
    b = np.exp(log_b)
    logit = np.log(x / (1 - x))
    density = np.exp(-np.abs(logit - mu) / b) / (2 * b * x * (1 - x))
    np.testing.assert_allclose(nll, -np.log(density), rtol=1e-5)
    # It is a density over (0, 1): it integrates to one.
    grid = np.linspace(1e-6, 1 - 1e-6, 200_001)
    values = np.exp(-stage1.logit_laplace_nll(
        jnp.broadcast_to(jnp.array([0.4, -0.3]), (grid.size, 2)), jnp.asarray(grid)[:, None]))
    assert float(np.trapezoid(np.asarray(values)[:, 0], grid)) == pytest.approx(1.0, abs=1e-3)


def _vq(restart_threshold=0.0):
    module = vq_lib.VectorQuantizer(codebook_size=4, code_dim=2, decay=0.5,
                                    restart_threshold=restart_threshold)
    variables = module.init({"params": jax.random.key(0), "vq": jax.random.key(1)},
                            jnp.zeros((1, 2)), train=False)
    codebook = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    vq_state = dict(variables["vq"], codebook=codebook, embed_sum=codebook,
                    cluster_size=jnp.ones((4,)))
    return module, {"vq": vq_state}


def test_vector_quantiser_snaps_passes_gradients_and_learns_by_ema():
    module, variables = _vq()
    z = jnp.array([[0.1, -0.1], [0.9, 0.2], [0.8, 0.0], [0.2, 1.1]])
    (quantized, codes, stats), new = module.apply(variables, z, train=True, mutable=["vq"],
                                                  rngs={"vq": jax.random.key(2)})
    assert codes.tolist() == [0, 1, 1, 2]
    np.testing.assert_allclose(quantized, variables["vq"]["codebook"][codes], atol=1e-6)
    assert float(stats["codes_used"]) == 0.75
    assert float(stats["perplexity"]) == pytest.approx(math.exp(-(2 * 0.25 * math.log(0.25)
                                                                  + 0.5 * math.log(0.5))))
    expected_commitment = float(jnp.mean((z - variables["vq"]["codebook"][codes]) ** 2))
    assert float(stats["commitment"]) == pytest.approx(expected_commitment)
    # Straight-through: d(quantized)/dz is the identity.
    grad = jax.grad(lambda z: module.apply(variables, z, train=False)[0].sum())(z)
    np.testing.assert_array_equal(grad, jnp.ones_like(z))
    # EMA: entry 1 moves halfway (decay 0.5) towards the mean of its two vectors.
    moved = new["vq"]["codebook"][1]
    mean = (z[1] + z[2]) / 2
    sizes = 0.5 * 1 + 0.5 * jnp.array([1.0, 2.0, 1.0, 0.0])
    smoothed = (sizes + 1e-5) / (sizes.sum() + 4e-5) * sizes.sum()
    np.testing.assert_allclose(moved, (0.5 * jnp.array([1.0, 0.0]) + 0.5 * 2 * mean)
                               / smoothed[1], rtol=1e-5)
    # Unused entry 3 decays but, without restarts, stays where it was.
    np.testing.assert_allclose(new["vq"]["cluster_size"][3], 0.5)


def test_dead_codes_restart_from_encoder_outputs():
    module, variables = _vq(restart_threshold=0.75)
    z = jnp.array([[0.1, -0.1], [0.9, 0.2], [0.8, 0.0], [0.2, 1.1]])
    _, new = module.apply(variables, z, train=True, mutable=["vq"],
                          rngs={"vq": jax.random.key(3)})
    restarted = new["vq"]["codebook"][3]
    assert any(np.allclose(restarted, row) for row in np.asarray(z)), "taken from the batch"
    assert float(new["vq"]["cluster_size"][3]) == 0.75
    # Without train the codebook is read-only: even with the collection mutable,
    # nothing in it changes, and the codes are the nearest entries of the old codebook.
    out, unchanged = module.apply(variables, z, train=False, mutable=["vq"],
                                  rngs={"vq": jax.random.key(3)})
    assert out[1].tolist() == [0, 1, 1, 2]
    jax.tree.map(np.testing.assert_array_equal, unchanged["vq"], variables["vq"])


@pytest.mark.slow
def test_the_vq_task_updates_its_codebook_in_training_only():
    config = _tiny_config("vqvae")
    task = stage1.ImageTokenizerTask(config, None, None)
    state = task.init(jax.random.key(0))
    params, model_state = state["params"], {"vq": state["vq"]}
    batch = {"image": np.full((2, 16, 16, 3), 7, np.uint8), "mask": np.ones((2,), bool)}
    _, _, after = task.loss(params, model_state, batch, jax.random.key(1), train=False, step=0)
    jax.tree.map(np.testing.assert_array_equal, after, model_state)
    _, _, trained = task.loss(params, model_state, batch, jax.random.key(1), train=True,
                              step=0)
    codebook = lambda tree: np.asarray(nn.unbox(tree)["vq"]["quantizer"]["codebook"])
    assert not np.array_equal(codebook(trained), codebook(model_state))


def _tiny_config(kind, objective="mse"):
    backbone = "space_to_depth" if kind == "vqvae_s2d" else "dvae"
    kind = "vqvae" if kind == "vqvae_s2d" else kind
    config = load_config_file(
        f"configs/image_tokenizer_shapes.py:kind={kind},objective={objective},runlocal")
    config.model.update(n_hid=8, n_init=8, vocab_size=32, code_dim=8, group_count=3)
    if backbone == "space_to_depth":
        config.model.update(backbone=backbone, widths=(8, 16))
    config.data.image_size = 16
    config.batch_size = 8
    return config


@pytest.mark.slow
@pytest.mark.parametrize("kind,objective", [("dvae", "mse"), ("dvae", "paper"),
                                            ("vqvae", "mse"), ("vqvae_s2d", "mse")])
def test_task_trains_on_a_mesh_and_reports_its_metrics(kind, objective):
    config = _tiny_config(kind, objective)
    assert config.model.recon_loss == ("logit_laplace" if objective == "paper" else "mse")
    config.mesh.update(data=4, fsdp=2, tensor=1)
    mesh = sharding_lib.make_mesh(config.mesh)
    task = stage1.ImageTokenizerTask(config, None, mesh)
    assert task.flops_per_example > 0
    training = trainer.build(config, task, mesh, sharding_lib.logical_rules(config.sharding))
    state = training.init(jax.random.key(0))
    assert set(state.model_state) == ({"vq"} if kind.startswith("vqvae") else set())
    rng = jax.random.key_data(jax.random.key(1))
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    images[:, 4:12, 4:12] = (220, 40, 40)  # structure worth reconstructing
    batch = {"image": images, "mask": np.ones((8,), bool)}
    losses = []
    for _ in range(8):
        state, metrics = training.train_step(state, batch, rng)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    expected = {"recon_mse", "psnr", "perplexity", "codes_used", "recon_loss",
                "temperature"} | ({"kl", "beta", "marginal_perplexity"} if kind == "dvae"
                                  else {"commitment"})
    assert expected <= set(metrics)
    # Code usage and PSNR as the metrics define them, from the model's own output.
    variables = {"params": state.params, **state.model_state}
    x_mapped = dvae.map_pixels(images.astype(np.float32) / 255.0)
    stats, codes, _ = task.model.apply(variables, x_mapped, train=False)
    loss, eval_metrics = training.eval_step(state.params, state.model_state, batch, state.step)
    assert float(eval_metrics["codes_used"]) == pytest.approx(
        len(np.unique(np.asarray(codes))) / 32)
    mse = ((np.asarray(dvae.reconstruction(stats)) - images / 255.0) ** 2).reshape(8, -1).mean(-1)
    assert float(eval_metrics["psnr"]) == pytest.approx(np.mean(-10 * np.log10(mse)), rel=1e-4)
    assert np.isfinite(float(loss))
    summary = task.summaries(state.params, state.model_state, batch)["reconstructions"]
    assert summary.shape == (16, 16, 16, 3) and summary.dtype == np.uint8


@pytest.mark.slow
def test_kl_to_the_uniform_prior_vanishes_for_uniform_logits():
    config = _tiny_config("dvae")
    task = stage1.ImageTokenizerTask(config, None, None)
    variables = task.init(jax.random.key(0))
    params = jax.tree.map(jnp.zeros_like, variables["params"])  # constant logits
    batch = {"image": np.zeros((2, 16, 16, 3), np.uint8), "mask": np.ones((2,), bool)}
    _, metrics, _ = jax.jit(lambda p: task.loss(p, {}, batch, jax.random.key(0), train=True,
                                                step=0))(params)
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-4)


def test_kl_is_normalised_per_pixel_at_a_nontrivial_beta():
    config = _tiny_config("dvae")
    config.stage1.update(kl_weight=6.6, kl_warmup_steps=10, marginal_kl_weight=0.0)
    task = stage1.ImageTokenizerTask(config, None, None)
    variables = task.init(jax.random.key(0))
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    batch = {"image": images, "mask": np.ones((3,), bool)}
    loss, metrics, _ = jax.jit(lambda p: task.loss(p, {}, batch, jax.random.key(3),
                                                   train=True, step=5))(variables["params"])
    assert float(metrics["beta"]) == pytest.approx(3.3)  # half-way up the cosine
    # The KL to the uniform prior from the encoder's own logits, summed over positions.
    x_mapped = dvae.map_pixels(images.astype(np.float32) / 255.0)
    logits = task.model.apply(variables, x_mapped, method=lambda m, x: m.encoder(x))
    q = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    kl = np.sum(q * (np.log(q) + math.log(32)), axis=(1, 2, 3))
    assert float(metrics["kl"]) == pytest.approx(kl.mean(), rel=1e-4)
    assert kl.mean() > 0.01  # random logits: a KL far from zero
    pixels = 16 * 16 * 3
    assert float(loss) == pytest.approx(
        float(metrics["recon_loss"]) + 3.3 * kl.mean() / pixels, rel=1e-5)


def test_gumbel_relaxation_divides_the_noisy_logits_by_the_temperature():
    model = dvae.DiscreteVAE(vocab_size=16, n_hid=8, n_blk_per_group=1, group_count=2,
                             n_init=8)
    x = dvae.map_pixels(jnp.asarray(
        np.random.default_rng(0).random((2, 8, 8, 3)), jnp.float32))
    variables = model.init({"params": jax.random.key(0), "gumbel": jax.random.key(1)}, x,
                           train=False)

    def relaxed_codes(temperature):
        seen = {}

        def capture(next_fun, args, kwargs, context):
            if context.module.name == "decoder" and context.method_name == "__call__":
                seen["z"] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(capture):
            _, codes, aux = model.apply(variables, x, train=True, temperature=temperature,
                                        rngs={"gumbel": jax.random.key(7)})
        return np.asarray(seen["z"], np.float64), np.asarray(aux["logits"], np.float64)

    z_hot, logits = relaxed_codes(0.25)
    z_cool, _ = relaxed_codes(2.0)
    np.testing.assert_allclose(z_hot.sum(-1), 1.0, rtol=1e-5)
    # z = softmax((l + g) / τ), so τ·log z − l = g − τ·logsumexp: across the codes of a
    # position it differs between temperatures only by a constant, and the Gumbel
    # noise g recovered from it is the same draw at both temperatures.
    noise_hot = 0.25 * np.log(z_hot) - logits
    noise_cool = 2.0 * np.log(z_cool) - logits
    offset = noise_hot - noise_cool
    np.testing.assert_allclose(offset - offset[..., :1], 0.0, atol=2e-3)
    # A lower temperature is sharper: more mass on each position's top code.
    assert z_hot.max(-1).mean() > z_cool.max(-1).mean()


def test_marginal_kl_tells_collapse_from_certain_codes_spread_over_the_codebook():
    vocab = 4
    certain = 30.0 * jax.nn.one_hot(jnp.arange(8) % vocab, vocab)  # 8 positions, 2 per code
    spread = jax.nn.log_softmax(certain.reshape(2, 2, 2, vocab), -1)
    collapsed = jax.nn.log_softmax(jnp.broadcast_to(certain[0], (2, 2, 2, vocab)), -1)
    uniform = jnp.full((2, 2, 2, vocab), -math.log(vocab))
    both = jnp.ones((2,))
    assert float(stage1._marginal_kl(spread, both)) == pytest.approx(0.0, abs=1e-6)
    assert float(stage1._marginal_kl(uniform, both)) == pytest.approx(0.0, abs=1e-6)
    assert float(stage1._marginal_kl(collapsed, both)) == pytest.approx(math.log(vocab),
                                                                         abs=1e-5)
    # Padded examples do not count: the second example alone uses codes 0..3 once each.
    first_only = jnp.concatenate([collapsed[:1], spread[1:]])
    assert float(stage1._marginal_kl(first_only, jnp.array([0.0, 1.0]))) == pytest.approx(
        0.0, abs=1e-6)
    assert float(stage1._marginal_kl(first_only, jnp.array([1.0, 0.0]))) == pytest.approx(
        math.log(vocab), abs=1e-5)


@pytest.mark.slow
def test_marginal_kl_weight_adds_the_batch_term_per_grid_position():
    config = _tiny_config("dvae")
    task = stage1.ImageTokenizerTask(config, None, None)
    params = task.init(jax.random.key(0))["params"]
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    batch = {"image": images, "mask": np.ones((2,), bool)}

    def loss(weight):
        config.stage1.marginal_kl_weight = weight
        return task.loss(params, {}, batch, jax.random.key(3), train=True, step=10)

    base, metrics, _ = loss(0.0)
    weighted, _, _ = loss(40.0)
    marginal_kl = math.log(config.model.vocab_size) - math.log(
        float(metrics["marginal_perplexity"]))
    assert marginal_kl > 0
    positions, pixels = (16 // 4) ** 2, 16 * 16 * 3
    assert float(weighted - base) == pytest.approx(40.0 * positions * marginal_kl / pixels,
                                                   rel=1e-4)


def test_image_size_must_fit_the_downsampling():
    config = _tiny_config("dvae")
    config.data.image_size = 18
    with pytest.raises(ValueError, match="not divisible by the downsample factor 4"):
        stage1.ImageTokenizerTask(config, None, None)


def test_space_to_depth_moves_each_block_of_positions_into_channels_and_back():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    y = space_to_depth.space_to_depth(x)
    assert y.shape == (2, 2, 3, 12)
    # Position (i, j) holds the 2x2 block at (2i, 2j), row-major, channels innermost.
    np.testing.assert_array_equal(
        y[1, 1, 2], np.concatenate([x[1, 2, 4], x[1, 2, 5], x[1, 3, 4], x[1, 3, 5]]))
    np.testing.assert_array_equal(space_to_depth.depth_to_space(y), x)


def test_the_space_to_depth_backbone_keeps_positions_local_and_fits_the_grid():
    config = _tiny_config("vqvae_s2d")
    model = image_tokenizers.from_config(config.model)
    task = stage1.ImageTokenizerTask(config, None, None)
    variables = task.init(jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 3)), jnp.float32)
    codes = model.apply(variables, x, method="encode")
    assert codes.shape == (2, 4, 4) and codes.dtype == jnp.int32
    stats = model.apply(variables, codes, method="decode")
    assert stats.shape == (2, 16, 16, 6)
    # Convolutions see a bounded window (a code's features reach 16 px at 32 px: two
    # 3x3 blocks per level), not the far corner of the image.
    features = lambda image: model.apply(variables, image, method=lambda m, v: m.encoder(v))
    x = jnp.asarray(np.random.default_rng(1).random((2, 32, 32, 3)), jnp.float32)
    changed = x.at[:, 24:, 24:].set(0.0)
    diff = np.abs(np.asarray(features(changed) - features(x))).sum(-1)
    assert diff.shape == (2, 8, 8)
    assert diff[:, 0, 0].max() == 0 and diff[:, 7, 7].min() > 0


def test_the_space_to_depth_backbone_needs_one_width_per_halving():
    config = _tiny_config("vqvae_s2d")
    config.model.widths = (8, 16, 32)
    with pytest.raises(errors.ConfigError, match="model.widths.*group_count - 1 = 2"):
        image_tokenizers.from_config(config.model)
    config.model.update(widths=(8, 16), backbone="unet")
    with pytest.raises(errors.ConfigError, match="model.backbone"):
        image_tokenizers.from_config(config.model)
