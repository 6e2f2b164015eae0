"""Evaluation of unCLIP's variations (DALL·E 2) on held-out captioned shapes.

Each held-out image is embedded by the contrastive model and decoded K times
(:class:`dalle_jax.inference.unclip.UnclipDecoder`); the variations are judged two ways:

- fidelity: the attribute checker reads each variation against the *source image's*
  caption (what the embedding should have kept), beside the checker's rates on the
  sources themselves;
- diversity: the mean pixel distance between variations of the same source and from
  each variation to its source, against the distance between two different dataset
  images with the same caption (the spread the data itself allows). A variation that
  merely copies its source scores 0.

Distances are the mean absolute difference of uint8 pixels, in [0, 1] units of 255.
Both are measured over η, from noise (the default variations) and from the source's
DDIM inversion, where η = 0 returns the source and diversity grows with η.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import jax
import numpy as np

from dalle_jax.evaluation import shapes_checker


def pixel_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference of uint8 images [..., H, W, 3], in [0, 1]."""
    diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
    return diff.reshape(diff.shape[:-3] + (-1,)).mean(-1) / 255.0


def same_caption_distance(images: np.ndarray, captions: Sequence[str],
                          max_pairs: int = 2000) -> dict[str, Any]:
    """The mean pixel distance between different images that share a caption (at most
    ``max_pairs`` pairs, in the dataset's order)."""
    groups: dict[str, list[int]] = {}
    for i, caption in enumerate(captions):
        groups.setdefault(caption, []).append(i)
    pairs = [p for g in groups.values() if len(g) > 1 for p in itertools.combinations(g, 2)]
    pairs = pairs[:max_pairs]
    if not pairs:
        return {"pairs": 0, "distance": float("nan")}
    a, b = np.array(pairs).T
    return {"pairs": len(pairs), "distance": float(pixel_distance(images[a], images[b]).mean())}


def _spread(variations: np.ndarray) -> float:
    """Mean distance between the variations [N, K, H, W, 3] of each source."""
    k = variations.shape[1]
    pairs = list(itertools.combinations(range(k), 2))
    if not pairs:
        return float("nan")
    return float(np.mean([pixel_distance(variations[:, i], variations[:, j]).mean()
                          for i, j in pairs]))


def variations(decoder, images: np.ndarray, captions: Sequence[str], *,
               num_variations: int = 4, etas: Sequence[float] = (0.0, 0.5, 1.0),
               steps: int | None = None, guidance_scale: float | None = None,
               inversion_etas: Sequence[float] = (0.0, 0.5, 1.0),
               reference: dict[str, Any] | None = None, seed: int = 0,
               log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Fidelity and diversity of ``num_variations`` variations of each of ``images``
    (uint8 [N, S, S, 3], their ``captions``), for each η of ``etas`` from noise and of
    ``inversion_etas`` from the DDIM inversion. ``reference``: a
    :func:`same_caption_distance` result (from the sources when not given)."""
    n, k = len(images), int(num_variations)
    settings = decoder.settings(steps, None, guidance_scale)
    emb = decoder.embed(images)
    flat_emb = np.repeat(emb, k, 0)
    flat_captions = [c for c in captions for _ in range(k)]
    base = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.arange(n * k))
    records = [{"prompt": c, "index": j} for c in captions for j in range(k)]
    reference = reference or same_caption_distance(images, captions)
    report: dict[str, Any] = {
        "sources": n, "variations_per_source": k, "steps": settings.steps,
        "guidance_scale": settings.guidance_scale, "same_caption": reference,
        "source_rates": shapes_checker.composite_rates(shapes_checker.image_checks(
            images, [{"prompt": c, "index": 0} for c in captions])),
        "from_noise": {}, "from_inversion": {}}
    z_T = None
    for start, sweep in (("from_noise", etas), ("from_inversion", inversion_etas)):
        if start == "from_inversion" and sweep:
            log(f"inverting {n} images ({settings.steps} DDIM steps)")
            z_T = np.repeat(decoder.invert(images, emb, steps=settings.steps,
                                           guidance_scale=settings.guidance_scale), k, 0)
        for eta in sweep:
            log(f"{k} variations of {n} images {start.replace('_', ' ')}, eta {eta:g}")
            out = decoder.decode(flat_emb, keys=keys, steps=settings.steps, eta=eta,
                                 guidance_scale=settings.guidance_scale,
                                 z_T=z_T if start == "from_inversion" else None)
            grouped = out.reshape((n, k) + out.shape[1:])
            report[start][f"{eta:g}"] = {
                "eta": float(eta),
                "rates": shapes_checker.composite_rates(shapes_checker.image_checks(out,
                                                                                records)),
                "criteria": shapes_checker.score(out, flat_captions),
                "between_variations": _spread(grouped),
                "to_source": float(pixel_distance(grouped, images[:, None]).mean()),
            }
    return report


def figure(decoder, images: np.ndarray, captions: Sequence[str], *, num_variations: int = 6,
           eta: float | None = None, steps: int | None = None,
           guidance_scale: float | None = None, seed: int = 0,
           cell_size: int = 64) -> np.ndarray:
    """One row per source image: its caption, the source, then its variations (from
    noise, the decoder's default η unless given). uint8 [H, W, 3]."""
    from dalle_jax import visualize  # pylint: disable=g-import-not-at-top
    n, k = len(images), int(num_variations)
    emb = np.repeat(decoder.embed(images), k, 0)
    base = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.arange(n * k))
    out = decoder.decode(emb, keys=keys, steps=steps, eta=eta,
                         guidance_scale=guidance_scale).reshape(
        (n, k) + images.shape[1:])
    rows = np.concatenate([images[:, None], out], axis=1)
    settings = decoder.settings(steps, eta, guidance_scale)
    labels = [f"{c}\n(source | {k} variations, eta {settings.eta:g}, guidance "
              f"{settings.guidance_scale:g})" for c in captions]
    return visualize.prompt_rows(rows, labels, cell_size=cell_size, label_width=190)


def diversity_fraction(entry: dict[str, Any], reference: dict[str, Any]) -> float:
    """Distance between variations as a fraction of the same-caption distance."""
    return entry["between_variations"] / reference["distance"]


def report_lines(report: dict[str, Any]) -> list[str]:
    """The headline lines of a :func:`variations` report."""
    ref = report["same_caption"]
    src = report["source_rates"]
    lines = [f"unCLIP variations ({report['sources']} held-out images x "
             f"{report['variations_per_source']}, {report['steps']} DDIM steps, guidance "
             f"{report['guidance_scale']:g}); same-caption distance {ref['distance']:.3f} "
             f"({ref['pairs']} pairs)",
             f"  {'start, eta':<22}{'colour+cell':>12}{'colours+rel':>12}"
             f"{'between':>9}{'to source':>10}{'x same-cap':>11}",
             f"  {'(the sources)':<22}{_pct(src['one_object']['colour_cell']):>12}"
             f"{_pct(src['two_objects']['colours_relation']):>12}"]
    for start in ("from_noise", "from_inversion"):
        for key, e in report[start].items():
            lines.append(
                f"  {start.replace('_', ' ') + ', ' + key:<22}"
                f"{_pct(e['rates']['one_object']['colour_cell']):>12}"
                f"{_pct(e['rates']['two_objects']['colours_relation']):>12}"
                f"{e['between_variations']:>9.3f}{e['to_source']:>10.3f}"
                f"{diversity_fraction(e, ref):>11.2f}")
    return lines


def _pct(x: float) -> str:
    return "  n/a" if x != x else f"{100 * x:5.1f}%"
