"""launch/tpu_run.sh: argument handling, the gcloud commands it runs, worker logs."""
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "launch", "tpu_run.sh")
# Arguments that a careless quoting would split, expand or cut short.
TRICKY_ARGS = ["two words", "it's", '"double"', "$HOME", "a;b", "*"]


def _run(*args, env=None):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True,
                          env=env, timeout=60)


def _dry_run_commands(*command):
    result = _run("--tpu=my-tpu", "--zone=us-central2-b", "--project=my-project",
                  "--dry-run", "--", *command)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()
            if line.startswith("gcloud ")]


def _flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--", "true"], "--tpu"),
    (["--tpu=t", "--", "true"], "--zone"),
    (["--tpu=t", "--zone=z"], "after --"),
    (["--tpu=t", "--zone=z", "--"], "after --"),
    (["--tpu=t", "--zone=z", "python", "x.py"], "unknown argument 'python'"),
])
def test_usage_errors(args, message):
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "usage: launch/tpu_run.sh" in result.stderr
    assert not result.stdout


def test_dry_run_prints_copy_setup_and_run():
    copy, setup, run = _dry_run_commands("python", "-m", "dalle_jax.tools.train",
                                         "--config=configs/image_tokenizer_photos.py")
    for argv in (copy, setup, run):
        assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
        assert _flag(argv, "worker") == "all"
        assert _flag(argv, "zone") == "us-central2-b"
        assert _flag(argv, "project") == "my-project"

    assert copy[4:6] == ["scp", "--recurse"]
    assert copy[6].endswith("/dalle_jax") and copy[7] == "my-tpu:~/"

    assert setup[4:6] == ["ssh", "my-tpu"]
    setup_command = _flag(setup, "command")
    assert "pip install --quiet -e '.[tpu]'" in setup_command
    assert "sudo rm -f /tmp/libtpu_lockfile" in setup_command
    assert "lsof -t /dev/accel*" in setup_command and "kill -9" in setup_command

    assert run[4:6] == ["ssh", "my-tpu"]
    assert "python -m dalle_jax.tools.train --config=configs/image_tokenizer_photos.py" in _flag(run, "command")


def test_project_is_optional():
    result = _run("--tpu=t", "--zone=z", "--dry-run", "--", "true")
    assert result.returncode == 0 and "--project" not in result.stdout


def _fake_remote_home(tmp_path):
    """A home with ~/dalle_jax and a curl that answers the worker-number query with 3."""
    home = tmp_path / "home"
    (home / "dalle_jax").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text("#!/bin/sh\necho 3\n")
    (bin_dir / "curl").chmod(0o755)
    return {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_remote_command_keeps_every_argument_intact(tmp_path):
    print_args = "import json, os, sys; print(json.dumps([os.getcwd(), *sys.argv[1:]]))"
    *_, run = _dry_run_commands(sys.executable, "-c", print_args, *TRICKY_ARGS)
    env = _fake_remote_home(tmp_path)
    # What each worker's shell does with --command.
    result = subprocess.run(["bash", "-c", _flag(run, "command")], capture_output=True,
                            text=True, env=env, timeout=60, check=True)
    tag, _, output = result.stdout.strip().partition(" ")
    assert tag == "[worker" and output.startswith("3] ")
    assert json.loads(output[3:]) == [os.path.join(env["HOME"], "dalle_jax"), *TRICKY_ARGS]


def test_remote_command_fails_when_the_command_fails(tmp_path):
    *_, run = _dry_run_commands("sh", "-c", "echo oops; exit 7")
    result = subprocess.run(["bash", "-c", _flag(run, "command")], capture_output=True,
                            text=True, env=_fake_remote_home(tmp_path), timeout=60)
    assert result.returncode == 7 and result.stdout == "[worker 3] oops\n"


def test_run_copies_tree_and_splits_worker_logs(tmp_path):
    """A full run against a stand-in gcloud that records calls and plays two workers."""
    calls_file = tmp_path / "calls.jsonl"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        args = sys.argv[1:]
        record = {{"args": args}}
        if "scp" in args:
            source = args[args.index("--recurse") + 1]
            record["copied"] = sorted(os.listdir(source))
        with open({str(calls_file)!r}, "a") as f:
            f.write(json.dumps(record) + "\\n")
        if any("sed -u" in a for a in args):
            print("Using ssh batch size of 2.")
            print("[worker 0] step 1")
            print("[worker 1] step 1")
            print("[worker 0] done")
        """))
    (bin_dir / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    logs_dir = tmp_path / "logs"

    result = _run("--tpu=my-tpu", "--zone=z", f"--logs-dir={logs_dir}", "--",
                  "python", "-m", "dalle_jax.tools.train", env=env)
    assert result.returncode == 0, result.stderr
    assert "[worker 1] step 1" in result.stdout
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()]
    assert [c["args"][3] for c in calls] == ["scp", "ssh", "ssh"]  # after compute tpus tpu-vm
    copied = calls[0]["copied"]
    assert "dalle_jax" in copied and "launch" in copied
    assert not {".venv", ".git", "runs"} & set(copied)
    assert (logs_dir / "worker-0.log").read_text() == "step 1\ndone\n"
    assert (logs_dir / "worker-1.log").read_text() == "step 1\n"
    assert (logs_dir / "gcloud.log").read_text() == "Using ssh batch size of 2.\n"
