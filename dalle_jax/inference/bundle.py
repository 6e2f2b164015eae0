"""Inference bundles: everything text → image needs, in one self-contained directory.

    python -m dalle_jax.tools.export --workdir=runs/transformer_shapes --output=runs/bundle

A bundle holds the parameters only (no optimizer state, the EMA copy when the run kept
one), so it is a fraction of a training checkpoint's size:

    manifest.json                    format version, every file's sha256 and size,
                                     parameter shapes and dtypes, source runs and steps
    transformer/config.json          the stage-2 run's resolved config
    transformer/params/              its parameters (orbax), optionally cast to bfloat16
    image_tokenizer/config.json      the stage-1 config (encoder and decoder)
    image_tokenizer/variables/       its parameters, and a VQ-VAE's codebook
    text_tokenizer.model             the caption sentencepiece model
    reranker/                        optional: the contrastive model's config.json,
                                     params/ and its own text_tokenizer.model
    upsampler/                       optional: the diffusion upsampler's config.json and
                                     params/ (its EMA copy)
    unclip_decoder/, unclip_prior/   optional (with the reranker, whose embeddings they
                                     read): unCLIP's decoder and prior, the same way

:func:`export` writes it under a temporary name and renames it when complete;
:func:`load` verifies every file against the manifest, checks the parameter shapes
against the configs, and restores the arrays straight into their shards on any mesh
(resharded by the config's logical-axis rules). A partial or damaged bundle is refused
with a :class:`BundleError` naming the part.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from typing import Any, Callable

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax.data import text_tokenizer as text_tokenizer_lib
from dalle_jax.inference import runs
from dalle_jax.models import contrastive as contrastive_lib
from dalle_jax.models import image_tokenizers
from dalle_jax.models import openai_dvae
from dalle_jax.models import transformer as transformer_lib
from dalle_jax.models import unet as unet_lib
from dalle_jax.stages import contrastive as stage_c
from dalle_jax.stages import image_tokenizer as stage1
from dalle_jax.stages import transformer as stage2
from dalle_jax.stages import upsampler as stage_u
from dalle_jax.train import checkpoint as checkpoint_lib

FORMAT = "dalle_jax.bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TEXT_TOKENIZER_FILE = "text_tokenizer.model"
# part -> (config file, arrays directory)
PARTS = {
    "transformer": ("transformer/config.json", "transformer/params"),
    "image_tokenizer": ("image_tokenizer/config.json", "image_tokenizer/variables"),
}
RERANKER = ("reranker/config.json", "reranker/params", "reranker/text_tokenizer.model")
UPSAMPLER = ("upsampler/config.json", "upsampler/params")
# The optional parts that are one diffusion run's config and (EMA) parameters.
MODEL_PARTS = ("upsampler", "unclip_decoder", "unclip_prior")
# Those that read the reranker's embeddings, so need the reranker they were trained on.
UNCLIP_PARTS = {"unclip_decoder": "decoder", "unclip_prior": "prior"}  # -> config section
DTYPES = ("float32", "bfloat16")


class BundleError(errors.UserError):
    """A bundle that cannot be written or read; the message names the part."""


# ----------------------------------------------------------------------------- helpers


def _leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def tree_shapes(tree) -> dict[str, list]:
    """``{"params/layer/kernel": [[shape...], "dtype"]}`` of an array tree."""
    return {_leaf_name(path): [list(leaf.shape), str(jnp.dtype(leaf.dtype))]
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _files(root: epath.Path) -> list[str]:
    """Every file under ``root``, relative to it, sorted (a walk by listing: epath has no
    recursive glob on gs://)."""
    found, folders = [], [root]
    while folders:
        for path in folders.pop().iterdir():
            if path.is_dir():
                folders.append(path)
            else:
                found.append(str(path.relative_to(root)))
    return sorted(found)


def directory_bytes(path: epath.Path) -> int:
    path = epath.Path(path)
    return sum((path / name).stat().length for name in _files(path))


def _file_table(root: epath.Path) -> dict[str, dict[str, Any]]:
    return {name: {"sha256": checkpoint_lib.sha256_file(root / name),
                   "size": (root / name).stat().length}
            for name in _files(root) if name != MANIFEST}


def _to_host(tree, dtype: str | None = None):
    def convert(x):
        x = np.asarray(jax.device_get(x))
        if dtype is not None and np.issubdtype(x.dtype, np.floating):
            x = x.astype(jnp.dtype(dtype))
        return x
    return jax.tree.map(convert, tree)


def _save_arrays(path: epath.Path, tree) -> None:
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(checkpoint_lib.absolute(path), tree)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()


def _plain_config(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


# ------------------------------------------------------------------------------ export


@dataclasses.dataclass
class ExportReport:
    path: epath.Path
    bundle_bytes: int
    checkpoint_bytes: int  # the stage-2 run's training checkpoint at the exported step
    part_bytes: dict[str, int]
    transformer_step: int
    ema: bool

    @property
    def generation_bytes(self) -> int:
        """The bundle without its optional parts (reranker, upsampler, unCLIP): what
        the training checkpoint of the transformer compares with."""
        return self.bundle_bytes - sum(self.part_bytes.get(p, 0)
                                       for p in ("reranker",) + MODEL_PARTS)


def image_tokenizer_config(config: ml_collections.ConfigDict) -> dict:
    """The parts of a stage-1 config a bundle needs to rebuild the model."""
    return {"model": config.model.to_dict(),
            "data": {"image_size": int(config.data.image_size)},
            "sharding": config.sharding.to_dict() if "sharding" in config else None}


def export(workdir: str | os.PathLike, output: str | os.PathLike, *,
           image_tokenizer: str | os.PathLike | None = None,
           reranker: str | os.PathLike | None = None,
           upsampler: str | os.PathLike | None = None,
           unclip_decoder: str | os.PathLike | None = None,
           unclip_prior: str | os.PathLike | None = None, dtype: str = "float32",
           step: int | None = None, overwrite: bool = False,
           log: Callable[[str], None] = lambda _: None) -> ExportReport:
    """Writes the bundle of the stage-2 run ``workdir`` (its checkpoint at ``step``,
    the latest by default) to ``output``.

    ``image_tokenizer`` is the stage-1 run (or conversion of OpenAI's dVAE) whose codes
    the transformer was trained on; by default the run's ``config.stage2.image_tokenizer``.
    ``reranker`` is a run of the contrastive model (dalle_jax.stages.contrastive) at
    the same image size, carried as the optional reranker part; ``upsampler`` a run of
    the diffusion upsampler (dalle_jax.stages.upsampler) whose input is that size, the
    optional upsampler part. ``unclip_decoder`` and ``unclip_prior`` are runs of
    unCLIP's decoder and prior (dalle_jax.stages.unclip_*) conditioned on the embeddings
    of ``reranker``, which they then need. ``dtype`` casts the transformer's
    floating-point parameters.
    """
    # Imported here: the loaders of trained runs import this package's models.
    from dalle_jax.inference import image_tokenizer as image_tokenizer_run
    from dalle_jax.inference import transformer as transformer_run

    if dtype not in DTYPES:
        raise BundleError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    workdir, output = epath.Path(workdir), epath.Path(output)
    if not (workdir / config_lib.CONFIG_FILE_NAME).exists():
        raise BundleError(f"{workdir} is not a training run: it has no "
                          f"{config_lib.CONFIG_FILE_NAME}")
    run_config = config_lib.read_config(workdir)
    if run_config.get("task") != stage2.__name__:
        raise BundleError(f"{workdir} is a run of {run_config.get('task') or 'no stage'}, "
                          f"not a stage-2 run ({stage2.__name__}): export the transformer's "
                          "run")
    if output.exists() and not overwrite:
        raise BundleError(f"{output} exists: pass --overwrite to replace it, or choose "
                          "another --output")
    stage1_dir = image_tokenizer or run_config.stage2.get("image_tokenizer")
    if not stage1_dir:
        raise BundleError(
            "the run does not name its image tokenizer (config.stage2.image_tokenizer): "
            "pass --image_tokenizer=<the stage-1 run whose codes it was trained on>")
    text_path = text_tokenizer_lib.text_tokenizer_path(run_config.text, workdir)
    if not text_path.exists():
        raise BundleError(f"text tokenizer: {text_path} not found")

    log(f"loading the transformer of {workdir}")
    transformer = transformer_run.TransformerRun.load(str(workdir), run_config, step=step)
    log(f"loading the image tokenizer of {stage1_dir}")
    stage1_config = None
    if (epath.Path(stage1_dir) / openai_dvae.ARCHITECTURE_FILE).exists():
        # A conversion of OpenAI's dVAE: at the resolution the transformer was trained on.
        stage1_config = ml_collections.ConfigDict(
            {"data": {"image_size": int(run_config.data.image_size)}})
    tokenizer = image_tokenizer_run.ImageTokenizerRun.load(str(stage1_dir), stage1_config)
    cfg = transformer.model_config
    if (tokenizer.vocab_size > cfg.image_vocab_size or cfg.image_height != cfg.image_width
            or tokenizer.grid_size != cfg.image_height):
        raise BundleError(
            f"image tokenizer {stage1_dir} makes {tokenizer.grid_size}x{tokenizer.grid_size} "
            f"codes of {tokenizer.vocab_size}, but the transformer takes "
            f"{cfg.image_height}x{cfg.image_width} codes of {cfg.image_vocab_size}")
    reranker_part, reranker_source = None, None
    if reranker:
        reranker_part, reranker_source = _reranker_part(reranker, tokenizer.image_size, log)
    upsampler_part, upsampler_source = None, None
    if upsampler:
        upsampler_part, upsampler_source = _upsampler_part(upsampler, tokenizer.image_size,
                                                           log)
    model_parts = {"upsampler": upsampler_part} if upsampler_part is not None else {}
    model_sources = {"upsampler": upsampler_source}
    for name, run in (("unclip_decoder", unclip_decoder), ("unclip_prior", unclip_prior)):
        if run:
            model_parts[name], model_sources[name] = _unclip_part(name, run, reranker, log)
    ema = run_config.train.ema_decay > 0
    checkpoint_dir = workdir / runs.CHECKPOINTS / str(transformer.step)
    checkpoint_bytes = directory_bytes(checkpoint_dir) if checkpoint_dir.exists() else 0
    manifest = write(
        output, transformer_config=run_config, transformer_params=transformer.params,
        image_tokenizer_config=image_tokenizer_config(tokenizer.config),
        image_tokenizer_variables=tokenizer.variables, text_tokenizer_file=text_path,
        dtype=dtype, log=log, reranker=reranker_part, model_parts=model_parts,
        sources={"reranker": reranker_source, **model_sources,
                 "transformer": {"run": str(workdir.resolve()), "step": transformer.step,
                                 "ema": ema},
                 "image_tokenizer": {"run": str(epath.Path(stage1_dir).resolve()),
                                     "step": tokenizer.step,
                                     "kind": tokenizer.config.model.kind},
                 "text_tokenizer": str(text_path.resolve())},
        extra={"training_checkpoint_bytes": checkpoint_bytes})
    files = manifest["files"]
    part_bytes = {part: sum(f["size"] for name, f in files.items()
                            if name.startswith(part + "/")) for part in PARTS}
    part_bytes["text_tokenizer"] = files[TEXT_TOKENIZER_FILE]["size"]
    for name, part in (("reranker", reranker_part), *model_parts.items()):
        if part is not None:
            part_bytes[name] = sum(f["size"] for file, f in files.items()
                                   if file.startswith(name + "/"))
    return ExportReport(output, manifest["bundle_bytes"], checkpoint_bytes, part_bytes,
                        transformer.step, ema)


@dataclasses.dataclass
class RerankerPart:
    """The optional reranker: a contrastive run's config, parameters and tokenizer."""
    config: ml_collections.ConfigDict
    params: Any
    text_tokenizer: Any  # a file path when writing, a TextTokenizer when loaded


def _reranker_part(run: str | os.PathLike, image_size: int,
                   log: Callable[[str], None]) -> tuple[RerankerPart, dict[str, Any]]:
    from dalle_jax.inference import reranker as reranker_lib  # pylint: disable=g-import-not-at-top
    log(f"loading the reranker of {run}")
    try:
        config = config_lib.read_config(run)
    except FileNotFoundError as e:
        raise BundleError(f"reranker: {e}") from None
    size = config.get("data", {}).get("image_size")
    if config.get("task") == stage_c.__name__ and size != image_size:
        raise BundleError(f"reranker {run} scores {size}px images, but the bundle makes "
                          f"{image_size}px ones")
    try:
        loaded = reranker_lib.Reranker.load_run(str(run), config)
    except runs.RunError as e:
        raise BundleError(f"reranker: {e}") from None
    path = text_tokenizer_lib.text_tokenizer_path(loaded.config.text, run)
    return (RerankerPart(loaded.config, loaded.params, path),
            {"run": str(epath.Path(run).resolve()), "step": loaded.step})


@dataclasses.dataclass
class ModelPart:
    """An optional part that is one run's config and (EMA) parameters: the diffusion
    upsampler, unCLIP's decoder or prior."""
    config: ml_collections.ConfigDict
    params: Any


UpsamplerPart = ModelPart


def _upsampler_part(run: str | os.PathLike, image_size: int,
                    log: Callable[[str], None]) -> tuple[UpsamplerPart, dict[str, Any]]:
    from dalle_jax.inference import upsampler as upsampler_lib  # pylint: disable=g-import-not-at-top
    log(f"loading the upsampler of {run}")
    try:
        loaded = upsampler_lib.Upsampler.load_run(str(run))
    except runs.RunError as e:
        raise BundleError(f"upsampler: {e}") from None
    if loaded.low_size != image_size:
        raise BundleError(f"upsampler {run} takes {loaded.low_size}px images, but the "
                          f"bundle makes {image_size}px ones")
    return (UpsamplerPart(loaded.config, loaded.params),
            {"run": str(epath.Path(run).resolve()), "step": loaded.step,
             "ema": loaded.config.train.ema_decay > 0})


def _unclip_loader(name: str):
    """The library class that loads runs of unCLIP part ``name``."""
    if name == "unclip_decoder":
        from dalle_jax.inference import unclip  # pylint: disable=g-import-not-at-top
        return unclip.UnclipDecoder
    from dalle_jax.inference import prior  # pylint: disable=g-import-not-at-top
    return prior.Prior


def _unclip_part(name: str, run: str | os.PathLike, reranker: str | os.PathLike | None,
                 log: Callable[[str], None]) -> tuple[ModelPart, dict[str, Any]]:
    """unCLIP's decoder or prior, checked to read the embeddings of the bundle's
    reranker (the run it was trained on)."""
    from dalle_jax.inference import reranker as reranker_lib  # pylint: disable=g-import-not-at-top
    label = name.replace("_", " ")
    log(f"loading the {label} of {run}")
    try:
        config = config_lib.read_config(run)
    except FileNotFoundError:
        raise BundleError(f"{label}: {run} is not a training run: it has no "
                          f"{config_lib.CONFIG_FILE_NAME}") from None
    section = UNCLIP_PARTS[name]
    trained_on = config.get(section, {}).get("reranker_run")
    if not reranker:
        raise BundleError(f"{label} {run} reads the embeddings of a contrastive model: "
                          f"pass the one it was trained on, --reranker={trained_on}")
    if trained_on and os.path.realpath(trained_on) != os.path.realpath(reranker):
        raise BundleError(f"{label} {run} was trained on the embeddings of {trained_on}, "
                          f"not of the bundle's reranker {reranker}")
    try:
        r = reranker_lib.Reranker.load_run(str(reranker))
        loaded = _unclip_loader(name).load_run(str(run), reranker=r)
    except (runs.RunError, errors.UserError) as e:
        raise BundleError(f"{label}: {e}") from None
    return (ModelPart(loaded.config, loaded.params),
            {"run": str(epath.Path(run).resolve()), "step": loaded.step,
             "ema": loaded.config.train.ema_decay > 0})


def write(output: str | os.PathLike, *, transformer_config: ml_collections.ConfigDict,
          transformer_params, image_tokenizer_config: dict, image_tokenizer_variables,
          text_tokenizer_file: str | os.PathLike, sources: dict[str, Any],
          dtype: str = "float32", extra: dict[str, Any] | None = None,
          reranker: RerankerPart | None = None, upsampler: ModelPart | None = None,
          model_parts: dict[str, ModelPart] | None = None,
          log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Writes a bundle from its parts (an existing ``output`` is replaced): under a
    temporary name, renamed when complete. Returns the manifest. ``model_parts``: the
    optional parts of :data:`MODEL_PARTS` by name (``upsampler`` is one of them)."""
    model_parts = dict(model_parts or {})
    if upsampler is not None:
        model_parts["upsampler"] = upsampler
    unknown = sorted(set(model_parts) - set(MODEL_PARTS))
    if unknown:
        raise BundleError(f"unknown bundle parts {unknown}: the optional model parts are "
                          f"{', '.join(MODEL_PARTS)}")
    output = epath.Path(output)
    temp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    try:
        transformer_params = _to_host(transformer_params, dtype)
        tokenizer_variables = _to_host(image_tokenizer_variables)
        (temp / "transformer").mkdir()
        (temp / "image_tokenizer").mkdir()
        (temp / PARTS["transformer"][0]).write_text(
            json.dumps(_plain_config(transformer_config), indent=2, sort_keys=True) + "\n")
        (temp / PARTS["image_tokenizer"][0]).write_text(
            json.dumps(image_tokenizer_config, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(text_tokenizer_file, temp / TEXT_TOKENIZER_FILE)
        log("writing the transformer's parameters")
        _save_arrays(temp / PARTS["transformer"][1], transformer_params)
        log("writing the image tokenizer's variables")
        _save_arrays(temp / PARTS["image_tokenizer"][1], tokenizer_variables)
        reranker_params = None
        if reranker is not None:
            reranker_params = _to_host(reranker.params)
            (temp / "reranker").mkdir()
            (temp / RERANKER[0]).write_text(json.dumps(
                _plain_config(reranker.config), indent=2, sort_keys=True) + "\n")
            shutil.copyfile(reranker.text_tokenizer, temp / RERANKER[2])
            log("writing the reranker's parameters")
            _save_arrays(temp / RERANKER[1], reranker_params)
        model_shapes = {}
        for name in MODEL_PARTS:
            part = model_parts.get(name)
            if part is None:
                continue
            host_params = _to_host(part.params)
            config_file, arrays = _model_part_files(name)
            (temp / name).mkdir()
            (temp / config_file).write_text(json.dumps(
                _plain_config(part.config), indent=2, sort_keys=True) + "\n")
            log(f"writing the {name.replace('_', ' ')}'s parameters")
            _save_arrays(temp / arrays, host_params)
            model_shapes[name] = tree_shapes(host_params)
        files = _file_table(temp)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "parts": {
                "transformer": {
                    "config": PARTS["transformer"][0], "arrays": PARTS["transformer"][1],
                    "dtype": dtype, "shapes": tree_shapes(transformer_params),
                    "source": sources.get("transformer", {})},
                "image_tokenizer": {
                    "config": PARTS["image_tokenizer"][0],
                    "arrays": PARTS["image_tokenizer"][1],
                    "shapes": tree_shapes(tokenizer_variables),
                    "source": sources.get("image_tokenizer", {})},
                "text_tokenizer": {"file": TEXT_TOKENIZER_FILE,
                                   "source": sources.get("text_tokenizer")},
                **({"reranker": {
                    "config": RERANKER[0], "arrays": RERANKER[1],
                    "text_tokenizer": RERANKER[2], "shapes": tree_shapes(reranker_params),
                    "source": sources.get("reranker") or {}}} if reranker is not None
                   else {}),
                **{name: {"config": _model_part_files(name)[0],
                          "arrays": _model_part_files(name)[1], "shapes": shapes,
                          "source": sources.get(name) or {}}
                   for name, shapes in model_shapes.items()},
            },
            "files": files,
            "bundle_bytes": sum(f["size"] for f in files.values()),
            **(extra or {}),
        }
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        temp.rename(output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return manifest


# -------------------------------------------------------------------------------- load


@dataclasses.dataclass
class Bundle:
    """A verified bundle's contents, its arrays on the mesh they were loaded onto."""
    path: epath.Path
    manifest: dict[str, Any]
    transformer_config: ml_collections.ConfigDict
    transformer_params: Any
    image_tokenizer_config: ml_collections.ConfigDict
    image_tokenizer_variables: Any
    text_tokenizer: text_tokenizer_lib.TextTokenizer
    mesh: jax.sharding.Mesh
    reranker: RerankerPart | None = None  # the optional contrastive model
    upsampler: ModelPart | None = None  # the optional diffusion upsampler
    unclip_decoder: ModelPart | None = None  # unCLIP's optional decoder and prior
    unclip_prior: ModelPart | None = None


def read_manifest(path: epath.Path) -> dict[str, Any]:
    """The manifest of the bundle at ``path``; raises :class:`BundleError` when there is
    none, it is not JSON, or its format or version is not one this code reads."""
    if not path.exists():
        raise BundleError(f"bundle {path} not found")
    if not path.is_dir():
        raise BundleError(f"bundle {path} is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"bundle {path}: no {MANIFEST} (not a bundle, or an export that "
                          "did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle {path}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"bundle {path}: {MANIFEST} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle {path}: format version {version!r} is not one this "
                          f"dalle_jax reads (version {FORMAT_VERSION}); export it again")
    for key in ("parts", "files"):
        if not isinstance(manifest.get(key), dict):
            raise BundleError(f"bundle {path}: {MANIFEST} has no {key!r}")
    return manifest


def _part_of(name: str) -> str:
    if name == TEXT_TOKENIZER_FILE:
        return "text_tokenizer"
    return name.split("/", 1)[0]


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Checks every file of the bundle against its manifest (presence, size, sha256)
    and that no file is missing from the manifest's parts; returns the manifest."""
    path = epath.Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest["files"].items():
        file = path / name
        part = _part_of(name)
        if not file.exists():
            raise BundleError(f"bundle {path}: {part}: file {name} is missing")
        size = file.stat().length
        if size != expected.get("size"):
            raise BundleError(f"bundle {path}: {part}: {name} is {size} bytes, the manifest "
                              f"says {expected.get('size')}")
        if checkpoint_lib.sha256_file(file) != expected.get("sha256"):
            raise BundleError(f"bundle {path}: {part}: {name} does not match its checksum")
    for part in ("transformer", "image_tokenizer", "text_tokenizer"):
        if part not in manifest["parts"]:
            raise BundleError(f"bundle {path}: {MANIFEST} has no {part!r} part")
    return manifest


def _config(path: epath.Path, manifest, part: str) -> ml_collections.ConfigDict:
    try:
        text = (path / manifest["parts"][part]["config"]).read_text()
        return config_lib.config_from_json(text)
    except (KeyError, json.JSONDecodeError) as e:
        raise BundleError(f"bundle {path}: {part}: unreadable config ({e})") from None


def _check_shapes(path: epath.Path, part: str, abstract, recorded: dict[str, list]) -> None:
    """The config's parameter shapes against the manifest's (the arrays on disk)."""
    expected = {k: v[0] for k, v in tree_shapes(abstract).items()}
    saved = {k: v[0] for k, v in recorded.items()}
    if expected == saved:
        return
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    wrong = sorted(k for k in set(expected) & set(saved) if expected[k] != saved[k])
    if wrong:
        detail = f"{wrong[0]} is {saved[wrong[0]]} in the arrays, {expected[wrong[0]]} by the config"
    elif missing:
        detail = f"the config has {missing[0]}, the arrays do not"
    else:
        detail = f"the arrays have {extra[0]}, the config does not"
    raise BundleError(f"bundle {path}: {part}: parameters do not match its config "
                      f"({len(wrong) + len(missing) + len(extra)} arrays differ; {detail})")


def _restore(path: epath.Path, part: str, abstract):
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(checkpoint_lib.absolute(path), abstract)
    except Exception as e:  # pylint: disable=broad-except
        raise BundleError(f"bundle {path.parent.parent}: {part}: arrays cannot be read "
                          f"({checkpoint_lib._first_line(e)})") from None  # pylint: disable=protected-access
    finally:
        checkpointer.close()


def _with_dtypes(abstract, recorded: dict[str, list]):
    def retype(p, x):
        dtype = recorded[_leaf_name(p)][1]
        return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=x.sharding)
    return jax.tree_util.tree_map_with_path(retype, abstract)


def load(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
         *, check: bool = True) -> Bundle:
    """Verifies (unless ``check`` is False) and loads the bundle at ``path``, its arrays
    sharded on ``mesh`` (this host's devices along the batch axis by default)."""
    path = epath.Path(path)
    manifest = verify(path) if check else read_manifest(path)
    mesh = runs.local_batch_mesh() if mesh is None else mesh
    parts = manifest["parts"]

    t_config = _config(path, manifest, "transformer")
    try:
        model_config = stage2.model_config(t_config)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise BundleError(f"bundle {path}: transformer: config is not a stage-2 config "
                          f"({e})") from None
    model = transformer_lib.Transformer(model_config)
    abstract = runs.abstract_variables(
        t_config, lambda rng: stage2.init_variables(model, rng), mesh)["params"]
    _check_shapes(path, "transformer", abstract, parts["transformer"].get("shapes", {}))
    abstract = _with_dtypes(abstract, parts["transformer"]["shapes"])
    params = _restore(path / parts["transformer"]["arrays"], "transformer", abstract)

    i_config = _config(path, manifest, "image_tokenizer")
    if i_config.get("sharding") is None:
        i_config.sharding = t_config.sharding
    try:
        i_model = image_tokenizers.from_config(i_config.model)
        i_abstract = runs.abstract_variables(
            i_config, lambda rng: stage1.init_variables(i_model, i_config.data.image_size,
                                                        rng), mesh)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise BundleError(f"bundle {path}: image_tokenizer: config is not a stage-1 config "
                          f"({e})") from None
    _check_shapes(path, "image_tokenizer", i_abstract,
                  parts["image_tokenizer"].get("shapes", {}))
    i_abstract = _with_dtypes(i_abstract, parts["image_tokenizer"]["shapes"])
    variables = _restore(path / parts["image_tokenizer"]["arrays"], "image_tokenizer",
                         i_abstract)

    text_file = path / parts["text_tokenizer"].get("file", TEXT_TOKENIZER_FILE)
    try:
        text = text_tokenizer_lib.TextTokenizer(text_file, t_config.text.text_len)
    except Exception as e:  # pylint: disable=broad-except
        raise BundleError(f"bundle {path}: text_tokenizer: {text_file.name} cannot be "
                          f"loaded ({checkpoint_lib._first_line(e)})") from None  # pylint: disable=protected-access
    if text.vocab_size > model_config.text_vocab_size:
        raise BundleError(f"bundle {path}: text_tokenizer: {text.vocab_size} pieces, more "
                          f"than the transformer's text vocabulary "
                          f"{model_config.text_vocab_size}")
    reranker = _load_reranker(path, manifest, mesh) if "reranker" in parts else None
    models = {name: _load_model_part(path, manifest, mesh, name, reranker)
              for name in MODEL_PARTS if name in parts}
    return Bundle(path, manifest, t_config, params, i_config, variables, text, mesh,
                  reranker, **models)


def _load_reranker(path: epath.Path, manifest, mesh) -> RerankerPart:
    part = manifest["parts"]["reranker"]
    config = _config(path, manifest, "reranker")
    try:
        model = contrastive_lib.ContrastiveModel(stage_c.model_config(config))
        abstract = runs.abstract_variables(
            config, lambda rng: stage_c.init_variables(model, rng), mesh)["params"]
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise BundleError(f"bundle {path}: reranker: config is not a contrastive model's "
                          f"config ({e})") from None
    _check_shapes(path, "reranker", abstract, part.get("shapes", {}))
    abstract = _with_dtypes(abstract, part["shapes"])
    params = _restore(path / part["arrays"], "reranker", abstract)
    text_file = path / part.get("text_tokenizer", RERANKER[2])
    try:
        text = text_tokenizer_lib.TextTokenizer(text_file, config.text.text_len)
    except Exception as e:  # pylint: disable=broad-except
        raise BundleError(f"bundle {path}: reranker: {text_file.name} cannot be loaded "
                          f"({checkpoint_lib._first_line(e)})") from None  # pylint: disable=protected-access
    return RerankerPart(config, params, text)


def _model_part_files(name: str) -> tuple[str, str]:
    return f"{name}/config.json", f"{name}/params"


def _model_init(name: str, config: ml_collections.ConfigDict,
                reranker: RerankerPart | None) -> Callable[[jax.Array], Any]:
    """rng → the boxed variables of optional part ``name`` as ``config`` describes it."""
    if name == "upsampler":
        model = unet_lib.UNet(stage_u.model_config(config))
        return lambda rng: stage_u.init_variables(model, rng)
    if reranker is None:
        raise BundleError(f"the {name.replace('_', ' ')} reads the reranker's embeddings, "
                          "but the bundle has no reranker part")
    embed_dim = int(reranker.config.model.embed_dim)
    if name == "unclip_decoder":
        from dalle_jax.stages import unclip_decoder as stage_d  # pylint: disable=g-import-not-at-top
        model = unet_lib.UNet(stage_d.model_config(config, embed_dim))
        size = int(config.data.image_size)
        return lambda rng: stage_d.init_variables(model, rng, size)
    from dalle_jax.stages import unclip_prior as stage_p  # pylint: disable=g-import-not-at-top
    return stage_p.bundle_init(config, reranker.config)


def _load_model_part(path: epath.Path, manifest, mesh, name: str,
                     reranker: RerankerPart | None) -> ModelPart:
    part = manifest["parts"][name]
    config = _config(path, manifest, name)
    label = name.replace("_", " ")
    try:
        init = _model_init(name, config, reranker)
        abstract = runs.abstract_variables(config, init, mesh)["params"]
    except BundleError as e:
        raise BundleError(f"bundle {path}: {e}") from None
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise BundleError(f"bundle {path}: {name}: config is not the {label}'s config "
                          f"({e})") from None
    _check_shapes(path, name, abstract, part.get("shapes", {}))
    abstract = _with_dtypes(abstract, part["shapes"])
    return ModelPart(config, _restore(path / part["arrays"], name, abstract))
