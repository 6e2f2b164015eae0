"""Encoding a dataset into code shards with a trained image tokenizer (the library part
of ``dalle_jax.tools.encode_dataset``, shared with the demo).

Every input shard of a split becomes one code shard (:mod:`dalle_jax.data.code_records`);
finished output shards are skipped, and each is written under a temporary name and
renamed when complete.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from etils import epath
import numpy as np
import tensorflow as tf
import tqdm

from dalle_jax.data import code_records
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data import sources


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


def encode_splits(tokenizer, config, tokenizer_run: str, *, process_index: int = 0,
                  process_count: int = 1, sync: Callable[[str], None] | None = None,
                  report: Callable[[str], None] = print) -> int:
    """Encodes every split of ``config.encode`` into ``config.encode.output_dir`` and
    writes each split's metadata (on process 0, after ``sync(split)`` has waited for the
    other processes). Returns the number of examples encoded over all splits."""
    output_dir = config.encode.output_dir
    total = 0
    for split in config.encode.splits:
        entries = encode_split(tokenizer, config, split, output_dir,
                               batch_size=config.encode.batch_size,
                               process_index=process_index, process_count=process_count)
        if sync is not None:
            sync(f"encoded {split}")
        if process_index == 0:
            metadata = code_records.write_metadata(
                output_dir, config.data.name, split, shards=entries,
                code_shape=[tokenizer.grid_size, tokenizer.grid_size],
                vocab_size=tokenizer.vocab_size, tokenizer_run=str(tokenizer_run),
                tokenizer_step=tokenizer.step)
            report(f"{split}: {metadata['num_examples']} examples in {len(entries)} shards")
            total += metadata["num_examples"]
    return total
