"""unCLIP's diffusion prior: the model and its unconditional half, guided sampling, the
library's batches, shards and best-of, its refusals, and a run trained from the command
line on a tiny contrastive run."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dalle_jax import errors
from dalle_jax.config import load_config_file
from dalle_jax.diffusion import sampler as diffusion_sampler
from dalle_jax.inference import prior as prior_lib
from dalle_jax.inference import runs as runs_lib
from dalle_jax.models import prior as model_lib
from dalle_jax.stages import unclip_prior as stage
from dalle_jax.train import sharding as sharding_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle in the top left", "a blue square", "a small white star",
           "a cyan diamond above a red circle", "a green triangle in the center"]


class _StubReranker:
    """A stand-in for the contrastive model: characters as tokens, a text embedding the
    normalised sum of a fixed random table's rows."""

    def __init__(self, embed_dim=16, text_len=10, vocab_size=40):
        self.config = ml_collections.ConfigDict(dict(
            model=dict(embed_dim=embed_dim),
            text=dict(text_len=text_len, vocab_size=vocab_size),
            data=dict(image_size=32)))
        self.embed_dim, self.text_len, self.vocab_size = embed_dim, text_len, vocab_size
        self.table = np.random.default_rng(0).normal(size=(vocab_size, embed_dim))

    def tokenize(self, prompts):
        tokens = np.zeros((len(prompts), self.text_len), np.int32)
        for i, p in enumerate(prompts):
            ids = [ord(c) % (self.vocab_size - 1) + 1 for c in p[:self.text_len]]
            tokens[i, :len(ids)] = ids
        return tokens

    def embed_texts(self, tokens):
        tokens = np.asarray(tokens)
        x = np.einsum("bl,bld->bd", (tokens > 0).astype(float), self.table[tokens])
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def config():
    return load_config_file(str(ROOT / "configs/unclip_prior_shapes.py:runlocal"))


@pytest.fixture(scope="module")
def reranker():
    return _StubReranker()


@pytest.fixture(scope="module")
def model(config, reranker):
    return model_lib.DiffusionPrior(stage.model_config(config, reranker.config))


@pytest.fixture(scope="module")
def params(model):
    return nn.meta.unbox(model_lib.init_variables(model, jax.random.key(0)))["params"]


@pytest.fixture(scope="module")
def prior(config, params, reranker):
    return prior_lib.Prior(config, params, reranker, runs_lib.local_batch_mesh(), 0)


@pytest.fixture(scope="module")
def captions(reranker):
    tokens = reranker.tokenize(PROMPTS[:4])
    return jnp.asarray(tokens), jnp.asarray(reranker.embed_texts(tokens))


def test_the_model_predicts_an_embedding_and_without_text_ignores_the_caption(model, params,
                                                                              captions):
    tokens, text_e = captions
    b, d = text_e.shape
    z = jax.random.normal(jax.random.key(1), (b, d))
    logsnr = jnp.linspace(-5.0, 5.0, b)
    apply = jax.jit(lambda t, e, keep: model.apply({"params": params}, z, logsnr, t, e,
                                                  keep_text=keep))
    other_tokens, other_e = tokens[::-1], text_e[::-1]
    dropped = jnp.zeros((b,), bool)
    out = apply(tokens, text_e, dropped)
    assert out.shape == (b, d) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(apply(other_tokens, other_e, dropped)),
                                  np.asarray(out))
    kept = apply(tokens, text_e, ~dropped)
    changed = np.asarray(apply(other_tokens, other_e, ~dropped))
    assert np.abs(changed - np.asarray(kept)).max() > 1e-4
    # Rows are independent: a mixed batch is each row's own case.
    mixed = apply(tokens, text_e, jnp.array([True, False, True, False]))
    np.testing.assert_allclose(np.asarray(mixed)[::2], np.asarray(kept)[::2], atol=1e-6)
    np.testing.assert_allclose(np.asarray(mixed)[1::2], np.asarray(out)[1::2], atol=1e-6)
    # keep_text=None keeps every caption.
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, z, logsnr, tokens,
                                                      text_e)), np.asarray(kept), atol=1e-6)


def test_every_parameter_has_logical_axes_and_the_prior_shards_on_a_3d_mesh(model, config):
    import dataclasses
    boxed = jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.key(0)))
    specs = jax.tree.leaves(nn.get_partition_spec(boxed),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    arrays = jax.tree.leaves(nn.meta.unbox(boxed))
    assert len(specs) == len(arrays) and all(len(s) == a.ndim for s, a in zip(specs, arrays))
    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    placed = runs_lib.abstract_variables(
        config, lambda rng: model_lib.init_variables(model, rng), mesh)["params"]
    assert not sharding_lib.indivisible_arrays(placed)
    assert tuple(placed["token_embedding"].sharding.spec) == ("tensor", "fsdp")
    # Rematerialised layers compute the same.
    remat = model_lib.DiffusionPrior(dataclasses.replace(model.config, remat_policy="full"))
    params = nn.meta.unbox(model_lib.init_variables(model, jax.random.key(0)))["params"]
    args = (jnp.ones((2, model.config.embed_dim)), jnp.zeros((2,)),
            jnp.ones((2, model.config.text_len), jnp.int32),
            jnp.ones((2, model.config.embed_dim)) / 4)
    grad = jax.grad(lambda p, m: jnp.sum(m.apply({"params": p}, *args) ** 2))
    np.testing.assert_allclose(np.asarray(grad(params, remat)["out"]["kernel"]),
                               np.asarray(grad(params, model)["out"]["kernel"]), rtol=1e-5,
                               atol=1e-7)


@pytest.fixture(scope="module")
def guided(model, params, config):
    """Jitted samplers (4 steps, eta 0.5) at a guidance scale, and the plain sampler of the
    conditional or unconditional model alone."""
    schedule = stage.schedules.from_config(config.diffusion.schedule)

    def by_scale(scale):
        return jax.jit(lambda t, e, k: stage.sample_embeddings(
            model, params, t, e, k, schedule=schedule, prediction="x0", steps=4, eta=0.5,
            guidance_scale=scale))

    @jax.jit
    def alone(tokens, text_e, keys, keep):
        cond = {"tokens": tokens, "text_embedding": text_e,
                "keep_text": jnp.full((tokens.shape[0],), keep)}
        z = stage.start_noise(keys, model.config.embed_dim)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        return stage.normalize(diffusion_sampler.sample(
            stage.denoiser(model, params), schedule, z, step_keys, steps=4, kind="x0",
            eta=0.5, cond=cond, clip_x0=False))

    return by_scale, alone


def test_samples_are_unit_embeddings_and_guidance_spans_the_two_models(guided, captions):
    by_scale, alone = guided
    tokens, text_e = captions
    keys = jax.random.split(jax.random.key(2), tokens.shape[0])
    one = np.asarray(by_scale(1.0)(tokens, text_e, keys))
    assert one.shape == text_e.shape
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, rtol=1e-5)
    # Scale 1 is the conditional model, whether it runs alone or beside the
    # unconditional rows (a traced scale takes the two-pass path).
    np.testing.assert_allclose(one, np.asarray(alone(tokens, text_e, keys, True)), atol=1e-6)
    two_pass = np.asarray(by_scale(jnp.asarray(1.0, jnp.float32))(tokens, text_e, keys))
    np.testing.assert_allclose(two_pass, one, atol=1e-5)
    # Scale 0 is the unconditional model: the captions no longer matter.
    zero = np.asarray(by_scale(0.0)(tokens, text_e, keys))
    np.testing.assert_allclose(zero, np.asarray(alone(tokens, text_e, keys, False)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(by_scale(0.0)(tokens[::-1], text_e[::-1], keys)),
                               zero, atol=1e-5)
    assert np.abs(np.asarray(by_scale(3.0)(tokens, text_e, keys)) - one).max() > 1e-4


# ------------------------------------------------------------------------ the library


def test_each_prompt_is_independent_of_its_batch(prior):
    drawn = prior.sample(PROMPTS, seed=3, steps=3, eta=1.0)
    assert drawn.shape == (5, prior.embed_dim) and drawn.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(drawn, axis=1), 1.0, rtol=1e-5)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(np.arange(5))
    np.testing.assert_allclose(prior.sample(PROMPTS[3:], keys=keys[3:], steps=3, eta=1.0),
                               drawn[3:], atol=1e-5)
    assert np.abs(prior.sample(PROMPTS, seed=4, steps=3, eta=1.0) - drawn).max() > 1e-3


def test_sampling_on_eight_devices_equals_one_device(config, params, reranker, prior):
    assert sharding_lib.batch_shard_count(prior.mesh) == 8
    one = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                                 jax.devices()[:1])
    single = prior_lib.Prior(config, params, reranker, one, 0)
    settings = dict(seed=1, steps=3, eta=0.5, guidance_scale=2.0)
    np.testing.assert_allclose(prior.sample(PROMPTS * 2, **settings),
                               single.sample(PROMPTS * 2, **settings), atol=1e-5)


def test_best_of_keeps_the_candidate_nearest_the_caption(prior, reranker):
    keys = jax.random.split(jax.random.key(5), len(PROMPTS))
    best = prior.sample(PROMPTS, keys=keys, steps=3, best_of=2, guidance_scale=2.0)
    candidate_keys = jax.vmap(lambda k: jax.vmap(lambda c: jax.random.fold_in(k, c))(
        jnp.arange(2)))(keys)
    drawn = np.stack([prior.sample(PROMPTS, keys=candidate_keys[:, c], steps=3,
                                   guidance_scale=2.0) for c in range(2)], axis=1)
    text_e = reranker.embed_texts(reranker.tokenize(PROMPTS))
    scores = np.einsum("ncd,nd->nc", drawn, text_e)
    assert (np.abs(scores[:, 0] - scores[:, 1]) > 1e-6).all()
    np.testing.assert_allclose(best, drawn[np.arange(len(PROMPTS)), scores.argmax(1)],
                               atol=1e-5)


@pytest.mark.parametrize("prompts, kwargs, match", [
    (PROMPTS, dict(steps=0), "steps must be a positive integer"),
    (PROMPTS, dict(steps=2.5), "steps must be a positive integer"),
    (PROMPTS, dict(guidance_scale=-1.0), "guidance_scale must be a non-negative number"),
    (PROMPTS, dict(eta=1.5), r"eta must lie in \[0, 1\]"),
    (PROMPTS, dict(best_of=0), "best_of must be a positive integer"),
    ([], {}, "at least one prompt"),
    ("a red circle", {}, "a list of prompts"),
    (PROMPTS, dict(keys=jax.random.split(jax.random.key(0), 2)), "2 keys for 5 prompts"),
])
def test_bad_settings_are_refused_in_one_line(prior, prompts, kwargs, match):
    with pytest.raises(prior_lib.PriorError, match=match) as refused:
        prior.sample(prompts, **kwargs)
    assert "\n" not in str(refused.value)
    assert isinstance(refused.value, ValueError) and isinstance(refused.value,
                                                                errors.UserError)


# ------------------------------------------------------------------------ the Task


def test_the_loss_is_finite_and_the_padding_rows_do_not_count(config, reranker):
    task = stage.PriorTask(config, "/nonexistent", None, reranker=reranker)
    spec = task.batch_spec(4)
    assert set(spec) == set(stage.BATCH_KEYS) and spec["text_tokens"].shape == (4, 10)
    assert task.flops_per_example > 0
    params = nn.meta.unbox(task.init(jax.random.key(0)))["params"]
    tokens = reranker.tokenize(PROMPTS[:4])
    text_e = reranker.embed_texts(tokens)
    image_e = np.asarray(stage.normalize(text_e + 0.3 * np.random.default_rng(0).normal(
        size=text_e.shape)))
    batch = {"text_tokens": tokens, "text_embedding": text_e, "image_embedding": image_e,
             "mask": np.array([True, True, True, False])}
    loss = jax.jit(lambda b, train: task.loss(params, {}, b, jax.random.key(1), train=train,
                                              step=0)[:2], static_argnums=1)
    value, metrics = loss(batch, False)
    assert np.isfinite(float(value)) and float(value) > 0
    for name in ("x0_image_cosine", "x0_text_cosine", "sample_image_cosine",
                 "sample_text_cosine"):
        assert -1 <= float(metrics[name]) <= 1, name
    expected = np.mean(np.sum(image_e * text_e, 1)[:3])
    np.testing.assert_allclose(float(metrics["text_image_cosine"]), expected, rtol=1e-5)
    assert float(metrics["text_kept"]) == 1.0
    train_value, train_metrics = loss(batch, True)
    assert np.isfinite(float(train_value)) and "sample_image_cosine" not in train_metrics
    padded = dict(batch, image_embedding=image_e.copy())
    padded["image_embedding"][3] = -image_e[3]
    np.testing.assert_allclose(float(loss(padded, False)[0]), float(value), rtol=1e-6)


def test_the_task_needs_a_contrastive_run(config, tmp_path):
    bad = ml_collections.ConfigDict(config.to_dict())
    with pytest.raises(errors.ConfigError, match="config.prior.reranker_run: is required"):
        stage.make_task(bad, str(tmp_path), None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"task": "dalle_jax.stages.upsampler"}))
    bad.prior.reranker_run = str(other)
    with pytest.raises(errors.ConfigError, match="is a run of dalle_jax.stages.upsampler, "
                                                 "not of the contrastive model"):
        stage.make_task(bad, str(tmp_path), None)
    bad.prior.reranker_run = str(tmp_path / "missing")
    with pytest.raises(errors.ConfigError, match="is not a training run"):
        stage.make_task(bad, str(tmp_path), None)


# ------------------------------------------- a run from the command line, on a real reranker

DATA = dict(image_size=16, num_train=64, num_validation=16, num_test=16, num_holdout=16,
            shuffle_buffer=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A three-step contrastive run at 16 px, and a four-step prior trained on it by the
    train command."""
    from dalle_jax.train import trainer
    root = tmp_path_factory.mktemp("prior")
    data = dict(DATA, data_dir=str(root / "tfds"))
    c = load_config_file(str(ROOT / "configs/contrastive_shapes.py:runlocal"))
    c.data.update(**data)
    c.model.update(image_widths=(8, 16))
    c.update(batch_size=8, total_steps=3)
    c.contrastive.eval_batch_size = 8
    c.text.update(vocab_size=64, text_len=12)
    reranker_dir = str(root / "reranker")
    trainer.train_and_evaluate(c, reranker_dir, console=lambda s: None)

    prior_dir = root / "prior"
    done = subprocess.run(
        [sys.executable, "-m", "dalle_jax.tools.train",
         "--config=configs/unclip_prior_shapes.py:runlocal", f"--workdir={prior_dir}",
         f"--config.prior.reranker_run={reranker_dir}",
         *(f"--config.data.{k}={v}" for k, v in data.items())],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    return reranker_dir, str(prior_dir), root, done


@pytest.mark.slow
def test_a_run_trains_from_the_command_line_and_samples(trained):
    reranker_dir, prior_dir, _, done = trained
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 4/4" in done.stdout and "x0_image_cosine" in done.stdout
    assert "eval at step 4" in done.stdout and "sample_image_cosine" in done.stdout
    prior = prior_lib.Prior.load_run(prior_dir)
    assert prior.step == 4 and prior.embed_dim == 16
    assert prior.model_config.text_len == 12 and prior.model_config.vocab_size == 64
    drawn = prior.sample(PROMPTS[:3], steps=2, best_of=2)
    assert drawn.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(drawn, axis=1), 1.0, rtol=1e-5)
    # The same with the reranker given; a run of another stage is refused.
    again = prior_lib.Prior.load_run(prior_dir, reranker=prior.reranker)
    np.testing.assert_allclose(again.sample(PROMPTS[:3], steps=2, best_of=2), drawn,
                               atol=1e-6)
    with pytest.raises(runs_lib.RunError, match="not of the unCLIP prior"):
        prior_lib.Prior.load_run(reranker_dir)


@pytest.mark.slow
def test_the_train_command_refuses_a_run_that_is_not_contrastive(trained):
    _, prior_dir, root, _ = trained
    done = subprocess.run(
        [sys.executable, "-m", "dalle_jax.tools.train",
         "--config=configs/unclip_prior_shapes.py:runlocal", f"--workdir={root / 'new'}",
         f"--config.prior.reranker_run={prior_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config.prior.reranker_run:") and "contrastive" in last
    assert not (root / "new").exists()
