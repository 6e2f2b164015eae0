"""The training loop shared by every stage (dVAE, VQ-VAE, transformer).

A stage supplies a :class:`Task`: its model's initialiser, its loss, its data and,
optionally, its FLOPs per example and image summaries. Everything else happens here,
in the order the data flows:

    logging → mesh → input → model and optimizer → sharding → step → checkpoint
    → loop (metrics one step late, evals, saves, preemption, hang watchdog)

Restarting the same command in the same workdir resumes from the latest checkpoint,
data iterators included, so the run continues exactly as if uninterrupted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Any, Callable, Iterator, Mapping, Protocol

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import config as config_lib
from dalle_jax import errors
from dalle_jax import signals
from dalle_jax.train import checkpoint as checkpoint_lib
from dalle_jax.train import distributed
from dalle_jax.train import metrics as metrics_lib
from dalle_jax.train import optimizer as optimizer_lib
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import step as step_lib
from dalle_jax.train import watchdog as watchdog_lib


class DataIterator(Protocol):
    """Per-process numpy batches whose position can be saved and restored."""

    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: Mapping[str, Any]) -> None: ...
    def close(self) -> None:
        """Releases the iterator's resources (threads of a tf.data iterator)."""


def close_data(data) -> None:
    """Closes a task's data iterator, if it holds anything to release.

    No tf.data iterator may outlive the run: one torn down during interpreter
    shutdown can wait forever on its worker threads.
    """
    close = getattr(data, "close", None)
    if close is not None:
        close()


class Task(Protocol):
    """What a stage supplies to the training core."""

    # Model FLOPs of one training example (forward and backward), for MFU; or None.
    flops_per_example: float | None

    def init(self, rng: jax.Array) -> dict[str, Any]:
        """The model's variables (``"params"`` and any other collections), with
        logical partitioning boxes."""

    def loss(self, params, model_state, batch, rng, *, train: bool,
             step: jax.Array) -> tuple[jax.Array, dict, Any]:
        """fp32 scalar loss (a mean over the batch's real rows), fp32 metrics, and the
        model state (non-gradient collections) after this batch. ``step`` counts the
        updates before this one (for schedules such as annealed temperatures)."""

    def train_data(self) -> DataIterator:
        """This process's share of the training batches."""

    def eval_data(self) -> Iterator[dict[str, np.ndarray]] | None:
        """One pass over this process's share of the eval set, or None."""

    def summaries(self, params, model_state, batch) -> dict[str, np.ndarray]:
        """Images to log (uint8 [H, W, 3] or [N, H, W, 3]); may be empty."""


def load_task(config, workdir: str, mesh) -> Task:
    """Imports ``config.task`` and calls its ``make_task(config, workdir, mesh)``."""
    if not config.task:
        raise errors.ConfigError("task", "names the stage's module, e.g. "
                         "dalle_jax.stages.image_tokenizer")
    module = importlib.import_module(config.task)
    return module.make_task(config, workdir, mesh)


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


def train_and_evaluate(config, workdir: str, *, task: Task | None = None,
                       devices=None, console=print) -> Any:
    """Trains ``config.task`` (or ``task``) in ``workdir``; returns the final state.

    ``devices`` (all by default) are those the mesh spans. A stop signal
    (:mod:`dalle_jax.signals`) during the loop saves the current step and returns;
    during start-up, restore or an evaluation it cuts that work short first.
    """
    resources = contextlib.ExitStack()
    try:
        return _train(config, workdir, task, devices, console, resources)
    finally:
        with signals.deferred():  # a second signal must not cut the clean-up short
            resources.close()


def _train(config, workdir, task, devices, console, resources) -> Any:
    # Ends this process (exit status watchdog_lib.EXIT_CODE) when nothing completes for
    # config.train.watchdog_seconds, e.g. a collective waiting for a dead process. Armed
    # when the first step's metrics arrive: start-up, restore and the first step's
    # compile are never watched. Progress: a step's metrics fetched (the fetch waits
    # for the device), each evaluation batch, the end of a checkpoint save or of the
    # image summaries; so one save, one evaluation batch or the summaries must each take
    # less than the limit. It is stopped last, so that the clean-up (waiting for the
    # final save) is watched too.
    watchdog = watchdog_lib.Watchdog(config.train.get("watchdog_seconds", 0))
    resources.callback(watchdog.stop)
    # ---------------------------------------------------------------- mesh
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    rules = sharding_lib.logical_rules(config.sharding)
    logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    if config.batch_size % sharding_lib.batch_shard_count(mesh):
        raise errors.ConfigError(
            "batch_size", f"{config.batch_size} does not split over the batch axes ("
            + " x ".join(f"{a} {mesh.shape[a]}" for a in sharding_lib.BATCH_AXES) + ")")

    # ---------------------------------------------------------------- input
    if task is None:
        task = load_task(config, workdir, mesh)
    train_data = task.train_data()
    # Pipelines build their tf.data iterator on the first batch, so this covers it.
    resources.callback(close_data, train_data)

    # ---------------------------------------------------------------- model, sharding, step
    training = build(config, task, mesh, rules)

    # ---------------------------------------------------------------- checkpoint
    checkpointer = checkpoint_lib.Checkpointer(
        f"{workdir}/checkpoints",
        save_interval_steps=config.checkpoint.save_every,
        max_to_keep=config.checkpoint.max_to_keep,
        keep_period=config.checkpoint.keep_every,
        async_save=config.checkpoint.async_save)
    resources.callback(checkpointer.close)  # waits for the save in flight
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        restored = checkpointer.restore_latest(
            training.abstract_state, strict=config.checkpoint.get("strict", False),
            report=console)
        if restored is not None:
            state, data_state, step = restored
            if data_state is None:
                logging.warning("checkpoint written by another number of processes: "
                                "the input starts from its beginning")
            else:
                train_data.set_state(data_state)
            console(f"resumed from step {step} in {workdir}")
        else:
            state = training.init(jax.random.key(config.seed))
    unsharded = sharding_lib.unsharded_large_arrays(state.params, mesh)
    if unsharded:
        logging.warning("large parameters replicated on every device: %s", unsharded)
    # A copy that the donated state cannot invalidate.
    base_rng = jax.device_put(np.asarray(state.rng), sharding_lib.replicated(mesh))
    step = int(state.step)

    # ---------------------------------------------------------------- logging
    # Written once the run is known to be usable; a resumed run's TensorBoard files
    # lose the steps after ``step`` (they are redone), so the curves stay single.
    if jax.process_index() == 0:
        config_lib.write_config(config, workdir)
    writer = metrics_lib.MetricWriter(f"{workdir}/tensorboard", console=console,
                                      start_step=step if restored is not None else None)
    resources.callback(writer.close)
    writer.write_hparams(config.to_dict(), step=step)

    # ---------------------------------------------------------------- loop
    peak, peak_source = metrics_lib.peak_flops_per_device(
        jnp.dtype(config.train.compute_dtype))
    logging.info("peak %.3g FLOP/s per device (%s)", peak, peak_source)
    throughput = metrics_lib.Throughput(
        total_steps=config.total_steps, global_batch_size=config.batch_size,
        flops_per_example=task.flops_per_example, peak_flops_per_device=peak,
        num_devices=mesh.size, start_step=step)
    fetcher = metrics_lib.LateFetcher()
    profiler = metrics_lib.Profiler(workdir, start_step=config.profile.start_step,
                                    num_steps=config.profile.num_steps)
    resources.callback(profiler.close)
    preemption = distributed.PreemptionWatcher(checkpointer)
    # Run first when the run ends (callbacks run in reverse): the clean-up gets a whole
    # period of its own, under its own name.
    resources.callback(watchdog.doing, "the clean-up at the end of the run (the "
                       "checkpoint in flight, the input's threads)")
    resources.callback(watchdog.progress)
    log_every = max(1, config.train.log_every)
    train_metrics: list[dict[str, float]] = []
    timing_started = False

    def handle(fetched):
        """Logs a step's fetched metrics; stops the run after too many bad updates."""
        nonlocal timing_started
        if fetched is None:
            return
        done_step, values = fetched
        watchdog.progress(done_step)
        watchdog.arm()  # once: from the first completed step on
        if values["nonfinite_streak"] >= config.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"{int(values['nonfinite_streak'])} consecutive updates up to step "
                f"{done_step} had a non-finite loss or gradient; stopping. The last "
                f"checkpoint (step {checkpointer.latest_step()}) is intact.")
        train_metrics.append(values)
        if not timing_started:
            # Throughput is measured from the end of the first step: no compile time.
            throughput.update(done_step)
            timing_started = True
        if done_step % log_every == 0 or done_step == config.total_steps:
            summary = {k: float(np.mean([m[k] for m in train_metrics]))
                       for k in train_metrics[-1]}
            summary["update_skipped"] = float(np.sum([m["update_skipped"]
                                                      for m in train_metrics]))
            summary.update(throughput.update(done_step))
            train_metrics.clear()
            writer.write_scalars(done_step, {f"train/{k}": v for k, v in summary.items()})
            writer.console_line(done_step, config.total_steps, summary)

    def stop(step: int, during: str = ""):
        """Saves ``step`` (unless saved already), waits for it and reports."""
        watchdog.doing(f"train step {step} to finish, before the preemption save")
        handle(fetcher.flush())
        watchdog.doing(f"the preemption save of step {step}")
        checkpointer.save(step, state, train_data.get_state(), force=True)
        checkpointer.wait_until_finished()
        console(f"preempted ({signals.requested() or 'preemption notice'}{during}): saved "
                f"step {step}; rerun the same command to resume")
        return state

    # Inside the loop a stop signal only marks the request: the step in flight and a
    # checkpoint being written finish, then the loop saves and returns. Summaries
    # and evaluations may be cut short (their results are not part of the state).
    with signals.deferred():
        while step < config.total_steps:
            profiler.step(step)
            watchdog.doing(f"the input batch of step {step + 1}")
            batch = next(train_data)
            device_batch = sharding_lib.make_global_batch(batch, mesh)
            watchdog.doing(f"train step {step} to finish, step {step + 1} being dispatched"
                           if step else "train step 1")
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                state, step_metrics = training.train_step(state, device_batch, base_rng)
            step += 1
            handle(fetcher.push(step, step_metrics))
            checkpointer.poll()

            if checkpointer.should_save(step):
                watchdog.doing(f"the checkpoint save of step {step} (and the save before)")
                checkpointer.save(step, state, train_data.get_state())
                watchdog.progress()
            if preemption.should_stop(step):
                return stop(step)
            summarize = config.train.summary_every and step % config.train.summary_every == 0
            evaluating = config.train.eval_every and step % config.train.eval_every == 0
            if summarize or evaluating:
                try:
                    with signals.interruptible():
                        if summarize:
                            watchdog.doing(f"the image summaries at step {step}")
                            # The parameters evaluation uses: the EMA when the run keeps one.
                            params = (state.ema_params if state.ema_params is not None
                                      else state.params)
                            writer.write_images(step, task.summaries(
                                params, state.model_state, batch))
                            watchdog.progress()
                        if evaluating:
                            watchdog.doing(f"the evaluation at step {step}")
                            evaluate(task, state, training, mesh, rules, writer, step,
                                     console, progress=watchdog.progress)
                            watchdog.progress()
                except signals.Stop:
                    return stop(step, during=" during an evaluation")
        watchdog.doing(f"the last train step ({step}) to finish")
        handle(fetcher.flush())
        watchdog.doing(f"the final checkpoint save of step {step}")
        checkpointer.save(step, state, train_data.get_state(), force=True)
        watchdog.progress()
        try:
            with signals.interruptible():
                watchdog.doing(f"the final evaluation at step {step}")
                evaluate(task, state, training, mesh, rules, writer, step, console,
                         progress=watchdog.progress)
        except signals.Stop:
            return stop(step, during=" during the final evaluation")
    return state


def evaluate(task: Task, state, training: "Training", mesh, rules, writer, step: int,
             console=print, progress: Callable[[], Any] | None = None) -> dict:
    """Mean eval metrics (EMA parameters when kept) over one pass of the eval data.

    ``progress()`` is called after each batch's metrics are fetched (the watchdog's
    sign of life)."""
    data = task.eval_data()
    if data is None:
        return {}
    logging.info("evaluating at step %d", step)
    params = state.ema_params if state.ema_params is not None else state.params
    totals: dict[str, float] = {}
    count = 0.0
    try:
        for batch in data:
            device_batch = sharding_lib.make_global_batch(batch, mesh)
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                loss, metrics = training.eval_step(params, state.model_state, device_batch,
                                                   state.step)
            rows = float(jnp.sum(device_batch["mask"]))  # real rows of the global batch
            for key, value in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * rows
            count += rows
            if progress is not None:
                progress()
    finally:
        close_data(data)
    results = {k: v / max(count, 1.0) for k, v in totals.items()}
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
    console(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
    return results


@dataclasses.dataclass
class Training:
    """The compiled pieces of a run on one mesh."""

    abstract_state: Any  # ShapeDtypeStructs carrying their shardings
    state_shardings: Any
    init: Callable[[jax.Array], Any]  # rng -> state, born sharded
    train_step: Callable  # (state, batch, rng) -> (state, metrics); state donated
    eval_step: Callable  # (params, model_state, batch, step) -> (loss, metrics)
    schedule: Callable[[int], float]


def build(config, task: Task, mesh, rules) -> Training:
    """Abstract state, shardings, the sharded init and the jitted steps of ``task``."""
    tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.total_steps)
    use_ema = config.train.ema_decay > 0

    def boxed_state(rng):
        return step_lib.init_state(task.init(rng), tx, ema=use_ema, rng=rng)

    # Abstract first: shapes and logical names, then mesh shardings, then a jitted
    # init that materialises every array directly in its shards.
    # The key is made before the mesh is entered: the mesh may span compile-only
    # devices (ahead-of-time compiles, dalle_jax.train.aot) that run nothing.
    seed = jax.random.key(config.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract_boxed = jax.eval_shape(boxed_state, seed)
        state_shardings = sharding_lib.logical_shardings(abstract_boxed, mesh, rules)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        step_lib.unbox(abstract_boxed), state_shardings)
    indivisible = sharding_lib.indivisible_arrays(abstract_state.params)
    if indivisible:
        raise errors.ConfigError(
            "sharding.rules", f"with mesh {dict(mesh.shape)}, {len(indivisible)} "
            f"parameter(s) do not split evenly, e.g. {indivisible[0]}; change config.mesh "
            "or the rules")
    init = jax.jit(lambda rng: step_lib.unbox(boxed_state(rng)),
                   out_shardings=state_shardings)

    def loss_fn(params, model_state, batch, rng, step):
        return task.loss(params, model_state, batch, rng, train=True, step=step)

    batch_sharding = sharding_lib.batch_sharding(mesh)
    replicated = sharding_lib.replicated(mesh)
    train_step = jax.jit(
        step_lib.make_train_step(
            loss_fn, tx, schedule, num_microbatches=config.train.num_microbatches,
            ema_decay=config.train.ema_decay, mesh=mesh),
        in_shardings=(state_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,))
    if config.train.get("compiled_step"):
        from dalle_jax.train import compiled  # pylint: disable=g-import-not-at-top
        training = Training(abstract_state, state_shardings, init, train_step, None,
                            schedule)
        train_step = compiled.load_train_step(config.train.compiled_step, training, task,
                                         config, mesh, rules)
        logging.info("train step loaded from %s", config.train.compiled_step)
    eval_step = jax.jit(
        lambda params, model_state, batch, step: task.loss(
            params, model_state, batch, jax.random.key(0), train=False, step=step)[:2],
        in_shardings=(state_shardings.params, state_shardings.model_state, batch_sharding,
                      replicated),
        out_shardings=replicated)
    return Training(abstract_state, state_shardings, init, train_step, eval_step, schedule)
