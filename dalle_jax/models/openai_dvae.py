"""OpenAI's released dVAE weights (``encoder.pkl``, ``decoder.pkl``) in this project's form.

The release pickles whole PyTorch modules (``dall_e.encoder.Encoder``,
``dall_e.decoder.Decoder``). Unpickling can run arbitrary code, so
:func:`load_released_state_dict` loads them with ``torch.load(weights_only=True)`` and
admits exactly the classes the release is made of (:data:`ALLOWED_GLOBALS`); any other
global is refused with a ``ValueError`` naming it.

The state dict then maps onto the Flax tree of :mod:`dalle_jax.models.dvae` by name
(``blocks.group_2.block_1.id_path.w`` → ``group_2/block_1/id_path/kernel``) with conv
weights transposed OIHW → HWIO; every parameter's shape is checked against the modules
built from the config. The result is saved as an orbax checkpoint of
``{"encoder": ..., "decoder": ...}`` plus ``architecture.json``; :func:`load_converted`
reads both back.

torch and ``dall_e`` are needed only to read the pickles: ``pip install "torch>=2.4"
requests attrs`` then ``pip install --no-deps dall-e==0.1`` (its declared dependencies
are unneeded and old).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
from typing import Any, Mapping

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dalle_jax import files
from dalle_jax.models import dvae

PARAMS_DIR = "params"
ARCHITECTURE_FILE = "architecture.json"

# Every global a released (or dall_e-saved) module pickle refers to beyond what
# torch's weights-only unpickler admits by default (tensors, storages, OrderedDict,
# torch.device). Names, so that this module imports without torch.
ALLOWED_GLOBALS = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
)
_EXPECTED_CLASS = {"encoder": "dall_e.encoder.Encoder", "decoder": "dall_e.decoder.Decoder"}
_INSTALL_HINT = ('install them with: pip install "torch>=2.4" requests attrs && '
                 'pip install --no-deps dall-e==0.1')


def require_torch_and_dall_e() -> Any:
    """Imports torch and dall_e (``ImportError`` with install steps); returns torch."""
    try:
        import torch
        import dall_e  # noqa: F401  (its classes are resolved by name below)
    except ImportError as e:
        raise ImportError(f"reading OpenAI's dVAE pickles needs torch and dall_e ({e}); "
                          f"{_INSTALL_HINT}") from e
    return torch


def _resolve(qualified_name: str) -> Any:
    module_name, _, attr_name = qualified_name.rpartition(".")
    module = __import__(module_name, fromlist=[attr_name])
    return getattr(module, attr_name)


def _qualified_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _load_released_module(path: str | epath.PathLike, kind: str) -> Any:
    """The pickled dall_e module, unpickled with the allow-list (see
    :func:`load_released_state_dict`)."""
    if kind not in _EXPECTED_CLASS:
        raise ValueError(f"kind must be 'encoder' or 'decoder'; got {kind!r}")
    torch = require_torch_and_dall_e()
    allowed = [_resolve(name) for name in ALLOWED_GLOBALS]
    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        allow = serialization.safe_globals(allowed)
    else:  # torch 2.4 has only the process-wide allow-list
        serialization.add_safe_globals(allowed)
        allow = contextlib.nullcontext()
    path = epath.Path(path)
    try:
        with allow, path.open("rb") as f:
            module = torch.load(f, map_location="cpu", weights_only=True)
    except OSError:  # a missing or unreadable file says so itself
        raise
    except Exception as e:  # torch raises pickle.UnpicklingError, or RuntimeError on old files
        # torch names the refused global in its message (wording varies by case).
        match = re.search(r"GLOBAL ([\w.]+)", str(e))
        if match:
            raise ValueError(
                f"{path}: refused to unpickle: it refers to {match.group(1)}, which is not "
                f"one of the allowed dall_e/torch classes") from None
        message = str(e)
        _, found, detail = message.partition("WeightsUnpickler error:")
        detail = " ".join(detail.split("Check the documentation")[0].split()) if found else (
            message.splitlines()[0] if message else type(e).__name__)
        raise ValueError(f"{path}: refused to unpickle: {detail}") from None
    if _qualified_name(module) != _EXPECTED_CLASS[kind]:
        raise ValueError(f"{path}: holds a {_qualified_name(module)}, expected a "
                         f"{_EXPECTED_CLASS[kind]} (are the encoder and decoder swapped?)")
    return module.eval()


def load_released_state_dict(path: str | epath.PathLike, kind: str) -> dict[str, np.ndarray]:
    """Reads a released ``encoder.pkl``/``decoder.pkl`` safely; returns fp32 numpy weights.

    ``kind`` is ``"encoder"`` or ``"decoder"``: the pickle must hold that dall_e class.
    Raises ``ValueError`` for a pickle that refers to anything outside
    :data:`ALLOWED_GLOBALS` (and torch's default weights-only set), and ``ImportError``
    when torch or dall_e is missing.
    """
    module = _load_released_module(path, kind)
    return {name: tensor.detach().cpu().float().numpy()
            for name, tensor in module.state_dict().items()}


def modules_from_config(model_config: Mapping[str, Any]) -> tuple[dvae.Encoder, dvae.Decoder]:
    """The encoder and decoder of an architecture config (``configs/image_tokenizer_openai.py``)."""
    encoder = dvae.Encoder(
        n_hid=model_config["n_hid"], n_blk_per_group=model_config["n_blk_per_group"],
        group_count=model_config["group_count"], vocab_size=model_config["vocab_size"])
    decoder = dvae.Decoder(
        n_init=model_config["n_init"], n_hid=model_config["n_hid"],
        n_blk_per_group=model_config["n_blk_per_group"],
        group_count=model_config["group_count"],
        output_channels=model_config["output_channels"])
    return encoder, decoder


def module_param_shapes(module: dvae.Encoder | dvae.Decoder, in_channels: int) -> Any:
    """A module's param tree as shapes and dtypes (unboxed), nothing materialised."""
    # Any spatial size divisible by the downsample factor gives the same params.
    size = dvae.downsample_factor(module.group_count) if isinstance(module, dvae.Encoder) else 1
    variables = jax.eval_shape(module.init, jax.random.key(0),
                               jnp.zeros((1, size, size, in_channels)))
    return nn.unbox(variables["params"])


def abstract_params(encoder: dvae.Encoder, decoder: dvae.Decoder,
                    vocab_size: int) -> dict[str, Any]:
    """Shapes and dtypes of ``{"encoder": ..., "decoder": ...}``."""
    return {"encoder": module_param_shapes(encoder, 3),
            "decoder": module_param_shapes(decoder, vocab_size)}


def flatten_params(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"a": {"b": leaf}}`` → ``{"a/b": leaf}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix + (key,)))
        else:
            flat["/".join(prefix + (key,))] = value
    return flat


def _flax_name(torch_name: str) -> str:
    """``blocks.group_1.block_1.id_path.w`` → ``group_1/block_1/id_path/kernel``."""
    parts = torch_name.split(".")
    if parts[0] != "blocks" or parts[-1] not in ("w", "b"):
        raise ValueError(f"unexpected parameter {torch_name!r} in the released state dict")
    return "/".join(parts[1:-1] + ["kernel" if parts[-1] == "w" else "bias"])


def state_dict_to_params(state_dict: Mapping[str, np.ndarray],
                         expected: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Renames and transposes a dall_e state dict into a Flax tree shaped like ``expected``.

    ``expected`` is the module's (abstract) param tree. Missing, unexpected or
    mis-shaped parameters raise ``ValueError`` naming them (``what`` names the module).
    """
    wanted = flatten_params(expected)
    converted = {}
    for torch_name, value in state_dict.items():
        name = _flax_name(torch_name)
        value = np.asarray(value, np.float32)
        if name.endswith("kernel"):
            if value.ndim != 4:
                raise ValueError(f"{what}: {torch_name} has shape {value.shape}, expected a "
                                 f"4-d OIHW conv weight")
            value = value.transpose(2, 3, 1, 0)  # OIHW → HWIO
        if name not in wanted:
            raise ValueError(f"{what}: {torch_name} (-> {name}) has no counterpart in the "
                             f"configured module; check the architecture config")
        if value.shape != tuple(wanted[name].shape):
            raise ValueError(
                f"{what}: parameter {name} (from {torch_name}) has shape {value.shape} in the "
                f"checkpoint but {tuple(wanted[name].shape)} in the configured module")
        converted[name] = value
    missing = sorted(set(wanted) - set(converted))
    if missing:
        raise ValueError(f"{what}: the checkpoint lacks {len(missing)} parameters of the "
                         f"configured module, e.g. {missing[:3]}")
    tree: dict[str, Any] = {}
    for name, value in converted.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(encoder_pkl: str | epath.PathLike, decoder_pkl: str | epath.PathLike,
            output_dir: str | epath.PathLike, model_config: Mapping[str, Any],
            overwrite: bool = False) -> dict[str, Any]:
    """Converts the two released pickles and saves them under ``output_dir``.

    Returns the converted params. ``output_dir`` gets ``params/`` (orbax) and
    ``architecture.json``, written last, so its presence marks a complete conversion.
    """
    output_dir = epath.Path(output_dir)
    if (output_dir / PARAMS_DIR).exists() and not overwrite:
        raise FileExistsError(f"{output_dir / PARAMS_DIR} exists; set overwrite to replace it")
    encoder, decoder = modules_from_config(model_config)
    expected = abstract_params(encoder, decoder, model_config["vocab_size"])
    params = {
        "encoder": state_dict_to_params(
            load_released_state_dict(encoder_pkl, "encoder"), expected["encoder"], "encoder"),
        "decoder": state_dict_to_params(
            load_released_state_dict(decoder_pkl, "decoder"), expected["decoder"], "decoder"),
    }
    save_converted(output_dir, encoder, decoder, model_config["vocab_size"], params,
                   source={"encoder_pkl": str(encoder_pkl), "decoder_pkl": str(decoder_pkl),
                           "encoder_sha256": _sha256(epath.Path(encoder_pkl)),
                           "decoder_sha256": _sha256(epath.Path(decoder_pkl))})
    return params


def _module_fields(module: nn.Module, names: tuple[str, ...]) -> dict[str, int]:
    return {name: getattr(module, name) for name in names}


def save_converted(output_dir: str | epath.PathLike, encoder: dvae.Encoder,
                   decoder: dvae.Decoder, vocab_size: int, params: Mapping[str, Any],
                   source: Mapping[str, str] | None = None) -> epath.Path:
    """Writes ``params/`` (orbax, replacing any) and ``architecture.json``."""
    output_dir = epath.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # A stale JSON beside half-written params would look complete: drop it first.
    (output_dir / ARCHITECTURE_FILE).unlink(missing_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((output_dir / PARAMS_DIR).absolute(), dict(params), force=True)
    architecture = {
        "vocab_size": vocab_size,
        "encoder": _module_fields(encoder, ("n_hid", "n_blk_per_group", "group_count",
                                            "vocab_size")),
        "decoder": _module_fields(decoder, ("n_init", "n_hid", "n_blk_per_group",
                                            "group_count", "output_channels")),
        "source": dict(source or {}),
    }
    files.atomic_write(output_dir / ARCHITECTURE_FILE,
                       json.dumps(architecture, indent=2, sort_keys=True) + "\n")
    return output_dir


def load_converted(directory: str | epath.PathLike
                   ) -> tuple[dvae.Encoder, dvae.Decoder, dict[str, Any]]:
    """Reads a conversion back: ``(encoder, decoder, {"encoder": ..., "decoder": ...})``.

    The modules compute in fp32; ``encoder.clone(dtype=jnp.bfloat16)`` changes that.
    """
    directory = epath.Path(directory)
    architecture_path = directory / ARCHITECTURE_FILE
    if not architecture_path.exists():
        raise FileNotFoundError(f"{architecture_path} not found: not a (complete) conversion")
    architecture = json.loads(architecture_path.read_text())
    encoder = dvae.Encoder(**architecture["encoder"])
    decoder = dvae.Decoder(**architecture["decoder"])
    target = abstract_params(encoder, decoder, architecture["vocab_size"])
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore((directory / PARAMS_DIR).absolute(), target)
    return encoder, decoder, jax.tree.map(jnp.asarray, params)


def compare_with_released(encoder_pkl: str | epath.PathLike, decoder_pkl: str | epath.PathLike,
                          directory: str | epath.PathLike, image_size: int = 64,
                          batch_size: int = 2, seed: int = 0) -> dict[str, float]:
    """Max abs differences, fp32 on CPU, between a conversion and the pickled modules.

    Runs random pixels through both encoders and random one-hot codes through both
    decoders; returns ``{"encoder": ..., "decoder": ...}``.
    """
    torch = require_torch_and_dall_e()
    encoder, decoder, params = load_converted(directory)
    rng = np.random.default_rng(seed)
    pixels = dvae.map_pixels(rng.random((batch_size, image_size, image_size, 3), np.float32))
    size = image_size // dvae.downsample_factor(encoder.group_count)
    codes = rng.integers(0, encoder.vocab_size, (batch_size, size, size))
    one_hot = np.eye(encoder.vocab_size, dtype=np.float32)[codes]
    ours = {
        "encoder": jax.jit(encoder.apply)({"params": params["encoder"]}, pixels),
        "decoder": jax.jit(decoder.apply)({"params": params["decoder"]}, one_hot),
    }
    with torch.no_grad():
        theirs = {
            "encoder": _load_released_module(encoder_pkl, "encoder")(
                torch.from_numpy(np.asarray(pixels).transpose(0, 3, 1, 2).copy())),
            "decoder": _load_released_module(decoder_pkl, "decoder")(
                torch.from_numpy(one_hot.transpose(0, 3, 1, 2).copy())),
        }
    return {name: float(np.abs(np.asarray(ours[name])
                               - theirs[name].numpy().transpose(0, 2, 3, 1)).max())
            for name in ours}
