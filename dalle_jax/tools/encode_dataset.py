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

import contextlib
import dataclasses
from typing import Iterator

from absl import flags
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow as tf
import tqdm

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax.data import code_records
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data import sources
from dalle_jax.train import distributed

config_lib.define_flags()
distributed.define_flags()


def _examples(source, path: str, image_size: int, preprocess: str,
              batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of (image, caption, id) of one record file, in file order."""
    def prepare(record):
        example = pipeline_lib.prepare_example(
            source.parse(record), image_size=image_size, preprocess=preprocess)
        return {key: example[key] for key in ("image", "caption", "id")}

    dataset = tf.data.TFRecordDataset(path).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    iterator = dataset.batch(batch_size).prefetch(2).as_numpy_iterator()
    try:
        yield from iterator
    finally:
        del iterator  # closing the generator releases the tf.data iterator at once


def _code_records(tokenizer, batches, batch_size: int) -> Iterator[bytes]:
    """Serialized code records of ``batches``, in order."""
    for batch in batches:
        real = len(batch["image"])
        images = batch["image"]
        if real < batch_size:  # one compiled shape for every batch
            images = np.concatenate([images, np.zeros(
                (batch_size - real,) + images.shape[1:], images.dtype)])
        codes = tokenizer.encode(images)[:real]
        for grid, caption, ident in zip(codes, batch["caption"], batch["id"]):
            yield code_records.encode_record(grid, caption, ident)


def encode_split(tokenizer, config, split: str, output_dir: str, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 progress: bool = True) -> list[dict]:
    """Encodes this process's shards of ``split``; returns every shard's entry."""
    source = sources.make_source(config.data, split)
    inputs = sorted(source.files())
    epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
    name = config.data.name
    entries = [{"file": code_records.shard_name(name, split, i, len(inputs)),
                "num_examples": count} for i, (_, count) in enumerate(inputs)]
    mine = [i for i in range(len(inputs)) if i % process_count == process_index]
    for i in tqdm.tqdm(mine, desc=f"{name}:{split}", unit=" shards", disable=not progress):
        file_name = entries[i]["file"]
        if code_records.shard_exists(output_dir, file_name):
            continue  # finished by an earlier run
        with contextlib.closing(_examples(source, inputs[i][0], config.data.image_size,
                                          config.data.preprocess, batch_size)) as batches:
            code_records.write_shard(output_dir, file_name,
                                     _code_records(tokenizer, batches, batch_size),
                                     writer_token=str(process_index))
    return entries


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
    for split in config.encode.splits:
        entries = encode_split(tokenizer, config, split, config.encode.output_dir,
                               batch_size=config.encode.batch_size,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"encoded {split}")
        if jax.process_index() == 0:
            metadata = code_records.write_metadata(
                config.encode.output_dir, config.data.name, split, shards=entries,
                code_shape=[tokenizer.grid_size, tokenizer.grid_size],
                vocab_size=tokenizer.vocab_size,
                tokenizer_run=str(workdir), tokenizer_step=tokenizer.step)
            print(f"{split}: {metadata['num_examples']} examples in {len(entries)} shards")


if __name__ == "__main__":
    config_lib.run(main)
