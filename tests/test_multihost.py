"""Two hosts end to end: a real stage trained by two processes, killed, resumed; and a
process that dies mid-run, which must not leave the other hanging.

Each run is ``python -m dalle_jax.tools.train`` — the command every host of a pod runs —
on ``configs/image_tokenizer_shapes.py:runlocal`` shrunk to seconds (16 px, a small
dVAE, 8 steps), as two processes joined through ``--coordinator_address`` (gloo CPU
collectives), 4 simulated CPU devices each, one shared workdir.

Compared exactly (bit for bit): a run that was SIGKILLed and resumed against an
uninterrupted one on the same two processes, since both execute the same compiled
programs on the same devices over the same batches (the data positions are restored),
and XLA's CPU kernels and gloo's reductions are deterministic for a fixed layout. Not
compared here: a one-process run of this config, whose input is not the same batches
(each process shuffles and shards with its own index); tests/test_train_resume.py
compares one and two processes on input that does not depend on the process count.
"""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dalle_jax.config import load_config_file
from dalle_jax.data import shapes_tfds
from dalle_jax.train import checkpoint as checkpoint_lib
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import trainer
from dalle_jax.train import watchdog as watchdog_lib

pytestmark = pytest.mark.slow  # subprocess training runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/image_tokenizer_shapes.py:runlocal"
TOTAL = 8
SAVE_EVERY = 2
OVERRIDES = {
    "model.n_hid": 8, "model.n_init": 8, "model.vocab_size": 32, "model.group_count": 3,
    "data.image_size": 16, "data.num_train": 64, "data.num_validation": 8,
    "data.num_test": 8, "data.num_holdout": 8, "data.shuffle_buffer": 64,
    "total_steps": TOTAL, "batch_size": 8, "optimizer.warmup_steps": 1,
    "stage1.temperature_steps": TOTAL, "stage1.kl_warmup_steps": 2,
    "checkpoint.save_every": SAVE_EVERY, "train.log_every": 1, "train.summary_every": 0,
}
TIMEOUT = 240  # one run, start-up included, on a busy 2-core machine
KILL_BOUND = 90  # seconds from killing one process to the other's exit
DOG = 15  # config.train.watchdog_seconds when one process is killed
# Two processes must reach each new program's first collective within 30 s of each
# other (jax's gloo context set-up waits that long), but only process 0 may use the
# persistent compilation cache (jax writes it from process 0 alone, under keys that
# differ per process), so process 1 compiled alone while process 0 waited, for up to a
# minute on a busy machine. So the stage's runs compile on both processes (no cache)
# and with cheap LLVM optimisation (2-6x faster to compile here; the same flags for every run
# compared, so the comparison stays exact).
STAGE_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
                          "--xla_backend_optimization_level=0",
             "JAX_ENABLE_COMPILATION_CACHE": "false"}
TOY_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The captioned-shapes splits, generated once (not by two processes at a time)."""
    path = tmp_path_factory.mktemp("tfds")
    data = _config().data
    shapes_tfds.build_captioned_shapes(
        path, image_size=data.image_size, num_train=data.num_train,
        num_validation=data.num_validation, num_test=data.num_test,
        num_holdout=data.num_holdout,
        holdout_pairs=tuple(tuple(p) for p in data.holdout_pairs), seed=data.dataset_seed)
    return path


def _config():
    config = load_config_file(str(ROOT / CONFIG))
    config.update_from_flattened_dict(OVERRIDES)
    return config


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage_args(data_dir):
    return [f"--config={CONFIG}", f"--config.data.data_dir={data_dir}",
            *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]


def _start(workdir, args, tag="run", env=STAGE_ENV):
    """Both processes of a run, each writing stdout and stderr to its own log file
    (nothing to drain, so neither can block on a full pipe)."""
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env)
    processes, logs = [], []
    for i in range(2):
        log = pathlib.Path(f"{workdir}.{tag}.process{i}.log")
        command = [sys.executable, "-m", "dalle_jax.tools.train", f"--workdir={workdir}",
                   *args, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={i}"]
        with open(log, "w") as out:
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                              stderr=subprocess.STDOUT, text=True))
        logs.append(log)
    return processes, logs


def _kill(processes):
    for p in processes:
        if p.poll() is None:
            p.kill()
    for p in processes:
        p.wait(timeout=30)


def _wait_for_line(processes, log, pattern, condition=lambda: True):
    """Polls ``log`` until a line matches ``pattern`` and ``condition()`` holds; the
    last such line."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        matches = list(re.finditer(pattern, log.read_text(), re.MULTILINE))
        if matches and condition():
            return matches[-1]
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.05)
    raise AssertionError(f"no line {pattern!r}: " + log.read_text()[-3000:])


def _finish(processes, logs):
    """Waits for a run's processes to succeed; their outputs."""
    for p in processes:
        p.wait(timeout=TIMEOUT)
    outputs = [log.read_text() for log in logs]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-4000:]
    return outputs


def _restore(workdir):
    """The final train state, on host (restored on this process's 8 devices)."""
    config = _config()
    mesh = sharding_lib.make_mesh(config.mesh)
    task = trainer.load_task(config, str(workdir), mesh)
    training = trainer.build(config, task, mesh, sharding_lib.logical_rules(config.sharding))
    checkpoints = checkpoint_lib.Checkpointer(f"{workdir}/checkpoints", save_interval_steps=1)
    try:
        state, _, step = checkpoints.restore(training.abstract_state)
    finally:
        checkpoints.close()
    assert step == TOTAL
    return jax.device_get(state)


def _eval_line(output):
    return re.search(rf"^eval at step {TOTAL}: .*$", output, re.MULTILINE).group(0)


def test_two_hosts_killed_then_resumed_end_exactly_as_uninterrupted(data_dir, tmp_path):
    """The uninterrupted reference runs alongside the killed run and its resumption
    (a run's two processes wait for each other at every collective: the cores one run
    leaves idle, the other uses)."""
    args = _stage_args(data_dir)
    reference_dir, workdir = tmp_path / "reference", tmp_path / "run"
    first = workdir / "checkpoints" / str(SAVE_EVERY)
    runs = []
    try:
        runs.append(reference := _start(reference_dir, args))
        runs.append(killed := _start(workdir, args))
        # SIGKILL both processes, without warning, once the first checkpoint is
        # committed (the run goes on: the kill may land during a later save).
        killed_at = _wait_for_line(killed[0], killed[1][0], rf"^step (\d+)/{TOTAL}",
                                   first.exists)
        _kill(killed[0])
        assert [p.returncode for p in killed[0]] == [-signal.SIGKILL] * 2
        killed_at = int(killed_at.group(1))
        assert killed_at < TOTAL, "the run ended before the kill"
        runs.append(resumed_run := _start(workdir, args, tag="resumed"))  # same command
        reference_outputs = _finish(*reference)
        outputs = _finish(*resumed_run)
    finally:
        for processes, _ in runs:
            _kill(processes)

    resumed = [int(re.search(r"^resumed from step (\d+)", o, re.MULTILINE).group(1))
               for o in outputs]
    assert resumed[0] == resumed[1], "both processes resume from the same step"
    assert resumed[0] % SAVE_EVERY == 0 and SAVE_EVERY <= resumed[0] < TOTAL
    assert re.search(rf"^step {resumed[0] + 1}/{TOTAL} ", outputs[0], re.MULTILINE)

    # Bit for bit the uninterrupted run's state: parameters, EMA, optimizer, step, rng.
    state, expected = _restore(workdir), _restore(reference_dir)
    assert jax.tree.structure(state) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, state, expected)
    # One TensorBoard writer (process 0) for two processes.
    assert len(list((reference_dir / "tensorboard").iterdir())) == 1

    for run_dir, run_outputs in ((workdir, outputs), (reference_dir, reference_outputs)):
        # The two processes agree: the same evaluation (a global mean each fetched
        # for itself), and the same as the other run's.
        assert _eval_line(run_outputs[0]) == _eval_line(run_outputs[1])
        assert _eval_line(run_outputs[0]) == _eval_line(reference_outputs[0])
        # Only process 0 reports steps.
        assert re.search(rf"^step {TOTAL}/{TOTAL} ", run_outputs[0], re.MULTILINE)
        assert not re.search(r"^step \d+/", run_outputs[1], re.MULTILINE)
        # Each process's input position is in the checkpoint, each past the same number
        # of examples; and each process wrote the checksums of its own files.
        final = run_dir / "checkpoints" / str(TOTAL)
        saved = json.loads((final / "data" / "metadata").read_text())["processes"]
        assert [s["process_index"] for s in saved] == [0, 1]
        assert [s["examples_seen"] for s in saved] == [TOTAL * 4] * 2
        assert sorted(p.name for p in (final / "checksums").iterdir()) == [
            "process_00000-of-00002.json", "process_00001-of-00002.json"]


def test_a_dead_process_ends_the_other_instead_of_a_hang(tmp_path):
    """SIGKILL process 1 while both train: process 0 ends, non-zero, in bounded time —
    through its watchdog, or through jax's own error if that comes first.

    On the toy stage (tests/toy_task.py): what ends process 0 does not depend on the
    model, and its small step compiles in a moment on process 1 (see STAGE_ENV)."""
    processes, logs = _start(tmp_path / "run", [
        "--config=tests/toy_task.py:synthetic", "--config.total_steps=100000",
        "--config.checkpoint.save_every=100000", f"--config.train.watchdog_seconds={DOG}"],
        env=TOY_ENV)
    try:
        _wait_for_line(processes, logs[0], r"^step 3/")  # the watchdog is armed
        processes[1].kill()
        killed = time.monotonic()
        try:
            returncode = processes[0].wait(timeout=KILL_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still running {KILL_BOUND} s after process 1 died:\n"
                        + logs[0].read_text()[-3000:])
        seconds = time.monotonic() - killed
    finally:
        _kill(processes)
    output = logs[0].read_text()
    assert returncode != 0, output[-3000:]
    assert seconds < KILL_BOUND
    if returncode == watchdog_lib.EXIT_CODE:
        how = "watchdog"
        assert re.search(r"watchdog: no training progress for \d+ s .*last completed step "
                         r"\d+; waiting on: ", output), output[-3000:]
        assert "most recent call first" in output  # the stacks
    else:
        how = f"jax's error (status {returncode})"
    last = re.findall(r"^step (\d+)/", output, re.MULTILINE)[-1]
    print(f"\nprocess 0 ended {seconds:.1f} s after process 1 was killed, by {how}; "
          f"its last step line: {last}")
