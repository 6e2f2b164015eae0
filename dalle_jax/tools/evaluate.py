r"""Evaluates an exported bundle: each stage on held-out data, and generated images
judged from their pixels.

  python -m dalle_jax.tools.evaluate --bundle=runs/demo/bundle --output=runs/demo/evaluation.json

Reports stage-1 reconstruction PSNR and codebook use and stage-2 validation loss and
bits per image token on the validation split; for captioned shapes, the fidelity of
images generated for the test split's captions and for the holdout split's (colour,
shape) pairs, read by the attribute checker (:mod:`dalle_jax.evaluation.shapes_checker`).
When the bundle carries a reranker (``export --reranker``), also its retrieval
Recall@1/5/10 and zero-shot colour, shape and cell accuracy on the split, and the gain
from reranking: the fidelity of its top-1 of 8 and of 32 candidates against a random
one of them, over several seeds. When it carries an upsampler (``export --upsampler``),
its PSNR and SSIM against bicubic on held-out images, the consistency of its outputs
with its inputs, and the fidelity of generated images before and after it. With unCLIP's
decoder (``export --unclip_decoder``): its variations of held-out images, judged against
the source's caption and for their diversity over η; with its prior too, the fidelity of
the unclip path beside the dalle path on the same prompts, with and without the reranker.
Prints a short table and writes everything, per-image checks included, as JSON (and,
with the decoder, ``<output>_variations.png``: held-out images and their variations).
"""
from __future__ import annotations

import json
import os
import time

from absl import flags

from dalle_jax import config as config_lib

_BUNDLE = flags.DEFINE_string("bundle", None, "Bundle directory (dalle_jax.tools.export).",
                              required=True)
_OUTPUT = flags.DEFINE_string("output", None, "JSON file to write (default: "
                              "evaluation.json beside the bundle).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder of the image dataset (tfds "
                                "data_dir); default: the bundle's config's.")
_SPLIT = flags.DEFINE_string("split", "validation", "Split for the stage measures.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "At most this many examples "
                                     "for the stage measures (default: the whole split).",
                                     lower_bound=1)
_TEST_PROMPTS = flags.DEFINE_integer("test_prompts", 128, "Distinct test captions to "
                                     "generate for.", lower_bound=0)
_HOLDOUT_PROMPTS = flags.DEFINE_integer("holdout_prompts", 64, "Distinct holdout captions "
                                        "to generate for.", lower_bound=0)
_IMAGES = flags.DEFINE_integer("images_per_prompt", 2, "Images per prompt.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", lower_bound=0)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per sampling batch.",
                                   lower_bound=1)
_CANDIDATES = flags.DEFINE_integer(
    "candidates", None, "Judge, for each prompt, the reranker's best --images_per_prompt "
    "of this many candidates (and a random candidate beside; needs a reranker).",
    lower_bound=1)
_RERANK_PROMPTS = flags.DEFINE_integer(
    "rerank_prompts", 64, "Test prompts for the reranking gain (0: skip it).", lower_bound=0)
_RERANK_CANDIDATES = flags.DEFINE_list("rerank_candidates", ["8", "32"],
                                       "Numbers of candidates to rerank.")
_RERANK_SEEDS = flags.DEFINE_integer("rerank_seeds", 3, "Seeds for the reranking gain "
                                     "(its spread is over these).", lower_bound=1)
_RERANKER_EXAMPLES = flags.DEFINE_integer("reranker_examples", 1000, "Pairs of the split "
                                          "for the reranker's retrieval.", lower_bound=1)
_UPSAMPLER_EXAMPLES = flags.DEFINE_integer(
    "upsampler_examples", 256, "Held-out images of the split for the upsampler.",
    lower_bound=1)
_UPSAMPLE_PROMPTS = flags.DEFINE_integer(
    "upsample_prompts", 64, "Test prompts whose images are judged before and after the "
    "upsampler (0: skip).", lower_bound=0)
_UPSAMPLE_STEPS = flags.DEFINE_integer("upsample_steps", None, "DDIM steps of the "
                                       "upsampler (default: its run's).", lower_bound=1)
_UPSAMPLE_T_START = flags.DEFINE_float(
    "upsample_t_start", None, "Start the upsampler from bicubic noised to this time in "
    "(0, 1] (default: its run's).")
_VARIATION_SOURCES = flags.DEFINE_integer(
    "variation_sources", 64, "Held-out images of the split whose unCLIP variations are "
    "judged (0: skip; needs the bundle's unCLIP decoder).", lower_bound=0)
_VARIATIONS_PER_SOURCE = flags.DEFINE_integer("variations_per_source", 4, "Variations of "
                                              "each image.", lower_bound=2)
_VARIATION_ETAS = flags.DEFINE_list("variation_etas", ["0", "0.5", "1"], "DDIM etas of the "
                                    "variations' sweep (from noise and from inversion).")
_UNCLIP_PROMPTS = flags.DEFINE_integer(
    "unclip_prompts", 64, "Test prompts for the side-by-side fidelity of the dalle and "
    "unclip paths (0: skip; needs unCLIP's prior and decoder).", lower_bound=0)
_UNCLIP_CANDIDATES = flags.DEFINE_integer(
    "unclip_candidates", 4, "Candidates per prompt for the reranked columns of that table "
    "(at most --images_per_prompt: no reranking).", lower_bound=1)
_DECODER_GUIDANCE = flags.DEFINE_float(
    "decoder_guidance", None, "Guidance scale of unCLIP's decoder for the variations and "
    "the unclip path (default: its run's).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Default: the bundle's.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Default: the bundle's.")
_TOP_P = flags.DEFINE_float("top_p", None, "Default: the bundle's.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Default: the bundle's.")
config_lib.define_debug_flag()
FIGURE_SOURCES = 6  # rows of the variations figure (<output>_variations.png)


def main(argv):
    del argv
    from dalle_jax import files  # pylint: disable=g-import-not-at-top
    from dalle_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
    from dalle_jax.inference.text_to_image import TextToImage  # pylint: disable=g-import-not-at-top
    output = _OUTPUT.value or os.path.join(
        os.path.dirname(os.path.abspath(_BUNDLE.value)), "evaluation.json")
    from dalle_jax import errors  # pylint: disable=g-import-not-at-top
    try:
        candidates = tuple(int(n) for n in _RERANK_CANDIDATES.value)
    except ValueError:
        raise errors.UserError(f"--rerank_candidates must be integers, got "
                               f"{','.join(_RERANK_CANDIDATES.value)}") from None
    if not candidates or min(candidates) < 1:
        raise errors.UserError("--rerank_candidates must be positive integers")
    try:
        etas = tuple(float(e) for e in _VARIATION_ETAS.value)
    except ValueError:
        raise errors.UserError(f"--variation_etas must be numbers, got "
                               f"{','.join(_VARIATION_ETAS.value)}") from None
    if any(not 0 <= e <= 1 for e in etas):
        raise errors.UserError("--variation_etas must lie in [0, 1]")
    start = time.perf_counter()
    model = TextToImage.load(_BUNDLE.value)
    report = evaluate.evaluate(
        model, data_dir=_DATA_DIR.value, stage_split=_SPLIT.value,
        max_examples=_MAX_EXAMPLES.value, test_prompts=_TEST_PROMPTS.value,
        holdout_prompts=_HOLDOUT_PROMPTS.value, images_per_prompt=_IMAGES.value,
        seed=_SEED.value, batch_size=_BATCH_SIZE.value, log=print,
        candidates=_CANDIDATES.value,
        rerank_prompts=_RERANK_PROMPTS.value, rerank_candidates=candidates,
        rerank_seeds=tuple(range(_SEED.value, _SEED.value + _RERANK_SEEDS.value)),
        reranker_examples=_RERANKER_EXAMPLES.value,
        upsampler_examples=_UPSAMPLER_EXAMPLES.value,
        upsample_prompts=_UPSAMPLE_PROMPTS.value, upsample_steps=_UPSAMPLE_STEPS.value,
        upsample_t_start=_UPSAMPLE_T_START.value,
        variation_sources=_VARIATION_SOURCES.value,
        variations_per_source=_VARIATIONS_PER_SOURCE.value, variation_etas=etas,
        unclip_prompts=_UNCLIP_PROMPTS.value, unclip_candidates=_UNCLIP_CANDIDATES.value,
        decoder_guidance_scale=_DECODER_GUIDANCE.value,
        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
        guidance_scale=_GUIDANCE.value)
    if model.unclip_decoder is not None and "unclip_variations" in report:
        from dalle_jax import visualize  # pylint: disable=g-import-not-at-top
        from dalle_jax.evaluation import contrastive  # pylint: disable=g-import-not-at-top
        from dalle_jax.evaluation import unclip as unclip_eval  # pylint: disable=g-import-not-at-top
        data = evaluate.image_data_config(model, _DATA_DIR.value)
        images, captions = contrastive.split_pairs(data, _SPLIT.value, FIGURE_SOURCES)
        path = os.path.splitext(output)[0] + "_variations.png"
        visualize.save_png(unclip_eval.figure(model.unclip_decoder, images, captions,
                                              seed=_SEED.value,
                                              guidance_scale=_DECODER_GUIDANCE.value), path)
        print(f"wrote {path}")
    report["seconds"]["total"] = round(time.perf_counter() - start, 1)
    files.atomic_write(output, json.dumps(report, indent=1) + "\n")
    print(evaluate.table(report))
    print(f"wrote {output}")


if __name__ == "__main__":
    config_lib.run(main)
