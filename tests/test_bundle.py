"""Export → load → generate: inference bundles and the text-to-image API on a tiny run."""
from __future__ import annotations

import json
import re
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from dalle_jax.config import load_config_file
from dalle_jax.inference import bundle as bundle_lib
from dalle_jax.inference import text_to_image
from dalle_jax.inference.text_to_image import GenerateError, TextToImage
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import trainer

pytestmark = pytest.mark.slow  # trains two tiny stages

PROMPTS = ["a red circle in the center", "a big blue square above a green star"]


def train_tiny_stages(root: pathlib.Path) -> tuple[str, str]:
    """A two-step stage-1 run (16 px → 4x4 codes of 32) and a three-step stage-2 run on
    its codes (encoded on the fly); returns their workdirs."""
    data_dir = str(root / "tfds")
    s1 = load_config_file("configs/image_tokenizer_shapes.py:kind=vqvae,runlocal")
    s1.model.update(n_hid=8, n_init=8, vocab_size=32, group_count=3, code_dim=8)
    s1.data.update(image_size=16, data_dir=data_dir, num_train=64, num_validation=16,
                   num_test=16, num_holdout=16)
    s1.update(total_steps=2, batch_size=8)
    s1.optimizer.warmup_steps = 1
    s1.mesh.update(data=-1)
    s1.train.update(summary_every=0)
    s1_dir = str(root / "stage1")
    trainer.train_and_evaluate(s1, s1_dir, console=lambda s: None)

    s2 = load_config_file("configs/transformer_shapes.py:runlocal")
    s2.data.update(source="captioned_shapes", data_dir=data_dir, image_size=16,
                   num_train=64, num_validation=16, num_test=16, num_holdout=16,
                   shuffle_buffer=64)
    s2.text.update(text_len=12, vocab_size=64)
    s2.model.update(image_grid=(4, 4), image_vocab_size=32, num_layers=2, num_heads=2,
                    head_dim=16, conv_kernel=3)
    s2.stage2.update(image_tokenizer=s1_dir)
    s2.mesh.update(data=-1, fsdp=2, tensor=1)
    s2.update(batch_size=8, total_steps=3)
    s2.optimizer.update(warmup_steps=1)
    s2.train.update(ema_decay=0.5, log_every=1, eval_every=0, summary_every=0)
    s2_dir = str(root / "stage2")
    trainer.train_and_evaluate(s2, s2_dir, console=lambda s: None)
    return s1_dir, s2_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_tiny_stages(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "bundle"
    report = bundle_lib.export(runs[1], out)
    return out, report


@pytest.fixture(scope="module")
def model(exported):
    return TextToImage.load(exported[0])


def copy_bundle(exported, tmp_path) -> pathlib.Path:
    target = tmp_path / "bundle"
    shutil.copytree(exported[0], target)
    return target


# ------------------------------------------------------------------------------ export


def test_the_bundle_holds_parameters_only_with_a_checksummed_manifest(runs, exported):
    path, report = exported
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == bundle_lib.FORMAT
    assert manifest["format_version"] == bundle_lib.FORMAT_VERSION
    files = manifest["files"]
    for name in ("transformer/config.json", "image_tokenizer/config.json",
                 "text_tokenizer.model"):
        assert name in files
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(files)
    for name, entry in files.items():
        assert entry["size"] == (path / name).stat().st_size
        assert len(entry["sha256"]) == 64
    transformer = manifest["parts"]["transformer"]
    assert transformer["source"] == {"run": str(pathlib.Path(runs[1]).resolve()),
                                     "step": 3, "ema": True}
    assert transformer["dtype"] == "float32"
    assert all(not name.startswith(("opt_state", "ema_params"))
               for name in transformer["shapes"])
    assert manifest["parts"]["image_tokenizer"]["source"]["step"] == 2
    # No optimizer state: the bundle is smaller than the training checkpoint.
    assert 0 < report.bundle_bytes < report.checkpoint_bytes
    assert not list(path.parent.glob(".bundle.tmp-*"))


def test_the_bundle_carries_the_runs_ema_parameters(runs, model):
    from dalle_jax.inference.transformer import TransformerRun
    run = TransformerRun.load(runs[1])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, run.params),
                 jax.tree.map(np.asarray, model.transformer.params))


def test_an_existing_bundle_is_not_overwritten_unless_asked(runs, exported):
    with pytest.raises(bundle_lib.BundleError, match="exists: pass --overwrite"):
        bundle_lib.export(runs[1], exported[0])


def test_a_stage1_run_is_not_exported_as_a_transformer(runs, tmp_path):
    with pytest.raises(bundle_lib.BundleError, match="not a stage-2 run"):
        bundle_lib.export(runs[0], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_bfloat16_bundle_casts_the_transformer_and_generates(runs, tmp_path, model):
    bundle_lib.export(runs[1], tmp_path / "bf16", dtype="bfloat16")
    half = TextToImage.load(tmp_path / "bf16")
    dtypes = {str(x.dtype) for x in jax.tree.leaves(half.transformer.params)}
    assert dtypes == {"bfloat16"}
    full_bytes = sum(x.nbytes for x in jax.tree.leaves(model.transformer.params))
    assert sum(x.nbytes for x in jax.tree.leaves(half.transformer.params)) == full_bytes // 2
    result = half.generate(PROMPTS[:1], 2, seed=0)
    assert result.images.shape == (1, 2, 16, 16, 3)


# ------------------------------------------------------------------------ refusals


def _refused(path, match):
    with pytest.raises(bundle_lib.BundleError, match=match) as info:
        bundle_lib.load(path)
    assert "\n" not in str(info.value)


def test_a_missing_bundle_or_manifest_is_refused(tmp_path):
    _refused(tmp_path / "nowhere", "not found")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", "no manifest.json")


def test_a_missing_file_is_refused_naming_its_part(exported, tmp_path):
    path = copy_bundle(exported, tmp_path)
    (path / "text_tokenizer.model").unlink()
    _refused(path, "text_tokenizer: file text_tokenizer.model is missing")


def test_a_damaged_array_file_is_refused_naming_its_part(exported, tmp_path):
    path = copy_bundle(exported, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    name = max((n for n in manifest["files"] if n.startswith("image_tokenizer/variables/")),
               key=lambda n: manifest["files"][n]["size"])
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / name).write_bytes(bytes(data))
    _refused(path, f"image_tokenizer: {name} does not match its checksum")


def test_a_truncated_file_is_refused_naming_its_part(exported, tmp_path):
    path = copy_bundle(exported, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    name = next(n for n in manifest["files"] if n.startswith("transformer/params/"))
    (path / name).write_bytes((path / name).read_bytes()[:-1])
    _refused(path, f"transformer: {name} is .* bytes, the manifest says")


def _rewrite(path, name, edit):
    """Edits a file of the bundle and updates its manifest entry, as a bundle whose
    files are intact but disagree with each other."""
    file = path / name
    file.write_text(edit(file.read_text()))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": bundle_lib.checkpoint_lib.sha256_file(file),
                               "size": file.stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_config_that_does_not_fit_the_parameters_is_refused(exported, tmp_path):
    path = copy_bundle(exported, tmp_path)

    def wider(text):
        config = json.loads(text)
        config["model"]["head_dim"] = 32
        return json.dumps(config)

    _rewrite(path, "transformer/config.json", wider)
    _refused(path, r"transformer: parameters do not match its config \(\d+ arrays differ")


def test_an_image_tokenizer_config_that_does_not_fit_is_refused(exported, tmp_path):
    path = copy_bundle(exported, tmp_path)

    def more_codes(text):
        config = json.loads(text)
        config["model"]["vocab_size"] = 64
        return json.dumps(config)

    _rewrite(path, "image_tokenizer/config.json", more_codes)
    _refused(path, "image_tokenizer: parameters do not match its config")


def test_an_unknown_format_version_is_refused(exported, tmp_path):
    path = copy_bundle(exported, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    _refused(path, "format version 99 is not one this dalle_jax reads")
    (path / "manifest.json").write_text("{not json")
    _refused(path, "manifest.json is not valid JSON")


# ---------------------------------------------------------------------- generation


def test_generate_returns_images_and_records(model):
    result = model.generate(PROMPTS, 3, seed=1)
    assert result.images.shape == (2, 3, 16, 16, 3) and result.images.dtype == np.uint8
    assert result.codes.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(model.decode(result.codes.reshape(-1, 4, 4)),
                                  result.images.reshape(-1, 16, 16, 3))
    assert [(r["prompt"], r["index"]) for r in result.records] == [
        (p, j) for p in PROMPTS for j in range(3)]
    record = result.records[0]
    assert record["seed"] == 1 and record["prompt_index"] == 0
    assert record["settings"]["guidance_scale"] == model.default_settings.guidance_scale
    assert record["transformer_step"] == 3 and record["prime"] is None


def test_the_same_seed_gives_the_same_images_whatever_the_batch(model):
    a = model.generate(PROMPTS, 4, seed=7, batch_size=8)
    b = model.generate(PROMPTS, 4, seed=7, batch_size=3)
    np.testing.assert_array_equal(a.images, b.images)
    # An image depends on its prompt, seed and index only, not on the other prompts.
    alone = model.generate(PROMPTS[1:], 4, seed=7)
    np.testing.assert_array_equal(alone.codes[0], a.codes[1])
    other = model.generate(PROMPTS, 4, seed=8, batch_size=8)
    assert not np.array_equal(other.codes, a.codes)
    # Images of one prompt differ from each other.
    assert len({c.tobytes() for c in a.codes[0]}) > 1


def test_a_bundle_loads_on_one_device_and_on_eight_and_makes_the_same_images(exported,
                                                                            model):
    one = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                                 jax.devices()[:1])
    eight = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
    small, large = (TextToImage.load(exported[0], mesh) for mesh in (one, eight))
    for leaf in jax.tree.leaves(small.transformer.params):
        assert len(leaf.sharding.device_set) == 1
    assert any(not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(large.transformer.params))
    a = small.generate(PROMPTS, 3, seed=2)
    b = large.generate(PROMPTS, 3, seed=2)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(model.generate(PROMPTS, 3, seed=2).images, a.images)


def test_priming_keeps_the_images_top_rows(model):
    image = model.generate(PROMPTS[:1], 1, seed=3).images[0, 0]
    codes = model.encode(image[None])[0]
    result = model.generate(PROMPTS[:1], 4, seed=4, prime_image=image, prime_rows=2)
    for grid in result.codes[0]:
        np.testing.assert_array_equal(grid[:2], codes[:2])
    assert result.records[0]["prime"] == {"image": "array", "rows": 2, "note": None}
    variations = model.variations(image, 4, seed=5)
    assert variations.prompts == [""]
    for grid in variations.codes[0]:
        np.testing.assert_array_equal(grid[:2], codes[:2])  # half of a 4-row grid
    assert len({g.tobytes() for g in variations.codes[0]}) > 1


def test_a_priming_image_of_another_size_is_resized_with_a_note(model, tmp_path):
    from PIL import Image
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(path)
    notes = []
    result = model.generate(PROMPTS[:1], 2, prime_image=str(path), prime_rows=1,
                            warn=notes.append)
    assert result.images.shape == (1, 2, 16, 16, 3)
    assert notes == ["the priming image: centre-cropped from 30x20 to 20x20, then resized "
                     "from 20x20 to the model's 16x16"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prime_rows=5), r"prime_rows must lie in \[1, 4\]"),
    (dict(prime_rows=0), r"prime_rows must lie in \[1, 4\]"),
    (dict(guidance_scale="strong"), "guidance_scale must be a number"),
    (dict(temperature=0), "temperature must be a positive number"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(num_images=0), "num_images must be a positive integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
])
def test_bad_requests_are_refused_in_one_line(model, kwargs, match):
    num_images = kwargs.pop("num_images", 2)
    if "prime_rows" in kwargs:
        kwargs["prime_image"] = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(GenerateError, match=match) as info:
        model.generate(PROMPTS[:1], num_images, **kwargs)
    assert "\n" not in str(info.value)


def test_a_priming_file_that_is_not_an_image_is_refused(model, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(GenerateError, match="is not an image PIL can read"):
        model.generate(PROMPTS[:1], 1, prime_image=str(path), prime_rows=1)
    with pytest.raises(GenerateError, match="not found"):
        model.generate(PROMPTS[:1], 1, prime_image=str(tmp_path / "gone.png"), prime_rows=1)


def test_long_prompts_are_truncated_with_a_warning_that_names_them(model):
    long = "a red circle " * 20
    notes = []
    result = model.generate(["a blue star", long], 1, warn=notes.append)
    assert len(notes) == 1 and "prompt 2" in notes[0] and repr(long) in notes[0]
    assert [r["truncated"] for r in result.records] == [False, True]


def test_image_keys_depend_on_seed_prompt_and_index():
    key = lambda *a: np.asarray(jax.random.key_data(text_to_image.image_key(*a)))
    assert np.array_equal(key(0, "a", 1), key(0, "a", 1))
    assert not np.array_equal(key(0, "a", 1), key(0, "b", 1))
    assert not np.array_equal(key(0, "a", 1), key(0, "a", 2))
    assert not np.array_equal(key(0, "a", 1), key(1, "a", 1))


# ----------------------------------------------------------------------------- CLI

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, timeout=300):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "dalle_jax.tools.generate", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_the_generate_command_writes_pngs_grids_and_records(exported, model, tmp_path):
    from dalle_jax import visualize
    out = tmp_path / "out"
    result = _cli(f"--bundle={exported[0]}", f"--prompt={PROMPTS[0]}",
                  f"--prompt={PROMPTS[1]}", "--num_images=3", "--seed=5", "--top_k=8",
                  f"--output={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 images of 2 prompt(s)" in result.stdout
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    assert [(r["prompt"], r["index"], r["seed"]) for r in lines] == [
        (p, j, 5) for p in PROMPTS for j in range(3)]
    assert all(r["settings"]["top_k"] == 8 for r in lines)
    assert lines[0]["file"] == "images/000_a-red-circle-in-the-center/00.png"
    expected = model.generate(PROMPTS, 3, seed=5, top_k=8)
    for record in lines:
        image = expected.image(record["prompt_index"], record["index"])
        path = tmp_path / "expected.png"
        visualize.save_png(image, path)
        assert (out / record["file"]).read_bytes() == path.read_bytes()
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert grids == ["000_a-red-circle-in-the-center.png",
                     "001_a-big-blue-square-above-a-green-star.png"]


def test_the_generate_command_makes_variations_of_an_image(exported, model, tmp_path):
    from dalle_jax import visualize
    image = model.generate(PROMPTS[:1], 1, seed=3).images[0, 0]
    source = visualize.save_png(image, tmp_path / "source.png")
    out = tmp_path / "variations"
    result = _cli(f"--bundle={exported[0]}", f"--variations_of={source}", "--num_images=4",
                  f"--output={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {r["prompt"] for r in lines} == {""}
    assert lines[0]["prime"]["rows"] == 2 and lines[0]["prime"]["image"] == str(source)
    assert len(list((out / "images" / "000_unconditional").iterdir())) == 4


def _errors(tmp_path, exported):
    from PIL import Image
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "ok.png")
    bundle = f"--bundle={exported[0]}"
    out = f"--output={tmp_path / 'out'}"
    return [
        ([f"--bundle={tmp_path / 'nowhere'}", "--prompt=a", out], "not found"),
        ([bundle, f"--prompts_file={tmp_path / 'missing.txt'}", out],
         "--prompts_file .*missing.txt not found"),
        ([bundle, f"--prompts_file={tmp_path / 'empty.txt'}", out], "has no prompts"),
        ([bundle, out], "nothing to generate"),
        ([bundle, "--prompt=a", "--guidance_scale=strong", out], "guidance_scale"),
        ([bundle, "--prompt=a", f"--prime_image={tmp_path / 'ok.png'}", "--prime_rows=9",
          out], r"prime_rows must lie in \[1, 4\]"),
        ([bundle, "--prompt=a", f"--prime_image={tmp_path / 'text.png'}", "--prime_rows=1",
          out], "is not an image PIL can read"),
        ([bundle, "--prompt=a", f"--prime_image={tmp_path / 'ok.png'}", out],
         "--prime_image needs --prime_rows"),
        ([bundle, "--prompt=a", "--num_images=0", out], "num_images"),
        (["--prompt=a", out], "--bundle"),
    ]


def test_the_generate_commands_mistakes_end_in_one_line(exported, tmp_path):
    for args, match in _errors(tmp_path, exported):
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and re.search(match, errors[0]), (args, result.stderr)
    assert not (tmp_path / "out").exists()


def test_the_export_command_reports_sizes_and_refuses_mistakes(runs, tmp_path):
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "dalle_jax.tools.export", f"--workdir={runs[1]}",
           f"--output={tmp_path / 'b'}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"the bundle is 0\.\d\dx its size", result.stdout), result.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists: pass --overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    wrong = subprocess.run(cmd[:3] + [f"--workdir={runs[0]}", f"--output={tmp_path / 'c'}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "not a stage-2 run" in wrong.stderr


# ------------------------------------------------------------------------ evaluate


def test_evaluate_measures_both_stages_and_judges_generated_images(model, runs):
    from dalle_jax.evaluation import evaluate
    data_dir = str(pathlib.Path(runs[0]).parent / "tfds")
    report = evaluate.evaluate(model, data_dir=data_dir, test_prompts=6, holdout_prompts=4,
                               images_per_prompt=2, progress=False)
    s1, s2 = report["image_tokenizer"], report["transformer"]
    assert s1["examples"] == 16 and 0 < s1["psnr"] < 60 and 0 < s1["codes_used"] <= 1
    assert s2["examples"] == 16 and s2["image_loss"] > 0
    assert s2["bits_per_image_token"] == pytest.approx(s2["image_loss"] / np.log(2))
    # An untrained transformer is near uniform over its 32 codes: about 5 bits a token.
    assert 3 < s2["bits_per_image_token"] < 7
    test = report["fidelity"]["test"]
    assert test["prompts"] == 6 and test["images"] == 12 and len(test["checks"]) == 12
    rates = test["rates"]
    assert rates["one_object"]["images"] + rates["two_objects"]["images"] == 12
    assert report["fidelity"]["holdout"]["images"] == 8
    holdout = {c["prompt"] for c in report["fidelity"]["holdout"]["checks"]}
    pairs = [("green", "triangle"), ("purple", "circle"), ("orange", "square")]
    assert all(any(f"{c} {s}" in p for c, s in pairs) for p in holdout)
    text = evaluate.table(report)
    assert "PSNR" in text and "bits/token" in text and "one object: colour + cell" in text
    json.dumps({k: v for k, v in report.items()})  # JSON-ready


def test_composite_rates_need_every_criterion():
    from dalle_jax.evaluation import evaluate
    one = lambda **c: {"kind": "one_object", "check": {"colour": True, "cell": True,
                                                       "shape": True, "all": True, **c}}
    two = lambda **c: {"kind": "two_objects", "check": {"colour": True, "relation": True,
                                                        "shape": True, "all": True, **c}}
    rates = evaluate.composite_rates([one(), one(cell=False), one(colour=False, all=False),
                                      two(), two(relation=False)])
    assert rates["one_object"]["images"] == 3
    assert rates["one_object"]["colour"] == pytest.approx(2 / 3)
    assert rates["one_object"]["colour_cell"] == pytest.approx(1 / 3)
    assert rates["two_objects"]["colours_relation"] == pytest.approx(1 / 2)


def test_an_export_that_fails_half_way_leaves_nothing(runs, tmp_path, monkeypatch):
    calls = []

    def fail_on_second(path, tree):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(path, tree)

    real = bundle_lib._save_arrays
    monkeypatch.setattr(bundle_lib, "_save_arrays", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        bundle_lib.export(runs[1], tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_relative_paths_work_for_export_and_load(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundle_lib.export(runs[1], "relative_bundle")
    assert TextToImage.load("relative_bundle").generate(PROMPTS[:1], 1).images.shape[1] == 1
