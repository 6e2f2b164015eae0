"""Entry points: one thin module per job, each run as ``python -m dalle_jax.tools.<job>``."""
import os
import sys

# tf.data is the only TensorFlow here; keep its start-up quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if sys.argv[:1] == ["-m"]:
    # A job starting (``python -m dalle_jax.tools.<job>``: argv[0] is "-m" while the
    # module is located). Catch SIGTERM and SIGINT before the slow imports (jax,
    # tensorflow) so that a stop during start-up also ends cleanly, with exit 0.
    from dalle_jax import signals  # pylint: disable=g-import-not-at-top
    signals.install(before_start=True)

# The top-level config fields each job reads, checked before it starts so that a config
# meant for another job stops with one line instead of failing half-way (a data-only
# input config passed to the trainer, say). Kept free of imports: the check runs while
# the flags are parsed.
CONFIG_FIELDS = {
    "train": ("task", "data", "model", "optimizer", "train", "checkpoint"),
    "train_text_tokenizer": ("data", "text"),
    "demo": ("data", "text", "image_tokenizer", "transformer", "reranker", "demo"),
    "show_inputs": ("data", "text", "inputs"),
    "eval_image_tokenizer": ("data", "model", "stage1"),
    "encode_dataset": ("data", "model", "encode"),
    "convert_images": ("input_dir", "manifest", "output_dir"),
    "convert_openai_dvae": ("encoder_pkl", "decoder_pkl", "output_dir", "model"),
    "bench": ("runlocal", "known_gap"),
    "compile": ("task", "model", "optimizer", "train", "mesh", "sharding"),
    # Flags only, no --config.
    "export": (),
    "generate": (),
    "evaluate": (),
    "evaluate_contrastive": (),
}

# What to suggest when a config lacks those fields.
CONFIG_KINDS = {
    "train": "a stage config (configs/image_tokenizer_*.py, configs/transformer_*.py)",
    "train_text_tokenizer": "an input config (configs/input_*.py) or a stage config",
    "demo": "configs/demo.py",
    "show_inputs": "an input config (configs/input_*.py)",
    "eval_image_tokenizer": "a stage-1 config (configs/image_tokenizer_*.py)",
    "encode_dataset": "a stage-1 config (configs/image_tokenizer_*.py)",
    "convert_images": "configs/convert_images.py",
    "convert_openai_dvae": "configs/image_tokenizer_openai.py",
    "bench": "a benchmark config (configs/bench_*.py)",
    "compile": "a stage config (configs/image_tokenizer_*.py, configs/transformer_*.py)",
}
