"""The training core's part of every stage config, with the defaults it documents.

Stage configs start from :func:`core_config` and set what differs. Kept free of jax
imports so that loading a config file stays instant.
"""
from __future__ import annotations

import ml_collections

# Logical axis name -> mesh axes. Edit this table (or the mesh shape) to switch
# between data parallelism, FSDP and tensor parallelism; model code never changes.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("length", None),
    ("layers", None),  # the scanned layer axis of stacked parameters
    ("conv_in", None),
    ("conv_out", "tensor"),
)


def core_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # The stage: a module with make_task(config, workdir, mesh), such as
    # dalle_jax.stages.image_tokenizer.
    config.task = ""
    config.seed = 0
    config.batch_size = 64  # global, over all processes
    config.total_steps = 1_000

    # (data, fsdp, tensor); one may be -1 to take the remaining devices.
    config.mesh = ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
    config.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES))

    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3,
        warmup_steps=100,
        schedule="cosine",  # cosine | constant | step
        end_learning_rate=0.0,  # cosine
        decay_steps=(),  # step: multiply by decay_factor at each of these steps
        decay_factor=0.5,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=1e-4,
        # Parameters whose path matches one of these get no weight decay.
        no_decay=(r"(^|/)bias(/|$)", r"(^|/)scale(/|$)", r"embedding"),
        grad_clip_norm=1.0,  # 0 disables
    ))

    config.train = ml_collections.ConfigDict(dict(
        num_microbatches=1,  # gradient accumulation inside the step
        ema_decay=0.999,  # 0 disables the EMA of parameters
        compute_dtype="float32",  # or bfloat16; parameters stay float32
        remat_policy="none",  # none | full | dots | dots_no_batch | everything
        max_nonfinite_steps=10,  # consecutive skipped updates before the run stops
        log_every=50,
        eval_every=0,  # 0: only at the end
        summary_every=0,  # image summaries; 0 disables
        # Hang watchdog (dalle_jax.train.watchdog): a process in which nothing completes
        # for this long (a step, an evaluation batch, a checkpoint save; e.g. a
        # collective waiting for a dead worker) logs the last completed step and what it
        # was waiting on, dumps its Python stacks and exits with status 3. Armed after
        # the first step, so start-up, restore and compilation are not counted. Generous,
        # for pods whose saves and evaluations are slow; 0 disables.
        watchdog_seconds=1800.0,
        # A train step compiled ahead of time for this config and slice
        # (python -m dalle_jax.tools.compile --save=FILE): the run loads it instead of
        # compiling, after checking it is the same program. Empty: compile here.
        compiled_step="",
    ))

    config.checkpoint = ml_collections.ConfigDict(dict(
        save_every=500,
        max_to_keep=3,
        keep_every=0,  # also keep every k-th step's checkpoint; 0 disables
        async_save=True,
        # A damaged latest step (truncated, deleted or overwritten files) is moved to
        # <workdir>/checkpoints.damaged and the run resumes from the newest intact
        # one; True stops the run instead.
        strict=False,
    ))

    # Trace steps [start_step, start_step + num_steps) into <workdir>/profile.
    config.profile = ml_collections.ConfigDict(dict(start_step=10, num_steps=0))
    return config
