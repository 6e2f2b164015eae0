r"""Evaluates a trained contrastive model (the reranker) on a split of its dataset.

  python -m dalle_jax.tools.evaluate_contrastive --workdir=runs/contrastive_shapes

Reports image→text and text→image Recall@1/5/10 over the split's pairs and, for
captioned shapes, zero-shot accuracy of colour, shape and cell of lone objects read by
prompt templates (:mod:`dalle_jax.evaluation.contrastive`). Prints them and writes JSON
(``evaluation.json`` in the run by default). The gain from reranking generated images
is measured on a bundle that carries the model: ``python -m dalle_jax.tools.evaluate``.
"""
from __future__ import annotations

import json
import os
import time

from absl import flags

from dalle_jax import config as config_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "The contrastive run.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "JSON file to write (default: "
                              "<workdir>/evaluation.json).")
_SPLIT = flags.DEFINE_string("split", "validation", "The split to evaluate on.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 2000, "At most this many pairs.",
                                     lower_bound=1)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset folder (default: the run's).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
config_lib.define_debug_flag()


def main(argv):
    del argv
    from dalle_jax import errors  # pylint: disable=g-import-not-at-top
    from dalle_jax import files  # pylint: disable=g-import-not-at-top
    from dalle_jax.evaluation import contrastive  # pylint: disable=g-import-not-at-top
    from dalle_jax.inference import reranker as reranker_lib  # pylint: disable=g-import-not-at-top
    from dalle_jax.inference import runs  # pylint: disable=g-import-not-at-top
    workdir = _WORKDIR.value
    if not os.path.isfile(os.path.join(workdir, config_lib.CONFIG_FILE_NAME)):
        raise errors.UserError(f"--workdir {workdir} is not a training run (no "
                               f"{config_lib.CONFIG_FILE_NAME})")
    start = time.perf_counter()
    try:
        model = reranker_lib.Reranker.load_run(workdir, step=_STEP.value)
    except runs.RunError as e:
        raise errors.UserError(str(e)) from None
    data = model.config.data
    if _DATA_DIR.value:
        data.data_dir = _DATA_DIR.value
    images, captions = contrastive.split_pairs(data, _SPLIT.value, _MAX_EXAMPLES.value)
    report = {"run": os.path.abspath(workdir), "step": model.step, "split": _SPLIT.value,
              "retrieval": contrastive.retrieval(model, images, captions)}
    if data.name == "captioned_shapes":
        report["zero_shot"] = contrastive.zero_shot(model, images, captions)
    report["seconds"] = round(time.perf_counter() - start, 1)
    output = _OUTPUT.value or os.path.join(workdir, "evaluation.json")
    files.atomic_write(output, json.dumps(report, indent=1) + "\n")
    print(f"step {model.step}:")
    print("\n".join(contrastive.reranker_lines(_SPLIT.value, report["retrieval"],
                                              report.get("zero_shot"))))
    print(f"wrote {output}")


if __name__ == "__main__":
    config_lib.run(main)
