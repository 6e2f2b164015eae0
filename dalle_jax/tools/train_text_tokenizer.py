r"""Trains the text tokenizer of a run from its dataset's training captions.

  python -m dalle_jax.tools.train_text_tokenizer --config=configs/input_shapes.py \
      --workdir=runs/shapes

Writes ``<workdir>/text_tokenizer.model`` (or ``config.text.tokenizer_path`` when set)
and the resolved config. An existing tokenizer is kept unless ``--overwrite``: a run's
text tokens mean nothing under another tokenizer.
"""
from __future__ import annotations

import contextlib
import itertools

from absl import flags

from dalle_jax import config as config_lib
from dalle_jax.data import sources
from dalle_jax.data import text_tokenizer

config_lib.define_flags()
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing text tokenizer.")
_SPLIT = flags.DEFINE_string("split", "train",
                             "Split whose captions train the text tokenizer.")


def describe(tokenizer: text_tokenizer.TextTokenizer, captions: list[str]) -> str:
    """Token-length statistics of ``captions`` under ``tokenizer`` (no dropout)."""
    tokens, truncated = tokenizer.encode(captions)
    lengths = (tokens != text_tokenizer.PAD_ID).sum(-1)
    return (f"{tokenizer.vocab_size} pieces; tokens per caption: mean {lengths.mean():.1f}, "
            f"max {lengths.max()} of text_len {tokenizer.text_len}; "
            f"truncated {truncated.mean():.2%}")


def main(argv):
    del argv
    # --workdir (or config.text.tokenizer_path), --split and --overwrite are checked
    # before main (dalle_jax.validate).
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    path = text_tokenizer.text_tokenizer_path(config.text, workdir)
    source = sources.make_source(config.data, _SPLIT.value)
    with contextlib.closing(sources.iter_captions(source)) as captions:
        tokenizer = text_tokenizer.train_or_load_text_tokenizer(
            config.text, workdir, captions, overwrite=True)
    if workdir:
        config_lib.write_config(config, workdir)
    with contextlib.closing(sources.iter_captions(source)) as captions:
        sample = list(itertools.islice(captions, 2000))
    print(f"text tokenizer: {path}\n{describe(tokenizer, sample)}")
    print(f"example: {sample[0]!r} -> {tokenizer.pieces(sample[0])}")


if __name__ == "__main__":
    config_lib.run(main)
