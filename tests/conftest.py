"""Test set-up shared by the whole suite.

Eight simulated CPU devices (set before jax is imported anywhere), quiet TensorFlow,
and a persistent XLA compilation cache outside the repository so reruns start warm.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.expanduser("~"), ".cache", "dalle_jax", "jax"),
)

import tensorflow as tf  # noqa: E402  (after the environment is set)

# tf.data is the only TensorFlow in this project: keep it off any accelerator.
tf.config.set_visible_devices([], "GPU")
