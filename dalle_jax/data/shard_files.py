"""What the two shard formats (:mod:`image_records`, :mod:`code_records`) share.

A split on disk, in a local folder or under ``gs://``, is a set of TFRecord shards plus
one JSON metadata file naming them. The metadata records its format and a format
version, is written last (atomically), and is what readers open first: a split whose
metadata exists is complete. Shards are written under hidden temporary names
(``.<shard>.tmp-<token>``) and renamed into place only when complete, so globs for a
split's shards never pick up unfinished ones.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from etils import epath
import tensorflow as tf

from dalle_jax import files


def join(directory: str | os.PathLike, file_name: str) -> str:
    """``directory/file_name``; local directories are made absolute, URLs kept as given."""
    directory = os.fspath(directory)
    if "://" in directory:
        return directory.rstrip("/") + "/" + file_name
    return os.path.join(os.path.abspath(directory), file_name)


def exists(path: str | os.PathLike) -> bool:
    return epath.Path(path).exists()


def temp_path(directory: str | os.PathLike, file_name: str, token: str) -> str:
    """The hidden name under which ``file_name`` is written before it is complete."""
    return join(directory, f".{file_name}.tmp-{token}")


def write_records(path: str, serialized_records: Iterable[bytes]) -> int:
    """Writes one TFRecord file; returns the number of records in it."""
    count = 0
    with tf.io.TFRecordWriter(path) as writer:
        for record in serialized_records:
            writer.write(record)
            count += 1
    return count


def rename(source: str, target: str) -> None:
    """Moves a finished shard into place (over an older one of the same name)."""
    epath.Path(source).replace(target)


def remove(path: str) -> None:
    """Removes ``path`` if it exists."""
    path = epath.Path(path)
    if path.exists():
        path.unlink()


def write_metadata(path: str, metadata: dict, *, format_name: str,
                   format_version: int) -> None:
    """Writes a split's metadata atomically, led by its format and version."""
    files.atomic_write(path, json.dumps(
        {"format": format_name, "format_version": format_version, **metadata},
        indent=2) + "\n")


def read_metadata(path: str, *, format_name: str, format_version: int,
                  missing_hint: str) -> dict:
    """A split's metadata, checked to be ``format_name`` of at most ``format_version``.

    Metadata without the two fields, written before they were recorded, reads as
    version 1. ``FileNotFoundError`` (with ``missing_hint``) if the file is absent.
    """
    if not exists(path):
        raise FileNotFoundError(f"no dataset metadata at {path}: {missing_hint}")
    metadata = json.loads(epath.Path(path).read_text())
    found = metadata.get("format", format_name)
    if found != format_name:
        raise ValueError(f"{path} is {found} metadata, not {format_name}")
    version = metadata.get("format_version", 1)
    if version > format_version:
        raise ValueError(
            f"{path} has {format_name} format version {version}; this version of "
            f"dalle_jax reads up to {format_version}: update dalle_jax to read it")
    return metadata
