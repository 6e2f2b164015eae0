r"""Scale benchmark: the paper's 12B transformer (configs/transformer_photos.py) compiled
ahead of time for TPU slices on this host (libtpu describes them; no TPU is used).

  python -m dalle_jax.tools.bench scale --config=configs/bench_scale.py

Smoke size (a 2-layer model on a 4-chip v5e slice; about a minute):

  python -m dalle_jax.tools.bench scale --config=configs/bench_scale.py:runlocal

The model, mesh, sharding rules, remat policy and micro-batches are the 12B config's;
every field overrides as in training (``--config.train.remat_policy=dots``).
``config.bench`` says which slices are compiled for; each fit figure's target is the
chip's HBM.
"""
import importlib.util
import os

from dalle_jax.config import parse_arg
import ml_collections


def _config(name, arg):
    # Beside this file, not beside the package: configs are read from the checkout.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_scale_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    config = _config("transformer_photos", None)
    config.bench = ml_collections.ConfigDict(dict(
        # The 12B at the paper's batch on each (v5e: 16 GiB per chip, v4: 32, v5p: 95).
        slices=("v5litepod-256", "v4-256", "v5p-512"),
        # The smallest slice of this generation that holds it, from the largest down.
        smallest_generation="v5litepod",
        smallest_chips=(128, 64, 32, 16),
        policies=("full",),  # remat policies tried there, cheapest first
        # The largest model of the paper's shape at the paper's batch on these.
        largest_model_slices=("v5litepod-256", "v4-256"),
        layer_step=16,  # bisection resolution, in layers
        max_layers=512,
    ))
    config.known_gap = ("compiled, not run: no TPU is reachable from this host, so step "
                        "times are implied by the FLOPs at a stated MFU, not measured.")
    config.runlocal = arg.runlocal
    if arg.runlocal:
        config.model.update(num_layers=2, num_heads=4, head_dim=32, image_grid=(8, 8),
                            image_vocab_size=512, conv_kernel=5)
        config.text.text_len = 64
        config.batch_size = 64
        config.bench.update(slices=("v5litepod-4",), smallest_chips=(4,),
                            largest_model_slices=("v5litepod-4",), layer_step=2,
                            max_layers=2)
    return config
