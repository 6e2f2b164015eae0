"""XLA:CPU compile options for inference through the full-size convolutional nets.

On the CPU, XLA (jax 0.10) sends convolutions and matmuls to the YNNPACK library. By
default it also merges runs of them, with the element-wise ops in between, into larger
YNNPACK subgraphs (``LIBRARY_FUSION_TYPE_DOT``): for the released dVAE encoder at 256 px
that puts a whole residual group into one subgraph. Those merged subgraphs run slower
than one YNNPACK call per convolution and per matmul, with XLA's own loops for the
element-wise ops between them. :data:`PER_OP_LIBRARY_CALLS` asks for the latter;
BENCHMARKS.md ("Stage 1: dVAE encoder throughput") has the side-by-side figures. Training
the small shapes tokenizers does not gain from it, so only the inference paths (encoding,
decoding, the encoder benchmark) use it.

The options are XLA debug options with no stable API: :func:`inference_options` gives
them only on the CPU backend and only where this jaxlib accepts them (probed once per
process); elsewhere it gives ``None``, which ``jax.jit`` reads as no options.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

PER_OP_LIBRARY_CALLS: Mapping[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


@functools.lru_cache(maxsize=None)
def _accepted(items: tuple[tuple[str, str], ...]) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(items)).lower(
            jnp.zeros((), jnp.float32)).compile()
    except Exception as error:  # an unknown option or value: XLA raises at compile time
        logging.warning("XLA:CPU compile options %s not accepted by jax %s (%s); "
                        "compiling with XLA's defaults", dict(items), jax.__version__,
                        str(error).splitlines()[0])
        return False
    return True


def inference_options(
        options: Mapping[str, str] = PER_OP_LIBRARY_CALLS) -> dict[str, str] | None:
    """``options`` when the default backend is the CPU and this jaxlib accepts them, else
    None (XLA's defaults)."""
    if jax.default_backend() != "cpu" or not options:
        return None
    items = tuple(sorted(options.items()))
    return dict(items) if _accepted(items) else None


def jit(fun: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fun, **jit_kwargs)`` compiled with :func:`inference_options`, built on
    the first call (so that importing a module never starts a backend)."""

    @functools.cache
    def jitted():
        return jax.jit(fun, compiler_options=inference_options(), **jit_kwargs)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return jitted()(*args, **kwargs)

    call.jitted = jitted  # the underlying jitted function, e.g. for .lower()
    return call
