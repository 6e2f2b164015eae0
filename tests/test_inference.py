"""Loading a trained stage-2 run for inference: parameters only, on any mesh."""
from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from configs import transformer_shapes
from dalle_jax.inference.transformer import TransformerRun
from dalle_jax.stages import transformer as stage2
from dalle_jax.train import checkpoint as checkpoint_lib
from dalle_jax.train import optimizer as optimizer_lib
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import trainer
from tests import code_shards

pytestmark = pytest.mark.slow  # each trains or runs subprocesses


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("codes"))
    info = code_shards.write_code_shards(directory, {"train": 64, "validation": 16})
    config = transformer_shapes.get_config("runlocal")
    config.data.update(data_dir=directory, name="shapes", image_size=32, shuffle_buffer=64)
    config.text.update(text_len=8, vocab_size=64)
    config.model.update(image_grid=info["grid"], image_vocab_size=info["vocab_size"],
                        num_layers=2, num_heads=2, head_dim=16, conv_kernel=3)
    config.mesh.update(data=-1, fsdp=2, tensor=1)
    config.update(batch_size=8, total_steps=3)
    config.optimizer.update(warmup_steps=1)
    config.train.update(ema_decay=0.5, log_every=1, eval_every=0, summary_every=0)
    workdir = str(tmp_path_factory.mktemp("run"))
    state = trainer.train_and_evaluate(config, workdir, console=lambda s: None)
    return workdir, jax.tree.map(np.asarray, state.ema_params), jax.tree.map(
        np.asarray, state.params)


def test_a_transformer_run_loads_its_ema_parameters_only(run, monkeypatch):
    workdir, ema, raw = run
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(ema),
                                                        jax.tree.leaves(raw)))

    def no_optimizer(*args, **kwargs):
        raise AssertionError("loading for inference built the optimizer")

    monkeypatch.setattr(optimizer_lib, "make_optimizer", no_optimizer)
    requested = []
    real = checkpoint_lib.Checkpointer.restore_parts
    monkeypatch.setattr(checkpoint_lib.Checkpointer, "restore_parts",
                        lambda self, parts, step=None: requested.append(set(parts))
                        or real(self, parts, step))
    loaded = TransformerRun.load(workdir)
    assert requested == [{"ema_params"}] and loaded.step == 3
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded.params), ema)


def test_a_run_loads_on_one_device_and_on_eight_and_samples_the_same(run):
    workdir = run[0]
    one_device = sharding_lib.make_mesh(
        ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
    sharded = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
    small, large = (TransformerRun.load(workdir, mesh=m) for m in (one_device, sharded))
    for leaf in jax.tree.leaves(small.params):
        assert len(leaf.sharding.device_set) == 1
    # On the 8-device mesh the parameters sit where the run's rules put them.
    rules = sharding_lib.logical_rules(large.config.sharding)
    model = stage2.transformer_lib.Transformer(large.model_config)
    with jax.set_mesh(sharded), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda r: stage2.init_variables(model, r), jax.random.key(0))
        expected = sharding_lib.logical_shardings(boxed, sharded, rules)["params"]
    for leaf, sharding in zip(jax.tree.leaves(large.params), jax.tree.leaves(expected)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(large.params))
    text = np.zeros((2, small.model_config.text_len), np.int32)
    text[:, 0] = [3, 5]
    codes_small = small.sampler().sample(text, seed=0, num_samples=2)
    codes_large = large.sampler().sample(text, seed=0, num_samples=2)
    np.testing.assert_array_equal(codes_small, codes_large)


def test_a_directory_that_is_not_a_run_is_refused_and_left_as_it_was(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        TransformerRun.load(str(tmp_path))
    (tmp_path / "config.json").write_text(open(f"{run[0]}/config.json").read())
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        TransformerRun.load(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
