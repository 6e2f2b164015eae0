"""The image–caption TFRecord format: its records, its metadata, its reader and writer.

The converter (:mod:`dalle_jax.data.convert`) writes it through :class:`SplitWriter`;
the pipeline reads it through :class:`dalle_jax.data.sources.RecordSource`.

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

It is written last, so a split whose metadata exists is complete (the layout and the
versioning are those of :mod:`dalle_jax.data.shard_files`).
"""
from __future__ import annotations

from typing import Iterable
import uuid

import tensorflow as tf

from dalle_jax.data import shard_files

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


def metadata_path(directory: str, name: str, split: str) -> str:
    return shard_files.join(directory, metadata_file_name(name, split))


def read_metadata(directory: str, name: str, split: str) -> dict:
    """The metadata of a converted split; ``FileNotFoundError`` if it is absent."""
    return shard_files.read_metadata(
        metadata_path(directory, name, split), format_name=FORMAT,
        format_version=FORMAT_VERSION,
        missing_hint="convert the images first (python -m dalle_jax.tools.convert_images) "
                     "or check data_dir, name and split")


def shard_paths(directory: str, name: str, split: str) -> list[str]:
    """Absolute paths of a split's shards, in shard order."""
    metadata = read_metadata(directory, name, split)
    return [shard_files.join(directory, shard["file"]) for shard in metadata["shards"]]


class SplitWriter:
    """Writes a split so that it replaces an existing one all at once or not at all.

    Shards go to hidden temporary files; :meth:`commit` moves them into place and then
    writes the metadata. Leaving the ``with`` block removes whatever was not committed.
    """

    def __init__(self, directory: str, name: str, split: str, num_shards: int):
        if num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {num_shards}")
        tf.io.gfile.makedirs(directory)
        self.directory, self.name, self.split = directory, name, split
        self.shard_files = [shard_file_name(name, split, index, num_shards)
                            for index in range(num_shards)]
        token = uuid.uuid4().hex[:8]  # concurrent writers of one split never collide
        self._temp_paths = [shard_files.temp_path(directory, file, token)
                            for file in self.shard_files]
        self._counts: dict[int, int] = {}

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        for temp in self._temp_paths:
            shard_files.remove(temp)

    def write_shard(self, index: int, serialized_records: Iterable[bytes]) -> int:
        """Writes shard ``index`` (to its temporary file); returns its record count."""
        self._counts[index] = shard_files.write_records(self._temp_paths[index],
                                                        serialized_records)
        return self._counts[index]

    def commit(self, metadata: dict) -> None:
        """Moves the finished shards into place, then writes the metadata (with
        ``metadata``'s entries after the split's own)."""
        missing = sorted(set(range(len(self.shard_files))) - set(self._counts))
        if missing:
            raise ValueError(f"shards {missing} of {self.name}-{self.split} were not written")
        path = metadata_path(self.directory, self.name, self.split)
        previous = self._previous_shard_files()
        # Readers start from the metadata: remove the old one first so that it is never
        # paired with new shards, even if a rename below fails.
        shard_files.remove(path)
        for temp, file in zip(self._temp_paths, self.shard_files):
            shard_files.rename(temp, shard_files.join(self.directory, file))
        counts = [self._counts[i] for i in range(len(self.shard_files))]
        shard_files.write_metadata(path, {
            "name": self.name,
            "split": self.split,
            "num_examples": sum(counts),
            "shards": [{"file": file, "num_examples": count}
                       for file, count in zip(self.shard_files, counts)],
            **metadata,
        }, format_name=FORMAT, format_version=FORMAT_VERSION)
        # Shards of an earlier conversion with another shard count are now orphans.
        for file in set(previous) - set(self.shard_files):
            shard_files.remove(shard_files.join(self.directory, file))

    def _previous_shard_files(self) -> list[str]:
        try:
            metadata = read_metadata(self.directory, self.name, self.split)
            return [shard["file"] for shard in metadata["shards"]]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return []
