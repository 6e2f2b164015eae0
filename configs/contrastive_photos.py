r"""The contrastive text–image model (the reranker) for 256 px photos, sized for a pod.

Convert your images first (configs/input_photos.py explains how), then:

  python -m dalle_jax.tools.train --config=configs/contrastive_photos.py \
      --config.data.data_dir=/data/my_photos_records --workdir=runs/contrastive_photos \
      --config.text.tokenizer_path=runs/transformer_photos/text_tokenizer.model

Image tower: the space-to-depth conv backbone with five halvings (256 px -> an 8x8 grid
of 512 features, two blocks per width), flattened and projected to 512; text tower: a
6-layer causal transformer (d = 512) over 64 caption tokens of the stage-2 tokenizer.
The sigmoid loss at a global batch of 16,384 (SigLIP's loss needs no all-gathered
[B, B] matrix: each device holds one block of the local batch squared at a time).
``:loss=softmax`` trains with CLIP's loss; ``:coco`` reads tfds coco_captions.

Arguments after ':' (comma-separated): loss=sigmoid|softmax, coco, runlocal.
"""
from dalle_jax.config import parse_arg
from dalle_jax.data import presets
from dalle_jax.train.defaults import core_config
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    arg = parse_arg(arg, loss="sigmoid", coco=False, runlocal=False)
    config = core_config()
    config.task = "dalle_jax.stages.contrastive"
    config.batch_size = 16_384
    config.total_steps = 100_000
    config.data = presets.photos(arg.coco, arg.runlocal)

    config.text = ml_collections.ConfigDict(dict(
        tokenizer_path=config_dict.placeholder(str),  # None: <workdir>/text_tokenizer.model
        vocab_size=16_384,
        model_type="bpe",
        text_len=64,
        bpe_dropout=0.1,
    ))

    config.model = ml_collections.ConfigDict(dict(
        image_widths=(64, 128, 256, 512, 512),  # one per halving: 256 px -> 8x8
        image_blocks=2,
        text_layers=6,
        text_heads=8,
        text_head_dim=64,
        mlp_ratio=4,
        embed_dim=512,
        init_temperature=10.0,
        init_bias=-10.0,
    ))

    config.contrastive = ml_collections.ConfigDict(dict(
        loss=arg.loss,
        eval_split="validation",
        eval_batch_size=1_024,
    ))

    config.optimizer.update(learning_rate=1e-3, warmup_steps=5_000, end_learning_rate=0.0,
                            weight_decay=1e-4, b2=0.95)
    config.train.update(ema_decay=0.0, compute_dtype="bfloat16", log_every=100,
                        eval_every=5_000)
    config.checkpoint.save_every = 2_000
    config.mesh.update(data=-1, fsdp=1, tensor=1)

    if arg.runlocal:
        config.batch_size = 16
        config.total_steps = 10
        config.text.update(vocab_size=512, text_len=32)
        config.model.update(image_widths=(8, 8, 16, 16, 16), image_blocks=1, text_layers=1,
                            text_heads=2, text_head_dim=8, embed_dim=16)
        config.contrastive.eval_batch_size = 16
        config.optimizer.warmup_steps = 2
        config.train.update(compute_dtype="float32", log_every=5, eval_every=0)
        config.checkpoint.save_every = 5
    return config
