"""Image-token sampling from the stage-2 transformer.

One jitted function per (model, settings, priming depth): a prefill pass over the text
(and any primed image rows) fills the key/value cache, then a ``lax.fori_loop`` decodes
the remaining image positions one at a time — no Python loop per token. A batch holds
prompts × samples; with classifier-free guidance the conditional rows and their
unconditional twins (the empty caption) go through the same forward pass and the next
token is drawn from ``uncond + s · (cond − uncond)``.

Every row has its own key, and each token is drawn with that key folded with the image
position: a row's sample depends on its key, its prompt and the model only — not on the
batch it shares, the padding or the device count — and cached and uncached decoding draw
the same tokens.

    sampler = Sampler(model_config, params)
    codes = sampler.sample(text_tokens, seed=0, settings=SamplingSettings(top_k=64))
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.models import transformer as transformer_lib
from dalle_jax.train import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set with this much probability; 1 keeps all
    guidance_scale: float = 1.0  # 1: conditional logits only (no unconditional rows)

    def check(self, vocab_size: int) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if not 0 <= self.top_k <= vocab_size or int(self.top_k) != self.top_k:
            raise ValueError(f"top_k must be an integer in [0, {vocab_size}] (0 disables "
                             f"it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 disables it), got {self.top_p}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {self.guidance_scale}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0


def filter_logits(logits: jax.Array, settings: SamplingSettings) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) over fp32 logits [..., V]; excluded
    tokens get −inf. The most likely token always survives."""
    logits = logits.astype(jnp.float32) / settings.temperature
    if settings.top_k:
        kth = jax.lax.top_k(logits, settings.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if settings.top_p < 1.0:
        sorted_logits = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the probability of the tokens before it is below top_p;
        # the smallest kept logit is the cut-off (ties with it are kept too).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < settings.top_p, sorted_logits, jnp.inf),
                         axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _guide(logits: jax.Array, settings: SamplingSettings, rows: int) -> jax.Array:
    if not settings.guided:
        return logits
    cond, uncond = logits[:rows], logits[rows:]
    return uncond + settings.guidance_scale * (cond - uncond)


def _draw(logits: jax.Array, keys: jax.Array, position, settings: SamplingSettings):
    """One token per row of ``logits`` [B, V], row r drawn with ``keys[r]`` folded with
    ``position``."""
    logits = filter_logits(logits, settings)
    draw = lambda key, row: jax.random.categorical(jax.random.fold_in(key, position), row)
    return jax.vmap(draw)(keys, logits).astype(jnp.int32)


def row_keys(seed: int | jax.Array, rows: int) -> jax.Array:
    """The keys of ``rows`` rows drawn with one seed: ``fold_in(key(seed), r)``."""
    key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows))


def _with_unconditional(text: jax.Array, settings: SamplingSettings, pad_id: int):
    if not settings.guided:
        return text
    return jnp.concatenate([text, jnp.full_like(text, pad_id)], axis=0)


def _twice(x: jax.Array, settings: SamplingSettings) -> jax.Array:
    return jnp.concatenate([x, x], axis=0) if settings.guided else x


def _as_keys(keys: jax.Array) -> jax.Array:
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        return keys
    return jax.random.wrap_key_data(keys)


@functools.partial(jax.jit, static_argnames=("model", "settings", "prime_positions"))
def sample_cached(model: transformer_lib.Transformer, params, text: jax.Array,
                  prime: jax.Array, keys: jax.Array, *, settings: SamplingSettings,
                  prime_positions: int = 0) -> jax.Array:
    """Image codes int32 [B, h·w] for text int [B, text_len]; positions below
    ``prime_positions`` are copied from ``prime`` [B, h·w] and the rest sampled, row r
    with ``keys[r]`` (``keys``: a key array [B], or its uint32 key data [B, 2])."""
    keys = _as_keys(keys)
    cfg = model.config
    rows = text.shape[0]
    variables = {"params": params}
    stream = _with_unconditional(text, settings, cfg.pad_id)
    prefix = _twice(prime[:, :prime_positions], settings)
    _, _, cache = model.apply(variables, stream, prefix, method="prefill")
    cache = transformer_lib.decode_cache(cache, cfg)
    decode_variables = {"params": transformer_lib.decode_params(params, cfg)}
    codes = jnp.where(jnp.arange(cfg.image_len) < prime_positions, prime, 0).astype(jnp.int32)

    def body(a, carry):
        codes, cache = carry
        previous = jax.lax.dynamic_index_in_dim(codes, jnp.maximum(a - 1, 0), 1, False)
        logits, cache = model.apply(decode_variables, _twice(previous, settings), cache, a,
                                    method="decode")
        token = _draw(_guide(logits, settings, rows), keys, a, settings)
        codes = jax.lax.dynamic_update_index_in_dim(codes, token, a, 1)
        return codes, cache

    codes, _ = jax.lax.fori_loop(prime_positions, cfg.image_len, body, (codes, cache))
    return codes


@functools.partial(jax.jit, static_argnames=("model", "settings", "prime_positions"))
def sample_uncached(model: transformer_lib.Transformer, params, text: jax.Array,
                    prime: jax.Array, keys: jax.Array, *, settings: SamplingSettings,
                    prime_positions: int = 0) -> jax.Array:
    """The same draws as :func:`sample_cached`, recomputing the whole stream for every
    token (the reference for tests and the baseline of the sampling benchmark)."""
    keys = _as_keys(keys)
    cfg = model.config
    rows = text.shape[0]
    variables = {"params": params}
    stream = _with_unconditional(text, settings, cfg.pad_id)
    codes = jnp.where(jnp.arange(cfg.image_len) < prime_positions, prime, 0).astype(jnp.int32)

    def body(a, codes):
        _, logits = model.apply(variables, stream, _twice(codes, settings))
        logits = jax.lax.dynamic_index_in_dim(logits, a, 1, False)
        token = _draw(_guide(logits, settings, rows), keys, a, settings)
        return jax.lax.dynamic_update_index_in_dim(codes, token, a, 1)

    return jax.lax.fori_loop(prime_positions, cfg.image_len, body, codes)


def _check_codes(codes: Any, config: transformer_lib.TransformerConfig) -> np.ndarray:
    codes = np.asarray(codes)
    grid = (config.image_height, config.image_width)
    if codes.ndim == 2:
        codes = codes[None]
    if codes.ndim != 3 or codes.shape[1:] != grid:
        raise ValueError(f"priming codes must have shape [B, {grid[0]}, {grid[1]}] (the "
                         f"model's code grid); got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"priming codes must be integers; got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= config.image_vocab_size):
        raise ValueError(f"priming codes must lie in [0, {config.image_vocab_size}); got "
                         f"[{codes.min()}, {codes.max()}]")
    return codes.reshape(len(codes), -1).astype(np.int32)


class Sampler:
    """Samples code grids from trained transformer parameters.

    ``mesh`` (optional) shards the batch over its data axes and the parameters by the
    logical ``rules``; rows are padded to a multiple of the batch shards.
    """

    def __init__(self, config: transformer_lib.TransformerConfig, params, *, mesh=None,
                 rules: Sequence[tuple[str, Any]] | None = None):
        self.config = config
        self.model = transformer_lib.Transformer(config)
        self.params = params
        self.mesh = mesh
        self.rules = tuple(rules) if rules is not None else ()

    # --- prompts --------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str], tokenizer) -> np.ndarray:
        """Prompt strings → int32 [B, text_len]; longer prompts are truncated with a
        warning, empty prompts give the unconditional (all-padding) row."""
        if tokenizer.text_len != self.config.text_len:
            raise ValueError(f"the tokenizer makes {tokenizer.text_len} tokens per caption "
                             f"but the model takes {self.config.text_len}")
        tokens, truncated = tokenizer.encode(list(prompts))
        for prompt, cut in zip(prompts, truncated):
            if cut:
                logging.warning("prompt truncated to %d tokens: %r", self.config.text_len,
                                prompt)
        return tokens

    # --- sampling -------------------------------------------------------------------

    def _batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        return int(np.prod([self.mesh.shape[a] for a in sharding_lib.BATCH_AXES
                            if a in self.mesh.shape]))

    def sample(self, text_tokens: Any, *, seed: int | jax.Array = 0, num_samples: int = 1,
               settings: SamplingSettings = SamplingSettings(), prime_codes: Any = None,
               prime_rows: int = 0, cache: bool = True, keys: jax.Array | None = None
               ) -> np.ndarray:
        """Codes int32 [B·num_samples, h, w], prompt-major (rows of prompt i are
        ``i·num_samples … i·num_samples + num_samples − 1``).

        Row r is drawn with ``keys[r]`` when ``keys`` (a key array [B·num_samples]) is
        given, else with :func:`row_keys` of ``seed``.

        ``prime_codes`` [B, h, w] (one grid per prompt) with ``prime_rows`` > 0 keeps that
        many top rows and samples the rest (image completion / variations).
        """
        cfg = self.config
        settings.check(cfg.image_vocab_size)
        text = np.asarray(text_tokens)
        if text.ndim == 1:
            text = text[None]
        if text.ndim != 2 or text.shape[1] != cfg.text_len:
            raise ValueError(f"text tokens must have shape [B, {cfg.text_len}]; got "
                             f"{text.shape}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 <= prime_rows <= cfg.image_height:
            raise ValueError(f"prime_rows must lie in [0, {cfg.image_height}], got {prime_rows}")
        if prime_rows and prime_codes is None:
            raise ValueError("prime_rows > 0 needs prime_codes")
        prime = np.zeros((len(text), cfg.image_len), np.int32)
        if prime_codes is not None:
            prime = _check_codes(prime_codes, cfg)
            if len(prime) == 1 and len(text) > 1:
                prime = np.repeat(prime, len(text), axis=0)
            if len(prime) != len(text):
                raise ValueError(f"{len(prime)} priming grids for {len(text)} prompts")
        text = np.repeat(text.astype(np.int32), num_samples, axis=0)
        prime = np.repeat(prime, num_samples, axis=0)
        rows = len(text)
        if keys is None:
            keys = row_keys(seed, rows)
        if keys.shape != (rows,):
            raise ValueError(f"{keys.shape[0] if keys.ndim else 'no'} keys for {rows} rows")
        key_data = np.asarray(jax.random.key_data(keys))
        shards = self._batch_shards()
        padded = -(-rows // shards) * shards
        if padded != rows:
            text = np.concatenate([text, np.repeat(text[-1:], padded - rows, 0)])
            prime = np.concatenate([prime, np.repeat(prime[-1:], padded - rows, 0)])
            key_data = np.concatenate([key_data, np.repeat(key_data[-1:], padded - rows, 0)])
        fn = sample_cached if cache else sample_uncached
        kwargs = dict(model=self.model, settings=settings,
                      prime_positions=prime_rows * cfg.image_width)
        if self.mesh is None:
            codes = fn(params=self.params, text=jnp.asarray(text), prime=jnp.asarray(prime),
                       keys=jnp.asarray(key_data), **kwargs)
        else:
            batch = sharding_lib.batch_sharding(self.mesh)
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                codes = fn(params=self.params, text=jax.device_put(text, batch),
                           prime=jax.device_put(prime, batch),
                           keys=jax.device_put(key_data, batch), **kwargs)
        codes = np.asarray(codes)[:rows]
        return codes.reshape(rows, cfg.image_height, cfg.image_width)

    def complete(self, text_tokens: Any, codes: Any, prime_rows: int, *, seed=0,
                 num_samples: int = 1, settings: SamplingSettings = SamplingSettings()
                 ) -> np.ndarray:
        """Image-to-image completion: keep the top ``prime_rows`` rows of each grid in
        ``codes`` and sample the rest, ``num_samples`` times per prompt."""
        if prime_rows < 1:
            raise ValueError("completion keeps at least one row (prime_rows ≥ 1)")
        return self.sample(text_tokens, seed=seed, num_samples=num_samples, settings=settings,
                           prime_codes=codes, prime_rows=prime_rows)

    def variations(self, text_tokens: Any, codes: Any, *, prime_rows: int,
                   seeds: Sequence[int], settings: SamplingSettings = SamplingSettings()
                   ) -> np.ndarray:
        """Variations of one image: its top ``prime_rows`` rows kept, the rest resampled
        once per seed. Returns int32 [len(seeds), h, w]."""
        codes = _check_codes(codes, self.config)
        if len(codes) != 1:
            raise ValueError(f"variations take one code grid; got {len(codes)}")
        text = np.asarray(text_tokens).reshape(1, -1)
        grids = codes.reshape(1, self.config.image_height, self.config.image_width)
        return np.concatenate([
            self.sample(text, seed=s, settings=settings, prime_codes=grids,
                        prime_rows=prime_rows) for s in seeds])
