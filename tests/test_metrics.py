"""Training metrics: peak FLOP/s, throughput, late fetches, summaries, console lines, profiler."""
import glob
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from dalle_jax.train import metrics


def _fake_device(kind):
    return types.SimpleNamespace(device_kind=kind, platform="fake")


def test_measured_matmul_flops_are_plausible():
    flops = metrics.measure_matmul_peak_flops(jnp.float32, size=256, repeats=3)
    assert math.isfinite(flops) and flops > 1e8


def test_peak_flops_on_cpu_is_measured():
    flops, source = metrics.peak_flops_per_device(jnp.float32)
    assert source == "measured matmul"
    assert math.isfinite(flops) and flops > 1e8


def test_published_peaks():
    assert metrics.device_peak_flops(_fake_device("TPU v4"), jnp.bfloat16) == 275e12
    assert metrics.device_peak_flops(_fake_device("TPU v5 lite"), jnp.bfloat16) == 197e12
    assert metrics.device_peak_flops(_fake_device("TPU v6 lite"), jnp.bfloat16) == 918e12
    assert metrics.device_peak_flops(_fake_device("NVIDIA H100 80GB HBM3"), jnp.bfloat16) == 989e12
    assert metrics.device_peak_flops(_fake_device("NVIDIA H100 PCIe"), jnp.bfloat16) == 756e12
    assert metrics.device_peak_flops(_fake_device("NVIDIA A100-SXM4-40GB"), jnp.float32) == 19.5e12
    assert metrics.device_peak_flops(_fake_device("cpu"), jnp.float32) is None
    assert metrics.device_peak_flops(_fake_device("TPU v4"), jnp.int8) is None
    flops, source = metrics.peak_flops_per_device(jnp.bfloat16, _fake_device("TPU v4"))
    assert (flops, source) == (275e12, "published TPU v4")


def test_throughput_rates_by_hand():
    throughput = metrics.Throughput(
        total_steps=1000,
        global_batch_size=64,
        flops_per_example=3e9,
        peak_flops_per_device=1e12,
        num_devices=8,
        start_step=100,
    )
    assert throughput.update(100, now=50.0) == {}
    rates = throughput.update(300, now=60.0)  # 200 steps in 10 s
    assert rates["steps_per_sec"] == pytest.approx(20.0)
    assert rates["examples_per_sec"] == pytest.approx(1280.0)
    assert rates["eta_seconds"] == pytest.approx(700 / 20.0)
    assert rates["tflops_per_device"] == pytest.approx(3e9 * 1280 / 8 / 1e12)
    assert rates["mfu"] == pytest.approx(3e9 * 1280 / (1e12 * 8))
    # Each interval stands alone: 50 steps in 5 s.
    rates = throughput.update(350, now=65.0)
    assert rates["steps_per_sec"] == pytest.approx(10.0)
    assert rates["eta_seconds"] == pytest.approx(65.0)


def test_throughput_reports_only_what_is_declared():
    base_keys = {"steps_per_sec", "examples_per_sec", "eta_seconds"}
    for flops, peak, extra in ((None, None, set()), (1e9, None, {"tflops_per_device"})):
        throughput = metrics.Throughput(
            total_steps=10,
            global_batch_size=4,
            flops_per_example=flops,
            peak_flops_per_device=peak,
            num_devices=1,
        )
        throughput.update(0, now=0.0)
        assert set(throughput.update(5, now=1.0)) == base_keys | extra
        assert throughput.update(5, now=2.0) == {}  # no steps since the last call


def test_late_fetcher_returns_the_previous_step():
    fetcher = metrics.LateFetcher()
    assert fetcher.flush() is None
    assert fetcher.push(1, {"loss": jnp.float32(1.5)}) is None
    step, values = fetcher.push(2, {"loss": jnp.float32(2.5), "lr": jnp.asarray(0.1)})
    assert step == 1 and values == {"loss": 1.5}
    assert type(values["loss"]) is float
    step, values = fetcher.push(3, {"loss": jnp.float32(3.5)})
    assert step == 2 and values == {"loss": 2.5, "lr": pytest.approx(0.1)}
    assert fetcher.flush() == (3, {"loss": 3.5})
    assert fetcher.flush() is None


def _read_events(logdir):
    """{(kind, tag): [(step, value)]} from every event file under ``logdir``."""
    found = {}
    for path in glob.glob(os.path.join(str(logdir), "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                tensor = tf.make_ndarray(value.tensor)
                tensor = tensor.item() if tensor.ndim == 0 else tensor
                found.setdefault((plugin, value.tag), []).append((event.step, tensor))
    return found


def test_metric_writer_writes_event_files(tmp_path):
    lines = []
    writer = metrics.MetricWriter(str(tmp_path / "logs"), process_index=0, console=lines.append)
    writer.write_scalars(5, {"loss": 2.5, "lr": 1e-4})
    image = np.zeros((4, 6, 3), np.uint8)
    image[1, 2] = (255, 0, 0)
    writer.write_images(5, {"single": image, "batch": np.stack([image, image, image])})
    writer.write_text(5, {"caption": "a red square"})
    writer.write_hparams({"model": {"depth": 2, "name": "tiny"}, "seed": 0})
    writer.close()

    events = _read_events(tmp_path / "logs")
    assert events[("scalars", "loss")][0][0] == 5
    assert events[("scalars", "loss")][0][1] == 2.5
    assert events[("scalars", "lr")][0][1] == pytest.approx(1e-4)
    # Image summaries hold [width, height, encoded image, ...].
    single = events[("images", "single")][0][1]
    assert single[:2].tolist() == [b"6", b"4"] and len(single) == 3
    decoded = tf.io.decode_png(single[2]).numpy()
    np.testing.assert_array_equal(decoded, image)
    assert len(events[("images", "batch")][0][1]) == 5
    assert events[("text", "caption")][0][1] == b"a red square"
    step, config_text = events[("text", "config")][0]
    assert step == 0
    assert b"`model.depth` | `2`" in config_text and b"`seed`" in config_text
    assert lines == []


def test_metric_writer_on_other_processes_is_silent(tmp_path):
    lines = []
    writer = metrics.MetricWriter(str(tmp_path / "logs"), process_index=1, console=lines.append)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"image": np.zeros((2, 2, 3), np.uint8)})
    writer.write_text(1, {"text": "x"})
    writer.write_hparams({"a": 1})
    writer.console_line(1, 10, {"loss": 1.0})
    writer.flush()
    writer.close()
    assert not (tmp_path / "logs").exists()
    assert lines == []


def test_console_line_format():
    lines = []
    writer = metrics.MetricWriter("unused", process_index=1, console=lines.append)
    writer.active = True  # prints, but has no event writer
    scalars = {
        "zeta": 12345.6,
        "eta_seconds": 3900.0,
        "mfu": 0.4123,
        "examples_per_sec": 787.2,
        "steps_per_sec": 12.3,
        "grad_norm": 1.02,
        "lr": 4.5e-4,
        "text_loss": 0.5,
        "image_loss": 3.14159,
        "loss": 2.3141,
        "alpha": 1e-5,
    }
    line = writer.console_line(1200, 50000, scalars)
    assert line == (
        "step 1200/50000 | loss 2.314 | image_loss 3.142 | text_loss 0.5 | lr 4.5e-04"
        " | grad_norm 1.02 | 12.3 steps/s | 787 ex/s | mfu 41.2% | eta 1h05m"
        " | alpha 1e-05 | zeta 12346"
    )
    assert lines == [line]


def test_number_and_duration_formats():
    assert metrics.format_number(0.0) == "0"
    assert metrics.format_number(-3.0e-4) == "-3e-04"
    assert metrics.format_number(1.23456e-5) == "1.235e-05"
    assert metrics.format_number(0.0123456) == "0.01235"
    assert metrics.format_number(float("nan")) == "nan"
    assert metrics.format_duration(42.4) == "42s"
    assert metrics.format_duration(247) == "4m07s"
    assert metrics.format_duration(2 * 86400 + 3 * 3600 + 59) == "2d03h"


def _trace_files(logdir):
    pattern = os.path.join(str(logdir), "profile", "**", "*")
    return [path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path)]


def test_profiler_window_writes_a_trace(tmp_path):
    profiler = metrics.Profiler(str(tmp_path), start_step=2, num_steps=2, process_index=0)
    square = jax.jit(lambda x: x @ x)
    x = jnp.ones((32, 32))
    for step in range(6):
        profiler.step(step)
        assert profiler.running == (2 <= step < 4)
        x = square(x / 32).block_until_ready()
    profiler.close()
    files = _trace_files(tmp_path)
    assert any(p.endswith(".xplane.pb") for p in files), files


def test_profiler_disabled(tmp_path):
    for kwargs in ({"num_steps": 0, "process_index": 0}, {"num_steps": 2, "process_index": 1}):
        profiler = metrics.Profiler(str(tmp_path), start_step=0, **kwargs)
        for step in range(3):
            profiler.step(step)
            assert not profiler.running
        profiler.close()
    assert not (tmp_path / "profile").exists()
