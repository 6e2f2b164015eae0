r"""Encodes a dataset into code shards with a trained stage-1 tokenizer.

  python -m dalle_jax.tools.encode_dataset --config=configs/image_tokenizer_shapes.py \
      --workdir=runs/dvae_shapes --config.encode.output_dir=runs/dvae_shapes/codes

Every input shard of each split becomes one code shard (see
``dalle_jax.data.code_records``). Processes share the shards (shard i goes to process
i mod count); within a process the batch is split over the local devices. Finished
output shards are skipped on a rerun; a shard is written under a temporary name and
renamed when complete, so an interrupted job leaves no partial shard.
"""
from __future__ import annotations

import dataclasses

from absl import flags
import jax
from jax.experimental import multihost_utils

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax.data import encoding
from dalle_jax.train import distributed

config_lib.define_flags()
distributed.define_flags()


def main(argv):
    del argv
    # The stage-1 run, the output folder and the splits are checked before main
    # (dalle_jax.validate); what depends on the devices is checked here, before loading.
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    distributed.initialize_from_flags()
    devices = jax.local_device_count()
    if config.encode.batch_size % devices:
        raise errors.ConfigError(
            "encode.batch_size", f"must split over the {devices} local devices, got "
            f"{config.encode.batch_size}")
    chunk = config.encode.chunk_size
    per_device = config.encode.batch_size // devices
    if chunk > 0 and chunk < per_device and per_device % chunk:
        raise errors.ConfigError(
            "encode.chunk_size", f"must divide the {per_device} images per local device "
            f"of a batch (encode.batch_size {config.encode.batch_size} over {devices} "
            f"devices), got {chunk}")
    from dalle_jax.inference.image_tokenizer import ImageTokenizerRun  # pylint: disable=g-import-not-at-top
    tokenizer = ImageTokenizerRun.load(workdir, config)
    tokenizer = dataclasses.replace(tokenizer, encode_chunk_size=chunk)
    sync = multihost_utils.sync_global_devices if jax.process_count() > 1 else None
    encoding.encode_splits(tokenizer, config, workdir, process_index=jax.process_index(),
                           process_count=jax.process_count(), sync=sync)


if __name__ == "__main__":
    config_lib.run(main)
