r"""dVAE encoder benchmark: this project's encoder (jitted) against OpenAI's dall_e (PyTorch).

  python -m dalle_jax.tools.bench dvae --config=configs/bench_dvae.py

Smoke size (a tiny encoder at 32 px, one timed round; seconds):

  python -m dalle_jax.tools.bench dvae --config=configs/bench_dvae.py:runlocal

The released architecture (256 px → 32×32 codes over 8192), random weights shared by
both sides, fp32, batch 8. dall_e needs torch and dall_e, which ``make venv`` installs
(or: pip install "torch>=2.4" requests attrs && pip install --no-deps dall-e==0.1);
without them the JAX side is recorded alone. On a GPU machine
``--config.torch_device=cuda`` runs dall_e there too.
"""
from dalle_jax.config import parse_arg
import ml_collections


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    config = ml_collections.ConfigDict()
    # The released architecture (configs/image_tokenizer_openai.py converts its weights).
    config.model = ml_collections.ConfigDict(dict(
        image_size=256, vocab_size=8192, n_hid=256, n_blk_per_group=2))
    config.batch_size = 8
    config.warmup = 2
    config.repeats = 5  # medians over these
    # Also time the batch as lax.map over chunks of this many images, as the encoding
    # job runs it (config.encode.chunk_size; 1 is the fastest on a CPU); 0: don't.
    config.chunk_size = 1
    config.threads = 0  # torch intra-op threads; 0: every core
    config.torch_device = "cpu"  # or "cuda" on a GPU machine
    config.seed = 0
    config.targets = ml_collections.ConfigDict(dict(
        # images/s of the program the encoding job runs (chunked when chunk_size > 0)
        # over dall_e's, at least
        min_speedup=1.5,
    ))
    config.known_gap = (
        "dall_e's own batch time moves by ~10% between runs on the reference CPU, as much "
        "as the margin over 1.5×; the slowest parts left are the 7×7 input convolution "
        "from 3 channels, the 3×3 convolutions at 32×32 and the element-wise passes "
        "(docs/experiments/stage1.md).")
    config.runlocal = arg.runlocal  # recorded: a smoke run's figures are not results
    if arg.runlocal:
        # dall_e's smallest sizes (n_hid ≥ 64, vocabulary ≥ 512).
        config.model.update(image_size=32, vocab_size=512, n_hid=64, n_blk_per_group=1)
        config.batch_size = 2
        config.warmup = 0
        config.repeats = 1
    return config
