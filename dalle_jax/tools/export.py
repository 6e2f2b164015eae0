r"""Exports a trained stage-2 run as an inference bundle (parameters only).

  python -m dalle_jax.tools.export --workdir=runs/transformer_shapes --output=runs/bundle
  python -m dalle_jax.tools.export --workdir=... --output=... --dtype=bfloat16
  python -m dalle_jax.tools.export --workdir=... --output=... \
      --reranker=runs/contrastive_shapes       # generate can then keep the best candidates
  python -m dalle_jax.tools.export --workdir=... --output=... \
      --upsampler=runs/upsampler_shapes        # generate --upsample: 4x images
  python -m dalle_jax.tools.export --workdir=... --output=... --reranker=runs/demo/reranker \
      --unclip_decoder=runs/unclip_decoder --unclip_prior=runs/unclip_prior  # unCLIP

The bundle holds the transformer's parameters (its EMA when the run kept one), the
stage-1 encoder and decoder the run's codes came from (``config.stage2.image_tokenizer``,
or ``--image_tokenizer``: a stage-1 run or a conversion of OpenAI's dVAE), the caption
tokenizer, both configs and a manifest of checksums (:mod:`dalle_jax.inference.bundle`);
with ``--reranker``, also a trained contrastive model (dalle_jax.stages.contrastive);
with ``--upsampler``, a trained diffusion upsampler (dalle_jax.stages.upsampler); with
``--unclip_decoder`` and ``--unclip_prior``, unCLIP's decoder and prior
(dalle_jax.stages.unclip_*), which need the reranker they were trained on.
Load it with ``dalle_jax.inference.TextToImage.load(<output>)`` or
``python -m dalle_jax.tools.generate --bundle=<output>``.
"""
from __future__ import annotations

import time

from absl import flags

from dalle_jax import config as config_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "The stage-2 run to export.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The bundle directory to write.", required=True)
_IMAGE_TOKENIZER = flags.DEFINE_string(
    "image_tokenizer", None, "The stage-1 run (or converted OpenAI dVAE) of the run's "
    "codes; default: the run's config.stage2.image_tokenizer.")
_RERANKER = flags.DEFINE_string(
    "reranker", None, "A run of the contrastive model (configs/contrastive_*.py) at the "
    "bundle's image size, to rerank candidates in generation.")
_UPSAMPLER = flags.DEFINE_string(
    "upsampler", None, "A run of the diffusion upsampler (configs/upsampler_*.py) whose "
    "input is the bundle's image size, for generate --upsample.")
_UNCLIP_DECODER = flags.DEFINE_string(
    "unclip_decoder", None, "A run of unCLIP's decoder (configs/unclip_decoder_*.py) "
    "trained on the --reranker's embeddings, for generate --variations_of and --path=unclip.")
_UNCLIP_PRIOR = flags.DEFINE_string(
    "unclip_prior", None, "A run of unCLIP's prior (configs/unclip_prior_*.py) trained on "
    "the --reranker's embeddings, for generate --path=unclip (with --unclip_decoder).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Type of the transformer's floating-point parameters.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing bundle.")
config_lib.define_debug_flag()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main(argv):
    del argv
    from dalle_jax.inference import bundle  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    report = bundle.export(_WORKDIR.value, _OUTPUT.value,
                           image_tokenizer=_IMAGE_TOKENIZER.value,
                           reranker=_RERANKER.value, upsampler=_UPSAMPLER.value,
                           unclip_decoder=_UNCLIP_DECODER.value,
                           unclip_prior=_UNCLIP_PRIOR.value, dtype=_DTYPE.value, step=_STEP.value, overwrite=_OVERWRITE.value, log=print)
    parts = ", ".join(f"{name} {_mb(n)}" for name, n in report.part_bytes.items())
    print(f"wrote {report.path}: transformer step {report.transformer_step} "
          f"({'EMA' if report.ema else 'raw'} parameters, {_DTYPE.value}) in "
          f"{time.perf_counter() - start:.1f}s")
    print(f"bundle {_mb(report.bundle_bytes)} ({parts})")
    if report.checkpoint_bytes:
        optional = [p.replace("_", " ") for p in ("reranker", *bundle.MODEL_PARTS)
                    if p in report.part_bytes]
        which = ("the bundle without its " + ", ".join(optional) if optional
                 else "the bundle")
        print(f"training checkpoint of step {report.transformer_step}: "
              f"{_mb(report.checkpoint_bytes)}; {which} is "
              f"{report.generation_bytes / report.checkpoint_bytes:.2f}x its size")


if __name__ == "__main__":
    config_lib.run(main)
