r"""Measures a trained image tokenizer on a whole split: PSNR, MSE and code usage.

  python -m dalle_jax.tools.eval_image_tokenizer --config=configs/image_tokenizer_shapes.py \
      --workdir=runs/dvae_shapes

Images are encoded to codes (argmax, no noise) and decoded back with the run's EMA
parameters, as stage 2 will see them. Writes ``<workdir>/eval_<split>.json``.
"""
from __future__ import annotations

import json
import time

from absl import flags
from etils import epath
import numpy as np

from dalle_jax import config as config_lib
from dalle_jax import files
from dalle_jax import visualize
from dalle_jax.data import pipeline as pipeline_lib

config_lib.define_flags()
_SPLIT = flags.DEFINE_string("split", None, "Split to measure (default: stage1.eval_split).")


def evaluate(image_tokenizer, config, split: str, batch_size: int = 128) -> dict:
    """PSNR (mean over images), MSE, fraction of the vocabulary used, perplexity."""
    counts = np.zeros((image_tokenizer.vocab_size,), np.int64)
    psnrs, mses = [], []
    first = None
    with pipeline_lib.make_pipeline(config, split, train=False, batch_size=batch_size,
                                    process_index=0, process_count=1) as pipeline:
        for batch in pipeline:
            real = batch["mask"]
            codes = image_tokenizer.encode(batch["image"])
            recon = image_tokenizer.decode(codes)
            error = ((recon.astype(np.float64) - batch["image"]) / 255.0) ** 2
            mse = error.reshape(len(error), -1).mean(-1)[real]
            mses.extend(mse)
            psnrs.extend(-10 * np.log10(np.maximum(mse, 1e-10)))
            counts += np.bincount(codes[real].ravel(), minlength=image_tokenizer.vocab_size)
            if first is None:
                first = (batch["image"][:8], recon[:8])
    probs = counts / counts.sum()
    nonzero = probs[probs > 0]
    return {
        "split": split,
        "examples": len(psnrs),
        "psnr": float(np.mean(psnrs)),
        "mse": float(np.mean(mses)),
        "codes_used": float((counts > 0).mean()),
        "perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero)))),
        "step": image_tokenizer.step,
    }, first


def main(argv):
    del argv
    # A stage-1 run whose model is the config's, checked before main (dalle_jax.validate).
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    from dalle_jax.inference.image_tokenizer import ImageTokenizerRun  # pylint: disable=g-import-not-at-top
    image_tokenizer = ImageTokenizerRun.load(workdir, config)
    split = _SPLIT.value or config.stage1.eval_split
    start = time.perf_counter()
    results, (originals, recon) = evaluate(image_tokenizer, config, split)
    results["seconds"] = round(time.perf_counter() - start, 1)
    files.atomic_write(epath.Path(workdir) / f"eval_{split}.json",
                       json.dumps(results, indent=2))
    grid = visualize.captioned_grid(np.concatenate([originals, recon]),
                                    ["input"] * len(originals) + ["reconstruction"] * len(recon),
                                    cols=len(originals), cell_size=96, caption_lines=1)
    visualize.save_png(grid, epath.Path(workdir) / f"reconstructions_{split}.png")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    config_lib.run(main)
