"""Checkpoint checksums: what hashing every saved file costs, and what verifying costs.

A step's files are hashed (sha256) on a background thread once the step is committed,
and verified before a resume restores it (``dalle_jax.train.checkpoint``). Measured:

- the bench transformer's whole train state (params, EMA, Adam moments) saved through
  the trainer's Checkpointer with and without checksums: the training thread's time in
  ``save()`` and the time until the step and its checksums are on disk;
- hashing and verifying that step alone, as GB/s;
- one file the size of the 12B preset's per-host share of a checkpoint (its train
  state over the hosts of the slice ``config.bench.hosts_12b`` counts), hashed as a
  resume verifies it.
"""
from __future__ import annotations

import copy
import os
import shutil
import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from dalle_jax.bench import record
from dalle_jax.bench import transformer as transformer_bench
from dalle_jax.models import transformer as transformer_lib
from dalle_jax.stages import transformer as stage2
from dalle_jax.train import checkpoint as checkpoint_lib

_GB = 1e9


def summary(config: ml_collections.ConfigDict) -> str:
    return (f"median of {config.bench.repeats} saves of the bench transformer's train "
            f"state; the 12B preset's per-host share over {config.bench.hosts_12b} hosts")


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, names in os.walk(path) for f in names)


def _save_once(directory: str, state, *, checksums: bool) -> tuple[float, float]:
    """(seconds in save(), seconds until committed and hashed) of one fresh save."""
    shutil.rmtree(directory, ignore_errors=True)
    checkpointer = checkpoint_lib.Checkpointer(directory, save_interval_steps=1,
                                               checksums=checksums)
    try:
        start = time.perf_counter()
        checkpointer.save(1, state, {"index": 1})
        returned = time.perf_counter() - start
        checkpointer.wait_until_finished()
        return returned, time.perf_counter() - start
    finally:
        checkpointer.close()


def _range(saves, key: str) -> str:
    values = [t[key] * 1e3 for t in saves]
    return f"{min(values):.0f}–{max(values):.0f}"


def _state_bytes_12b(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(parameters, bytes of params + EMA + two Adam moments) of the 12B preset,
    from the abstract model (nothing is materialised)."""
    model = transformer_lib.Transformer(stage2.model_config(config))
    abstract = jax.eval_shape(lambda rng: nn.meta.unbox(stage2.init_variables(model, rng)),
                              jax.random.key(0))
    leaves = jax.tree.leaves(abstract["params"])
    count = sum(int(np.prod(x.shape)) for x in leaves)
    copies = 3 + (1 if config.train.ema_decay > 0 else 0)  # params, mu, nu (+ EMA), fp32
    return count, copies * 4 * count


def measure(config: ml_collections.ConfigDict, *, workdir: str,
            log: Callable[[str], Any] = print) -> dict[str, Any]:
    os.makedirs(workdir, exist_ok=True)
    bench = config.bench
    device = jax.local_devices()[0]
    log("building the bench transformer's train state")
    case = transformer_bench.TrainCase(config, "float32", 8, device)
    state = jax.block_until_ready(case.state)
    directory = os.path.join(workdir, "checkpoints")

    timings = {"with": [], "without": []}
    hash_s, verify_s = [], []
    for _ in range(bench.repeats):  # alternated, so both see the same machine state
        for name in ("without", "with"):
            in_save, committed = _save_once(directory, state, checksums=name == "with")
            timings[name].append({"in_save": in_save, "committed": committed})
        step_dir = checkpoint_lib.epath.Path(directory) / "1"
        start = time.perf_counter()
        checkpoint_lib.write_checksums(step_dir)
        hash_s.append(time.perf_counter() - start)
        expected = checkpoint_lib.read_checksums(step_dir)
        start = time.perf_counter()
        assert checkpoint_lib.verify_files(step_dir, expected) is None
        verify_s.append(time.perf_counter() - start)
    step_bytes = _dir_bytes(str(step_dir))
    shutil.rmtree(directory, ignore_errors=True)

    log("sizing the 12B preset's train state")
    big = copy.deepcopy(config.big)
    params_12b, bytes_12b = _state_bytes_12b(big)
    share = bytes_12b / bench.hosts_12b
    shard_bytes = int(min(share, bench.max_shard_bytes))
    log(f"hashing a {shard_bytes / _GB:.2f} GB file (the per-host share)")
    shard = checkpoint_lib.epath.Path(workdir) / "per_host_shard.bin"
    block = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    with shard.open("wb") as f:
        written = 0
        while written < shard_bytes:
            f.write(block[:shard_bytes - written])
            written += min(len(block), shard_bytes - written)
    shard_s = []
    for _ in range(bench.shard_repeats):
        start = time.perf_counter()
        checkpoint_lib.sha256_file(shard)
        shard_s.append(time.perf_counter() - start)
    shard.unlink()

    median = statistics.median
    returned = {k: median(t["in_save"] for t in v) for k, v in timings.items()}
    total = {k: median(t["committed"] for t in v) for k, v in timings.items()}
    gb = step_bytes / _GB
    figures = [
        record.figure(f"sha256 of a saved step ({gb * 1e3:.0f} MB, background thread)",
                      gb / median(hash_s), "GB/s", note=f"{median(hash_s) / gb:.2f} s per GB"),
        record.figure("verify a step before restoring it", gb / median(verify_s), "GB/s",
                      note=f"{median(verify_s) / gb:.2f} s per GB"),
        record.figure("training thread's time in save(), checksums on / off",
                      returned["with"] / returned["without"], "×",
                      note=f"{returned['with'] * 1e3:.0f} ms / "
                           f"{returned['without'] * 1e3:.0f} ms; per save "
                           f"{_range(timings['with'], 'in_save')} / "
                           f"{_range(timings['without'], 'in_save')} ms"),
        record.figure("save to committed and hashed / committed only",
                      total["with"] / total["without"], "×",
                      note=f"{total['with']:.2f} s / {total['without']:.2f} s"),
        record.figure(f"12B per-host share ({shard_bytes / _GB:.1f} GB): sha256 at resume",
                      median(shard_s), "s",
                      note=f"{median(shard_s) / (shard_bytes / _GB):.2f} s per GB; "
                           f"{params_12b:,} params, {bytes_12b / _GB:.0f} GB of train "
                           f"state over {bench.hosts_12b} hosts"),
    ]
    return {
        "figures": figures,
        "details": {"step_bytes": step_bytes, "hash_s": hash_s, "verify_s": verify_s,
                    "save_s": timings, "params_12b": params_12b, "state_bytes_12b": bytes_12b,
                    "shard_bytes": shard_bytes, "shard_hash_s": shard_s},
        "machine": {},
    }
