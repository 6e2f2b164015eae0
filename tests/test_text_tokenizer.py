"""Text tokenizer: training, round trip, fixed length, truncation and BPE-dropout."""
import io
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from dalle_jax.data import text_tokenizer

WORDS = ("a picture of an image drawing there is small little tiny large big red green "
         "blue yellow purple orange cyan white circle square triangle diamond star "
         "in the top bottom left right corner center at on above over below under "
         "to of").split()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(4, 12))).upper()
                for _ in range(3000)]
    path = tmp_path_factory.mktemp("tok") / "text_tokenizer.model"
    text_tokenizer.train_text_tokenizer(captions, path, vocab_size=200)
    return path


def test_round_trip_lowercases(model_path):
    tok = text_tokenizer.TextTokenizer(model_path, text_len=32)
    captions = ["A Picture of a SMALL red circle in the top left corner",
                "  a blue square to the left of a big yellow star  ", ""]
    tokens, truncated = tok.encode(captions)
    assert tokens.dtype == np.int32 and tokens.shape == (3, 32)
    assert not truncated.any()
    assert tok.decode(tokens) == [text_tokenizer.normalize_caption(c) for c in captions]
    assert (tokens[2] == text_tokenizer.PAD_ID).all(), "an empty caption is all padding"
    lengths = (tokens != text_tokenizer.PAD_ID).sum(-1)
    assert (tokens[0, lengths[0]:] == text_tokenizer.PAD_ID).all()
    assert (tokens[0, :lengths[0]] != text_tokenizer.PAD_ID).all(), "text never uses pad"
    assert tok.encode(["Red Star"])[0].tolist() == tok.encode(["red star"])[0].tolist()


def test_unknown_characters_map_to_unk_not_pad(model_path):
    tok = text_tokenizer.TextTokenizer(model_path, text_len=16)
    tokens, _ = tok.encode(["a red 象 star"])
    assert text_tokenizer.UNK_ID in tokens[0]
    assert (tokens[0, :(tokens[0] != 0).sum()] != text_tokenizer.PAD_ID).all()


def test_truncation_is_reported(model_path):
    tok = text_tokenizer.TextTokenizer(model_path, text_len=4)
    tokens, truncated = tok.encode(["a picture of a small red circle in the top left corner",
                                    "red star"])
    assert truncated.tolist() == [True, False]
    assert (tokens[0] != text_tokenizer.PAD_ID).all()


def test_bpe_dropout_only_in_training_and_seeded(model_path):
    tok = text_tokenizer.TextTokenizer(model_path, text_len=48, dropout=0.1)
    captions = ["a picture of a small red circle in the top left corner"] * 16
    plain, _ = tok.encode(captions)
    eval_tokens, _ = tok.encode(captions, train=False, seed=1)
    np.testing.assert_array_equal(plain, eval_tokens)
    a, _ = tok.encode(captions, train=True, seed=1)
    b, _ = tok.encode(captions, train=True, seed=1)
    c, _ = tok.encode(captions, train=True, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, plain), "dropout should split some merges"
    # Dropout changes the segmentation, never the text.
    assert set(tok.decode(a)) == {captions[0]}
    assert (a != text_tokenizer.PAD_ID).sum() > (plain != text_tokenizer.PAD_ID).sum()


def test_bpe_dropout_without_drops_is_sentencepiece_bpe(model_path):
    rng = np.random.default_rng(1)
    captions = [" ".join(rng.choice(WORDS + ["zebra", "q", "circles"], size=9))
                for _ in range(300)]
    plain = text_tokenizer.TextTokenizer(model_path, text_len=64)
    almost_no_dropout = text_tokenizer.TextTokenizer(model_path, text_len=64, dropout=1e-12)
    np.testing.assert_array_equal(almost_no_dropout.encode(captions, train=True, seed=0)[0],
                                  plain.encode(captions)[0])


@pytest.mark.slow
def test_bpe_dropout_is_the_same_in_another_process(model_path):
    captions = ["a picture of a small red circle in the top left corner"] * 8
    tokens, _ = text_tokenizer.TextTokenizer(model_path, 48, dropout=0.1).encode(
        captions, train=True, seed=7)
    script = ("import sys, numpy as np; from dalle_jax.data import text_tokenizer as t; "
              f"tok = t.TextTokenizer({str(model_path)!r}, 48, dropout=0.1); "
              f"np.save(sys.stdout.buffer, tok.encode({captions!r}, train=True, seed=7)[0])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True)
    np.testing.assert_array_equal(np.load(io.BytesIO(out.stdout)), tokens)


def test_training_is_deterministic(model_path, tmp_path):
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(4, 12))).upper()
                for _ in range(3000)]
    text_tokenizer.train_text_tokenizer(captions, tmp_path / "again.model", vocab_size=200)
    assert (tmp_path / "again.model").read_bytes() == model_path.read_bytes()


def test_bad_arguments(model_path, tmp_path):
    with pytest.raises(ValueError, match="text_len"):
        text_tokenizer.TextTokenizer(model_path, text_len=0)
    with pytest.raises(ValueError, match="BPE-dropout"):
        text_tokenizer.TextTokenizer(model_path, text_len=8, dropout=1.5)
    with pytest.raises(ValueError, match="no non-empty captions"):
        text_tokenizer.train_text_tokenizer(["", "  "], tmp_path / "t.model", vocab_size=50)


def test_a_runs_text_tokenizer_is_trained_once_then_loaded(model_path, tmp_path):
    text_config = ml_collections.ConfigDict(dict(
        tokenizer_path="", vocab_size=200, model_type="bpe", text_len=16, bpe_dropout=0.1))
    path = text_tokenizer.text_tokenizer_path(text_config, tmp_path)
    assert path == tmp_path / text_tokenizer.TEXT_TOKENIZER_FILE_NAME
    with pytest.raises(FileNotFoundError, match="train_text_tokenizer"):
        text_tokenizer.load_text_tokenizer(text_config, tmp_path)
    read = []

    def captions():
        for caption in ["a red circle", "a blue square above a green star"] * 200:
            read.append(caption)
            yield caption

    trained = text_tokenizer.train_or_load_text_tokenizer(
        text_config, tmp_path, captions(), progress=False)
    assert path.exists() and read and trained.dropout == 0.1 and trained.text_len == 16
    read.clear()
    loaded = text_tokenizer.train_or_load_text_tokenizer(
        text_config, tmp_path, captions(), progress=False)
    assert not read, "an existing tokenizer is loaded without reading the captions"
    assert loaded.vocab_size == trained.vocab_size
    # A path in the config wins over the workdir.
    text_config.tokenizer_path = str(model_path)
    assert text_tokenizer.load_text_tokenizer(text_config, None).model_path == str(model_path)


def test_a_vocabulary_smaller_than_the_characters_is_a_config_error(tmp_path):
    from dalle_jax import errors  # pylint: disable=g-import-not-at-top
    captions = ["abcdefghijklmnopqrstuvwxyz"] * 10
    with pytest.raises(errors.ConfigError, match=r"config\.text\.vocab_size: 8 is smaller"):
        text_tokenizer.train_text_tokenizer(captions, tmp_path / "t.model", vocab_size=8)
    assert not (tmp_path / "t.model").exists()
