r"""Converts captioned images into sharded TFRecords for training.

  python -m dalle_jax.tools.convert_images --config=configs/convert_images.py \
      --config.input_dir=/data/my_images --config.output_dir=/data/my_records

Give either --config.input_dir (a folder; each image has a same-name .txt caption
beside it) or --config.manifest (a .csv with a path,caption header, or a .jsonl of
{"path": ..., "caption": ...}). Skipped inputs are counted by reason in the report.
"""
from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from dalle_jax import config as config_lib
from dalle_jax.data import convert

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file: configs/convert_images.py.", lock_config=True)
flags.mark_flag_as_required("config")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if not config.input_dir and not config.manifest:
        raise app.UsageError(
            "set config.input_dir (a folder of images with .txt captions) or "
            "config.manifest (a .csv or .jsonl of paths and captions), e.g. "
            "--config.input_dir=/data/my_images")
    if config.input_dir and config.manifest:
        raise app.UsageError("set only one of config.input_dir and config.manifest")
    if not config.output_dir:
        raise app.UsageError(
            "set config.output_dir, the folder for the TFRecord shards, e.g. "
            "--config.output_dir=/data/my_records")
    convert.convert(
        output_dir=config.output_dir, name=config.name, split=config.split,
        input_dir=config.input_dir or None, manifest=config.manifest or None,
        num_shards=config.num_shards, max_pixels=config.max_pixels,
        min_size=config.min_size, seed=config.seed, num_workers=config.num_workers)


if __name__ == "__main__":
    config_lib.run(main)
