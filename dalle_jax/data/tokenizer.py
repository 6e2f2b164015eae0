"""Caption tokenizer: sentencepiece BPE trained on a dataset's captions.

As in the paper, captions are lowercased and BPE-encoded; during training each merge
is dropped with probability ``dropout`` (BPE-dropout, sentencepiece's sampling mode).
Token id 0 is the padding piece: sentencepiece never emits it for text, so the model
can tell padded positions (``text_tokens == PAD_ID``) and give each one its own
learned per-position pad embedding. Captions longer than ``text_len`` are truncated
and reported per example so the pipeline can count them.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Iterable, Sequence

from absl import logging
from etils import epath
import numpy as np
import sentencepiece as spm
import tqdm

from dalle_jax import files

PAD_ID = 0
UNK_ID = 1
TOKENIZER_FILE_NAME = "tokenizer.model"

# sentencepiece keeps one random generator per thread, seeded from a process-wide seed
# the first time that thread samples. A fresh thread per sampled batch, started while
# the seed is held under this lock, makes BPE-dropout a pure function of the seed.
_SAMPLING_LOCK = threading.Lock()


def normalize_caption(caption: str | bytes) -> str:
    """Lowercases and strips a caption (bytes are decoded as UTF-8)."""
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    return caption.strip().lower()


def train_tokenizer(
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
    own size is what the transformer must use (``Tokenizer.vocab_size``).
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
            raise ValueError("cannot train a tokenizer: no non-empty captions")
        prefix = os.path.join(tmp, "spm")
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
        files.atomic_write(output_path, epath.Path(prefix + ".model").read_bytes())
    return output_path


class Tokenizer:
    """Fixed-length caption encoder around a sentencepiece model."""

    def __init__(self, model_path: str | os.PathLike, text_len: int, dropout: float = 0.0):
        if text_len <= 0:
            raise ValueError(f"text_len must be positive, got {text_len}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"BPE-dropout must be in [0, 1), got {dropout}")
        self.model_path = str(model_path)
        self.text_len = text_len
        self.dropout = dropout
        self._sp = spm.SentencePieceProcessor(
            model_proto=epath.Path(model_path).read_bytes())
        if self._sp.pad_id() != PAD_ID:
            raise ValueError(
                f"{model_path}: pad id is {self._sp.pad_id()}, expected {PAD_ID}; "
                "train tokenizers with dalle_jax.data.tokenizer.train_tokenizer")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _encode_ids(self, texts: list[str], sample: bool, seed: int | None) -> list[list[int]]:
        if not sample:
            return self._sp.encode(texts, out_type=int)
        if seed is None:
            return self._sp.encode(texts, out_type=int, enable_sampling=True,
                                   alpha=self.dropout, nbest_size=-1)
        result: list[list[int]] = []

        def encode_in_fresh_thread():
            result.extend(self._sp.encode(texts, out_type=int, enable_sampling=True,
                                          alpha=self.dropout, nbest_size=-1, num_threads=1))

        with _SAMPLING_LOCK:
            spm.set_random_generator_seed(seed % (2**32))
            worker = threading.Thread(target=encode_in_fresh_thread)
            worker.start()
            worker.join()
        return result

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


def tokenizer_for_run(text_config, workdir: str | os.PathLike | None) -> epath.Path:
    """Where a run's tokenizer lives: ``config.text.tokenizer`` or beside the run."""
    if text_config.tokenizer:
        return epath.Path(text_config.tokenizer)
    if workdir is None:
        raise ValueError("no tokenizer: set config.text.tokenizer or pass --workdir")
    return epath.Path(workdir) / TOKENIZER_FILE_NAME


def load_tokenizer(text_config, workdir: str | os.PathLike | None) -> Tokenizer:
    """Loads the run's tokenizer with the config's text length and BPE-dropout."""
    path = tokenizer_for_run(text_config, workdir)
    if not path.exists():
        raise FileNotFoundError(
            f"no tokenizer at {path}; train one with `python -m "
            "dalle_jax.tools.train_tokenizer --config=... --workdir=...` or set "
            "config.text.tokenizer")
    return Tokenizer(path, text_config.text_len, text_config.bpe_dropout)


def train_for_run(config, workdir, *, split: str = "train", overwrite: bool = False,
                  progress: bool = True) -> Tokenizer:
    """Trains (or, if present and not ``overwrite``, loads) the run's tokenizer."""
    from dalle_jax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
    path = tokenizer_for_run(config.text, workdir)
    if path.exists() and not overwrite:
        return load_tokenizer(config.text, workdir)
    source = pipeline_lib.make_pipeline(
        config, split, train=False, process_index=0, process_count=1)
    captions = source.iter_captions()
    if progress:
        captions = tqdm.tqdm(captions, desc=f"captions of {source.source.name}", unit=" captions")
    start = time.perf_counter()
    train_tokenizer(
        captions, path, vocab_size=config.text.vocab_size, model_type=config.text.model_type)
    tokenizer = load_tokenizer(config.text, workdir)
    logging.info("trained a %s tokenizer with %d pieces in %.1fs: %s",
                 config.text.model_type, tokenizer.vocab_size,
                 time.perf_counter() - start, path)
    return tokenizer
