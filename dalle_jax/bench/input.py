"""Input throughput: examples/s of the training pipeline, medians over timed windows.

Two paths, each the full training pipeline (read, shuffle, decode, augment, batch,
tokenize with BPE-dropout) on one process:
- shapes: the captioned-shapes dataset (PNG decode, plain resize);
- photos: synthetic COCO-sized JPEGs converted to TFRecords, the paper's random crop
  and area resize.
The data is built once in ``workdir`` and reused by later runs of the same sizes.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf

from dalle_jax.bench import record
from dalle_jax.data import convert
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data import shapes_tfds
from dalle_jax.data import sources
from dalle_jax.data import text_tokenizer as text_tokenizer_lib


def summary(config: ml_collections.ConfigDict) -> str:
    height, width = config.photos_size
    return (f"batch {config.batch_size}, median of {config.windows} windows of "
            f"{config.batches_per_window} batches after {config.warmup_batches} warm-up; "
            f"shapes {config.shapes_res} px ({config.shapes_num_train:,} train), "
            f"{config.photos_num_images} JPEGs {width}×{height} → {config.photos_res} px")


def rates(pipeline, *, warmup: int, windows: int, batches_per_window: int) -> list[float]:
    """Examples/s of each timed window, after a warm-up (for tf.data's autotuning)."""
    for _ in range(warmup):
        next(pipeline)
    result = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(batches_per_window):
            next(pipeline)
        result.append(batches_per_window * pipeline.batch_size / (time.perf_counter() - start))
    return result


def synthetic_photos(directory: str, count: int, size: tuple[int, int]) -> None:
    """COCO-sized JPEGs (smooth colour fields with noise, quality 90) with captions."""
    os.makedirs(directory, exist_ok=True)
    height, width = size
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        path = os.path.join(directory, f"photo_{i:05d}.jpg")
        if os.path.exists(path):
            continue
        phase = rng.uniform(0, 2 * np.pi, 3)
        freq = rng.uniform(0.003, 0.03, 3)
        image = np.stack([127 + 100 * np.sin(freq[c] * (x + 0.7 * y) + phase[c])
                          for c in range(3)], -1)
        image += rng.normal(0, 12, image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
        with open(os.path.join(directory, f"photo_{i:05d}.txt"), "w") as f:
            f.write(f"a synthetic photo number {i} with smooth colour bands and noise")


def _train_pipeline(source, *, res: int, preprocess: str, config, tokenizer_path: str):
    """The measured pipeline, with a BPE tokenizer trained on the source's captions."""
    kwargs = dict(batch_size=config.batch_size, image_size=res, preprocess=preprocess,
                  process_index=0, process_count=1)
    if not os.path.exists(tokenizer_path):
        text_tokenizer_lib.train_text_tokenizer(sources.iter_captions(source), tokenizer_path,
                                                vocab_size=config.text_vocab_size)
    tokenizer = text_tokenizer_lib.TextTokenizer(tokenizer_path, text_len=config.text_len,
                                                 dropout=config.bpe_dropout)
    return pipeline_lib.InputPipeline(source, text_tokenizer=tokenizer, **kwargs)


def _figure(name: str, window_rates: list[float]) -> dict[str, Any]:
    return record.figure(name, statistics.median(window_rates), "examples/s",
                         note=f"min {min(window_rates):,.0f}, max {max(window_rates):,.0f}")


def measure(config: ml_collections.ConfigDict, *, workdir: str,
            log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Both paths' window rates: ``{"figures", "details", "machine"}``."""
    timing = dict(warmup=config.warmup_batches, windows=config.windows,
                  batches_per_window=config.batches_per_window)
    # Data directories are named by their sizes, so a run never reuses data of others.
    shapes_dir = os.path.join(workdir, f"shapes_{config.shapes_res}px_{config.shapes_num_train}")
    height, width = config.photos_size
    photos_name = f"photos_{config.photos_num_images}_{width}x{height}"
    photo_dir = os.path.join(workdir, photos_name)
    records_dir = os.path.join(workdir, f"{photos_name}_records")

    log(f"building captioned shapes in {shapes_dir}")
    builder = shapes_tfds.build_captioned_shapes(
        os.path.join(shapes_dir, "tfds"), image_size=config.shapes_res,
        num_train=config.shapes_num_train, num_validation=64, num_test=64, num_holdout=64)
    shapes = _train_pipeline(
        sources.TfdsSource(builder, "train"), res=config.shapes_res, preprocess="resize",
        config=config, tokenizer_path=os.path.join(shapes_dir, "text_tokenizer.model"))
    log("timing the shapes pipeline")
    shapes_rates = rates(shapes, **timing)

    log(f"building synthetic photos in {photo_dir}")
    synthetic_photos(photo_dir, config.photos_num_images, (height, width))
    try:
        sources.RecordSource(records_dir, "photos", "train")
    except FileNotFoundError:
        convert.convert(output_dir=records_dir, name="photos", input_dir=photo_dir,
                        num_shards=config.photos_num_shards)
    photos = _train_pipeline(
        sources.RecordSource(records_dir, "photos", "train"), res=config.photos_res,
        preprocess="photo", config=config,
        tokenizer_path=os.path.join(records_dir, "text_tokenizer.model"))
    log("timing the photo pipeline")
    photo_rates = rates(photos, **timing)

    shapes_name = f"captioned shapes, {config.shapes_res} px PNG, plain resize"
    photos_label = (f"JPEG {width}×{height} (synthetic, quality 90) → paper's crop + "
                    f"area resize → {config.photos_res} px")
    return {
        "figures": [_figure(shapes_name, shapes_rates), _figure(photos_label, photo_rates)],
        "details": {"window_examples_per_s": {"shapes": shapes_rates, "photos": photo_rates},
                    "data_dirs": {"shapes": shapes_dir, "photos": records_dir}},
        "machine": {"tensorflow": tf.__version__},
    }
