"""Stage 2 end to end: code shards → pipeline (caption dropout) → training → sampling."""
from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import transformer_shapes
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data import sources
from dalle_jax.data import text_tokenizer
from dalle_jax.sampling import sampler as sampler_lib
from dalle_jax.stages import transformer as stage2
from dalle_jax.train import trainer
from tests import code_shards

pytestmark = pytest.mark.slow  # each trains or runs subprocesses


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("codes"))
    info = code_shards.write_code_shards(directory, {"train": 1200, "validation": 128})
    return directory, info


def _config(directory, info, **overrides):
    config = transformer_shapes.get_config("runlocal")
    config.data.update(data_dir=directory, name="shapes", image_size=32,
                       shuffle_buffer=256)
    config.text.update(text_len=16, vocab_size=128)
    config.model.update(image_grid=info["grid"], image_vocab_size=info["vocab_size"],
                        num_layers=2, num_heads=2, head_dim=32, conv_kernel=3)
    config.mesh.update(data=-1, fsdp=2, tensor=1)
    config.batch_size = 32
    config.total_steps = 120
    config.optimizer.update(learning_rate=3e-3, warmup_steps=10)
    config.train.update(ema_decay=0.0, log_every=40, eval_every=0)
    config.checkpoint.save_every = 1000
    config.stage2.caption_dropout = 0.1
    for key, value in overrides.items():
        config[key] = value
    return config


def test_caption_dropout_is_seeded_and_at_the_configured_rate(shards):
    directory, info = shards
    config = _config(directory, info)
    source = sources.make_source(config.data, "train")

    def captions(dropout, seed=0):
        pipeline = pipeline_lib.InputPipeline(
            source, batch_size=200, image_size=32, train=True, seed=seed,
            with_captions=True, caption_dropout=dropout, process_index=0, process_count=1)
        batch = next(pipeline)
        assert batch["codes"].shape == (200,) + info["grid"]
        return list(batch["caption"])

    dropped = captions(0.25)
    empty = sum(c == "" for c in dropped)
    assert 25 <= empty <= 75, empty  # 25% of 200, loosely
    assert captions(0.25) == dropped  # the same draws from the same seed
    assert captions(0.0).count("") == 0
    with pytest.raises(ValueError, match="caption_dropout"):
        pipeline_lib.InputPipeline(source, batch_size=4, image_size=32, caption_dropout=1.0,
                                   process_index=0, process_count=1)


def test_code_shards_that_do_not_match_the_model_are_refused(shards, tmp_path):
    directory, info = shards
    config = _config(directory, info)
    config.model.image_grid = (8, 8)
    with pytest.raises(ValueError, match=r"hold \(4, 4\) grids but config.model.image_grid"):
        stage2.TransformerTask(config, str(tmp_path), None).train_data()
    config = _config(directory, info)
    config.model.image_vocab_size = 32
    with pytest.raises(ValueError, match="use 64 codes but config.model.image_vocab_size"):
        stage2.TransformerTask(config, str(tmp_path), None).train_data()
    config = _config(directory, info)
    config.data.source = "captioned_shapes"
    with pytest.raises(ValueError, match="set config.stage2.image_tokenizer"):
        stage2.TransformerTask(config, str(tmp_path), None).train_data()


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    directory, info = shards
    config = _config(directory, info)
    workdir = str(tmp_path_factory.mktemp("stage2"))
    lines = []
    state = trainer.train_and_evaluate(config, workdir, console=lines.append)
    return config, workdir, state, lines


def test_a_tiny_model_learns_the_shapes_codes(trained):
    config, _, _, lines = trained
    evals = [line for line in lines if line.startswith("eval at step")]
    assert evals, lines
    image_loss = float(re.search(r"image_loss ([0-9.]+)", evals[-1]).group(1))
    uniform = math.log(config.model.image_vocab_size)
    # Well below the uniform baseline (ln 64 = 4.16 nats) after 120 steps on CPU.
    assert image_loss < 0.5 * uniform, evals[-1]
    first = [line for line in lines if line.startswith("step 40/")][0]
    assert "bits_per_image_token" in first and "text_loss" in first


def test_sampling_the_trained_model(trained):
    config, workdir, state, _ = trained
    cfg = stage2.model_config(config)
    params = jax.device_get(nn.unbox(state.params))
    sampler = sampler_lib.Sampler(cfg, params)
    tokenizer = text_tokenizer.load_text_tokenizer(config.text, workdir)
    prompts = ["a red circle in the center", ""]
    text = sampler.tokenize(prompts, tokenizer)
    assert (text[1] == text_tokenizer.PAD_ID).all()  # empty prompt: unconditional
    settings = sampler_lib.SamplingSettings(top_k=8, guidance_scale=2.0)
    codes = sampler.sample(text, seed=3, num_samples=3, settings=settings)
    assert codes.shape == (6,) + tuple(config.model.image_grid)
    assert codes.min() >= 0 and codes.max() < cfg.image_vocab_size
    np.testing.assert_array_equal(sampler.sample(text, seed=3, num_samples=3,
                                                 settings=settings), codes)
    assert not np.array_equal(sampler.sample(text, seed=4, num_samples=3,
                                             settings=settings), codes)
    # Cached decoding draws exactly what full recomputation draws.
    np.testing.assert_array_equal(
        sampler.sample(text, seed=3, num_samples=3, settings=settings, cache=False), codes)


def test_sampler_on_a_mesh_equals_unsharded(trained):
    config, _, state, _ = trained
    cfg = stage2.model_config(config)
    params = jax.device_get(nn.unbox(state.params))
    text = np.zeros((3, cfg.text_len), np.int32)
    text[:, 0] = [5, 6, 7]
    plain = sampler_lib.Sampler(cfg, params).sample(text, seed=1, num_samples=2)
    mesh = state.params["layers"]["query"]["kernel"].sharding.mesh
    sharded = sampler_lib.Sampler(cfg, state.params, mesh=mesh,
                                  rules=config.sharding.rules)
    # 6 rows over 8 batch shards: padded inside, trimmed on the way out.
    np.testing.assert_array_equal(sharded.sample(text, seed=1, num_samples=2), plain)
