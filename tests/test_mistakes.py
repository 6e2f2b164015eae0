"""A command-line mistake ends in one line, ``error: ...``, exit status 2, and nothing
written; every config file passes the rules of :mod:`dalle_jax.validate`.

The mistakes run as real subprocesses of every entry point (two at a time, once per
module: each costs a few seconds of imports); the rule table's own tests run in-process.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax import tools
from dalle_jax import validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.py"))
TIMEOUT = 120
IS_ROOT = os.geteuid() == 0

# The ':arg' variants each config file documents (every file must be listed).
VARIANTS = {
    "bench_checkpoint.py": ["", "runlocal"],
    "bench_scale.py": ["", "runlocal"],
    "bench_generate.py": ["", "runlocal"],
    "bench_dvae.py": ["", "runlocal"],
    "bench_input.py": ["", "runlocal"],
    "bench_transformer.py": ["", "runlocal"],
    "bench_upsample.py": ["", "runlocal"],
    "contrastive_photos.py": ["", "loss=softmax", "coco", "runlocal"],
    "contrastive_shapes.py": ["", "loss=softmax", "runlocal", "loss=softmax,runlocal"],
    "convert_images.py": [""],
    "demo.py": ["", "runlocal", "upsample", "runlocal,upsample"],
    "image_tokenizer_openai.py": [""],
    "image_tokenizer_photos.py": ["", "kind=vqvae", "coco", "runlocal", "kind=vqvae,runlocal"],
    "image_tokenizer_shapes.py": ["", "kind=vqvae", "objective=paper", "runlocal",
                                  "kind=vqvae,runlocal"],
    "input_photos.py": ["", "coco", "runlocal", "coco,runlocal"],
    "input_shapes.py": ["", "runlocal", "res=32", "runlocal,res=32"],
    "transformer_photos.py": ["", "coco", "runlocal"],
    "transformer_shapes.py": ["", "size=bench", "runlocal", "size=bench,runlocal"],
    "unclip_decoder_shapes.py": ["", "runlocal"],
    "unclip_prior_photos.py": ["", "runlocal"],
    "unclip_prior_shapes.py": ["", "runlocal"],
    "upsampler_shapes.py": ["", "runlocal"],
    "upsampler_photos.py": ["", "runlocal"],
}

STAGE1_MODEL = dict(kind="dvae", vocab_size=512, n_hid=32, n_blk_per_group=1, group_count=4,
                    n_init=32)  # configs/image_tokenizer_shapes.py's


def _jobs_of(config) -> list[str]:
    return [job for job, fields in tools.CONFIG_FIELDS.items()
            if all(field in config for field in fields)]


def _layout(d: pathlib.Path) -> None:
    """What every row's folder holds: a file, an empty folder, a run of stage 2 (only
    its config.json), a stage-1 run (config.json and a checkpoint step) and a run with a
    text tokenizer."""
    (d / "file").write_text("not a directory\n")
    (d / "empty").mkdir()
    (d / "other_run").mkdir()
    (d / "other_run" / "config.json").write_text(json.dumps(
        {"task": "dalle_jax.stages.transformer"}))
    (d / "stage1" / "checkpoints" / "10").mkdir(parents=True)
    (d / "stage1" / "config.json").write_text(json.dumps(
        {"task": validate.STAGE1_TASK, "model": STAGE1_MODEL}))
    (d / "tokenized").mkdir()
    (d / "tokenized" / "text_tokenizer.model").write_bytes(b"model")
    (d / "readonly").mkdir()
    (d / "readonly").chmod(0o555)


def _listing(d: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@dataclasses.dataclass(frozen=True)
class Mistake:
    name: str
    job: str
    args: tuple[str, ...]  # "{d}" is the row's own folder
    expect: str  # in the error line: the key, flag or path it names
    env: tuple[tuple[str, str], ...] = ()
    skip: str = ""  # why the row does not apply here
    debug: bool = False  # the traceback is asked for

    def argv(self, d) -> list[str]:
        return [sys.executable, "-m", f"dalle_jax.tools.{self.job}",
                *(a.format(d=d) for a in self.args)]


SHAPES1 = "--config=configs/image_tokenizer_shapes.py"
INPUT = "--config=configs/input_shapes.py"
DEMO = "--config=configs/demo.py:runlocal"
NEW = "--workdir={d}/new_run"
NON_ROOT = "as root every directory is writable" if IS_ROOT else ""

MISTAKES = [
    # train
    Mistake("train-no-config", "train", (NEW,), "--config is required"),
    Mistake("train-no-workdir", "train", (SHAPES1,), "--workdir is required"),
    Mistake("train-workdir-file", "train", (SHAPES1, "--workdir={d}/file"), "--workdir"),
    Mistake("train-workdir-under-file", "train", (SHAPES1, "--workdir={d}/file/run"),
            "--workdir"),
    Mistake("train-workdir-proc", "train", (SHAPES1, "--workdir=/proc/dalle_jax/run"),
            "--workdir"),
    Mistake("train-workdir-read-only", "train", (SHAPES1, "--workdir={d}/readonly/run"),
            "--workdir", skip=NON_ROOT),
    Mistake("train-workdir-other-stage", "train", (SHAPES1, "--workdir={d}/other_run"),
            "--workdir"),
    Mistake("train-upsampler-no-stage1", "train",
            ("--config=configs/upsampler_shapes.py:runlocal", NEW),
            "config.upsampler.image_tokenizer_run: is required with "
            "upsampler.round_trip_prob > 0"),
    Mistake("train-upsampler-bad-prediction", "train",
            ("--config=configs/upsampler_shapes.py:runlocal", NEW,
             "--config.upsampler.round_trip_prob=0", "--config.diffusion.prediction=score"),
            "config.diffusion.prediction: must be one of 'eps', 'x0', 'v'"),
    Mistake("train-unclip-decoder-no-reranker", "train",
            ("--config=configs/unclip_decoder_shapes.py:runlocal", NEW),
            "config.decoder.reranker_run: is required: the contrastive run"),
    Mistake("train-unclip-decoder-reranker-not-contrastive", "train",
            ("--config=configs/unclip_decoder_shapes.py:runlocal", NEW,
             "--config.decoder.reranker_run={d}/other_run"),
            "config.decoder.reranker_run:"),
    Mistake("train-unclip-prior-no-reranker", "train",
            ("--config=configs/unclip_prior_shapes.py:runlocal", NEW),
            "config.prior.reranker_run:"),
    Mistake("train-save-every-0", "train", (SHAPES1, NEW, "--config.checkpoint.save_every=0"),
            "config.checkpoint.save_every"),
    Mistake("train-max-to-keep-0", "train",
            (SHAPES1, NEW, "--config.checkpoint.max_to_keep=0"), "config.checkpoint.max_to_keep"),
    Mistake("train-kind-foo", "train", (SHAPES1 + ":kind=foo", NEW), "config.model.kind"),
    Mistake("train-total-steps-negative", "train", (SHAPES1, NEW, "--config.total_steps=-5"),
            "config.total_steps"),
    Mistake("train-batch-size-0", "train", (SHAPES1, NEW, "--config.batch_size=0"),
            "config.batch_size"),
    Mistake("train-task-missing", "train", (SHAPES1, NEW, "--config.task=no.such.module"),
            "config.task"),
    Mistake("train-compute-dtype", "train",
            (SHAPES1, NEW, "--config.train.compute_dtype=float77"), "config.train.compute_dtype"),
    Mistake("train-remat-policy", "train",
            (SHAPES1, NEW, "--config.train.remat_policy=sometimes"), "config.train.remat_policy"),
    Mistake("train-watchdog-negative", "train",
            (SHAPES1, NEW, "--config.train.watchdog_seconds=-1"),
            "config.train.watchdog_seconds"),
    Mistake("train-watchdog-wrong-type", "train",
            (SHAPES1, NEW, "--config.train.watchdog_seconds=soon"),
            "--config.train.watchdog_seconds"),
    Mistake("train-schedule", "train", (SHAPES1, NEW, "--config.optimizer.schedule=linear"),
            "config.optimizer.schedule"),
    Mistake("train-warmup-past-end", "train",
            (SHAPES1, NEW, "--config.total_steps=50", "--config.optimizer.warmup_steps=100"),
            "config.optimizer.warmup_steps"),
    Mistake("train-data-dir-file", "train", (SHAPES1, NEW, "--config.data.data_dir={d}/file"),
            "config.data.data_dir"),
    Mistake("train-codes-without-data-dir", "train",
            ("--config=configs/transformer_shapes.py", NEW), "config.data.data_dir"),
    Mistake("train-unknown-key", "train", (SHAPES1, NEW, "--config.checkpoint.save_evry=5"),
            "checkpoint.save_evry"),
    Mistake("train-wrong-type", "train", (SHAPES1, NEW, "--config.total_steps=many"),
            "--config.total_steps"),
    Mistake("train-unknown-arg", "train", (SHAPES1 + ":size=3", NEW), "size"),
    Mistake("train-config-of-another-job", "train", (INPUT, NEW), "configs/input_shapes.py"),
    Mistake("train-unknown-flag", "train", (SHAPES1, "--wrkdir={d}/new_run"), "wrkdir"),
    Mistake("train-positional", "train", (SHAPES1, NEW, "extra"), "extra"),
    Mistake("train-coordinator-alone", "train",
            (SHAPES1, NEW, "--coordinator_address=127.0.0.1:1234"), "--coordinator_address"),
    # Known only once the devices are: raised by the job, still one line.
    Mistake("train-batch-over-devices", "train",
            ("--config=tests/toy_task.py:synthetic", NEW, "--config.batch_size=12"),
            "config.batch_size", env=(("XLA_FLAGS", "--xla_force_host_platform_device_count=8"),)),
    Mistake("train-mesh-over-devices", "train",
            ("--config=tests/toy_task.py:synthetic", NEW, "--config.mesh.tensor=3"),
            "config.mesh", env=(("XLA_FLAGS", "--xla_force_host_platform_device_count=8"),)),
    # demo
    Mistake("demo-workdir-file", "demo", (DEMO, "--workdir={d}/file"), "--workdir"),
    Mistake("demo-data-dir-file", "demo", (DEMO, NEW, "--config.data.data_dir={d}/file"),
            "config.data.data_dir"),
    Mistake("demo-workdir-a-stage-run", "demo", (DEMO, "--workdir={d}/stage1"), "--workdir"),
    Mistake("demo-images-per-prompt", "demo", (DEMO, NEW, "--config.demo.images_per_prompt=0"),
            "config.demo.images_per_prompt"),
    Mistake("demo-input-config", "demo", (INPUT, NEW), "use configs/demo.py"),
    Mistake("show-inputs-split", "show_inputs", (INPUT, NEW, "--config.inputs.split=trian"),
            "config.inputs.split"),
    # compile (ahead of time, for a TPU slice)
    Mistake("compile-topology", "compile", (SHAPES1, "--topology=v4-7"), "counts cores"),
    Mistake("compile-input-config", "compile", (INPUT, "--topology=v4-8"),
            "use a stage config"),
    Mistake("train-compiled-step-missing", "train",
            (SHAPES1, NEW, "--config.train.compiled_step={d}/nowhere.jaxexec"),
            "config.train.compiled_step"),
    # export, generate, evaluate (flags only)
    Mistake("export-no-run", "export", ("--workdir={d}/nowhere", "--output={d}/bundle"),
            "nowhere"),
    Mistake("generate-no-bundle", "generate",
            ("--bundle={d}/nowhere", "--prompt=a red star", "--output={d}/out"), "nowhere"),
    Mistake("evaluate-no-bundle", "evaluate", ("--bundle={d}/nowhere",
                                               "--output={d}/eval.json"), "nowhere"),
    Mistake("evaluate-contrastive-no-run", "evaluate_contrastive",
            ("--workdir={d}/nowhere", "--output={d}/eval.json"), "not a training run"),
    # the contrastive model (train)
    Mistake("contrastive-loss", "train", ("--config=configs/contrastive_shapes.py:runlocal",
                                          NEW, "--config.contrastive.loss=triplet"),
            "config.contrastive.loss"),
    Mistake("contrastive-widths-size", "train",
            ("--config=configs/contrastive_shapes.py:runlocal", NEW,
             "--config.model.image_widths=(8,8,8,8,8,8,8)"), "config.model.image_widths"),
    # train_text_tokenizer
    Mistake("text-vocab-0", "train_text_tokenizer", (INPUT, NEW, "--config.text.vocab_size=0"),
            "config.text.vocab_size"),
    Mistake("text-exists", "train_text_tokenizer", (INPUT, "--workdir={d}/tokenized"),
            "--overwrite"),
    Mistake("text-no-workdir", "train_text_tokenizer", (INPUT,), "--workdir is required"),
    # encode_dataset
    Mistake("encode-output-proc", "encode_dataset",
            (SHAPES1, "--workdir={d}/stage1", "--config.encode.output_dir=/proc/dalle_jax/codes"),
            "config.encode.output_dir"),
    Mistake("encode-no-output", "encode_dataset", (SHAPES1, "--workdir={d}/stage1"),
            "config.encode.output_dir"),
    Mistake("encode-split-misspelled", "encode_dataset",
            (SHAPES1, "--workdir={d}/stage1", "--config.encode.output_dir={d}/codes",
             "--config.encode.splits=train", "--config.encode.splits=validaton"),
            "config.encode.splits"),
    Mistake("encode-batch-size-0", "encode_dataset",
            (SHAPES1, "--workdir={d}/stage1", "--config.encode.output_dir={d}/codes",
             "--config.encode.batch_size=0"), "config.encode.batch_size"),
    Mistake("encode-splits-int", "encode_dataset",
            (SHAPES1, "--workdir={d}/stage1", "--config.encode.output_dir={d}/codes",
             "--config.encode.splits=7"), "config.encode.splits"),
    Mistake("encode-workdir-empty", "encode_dataset",
            (SHAPES1, "--workdir={d}/empty", "--config.encode.output_dir={d}/codes"),
            "--workdir"),
    Mistake("encode-workdir-other-stage", "encode_dataset",
            (SHAPES1, "--workdir={d}/other_run", "--config.encode.output_dir={d}/codes"),
            "--workdir"),
    Mistake("encode-workdir-other-model", "encode_dataset",
            (SHAPES1 + ":kind=vqvae", "--workdir={d}/stage1",
             "--config.encode.output_dir={d}/codes"), "model.kind"),
    # Known only once the devices are: raised by the job, still one line.
    Mistake("encode-batch-over-devices", "encode_dataset",
            (SHAPES1, "--workdir={d}/stage1", "--config.encode.output_dir={d}/codes",
             "--config.encode.batch_size=12"), "config.encode.batch_size",
            env=(("XLA_FLAGS", "--xla_force_host_platform_device_count=8"),)),
    # eval_image_tokenizer
    Mistake("eval-workdir-not-a-run", "eval_image_tokenizer", (SHAPES1, "--workdir={d}/empty"),
            "--workdir"),
    Mistake("eval-split", "eval_image_tokenizer",
            (SHAPES1, "--workdir={d}/stage1", "--split=trian"), "--split"),
    # convert_images
    Mistake("convert-input-missing", "convert_images",
            ("--config=configs/convert_images.py", "--config.input_dir={d}/missing",
             "--config.output_dir={d}/out"), "config.input_dir"),
    Mistake("convert-no-input", "convert_images",
            ("--config=configs/convert_images.py", "--config.output_dir={d}/out"),
            "config.input_dir"),
    Mistake("convert-workdir", "convert_images",
            ("--config=configs/convert_images.py", "--config.input_dir={d}/empty",
             "--config.output_dir={d}/out", NEW), "--workdir"),
    # convert_openai_dvae
    Mistake("openai-pkl-missing", "convert_openai_dvae",
            ("--config=configs/image_tokenizer_openai.py", "--config.encoder_pkl={d}/enc.pkl",
             "--config.decoder_pkl={d}/dec.pkl", "--config.output_dir={d}/out"),
            "config.encoder_pkl"),
    Mistake("openai-no-pkl", "convert_openai_dvae",
            ("--config=configs/image_tokenizer_openai.py", "--config.output_dir={d}/out"),
            "config.encoder_pkl"),
    # bench
    Mistake("bench-unknown", "bench", ("foo",), "foo"),
    Mistake("bench-repeats-0", "bench", ("dvae", "--config.repeats=0", "--workdir={d}/work"),
            "config.repeats"),
    Mistake("bench-output-dir-file", "bench", ("dvae", "--output_dir={d}/file"),
            "--output_dir"),
    Mistake("bench-all-config-arg", "bench", ("all", "--config_arg=nope",
                                              "--output_dir={d}/records"), "--config_arg"),
    Mistake("bench-all-config-dir", "bench", ("all", "--config_dir={d}/empty"), "--config_dir"),
    # --debug and DALLE_JAX_DEBUG=1 show the traceback instead.
    Mistake("debug-flag", "train", (SHAPES1, NEW, "--config.total_steps=-5", "--debug"),
            "config.total_steps", debug=True),
    Mistake("debug-env", "train", (SHAPES1, NEW, "--config.total_steps=-5"),
            "config.total_steps", env=((config_lib.DEBUG_ENV, "1"),), debug=True),
]


@dataclasses.dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    before: list[str]
    after: list[str]


def _run(mistake: Mistake, d: pathlib.Path) -> Outcome:
    d.mkdir()
    _layout(d)
    before = _listing(d)
    env = dict(os.environ, JAX_PLATFORMS="cpu", **dict(mistake.env))
    if not mistake.debug:
        env.pop(config_lib.DEBUG_ENV, None)
    result = subprocess.run(mistake.argv(d), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    after = _listing(d)
    (d / "readonly").chmod(0o755)  # so that pytest can remove it
    return Outcome(result.returncode, result.stdout, result.stderr, before, after)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    base = tmp_path_factory.mktemp("mistakes")
    rows = [m for m in MISTAKES if not m.skip]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {m.name: pool.submit(_run, m, base / m.name) for m in rows}
        return {name: future.result() for name, future in futures.items()}


def test_the_table_covers_every_entry_point():
    assert len({m.name for m in MISTAKES}) == len(MISTAKES)
    assert {m.job for m in MISTAKES} == set(tools.CONFIG_FIELDS)
    assert len([m for m in MISTAKES if not m.debug]) >= 33


@pytest.mark.slow
@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_a_mistake_is_one_line_and_writes_nothing(mistake, outcomes):
    if mistake.skip:
        pytest.skip(mistake.skip)
    outcome = outcomes[mistake.name]
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert lines, outcome.stdout[-2000:]
    last = lines[-1]
    if mistake.debug:
        assert "Traceback" in outcome.stderr, outcome.stderr[-2000:]
        assert mistake.expect in outcome.stderr
        assert outcome.returncode != 0
    else:
        assert outcome.returncode == 2, outcome.stderr[-3000:]
        assert last.startswith("error: "), outcome.stderr[-3000:]
        assert mistake.expect in last, last
        assert "Traceback" not in outcome.stderr + outcome.stdout, outcome.stderr[-3000:]
    assert outcome.after == outcome.before, "the refused command wrote files"
    assert "new_run" not in " ".join(outcome.after)


# --- the rule table, in-process ----------------------------------------------------------


def _variants():
    found = []
    for path in CONFIG_FILES:
        for arg in VARIANTS.get(path.name, [""]):
            found.append(f"configs/{path.name}" + (f":{arg}" if arg else ""))
    return found + ["tests/toy_task.py", "tests/toy_task.py:synthetic"]


def test_every_config_file_lists_its_variants():
    assert set(VARIANTS) == {p.name for p in CONFIG_FILES}


@pytest.mark.parametrize("spec", _variants())
def test_every_config_passes_the_rules(spec):
    config = config_lib.load_config_file(str(ROOT / spec))
    defaults = config_lib.load_config_file(str(ROOT / spec))
    jobs = ["train"] if spec.startswith("tests/") else _jobs_of(config)
    assert jobs, spec
    for job in jobs:
        validate.check_config(job, config, defaults=defaults)


@pytest.mark.parametrize("spec", _variants())
def test_every_config_key_has_a_rule(spec):
    if spec.startswith("tests/"):
        return  # the toy stage's model is its own
    config = config_lib.load_config_file(str(ROOT / spec))
    uncovered = sorted(k for k in validate.leaf_keys(config) if not validate.is_covered(k))
    assert not uncovered, f"{spec}: give these a rule in dalle_jax/validate.py " \
                          f"(or list them in FREE_FORM): {uncovered}"


def test_every_rule_names_a_key_some_config_has():
    keys = set()
    for spec in _variants():
        keys |= set(validate.leaf_keys(config_lib.load_config_file(str(ROOT / spec))))
    stale = sorted(k for k in validate.covered_keys() if not k.startswith("--")
                   and not k.endswith(".") and k not in keys)
    assert not stale, f"rules for keys no config has (misspelt?): {stale}"


def test_documented_commands_pass_the_rules():
    from tests import test_documented_commands as documented  # pylint: disable=g-import-not-at-top
    checked = 0
    for source, job, args in documented.COMMANDS:
        spec, overrides = documented._config_args(args)  # pylint: disable=protected-access
        if spec is None or "<" in spec or "..." in spec:
            continue
        argv = ["job", f"--config={ROOT / spec}", *overrides]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                        lock_config=True, sys_argv=argv)
        values(argv)
        try:
            validate.check_config(job, values.config,
                                  defaults=config_lib.load_config_file(str(ROOT / spec)))
        except errors.UserError as e:
            pytest.fail(f"{source}: python -m dalle_jax.tools.{job} {' '.join(args)}: {e}")
        checked += 1
    assert checked > 10


def test_enum_tables_are_the_consumers():
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from dalle_jax.bench import BENCHMARKS  # pylint: disable=g-import-not-at-top
    from dalle_jax.data import code_records, image_records, shapes, shapes_tfds, sources  # pylint: disable=g-import-not-at-top
    from dalle_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
    from dalle_jax.inference import runs  # pylint: disable=g-import-not-at-top
    from dalle_jax.models import image_tokenizers, openai_dvae, remat, transformer  # pylint: disable=g-import-not-at-top
    from dalle_jax.train import optimizer, sharding  # pylint: disable=g-import-not-at-top
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

    assert validate.MODEL_KINDS == image_tokenizers.KINDS
    assert set(validate.REMAT_POLICIES) == set(remat.POLICIES)
    assert validate.ATTENTION_KINDS == transformer.ATTENTION_KINDS
    assert validate.CONV_MASKS == transformer.CONV_MASKS
    assert validate.MESH_AXES == sharding.MESH_AXES
    assert validate.SHAPES_COLOURS == shapes.COLOURS
    assert validate.SHAPES_SHAPES == shapes.SHAPES
    assert validate.SHAPES_SPLITS == tuple(shapes_tfds.CaptionedShapesConfig(name="x").split_sizes)
    assert set(validate.TEXT_MODEL_TYPES) == {
        name.lower() for name in sentencepiece_model_pb2.TrainerSpec.ModelType.keys()}
    for name in validate.COMPUTE_DTYPES:
        assert jnp.issubdtype(jnp.dtype(name), jnp.floating)
    with pytest.raises(TypeError):
        jnp.dtype("float77")
    # The schedules the optimizer builds, and only those.
    opt = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=1, end_learning_rate=0.0, decay_steps=(5,),
        decay_factor=0.5))
    for name in validate.SCHEDULES:
        opt.schedule = name
        optimizer.learning_rate_schedule(opt, 10)
    opt.schedule = "linear"
    with pytest.raises(ValueError, match="schedule"):
        optimizer.learning_rate_schedule(opt, 10)
    # The sources make_source knows, and only those.
    with pytest.raises(ValueError) as refused:
        sources.make_source(ml_collections.ConfigDict(dict(source="nope")), "train")
    listed = re.search(r"must be (.*); got", str(refused.value)).group(1)
    assert tuple(re.split(r", | or ", listed)) == validate.SOURCES
    # The preprocessing modes the input pipeline takes.
    import inspect  # pylint: disable=g-import-not-at-top
    from dalle_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    with pytest.raises(ValueError, match="preprocess") as refused:
        pipeline.InputPipeline(None, batch_size=1, image_size=8, preprocess="nope",
                               process_index=0, process_count=1)
    listed = re.search(r"must be (.*), got", str(refused.value)).group(1)
    assert tuple(re.findall(r"'(\w+)'", listed)) == validate.PREPROCESS
    # File names the consumers use.
    assert validate.CONFIG_FILE == config_lib.CONFIG_FILE_NAME
    assert validate.CHECKPOINTS == runs.CHECKPOINTS
    assert validate.ARCHITECTURE_FILE == openai_dvae.ARCHITECTURE_FILE
    assert validate.CONVERSION_PARAMS == openai_dvae.PARAMS_DIR
    assert validate.TEXT_TOKENIZER_FILE == text_tokenizer.TEXT_TOKENIZER_FILE_NAME
    assert validate.records_metadata_name("a", "b") == image_records.metadata_file_name("a", "b")
    assert validate.codes_metadata_name("a", "b") == code_records.metadata_name("a", "b")
    assert validate.bench_commands() == (*BENCHMARKS, "all", "report")
    from dalle_jax.stages import image_tokenizer as stage1  # pylint: disable=g-import-not-at-top
    assert validate.STAGE1_TASK == stage1.__name__
    from dalle_jax.diffusion import parameterization, schedules  # pylint: disable=g-import-not-at-top
    assert validate.DIFFUSION_SCHEDULES == schedules.SCHEDULES
    assert validate.PREDICTIONS == parameterization.PREDICTIONS
    assert f'recon_loss == "{validate.RECON_LOSSES[0]}"' in inspect.getsource(stage1)


def test_validation_imports_nothing_heavy():
    code = ("import sys; from dalle_jax import validate, config; "
            "assert not {'jax', 'tensorflow', 'numpy', 'flax'} & set(sys.modules), "
            "sorted({'jax', 'tensorflow', 'numpy', 'flax'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def _check(spec: str, *overrides: tuple[str, object], job: str = "train",
           workdir: str | None = None, **flag_values):
    config = config_lib.load_config_file(str(ROOT / spec))
    defaults = config_lib.load_config_file(str(ROOT / spec))
    for key, value in overrides:
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        with node.ignore_type():
            node[last] = value
    validate.check_command(job, config, workdir, flag_values=flag_values, defaults=defaults)


@pytest.mark.parametrize("overrides, message", [
    ((("checkpoint.save_every", 0),), "config.checkpoint.save_every: must be a positive "
                                      "integer, got 0"),
    ((("encode.splits", (7,)),), "config.encode.splits: must be a tuple of strings"),
    ((("data.image_size", 60),), "config.data.image_size: must be a multiple of 8"),
    ((("optimizer.warmup_steps", 10_000),), "config.optimizer.warmup_steps: must be at most"),
    ((("train.num_microbatches", 5),), "config.train.num_microbatches: must divide batch_size"),
    ((("train.watchdog_seconds", -5),), "config.train.watchdog_seconds: must be a "
                                         "non-negative number, got -5"),
    ((("train.watchdog_seconds", "30m"),), "config.train.watchdog_seconds: must be a "
                                           "non-negative number, got '30m'"),
    ((("mesh.fsdp", -1),), "config.mesh.fsdp: at most one mesh axis may be -1"),
    ((("model.kind", "vq"),), "config.model.kind: must be one of 'dvae', 'vqvae'"),
    ((("optimizer.no_decay", ("(",)),), "config.optimizer.no_decay: '(' is not a regular"),
    ((("data.holdout_pairs", (("green", "hexagon"),)),), "config.data.holdout_pairs"),
    ((("sharding.rules", (("batch", "rows"),)),), "config.sharding.rules"),
    ((("stage1.eval_split", "valid"),), "config.stage1.eval_split: 'valid' is not a split"),
    ((("data.num_validation", 0),), "config.stage1.eval_split: split 'validation' is empty"),
])
def test_rules_name_the_key(tmp_path, overrides, message):
    with pytest.raises(errors.UserError) as refused:
        _check("configs/image_tokenizer_shapes.py", *overrides, workdir=str(tmp_path / "run"))
    assert str(refused.value).startswith(message), str(refused.value)
    assert not (tmp_path / "run").exists()


def test_transformer_rules(tmp_path):
    spec = "configs/transformer_shapes.py"
    codes = tmp_path / "codes"
    codes.mkdir()
    common = (("data.data_dir", str(codes)),)
    with pytest.raises(errors.UserError, match=r"config.data.data_dir: 'train' is not a split"):
        _check(spec, *common, workdir=str(tmp_path / "run"))
    (codes / "captioned_shapes-train.codes.json").write_text(json.dumps(
        {"code_shape": [4, 4], "vocab_size": 64}))
    with pytest.raises(errors.UserError, match=r"hold \(4, 4\) grids"):
        _check(spec, *common, workdir=str(tmp_path / "run"))
    (codes / "captioned_shapes-train.codes.json").write_text(json.dumps(
        {"code_shape": [8, 8], "vocab_size": 64}))
    with pytest.raises(errors.UserError, match=r"stage2.eval_split: 'validation' is not a "
                                               r"split .*\(it has 'train'\)"):
        _check(spec, *common, workdir=str(tmp_path / "run"))
    (codes / "captioned_shapes-validation.codes.json").write_text("{}")
    _check(spec, *common, workdir=str(tmp_path / "run"))
    for overrides, message in [
            ((("model.attention", ("row", "column")),), "lists 2 kinds for model.num_layers=4"),
            ((("model.conv_kernel", 4),), "config.model.conv_kernel: must be a positive odd"),
            ((("stage2.sample.top_k", 10_000),), "config.stage2.sample.top_k"),
            ((("text.bpe_dropout", 0.1), ("text.model_type", "unigram")),
             "config.text.bpe_dropout: must be 0 with text.model_type='unigram'"),
            ((("data.source", "captioned_shapes"),), "config.stage2.image_tokenizer: is "
                                                     "required")]:
        with pytest.raises(errors.UserError, match=message.replace("(", r"\(")):
            _check(spec, *common, *overrides, workdir=str(tmp_path / "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes"]


def test_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    assert validate.directory_problem(str(tmp_path / "new" / "deeper")) is None
    assert "is a file" in validate.directory_problem(str(tmp_path / "file"))
    assert "is a file" in validate.directory_problem(str(tmp_path / "file" / "under"))
    assert "not writable" in validate.directory_problem("/proc/dalle_jax/run")
    assert validate.directory_problem("gs://bucket/run") is None
    assert "is a directory" in validate.file_problem(str(tmp_path))
    assert "does not exist" in validate.existing_file_problem(str(tmp_path / "nope.pkl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], "the probe is removed"


def test_stage1_runs(tmp_path):
    _layout(tmp_path)
    try:
        assert validate.stage1_run_problem(str(tmp_path / "stage1")) is None
        assert "no readable config.json" in validate.stage1_run_problem(str(tmp_path / "empty"))
        assert "a run of dalle_jax.stages.transformer" in validate.stage1_run_problem(
            str(tmp_path / "other_run"))
        assert "does not exist" in validate.stage1_run_problem(str(tmp_path / "missing"))
        config = config_lib.load_config_file(str(ROOT / "configs/image_tokenizer_shapes.py"))
        assert validate.stage1_run_problem(str(tmp_path / "stage1"), config) is None
        config.model.n_hid = 64
        assert "model.n_hid=32" in validate.stage1_run_problem(str(tmp_path / "stage1"), config)
        (tmp_path / "stage1" / "checkpoints" / "10").rmdir()
        assert "no checkpoint yet" in validate.stage1_run_problem(str(tmp_path / "stage1"))
        (tmp_path / "conversion").mkdir()
        (tmp_path / "conversion" / validate.ARCHITECTURE_FILE).write_text("{}")
        assert validate.stage1_run_problem(str(tmp_path / "conversion"), config) is None
    finally:
        (tmp_path / "readonly").chmod(0o755)


def test_a_valid_command_passes_and_writes_nothing(tmp_path):
    _check("configs/image_tokenizer_shapes.py", ("data.data_dir", str(tmp_path / "tfds")),
           workdir=str(tmp_path / "run"))
    _check("configs/demo.py", job="demo", workdir=str(tmp_path / "run"))
    _check("configs/input_shapes.py", job="show_inputs", workdir=str(tmp_path / "run"))
    _check("configs/input_shapes.py", job="train_text_tokenizer",
           workdir=str(tmp_path / "run"), split="train", overwrite=False)
    _check("configs/convert_images.py", ("input_dir", str(tmp_path)),
           ("output_dir", str(tmp_path / "out")), job="convert_images")
    assert not list(tmp_path.iterdir())


def test_positional_arguments():
    config = config_lib.load_config_file(str(ROOT / "configs/demo.py"))
    with pytest.raises(errors.UserError, match="unexpected argument extra"):
        validate.check_command("demo", config, "runs/x", ["extra"], flag_values={},
                               defaults=config)
    commands = ", ".join(validate.bench_commands())
    assert commands.startswith("input, dvae, transformer") and commands.endswith("all, report")
    with pytest.raises(errors.UserError, match=f"runs one of {commands}; got none"):
        validate.check_command("bench", None, None, [], flag_values={})
    validate.check_command("bench", None, None, ["report"], flag_values={})


def test_bench_commands_are_the_tools():
    from dalle_jax.tools import bench  # pylint: disable=g-import-not-at-top
    assert validate.bench_commands() == bench.COMMANDS


def test_job_tables_cover_every_entry_point():
    entry_points = {p.stem for p in (ROOT / "dalle_jax" / "tools").glob("*.py")} - {"__init__"}
    assert set(validate.JOBS) == entry_points == set(tools.CONFIG_FIELDS)

