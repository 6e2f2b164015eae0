r"""Checkpoint checksum benchmark: the bench transformer's train state, and the 12B
preset's per-host share of a checkpoint.

  python -m dalle_jax.tools.bench checkpoint --config=configs/bench_checkpoint.py

Smoke size (the smoke transformer; a 64 MB stand-in for the per-host share):

  python -m dalle_jax.tools.bench checkpoint --config=configs/bench_checkpoint.py:runlocal

Saves the state through the trainer's Checkpointer with and without checksums, times
hashing and verifying one step, then hashes one file as large as a host's share of
the 12B preset's checkpoint (its train state over the 64 hosts of a v5litepod-256).
"""
import importlib.util
import os

from dalle_jax.config import parse_arg
import ml_collections


def _config(name, arg):
    # Beside this file, not beside the package: configs are read from the checkout.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_checkpoint_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    config = _config("bench_transformer", "runlocal" if arg.runlocal else None)
    del config.bench, config.targets
    config.big = _config("transformer_photos", None)  # the 12B preset
    # The preset spreads its state over the whole slice (fsdp -1): here a
    # v5litepod-256, where it trains without accumulation (BENCHMARKS.md, "Scale").
    chips = 256
    config.bench = ml_collections.ConfigDict(dict(
        repeats=9,  # saves timed with and without checksums, alternated; medians
        shard_repeats=3,
        chips_per_host=4,  # TPU v4, v5p and v5e pod hosts
        # The checkpoint is written once, spread over the hosts of that slice.
        hosts_12b=chips // 4,
        max_shard_bytes=10**13,  # no cap
    ))
    config.known_gap = "no target is set: the figures are the cost the issue asks for."
    config.runlocal = arg.runlocal
    if arg.runlocal:
        config.bench.update(repeats=1, shard_repeats=1, max_shard_bytes=64 << 20)
    return config
