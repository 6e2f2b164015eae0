"""Damaged checkpoints are found, reported in one line, moved aside and skipped; a
resumed run's TensorBoard files hold one curve.

One toy run (synthetic data, checkpoints at steps 2, 4 and 6) is copied for each case;
its latest step is damaged the way disks and killed jobs damage files, then the run
is resumed in-process.
"""
import json
import shutil

import jax
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

from dalle_jax import errors
from dalle_jax.train import checkpoint as checkpoint_lib
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import trainer
from tests import toy_task


def _config(total_steps):
    config = toy_task.get_config("synthetic")
    config.total_steps = total_steps
    config.checkpoint.save_every = 2
    config.train.log_every = 1
    return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    trainer.train_and_evaluate(_config(6), str(workdir), console=lambda s: None)
    return workdir


def _copy(finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    return workdir


def _largest_chunk(step_dir):
    chunks = sorted((step_dir / "state").glob("ocdbt.process_0/d/*"),
                    key=lambda p: p.stat().st_size)
    return chunks[-1]


def _overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


DAMAGE = {
    "truncated chunk": (lambda d: open(_largest_chunk(d), "r+b").truncate(1000), "bytes"),
    "8 bytes overwritten": (lambda d: _overwrite(_largest_chunk(d), 5000, b"\x7f" * 8),
                            "sha256"),
    "_METADATA deleted": (lambda d: (d / "state" / "_METADATA").unlink(), "missing"),
    "data state deleted": (lambda d: (d / "data" / "metadata").unlink(), "missing"),
    "broken JSON": (lambda d: (d / "data" / "metadata").write_text("{broken"), "bytes"),
    "partial step folder": (lambda d: shutil.rmtree(d / "state"), "missing"),
    "empty step folder": (lambda d: (shutil.rmtree(d), d.mkdir()), "empty"),
    "truncated, no checksums": (
        lambda d: (shutil.rmtree(d / checkpoint_lib.CHECKSUMS),
                   open(_largest_chunk(d), "r+b").truncate(1000)), "no checksums"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_step_is_moved_aside_and_the_run_resumes(finished_run, tmp_path,
                                                                kind):
    workdir = _copy(finished_run, tmp_path)
    damage, reason = DAMAGE[kind]
    damage(workdir / "checkpoints" / "6")
    lines = []
    trainer.train_and_evaluate(_config(8), str(workdir), console=lines.append)
    reports = [line for line in lines if "is damaged" in line]
    assert len(reports) == 1, lines
    assert "checkpoint step 6 is damaged" in reports[0] and reason in reports[0], reports
    assert "\n" not in reports[0]
    assert "resumed from step 4 in" in "\n".join(lines)
    moved = workdir / checkpoint_lib.DAMAGED / "6"
    assert moved.is_dir()  # kept, not deleted
    checkpoints = checkpoint_lib.Checkpointer(workdir / "checkpoints", save_interval_steps=1)
    assert checkpoints.all_steps()[-1] == 8
    checkpoints.close()


def test_strict_stops_at_a_damaged_step_and_moves_nothing(finished_run, tmp_path):
    workdir = _copy(finished_run, tmp_path)
    _overwrite(_largest_chunk(workdir / "checkpoints" / "6"), 5000, b"\x7f" * 8)
    config = _config(8)
    config.checkpoint.strict = True
    with pytest.raises(errors.UserError, match=r"checkpoint step 6 is damaged .*strict"):
        trainer.train_and_evaluate(config, str(workdir), console=lambda s: None)
    assert (workdir / "checkpoints" / "6").is_dir()
    assert not (workdir / checkpoint_lib.DAMAGED).exists()


def test_intact_checkpoint_of_another_config_is_refused_not_moved(finished_run, tmp_path):
    workdir = _copy(finished_run, tmp_path)
    config = _config(8)
    config.model.mlp = 256
    with pytest.raises(errors.UserError, match=r"step 6 .* does not fit this config .*"
                       r"saved \(512,\), config \(256,\)"):
        trainer.train_and_evaluate(config, str(workdir), console=lambda s: None)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert not (workdir / checkpoint_lib.DAMAGED).exists()


def test_every_step_carries_checksums_of_all_its_files(finished_run):
    for step in (2, 4, 6):
        step_dir = finished_run / "checkpoints" / str(step)
        recorded = checkpoint_lib.read_checksums(step_dir)
        assert sorted(recorded) == checkpoint_lib.step_files(step_dir)
        assert checkpoint_lib.verify_files(step_dir, recorded) is None


def test_checksums_are_split_over_processes(tmp_path):
    for i in range(5):
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / f"f{i}").write_bytes(bytes([i]) * (100 + i))
    shares = [checkpoint_lib.write_checksums(tmp_path, i, 2) for i in range(2)]
    assert sorted(shares[0]) == ["d/f0", "d/f2", "d/f4"] and sorted(shares[1]) == ["d/f1",
                                                                                 "d/f3"]
    merged = checkpoint_lib.read_checksums(tmp_path)
    assert len(merged) == 5
    _overwrite(tmp_path / "d" / "f3", 0, b"\x00")
    # Process 0 of 2 does not hash f3; process 1 does, and so does a single process.
    assert checkpoint_lib.verify_files(tmp_path, merged, 0, 2) is None
    assert "d/f3" in checkpoint_lib.verify_files(tmp_path, merged, 1, 2)
    assert "d/f3" in checkpoint_lib.verify_files(tmp_path, merged)


def test_inference_loading_refuses_a_damaged_step(finished_run, tmp_path):
    workdir = _copy(finished_run, tmp_path)
    _overwrite(_largest_chunk(workdir / "checkpoints" / "6"), 5000, b"\x7f" * 8)
    config = _config(6)
    mesh = sharding_lib.make_mesh(config.mesh)
    training = trainer.build(config, toy_task.ToyTask(config, None, mesh), mesh,
                             sharding_lib.logical_rules(config.sharding))
    checkpoints = checkpoint_lib.Checkpointer(workdir / "checkpoints", save_interval_steps=1)
    try:
        with pytest.raises(errors.UserError, match="step 6 .* is damaged"):
            checkpoints.restore_parts({"params": training.abstract_state.params})
        parts, step = checkpoints.restore_parts({"params": training.abstract_state.params}, 4)
        assert step == 4 and jax.tree.leaves(parts)
    finally:
        checkpoints.close()


def _scalar_steps(logdir, tag):
    steps = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            event = event_pb2.Event.FromString(record)
            steps.extend(event.step for v in event.summary.value if v.tag == tag)
    return steps


def test_resumed_run_has_one_curve_in_tensorboard(finished_run, tmp_path):
    workdir = _copy(finished_run, tmp_path)
    # The run is resumed from step 4: steps 5 and 6 are done again.
    shutil.rmtree(workdir / "checkpoints" / "6")
    assert _scalar_steps(workdir / "tensorboard", "train/loss") == [1, 2, 3, 4, 5, 6]
    trainer.train_and_evaluate(_config(8), str(workdir), console=lambda s: None)
    steps = _scalar_steps(workdir / "tensorboard", "train/loss")
    assert steps == list(range(1, 9)), steps
    assert sorted(_scalar_steps(workdir / "tensorboard", "eval/loss")) == [8]
    config_steps = _scalar_steps(workdir / "tensorboard", "config")
    assert config_steps == [0, 4]  # the config each part of the run used
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 8


def test_a_relative_checkpoint_directory_is_made_absolute(tmp_path, monkeypatch):
    import jax.numpy as jnp
    import numpy as np
    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(4.0)}
    checkpointer = checkpoint_lib.Checkpointer("run/checkpoints", save_interval_steps=1)
    try:
        assert checkpointer.directory.is_absolute()
        checkpointer.save(1, state, {"index": 1}, force=True)
        checkpointer.wait_until_finished()
        restored, data, step = checkpointer.restore(
            {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    finally:
        checkpointer.close()
    assert step == 1 and data == {"index": 1}
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
