r"""Trains a stage with the shared training core.

  python -m dalle_jax.tools.train --config=configs/<stage>.py --workdir=runs/<name>

Rerunning the same command in the same workdir resumes from the latest checkpoint.
Several processes (one per host) run the same command; on Cloud TPU pods and SLURM
they find each other automatically, elsewhere pass --coordinator_address,
--num_processes and --process_id. SIGTERM saves at the current step and exits 0.
"""
from __future__ import annotations

import sys

from absl import app, flags

from dalle_jax import config as config_lib
from dalle_jax.train import distributed

config_lib.define_flags()
distributed.define_flags()


def main(argv):
    del argv
    if flags.FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    # Before anything touches a jax backend.
    distributed.initialize_from_flags()
    from dalle_jax.train import trainer  # pylint: disable=g-import-not-at-top
    try:
        trainer.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except trainer.NonFiniteError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)


if __name__ == "__main__":
    config_lib.run(main)
