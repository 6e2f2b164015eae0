r"""The 4× diffusion upsampler on captioned shapes: the demo's 32 px → 128 px.

  python -m dalle_jax.tools.train --config=configs/upsampler_shapes.py \
      --workdir=runs/upsampler_shapes \
      --config.upsampler.image_tokenizer_run=runs/demo/image_tokenizer

(`make demo-upsample` runs it inside the demo's workdir, after `make demo`, and adds it to
the demo's bundle.) The stage-1 run is the one whose decodings the upsampler will be given:
half of the training inputs take a round trip through it. Without one, set
`--config.upsampler.round_trip_prob=0`.

Budget: 15 minutes of training on a 2-core CPU (docs/experiments/upsampler.md). The
U-Net is small (widths 16 / 32 / 32, one residual block per level, no attention: the
upsampler trains on crops and runs on whole images, and attention would see another
number of positions at each) and trains on 32 px crops of the 128 px images, a quarter
of the side as in unCLIP, 32 crops a batch: 1,600 steps at 2.3 steps/s here. Widths
32 / 64 / 64 at batch 64 ran at 0.37 steps/s, 330 steps in the budget.

Arguments after ':' : runlocal (a few steps on a small dataset: for tests).
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
    config.batch_size = 32
    config.total_steps = 1_600
    # The high-resolution images; the inputs are made from them (factor below).
    config.data = presets.captioned_shapes(128, arg.runlocal)

    config.upsampler = ml_collections.ConfigDict(dict(
        factor=4,
        crop_size=32,  # high-resolution pixels; 0: whole images
        blur_sigma=0.6,  # unCLIP's 64 -> 256 upsampler
        blur_prob=0.5,
        # The stage-1 run whose round trip (encode, decode) a share of the inputs take.
        image_tokenizer_run=config_dict.placeholder(str),
        round_trip_prob=0.5,
        # Noise-conditioning augmentation: each input noised to t ~ U(0, noise_aug_max)
        # of the schedule below, the level given to the model.
        noise_aug_max=0.5,
        # Diffuse the residual over bicubic rather than the image (dalle_jax.stages.upsampler).
        residual=True,
        eval_split="validation",
    ))
    config.diffusion = ml_collections.ConfigDict(dict(
        # cosine: log-SNR from logsnr_max at t = 0 to logsnr_min at t = 1, plus shift
        # (2 log(64 / resolution) shifts a 64 px schedule to another resolution;
        # 0 here: the low-resolution input already fixes the coarse structure).
        schedule=dict(name="cosine", logsnr_min=-20.0, logsnr_max=20.0, shift=0.0,
                      beta_min=0.1, beta_max=20.0),
        prediction="v",  # eps | x0 | v
        # Generation's defaults (dalle_jax.tools.generate --upsample).
        sample=dict(steps=25, eta=0.0, noise_level=0.0, t_start=1.0),
    ))
    config.model = ml_collections.ConfigDict(dict(
        base_width=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(),
        head_dim=32,
        dropout=0.0,
        num_groups=8,
    ))
    config.optimizer.update(learning_rate=1e-3, warmup_steps=100, end_learning_rate=1e-5,
                            b1=0.9, b2=0.99, weight_decay=0.0, grad_clip_norm=1.0)
    config.train.update(ema_decay=0.995, log_every=100, eval_every=0, summary_every=0)
    config.checkpoint.save_every = 500

    if arg.runlocal:
        config.total_steps = 6
        config.batch_size = 8
        config.optimizer.warmup_steps = 2
        config.train.update(log_every=2, summary_every=6)
        config.checkpoint.save_every = 3
    return config
