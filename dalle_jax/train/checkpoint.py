"""Orbax checkpoints: async, atomic, checksummed, restorable onto another mesh.

A checkpoint at step ``s`` holds the whole :class:`~dalle_jax.train.step.TrainState`
(step, params, optimizer state, EMA, RNG, non-finite counters) and the input
iterator state of every process, so a resumed run continues exactly. Orbax writes
each checkpoint under a temporary name and renames it when complete: a run killed
mid-save leaves the previous checkpoints as they were.

Once a step is committed, a background thread records the sha256 and size of each of
its files in ``<step>/checksums/`` (each process hashes its share of the files, so a
pod hashes in parallel). A resume verifies them before restoring: a step whose files
were truncated, deleted or overwritten, or that does not restore at all, is
*damaged*. It is reported in one line, moved to ``<workdir>/checkpoints.damaged/``
(never deleted) and the run resumes from the newest step that is intact; with
``strict`` the run stops instead. A step that is intact but does not fit the config
(another model size, say) is the user's to resolve: the run stops with one line and
nothing is moved.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging as logging_std
import os
from typing import Any, Callable, Mapping

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from dalle_jax import errors
from dalle_jax import files

# Upper bound of one process's serialized data-iterator state (it is a few dozen bytes).
_MAX_DATA_STATE_BYTES = 1 << 16
CHECKSUMS = "checksums"  # the folder of each step holding its files' sha256
DAMAGED = "checkpoints.damaged"  # beside the checkpoints folder
_HASH_BLOCK = 8 << 20


def _gather_json(value: Any) -> list[Any]:
    """Every process's JSON-able ``value``, in process order, on every process."""
    encoded = json.dumps(value, sort_keys=True).encode()
    if len(encoded) > _MAX_DATA_STATE_BYTES:
        raise ValueError(f"per-process state of {len(encoded)} bytes is too large")
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


class CheckpointError(errors.UserError):
    """A checkpoint that cannot be used as it is; the message says which and why."""


class _Damaged(Exception):
    """A step whose files or contents are broken; ``args[0]`` says where and why."""


def absolute(path: str | epath.PathLike) -> epath.Path:
    """``path`` made absolute when it is local (orbax refuses relative paths); a
    ``gs://`` path is kept as it is."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def sha256_file(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def step_files(step_dir: epath.Path) -> list[str]:
    """The files of a step folder (paths relative to it), checksums excluded, sorted."""
    step_dir = epath.Path(step_dir)
    found, folders = [], [step_dir]
    while folders:  # a walk by listing: epath has no recursive glob on gs://
        for path in folders.pop().iterdir():
            if path.is_dir():
                if path != step_dir / CHECKSUMS:
                    folders.append(path)
            else:
                found.append(str(path.relative_to(step_dir)))
    return sorted(found)


def write_checksums(step_dir: epath.Path, process_index: int = 0,
                    process_count: int = 1) -> dict[str, Any]:
    """Hashes this process's share of ``step_dir``'s files into ``checksums/``."""
    step_dir = epath.Path(step_dir)
    entries = {}
    for relative in step_files(step_dir)[process_index::process_count]:
        path = step_dir / relative
        entries[relative] = {"sha256": sha256_file(path), "size": path.stat().length}
    files.atomic_write(
        step_dir / CHECKSUMS / f"process_{process_index:05d}-of-{process_count:05d}.json",
        json.dumps({"files": entries}, indent=1, sort_keys=True) + "\n")
    return entries


def read_checksums(step_dir: epath.Path) -> dict[str, dict[str, Any]] | None:
    """Every process's recorded checksums of a step, merged; None when it has none."""
    folder = epath.Path(step_dir) / CHECKSUMS
    if not folder.exists():
        return None
    merged: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("process_*.json")):
        try:
            merged.update(json.loads(path.read_text())["files"])
        except (ValueError, KeyError, TypeError) as e:
            raise _Damaged(f"{CHECKSUMS}/{path.name} is unreadable ({e})") from e
    return merged or None


def verify_files(step_dir: epath.Path, expected: Mapping[str, Mapping[str, Any]],
                 process_index: int = 0, process_count: int = 1) -> str | None:
    """The first of this process's share of ``expected`` files that is missing, of
    another size or of another sha256; None when all match."""
    step_dir = epath.Path(step_dir)
    for relative in sorted(expected)[process_index::process_count]:
        path = step_dir / relative
        want = expected[relative]
        if not path.exists():
            return f"{relative} is missing"
        size = path.stat().length
        if size != want["size"]:
            return f"{relative} has {size} bytes, {want['size']} when saved"
        if sha256_file(path) != want["sha256"]:
            return f"{relative} does not match its sha256 from the save"
    return None


def _first_line(e: BaseException, limit: int = 200) -> str:
    """The innermost cause of ``e`` on one line (tensorstore's reason is at the root)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split()) or type(e).__name__
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 1] + "…"


class _QuietFailedReads(logging_std.Filter):
    """Drops asyncio's "Task exception was never retrieved" for the other array reads
    of a restore that failed (the first failure is reported; the rest repeat it)."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return "never retrieved" not in str(record.msg)


def _path_names(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def _shapes(tree) -> dict[str, tuple]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_names(p): tuple(getattr(v, "shape", ())) for p, v in flat}


class Checkpointer:
    """Saves and restores train states under ``<workdir>/checkpoints``."""

    def __init__(self, directory: str | epath.PathLike, *, save_interval_steps: int,
                 max_to_keep: int | None = 3, keep_period: int | None = None,
                 async_save: bool = True, checksums: bool = True):
        self.save_interval_steps = save_interval_steps
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the interval is applied by should_save
            max_to_keep=max_to_keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.directory = absolute(directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._checksums = checksums
        self._last_saved: int | None = None
        self._unhashed: list[int] = []  # saved steps whose checksums are not written yet
        self._hasher: concurrent.futures.ThreadPoolExecutor | None = None
        self._hashing: list[concurrent.futures.Future] = []

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def should_save(self, step: int) -> bool:
        """Every ``save_interval_steps`` steps (orbax alone would also save step 1)."""
        return step % self.save_interval_steps == 0

    def save(self, step: int, state, data_state: Mapping[str, Any] | None = None, *,
             force: bool = False) -> bool:
        """Starts saving ``state`` (async); every process calls it with its data state.

        A step already saved (or being saved) is not saved again: a preemption save
        right after a periodic save is a no-op. Returns whether a save started.
        """
        if step == self._last_saved or step in self._manager.all_steps():
            return False
        data = {"processes": _gather_json(data_state or {})}
        # Orbax waits for the previous save before it starts this one; waiting here
        # first lets that step's checksums start at once.
        self._manager.wait_until_finished()
        self._submit_committed()
        started = self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=ocp.args.JsonSave(data)),
            force=force)
        if started:
            self._last_saved = step
            if self._checksums:
                self._unhashed.append(step)
        self.poll()
        return started

    def _submit_committed(self) -> None:
        """Hands the saved steps (all committed: no save is in flight) to the checksum
        thread."""
        if not self._unhashed:
            return
        if self._hasher is None:
            self._hasher = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="checkpoint-sha256")
        for step in self._unhashed:
            self._hashing.append(self._hasher.submit(self._hash_step, step))
        self._unhashed = []

    def poll(self) -> None:
        """Starts the checksums of a committed step; cheap, call it every step."""
        if self._unhashed and not self._manager.is_saving_in_progress():
            self._submit_committed()
        finished = [f for f in self._hashing if f.done()]
        for future in finished:
            self._hashing.remove(future)
            future.result()  # a failure to write checksums is an error of the run

    def _hash_step(self, step: int) -> None:
        step_dir = self.step_dir(step)
        if step_dir.exists():  # not already removed by max_to_keep
            write_checksums(step_dir, jax.process_index(), jax.process_count())

    def _problem(self, step: int) -> tuple[str | None, bool]:
        """(what is wrong with ``step``'s files or None, whether checksums exist),
        agreed by all processes."""
        step_dir = self.step_dir(step)
        try:
            expected = read_checksums(step_dir)
            problem = (None if expected is None else verify_files(
                step_dir, expected, jax.process_index(), jax.process_count()))
        except _Damaged as e:
            expected, problem = {}, str(e)
        except OSError as e:
            expected, problem = {}, _first_line(e)
        reports = _gather_json({"problem": problem, "verified": expected is not None})
        problems = [r["problem"] for r in reports if r["problem"]]
        return (problems[0] if problems else None), all(r["verified"] for r in reports)

    def _restore_step(self, abstract_state, step: int):
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    data=ocp.args.JsonRestore()))
        processes = restored.data["processes"]
        data_state = (processes[jax.process_index()]
                      if len(processes) == jax.process_count() else None)
        return restored.state, data_state, step

    def check_fits(self, step: int, abstract_state) -> None:
        """Raises CheckpointError when the saved arrays' shapes are not the config's
        (read from the step's metadata; nothing when that cannot be read)."""
        try:
            saved = _shapes(ocp.StandardCheckpointHandler().metadata(
                self.step_dir(step) / "state"))
        except Exception:  # pylint: disable=broad-except
            return
        wanted = _shapes(abstract_state)
        differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if differ:
            key = differ[0]
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit this config "
                f"({len(differ)} arrays differ, e.g. {key}: saved "
                f"{saved.get(key, 'absent')}, config {wanted.get(key, 'absent')}); "
                "resume with the run's own config (its config.json) or use a new workdir")

    def _restore_error(self, step: int, error: Exception, verified: bool) -> str:
        """Why ``step`` did not restore, as a damage report; raises CheckpointError
        when its files are intact (the failure is not damage)."""
        logging_std.getLogger("asyncio").addFilter(_QuietFailedReads())
        if not step_files(self.step_dir(step)):
            return "its folder is empty"
        if verified:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is intact (its checksums "
                f"match) but does not restore: {_first_line(error)}")
        try:  # which part: the data state is one small JSON file
            self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
            part = "state"
        except Exception:  # pylint: disable=broad-except
            part = "data"
        return f"{part}: {_first_line(error)}; the step has no checksums"

    def _move_aside(self, step: int) -> epath.Path:
        """Moves a damaged step out of the checkpoints folder (process 0); returns where."""
        damaged = self.directory.parent / DAMAGED
        target = damaged / str(step)
        suffix = 1
        while target.exists():
            target = damaged / f"{step}.{suffix}"
            suffix += 1
        if jax.process_index() == 0:
            damaged.mkdir(parents=True, exist_ok=True)
            self.step_dir(step).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
        self._manager.reload()
        return target

    def restore_latest(self, abstract_state, *, strict: bool = False,
                       report: Callable[[str], Any] = logging.warning):
        """Restores the newest intact step; None when there is no checkpoint to use.

        Each newer step that is damaged is reported through ``report`` in one line and
        moved aside; with ``strict`` a damaged step raises :class:`CheckpointError`.
        """
        for step in sorted(self.all_steps(), reverse=True):
            logging.info("restoring checkpoint step %d from %s", step, self.directory)
            problem, verified = self._problem(step)
            if problem is None:
                self.check_fits(step, abstract_state)
                try:
                    return self._restore_step(abstract_state, step)
                except Exception as e:  # pylint: disable=broad-except
                    problem = self._restore_error(step, e, verified)
            message = f"checkpoint step {step} is damaged ({problem})"
            if strict:
                raise CheckpointError(
                    f"{message}; stopping as config.checkpoint.strict is set (move "
                    f"{self.step_dir(step)} aside to resume from an earlier step)")
            moved = self._move_aside(step)
            report(f"{message}: moved to {moved}; trying the step before it")
        return None

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict | None, int]:
        """Restores ``step`` (the latest by default) into ``abstract_state``
        (ShapeDtypeStructs with shardings), verifying its checksums.

        The shardings may differ from those that saved it (another mesh or device
        count): arrays are read directly into the new layout. Returns the state, this
        process's data-iterator state (None when the checkpoint was written by a
        different number of processes, whose streams cannot be mapped onto these)
        and the step. A damaged step raises :class:`CheckpointError`.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        problem, _ = self._problem(step)
        if problem is not None:
            raise CheckpointError(f"checkpoint step {step} is damaged ({problem})")
        self.check_fits(step, abstract_state)
        return self._restore_step(abstract_state, step)

    def restore_parts(self, abstract_parts: Mapping[str, Any], step: int | None = None
                      ) -> tuple[dict[str, Any], int]:
        """Restores only some fields of the saved train state, e.g. ``{"ema_params": ...,
        "model_state": ...}`` (ShapeDtypeStructs with shardings): the other arrays
        (optimizer moments and the like) are not read. For inference; the step's
        checksums are verified first (a damaged step raises :class:`CheckpointError`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        problem, _ = self._problem(step)
        if problem is not None:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged "
                                  f"({problem}); pick another step")
        abstract_parts = dict(abstract_parts)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=abstract_parts,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_parts),
                    partial_restore=True)))
        except ValueError as e:  # a stored shape the config does not describe
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the config's "
                f"model: {_first_line(e)}") from None
        # A partial restore leaves what the checkpoint lacks as the abstract placeholder:
        # a model config that does not match the run's. Refuse it, naming the first.
        missing = [jax.tree_util.keystr(path) for path, leaf in
                   jax.tree_util.tree_flatten_with_path(restored.state)[0]
                   if isinstance(leaf, jax.ShapeDtypeStruct)]
        if missing:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has no {missing[0]} "
                f"({len(missing)} arrays missing): the config describes another model "
                "than the one the run saved")
        return dict(restored.state), step

    def reached_preemption(self, step: int) -> bool:
        """Whether all processes agreed to stop at ``step`` (TPU/multi-host preemption)."""
        return self._manager.reached_preemption(step)

    def wait_until_finished(self) -> None:
        """Waits for the save in flight and the checksums of every saved step."""
        self._manager.wait_until_finished()
        self.poll()
        for future in self._hashing:
            future.result()
        self._hashing = []

    def close(self) -> None:
        self.wait_until_finished()
        if self._hasher is not None:
            self._hasher.shutdown()
        self._manager.close()
