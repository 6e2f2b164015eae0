"""Reranking in generation: a tiny contrastive run exported with the bundle, candidates
scored from their pixels, the best kept; and the bundle without a reranker refusing."""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dalle_jax.config import load_config_file
from dalle_jax.inference import bundle as bundle_lib
from dalle_jax.inference import reranker as reranker_lib
from dalle_jax.inference.text_to_image import GenerateError, TextToImage
from dalle_jax.train import trainer
from tests.test_bundle import PROMPTS, train_tiny_stages

pytestmark = pytest.mark.slow  # trains three tiny runs

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    s1_dir, s2_dir = train_tiny_stages(root)
    config = load_config_file("configs/contrastive_shapes.py:runlocal")
    config.data.update(image_size=16, data_dir=str(root / "tfds"), num_train=64,
                       num_validation=16, num_test=16, num_holdout=16, shuffle_buffer=64)
    config.model.update(image_widths=(8, 16))
    config.update(batch_size=8, total_steps=3)
    config.contrastive.eval_batch_size = 8
    config.text.update(vocab_size=64, text_len=12)
    config.mesh.update(data=-1, fsdp=2, tensor=1)
    reranker_dir = str(root / "reranker")
    trainer.train_and_evaluate(config, reranker_dir, console=lambda s: None)
    return s1_dir, s2_dir, reranker_dir


@pytest.fixture(scope="module")
def bundles(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles")
    with_reranker = bundle_lib.export(runs[1], out / "reranked", reranker=runs[2])
    plain = bundle_lib.export(runs[1], out / "plain")
    return with_reranker, plain


@pytest.fixture(scope="module")
def model(bundles):
    return TextToImage.load(bundles[0].path)


def test_the_bundle_carries_the_reranker_as_an_optional_part(runs, bundles, model):
    report, plain = bundles
    manifest = json.loads((report.path / "manifest.json").read_text())
    part = manifest["parts"]["reranker"]
    assert part["source"] == {"run": str(pathlib.Path(runs[2]).resolve()), "step": 3}
    assert "reranker/text_tokenizer.model" in manifest["files"]
    assert report.part_bytes["reranker"] > 0
    assert "reranker" not in json.loads((plain.path / "manifest.json").read_text())["parts"]
    assert TextToImage.load(plain.path).reranker is None
    # The loaded parameters are the run's.
    run = reranker_lib.Reranker.load_run(runs[2])
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(model.reranker.embed_images(images), run.embed_images(images),
                               rtol=1e-5, atol=1e-6)


def test_embeddings_are_unit_vectors_and_scores_their_cosines(model):
    r = model.reranker
    images = np.random.default_rng(1).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    z_img = r.embed_images(images)
    z_txt = r.embed_texts(r.tokenize(PROMPTS))
    assert z_img.shape == (7, r.embed_dim) and z_txt.shape == (2, r.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(z_img, axis=1), 1.0, rtol=1e-5)
    scores = r.scores(images, [PROMPTS[i % 2] for i in range(7)])
    np.testing.assert_allclose(scores, [z_img[i] @ z_txt[i % 2] for i in range(7)],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, 16, 16, 3\]"):
        r.embed_images(np.zeros((2, 8, 8, 3), np.uint8))


def test_reranking_keeps_the_best_scored_candidates_deterministically(model):
    plain = model.generate(PROMPTS, 6, seed=4)
    assert plain.scores.shape == (2, 6) and not plain.reranked  # scored, not reranked
    result = model.generate(PROMPTS, 2, seed=4, candidates=6, keep_all=True)
    assert result.reranked and result.images.shape[:2] == (2, 2)
    # The candidates are the images an unreranked request draws.
    np.testing.assert_array_equal(result.candidates.images, plain.images)
    np.testing.assert_allclose(result.candidates.scores, plain.scores, rtol=1e-5)
    for p in range(2):
        best = np.argsort(-plain.scores[p], kind="stable")[:2]
        np.testing.assert_array_equal(result.images[p], plain.images[p, best])
        assert list(result.scores[p]) == pytest.approx(list(plain.scores[p, best]), rel=1e-5)
        kept = [r for r in result.records if r["prompt_index"] == p]
        assert [r["candidate"] for r in kept] == list(best)
        assert [r["rank"] for r in kept] == [0, 1] and kept[0]["score"] >= kept[1]["score"]
        ranks = [r["rank"] for r in result.candidates.records if r["prompt_index"] == p]
        assert sorted(ranks) == list(range(6))
    again = model.generate(PROMPTS, 2, seed=4, candidates=6)
    np.testing.assert_array_equal(again.images, result.images)
    assert set(result.timings) == {"sample_s", "decode_s", "score_s"}
    assert result.timings["score_s"] > 0


def test_a_bundle_without_a_reranker_refuses_candidates(bundles):
    plain = TextToImage.load(bundles[1].path)
    with pytest.raises(GenerateError, match="has no reranker.*--reranker="):
        plain.generate(PROMPTS, 2, candidates=4)
    assert plain.generate(PROMPTS, 2, candidates=2).images.shape[:2] == (2, 2)
    with pytest.raises(GenerateError, match="at least num_images"):
        plain.generate(PROMPTS, 3, candidates=2)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dalle_jax.tools.generate", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_generate_command_reranks_and_keeps_all_candidates(bundles, model, tmp_path):
    from dalle_jax import visualize
    out = tmp_path / "out"
    result = _cli(f"--bundle={bundles[0].path}", f"--prompt={PROMPTS[0]}", "--num_images=2",
                  "--candidates=5", "--keep_all", "--seed=2", f"--output={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the best of 5 each" in result.stdout and "scoring" in result.stdout
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    expected = model.generate(PROMPTS[:1], 2, seed=2, candidates=5)
    assert [r["candidate"] for r in lines] == [r["candidate"] for r in expected.records]
    assert all(isinstance(r["score"], float) for r in lines)
    for record in lines:
        path = visualize.save_png(expected.image(0, record["index"]), tmp_path / "e.png")
        assert (out / record["file"]).read_bytes() == path.read_bytes()
    candidates = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(candidates) == 5 and sorted(r["rank"] for r in candidates) == list(range(5))
    assert all((out / r["file"]).exists() and r["file"].startswith("candidates/")
               for r in candidates)


def test_the_generate_command_refuses_reranking_without_a_reranker(bundles, tmp_path):
    for args, match in (
            ([f"--bundle={bundles[1].path}", "--candidates=4"], "has no reranker"),
            ([f"--bundle={bundles[0].path}", "--keep_all"], "--keep_all needs --candidates")):
        result = _cli(*args, "--prompt=a red star", "--num_images=2",
                      f"--output={tmp_path / 'out'}")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and re.search(match, errors[0]), result.stderr


def test_a_damaged_reranker_part_is_refused_naming_it(bundles, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundles[0].path, target)
    (target / "reranker" / "text_tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(bundle_lib.BundleError, match="reranker: .*text_tokenizer.model"):
        bundle_lib.load(target)


def test_a_reranker_of_another_image_size_is_not_exported(runs, tmp_path):
    config = json.loads((pathlib.Path(runs[2]) / "config.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(runs[2], other)
    config["data"]["image_size"] = 32
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(bundle_lib.BundleError, match="scores 32px images.*16px"):
        bundle_lib.export(runs[1], tmp_path / "b", reranker=str(other))
    with pytest.raises(bundle_lib.BundleError, match="reranker: .*nowhere"):
        bundle_lib.export(runs[1], tmp_path / "b", reranker=str(tmp_path / "nowhere"))
    with pytest.raises(bundle_lib.BundleError, match="not of the contrastive model"):
        bundle_lib.export(runs[1], tmp_path / "b", reranker=runs[0])
    assert not (tmp_path / "b").exists()


def test_evaluate_reports_the_reranker_and_the_gain_from_reranking(model, runs):
    from dalle_jax.evaluation import evaluate
    data_dir = str(pathlib.Path(runs[0]).parent / "tfds")
    report = evaluate.evaluate(model, data_dir=data_dir, test_prompts=2, holdout_prompts=0,
                               images_per_prompt=1, progress=False, rerank_prompts=4,
                               rerank_candidates=(2, 4), rerank_seeds=(0, 1),
                               reranker_examples=16)
    retrieval = report["reranker"]["retrieval"]
    assert retrieval["pairs"] == 16 and 0 <= retrieval["image_to_text_r@1"] <= 1
    assert retrieval["image_to_text_r@10"] >= retrieval["image_to_text_r@1"]
    zero = report["reranker"]["zero_shot"]
    assert zero["colour_chance"] == pytest.approx(1 / 8) and 0 <= zero["shape"] <= 1
    gain = report["reranking"]
    assert gain["images_drawn"] == 4 * 4 * 2 and gain["seeds"] == [0, 1]
    some = [k for k in gain["figures"] if k.endswith("top1_of_4")]
    assert some and all(len(gain["figures"][k]["per_seed"]) == 2 for k in some)
    text = evaluate.table(report)
    assert "reranker (validation, 16 pairs)" in text and "reranking (4 prompts" in text
    json.dumps(report)
