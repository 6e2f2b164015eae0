"""The tf.data input pipeline: shards → per-process, exactly resumable numpy batches.

Order of work for each process::

    its files ─► per-epoch file shuffle ─► interleaved records ─► [shard by example]
      ─► shuffle buffer of raw records ─► enumerate ─► skip (on resume)
      ─► decode + preprocess (parallel) ─► batch ─► prefetch ─► tokenize (host)

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

import hashlib
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf

from dalle_jax.data import preprocess as preprocess_lib
from dalle_jax.data import sources as sources_lib
from dalle_jax.data.text_tokenizer import TextTokenizer

STATE_VERSION = 1
_INT64_MAX = np.iinfo(np.int64).max


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
    on the padding that completes a final eval batch), and, with a text tokenizer,
    ``text_tokens`` int32[B, text_len] and ``text_truncated`` bool[B]; with
    ``with_captions`` also ``caption`` (object array of str).

    ``caption_dropout`` (training only) replaces a caption by the empty one with that
    probability, so that a model also learns the unconditional distribution.

    ``batch_size`` is per process. ``num_epochs=None`` repeats forever (training); a
    finite stream ends with a padded partial batch unless ``drop_remainder``.

    The pipeline holds a tf.data iterator once iterated: :meth:`close` it, or use it as
    a context manager (``with make_pipeline(...) as data:``).
    """

    def __init__(
        self,
        source: sources_lib.Source,
        *,
        batch_size: int,
        image_size: int,
        preprocess: str = "resize",
        text_tokenizer: TextTokenizer | None = None,
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
        self.text_tokenizer = text_tokenizer
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
        all_files = sources_lib.nonempty_files(source)
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
        records = sources_lib.interleaved_records(files, len(self.files))
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

    def _bpe_seed(self, batch):
        """The batch's BPE-dropout seed, a function of its first example's position.

        Only the seed is computed here; the text tokenizer runs on the host in
        :meth:`__next__`. Python called from inside the tf.data graph
        (``tf.numpy_function``) would need the GIL on tf.data's worker threads, which
        deadlocks an interpreter that finalises while such a worker is still running.
        """
        seed = _seed(self.seed, _BPE_DROPOUT, self.process_index,
                     batch["_epoch"][0], batch["_index"][0])[0]
        return {**batch, "_bpe_seed": seed}

    def _build(self) -> tf.data.Dataset:
        start_epoch, start_index = self._epoch, self._index
        end_epoch = _INT64_MAX if self.num_epochs is None else self.num_epochs
        epochs = tf.data.Dataset.range(start_epoch, end_epoch)
        ds = epochs.flat_map(lambda e: self._epoch_records(
            e, tf.where(e == start_epoch, tf.constant(start_index, tf.int64), 0)))
        ds = ds.map(self._example, num_parallel_calls=self.num_parallel_calls,
                    deterministic=True)
        ds = ds.batch(self.batch_size, drop_remainder=self.drop_remainder)
        if self.text_tokenizer is not None:
            ds = ds.map(self._bpe_seed)
        options = tf.data.Options()
        options.deterministic = True
        options.experimental_optimization.map_parallelization = True
        ds = ds.with_options(options)
        return ds.prefetch(self.prefetch)

    # --- iteration and lifetime --------------------------------------------------------

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
        captions = batch.pop("caption")
        if self.text_tokenizer is not None:
            tokens, truncated = self.text_tokenizer.encode(
                list(captions), train=self.train, seed=int(batch.pop("_bpe_seed")))
            batch["text_tokens"], batch["text_truncated"] = tokens, truncated
            self._truncated += int(truncated.sum())
        if self.with_captions:
            batch["caption"] = np.array([c.decode("utf-8") for c in captions], dtype=object)
        batch["mask"] = np.ones((real,), bool)
        if real < self.batch_size:
            batch = {k: _pad_rows(v, self.batch_size) for k, v in batch.items()}
        return batch

    def close(self) -> None:
        """Releases the tf.data iterator and its threads.

        The position is kept: a later ``next`` rebuilds the stream from it, giving the
        batches an uninterrupted iterator would have. Close pipelines (or use them as
        context managers) before the interpreter exits, so that no tf.data iterator is
        left for interpreter shutdown to tear down.
        """
        self._iterator = None

    def __enter__(self) -> "InputPipeline":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    pad = np.zeros((rows - len(x),) + x.shape[1:], x.dtype)
    if x.dtype == object:
        pad[...] = ""
    return np.concatenate([x, pad])


# --- from config ----------------------------------------------------------------------


def make_pipeline(config, split: str, *, train: bool,
                  text_tokenizer: TextTokenizer | None = None,
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
        text_tokenizer=text_tokenizer,
        train=train,
        seed=config.seed,
        shuffle_buffer=data.shuffle_buffer,
        num_epochs=None if train else 1,
        process_index=process_index,
        process_count=process_count)
    kwargs.update(overrides)
    return InputPipeline(sources_lib.make_source(data, split), **kwargs)
