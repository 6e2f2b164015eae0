r"""Input throughput benchmark (examples/s of the training pipeline, medians).

  python -m dalle_jax.tools.bench_input --config=configs/bench_input.py

Two paths, each the full training pipeline (read, shuffle, decode, augment, batch,
tokenize with BPE-dropout) on one process:
- shapes: the captioned-shapes dataset at 64 px (PNG decode, plain resize);
- photos: synthetic COCO-sized JPEGs converted to TFRecords, the paper's random crop
  and area resize to 256 px.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

from absl import flags
import numpy as np
from PIL import Image
import tensorflow as tf

from dalle_jax import config as config_lib
from dalle_jax.data import convert
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data import shapes_tfds
from dalle_jax.data import tokenizer as tokenizer_lib
from dalle_jax.tools import machine

config_lib.define_flags()


def machine_description() -> str:
    return (f"{machine.cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}")


def measure(pipeline, *, warmup: int, windows: int, batches_per_window: int) -> dict:
    """Median examples/s over timed windows, after a warm-up (tf.data autotune)."""
    for _ in range(warmup):
        next(pipeline)
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(batches_per_window):
            next(pipeline)
        rates.append(batches_per_window * pipeline.batch_size
                     / (time.perf_counter() - start))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


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


def train_pipeline(source, *, res: int, preprocess: str, config, tokenizer_path: str):
    """The measured pipeline, with a BPE tokenizer trained on the source's captions."""
    kwargs = dict(batch_size=config.batch_size, image_size=res, preprocess=preprocess,
                  process_index=0, process_count=1)
    if not os.path.exists(tokenizer_path):
        captions = pipeline_lib.InputPipeline(source, **kwargs).iter_captions()
        tokenizer_lib.train_tokenizer(captions, tokenizer_path, vocab_size=512)
    tokenizer = tokenizer_lib.Tokenizer(tokenizer_path, text_len=config.text_len, dropout=0.1)
    return pipeline_lib.InputPipeline(source, tokenizer=tokenizer, **kwargs)


def main(argv):
    del argv
    config = flags.FLAGS.config
    workdir = config.workdir
    timing = dict(warmup=config.warmup_batches, windows=config.windows,
                  batches_per_window=config.batches_per_window)
    results = {}

    builder = shapes_tfds.build_captioned_shapes(
        os.path.join(workdir, "tfds"), image_size=64, num_train=config.shapes_num_train,
        num_validation=64, num_test=64, num_holdout=64)
    shapes = train_pipeline(
        pipeline_lib.TfdsSource(builder, "train"), res=64, preprocess="resize",
        config=config, tokenizer_path=os.path.join(workdir, "shapes_tok.model"))
    results["shapes 64 px (PNG)"] = measure(shapes, **timing)

    photo_dir = os.path.join(workdir, "photos")
    records_dir = os.path.join(workdir, "photo_records")
    synthetic_photos(photo_dir, config.photos_num_images, tuple(config.photos_size))
    try:
        pipeline_lib.RecordSource(records_dir, "photos", "train")
    except FileNotFoundError:
        convert.convert(output_dir=records_dir, name="photos", input_dir=photo_dir,
                        num_shards=8)
    photos = train_pipeline(
        pipeline_lib.RecordSource(records_dir, "photos", "train"), res=config.photos_res,
        preprocess="photo", config=config,
        tokenizer_path=os.path.join(workdir, "photos_tok.model"))
    height, width = config.photos_size
    results[f"JPEG {width}x{height} -> {config.photos_res} px"] = measure(photos, **timing)

    print(f"\nmachine: {machine_description()}")
    print(f"batch {config.batch_size}, median of {config.windows} windows of "
          f"{config.batches_per_window} batches after {config.warmup_batches} warm-up\n")
    print("| path | examples/s (median) | min | max |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['median']:.0f} | {r['min']:.0f} | {r['max']:.0f} |")


if __name__ == "__main__":
    config_lib.run(main)
