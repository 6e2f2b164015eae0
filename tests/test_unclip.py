"""unCLIP's decoder (DALL·E 2): the U-Net's context tokens, the embedded batches, the
Task, decoding, DDIM inversion, variations, the bundle's part and generate
--variations_of."""
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
from PIL import Image

from dalle_jax.config import load_config_file
from dalle_jax.data import embeddings as embeddings_lib
from dalle_jax.inference import bundle as bundle_lib
from dalle_jax.inference import runs as runs_lib
from dalle_jax.inference import unclip as unclip_lib
from dalle_jax.models import unet as unet_lib
from dalle_jax.stages import unclip_decoder as stage
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import trainer
from tests import test_bundle

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 16


def tiny_data(config, root: pathlib.Path) -> None:
    config.data.update(image_size=SIZE, data_dir=str(root / "tfds"), num_train=64,
                       num_validation=16, num_test=16, num_holdout=16, shuffle_buffer=64)


def train_tiny_reranker(root: pathlib.Path, text_tokenizer: str | None = None) -> str:
    """A three-step contrastive run on 16 px captioned shapes (its workdir)."""
    config = load_config_file("configs/contrastive_shapes.py:runlocal")
    tiny_data(config, root)
    config.model.update(image_widths=(8, 16))
    config.update(batch_size=8, total_steps=3)
    config.contrastive.eval_batch_size = 8
    config.text.update(vocab_size=64, text_len=12, tokenizer_path=text_tokenizer)
    config.mesh.update(data=-1, fsdp=2, tensor=1)
    workdir = str(root / "reranker")
    trainer.train_and_evaluate(config, workdir, console=lambda s: None)
    return workdir


def decoder_config(root: pathlib.Path, reranker_dir: str) -> ml_collections.ConfigDict:
    c = load_config_file(str(ROOT / "configs/unclip_decoder_shapes.py:runlocal"))
    tiny_data(c, root)
    c.decoder.reranker_run = reranker_dir
    c.model.update(channel_mult=(1, 2), attention_levels=(1,), num_groups=4)
    c.update(total_steps=2, batch_size=8)
    c.train.update(summary_every=2, ema_decay=0.5)
    c.checkpoint.save_every = 2
    return c


# ------------------------------------------------------------- the U-Net's context


def test_context_tokens_reach_every_attention_layer_and_need_attention():
    cfg = unet_lib.UNetConfig(base_width=8, channel_mult=(1, 2), num_res_blocks=1,
                              attention_levels=(1,), head_dim=8, num_groups=4,
                              context_dim=6, context_tokens=3)
    model = unet_lib.UNet(cfg)
    z = jnp.zeros((2, 8, 8, 3))
    variables = model.init(jax.random.key(0), z, jnp.zeros((2,)), context=jnp.zeros((2, 6)))
    params = variables["params"]
    attention = [k for k in params if "attn" in k]
    assert attention and all("context_kv" in params[k] for k in attention)
    assert params["context_tokens"]["kernel"].value.shape == (6, 3 * cfg.time_embed_dim)
    # Through the tokens alone (no FiLM path), the context changes the output once the
    # zero-initialised output projections are not zero.
    params = jax.tree.map(lambda x: x, nn_unbox(params))
    params["context_proj"]["kernel"] = jnp.zeros_like(params["context_proj"]["kernel"])
    for k in attention:
        params[k]["out"]["kernel"] = jnp.ones_like(params[k]["out"]["kernel"])
    for k in [k for k in params if "block" in k]:
        params[k]["conv_1"]["kernel"] = 0.1 * jnp.ones_like(params[k]["conv_1"]["kernel"])
    params["out_conv"]["kernel"] = jnp.ones_like(params["out_conv"]["kernel"])
    zn = jax.random.normal(jax.random.key(1), z.shape)
    a = model.apply({"params": params}, zn, jnp.zeros((2,)), context=jnp.zeros((2, 6)))
    b = model.apply({"params": params}, zn, jnp.zeros((2,)), context=jnp.ones((2, 6)))
    assert float(jnp.abs(a - b).max()) > 1e-3
    with pytest.raises(ValueError, match="need attention"):
        unet_lib.UNetConfig(context_dim=6, context_tokens=3)
    with pytest.raises(ValueError, match="only with context_dim"):
        unet_lib.UNetConfig(context_tokens=3, attention_levels=(0,))


def nn_unbox(tree):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    return jax.tree.map(lambda x: x, nn.unbox(tree))


def test_a_dropped_embedding_is_the_zero_context_of_the_unconditional_model():
    emb = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    context = stage.condition(emb, jnp.array([True, False, True]))
    np.testing.assert_allclose(context[0], emb[0] * 2.0, rtol=1e-6)  # √D, D = 4
    np.testing.assert_array_equal(context[1], 0.0)
    cond, uncond = stage._conds(emb)  # pylint: disable=protected-access
    np.testing.assert_array_equal(uncond["context"], stage.condition(emb, jnp.zeros(3, bool)))
    assert cond["context"].shape == (3, 4)


class _Batches:
    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"image": np.full((2, 4, 4, 3), self.i, np.uint8),
                "text_tokens": np.full((2, 3), self.i, np.int32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


class _Towers:
    def embed_images(self, images):
        return np.asarray(images, np.float32).reshape(len(images), -1)[:, :2]

    def embed_texts(self, tokens):
        return np.asarray(tokens, np.float32)[:, :2] * -1


def test_embedded_batches_add_both_embeddings_and_resume_where_they_were():
    batches = embeddings_lib.EmbeddedBatches(_Batches(), _Towers(), images=True, texts=True)
    first = next(batches)
    assert first["image_embedding"].shape == (2, 2) and first["text_embedding"][0, 0] == -1
    state = batches.get_state()
    second = next(batches)
    again = embeddings_lib.EmbeddedBatches(_Batches(), _Towers(), images=True)
    again.set_state(state)
    resumed = next(again)
    np.testing.assert_array_equal(resumed["image_embedding"], second["image_embedding"])
    assert "text_embedding" not in resumed
    with pytest.raises(ValueError, match="version"):
        again.set_state({"version": 99})


# ------------------------------------------------------------ tiny trained runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The bundle's two tiny stages (16 px), a tiny contrastive run and a two-step
    decoder conditioned on its embeddings."""
    root = tmp_path_factory.mktemp("unclip")
    s1_dir, s2_dir = test_bundle.train_tiny_stages(root)
    reranker_dir = train_tiny_reranker(root, text_tokenizer=str(
        pathlib.Path(s2_dir) / "text_tokenizer.model"))
    lines = []
    d_dir = str(root / "decoder")
    trainer.train_and_evaluate(decoder_config(root, reranker_dir), d_dir,
                               console=lines.append)
    p = load_config_file(str(ROOT / "configs/unclip_prior_shapes.py:runlocal"))
    tiny_data(p, root)
    p.prior.reranker_run = reranker_dir
    p_dir = str(root / "prior")
    trainer.train_and_evaluate(p, p_dir, console=lambda s: None)
    return dict(root=root, s1=s1_dir, s2=s2_dir, reranker=reranker_dir, decoder=d_dir,
                prior=p_dir, lines=lines)


@pytest.fixture(scope="module")
def decoder(trained):
    return unclip_lib.UnclipDecoder.load_run(trained["decoder"])


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.mark.slow
def test_the_decoder_trains_on_the_frozen_embeddings_and_loads(trained, decoder):
    assert any("step 2/2" in line and "embedding_kept" in line for line in trained["lines"])
    assert decoder.step == 2 and decoder.image_size == SIZE and decoder.embed_dim == 16
    with pytest.raises(runs_lib.RunError, match="not of the unCLIP decoder"):
        unclip_lib.UnclipDecoder.load_run(trained["reranker"])


@pytest.mark.slow
def test_ddim_inversion_then_eta_zero_decoding_returns_the_image(decoder):
    images = _images(3)
    z = decoder.invert(images, steps=20)
    assert z.shape == (3, SIZE, SIZE, 3) and np.isfinite(z).all()
    back = decoder.decode(decoder.embed(images), z_T=z, steps=20, eta=0.0)
    assert np.abs(back.astype(int) - images.astype(int)).max() <= 1  # to a pixel level
    # The same steps under guidance too (the guided model is inverted).
    z = decoder.invert(images, steps=20, guidance_scale=2.0)
    back = decoder.decode(decoder.embed(images), z_T=z, steps=20, eta=0.0, guidance_scale=2.0)
    assert np.abs(back.astype(int) - images.astype(int)).max() <= 1


@pytest.mark.slow
def test_decoding_follows_the_keys_and_guidance_zero_ignores_the_embedding(decoder):
    emb = decoder.embed(_images(4, seed=1))
    a = decoder.decode(emb, seed=3, steps=3)
    assert a.shape == (4, SIZE, SIZE, 3) and a.dtype == np.uint8
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(np.arange(4))
    np.testing.assert_array_equal(decoder.decode(emb[2:], keys=keys[2:], steps=3), a[2:])
    assert not np.array_equal(decoder.decode(emb, seed=4, steps=3), a)
    # The unconditional model: the same images whatever the embedding.
    u1 = decoder.decode(emb, seed=3, steps=3, guidance_scale=0.0)
    u2 = decoder.decode(emb[::-1], seed=3, steps=3, guidance_scale=0.0)
    np.testing.assert_array_equal(u1, u2)


@pytest.mark.slow
def test_decoding_on_eight_devices_equals_one_device(decoder):
    one = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                                 jax.devices()[:1])
    params = jax.device_put(decoder.params, sharding_lib.replicated(one))
    single = unclip_lib.UnclipDecoder(decoder.config, params, decoder.reranker, one, 2)
    emb = decoder.embed(_images(8, seed=2))
    a = decoder.decode(emb, steps=2, eta=1.0)
    b = single.decode(emb, steps=2, eta=1.0)
    assert decoder.mesh.size == 8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float reductions in shards


@pytest.mark.slow
def test_variations_differ_by_seed_and_bad_inputs_are_refused(decoder, tmp_path):
    image = _images(1)[0]
    path = tmp_path / "source.png"
    Image.fromarray(image).save(path)
    v = decoder.variations(str(path), 3, steps=3, eta=1.0)
    assert v.shape == (3, SIZE, SIZE, 3)
    assert not np.array_equal(v[0], v[1])
    same = decoder.variations(image, 2, steps=5, eta=0.0, from_inversion=True)
    assert np.abs(same.astype(int) - image.astype(int)).max() <= 1
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(unclip_lib.UnclipError, match="is not an image PIL can read"):
        decoder.variations(str(text), 2)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(unclip_lib.UnclipError, match="is 20x20 px; the unCLIP decoder takes "
                                                     "16x16 images"):
        decoder.variations(str(tmp_path / "big.png"), 2)
    with pytest.raises(unclip_lib.UnclipError, match="not found"):
        decoder.variations(str(tmp_path / "missing.png"), 2)
    with pytest.raises(unclip_lib.UnclipError, match="embeddings \\[N, 16\\]"):
        decoder.decode(np.zeros((2, 5)))
    with pytest.raises(unclip_lib.UnclipError, match="eta must lie"):
        decoder.decode(np.zeros((1, 16)), eta=2.0)
    with pytest.raises(unclip_lib.UnclipError, match="guidance_scale"):
        decoder.decode(np.zeros((1, 16)), guidance_scale=-1.0)


@pytest.mark.slow
def test_the_bundle_carries_the_decoder_and_generate_makes_variations(trained, tmp_path):
    from dalle_jax.inference.text_to_image import GenerateError, TextToImage
    out = tmp_path / "bundle"
    with pytest.raises(bundle_lib.BundleError, match="pass the one it was trained on"):
        bundle_lib.export(trained["s2"], out, unclip_decoder=trained["decoder"])
    report = bundle_lib.export(trained["s2"], out, reranker=trained["reranker"],
                               unclip_decoder=trained["decoder"])
    assert report.part_bytes["unclip_decoder"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parts"]["unclip_decoder"]["source"]["step"] == 2
    model = TextToImage.load(out)
    assert model.variations_path() == "unclip"
    image = _images(1, seed=5)[0]
    result = model.variations(image, 3, seed=1, decoder_steps=3)
    assert result.images.shape == (1, 3, SIZE, SIZE, 3)
    assert result.records[0]["path"] == "unclip" and result.records[0]["settings"][
        "decoder"]["steps"] == 3
    np.testing.assert_array_equal(
        model.variations(image, 2, seed=1, decoder_steps=3).images[0], result.images[0, :2])
    with pytest.raises(GenerateError, match="take no prompt"):
        model.variations(image, 2, prompt="a red circle")
    with pytest.raises(GenerateError, match="takes 16x16 images"):
        model.variations(np.zeros((8, 8, 3), np.uint8), 2)

    cli = tmp_path / "cli"
    Image.fromarray(image).save(tmp_path / "source.png")
    done = subprocess.run(
        [sys.executable, "-m", "dalle_jax.tools.generate", f"--bundle={out}",
         f"--variations_of={tmp_path / 'source.png'}", "--num_images=3", "--decoder_steps=3",
         f"--output={cli}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(r) for r in (cli / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[0]["path"] == "unclip"
    assert Image.open(cli / records[2]["file"]).size == (SIZE, SIZE)
    (tmp_path / "notes.txt").write_text("not an image")
    refused = subprocess.run(
        [sys.executable, "-m", "dalle_jax.tools.generate", f"--bundle={out}",
         f"--variations_of={tmp_path / 'notes.txt'}", f"--output={tmp_path / 'no'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert re.search("is not an image PIL can read", refused.stderr)


@pytest.mark.slow
def test_the_unclip_path_generates_from_text_and_is_judged_beside_dalle(trained, tmp_path):
    from dalle_jax.evaluation import evaluate
    from dalle_jax.inference.text_to_image import GenerateError, TextToImage
    out = tmp_path / "bundle"
    bundle_lib.export(trained["s2"], out, reranker=trained["reranker"],
                      unclip_decoder=trained["decoder"], unclip_prior=trained["prior"])
    model = TextToImage.load(out)
    result = model.generate(test_bundle.PROMPTS, 2, seed=4, path="unclip", decoder_steps=3,
                            prior_steps=3)
    assert result.images.shape == (2, 2, SIZE, SIZE, 3) and result.codes is None
    r = result.records[0]
    assert r["path"] == "unclip" and r["settings"]["prior"]["steps"] == 3
    assert r["score"] is not None  # the reranker scores every image
    again = model.generate(test_bundle.PROMPTS[1:], 2, seed=4, path="unclip",
                           decoder_steps=3, prior_steps=3)
    np.testing.assert_array_equal(again.images[0], result.images[1])  # per-image keys
    best = model.generate(test_bundle.PROMPTS, 1, seed=4, path="unclip", decoder_steps=3,
                          prior_steps=3, candidates=3, prior_best_of=2, upsample=False)
    assert best.records[0]["candidates"] == 3 and best.records[0]["settings"][
        "prior_best_of"] == 2
    with pytest.raises(GenerateError, match="do not apply to path='unclip'"):
        model.generate(["a"], 1, path="unclip", temperature=0.5)
    with pytest.raises(GenerateError, match="pass path='unclip'"):
        model.generate(["a"], 1, decoder_steps=3)
    with pytest.raises(GenerateError, match="path must be one of"):
        model.generate(["a"], 1, path="clip")
    plain = tmp_path / "plain"
    bundle_lib.export(trained["s2"], plain, reranker=trained["reranker"],
                      unclip_decoder=trained["decoder"])
    with pytest.raises(GenerateError, match="has no unCLIP's decoder and prior"):
        TextToImage.load(plain).generate(["a"], 1, path="unclip")

    cli = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "dalle_jax.tools.generate", f"--bundle={out}",
         "--prompt=a red circle", "--num_images=2", "--path=unclip", "--decoder_steps=2",
         "--prior_steps=2", f"--output={cli}"], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prior" in done.stdout
    records = [json.loads(r) for r in (cli / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[1]["path"] == "unclip"
    refused = subprocess.run(
        [sys.executable, "-m", "dalle_jax.tools.generate", f"--bundle={out}",
         "--prompt=a", "--prior_steps=3", f"--output={tmp_path / 'no'}"], cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "need --path=unclip" in refused.stderr
    assert "Traceback" not in refused.stderr

    report = evaluate.evaluate(model, data_dir=str(trained["root"] / "tfds"),
                               test_prompts=0, holdout_prompts=0, rerank_prompts=0,
                               variation_sources=4, variations_per_source=2,
                               variation_etas=(0.0, 1.0), unclip_prompts=2,
                               unclip_candidates=3, progress=False)
    v = report["unclip_variations"]
    assert v["sources"] == 4 and set(v["from_inversion"]) == {"0", "1"}
    # From the inversion at eta 0 every variation is its source.
    assert v["from_inversion"]["0"]["to_source"] < 0.01
    assert v["from_inversion"]["0"]["between_variations"] < 0.01
    assert v["from_inversion"]["1"]["between_variations"] > 0.01
    paths = report["unclip_fidelity"]["paths"]
    assert set(paths) == {"dalle", "unclip"} and "random_rates" in paths["unclip"]
    table = evaluate.table(report)
    assert "unCLIP variations" in table and "text -> image paths" in table


@pytest.mark.slow
def test_loading_a_run_under_a_config_of_another_model_is_refused(trained):
    from dalle_jax import config as config_lib
    from dalle_jax.train import checkpoint as checkpoint_lib
    mesh = runs_lib.local_batch_mesh()

    def load(**model):
        config = config_lib.read_config(trained["decoder"])
        config.model.update(model)
        unet = unet_lib.UNet(stage.model_config(config, 16))
        runs_lib.load_variables(trained["decoder"], config,
                                lambda rng: stage.init_variables(unet, rng, SIZE), mesh)

    with pytest.raises(checkpoint_lib.CheckpointError, match=r"has no .*arrays missing"):
        load(attention_levels=(0, 1))  # attention the run never saved
    with pytest.raises(checkpoint_lib.CheckpointError, match="does not match the config"):
        load(base_width=12)  # other shapes
