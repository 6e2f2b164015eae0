r"""OpenAI's released dVAE (256 px → 32×32 codes over 8192), converted to this project.

Converts the released pickles (download them yourself; nothing here fetches weights):

  python -m dalle_jax.tools.convert_openai_dvae --config=configs/image_tokenizer_openai.py \
      --config.encoder_pkl=/path/to/encoder.pkl --config.decoder_pkl=/path/to/decoder.pkl \
      --config.output_dir=/path/to/openai_dvae

The output directory holds an orbax checkpoint of {"encoder": ..., "decoder": ...} and
architecture.json; read it back with dalle_jax.models.openai_dvae.load_converted(dir).

The encoder's benchmark against dall_e's PyTorch one (same random weights, 256 px,
batch 8, fp32) has its own config, configs/bench_dvae.py:

  python -m dalle_jax.tools.bench dvae

Both need torch and dall_e: pip install "torch>=2.4" requests attrs &&
pip install --no-deps dall-e==0.1.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    del arg  # no variants: the release has one architecture
    config = ml_collections.ConfigDict()
    config.encoder_pkl = config_dict.placeholder(str)  # required: the released encoder.pkl
    config.decoder_pkl = config_dict.placeholder(str)  # required: the released decoder.pkl
    config.output_dir = config_dict.placeholder(str)  # required
    config.overwrite = False  # replace an existing conversion in output_dir
    # Run random inputs through the pickled modules and the converted ones afterwards;
    # fail when they differ by more than verify_tolerance (fp32, CPU).
    config.verify = True
    config.verify_image_size = 64
    config.verify_tolerance = 1e-4

    # The released architecture; every converted parameter's shape is checked against it.
    config.model = ml_collections.ConfigDict()
    config.model.image_size = 256  # 256 / 2^(group_count − 1) = 32×32 codes
    config.model.vocab_size = 8192
    config.model.n_hid = 256
    config.model.n_blk_per_group = 2
    config.model.group_count = 4
    config.model.n_init = 128  # decoder: width of its first 1×1 conv
    config.model.output_channels = 3  # decoder: 3 means and 3 log-scales
    return config
