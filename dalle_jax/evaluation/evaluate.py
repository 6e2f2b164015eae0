"""Evaluation of an exported bundle: each stage on held-out data, and generated images
judged from their pixels.

- Stage 1: reconstruction PSNR (per image, then the mean) and codebook use on a split.
- Stage 2: the weighted validation loss, its text and image parts, and bits per image
  token, on the split's captions and the codes of its images.
- Fidelity (captioned shapes): images generated for the captions of the test split and
  of the holdout split — (colour, shape) pairs never seen in training — judged by
  :mod:`dalle_jax.evaluation.shapes_checker`, which reads the pixels alone.
- The upsampler (a bundle with one): PSNR and SSIM against bicubic on held-out images,
  the consistency of its outputs with its inputs, and the checker's rates on generated
  images before and after it (:mod:`dalle_jax.evaluation.upsampler`).

:func:`evaluate` returns one JSON-ready dict; :func:`table` formats its headline figures.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle_jax.evaluation import batches as batches_lib
from dalle_jax.evaluation import shapes_checker
from dalle_jax.stages import transformer as stage2
from dalle_jax.train import sharding as sharding_lib
# The demo's composite bars and per-image checks live with the checker.
from dalle_jax.evaluation.shapes_checker import composite_rates, image_checks

SHAPES = "captioned_shapes"

def image_data_config(model, data_dir: str | None = None) -> ml_collections.ConfigDict:
    """The data section for the images of the bundle's dataset: its transformer
    config's, reading images (a run trained from code shards names the dataset they
    were encoded from) at the image tokenizer's resolution."""
    data = ml_collections.ConfigDict(model.bundle.transformer_config.data.to_dict())
    if data.source == "codes":
        data.source = SHAPES if data.name == SHAPES else "records"
        data.data_dir = None
    if data_dir is not None:
        data.data_dir = data_dir
    data.image_size = model.image_size
    return data


def image_tokenizer_metrics(model, data, split: str, *, batch_size: int = 128,
                            max_examples: int | None = None) -> dict[str, Any]:
    """PSNR of reconstructions through the codes (argmax / nearest, no noise), the
    fraction of the codebook used over the split and the codes' perplexity."""
    vocab = model.image_tokenizer.vocab_size
    counts = np.zeros((vocab,), np.int64)
    psnrs = []
    for batch in batches_lib.split_batches(data, split, batch_size, max_examples):
        real = batch["mask"]
        images = np.asarray(batch["image"])
        codes = model.encode(images)
        recon = model.decode(codes)
        mse = (((recon.astype(np.float64) - images) / 255.0) ** 2).reshape(len(images), -1)
        psnrs.extend(-10 * np.log10(np.maximum(mse.mean(-1)[real], 1e-10)))
        counts += np.bincount(codes[real].ravel(), minlength=vocab)
    probs = counts[counts > 0] / max(counts.sum(), 1)
    return {"split": split, "examples": len(psnrs), "psnr": float(np.mean(psnrs)),
            "codes_used": float((counts > 0).mean()),
            "perplexity": float(np.exp(-np.sum(probs * np.log(probs))))}


def transformer_metrics(model, data, split: str, *, batch_size: int = 128,
                        max_examples: int | None = None) -> dict[str, Any]:
    """Validation loss of the transformer (the run's weighting of text and image
    cross-entropies), each part, and bits per image token, over the split's real
    examples; captions without BPE-dropout, codes from the bundle's tokenizer."""
    config = model.bundle.transformer_config
    weights = config.stage2.text_loss_weight, config.stage2.image_loss_weight
    transformer = stage2.transformer_lib.Transformer(model.transformer.model_config)
    mesh = model.mesh
    rules = sharding_lib.logical_rules(config.sharding)

    @jax.jit
    def sums(params, text, codes, mask):
        """Each cross-entropy summed over its tokens, and their counts: the training
        loss's means (stage2.sequence_loss) times its token counts."""
        text_logits, image_logits = transformer.apply({"params": params}, text, codes)
        _, parts = stage2.sequence_loss(text_logits, image_logits, text, codes, mask,
                                        text_weight=weights[0], image_weight=weights[1])
        image_tokens = jnp.sum(mask) * codes.shape[1]
        return (parts["text_loss"] * parts["text_tokens"], parts["text_tokens"],
                parts["image_loss"] * image_tokens, image_tokens)

    totals = np.zeros(4)
    examples = 0
    shards = sharding_lib.batch_shard_count(mesh)
    for batch in batches_lib.split_batches(data, split, batch_size, max_examples,
                                           model.text_tokenizer):
        real = batch["mask"]
        codes = model.encode(np.asarray(batch["image"])).reshape(len(real), -1)
        text = np.asarray(batch["text_tokens"], np.int32)
        pad = -len(real) % shards
        arrays = [np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
                  for a in (text, codes, real.astype(np.float32))]
        placed = [jax.device_put(a, sharding_lib.batch_sharding(mesh)) for a in arrays]
        with jax.set_mesh(mesh), _rules(rules):
            totals += np.asarray([float(x) for x in sums(model.transformer.params, *placed)])
        examples += int(real.sum())
    text_loss = totals[0] / max(totals[1], 1.0)
    image_loss = totals[2] / max(totals[3], 1.0)
    return {"split": split, "examples": examples,
            "loss": float(weights[0] * text_loss + weights[1] * image_loss),
            "text_loss": float(text_loss), "image_loss": float(image_loss),
            "bits_per_image_token": float(image_loss / math.log(2.0)),
            "bits_per_image": float(image_loss / math.log(2.0) * codes.shape[1])}


def _rules(rules):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    return nn.logical_axis_rules(rules)


def split_prompts(data, split: str, count: int) -> list[str]:
    """The first ``count`` distinct captions of a split, in the dataset's order."""
    prompts, seen = [], set()
    for batch in batches_lib.split_batches(data, split, 256, None):
        for caption, real in zip(batch["caption"], batch["mask"]):
            caption = caption.decode() if isinstance(caption, bytes) else str(caption)
            if real and caption not in seen:
                seen.add(caption)
                prompts.append(caption)
                if len(prompts) == count:
                    return prompts
    return prompts


def fidelity(model, prompts: list[str], *, images_per_prompt: int, seed: int,
             candidates: int | None = None, batch_size: int | None = None,
             progress: bool = False, **settings: Any) -> dict[str, Any]:
    """Generates ``images_per_prompt`` images per prompt and judges each against its
    prompt from its pixels; returns the composite rates, the raw criterion rates and
    the per-image checks.

    With ``candidates`` = N (a bundle with a reranker), each prompt's images are the
    reranker's best of N; every candidate is judged too, so ``random_rates`` are the
    rates of a candidate picked at random (the mean over all N) on the same prompts and
    seed: fidelity without reranking, beside ``rates``, with it."""
    result = model.generate(prompts, images_per_prompt, seed=seed, batch_size=batch_size,
                            progress=progress, candidates=candidates,
                            keep_all=candidates is not None, **settings)
    images = result.images.reshape((-1,) + result.images.shape[2:])
    captions = [r["prompt"] for r in result.records]
    checks = image_checks(images, result.records)
    report = {"prompts": len(prompts), "images": len(checks),
              "rates": composite_rates(checks),
              "criteria": shapes_checker.score(images, captions),
              "checks": checks, "generation": result}
    if result.candidates is not None:
        drawn = result.candidates
        report["candidates"] = drawn.images.shape[1]
        report["random_rates"] = composite_rates(image_checks(
            drawn.images.reshape((-1,) + drawn.images.shape[2:]), drawn.records))
    return report


def upsampled_fidelity(model, prompts: list[str], *, images_per_prompt: int, seed: int,
                       batch_size: int | None = None, progress: bool = False,
                       upsample_steps: int | None = None,
                       upsample_t_start: float | None = None,
                       log: Callable[[str], None] = lambda _: None,
                       **settings: Any) -> dict[str, Any]:
    """The attribute checker's rates on generated images at the stage-1 size and after
    the bundle's upsampler (the same images), and the difference."""
    log(f"generating and upsampling {images_per_prompt} images for each of {len(prompts)} "
        "test prompts")
    result = model.generate(prompts, images_per_prompt, seed=seed, batch_size=batch_size,
                            progress=progress, upsample=True, upsample_steps=upsample_steps,
                            upsample_t_start=upsample_t_start, **settings)
    out: dict[str, Any] = {"prompts": len(prompts), "images": len(result.records),
                           "upsample_steps": result.records[0]["upsample"]["steps"]}
    for name, images in (("low_res", result.low_res), ("upsampled", result.images)):
        flat = images.reshape((-1,) + images.shape[2:])
        out[name] = {"image_size": int(flat.shape[1]),
                     "rates": composite_rates(image_checks(flat, result.records)),
                     "criteria": shapes_checker.score(flat, [r["prompt"] for r in
                                                             result.records])}
    out["timings"] = {k: round(v, 2) for k, v in result.timings.items()}
    return out


def evaluate(model, *, data_dir: str | None = None, stage_split: str = "validation",
             max_examples: int | None = None, test_prompts: int = 128,
             holdout_prompts: int = 64, images_per_prompt: int = 2, seed: int = 0,
             batch_size: int | None = None, progress: bool = True,
             candidates: int | None = None,
             rerank_prompts: int = 64, rerank_candidates: tuple[int, ...] = (8, 32),
             rerank_seeds: tuple[int, ...] = (0, 1, 2), reranker_examples: int = 1000,
             upsampler_examples: int = 256, upsample_prompts: int = 64,
             upsample_steps: int | None = None, upsample_t_start: float | None = None,
             variation_sources: int = 64, variations_per_source: int = 4,
             variation_etas: tuple[float, ...] = (0.0, 0.5, 1.0),
             unclip_prompts: int = 64, unclip_candidates: int = 4,
             decoder_guidance_scale: float | None = None,
             log: Callable[[str], None] = lambda _: None, **settings: Any) -> dict[str, Any]:
    """Every measure of the bundle ``model`` (a :class:`TextToImage`); the fidelity
    parts only for captioned shapes, each image the reranker's best of ``candidates``
    when given (with the rates of a random candidate beside). With a reranker in the
    bundle: its retrieval and
    zero-shot figures on ``stage_split`` (``reranker_examples`` pairs) and, for
    ``rerank_prompts`` test prompts, the fidelity of its top-1 of n candidates against a
    random one (:func:`dalle_jax.evaluation.contrastive.reranking_gain`). With an
    upsampler: :func:`dalle_jax.evaluation.upsampler.held_out` on
    ``upsampler_examples`` images of ``stage_split`` at its high resolution and, for
    ``upsample_prompts`` test prompts, the fidelity before and after it, with
    ``upsample_steps`` DDIM steps (the run's default by default). With unCLIP's decoder
    (captioned shapes): :func:`dalle_jax.evaluation.unclip.variations` of
    ``variation_sources`` images of ``stage_split``, over ``variation_etas``; with its
    prior too, :func:`unclip_fidelity` on ``unclip_prompts`` test prompts."""
    data = image_data_config(model, data_dir)
    report: dict[str, Any] = {"bundle": str(model.bundle.path),
                              "transformer_step": model.transformer.step,
                              "dataset": data.name, "image_size": model.image_size}
    start = time.perf_counter()
    log(f"stage 1 on {stage_split}")
    report["image_tokenizer"] = image_tokenizer_metrics(model, data, stage_split,
                                                        max_examples=max_examples)
    log(f"stage 2 on {stage_split}")
    report["transformer"] = transformer_metrics(model, data, stage_split,
                                                max_examples=max_examples)
    report["seconds"] = {"stages": round(time.perf_counter() - start, 1)}
    if data.name == SHAPES:
        report["settings"] = dict(model.settings(**settings).__dict__)
        report["fidelity"] = {}
        for split, count in (("test", test_prompts), ("holdout", holdout_prompts)):
            if count <= 0:
                continue
            start = time.perf_counter()
            prompts = split_prompts(data, split, count)
            log(f"generating {images_per_prompt} images for each of {len(prompts)} {split} "
                "prompts" + (f", the reranker's best of {candidates}" if candidates else ""))
            judged = fidelity(model, prompts, images_per_prompt=images_per_prompt, seed=seed,
                              candidates=candidates, batch_size=batch_size,
                              progress=progress, **settings)
            judged.pop("generation")
            report["fidelity"][split] = judged
            report["seconds"][f"fidelity_{split}"] = round(time.perf_counter() - start, 1)
    if model.reranker is not None:
        from dalle_jax.evaluation import contrastive  # pylint: disable=g-import-not-at-top
        start = time.perf_counter()
        log(f"reranker on {stage_split}")
        images, captions = contrastive.split_pairs(data, stage_split, reranker_examples)
        report["reranker"] = {"split": stage_split,
                              "retrieval": contrastive.retrieval(model.reranker, images,
                                                                 captions)}
        if data.name == SHAPES:
            report["reranker"]["zero_shot"] = contrastive.zero_shot(model.reranker, images,
                                                                    captions)
        report["seconds"]["reranker"] = round(time.perf_counter() - start, 1)
        if data.name == SHAPES and rerank_prompts > 0 and rerank_seeds:
            start = time.perf_counter()
            prompts = split_prompts(data, "test", rerank_prompts)
            report["reranking"] = contrastive.reranking_gain(
                model, prompts, candidates=rerank_candidates, seeds=rerank_seeds,
                batch_size=batch_size, progress=progress, log=log, **settings)
            report["seconds"]["reranking"] = round(time.perf_counter() - start, 1)
    if model.upsampler is not None:
        from dalle_jax.evaluation import contrastive  # pylint: disable=g-import-not-at-top
        from dalle_jax.evaluation import upsampler as upsampler_eval  # pylint: disable=g-import-not-at-top
        start = time.perf_counter()
        u_data = ml_collections.ConfigDict(model.upsampler.config.data.to_dict())
        if data_dir is not None:
            u_data.data_dir = data_dir
        log(f"upsampler on {upsampler_examples} {stage_split} images")
        images, _ = contrastive.split_pairs(u_data, stage_split, upsampler_examples)
        report["upsampler"] = {"split": stage_split, "held_out": upsampler_eval.held_out(
            model.upsampler, images, steps=upsample_steps, seed=seed,
            t_start=upsample_t_start)}
        if data.name == SHAPES and upsample_prompts > 0:
            report["upsampler"]["fidelity"] = upsampled_fidelity(
                model, split_prompts(data, "test", upsample_prompts),
                images_per_prompt=images_per_prompt, seed=seed, batch_size=batch_size,
                progress=progress, upsample_steps=upsample_steps,
                upsample_t_start=upsample_t_start, log=log, **settings)
        report["seconds"]["upsampler"] = round(time.perf_counter() - start, 1)
    if model.unclip_decoder is not None and data.name == SHAPES and variation_sources > 0:
        from dalle_jax.evaluation import contrastive  # pylint: disable=g-import-not-at-top
        from dalle_jax.evaluation import unclip as unclip_eval  # pylint: disable=g-import-not-at-top
        start = time.perf_counter()
        images, captions = contrastive.split_pairs(data, stage_split, variation_sources)
        reference_images, reference_captions = contrastive.split_pairs(
            data, stage_split, max(variation_sources, 2000))
        report["unclip_variations"] = {"split": stage_split, **unclip_eval.variations(
            model.unclip_decoder, images, captions, num_variations=variations_per_source,
            etas=variation_etas, inversion_etas=variation_etas, seed=seed, log=log,
            guidance_scale=decoder_guidance_scale,
            reference=unclip_eval.same_caption_distance(reference_images,
                                                        reference_captions))}
        report["seconds"]["unclip_variations"] = round(time.perf_counter() - start, 1)
    if (model.unclip_prior is not None and model.unclip_decoder is not None
            and data.name == SHAPES and unclip_prompts > 0):
        start = time.perf_counter()
        report["unclip_fidelity"] = unclip_fidelity(
            model, split_prompts(data, "test", unclip_prompts),
            images_per_prompt=images_per_prompt, seed=seed, candidates=unclip_candidates,
            batch_size=batch_size, progress=progress, log=log,
            decoder_guidance_scale=decoder_guidance_scale, **settings)
        report["seconds"]["unclip_fidelity"] = round(time.perf_counter() - start, 1)
    return report


def unclip_fidelity(model, prompts: list[str], *, images_per_prompt: int, seed: int,
                    candidates: int = 4, batch_size: int | None = None,
                    progress: bool = False, log: Callable[[str], None] = lambda _: None,
                    decoder_guidance_scale: float | None = None,
                    **settings: Any) -> dict[str, Any]:
    """The checker's rates of the two text → image paths on the same prompts and seed:
    DALL·E's transformer and unCLIP's prior + decoder, each without reranking and (with
    a reranker and ``candidates`` > ``images_per_prompt``) as the reranker's best
    ``images_per_prompt`` of ``candidates``."""
    out: dict[str, Any] = {"prompts": len(prompts), "images_per_prompt": images_per_prompt,
                           "candidates": candidates, "paths": {}}
    reranked = model.reranker is not None and candidates > images_per_prompt
    for path in ("dalle", "unclip"):
        log(f"fidelity of the {path} path on {len(prompts)} test prompts"
            + (f" (and the reranker's best of {candidates})" if reranked else ""))
        kwargs = settings if path == "dalle" else {
            "path": "unclip", "decoder_guidance_scale": decoder_guidance_scale}
        judged = fidelity(model, prompts, images_per_prompt=images_per_prompt, seed=seed,
                          candidates=candidates if reranked else None,
                          batch_size=batch_size, progress=progress, **kwargs)
        result = judged.pop("generation")
        entry = {"rates": judged["rates"], "criteria": judged["criteria"],
                 "seconds": {k: round(v, 2) for k, v in result.timings.items()}}
        if reranked:
            entry["random_rates"] = judged["random_rates"]
        out["paths"][path] = entry
    return out


def unclip_lines(report: dict[str, Any]) -> list[str]:
    """The side-by-side table of :func:`unclip_fidelity`."""
    paths = report["paths"]
    columns = []
    for path, entry in paths.items():
        if "random_rates" in entry:
            columns += [(f"{path} any", entry["random_rates"]),
                        (f"{path} best", entry["rates"])]
        else:
            columns.append((path, entry["rates"]))
    lines = [f"text -> image paths on {report['prompts']} test prompts x "
             f"{report['images_per_prompt']} ('best': the reranker's best of "
             f"{report['candidates']}, 'any': a random candidate)",
             "  " + " " * 32 + "  ".join(f"{name:>11}" for name, _ in columns)]
    for label, kind, name in (("one object: colour + cell", "one_object", "colour_cell"),
                              ("one object: shape", "one_object", "shape"),
                              ("two objects: colours + relation", "two_objects",
                               "colours_relation")):
        lines.append(f"  {label:<32}" + "  ".join(f"{_pct(rates[kind][name]):>11}"
                                                  for _, rates in columns))
    return lines


def _pct(x: float) -> str:
    return "  n/a" if x != x else f"{100 * x:5.1f}%"


def table(report: dict[str, Any]) -> str:
    """The headline figures of :func:`evaluate`'s report as a short text table."""
    s1, s2 = report["image_tokenizer"], report["transformer"]
    lines = [
        f"stage 1 ({s1['split']}, {s1['examples']} images): PSNR {s1['psnr']:.2f} dB, "
        f"codes used {_pct(s1['codes_used']).strip()}, perplexity {s1['perplexity']:.0f}",
        f"stage 2 ({s2['split']}, {s2['examples']} captions): loss {s2['loss']:.4f}, "
        f"image {s2['image_loss']:.4f} nats/token = {s2['bits_per_image_token']:.3f} "
        f"bits/token, text {s2['text_loss']:.4f}",
    ]
    fid = report.get("fidelity", {})
    columns = []  # reranked splits: a random candidate's rates beside the best's
    for split, judged in fid.items():
        if "random_rates" in judged:
            columns.append((f"{split} any", judged["random_rates"]))
            columns.append((f"{split} best", judged["rates"]))
        else:
            columns.append((split, judged["rates"]))
    if columns:
        reranked = [j for j in fid.values() if "random_rates" in j]
        if reranked:
            lines.append(f"fidelity judged from pixels; 'best': the reranker's best of "
                         f"{reranked[0]['candidates']}, 'any': a random candidate")
        lines.append("fidelity (judged from pixels)     " + "  ".join(
            f"{name:>8}" for name, _ in columns))
        rows = [("one object: colour", "one_object", "colour"),
                ("one object: colour + cell", "one_object", "colour_cell"),
                ("one object: shape", "one_object", "shape"),
                ("one object: everything", "one_object", "all"),
                ("two objects: colours", "two_objects", "colours"),
                ("two objects: colours + relation", "two_objects", "colours_relation"),
                ("two objects: shapes", "two_objects", "shapes"),
                ("two objects: everything", "two_objects", "all")]
        for label, kind, name in rows:
            lines.append(f"  {label:<32}" + "  ".join(
                f"{_pct(rates[kind][name]):>8}" for _, rates in columns))
        lines.append(f"  {'images (one / two objects)':<32}" + "  ".join(
            f"{rates['one_object']['images']:>3} /{rates['two_objects']['images']:>3}"
            for _, rates in columns))
    from dalle_jax.evaluation import contrastive  # pylint: disable=g-import-not-at-top
    if report.get("reranker"):
        r = report["reranker"]
        lines += contrastive.reranker_lines(r["split"], r["retrieval"], r.get("zero_shot"))
    if report.get("reranking"):
        lines.append(contrastive.gain_table(report["reranking"]))
    if report.get("upsampler"):
        from dalle_jax.evaluation import upsampler as upsampler_eval  # pylint: disable=g-import-not-at-top
        lines += upsampler_eval.report_lines(report["upsampler"])
    if report.get("unclip_variations"):
        from dalle_jax.evaluation import unclip as unclip_eval  # pylint: disable=g-import-not-at-top
        lines += unclip_eval.report_lines(report["unclip_variations"])
    if report.get("unclip_fidelity"):
        lines += unclip_lines(report["unclip_fidelity"])
    return "\n".join(lines)
