r"""Input throughput benchmark: captioned shapes at 64 px and the JPEG photo path at 256 px.

  python -m dalle_jax.tools.bench input --config=configs/bench_input.py

Smoke size (smaller data, two short windows; well under a minute):

  python -m dalle_jax.tools.bench input --config=configs/bench_input.py:runlocal

Builds its data once under ``--workdir`` (a shapes dataset, and a folder of synthetic
JPEG photos converted to TFRecords), then records the median examples/s of the train
pipeline (decode, augment, tokenize with BPE-dropout, batch) over timed windows.
"""
from dalle_jax.config import parse_arg
import ml_collections


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    config = ml_collections.ConfigDict()
    config.batch_size = 64
    config.warmup_batches = 10  # for tf.data's autotuning
    config.windows = 7  # the median of these is recorded
    config.batches_per_window = 10
    config.shapes_res = 64
    config.shapes_num_train = 10_000
    config.photos_num_images = 768
    config.photos_size = (480, 640)  # height, width of the synthetic JPEGs (COCO-like)
    config.photos_res = 256
    config.photos_num_shards = 8
    config.text_len = 64
    config.text_vocab_size = 512
    config.bpe_dropout = 0.1  # the paper's, as in training
    config.known_gap = (
        "no target is set; on a 2-core host the JPEG path is bound by JPEG decoding and "
        "the area resize, which tf.data spreads over all cores of a TPU/GPU host.")
    config.runlocal = arg.runlocal  # recorded: a smoke run's figures are not results
    if arg.runlocal:
        config.batch_size = 16
        config.warmup_batches = 1
        config.windows = 2
        config.batches_per_window = 2
        config.shapes_num_train = 256
        config.photos_num_images = 32
        config.photos_num_shards = 2
    return config
