"""Batches with the frozen contrastive model's embeddings attached (unCLIP's inputs).

The unCLIP decoder and prior (DALL·E 2) read the image and caption embeddings of the
contrastive model trained here (the reranker's towers, :mod:`dalle_jax.inference.reranker`),
which is never trained further by them. :class:`EmbeddedBatches` wraps a batch iterator
of the input pipeline and adds, to each batch,

- ``image_embedding`` float32 [B, D], unit: the image tower on ``batch["image"]``;
- ``text_embedding`` float32 [B, D], unit: the text tower on ``batch["text_tokens"]``
  (which must then be the contrastive model's tokens).

The embeddings are computed on the host's devices, batch-sharded, as the batch is read;
the iterator's position is the wrapped one's, so a resumed run reads on exactly.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

STATE_VERSION = 1


class EmbeddedBatches:
    """Adds the contrastive model's embeddings to each batch of ``batches``.

    ``reranker``: a :class:`dalle_jax.inference.reranker.Reranker` (anything with
    ``embed_images`` and ``embed_texts``); ``images`` / ``texts`` choose which
    embeddings are added.
    """

    def __init__(self, batches, reranker, *, images: bool = True, texts: bool = False):
        self.batches = batches
        self.reranker = reranker
        self.images = images
        self.texts = texts

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.batches))
        if self.images:
            batch["image_embedding"] = np.asarray(
                self.reranker.embed_images(batch["image"]), np.float32)
        if self.texts:
            batch["text_embedding"] = np.asarray(
                self.reranker.embed_texts(batch["text_tokens"]), np.float32)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "batches": self.batches.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"cannot restore the embedded batches from a state of version "
                             f"{state.get('version')!r}")
        self.batches.set_state(state["batches"])

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
