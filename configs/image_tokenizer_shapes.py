r"""Stage 1 on captioned shapes: a dVAE (default) or VQ-VAE turning 64 px into 8x8 codes.

  python -m dalle_jax.tools.train --config=configs/image_tokenizer_shapes.py --workdir=runs/dvae_shapes
  python -m dalle_jax.tools.train --config=configs/image_tokenizer_shapes.py:kind=vqvae \
      --workdir=runs/vqvae_shapes

Then measure it on the validation split, and encode the dataset for stage 2:

  python -m dalle_jax.tools.eval_image_tokenizer --config=configs/image_tokenizer_shapes.py \
      --workdir=runs/dvae_shapes
  python -m dalle_jax.tools.encode_dataset --config=configs/image_tokenizer_shapes.py \
      --workdir=runs/dvae_shapes --config.encode.output_dir=runs/dvae_shapes/codes

Arguments after ':' : kind=dvae|vqvae, objective=mse|paper (dVAE only), runlocal (a few
steps on a small dataset).

The dVAE's default objective on this data (`objective=mse`) keeps the paper's gumbel-softmax
relaxation, temperature schedule and KL to the uniform prior, but reconstructs with MSE
instead of the logit-Laplace likelihood, at twice the learning rate over 6,000 steps. It
reaches the 30 dB bar; the paper's objective (`objective=paper`) does not in a run this
short (docs/experiments/stage1.md, "Stage 1: quality on captioned shapes").
"""
from dalle_jax.config import parse_arg
from dalle_jax.data import presets
from dalle_jax.train.defaults import core_config
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    arg = parse_arg(arg, kind="dvae", objective="mse", runlocal=False)
    if arg.objective not in ("mse", "paper"):
        raise ValueError(f"objective must be mse or paper, got {arg.objective!r}")
    tuned_dvae = arg.kind == "dvae" and arg.objective == "mse"
    config = core_config()
    config.task = "dalle_jax.stages.image_tokenizer"
    config.batch_size = 32
    config.total_steps = 6_000 if tuned_dvae else 3_000
    config.data = presets.captioned_shapes(64, arg.runlocal)

    config.model = ml_collections.ConfigDict(dict(
        kind=arg.kind,
        vocab_size=512,
        n_hid=32,
        n_blk_per_group=1,
        group_count=4,  # 3 poolings: 64 px -> 8 x 8 codes
        n_init=32,
        code_dim=32,  # vqvae
        # vqvae: "dvae" (the dVAE's encoder and decoder) or "space_to_depth" (halvings by
        # space-to-depth, one width per halving: dalle_jax.models.space_to_depth).
        backbone="dvae",
        widths=(),
        vq_decay=0.99,
        vq_restart_threshold=1.0,
        vq_normalize=False,
        straight_through=False,  # dvae: hard one-hot forward, relaxed gradients
        recon_loss="logit_laplace" if arg.kind == "dvae" and arg.objective == "paper" else "mse",
    ))
    # The paper's schedules, scaled to the run: temperature 1 -> 1/16 (cosine) and
    # KL weight 0 -> kl_weight (cosine; the paper's 6.6, or 0.002 for the MSE objective
    # below), over fractions of the run instead of 150k / 5k steps.
    config.stage1 = ml_collections.ConfigDict(dict(
        temperature_start=1.0,
        temperature_end=1.0 / 16,
        temperature_steps=config.total_steps,
        kl_weight=6.6,
        kl_warmup_steps=config.total_steps // 10,
        # Not in the paper: the KL of the batch's mean code distribution to uniform,
        # per grid position. Without it a short run's codes collapse onto one
        # (docs/experiments/stage1.md); 0 turns it off.
        marginal_kl_weight=50.0,
        commitment_weight=0.25,
        eval_split="validation",
    ))
    # Encoding a dataset into code shards (dalle_jax.tools.encode_dataset).
    config.encode = ml_collections.ConfigDict(dict(
        output_dir=config_dict.placeholder(str),
        splits=("train", "validation", "test", "holdout"),
        batch_size=256,
        # Images per encoder pass on each device (dalle_jax.models.dvae.in_chunks); 0: all.
        chunk_size=0,
    ))
    config.optimizer.update(learning_rate=1e-3, warmup_steps=100, end_learning_rate=2e-5,
                            b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
    if tuned_dvae:
        # MSE on [0, 1] pixels is 2σ² times a Gaussian negative log-likelihood (plus a
        # constant), and 1/(2σ²) is about 500 for σ = 8/255; so both KL weights are
        # divided by 500 to keep their proportion to the reconstruction term
        # (β 1 -> 0.002, 50 -> 0.1).
        # β itself matters little here (0 and 0.002 end within 0.1 dB); a peak
        # learning rate of 3e-3 collapses to the mean image.
        config.stage1.update(kl_weight=0.002, marginal_kl_weight=0.1)
        config.optimizer.learning_rate = 2e-3
    config.train.update(ema_decay=0.99, log_every=100, eval_every=1_000, summary_every=500)
    config.checkpoint.save_every = 500

    if arg.runlocal:
        config.total_steps = 20
        config.stage1.temperature_steps = 20
        config.stage1.kl_warmup_steps = 5
        config.optimizer.warmup_steps = 5
        config.train.update(log_every=5, eval_every=0, summary_every=10)
        config.checkpoint.save_every = 10
        config.encode.batch_size = 64
    return config
