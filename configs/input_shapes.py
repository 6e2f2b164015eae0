r"""Input config: captioned shapes, the embedded default dataset (64 px, one or two
coloured shapes), and its caption tokenizer. Not a stage config: it has no model.

Shown as a grid of training examples (builds the dataset, trains the caption tokenizer):

  python -m dalle_jax.tools.show_inputs --config=configs/input_shapes.py --workdir=runs/shapes

A quick local try on a small dataset at 32 px:

  python -m dalle_jax.tools.show_inputs --config=configs/input_shapes.py:runlocal --workdir=/tmp/shapes

Arguments after ':' (comma-separated): runlocal (small and fast), res=32|64|128|256.
Any field can be overridden: --config.data.num_train=10000 --config.batch_size=32.
"""
from dalle_jax.config import parse_arg
from dalle_jax.data import presets
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, res=64)
    config = ml_collections.ConfigDict()
    config.seed = 0  # input order, augmentation and BPE-dropout
    config.batch_size = 64  # global, split evenly over the processes

    config.data = presets.captioned_shapes(arg.res, arg.runlocal)

    config.text = ml_collections.ConfigDict()
    # None: <workdir>/text_tokenizer.model
    config.text.tokenizer_path = config_dict.placeholder(str)
    config.text.vocab_size = 512  # an upper bound: the shapes captions need fewer pieces
    config.text.model_type = "bpe"
    config.text.text_len = 32
    config.text.bpe_dropout = 0.1  # training only

    config.inputs = ml_collections.ConfigDict()
    config.inputs.grid_rows = 4
    config.inputs.grid_cols = 6
    config.inputs.split = "train"

    if arg.runlocal:
        config.batch_size = 16
    return config
