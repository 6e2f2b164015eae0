"""The image–caption TFRecord format written by the converter and read by the pipeline.

Each record is a ``tf.train.Example`` with these features:

    image    bytes   the encoded image, JPEG or PNG
    caption  bytes   UTF-8 text, surrounding whitespace stripped
    id       bytes   source path relative to the input folder, or as named in a manifest
    height   int64   pixels, after any EXIF rotation
    width    int64

A dataset split on disk (local or gs://) is a set of shards plus one metadata file::

    <dir>/<name>-<split>.tfrecord-00000-of-00008
    ...
    <dir>/<name>-<split>.tfrecord-00007-of-00008
    <dir>/<name>-<split>.json

The metadata JSON holds::

    {"format": "dalle_jax.image_caption", "format_version": 1,
     "name": ..., "split": ...,
     "num_examples": <total records>,
     "shards": [{"file": <shard file name>, "num_examples": <records in it>}, ...],
     "report": <conversion report, see dalle_jax.data.convert>,
     "conversion": {<settings the converter ran with>}}

It is written last, so a split whose metadata exists is complete.
"""
from __future__ import annotations

import json
import os

import tensorflow as tf

FORMAT = "dalle_jax.image_caption"
FORMAT_VERSION = 1

FEATURE_SPEC = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "caption": tf.io.FixedLenFeature([], tf.string),
    "id": tf.io.FixedLenFeature([], tf.string),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
}


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def encode_record(image_bytes: bytes, caption: str | bytes,
                  id: str | bytes,  # pylint: disable=redefined-builtin
                  height: int, width: int) -> bytes:
    """One serialized ``tf.train.Example``; ``id`` is named after its feature key."""
    features = tf.train.Features(feature={
        "image": _bytes_feature(bytes(image_bytes)),
        "caption": _bytes_feature(_as_bytes(caption)),
        "id": _bytes_feature(_as_bytes(id)),
        "height": _int64_feature(height),
        "width": _int64_feature(width),
    })
    # Sorted map keys: equal records give equal bytes in every process.
    return tf.train.Example(features=features).SerializeToString(deterministic=True)


def parse_record(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """A scalar serialized record → dict of scalar tensors keyed as ``FEATURE_SPEC``."""
    return tf.io.parse_single_example(serialized, FEATURE_SPEC)


def shard_file_name(name: str, split: str, index: int, num_shards: int) -> str:
    return f"{name}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def metadata_file_name(name: str, split: str) -> str:
    return f"{name}-{split}.json"


def join(directory: str, file_name: str) -> str:
    """``directory/file_name``; local directories are made absolute, URLs kept as given."""
    if "://" in directory:
        return directory.rstrip("/") + "/" + file_name
    return os.path.join(os.path.abspath(directory), file_name)


def metadata_path(directory: str, name: str, split: str) -> str:
    return join(directory, metadata_file_name(name, split))


def read_metadata(directory: str, name: str, split: str) -> dict:
    """The metadata of a converted split; ``FileNotFoundError`` if it is absent."""
    path = metadata_path(directory, name, split)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"no dataset metadata at {path}: convert the images first "
            f"(python -m dalle_jax.tools.convert_images) or check data_dir, name and split")
    with tf.io.gfile.GFile(path, "r") as f:
        metadata = json.load(f)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not {FORMAT} metadata")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {metadata['format_version']}; this code reads "
            f"up to {FORMAT_VERSION}")
    return metadata


def shard_paths(directory: str, name: str, split: str) -> list[str]:
    """Absolute paths of a split's shards, in shard order."""
    metadata = read_metadata(directory, name, split)
    return [join(directory, shard["file"]) for shard in metadata["shards"]]
