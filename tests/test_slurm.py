"""launch/slurm_run.sh and launch/slurm_batch.sh against stand-in sbatch and srun.

The fake sbatch records its arguments and runs the batch script here, with the SLURM_*
variables a real allocation sets; the fake srun records its arguments and starts the
command once per task with SLURM_PROCID, SLURM_LOCALID, ..., each into the task's log,
ending the others when one fails (--kill-on-bad-exit).
"""
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBMIT = os.path.join(REPO_ROOT, "launch", "slurm_run.sh")
BATCH = os.path.join(REPO_ROOT, "launch", "slurm_batch.sh")
TRICKY_ARGS = ["two words", "it's", '"double"', "$HOME", "a;b", "*", "back\\slash", ""]
JOB_ID = "4242"

FAKE_SBATCH = r'''#!{python}
import json, os, subprocess, sys
STATE = {state!r}
args = sys.argv[1:]
i = 0
options = {{}}
while args[i].startswith("-"):
    key, _, value = args[i].partition("=")
    options[key] = value
    i += 1
script, script_args = args[i], args[i + 1:]
with open(os.path.join(STATE, "sbatch_calls.jsonl"), "a") as f:
    f.write(json.dumps({{"args": args, "cwd": os.getcwd()}}) + "\n")
nodes, per_node = int(options["--nodes"]), int(options["--ntasks-per-node"])
name = options["--job-name"]
env = dict(os.environ,
           SLURM_JOB_ID={job_id!r}, SLURM_JOB_NAME=name, SLURM_JOB_NUM_NODES=str(nodes),
           SLURM_NNODES=str(nodes), SLURM_NTASKS_PER_NODE=str(per_node),
           SLURM_NTASKS=str(nodes * per_node), SLURM_GPUS_PER_NODE=options["--gpus-per-node"],
           SLURM_JOB_NODELIST=f"node[1-{{nodes}}]", SLURM_SUBMIT_DIR=os.getcwd())
output = options["--output"].replace("%j", {job_id!r}).replace("%x", name)
print("Submitted batch job {job_id}", flush=True)
with open(output, "w") as log:
    status = subprocess.run(["bash", script, *script_args], env=env, cwd=options["--chdir"],
                            stdout=log, stderr=subprocess.STDOUT).returncode
with open(os.path.join(STATE, "batch_status"), "w") as f:
    f.write(str(status))
sys.exit(status if "--wait" in options else 0)
'''

FAKE_SRUN = r'''#!{python}
import json, os, subprocess, sys, time
STATE = {state!r}
args = sys.argv[1:]
i = 0
options = {{}}
while args[i].startswith("-"):
    key, _, value = args[i].partition("=")
    options[key] = value
    i += 1
command = args[i:]
recorded = {{k: v for k, v in os.environ.items()
             if k.startswith(("SLURM_", "JAX_", "TEST_")) or k == "PYTHONUNBUFFERED"}}
with open(os.path.join(STATE, "srun_calls.jsonl"), "a") as f:
    f.write(json.dumps({{"args": args, "env": recorded, "cwd": os.getcwd()}}) + "\n")
nodes, ntasks = int(options["--nodes"]), int(options["--ntasks"])
per_node = int(options["--ntasks-per-node"])
assert nodes * per_node == ntasks <= int(os.environ["SLURM_NTASKS"]), (options, os.environ)
tasks = []
for task in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(task), SLURM_LOCALID=str(task % per_node),
               SLURM_NODEID=str(task // per_node), SLURM_STEP_NUM_NODES=str(nodes),
               SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"], SLURM_NTASKS=str(ntasks),
               SLURM_STEPID="0")
    output = (options["--output"].replace("%j", os.environ["SLURM_JOB_ID"])
              .replace("%t", str(task)))
    log = open(output, "w")
    tasks.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
statuses = [None] * ntasks
while None in statuses:
    for task, process in enumerate(tasks):
        if statuses[task] is None and process.poll() is not None:
            statuses[task] = process.returncode
            if process.returncode != 0 and options.get("--kill-on-bad-exit") == "1":
                for other in tasks:
                    if other.poll() is None:
                        other.kill()
    time.sleep(0.02)
sys.exit(max(128 - s if s < 0 else s for s in statuses))
'''


class FakeCluster:
    def __init__(self, root):
        self.root = root
        bin_dir = root / "bin"
        bin_dir.mkdir()
        for name, text in [("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN)]:
            (bin_dir / name).write_text(text.format(python=sys.executable, state=str(root),
                                                    job_id=JOB_ID))
            (bin_dir / name).chmod(0o755)
        self.logs = root / "logs"
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("JAX_LOCAL_DEVICE_IDS", None)

    def submit(self, *args, env=None, timeout=60):
        return subprocess.run(["bash", SUBMIT, f"--logs-dir={self.logs}", *args],
                              capture_output=True, text=True, env={**self.env, **(env or {})},
                              timeout=timeout)

    def _calls(self, name):
        path = self.root / f"{name}_calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def sbatch_calls(self):
        return self._calls("sbatch")

    def srun_calls(self):
        return self._calls("srun")

    def task_log(self, task, name="dalle_jax"):
        return (self.logs / f"{name}-{JOB_ID}-{task}.log").read_text()

    def batch_log(self, name="dalle_jax"):
        return (self.logs / f"{name}-{JOB_ID}.log").read_text()


@pytest.fixture
def cluster(tmp_path):
    return FakeCluster(tmp_path)


def _options(argv):
    return dict(a.partition("=")[::2] for a in argv if a.startswith("--"))


# Each task prints what it sees as one JSON line.
PRINT_TASK = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), "
              "'env': {k: os.environ.get(k) for k in ('SLURM_PROCID', 'SLURM_LOCALID', "
              "'SLURM_NODEID', 'SLURM_NTASKS', 'JAX_LOCAL_DEVICE_IDS', 'TEST_A', 'TEST_B', "
              "'PYTHONUNBUFFERED')}}))")


def _task_output(cluster, task):
    return json.loads(cluster.task_log(task))


def test_scripts_parse():
    for script in (SUBMIT, BATCH):
        subprocess.run(["bash", "-n", script], check=True, timeout=30)


def test_one_process_per_gpu(cluster):
    result = cluster.submit("--nodes=2", "--gpus-per-node=2", "--wait", "--", sys.executable,
                            "-c", PRINT_TASK, *TRICKY_ARGS)
    assert result.returncode == 0, result.stderr
    assert "Submitted batch job 4242" in result.stdout
    (sbatch,) = cluster.sbatch_calls()
    options = _options(sbatch["args"])
    assert options["--nodes"] == "2"
    assert options["--ntasks-per-node"] == "2"
    assert options["--gpus-per-node"] == "2"
    assert options["--chdir"] == REPO_ROOT
    assert options["--export"] == "ALL"
    assert options["--job-name"] == "dalle_jax"
    assert options["--output"] == f"{cluster.logs}/dalle_jax-%j.log"
    (srun,) = cluster.srun_calls()
    srun_options = _options(srun["args"][:srun["args"].index(sys.executable)])
    assert srun_options["--kill-on-bad-exit"] == "1"
    assert srun_options["--ntasks"] == "4" and srun_options["--ntasks-per-node"] == "2"
    assert srun_options["--output"] == f"{cluster.logs}/dalle_jax-%j-%t.log"
    assert srun["cwd"] == REPO_ROOT
    for task in range(4):
        seen = _task_output(cluster, task)
        assert seen["argv"] == TRICKY_ARGS
        assert seen["cwd"] == REPO_ROOT
        assert seen["env"]["SLURM_PROCID"] == str(task)
        assert seen["env"]["SLURM_LOCALID"] == str(task % 2)  # jax: this task's GPU
        assert seen["env"]["SLURM_NODEID"] == str(task // 2)
        assert seen["env"]["SLURM_NTASKS"] == "4"
        assert seen["env"]["JAX_LOCAL_DEVICE_IDS"] is None
        assert seen["env"]["PYTHONUNBUFFERED"] == "1"
    batch = cluster.batch_log()
    assert "2 node(s) node[1-2], 2 task(s) per node (one per gpu), 2 GPU(s) per node" in batch


def test_one_process_per_node_sees_every_gpu(cluster):
    result = cluster.submit("--nodes=3", "--gpus-per-node=4", "--per=node", "--wait", "--",
                            sys.executable, "-c", PRINT_TASK)
    assert result.returncode == 0, result.stderr
    options = _options(cluster.sbatch_calls()[0]["args"])
    assert options["--nodes"] == "3" and options["--ntasks-per-node"] == "1"
    assert options["--gpus-per-node"] == "4"
    srun_options = _options(cluster.srun_calls()[0]["args"])
    assert srun_options["--ntasks"] == "3" and srun_options["--ntasks-per-node"] == "1"
    for task in range(3):
        seen = _task_output(cluster, task)
        assert seen["env"]["SLURM_PROCID"] == str(task) and seen["env"]["SLURM_LOCALID"] == "0"
        # Without it, jax's SLURM detection would give the one task GPU 0 only.
        assert seen["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"


def test_environment_passes_through_intact(cluster):
    result = cluster.submit("--nodes=1", "--gpus-per-node=1", "--wait",
                            "--env=TEST_A=it's \"q\", a;b $HOME", "--env=TEST_B", "--",
                            sys.executable, "-c", PRINT_TASK,
                            env={"TEST_B": "from here,  two  spaces"})
    assert result.returncode == 0, result.stderr
    seen = _task_output(cluster, 0)
    assert seen["env"]["TEST_A"] == "it's \"q\", a;b $HOME"
    assert seen["env"]["TEST_B"] == "from here,  two  spaces"


def test_partition_time_account_name_and_other_options(cluster):
    result = cluster.submit("--nodes=1", "--gpus-per-node=8", "--partition=gpu",
                            "--time=04:00:00", "--account=ml", "--job-name=dvae.shapes",
                            "--sbatch-option=--qos=high", "--sbatch-option=--exclusive", "--",
                            "true")
    assert result.returncode == 0, result.stderr
    args = cluster.sbatch_calls()[0]["args"]
    options = _options(args)
    assert options["--partition"] == "gpu" and options["--time"] == "04:00:00"
    assert options["--account"] == "ml" and options["--job-name"] == "dvae.shapes"
    assert options["--qos"] == "high" and "--exclusive" in args
    assert "--wait" not in options
    assert "dvae.shapes-4242-0.log" in os.listdir(cluster.logs)


def test_a_failed_task_fails_the_job_and_ends_the_others(cluster):
    start = time.monotonic()
    result = cluster.submit("--nodes=2", "--gpus-per-node=2", "--wait", "--", "bash", "-c",
                            'if [ "$SLURM_PROCID" = 2 ]; then sleep 0.5; echo boom; exit 5; fi; '
                            'echo running; exec sleep 60')
    assert time.monotonic() - start < 30  # the others did not run their minute
    assert result.returncode != 0, result.stderr
    assert f"error: the job failed (exit status {result.returncode})" in result.stderr
    assert cluster.task_log(2) == "boom\n"
    assert cluster.task_log(0) == "running\n"
    assert "error: a task failed (srun's exit status" in cluster.batch_log()


def test_without_wait_the_batch_script_still_fails(cluster):
    result = cluster.submit("--nodes=1", "--gpus-per-node=2", "--", "sh", "-c",
                            '[ "$SLURM_PROCID" = 0 ] || exit 7')
    assert result.returncode == 0, result.stderr  # submitted
    assert (cluster.root / "batch_status").read_text() == "7"
    assert "error: a task failed (srun's exit status 7)" in cluster.batch_log()


def test_dry_run_prints_the_sbatch_command(cluster):
    result = cluster.submit("--nodes=2", "--gpus-per-node=8", "--env=TEST_A=x y", "--dry-run",
                            "--", "python", "-m", "dalle_jax.tools.train", *TRICKY_ARGS)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    argv = shlex.split(line)
    assert argv[:3] == ["env", "TEST_A=x y", "sbatch"]
    assert argv[argv.index("--") + 1:] == ["python", "-m", "dalle_jax.tools.train", *TRICKY_ARGS]
    assert argv[argv.index("--") - 4].endswith("launch/slurm_batch.sh")
    assert cluster.sbatch_calls() == []


def test_usage_example_runs_under_dry_run(cluster):
    help_text = subprocess.run(["bash", SUBMIT, "-h"], capture_output=True, text=True,
                               timeout=30).stdout
    example = re.sub(r"\\\n\s*", " ", help_text.split("example:", 1)[1]).strip()
    argv = shlex.split(example)
    assert argv[0] == "launch/slurm_run.sh"
    result = subprocess.run(["bash", SUBMIT, "--dry-run", *argv[1:]], capture_output=True,
                            text=True, env=cluster.env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "--config=configs/image_tokenizer_shapes.py" in argv
    assert os.path.exists(os.path.join(REPO_ROOT, "configs", "image_tokenizer_shapes.py"))


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-node=8", "--", "true"], "--nodes=N is required"),
    (["--nodes=2", "--", "true"], "--gpus-per-node=G is required"),
    (["--nodes=0", "--gpus-per-node=8", "--", "true"], "--nodes=N is required"),
    (["--nodes=2", "--gpus-per-node=8"], "no command to run"),
    (["--nodes=2", "--gpus-per-node=8", "--per=socket", "--", "true"], "--per takes gpu or node"),
    (["--nodes=2", "--gpus-per-node=8", "--job-name=a%b", "--", "true"], "--job-name takes"),
    (["--nodes=2", "--gpus-per-node=8", "--env=TEST_UNSET_X", "--", "true"], "is not set here"),
    (["--nodes=2", "--gpus-per-node=8", "--sbatch-option=qos", "--", "true"], "--sbatch-option"),
    (["--nodes=2", "--gpus-per-node=8", "python"], "unknown argument 'python'"),
])
def test_usage_errors(cluster, args, message):
    result = subprocess.run(["bash", SUBMIT, *args], capture_output=True, text=True,
                            env=cluster.env, timeout=30)
    assert result.returncode == 2
    first, *rest = result.stderr.splitlines()
    assert first.startswith("error: ") and message in first, result.stderr
    assert rest[0].startswith("usage: launch/slurm_run.sh")
    assert cluster.sbatch_calls() == []


def test_batch_script_outside_an_allocation_says_how_to_run_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", BATCH, "--", "true"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 2 and "submit it with sbatch" in result.stderr
