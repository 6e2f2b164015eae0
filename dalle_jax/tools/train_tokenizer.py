r"""Trains the caption tokenizer of a run from its dataset's training captions.

  python -m dalle_jax.tools.train_tokenizer --config=configs/shapes.py --workdir=runs/shapes

Writes ``<workdir>/tokenizer.model`` (or ``config.text.tokenizer`` when set) and the
resolved config. An existing tokenizer is kept unless ``--overwrite``: a run's text
tokens mean nothing under another tokenizer.
"""
from __future__ import annotations

from absl import app, flags

from dalle_jax import config as config_lib
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data import tokenizer as tokenizer_lib

config_lib.define_flags()
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing tokenizer.")
_SPLIT = flags.DEFINE_string("split", "train", "Split whose captions train the tokenizer.")


def describe(tokenizer: tokenizer_lib.Tokenizer, captions: list[str]) -> str:
    """Token-length statistics of ``captions`` under ``tokenizer`` (no dropout)."""
    tokens, truncated = tokenizer.encode(captions)
    lengths = (tokens != tokenizer_lib.PAD_ID).sum(-1)
    return (f"{tokenizer.vocab_size} pieces; tokens per caption: mean {lengths.mean():.1f}, "
            f"max {lengths.max()} of text_len {tokenizer.text_len}; "
            f"truncated {truncated.mean():.2%}")


def main(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if workdir is None and not config.text.tokenizer:
        raise app.UsageError("--workdir is required (the tokenizer is saved beside the run)")
    path = tokenizer_lib.tokenizer_for_run(config.text, workdir)
    if path.exists() and not _OVERWRITE.value:
        raise app.UsageError(f"{path} exists; pass --overwrite to replace it")
    if workdir:
        config_lib.write_config(config, workdir)
    tokenizer = tokenizer_lib.train_for_run(config, workdir, split=_SPLIT.value,
                                           overwrite=True)
    sample = pipeline_lib.make_pipeline(
        config, _SPLIT.value, train=False, process_index=0, process_count=1).iter_captions()
    captions = [c for c, _ in zip(sample, range(2000))]
    print(f"tokenizer: {path}\n{describe(tokenizer, captions)}")
    print(f"example: {captions[0]!r} -> {tokenizer.pieces(captions[0])}")


if __name__ == "__main__":
    config_lib.run(main)
