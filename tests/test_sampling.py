"""Sampling: filters, guidance, priming, variations, reproducibility and bad input."""
from __future__ import annotations

from absl import logging as absl_logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle_jax.models import transformer as tr
from dalle_jax.sampling import sampler as sampler_lib
from dalle_jax.sampling.sampler import SamplingSettings
from dalle_jax.stages import transformer as stage2

# Three layers: the paper's row, column and convolutional patterns.
CFG = tr.TransformerConfig(text_vocab_size=30, text_len=5, image_vocab_size=24,
                           image_height=3, image_width=3, num_layers=3, num_heads=2,
                           head_dim=8, attention="dalle", conv_kernel=3)


@pytest.fixture(scope="module")
def sampler():
    model = tr.Transformer(CFG)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32),
                                 jnp.zeros((1, 9), jnp.int32))["params"])
    # Larger output weights so that the conditional and unconditional logits differ.
    params["image_head"]["kernel"] = params["image_head"]["kernel"] * 50
    return sampler_lib.Sampler(CFG, params)


TEXT = np.array([[3, 4, 5, 0, 0], [7, 0, 0, 0, 0]], np.int32)


def test_filter_logits_top_k_top_p_temperature():
    logits = jnp.log(jnp.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = lambda s: np.isfinite(np.asarray(sampler_lib.filter_logits(logits, s)))
    assert kept(SamplingSettings(top_k=2)).tolist() == [True, True, False, False, False]
    # top-p keeps the smallest prefix whose probability reaches p.
    assert kept(SamplingSettings(top_p=0.6)).tolist() == [True, True, False, False, False]
    assert kept(SamplingSettings(top_p=0.5)).tolist() == [True, False, False, False, False]
    assert kept(SamplingSettings(top_p=0.01)).tolist() == [True, False, False, False, False]
    assert kept(SamplingSettings(top_p=0.9)).tolist() == [True, True, True, True, False]
    assert kept(SamplingSettings()).all()
    np.testing.assert_allclose(
        sampler_lib.filter_logits(logits, SamplingSettings(temperature=0.5)), logits / 0.5)


@pytest.mark.parametrize("settings, message", [
    (SamplingSettings(temperature=0.0), "temperature must be a positive"),
    (SamplingSettings(temperature=float("nan")), "temperature must be a positive"),
    (SamplingSettings(top_k=-1), "top_k must be an integer in"),
    (SamplingSettings(top_k=25), r"top_k must be an integer in \[0, 24\]"),
    (SamplingSettings(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (SamplingSettings(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (SamplingSettings(guidance_scale=float("inf")), "guidance_scale must be finite"),
])
def test_impossible_settings_are_refused(sampler, settings, message):
    with pytest.raises(ValueError, match=message):
        sampler.sample(TEXT, settings=settings)


@pytest.mark.slow
def test_top_k_one_is_greedy_decoding(sampler):
    codes = sampler.sample(TEXT, seed=0, settings=SamplingSettings(top_k=1)).reshape(2, -1)
    # Greedy by hand: every token is the argmax given the tokens before it.
    model = tr.Transformer(CFG)
    logits = model.apply({"params": sampler.params}, jnp.asarray(TEXT), jnp.asarray(codes))[1]
    np.testing.assert_array_equal(np.argmax(logits, -1), codes)


@pytest.mark.slow
def test_guidance_combines_conditional_and_unconditional_logits(sampler):
    settings = SamplingSettings(top_k=1, guidance_scale=3.0)
    codes = sampler.sample(TEXT, seed=0, settings=settings).reshape(2, -1)
    model = tr.Transformer(CFG)
    apply = lambda text: model.apply({"params": sampler.params}, jnp.asarray(text),
                                     jnp.asarray(codes))[1]
    cond, uncond = apply(TEXT), apply(np.zeros_like(TEXT))
    guided = uncond + 3.0 * (cond - uncond)
    np.testing.assert_array_equal(np.argmax(guided, -1), codes)
    assert not np.array_equal(np.argmax(cond, -1), codes), "guidance changed nothing"


def _conditional_draws(params, text, seed, settings):
    """Sampling by hand from the conditional model alone (no unconditional rows): the
    whole stream recomputed per position, row r's token drawn with the seed's key folded
    with r, then with the position, as the sampler documents."""
    model = tr.Transformer(CFG)
    logits_at = jax.jit(lambda codes, a: model.apply({"params": params}, text, codes)[1][:, a])
    key = jax.random.key(seed)
    codes = jnp.zeros((len(text), CFG.image_len), jnp.int32)
    for a in range(CFG.image_len):
        logits = sampler_lib.filter_logits(logits_at(codes, a), settings)
        for r in range(len(text)):
            row_key = jax.random.fold_in(jax.random.fold_in(key, r), a)
            codes = codes.at[r, a].set(jax.random.categorical(row_key, logits[r]))
    return np.asarray(codes).reshape(-1, CFG.image_height, CFG.image_width)


def test_guidance_scale_one_is_the_conditional_model_alone(sampler):
    expected = _conditional_draws(sampler.params, jnp.asarray(TEXT), 5,
                                  SamplingSettings(temperature=0.9))
    np.testing.assert_array_equal(
        sampler.sample(TEXT, seed=5, settings=SamplingSettings(temperature=0.9)), expected)
    guided = sampler.sample(TEXT, seed=5, settings=SamplingSettings(temperature=0.9,
                                                                    guidance_scale=3.0))
    assert not np.array_equal(guided, expected), "the unconditional rows changed nothing"


def test_cached_and_uncached_draw_the_same_tokens(sampler):
    for settings in (SamplingSettings(), SamplingSettings(temperature=0.7, top_k=6, top_p=0.9),
                     SamplingSettings(guidance_scale=2.5)):
        np.testing.assert_array_equal(
            sampler.sample(TEXT, seed=11, num_samples=2, settings=settings),
            sampler.sample(TEXT, seed=11, num_samples=2, settings=settings, cache=False))


@pytest.mark.slow
def test_priming_keeps_rows_and_variations_differ(sampler):
    image = np.arange(18, dtype=np.int32).reshape(2, 3, 3) % CFG.image_vocab_size
    completed = sampler.complete(TEXT, image, prime_rows=2, seed=0, num_samples=3)
    assert completed.shape == (6, 3, 3)
    np.testing.assert_array_equal(completed[:3, :2], np.repeat(image[:1, :2], 3, 0))
    np.testing.assert_array_equal(completed[3:, :2], np.repeat(image[1:, :2], 3, 0))
    # Cached priming agrees with recomputation.
    np.testing.assert_array_equal(
        sampler.sample(TEXT, seed=0, num_samples=3, prime_codes=image, prime_rows=2,
                       cache=False), completed)
    variations = sampler.variations(TEXT[0], image[0], prime_rows=1, seeds=[0, 1, 2, 3])
    assert variations.shape == (4, 3, 3)
    assert (variations[:, 0] == image[0, 0]).all()
    assert len({v.tobytes() for v in variations}) > 1
    # A seed reproduces its variation.
    np.testing.assert_array_equal(
        sampler.variations(TEXT[0], image[0], prime_rows=1, seeds=[2])[0], variations[2])


def test_bad_priming_and_prompts(sampler):
    with pytest.raises(ValueError, match=r"priming codes must have shape \[B, 3, 3\]"):
        sampler.complete(TEXT, np.zeros((2, 4, 4), np.int32), prime_rows=1)
    with pytest.raises(ValueError, match=r"priming codes must lie in \[0, 24\)"):
        sampler.complete(TEXT, np.full((2, 3, 3), 24), prime_rows=1)
    with pytest.raises(ValueError, match="prime_rows must lie in"):
        sampler.complete(TEXT, np.zeros((2, 3, 3), np.int32), prime_rows=4)
    with pytest.raises(ValueError, match=r"text tokens must have shape \[B, 5\]"):
        sampler.sample(np.zeros((2, 7), np.int32))


class _Words:
    """A stand-in caption tokenizer: one id per word."""
    text_len = 5

    def encode(self, prompts):
        rows = np.zeros((len(prompts), 5), np.int32)
        cut = np.zeros((len(prompts),), bool)
        for i, p in enumerate(prompts):
            ids = [1 + len(w) for w in p.split()]
            cut[i] = len(ids) > 5
            rows[i, :min(len(ids), 5)] = ids[:5]
        return rows, cut


def test_long_prompts_are_truncated_with_a_warning(sampler, monkeypatch):
    warnings = []
    monkeypatch.setattr(absl_logging, "warning", lambda msg, *a: warnings.append(msg % a))
    text = sampler.tokenize(["a b c d e f g", "", "a red circle"], _Words())
    assert text.shape == (3, 5)
    assert (text[1] == 0).all()
    assert len(warnings) == 1 and "truncated to 5 tokens" in warnings[0]


def _train_two_prompt_toy(steps=150, batch=64, dropout=0.3):
    """A tiny model trained with the stage-2 loss on a toy: caption token 1 → every code
    0, caption token 2 → every code 1, and the caption dropped (all padding) with
    probability ``dropout``, so that the unconditional model learns the 50/50 mixture."""
    cfg = tr.TransformerConfig(text_vocab_size=3, text_len=2, image_vocab_size=2,
                               image_height=2, image_width=3, num_layers=2, num_heads=2,
                               head_dim=16, attention="dalle", conv_kernel=3,
                               scan_layers=False)
    model = tr.Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                                          jnp.zeros((1, 6), jnp.int32))["params"])
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, text, codes):
        def loss(p):
            text_logits, image_logits = model.apply({"params": p}, text, codes)
            return stage2.sequence_loss(text_logits, image_logits, text, codes,
                                        jnp.ones(len(text)), text_weight=1 / 8,
                                        image_weight=7 / 8)[0]
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(0)
    opt_state = tx.init(params)
    for _ in range(steps):
        label = rng.integers(0, 2, batch)
        text = np.zeros((batch, 2), np.int32)
        text[:, 0] = np.where(rng.random(batch) < dropout, 0, 1 + label)
        codes = np.repeat(label[:, None], 6, axis=1).astype(np.int32)
        params, opt_state, value = step(params, opt_state, text, codes)
    # The floor: the unconditional first token is a coin flip (ln 2 · 0.3 / 6 · 7/8).
    assert float(value) < 0.05, float(value)
    return sampler_lib.Sampler(cfg, params)


@pytest.mark.slow
def test_a_trained_model_follows_its_prompt_and_guidance_pulls_toward_it():
    sampler = _train_two_prompt_toy()
    prompts = np.array([[1, 0], [2, 0], [0, 0]], np.int32)  # → code 0, → code 1, none
    wanted = np.array([0, 1])[:, None, None]
    n = 256

    codes = sampler.sample(prompts, seed=0, num_samples=n).reshape(3, n, 6)
    assert (codes[:2] == wanted).mean(axis=(1, 2)).min() > 0.97
    # Without a caption: the mixture, whole images of either code.
    unconditional = codes[2]
    assert (unconditional == 0).all(1).mean() > 0.3
    assert (unconditional == 1).all(1).mean() > 0.3

    # At temperature 6 the conditional samples stray; guidance pulls them back, most
    # of all at the first position, where only the caption tells the codes apart.
    tokens, first = [], []
    for scale in (1.0, 2.0, 4.0):
        settings = SamplingSettings(temperature=6.0, guidance_scale=scale)
        hot = sampler.sample(prompts[:2], seed=1, num_samples=n,
                             settings=settings).reshape(2, n, 6)
        tokens.append((hot == wanted).mean(axis=(1, 2)))  # per prompt
        first.append((hot[:, :, 0] == wanted[:, :, 0]).mean(1))
    tokens, first = np.array(tokens), np.array(first)  # [scale, prompt]
    assert tokens[0].max() < 0.8, tokens  # imperfect without guidance
    assert (np.diff(tokens, axis=0) > 0.01).all(), tokens  # rises with the scale
    assert (tokens[2] - tokens[0] > 0.05).all(), tokens
    assert (first[0] < 0.85).all() and (first[2] > 0.95).all(), first
