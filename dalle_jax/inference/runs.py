"""One loader for every stage: a run's config and its parameters, sharded on a mesh.

A training checkpoint holds the whole train state; inference needs only the
parameters (the EMA copy when the run kept one) and the model's non-gradient state
(such as a VQ-VAE's codebook). Those are restored straight into their shards on the
given mesh, by the config's logical-axis rules; the optimizer is never built and its
moments are never read.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from etils import epath
import flax.linen as nn
import jax
import ml_collections

from dalle_jax import errors
from dalle_jax.train import checkpoint as checkpoint_lib
from dalle_jax.train import sharding as sharding_lib

CHECKPOINTS = "checkpoints"


class RunError(errors.UserError, FileNotFoundError):
    """A directory that is not a run of the kind asked for, or has no checkpoint yet."""


@dataclasses.dataclass
class LoadedVariables:
    variables: dict[str, Any]  # {"params": ..., other collections}, sharded on the mesh
    step: int
    ema: bool  # whether "params" are the run's EMA parameters


def local_batch_mesh() -> jax.sharding.Mesh:
    """This process's devices, all along the batch axis (inference on one host)."""
    return sharding_lib.make_mesh(
        ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), jax.local_devices())


def abstract_variables(config: ml_collections.ConfigDict,
                       init: Callable[[jax.Array], dict[str, Any]],
                       mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """``jax.ShapeDtypeStruct`` leaves of the variables ``init`` (rng → logically boxed
    variables) makes, each with its sharding on ``mesh`` by ``config.sharding``'s rules.
    Nothing is materialised."""
    rules = sharding_lib.logical_rules(config.sharding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init, jax.random.key(0))
        shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
    return dict(jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed), shardings))


def load_variables(workdir: str | epath.PathLike, config: ml_collections.ConfigDict,
                   init: Callable[[jax.Array], dict[str, Any]], mesh: jax.sharding.Mesh,
                   step: int | None = None) -> LoadedVariables:
    """Restores the variables that ``init`` (rng → logically boxed variables) describes.

    Shapes and logical axis names come from ``jax.eval_shape(init)`` (nothing is
    materialised), shardings from ``config.sharding`` on ``mesh``. ``step`` is the
    latest checkpoint by default.
    """
    directory = epath.Path(workdir) / CHECKPOINTS
    if not directory.exists():
        raise RunError(f"no checkpoints in {workdir}: is it a training run?")
    if step is None and not any(p.name.isdigit() for p in directory.iterdir()):
        raise RunError(f"no checkpoint in {directory} yet: train the run until it saves one")
    abstract = abstract_variables(config, init, mesh)
    params = abstract.pop("params")
    use_ema = config.train.ema_decay > 0
    params_field = "ema_params" if use_ema else "params"
    checkpoints = checkpoint_lib.Checkpointer(directory, save_interval_steps=1)
    wanted = {params_field: params}
    if abstract:  # non-gradient collections, e.g. a VQ-VAE's codebook
        wanted["model_state"] = abstract
    try:
        parts, step = checkpoints.restore_parts(wanted, step)
    finally:
        checkpoints.close()
    return LoadedVariables({"params": parts[params_field], **parts.get("model_state", {})},
                           step, use_ema)

