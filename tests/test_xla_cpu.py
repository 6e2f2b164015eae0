"""XLA:CPU compile options for the inference paths (dalle_jax.models.xla_cpu)."""
from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.models import dvae
from dalle_jax.models import xla_cpu
from tests.test_dvae import random_params

ENCODER = dvae.Encoder(n_hid=16, n_blk_per_group=2, group_count=2, vocab_size=32)


def _library_calls(hlo: str) -> list[int]:
    """Convolutions and dots inside each fusion that XLA hands to a library (YNNPACK,
    XNNPACK, oneDNN), one count per call site in the compiled HLO text."""
    bodies = {}
    for match in re.finditer(r"^%([\w.\-]+) \(.*?\n}", hlo, re.S | re.M):
        bodies[match.group(1)] = match.group(0)
    counts = []
    for line in hlo.splitlines():
        call = re.search(r"calls=%([\w.\-]+)", line)
        if call and re.search(r'"kind":"__(ynn|xnn|onednn)_fusion"', line):
            body = bodies[call.group(1)]
            counts.append(len(re.findall(r" (convolution|dot)\(", body)))
    return counts


@pytest.fixture(scope="module")
def encoder_inputs():
    params = random_params(ENCODER, (1, 32, 32, 3))
    x = dvae.map_pixels(jax.random.uniform(jax.random.key(0), (2, 32, 32, 3)))
    return {"params": params}, x


def test_inference_options_are_given_on_the_cpu_only_where_accepted(caplog):
    assert jax.default_backend() == "cpu"
    options = xla_cpu.inference_options()
    if options is not None:
        assert options == dict(xla_cpu.PER_OP_LIBRARY_CALLS)
    assert xla_cpu.inference_options({}) is None
    with caplog.at_level(logging.WARNING):
        assert xla_cpu.inference_options({"xla_cpu_no_such_option": "1"}) is None
    assert "not accepted" in caplog.text and "xla_cpu_no_such_option" in caplog.text


def test_per_op_library_calls_give_the_same_logits_one_convolution_per_call(encoder_inputs):
    variables, x = encoder_inputs
    options = xla_cpu.inference_options()
    if options is None:
        pytest.skip(f"jax {jax.__version__} does not accept {dict(xla_cpu.PER_OP_LIBRARY_CALLS)}")
    default = jax.jit(ENCODER.apply)
    per_op = jax.jit(ENCODER.apply, compiler_options=options)
    np.testing.assert_allclose(per_op(variables, x), default(variables, x), atol=1e-5)
    calls = _library_calls(per_op.lower(variables, x).compile().as_text())
    assert calls and max(calls) == 1, calls
    merged = _library_calls(default.lower(variables, x).compile().as_text())
    assert sum(merged) == sum(calls), "the same convolutions and dots, grouped differently"


def test_xla_cpu_jit_builds_on_first_call_and_keeps_static_arguments(encoder_inputs):
    variables, x = encoder_inputs
    calls = []

    def apply(module, variables, x):
        calls.append(1)  # once per trace
        return module.apply(variables, x)

    jitted = xla_cpu.jit(apply, static_argnums=0)
    assert jitted.jitted.cache_info().currsize == 0  # nothing built at definition
    first = jitted(ENCODER, variables, x)
    jitted(ENCODER, variables, x)
    assert len(calls) == 1
    np.testing.assert_allclose(first, jax.jit(ENCODER.apply)(variables, x), atol=1e-5)
    assert first.dtype == jnp.float32 and first.shape == (2, 16, 16, 32)
