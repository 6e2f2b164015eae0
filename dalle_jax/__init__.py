"""dalle_jax: DALL-E in JAX/Flax."""
import glob as _glob
import os as _os


def quiet_libtpu_off_tpu() -> None:
    """Keeps libtpu quiet on a host without TPU chips.

    libtpu (installed for ahead-of-time compiles, dalle_jax.train.aot) initialises
    whenever jax starts and, off a TPU VM, warns that it cannot find one. These values
    say there is one host and nothing to look up, so jax falls back to its other
    backends silently; several processes may then load it at once. On a TPU VM (chips
    under /dev/accel* or /dev/vfio) nothing is changed; values already set are kept.
    """
    if _glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/[0-9]*"):
        return
    for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                        ("TPU_WORKER_ID", "0"), ("TPU_ACCELERATOR_TYPE", "v4-8"),
                        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        _os.environ.setdefault(name, value)


quiet_libtpu_off_tpu()
