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


def photos(coco: bool = False, runlocal: bool = False) -> ml_collections.ConfigDict:
    """``config.data`` for captioned photos at 256 px: converted records (the output of
    ``dalle_jax.tools.convert_images``) or, with ``coco``, tfds ``coco_captions``."""
    data = ml_collections.ConfigDict()
    data.source = "records"
    data.data_dir = config_dict.placeholder(str)
    data.name = "images"
    data.image_key = "image"
    data.caption_key = "caption"
    data.image_size = 64 if runlocal else 256
    # Paper, listing 2: random square crop from the central band, area resize to
    # [res, 9/8 res], random res x res crop, no flip.
    data.preprocess = "photo"
    data.shuffle_buffer = 256 if runlocal else 10_000
    if coco:
        data.source = "tfds"
        data.name = "coco_captions"
        data.caption_key = "captions/text"  # five captions per image: one at random
    return data
