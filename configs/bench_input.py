r"""Input throughput benchmark: shapes at 64 px and the JPEG photo path at 256 px.

  python -m dalle_jax.tools.bench_input --config=configs/bench_input.py

Quick try with fewer, shorter windows:

  python -m dalle_jax.tools.bench_input --config=configs/bench_input.py:runlocal

Builds its data in ``config.workdir`` (a shapes dataset, and a folder of synthetic
JPEG photos converted to TFRecords), then reports the median examples/s of the train
pipeline (decode, augment, tokenize with BPE-dropout, batch) over timed windows.
"""
from dalle_jax.config import parse_arg
import ml_collections


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    config = ml_collections.ConfigDict()
    config.workdir = "/tmp/dalle_jax_bench_input"
    config.batch_size = 64
    config.warmup_batches = 10
    config.windows = 7  # the median of these is reported
    config.batches_per_window = 10
    config.shapes_num_train = 10_000
    config.photos_num_images = 768
    config.photos_size = (480, 640)  # height, width of the synthetic JPEGs (COCO-like)
    config.photos_res = 256
    config.text_len = 64
    if arg.runlocal:
        config.warmup_batches = 2
        config.windows = 3
        config.batches_per_window = 3
        config.shapes_num_train = 1_000
        config.photos_num_images = 128
    return config
