"""Ahead-of-time compilation of a run's steps for accelerators this host does not have.

A Cloud TPU slice is described by its accelerator type (``v4-256``, ``v5litepod-256``,
``v5p-512``, ``v6e-64``); :func:`topology` turns it into compile-only devices through
libtpu (``pip install "jax[tpu]"``), so a CPU host compiles the real train step of a
config, with its mesh and sharding rules, from shapes alone. The compiled executable's
memory analysis says what one chip holds; XLA refuses a program that needs more HBM
than the chip has, which :func:`compile_train_step` reports as :class:`DoesNotFit`.

    slice_ = topology("v5litepod-256")
    report = compile_train_step(config, slice_.devices)
    print(report.memory.total, slice_.hbm_bytes)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

import dalle_jax
from dalle_jax import errors
from dalle_jax.train import compiled as compiled_lib
from dalle_jax.train import metrics as metrics_lib
from dalle_jax.train import sharding as sharding_lib

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
    """What a TPU generation's accelerator types mean."""

    name: str  # libtpu's topology prefix: v4, v5e, v5p, v6e
    dims: int  # 3: a torus of chips (v4, v5p); 2: a grid (v5e, v6e)
    cores_per_chip: int  # what the number in the accelerator type counts per chip
    hbm_bytes: int  # per chip
    max_chips: int  # the largest slice of one pod


# Accelerator-type prefixes (as gcloud spells them) → generation. HBM per chip and the
# largest slice are Google's published figures.
GENERATIONS = {
    "v4": Generation("v4", 3, 2, 32 * GIB, 4096),
    "v5p": Generation("v5p", 3, 2, 95 * GIB, 8960),
    "v5litepod": Generation("v5e", 2, 1, 16 * GIB, 256),
    "v5e": Generation("v5e", 2, 1, 16 * GIB, 256),
    "v6e": Generation("v6e", 2, 1, 32 * GIB, 256),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """Compile-only devices of a TPU slice (or several, joined over the data-centre
    network), or this host's own devices (``"cpu"``)."""

    name: str  # as asked, e.g. v5litepod-256
    devices: tuple[Any, ...]
    chip_grid: tuple[int, ...]  # chips per dimension of one slice
    num_slices: int
    hbm_bytes: int | None  # per chip; None for host devices (no fixed budget)
    device_kind: str

    @property
    def chips(self) -> int:
        return len(self.devices)


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The chip layout of a slice of ``chips`` chips: v4 and v5p slices grow 2x2x1,
    2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; v5e and v6e 1x1, 2x2, 2x4, 4x4, 4x8, ... (each
    step doubles the smallest side, the last of equals)."""
    if chips == 1 and dims == 2:
        return (1, 1)
    grid = [2, 2] + [1] * (dims - 2)
    while math.prod(grid) < chips:
        smallest = min(grid)
        grid[max(i for i, g in enumerate(grid) if g == smallest)] *= 2
    if math.prod(grid) != chips:
        raise ValueError(f"{chips} chips is not a slice size (a power of two, from 4)")
    return tuple(grid)


def topology(name: str, num_slices: int = 1) -> Slice:
    """The compile-only devices of accelerator type ``name`` (``v4-256``), or this
    host's devices for ``"cpu"``. Raises :class:`~dalle_jax.errors.UserError` for a
    name that is not a slice."""
    if name == "cpu":
        if num_slices != 1:
            raise errors.UserError("--num_slices: only TPU slices join over the network")
        devices = tuple(jax.devices())
        return Slice(name, devices, (len(devices),), 1, None, devices[0].device_kind)
    match = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
    if not match:
        raise errors.UserError(
            f"--topology: {name!r} is not a TPU accelerator type; give one as gcloud names "
            f"it, e.g. v4-256, v5litepod-256 (or v5e-256), v5p-512, v6e-64, or cpu")
    generation = GENERATIONS[match.group(1)]
    count = int(match.group(2))
    if count % generation.cores_per_chip:
        raise errors.UserError(f"--topology: {name}: the number counts cores, "
                               f"{generation.cores_per_chip} per chip")
    chips = count // generation.cores_per_chip
    try:
        grid = chip_grid(chips, generation.dims)
    except ValueError as e:
        raise errors.UserError(f"--topology: {name}: {e}") from None
    if chips > generation.max_chips:
        raise errors.UserError(f"--topology: {name}: a {generation.name} pod has at most "
                               f"{generation.max_chips} chips; use --num_slices")
    if num_slices < 1:
        raise errors.UserError(f"--num_slices: must be positive, got {num_slices}")
    dalle_jax.quiet_libtpu_off_tpu()
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    kwargs = dict(
        # One JAX device per chip: v4 and v5p run their two cores as one (megacore).
        chip_config_name="megacore" if generation.cores_per_chip == 2 else "default",
        chips_per_host_bounds=(1, 1, 1) if chips == 1 else (2, 2, 1),
        # Full-size dimensions of a 3-D torus wrap around.
        wrap=tuple(generation.dims == 3 and g >= 4 for g in grid) + (False,) * (3 - len(grid)),
    )
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    described = topologies.get_topology_desc(
        f"{generation.name}:{'x'.join(map(str, grid))}", "tpu", **kwargs)
    devices = tuple(described.devices)
    return Slice(name, devices, grid, num_slices, generation.hbm_bytes,
                 devices[0].device_kind)


# --- compiling ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-chip bytes of a compiled step, as XLA's memory analysis gives them."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments (counted once)
    temporaries: int
    generated_code: int

    @property
    def total(self) -> int:
        return (self.arguments + self.outputs - self.aliased + self.temporaries
                + self.generated_code)

    @classmethod
    def of(cls, compiled) -> "Memory":
        stats = compiled.memory_analysis()
        return cls(arguments=int(stats.argument_size_in_bytes),
                   outputs=int(stats.output_size_in_bytes),
                   aliased=int(stats.alias_size_in_bytes),
                   temporaries=int(stats.temp_size_in_bytes),
                   generated_code=int(stats.generated_code_size_in_bytes))


class DoesNotFit(Exception):
    """The compiler refused the program: one chip's memory cannot hold it."""

    def __init__(self, message: str, needed: float | None = None,
                 available: float | None = None):
        super().__init__(message)
        self.needed = needed  # bytes, when the compiler said
        self.available = available


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_memory(error: Exception) -> DoesNotFit | None:
    """The :class:`DoesNotFit` an out-of-memory compile error means, else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    # XLA:TPU says either "Used 20.5G of 15.75G hbm" or "... (38.50G) exceeds
    # available HBM (15.75G)".
    used = (re.search(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", text)
            or re.search(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)",
                         text))
    needed = available = None
    if used:
        needed = float(used.group(1)) * _UNITS[used.group(2)]
        available = float(used.group(3)) * _UNITS[used.group(4)]
    summary = next((line.strip() for line in text.splitlines() if "memory" in line.lower()),
                   text.splitlines()[0] if text else "out of memory")
    return DoesNotFit(summary, needed, available)


@dataclasses.dataclass
class StepReport:
    """A compiled step: its memory, its FLOPs and how long compiling took."""

    name: str  # train_step, sample_step
    memory: Memory
    compile_seconds: float
    xla_flops: float  # per chip, as XLA counts the program (0 when not given)
    compiled: Any = dataclasses.field(repr=False, default=None)
    fingerprint: str = ""  # program_fingerprint of the lowered step


@dataclasses.dataclass
class TrainReport:
    """The train step of a config compiled for some devices."""

    step: StepReport
    mesh: dict[str, int]
    rules: tuple
    batch_size: int
    num_microbatches: int
    remat_policy: str
    parameters: int
    model_flops_per_step: float | None  # the task's analytic count, forward + backward
    peak_flops_per_chip: float | None
    sample: StepReport | None = None
    sample_batch: int = 0

    def step_seconds(self, mfu: float, chips: int) -> float | None:
        """The step time the model FLOPs imply at ``mfu`` of the chips' peak."""
        if not self.model_flops_per_step or not self.peak_flops_per_chip:
            return None
        return self.model_flops_per_step / (chips * self.peak_flops_per_chip * mfu)


def _make_task(config, mesh):
    from dalle_jax.train import trainer  # pylint: disable=g-import-not-at-top
    task = trainer.load_task(config, "", mesh)
    if not hasattr(task, "batch_spec"):
        raise errors.UserError(f"{config.task} gives no batch_spec(batch_size): its train "
                               "step cannot be compiled from shapes alone")
    return task


@contextlib.contextmanager
def _without_compilation_cache():
    """An executable read back from jax's persistent cache does not serialise whole
    (its functions are missing when loaded again): one to save is compiled afresh."""
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
    previous = jax.config.jax_enable_compilation_cache
    # jax decides once whether the cache is used; resetting makes it decide again.
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
        compilation_cache.reset_cache()


def _compile(name: str, lower: Callable[[], Any], *, fresh: bool = False) -> StepReport:
    start = time.perf_counter()
    try:
        with _without_compilation_cache() if fresh else contextlib.nullcontext():
            compiled = lower().compile()
    except Exception as e:  # pylint: disable=broad-except
        oom = _out_of_memory(e)
        if oom is None:
            raise
        raise oom from None
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return StepReport(name, Memory.of(compiled), seconds, flops, compiled)


def check_batch(config, mesh) -> None:
    """The global batch must split over the mesh's batch axes and the micro-batches."""
    shards = sharding_lib.batch_shard_count(mesh)
    microbatches = config.train.num_microbatches
    if config.batch_size % (shards * microbatches):
        raise errors.ConfigError(
            "batch_size", f"{config.batch_size} does not split into {microbatches} "
            f"micro-batch(es) over {shards} batch shards ("
            + " x ".join(f"{a} {mesh.shape[a]}" for a in sharding_lib.BATCH_AXES) + ")")


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[Any], *,
                       sample_batch: int | None = None,
                       for_saving: bool = False) -> TrainReport:
    """Compiles ``config``'s train step for ``devices`` from shapes (nothing is
    materialised); for stage 2 also its sampling step for ``sample_batch`` rows (default:
    one per batch shard; 0 skips it). ``for_saving``: compiled afresh, for :func:`save`.

    Raises :class:`DoesNotFit` when the compiler runs out of a chip's memory and
    :class:`~dalle_jax.errors.UserError` for a config that cannot be laid out on them.
    """
    from dalle_jax.train import trainer  # pylint: disable=g-import-not-at-top
    try:
        mesh = sharding_lib.make_mesh(config.mesh, devices)
    except ValueError as e:
        raise errors.ConfigError("mesh", str(e)) from None
    check_batch(config, mesh)
    rules = sharding_lib.logical_rules(config.sharding)
    task = _make_task(config, mesh)
    training = trainer.build(config, task, mesh, rules)
    inputs = compiled_lib.abstract_inputs(training, task, config, mesh)
    lowered = []

    def lower_train():
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            lowered.append(training.train_step.lower(*inputs))
        return lowered[-1]

    # Compile-only devices (a TPU slice described here) cannot load what jax's
    # persistent cache holds for them, nor use what would be written: skip it.
    compile_only = devices[0] not in jax.devices()
    step = _compile("train_step", lower_train, fresh=for_saving or compile_only)
    step.fingerprint = compiled_lib.program_fingerprint(lowered[-1])
    params = training.abstract_state.params
    report = TrainReport(
        step=step, mesh=dict(mesh.shape), rules=rules, batch_size=config.batch_size,
        num_microbatches=config.train.num_microbatches,
        remat_policy=config.train.remat_policy,
        parameters=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        model_flops_per_step=(task.flops_per_example * config.batch_size
                              if task.flops_per_example else None),
        peak_flops_per_chip=metrics_lib.device_peak_flops(
            devices[0], jnp.dtype(config.train.compute_dtype)))
    if hasattr(task, "lower_sample_step"):  # stage 2: its KV-cached sampler too
        rows = sharding_lib.batch_shard_count(mesh) if sample_batch is None else sample_batch
        if rows % sharding_lib.batch_shard_count(mesh):
            raise errors.UserError(f"--sample_batch: {rows} rows do not split over the "
                                   f"{sharding_lib.batch_shard_count(mesh)} batch shards")
        if rows:
            report.sample = _compile("sample_step", lambda: task.lower_sample_step(
                params, mesh, rules, rows), fresh=compile_only)
            report.sample_batch = rows
    return report


# --- searching -----------------------------------------------------------------------------

# Remat policies from the least recomputation to the most.
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")


def fits(config, devices, hbm_bytes: int | None) -> TrainReport | None:
    """The train report when ``config`` compiles for ``devices`` within ``hbm_bytes``
    per chip (the compiler's own limit when None), else None."""
    try:
        report = compile_train_step(config, devices, sample_batch=0)
    except DoesNotFit:
        return None
    if hbm_bytes is not None and report.step.memory.total > hbm_bytes:
        return None
    return report


def with_updates(config, **updates):
    """A copy of ``config`` with dotted keys replaced: ``with_updates(config,
    **{"train.remat_policy": "full"})``."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in updates.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


@dataclasses.dataclass
class SearchResult:
    """What the search found; ``tried`` lists every compile as (settings, fits)."""

    remat_policy: str | None = None
    num_microbatches: int | None = None
    largest_batch: int | None = None
    report: TrainReport | None = None
    tried: list = dataclasses.field(default_factory=list)


def search(config, devices, hbm_bytes: int | None, *, batch_limit: int = 2**20,
           policies: Sequence[str] = REMAT_ORDER, largest_batch: bool = True,
           log: Callable[[str], None] = print) -> SearchResult:
    """The cheapest remat policy (of ``policies``, cheapest first) with the fewest
    accumulation micro-batches that fits the config's global batch, then (with
    ``largest_batch``) the largest global batch that fits with that policy and no
    accumulation (a multiple of the batch shards, up to ``batch_limit``)."""
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    shards = sharding_lib.batch_shard_count(mesh)
    result = SearchResult()

    def attempt(**updates) -> TrainReport | None:
        candidate = with_updates(config, **updates)
        start = time.perf_counter()
        try:
            report = fits(candidate, devices, hbm_bytes)
        except errors.ConfigError:
            report = None
        result.tried.append([updates, report is not None])
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in updates.items())
        memory = (f"{report.step.memory.total / GIB:.2f} GiB per chip" if report
                  else "does not fit")
        log(f"  {label}: {memory} ({time.perf_counter() - start:.0f} s)")
        return report

    per_shard = config.batch_size // shards
    microbatch_options = [m for m in (2**i for i in range(21)) if m <= per_shard
                          and per_shard % m == 0]
    for policy in policies:
        for m in microbatch_options:
            report = attempt(**{"train.remat_policy": policy, "train.num_microbatches": m})
            if report is not None:
                result.remat_policy, result.num_microbatches, result.report = policy, m, report
                break
        if result.report is not None:
            break
    if result.remat_policy is None or not largest_batch:
        return result
    # Largest batch with no accumulation: double while it fits, then bisect.
    def fits_batch(b):
        return attempt(**{"train.remat_policy": result.remat_policy,
                          "train.num_microbatches": 1, "batch_size": b}) is not None
    low, high = 0, None
    b = shards * max(1, per_shard // result.num_microbatches)
    while b <= batch_limit:
        if fits_batch(b):
            low, b = b, b * 2
        else:
            high = b
            break
    if high is not None and low:
        while high - low > shards:
            middle = (low + high) // 2 // shards * shards
            if middle in (low, high):
                break
            if fits_batch(middle):
                low = middle
            else:
                high = middle
    result.largest_batch = low or None
    return result


# --- saving ---------------------------------------------------------------------------


def save(step: StepReport, path: str, metadata: dict) -> None:
    """Writes the compiled ``step`` for :mod:`dalle_jax.train.compiled` to load."""
    compiled_lib.save(step.compiled, step.fingerprint, path, metadata, name=step.name)
