r"""Converts OpenAI's released dVAE pickles into an orbax checkpoint of this project.

  python -m dalle_jax.tools.convert_openai_dvae --config=configs/image_tokenizer_openai.py \
      --config.encoder_pkl=encoder.pkl --config.decoder_pkl=decoder.pkl \
      --config.output_dir=runs/openai_dvae

The pickles are read with an allow-list of the dall_e/torch classes they consist of
(anything else is refused), renamed and transposed onto
:mod:`dalle_jax.models.dvae`, shape-checked against ``config.model``, saved, and (with
``config.verify``) compared with the pickled modules on random inputs.
"""
from __future__ import annotations

import time

from absl import flags
import jax

from dalle_jax import config as config_lib
from dalle_jax.models import openai_dvae

config_lib.define_flags()


def main(argv):
    del argv
    # The pickles, output_dir and overwrite are checked before main (dalle_jax.validate).
    config = flags.FLAGS.config
    start = time.perf_counter()
    params = openai_dvae.convert(config.encoder_pkl, config.decoder_pkl, config.output_dir,
                                 config.model, overwrite=config.overwrite)
    for name, tree in params.items():
        count = sum(value.size for value in jax.tree.leaves(tree))
        print(f"{name}: {count:,} parameters")
    print(f"wrote {config.output_dir} ({time.perf_counter() - start:.1f}s)")
    if config.verify:
        diffs = openai_dvae.compare_with_released(
            config.encoder_pkl, config.decoder_pkl, config.output_dir,
            image_size=config.verify_image_size)
        print("max abs difference to the pickled modules (fp32, CPU): "
              + ", ".join(f"{name} {diff:.2e}" for name, diff in diffs.items()))
        worst = max(diffs.values())
        if worst > config.verify_tolerance:
            raise SystemExit(f"error: converted outputs differ by {worst:.2e} > "
                             f"{config.verify_tolerance:.0e}")


if __name__ == "__main__":
    config_lib.run(main)
