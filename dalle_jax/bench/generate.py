"""Generation: the text-to-image path end to end against the sampler alone, and the
demo's time per stage.

Measured on one bundle (a given one, or random weights at the demo's sizes: the cost
does not depend on the weights), on this host's devices:

- the sampler alone: one batch of code grids (prefill + KV-cached decode, with the
  bundle's guidance), images/s;
- the decoder alone: the same batch of codes to pixels;
- ``TextToImage.generate`` as the generate command runs it: prompts × images in
  batches, decoded and written as PNGs, images/s (warm);
- the generate command as a fresh process: wall time from start to exit (imports,
  loading, compilation, sampling, PNGs, grids, records) and the images/s it reports;
- reranking: the reranker scoring one batch of decoded images against the sampler
  drawing it (the cost of every candidate), and a reranked request of N candidates per
  kept image as the generate command runs it;
- the demo's stages, read from the report ``make demo`` writes (``demo_report.json``),
  and the gain from reranking its evaluation measured (``evaluation.json``): the
  fidelity of the reranker's top-1 of 8 and of 32 candidates against a random one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from dalle_jax.bench import record
from dalle_jax.data import shapes
from dalle_jax.data import text_tokenizer as text_tokenizer_lib
from dalle_jax.inference import bundle as bundle_lib
from dalle_jax.inference import outputs
from dalle_jax.models import contrastive as contrastive_lib
from dalle_jax.models import image_tokenizers
from dalle_jax.models import transformer as transformer_lib
from dalle_jax.sampling import sampler as sampler_lib
from dalle_jax.stages import contrastive as stage_c
from dalle_jax.stages import image_tokenizer as stage1
from dalle_jax.stages import transformer as stage2


def summary(config: ml_collections.ConfigDict) -> str:
    b = config.bench
    source = config.bundle or "random weights at the demo's sizes"
    return (f"{source}; batch {b.batch_size}, {b.prompts} prompts x {b.images_per_prompt} "
            f"images, medians of {b.repeats}")


def random_bundle(config: ml_collections.ConfigDict, path: str, workdir: str) -> str:
    """A bundle of the demo's models with random weights and a caption tokenizer trained
    on rendered captions."""
    demo = config.demo
    s1 = ml_collections.ConfigDict(demo.image_tokenizer.to_dict())
    s1.data.image_size = demo.data.image_size
    s2 = ml_collections.ConfigDict(demo.transformer.to_dict())
    s2.text = ml_collections.ConfigDict(demo.text.to_dict())
    captions = [shapes.split_scene("train", i, image_size=demo.data.image_size).caption
                for i in range(2_000)]
    text_file = os.path.join(workdir, "text_tokenizer.model")
    text_tokenizer_lib.train_text_tokenizer(captions, text_file,
                                            vocab_size=s2.text.vocab_size,
                                            model_type=s2.text.model_type)
    sr = ml_collections.ConfigDict(demo.reranker.to_dict())
    sr.data.image_size = demo.data.image_size
    sr.text = ml_collections.ConfigDict(demo.text.to_dict())
    model = transformer_lib.Transformer(stage2.model_config(s2))
    unbox = nn.meta.unbox
    params = unbox(jax.jit(lambda k: stage2.init_variables(model, k))(
        jax.random.key(0)))["params"]
    tokenizer = image_tokenizers.from_config(s1.model)
    variables = unbox(jax.jit(lambda k: stage1.init_variables(
        tokenizer, s1.data.image_size, k))(jax.random.key(1)))
    reranker = contrastive_lib.ContrastiveModel(stage_c.model_config(sr))
    reranker_params = unbox(jax.jit(lambda k: stage_c.init_variables(reranker, k))(
        jax.random.key(2)))["params"]
    bundle_lib.write(path, transformer_config=s2, transformer_params=params,
                     image_tokenizer_config=bundle_lib.image_tokenizer_config(s1),
                     image_tokenizer_variables=variables, text_tokenizer_file=text_file,
                     reranker=bundle_lib.RerankerPart(sr, reranker_params, text_file),
                     sources={"transformer": {"run": "random", "step": 0, "ema": False},
                              "image_tokenizer": {"run": "random", "step": 0,
                                                  "kind": s1.model.kind},
                              "reranker": {"run": "random", "step": 0}})
    return path


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """The median wall time of ``fn()`` (waited for) over ``repeats`` calls, and every
    time."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _demo_figures(path: str) -> tuple[list[dict], dict]:
    if not os.path.exists(path):
        return [record.figure("demo: whole job (make demo)", None, "s", at_most=1_200,
                              note=f"no {path}: run make demo first")], {}
    with open(path) as f:
        report = json.load(f)
    stages = report.get("stages", {})
    figures = [record.figure(f"demo stage: {name}", stage.get("seconds"), "s")
               for name, stage in stages.items()]
    figures.append(record.figure("demo: whole job (make demo)", report.get("total_seconds"),
                                 "s", at_most=1_200, note="sum of the stages' last runs"))
    return figures, report


# The reranking gains worth a line of the page: (kind/composite, label).
GAIN_ROWS = (("one_object/colour_cell", "one object: colour + cell"),
             ("one_object/shape", "one object: shape"),
             ("two_objects/colours_relation", "two objects: colours + relation"))


def _gain_figures(path: str) -> tuple[list[dict], dict]:
    """The demo evaluation's reranking gain: top-1 of n against a random candidate."""
    missing = [record.figure("reranking gain (demo): one object colour + cell, top-1 of 8 "
                             "vs random", None, "points",
                             note=f"no reranking in {path}: run make demo first")]
    if not os.path.exists(path):
        return missing, {}
    with open(path) as f:
        gain = json.load(f).get("reranking")
    if not gain:
        return missing, {}
    figures = []
    seeds = len(gain["seeds"])
    for key, label in GAIN_ROWS:
        for n in gain["candidates"]:
            top = gain["figures"].get(f"{key}/top1_of_{n}")
            rand = gain["figures"].get(f"{key}/random_of_{n}")
            if not top or not rand:
                continue
            spread = max(top["std"], rand["std"])
            figures.append(record.figure(
                f"reranking gain (demo): {label}, top-1 of {n} vs random",
                100 * (top["mean"] - rand["mean"]), "points",
                note=f"{100 * rand['mean']:.1f}% -> {100 * top['mean']:.1f}%; spread over "
                     f"{seeds} seeds ±{100 * spread:.1f} points; {gain['prompts']} prompts"))
    return figures, gain


def measure(config: ml_collections.ConfigDict, *, workdir: str,
            log: Callable[[str], Any] = print) -> dict[str, Any]:
    from dalle_jax.inference.text_to_image import TextToImage  # pylint: disable=g-import-not-at-top
    os.makedirs(workdir, exist_ok=True)
    b = config.bench
    path = config.bundle
    if not path:
        log("writing a random-weight bundle at the demo's sizes")
        path = random_bundle(config, os.path.join(workdir, "bundle"), workdir)
    model = TextToImage.load(path)
    prompts = [shapes.split_scene("test", i, image_size=model.image_size).caption
               for i in range(b.prompts)]
    settings = model.settings()
    batch = min(b.batch_size, b.prompts * b.images_per_prompt)
    tokens, _ = model.tokenize(prompts)
    text = np.resize(tokens, (batch, tokens.shape[1]))
    keys = sampler_lib.row_keys(0, batch)

    log(f"sampler alone, batch {batch}")
    sample = lambda: model.sampler.sample(text, keys=keys, settings=settings)
    codes = sample()  # compile
    sample_s, sample_all = median_time(sample, b.repeats)
    log("decoder alone")
    model.decode(codes)
    decode_s, _ = median_time(lambda: model.decode(codes), b.repeats)

    total = b.prompts * b.images_per_prompt
    out = os.path.join(workdir, "generated")
    names = outputs.prompt_names(prompts)

    def generate():
        shutil.rmtree(out, ignore_errors=True)
        return model.generate(prompts, b.images_per_prompt, seed=0, batch_size=batch,
                              on_batch=lambda rows, images: outputs.save_images(
                                  out, names, rows, images, b.images_per_prompt)).images

    log(f"generate with PNGs, {total} images")
    generate()
    generate_s, _ = median_time(generate, b.repeats)

    score_s = rerank_s = None
    if model.reranker is not None:
        log(f"reranker scoring a batch of {batch}")
        images = model.decode(codes)
        captions = [prompts[i % len(prompts)] for i in range(batch)]
        model.reranker.scores(images, captions)  # compile
        score_s, _ = median_time(lambda: model.reranker.scores(images, captions), b.repeats)
        log(f"a reranked request: {b.prompts} prompts, the best 1 of {b.candidates}")
        rerank = lambda: model.generate(prompts, 1, seed=0, batch_size=batch,
                                        candidates=b.candidates).images
        rerank()
        rerank_s, _ = median_time(rerank, b.repeats)

    cli_wall = cli_rate = None
    if b.cli:
        log("the generate command as a fresh process")
        cmd = [sys.executable, "-m", "dalle_jax.tools.generate", f"--bundle={path}",
               *[f"--prompt={p}" for p in prompts], f"--num_images={b.images_per_prompt}",
               f"--batch_size={batch}", f"--output={os.path.join(workdir, 'cli')}"]
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1_800)
        cli_wall = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"generate command failed: {result.stderr[-500:]}")
        found = re.search(r"\(([0-9.]+) images drawn/s", result.stdout)
        cli_rate = float(found.group(1)) if found else None

    demo_figures, demo_report = _demo_figures(config.demo_report)
    gain_figures, gain = _gain_figures(config.demo_evaluation)
    sampler_rate = batch / sample_s
    generate_rate = total / generate_s
    figures = [
        record.figure(f"sampler alone, batch {batch}", sampler_rate, "images/s",
                      note=f"{sample_s * 1e3:.0f} ms per batch, guidance "
                           f"{settings.guidance_scale:g}"),
        record.figure(f"decode to pixels, batch {batch}", batch / decode_s, "images/s",
                      note=f"{decode_s * 1e3:.0f} ms per batch"),
        record.figure(f"generate with PNGs ({total} images, batch {batch})", generate_rate,
                      "images/s", note=f"{generate_s:.2f} s; "
                                       f"{generate_rate / sampler_rate:.2f}x the sampler's rate"),
        record.figure("generate command: images/s it reports (after loading)", cli_rate,
                      "images/s",
                      note="includes its first batch's compilation" if cli_rate else
                      "not run (bench.cli=False)"),
        record.figure(f"generate command: wall time, start to exit ({total} images)",
                      cli_wall, "s", note="imports, loading, compiling, sampling, PNGs, "
                                          "grids and records"),
        record.figure(f"reranker scoring, batch {batch}",
                      batch / score_s if score_s else None, "images/s",
                      note=(f"{score_s * 1e3:.0f} ms per batch: {score_s / sample_s:.3f}x "
                            "the time the sampler takes to draw it") if score_s
                      else "the bundle has no reranker"),
        record.figure(f"reranked generate: best 1 of {b.candidates}, {b.prompts} prompts",
                      b.prompts * b.candidates / rerank_s if rerank_s else None,
                      "candidates/s",
                      note=f"{rerank_s:.2f} s" if rerank_s else "the bundle has no reranker"),
        *demo_figures,
        *gain_figures,
    ]
    return {
        "figures": figures,
        "details": {"bundle": path, "batch": batch, "images": total,
                    "sample_s": sample_all, "decode_s": decode_s, "generate_s": generate_s,
                    "cli_wall_s": cli_wall, "score_s": score_s, "rerank_s": rerank_s,
                    "demo_report": demo_report, "reranking_gain": gain},
        "machine": {},
    }
