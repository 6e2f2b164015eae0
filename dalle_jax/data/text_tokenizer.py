"""Text tokenizer: sentencepiece BPE trained on a dataset's captions.

As in the paper, captions are lowercased and BPE-encoded; during training each merge
is dropped with probability ``dropout`` (BPE-dropout, sentencepiece's sampling mode).
Token id 0 is the padding piece: sentencepiece never emits it for text, so the model
can tell padded positions (``text_tokens == PAD_ID``) and give each one its own
learned per-position pad embedding. Captions longer than ``text_len`` are truncated
and reported per example so the pipeline can count them.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from typing import Iterable, Sequence

from absl import logging
from etils import epath
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
import tqdm

from dalle_jax import errors
from dalle_jax import files

PAD_ID = 0
UNK_ID = 1
TEXT_TOKENIZER_FILE_NAME = "text_tokenizer.model"


def normalize_caption(caption: str | bytes) -> str:
    """Lowercases and strips a caption (bytes are decoded as UTF-8)."""
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    return caption.strip().lower()


def train_text_tokenizer(
    captions: Iterable[str | bytes],
    output_path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentences: int = 5_000_000,
    hard_vocab_limit: bool = False,
) -> epath.Path:
    """Trains a sentencepiece model on lowercased captions; writes ``output_path``.

    With ``hard_vocab_limit=False`` a small corpus (such as the shapes captions, with a
    few dozen distinct words) may end with fewer pieces than ``vocab_size``; the model's
    own size is what the transformer must use (``TextTokenizer.vocab_size``).
    """
    output_path = epath.Path(output_path)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "captions.txt")
        count = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for caption in captions:
                text = normalize_caption(caption).replace("\n", " ")
                if text:
                    f.write(text + "\n")
                    count += 1
        if count == 0:
            raise ValueError("cannot train a text tokenizer: no non-empty captions")
        prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.train(
                input=corpus,
                model_prefix=prefix,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                hard_vocab_limit=hard_vocab_limit,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=-1,
                eos_id=-1,
                normalization_rule_name="nmt_nfkc",
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:  # sentencepiece's own check on the captions' characters
            if "Vocabulary size is smaller than required_chars" not in str(e):
                raise
            needed = re.search(r"vs (\d+)", str(e))
            raise errors.ConfigError(
                "text.vocab_size", f"{vocab_size} is smaller than the pieces the captions' "
                f"characters need ({needed.group(1) if needed else 'more'})") from None
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(epath.Path(prefix + ".model").read_bytes())
        # The temporary paths it was trained from would make equal models differ.
        del model.trainer_spec.input[:]
        model.trainer_spec.model_prefix = ""
        files.atomic_write(output_path, model.SerializeToString(deterministic=True))
    return output_path


class TextTokenizer:
    """Fixed-length caption encoder around a sentencepiece model."""

    def __init__(self, model_path: str | os.PathLike, text_len: int, dropout: float = 0.0):
        if text_len <= 0:
            raise ValueError(f"text_len must be positive, got {text_len}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"BPE-dropout must be in [0, 1), got {dropout}")
        self.model_path = str(model_path)
        self.text_len = text_len
        self.dropout = dropout
        proto = epath.Path(model_path).read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(proto)
        if dropout and model.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
            raise ValueError(f"{model_path}: BPE-dropout needs a BPE model")
        self._merge_scores = None  # piece -> (score, id), built on first sampled encode
        if self._sp.pad_id() != PAD_ID:
            raise ValueError(
                f"{model_path}: pad id is {self._sp.pad_id()}, expected {PAD_ID}; "
                "train it with dalle_jax.data.text_tokenizer.train_text_tokenizer")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _bpe_tables(self):
        if self._merge_scores is None:
            sp = self._sp
            self._merge_scores = {
                sp.id_to_piece(i): (sp.get_score(i), i) for i in range(sp.get_piece_size())
                if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))}
        return self._merge_scores

    def _bpe_dropout_ids(self, text: str, rng: np.random.Generator) -> list[int]:
        """BPE with each candidate merge dropped with probability ``dropout``.

        The merges of sentencepiece's BPE model (the pair whose joined piece scores
        highest, leftmost first), with BPE-dropout (Provilkov et al. 2020) driven by
        ``rng``, so that a seed fixes the segmentation on any machine. With no merge
        dropped it gives exactly sentencepiece's own encoding.
        """
        pieces_of = self._bpe_tables()
        ids = []
        for word in self._sp.normalize(text).replace("\u2581", " \u2581").split(" "):
            if not word:
                continue
            symbols = list(word)
            while len(symbols) > 1:
                best, best_score = -1, -np.inf
                keep = rng.random(len(symbols) - 1) >= self.dropout
                for i in range(len(symbols) - 1):
                    merged = pieces_of.get(symbols[i] + symbols[i + 1])
                    if merged is not None and keep[i] and merged[0] > best_score:
                        best, best_score = i, merged[0]
                if best < 0:
                    break
                symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
            ids.extend(pieces_of.get(piece, (0.0, UNK_ID))[1] for piece in symbols)
        return ids

    def _encode_ids(self, texts: list[str], sample: bool, seed: int | None) -> list[list[int]]:
        if not sample:
            return self._sp.encode(texts, out_type=int)
        rng = np.random.default_rng(None if seed is None else seed % 2**64)
        return [self._bpe_dropout_ids(text, rng) for text in texts]

    def encode(
        self,
        captions: Sequence[str | bytes],
        *,
        train: bool = False,
        seed: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(text_tokens int32[B, text_len], truncated bool[B])``.

        BPE-dropout applies only when ``train`` is set; with a ``seed`` it is
        reproducible (the pipeline derives the seed from the batch's position).
        """
        texts = [normalize_caption(c) for c in captions]
        sample = train and self.dropout > 0
        ids = self._encode_ids(texts, sample, seed)
        tokens = np.full((len(texts), self.text_len), PAD_ID, np.int32)
        truncated = np.zeros((len(texts),), bool)
        for i, row in enumerate(ids):
            if len(row) > self.text_len:
                truncated[i] = True
                row = row[: self.text_len]
            tokens[i, : len(row)] = row
        return tokens, truncated

    def pieces(self, caption: str | bytes) -> list[str]:
        """The BPE pieces of one caption (no dropout), for display."""
        return self._sp.encode(normalize_caption(caption), out_type=str)

    def decode(self, text_tokens: np.ndarray) -> list[str]:
        """Decodes ``int[B, L]`` (or one ``int[L]``) token rows, ignoring padding."""
        rows = np.atleast_2d(np.asarray(text_tokens))
        texts = [self._sp.decode([int(t) for t in row if t != PAD_ID]) for row in rows]
        return texts


def text_tokenizer_path(text_config, workdir: str | os.PathLike | None) -> epath.Path:
    """Where a run's text tokenizer lives: ``config.text.tokenizer_path`` or beside the
    run."""
    if text_config.tokenizer_path:
        return epath.Path(text_config.tokenizer_path)
    if workdir is None:
        raise ValueError("no text tokenizer: set config.text.tokenizer_path or pass --workdir")
    return epath.Path(workdir) / TEXT_TOKENIZER_FILE_NAME


def load_text_tokenizer(text_config, workdir: str | os.PathLike | None) -> TextTokenizer:
    """Loads the run's text tokenizer with the config's text length and BPE-dropout."""
    path = text_tokenizer_path(text_config, workdir)
    if not path.exists():
        raise FileNotFoundError(
            f"no text tokenizer at {path}; train one with `python -m "
            "dalle_jax.tools.train_text_tokenizer --config=... --workdir=...` or set "
            "config.text.tokenizer_path")
    return TextTokenizer(path, text_config.text_len, text_config.bpe_dropout)


def train_or_load_text_tokenizer(text_config, workdir: str | os.PathLike | None,
                                 captions: Iterable[str | bytes], *,
                                 overwrite: bool = False,
                                 progress: bool = True) -> TextTokenizer:
    """Trains the run's text tokenizer on ``captions``, or loads it if present (and not
    ``overwrite``).

    ``captions`` is only iterated when a tokenizer is trained, so a lazy iterable (such
    as :func:`dalle_jax.data.sources.iter_captions`) costs nothing when one exists.
    """
    path = text_tokenizer_path(text_config, workdir)
    if path.exists() and not overwrite:
        return load_text_tokenizer(text_config, workdir)
    if progress:
        captions = tqdm.tqdm(captions, desc="captions", unit=" captions")
    start = time.perf_counter()
    train_text_tokenizer(captions, path, vocab_size=text_config.vocab_size,
                         model_type=text_config.model_type)
    tokenizer = load_text_tokenizer(text_config, workdir)
    logging.info("trained a %s text tokenizer with %d pieces in %.1fs: %s",
                 text_config.model_type, tokenizer.vocab_size,
                 time.perf_counter() - start, path)
    return tokenizer
