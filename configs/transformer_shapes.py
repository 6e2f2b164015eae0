r"""Stage 2 on captioned shapes: the DALL·E transformer over [32 caption tokens | 8x8 codes].

Train a stage-1 tokenizer and encode the dataset first (configs/image_tokenizer_shapes.py),
then:

  python -m dalle_jax.tools.train --config=configs/transformer_shapes.py \
      --workdir=runs/transformer_shapes \
      --config.data.data_dir=runs/dvae_shapes/codes \
      --config.stage2.image_tokenizer=runs/dvae_shapes

Without code shards, images can be encoded on the fly by the frozen stage-1 run:
``--config.data.source=captioned_shapes --config.stage2.image_tokenizer=runs/dvae_shapes``.

Arguments after ':' (comma-separated):
  size=demo   4 layers, d = 256 (the default)
  size=bench  the benchmark model: d = 512, 8 layers, 64 text + 16x16 image tokens
  runlocal    a few steps

The paper's 12B model is configs/transformer_photos.py.
"""
from dalle_jax.config import parse_arg
from dalle_jax.data import presets
from dalle_jax.train.defaults import core_config
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    arg = parse_arg(arg, size="demo", runlocal=False)
    config = core_config()
    config.task = "dalle_jax.stages.transformer"
    config.batch_size = 64
    config.total_steps = 5_000

    config.data = presets.captioned_shapes(64, arg.runlocal)
    config.data.source = "codes"  # the encoding job's shards; or any image source
    config.data.data_dir = config_dict.placeholder(str)  # the code shards directory

    config.text = ml_collections.ConfigDict(dict(
        tokenizer_path=config_dict.placeholder(str),  # None: <workdir>/text_tokenizer.model
        vocab_size=512,  # upper bound of the tokenizer's pieces = the text vocabulary
        model_type="bpe",
        text_len=32,
        bpe_dropout=0.1,  # the paper's 10%, training only
    ))

    config.model = ml_collections.ConfigDict(dict(
        image_vocab_size=512,
        image_grid=(8, 8),
        num_layers=4,
        num_heads=4,
        head_dim=64,
        mlp_ratio=4,
        # "dalle": row, column, row, row, ... and a convolutional last layer; or "dense",
        # one kind for all layers, or a list of kinds per layer.
        attention="dalle",
        conv_kernel=5,  # the paper's 11 is wider than an 8x8 grid
        # "raster": the kernel's cells are fixed raster offsets, wrapping around row ends
        # like the row mask (the paper's reading); "wrap_columns": around the grid's
        # columns (models trained before "raster" existed).
        conv_mask="raster",
        # nn.scan over the layers (compile time independent of depth); False unrolls
        # them, which trains small models faster (docs/experiments/stage2.md) but
        # compiles per layer.
        scan_layers=True,
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

    # The paper's optimizer: AdamW (0.9, 0.96), eps 1e-8, decay 4.5e-2, clip 4, linear
    # warm-up then halvings at plateaus (here at fixed steps); EMA 0.99. A small model
    # takes a higher peak rate than the paper's 4.5e-4.
    config.optimizer.update(
        learning_rate=1e-3, warmup_steps=200, schedule="step",
        decay_steps=(2_500, 3_500, 4_500), decay_factor=0.5, b1=0.9, b2=0.96, eps=1e-8,
        weight_decay=4.5e-2, grad_clip_norm=4.0,
        no_decay=(r"(^|/)bias(/|$)", r"(^|/)scale(/|$)", r"embedding"))
    config.train.update(ema_decay=0.99, log_every=100, eval_every=1_000, summary_every=1_000)
    config.checkpoint.save_every = 1_000

    if arg.size == "bench":
        config.text.text_len = 64
        # Unrolled layers: 8 compile quickly, and the step is faster than the scan's
        # (no per-layer stacking of saved activations and gradients;
        # docs/experiments/stage2.md).
        config.model.update(image_grid=(16, 16), image_vocab_size=1024, num_layers=8,
                            num_heads=8, head_dim=64, conv_kernel=11, scan_layers=False)
        config.batch_size = 8
    elif arg.size != "demo":
        raise ValueError(f"size must be demo or bench (the 12B model is "
                         f"configs/transformer_photos.py); got {arg.size!r}")

    if arg.runlocal:
        config.total_steps = 20
        config.optimizer.update(warmup_steps=5, decay_steps=())
        config.train.update(log_every=5, eval_every=0, summary_every=0)
        config.checkpoint.save_every = 10
    return config
