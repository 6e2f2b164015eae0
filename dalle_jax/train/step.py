"""The train state and the train step: one pure function of (state, batch, rng).

The step averages gradients over micro-batches inside the compiled function, applies
the optimizer, keeps an exponential moving average of the parameters, and skips any
update whose loss or gradient is not finite (the skip is counted in the state and in
the metrics, and the parameters, optimizer state and EMA stay as they were).
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dalle_jax.train import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterators' states."""

    step: jax.Array  # int32, updates applied or skipped so far
    params: Any
    # Variables updated by the model itself rather than by gradients (for example
    # a VQ-VAE's EMA codebook); an empty dict for most models.
    model_state: Any
    opt_state: Any
    ema_params: Any  # None when config.train.ema_decay == 0
    rng: jax.Array  # uint32 key data: the run's base key; step keys fold in the step
    nonfinite_streak: jax.Array  # int32, consecutive skipped updates
    nonfinite_total: jax.Array  # int32, all skipped updates


def init_state(variables, tx: optax.GradientTransformation, *, ema: bool,
               rng: jax.Array) -> TrainState:
    """A fresh state from a model's variables (``{"params": ..., other collections}``).

    Works on logically boxed variables (to derive shardings) too.
    """
    variables = dict(variables)
    params = variables.pop("params")
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        model_state=variables,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
        rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
        else rng,
        nonfinite_streak=zero,
        nonfinite_total=zero,
    )


def _split_microbatches(batch, num_microbatches: int, mesh):
    """[B, ...] -> [M, B / M, ...], each micro-batch still split over the batch axes."""
    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"batch of {x.shape[0]} does not split into {num_microbatches} micro-batches")
        x = x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
        if mesh is None:
            return x
        axes = tuple(a for a in sharding_lib.BATCH_AXES if a in mesh.axis_names)
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, axes)))
    return jax.tree.map(split, batch)


def make_train_step(
    loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    num_microbatches: int = 1,
    ema_decay: float = 0.0,
    mesh=None,
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds ``step(state, batch, rng) -> (state, metrics)``; jit it with shardings.

    ``loss_fn(params, model_state, batch, rng, step) -> (loss, metrics, model_state)``
    returns an fp32 scalar loss that is a mean over the batch (so averaging micro-batch
    gradients is exact) and the model state after this batch (micro-batches update it
    in turn).
    """
    def loss_with_aux(params, model_state, batch, rng, step):
        loss, metrics, model_state = loss_fn(params, model_state, batch, rng, step)
        return loss, (metrics, model_state)

    grad_fn = jax.value_and_grad(loss_with_aux, has_aux=True)

    def gradients(params, model_state, batch, rng, step):
        if num_microbatches == 1:
            (loss, (metrics, model_state)), grads = grad_fn(params, model_state, batch, rng,
                                                            step)
            return loss, metrics, grads, model_state
        micro = _split_microbatches(batch, num_microbatches, mesh)

        def accumulate(carry, inputs):
            totals, model_state = carry
            index, microbatch = inputs
            (loss, (metrics, model_state)), grads = grad_fn(
                params, model_state, microbatch, jax.random.fold_in(rng, index), step)
            totals = jax.tree.map(jnp.add, totals, (loss, metrics, grads))
            return (totals, model_state), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda: grad_fn(params, model_state, first, rng, step))
        (loss_shape, (metrics_shape, _)), grads_shape = shapes
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                             (loss_shape, metrics_shape, grads_shape))
        ((loss, metrics, grads), model_state), _ = jax.lax.scan(
            accumulate, (zeros, model_state), (jnp.arange(num_microbatches), micro))
        scale = 1.0 / num_microbatches
        return (loss * scale, jax.tree.map(lambda m: m * scale, metrics),
                jax.tree.map(lambda g: g * scale, grads), model_state)

    def step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        loss, metrics, grads, model_state = gradients(
            state.params, state.model_state, batch, rng, state.step)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(state):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = state.ema_params
            if ema is not None:
                ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                   ema, params)
            return state.replace(params=params, model_state=model_state,
                                 opt_state=opt_state, ema_params=ema)

        # A conditional, not a select of new against old values: only the branch taken
        # runs, so a finite step does not read and write every parameter, moment and
        # EMA value once more.
        new_state = jax.lax.cond(finite, update, lambda state: state, state)
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        new_state = new_state.replace(
            step=state.step + 1,
            nonfinite_streak=streak,
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "update_skipped": (~finite).astype(jnp.float32),
            "nonfinite_streak": streak,
        }
        return new_state, metrics

    return step


def unbox(tree):
    """Strips logical-partitioning boxes (``nn.Partitioned``) from a tree."""
    return nn.meta.unbox(tree)
