"""The main job end to end at a tiny size (real subprocesses): every stage, then an
interruption in the middle of stage 2 and a rerun that continues from there."""
import json
import pathlib
import signal
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _command(tmp_path):
    return [sys.executable, "-m", "dalle_jax.tools.demo", "--config=configs/demo.py:runlocal",
            f"--workdir={tmp_path / 'demo'}", f"--config.data.data_dir={tmp_path / 'tfds'}",
            "--config.data.num_train=200", "--config.data.num_validation=24",
            "--config.data.num_test=24", "--config.data.num_holdout=24",
            # Long enough that a stop at step 2 lands before the end.
            "--config.transformer.total_steps=40"]


@pytest.mark.slow
def test_the_demo_runs_every_stage_and_continues_after_an_interruption(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(_command(tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, in_stage2 = [], False
    for line in proc.stdout:
        lines.append(line)
        in_stage2 = in_stage2 or "== [5/9]" in line
        if in_stage2 and line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    first = "".join(lines) + rest
    assert proc.returncode == 0, first[-3000:]
    assert "stopped by SIGTERM" in first and "Traceback" not in first
    assert "== [6/9]" not in first, "the demo went on after the stop"
    for header in ("[1/9] dataset", "[2/9] caption tokenizer", "[3/9] stage 1",
                   "[4/9] encode"):
        assert header in first

    again = subprocess.run(_command(tmp_path), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    second = again.stdout + again.stderr
    assert again.returncode == 0, second[-3000:]
    # The finished stages are skipped, stage 2 resumes from its checkpoint.
    assert second.count("done already") == 4, second[-3000:]
    assert "restoring checkpoint step" in second
    assert "== [9/9] evaluate" in second and "demo done" in second
    report = json.loads((workdir / "demo_report.json").read_text())
    assert set(report["stages"]) == {"dataset", "text_tokenizer", "stage1", "encode",
                                     "stage2", "reranker", "export", "generate", "evaluate"}
    assert all(stage["seconds"] >= 0 for stage in report["stages"].values())
    manifest = json.loads((workdir / "bundle" / "manifest.json").read_text())
    assert manifest["parts"]["transformer"]["source"]["step"] == 40
    assert manifest["parts"]["reranker"]["source"]["step"] == 4
    evaluation = json.loads((workdir / "evaluation.json").read_text())
    assert evaluation["fidelity"]["test"]["images"] == 4
    assert evaluation["reranking"]["images_drawn"] == 2 * 3 * 2
    assert "PSNR" in second and "one object: colour + cell" in second
    assert "reranking (2 prompts" in second
    grid = np.asarray(Image.open(workdir / "demo_grid.png"))
    assert grid.ndim == 3 and grid.shape[0] > 7 * 48
    records = [json.loads(r) for r in
               (workdir / "samples" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 7 * 2
    assert all(r["candidates"] == 3 and r["score"] is not None for r in records)
    assert (workdir / "examples.png").exists()

    third = subprocess.run(_command(tmp_path), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0 and third.stdout.count("done already") == 9

    # make demo-upsample: every stage of the demo is kept; the upsampler is trained on the
    # dataset at 4x, the bundle re-exported with it, the images upsampled and evaluated.
    upsample = [arg.replace(":runlocal", ":runlocal,upsample") for arg in _command(tmp_path)]
    fourth = subprocess.run(upsample, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = fourth.stdout + fourth.stderr
    assert fourth.returncode == 0, out[-3000:]
    assert fourth.stdout.count("done already") == 6, out[-3000:]
    for header in ("[7/11] dataset for the upsampler", "[8/11] upsampler", "[9/11] export",
                   "[11/11] evaluate"):
        assert header in out
    manifest = json.loads((workdir / "bundle" / "manifest.json").read_text())
    assert manifest["parts"]["upsampler"]["source"]["step"] == 6
    records = [json.loads(r) for r in
               (workdir / "samples" / "samples.jsonl").read_text().splitlines()]
    assert all(r["upsample"]["steps"] == 4 for r in records)
    image = np.asarray(Image.open(workdir / "samples" / records[0]["file"]))
    assert image.shape == (128, 128, 3)
    comparison = np.asarray(Image.open(workdir / "upsample_grid.png"))
    assert comparison.shape[1] > 3 * 128 and comparison.shape[0] >= 7 * 128
    evaluation = json.loads((workdir / "evaluation.json").read_text())
    assert evaluation["upsampler"]["held_out"]["images"] == 8
    assert evaluation["upsampler"]["fidelity"]["upsampled"]["image_size"] == 128
    assert "upsampler 32 -> 128 px" in fourth.stdout
