r"""Compiles a stage config's train step for a TPU slice, on this host, and says if it fits.

  python -m dalle_jax.tools.compile --config=configs/transformer_photos.py \
      --topology=v5litepod-256
  python -m dalle_jax.tools.compile --config=configs/transformer_photos.py \
      --topology=v4-256 --config.train.remat_policy=dots_no_batch
  python -m dalle_jax.tools.compile --config=configs/transformer_photos.py \
      --topology=v5litepod-256 --search          # cheapest remat, largest batch
  python -m dalle_jax.tools.compile --config=configs/image_tokenizer_shapes.py \
      --topology=v5litepod-8 --save=runs/compiled/train_step.jaxexec

The train step is the one the trainer runs (dalle_jax.train.trainer.build), built
from shapes only with the config's mesh and sharding rules over the slice's chips,
which libtpu (``pip install "jax[tpu]"``) describes without any TPU present. The
report gives one chip's memory (arguments, outputs, temporaries, generated code, total)
against its HBM, the model FLOPs of a step and the step time they imply at --mfu; for
stage 2 also the KV-cached sampling step. ``--topology`` takes gcloud's accelerator
types (v4-N and v5p-N count cores, two per chip; v5litepod-N, v5e-N and v6e-N count
chips) or ``cpu`` (this host's devices).

Exit status: 0 when the train step fits, 1 when it does not (the compiler ran out of a
chip's memory, or the step's total exceeds the chip's HBM), 2 for a mistake in the
command or the config. A sampling step that does not fit is reported, not counted.
``--save`` writes the compiled step; a run on the slice loads it with
``--config.train.compiled_step=FILE`` (dalle_jax.train.compiled).
"""
from __future__ import annotations

import json
import os
import sys

# Compile-only: never probe for accelerators on this host (libtpu is loaded only to
# describe the slice).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

from dalle_jax import config as config_lib  # noqa: E402

config_lib.define_flags()
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU accelerator type (v4-256, "
                                "v5litepod-256, v5p-512, v6e-64) or cpu.", required=True)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-centre "
                                   "network (config.mesh.dcn_data follows it).")
_MFU = flags.DEFINE_float("mfu", 0.4, "The model FLOP utilisation the implied step time "
                          "assumes.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", None, "Prompts of the sampling step "
                                     "compiled for stage 2 (default: one per batch "
                                     "shard; 0 skips it).")
_SEARCH = flags.DEFINE_bool("search", False, "Find the cheapest remat policy and fewest "
                            "micro-batches that fit the global batch, then the largest "
                            "global batch that fits without accumulation.")
_SAVE = flags.DEFINE_string("save", None, "Write the compiled train step to this file.")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")

GIB = 2**30


def _gib(n: float) -> str:
    """Bytes in GiB, or in MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def _count(n: int) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M"


def report_lines(report, slice_, mfu: float) -> list[str]:
    """The human-readable report of a compiled train step."""
    from dalle_jax.train import sharding  # pylint: disable=g-import-not-at-top
    mesh = " x ".join(f"{a} {report.mesh[a]}" for a in sharding.MESH_AXES)
    lines = [f"mesh {mesh}; remat {report.remat_policy}; {report.num_microbatches} "
             f"micro-batch(es); global batch {report.batch_size}; "
             f"{_count(report.parameters)} parameters"]

    def memory(step, what):
        m = step.memory
        lines.append(f"{what}, per chip:")
        lines.append(f"  arguments       {_gib(m.arguments)}")
        lines.append(f"  outputs         {_gib(m.outputs)} ({_gib(m.aliased)} of them in "
                     "donated arguments)")
        lines.append(f"  temporaries     {_gib(m.temporaries)}")
        lines.append(f"  generated code  {_gib(m.generated_code)}")
        if slice_.hbm_bytes:
            lines.append(f"  total           {_gib(m.total)} of {_gib(slice_.hbm_bytes)} "
                         f"HBM ({100 * m.total / slice_.hbm_bytes:.1f}%, headroom "
                         f"{_gib(slice_.hbm_bytes - m.total)})")
        else:
            lines.append(f"  total           {_gib(m.total)}")
        lines.append(f"  compiled in {step.compile_seconds:.1f} s on this host")

    memory(report.step, "train step")
    if report.model_flops_per_step:
        line = (f"model FLOPs per step {report.model_flops_per_step:.3g} (forward and "
                f"backward, no recomputation)")
        seconds = report.step_seconds(mfu, slice_.chips)
        if seconds:
            line += (f"; at {100 * mfu:.0f}% MFU of {report.peak_flops_per_chip / 1e12:.0f} "
                     f"TFLOP/s per chip: {_duration(seconds)} per step, "
                     f"{report.batch_size / seconds:,.0f} examples/s")
        lines.append(line)
    if report.sample is not None:
        memory(report.sample, f"sampling step ({report.sample_batch} prompts)")
    return lines


def report_json(report, slice_, mfu: float) -> dict:
    """The report as the bench command records it."""
    def step(s):
        m = s.memory
        return {"arguments": m.arguments, "outputs": m.outputs, "aliased": m.aliased,
                "temporaries": m.temporaries, "generated_code": m.generated_code,
                "total": m.total, "compile_seconds": s.compile_seconds}
    out = {"topology": slice_.name, "num_slices": slice_.num_slices, "chips": slice_.chips,
           "chip_grid": list(slice_.chip_grid), "hbm_bytes": slice_.hbm_bytes,
           "mesh": report.mesh, "rules": [list(r) for r in report.rules],
           "batch_size": report.batch_size, "num_microbatches": report.num_microbatches,
           "remat_policy": report.remat_policy, "parameters": report.parameters,
           "model_flops_per_step": report.model_flops_per_step,
           "step_seconds_at_mfu": report.step_seconds(mfu, slice_.chips), "mfu": mfu,
           "train_step": step(report.step)}
    if report.sample is not None:
        out["sample_step"] = {**step(report.sample), "prompts": report.sample_batch}
    return out


def _prepared_config(config, num_slices: int):
    if num_slices > 1 and config.mesh.get("dcn_data", 1) != num_slices:
        config = config.copy_and_resolve_references()
        config.unlock()
        config.mesh.dcn_data = num_slices
        print(f"config.mesh.dcn_data = {num_slices} (the data axis spans the slices)")
    return config


def main(argv):
    del argv
    from dalle_jax import files  # pylint: disable=g-import-not-at-top
    from dalle_jax.train import aot  # pylint: disable=g-import-not-at-top
    slice_ = aot.topology(_TOPOLOGY.value, _NUM_SLICES.value)
    config = _prepared_config(flags.FLAGS.config, _NUM_SLICES.value)
    hbm = f", {_gib(slice_.hbm_bytes)} HBM each" if slice_.hbm_bytes else ""
    slices = f" x {slice_.num_slices} slices" if slice_.num_slices > 1 else ""
    print(f"{config.task} on {slice_.name}{slices}: {slice_.chips} chips "
          f"({slice_.device_kind}, {'x'.join(map(str, slice_.chip_grid))}{hbm})")

    if _SEARCH.value:
        result = aot.search(config, slice_.devices, slice_.hbm_bytes)
        if result.report is None:
            print(f"does not fit at global batch {config.batch_size} with any remat "
                  "policy and accumulation; use a larger slice or a smaller model")
            sys.exit(1)
        print(f"cheapest that fits global batch {config.batch_size}: remat "
              f"{result.remat_policy}, {result.num_microbatches} micro-batch(es) "
              f"({_gib(result.report.step.memory.total)} per chip)")
        if result.largest_batch:
            print(f"largest global batch with remat {result.remat_policy} and no "
                  f"accumulation: {result.largest_batch}")
        if _JSON.value:
            files.atomic_write(_JSON.value, json.dumps({
                "remat_policy": result.remat_policy,
                "num_microbatches": result.num_microbatches,
                "largest_batch": result.largest_batch,
                "tried": result.tried,
                "report": report_json(result.report, slice_, _MFU.value)}, indent=2))
        return

    try:
        report = aot.compile_train_step(config, slice_.devices,
                                        sample_batch=_SAMPLE_BATCH.value,
                                        for_saving=bool(_SAVE.value))
    except aot.DoesNotFit as e:
        needed = f" (needs {_gib(e.needed)} of {_gib(e.available)})" if e.needed else ""
        print(f"does not fit{needed}: {e}")
        print("try --search, more of config.train.num_microbatches, a heavier "
              "config.train.remat_policy, or a larger slice")
        sys.exit(1)
    for line in report_lines(report, slice_, _MFU.value):
        print(line)
    if _JSON.value:
        files.atomic_write(_JSON.value,
                           json.dumps(report_json(report, slice_, _MFU.value), indent=2))
    if _SAVE.value:
        import jax  # pylint: disable=g-import-not-at-top
        aot.save(report.step, _SAVE.value, {
            "topology": slice_.name, "num_slices": slice_.num_slices,
            "config": json.loads(config.to_json_best_effort()), "jax": jax.__version__})
        print(f"wrote the compiled train step to {_SAVE.value}")
    hbm = slice_.hbm_bytes
    if report.sample is not None and hbm and report.sample.memory.total > hbm:
        # Sampling is not training's concern: the verdict below is the train step's.
        print(f"the sampling step at {report.sample_batch} prompts does not fit "
              f"({_gib(report.sample.memory.total)} per chip); sample fewer prompts at once "
              "(--sample_batch) or on another mesh")
    if hbm and report.step.memory.total > hbm:
        print(f"does not fit: the train step's {_gib(report.step.memory.total)} per chip "
              f"exceeds {_gib(hbm)}")
        sys.exit(1)
    print("fits")


if __name__ == "__main__":
    config_lib.run(main)
