"""Code shards: the image-token form of a dataset that stage 2 trains from.

Each record is a ``tf.train.Example`` with
    codes       bytes    the code grid, int16 little-endian, row-major
    code_shape  int64[2] (h, w)
    caption     bytes    UTF-8
    id          bytes    the source example's id
A split is ``<dir>/<name>-<split>.codes-00000-of-00008`` ... plus
``<dir>/<name>-<split>.codes.json`` (shards, counts, the tokenizer run and step), which
is written last.
"""
from __future__ import annotations

import json
import posixpath

import numpy as np
import tensorflow as tf

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


def read_metadata(directory: str, name: str, split: str) -> dict:
    """The metadata of an encoded split; ``FileNotFoundError`` if it is absent (the job
    writes it last, so an interrupted encoding has none)."""
    path = posixpath.join(str(directory), metadata_name(name, split))
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"no code shards metadata at {path}: encode the dataset first "
            "(python -m dalle_jax.tools.encode_dataset) or check data_dir, name and split")
    with tf.io.gfile.GFile(path, "r") as f:
        return json.load(f)


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
