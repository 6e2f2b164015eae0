"""Evaluation of the contrastive model, alone and as the reranker of generation.

- :func:`retrieval`: image→text and text→image Recall@1/5/10 over a split's pairs
  (equal captions count as one: captioned shapes repeats some).
- :func:`zero_shot`: for captioned shapes, colour, shape and cell of lone objects read
  by prompt templates — each class's text embedding the mean over the dataset's words
  for the other attributes ("a red circle", "a red square", ... for red) — against the
  labels the caption states.
- :func:`reranking_gain`: the figure the reranker exists for. For the same prompts and
  seeds it draws N candidates per prompt, judges every one from its pixels with
  :mod:`dalle_jax.evaluation.shapes_checker`, and compares the fidelity of the
  reranker's top-1 of the first n (n = 8, 32) with that of a random one of them (the
  mean over the n, the expectation of a random pick), over several seeds so that the
  gain can be set against the spread from seed to seed.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import numpy as np

from dalle_jax.data import shapes
from dalle_jax.evaluation import batches as batches_lib
from dalle_jax.evaluation import shapes_checker
from dalle_jax.stages import contrastive as stage

# Composites judged for reranking: (name, prompt kind, criteria).
RERANK_COMPOSITES = (
    ("colour", "one_object", ("colour",)),
    ("colour_cell", "one_object", ("colour", "cell")),
    ("shape", "one_object", ("shape",)),
    ("all", "one_object", ("all",)),
    ("colours_relation", "two_objects", ("colour", "relation")),
    ("all", "two_objects", ("all",)),
)


def _text(caption) -> str:
    return caption.decode() if isinstance(caption, bytes) else str(caption)


def split_pairs(data, split: str, max_examples: int) -> tuple[np.ndarray, list[str]]:
    """The first ``max_examples`` images (uint8) and captions of a split."""
    images, captions = [], []
    for batch in batches_lib.split_batches(data, split, 256, max_examples):
        real = np.asarray(batch["mask"]).astype(bool)
        images.append(np.asarray(batch["image"])[real])
        captions += [_text(c) for c, r in zip(batch["caption"], real) if r]
    return np.concatenate(images), captions


def retrieval(reranker, images: np.ndarray, captions: Sequence[str],
              ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways over all pairs; pairs with equal captions share an id."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    z_img = reranker.embed_images(images)
    z_txt = reranker.embed_texts(reranker.tokenize(list(captions)))
    out = retrieval_recalls(
        z_img, z_txt, ks, image_ids=np.array([ids[c] for c in captions]))
    out["pairs"] = len(captions)
    return out


def retrieval_recalls(z_img: np.ndarray, z_txt: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10),
                      image_ids: np.ndarray | None = None) -> dict[str, float]:
    """Recall@k both ways for paired embeddings (row i of each is one pair,
    :func:`dalle_jax.stages.contrastive.recalls`); rows with the same ``image_ids`` count
    as the same (a caption of captioned shapes may describe several images)."""
    n = np.asarray(z_img).shape[0]
    ids = np.arange(n) if image_ids is None else np.asarray(image_ids)
    out = stage.recalls(np.asarray(z_img, np.float32), np.asarray(z_txt, np.float32),
                        ids[:, None] == ids[None, :], ks=tuple(ks))
    return {k: float(v) for k, v in out.items()}


def _class_embeddings(reranker, phrases: dict[str, list[str]]) -> tuple[list[str], np.ndarray]:
    names = list(phrases)
    rows = []
    for name in names:
        z = reranker.embed_texts(reranker.tokenize(phrases[name])).mean(0)
        rows.append(z / np.linalg.norm(z))
    return names, np.stack(rows)


def zero_shot(reranker, images: np.ndarray, captions: Sequence[str]) -> dict[str, Any]:
    """Accuracy of colour, shape and cell (3×3) read by prompt templates, on the images
    whose caption names one object (cell: those whose caption places it)."""
    parsed = [shapes_checker.parse_caption(c) for c in captions]
    lone = [i for i, p in enumerate(parsed) if len(p.objects) == 1]
    if not lone:
        return {"images": 0}
    z_img = reranker.embed_images(images[lone])
    colours, kinds = shapes.COLOURS, shapes.SHAPES
    templates = {
        "colour": {c: [f"a {c} {s}" for s in kinds] for c in colours},
        "shape": {s: [f"a {c} {s}" for c in colours] for s in kinds},
        "cell": {str(k): [f"a {c} {s} {phrase}" for c, s in itertools.product(colours, kinds)]
                 for k, phrase in enumerate(shapes.CELL_PHRASES)},
    }
    truth = {
        "colour": [parsed[i].objects[0].colour for i in lone],
        "shape": [parsed[i].objects[0].shape for i in lone],
        "cell": [None if parsed[i].cell is None else str(parsed[i].cell) for i in lone],
    }
    out: dict[str, Any] = {"images": len(lone)}
    for attribute, phrases in templates.items():
        names, z_cls = _class_embeddings(reranker, phrases)
        guess = np.asarray(names)[np.argmax(z_img @ z_cls.T, axis=1)]
        known = [j for j, t in enumerate(truth[attribute]) if t is not None]
        out[attribute] = float(np.mean([guess[j] == truth[attribute][j] for j in known]))
        out[f"{attribute}_chance"] = 1.0 / len(names)
    return out


def reranking_gain(model, prompts: Sequence[str], *, candidates: Sequence[int] = (8, 32),
                   seeds: Sequence[int] = (0, 1, 2), batch_size: int | None = None,
                   progress: bool = False, log: Callable[[str], None] = lambda _: None,
                   **settings: Any) -> dict[str, Any]:
    """Fidelity of the reranker's top-1 of n candidates against a random one of them,
    per composite and n, as the mean and spread (standard deviation) over ``seeds``.

    For each seed, max(candidates) images are drawn per prompt once; the first n of
    them are the candidates of n (the same images a request with ``candidates=n``
    draws). ``model`` is a :class:`TextToImage` with a reranker."""
    if model.reranker is None:
        raise ValueError("the bundle has no reranker")
    most = max(candidates)
    per_seed: list[dict[str, dict[str, float]]] = []
    timings = {"sample_s": 0.0, "decode_s": 0.0, "score_s": 0.0}
    for seed in seeds:
        log(f"drawing {most} candidates for each of {len(prompts)} prompts (seed {seed})")
        result = model.generate(list(prompts), most, seed=seed, batch_size=batch_size,
                                progress=progress, **settings)
        for k, v in result.timings.items():
            timings[k] += v
        flat = result.images.reshape((-1,) + result.images.shape[2:])
        checks = shapes_checker.judge(flat, [r["prompt"] for r in result.records])
        kinds = np.array([c["kind"] for c in checks]).reshape(len(prompts), most)[:, 0]
        figures: dict[str, dict[str, float]] = {}
        for name, kind, criteria in RERANK_COMPOSITES:
            passed = np.array([all(c["check"][k] for k in criteria)
                               if all(c["check"][k] is not None for k in criteria)
                               else np.nan for c in checks]).reshape(len(prompts), most)
            rows = (kinds == kind) & ~np.isnan(passed).any(1)
            if not rows.any():
                continue
            for n in candidates:
                best = np.argmax(result.scores[:, :n], axis=1)
                figures[f"{kind}/{name}/random_of_{n}"] = float(np.mean(passed[rows, :n]))
                figures[f"{kind}/{name}/top1_of_{n}"] = float(np.mean(
                    passed[rows, best[rows]]))
        per_seed.append(figures)
    keys = sorted(set().union(*per_seed))
    summary = {}
    for key in keys:
        values = np.array([f[key] for f in per_seed if key in f])
        summary[key] = {"mean": float(values.mean()), "std": float(values.std()),
                        "per_seed": [round(float(v), 4) for v in values]}
    drawn = len(prompts) * most * len(seeds)
    return {"prompts": len(prompts), "seeds": list(seeds), "candidates": list(candidates),
            "images_drawn": drawn, "figures": summary,
            "seconds": {k: round(v, 2) for k, v in timings.items()}}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def reranker_lines(split: str, retrieval: dict[str, Any],
                   zero_shot: dict[str, Any] | None = None) -> list[str]:
    """:func:`retrieval` (and :func:`zero_shot`) as text lines."""
    r = retrieval
    ways = [f"{way.replace('_to_', '->')} R@1/5/10 "
            + " / ".join(_pct(r[f"{way}_r@{k}"]) for k in (1, 5, 10))
            for way in ("image_to_text", "text_to_image")]
    lines = [f"reranker ({split}, {r['pairs']} pairs): " + ", ".join(ways)]
    if zero_shot and zero_shot.get("images"):
        lines.append(f"  zero-shot on {zero_shot['images']} lone objects: " + ", ".join(
            f"{a} {_pct(zero_shot[a])}" for a in ("colour", "shape", "cell")))
    return lines


def gain_table(gain: dict[str, Any]) -> str:
    """:func:`reranking_gain` as text: random vs top-1 for each n, with the spread."""
    figures = gain["figures"]
    lines = [f"reranking ({gain['prompts']} prompts, seeds {gain['seeds']}): fidelity of "
             "a random candidate vs the reranker's top-1 (mean ± std over seeds)"]
    names = sorted({k.rsplit("/", 1)[0] for k in figures})
    for name in names:
        parts = []
        for n in gain["candidates"]:
            r, t = figures.get(f"{name}/random_of_{n}"), figures.get(f"{name}/top1_of_{n}")
            if r and t:
                parts.append(f"of {n}: {100 * r['mean']:.1f}±{100 * r['std']:.1f}% -> "
                             f"{100 * t['mean']:.1f}±{100 * t['std']:.1f}%")
        lines.append(f"  {name:28s} " + "; ".join(parts))
    return "\n".join(lines)
