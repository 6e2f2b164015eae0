"""Every config value and path a command uses, checked before the command starts work.

:func:`dalle_jax.config.flags_parser` calls :func:`check_command` once the flags are
parsed, before a job reads data or compiles anything. The first mistake found stops
the command with one line naming the config key (or flag) and what is allowed, e.g.
``config.checkpoint.save_every: must be a positive integer, got 0``.

Everything is in tables:

- :data:`RULES`: config key path (``"checkpoint.save_every"``) or flag (``"--split"``)
  → the checks its value must pass. A rule applies only when its key is in the config
  (or its flag is defined for the job), and only to the jobs it names (all by default).
  Rules marked ``io`` look at files or at what a command must supply (a required path,
  a split that must exist, a directory that must be writable); the others depend on the
  config alone, so every config file with its defaults passes them.
- :data:`JOBS`: what each job's ``--workdir`` is (:data:`WORKDIR_ROLES`), whether it needs
  ``--config``, and the positional arguments it takes.
- Besides the rules, a tuple value must hold elements of the type its config file's
  default holds (``--config.encode.splits=7`` gives ``(7,)``, refused).

The allowed values of the enumerations are small literal tables (nothing heavy is
imported while the flags are parsed); tests/test_mistakes.py asserts that each equals
the table of the code that consumes it.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

from dalle_jax import errors
from dalle_jax import signals

# --- allowed values, each equal to its consumer's --------------------------------------

MODEL_KINDS = ("dvae", "vqvae")  # dalle_jax.models.image_tokenizers.KINDS
CONTRASTIVE_LOSSES = ("sigmoid", "softmax")  # dalle_jax.models.contrastive.LOSSES
BACKBONES = ("dvae", "space_to_depth")  # dalle_jax.models.image_tokenizers.BACKBONES
RECON_LOSSES = ("mse", "logit_laplace")  # dalle_jax.stages.image_tokenizer's loss
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "everything")  # models.remat
SCHEDULES = ("cosine", "constant", "step")  # dalle_jax.train.optimizer
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # jnp.dtype names of a compute dtype
ATTENTION_KINDS = ("dense", "row", "column", "conv")  # models.transformer.ATTENTION_KINDS
ATTENTION_PRESET = "dalle"  # models.transformer.layer_schedule's preset
CONV_MASKS = ("raster", "wrap_columns")  # models.transformer.CONV_MASKS
SOURCES = ("captioned_shapes", "tfds", "records", "codes")  # data.sources.make_source
PREPROCESS = ("resize", "photo")  # data.pipeline.InputPipeline
TEXT_MODEL_TYPES = ("bpe", "unigram", "char", "word")  # sentencepiece model types
MESH_AXES = ("data", "fsdp", "tensor")  # dalle_jax.train.sharding.MESH_AXES
SHAPES_SPLITS = ("train", "validation", "test", "holdout")  # data.shapes_tfds split_sizes
SHAPES_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan",
                  "white")  # dalle_jax.data.shapes.COLOURS
SHAPES_SHAPES = ("circle", "square", "triangle", "diamond", "star")  # data.shapes.SHAPES
DIFFUSION_SCHEDULES = ("cosine", "linear")  # dalle_jax.diffusion.schedules.SCHEDULES
PREDICTIONS = ("eps", "x0", "v")  # dalle_jax.diffusion.parameterization.PREDICTIONS
# sentencepiece needs the pad and unknown pieces and at least one character.
MIN_TEXT_VOCAB = 3

STAGE1_TASK = "dalle_jax.stages.image_tokenizer"
CONTRASTIVE_TASK = "dalle_jax.stages.contrastive"
CONFIG_FILE = "config.json"  # dalle_jax.config.CONFIG_FILE_NAME
CHECKPOINTS = "checkpoints"  # dalle_jax.inference.runs.CHECKPOINTS
ARCHITECTURE_FILE = "architecture.json"  # models.openai_dvae.ARCHITECTURE_FILE
CONVERSION_PARAMS = "params"  # models.openai_dvae.PARAMS_DIR
TEXT_TOKENIZER_FILE = "text_tokenizer.model"  # data.text_tokenizer.TEXT_TOKENIZER_FILE_NAME
# The model fields that fix a stage-1 run's parameter shapes.
STAGE1_ARCHITECTURE = ("kind", "vocab_size", "n_hid", "n_blk_per_group", "group_count",
                       "n_init", "backbone", "widths")

# Keys whose value is prose or otherwise anything: no rule. An entry ending in "." is a
# section: "big." is the checkpoint benchmark's copy of configs/transformer_photos.py,
# whose sizes it reads (that file's own keys have rules).
# Free-form, or checked elsewhere: the stage configs nested in configs/demo.py are checked
# by the demo against the training job's rules (dalle_jax.tools.demo), and the demo
# config nested in configs/bench_generate.py when it is loaded.
FREE_FORM = frozenset({"known_gap", "big.", "image_tokenizer.", "transformer.", "reranker.",
                       "demo.image_tokenizer.", "demo.transformer.", "demo.reranker.",
                       "demo.data.",
                       "demo.text.", "demo.demo.", "demo.seed"}
                      # configs/demo.py:upsample nests configs/upsampler_shapes.py
                      | {f"upsampler.{section}." for section in (
                          "upsampler", "model", "diffusion", "data", "optimizer", "train",
                          "checkpoint", "mesh", "sharding", "profile")}
                      | {f"upsampler.{key}" for key in (
                          "task", "seed", "batch_size", "total_steps")})


def records_metadata_name(name: str, split: str) -> str:
    """A converted split's metadata file (``data.image_records.metadata_file_name``)."""
    return f"{name}-{split}.json"


def codes_metadata_name(name: str, split: str) -> str:
    """An encoded split's metadata file (``data.code_records.metadata_name``)."""
    return f"{name}-{split}.codes.json"


# --- the context a check sees ----------------------------------------------------------

_MISSING = object()


@dataclasses.dataclass
class Context:
    """The command being checked: its job, config, workdir and other flag values."""

    job: str
    config: Any  # a ConfigDict, or None (bench all / report)
    workdir: str | None = None
    flag_values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    positional: Sequence[str] = ()

    def get(self, key: str, default: Any = None) -> Any:
        """The value at ``key`` ("a.b.c") of the config, or a flag's ("--name")."""
        if key.startswith("--"):
            value = self.flag_values.get(key[2:], _MISSING)
            return default if value is _MISSING else value
        value = lookup(self.config, key)
        return default if value is _MISSING else value

    def has(self, key: str) -> bool:
        if key.startswith("--"):
            return key[2:] in self.flag_values
        return lookup(self.config, key) is not _MISSING

    def flag(self, name: str) -> Any:
        return self.flag_values.get(name)


def lookup(config: Any, key: str) -> Any:
    """``config``'s value at the dotted ``key``; ``_MISSING`` when it has none."""
    node = config
    for part in key.split("."):
        try:
            if part not in node:
                return _MISSING
            node = node[part]
        except TypeError:
            return _MISSING
    return node


def leaf_keys(config: Any, prefix: str = "") -> Iterator[str]:
    """The dotted paths of every value of ``config`` that is not itself a section."""
    for name in config.keys():
        value = config[name]
        key = f"{prefix}{name}"
        if hasattr(value, "keys") and not isinstance(value, (str, bytes)):
            yield from leaf_keys(value, key + ".")
        else:
            yield key


# --- checks: (value, context) -> what is wrong, or None --------------------------------

Check = Callable[[Any, Context], "str | None"]


def _show(value: Any) -> str:
    return repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def integer(minimum: int | None = None, maximum: int | None = None) -> Check:
    if minimum == 1 and maximum is None:
        what = "a positive integer"
    elif minimum == 0 and maximum is None:
        what = "a non-negative integer"
    elif maximum is None:
        what = f"an integer of at least {minimum}"
    else:
        what = f"an integer in [{minimum}, {maximum}]"

    def check(value, ctx):
        del ctx
        if (not _is_int(value) or (minimum is not None and value < minimum)
                or (maximum is not None and value > maximum)):
            return f"must be {what}, got {_show(value)}"
        return None
    return check


POSITIVE_INT = integer(1)
NON_NEGATIVE_INT = integer(0)


def number(low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Check:
    if low is not None and high is not None:
        what = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}"
                f"{')' if high_open else ']'}")
    elif low == 0 and low_open:
        what = "a positive number"
    elif low == 0:
        what = "a non-negative number"
    elif low is not None:
        what = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        what = "a finite number"

    def check(value, ctx):
        del ctx
        ok = _is_number(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        return None if ok else f"must be {what}, got {_show(value)}"
    return check


POSITIVE_NUMBER = number(0, low_open=True)
NON_NEGATIVE_NUMBER = number(0)
FRACTION = number(0, 1, high_open=True)  # [0, 1)


def one_of(allowed: Sequence[str]) -> Check:
    def check(value, ctx):
        del ctx
        if value not in allowed:
            return f"must be one of {', '.join(map(repr, allowed))}; got {_show(value)}"
        return None
    return check


def boolean(value, ctx):
    del ctx
    return None if isinstance(value, bool) else f"must be True or False, got {_show(value)}"


def text(value, ctx):
    """A non-empty string."""
    del ctx
    if not isinstance(value, str) or not value.strip():
        return f"must be a non-empty string, got {_show(value)}"
    return None


def file_name_part(value, ctx):
    """A non-empty string that can be part of a file name (a dataset or split name)."""
    if problem := text(value, ctx):
        return problem
    if "/" in value or "\\" in value or value in (".", ".."):
        return f"must be a name without '/' (part of a file name), got {_show(value)}"
    return None


def optional(check: Check) -> Check:
    """``check``, or None / "" (unset)."""
    def optional_check(value, ctx):
        return None if value in (None, "") else check(value, ctx)
    return optional_check


def tuple_of(check: Check, *, nonempty: bool = False, length: int | None = None,
             what: str = "") -> Check:
    def tuple_check(value, ctx):
        shown = what or "a tuple"
        if not isinstance(value, (tuple, list)):
            return f"must be {shown}, got {_show(value)}"
        if nonempty and not value:
            return f"must be {shown} with at least one element, got ()"
        if length is not None and len(value) != length:
            return f"must be {shown} of {length} elements, got {_show(value)}"
        for element in value:
            if problem := check(element, ctx):
                return problem + (f" (in {_show(tuple(value))})" if len(value) > 1 else "")
        return None
    return tuple_check


def _downsample(config) -> int | None:
    group_count = lookup(config, "model.group_count")
    return 2 ** (group_count - 1) if _is_int(group_count) and group_count > 0 else None


def divisible_by_downsample(value, ctx):
    """A stage-1 image size: a multiple of the dVAE's 2^(group_count − 1)."""
    factor = _downsample(ctx.config)
    if factor and _is_int(value) and value % factor:
        return (f"must be a multiple of {factor} (2^(model.group_count − 1) with "
                f"model.group_count={ctx.get('model.group_count')}), got {value}")
    return None


def backbone_widths(value, ctx):
    """The space_to_depth backbone's widths: one per halving."""
    if ctx.get("model.backbone") != "space_to_depth":
        return None
    group_count = ctx.get("model.group_count")
    if _is_int(group_count) and len(value) != group_count - 1:
        return (f"the space_to_depth backbone takes one width per halving, "
                f"model.group_count - 1 = {group_count - 1} of them; got {_show(value)}")
    return None


def contrastive_image_size(value, ctx):
    """The contrastive image tower halves the image once per width."""
    size = ctx.get("data.image_size")
    if _is_int(size) and isinstance(value, (tuple, list)) and size % 2 ** len(value):
        return (f"{len(value)} widths halve the image {len(value)} times, but "
                f"config.data.image_size={size} is not a multiple of {2 ** len(value)}")
    return None


def stage1_image_size(value, ctx):
    if ctx.has("model.kind"):  # a stage-1 config
        return divisible_by_downsample(value, ctx)
    return None


def at_most(other: str) -> Check:
    def check(value, ctx):
        limit = ctx.get(other)
        if _is_int(value) and _is_int(limit) and value > limit:
            return f"must be at most {other} ({limit}), got {value}"
        return None
    return check


def divides(other: str) -> Check:
    def check(value, ctx):
        total = ctx.get(other)
        if _is_int(value) and value > 0 and _is_int(total) and total % value:
            return f"must divide {other} ({total}), got {value}"
        return None
    return check


def decay_steps(value, ctx):
    if ctx.get("optimizer.schedule") != "step":
        return None
    warmup = ctx.get("optimizer.warmup_steps")
    late = [s for s in value if _is_int(warmup) and _is_int(s) and s <= warmup]
    if late:
        return (f"must all come after optimizer.warmup_steps ({warmup}) with "
                f"schedule='step', got {_show(tuple(value))}")
    return None


def regex(value, ctx):
    del ctx
    if not isinstance(value, str):
        return f"must be a regular expression (a string), got {_show(value)}"
    try:
        re.compile(value)
    except re.error as e:
        return f"{value!r} is not a regular expression ({e})"
    return None


def mesh_axis(axis: str) -> Check:
    def check(value, ctx):
        if not _is_int(value) or (value < 1 and value != -1):
            return f"must be a positive integer or -1 (the remaining devices), got {_show(value)}"
        if value == -1:
            others = [a for a in MESH_AXES[:MESH_AXES.index(axis)] if ctx.get(f"mesh.{a}") == -1]
            if others:
                return f"at most one mesh axis may be -1; config.mesh.{others[0]} is -1 too"
        return None
    return check


def sharding_rules(value, ctx):
    del ctx
    what = ("must be a tuple of (logical axis, mesh axes) pairs, the mesh axes None, one of "
            f"{', '.join(map(repr, MESH_AXES))} or a tuple of those")
    if not isinstance(value, (tuple, list)):
        return f"{what}; got {_show(value)}"
    for pair in value:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
            return f"{what}; got {_show(pair)}"
        axes = pair[1]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        if not isinstance(axes, (tuple, list)) or any(a not in MESH_AXES for a in axes):
            return f"{what}; got {_show(pair)}"
    return None


def attention(value, ctx):
    if isinstance(value, str):
        if value != ATTENTION_PRESET and value not in ATTENTION_KINDS:
            return (f"must be {ATTENTION_PRESET!r}, one of "
                    f"{', '.join(map(repr, ATTENTION_KINDS))} or a tuple of those per "
                    f"layer; got {value!r}")
        return None
    if not isinstance(value, (tuple, list)) or any(k not in ATTENTION_KINDS for k in value):
        return (f"must be {ATTENTION_PRESET!r}, one of {', '.join(map(repr, ATTENTION_KINDS))} "
                f"or a tuple of those per layer; got {_show(value)}")
    layers = ctx.get("model.num_layers")
    if _is_int(layers) and len(value) != layers:
        return f"lists {len(value)} kinds for model.num_layers={layers} layers"
    return None


def odd_positive(value, ctx):
    del ctx
    if not _is_int(value) or value < 1 or value % 2 == 0:
        return f"must be a positive odd integer, got {_show(value)}"
    return None


def bpe_dropout(value, ctx):
    if problem := FRACTION(value, ctx):
        return problem
    model_type = ctx.get("text.model_type")
    if value and model_type is not None and model_type != "bpe":
        return f"must be 0 with text.model_type={model_type!r} (BPE-dropout needs 'bpe'), got {value}"
    return None


def holdout_pairs(value, ctx):
    what = (f"must be a tuple of (colour, shape) pairs, colours from "
            f"{', '.join(SHAPES_COLOURS)} and shapes from {', '.join(SHAPES_SHAPES)}")
    if not isinstance(value, (tuple, list)):
        return f"{what}; got {_show(value)}"
    for pair in value:
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or pair[0] not in SHAPES_COLOURS or pair[1] not in SHAPES_SHAPES):
            return f"{what}; got {_show(pair)}"
    num_holdout = ctx.get("data.num_holdout")
    if not value and _is_int(num_holdout) and num_holdout > 0:
        return f"needs at least one pair with data.num_holdout={num_holdout} (or set it to 0)"
    return None


def top_k(value, ctx):
    vocab = ctx.get("model.image_vocab_size")
    limit = vocab if _is_int(vocab) else None
    return integer(0, limit)(value, ctx)


def torch_device(value, ctx):
    del ctx
    if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        return f"must be 'cpu', 'cuda' or 'cuda:<index>', got {_show(value)}"
    return None


def task_module(value, ctx):
    """A module with ``make_task(config, workdir, mesh)``, found without importing it."""
    del ctx
    if not isinstance(value, str) or not value:
        return ("must name the stage's module, e.g. 'dalle_jax.stages.image_tokenizer', "
                f"got {_show(value)}")
    try:
        spec = importlib.util.find_spec(value)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return f"{value!r} is not an importable module (a stage such as {STAGE1_TASK!r})"
    origin = spec.origin or ""
    if origin.endswith(".py"):
        try:
            tree = ast.parse(open(origin, encoding="utf-8").read())
        except (OSError, SyntaxError, ValueError):
            return None  # importing it will say what is wrong
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
        if "make_task" not in names:
            return (f"{value!r} ({origin}) has no make_task(config, workdir, mesh): it is "
                    "not a stage module")
    return None


def data_source(value, ctx):
    task = ctx.get("task")
    if ctx.job == "train" and isinstance(task, str) and not task.startswith("dalle_jax."):
        return text(value, ctx)  # a stage of its own may make its own data
    return one_of(SOURCES)(value, ctx)


# --- paths -----------------------------------------------------------------------------


def is_remote(path: Any) -> bool:
    return "://" in str(path)


def _writable(directory: str) -> bool:
    """Whether a file can be created in ``directory``: tried, then removed (a stop
    signal waits until the probe is gone)."""
    with signals.deferred():
        try:
            fd, probe = tempfile.mkstemp(prefix=".dalle_jax-write-probe-", dir=directory)
        except OSError:
            return False
        os.close(fd)
        os.remove(probe)
    return True


def _nearest_existing(path: str) -> str:
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    return ancestor


def directory_problem(path: str) -> str | None:
    """What stops ``path`` being used as a directory to write into (new or existing)."""
    if is_remote(path):
        return None
    if os.path.lexists(path):
        if not os.path.isdir(path):
            return f"{path} is a file, not a directory"
        if not _writable(path):
            return f"{path} is not writable"
        return None
    ancestor = _nearest_existing(path)
    if not os.path.isdir(ancestor):
        return f"{path} cannot be created: {ancestor} is a file"
    if not _writable(ancestor):
        return f"{path} cannot be created: {ancestor} is not writable"
    return None


def file_problem(path: str) -> str | None:
    """What stops writing the file ``path`` (new, or replacing a file)."""
    if is_remote(path):
        return None
    if os.path.isdir(path):
        return f"{path} is a directory, not a file"
    return directory_problem(os.path.dirname(os.path.abspath(path)))


def existing_directory_problem(path: str) -> str | None:
    if is_remote(path):
        return None
    if not os.path.lexists(path):
        return f"{path} does not exist"
    if not os.path.isdir(path):
        return f"{path} is a file, not a directory"
    return None


def existing_file_problem(path: str) -> str | None:
    if is_remote(path):
        return None
    if not os.path.lexists(path):
        return f"{path} does not exist"
    if not os.path.isfile(path):
        return f"{path} is not a file"
    return None


def writable_directory(value, ctx):
    del ctx
    return directory_problem(value) if value else None


def writable_file(value, ctx):
    del ctx
    return file_problem(value) if value else None


def existing_directory(value, ctx):
    del ctx
    return existing_directory_problem(value) if value else None


def existing_file(value, ctx):
    del ctx
    return existing_file_problem(value) if value else None


def required(what: str) -> Check:
    def check(value, ctx):
        del ctx
        return f"is required: {what}" if value in (None, "") else None
    return check


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _steps(checkpoints: str) -> list[str]:
    try:
        return [n for n in os.listdir(checkpoints)
                if n.isdigit() and os.path.isdir(os.path.join(checkpoints, n))]
    except OSError:
        return []


def stage1_run_problem(path: str, config: Any = None) -> str | None:
    """What stops ``path`` being used as a trained stage-1 run (or a conversion of
    OpenAI's dVAE); with ``config``, its model must be the run's."""
    if is_remote(path):
        return None
    if problem := existing_directory_problem(path):
        return problem
    if os.path.exists(os.path.join(path, ARCHITECTURE_FILE)):
        return None  # a conversion of OpenAI's dVAE (dalle_jax.tools.convert_openai_dvae)
    hint = ("a stage-1 run is the --workdir of python -m dalle_jax.tools.train "
            "--config=configs/image_tokenizer_*.py, or a conversion of OpenAI's dVAE")
    run_config = _read_json(os.path.join(path, CONFIG_FILE))
    if not isinstance(run_config, dict):
        return f"{path} is not a stage-1 run: it has no readable {CONFIG_FILE} ({hint})"
    task = run_config.get("task") or ""
    if task != STAGE1_TASK:
        made_by = f"a run of {task}" if task else "a run of no stage"
        return f"{path} is {made_by}, not a stage-1 run ({hint})"
    if not _steps(os.path.join(path, CHECKPOINTS)):
        return (f"{path} has no checkpoint yet ({CHECKPOINTS}/ holds no step): train it "
                "until it saves one")
    model = lookup(config, "model") if config is not None else _MISSING
    run_model = run_config.get("model") or {}
    if model is not _MISSING and model is not None:
        keys = list(STAGE1_ARCHITECTURE) + (["code_dim"] if run_model.get("kind") == "vqvae" else [])
        for key in keys:
            ours = lookup(model, key)
            theirs = run_model.get(key)
            if isinstance(ours, tuple) and isinstance(theirs, list):
                theirs = tuple(theirs)  # JSON has no tuples
            if key in run_model and ours is not _MISSING and ours != theirs:
                return (f"{path} was trained with model.{key}={run_model[key]!r}, the config "
                        f"has {ours!r}: pass the run's config (its :arg and overrides)")
    return None


# --- splits and data -------------------------------------------------------------------


def _present_splits(data_dir: str, name: str, codes: bool) -> list[str]:
    suffix = ".codes.json" if codes else ".json"
    found = []
    try:
        for file_name in sorted(os.listdir(data_dir)):
            if file_name.startswith(f"{name}-") and file_name.endswith(suffix):
                split = file_name[len(name) + 1:-len(suffix)]
                if codes or not split.endswith(".codes"):
                    found.append(split)
    except OSError:
        pass
    return found


def split_problem(split: Any, ctx: Context) -> str | None:
    """Whether the config's data source has ``split`` (when that can be told here)."""
    if problem := file_name_part(split, ctx):
        return problem
    source = ctx.get("data.source")
    if source == "captioned_shapes":
        if split not in SHAPES_SPLITS:
            hint = (" (one split per element: repeat the flag once per split)" if "," in split
                    else "")
            return (f"{split!r} is not a split of captioned_shapes; it has "
                    f"{', '.join(map(repr, SHAPES_SPLITS))}{hint}")
        count = ctx.get(f"data.num_{split}")
        if _is_int(count) and count <= 0:
            return f"split {split!r} is empty (config.data.num_{split}={count})"
    elif source in ("records", "codes"):
        data_dir, name = ctx.get("data.data_dir"), ctx.get("data.name")
        if not data_dir or not isinstance(name, str) or is_remote(data_dir) or (
                not os.path.isdir(data_dir)):
            return None  # the data_dir rule speaks about it
        codes = source == "codes"
        metadata = (codes_metadata_name if codes else records_metadata_name)(name, split)
        if not os.path.exists(os.path.join(data_dir, metadata)):
            present = _present_splits(data_dir, name, codes)
            has = (f"it has {', '.join(map(repr, present))}" if present
                   else f"it holds no {'encoded' if codes else 'converted'} split of {name!r}")
            return f"{split!r} is not a split of {name!r} in {data_dir} ({has})"
    return None


def split_name(value, ctx):
    return split_problem(value, ctx)


def eval_split(value, ctx):
    if ctx.job == "eval_image_tokenizer" and ctx.flag("split"):
        return None  # --split names the one measured
    return split_problem(value, ctx)


def data_dir(value, ctx):
    source = ctx.get("data.source")
    if source == "captioned_shapes":
        if not value:
            return None
        if os.path.isdir(os.path.join(value, "captioned_shapes")):
            return None  # built there already: read
        return directory_problem(value)  # built there on first use
    if source == "tfds":
        return existing_directory_problem(value) if value else None
    if source in ("records", "codes"):
        if not value:
            made_by = ("the converted records (dalle_jax.tools.convert_images' "
                       "config.output_dir)" if source == "records" else
                       "the code shards (dalle_jax.tools.encode_dataset's "
                       "config.encode.output_dir)")
            return f"is required with data.source={source!r}: the folder of {made_by}"
        if problem := existing_directory_problem(value):
            return problem
        if ctx.job == "train":
            return split_problem("train", ctx)
    return None


def code_shards_fit(value, ctx):
    """Code shards of the training split: their grid and vocabulary fit the model."""
    if ctx.get("data.source") != "codes" or not value or is_remote(value):
        return None
    name = ctx.get("data.name")
    metadata = _read_json(os.path.join(value, codes_metadata_name(str(name), "train")))
    if not isinstance(metadata, dict):
        return None
    grid, vocab = tuple(metadata.get("code_shape", ())), metadata.get("vocab_size", 0)
    model_grid, model_vocab = ctx.get("model.image_grid"), ctx.get("model.image_vocab_size")
    if model_grid is not None and grid and grid != tuple(model_grid):
        return (f"the code shards in {value} hold {grid} grids but config.model.image_grid "
                f"is {tuple(model_grid)}")
    if _is_int(model_vocab) and vocab > model_vocab:
        return (f"the code shards in {value} use {vocab} codes but "
                f"config.model.image_vocab_size is {model_vocab}")
    return None


def image_tokenizer_run(value, ctx):
    if not value:
        if ctx.get("data.source") not in (None, "codes"):
            return (f"is required with data.source={ctx.get('data.source')!r} (images): a "
                    "stage-1 run to encode them on the fly; or train from code shards "
                    "(data.source='codes')")
        return None
    return stage1_run_problem(value)


def upsampler_image_tokenizer_run(value, ctx):
    """The stage-1 run of the upsampler's round trips (needed when some inputs take one)."""
    if not value:
        if _is_number(ctx.get("upsampler.round_trip_prob")) and ctx.get(
                "upsampler.round_trip_prob") > 0:
            return ("is required with upsampler.round_trip_prob > 0: the stage-1 run whose "
                    "round trip (encode, decode) the low-resolution inputs take, e.g. "
                    "--config.upsampler.image_tokenizer_run=runs/demo/image_tokenizer (or "
                    "set --config.upsampler.round_trip_prob=0)")
        return None
    return stage1_run_problem(value)


def contrastive_run_problem(path: str) -> str | None:
    """What stops ``path`` being used as a trained contrastive run (the reranker whose
    frozen towers the unCLIP decoder and prior read)."""
    if is_remote(path):
        return None
    if problem := existing_directory_problem(path):
        return problem
    hint = ("a contrastive run is the --workdir of python -m dalle_jax.tools.train "
            "--config=configs/contrastive_*.py, e.g. runs/demo/reranker")
    run_config = _read_json(os.path.join(path, CONFIG_FILE))
    if not isinstance(run_config, dict):
        return f"{path} is not a contrastive run: it has no readable {CONFIG_FILE} ({hint})"
    task = run_config.get("task") or ""
    if task != CONTRASTIVE_TASK:
        made_by = f"a run of {task}" if task else "a run of no stage"
        return f"{path} is {made_by}, not a contrastive run ({hint})"
    if not _steps(os.path.join(path, CHECKPOINTS)):
        return (f"{path} has no checkpoint yet ({CHECKPOINTS}/ holds no step): train it "
                "until it saves one")
    return None


def reranker_run(value, ctx):
    """The contrastive run an unCLIP model is conditioned on: required, trained, and
    embedding images of the config's data.image_size."""
    if not value:
        return ("is required: the contrastive run whose frozen embeddings condition the "
                "model, e.g. runs/demo/reranker")
    if problem := contrastive_run_problem(value):
        return problem
    run_config = _read_json(os.path.join(value, CONFIG_FILE)) or {}
    theirs = (run_config.get("data") or {}).get("image_size")
    ours = ctx.get("data.image_size")
    if _is_int(theirs) and _is_int(ours) and theirs != ours:
        return (f"{value} embeds {theirs} px images but config.data.image_size is {ours}")
    return None


def logsnr_range(value, ctx):
    low = ctx.get("diffusion.schedule.logsnr_min")
    if _is_number(value) and _is_number(low) and value <= low:
        return f"must be more than diffusion.schedule.logsnr_min ({low}), got {value}"
    return None


def unet_levels(value, ctx):
    """Attention level indices that exist (model.channel_mult has one level each)."""
    levels = ctx.get("model.channel_mult")
    if isinstance(levels, (tuple, list)) and isinstance(value, (tuple, list)):
        wrong = [v for v in value if _is_int(v) and not 0 <= v < len(levels)]
        if wrong:
            return (f"must name levels of model.channel_mult (0 to {len(levels) - 1}), got "
                    f"{wrong[0]}")
    return None


def text_tokenizer_path(value, ctx):
    """A tokenizer file to read, or to write (train_text_tokenizer; or absent)."""
    if not value or is_remote(value):
        return None
    if os.path.isfile(value) and ctx.job != "train_text_tokenizer":
        return None  # read, not written
    return file_problem(value)


def compiled_step(value, ctx):
    """A step saved by tools.compile --save, when one is named (empty: compile here)."""
    del ctx
    if not value:
        return None
    problem = existing_file_problem(value)
    return f"{problem} (write it with python -m dalle_jax.tools.compile --save)" if problem \
        else None


def coordinator(value, ctx):
    """A multi-process run started by hand names every process."""
    if not value:
        return None
    count, index = ctx.flag("num_processes"), ctx.flag("process_id")
    if count is None or index is None:
        return "needs --num_processes and --process_id"
    return None


def process_id(value, ctx):
    count = ctx.flag("num_processes")
    return integer(0, count - 1 if _is_int(count) and count > 0 else None)(value, ctx)


def existing_tokenizer(value, ctx):
    """train_text_tokenizer keeps a tokenizer unless --overwrite."""
    if value:
        return None
    path = ctx.get("text.tokenizer_path") or (
        os.path.join(ctx.workdir, TEXT_TOKENIZER_FILE) if ctx.workdir else None)
    if path and not is_remote(path) and os.path.isfile(path):
        return (f"{path} exists; pass --overwrite to replace it (a run's text tokens mean "
                "nothing under another tokenizer)")
    return None


def one_input(value, ctx):
    """convert_images: exactly one of input_dir and manifest."""
    manifest = ctx.get("manifest")
    if not value and not manifest:
        return ("set config.input_dir (a folder of images with .txt captions) or "
                "config.manifest (a .csv or .jsonl of paths and captions), e.g. "
                "--config.input_dir=/data/my_images")
    if value and manifest:
        return "set only one of config.input_dir and config.manifest"
    return None


def manifest_file(value, ctx):
    if not value:
        return None
    if os.path.splitext(value)[1].lower() not in (".csv", ".jsonl"):
        return f"must be a .csv or .jsonl file, got {value!r}"
    return existing_file(value, ctx)


def conversion_output(value, ctx):
    if not value:
        return None
    if problem := directory_problem(value):
        return problem
    if (not is_remote(value) and os.path.exists(os.path.join(value, CONVERSION_PARAMS))
            and not ctx.get("overwrite")):
        return (f"{value} already holds a conversion; set --config.overwrite=True to "
                "replace it")
    return None


def verify_image_size(value, ctx):
    if problem := POSITIVE_INT(value, ctx):
        return problem
    return divisible_by_downsample(value, ctx)


# --- the rule table --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    checks: tuple[Check, ...]
    jobs: frozenset[str] | None = None  # None: every job
    io: bool = False  # looks at files, or at what the command must supply


def rule(*checks: Check, jobs: Sequence[str] | None = None, io: bool = False) -> Rule:
    return Rule(tuple(checks), frozenset(jobs) if jobs is not None else None, io)


DATA_JOBS = ("train", "demo", "show_inputs", "train_text_tokenizer", "eval_image_tokenizer",
             "encode_dataset")
TEXT_JOBS = ("train", "demo", "show_inputs", "train_text_tokenizer")

RULES: dict[str, Rule] = {
    # The training core (dalle_jax/train/defaults.py).
    "task": rule(task_module, jobs=("train",)),
    "seed": rule(NON_NEGATIVE_INT),
    "batch_size": rule(POSITIVE_INT),
    "total_steps": rule(POSITIVE_INT),
    "mesh.data": rule(mesh_axis("data")),
    "mesh.fsdp": rule(mesh_axis("fsdp")),
    "mesh.tensor": rule(mesh_axis("tensor")),
    "mesh.dcn_data": rule(POSITIVE_INT),
    "sharding.rules": rule(sharding_rules),
    "optimizer.learning_rate": rule(POSITIVE_NUMBER),
    "optimizer.warmup_steps": rule(NON_NEGATIVE_INT, at_most("total_steps")),
    "optimizer.schedule": rule(one_of(SCHEDULES)),
    "optimizer.end_learning_rate": rule(NON_NEGATIVE_NUMBER),
    "optimizer.decay_steps": rule(tuple_of(POSITIVE_INT, what="a tuple of steps"), decay_steps),
    "optimizer.decay_factor": rule(POSITIVE_NUMBER),
    "optimizer.b1": rule(FRACTION),
    "optimizer.b2": rule(FRACTION),
    "optimizer.eps": rule(POSITIVE_NUMBER),
    "optimizer.weight_decay": rule(NON_NEGATIVE_NUMBER),
    "optimizer.no_decay": rule(tuple_of(regex, what="a tuple of regular expressions")),
    "optimizer.grad_clip_norm": rule(NON_NEGATIVE_NUMBER),
    "train.num_microbatches": rule(POSITIVE_INT, divides("batch_size")),
    "train.ema_decay": rule(FRACTION),
    "train.compute_dtype": rule(one_of(COMPUTE_DTYPES)),
    "train.remat_policy": rule(one_of(REMAT_POLICIES)),
    "train.max_nonfinite_steps": rule(POSITIVE_INT),
    "train.log_every": rule(NON_NEGATIVE_INT),
    "train.eval_every": rule(NON_NEGATIVE_INT),
    "train.summary_every": rule(NON_NEGATIVE_INT),
    "train.watchdog_seconds": rule(NON_NEGATIVE_NUMBER),  # 0 disables
    "train.compiled_step": rule(compiled_step, jobs=("train",), io=True),
    "checkpoint.save_every": rule(POSITIVE_INT),
    "checkpoint.max_to_keep": rule(POSITIVE_INT),
    "checkpoint.keep_every": rule(NON_NEGATIVE_INT),
    "checkpoint.async_save": rule(boolean),
    "checkpoint.strict": rule(boolean),
    "profile.start_step": rule(NON_NEGATIVE_INT),
    "profile.num_steps": rule(NON_NEGATIVE_INT),
    # Data (dalle_jax/data/presets.py).
    "data.source": rule(data_source),
    "data.name": rule(file_name_part),
    "data.image_size": rule(POSITIVE_INT, stage1_image_size),
    "data.num_train": rule(POSITIVE_INT),
    "data.num_validation": rule(NON_NEGATIVE_INT),
    "data.num_test": rule(NON_NEGATIVE_INT),
    "data.num_holdout": rule(NON_NEGATIVE_INT),
    "data.holdout_pairs": rule(holdout_pairs),
    "data.dataset_seed": rule(NON_NEGATIVE_INT),
    "data.image_key": rule(text),
    "data.caption_key": rule(text),
    "data.preprocess": rule(one_of(PREPROCESS)),
    "data.shuffle_buffer": rule(POSITIVE_INT),
    "data.data_dir": rule(data_dir, code_shards_fit, jobs=DATA_JOBS, io=True),
    # Text (configs/input_*.py, configs/transformer_*.py).
    "text.tokenizer_path": rule(text_tokenizer_path, jobs=TEXT_JOBS, io=True),
    "text.vocab_size": rule(integer(MIN_TEXT_VOCAB)),
    "text.model_type": rule(one_of(TEXT_MODEL_TYPES)),
    "text.text_len": rule(POSITIVE_INT),
    "text.bpe_dropout": rule(bpe_dropout),
    # The demo.
    "demo.prompts": rule(tuple_of(text, nonempty=True)),
    "demo.images_per_prompt": rule(POSITIVE_INT),
    "demo.seed": rule(NON_NEGATIVE_INT),
    "demo.test_prompts": rule(NON_NEGATIVE_INT),
    "demo.holdout_prompts": rule(NON_NEGATIVE_INT),
    "demo.eval_images_per_prompt": rule(POSITIVE_INT),
    "demo.candidates": rule(POSITIVE_INT),
    "demo.rerank_prompts": rule(NON_NEGATIVE_INT),
    "demo.rerank_candidates": rule(tuple_of(POSITIVE_INT, nonempty=True)),
    "demo.rerank_seeds": rule(POSITIVE_INT),
    "demo.reranker_examples": rule(POSITIVE_INT),
    "demo.upsampler_examples": rule(POSITIVE_INT),
    "demo.upsample_prompts": rule(NON_NEGATIVE_INT),
    "inputs.grid_rows": rule(POSITIVE_INT),
    "inputs.grid_cols": rule(POSITIVE_INT),
    "inputs.split": rule(file_name_part),
    # Stage 1 (configs/image_tokenizer_*.py; bench_dvae and the OpenAI conversion
    # share the architecture's fields).
    "model.kind": rule(one_of(MODEL_KINDS)),
    "model.image_size": rule(POSITIVE_INT),
    "model.vocab_size": rule(integer(2)),
    "model.n_hid": rule(POSITIVE_INT),
    "model.n_blk_per_group": rule(POSITIVE_INT),
    "model.group_count": rule(POSITIVE_INT),
    "model.n_init": rule(POSITIVE_INT),
    "model.output_channels": rule(POSITIVE_INT),
    "model.code_dim": rule(POSITIVE_INT),
    "model.vq_decay": rule(FRACTION),
    "model.vq_restart_threshold": rule(NON_NEGATIVE_NUMBER),
    "model.vq_normalize": rule(boolean),
    "model.straight_through": rule(boolean),
    "model.recon_loss": rule(one_of(RECON_LOSSES)),
    "model.backbone": rule(one_of(BACKBONES)),
    # The contrastive model (configs/contrastive_*.py).
    "model.image_widths": rule(tuple_of(POSITIVE_INT, nonempty=True, what="a tuple of widths"),
                               contrastive_image_size),
    "model.image_blocks": rule(NON_NEGATIVE_INT),
    "model.text_layers": rule(POSITIVE_INT),
    "model.text_heads": rule(POSITIVE_INT),
    "model.text_head_dim": rule(POSITIVE_INT),
    "model.embed_dim": rule(POSITIVE_INT),
    "model.init_temperature": rule(POSITIVE_NUMBER),
    "model.init_bias": rule(number()),
    "contrastive.loss": rule(one_of(CONTRASTIVE_LOSSES)),
    "contrastive.eval_split": rule(split_name),
    "contrastive.eval_batch_size": rule(POSITIVE_INT),
    "model.widths": rule(tuple_of(POSITIVE_INT, what="a tuple of widths"), backbone_widths),
    "stage1.temperature_start": rule(POSITIVE_NUMBER),
    "stage1.temperature_end": rule(POSITIVE_NUMBER),
    "stage1.temperature_steps": rule(POSITIVE_INT),
    "stage1.kl_weight": rule(NON_NEGATIVE_NUMBER),
    "stage1.marginal_kl_weight": rule(NON_NEGATIVE_NUMBER),
    "stage1.kl_warmup_steps": rule(NON_NEGATIVE_INT),
    "stage1.commitment_weight": rule(NON_NEGATIVE_NUMBER),
    "stage1.eval_split": rule(file_name_part),
    "encode.output_dir": rule(optional(text)),
    "encode.splits": rule(tuple_of(file_name_part, nonempty=True,
                                   what="a tuple of split names")),
    "encode.batch_size": rule(POSITIVE_INT),
    "encode.chunk_size": rule(NON_NEGATIVE_INT),
    # Stage 2 (configs/transformer_*.py).
    "model.image_vocab_size": rule(integer(2)),
    "model.image_grid": rule(tuple_of(POSITIVE_INT, length=2,
                                      what="a (height, width) pair of positive integers")),
    "model.num_layers": rule(POSITIVE_INT),
    "model.num_heads": rule(POSITIVE_INT),
    "model.head_dim": rule(POSITIVE_INT),
    "model.mlp_ratio": rule(POSITIVE_INT),
    "model.attention": rule(attention),
    "model.conv_kernel": rule(odd_positive),
    "model.conv_mask": rule(one_of(CONV_MASKS)),
    "model.scan_layers": rule(boolean),
    "stage2.text_loss_weight": rule(NON_NEGATIVE_NUMBER),
    "stage2.image_loss_weight": rule(NON_NEGATIVE_NUMBER),
    "stage2.caption_dropout": rule(FRACTION),
    "stage2.eval_split": rule(file_name_part),
    "stage2.summary_prompts": rule(NON_NEGATIVE_INT),
    "stage2.summary_samples": rule(POSITIVE_INT),
    "stage2.sample.temperature": rule(POSITIVE_NUMBER),
    "stage2.sample.top_k": rule(top_k),
    "stage2.sample.top_p": rule(number(0, 1, low_open=True)),
    "stage2.sample.guidance_scale": rule(number()),
    "stage2.image_tokenizer": rule(image_tokenizer_run, jobs=("train",), io=True),
    # The diffusion upsampler (configs/upsampler_*.py).
    "model.base_width": rule(POSITIVE_INT),
    "model.channel_mult": rule(tuple_of(POSITIVE_INT, nonempty=True,
                                        what="a tuple of width multipliers")),
    "model.num_res_blocks": rule(POSITIVE_INT),
    "model.attention_levels": rule(tuple_of(NON_NEGATIVE_INT, what="a tuple of levels"),
                                   unet_levels),
    "model.dropout": rule(FRACTION),
    "model.num_groups": rule(POSITIVE_INT),
    "upsampler.factor": rule(integer(2)),
    "upsampler.crop_size": rule(NON_NEGATIVE_INT),
    "upsampler.blur_sigma": rule(NON_NEGATIVE_NUMBER),
    "upsampler.blur_prob": rule(number(0, 1)),
    "upsampler.round_trip_prob": rule(number(0, 1)),
    "upsampler.noise_aug_max": rule(FRACTION),
    "upsampler.residual": rule(boolean),
    "upsampler.eval_split": rule(file_name_part),
    "upsampler.image_tokenizer_run": rule(upsampler_image_tokenizer_run, jobs=("train",),
                                          io=True),
    # the unCLIP prior (configs/unclip_prior_*.py; its model.* and diffusion.* keys are
    # stage 2's and the upsampler's).
    "prior.reranker_run": rule(
        required("the contrastive run whose image embeddings the prior learns, e.g. "
                 "--config.prior.reranker_run=runs/demo/reranker"),
        reranker_run, jobs=("train",), io=True),
    "prior.text_drop_prob": rule(FRACTION),
    "prior.eval_split": rule(file_name_part),
    "prior.eval_split@exists": rule(split_name, jobs=("train",), io=True),
    "prior.eval_sample_steps": rule(NON_NEGATIVE_INT),
    "diffusion.schedule.name": rule(one_of(DIFFUSION_SCHEDULES)),
    "diffusion.schedule.logsnr_min": rule(number()),
    "diffusion.schedule.logsnr_max": rule(number(), logsnr_range),
    "diffusion.schedule.shift": rule(number()),
    "diffusion.schedule.beta_min": rule(POSITIVE_NUMBER),
    "diffusion.schedule.beta_max": rule(POSITIVE_NUMBER),
    "diffusion.prediction": rule(one_of(PREDICTIONS)),
    "diffusion.sample.steps": rule(POSITIVE_INT),
    "diffusion.sample.eta": rule(number(0, 1)),
    "diffusion.sample.noise_level": rule(FRACTION),
    "diffusion.sample.t_start": rule(number(0, 1, low_open=True)),
    "diffusion.sample.guidance_scale": rule(NON_NEGATIVE_NUMBER),
    # unCLIP's decoder (configs/unclip_decoder_*.py).
    "decoder.reranker_run": rule(reranker_run, jobs=("train",), io=True),
    "decoder.embedding_drop_prob": rule(FRACTION),
    "decoder.context_tokens": rule(NON_NEGATIVE_INT),
    "decoder.eval_split": rule(file_name_part),
    "decoder.eval_split@exists": rule(split_name, jobs=("train",), io=True),
    # convert_images (configs/convert_images.py).
    "input_dir": rule(one_input, existing_directory, jobs=("convert_images",), io=True),
    "manifest": rule(manifest_file, jobs=("convert_images",), io=True),
    "name": rule(file_name_part),
    "split": rule(file_name_part),
    "num_shards": rule(POSITIVE_INT),
    "max_pixels": rule(POSITIVE_INT),
    "min_size": rule(NON_NEGATIVE_INT),
    "num_workers": rule(optional(POSITIVE_INT)),
    # convert_openai_dvae (configs/image_tokenizer_openai.py).
    "encoder_pkl": rule(required("the released encoder.pkl, e.g. "
                                 "--config.encoder_pkl=/path/to/encoder.pkl"),
                        existing_file, jobs=("convert_openai_dvae",), io=True),
    "decoder_pkl": rule(required("the released decoder.pkl, e.g. "
                                 "--config.decoder_pkl=/path/to/decoder.pkl"),
                        existing_file, jobs=("convert_openai_dvae",), io=True),
    "overwrite": rule(boolean),
    "verify": rule(boolean),
    "verify_image_size": rule(verify_image_size),
    "verify_tolerance": rule(POSITIVE_NUMBER),
    # Benchmarks (configs/bench_*.py).
    "runlocal": rule(boolean),
    "warmup": rule(NON_NEGATIVE_INT),
    "repeats": rule(POSITIVE_INT),
    "chunk_size": rule(NON_NEGATIVE_INT),
    "threads": rule(NON_NEGATIVE_INT),
    "torch_device": rule(torch_device),
    "targets.min_speedup": rule(POSITIVE_NUMBER),
    "targets.min_mfu_percent": rule(number(0, 100, low_open=True)),
    "targets.min_cached_speedup": rule(POSITIVE_NUMBER),
    "targets.max_guidance_overhead": rule(POSITIVE_NUMBER),
    "warmup_batches": rule(NON_NEGATIVE_INT),
    "windows": rule(POSITIVE_INT),
    "batches_per_window": rule(POSITIVE_INT),
    "shapes_res": rule(POSITIVE_INT),
    "shapes_num_train": rule(POSITIVE_INT),
    "photos_num_images": rule(POSITIVE_INT),
    "photos_size": rule(tuple_of(POSITIVE_INT, length=2,
                                 what="a (height, width) pair of positive integers")),
    "photos_res": rule(POSITIVE_INT),
    "photos_num_shards": rule(POSITIVE_INT, at_most("photos_num_images")),
    "text_len": rule(POSITIVE_INT),
    "text_vocab_size": rule(integer(MIN_TEXT_VOCAB)),
    "bpe_dropout": rule(FRACTION),
    "bench.repeats": rule(POSITIVE_INT),
    "bench.batch_size": rule(POSITIVE_INT),
    "bench.prompts": rule(POSITIVE_INT),
    "bench.images_per_prompt": rule(POSITIVE_INT),
    "bench.cli": rule(boolean),
    "bench.candidates": rule(POSITIVE_INT),
    "bundle": rule(optional(text)),
    "run": rule(optional(text)),
    "bench.steps": rule(tuple_of(POSITIVE_INT, nonempty=True, what="a tuple of step counts")),
    "demo_report": rule(text),
    "demo_evaluation": rule(text),
    "bench.uncached_repeats": rule(POSITIVE_INT),
    "bench.uncached_positions": rule(POSITIVE_INT),
    "bench.train_batch_sizes": rule(tuple_of(POSITIVE_INT, nonempty=True,
                                             what="a tuple of batch sizes")),
    "bench.sample_batch_sizes": rule(tuple_of(POSITIVE_INT, nonempty=True,
                                              what="a tuple of batch sizes")),
    "bench.dtypes": rule(tuple_of(one_of(COMPUTE_DTYPES), nonempty=True,
                                  what="a tuple of compute dtypes")),
    "bench.guidance_scale": rule(number()),
    "bench.shard_repeats": rule(POSITIVE_INT),
    "bench.chips_per_host": rule(POSITIVE_INT),
    "bench.hosts_12b": rule(POSITIVE_INT),
    "bench.max_shard_bytes": rule(POSITIVE_INT),
    "bench.slices": rule(tuple_of(text, nonempty=True, what="a tuple of accelerator types")),
    "bench.smallest_generation": rule(one_of(("v4", "v5p", "v5litepod", "v5e", "v6e"))),
    "bench.smallest_chips": rule(tuple_of(POSITIVE_INT, nonempty=True,
                                          what="a tuple of chip counts")),
    "bench.policies": rule(tuple_of(one_of(REMAT_POLICIES), nonempty=True,
                                    what="a tuple of remat policies")),
    "bench.largest_model_slices": rule(tuple_of(text, what="a tuple of accelerator types")),
    "bench.layer_step": rule(POSITIVE_INT),
    "bench.max_layers": rule(POSITIVE_INT),
    # What a job needs from its config: splits that exist, paths it reads and writes.
    # A key with a second, job-specific rule is written "<key>@<what>"; both apply.
    "inputs.split@exists": rule(split_name, jobs=("show_inputs",), io=True),
    "stage1.eval_split@exists": rule(eval_split, jobs=("train", "eval_image_tokenizer"),
                                     io=True),
    "stage2.eval_split@exists": rule(split_name, jobs=("train",), io=True),
    "upsampler.eval_split@exists": rule(split_name, jobs=("train",), io=True),
    "encode.splits@exist": rule(tuple_of(split_name), jobs=("encode_dataset",), io=True),
    "encode.output_dir@writable": rule(
        required("the folder for the code shards, e.g. "
                 "--config.encode.output_dir=runs/<stage-1 run>/codes"),
        writable_directory, jobs=("encode_dataset",), io=True),
    "output_dir": rule(required("the folder to write, e.g. --config.output_dir=/data/out"),
                       writable_directory, jobs=("convert_images",), io=True),
    "output_dir@conversion": rule(
        required("the folder of the conversion, e.g. --config.output_dir=runs/openai_dvae"),
        conversion_output, jobs=("convert_openai_dvae",), io=True),
    # Flags (besides --workdir and --config, see JOBS).
    "--split": rule(split_name, jobs=("eval_image_tokenizer", "train_text_tokenizer"), io=True),
    "--overwrite": rule(existing_tokenizer, jobs=("train_text_tokenizer",), io=True),
    "--num_processes": rule(POSITIVE_INT, jobs=("train", "encode_dataset")),
    "--process_id": rule(process_id, jobs=("train", "encode_dataset")),
    "--coordinator_address": rule(coordinator, jobs=("train", "encode_dataset")),
    "--output_dir": rule(writable_directory, jobs=("bench",), io=True),
    "--page": rule(writable_file, jobs=("bench",), io=True),
}


def rule_key(name: str) -> str:
    """The config key or flag a table entry is about (``"demo.split@exists"`` → ``demo.split``)."""
    return name.partition("@")[0]


def covered_keys() -> set[str]:
    """The keys with a rule, and the free-form ones (sections end in ".")."""
    return {rule_key(k) for k in RULES} | set(FREE_FORM)


def is_covered(key: str) -> bool:
    """Whether ``key`` has a rule or is free-form."""
    return key in covered_keys() or any(
        key.startswith(f) for f in FREE_FORM if f.endswith("."))


# --- jobs: --config, --workdir and positional arguments --------------------------------

# What --workdir is, by role: (what it must be, an example).
WORKDIR_ROLES = {
    "run": ("a new or existing run directory", "--workdir=runs/<name>"),
    "stage1_run": ("a trained stage-1 run (the --workdir it was trained in) or a conversion "
                   "of OpenAI's dVAE", "--workdir=runs/dvae_shapes"),
    "scratch": ("a folder for the data the benchmark builds", "--workdir=/tmp/bench"),
}


@dataclasses.dataclass(frozen=True)
class Job:
    workdir: str | None  # a WORKDIR_ROLES key; None: the job takes no --workdir
    workdir_required: bool = True
    writes_workdir: bool = True
    config_required: bool = True
    takes_commands: bool = False  # one positional command (bench)


JOBS = {
    "train": Job("run"),
    "demo": Job("run"),
    "show_inputs": Job("run"),
    "train_text_tokenizer": Job("run", workdir_required=False),  # or text.tokenizer_path
    "eval_image_tokenizer": Job("stage1_run"),  # writes eval_<split>.json there
    "encode_dataset": Job("stage1_run", writes_workdir=False),
    "convert_images": Job(None),
    "convert_openai_dvae": Job(None),
    "compile": Job(None),  # compiles from shapes: no data, no run directory
    "bench": Job("scratch", workdir_required=False, config_required=False,
                 takes_commands=True),
    # Flags only (no --config): their mistakes are refused by the jobs themselves.
    "export": Job(None, config_required=False),
    "generate": Job(None, config_required=False),
    "evaluate": Job(None, config_required=False),
    "evaluate_contrastive": Job(None, config_required=False),
}


def bench_commands() -> tuple[str, ...]:
    from dalle_jax.bench import BENCHMARKS  # pylint: disable=g-import-not-at-top
    return (*BENCHMARKS, "all", "report")


def _config_kind(job: str) -> str:
    from dalle_jax import tools  # pylint: disable=g-import-not-at-top
    return tools.CONFIG_KINDS.get(job, "a config file (configs/*.py)")


def _check_positional(job: str, spec: Job, ctx: Context) -> None:
    args = list(ctx.positional)
    if not spec.takes_commands:
        if args:
            raise errors.UserError(
                f"unexpected argument{'s' if len(args) > 1 else ''} {' '.join(args)}: "
                f"dalle_jax.tools.{job} takes only flags (--config.<key>=<value> sets a "
                "config value)")
        return
    commands = bench_commands()
    if len(args) != 1 or args[0] not in commands:
        got = " ".join(args) if args else "none"
        raise errors.UserError(f"dalle_jax.tools.bench runs one of {', '.join(commands)}; "
                               f"got {got}")
    if args[0] in commands[:-2] and ctx.config is None:
        raise errors.UserError(f"--config is required for {args[0]}: {_config_kind(job)}")
    if args[0] == "all":
        _check_bench_all(ctx)


def _check_bench_all(ctx: Context) -> None:
    """``bench all`` reads <config_dir>/bench_<name>.py; the job checks each config with
    :func:`check_config` before any benchmark starts."""
    config_dir = ctx.flag("config_dir") or "configs"
    for name in bench_commands()[:-2]:
        path = os.path.join(config_dir, f"bench_{name}.py")
        if problem := existing_file_problem(path):
            raise errors.UserError(f"--config_dir: {problem}")


def _check_workdir(job: str, spec: Job, ctx: Context) -> None:
    workdir = ctx.workdir
    if spec.workdir is None:
        if workdir:
            raise errors.UserError(
                f"--workdir: dalle_jax.tools.{job} takes none; it writes to "
                "config.output_dir")
        return
    role, example = WORKDIR_ROLES[spec.workdir]
    if not workdir:
        needed = spec.workdir_required or (
            job == "train_text_tokenizer" and not ctx.get("text.tokenizer_path"))
        if needed:
            extra = (" (or set config.text.tokenizer_path)" if job == "train_text_tokenizer"
                     else "")
            raise errors.UserError(f"--workdir is required: {role}, e.g. {example}{extra}")
        return
    if spec.workdir == "stage1_run":
        # The problem says what a stage-1 run is.
        problem = stage1_run_problem(workdir, ctx.config)
        if not problem and spec.writes_workdir and not is_remote(workdir) and (
                not _writable(workdir)):
            problem = f"{workdir} is not writable (the results are written there)"
    else:
        problem = directory_problem(workdir)
        if problem:
            problem += f" (it must be {role})"
        elif spec.workdir == "run":
            problem = _other_stage_problem(workdir, ctx)
    if problem:
        raise errors.UserError(f"--workdir: {problem}")


def _other_stage_problem(workdir: str, ctx: Context) -> str | None:
    """A run of one stage is neither resumed nor overwritten by a config of another (or
    by an input config): the job would replace its config.json."""
    if is_remote(workdir):
        return None
    run_config = _read_json(os.path.join(workdir, CONFIG_FILE))
    task = run_config.get("task") if isinstance(run_config, dict) else None
    ours = ctx.get("task") or None
    if task and task != ours:
        this = f"this config trains {ours}" if ours else "this config is not a stage's"
        return (f"{workdir} is a run of {task}; {this} and would replace its {CONFIG_FILE}: "
                "use another --workdir")
    return None


# --- generic: a tuple's elements have the type of its default's ------------------------


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number" if isinstance(value, float) else "int"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (tuple, list)):
        return "tuple"
    return type(value).__name__


_KIND_NAMES = {"bool": "booleans", "int": "integers", "number": "numbers", "str": "strings",
               "tuple": "tuples"}


def _fits(value: Any, kind: str) -> bool:
    found = _kind(value)
    return found == kind or (kind == "number" and found == "int")


def default_type_problem(value: Any, default: Any) -> str | None:
    """Whether ``value`` has the element types of its non-empty tuple ``default``."""
    if not isinstance(default, (tuple, list)) or not default:
        return None
    kinds = {_kind(d) for d in default}
    if len(kinds) != 1:
        return None  # mixed elements: the key's rule, if any, decides
    kind = kinds.pop()
    what = f"a tuple of {_KIND_NAMES.get(kind, kind)} like its default {tuple(default)!r}"
    if not isinstance(value, (tuple, list)):
        return f"must be {what}, got {_show(value)}"
    for element in value:
        if not _fits(element, kind):
            return f"must be {what}, got {_show(tuple(value))}"
        if kind == "tuple":
            lengths = {len(d) for d in default}
            if len(lengths) == 1 and len(element) != lengths.pop():
                return f"must be {what}, got {_show(tuple(value))}"
            if default_type_problem(element, default[0]):
                return f"must be {what}, got {_show(tuple(value))}"
    return None


def _check_default_types(config: Any, defaults: Any) -> None:
    for key in leaf_keys(defaults):
        value = lookup(config, key)
        if value is _MISSING:
            continue
        if problem := default_type_problem(value, lookup(defaults, key)):
            raise errors.ConfigError(key, problem)


# --- entry points ----------------------------------------------------------------------


def _applies(entry: Rule, ctx: Context, key: str) -> bool:
    if entry.jobs is not None and ctx.job not in entry.jobs:
        return False
    if key.startswith("--"):
        return ctx.has(key)
    return ctx.config is not None and ctx.has(key)


def _run_rules(ctx: Context, io: bool) -> None:
    for name, entry in RULES.items():
        if entry.io != io:
            continue
        key = rule_key(name)
        if not _applies(entry, ctx, key):
            continue
        value = ctx.get(key)
        for check in entry.checks:
            if problem := check(value, ctx):
                if key.startswith("--"):
                    raise errors.UserError(f"{key}: {problem}")
                raise errors.ConfigError(key, problem)


def check_config(job: str, config: Any, *, defaults: Any = None,
                 ctx: Context | None = None) -> None:
    """The rules that depend on the config alone (no files, nothing a command must
    supply): every config file passes them with its defaults."""
    ctx = ctx or Context(job, config)
    if defaults is not None:
        _check_default_types(config, defaults)
    _run_rules(ctx, io=False)


def check_command(job: str, config: Any, workdir: str | None,
                  argv: Sequence[str] = (), *, flag_values: Mapping[str, Any] | None = None,
                  defaults: Any = None) -> None:
    """Raises :class:`~dalle_jax.errors.UserError` naming the first mistake of a command.

    ``argv``: the positional arguments; ``flag_values``: the job's other flags by name
    (read from absl's parsed flags when not given); ``defaults``: the config file as it
    is without overrides (its tuples' element types are checked when given).
    """
    spec = JOBS.get(job)
    if spec is None:
        return
    if flag_values is None:
        flag_values = _from_absl()
    ctx = Context(job, config, workdir, flag_values, tuple(argv))
    if config is None and spec.config_required:
        raise errors.UserError(f"--config is required: {_config_kind(job)}")
    _check_positional(job, spec, ctx)
    if config is not None:
        check_config(job, config, defaults=defaults, ctx=ctx)
        _run_rules(ctx, io=True)
    elif spec.takes_commands:  # bench all / report: flags only
        _run_rules(ctx, io=True)
    _check_workdir(job, spec, ctx)


# The flags (besides --config and --workdir) the rules read, when a job defines them.
_FLAGS = ("split", "overwrite", "output_dir", "page", "config_dir", "config_arg",
          "coordinator_address", "num_processes", "process_id")


def _from_absl() -> dict[str, Any]:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
        return {}
    return {name: flags.FLAGS[name].value for name in _FLAGS
            if name in flags.FLAGS and flags.FLAGS[name].value is not None}
