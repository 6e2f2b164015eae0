r"""unCLIP's decoder on captioned shapes: 32 px images drawn from their contrastive
image embedding (DALL·E 2's variations; dalle_jax.stages.unclip_decoder).

  python -m dalle_jax.tools.train --config=configs/unclip_decoder_shapes.py \
      --workdir=runs/unclip_decoder --config.decoder.reranker_run=runs/demo/reranker
  python -m dalle_jax.tools.generate --workdir=runs/demo/bundle \
      --variations_of=image.png --num_images=8 --out=runs/variations

The embedding is the frozen image tower of the contrastive run named by
``decoder.reranker_run`` (the demo's reranker: 128-d, 32 px). The U-Net has widths
32 / 64 / 64 at 32 / 16 / 8 px, one residual block per level, attention at 8 px,
where 4 context tokens projected from the embedding are attended to; the embedding is
also added to the time embedding. It is dropped (zeroed) in 10% of the rows, unCLIP's
rate, for classifier-free guidance.

Budget: at most 20 minutes on the 2-core CPU host: 850 steps of batch 32 at 0.8
steps/s, 18 minutes with start-up and the final evaluation (measured; 1.3 M parameters;
docs/experiments/unclip.md).

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
    config.task = "dalle_jax.stages.unclip_decoder"
    config.batch_size = 32
    config.total_steps = 850
    config.data = presets.captioned_shapes(32, arg.runlocal)

    config.decoder = ml_collections.ConfigDict(dict(
        # The contrastive run whose image tower embeds the images (frozen).
        reranker_run=config_dict.placeholder(str),
        embedding_drop_prob=0.1,  # rows trained unconditionally, for guidance (unCLIP)
        context_tokens=4,  # tokens projected from the embedding, read by attention
        eval_split="validation",
    ))
    config.diffusion = ml_collections.ConfigDict(dict(
        # cosine: log-SNR from logsnr_max at t = 0 to logsnr_min at t = 1, plus shift
        # (2 log(64 / resolution) shifts a 64 px schedule to another resolution).
        schedule=dict(name="cosine", logsnr_min=-20.0, logsnr_max=20.0, shift=0.0,
                      beta_min=0.1, beta_max=20.0),
        prediction="v",  # eps | x0 | v
        # Generation's defaults (dalle_jax.tools.generate --variations_of, --path=unclip).
        # Guidance 5: on 32 held-out images (4 variations each, eta 1), colour + cell
        # kept 58% at 1, 74% at 2, 75% at 3, 82% at 5 (docs/experiments/unclip.md).
        sample=dict(steps=25, eta=1.0, guidance_scale=5.0),
    ))
    config.model = ml_collections.ConfigDict(dict(
        base_width=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(2,),
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
        config.model.update(base_width=8, head_dim=8)
        config.optimizer.warmup_steps = 2
        config.train.update(log_every=2, summary_every=6)
        config.checkpoint.save_every = 3
    return config
