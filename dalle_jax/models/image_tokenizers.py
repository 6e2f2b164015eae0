"""The stage-1 image tokenizers by name: ``config.model.kind`` → its module.

Both map pixels to a grid of integer codes and back with the same interface:
``encode(x_mapped) -> codes``, ``decode(codes) -> decoder statistics`` and the training
call ``(x_mapped, train=, temperature=) -> (statistics, codes, aux)``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dalle_jax import errors
from dalle_jax.models import dvae
from dalle_jax.models import vqvae

KINDS = ("dvae", "vqvae")
BACKBONES = ("dvae", "space_to_depth")


def from_config(model_config, dtype: Any = jnp.float32) -> nn.Module:
    """The module ``model_config`` describes (a stage-1 config's ``model`` section)."""
    m = model_config
    common = dict(vocab_size=m.vocab_size, n_hid=m.n_hid, n_blk_per_group=m.n_blk_per_group,
                  group_count=m.group_count, n_init=m.n_init, dtype=dtype)
    if m.kind == "dvae":
        return dvae.DiscreteVAE(straight_through=m.straight_through, **common)
    if m.kind == "vqvae":
        backbone = m.get("backbone", "dvae")
        widths = tuple(m.get("widths", ()))
        if backbone not in BACKBONES:
            raise errors.ConfigError("model.backbone", f"must be one of "
                                     f"{', '.join(BACKBONES)}; got {backbone!r}")
        if backbone == "space_to_depth" and len(widths) != m.group_count - 1:
            raise errors.ConfigError(
                "model.widths", f"the space_to_depth backbone takes one width per halving, "
                f"group_count - 1 = {m.group_count - 1} of them; got {widths}")
        return vqvae.VQVAE(code_dim=m.code_dim, vq_decay=m.vq_decay,
                           vq_restart_threshold=m.vq_restart_threshold,
                           vq_normalize=m.vq_normalize, backbone=backbone, widths=widths,
                           **common)
    raise ValueError(f"config.model.kind must be one of {', '.join(KINDS)}; got {m.kind!r}")
