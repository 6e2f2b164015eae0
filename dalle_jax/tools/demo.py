r"""The main job on the embedded default, text → image, end to end.

  python -m dalle_jax.tools.demo --config=configs/demo.py --workdir=runs/demo

Stages, each skipped when its output is complete (rerun after an interruption and it
continues where it stopped; a training stage resumes from its latest checkpoint):

  1. dataset          captioned shapes, built under <workdir>/tfds (or data.data_dir)
  2. text tokenizer   <workdir>/text_tokenizer.model, and a grid of training examples
  3. stage 1          the image tokenizer, <workdir>/image_tokenizer
  4. encode           the dataset as code shards, <workdir>/codes
  5. stage 2          the transformer, <workdir>/transformer
  6. reranker         the contrastive text–image model, <workdir>/reranker
  7. export           the inference bundle, with the reranker, <workdir>/bundle
  8. generate         images for the demo prompts, each the reranker's best of several
                      candidates, <workdir>/samples and demo_grid.png
  9. evaluate         both stages, the reranker, and generated images judged from their
                      pixels with and without reranking, <workdir>/evaluation.json

With configs/demo.py:upsample (``make demo-upsample``) two stages come before the
export: the dataset rendered at 4x the size, and the 4x diffusion upsampler trained on
it (<workdir>/upsampler); the bundle then carries it, the demo's images are upsampled
(upsample_grid.png shows stage 1, bicubic and diffusion side by side) and the evaluation
measures it.

The time of each stage is kept in <workdir>/demo_report.json.
"""
from __future__ import annotations

import json
import os
import signal as signal_lib
import time
from typing import Callable

from absl import flags
from etils import epath
import ml_collections

from dalle_jax import config as config_lib
from dalle_jax import files
from dalle_jax import signals

config_lib.define_flags()

REPORT = "demo_report.json"


# --------------------------------------------------------------------------- layout


def stage_configs(config: ml_collections.ConfigDict, workdir: str):
    """The stage-1, stage-2 and reranker configs as the demo runs them: the demo's
    dataset, caption tokenizer and seed, stage 2 reading the code shards of stage 1."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    if not data.data_dir:
        data.data_dir = os.path.join(workdir, "tfds")
    text = ml_collections.ConfigDict(config.text.to_dict())
    if not text.tokenizer_path:
        text.tokenizer_path = os.path.join(workdir, "text_tokenizer.model")

    s1 = ml_collections.ConfigDict(config.image_tokenizer.to_dict())
    s1.data = ml_collections.ConfigDict(data.to_dict())
    s1.seed = config.seed
    s1.encode.output_dir = os.path.join(workdir, "codes")

    s2 = ml_collections.ConfigDict(config.transformer.to_dict())
    s2.data = ml_collections.ConfigDict(data.to_dict())
    s2.data.update(source="codes", data_dir=s1.encode.output_dir)
    s2.text = text
    s2.seed = config.seed
    s2.stage2.image_tokenizer = os.path.join(workdir, "image_tokenizer")

    reranker = ml_collections.ConfigDict(config.reranker.to_dict())
    reranker.data = ml_collections.ConfigDict(data.to_dict())
    reranker.text = ml_collections.ConfigDict(text.to_dict())
    reranker.seed = config.seed
    return data, text, s1, s2, reranker


def upsampler_config(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
                     s1_dir: str) -> ml_collections.ConfigDict | None:
    """The upsampler's config as the demo runs it (configs/demo.py:upsample): the demo's
    dataset at ``factor`` times its size, round trips through the demo's stage 1."""
    if "upsampler" not in config:
        return None
    su = ml_collections.ConfigDict(config.upsampler.to_dict())
    su.data = ml_collections.ConfigDict(data.to_dict())
    su.data.image_size = data.image_size * su.upsampler.factor
    su.seed = config.seed
    su.upsampler.image_tokenizer_run = s1_dir
    return su


def finished_step(run: str) -> int | None:
    """The latest committed checkpoint step of a training run, or None."""
    directory = epath.Path(run) / "checkpoints"
    if not directory.exists():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    return max(steps) if steps else None


class Report:
    """Per-stage times, kept across reruns in <workdir>/demo_report.json."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, REPORT)
        self.stages: dict[str, dict] = {}
        if os.path.exists(self.path):
            try:
                self.stages = json.loads(open(self.path).read()).get("stages", {})
            except (json.JSONDecodeError, AttributeError):
                self.stages = {}

    def record(self, name: str, seconds: float, skipped: bool, **extra) -> None:
        entry = self.stages.get(name, {})
        if skipped:
            entry.update(skipped_last=True)
        else:
            entry = {"seconds": round(seconds, 1), "skipped_last": False, **extra}
        self.stages[name] = entry
        total = sum(s.get("seconds", 0.0) for s in self.stages.values())
        files.atomic_write(self.path, json.dumps(
            {"stages": self.stages, "total_seconds": round(total, 1)}, indent=2) + "\n")


def run_stage(report: Report, index: int, count: int, name: str, title: str,
              done: Callable[[], str | None], work: Callable[[], str | None]) -> None:
    """Prints a header, skips the stage when ``done()`` says why it is complete, else
    runs ``work()``; raises ``signals.Stop`` when a stop signal arrived meanwhile."""
    print(f"\n== [{index}/{count}] {title} ==", flush=True)
    reason = done()
    if reason:
        print(f"   done already: {reason}", flush=True)
        report.record(name, 0.0, True)
        return
    start = time.perf_counter()
    summary = work()
    if signals.requested():  # a training stage saved its step and returned
        raise signals.Stop(getattr(signal_lib, signals.requested()))
    seconds = time.perf_counter() - start
    report.record(name, seconds, False)
    print(f"   {summary + ' ' if summary else ''}({seconds:.0f}s)", flush=True)


# --------------------------------------------------------------------------- stages


def examples_grid(data, tokenizer, seed: int, path: str) -> None:
    """A grid of training examples with their captions and token counts."""
    from dalle_jax import visualize  # pylint: disable=g-import-not-at-top
    from dalle_jax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
    from dalle_jax.data import sources  # pylint: disable=g-import-not-at-top
    from dalle_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
    with pipeline_lib.InputPipeline(
            sources.make_source(data, "train"), batch_size=24, image_size=data.image_size,
            preprocess=data.preprocess, text_tokenizer=tokenizer, train=True, seed=seed,
            shuffle_buffer=data.shuffle_buffer, with_captions=True, process_index=0,
            process_count=1) as pipeline:
        batch = next(pipeline)
    visualize.save_png(visualize.examples_grid(batch, cols=6, pad_id=text_tokenizer.PAD_ID),
                       path)


def encode(s1: ml_collections.ConfigDict, run: str) -> str:
    """Every split as code shards (finished shards are kept), then each split's
    metadata."""
    import dataclasses  # pylint: disable=g-import-not-at-top
    from dalle_jax.inference.image_tokenizer import ImageTokenizerRun  # pylint: disable=g-import-not-at-top
    from dalle_jax.data import encoding  # pylint: disable=g-import-not-at-top
    tokenizer = dataclasses.replace(ImageTokenizerRun.load(run),
                                    encode_chunk_size=s1.encode.chunk_size)
    total = encoding.encode_splits(tokenizer, s1, run, report=lambda line: None)
    return f"{total} examples -> {s1.encode.output_dir}"


def generate(model, prompts: list[str], count: int, candidates: int, seed: int, output: str,
             grid_path: str, upsample: bool = False) -> str:
    """The demo prompts' images (each the reranker's best of ``candidates``), grids and
    records, and the demo grid (a row per prompt). With ``upsample``, the images are the
    bundle's upsampler's, and upsample_grid.png beside the demo grid compares stage 1,
    bicubic and diffusion for each prompt's first image."""
    from dalle_jax import visualize  # pylint: disable=g-import-not-at-top
    from dalle_jax.inference import outputs  # pylint: disable=g-import-not-at-top
    result = model.generate(prompts, count, seed=seed, progress=True,
                            candidates=max(candidates, count), upsample=upsample)
    outputs.save_all(output, result)
    cell = 48 if result.low_res is None else 96
    grid = visualize.prompt_rows(result.images, prompts, cell_size=cell, label_width=190)
    visualize.save_png(grid, grid_path)
    done = f"-> {grid_path}, images in {output}"
    if result.low_res is not None:
        path = os.path.join(os.path.dirname(grid_path), UPSAMPLE_GRID)
        visualize.save_png(upsample_comparison(result, model.upsampler.factor), path)
        done += f", stage 1 / bicubic / diffusion in {path}"
    return done


UPSAMPLE_GRID = "upsample_grid.png"


def upsample_comparison(result, factor: int):
    """A row per prompt: its first image at the stage-1 size (enlarged, nearest
    neighbour), bicubic and the diffusion upsampler."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from dalle_jax import visualize  # pylint: disable=g-import-not-at-top
    from dalle_jax.evaluation import upsampler as upsampler_eval  # pylint: disable=g-import-not-at-top
    low = result.low_res[:, 0]
    nearest = np.repeat(np.repeat(low, factor, axis=1), factor, axis=2)
    rows = np.stack([nearest, upsampler_eval.bicubic(low, factor), result.images[:, 0]], 1)
    size = result.images.shape[2]
    labels = [f"{p}\n(stage 1 {low.shape[1]} px | bicubic | diffusion {size} px)"
              for p in result.prompts]
    return visualize.prompt_rows(rows, labels, cell_size=size, label_width=190)



def main(argv):
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir  # checked (dalle_jax.validate)
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)  # orbax takes absolute paths only
    os.makedirs(workdir, exist_ok=True)
    config_lib.write_config(config, workdir)
    data, text, s1, s2, sr = stage_configs(config, workdir)
    su = upsampler_config(config, data, s2.stage2.image_tokenizer)
    from dalle_jax import errors  # pylint: disable=g-import-not-at-top
    from dalle_jax import validate  # pylint: disable=g-import-not-at-top
    stages = [("image_tokenizer", s1), ("transformer", s2), ("reranker", sr)]
    for section, stage in stages + ([("upsampler", su)] if su is not None else []):
        try:  # the training job's rules, before any stage starts
            validate.check_config("train", stage)
        except errors.UserError as e:
            raise errors.UserError(str(e).replace("config.", f"config.{section}.", 1)) from None
    s1_dir, s2_dir = s2.stage2.image_tokenizer, os.path.join(workdir, "transformer")
    sr_dir = os.path.join(workdir, "reranker")
    su_dir = os.path.join(workdir, "upsampler")
    bundle_dir = os.path.join(workdir, "bundle")
    samples_dir = os.path.join(workdir, "samples")
    grid_path = os.path.join(workdir, "demo_grid.png")
    eval_path = os.path.join(workdir, "evaluation.json")
    report = Report(workdir)
    start = time.perf_counter()
    count = 9 if su is None else 11

    from dalle_jax.data import sources  # pylint: disable=g-import-not-at-top
    splits = ("train", "validation", "test", "holdout")

    def build_dataset():
        sizes = [sum(n for _, n in sources.make_source(data, s).files()) for s in splits]
        return ", ".join(f"{s} {n}" for s, n in zip(splits, sizes)) + " examples"

    def built():
        if data.source != "captioned_shapes":
            return None
        from dalle_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top
        name = shapes_tfds.config_name(
            data.image_size, data.num_train, data.num_validation, data.num_test,
            data.num_holdout, tuple(tuple(p) for p in data.holdout_pairs), data.dataset_seed)
        folder = epath.Path(data.data_dir) / "captioned_shapes" / name
        prepared = folder.exists() and any(
            (v / "dataset_info.json").exists() for v in folder.iterdir())
        return str(folder) if prepared else None

    run_stage(report, 1, count, "dataset",
              f"dataset: captioned shapes at {data.image_size} px in {data.data_dir}",
              built, build_dataset)

    from dalle_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top

    def train_text():
        tokenizer = text_tokenizer.train_or_load_text_tokenizer(
            text, workdir, sources.iter_captions(sources.make_source(data, "train")))
        examples_grid(data, tokenizer, config.seed,
                                 os.path.join(workdir, "examples.png"))
        return (f"{tokenizer.vocab_size} pieces -> {text.tokenizer_path}; training "
                f"examples in {workdir}/examples.png")

    run_stage(report, 2, count, "text_tokenizer", "caption tokenizer (BPE)",
              lambda: text.tokenizer_path if os.path.exists(text.tokenizer_path) else None,
              train_text)

    from dalle_jax.train import trainer  # pylint: disable=g-import-not-at-top

    def trained(run, total):
        step = finished_step(run)
        return f"{run} at step {step}" if step is not None and step >= total else None

    def train(stage_config, run):
        def work():
            trainer.train_and_evaluate(stage_config, run)
            return f"-> {run}"
        return work

    m = s1.model
    run_stage(report, 3, count, "stage1",
              f"stage 1: image tokenizer ({m.kind}, {data.image_size} px -> codes of "
              f"{m.vocab_size}), {s1.total_steps} steps",
              lambda: trained(s1_dir, s1.total_steps), train(s1, s1_dir))

    from dalle_jax.data import code_records  # pylint: disable=g-import-not-at-top

    def encoded():
        try:
            metadata = [code_records.read_metadata(s1.encode.output_dir, data.name, s)
                        for s in s1.encode.splits]
        except FileNotFoundError:
            return None
        if any(m.get("tokenizer_step") != s1.total_steps for m in metadata):
            return None
        return f"{sum(m['num_examples'] for m in metadata)} examples in {s1.encode.output_dir}"

    run_stage(report, 4, count, "encode", "encode the dataset with stage 1",
              encoded, lambda: encode(s1, s1_dir))

    mm = s2.model
    run_stage(report, 5, count, "stage2",
              f"stage 2: transformer ({mm.num_layers} layers, d = "
              f"{mm.num_heads * mm.head_dim}) over [{s2.text.text_len} caption tokens | "
              f"{mm.image_grid[0]}x{mm.image_grid[1]} codes], {s2.total_steps} steps",
              lambda: trained(s2_dir, s2.total_steps), train(s2, s2_dir))

    mr = sr.model
    run_stage(report, 6, count, "reranker",
              f"reranker: contrastive model ({sr.contrastive.loss} loss, image tower "
              f"{'/'.join(str(w) for w in mr.image_widths)}, text tower {mr.text_layers} "
              f"layers, {mr.embed_dim}-d), {sr.total_steps} steps",
              lambda: trained(sr_dir, sr.total_steps), train(sr, sr_dir))

    index = 7
    if su is not None:
        high = su.data

        def high_built():
            from dalle_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top
            name = shapes_tfds.config_name(
                high.image_size, high.num_train, high.num_validation, high.num_test,
                high.num_holdout, tuple(tuple(p) for p in high.holdout_pairs),
                high.dataset_seed)
            folder = epath.Path(high.data_dir) / "captioned_shapes" / name
            prepared = folder.exists() and any(
                (v / "dataset_info.json").exists() for v in folder.iterdir())
            return str(folder) if prepared else None

        def build_high():
            sizes = [sum(n for _, n in sources.make_source(high, s).files()) for s in splits]
            return ", ".join(f"{s} {n}" for s, n in zip(splits, sizes)) + " examples"

        run_stage(report, 7, count, "dataset_upsampler",
                  f"dataset for the upsampler: captioned shapes at {high.image_size} px",
                  high_built, build_high)
        mu = su.model
        run_stage(report, 8, count, "upsampler",
                  f"upsampler: diffusion U-Net (widths "
                  f"{'/'.join(str(mu.base_width * m) for m in mu.channel_mult)}), "
                  f"{data.image_size} -> {high.image_size} px on {su.upsampler.crop_size} px "
                  f"crops, {su.total_steps} steps",
                  lambda: trained(su_dir, su.total_steps), train(su, su_dir))
        index = 9

    from dalle_jax.inference import bundle as bundle_lib  # pylint: disable=g-import-not-at-top

    def exported():
        try:
            manifest = bundle_lib.verify(bundle_dir)
        except bundle_lib.BundleError:
            return None
        parts = manifest["parts"]
        step = parts["transformer"]["source"]["step"]
        reranker_step = parts.get("reranker", {}).get("source", {}).get("step")
        upsampler_step = parts.get("upsampler", {}).get("source", {}).get("step")
        if su is not None and upsampler_step != su.total_steps:
            return None
        if su is None and upsampler_step is not None:
            return None
        if step == s2.total_steps and reranker_step == sr.total_steps:
            return f"{bundle_dir} (step {step}, reranker step {reranker_step})"
        return None

    def export():
        result = bundle_lib.export(s2_dir, bundle_dir, reranker=sr_dir,
                                   upsampler=su_dir if su is not None else None,
                                   overwrite=True)
        optional = "reranker" + (" and upsampler" if su is not None else "")
        return (f"-> {bundle_dir}: {result.bundle_bytes / 1e6:.1f} MB (reranker "
                f"{result.part_bytes['reranker'] / 1e6:.1f} MB"
                + (f", upsampler {result.part_bytes['upsampler'] / 1e6:.1f} MB"
                   if su is not None else "") + f"); without the {optional} "
                f"{result.generation_bytes / result.checkpoint_bytes:.2f}x the "
                "transformer's training checkpoint")

    run_stage(report, index, count, "export", "export the inference bundle", exported, export)

    demo = config.demo
    model_box = {}

    def model():
        if "model" not in model_box:
            from dalle_jax.inference import text_to_image  # pylint: disable=g-import-not-at-top
            model_box["model"] = text_to_image.TextToImage.load(bundle_dir)
        return model_box["model"]

    def newer_than_bundle(path):
        manifest = os.path.join(bundle_dir, bundle_lib.MANIFEST)
        return (os.path.exists(path) and os.path.exists(manifest)
                and os.path.getmtime(path) >= os.path.getmtime(manifest))

    run_stage(report, index + 1, count, "generate",
              f"generate {demo.images_per_prompt} images for each of {len(demo.prompts)} "
              f"prompts, the reranker's best of {demo.candidates}"
              + (", upsampled 4x" if su is not None else ""),
              lambda: grid_path if newer_than_bundle(grid_path) else None,
              lambda: generate(model(), list(demo.prompts), demo.images_per_prompt,
                               demo.candidates, demo.seed, samples_dir, grid_path,
                               upsample=su is not None))

    def evaluate():
        from dalle_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
        result = evaluate_lib.evaluate(
            model(), data_dir=data.data_dir, test_prompts=demo.test_prompts,
            holdout_prompts=demo.holdout_prompts,
            images_per_prompt=demo.eval_images_per_prompt, seed=demo.seed,
            candidates=max(demo.candidates, demo.eval_images_per_prompt),
            rerank_prompts=demo.rerank_prompts,
            rerank_candidates=tuple(demo.rerank_candidates),
            rerank_seeds=tuple(range(demo.seed, demo.seed + demo.rerank_seeds)),
            reranker_examples=demo.reranker_examples, log=print,
            **({"upsampler_examples": demo.upsampler_examples,
                "upsample_prompts": demo.upsample_prompts} if su is not None else {}))
        files.atomic_write(eval_path, json.dumps(result, indent=1) + "\n")
        return f"-> {eval_path}"

    run_stage(report, index + 2, count, "evaluate",
              f"evaluate (stage 1 and 2 and the reranker on validation; "
              f"{demo.test_prompts} test and {demo.holdout_prompts} holdout prompts x "
              f"{demo.eval_images_per_prompt} images, each the best of {demo.candidates}, "
              f"judged from pixels; reranking: "
              f"{demo.rerank_prompts} prompts x {max(demo.rerank_candidates)} candidates "
              f"x {demo.rerank_seeds} seeds"
              + (f"; the upsampler on {demo.upsampler_examples} validation images and "
                 f"{demo.upsample_prompts} test prompts" if su is not None else "") + ")",
              lambda: eval_path if newer_than_bundle(eval_path) else None, evaluate)

    from dalle_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
    print()
    print(evaluate_lib.table(json.loads(open(eval_path).read())))
    print(f"\ndemo done in {time.perf_counter() - start:.0f}s (this run; per stage: "
          f"{report.path})")
    print(f"grid: {grid_path}\nimages: {samples_dir}\nscores: {eval_path}\n"
          f"bundle: {bundle_dir}  (python -m dalle_jax.tools.generate --bundle={bundle_dir} "
          "--prompt=\"a red star\" --output=...)")


if __name__ == "__main__":
    config_lib.run(main)
