r"""unCLIP's diffusion prior for photos, on the photos contrastive model (not run here).

  python -m dalle_jax.tools.train --config=configs/unclip_prior_photos.py \
      --workdir=gs://bucket/runs/unclip_prior_photos \
      --config.data.data_dir=gs://bucket/records \
      --config.prior.reranker_run=gs://bucket/runs/contrastive_photos

Fit it on a slice first (the contrastive run's config fixes the prior's sizes):

  python -m dalle_jax.tools.compile --config=configs/unclip_prior_photos.py \
      --topology=v5litepod-64 --config.prior.reranker_run=gs://bucket/runs/contrastive_photos

The prior of unCLIP (Ramesh et al. 2022): a decoder-only transformer under a causal mask
over [caption tokens | text embedding | timestep | noised image embedding | query],
predicting the clean image embedding (x0), the caption dropped for 10% of the rows for
classifier-free guidance, and the better of two samples kept at generation
(``Prior.sample(..., best_of=2)``). unCLIP's prior is about a billion parameters for a
CLIP of 768 / 1024-d embeddings; the contrastive model here (configs/contrastive_photos.py)
embeds in 512-d with a 6-layer, 512-wide text tower, so the prior is scaled down to
d = 1024 (16 heads of 64) and 24 layers, 323 M parameters, over the 64 caption
tokens of that model's tokenizer. Trained like the other large stages here: bf16
compute, rematerialised layers, batch 4096, AdamW with a long warm-up and an EMA of
0.9999; sampled with 64 DDIM steps.

Arguments after ':' : runlocal (a tiny prior and a few steps on 64 px images, for a
contrastive run of configs/contrastive_photos.py:runlocal).
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
    config.batch_size = 4096
    config.total_steps = 600_000
    config.data = presets.photos(runlocal=arg.runlocal)  # 256 px (64 px with runlocal)

    config.prior = ml_collections.ConfigDict(dict(
        reranker_run=config_dict.placeholder(str),  # configs/contrastive_photos.py's run
        text_drop_prob=0.1,
        eval_split="validation",
        eval_sample_steps=16,
    ))
    config.diffusion = ml_collections.ConfigDict(dict(
        schedule=dict(name="cosine", logsnr_min=-20.0, logsnr_max=20.0, shift=0.0,
                      beta_min=0.1, beta_max=20.0),
        prediction="x0",
        sample=dict(steps=64, eta=0.0, guidance_scale=2.0),
    ))
    config.model = ml_collections.ConfigDict(dict(
        num_layers=24,
        num_heads=16,
        head_dim=64,
        mlp_ratio=4,
    ))
    config.mesh.update(data=-1, fsdp=8, tensor=1)
    config.optimizer.update(learning_rate=1.1e-4, warmup_steps=10_000, end_learning_rate=0.0,
                            b1=0.9, b2=0.96, eps=1e-10, weight_decay=6e-2)
    config.train.update(ema_decay=0.9999, compute_dtype="bfloat16", remat_policy="dots",
                        log_every=100, eval_every=10_000)
    config.checkpoint.update(save_every=5_000, keep_every=100_000)

    if arg.runlocal:
        config.batch_size = 16
        config.total_steps = 6
        config.prior.eval_sample_steps = 2
        config.diffusion.sample.steps = 4
        config.model.update(num_layers=1, num_heads=2, head_dim=8)
        config.mesh.update(data=-1, fsdp=1)
        config.optimizer.warmup_steps = 2
        config.train.update(compute_dtype="float32", remat_policy="none", log_every=2,
                            eval_every=0)
        config.checkpoint.update(save_every=3, keep_every=0)
    return config
