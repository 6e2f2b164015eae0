r"""The 4× diffusion upsampler for photos, 64 px → 256 px, at unCLIP's sizes (not run here).

  python -m dalle_jax.tools.train --config=configs/upsampler_photos.py \
      --workdir=gs://bucket/runs/upsampler_photos \
      --config.data.data_dir=gs://bucket/records \
      --config.upsampler.image_tokenizer_run=gs://bucket/runs/image_tokenizer_photos

Fit it on a slice first: python -m dalle_jax.tools.compile
--config=configs/upsampler_photos.py --topology=v5litepod-64.

unCLIP's 64 → 256 upsampler (Ramesh et al. 2022, appendix table): a U-Net of 320
channels at the top, multipliers 1, 2, 3, 4, three residual blocks a level and no
attention (about 700 M parameters in theirs); trained on crops a quarter of the side
(64 px), batch 1024 for 1 M steps at 1.2e-4 with an EMA of 0.9999, no dropout; Gaussian
blur of the inputs (σ 0.6); sampled with 27 DDIM steps. Here the inputs also take a
round trip through the stage-1 image tokenizer with a probability, since the upsampler
follows the stage-1 decoder; its input size is the tokenizer's (64 px: set the stage-1
run to one at 64 px, or change ``data.image_size`` and ``upsampler.factor`` together).

Arguments after ':' : runlocal (a tiny model and a few steps on 64 px images).
"""
from dalle_jax.config import parse_arg
from dalle_jax.data import presets
from dalle_jax.train.defaults import core_config
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    config = core_config()
    config.task = "dalle_jax.stages.upsampler"
    config.batch_size = 1024
    config.total_steps = 1_000_000
    config.data = presets.photos(runlocal=arg.runlocal)  # 256 px (64 px with runlocal)

    config.upsampler = ml_collections.ConfigDict(dict(
        factor=4,
        crop_size=64,
        blur_sigma=0.6,
        blur_prob=0.5,
        image_tokenizer_run=config_dict.placeholder(str),
        round_trip_prob=0.5,
        noise_aug_max=0.5,
        residual=False,  # unCLIP diffuses the image itself
        eval_split="validation",
    ))
    config.diffusion = ml_collections.ConfigDict(dict(
        schedule=dict(name="cosine", logsnr_min=-20.0, logsnr_max=20.0, shift=0.0,
                      beta_min=0.1, beta_max=20.0),
        prediction="v",
        sample=dict(steps=27, eta=0.0, noise_level=0.0, t_start=1.0),
    ))
    config.model = ml_collections.ConfigDict(dict(
        base_width=320,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_levels=(),
        head_dim=64,
        dropout=0.0,
        num_groups=32,
    ))
    config.mesh.update(data=-1, fsdp=8, tensor=1)
    config.optimizer.update(learning_rate=1.2e-4, warmup_steps=10_000, schedule="constant",
                            b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    config.train.update(ema_decay=0.9999, compute_dtype="bfloat16", remat_policy="dots",
                        log_every=100, eval_every=10_000, summary_every=10_000)
    config.checkpoint.update(save_every=5_000, keep_every=100_000)

    if arg.runlocal:
        config.batch_size = 8
        config.total_steps = 6
        config.upsampler.crop_size = 32
        config.model.update(base_width=16, channel_mult=(1, 2), num_res_blocks=1,
                            num_groups=8)
        config.mesh.update(data=-1, fsdp=1)
        config.optimizer.warmup_steps = 2
        config.train.update(compute_dtype="float32", remat_policy="none", log_every=2,
                            eval_every=0, summary_every=0)
        config.checkpoint.update(save_every=3, keep_every=0)
    return config
