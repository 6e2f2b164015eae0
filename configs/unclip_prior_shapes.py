r"""unCLIP's diffusion prior on captioned shapes: caption -> the reranker's image embedding.

  python -m dalle_jax.tools.train --config=configs/unclip_prior_shapes.py \
      --workdir=runs/unclip_prior_shapes --config.data.data_dir=runs/demo/tfds \
      --config.prior.reranker_run=runs/demo/reranker

The contrastive run (the reranker; `make demo` trains one at 32 px) is frozen: its towers
embed each batch as it is read, its tokenizer is the prior's, and its embedding size,
caption length and vocabulary fix the prior's inputs and output. The data is the demo's
(32 px captioned shapes, the reranker's image size).

The prior is unCLIP's decoder-only transformer (dalle_jax.models.prior) over
[caption tokens | text embedding | timestep | noised image embedding | query], d = 128
(4 heads of 32), 4 layers, predicting the clean embedding (x0) under a cosine schedule;
the caption is dropped for 10% of the rows (classifier-free guidance), as in unCLIP.

Budget: 5 minutes of training on a 2-core CPU: 500 steps of batch 128 at about 2 steps/s
(a fifth of a step is the reranker embedding the batch's images and captions), plus a
minute for start-up and the final evaluation. Measured on the demo's reranker, over 512
validation captions: the sampled embeddings' mean cosine with their images' is 0.882 at
guidance 1, 0.901 at 2, 0.899 at 3 and 0.895 at 4 (25 DDIM steps; 0.903 at 2 with
best_of=2), against 0.869 for the captions' own text embeddings: guidance 2 is the
default. (The evaluation's 10 steps give 0.898.)

Arguments after ':' : runlocal (a tiny prior and a few steps: for tests).
"""
from dalle_jax.config import parse_arg
from dalle_jax.data import presets
from dalle_jax.train.defaults import core_config
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    config = core_config()
    config.task = "dalle_jax.stages.unclip_prior"
    config.batch_size = 128
    config.total_steps = 500
    config.data = presets.captioned_shapes(32, arg.runlocal)  # the reranker's image size

    config.prior = ml_collections.ConfigDict(dict(
        # The contrastive run (configs/contrastive_shapes.py, or the demo's runs/demo/reranker)
        # whose image embeddings the prior learns; required.
        reranker_run=config_dict.placeholder(str),
        text_drop_prob=0.1,  # unCLIP's: rows trained unconditionally, for guidance
        eval_split="validation",
        # Evaluation batches also sample their embeddings in this many DDIM steps and
        # report the samples' cosines (0: no sampling).
        eval_sample_steps=10,
    ))
    config.diffusion = ml_collections.ConfigDict(dict(
        schedule=dict(name="cosine", logsnr_min=-20.0, logsnr_max=20.0, shift=0.0,
                      beta_min=0.1, beta_max=20.0),
        prediction="x0",  # eps | x0 | v; unCLIP's prior predicts the embedding itself
        # Sampling's defaults (dalle_jax.inference.prior) and the evaluation's guidance.
        sample=dict(steps=25, eta=0.0, guidance_scale=2.0),
    ))
    config.model = ml_collections.ConfigDict(dict(
        num_layers=4,
        num_heads=4,
        head_dim=32,  # d = num_heads * head_dim
        mlp_ratio=4,
    ))
    config.optimizer.update(learning_rate=1e-3, warmup_steps=50, end_learning_rate=1e-5,
                            weight_decay=1e-4)
    config.train.update(ema_decay=0.99, log_every=50, eval_every=0)
    config.checkpoint.save_every = 250

    if arg.runlocal:
        config.total_steps = 4
        config.batch_size = 8
        config.prior.eval_sample_steps = 2
        config.diffusion.sample.steps = 4
        config.model.update(num_layers=1, num_heads=2, head_dim=8)
        config.optimizer.warmup_steps = 1
        config.train.update(log_every=2, ema_decay=0.5)
        config.checkpoint.save_every = 2
    return config
