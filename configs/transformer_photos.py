r"""Stage 2 on 256 px photos: the paper's 12B transformer over [256 caption tokens | 32x32 codes].

Convert the photos (configs/input_photos.py), train stage 1 on them and encode them
(configs/image_tokenizer_photos.py), then:

  python -m dalle_jax.tools.train --config=configs/transformer_photos.py \
      --workdir=runs/transformer_photos \
      --config.data.data_dir=runs/dvae_photos/codes \
      --config.stage2.image_tokenizer=runs/dvae_photos

Without code shards, the frozen stage-1 run encodes the converted photos on the fly:
``--config.data.source=records --config.data.data_dir=/data/my_photos_records``.

The settings are the paper's (section 2.2 and appendix B): captions of at most 256 BPE
tokens over 16384 (10% BPE dropout), 32x32 image codes over 8192; 64 layers of 62 heads
x 64 (d = 3968), the row / column / convolutional (11x11) attention schedule; loss
weights 1/8 text, 7/8 image; AdamW (0.9, 0.96), eps 1e-8, weight decay 4.5e-2, gradient
clipping at norm 4; a linear warm-up to 4.5e-4 over 5000 updates, then five halvings
(the paper halved at plateaus of the training loss; here at fixed steps); batch 1024,
430k updates. Caption dropout and guided summaries are this project's additions for
classifier-free guidance.

The model builds abstractly and shards anywhere. The mesh below splits every parameter,
moment and EMA over the whole slice (fsdp) and each layer's heads and MLP over pairs of
chips (tensor 2: the 62 heads split in two, not in four); with full rematerialisation
the step fits a v5e-256 slice (16 GiB per chip). Check a slice before using it, on any
machine:

  python -m dalle_jax.tools.compile --config=configs/transformer_photos.py \
      --topology=v5litepod-256 [--search]

Arguments after ':' (comma-separated): coco (tfds coco_captions), runlocal (64 px
photos, 8x8 codes over 512 as configs/image_tokenizer_photos.py:runlocal makes them, a
4-layer model, a few steps).
"""
from dalle_jax.config import parse_arg
from dalle_jax.data import presets
from dalle_jax.train.defaults import core_config
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    arg = parse_arg(arg, coco=False, runlocal=False)
    config = core_config()
    config.task = "dalle_jax.stages.transformer"
    config.batch_size = 1024
    config.total_steps = 430_000

    config.data = presets.photos(arg.coco, arg.runlocal)
    config.data.source = "codes"  # the encoding job's shards; or any image source
    config.data.data_dir = config_dict.placeholder(str)  # the code shards directory

    config.text = ml_collections.ConfigDict(dict(
        tokenizer_path=config_dict.placeholder(str),  # None: <workdir>/text_tokenizer.model
        vocab_size=16_384,
        model_type="bpe",
        text_len=256,
        bpe_dropout=0.1,  # training only
    ))

    config.model = ml_collections.ConfigDict(dict(
        image_vocab_size=8192,
        image_grid=(32, 32),
        num_layers=64,
        num_heads=62,
        head_dim=64,
        mlp_ratio=4,
        attention="dalle",  # row, column, row, row, ... and a convolutional last layer
        conv_kernel=11,
        # The paper's "wraparound behavior (similar to the row attention)": the kernel's
        # cells are fixed raster offsets. "wrap_columns" wraps around the grid's columns.
        conv_mask="raster",
        scan_layers=True,  # one compiled layer body for all 64
    ))

    config.stage2 = ml_collections.ConfigDict(dict(
        text_loss_weight=1 / 8,
        image_loss_weight=7 / 8,
        caption_dropout=0.1,  # empty caption, for classifier-free guidance
        eval_split="validation",
        image_tokenizer=config_dict.placeholder(str),  # stage-1 run (summaries, on the fly)
        summary_prompts=4,
        summary_samples=4,
        sample=ml_collections.ConfigDict(dict(
            temperature=1.0, top_k=0, top_p=1.0, guidance_scale=3.0)),
    ))

    config.optimizer.update(
        learning_rate=4.5e-4, warmup_steps=5_000, schedule="step",
        # Five halvings, ending 32 times below the peak as the paper's did.
        decay_steps=(200_000, 250_000, 300_000, 350_000, 400_000), decay_factor=0.5,
        b1=0.9, b2=0.96, eps=1e-8, weight_decay=4.5e-2, grad_clip_norm=4.0,
        no_decay=(r"(^|/)bias(/|$)", r"(^|/)scale(/|$)", r"embedding"))
    config.train.update(ema_decay=0.99, compute_dtype="bfloat16",
                        remat_policy="full", log_every=100, eval_every=10_000,
                        summary_every=10_000)
    config.checkpoint.update(save_every=1_000, keep_every=50_000)
    config.mesh.update(data=1, fsdp=-1, tensor=2)

    if arg.runlocal:
        config.batch_size = 8
        config.total_steps = 20
        config.text.text_len = 64
        config.model.update(image_grid=(8, 8), image_vocab_size=512, num_layers=4,
                            num_heads=4, head_dim=32, conv_kernel=5)
        config.optimizer.update(warmup_steps=5, decay_steps=(10, 15))
        config.train.update(compute_dtype="float32", remat_policy="none", log_every=5,
                            eval_every=0, summary_every=0)
        config.checkpoint.update(save_every=10, keep_every=0)
        config.mesh.update(data=-1, fsdp=1, tensor=1)
    return config
