"""The 4× diffusion upsampler: its training pairs, its Task, sampling from a run, the
bundle's optional part, generate --upsample and the evaluation's figures."""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dalle_jax.config import load_config_file
from dalle_jax.data import super_resolution as sr
from dalle_jax.evaluation import upsampler as upsampler_eval
from dalle_jax.inference import bundle as bundle_lib
from dalle_jax.inference import runs as runs_lib
from dalle_jax.inference import upsampler as upsampler_lib
from dalle_jax.stages import upsampler as stage
from dalle_jax.train import sharding as sharding_lib
from tests import test_bundle

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ training pairs


def test_the_area_downsample_is_the_mean_of_each_block():
    images = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    low = sr.area_downsample(images, 4)
    assert low.shape == (2, 2, 2, 3)
    np.testing.assert_allclose(low[1, 0, 1], images[1, :4, 4:].mean(axis=(0, 1)))
    with pytest.raises(ValueError, match="do not split"):
        sr.area_downsample(images[:, :6], 4)


def test_degrade_blurs_and_round_trips_the_share_of_rows_it_draws():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    plain, _ = sr.degrade(images, np.random.default_rng(1), factor=4)
    np.testing.assert_array_equal(plain, sr.to_uint8(sr.area_downsample(images, 4)))
    trips = []

    def round_trip(low):
        trips.append(len(low))
        return np.full_like(low, 7)

    low, which = sr.degrade(images, np.random.default_rng(1), factor=4, blur_sigma=0.6,
                            blur_prob=0.5, round_trip=round_trip, round_trip_prob=0.5)
    blurred, tripped = which["blurred"], which["round_trip"]
    assert blurred.sum() == tripped.sum() == 32  # half of 64, exactly
    assert trips == [32]  # one call, of one shape whatever the draw
    assert (low[tripped] == 7).all()
    kept = ~blurred & ~tripped
    np.testing.assert_array_equal(low[kept], plain[kept])
    smoothed = blurred & ~tripped  # a blur lowers the spread of noise images
    assert low[smoothed].astype(float).std() < plain[smoothed].astype(float).std()


class _Batches:
    """An image iterator with a position, like the input pipeline."""

    def __init__(self):
        self.index = 0

    def __next__(self):
        rng = np.random.default_rng(self.index)
        self.index += 1
        return {"image": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
                "mask": np.ones(4, bool)}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def test_the_pairs_resume_where_they_were():
    options = dict(factor=2, seed=3, blur_sigma=0.6, blur_prob=0.5,
                   round_trip=lambda low: 255 - low, round_trip_prob=0.5)
    pairs = sr.LowResPairs(_Batches(), **options)
    next(pairs)
    state = json.loads(json.dumps(pairs.get_state()))  # saved as JSON by the checkpoint
    expected = [next(pairs)["low_res"] for _ in range(3)]
    resumed = sr.LowResPairs(_Batches(), **options)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["low_res"], want)
    with pytest.raises(ValueError, match="version"):
        resumed.set_state({"version": 99})


# ------------------------------------------------------------------------ the Task


@pytest.fixture(scope="module")
def config():
    c = load_config_file(str(ROOT / "configs/upsampler_shapes.py:runlocal"))
    c.data.image_size = 32
    c.upsampler.update(crop_size=16, round_trip_prob=0.0)
    c.model.update(base_width=8, channel_mult=(1, 2), num_groups=4)
    return c


@pytest.fixture(scope="module")
def task(config):
    return stage.make_task(config, "/nonexistent", None)


@pytest.fixture(scope="module")
def params(task):
    import flax.linen as nn
    return nn.meta.unbox(task.init(jax.random.key(0)))["params"]


def test_crops_are_the_same_window_of_both_images(task):
    b, size = 6, 32
    ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    coords = np.stack([ys, xs, np.zeros_like(ys)], -1).astype(np.float32)
    high = jnp.asarray(np.repeat(coords[None], b, 0))
    high_crop, cond_crop = stage.crop_pairs(jax.random.key(1), high, high + 1000.0, 16, 4)
    assert high_crop.shape == (b, 16, 16, 3)
    np.testing.assert_array_equal(np.asarray(cond_crop), np.asarray(high_crop) + 1000.0)
    corners = np.asarray(high_crop[:, 0, 0, :2])
    assert (corners % 4 == 0).all() and len({tuple(c) for c in corners}) > 1
    same, _ = stage.crop_pairs(jax.random.key(1), high, high, 32, 4)  # a whole image
    np.testing.assert_array_equal(np.asarray(same), np.asarray(high))


def test_noise_augmentation_at_time_zero_leaves_the_input(task):
    low = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(1), low.shape)
    clean, logsnr = stage.augment_input(low, jnp.zeros(2), noise, task.schedule)
    np.testing.assert_allclose(np.asarray(clean), np.asarray(low), atol=5e-4)  # σ = e^-10
    noisy, logsnr_mid = stage.augment_input(low, jnp.full(2, 0.5), noise, task.schedule)
    assert float(jnp.abs(noisy - low).mean()) > 0.3 and (logsnr_mid < logsnr).all()


def test_the_loss_is_finite_and_matches_the_batch_spec(task, params):
    spec = task.batch_spec(4)
    assert spec["image"].shape == (4, 32, 32, 3) and spec["low_res"].shape == (4, 8, 8, 3)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
             "low_res": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
             "mask": np.array([True, True, True, False])}
    loss, metrics, _ = jax.jit(lambda p, b, k: task.loss(p, {}, b, k, train=True, step=0))(
        params, batch, jax.random.key(0))
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert 0 <= float(metrics["noise_aug_t"]) < 0.5
    # The padding row does not count: changing it leaves the loss as it was.
    batch["image"][3] = 0
    again, _, _ = jax.jit(lambda p, b, k: task.loss(p, {}, b, k, train=True, step=0))(
        params, batch, jax.random.key(0))
    np.testing.assert_allclose(float(again), float(loss), rtol=1e-6)
    assert task.flops_per_example > 0


def test_a_config_the_unet_cannot_take_is_refused(config):
    from dalle_jax import errors
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.upsampler.crop_size = 18
    with pytest.raises(errors.ConfigError, match="upsampler.crop_size"):
        stage.make_task(bad, "/nonexistent", None)
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.upsampler.round_trip_prob = 0.5
    with pytest.raises(errors.ConfigError, match="image_tokenizer_run"):
        stage.make_task(bad, "/nonexistent", None).round_trip()


# ---------------------------------------------------------------- sampling a model


@pytest.fixture(scope="module")
def upsampler(config, params):
    return upsampler_lib.Upsampler(config, params, runs_lib.local_batch_mesh(), 0)


def test_upsampling_is_4x_and_each_image_independent_of_its_batch(upsampler):
    low = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    high = upsampler.upsample(low, steps=3, seed=1)
    assert high.shape == (5, 32, 32, 3) and high.dtype == np.uint8
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(np.arange(5))
    np.testing.assert_array_equal(upsampler.upsample(low[3:], steps=3, keys=keys[3:]),
                                  high[3:])
    ancestral = upsampler.upsample(low, steps=3, seed=1, eta=1.0)
    np.testing.assert_array_equal(upsampler.upsample(low[3:], steps=3, keys=keys[3:],
                                                     eta=1.0), ancestral[3:])
    assert not np.array_equal(upsampler.upsample(low, steps=3, seed=2), high)


def test_sampling_on_eight_devices_equals_one_device(config, params, upsampler):
    one = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                                 jax.devices()[:1])
    single = upsampler_lib.Upsampler(config, params, one, 0)
    low = np.random.default_rng(1).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    a = upsampler.upsample(low, steps=2, eta=0.5)
    b = single.upsample(low, steps=2, eta=0.5)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float reductions in shards


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(eta=1.5), r"eta must lie in \[0, 1\]"),
    (dict(noise_level=1.0), r"noise_level must lie in \[0, 1\)"),
    (dict(t_start=0.0), r"t_start must lie in \(0, 1\]"),
])
def test_bad_settings_are_refused(upsampler, kwargs, match):
    low = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(upsampler_lib.UpsampleError, match=match):
        upsampler.upsample(low, **kwargs)


def test_images_of_another_size_or_type_are_refused(upsampler):
    with pytest.raises(upsampler_lib.UpsampleError, match=r"\[B, 8, 8, 3\]"):
        upsampler.upsample(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(upsampler_lib.UpsampleError, match="uint8"):
        upsampler.upsample(np.zeros((1, 8, 8, 3), np.float32))


# ------------------------------------------------------------------------ measures


def test_psnr_ssim_and_bicubic():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    assert (upsampler_eval.psnr(a, a) == 100).all()
    np.testing.assert_allclose(upsampler_eval.ssim(a, a), 1.0, atol=1e-6)
    b = np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)
    assert (upsampler_eval.psnr(b, a) < 30).all() and (upsampler_eval.ssim(b, a) < 1).all()
    flat = np.full((2, 4, 4, 3), 90, np.uint8)
    np.testing.assert_array_equal(upsampler_eval.bicubic(flat, 4), np.full((2, 16, 16, 3), 90))


class _Perfect:
    """An upsampler that returns the originals: every figure is at its best."""
    factor, low_size, high_size = 4, 4, 16

    def __init__(self, originals):
        self.originals = originals

    def upsample(self, low, **kwargs):
        np.testing.assert_array_equal(low, upsampler_eval.downsample(self.originals, 4))
        return self.originals

    def settings(self, steps=None, eta=None, t_start=None):
        return upsampler_lib.UpsampleSettings(steps or 25, eta or 0.0, 0.0, t_start or 1.0)


def test_held_out_scores_the_upsampler_beside_bicubic():
    rng = np.random.default_rng(0)
    images = np.kron(rng.integers(0, 256, (6, 4, 4, 3)), np.ones((1, 4, 4, 1)))
    images = images.astype(np.uint8)  # blocks: their area downsample is exact
    report = upsampler_eval.held_out(_Perfect(images), images)
    assert report["diffusion"]["psnr"] == 100 and report["diffusion"]["ssim"] == 1.0
    assert report["diffusion"]["consistency_psnr"] == 100
    assert report["bicubic"]["psnr"] < 40 and report["psnr_gain_db"] > 50
    assert report["images"] == 6 and report["steps"] == 25
    lines = upsampler_eval.report_lines({"split": "validation", "held_out": report})
    assert "consistency" in lines[-1] and "4 -> 16 px" in lines[0]


# ------------------------------------------------- a run, the bundle and generation


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The bundle's two tiny stages (16 px), and a two-step upsampler 16 -> 64 px whose
    inputs take round trips through that stage 1."""
    from dalle_jax.train import trainer
    root = tmp_path_factory.mktemp("upsampler")
    s1_dir, s2_dir = test_bundle.train_tiny_stages(root)
    c = load_config_file(str(ROOT / "configs/upsampler_shapes.py:runlocal"))
    c.data.update(image_size=64, data_dir=str(root / "tfds"), num_train=64,
                  num_validation=16, num_test=16, num_holdout=16, shuffle_buffer=64)
    c.upsampler.update(image_tokenizer_run=s1_dir, round_trip_prob=0.5)
    c.model.update(base_width=8, channel_mult=(1, 2), num_groups=4)
    c.update(total_steps=2, batch_size=8)
    c.train.update(summary_every=2, ema_decay=0.5)
    c.checkpoint.save_every = 2
    u_dir = str(root / "upsampler")
    lines = []
    trainer.train_and_evaluate(c, u_dir, console=lines.append)
    return s1_dir, s2_dir, u_dir, root, lines


@pytest.mark.slow
def test_a_run_trains_with_round_trips_and_loads_for_sampling(trained):
    *_, u_dir, root, lines = trained
    assert any("step 2/2" in line for line in lines)
    loaded = upsampler_lib.Upsampler.load_run(u_dir)
    assert loaded.step == 2 and (loaded.low_size, loaded.high_size) == (16, 64)
    low = np.zeros((2, 16, 16, 3), np.uint8)
    assert loaded.upsample(low, steps=2).shape == (2, 64, 64, 3)
    with pytest.raises(runs_lib.RunError, match="not of the upsampler"):
        upsampler_lib.Upsampler.load_run(trained[0])


@pytest.mark.slow
def test_the_bundle_carries_the_upsampler_and_generate_upsamples(trained, tmp_path):
    from dalle_jax.inference.text_to_image import GenerateError, TextToImage
    s1_dir, s2_dir, u_dir, root, _ = trained
    plain = tmp_path / "plain"
    bundle_lib.export(s2_dir, plain)
    with pytest.raises(GenerateError, match="has no upsampler"):
        TextToImage.load(plain).generate(["a red circle"], 1, upsample=True)

    out = tmp_path / "bundle"
    report = bundle_lib.export(s2_dir, out, upsampler=u_dir)
    assert report.part_bytes["upsampler"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parts"]["upsampler"]["source"]["step"] == 2
    model = TextToImage.load(out)
    result = model.generate(test_bundle.PROMPTS, 2, seed=3, upsample=True,
                            upsample_steps=2)
    assert result.images.shape == (2, 2, 64, 64, 3) and result.low_res.shape == (2, 2, 16,
                                                                                 16, 3)
    np.testing.assert_array_equal(result.low_res, model.generate(test_bundle.PROMPTS, 2,
                                                                 seed=3).images)
    assert result.records[0]["upsample"] == {"steps": 2, "eta": 0.0, "noise_level": 0.0,
                                             "t_start": 1.0}
    assert result.timings["upsample_s"] > 0
    again = model.generate(test_bundle.PROMPTS[1:], 2, seed=3, upsample=True,
                           upsample_steps=2)
    np.testing.assert_array_equal(again.images[0], result.images[1])
    with pytest.raises(GenerateError, match="noise_level"):
        model.generate(test_bundle.PROMPTS, 1, upsample=True, upsample_noise_level=2.0)

    # A run that is not an upsampler is refused, naming the part.
    with pytest.raises(bundle_lib.BundleError, match="upsampler"):
        bundle_lib.export(s2_dir, tmp_path / "wrong", upsampler=s1_dir)

    # The generate command: --upsample writes the 4x images and the stage-1 ones.
    cli = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "dalle_jax.tools.generate", f"--bundle={out}",
         "--prompt=a red circle", "--num_images=2", "--upsample", "--upsample_steps=2",
         f"--output={cli}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "with a 4x upsampler" in done.stdout and "upsampling" in done.stdout
    records = [json.loads(r) for r in (cli / "samples.jsonl").read_text().splitlines()]
    from PIL import Image
    assert Image.open(cli / records[0]["file"]).size == (64, 64)
    assert Image.open(cli / records[0]["file"].replace("images/", "low_res/", 1)).size == (
        16, 16)
    refused = subprocess.run(
        [sys.executable, "-m", "dalle_jax.tools.generate", f"--bundle={plain}",
         "--prompt=a", "--upsample_steps=3", f"--output={tmp_path / 'no'}"], cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and re.search("need --upsample", refused.stderr)
    assert "Traceback" not in refused.stderr

    # The evaluation measures it.
    from dalle_jax.evaluation import evaluate
    evaluation = evaluate.evaluate(model, data_dir=str(root / "tfds"), test_prompts=0,
                                   holdout_prompts=0, rerank_prompts=0,
                                   upsampler_examples=8, upsample_prompts=2,
                                   upsample_steps=2, progress=False)
    held = evaluation["upsampler"]["held_out"]
    assert held["images"] == 8 and held["steps"] == 2
    assert 0 < held["bicubic"]["psnr"] < 100 and -1 <= held["diffusion"]["ssim"] <= 1
    fid = evaluation["upsampler"]["fidelity"]
    assert fid["low_res"]["image_size"] == 16 and fid["upsampled"]["image_size"] == 64
    assert "upsampler 16 -> 64 px" in evaluate.table(evaluation)


def test_starting_from_bicubic_stays_near_it_at_a_low_start(upsampler):
    low = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    cubic = upsampler_eval.bicubic(low, 4).astype(int)
    near = upsampler.upsample(low, steps=2, t_start=0.001).astype(int)
    far = upsampler.upsample(low, steps=2, t_start=1.0).astype(int)
    assert np.abs(near - cubic).mean() < 2 < np.abs(far - cubic).mean()
