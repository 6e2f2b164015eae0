"""The captioned-shapes dataset as a tensorflow-datasets builder.

Importing this module registers the builder as "captioned_shapes", so
`tfds.builder("captioned_shapes/64px", data_dir=...)` works. Nothing is
downloaded: every example is rendered by `dalle_jax.data.shapes` from its own
random generator, so equal configs give byte-identical TFRecord files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import writer as tfds_writer

from dalle_jax.data import shapes

DEFAULT_HOLDOUT = shapes.DEFAULT_HOLDOUT
PRESET_IMAGE_SIZES = (32, 64, 128, 256)
DEFAULT_IMAGE_SIZE = 64


@dataclasses.dataclass(eq=False)
class CaptionedShapesConfig(tfds.core.BuilderConfig):
    """Image size, split sizes, held-out (colour, shape) pairs and seed."""

    image_size: int = DEFAULT_IMAGE_SIZE
    num_train: int = 50_000
    num_validation: int = 2_000
    num_test: int = 2_000
    num_holdout: int = 2_000
    holdout_pairs: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT
    seed: int = 0

    @property
    def split_sizes(self) -> dict[str, int]:
        return {
            "train": self.num_train,
            "validation": self.num_validation,
            "test": self.num_test,
            "holdout": self.num_holdout,
        }


def _preset(image_size: int) -> CaptionedShapesConfig:
    return CaptionedShapesConfig(
        name=f"{image_size}px",
        description=f"{image_size}x{image_size} images, default split sizes.",
        image_size=image_size,
    )


PRESETS = tuple(_preset(size) for size in PRESET_IMAGE_SIZES)


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
    """Procedurally rendered coloured shapes with spatial captions."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = list(PRESETS)
    DEFAULT_BUILDER_CONFIG_NAME = f"{DEFAULT_IMAGE_SIZE}px"

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls) -> None:
        # Nothing is downloaded, so there is no checksums file to look for; the base
        # class's lookup also needs the `importlib_resources` backport on Python 3.11.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=(
                "One or two coloured shapes on a noisy dark background, captioned "
                "with size, colour, shape and the position of a lone object (3x3 "
                "cell) or the spatial relation between two. The holdout split "
                "holds (colour, shape) pairs absent from the other splits."
            ),
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Image(
                    shape=(size, size, 3), encoding_format="png"
                ),
                "caption": tfds.features.Text(),
                # A shapes.CELL_PHRASES entry (one object) or shapes.RELATIONS entry (two).
                "layout": tfds.features.Text(),
                # The caption's subject first.
                "objects": tfds.features.Sequence({
                    "shape": tfds.features.ClassLabel(names=shapes.SHAPES),
                    "colour": tfds.features.ClassLabel(names=shapes.COLOURS),
                    "size": tfds.features.ClassLabel(names=shapes.SIZES),
                    "rgb": tfds.features.Tensor(shape=(3,), dtype=np.uint8),
                    # (x, y) in pixels.
                    "centre": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                    "bbox": tfds.features.BBoxFeature(),
                }),
            }),
            supervised_keys=("caption", "image"),
            # Examples are independent draws, so index order is as random as any.
            disable_shuffling=True,
        )

    def _example_writer(self) -> tfds_writer.ExampleWriter:
        return _DeterministicExampleWriter(file_format=self.info.file_format)

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        config = self.builder_config
        if config.num_holdout and not config.holdout_pairs:
            raise ValueError("num_holdout > 0 needs at least one holdout pair")
        return {
            split: self._generate_examples(split, count)
            for split, count in config.split_sizes.items()
            if count > 0
        }

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict]]:
        config = self.builder_config
        for index in range(count):
            yield index, _example(config, split, index)


class _DeterministicExampleWriter(tfds_writer.ExampleWriter):
    """Writes every record with its features in sorted key order.

    tfds serialises tf.train.Example protos without `deterministic=True`, so the
    order of the feature map, and with it the bytes written, follows a per-process
    hash seed; re-serialising each record deterministically makes equal examples
    give equal files in any process.
    """

    def write(self, path, examples):
        canonical = (
            (key, tf.train.Example.FromString(record).SerializeToString(deterministic=True))
            for key, record in examples
        )
        return super().write(path, canonical)


def _example(config: CaptionedShapesConfig, split: str, index: int) -> dict:
    size = config.image_size
    scene = shapes.split_scene(
        split, index, image_size=size, holdout_pairs=config.holdout_pairs, seed=config.seed
    )
    return {
        "id": f"{split}/{index}",
        "image": shapes.encode_png(scene.image),
        "caption": scene.caption,
        "layout": scene.layout,
        "objects": [
            {
                "shape": obj.shape,
                "colour": obj.colour,
                "size": obj.size,
                "rgb": obj.rgb,
                "centre": np.asarray(obj.centre, np.float32),
                "bbox": tfds.features.BBox(*obj.bbox(size)),
            }
            for obj in scene.objects
        ],
    }


def config_name(
    image_size: int,
    num_train: int,
    num_validation: int,
    num_test: int,
    num_holdout: int,
    holdout_pairs: Sequence[tuple[str, str]],
    seed: int,
) -> str:
    """The preset name for preset parameters, else a name that encodes them all."""
    holdout_pairs = tuple(tuple(p) for p in holdout_pairs)
    counts = (num_train, num_validation, num_test, num_holdout)
    if (
        image_size in PRESET_IMAGE_SIZES
        and counts == tuple(PRESETS[0].split_sizes.values())
        and holdout_pairs == DEFAULT_HOLDOUT
        and seed == 0
    ):
        return f"{image_size}px"
    pairs = ",".join(f"{colour}-{shape}" for colour, shape in holdout_pairs)
    pairs_digest = hashlib.sha256(pairs.encode()).hexdigest()[:8]
    return (
        f"{image_size}px_n{num_train}-{num_validation}-{num_test}-{num_holdout}"
        f"_seed{seed}_holdout{pairs_digest}"
    )


def build_captioned_shapes(
    data_dir: str | os.PathLike,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_train: int = 50_000,
    num_validation: int = 2_000,
    num_test: int = 2_000,
    num_holdout: int = 2_000,
    holdout_pairs: Sequence[tuple[str, str]] = DEFAULT_HOLDOUT,
    seed: int = 0,
) -> tfds.core.DatasetBuilder:
    """The prepared captioned-shapes builder in `data_dir`, generating it if needed."""
    holdout_pairs = tuple(tuple(p) for p in holdout_pairs)
    shapes.training_pairs(holdout_pairs)  # Validates the pair names.
    name = config_name(
        image_size, num_train, num_validation, num_test, num_holdout, holdout_pairs, seed
    )
    preset = next((p for p in PRESETS if p.name == name), None)
    config = preset or CaptionedShapesConfig(
        name=name,
        description="Custom captioned-shapes parameters.",
        image_size=image_size,
        num_train=num_train,
        num_validation=num_validation,
        num_test=num_test,
        num_holdout=num_holdout,
        holdout_pairs=holdout_pairs,
        seed=seed,
    )
    builder = CaptionedShapes(config=config, data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        builder.download_and_prepare(
            file_format="tfrecord",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    return builder
