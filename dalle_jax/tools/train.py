r"""Trains a stage with the shared training core.

  python -m dalle_jax.tools.train --config=configs/<stage>.py --workdir=runs/<name>

Rerunning the same command in the same workdir resumes from the latest checkpoint.
Several processes (one per host) run the same command; on Cloud TPU pods and SLURM
they find each other automatically, elsewhere pass --coordinator_address,
--num_processes and --process_id. SIGTERM saves at the current step and exits 0.

Exit status: 0 done (or stopped by a signal, saved); 1 an error (such as too many
non-finite updates); 2 a mistake in the command; 3 the hang watchdog ended the process
(no step completed for config.train.watchdog_seconds, e.g. another process died).
"""
from __future__ import annotations

import math
import sys

from absl import flags

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax.train import distributed

config_lib.define_flags()
distributed.define_flags()


def _check_devices(config) -> None:
    """What the config asks of the devices, known once they are (before any data is
    read or a model built)."""
    import jax  # pylint: disable=g-import-not-at-top
    from dalle_jax.train import sharding  # pylint: disable=g-import-not-at-top
    devices = jax.device_count()
    try:
        shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, devices)))
    except ValueError as e:
        raise errors.ConfigError("mesh", str(e)) from None
    shards = math.prod(shape[a] for a in sharding.BATCH_AXES)
    if config.batch_size % shards:
        axes = " x ".join(f"{a} {shape[a]}" for a in sharding.BATCH_AXES)
        raise errors.ConfigError(
            "batch_size", f"must split over the mesh's batch axes ({axes} over {devices} "
            f"devices), got {config.batch_size}")
    if config.batch_size % jax.process_count():
        raise errors.ConfigError(
            "batch_size", f"must split over the {jax.process_count()} processes, got "
            f"{config.batch_size}")


def main(argv):
    del argv  # --config and --workdir are checked before main (dalle_jax.validate)
    # Before anything touches a jax backend.
    distributed.initialize_from_flags()
    _check_devices(flags.FLAGS.config)
    from dalle_jax.train import trainer  # pylint: disable=g-import-not-at-top
    try:
        trainer.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except trainer.NonFiniteError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)


if __name__ == "__main__":
    config_lib.run(main)
