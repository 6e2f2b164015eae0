"""The tf.data input pipeline: shards → per-process, exactly resumable numpy batches.

Order of work for each process::

    its files ─► per-epoch file shuffle ─► interleaved records ─► [shard by example]
      ─► shuffle buffer of raw records ─► enumerate ─► skip (on resume)
      ─► decode + preprocess (parallel) ─► batch ─► tokenize ─► prefetch

Processes read disjoint parts of the data: whole files when there are at least as many
files as processes, otherwise every ``process_count``-th record. Within an epoch the
processes together see every example exactly once.

Exact resume. Every random choice is a pure function of (seed, process, epoch, position
in the epoch): the file order, the shuffle buffer's seed, each example's augmentation
and each batch's BPE-dropout. The iterator's whole state is therefore the epoch and the
number of its examples already consumed (:meth:`InputPipeline.get_state`, a small
JSON-able dict the training core stores in its checkpoints). Restoring rebuilds the
stream and skips that many raw records, before any decoding, so the batches that follow
are identical to those an uninterrupted run would have produced.
"""
from __future__ import annotations

import dataclasses
import hashlib
import posixpath
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import tensorflow as tf

from dalle_jax.data import preprocess as preprocess_lib
from dalle_jax.data.tokenizer import Tokenizer

STATE_VERSION = 1
_INT64_MAX = np.iinfo(np.int64).max
_MAX_INTERLEAVE = 16


class Source(Protocol):
    """A split of an image–caption dataset stored as TFRecord files."""

    name: str

    def files(self) -> list[tuple[str, int]]:
        """The split's record files with their example counts, in a fixed order."""

    def parse(self, record: tf.Tensor) -> dict[str, tf.Tensor]:
        """One serialized record → ``{"image": uint8[H, W, C], "caption": string[] or
        [N], "id": string[]}`` (the id empty when the dataset has none)."""


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
        from dalle_jax.data import records  # pylint: disable=g-import-not-at-top
        self._records = records
        self.name = f"{self.dataset_name}:{self.split}"
        metadata = records.read_metadata(self.data_dir, self.dataset_name, self.split)
        self._files = [(records.join(self.data_dir, shard["file"]), shard["num_examples"])
                       for shard in metadata["shards"]]

    def files(self) -> list[tuple[str, int]]:
        return list(self._files)

    def parse(self, record):
        example = self._records.parse_record(record)
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
        from dalle_jax.data import code_records  # pylint: disable=g-import-not-at-top
        self._code_records = code_records
        self.name = f"{self.dataset_name}:{self.split} codes"
        self.metadata = code_records.read_metadata(self.data_dir, self.dataset_name,
                                                   self.split)
        self._files = [(posixpath.join(str(self.data_dir), shard["file"]),
                        shard["num_examples"]) for shard in self.metadata["shards"]]

    def files(self) -> list[tuple[str, int]]:
        return list(self._files)

    def parse(self, record):
        return self._code_records.parse_record(record)


def _seed(*parts) -> tf.Tensor:
    """A stateless-RNG seed (int64[2]) that is a hash of integer ``parts``."""
    key = tf.constant([0x5EED, 0], tf.int64)
    for part in parts:
        key = tf.random.stateless_uniform(
            [2], seed=tf.stack([key[0], tf.cast(part, tf.int64)]),
            minval=None, maxval=None, dtype=tf.int64)
    return key


# Distinct purposes of randomness, so that no two uses share a stream.
_FILE_ORDER, _SHUFFLE, _AUGMENT, _CAPTION_CHOICE, _BPE_DROPOUT, _CAPTION_DROPOUT = range(6)


def prepare_example(example: Mapping[str, tf.Tensor], *, image_size: int, preprocess: str,
                    augment_seeds: tuple[tf.Tensor, tf.Tensor] | None = None
                    ) -> dict[str, tf.Tensor]:
    """A parsed example as the models see it: RGB ``image`` at ``image_size`` and one
    ``caption``.

    With ``augment_seeds`` (crop seed, caption-choice seed) photos get the paper's random
    crop and one of several captions is drawn; without, the central crop and the first
    caption (evaluation, dataset encoding).
    """
    image, caption = example["image"], example["caption"]
    if image.shape.rank == 3 and image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    if preprocess == "photo":
        image = (preprocess_lib.photo_train_crop(image, image_size, augment_seeds[0])
                 if augment_seeds is not None
                 else preprocess_lib.center_crop_resize(image, image_size))
    else:
        image = preprocess_lib.plain_resize(image, image_size)
    if caption.shape.rank == 1:  # several captions per image
        pick = 0
        if augment_seeds is not None:
            pick = tf.random.stateless_uniform(
                [], augment_seeds[1], maxval=tf.shape(caption, out_type=tf.int64)[0],
                dtype=tf.int64)
        caption = caption[pick]
    return {**example, "image": image, "caption": caption}


class InputPipeline:
    """Per-process batches of ``image``, ``text_tokens`` and friends as numpy arrays.

    Each batch is a dict with ``image`` uint8[B, H, W, 3] (or, from code shards,
    ``codes`` int32[B, h, w]), ``mask`` bool[B] (False only
    on the padding that completes a final eval batch), and, with a tokenizer,
    ``text_tokens`` int32[B, text_len] and ``text_truncated`` bool[B]; with
    ``with_captions`` also ``caption`` (object array of str).

    ``caption_dropout`` (training only) replaces a caption by the empty one with that
    probability, so that a model also learns the unconditional distribution.

    ``batch_size`` is per process. ``num_epochs=None`` repeats forever (training); a
    finite stream ends with a padded partial batch unless ``drop_remainder``.
    """

    def __init__(
        self,
        source: Source,
        *,
        batch_size: int,
        image_size: int,
        preprocess: str = "resize",
        tokenizer: Tokenizer | None = None,
        train: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 10_000,
        num_epochs: int | None = None,
        drop_remainder: bool = False,
        with_captions: bool = False,
        caption_dropout: float = 0.0,
        process_index: int | None = None,
        process_count: int | None = None,
        prefetch: int = 2,
        num_parallel_calls: int = tf.data.AUTOTUNE,
    ):
        if process_index is None or process_count is None:
            import jax  # pylint: disable=g-import-not-at-top
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if preprocess not in ("resize", "photo"):
            raise ValueError(f"preprocess must be 'resize' or 'photo', got {preprocess!r}")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {caption_dropout}")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
        self.source = source
        self.batch_size = batch_size
        self.image_size = image_size
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.train = train
        self.seed = int(seed)
        self.shuffle_buffer = shuffle_buffer
        self.num_epochs = num_epochs
        self.drop_remainder = drop_remainder
        self.with_captions = with_captions
        self.caption_dropout = float(caption_dropout)
        self.process_index = process_index
        self.process_count = process_count
        self.prefetch = prefetch
        self.num_parallel_calls = num_parallel_calls

        # Empty files are left out: a process whose share held no example would
        # otherwise cycle through empty epochs forever.
        all_files = sorted(path for path, count in source.files() if count > 0)
        num_examples = sum(count for _, count in source.files())
        if num_examples < process_count:
            raise ValueError(
                f"{source.name}: {num_examples} examples cannot feed {process_count} "
                "processes")
        self.num_examples = num_examples  # of the whole split, all processes
        self.shard_by_file = len(all_files) >= process_count
        self.files = (all_files[process_index::process_count] if self.shard_by_file
                      else all_files)
        self._fingerprint = hashlib.sha1(
            "\n".join(f.rsplit("/", 1)[-1] for f in all_files).encode()).hexdigest()[:16]
        self._epoch = 0
        self._index = 0
        self._truncated = 0
        self._examples = 0
        self._iterator = None

    # --- state -------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """The position after the last batch returned; JSON-able."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "index": self._index,
            "examples_seen": self._examples,
            "captions_truncated": self._truncated,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "files_fingerprint": self._fingerprint,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a state of :meth:`get_state` (of this same process's stream)."""
        expected = self.get_state()
        for key in ("version", "seed", "process_index", "process_count", "files_fingerprint"):
            if state.get(key) != expected[key]:
                raise ValueError(
                    f"cannot restore the input pipeline of {self.source.name}: saved {key}="
                    f"{state.get(key)!r} but this pipeline has {key}={expected[key]!r} "
                    "(the data, seed or process layout changed since the checkpoint)")
        self._epoch = int(state["epoch"])
        self._index = int(state["index"])
        self._examples = int(state.get("examples_seen", 0))
        self._truncated = int(state.get("captions_truncated", 0))
        self._iterator = None

    @property
    def epoch(self) -> int:
        return self._epoch

    # --- the tf.data graph -------------------------------------------------------------

    def _records(self, files: tf.Tensor) -> tf.data.Dataset:
        """This process's raw records of ``files``, interleaved in a fixed order."""
        records = tf.data.Dataset.from_tensor_slices(files).interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20),
            cycle_length=min(len(self.files), _MAX_INTERLEAVE),
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True)
        if not self.shard_by_file:
            records = records.shard(self.process_count, self.process_index)
        return records

    def _epoch_records(self, epoch: tf.Tensor, skip: tf.Tensor) -> tf.data.Dataset:
        """Raw records of one epoch of this process, in order, with their positions."""
        files = tf.constant(self.files)
        if self.train:
            # The same order on every process, so that sharding by example stays disjoint.
            files = tf.random.experimental.stateless_shuffle(
                files, seed=_seed(self.seed, _FILE_ORDER, epoch))
        records = self._records(files)
        if self.train:
            records = records.shuffle(
                self.shuffle_buffer,
                seed=_seed(self.seed, _SHUFFLE, self.process_index, epoch)[0],
                reshuffle_each_iteration=False)
        records = records.enumerate().skip(skip)
        return records.map(lambda index, record: (epoch, index, record))

    def _example(self, epoch, index, record):
        parsed = self.source.parse(record)
        if "codes" in parsed:  # code shards: the image is already tokens
            example = {"codes": parsed["codes"], "caption": parsed["caption"]}
        else:
            augment = None
            if self.train:
                augment = (_seed(self.seed, _AUGMENT, self.process_index, epoch, index),
                           _seed(self.seed, _CAPTION_CHOICE, self.process_index, epoch, index))
            prepared = prepare_example(parsed, image_size=self.image_size,
                                       preprocess=self.preprocess, augment_seeds=augment)
            example = {"image": prepared["image"], "caption": prepared["caption"]}
        if self.train and self.caption_dropout > 0:
            draw = tf.random.stateless_uniform(
                [], _seed(self.seed, _CAPTION_DROPOUT, self.process_index, epoch, index))
            example["caption"] = tf.where(draw < self.caption_dropout, tf.constant(""),
                                          example["caption"])
        return {**example, "_epoch": epoch, "_index": index}

    def _tokenize(self, batch):
        seed = _seed(self.seed, _BPE_DROPOUT, self.process_index,
                     batch["_epoch"][0], batch["_index"][0])[0]

        @tf.autograph.experimental.do_not_convert
        def encode(captions, seed_value):
            return self.tokenizer.encode(list(captions), train=self.train, seed=int(seed_value))

        tokens, truncated = tf.numpy_function(
            encode, [batch["caption"], seed], [tf.int32, tf.bool], stateful=False)
        tokens.set_shape([None, self.tokenizer.text_len])
        truncated.set_shape([None])
        return {**batch, "text_tokens": tokens, "text_truncated": truncated}

    def _build(self) -> tf.data.Dataset:
        start_epoch, start_index = self._epoch, self._index
        end_epoch = _INT64_MAX if self.num_epochs is None else self.num_epochs
        epochs = tf.data.Dataset.range(start_epoch, end_epoch)
        ds = epochs.flat_map(lambda e: self._epoch_records(
            e, tf.where(e == start_epoch, tf.constant(start_index, tf.int64), 0)))
        ds = ds.map(self._example, num_parallel_calls=self.num_parallel_calls,
                    deterministic=True)
        ds = ds.batch(self.batch_size, drop_remainder=self.drop_remainder)
        if self.tokenizer is not None:
            ds = ds.map(self._tokenize)
        options = tf.data.Options()
        options.deterministic = True
        options.experimental_optimization.map_parallelization = True
        ds = ds.with_options(options)
        return ds.prefetch(self.prefetch)

    # --- iteration ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._build().as_numpy_iterator()
        batch = next(self._iterator)
        epochs, indices = batch.pop("_epoch"), batch.pop("_index")
        self._epoch, self._index = int(epochs[-1]), int(indices[-1]) + 1
        real = len(indices)
        self._examples += real
        if "text_truncated" in batch:
            self._truncated += int(batch["text_truncated"].sum())
        captions = batch.pop("caption")
        if self.with_captions:
            batch["caption"] = np.array([c.decode("utf-8") for c in captions], dtype=object)
        batch["mask"] = np.ones((real,), bool)
        if real < self.batch_size:
            batch = {k: _pad_rows(v, self.batch_size) for k, v in batch.items()}
        return batch

    def iter_captions(self) -> Iterator[str]:
        """The split's captions once, without decoding images (for tokenizer training)."""
        captions = self._records(tf.constant(self.files)).map(lambda r: self.source.parse(r)["caption"],
                               num_parallel_calls=tf.data.AUTOTUNE).prefetch(64)
        for caption in captions.as_numpy_iterator():
            for c in np.atleast_1d(caption):
                yield c.decode("utf-8", errors="replace")


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    pad = np.zeros((rows - len(x),) + x.shape[1:], x.dtype)
    if x.dtype == object:
        pad[...] = ""
    return np.concatenate([x, pad])


# --- from config ----------------------------------------------------------------------


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


def make_pipeline(config, split: str, *, train: bool, tokenizer: Tokenizer | None = None,
                  **overrides) -> InputPipeline:
    """The pipeline for ``split`` as ``config`` describes it (global ``config.batch_size``)."""
    import jax  # pylint: disable=g-import-not-at-top
    process_count = overrides.pop("process_count", jax.process_count())
    process_index = overrides.pop("process_index", jax.process_index())
    if config.batch_size % process_count:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the "
            f"{process_count} processes")
    data = config.data
    kwargs = dict(
        batch_size=config.batch_size // process_count,
        image_size=data.image_size,
        preprocess=data.preprocess,
        tokenizer=tokenizer,
        train=train,
        seed=config.seed,
        shuffle_buffer=data.shuffle_buffer,
        num_epochs=None if train else 1,
        process_index=process_index,
        process_count=process_count)
    kwargs.update(overrides)
    return InputPipeline(make_source(data, split), **kwargs)


def make_global_batch(batch: Mapping[str, np.ndarray], mesh,
                      batch_axes: Sequence[str] = ("data", "fsdp")):
    """Turns a per-process batch into global ``jax.Array``s sharded on the batch axes.

    Every process passes its own rows; the leading dimension of each result is the
    global batch. Non-numeric entries (captions) are left out.
    """
    import jax  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    sharding = NamedSharding(mesh, PartitionSpec(axes or None))
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in batch.items() if v.dtype != object}
