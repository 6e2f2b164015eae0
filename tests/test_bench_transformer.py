"""The stage-2 benchmark tool on a tiny model: every case runs and reports sane figures."""
from __future__ import annotations

import dataclasses
import json
import math

import jax

from dalle_jax import config as config_lib
from dalle_jax.tools import bench_transformer as bench


def test_quick_benchmark_reports_every_case():
    config = bench.quick_config(config_lib.load_config_file(bench.DEFAULT_CONFIG))
    # One training dtype: each train step is a separate (slow) XLA CPU compile.
    schedule = dataclasses.replace(bench.QUICK_SCHEDULE, dtypes=("float32",))
    results = bench.measure(config, schedule, device=jax.devices()[0],
                            log=lambda line: None)

    assert results["model"]["d_model"] == 64 and results["model"]["seq_len"] == 8 + 16
    assert results["machine"]["cpu_count"] >= 1
    for dtype in schedule.dtypes:
        assert results["peak"][dtype]["flops_per_s"] > 0
        assert results["peak"][dtype]["source"]
    train = {(r["dtype"], r["batch_size"]): r for r in results["train"]}
    assert set(train) == {(d, b) for d in schedule.dtypes for b in schedule.train_batch_sizes}
    for r in train.values():
        assert r["step_s"] > 0 and r["examples_per_s"] > 0 and r["flops_per_s"] > 0
        assert math.isclose(r["examples_per_s"], r["batch_size"] / r["step_s"])
        assert 0 < r["mfu_percent"] <= 100
    assert [r["batch_size"] for r in results["sampling"]] == list(schedule.sample_batch_sizes)
    for r in results["sampling"]:
        assert r["image_tokens"] == 16
        assert r["uncached_positions_timed"] == schedule.uncached_positions
        for key in ("cached_tokens_per_s", "uncached_tokens_per_s", "cached_speedup",
                    "guidance_overhead"):
            assert r[key] > 0 and math.isfinite(r[key]), key
    assert set(results["targets"]) == {"fp32_mfu_at_least_65_percent",
                                       "cached_speedup_at_least_10x",
                                       "guidance_overhead_at_most_1_2x"}

    report = bench.format_report(results)
    assert "MFU" in report and "cached speed-up" in report
    json.dumps(results)  # JSON-ready as written by --output
