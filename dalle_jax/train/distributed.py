"""Multi-process start-up and preemption.

Every process runs the same program. ``initialize`` joins them through
``jax.distributed``: from explicit flags (local tests: a coordinator on localhost,
CPU collectives over gloo), or auto-detected on Cloud TPU pods and SLURM.
"""
from __future__ import annotations

import os

from absl import flags, logging
import jax

from dalle_jax import signals


def define_flags() -> None:
    """Flags for runs whose processes jax cannot find by itself (once per program)."""
    if "coordinator_address" in flags.FLAGS:
        return
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0, for multi-process runs that jax cannot "
                        "detect (auto-detected on Cloud TPU pods and SLURM).")
    flags.DEFINE_integer("num_processes", None, "Processes in the run.")
    flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize_from_flags() -> None:
    """:func:`initialize` with the values of :func:`define_flags`'s flags."""
    initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
               flags.FLAGS.process_id)


def _cluster_detected() -> bool:
    """Whether this process is one of several on a cluster jax can auto-detect."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the processes of a multi-process run (no-op for a single process)."""
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        # Cross-process collectives between CPU devices (tests, CPU clusters) go
        # through gloo; accelerators use their own and ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _cluster_detected():
        jax.distributed.initialize()
    else:
        return
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


class PreemptionWatcher:
    """Tells the loop to save and stop after a stop signal (SIGTERM, SIGINT).

    A single process asks :mod:`dalle_jax.signals` (installing its SIGTERM handler
    when no entry point did: a library caller keeps Ctrl-C as it was). With several processes, jax's preemption service owns SIGTERM
    and its sync point makes all of them stop at the same step.
    """

    def __init__(self, checkpointer):
        self._checkpointer = checkpointer
        self._multi_process = jax.process_count() > 1
        if not self._multi_process and not signals.installed():
            signals.install(sigint=False)

    def should_stop(self, step: int) -> bool:
        if self._multi_process:
            return self._checkpointer.reached_preemption(step)
        return signals.requested() is not None
