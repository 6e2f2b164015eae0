"""Optimizer and learning-rate schedules from config (optax).

AdamW with decoupled weight decay, masked off the parameters whose path matches one of
``config.optimizer.no_decay`` (gains, biases, embeddings by default, as in the paper),
clipping by global norm, and a schedule of linear warm-up followed by cosine decay,
a constant rate, or halvings at given steps (the paper's stage-2 schedule).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then ``schedule``: cosine, constant or step."""
    peak = float(opt_config.learning_rate)
    warmup = int(opt_config.warmup_steps)
    kind = opt_config.schedule
    if warmup < 0 or warmup > total_steps:
        raise ValueError(f"optimizer.warmup_steps={warmup} must be in [0, {total_steps}]")
    if kind == "cosine":
        after = optax.cosine_decay_schedule(
            peak, decay_steps=max(1, total_steps - warmup),
            alpha=float(opt_config.end_learning_rate) / peak if peak else 0.0)
    elif kind == "constant":
        after = optax.constant_schedule(peak)
    elif kind == "step":
        # Halve (times ``decay_factor``) at each of ``decay_steps``, counted from step 0.
        boundaries = {int(s) - warmup: float(opt_config.decay_factor)
                      for s in opt_config.decay_steps}
        if any(b <= 0 for b in boundaries):
            raise ValueError("optimizer.decay_steps must all come after the warm-up")
        after = optax.piecewise_constant_schedule(peak, boundaries)
    else:
        raise ValueError(
            f"optimizer.schedule must be cosine, constant or step; got {kind!r}")
    if warmup == 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), after], boundaries=[warmup])


def path_mask(patterns: Sequence[str]) -> Callable[[Any], Any]:
    """A mask function: True for leaves whose path matches none of ``patterns``."""
    compiled = [re.compile(p) for p in patterns]

    def mask(params):
        def keep(path, _):
            name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            return not any(p.search(name) for p in compiled)
        return jax.tree_util.tree_map_with_path(keep, params)

    return mask


def make_optimizer(opt_config, total_steps: int) -> tuple[optax.GradientTransformation,
                                                          optax.Schedule]:
    """The optax transformation of config, and its learning-rate schedule."""
    schedule = learning_rate_schedule(opt_config, total_steps)
    parts = []
    if opt_config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(opt_config.grad_clip_norm)))
    parts.append(optax.adamw(
        schedule,
        b1=float(opt_config.b1),
        b2=float(opt_config.b2),
        eps=float(opt_config.eps),
        weight_decay=float(opt_config.weight_decay),
        mask=path_mask(tuple(opt_config.no_decay)),
        mu_dtype=jnp.float32,
    ))
    return optax.chain(*parts), schedule
