r"""Stage 1 on 256 px photos: the paper's dVAE (32x32 codes over 8192), or a VQ-VAE.

Convert your images first (configs/input_photos.py explains how), then:

  python -m dalle_jax.tools.train --config=configs/image_tokenizer_photos.py \
      --config.data.data_dir=/data/my_photos_records --workdir=runs/dvae_photos
  python -m dalle_jax.tools.encode_dataset --config=configs/image_tokenizer_photos.py \
      --config.data.data_dir=/data/my_photos_records --workdir=runs/dvae_photos \
      --config.encode.output_dir=runs/dvae_photos/codes

OpenAI's released dVAE can stand in for a trained run: convert it
(configs/image_tokenizer_openai.py) and pass the conversion's directory as --workdir to
encode_dataset and eval_image_tokenizer.

The settings are the paper's (appendix A): released architecture (n_hid 256, 2 blocks
per group, 4 groups), temperature 1 → 1/16 over 150k updates and KL weight 0 → 6.6 over
5k (both cosine), logit-Laplace likelihood, AdamW (0.9, 0.999), eps 1e-8, decay 1e-4,
step size cosine 1e-4 → 1.25e-6 over 1.2M updates, EMA 0.999, batch 512.

Arguments after ':' : kind=dvae|vqvae, coco (tfds coco_captions), runlocal.
"""
from dalle_jax.config import parse_arg
from dalle_jax.data import presets
from dalle_jax.train.defaults import core_config
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    arg = parse_arg(arg, kind="dvae", coco=False, runlocal=False)
    config = core_config()
    config.task = "dalle_jax.stages.image_tokenizer"
    config.batch_size = 512
    config.total_steps = 1_200_000
    config.data = presets.photos(arg.coco, arg.runlocal)

    config.model = ml_collections.ConfigDict(dict(
        kind=arg.kind,
        vocab_size=8192,
        n_hid=256,
        n_blk_per_group=2,
        group_count=4,  # 256 px -> 32 x 32 codes
        n_init=128,
        code_dim=256,  # vqvae
        vq_decay=0.99,
        vq_restart_threshold=1.0,
        vq_normalize=False,
        straight_through=False,  # dvae: hard one-hot forward, relaxed gradients
        recon_loss="logit_laplace",
    ))
    config.stage1 = ml_collections.ConfigDict(dict(
        temperature_start=1.0,
        temperature_end=1.0 / 16,
        temperature_steps=150_000,
        kl_weight=6.6,
        marginal_kl_weight=0.0,
        kl_warmup_steps=5_000,
        commitment_weight=0.25,
        eval_split="validation",
    ))
    config.encode = ml_collections.ConfigDict(dict(
        output_dir=config_dict.placeholder(str),
        splits=("train", "validation"),
        batch_size=64,
        # Images per encoder pass on each device (dalle_jax.models.dvae.in_chunks); 0: all.
        # On a CPU host 1 is the fastest at 256 px (docs/experiments/stage1.md);
        # accelerators want 0.
        chunk_size=0,
    ))
    config.optimizer.update(learning_rate=1e-4, warmup_steps=0, end_learning_rate=1.25e-6,
                            b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
    config.train.update(ema_decay=0.999, compute_dtype="bfloat16", log_every=100,
                        eval_every=10_000, summary_every=5_000)
    config.checkpoint.update(save_every=5_000, keep_every=100_000)

    if arg.runlocal:
        config.batch_size = 8
        config.total_steps = 20
        config.model.update(n_hid=32, n_blk_per_group=1, vocab_size=512, n_init=32)
        config.stage1.update(temperature_steps=20, kl_warmup_steps=5)
        config.train.update(compute_dtype="float32", log_every=5, eval_every=0,
                            summary_every=0)
        config.checkpoint.update(save_every=10, keep_every=0)
    return config
