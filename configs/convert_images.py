r"""python -m dalle_jax.tools.convert_images --config=configs/convert_images.py \
      --config.input_dir=/data/my_images --config.output_dir=/data/my_records

Converts captioned images into the TFRecord shards that configs/input_photos.py trains on.
Give either a folder (each image with a same-name .txt caption beside it) as
input_dir, or a CSV/JSONL manifest of paths and captions:

    python -m dalle_jax.tools.convert_images --config=configs/convert_images.py \
        --config.manifest=/data/captions.jsonl --config.output_dir=/data/my_records

Output: <output_dir>/<name>-<split>.tfrecord-*-of-* and <output_dir>/<name>-<split>.json.
"""
import ml_collections
from ml_collections import config_dict


def get_config():
    config = ml_collections.ConfigDict()
    config.input_dir = config_dict.placeholder(str)  # a folder, searched recursively
    config.manifest = config_dict.placeholder(str)  # .csv (path,caption header) or .jsonl
    config.output_dir = config_dict.placeholder(str)  # local path or gs://...
    config.name = "images"  # config.data.name of the training config
    config.split = "train"
    config.num_shards = 8
    config.max_pixels = 64_000_000  # larger images are skipped, unread
    config.min_size = 64  # images with a shorter side are skipped
    config.seed = 0  # shuffles the input order before it is split into shards
    config.num_workers = config_dict.placeholder(int)  # decoding threads; None: one per core
    return config
