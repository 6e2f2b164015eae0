"""Ahead-of-time compiles (dalle_jax.train.aot, tools/compile): TPU slices described by
libtpu on this CPU host, the fit report, out-of-memory as "does not fit", the search,
and a saved step that runs as the jitted one does."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax.train import aot
from dalle_jax.train import compiled
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "transformer_shapes.py") + ":runlocal"
# Two layers: the compile stays a few seconds on this host.
TINY_OVERRIDES = ["--config.model.num_layers=2"]


def _compile_tool(*args, timeout=240):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the slice's chips, not simulated host devices
    return subprocess.run([sys.executable, "-m", "dalle_jax.tools.compile", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("chips, dims, grid", [
    (1, 2, (1, 1)), (4, 2, (2, 2)), (8, 2, (2, 4)), (16, 2, (4, 4)), (256, 2, (16, 16)),
    (4, 3, (2, 2, 1)), (8, 3, (2, 2, 2)), (16, 3, (2, 2, 4)), (32, 3, (2, 4, 4)),
    (64, 3, (4, 4, 4)), (128, 3, (4, 4, 8)), (256, 3, (4, 8, 8)), (2048, 3, (8, 16, 16)),
])
def test_chip_grids_are_the_published_slice_shapes(chips, dims, grid):
    assert aot.chip_grid(chips, dims) == grid


@pytest.mark.parametrize("name, message", [
    ("v9-8", "not a TPU accelerator type"),
    ("v4-7", "counts cores"),
    ("v5litepod-24", "not a slice size"),
    ("v5litepod-512", "at most 256 chips"),
])
def test_names_that_are_not_slices_are_refused(name, message):
    with pytest.raises(errors.UserError, match=message):
        aot.topology(name)


def test_slices_have_one_device_per_chip_and_their_hbm():
    v4 = aot.topology("v4-32")  # 32 cores: 16 chips, each one device (megacore)
    assert (v4.chips, v4.chip_grid, v4.hbm_bytes) == (16, (2, 2, 4), 32 * 2**30)
    assert v4.device_kind == "TPU v4"
    v5e = aot.topology("v5litepod-16", num_slices=2)
    assert v5e.chips == 32 and v5e.hbm_bytes == 16 * 2**30
    assert {d.slice_index for d in v5e.devices} == {0, 1}


def test_out_of_memory_messages_are_read():
    e = aot._out_of_memory(RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (38.50G) exceeds available HBM (15.75G)."))
    assert (e.needed, e.available) == (38.5 * 2**30, 15.75 * 2**30)
    e = aot._out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent "
                                        "error. Ran out of memory in memory space hbm. Used "
                                        "20.5G of 15.75G hbm. Exceeded hbm capacity by 4.8G."))
    assert e.needed == 20.5 * 2**30
    assert aot._out_of_memory(ValueError("shapes do not match")) is None


@pytest.mark.slow
def test_compile_reports_a_small_config_on_a_tpu_slice(tmp_path):
    report_file = tmp_path / "report.json"
    result = _compile_tool(f"--config={TINY}", *TINY_OVERRIDES, "--topology=v5litepod-4",
                           f"--json={report_file}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "on v5litepod-4: 4 chips (TPU v5 lite, 2x2, 16.00 GiB HBM each)" in out
    assert "mesh data 4 x fsdp 1 x tensor 1" in out
    for part in ("arguments", "outputs", "temporaries", "generated code", "total"):
        assert f"  {part}" in out
    assert "sampling step (4 prompts), per chip" in out
    assert "% MFU of 197 TFLOP/s per chip" in out
    assert out.rstrip().endswith("fits")
    report = json.loads(report_file.read_text())
    step = report["train_step"]
    assert step["total"] == (step["arguments"] + step["outputs"] - step["aliased"]
                             + step["temporaries"] + step["generated_code"])
    # The state (parameters, two Adam moments, EMA) is donated: outputs reuse it.
    assert step["aliased"] > 0.9 * step["outputs"]
    assert 0 < step["total"] < report["hbm_bytes"]
    assert report["chips"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report["sample_step"]["prompts"] == 4
    assert report["model_flops_per_step"] > 0 and report["step_seconds_at_mfu"] > 0


@pytest.mark.slow
def test_a_step_too_large_for_the_chip_does_not_fit():
    result = _compile_tool(f"--config={TINY}", *TINY_OVERRIDES, "--topology=v5litepod-4",
                           "--config.batch_size=65536", "--sample_batch=0")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "does not fit (needs " in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--topology=v4-7"], "--topology: v4-7: the number counts cores"),
    (["--topology=v5litepod-4", "--config.mesh.tensor=3"], "config.mesh:"),
    (["--topology=v5litepod-4", "--config.model.num_heads=3", "--config.mesh.tensor=2",
      "--config.mesh.data=2"], "config.sharding.rules: with mesh"),
])
def test_mistakes_are_one_line(args, message):
    result = _compile_tool(f"--config={TINY}", *TINY_OVERRIDES, *args)
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    assert message in result.stderr and "Traceback" not in result.stderr


def _tiny_config(**updates):
    config = config_lib.load_config_file(TINY)
    config.model.num_layers = 1
    return aot.with_updates(config, **updates)


def test_a_saved_step_runs_as_the_jitted_step(tmp_path):
    """Compiled from shapes on this host's devices, saved, loaded: the same update."""
    config = _tiny_config()
    devices = jax.devices()
    report = aot.compile_train_step(config, devices, sample_batch=0, for_saving=True)
    path = str(tmp_path / "train_step.jaxexec")
    aot.save(report.step, path, {"topology": "cpu"})
    loaded, metadata = compiled.load(path)
    assert metadata == {"topology": "cpu"}

    mesh = sharding_lib.make_mesh(config.mesh, devices)
    rules = sharding_lib.logical_rules(config.sharding)
    task = trainer.load_task(config, "", mesh)
    training = trainer.build(config, task, mesh, rules)
    rng = np.random.default_rng(0)
    spec = task.batch_spec(config.batch_size)
    batch = {
        "text_tokens": rng.integers(1, config.text.vocab_size, spec["text_tokens"].shape,
                                    dtype=np.int32),
        "codes": rng.integers(0, config.model.image_vocab_size, spec["codes"].shape,
                              dtype=np.int32),
        "mask": np.ones(spec["mask"].shape, bool)}
    batch = sharding_lib.make_global_batch(batch, mesh)
    base_rng = jax.device_put(np.asarray(jax.random.key_data(jax.random.key(1))),
                              sharding_lib.replicated(mesh))

    def run(step_fn):
        state = training.init(jax.random.key(config.seed))  # donated: a fresh one each
        with jax.set_mesh(mesh):
            new_state, metrics = step_fn(state, batch, base_rng)
        return jax.device_get((new_state.params, metrics))

    (params_a, metrics_a), (params_b, metrics_b) = run(training.train_step), run(loaded)
    assert metrics_a["loss"] == metrics_b["loss"]
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def test_search_finds_accumulation_then_the_largest_batch():
    """On this host's devices with a stated budget: the step at M=1 is over it, so the
    search takes the fewest micro-batches under it, then bisects the batch."""
    config = _tiny_config(**{"batch_size": 64})
    devices = jax.devices()
    one = aot.compile_train_step(config, devices, sample_batch=0).step.memory.total
    two = aot.compile_train_step(aot.with_updates(config, **{"train.num_microbatches": 2}),
                                 devices, sample_batch=0).step.memory.total
    assert two < one
    budget = (one + two) // 2
    lines = []
    result = aot.search(config, devices, budget, log=lines.append)
    assert result.report is not None and result.report.step.memory.total <= budget
    assert result.num_microbatches >= 2 or result.remat_policy != "none"
    assert result.largest_batch is not None and result.largest_batch % 8 == 0
    assert 32 <= result.largest_batch < 64
    # The largest batch fits and one more step of the batch shards does not.
    over = aot.fits(aot.with_updates(config, **{"batch_size": result.largest_batch + 8,
                                          "train.remat_policy": result.remat_policy}),
                    devices, budget)
    assert over is None
    assert lines and all("GiB" in line or "MiB" in line or "does not fit" in line
                         for line in lines)


def _toy_config(**updates):
    from tests import toy_task  # pylint: disable=g-import-not-at-top
    config = toy_task.get_config("synthetic")
    config.total_steps = 4
    config.checkpoint.save_every = 4
    return aot.with_updates(config, **updates)


def test_training_runs_a_saved_step_instead_of_compiling(tmp_path):
    """config.train.compiled_step: the run loads the saved executable and trains exactly
    as with its own compile; a step saved from another config is refused."""
    path = str(tmp_path / "toy.jaxexec")
    config = _toy_config()
    report = aot.compile_train_step(config, jax.devices(), for_saving=True)
    aot.save(report.step, path, {"topology": "cpu"})

    own = trainer.train_and_evaluate(config, str(tmp_path / "own"), console=lambda _: None)
    loaded = trainer.train_and_evaluate(_toy_config(**{"train.compiled_step": path}),
                                        str(tmp_path / "loaded"), console=lambda _: None)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(own.params),
                 jax.device_get(loaded.params))

    other = _toy_config(**{"train.compiled_step": path, "optimizer.learning_rate": 1e-2})
    with pytest.raises(errors.ConfigError, match="holds another program"):
        trainer.train_and_evaluate(other, str(tmp_path / "other"), console=lambda _: None)
    with pytest.raises(errors.UserError, match="not found"):
        trainer.train_and_evaluate(_toy_config(**{"train.compiled_step": path + ".x"}),
                                   str(tmp_path / "missing"), console=lambda _: None)
