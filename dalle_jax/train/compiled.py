"""A train step compiled ahead of time (dalle_jax.train.aot, tools/compile --save),
saved, and loaded by a run instead of compiling (``config.train.compiled_step``).

The file holds the serialised executable, its argument trees and a sha256 of the
lowered program. A run lowers its own step (quick: no compile) and loads the saved
executable only when the two programs agree.
"""
from __future__ import annotations

import hashlib
import pickle
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dalle_jax import errors
from dalle_jax import files
from dalle_jax.train import sharding as sharding_lib

FORMAT = 1


def abstract_inputs(training, task, config, mesh) -> tuple[Any, dict, Any]:
    """The train step's arguments as shapes with their shardings: (state, batch, rng)."""
    batch_sharding = sharding_lib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in task.batch_spec(config.batch_size).items()}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding_lib.replicated(mesh))
    return training.abstract_state, batch, rng


def program_fingerprint(lowered) -> str:
    """sha256 of a lowered step's program text: equal programs, equal fingerprints."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def save(compiled, fingerprint: str, path: str, metadata: dict, *,
         name: str = "train_step") -> None:
    """Writes ``compiled`` (its serialised executable and argument trees), the
    fingerprint of its program and ``metadata`` to ``path``, atomically."""
    from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    files.atomic_write(path, pickle.dumps({
        "format": FORMAT, "name": name, "executable": payload, "in_tree": in_tree,
        "out_tree": out_tree, "fingerprint": fingerprint, "metadata": metadata}))


def _read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            record = pickle.load(f)
    except FileNotFoundError:
        raise errors.UserError(f"{path} not found: write it with python -m "
                               "dalle_jax.tools.compile --save") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise errors.UserError(f"{path} is not a compiled step written by tools.compile")
    return record


def load(path: str, backend: Any = None) -> tuple[Callable, dict]:
    """The executable :func:`save` wrote, loaded on ``backend`` (default: this process's
    devices), and its metadata."""
    from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
    record = _read(path)
    compiled = serialize_executable.deserialize_and_load(
        record["executable"], record["in_tree"], record["out_tree"], backend=backend)
    return compiled, record["metadata"]


def load_train_step(path: str, training, task, config, mesh, rules) -> Callable:
    """The saved train step, for the trainer to run instead of compiling its own.

    The step must be the very program this config lowers to here (the fingerprints of
    the lowered programs agree); otherwise, or when the executable cannot be loaded on
    these devices, :class:`~dalle_jax.errors.ConfigError` says to compile it again.
    """
    from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
    record = _read(path)
    if not hasattr(task, "batch_spec"):
        raise errors.ConfigError("train.compiled_step", f"{config.task} gives no batch_spec: "
                                 "its step cannot be checked against the saved one")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = training.train_step.lower(*abstract_inputs(training, task, config, mesh))
    if program_fingerprint(lowered) != record["fingerprint"]:
        raise errors.ConfigError(
            "train.compiled_step", f"{path} holds another program than this config's train "
            "step (the config, the code, the mesh or jax differ); compile it again with "
            "python -m dalle_jax.tools.compile --save, or unset it")
    try:
        return serialize_executable.deserialize_and_load(
            record["executable"], record["in_tree"], record["out_tree"])
    except Exception as e:  # pylint: disable=broad-except
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise errors.ConfigError(
            "train.compiled_step", f"{path} does not load on these devices ({first}); "
            f"it was compiled for {record['metadata'].get('topology', 'another slice')}"
        ) from None
