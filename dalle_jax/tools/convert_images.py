r"""Converts captioned images into sharded TFRecords for training.

  python -m dalle_jax.tools.convert_images --config=configs/convert_images.py \
      --config.input_dir=/data/my_images --config.output_dir=/data/my_records

Give either --config.input_dir (a folder; each image has a same-name .txt caption
beside it) or --config.manifest (a .csv with a path,caption header, or a .jsonl of
{"path": ..., "caption": ...}). Skipped inputs are counted by reason in the report.
"""
from __future__ import annotations

from absl import flags

from dalle_jax import config as config_lib
from dalle_jax.data import convert

config_lib.define_flags()


def main(argv: list[str]) -> None:
    del argv
    # One of input_dir and manifest, and output_dir, are checked before main
    # (dalle_jax.validate).
    config = flags.FLAGS.config
    convert.convert(
        output_dir=config.output_dir, name=config.name, split=config.split,
        input_dir=config.input_dir or None, manifest=config.manifest or None,
        num_shards=config.num_shards, max_pixels=config.max_pixels,
        min_size=config.min_size, seed=config.seed, num_workers=config.num_workers)


if __name__ == "__main__":
    config_lib.run(main)
