"""Data sections of configs, shared by the config files of every stage (no heavy imports)."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def captioned_shapes(image_size: int = 64, runlocal: bool = False) -> ml_collections.ConfigDict:
    """``config.data`` for the captioned-shapes dataset (built on first use)."""
    data = ml_collections.ConfigDict()
    data.source = "captioned_shapes"
    data.data_dir = config_dict.placeholder(str)  # None: tfds's default folder
    data.name = "captioned_shapes"
    data.image_size = image_size
    data.num_train = 2_000 if runlocal else 50_000
    data.num_validation = 200 if runlocal else 2_000
    data.num_test = 200 if runlocal else 2_000
    data.num_holdout = 200 if runlocal else 2_000
    # (colour, shape) pairs kept out of train/validation/test: the holdout split.
    data.holdout_pairs = (("green", "triangle"), ("purple", "circle"),
                          ("orange", "square"))
    data.dataset_seed = 0  # same seed, byte-identical dataset
    data.image_key = "image"
    data.caption_key = "caption"
    data.preprocess = "resize"  # synthetic images: a plain resize, no crops
    data.shuffle_buffer = 1_000 if runlocal else 10_000
    return data
