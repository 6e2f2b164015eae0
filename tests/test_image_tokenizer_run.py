"""A trained stage-1 run as a library (parameters only), its evaluation and the encoding job."""
import dataclasses

import jax
import numpy as np
import pytest
import tensorflow as tf

from dalle_jax.config import load_config_file
from dalle_jax.data import code_records
from dalle_jax.data import encoding
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.inference.image_tokenizer import ImageTokenizerRun
from dalle_jax.tools import eval_image_tokenizer
from dalle_jax.train import trainer

pytestmark = pytest.mark.slow  # each trains or runs subprocesses


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = load_config_file("configs/image_tokenizer_shapes.py:runlocal")
    config.model.update(n_hid=8, n_init=8, vocab_size=32, group_count=3)
    config.data.update(image_size=16, data_dir=str(tmp_path_factory.mktemp("tfds")),
                       num_train=64, num_validation=24, num_test=8, num_holdout=8)
    config.update(total_steps=2, batch_size=8)
    config.optimizer.warmup_steps = 1
    config.mesh.update(data=-1)
    config.encode.update(batch_size=16, splits=("validation", "holdout"))
    workdir = str(tmp_path_factory.mktemp("run"))
    trainer.train_and_evaluate(config, workdir, console=lambda s: None)
    return config, workdir


def test_load_encode_decode(run):
    config, workdir = run
    tokenizer = ImageTokenizerRun.load(workdir)  # from the run's own config.json
    assert tokenizer.step == 2 and tokenizer.grid_size == 4
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    codes = tokenizer.encode(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == np.int32
    assert 0 <= codes.min() and codes.max() < 32
    # The same pixels as floats in [0, 1] give the same codes.
    np.testing.assert_array_equal(tokenizer.encode(images / 255.0), codes)
    decoded = tokenizer.decode(codes)
    assert decoded.shape == (3, 16, 16, 3) and decoded.dtype == np.uint8


def test_loading_reads_the_ema_parameters_and_no_optimizer_state(run, monkeypatch):
    config, workdir = run
    from dalle_jax.train import checkpoint as checkpoint_lib
    from dalle_jax.train import optimizer as optimizer_lib
    from dalle_jax.train import sharding as sharding_lib
    from dalle_jax.stages import image_tokenizer as stage1
    mesh = sharding_lib.make_mesh(config.mesh)
    task = stage1.ImageTokenizerTask(config, workdir, mesh)
    training = trainer.build(config, task, mesh, sharding_lib.logical_rules(config.sharding))
    checkpoints = checkpoint_lib.Checkpointer(f"{workdir}/checkpoints", save_interval_steps=1)
    state, _, _ = checkpoints.restore(training.abstract_state)
    checkpoints.close()
    # EMA and raw parameters differ after two steps, so the comparison tells them apart.
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(
        jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)))

    def no_optimizer(*args, **kwargs):
        raise AssertionError("loading for inference built the optimizer")

    monkeypatch.setattr(optimizer_lib, "make_optimizer", no_optimizer)
    restored = {}
    real_restore_parts = checkpoint_lib.Checkpointer.restore_parts

    def record(self, parts, step=None):
        restored.update(parts)
        return real_restore_parts(self, parts, step)

    monkeypatch.setattr(checkpoint_lib.Checkpointer, "restore_parts", record)
    tokenizer = ImageTokenizerRun.load(workdir)
    assert set(restored) == {"ema_params"}  # the dVAE has no model state
    jax.tree.map(np.testing.assert_array_equal, tokenizer.variables["params"],
                 state.ema_params)


@pytest.mark.parametrize("images, message", [
    (np.zeros((1, 12, 16, 3), np.uint8), r"images must be \[B, 16, 16, 3\]"),
    (np.zeros((1, 16, 16, 4), np.uint8), r"images must be \[B, 16, 16, 3\]"),
    (np.zeros((16, 16, 3), np.uint8), r"images must be \[B, 16, 16, 3\]"),
    (np.full((1, 16, 16, 3), np.nan, np.float32), "NaN"),
    (np.full((1, 16, 16, 3), 2.0, np.float32), r"\[0, 1\]"),
    (np.zeros((1, 16, 16, 3), np.int32), "dtype"),
])
def test_encode_refuses_bad_images(run, images, message):
    with pytest.raises(ValueError, match=message):
        ImageTokenizerRun.load(run[1]).encode(images)


@pytest.mark.parametrize("codes, message", [
    (np.full((1, 4, 4), 32), r"codes must be in \[0, 32\)"),
    (np.full((1, 4, 4), -1), r"codes must be in \[0, 32\)"),
    (np.zeros((1, 4, 4), np.float32), "integers"),
    (np.zeros((4, 4), np.int32), r"codes must be \[B, 4, 4\]"),
    (np.zeros((1, 4, 2), np.int32), r"codes must be \[B, 4, 4\]"),
])
def test_decode_refuses_bad_codes(run, codes, message):
    with pytest.raises(ValueError, match=message):
        ImageTokenizerRun.load(run[1]).decode(codes)


def test_encoding_splits_the_batch_over_the_local_devices(run):
    config, workdir = run
    tokenizer = ImageTokenizerRun.load(workdir, config)
    images = np.random.default_rng(1).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    placed = tokenizer._split_batch(images)
    codes = tokenizer._encode(tokenizer._device_variables, placed)
    assert len(codes.sharding.device_set) == 8
    assert codes.addressable_shards[0].data.shape == (4, 4, 4)  # 32 images / 8 devices
    expected = tokenizer.encode(images)
    # Two images at a time on each device: the same codes.
    chunked = dataclasses.replace(tokenizer, encode_chunk_size=2)
    np.testing.assert_array_equal(chunked.encode(images), expected)
    np.testing.assert_array_equal(chunked.encode(images[:3]), expected[:3])  # padded
    with pytest.raises(ValueError, match="encode_chunk_size 3 does not divide the 4"):
        dataclasses.replace(tokenizer, encode_chunk_size=3).encode(images)


def test_evaluation_reports_psnr_and_code_usage(run):
    config, workdir = run
    tokenizer = ImageTokenizerRun.load(workdir, config)
    results, (originals, recon) = eval_image_tokenizer.evaluate(tokenizer, config, "validation",
                                                          batch_size=16)
    assert results["examples"] == 24 and results["step"] == 2
    assert originals.shape == recon.shape == (8, 16, 16, 3)
    # The same figures computed here from the whole split in one batch.
    batch = next(pipeline_lib.make_pipeline(config, "validation", train=False,
                                            batch_size=24, process_index=0,
                                            process_count=1))
    codes = tokenizer.encode(batch["image"])
    error = ((tokenizer.decode(codes).astype(np.float64) - batch["image"]) / 255.0) ** 2
    mse = error.reshape(24, -1).mean(-1)
    assert results["mse"] == pytest.approx(mse.mean(), rel=1e-9)
    assert results["psnr"] == pytest.approx(np.mean(-10 * np.log10(mse)), rel=1e-9)
    counts = np.bincount(codes.ravel(), minlength=32)
    assert results["codes_used"] == pytest.approx(np.count_nonzero(counts) / 32)
    probs = counts[counts > 0] / counts.sum()
    assert results["perplexity"] == pytest.approx(np.exp(-np.sum(probs * np.log(probs))))


def test_encode_dataset_writes_resumable_code_shards(run, tmp_path):
    config, workdir = run
    tokenizer = ImageTokenizerRun.load(workdir, config)
    entries = encoding.encode_split(tokenizer, config, "validation", str(tmp_path),
                                          batch_size=16, progress=False)
    shard = tmp_path / entries[0]["file"]
    records = [code_records.parse_record(r)
               for r in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator()]
    assert sum(e["num_examples"] for e in entries) == len(records) == 24
    assert {r["id"].numpy().decode().split("/")[0] for r in records} == {"validation"}
    # The codes are the tokenizer's codes of the same images, in the same order.
    eval_pipeline = pipeline_lib.make_pipeline(config, "validation", train=False,
                                               batch_size=24, process_index=0,
                                               process_count=1, with_captions=True)
    batch = next(eval_pipeline)
    np.testing.assert_array_equal(np.stack([r["codes"].numpy() for r in records]),
                                  tokenizer.encode(batch["image"]))
    assert [r["caption"].numpy().decode() for r in records] == list(batch["caption"])
    # A rerun skips finished shards; leftovers of an interrupted run are not shards.
    before = shard.stat().st_mtime_ns
    (tmp_path / f".{entries[0]['file']}.tmp-0").write_bytes(b"partial")
    encoding.encode_split(tokenizer, config, "validation", str(tmp_path),
                                batch_size=16, progress=False)
    assert shard.stat().st_mtime_ns == before
    # Process sharding: two processes split the shards between them.
    two = [encoding.encode_split(tokenizer, config, "holdout", str(tmp_path / "p"),
                                       batch_size=16, process_index=i, process_count=2,
                                       progress=False) for i in range(2)]
    assert two[0] == two[1]
    assert all((tmp_path / "p" / e["file"]).exists() for e in two[0])


def _stage2_config(stage1_config, stage1_workdir, **data):
    config = load_config_file("configs/transformer_shapes.py:runlocal")
    config.data.update(**{k: stage1_config.data[k] for k in (
        "image_size", "num_train", "num_validation", "num_test", "num_holdout")}, **data)
    config.text.update(text_len=12, vocab_size=64)
    config.model.update(image_grid=(4, 4), image_vocab_size=32, num_layers=2, num_heads=2,
                        head_dim=16, conv_kernel=3)
    config.stage2.update(image_tokenizer=stage1_workdir, summary_prompts=2,
                         summary_samples=2)
    config.update(batch_size=8, total_steps=2)
    config.optimizer.warmup_steps = 1
    config.train.update(summary_every=2, log_every=1)
    return config


def test_stage2_trains_on_the_encoding_jobs_shards_and_on_the_fly(run, tmp_path):
    from dalle_jax.stages import transformer as stage2
    config, workdir = run
    tokenizer = ImageTokenizerRun.load(workdir, config)
    codes_dir = tmp_path / "codes"
    for split in ("train", "validation"):
        entries = encoding.encode_split(tokenizer, config, split, str(codes_dir),
                                              batch_size=16, progress=False)
        code_records.write_metadata(str(codes_dir), config.data.name, split, shards=entries,
                                    code_shape=(4, 4), vocab_size=32)
    from_shards = _stage2_config(config, workdir, data_dir=str(codes_dir))
    lines = []
    trainer.train_and_evaluate(from_shards, str(tmp_path / "s2"), console=lines.append)
    assert any(line.startswith("step 2/2") for line in lines), lines
    # The sample grid was decoded by the stage-1 run and written as a summary.
    events = list((tmp_path / "s2" / "tensorboard").glob("events*"))
    tags = {v.tag for e in events for record in tf.compat.v1.train.summary_iterator(str(e))
            for v in record.summary.value}
    assert any("samples" in t for t in tags), tags

    # On the fly: the frozen stage-1 run encodes the pipeline's images.
    on_the_fly = _stage2_config(config, workdir, source="captioned_shapes",
                                data_dir=config.data.data_dir)
    task = stage2.TransformerTask(on_the_fly, str(tmp_path / "s2"), None)
    reference = pipeline_lib.make_pipeline(on_the_fly, "train", train=True,
                                           text_tokenizer=task.text_tokenizer, with_captions=True,
                                           caption_dropout=on_the_fly.stage2.caption_dropout)
    batch, expected = next(task.train_data()), next(reference)
    assert "image" not in batch
    np.testing.assert_array_equal(batch["codes"], tokenizer.encode(expected["image"]))
    np.testing.assert_array_equal(batch["text_tokens"], expected["text_tokens"])
