"""The benchmarks at smoke size: every one writes a whole record, the page shows every figure.

Each benchmark runs once (module fixture) and the tests read its record; no timing is
asserted, only that every figure was measured and reported with its target.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from dalle_jax import config as config_lib
from dalle_jax.bench import BENCHMARKS
from dalle_jax.bench import record as record_lib
from dalle_jax.bench import report
from dalle_jax.bench import runner

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The Makefile installs both; without them the dVAE benchmark records the JAX side only.
HAVE_DALL_E = all(importlib.util.find_spec(m) is not None for m in ("torch", "dall_e"))


def _config_file(name: str) -> str:
    return f"configs/bench_{name}.py:runlocal"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every benchmark's smoke record and the directory they were written to."""
    output_dir = str(tmp_path_factory.mktemp("records"))
    workdir = str(tmp_path_factory.mktemp("work"))
    records = {}
    for name in BENCHMARKS:
        config = config_lib.load_config_file(str(ROOT / _config_file(name)))
        records[name], _ = runner.run(
            name, config, command=f"python -m dalle_jax.tools.bench {name}",
            config_file=_config_file(name), workdir=workdir, output_dir=output_dir,
            log=lambda line: None)
    return output_dir, records


def _figures(record):
    return {f["name"]: f for f in record["figures"]}


def test_every_record_is_complete_and_on_disk(runs):
    output_dir, records = runs
    assert set(records) == set(BENCHMARKS)
    for name, record in records.items():
        with open(record_lib.path(output_dir, name)) as f:
            assert json.load(f) == record
        assert record["benchmark"] == name and record["runlocal"] is True
        assert record["command"].startswith("python -m dalle_jax.tools.bench")
        assert record["config"]["runlocal"] is True and record["config_summary"]
        assert record["known_gap"] == record["config"]["known_gap"]
        assert set(record["git"]) == {"commit", "dirty"}
        machine = record["machine"]
        for key in ("cpu", "cpu_count", "python", "jax", "jaxlib", "device_kind"):
            assert machine[key], key
        assert record["date"] and record["duration_s"] > 0
        for f in record["figures"]:
            if f["value"] is None:  # not measured here, and the note says why
                assert (name == "dvae" and not HAVE_DALL_E) or (
                    name == "generate" and "run make demo first" in f["note"]) or (
                    name == "upsample" and "run make demo-upsample" in f["note"]), f["name"]
                continue
            assert math.isfinite(f["value"]), f["name"]
            assert (f["met"] is None) == (f["target"] is None), f["name"]
            if f["target"] is not None:
                op, target = f["target"]["op"], f["target"]["value"]
                assert f["met"] == (f["value"] >= target if op == ">=" else f["value"] <= target)


def test_input_measures_both_paths(runs):
    record = runs[1]["input"]
    assert record["machine"]["tensorflow"]
    figures = record["figures"]
    assert len(figures) == 2 and all(f["unit"] == "examples/s" and f["value"] > 0
                                     for f in figures)
    windows = record["details"]["window_examples_per_s"]
    assert len(windows["shapes"]) == len(windows["photos"]) == record["config"]["windows"]


@pytest.mark.skipif(not HAVE_DALL_E, reason="needs torch and dall_e (make venv)")
def test_dvae_compares_every_row_with_dall_e(runs):
    record = runs[1]["dvae"]
    details = record["details"]
    assert set(details["images_per_s"]) == {"torch", "jax", "jax_chunked"}
    assert details["max_abs_logit_diff"] < 1e-4  # the same weights on both sides
    figures = _figures(record)
    target = record["config"]["targets"]["min_speedup"]
    chunked = figures["dalle_jax (jit, lax.map over chunks of 1): speed-up over dall_e"]
    assert chunked["target"] == {"op": ">=", "value": target}
    whole = figures["dalle_jax (jit, whole batch): speed-up over dall_e"]
    assert whole["target"] is None  # the target is the encoding job's (chunked) program
    assert all(len(v) == record["config"]["repeats"]
               for v in details["minor_page_faults_per_batch"].values())


def test_dvae_without_dall_e_records_the_jax_side(monkeypatch):
    from dalle_jax.bench import dvae as dvae_bench
    from dalle_jax.models import openai_dvae

    def missing():
        raise ImportError("no module named 'dall_e'")

    monkeypatch.setattr(openai_dvae, "require_torch_and_dall_e", missing)
    lines = []
    config = config_lib.load_config_file(str(ROOT / _config_file("dvae")))
    measured = dvae_bench.measure(config, workdir="", log=lines.append)
    assert sum("dall_e comparison skipped" in line for line in lines) == 1
    assert set(measured["details"]["images_per_s"]) == {"jax", "jax_chunked"}
    speedups = [f for f in measured["figures"] if "speed-up" in f["name"]]
    assert speedups and all(f["value"] is None and f["met"] is None for f in speedups)
    assert "torch" not in measured["machine"]


def test_transformer_measures_training_sampling_and_guidance(runs):
    record = runs[1]["transformer"]
    config, details = record["config"], record["details"]
    bench = config["bench"]
    assert details["model"]["d_model"] == 64 and details["model"]["seq_len"] == 8 + 16
    assert {(r["dtype"], r["batch_size"]) for r in details["train"]} == {
        (d, b) for d in bench["dtypes"] for b in bench["train_batch_sizes"]}
    for r in details["train"]:
        assert math.isclose(r["examples_per_s"], r["batch_size"] / r["step_s"])
        assert 0 < r["mfu_percent"] <= 100
    for dtype in bench["dtypes"]:
        assert details["peak"][dtype]["flops_per_s"] > 0 and details["peak"][dtype]["source"]
    assert [r["batch_size"] for r in details["sampling"]] == bench["sample_batch_sizes"]
    for r in details["sampling"]:
        assert r["image_tokens"] == 16
        assert r["uncached_positions_timed"] == bench["uncached_positions"]
    targets = {f["name"]: f["target"] for f in record["figures"] if f["target"]}
    assert targets == {
        "training MFU, float32, batch 2": {
            "op": ">=", "value": config["targets"]["min_mfu_percent"]},
        "cached over uncached sampling, batch 1": {
            "op": ">=", "value": config["targets"]["min_cached_speedup"]},
        "guided (scale 3) over unguided sampling time, batch 1": {
            "op": "<=", "value": config["targets"]["max_guidance_overhead"]},
    }


def test_checkpoint_measures_hashing_and_the_12b_share(runs):
    record = runs[1]["checkpoint"]
    details, bench = record["details"], record["config"]["bench"]
    assert details["step_bytes"] > 0 and len(details["hash_s"]) == bench["repeats"]
    # The 12B preset's train state: params, two Adam moments and the EMA, fp32.
    assert details["params_12b"] == 12_292_836_992
    assert details["state_bytes_12b"] == 16 * details["params_12b"]
    assert bench["hosts_12b"] == 64  # a v5litepod-256: 4 chips per host
    # A smoke run hashes a capped stand-in for the per-host share.
    assert details["shard_bytes"] == min(details["state_bytes_12b"] // 64,
                                         bench["max_shard_bytes"])
    names = [f["name"] for f in record["figures"]]
    assert any(n.startswith("12B per-host share") for n in names)
    assert all(f["value"] > 0 for f in record["figures"])


def test_page_shows_every_figure_with_its_target(runs, tmp_path):
    output_dir, records = runs
    page = tmp_path / "BENCHMARKS.md"
    report.write(output_dir, str(page))
    text = page.read_text()
    assert "Not measured yet" not in text
    for record in records.values():
        assert f"## {record['title']} (smoke size" in text
        assert f"- command: `{record['command']}`" in text
        assert "- commit: " in text and record["machine"]["cpu"] in text
        assert f"Known gap: {record['known_gap']}" in text
        for f in record["figures"]:
            row = next(line for line in text.splitlines()
                       if line.startswith(f"| {f['name']} |"))
            cells = [c.strip() for c in row.strip("|").split(" | ")]
            assert cells[1] == report.format_value(f["value"], f["unit"])
            assert cells[2] == report.format_target(f["target"], f["unit"])
            assert cells[3] == report.format_met(f["met"])
    assert text.count("| figure | value | target | met | notes |") == len(BENCHMARKS)


def test_page_names_benchmarks_not_yet_run(tmp_path):
    text = report.render({}, output_dir=str(tmp_path), page_path=str(tmp_path / "B.md"))
    for name, benchmark in BENCHMARKS.items():
        assert f"## {benchmark.title}" in text
        assert f"Not measured yet: `python -m dalle_jax.tools.bench {name}`." in text


def test_dirty_check_ignores_the_records_it_rewrites(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "input.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-qm", "start")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks" / "input.json").write_text('{"new": 1}')
    (tmp_path / "untracked.txt").write_text("")
    state = record_lib.git_state(exclude=["benchmarks"])
    assert len(state["commit"]) == 40 and state["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert record_lib.git_state(exclude=["benchmarks"])["dirty"] is True


def test_command_line_applies_overrides_and_writes_record_and_page(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "dalle_jax.tools.bench", "dvae",
         "--config=configs/bench_dvae.py:runlocal", "--config.repeats=2",
         f"--output_dir={tmp_path}", f"--workdir={tmp_path / 'work'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "dvae.json").read_text())
    assert record["config"]["repeats"] == 2
    assert "--config.repeats=2" in record["command"]
    assert record["config_file"] == "configs/bench_dvae.py:runlocal"
    assert record["machine"]["device_count"] == 1
    assert "| figure | value | target | met | notes |" in (tmp_path / "BENCHMARKS.md").read_text()


def test_generate_measures_the_path_end_to_end_against_the_sampler(runs):
    record = runs[1]["generate"]
    figures = _figures(record)
    batch = record["config"]["bench"]["batch_size"]
    for name in (f"sampler alone, batch {batch}", f"decode to pixels, batch {batch}",
                 "generate command: images/s it reports (after loading)"):
        assert figures[name]["value"] > 0, name
    assert any(n.startswith("generate with PNGs") and f["value"] > 0
               for n, f in figures.items())
    wall = next(f for n, f in figures.items() if n.startswith("generate command: wall"))
    assert wall["value"] > 0
    # The demo's stages come from its report; a fresh checkout has none yet and says so.
    demo = figures["demo: whole job (make demo)"]
    assert demo["target"] == {"op": "<=", "value": 1200}
    assert demo["value"] is not None or "run make demo first" in demo["note"]


def test_upsample_measures_each_step_count_and_reports_the_demo(runs):
    record = runs[1]["upsample"]
    steps = record["config"]["bench"]["steps"]
    speed = [f for f in record["figures"] if f["unit"] == "images/s"]
    assert [f["name"].split(", ")[1] for f in speed] == [f"{s} DDIM steps" for s in steps]
    assert all(f["value"] > 0 for f in speed)
    assert set(record["details"]["seconds"]) == {str(s) for s in steps}
    names = {f["name"]: f for f in record["figures"]}
    training = names["upsampler training (make demo-upsample)"]
    assert training["target"] == {"op": "<=", "value": 900}
