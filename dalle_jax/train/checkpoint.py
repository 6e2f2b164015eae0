"""Orbax checkpoints: async, atomic, restorable onto another mesh, with data state.

A checkpoint at step ``s`` holds the whole :class:`~dalle_jax.train.step.TrainState`
(step, params, optimizer state, EMA, RNG, non-finite counters) and the input
iterator state of every process, so a resumed run continues exactly. Orbax writes
each checkpoint under a temporary name and renames it when complete: a run killed
mid-save leaves the previous checkpoints as they were.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

# Upper bound of one process's serialized data-iterator state (it is a few dozen bytes).
_MAX_DATA_STATE_BYTES = 1 << 16


def _gather_json(value: Mapping[str, Any]) -> list[Any]:
    """Every process's JSON-able ``value``, in process order, on every process."""
    encoded = json.dumps(value, sort_keys=True).encode()
    if len(encoded) > _MAX_DATA_STATE_BYTES:
        raise ValueError(f"data iterator state of {len(encoded)} bytes is too large")
    if jax.process_count() == 1:
        return [json.loads(encoded)]
    buffer = np.zeros((_MAX_DATA_STATE_BYTES + 4,), np.uint8)
    buffer[:4] = np.frombuffer(np.uint32(len(encoded)).tobytes(), np.uint8)
    buffer[4:4 + len(encoded)] = np.frombuffer(encoded, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buffer))
    states = []
    for row in gathered.reshape(jax.process_count(), -1):
        size = int(np.frombuffer(row[:4].tobytes(), np.uint32)[0])
        states.append(json.loads(row[4:4 + size].tobytes()))
    return states


class Checkpointer:
    """Saves and restores train states under ``<workdir>/checkpoints``."""

    def __init__(self, directory: str | epath.PathLike, *, save_interval_steps: int,
                 max_to_keep: int | None = 3, keep_period: int | None = None,
                 async_save: bool = True):
        self.save_interval_steps = save_interval_steps
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the interval is applied by should_save
            max_to_keep=max_to_keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.directory = epath.Path(directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Every ``save_interval_steps`` steps (orbax alone would also save step 1)."""
        return step % self.save_interval_steps == 0

    def save(self, step: int, state, data_state: Mapping[str, Any] | None = None, *,
             force: bool = False) -> bool:
        """Starts saving ``state`` (async); every process calls it with its data state."""
        data = {"processes": _gather_json(data_state or {})}
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=ocp.args.JsonSave(data)),
            force=force)

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict | None, int]:
        """Restores into ``abstract_state`` (ShapeDtypeStructs with shardings).

        The shardings may differ from those that saved it (another mesh or device
        count): arrays are read directly into the new layout. Returns the state, this
        process's data-iterator state (None when the checkpoint was written by a
        different number of processes, whose streams cannot be mapped onto these)
        and the step.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    data=ocp.args.JsonRestore()))
        processes = restored.data["processes"]
        data_state = (processes[jax.process_index()]
                      if len(processes) == jax.process_count() else None)
        return restored.state, data_state, step

    def restore_parts(self, abstract_parts: Mapping[str, Any], step: int | None = None
                      ) -> tuple[dict[str, Any], int]:
        """Restores only some fields of the saved train state, e.g. ``{"ema_params": ...,
        "model_state": ...}`` (ShapeDtypeStructs with shardings): the other arrays
        (optimizer moments and the like) are not read. For inference."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract_parts = dict(abstract_parts)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=abstract_parts,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_parts),
                partial_restore=True)))
        return dict(restored.state), step

    def reached_preemption(self, step: int) -> bool:
        """Whether all processes agreed to stop at ``step`` (TPU/multi-host preemption)."""
        return self._manager.reached_preemption(step)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
