r"""The demo: the whole main job on captioned shapes, text → image, on one CPU machine.

  make demo        # = python -m dalle_jax.tools.demo --config=configs/demo.py --workdir=runs/demo

Builds the dataset, trains the caption tokenizer, trains stage 1 (a VQ-VAE), encodes the
dataset, trains stage 2 (the transformer), trains the reranker (a contrastive text–image
model), exports the bundle, generates a grid for a few test and holdout prompts (each
image the reranker's best of 8) and evaluates it all (dalle_jax.tools.demo). Each stage
is skipped when its output is complete, so rerunning after an interruption continues.

The sizes are chosen for a 20-minute budget on a 2-core CPU (docs/experiments/demo.md):

- 32 px images: stage 1 at 64 px alone takes longer than the budget; objects are still
  6 px (small) and 13 px (large) wide, which the pixel checker reads at 100%.
- Stage 1: the VQ-VAE on the space-to-depth backbone (widths 32 / 128, two blocks each),
  which runs at three times the dVAE backbone's FLOP rate on this CPU and keeps more
  shapes; 32 px -> 8x8 codes of 512, 1,000 steps.
- Stage 2: d = 128 (4 heads of 32), 4 layers, unrolled (faster for a small model),
  over [20 caption tokens | 64 codes]; the longest caption is 15 BPE pieces, the rest
  leaves room for BPE-dropout.
- The reranker: image widths 32 / 64 / 128, 2 text layers, 128-d embeddings, the
  sigmoid loss, 450 steps at batch 128.

With ``:upsample`` (``make demo-upsample``) the demo also trains the 4× diffusion
upsampler (configs/upsampler_shapes.py: 32 px -> 128 px, its inputs' round trips through
this demo's stage 1) on the dataset rendered at 128 px, adds it to the bundle, and
generates and evaluates 128 px images; every stage of the plain demo that is done is
kept. It is a separate target because the upsampler's 15 minutes of training do not fit
the plain demo's 20.

Arguments after ':' : runlocal (a tiny dataset and a few steps per stage: for tests),
upsample.
"""
import os

from dalle_jax.config import load_config_file, parse_arg
from dalle_jax.data import presets
import ml_collections
from ml_collections import config_dict

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, upsample=False)
    config = ml_collections.ConfigDict()
    config.seed = 0
    # The dataset every stage reads; built under <workdir>/tfds unless data_dir is set.
    config.data = presets.captioned_shapes(32, arg.runlocal)

    # The caption tokenizer, trained once beside the runs (<workdir>/text_tokenizer.model).
    config.text = ml_collections.ConfigDict(dict(
        tokenizer_path=config_dict.placeholder(str), vocab_size=512, model_type="bpe",
        text_len=20, bpe_dropout=0.1))

    # Stage 1. Its data and text sections are the demo's (set by the demo tool).
    s1 = load_config_file(os.path.join(_HERE, "image_tokenizer_shapes.py") + ":kind=vqvae")
    s1.model.update(backbone="space_to_depth", widths=(32, 128), n_blk_per_group=2,
                    group_count=3, vocab_size=512)
    s1.update(total_steps=1_000, batch_size=32)
    s1.stage1.update(temperature_steps=1_000, kl_warmup_steps=100)
    s1.optimizer.update(warmup_steps=100)
    s1.train.update(log_every=100, eval_every=0, summary_every=0)
    s1.checkpoint.save_every = 500
    s1.encode.update(batch_size=500, splits=("train", "validation", "test", "holdout"))
    config.image_tokenizer = s1

    # Stage 2, trained from the code shards of stage 1.
    s2 = load_config_file(os.path.join(_HERE, "transformer_shapes.py"))
    s2.model.update(image_vocab_size=512, image_grid=(8, 8), num_layers=4, num_heads=4,
                    head_dim=32, scan_layers=False)
    s2.update(total_steps=1_000, batch_size=64)
    s2.optimizer.update(warmup_steps=100, decay_steps=(650, 850))
    s2.train.update(log_every=50, eval_every=0, summary_every=0)
    s2.checkpoint.save_every = 300
    # Guidance 2 rather than the shapes config's 3: on the test prompts this small model
    # follows colour, cell and relation better at 2 (docs/experiments/demo.md).
    s2.stage2.sample.guidance_scale = 2.0
    config.transformer = s2

    # The reranker: the contrastive model, trained on the demo's images and captions.
    sr = load_config_file(os.path.join(_HERE, "contrastive_shapes.py"))
    sr.model.update(image_widths=(32, 64, 128))  # 32 px -> a 4x4 grid of 128 features
    sr.update(total_steps=450, batch_size=128)
    sr.optimizer.update(warmup_steps=50)
    sr.train.update(log_every=100, eval_every=0, summary_every=0)
    sr.checkpoint.save_every = 300
    config.reranker = sr

    if arg.upsample:
        # The 4x upsampler. Its data is the demo's dataset rendered at 4x the size, its
        # stage-1 run the demo's (both set by the demo tool).
        su = load_config_file(os.path.join(_HERE, "upsampler_shapes.py")
                              + (":runlocal" if arg.runlocal else ""))
        config.upsampler = su
        if arg.runlocal:
            su.diffusion.sample.steps = 4
            su.train.summary_every = 0

    config.demo = ml_collections.ConfigDict(dict(
        # The grid: each prompt's images in a row. Test-split captions and, last, two
        # (colour, shape) pairs kept out of training (the holdout split).
        prompts=("a red circle in the top left", "a blue square in the center",
                 "a large yellow triangle at the bottom right", "a small white star",
                 "a cyan diamond above a red circle", "a green triangle in the center",
                 "a purple circle to the left of a blue square"),
        images_per_prompt=8,
        seed=0,
        # Evaluation: distinct captions of the test and holdout splits, images each.
        test_prompts=128,
        holdout_prompts=64,
        eval_images_per_prompt=2,
        # The grid's images are each the reranker's best of this many candidates.
        candidates=8,
        # The gain from reranking: test prompts, each with the largest number of
        # candidates drawn once per seed, the top-1 of the first n against a random one.
        rerank_prompts=48,
        rerank_candidates=(8, 32),
        rerank_seeds=2,
        reranker_examples=1000,  # validation pairs for the reranker's retrieval figures
        # With :upsample: held-out images for the upsampler's PSNR and SSIM, and test
        # prompts whose generated images are judged before and after it.
        upsampler_examples=128,
        upsample_prompts=32,
    ))

    if arg.runlocal:
        s1.update(total_steps=4, batch_size=8)
        s1.model.update(widths=(8, 16), n_blk_per_group=1, vocab_size=32, code_dim=8)
        s1.stage1.update(temperature_steps=4, kl_warmup_steps=1)
        s1.optimizer.warmup_steps = 1
        s1.train.log_every = 2
        s1.checkpoint.save_every = 2
        s1.encode.batch_size = 64
        s2.model.update(image_vocab_size=32, num_layers=2, num_heads=2, head_dim=16,
                        conv_kernel=3)
        s2.update(total_steps=4, batch_size=8)
        s2.optimizer.update(warmup_steps=1, decay_steps=())
        s2.train.log_every = 2
        s2.checkpoint.save_every = 2
        config.text.vocab_size = 128
        sr.update(total_steps=4, batch_size=8)
        sr.model.update(image_widths=(8, 8, 16), text_layers=1, text_heads=2,
                        text_head_dim=8, embed_dim=16)
        sr.contrastive.eval_batch_size = 16
        sr.optimizer.warmup_steps = 1
        sr.train.log_every = 2
        sr.checkpoint.save_every = 2
        config.demo.update(images_per_prompt=2, test_prompts=4, holdout_prompts=2,
                           eval_images_per_prompt=1, candidates=3, rerank_prompts=2,
                           rerank_candidates=(2, 3), rerank_seeds=2, reranker_examples=50,
                           upsampler_examples=8, upsample_prompts=2)
    return config
