"""Rematerialisation policies by the name ``config.train.remat_policy`` gives them.

A model that rematerialises its layers looks its policy up here; the training core
only passes the name through, so models import nothing from it.
"""
from __future__ import annotations

import jax

POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def policy(name: str):
    """The ``jax.checkpoint`` policy called ``name``; ``"none"`` gives None (do not
    rematerialise)."""
    if name not in POLICIES:
        raise ValueError(f"config.train.remat_policy must be one of {sorted(POLICIES)}, "
                         f"got {name!r}")
    return POLICIES[name]
