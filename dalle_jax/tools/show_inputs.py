r"""The input side of a dataset, end to end, as a picture: what the model will see.

  python -m dalle_jax.tools.show_inputs --config=configs/input_shapes.py --workdir=runs/shapes

Builds the dataset (the captioned-shapes dataset by default; cached in tfds's data
folder after the first run), trains the text tokenizer beside the run, draws a few
training batches through the tf.data pipeline, and writes ``<workdir>/examples.png``:
a grid of training images with their captions and token counts.
"""
from __future__ import annotations

import time

from absl import flags
from dalle_jax import config as config_lib
from dalle_jax import visualize
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data import sources
from dalle_jax.data import text_tokenizer

config_lib.define_flags()


def main(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir  # checked (dalle_jax.validate)
    config_lib.write_config(config, workdir)

    start = time.perf_counter()
    source = sources.make_source(config.data, config.inputs.split)
    files = source.files()
    print(f"dataset {source.name}: {sum(n for _, n in files)} examples in {len(files)} "
          f"record files (ready in {time.perf_counter() - start:.1f}s)")

    start = time.perf_counter()
    tokenizer = text_tokenizer.train_or_load_text_tokenizer(
        config.text, workdir, sources.iter_captions(source))
    print(f"text tokenizer {text_tokenizer.text_tokenizer_path(config.text, workdir)}: "
          f"{tokenizer.vocab_size} pieces (ready in {time.perf_counter() - start:.1f}s)")

    count = config.inputs.grid_rows * config.inputs.grid_cols
    with pipeline_lib.InputPipeline(
            source, batch_size=count, image_size=config.data.image_size,
            preprocess=config.data.preprocess, text_tokenizer=tokenizer, train=True,
            seed=config.seed, shuffle_buffer=config.data.shuffle_buffer,
            with_captions=True, process_index=0, process_count=1) as pipeline:
        batch = next(pipeline)
        start, steps = time.perf_counter(), 5
        for _ in range(steps):
            next(pipeline)
        rate = steps * count / (time.perf_counter() - start)
    print("batch: " + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in batch.items()))
    print(f"pipeline: {rate:.0f} examples/s (batch {count}, warm)")

    grid = visualize.examples_grid(batch, cols=config.inputs.grid_cols,
                                   pad_id=text_tokenizer.PAD_ID)
    path = visualize.save_png(grid, f"{workdir}/examples.png")
    for caption in batch["caption"][:3]:
        print(f"  {caption!r} -> {tokenizer.pieces(caption)}")
    print(f"wrote {path} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    config_lib.run(main)
