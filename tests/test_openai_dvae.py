"""Importing OpenAI's dVAE: parity with the ``dall_e`` package, safe unpickling, checks.

Needs torch and dall_e (the ``test`` extra and the Makefile install them); without them
these tests fail rather than skip, so that CI never silently loses the parity check.
"""
from __future__ import annotations

import os
import pickle

import jax
import ml_collections
import numpy as np
import pytest

from dalle_jax.inference.image_tokenizer import ImageTokenizerRun
from dalle_jax.models import dvae
from dalle_jax.models import openai_dvae

pytestmark = pytest.mark.slow  # each trains or runs subprocesses

# The smallest sizes dall_e's validators admit (n_hid ≥ 64, vocab ≥ 512): fast on CPU.
MODEL = dict(image_size=64, vocab_size=512, n_hid=64, n_blk_per_group=2, group_count=4,
             n_init=32, output_channels=3)
TOLERANCE = 1e-5
MIN_CODE_GAP = 1e-4  # below this, top-1 may flip on last-bit differences


@pytest.fixture(scope="module")
def torch():
    try:
        import torch
        import dall_e  # noqa: F401
    except ImportError as e:
        pytest.fail(f"torch and dall_e are required for the dVAE parity tests ({e}); "
                    f"pip install torch==2.13.0 requests attrs && "
                    f"pip install --no-deps dall-e==0.1")
    return torch


@pytest.fixture(scope="module")
def released(torch, tmp_path_factory):
    """Random dall_e modules pickled whole (like the release), and their conversion."""
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder

    torch.manual_seed(0)
    encoder = Encoder(n_hid=MODEL["n_hid"], vocab_size=MODEL["vocab_size"])
    decoder = Decoder(n_init=MODEL["n_init"], n_hid=MODEL["n_hid"],
                      vocab_size=MODEL["vocab_size"])
    with torch.no_grad():  # dall_e starts biases at zero; nonzero ones test their mapping
        for module in (encoder, decoder):
            for name, param in module.named_parameters():
                if name.endswith(".b"):
                    param.normal_(std=0.05)
    root = tmp_path_factory.mktemp("openai_dvae")
    encoder_pkl, decoder_pkl = root / "encoder.pkl", root / "decoder.pkl"
    torch.save(encoder.eval(), encoder_pkl)
    torch.save(decoder.eval(), decoder_pkl)
    converted = root / "converted"
    params = openai_dvae.convert(encoder_pkl, decoder_pkl, converted, MODEL)
    return dict(encoder=encoder, decoder=decoder, encoder_pkl=encoder_pkl,
                decoder_pkl=decoder_pkl, converted=converted, params=params, root=root)


def _as_image_tokenizer(released) -> ImageTokenizerRun:
    """The conversion loaded the way every stage-1 run is, for 64 px images."""
    config = ml_collections.ConfigDict(dict(data=dict(image_size=MODEL["image_size"])))
    return ImageTokenizerRun.load(str(released["converted"]), config)


def _nchw(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def _nhwc(x) -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 1)


def test_encoder_logits_and_codes_match_dall_e(torch, released):
    encoder_module, _, params = openai_dvae.load_converted(released["converted"])
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    pixels = dvae.map_pixels(images.astype(np.float32) / 255)
    ours = np.asarray(jax.jit(encoder_module.apply)({"params": params["encoder"]}, pixels))
    with torch.no_grad():
        theirs = _nhwc(released["encoder"](torch.from_numpy(_nchw(pixels))))
    diff = np.abs(ours - theirs).max()
    print(f"encoder logits: max abs diff {diff:.2e} (scale {np.abs(theirs).max():.2f})")
    assert diff < TOLERANCE

    codes = _as_image_tokenizer(released).encode(images)
    top2 = np.sort(theirs, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > MIN_CODE_GAP
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(codes[clear], theirs.argmax(-1)[clear])


def test_decoder_outputs_match_dall_e(torch, released):
    _, decoder_module, params = openai_dvae.load_converted(released["converted"])
    rng = np.random.default_rng(1)
    codes = rng.integers(0, MODEL["vocab_size"], (2, 8, 8))
    one_hot = np.eye(MODEL["vocab_size"], dtype=np.float32)[codes]
    relaxed = np.asarray(jax.nn.softmax(rng.normal(size=one_hot.shape).astype(np.float32)))
    apply = jax.jit(decoder_module.apply)
    for z in (one_hot, relaxed):
        ours = np.asarray(apply({"params": params["decoder"]}, z))
        with torch.no_grad():
            theirs = _nhwc(released["decoder"](torch.from_numpy(_nchw(z))))
        diff = np.abs(ours - theirs).max()
        print(f"decoder outputs: max abs diff {diff:.2e} (scale {np.abs(theirs).max():.2f})")
        assert ours.shape == (2, 64, 64, 6) and diff < TOLERANCE

    # Reconstructions: unmap(sigmoid(μ)) as uint8, within one level of dall_e's.
    images = _as_image_tokenizer(released).decode(codes)
    with torch.no_grad():
        mu = released["decoder"](torch.from_numpy(_nchw(one_hot)))[:, :3]
        expected = _nhwc(torch.clamp((torch.sigmoid(mu) - 0.1) / 0.8, 0, 1) * 255)
    assert np.abs(images.astype(np.float32) - expected).max() <= 1.0


def test_conversion_round_trip_and_verify(released):
    encoder, decoder, params = openai_dvae.load_converted(released["converted"])
    assert (encoder.n_hid, encoder.vocab_size, decoder.n_init) == (64, 512, 32)
    jax.tree.map(np.testing.assert_array_equal, params, released["params"])
    # HWIO in ours, OIHW in theirs.
    np.testing.assert_array_equal(
        params["encoder"]["group_2"]["block_1"]["id_path"]["kernel"],
        released["encoder"].blocks.group_2.block_1.id_path.w.detach().numpy().transpose(
            2, 3, 1, 0))
    diffs = openai_dvae.compare_with_released(
        released["encoder_pkl"], released["decoder_pkl"], released["converted"])
    assert max(diffs.values()) < TOLERANCE
    with pytest.raises(FileExistsError, match="overwrite"):
        openai_dvae.convert(released["encoder_pkl"], released["decoder_pkl"],
                            released["converted"], MODEL)


def test_a_conversion_loads_as_an_image_tokenizer(released):
    tokenizer = _as_image_tokenizer(released)
    assert (tokenizer.vocab_size, tokenizer.grid_size, tokenizer.image_size) == (512, 8, 64)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    encoder, decoder, params = openai_dvae.load_converted(released["converted"])
    codes = tokenizer.encode(images)
    logits = encoder.apply({"params": params["encoder"]},
                           dvae.map_pixels(images.astype(np.float32) / 255))
    np.testing.assert_array_equal(codes, np.asarray(logits).argmax(-1))
    stats = decoder.apply({"params": params["decoder"]}, jax.nn.one_hot(codes, 512))
    expected = np.round(np.asarray(dvae.reconstruction(stats)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(tokenizer.decode(codes), expected)


class _RunsCode:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_running_pickles_are_refused(torch, tmp_path):
    marker = tmp_path / "pwned"
    saved, raw = tmp_path / "saved.pkl", tmp_path / "raw.pkl"
    torch.save(_RunsCode(str(marker)), saved)
    raw.write_bytes(pickle.dumps(_RunsCode(str(marker)), protocol=2))
    for path in (saved, raw):
        with pytest.raises(ValueError, match=r"refused to unpickle.*(posix|os)\.system"):
            openai_dvae.load_released_state_dict(path, "encoder")
    # Protocol 4 is refused earlier, at an opcode torch's unpickler does not implement.
    raw.write_bytes(pickle.dumps(_RunsCode(str(marker)), protocol=4))
    with pytest.raises(ValueError, match="refused to unpickle"):
        openai_dvae.load_released_state_dict(raw, "encoder")
    assert not marker.exists()


def test_unexpected_classes_and_swapped_files_are_refused(torch, released, tmp_path):
    from dall_e.encoder import Encoder

    encoder = Encoder(n_hid=64, vocab_size=512)
    encoder.blocks.output.relu = torch.nn.GELU()  # a harmless class, but not the release's
    path = tmp_path / "gelu.pkl"
    torch.save(encoder, path)
    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.activation\.GELU"):
        openai_dvae.load_released_state_dict(path, "encoder")
    with pytest.raises(ValueError, match=r"expected a dall_e\.encoder\.Encoder"):
        openai_dvae.load_released_state_dict(released["decoder_pkl"], "encoder")


def test_shape_mismatch_names_the_parameter_and_both_shapes(released, tmp_path):
    wrong = dict(MODEL, n_hid=128)
    message = (r"encoder: parameter input/kernel \(from blocks\.input\.w\) has shape "
               r"\(7, 7, 3, 64\) in the checkpoint but \(7, 7, 3, 128\)")
    with pytest.raises(ValueError, match=message):
        openai_dvae.convert(released["encoder_pkl"], released["decoder_pkl"],
                            tmp_path / "out", wrong)
    with pytest.raises(ValueError, match=r"output/conv/kernel .* \(1, 1, 512, 1024\)"):
        openai_dvae.convert(released["encoder_pkl"], released["decoder_pkl"],
                            tmp_path / "out", dict(MODEL, vocab_size=1024))
    assert not (tmp_path / "out" / openai_dvae.ARCHITECTURE_FILE).exists()


def test_missing_and_unexpected_parameters_are_named():
    encoder = dvae.Encoder(n_hid=8, n_blk_per_group=1, group_count=2, vocab_size=16)
    expected = openai_dvae.module_param_shapes(encoder, 3)
    state = {}
    for name, leaf in openai_dvae.flatten_params(expected).items():
        *path, leaf_name = name.split("/")
        shape = leaf.shape if leaf.ndim == 1 else tuple(leaf.shape[i] for i in (3, 2, 0, 1))
        state[".".join(["blocks", *path, "w" if leaf_name == "kernel" else "b"])] = (
            np.zeros(shape, np.float32))
    tree = openai_dvae.state_dict_to_params(state, expected, "encoder")
    assert tree["input"]["kernel"].shape == (7, 7, 3, 8)
    with pytest.raises(ValueError, match="lacks 1 parameters.*output/conv/bias"):
        openai_dvae.state_dict_to_params(
            {k: v for k, v in state.items() if k != "blocks.output.conv.b"}, expected,
            "encoder")
    with pytest.raises(ValueError, match="blocks.group_3.block_1.id_path.w"):
        openai_dvae.state_dict_to_params(
            dict(state, **{"blocks.group_3.block_1.id_path.w": np.zeros((8, 8, 1, 1))}),
            expected, "encoder")


def test_a_transformer_on_the_converted_dvaes_codes_exports_with_it(released, tmp_path):
    """The conversion serves as a bundle's image tokenizer, as a stage-1 run does."""
    from configs import transformer_shapes
    from dalle_jax.inference import bundle as bundle_lib
    from dalle_jax.inference.text_to_image import TextToImage
    from dalle_jax.train import trainer
    from tests import code_shards
    codes = str(tmp_path / "codes")
    # 64 px, 8x8 patches quantised to 8 levels per channel: 8x8 codes of 512, the
    # conversion's grid and vocabulary.
    info = code_shards.write_code_shards(codes, {"train": 32, "validation": 8},
                                         image_size=64, patch=8, levels=8)
    config = transformer_shapes.get_config("runlocal")
    config.data.update(data_dir=codes, name="shapes", image_size=64, shuffle_buffer=32)
    config.text.update(text_len=8, vocab_size=64)
    config.model.update(image_grid=info["grid"], image_vocab_size=MODEL["vocab_size"],
                        num_layers=2, num_heads=2, head_dim=16, conv_kernel=3)
    config.mesh.update(data=-1)
    config.update(batch_size=8, total_steps=2)
    config.optimizer.update(warmup_steps=1)
    config.train.update(log_every=1, eval_every=0, summary_every=0)
    run = str(tmp_path / "run")
    trainer.train_and_evaluate(config, run, console=lambda s: None)

    report = bundle_lib.export(run, tmp_path / "bundle", image_tokenizer=released["converted"])
    manifest = bundle_lib.verify(report.path)
    assert manifest["parts"]["image_tokenizer"]["source"]["run"] == str(
        released["converted"].resolve())
    model = TextToImage.load(report.path)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(model.encode(images),
                                  _as_image_tokenizer(released).encode(images))
    result = model.generate(["a red circle"], 2, seed=0)
    assert result.images.shape == (1, 2, 64, 64, 3)
