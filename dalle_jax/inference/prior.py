"""A trained unCLIP diffusion prior as a library: captions in, image embeddings out.

    prior = Prior.load_run("runs/unclip_prior_shapes")   # and its contrastive run
    z_img = prior.sample(["a red circle in the top left"], best_of=2)   # [N, D], unit

The embeddings are those of the contrastive model the prior was trained on
(``config.prior.reranker_run``, loaded with it unless given): ``prior.reranker`` embeds
the prompts (its tokenizer is the prior's) and scores the candidates. Sampling is DDIM
over ``steps`` steps of the run's continuous-time schedule with ``eta`` from 0
(deterministic) to 1 (DDPM ancestral) and classifier-free guidance of scale
``guidance_scale`` (conditional and unconditional rows in one pass), one jitted scan per
batch, the batch split over the mesh's batch axes. ``best_of=n`` draws n embeddings per
prompt and keeps the one whose cosine with the prompt's text embedding is highest
(unCLIP samples two). Prompt ``i`` is drawn with ``keys[i]`` (by default
``fold_in(key(seed), i)``); with ``best_of = n > 1`` its candidate ``c`` with
``fold_in(keys[i], c)``. A prompt's result does not depend on the batch it is in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax.diffusion import schedules
from dalle_jax.inference import runs
from dalle_jax.models import prior as prior_lib
from dalle_jax.stages import unclip_prior as stage
from dalle_jax.train import sharding as sharding_lib


class PriorError(errors.UserError, ValueError):
    """Settings or prompts the prior cannot take."""


@dataclasses.dataclass(frozen=True)
class PriorSettings:
    steps: int = 25
    eta: float = 0.0
    guidance_scale: float = 1.0

    def check(self) -> None:
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1:
            raise PriorError(f"prior steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise PriorError(f"prior eta must lie in [0, 1], got {self.eta}")
        if not self.guidance_scale >= 0.0 or not np.isfinite(self.guidance_scale):
            raise PriorError(f"prior guidance_scale must be a non-negative number, got "
                             f"{self.guidance_scale}")


def _sizes(reranker_config) -> dict[str, int]:
    return {"model.embed_dim": reranker_config.model.embed_dim,
            "text.text_len": reranker_config.text.text_len,
            "text.vocab_size": reranker_config.text.vocab_size}


def _check_reranker(config, reranker) -> None:
    """A reranker given to :meth:`Prior.load_run` has the sizes of the contrastive run
    the prior was trained on (when that run's config can still be read)."""
    try:
        trained_on = config_lib.read_config(config.prior.reranker_run)
    except (FileNotFoundError, ValueError, TypeError):
        return
    ours, theirs = _sizes(reranker.config), _sizes(trained_on)
    for key in ours:
        if ours[key] != theirs[key]:
            raise PriorError(f"the reranker has {key}={ours[key]} but the prior was trained "
                             f"on {config.prior.reranker_run}, which has {theirs[key]}")


@dataclasses.dataclass
class Prior:
    config: ml_collections.ConfigDict  # the prior run's config
    params: Any
    reranker: Any  # dalle_jax.inference.reranker.Reranker: embeddings, tokenizer
    mesh: jax.sharding.Mesh
    step: int | None = None
    batch_size: int = 256  # embeddings per sampling call (rounded up to fill the devices)

    def __post_init__(self):
        self.model_config = stage.model_config(self.config, self.reranker.config)
        self.model = prior_lib.DiffusionPrior(self.model_config)
        self.schedule = schedules.from_config(self.config.diffusion.schedule)
        self.prediction = self.config.diffusion.prediction
        sample = self.config.diffusion.get("sample", {})
        self.default_settings = PriorSettings(
            steps=int(sample.get("steps", 25)), eta=float(sample.get("eta", 0.0)),
            guidance_scale=float(sample.get("guidance_scale", 1.0)))
        self._rules = sharding_lib.logical_rules(self.config.sharding)
        self._batch = sharding_lib.batch_sharding(self.mesh)
        self._samplers: dict[PriorSettings, Any] = {}  # compiled, by settings

    @classmethod
    def load_run(cls, workdir: str, reranker: Any = None,
                 config: ml_collections.ConfigDict | None = None, *,
                 mesh: jax.sharding.Mesh | None = None, step: int | None = None) -> "Prior":
        """The prior run's checkpoint at ``step`` (the latest by default; its EMA
        parameters when the run kept them), with ``reranker`` or else the contrastive run
        its config names (``prior.reranker_run``, a path as the run was given it)."""
        if config is None:
            try:
                config = config_lib.read_config(workdir)
            except FileNotFoundError:
                raise runs.RunError(f"{workdir} is not a training run: it has no "
                                    f"{config_lib.CONFIG_FILE_NAME}") from None
        if config.get("task") != stage.__name__:
            raise runs.RunError(f"{workdir} is a run of {config.get('task') or 'no stage'}, "
                                f"not of the unCLIP prior ({stage.__name__})")
        mesh = runs.local_batch_mesh() if mesh is None else mesh
        if reranker is None:
            from dalle_jax.inference import reranker as reranker_lib  # pylint: disable=g-import-not-at-top
            reranker = reranker_lib.Reranker.load_run(config.prior.reranker_run, mesh=mesh)
        else:
            _check_reranker(config, reranker)
        loaded = runs.load_variables(workdir, config,
                                     stage.bundle_init(config, reranker.config), mesh, step)
        return cls(config, loaded.variables["params"], reranker, mesh, loaded.step)

    @property
    def embed_dim(self) -> int:
        return self.model_config.embed_dim

    def settings(self, steps: int | None = None, eta: float | None = None,
                 guidance_scale: float | None = None) -> PriorSettings:
        """The run's sampling defaults (``config.diffusion.sample``) with overrides,
        checked."""
        d = self.default_settings
        try:
            settings = PriorSettings(
                steps=d.steps if steps is None else steps,
                eta=d.eta if eta is None else float(eta),
                guidance_scale=(d.guidance_scale if guidance_scale is None
                                else float(guidance_scale)))
        except (TypeError, ValueError):
            raise PriorError(f"prior eta and guidance_scale must be numbers, got {eta!r} and "
                             f"{guidance_scale!r}") from None
        settings.check()
        return dataclasses.replace(settings, steps=int(settings.steps))

    def _sampler(self, settings: PriorSettings):
        if settings not in self._samplers:
            def run(params, tokens, text_embedding, keys):
                with nn.logical_axis_rules(self._rules):
                    return stage.sample_embeddings(
                        self.model, params, tokens, text_embedding, keys,
                        schedule=self.schedule, prediction=self.prediction,
                        steps=settings.steps, eta=settings.eta,
                        guidance_scale=settings.guidance_scale)
            self._samplers[settings] = jax.jit(run, out_shardings=self._batch)
        return self._samplers[settings]

    def sample(self, prompts: Sequence[str], *, keys: jax.Array | None = None, seed: int = 0,
               steps: int | None = None, eta: float | None = None,
               guidance_scale: float | None = None, best_of: int = 1) -> np.ndarray:
        """float32 [N, D] unit image embeddings, one per prompt (see the module's
        docstring for ``keys``, ``seed`` and ``best_of``)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise PriorError("the prior takes a list of prompts (strings)")
        prompts = list(prompts)
        if not prompts:
            raise PriorError("the prior needs at least one prompt, got none")
        if isinstance(best_of, bool) or int(best_of) != best_of or best_of < 1:
            raise PriorError(f"prior best_of must be a positive integer, got {best_of!r}")
        best_of = int(best_of)
        settings = self.settings(steps, eta, guidance_scale)
        if keys is None:
            base = jax.random.key(seed)
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.arange(len(prompts)))
        elif len(keys) != len(prompts):
            raise PriorError(f"{len(keys)} keys for {len(prompts)} prompts")
        tokens = np.asarray(self.reranker.tokenize(prompts), np.int32)
        text_embedding = np.asarray(self.reranker.embed_texts(tokens), np.float32)
        if best_of > 1:  # candidate c of prompt i: fold_in(keys[i], c), prompt-major
            keys = jax.vmap(lambda k: jax.vmap(lambda c: jax.random.fold_in(k, c))(
                jnp.arange(best_of)))(keys).reshape(-1)
            tokens = np.repeat(tokens, best_of, axis=0)
            text_embedding = np.repeat(text_embedding, best_of, axis=0)
        drawn = self._draw(settings, tokens, text_embedding, keys)
        if best_of == 1:
            return drawn
        drawn = drawn.reshape(len(prompts), best_of, -1)
        scores = np.einsum("ncd,ncd->nc", drawn,
                           text_embedding.reshape(len(prompts), best_of, -1))
        best = np.argmax(scores, axis=1)  # ties: the first candidate
        return drawn[np.arange(len(prompts)), best]

    def _draw(self, settings, tokens, text_embedding, keys) -> np.ndarray:
        sample = self._sampler(settings)
        shards = sharding_lib.batch_shard_count(self.mesh)
        chunk = -(-min(self.batch_size, len(tokens)) // shards) * shards
        out = []
        for start in range(0, len(tokens), chunk):
            parts = [tokens[start:start + chunk], text_embedding[start:start + chunk],
                     keys[start:start + chunk]]
            pad = chunk - len(parts[0])
            if pad:
                parts = [np.concatenate([p, np.repeat(p[-1:], pad, 0)]) if isinstance(
                    p, np.ndarray) else jnp.concatenate([p, jnp.repeat(p[-1:], pad, 0)])
                         for p in parts]
            placed = [jax.device_put(p, self._batch) for p in parts]
            out.append(np.asarray(sample(self.params, *placed))[:chunk - pad])
        return np.concatenate(out).astype(np.float32)
