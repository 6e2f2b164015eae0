"""A trained stage-2 transformer as a library: load a run, get a sampler.

    run = TransformerRun.load("runs/transformer_shapes")
    sampler = run.sampler()                 # on this host's devices, batch-sharded
    codes = sampler.sample(text_tokens, seed=0, num_samples=8)

Loads parameters only (the EMA when the run kept them), sharded on the mesh given (by
default all local devices along the batch axis) by the run's logical-axis rules.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from dalle_jax import config as config_lib
from dalle_jax.inference import runs
from dalle_jax.models import transformer as transformer_lib
from dalle_jax.sampling import sampler as sampler_lib
from dalle_jax.stages import transformer as stage2
from dalle_jax.train import sharding as sharding_lib


@dataclasses.dataclass
class TransformerRun:
    config: ml_collections.ConfigDict
    model_config: transformer_lib.TransformerConfig
    params: Any
    step: int
    mesh: jax.sharding.Mesh

    @classmethod
    def load(cls, workdir: str, config: ml_collections.ConfigDict | None = None, *,
             mesh: jax.sharding.Mesh | None = None, step: int | None = None
             ) -> "TransformerRun":
        """The run's checkpoint at ``step`` (the latest by default), with ``config`` or
        else the config the run wrote, on ``mesh`` (local devices by default)."""
        if config is None:
            config = config_lib.read_config(workdir)
        mesh = runs.local_batch_mesh() if mesh is None else mesh
        model_config = stage2.model_config(config)
        model = transformer_lib.Transformer(model_config)
        loaded = runs.load_variables(
            workdir, config, lambda rng: stage2.init_variables(model, rng), mesh, step)
        return cls(config, model_config, loaded.variables["params"], loaded.step, mesh)

    def sampler(self) -> sampler_lib.Sampler:
        """A KV-cached sampler over these parameters, sharded on this run's mesh."""
        return sampler_lib.Sampler(self.model_config, self.params, mesh=self.mesh,
                                   rules=sharding_lib.logical_rules(self.config.sharding))
