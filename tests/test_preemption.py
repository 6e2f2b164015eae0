"""A stop signal at every phase of a training run: exit 0, nothing half-written, and a
rerun ends bit-identical to a run that was never stopped.

Each case starts ``python -m dalle_jax.tools.train`` on the toy stage (synthetic data,
8 simulated CPU devices), sends SIGTERM (or SIGINT) when the run reports the phase,
then reruns the same command to the end and compares the final train state with an
uninterrupted run's, leaf by leaf.
"""
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dalle_jax.train import checkpoint as checkpoint_lib
from tests import toy_task

pytestmark = pytest.mark.slow  # subprocess training runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300
TOTAL = 12


def _command(workdir, *overrides):
    return [sys.executable, "-m", "dalle_jax.tools.train",
            "--config=tests/toy_task.py:synthetic", f"--workdir={workdir}",
            f"--config.total_steps={TOTAL}", *overrides]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1",
                XLA_FLAGS="--xla_force_host_platform_device_count=8")


def _run(command):
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def _signal_at(command, pattern, sig):
    """Runs ``command`` and sends ``sig`` when a line matches ``pattern`` (or at once
    when it is None); returns (exit code, output, seconds from the signal to exit)."""
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines, sent = [], None
    try:
        if pattern is None:
            time.sleep(0.5)  # the imports
            process.send_signal(sig)
            sent = time.monotonic()
        for line in process.stdout:
            lines.append(line)
            if sent is None and re.search(pattern, line):
                process.send_signal(sig)
                sent = time.monotonic()
        returncode = process.wait(timeout=TIMEOUT)
    finally:
        process.kill()
    assert sent is not None, f"the run never reported {pattern!r}:\n" + "".join(lines)[-3000:]
    return returncode, "".join(lines), time.monotonic() - sent


def _final_state(workdir):
    state, data_state, _ = toy_task.restore_run(workdir, toy_task.get_config("synthetic"),
                                                TOTAL)
    return state, data_state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    _run(_command(workdir))
    return _final_state(workdir)


def _prepare_checkpoint(workdir):
    """A run with a checkpoint part-way (for the restore case)."""
    returncode, output, _ = _signal_at(_command(workdir), r"^step 3/", signal.SIGTERM)
    assert returncode == 0 and "preempted" in output, output[-3000:]


PHASES = {
    # name: (overrides, line that starts the phase (None: at once), signal)
    "start-up (mesh, input)": ((), r"mesh \{", signal.SIGTERM),
    "restore": ((), r"restoring checkpoint step", signal.SIGTERM),
    "compile": ((), r"peak .* FLOP/s per device", signal.SIGTERM),
    "on a checkpoint step": ((), r"^step 2/", signal.SIGTERM),
    "between checkpoint steps": ((), r"^step 4/", signal.SIGTERM),
    "async save in flight": ((), r"^step 6/", signal.SIGTERM),
    "evaluation": (("--config.train.eval_every=4", "--config.data.eval_batches=200"),
                   r"evaluating at step 4", signal.SIGTERM),
    "after the last step": (("--config.data.eval_batches=200",),
                            rf"evaluating at step {TOTAL}", signal.SIGTERM),
    "ctrl-c": ((), r"^step 4/", signal.SIGINT),
}
# With a save every step a save is nearly always in flight; with one every 3 steps the
# signal lands on, or between, checkpoint steps.
CASES = {"start-up (imports)": ((), None, signal.SIGTERM)}
for _phase, (_overrides, _pattern, _sig) in PHASES.items():
    for _every in (1, 3):
        CASES[f"{_phase}, save every {_every}"] = (
            (*_overrides, f"--config.checkpoint.save_every={_every}"), _pattern, _sig)


@pytest.mark.parametrize("case", list(CASES))
def test_stop_signal_then_resume_is_exact(case, reference, tmp_path):
    overrides, pattern, sig = CASES[case]
    if case.startswith("restore"):
        _prepare_checkpoint(tmp_path)
    command = _command(tmp_path, *overrides)
    returncode, output, seconds = _signal_at(command, pattern, sig)
    assert returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert seconds < 120, f"{seconds:.0f} s from the signal to exit"
    name = signal.Signals(sig).name
    saved = re.search(r"preempted \((\w+)[^)]*\): saved step (\d+)", output)
    if saved:
        assert saved.group(1) == name
        steps = checkpoint_lib.Checkpointer(tmp_path / "checkpoints",
                                            save_interval_steps=1).all_steps()
        assert int(saved.group(2)) in steps and max(steps) == int(saved.group(2))
    else:
        assert f"stopped by {name}" in output, output[-4000:]
    if case == "start-up (imports)":
        assert not tmp_path.joinpath("checkpoints").exists()
        assert not list(tmp_path.iterdir()), "nothing is created before the run starts"
    # Every saved step is complete: it verifies (checksums) and restores.
    if tmp_path.joinpath("checkpoints").exists():
        assert not tmp_path.joinpath(checkpoint_lib.DAMAGED).exists()

    resumed = _run(_command(tmp_path, *overrides))
    assert "damaged" not in resumed, resumed[-3000:]
    state, data_state = _final_state(tmp_path)
    expected_state, expected_data = reference
    jax.tree.map(np.testing.assert_array_equal, state, expected_state)  # bit for bit
    assert data_state == expected_data
