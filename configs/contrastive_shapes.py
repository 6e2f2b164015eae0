r"""The contrastive text–image model (the reranker) on captioned shapes.

  python -m dalle_jax.tools.train --config=configs/contrastive_shapes.py \
      --workdir=runs/contrastive_shapes
  python -m dalle_jax.tools.evaluate_contrastive --config=configs/contrastive_shapes.py \
      --workdir=runs/contrastive_shapes

Two towers into a 128-d space: a space-to-depth conv tower over the image (three
halvings: 64 px -> an 8x8 grid of 128 features, flattened and projected, so position
survives) and a 2-layer causal transformer over the caption's BPE tokens. The pairwise
sigmoid loss with t = 10 and b = -10 at the start (SigLIP's); ``:loss=softmax`` trains
with CLIP's softmax loss instead. The caption tokenizer is trained on the first run
into the workdir, as every stage's is, or named by ``config.text.tokenizer_path``
(use stage 2's so that the reranker reads the same tokens).

Arguments after ':' (comma-separated): loss=sigmoid|softmax, runlocal (a few steps).
"""
from dalle_jax.config import parse_arg
from dalle_jax.data import presets
from dalle_jax.train.defaults import core_config
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    arg = parse_arg(arg, loss="sigmoid", runlocal=False)
    config = core_config()
    config.task = "dalle_jax.stages.contrastive"
    config.batch_size = 256
    config.total_steps = 2_000
    config.data = presets.captioned_shapes(64, arg.runlocal)

    config.text = ml_collections.ConfigDict(dict(
        tokenizer_path=config_dict.placeholder(str),  # None: <workdir>/text_tokenizer.model
        vocab_size=512,
        model_type="bpe",
        text_len=32,
        bpe_dropout=0.1,
    ))

    config.model = ml_collections.ConfigDict(dict(
        image_widths=(32, 64, 128),  # one per halving (space-to-depth)
        image_blocks=1,
        text_layers=2,
        text_heads=4,
        text_head_dim=32,
        mlp_ratio=4,
        embed_dim=128,
        init_temperature=10.0,  # t = exp(log t), learnt
        init_bias=-10.0,  # b, learnt (the sigmoid loss only: softmax ignores it)
    ))

    config.contrastive = ml_collections.ConfigDict(dict(
        loss=arg.loss,  # sigmoid | softmax
        eval_split="validation",
        eval_batch_size=500,  # in-batch retrieval among this many pairs
    ))

    config.optimizer.update(learning_rate=1e-3, warmup_steps=100, end_learning_rate=1e-5,
                            weight_decay=1e-4)
    config.train.update(ema_decay=0.0, log_every=100, eval_every=500)
    config.checkpoint.save_every = 500

    if arg.runlocal:
        config.batch_size = 16
        config.total_steps = 10
        config.model.update(image_widths=(8, 8, 16), text_layers=1, text_heads=2,
                            text_head_dim=8, embed_dim=16)
        config.contrastive.eval_batch_size = 50
        config.optimizer.warmup_steps = 2
        config.train.update(log_every=5, eval_every=0)
        config.checkpoint.save_every = 5
    return config
