"""Sampling: filters, guidance, priming, variations, reproducibility and bad input."""
from __future__ import annotations

from absl import logging as absl_logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.models import transformer as tr
from dalle_jax.sampling import sampler as sampler_lib
from dalle_jax.sampling.sampler import SamplingSettings

CFG = tr.TransformerConfig(text_vocab_size=30, text_len=5, image_vocab_size=24,
                           image_height=3, image_width=3, num_layers=2, num_heads=2,
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


def test_top_k_one_is_greedy_decoding(sampler):
    codes = sampler.sample(TEXT, seed=0, settings=SamplingSettings(top_k=1)).reshape(2, -1)
    # Greedy by hand: every token is the argmax given the tokens before it.
    model = tr.Transformer(CFG)
    logits = model.apply({"params": sampler.params}, jnp.asarray(TEXT), jnp.asarray(codes))[1]
    np.testing.assert_array_equal(np.argmax(logits, -1), codes)


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
    # Scale 1 is plain conditional sampling.
    np.testing.assert_array_equal(
        sampler.sample(TEXT, seed=5, settings=SamplingSettings(guidance_scale=1.0)),
        sampler.sample(TEXT, seed=5))


def test_cached_and_uncached_draw_the_same_tokens(sampler):
    for settings in (SamplingSettings(), SamplingSettings(temperature=0.7, top_k=6, top_p=0.9),
                     SamplingSettings(guidance_scale=2.5)):
        np.testing.assert_array_equal(
            sampler.sample(TEXT, seed=11, num_samples=2, settings=settings),
            sampler.sample(TEXT, seed=11, num_samples=2, settings=settings, cache=False))


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
