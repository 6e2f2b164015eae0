"""Where examples come from: splits of TFRecord files and how to parse their records.

A :class:`Source` names a split's files and parses one serialized record; the input
pipeline (:mod:`dalle_jax.data.pipeline`) decides which process reads what, in which
order. Three kinds: a prepared tensorflow-datasets split (:class:`TfdsSource`), a
split written by the image-folder converter (:class:`RecordSource`) and code shards
written by the dataset-encoding job (:class:`CodeSource`); :func:`make_source` picks one
from ``config.data``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Protocol

import numpy as np
import tensorflow as tf

from dalle_jax.data import code_records
from dalle_jax.data import image_records
from dalle_jax.data import preprocess as preprocess_lib
from dalle_jax.data import shard_files

_MAX_INTERLEAVE = 16


class Source(Protocol):
    """A split of an image–caption dataset stored as TFRecord files."""

    name: str

    def files(self) -> list[tuple[str, int]]:
        """The split's record files with their example counts, in a fixed order."""

    def parse(self, record: tf.Tensor) -> dict[str, tf.Tensor]:
        """One serialized record → ``{"image": uint8[H, W, C], "caption": string[] or
        [N], "id": string[]}`` (the id empty when the dataset has none); code shards
        give ``codes`` int32[h, w] instead of the image."""


def _nested(example: Mapping[str, Any], key: str):
    for part in key.split("/"):
        example = example[part]
    return example


def _as_text(value: tf.Tensor) -> tf.Tensor:
    return value if value.dtype == tf.string else tf.strings.as_string(value)


@dataclasses.dataclass
class TfdsSource:
    """A prepared tensorflow-datasets split with an image and a caption feature.

    Feature names are paths into the example (``"captions/text"`` for coco_captions);
    a caption feature holding several captions gives one of them at random per example.
    """

    builder: Any  # tfds.core.DatasetBuilder
    split: str
    image_key: str = "image"
    caption_key: str = "caption"

    def __post_init__(self):
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        info = self.builder.info
        self.name = f"{info.full_name}:{self.split}"
        if self.split not in info.splits:
            raise ValueError(
                f"{info.full_name} has no split {self.split!r}; it has {sorted(info.splits)}")
        for key in (self.image_key, self.caption_key):
            try:
                _nested(info.features, key)
            except KeyError:
                raise ValueError(
                    f"{info.full_name} has no feature {key!r}; set the feature names in "
                    f"config.data (image_key / caption_key); features: {list(info.features)}"
                ) from None
        file_format = getattr(info, "file_format", None)
        if file_format is not None and "tfrecord" not in str(file_format).lower():
            raise ValueError(
                f"{info.full_name} is stored as {file_format}; this pipeline reads TFRecord "
                "(prepare it with file_format='tfrecord')")
        roots = {k.split("/")[0] for k in (self.image_key, self.caption_key)}
        self._has_id = "id" in info.features  # kept by jobs that write derived records
        if self._has_id:
            roots.add("id")
        # Parse and decode only the features used here (not, e.g., box annotations).
        self._features = tfds.features.FeaturesDict({r: info.features[r] for r in roots})

    def files(self) -> list[tuple[str, int]]:
        split = self.builder.info.splits[self.split]
        return [(str(p), n) for p, n in zip(split.filepaths, split.shard_lengths)]

    def parse(self, record):
        example = self._features.deserialize_example(record)
        return {"image": _nested(example, self.image_key),
                "caption": _nested(example, self.caption_key),
                "id": _as_text(example["id"]) if self._has_id else tf.constant("")}


@dataclasses.dataclass
class RecordSource:
    """A split written by the image-folder converter (:mod:`dalle_jax.data.convert`)."""

    data_dir: str
    dataset_name: str
    split: str

    def __post_init__(self):
        self.name = f"{self.dataset_name}:{self.split}"
        metadata = image_records.read_metadata(self.data_dir, self.dataset_name, self.split)
        self._files = [(shard_files.join(self.data_dir, shard["file"]), shard["num_examples"])
                       for shard in metadata["shards"]]

    def files(self) -> list[tuple[str, int]]:
        return list(self._files)

    def parse(self, record):
        example = image_records.parse_record(record)
        return {"image": preprocess_lib.decode_image(example["image"]),
                "caption": example["caption"], "id": example["id"]}


@dataclasses.dataclass
class CodeSource:
    """A split of code shards written by the dataset-encoding job
    (:mod:`dalle_jax.tools.encode_dataset`): examples carry ``codes`` instead of an
    image."""

    data_dir: str
    dataset_name: str
    split: str

    def __post_init__(self):
        self.name = f"{self.dataset_name}:{self.split} codes"
        self.metadata = code_records.read_metadata(self.data_dir, self.dataset_name,
                                                   self.split)
        self._files = [(shard_files.join(self.data_dir, shard["file"]), shard["num_examples"])
                       for shard in self.metadata["shards"]]

    def files(self) -> list[tuple[str, int]]:
        return list(self._files)

    def parse(self, record):
        return code_records.parse_record(record)


def interleaved_records(files: tf.Tensor, num_files: int) -> tf.data.Dataset:
    """The raw records of ``files`` (a string vector of ``num_files``), interleaved a
    record at a time in a fixed order."""
    return tf.data.Dataset.from_tensor_slices(files).interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20),
        cycle_length=min(num_files, _MAX_INTERLEAVE),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)


def nonempty_files(source: Source) -> list[str]:
    """The source's files that hold examples, sorted (the order every reader starts
    from, whatever order the source lists them in)."""
    return sorted(path for path, count in source.files() if count > 0)


def iter_captions(source: Source) -> Iterator[str]:
    """Every caption of the split once, without decoding images (to train the text
    tokenizer on); a lazy generator that reads nothing until iterated."""
    files = nonempty_files(source)
    if not files:
        return
    captions = interleaved_records(tf.constant(files), len(files)).map(
        lambda r: source.parse(r)["caption"],
        num_parallel_calls=tf.data.AUTOTUNE).prefetch(64)
    iterator = captions.as_numpy_iterator()
    try:
        for caption in iterator:
            for c in np.atleast_1d(caption):
                yield c.decode("utf-8", errors="replace")
    finally:
        # Closing the generator releases the tf.data iterator at once, not at exit.
        del iterator


def make_source(data_config, split: str) -> Source:
    """The source named by ``config.data`` (``captioned_shapes``, ``tfds``, ``records`` or
    ``codes``)."""
    kind = data_config.source
    if kind == "captioned_shapes":
        from dalle_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        builder = shapes_tfds.build_captioned_shapes(
            data_config.data_dir or tfds.core.constants.DATA_DIR,
            image_size=data_config.image_size,
            num_train=data_config.num_train,
            num_validation=data_config.num_validation,
            num_test=data_config.num_test,
            num_holdout=data_config.num_holdout,
            holdout_pairs=tuple(tuple(p) for p in data_config.holdout_pairs),
            seed=data_config.dataset_seed)
        return TfdsSource(builder, split, "image", "caption")
    if kind == "tfds":
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        builder = tfds.builder(data_config.name, data_dir=data_config.data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"tfds dataset {data_config.name!r} is not prepared in "
                f"{builder.data_dir_root!s}; prepare it first (tfds build), then set "
                "config.data.data_dir")
        return TfdsSource(builder, split, data_config.image_key, data_config.caption_key)
    if kind == "records":
        return RecordSource(data_config.data_dir, data_config.name, split)
    if kind == "codes":
        return CodeSource(data_config.data_dir, data_config.name, split)
    raise ValueError(
        f"config.data.source must be captioned_shapes, tfds, records or codes; got {kind!r}")
