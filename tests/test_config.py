"""Config files, their ':arg' variants, override checking and the resolved config."""
import json
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from dalle_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.py"))


def test_parse_arg_types_and_errors():
    arg = config_lib.parse_arg("runlocal,res=32", runlocal=False, res=64, name="x")
    assert arg.runlocal is True and arg.res == 32 and arg.name == "x"
    assert config_lib.parse_arg(None, res=64).res == 64
    with pytest.raises(ValueError, match="unknown config argument 'resolution'"):
        config_lib.parse_arg("resolution=32", res=64)
    with pytest.raises(ValueError, match="res='big' is not a int"):
        config_lib.parse_arg("res=big", res=64)
    with pytest.raises(ValueError, match="needs a value"):
        config_lib.parse_arg("res", res=64)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_documents_its_command(path):
    doc = path.read_text().split('"""')[1]
    assert f"--config=configs/{path.name}" in doc, f"{path.name}: docstring lacks its command"
    config = config_lib.load_config_file(str(path))
    assert isinstance(config, ml_collections.ConfigDict)
    json.loads(config.to_json_best_effort())  # serialisable as the run's config.json


def test_shapes_variants():
    default = config_lib.load_config_file(str(ROOT / "configs/input_shapes.py"))
    local = config_lib.load_config_file(str(ROOT / "configs/input_shapes.py:runlocal,res=32"))
    assert default.data.image_size == 64 and default.data.num_train == 50_000
    assert local.data.image_size == 32 and local.data.num_train < default.data.num_train


def test_image_tokenizer_shapes_objectives():
    def load(arg):
        return config_lib.load_config_file(str(ROOT / f"configs/image_tokenizer_shapes.py:{arg}"))

    tuned, paper, vq = load("kind=dvae"), load("objective=paper"), load("kind=vqvae")
    # The default dVAE reconstructs with MSE, so its KL weights shrink with the loss.
    assert tuned.model.recon_loss == "mse" and paper.model.recon_loss == "logit_laplace"
    assert tuned.stage1.kl_weight < paper.stage1.kl_weight == 6.6
    assert tuned.stage1.marginal_kl_weight < paper.stage1.marginal_kl_weight
    assert tuned.optimizer.learning_rate == 2 * paper.optimizer.learning_rate
    # The schedules follow each run's length.
    for config in (tuned, paper, vq):
        assert config.stage1.temperature_steps == config.total_steps
        assert config.stage1.kl_warmup_steps == config.total_steps // 10
    assert tuned.total_steps == 2 * paper.total_steps
    assert vq.model.recon_loss == "mse" and vq.total_steps == paper.total_steps
    with pytest.raises(ValueError, match="objective must be mse or paper"):
        load("objective=laplace")


def test_check_override_keys_names_the_key():
    config = config_lib.load_config_file(str(ROOT / "configs/input_shapes.py"))
    config_lib.check_override_keys(config, ["data.image_size", "text.text_len", "seed"])
    with pytest.raises(KeyError, match=r"'data.imagesize'.*did you mean 'image_size'"):
        config_lib.check_override_keys(config, ["data.imagesize"])
    with pytest.raises(KeyError, match=r"'model.num_layers': the config has no field 'model'"):
        config_lib.check_override_keys(config, ["model.num_layers"])
    with pytest.raises(KeyError, match=r"'seed.x'"):
        config_lib.check_override_keys(config, ["seed.x"])


def test_write_config_is_json(tmp_path):
    config = config_lib.load_config_file(str(ROOT / "configs/input_shapes.py:runlocal"))
    path = config_lib.write_config(config, tmp_path / "run")
    written = json.loads(path.read_text())
    assert written["data"]["num_train"] == config.data.num_train
    assert written["data"]["holdout_pairs"][0] == ["green", "triangle"]
    assert not list((tmp_path / "run").glob(".*tmp*"))


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dalle_jax.tools.train_text_tokenizer", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_rejects_unknown_key_and_wrong_type(tmp_path):
    unknown = _cli("--config=configs/input_shapes.py", "--config.data.num_trian=10",
                   f"--workdir={tmp_path}")
    assert unknown.returncode == 2
    assert "unknown config key 'data.num_trian'" in unknown.stderr
    assert "did you mean 'num_train'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    wrong_type = _cli("--config=configs/input_shapes.py", "--config.data.image_size=big",
                      f"--workdir={tmp_path}")
    assert wrong_type.returncode == 2
    assert "--config.data.image_size=big" in wrong_type.stderr
    assert not list(tmp_path.iterdir()), "nothing may be written before the config is valid"
