r"""Generates images from prompts with an exported bundle.

  python -m dalle_jax.tools.generate --bundle=runs/demo/bundle \
      --prompt="a red circle in the top left" --prompt="a blue star" --output=runs/samples
  python -m dalle_jax.tools.generate --bundle=... --prompts_file=prompts.txt --output=...
  python -m dalle_jax.tools.generate --bundle=... --prompt="a green square" \
      --prime_image=start.png --prime_rows=3 --output=...          # complete an image
  python -m dalle_jax.tools.generate --bundle=... --variations_of=image.png --output=...
  python -m dalle_jax.tools.generate --bundle=... --prompt="a red star" --candidates=32 \
      --num_images=4 --output=...        # the reranker's best 4 of 32 (--keep_all: all)
  python -m dalle_jax.tools.generate --bundle=... --prompt="a red star" --upsample \
      --upsample_steps=25 --output=...   # 4x images by the bundle's diffusion upsampler

Writes ``<output>/images/<prompt>/<index>.png`` for every image, one grid per prompt
(``<output>/grids/<prompt>.png``, the prompt as its caption) and ``samples.jsonl`` with
one line per image (file, prompt, seed, index, settings, score, ...). With
``--candidates=N`` each prompt gets N images, scored from their pixels by the bundle's
reranker (a contrastive model), and the best ``--num_images`` are kept; ``--keep_all``
also writes every candidate (``<output>/candidates/<prompt>/<candidate>.png``) and
``candidates.jsonl`` with each one's score and rank. The same bundle, flags and seed give
byte-identical PNGs. With ``--upsample`` the images are the bundle's diffusion
upsampler's 4× versions of the stage-1 images (DDIM with ``--upsample_steps``,
``--upsample_eta`` and the input's ``--upsample_noise``), which are also written, to
``<output>/low_res/<prompt>/<index>.png``.
"""
from __future__ import annotations

import os
import sys
import time

from absl import flags

from dalle_jax import config as config_lib

_BUNDLE = flags.DEFINE_string("bundle", None, "Bundle directory (dalle_jax.tools.export).",
                              required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None,
                                    "A file of prompts, one per line (# comments).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the images.", required=True)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Images per prompt.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per sampling batch "
                                   "(rounded up to the device count; default: up to 64).",
                                   lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Default: the bundle's.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely codes (0: all).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling (1: off).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None,
                               "Classifier-free guidance scale (1: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.", lower_bound=0)
_PRIME_IMAGE = flags.DEFINE_string("prime_image", None,
                                   "Complete this image: keep its top --prime_rows rows.")
_PRIME_ROWS = flags.DEFINE_integer("prime_rows", None, "Code rows kept from the priming "
                                   "image (variations: half the grid by default).")
_VARIATIONS_OF = flags.DEFINE_string(
    "variations_of", None, "Variations of this image, --num_images of them. With unCLIP's "
    "decoder in the bundle (the default path then): its contrastive embedding decoded with "
    "--num_images seeds. With --path=dalle: its top code rows kept, the rest resampled "
    "(unconditional unless a --prompt is given).")
_PATH = flags.DEFINE_enum(
    "path", None, ["dalle", "unclip"], "Text -> image through DALL·E's transformer (dalle, "
    "the default for prompts) or unCLIP's prior and decoder (unclip: export "
    "--unclip_prior and --unclip_decoder); for --variations_of, unclip when the bundle has "
    "the decoder.")
_VARIATIONS_INVERT = flags.DEFINE_bool(
    "variations_invert", False, "unCLIP's variations start from the image's DDIM "
    "inversion instead of noise (--decoder_eta=0 then returns the image).")
_DECODER_STEPS = flags.DEFINE_integer("decoder_steps", None, "DDIM steps of unCLIP's "
                                      "decoder (default: its run's).", lower_bound=1)
_DECODER_ETA = flags.DEFINE_float("decoder_eta", None, "DDIM eta of unCLIP's decoder: 0 "
                                  "deterministic, 1 DDPM ancestral (default: its run's).")
_DECODER_GUIDANCE = flags.DEFINE_float(
    "decoder_guidance", None, "Classifier-free guidance scale of unCLIP's decoder on the "
    "image embedding (default: its run's).")
_PRIOR_STEPS = flags.DEFINE_integer("prior_steps", None, "DDIM steps of unCLIP's prior "
                                    "(default: its run's).", lower_bound=1)
_PRIOR_GUIDANCE = flags.DEFINE_float(
    "prior_guidance", None, "Classifier-free guidance scale of unCLIP's prior on the "
    "caption (default: its run's).")
_PRIOR_BEST_OF = flags.DEFINE_integer(
    "prior_best_of", 1, "unCLIP's prior draws this many image embeddings per image and "
    "keeps the one closest to the caption's (unCLIP: 2).", lower_bound=1)
_CANDIDATES = flags.DEFINE_integer(
    "candidates", None, "Draw this many images per prompt and keep the --num_images the "
    "bundle's reranker scores best (default: --num_images, no reranking).", lower_bound=1)
_KEEP_ALL = flags.DEFINE_bool("keep_all", False, "With --candidates: also write every "
                              "candidate with its rank and score.")
_UPSAMPLE = flags.DEFINE_bool("upsample", False, "Upsample the images 4x with the bundle's "
                              "diffusion upsampler (export --upsampler).")
_UPSAMPLE_STEPS = flags.DEFINE_integer("upsample_steps", None, "DDIM steps of the "
                                       "upsampler (default: its run's).", lower_bound=1)
_UPSAMPLE_ETA = flags.DEFINE_float("upsample_eta", None, "DDIM eta of the upsampler: 0 "
                                   "deterministic, 1 DDPM ancestral (default: its run's).")
_UPSAMPLE_NOISE = flags.DEFINE_float(
    "upsample_noise", None, "Noise level of the upsampler's input, a time in [0, 1) of its "
    "schedule (noise-conditioning augmentation; default: its run's, 0).")
_UPSAMPLE_T_START = flags.DEFINE_float(
    "upsample_t_start", None, "Start the upsampler's sampling from the bicubic image "
    "noised to this time in (0, 1] (1: from noise; default: its run's).")
_GRID_COLS = flags.DEFINE_integer("grid_cols", None, "Columns of each grid.", lower_bound=1)
config_lib.define_debug_flag()


def _prompts(errors) -> list[str]:
    from dalle_jax.inference import text_to_image  # pylint: disable=g-import-not-at-top
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        path = _PROMPTS_FILE.value
        if not os.path.isfile(path):
            raise errors.UserError(f"--prompts_file {path} not found")
        try:
            from_file = list(text_to_image.iter_prompts_file(path))
        except UnicodeDecodeError:
            raise errors.UserError(f"--prompts_file {path} is not UTF-8 text") from None
        if not from_file:
            raise errors.UserError(f"--prompts_file {path} has no prompts (one per line)")
        prompts += from_file
    if not prompts:
        if _VARIATIONS_OF.value:
            return [""]
        raise errors.UserError("nothing to generate: give --prompt (repeatable), "
                               "--prompts_file or --variations_of")
    return prompts


def main(argv):
    from dalle_jax import errors  # pylint: disable=g-import-not-at-top
    if len(argv) > 1:
        raise errors.UserError(f"unexpected arguments {' '.join(argv[1:])}: prompts go in "
                               "--prompt=\"...\"")
    output = _OUTPUT.value
    if os.path.exists(output) and not os.path.isdir(output):
        raise errors.UserError(f"--output {output} exists and is not a directory")
    if _PRIME_IMAGE.value and _VARIATIONS_OF.value:
        raise errors.UserError("--prime_image and --variations_of are two ways to prime; "
                               "give one")
    if _PRIME_IMAGE.value and _PRIME_ROWS.value is None:
        raise errors.UserError("--prime_image needs --prime_rows (code rows to keep)")
    if _PRIME_ROWS.value is not None and not (_PRIME_IMAGE.value or _VARIATIONS_OF.value):
        raise errors.UserError("--prime_rows needs --prime_image or --variations_of")
    if _KEEP_ALL.value and _CANDIDATES.value is None:
        raise errors.UserError("--keep_all needs --candidates (the images to choose from)")
    upsample_flags = (_UPSAMPLE_STEPS.value, _UPSAMPLE_ETA.value, _UPSAMPLE_NOISE.value,
                      _UPSAMPLE_T_START.value)
    if not _UPSAMPLE.value and any(v is not None for v in upsample_flags):
        raise errors.UserError("--upsample_steps, --upsample_eta, --upsample_noise and "
                               "--upsample_t_start need --upsample")
    unclip_decoder_flags = (_DECODER_STEPS.value, _DECODER_ETA.value, _DECODER_GUIDANCE.value)
    prior_flags = (_PRIOR_STEPS.value, _PRIOR_GUIDANCE.value)
    if _PATH.value == "dalle" and (any(v is not None for v in unclip_decoder_flags + prior_flags)
                                   or _VARIATIONS_INVERT.value or _PRIOR_BEST_OF.value > 1):
        raise errors.UserError("--decoder_*, --prior_* and --variations_invert are unCLIP's: "
                               "they do not go with --path=dalle")
    if _VARIATIONS_INVERT.value and not _VARIATIONS_OF.value:
        raise errors.UserError("--variations_invert needs --variations_of (the image to "
                               "invert)")
    prompts = _prompts(errors)

    from dalle_jax.inference import outputs  # pylint: disable=g-import-not-at-top
    from dalle_jax.inference import text_to_image  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    model = text_to_image.TextToImage.load(_BUNDLE.value)
    print(f"loaded {_BUNDLE.value} in {time.perf_counter() - start:.1f}s: "
          f"{model.image_size}px images from {model.grid_size}x{model.grid_size} codes, "
          f"on {model.mesh.size} device(s)"
          + (", with a reranker" if model.reranker is not None else "")
          + (", with a 4x upsampler" if model.upsampler is not None else ""))
    warn = lambda message: print(f"warning: {message}", file=sys.stderr, flush=True)

    upsample = dict(upsample=_UPSAMPLE.value, upsample_steps=_UPSAMPLE_STEPS.value,
                    upsample_eta=_UPSAMPLE_ETA.value, upsample_noise_level=_UPSAMPLE_NOISE.value,
                    upsample_t_start=_UPSAMPLE_T_START.value)
    decoder = dict(decoder_steps=_DECODER_STEPS.value, decoder_eta=_DECODER_ETA.value,
                   decoder_guidance_scale=_DECODER_GUIDANCE.value)
    if _VARIATIONS_OF.value and model.variations_path(_PATH.value) == "unclip":
        if _PROMPT.value or _PROMPTS_FILE.value or _PRIME_ROWS.value is not None:
            raise errors.UserError("unCLIP's variations decode the image's embedding: "
                                   "--prompt and --prime_rows go with --path=dalle")
        if any(v is not None for v in prior_flags) or _PRIOR_BEST_OF.value > 1:
            raise errors.UserError("--prior_* flags are for text -> image (--path=unclip "
                                   "with prompts); variations do not use the prior")
        return _unclip_variations(model, output, upsample, decoder)
    if _VARIATIONS_INVERT.value:
        raise errors.UserError("--variations_invert is unCLIP's: the bundle has no unCLIP "
                               "decoder (export --unclip_decoder)")
    path = _PATH.value or "dalle"
    unclip = {}
    if path == "unclip":
        unclip = dict(path="unclip", prior_steps=_PRIOR_STEPS.value,
                      prior_guidance_scale=_PRIOR_GUIDANCE.value,
                      prior_best_of=_PRIOR_BEST_OF.value, **decoder)
    elif any(v is not None for v in unclip_decoder_flags + prior_flags) \
            or _PRIOR_BEST_OF.value > 1:
        raise errors.UserError("--decoder_* and --prior_* flags need --path=unclip")
    prime_image = _PRIME_IMAGE.value or _VARIATIONS_OF.value
    prime_rows = _PRIME_ROWS.value
    if _VARIATIONS_OF.value and prime_rows is None:
        prime_rows = model.grid_size // 2
    names = outputs.prompt_names(prompts)
    count = _NUM_IMAGES.value

    def write_batch(rows, images):
        outputs.save_images(output, names, rows, images, count)

    start = time.perf_counter()
    result = model.generate(
        prompts, count, seed=_SEED.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, guidance_scale=_GUIDANCE.value, batch_size=_BATCH_SIZE.value,
        prime_image=prime_image, prime_rows=prime_rows or 0,
        candidates=_CANDIDATES.value, keep_all=_KEEP_ALL.value, progress=True, warn=warn,
        on_batch=write_batch, **upsample, **unclip)
    _finish(output, result, names, time.perf_counter() - start, len(prompts),
            written=not (result.reranked or result.low_res is not None))


def _unclip_variations(model, output, upsample, decoder):
    from dalle_jax.inference import outputs  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    result = model.unclip_variations(
        _VARIATIONS_OF.value, _NUM_IMAGES.value, seed=_SEED.value,
        from_inversion=_VARIATIONS_INVERT.value, **decoder, **upsample)
    _finish(output, result, outputs.prompt_names([""]), time.perf_counter() - start, 1,
            written=False, what=f"variations of {_VARIATIONS_OF.value}")


def _finish(output, result, names, seconds, prompt_count, *, written, what=None):
    """Writes what is not written yet (the kept images unless ``written``, low-res,
    candidates, grids, records) and prints the summary line."""
    from dalle_jax.inference import outputs  # pylint: disable=g-import-not-at-top
    count = result.images.shape[1]
    if not written:  # the kept images are known only now
        kept_rows = [(r["prompt_index"], r["index"]) for r in result.records]
        outputs.save_images(output, names, kept_rows,
                            result.images.reshape((-1,) + result.images.shape[2:]), count)
    if result.low_res is not None:
        outputs.save_low_res(output, result, names)
    if result.candidates is not None:
        outputs.save_candidates(output, result.candidates, names)
    outputs.save_grids(output, result, names, _GRID_COLS.value)
    outputs.save_records(output, result, names)
    drawn = result.images.shape[0] * (_CANDIDATES.value or count)
    t = result.timings
    parts = [f"sampling {t['sample_s']:.1f}s"] + [
        f"{label} {t[key]:.1f}s" for key, label in (
            ("prior_s", "prior"), ("decode_s", "decoding"), ("score_s", "scoring"),
            ("upsample_s", "upsampling")) if key in t]
    what = what or f"{prompt_count} prompt(s)"
    print(f"{len(result.records)} images of {what} "
          + (f"(the best of {_CANDIDATES.value} each) " if result.reranked else "")
          + f"in {seconds:.1f}s ({drawn / seconds:.2f} images drawn/s: {', '.join(parts)})"
          f" -> {output}/images, grids in {output}/grids, records in {output}/samples.jsonl")


if __name__ == "__main__":
    config_lib.run(main)
