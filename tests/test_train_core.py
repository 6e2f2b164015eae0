"""The training core in process: sharding, the step, optimizer, checkpoints across meshes.

Uses the toy stage of tests/toy_task.py on 8 simulated CPU devices.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle_jax.train import optimizer as optimizer_lib
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import step as step_lib
from dalle_jax.train import trainer
from tests import toy_task

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
# Adam divides by sqrt(v): where a gradient is nearly zero, the last-bit differences of
# another reduction order move a parameter by up to a few 1e-6 within a few steps.
PARAM_ATOL = 1e-5


def _config(mesh=(1, 1, 1), **train):
    config = toy_task.get_config("synthetic")
    config.mesh.update(dict(zip(sharding_lib.MESH_AXES, mesh)))
    config.train.update(train)
    return config


def _run_steps(config, num_steps=3):
    """Builds the run on config's mesh and takes ``num_steps`` synthetic steps."""
    devices = jax.devices()[:math.prod(config.mesh[a] for a in sharding_lib.MESH_AXES)]
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    rules = sharding_lib.logical_rules(config.sharding)
    task = toy_task.ToyTask(config, None, mesh)
    training = trainer.build(config, task, mesh, rules)
    state = training.init(jax.random.key(config.seed))
    rng = jax.device_put(np.asarray(state.rng), sharding_lib.replicated(mesh))
    data = task.train_data()
    losses = []
    for _ in range(num_steps):
        batch = sharding_lib.make_global_batch(next(data), mesh)
        state, metrics = training.train_step(state, batch, rng)
        losses.append(float(metrics["loss"]))
    return state, losses, mesh


@pytest.fixture(scope="module")
def single_device_run():
    state, losses, _ = _run_steps(_config())
    return jax.device_get(state.params), losses


def test_mesh_from_config():
    config = _config((2, -1, 2))
    mesh = sharding_lib.make_mesh(config.mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match=r"\(4, 4, 1\) needs 16 devices, but 8 are available"):
        sharding_lib.make_mesh(_config((4, 4, 1)).mesh)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding_lib.make_mesh(_config((-1, -1, 1)).mesh)
    with pytest.raises(ValueError, match="not divisible by 3"):
        sharding_lib.make_mesh(_config((3, -1, 1)).mesh)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_sharded_step_equals_single_device(single_device_run, mesh_shape):
    reference_params, reference_losses = single_device_run
    state, losses, mesh = _run_steps(_config(mesh_shape))
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=PARAM_ATOL),
                 jax.device_get(state.params), reference_params)
    # The state is born and stays sharded as the rules say.
    assert sharding_lib.unsharded_large_arrays(state.params, mesh) == []
    assert sharding_lib.unsharded_large_arrays(state.opt_state, mesh) == []
    kernel = state.params["Dense_0"]["kernel"]  # logical ("embed", "mlp")
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    fraction = math.prod(kernel.sharding.shard_shape(kernel.shape)) / kernel.size
    assert fraction == 1 / (mesh.shape["fsdp"] * mesh.shape["tensor"])


def test_sharding_report_flags_replicated_parameters():
    state, _, mesh = _run_steps(_config((1, 8, 1)), num_steps=0)
    rows = sharding_lib.sharding_report(state.params)
    assert rows and all(r["fraction_per_device"] == 1 / 8 for r in rows)
    replicated = jax.device_put(state.params, sharding_lib.replicated(mesh))
    assert "['Dense_0']['kernel']" in sharding_lib.unsharded_large_arrays(replicated, mesh)


def test_gradient_accumulation_matches_full_batch():
    full, full_losses, _ = _run_steps(_config((8, 1, 1)), num_steps=2)
    accumulated, acc_losses, _ = _run_steps(_config((8, 1, 1), num_microbatches=4),
                                            num_steps=2)
    np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=PARAM_ATOL),
                 jax.device_get(accumulated.params), jax.device_get(full.params))


def test_bf16_compute_keeps_fp32_parameters_and_loss(single_device_run):
    reference_params, reference_losses = single_device_run
    state, losses, _ = _run_steps(_config(compute_dtype="bfloat16"))
    dtypes = {x.dtype for x in jax.tree.leaves(state.params)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == dtypes
    np.testing.assert_allclose(losses, reference_losses, rtol=3e-2)
    assert losses != reference_losses, "bf16 compute should round differently"


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_rematerialisation_does_not_change_the_step(single_device_run, policy):
    reference_params, reference_losses = single_device_run
    state, losses, _ = _run_steps(_config(remat_policy=policy))
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(state.params), reference_params)


def test_nonfinite_updates_are_skipped_and_counted():
    tx = optax.adam(0.1)
    step = jax.jit(step_lib.make_train_step(
        lambda p, s, b, r, step: (jnp.mean((p["w"] * b["x"]) ** 2), {},
                            {"stats": {"seen": s["stats"]["seen"] + 1}}),
        tx, optax.constant_schedule(0.1), ema_decay=0.5))
    state = step_lib.init_state({"params": {"w": jnp.ones((4,))}, "stats": {"seen": 0}},
                                tx, ema=True, rng=jax.random.key(0))
    good = {"x": jnp.arange(4.0)}
    bad = {"x": jnp.array([1.0, jnp.nan, 2.0, 3.0])}
    rng = jax.random.key_data(jax.random.key(1))
    state, metrics = step(state, good, rng)
    assert metrics["update_skipped"] == 0
    before = jax.device_get(state)
    state, metrics = step(state, bad, rng)
    state, metrics = step(state, {"x": jnp.full((4,), jnp.inf)}, rng)
    assert int(state.step) == 3 and metrics["update_skipped"] == 1
    assert int(state.nonfinite_streak) == 2 and int(state.nonfinite_total) == 2
    assert int(state.model_state["stats"]["seen"]) == 1, "skipped updates keep the state"
    for name in ("params", "model_state", "opt_state", "ema_params"):
        jax.tree.map(np.testing.assert_array_equal, getattr(jax.device_get(state), name),
                     getattr(before, name))
    state, metrics = step(state, good, rng)
    assert int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 2
    assert not np.array_equal(state.params["w"], before.params["w"])


class _PoisonedTask(toy_task.ToyTask):
    """The toy stage whose loss turns NaN from the 6th batch on."""

    def loss(self, params, model_state, batch, rng, *, train, step):
        loss, metrics, model_state = super().loss(params, model_state, batch, rng,
                                                  train=train, step=step)
        return loss * batch["scale"][0], metrics, model_state

    def train_data(self):
        data = super().train_data()

        class Poisoned:
            def __next__(self):
                batch = next(data)
                bad = data.index > 5
                batch["scale"] = np.full((len(batch["mask"]),), np.nan if bad else 1.0,
                                         np.float32)
                return batch

            get_state, set_state = data.get_state, data.set_state
        return Poisoned()

    def eval_data(self):
        return None


@pytest.mark.slow
def test_run_stops_after_consecutive_nonfinite_steps(tmp_path):
    config = _config((8, 1, 1), max_nonfinite_steps=3)
    config.checkpoint.save_every = 2
    config.checkpoint.async_save = False
    config.total_steps = 20
    with pytest.raises(trainer.NonFiniteError, match="3 consecutive updates up to step 8"):
        trainer.train_and_evaluate(config, str(tmp_path),
                                   task=_PoisonedTask(config, str(tmp_path), None),
                                   console=lambda s: None)
    from dalle_jax.train import checkpoint as checkpoint_lib
    checkpoints = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", save_interval_steps=2)
    assert checkpoints.latest_step() <= 8
    assert checkpoints.latest_step() >= 4
    mesh = sharding_lib.make_mesh(config.mesh)
    training = trainer.build(config, toy_task.ToyTask(config, None, mesh), mesh,
                             sharding_lib.logical_rules(config.sharding))
    state, data_state, step = checkpoints.restore(training.abstract_state)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    assert data_state == {"index": step}


def test_schedules_and_weight_decay_mask():
    config = _config()
    opt = config.optimizer
    opt.update(learning_rate=1.0, warmup_steps=10, end_learning_rate=0.1)
    cosine = optimizer_lib.learning_rate_schedule(opt, total_steps=110)
    assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(60)) == pytest.approx(0.55)
    assert float(cosine(110)) == pytest.approx(0.1)
    opt.update(schedule="step", decay_steps=(50, 80))
    halving = optimizer_lib.learning_rate_schedule(opt, total_steps=110)
    assert [float(halving(s)) for s in (20, 49, 50, 79, 80, 109)] == pytest.approx(
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    opt.update(schedule="constant")
    assert float(optimizer_lib.learning_rate_schedule(opt, 110)(100)) == 1.0
    opt.update(schedule="linear")
    with pytest.raises(ValueError, match="cosine, constant or step"):
        optimizer_lib.learning_rate_schedule(opt, 110)
    params = {"Dense_0": {"kernel": 1, "bias": 2}, "LayerNorm_0": {"scale": 3},
              "Embed_0": {"embedding": 4}}
    mask = optimizer_lib.path_mask(config.optimizer.no_decay)(params)
    assert mask == {"Dense_0": {"kernel": True, "bias": False},
                    "LayerNorm_0": {"scale": False}, "Embed_0": {"embedding": False}}


def _final_params(state):
    return jax.device_get(state.params)


@pytest.mark.slow
def test_checkpoint_restores_on_another_mesh_and_continues(tmp_path):
    quiet = dict(console=lambda s: None)

    def config(mesh, total_steps=12):
        c = _config(mesh)
        c.total_steps = total_steps
        c.optimizer.schedule = "constant"  # the same rates whatever total_steps says
        return c

    reference = trainer.train_and_evaluate(config((8, 1, 1)), str(tmp_path / "ref"), **quiet)
    trainer.train_and_evaluate(config((8, 1, 1), total_steps=6), str(tmp_path / "run"),
                               **quiet)
    # Continue on half the devices, with FSDP and tensor parallelism instead.
    second = config((1, 2, 2))
    resumed = trainer.train_and_evaluate(second, str(tmp_path / "run"),
                                         devices=jax.devices()[:4], **quiet)
    assert int(resumed.step) == int(reference.step) == 12
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=PARAM_ATOL),
                 _final_params(resumed), _final_params(reference))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=PARAM_ATOL),
                 jax.device_get(resumed.ema_params), jax.device_get(reference.ema_params))


@pytest.mark.slow
def test_loop_writes_metrics_summaries_and_profile(tmp_path):
    import tensorflow as tf
    config = _config((8, 1, 1), log_every=2, summary_every=3, eval_every=4)
    config.total_steps = 6
    config.profile.update(start_step=2, num_steps=1)
    lines = []
    trainer.train_and_evaluate(config, str(tmp_path), console=lines.append)
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [line.split(" |")[0] for line in step_lines] == ["step 2/6", "step 4/6", "step 6/6"]
    assert all(k in step_lines[-1] for k in ("loss", "lr", "grad_norm", "ex/s", "mfu", "eta"))
    assert sum(line.startswith("eval at step") for line in lines) == 2  # steps 4 and 6
    tags = set()
    for event_file in tf.io.gfile.glob(str(tmp_path / "tensorboard" / "*")):
        for event in tf.compat.v1.train.summary_iterator(event_file):
            tags.update(v.tag for v in event.summary.value)
    assert {"train/loss", "train/mfu", "train/examples_per_sec", "eval/loss",
            "inputs"} <= tags
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert (tmp_path / "config.json").exists()


def test_checkpoints_keep_the_last_n_and_every_kth(tmp_path):
    from dalle_jax.train import checkpoint as checkpoint_lib
    checkpoints = checkpoint_lib.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2,
                                              keep_period=4, async_save=False)
    tree = {"w": jnp.arange(3.0)}
    for step in range(1, 11):
        checkpoints.save(step, tree, {"index": step})
    assert checkpoints.all_steps() == [4, 8, 9, 10]
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32,
                                          sharding=jax.sharding.SingleDeviceSharding(
                                              jax.devices()[0]))}
    restored, data_state, step = checkpoints.restore(abstract, 8)
    assert step == 8 and data_state == {"index": 8}
    np.testing.assert_array_equal(restored["w"], tree["w"])
    checkpoints.close()


# --- the hang watchdog ---------------------------------------------------------------------

_BLOCKED = """
import threading
from dalle_jax.train import watchdog
dog = watchdog.Watchdog({seconds})
dog.arm()
dog.progress(5)
dog.doing("train step 6 to finish")
print("blocking", flush=True)
threading.Event().wait()  # like a collective whose peer died: never returns
"""


def test_watchdog_ends_a_blocked_process_with_its_step_and_stacks():
    import subprocess
    import sys
    import time
    from dalle_jax.train import watchdog as watchdog_lib
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _BLOCKED.format(seconds=1.0)],
                            capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == watchdog_lib.EXIT_CODE == 3, result.stderr
    assert "blocking" in result.stdout and elapsed >= 1.0
    assert "watchdog: no training progress for " in result.stderr, result.stderr
    assert "last completed step 5; waiting on: train step 6 to finish" in result.stderr
    assert "exiting with status 3" in result.stderr
    # faulthandler's dump of every thread, the blocked main thread included.
    assert "most recent call first" in result.stderr
    assert 'File "<string>", line 9 in <module>' in result.stderr, result.stderr


def _wait_for(predicate, seconds=10.0):
    import time
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_watchdog_progress_keeps_it_quiet_and_stop_ends_it():
    import threading
    import time
    from dalle_jax.train import watchdog as watchdog_lib
    fired = []
    dog = watchdog_lib.Watchdog(0.3, on_expire=fired.append)
    dog.progress(1)  # before arming: no thread, nothing can fire
    assert not dog.armed
    dog.arm()
    assert dog.armed
    for step in range(2, 12):  # 1 s of steps, 0.1 s apart
        time.sleep(0.1)
        dog.progress(step)
    assert fired == []
    dog.stop()
    assert not dog.armed
    assert not any(t.name == "training-watchdog" for t in threading.enumerate())
    time.sleep(0.5)
    assert fired == [], "a stopped watchdog never fires"


def test_watchdog_fires_after_the_deadline_without_progress():
    import time
    from dalle_jax.train import watchdog as watchdog_lib
    fired = []
    dog = watchdog_lib.Watchdog(0.2, on_expire=fired.append)
    dog.arm()
    started = time.monotonic()
    dog.progress(7)
    dog.doing("the checkpoint save of step 8")
    assert _wait_for(lambda: fired)
    assert time.monotonic() - started >= 0.2
    assert "last completed step 7; waiting on: the checkpoint save of step 8" in fired[0]
    assert _wait_for(lambda: not dog.armed), "the thread ends once it has fired"


def test_watchdog_disabled_at_zero():
    import time
    from dalle_jax.train import watchdog as watchdog_lib
    fired = []
    dog = watchdog_lib.Watchdog(0, on_expire=fired.append)
    assert not dog.enabled
    dog.arm()
    dog.progress(3)
    assert not dog.armed and dog._thread is None  # pylint: disable=protected-access
    time.sleep(0.1)
    dog.stop()
    assert fired == []
    assert core_defaults_watchdog() == 1800.0


def core_defaults_watchdog():
    from dalle_jax.train import defaults
    return defaults.core_config().train.watchdog_seconds


class _StallingTask(toy_task.ToyTask):
    """The toy task whose input blocks before step ``stall_at`` until released."""

    def __init__(self, *args, stall_at, release, **kwargs):
        super().__init__(*args, **kwargs)
        self.stall_at, self.release = stall_at, release

    def train_data(self):
        data, task = super().train_data(), self

        class Stalling:
            def __next__(self):
                if data.index + 1 == task.stall_at:
                    task.release.wait(60)
                return next(data)

            def __getattr__(self, name):
                return getattr(data, name)

        return Stalling()


@pytest.mark.slow
def test_the_loop_feeds_arms_and_stops_the_watchdog(tmp_path, monkeypatch):
    """A stalled input at step 5: the watchdog names the last fetched step (3: metrics
    arrive a step late) and what the loop waits on; progress resumes, the run ends and
    the watchdog's thread with it."""
    import functools
    import threading
    from dalle_jax.train import watchdog as watchdog_lib
    release, messages = threading.Event(), []

    def expire(message):
        messages.append(message)
        release.set()

    monkeypatch.setattr(trainer.watchdog_lib, "Watchdog",
                        functools.partial(watchdog_lib.Watchdog, on_expire=expire))
    config = _config((8, 1, 1), watchdog_seconds=1.0)
    config.total_steps = 6
    config.checkpoint.save_every = 100  # a first save may take over a second here
    task = _StallingTask(config, str(tmp_path), None, stall_at=5, release=release)
    state = trainer.train_and_evaluate(config, str(tmp_path), task=task,
                                       console=lambda s: None)
    assert int(state.step) == 6
    assert len(messages) == 1, messages
    assert "last completed step 3; waiting on: the input batch of step 5" in messages[0]
    assert not any(t.name == "training-watchdog" for t in threading.enumerate())
