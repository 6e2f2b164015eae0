r"""Input config: real photos with captions at 256 px, preprocessed as in the DALL·E
paper, and their caption tokenizer. Not a stage config: train stage 1 on photos with
configs/image_tokenizer_photos.py.

Convert a folder of images with captions into TFRecord shards first:

  python -m dalle_jax.tools.convert_images --config=configs/convert_images.py \
      --config.input_dir=/data/my_photos --config.output_dir=/data/my_photos_records

then train the caption tokenizer beside the run and look at a grid of inputs:

  python -m dalle_jax.tools.train_text_tokenizer --config=configs/input_photos.py \
      --config.data.data_dir=/data/my_photos_records --workdir=runs/photos
  python -m dalle_jax.tools.show_inputs --config=configs/input_photos.py \
      --config.data.data_dir=/data/my_photos_records --workdir=runs/photos

A tfds dataset with an image and a caption feature works the same way, e.g. MS-COCO
prepared in your own tfds folder:

  python -m dalle_jax.tools.show_inputs --config=configs/input_photos.py:coco --workdir=runs/coco \
      --config.data.data_dir=/data/tensorflow_datasets

Arguments after ':' : coco (tfds coco_captions), runlocal (64 px, small batch).
"""
from dalle_jax.config import parse_arg
from dalle_jax.data import presets
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    arg = parse_arg(arg, coco=False, runlocal=False)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 64

    config.data = presets.photos(arg.coco, arg.runlocal)

    config.text = ml_collections.ConfigDict()
    config.text.tokenizer_path = config_dict.placeholder(str)
    config.text.vocab_size = 16_384  # paper
    config.text.model_type = "bpe"
    config.text.text_len = 256  # paper
    config.text.bpe_dropout = 0.1  # paper

    config.inputs = ml_collections.ConfigDict()
    config.inputs.grid_rows = 3
    config.inputs.grid_cols = 4
    config.inputs.split = "train"

    if arg.runlocal:
        config.text.text_len = 64
        config.batch_size = 8
    return config
