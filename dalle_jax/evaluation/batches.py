"""Reading a split once, in order, for evaluation (one process)."""
from __future__ import annotations

from typing import Any, Iterator

import ml_collections
import numpy as np

from dalle_jax.data import pipeline as pipeline_lib


def split_batches(data: ml_collections.ConfigDict, split: str, batch_size: int,
                  max_examples: int | None, text_tokenizer=None) -> Iterator[dict[str, Any]]:
    """The batches of ``split`` as ``data`` describes it, in order and once, with their
    captions (and text tokens given a tokenizer); ``mask`` marks the real rows, at most
    ``max_examples`` of them over all batches."""
    config = ml_collections.ConfigDict(dict(data=data, batch_size=batch_size, seed=0))
    seen = 0
    with pipeline_lib.make_pipeline(config, split, train=False, with_captions=True,
                                    text_tokenizer=text_tokenizer, process_index=0,
                                    process_count=1) as pipeline:
        for batch in pipeline:
            real = np.asarray(batch["mask"]).astype(bool)
            if max_examples is not None:
                keep = np.cumsum(real) + seen <= max_examples
                real &= keep
            count = int(real.sum())
            if count == 0:
                break
            batch = dict(batch)
            batch["mask"] = real
            yield batch
            seen += count
            if max_examples is not None and seen >= max_examples:
                break
