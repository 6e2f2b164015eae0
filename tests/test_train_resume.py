"""The training core as real processes: exact resume after SIGKILL, SIGTERM, two hosts.

Each test runs ``python -m dalle_jax.tools.train`` on the toy stage of
tests/toy_task.py, with 8 simulated CPU devices per run (4 per process for two).
"""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dalle_jax.train import checkpoint as checkpoint_lib
from dalle_jax.train import trainer
from tests import toy_task

pytestmark = pytest.mark.slow  # each trains or runs subprocesses

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300


def _command(workdir, *overrides, arg=""):
    config = "tests/toy_task.py" + (f":{arg}" if arg else "")
    return [sys.executable, "-m", "dalle_jax.tools.train", f"--config={config}",
            f"--workdir={workdir}", *overrides]


def _env(devices=8):
    return dict(os.environ, PYTHONUNBUFFERED="1",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _run(command):
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def _run_until_step(command, step, sig, after_checkpoint=None):
    """Starts a run and sends ``sig`` once it reports ``step`` or a later one (and
    the checkpoint directory ``after_checkpoint`` is committed); returns (rc, stdout)."""
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            reported = re.match(r"step (\d+)/", line)
            if (reported and int(reported.group(1)) >= step and
                    (after_checkpoint is None or after_checkpoint.exists())):
                process.send_signal(sig)
                break
        lines.extend(process.stdout)
        return process.wait(timeout=TIMEOUT), "".join(lines)
    finally:
        process.kill()


def _restore(workdir, config, step=None):
    return toy_task.restore_run(workdir, config, step)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shapes_dir):
    """An uninterrupted 12-step run on the captioned-shapes input pipeline."""
    workdir = tmp_path_factory.mktemp("reference")
    _run(_command(workdir, f"--config.data.data_dir={shapes_dir}"))
    return _restore(workdir, toy_task.get_config(), 12)


@pytest.mark.parametrize("kill_at,save_every", [
    (6, 4),  # two steps after a finished save: those steps are redone
    (3, 1),  # a save every step: the kill lands while an async save is in flight
])
def test_exact_resume_after_sigkill(reference, shapes_dir, tmp_path, kill_at, save_every):
    command = _command(tmp_path, f"--config.data.data_dir={shapes_dir}",
                       f"--config.checkpoint.save_every={save_every}")
    # Killed once a checkpoint is committed, at or after step ``kill_at``.
    returncode, _ = _run_until_step(command, kill_at, signal.SIGKILL,
                                    tmp_path / "checkpoints" / str(save_every))
    assert returncode == -signal.SIGKILL
    output = _run(command)
    resumed_from = int(re.search(r"resumed from step (\d+)", output).group(1))
    assert 0 < resumed_from <= 12
    state, data_state, _ = _restore(tmp_path, toy_task.get_config(), 12)
    expected_state, expected_data, _ = reference
    jax.tree.map(np.testing.assert_array_equal, state, expected_state)  # bit for bit
    assert data_state == expected_data


def test_sigterm_saves_at_the_current_step_and_exits_zero(shapes_dir, tmp_path):
    command = _command(tmp_path, f"--config.data.data_dir={shapes_dir}",
                       "--config.total_steps=400", "--config.checkpoint.save_every=1000")
    returncode, output = _run_until_step(command, 3, signal.SIGTERM)
    assert returncode == 0, output
    saved = int(re.search(r"preempted \(SIGTERM\): saved step (\d+)", output).group(1))
    assert 3 <= saved < 400
    checkpoints = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", save_interval_steps=1)
    assert checkpoints.all_steps() == [saved]
    checkpoints.close()
    _, data_state, _ = _restore(tmp_path, toy_task.get_config(), saved)
    assert data_state["examples_seen"] == saved * 16


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    config = toy_task.get_config("synthetic")
    config.total_steps = 4
    expected = trainer.train_and_evaluate(config, str(tmp_path / "one"),
                                          console=lambda s: None)
    port = _free_port()
    processes = [
        subprocess.Popen(
            _command(tmp_path / "two", "--config.total_steps=4",
                     f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                     f"--process_id={i}", arg="synthetic"),
            cwd=ROOT, env=_env(devices=4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=TIMEOUT) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    assert "step 4/4" in outputs[0][0] and "step 4/4" not in outputs[1][0], \
        "only process 0 reports"
    state, data_state, _ = _restore(tmp_path / "two", config, 4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 state.params, jax.device_get(expected.params))
    # Each process's data position is in the checkpoint; a run with another process
    # count gets none (its streams could not be mapped), so read the file itself.
    assert data_state is None
    saved = json.loads((tmp_path / "two/checkpoints/4/data/metadata").read_text())
    assert saved == {"processes": [{"index": 4}, {"index": 4}]}
