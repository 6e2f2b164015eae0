"""The input side shown as a grid of training examples (a real subprocess)."""
import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_show_inputs_writes_grid_config_and_text_tokenizer(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dalle_jax.tools.show_inputs",
           "--config=configs/input_shapes.py:runlocal,res=32",
           f"--config.data.data_dir={tmp_path / 'tfds'}",
           "--config.data.num_train=300", "--config.data.num_validation=20",
           "--config.data.num_test=20", "--config.data.num_holdout=20",
           f"--workdir={workdir}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "examples/s" in result.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["data"]["num_train"] == 300 and config["data"]["image_size"] == 32
    assert (workdir / "text_tokenizer.model").exists()
    grid = np.asarray(Image.open(workdir / "examples.png"))
    assert grid.ndim == 3 and grid.shape[0] > 300 and grid.shape[1] > 600
    # The grid shows images (dark backgrounds) and captions (black text on white).
    assert (grid < 60).mean() > 0.2 and (grid == 255).mean() > 0.1
    # A second run reuses the dataset and the tokenizer.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
