"""Entry points: one thin module per job, each run as ``python -m dalle_jax.tools.<job>``."""
import os

# tf.data is the only TensorFlow here; keep its start-up quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
