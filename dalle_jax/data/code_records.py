"""Code shards: the image-token form of a dataset that stage 2 trains from; their
records, their metadata, their reader and writer.

The dataset-encoding job (:mod:`dalle_jax.tools.encode_dataset`) writes them through
:func:`write_shard` and :func:`write_metadata`; the pipeline reads them through
:class:`dalle_jax.data.sources.CodeSource`.

Each record is a ``tf.train.Example`` with

    codes       bytes    the code grid, int16 little-endian, row-major
    code_shape  int64[2] (h, w)
    caption     bytes    UTF-8
    id          bytes    the source example's id

A split is ``<dir>/<name>-<split>.codes-00000-of-00008`` ... plus the metadata
``<dir>/<name>-<split>.codes.json``::

    {"format": "dalle_jax.codes", "format_version": 1, "name": ..., "split": ...,
     "num_examples": ..., "shards": [{"file": ..., "num_examples": ...}, ...],
     "code_shape": [h, w], "vocab_size": ..., <the image tokenizer run and step>}

written last (the layout and the versioning are those of
:mod:`dalle_jax.data.shard_files`). Shards are written one at a time, each complete
or absent, so an interrupted encoding resumes shard by shard.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf

from dalle_jax.data import shard_files

FORMAT = "dalle_jax.codes"
FORMAT_VERSION = 1

FEATURE_SPEC = {
    "codes": tf.io.FixedLenFeature([], tf.string),
    "code_shape": tf.io.FixedLenFeature([2], tf.int64),
    "caption": tf.io.FixedLenFeature([], tf.string),
    "id": tf.io.FixedLenFeature([], tf.string),
}


def shard_name(name: str, split: str, index: int, count: int) -> str:
    return f"{name}-{split}.codes-{index:05d}-of-{count:05d}"


def metadata_name(name: str, split: str) -> str:
    return f"{name}-{split}.codes.json"


def metadata_path(directory: str, name: str, split: str) -> str:
    return shard_files.join(directory, metadata_name(name, split))


def read_metadata(directory: str, name: str, split: str) -> dict:
    """The metadata of an encoded split; ``FileNotFoundError`` if it is absent (the job
    writes it last, so an interrupted encoding has none)."""
    return shard_files.read_metadata(
        metadata_path(directory, name, split), format_name=FORMAT,
        format_version=FORMAT_VERSION,
        missing_hint="encode the dataset first (python -m dalle_jax.tools.encode_dataset) "
                     "or check data_dir, name and split")


def write_metadata(directory: str, name: str, split: str, *,
                   shards: Sequence[dict], code_shape: Sequence[int], vocab_size: int,
                   **extra) -> dict:
    """Writes the split's metadata (after all its shards); returns it. ``extra``
    entries (such as the image tokenizer that made the codes) are kept as given."""
    metadata = {"name": name, "split": split, "shards": list(shards),
                "num_examples": sum(shard["num_examples"] for shard in shards),
                "code_shape": list(code_shape), "vocab_size": int(vocab_size), **extra}
    shard_files.write_metadata(metadata_path(directory, name, split), metadata,
                               format_name=FORMAT, format_version=FORMAT_VERSION)
    return metadata


def shard_exists(directory: str, file_name: str) -> bool:
    """Whether the shard ``file_name`` is complete (written by an earlier run)."""
    return shard_files.exists(shard_files.join(directory, file_name))


def write_shard(directory: str, file_name: str, serialized_records: Iterable[bytes], *,
                writer_token: str = "0") -> int:
    """Writes one shard under a temporary name, renamed into place when complete;
    returns its record count. ``writer_token`` tells concurrent writers' files apart."""
    temp = shard_files.temp_path(directory, file_name, writer_token)
    count = shard_files.write_records(temp, serialized_records)
    shard_files.rename(temp, shard_files.join(directory, file_name))
    return count


def encode_record(codes: np.ndarray, caption: bytes | str, id: bytes | str) -> bytes:  # pylint: disable=redefined-builtin
    """One serialized record of an int code grid [h, w]."""
    codes = np.asarray(codes)
    if codes.min() < np.iinfo(np.int16).min or codes.max() > np.iinfo(np.int16).max:
        raise ValueError("codes do not fit int16")
    as_bytes = lambda s: s.encode("utf-8") if isinstance(s, str) else bytes(s)
    feature = {
        "codes": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[codes.astype("<i2").tobytes()])),
        "code_shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(codes.shape))),
        "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[as_bytes(caption)])),
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[as_bytes(id)])),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def parse_record(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """A serialized record → ``codes`` int32 [h, w], ``caption``, ``id`` (in tf.data)."""
    example = tf.io.parse_single_example(serialized, FEATURE_SPEC)
    codes = tf.io.decode_raw(example["codes"], tf.int16, little_endian=True)
    codes = tf.reshape(tf.cast(codes, tf.int32), example["code_shape"])
    return {"codes": codes, "caption": example["caption"], "id": example["id"]}
