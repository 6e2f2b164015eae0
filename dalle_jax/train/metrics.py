"""Training metrics: peak FLOP/s, throughput and MFU, late device fetches, TensorBoard
summaries with console lines, and a profiler window."""
from __future__ import annotations

import logging
import math
import os
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no sparsity) peak FLOP/s per JAX device, keyed by precision class. One JAX
# device is one chip on TPU v4 and later (megacore) and one GPU on NVIDIA.
_TPU_PEAK_BF16 = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,  # v5p as some runtimes spell it
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}

# (model, variant substring or None, {"bf16": ..., "fp32": ...}); the first row whose
# model and variant both occur in the device kind wins, so variants come first.
# fp32 is the non-tensor-core figure.
_GPU_PEAKS: tuple[tuple[str, str | None, dict[str, float]], ...] = (
    ("a100", None, {"bf16": 312e12, "fp32": 19.5e12}),
    ("h100", "pcie", {"bf16": 756e12, "fp32": 51e12}),
    ("h100", "nvl", {"bf16": 835e12, "fp32": 60e12}),
    ("h100", None, {"bf16": 989e12, "fp32": 67e12}),
    ("h200", "nvl", {"bf16": 835e12, "fp32": 60e12}),
    ("h200", None, {"bf16": 989e12, "fp32": 67e12}),
)


def counted_flops(fn: Callable[..., Any], *args: Any) -> float:
    """FLOPs of ``fn(*args)`` as XLA counts them on the lowered computation (``args``
    may be ``jax.ShapeDtypeStruct``s); 0 where the backend gives no count."""
    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def _precision_class(dtype: Any) -> str | None:
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "bf16"
    if dtype == jnp.dtype(jnp.float32):
        return "fp32"
    return None


def _time_matmul(dtype: Any, size: int, repeats: int, device: jax.Device | None) -> float:
    """Median FLOP/s of ``repeats`` jitted ``size``-square matmuls on ``device``."""
    if size <= 0 or repeats <= 0:
        raise ValueError(f"size and repeats must be positive, got {size} and {repeats}")
    device = device or jax.local_devices()[0]
    # Non-trivial values so no backend can shortcut the product.
    rng = np.random.default_rng(0)
    a = jax.device_put(jnp.asarray(rng.standard_normal((size, size)), dtype), device)
    b = jax.device_put(jnp.asarray(rng.standard_normal((size, size)), dtype), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile and warm caches outside the timing
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds)


def measure_matmul_peak_flops(
    dtype: Any = jnp.float32, size: int = 1024, repeats: int = 5
) -> float:
    """FLOP/s of one device for a jitted square matmul (2·n³ flops), median of repeats.

    Stands in for the peak where no published figure exists (CPU); a matmul this size
    is close to the best sustained rate a model can reach there.
    """
    return _time_matmul(dtype, size, repeats, device=None)


def device_peak_flops(device: jax.Device, dtype: Any) -> float | None:
    """Published dense peak FLOP/s of one device, or None when the kind is unknown.

    bf16 and fp16 use the bf16 figure. On TPU, fp32 also uses it: float32 matmuls at
    JAX's default precision run as single bf16 passes on the MXU.
    """
    precision = _precision_class(dtype)
    if precision is None:
        return None
    kind = str(getattr(device, "device_kind", "")).strip().lower()
    if kind in _TPU_PEAK_BF16:
        return _TPU_PEAK_BF16[kind]
    for model, variant, peaks in _GPU_PEAKS:
        if model in kind and (variant is None or variant in kind):
            return peaks.get(precision)
    return None


def peak_flops_per_device(dtype: Any, device: jax.Device | None = None) -> tuple[float, str]:
    """Peak FLOP/s of ``device`` (default: the first local one) and where it came from.

    The published figure when the device kind is known, otherwise a matmul measured
    on that device. The source reads ``"published <kind>"`` or ``"measured matmul"``.
    """
    device = device or jax.local_devices()[0]
    published = device_peak_flops(device, dtype)
    if published is not None:
        return published, f"published {device.device_kind}"
    return _time_matmul(dtype, 1024, 5, device), "measured matmul"


class Throughput:
    """Steps/s, examples/s, ETA and model FLOP utilisation over the last logging interval."""

    def __init__(
        self,
        *,
        total_steps: int,
        global_batch_size: int,
        flops_per_example: float | None,
        peak_flops_per_device: float | None,
        num_devices: int,
        start_step: int = 0,
    ):
        if global_batch_size <= 0 or num_devices <= 0:
            raise ValueError("global_batch_size and num_devices must be positive")
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.flops_per_example = flops_per_example
        self.peak_flops_per_device = peak_flops_per_device
        self.num_devices = num_devices
        self.start_step = start_step
        self._last: tuple[int, float] | None = None

    def update(self, step: int, now: float | None = None) -> dict[str, float]:
        """Rates since the previous call (``now`` defaults to a monotonic clock).

        The first call only sets the origin and returns ``{}``; so does a call with no
        steps or no time since the previous one.
        """
        if step < self.start_step:
            raise ValueError(f"step {step} is before start_step {self.start_step}")
        now = time.perf_counter() if now is None else now
        last, self._last = self._last, (step, now)
        if last is None:
            return {}
        steps, seconds = step - last[0], now - last[1]
        if steps <= 0 or seconds <= 0:
            return {}
        steps_per_sec = steps / seconds
        examples_per_sec = steps_per_sec * self.global_batch_size
        rates = {
            "steps_per_sec": steps_per_sec,
            "examples_per_sec": examples_per_sec,
            "eta_seconds": max(self.total_steps - step, 0) / steps_per_sec,
        }
        if self.flops_per_example is not None:
            flops_per_device = self.flops_per_example * examples_per_sec / self.num_devices
            rates["tflops_per_device"] = flops_per_device / 1e12
            if self.peak_flops_per_device:
                rates["mfu"] = flops_per_device / self.peak_flops_per_device
        return rates


def _to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    fetched = jax.device_get(dict(metrics))
    return {name: float(np.asarray(value)) for name, value in fetched.items()}


class LateFetcher:
    """Fetches a step's on-device metrics one step later, so logging never blocks the device.

    By the time step ``n + 1`` has been dispatched, step ``n`` has usually finished, so
    reading its metrics does not stall the queue of work in flight.
    """

    def __init__(self):
        self._pending: tuple[int, dict[str, Any]] | None = None

    def push(self, step: int, metrics: Mapping[str, Any]) -> tuple[int, dict[str, float]] | None:
        """Stores this step's device metrics; returns the previous push, fetched."""
        for value in metrics.values():
            if isinstance(value, jax.Array):
                value.copy_to_host_async()  # the fetch a step later then finds it on host
        previous, self._pending = self.flush(), (step, dict(metrics))
        return previous

    def flush(self) -> tuple[int, dict[str, float]] | None:
        """The pending step and its metrics, fetched; None when nothing is pending."""
        if self._pending is None:
            return None
        (step, metrics), self._pending = self._pending, None
        return step, _to_floats(metrics)


def flatten_dict(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (or a ConfigDict) as ``{"a.b.c": leaf}``."""
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if hasattr(value, "to_dict") or isinstance(value, Mapping):
            flat.update(flatten_dict(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def format_number(value: float, digits: int = 4) -> str:
    """About ``digits`` significant digits; e-notation for tiny values, whole large ones."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if magnitude >= 10 ** (digits - 1):
        return f"{value:.0f}"
    if magnitude < 1e-3:
        mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"
    return f"{value:.{digits}g}"


def format_duration(seconds: float) -> str:
    """``2d03h``, ``1h05m``, ``4m07s`` or ``42s``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(int(round(seconds)), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


# Throughput keys in console order, each with how its value is shown.
_THROUGHPUT_FORMATS: dict[str, Callable[[float], str]] = {
    "steps_per_sec": lambda v: f"{format_number(v, 3)} steps/s",
    "examples_per_sec": lambda v: f"{format_number(v, 3)} ex/s",
    "tflops_per_device": lambda v: f"{format_number(v, 3)} TFLOP/s/dev",
    "mfu": lambda v: f"mfu {100 * v:.1f}%",
    "eta_seconds": lambda v: f"eta {format_duration(v)}",
}


def _console_order(names: list[str]) -> list[str]:
    losses = sorted(n for n in names if "loss" in n and n != "loss")
    leading = ["loss", *losses, "lr", "grad_norm", *_THROUGHPUT_FORMATS]
    known = [n for n in leading if n in names]
    return known + sorted(set(names) - set(known))


# SummaryMetadata.DataClass values (tensorflow/core/framework/summary.proto).
_SUMMARY_DATA_CLASSES = {"scalars": 1, "text": 2, "images": 3}  # scalar, tensor, blob sequence


def truncate_event_files(logdir: str, after_step: int) -> int:
    """Drops the events of steps after ``after_step`` from ``logdir``'s event files.

    A run resumed from step s redoes the steps after s; without this TensorBoard
    would draw those steps twice (once from the interrupted run's file). Each file
    that has such events is rewritten under a temporary name and renamed over the
    original. A record cut short by a kill ends the file. Returns the events dropped.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top

    dropped = 0
    for path in sorted(tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        kept, dropped_here = [], 0
        try:
            for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
                event = event_pb2.Event.FromString(record)
                if event.step > after_step:
                    dropped_here += 1
                else:
                    kept.append(record)
        except tf.errors.DataLossError:
            dropped_here += 1  # a truncated last record
        if not dropped_here:
            continue
        tmp = os.path.join(logdir, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        with tf.io.TFRecordWriter(tmp) as writer:
            for record in kept:
                writer.write(record)
        tf.io.gfile.rename(tmp, path, overwrite=True)
        dropped += dropped_here
    return dropped


class MetricWriter:
    """TensorBoard event files plus concise console lines; only process 0 writes.

    ``start_step`` is the step a resumed run starts from: events the interrupted run
    wrote after it are dropped first, so that TensorBoard shows one curve.
    """

    def __init__(
        self,
        logdir: str,
        *,
        process_index: int | None = None,
        console: Callable[[str], Any] = print,
        start_step: int | None = None,
    ):
        self.logdir = str(logdir)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.console = console
        self.active = self.process_index == 0
        self._writer = None
        if self.active:
            import tensorflow as tf  # imported only where it writes: it is slow to load

            self._tf = tf
            if start_step is not None and tf.io.gfile.isdir(self.logdir):
                truncate_event_files(self.logdir, start_step)
            self._writer = tf.summary.create_file_writer(self.logdir)

    def _write(self, tag: str, tensor: Any, plugin: str) -> None:
        """One summary in the layout TensorBoard's ``plugin`` reads.

        tf.summary.scalar/image/text live in the tensorboard package, which
        tensorflow-cpu does not install; tf.summary.write with the plugin's metadata
        produces the same records.
        """
        metadata = self._tf.compat.v1.SummaryMetadata()
        metadata.plugin_data.plugin_name = plugin
        metadata.data_class = _SUMMARY_DATA_CLASSES[plugin]
        self._tf.summary.write(tag, tensor, metadata=metadata)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for name, value in scalars.items():
                self._write(name, self._tf.constant(float(value), self._tf.float32), "scalars")

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Each value is uint8[H, W, 3] or uint8[N, H, W, 3]; all N are written."""
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for name, image in images.items():
                image = np.asarray(image)
                if image.ndim == 3:
                    image = image[None]
                if image.ndim != 4 or image.shape[-1] != 3 or image.dtype != np.uint8:
                    raise ValueError(
                        f"image {name!r} must be uint8[H, W, 3] or uint8[N, H, W, 3], "
                        f"got {image.dtype}{image.shape}"
                    )
                encoded = [self._tf.image.encode_png(frame) for frame in image]
                size = [str(image.shape[2]).encode(), str(image.shape[1]).encode()]
                self._write(name, self._tf.stack(size + encoded), "images")

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for name, text in texts.items():
                self._write(name, self._tf.constant(str(text)), "text")

    def write_hparams(self, config_dict: Mapping, step: int = 0) -> None:
        """The flattened config as a Markdown table under the ``config`` text tag, at
        the step the run starts from."""
        if self._writer is None:
            return
        flat = sorted(flatten_dict(config_dict).items())
        rows = [f"| `{key}` | `{value!r}` |" for key, value in flat]
        self.write_text(step, {"config": "\n".join(["| key | value |", "|---|---|", *rows])})

    def console_line(self, step: int, total_steps: int, scalars: Mapping[str, float]) -> str:
        """Formats ``scalars`` into one line, prints it on process 0 and returns it."""
        parts = [f"step {step}/{total_steps}"]
        for name in _console_order(list(scalars)):
            value = float(scalars[name])
            if name in _THROUGHPUT_FORMATS:
                parts.append(_THROUGHPUT_FORMATS[name](value))
            else:
                parts.append(f"{name} {format_number(value)}")
        line = " | ".join(parts)
        if self.active:
            self.console(line)
        return line

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Profiler:
    """A profiler window from config: traces steps [start_step, start_step + num_steps) into
    <logdir>/profile (jax.profiler.start_trace/stop_trace); disabled when num_steps == 0;
    only process 0 unless all_processes.

    Work is dispatched asynchronously, so the trace stops when the host reaches the
    window's end; device work of the last step still running then may be cut short.
    """

    def __init__(
        self,
        logdir: str,
        *,
        start_step: int,
        num_steps: int,
        process_index: int | None = None,
        all_processes: bool = False,
    ):
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        process_index = jax.process_index() if process_index is None else process_index
        self.trace_dir = os.path.join(str(logdir), "profile")
        self.start_step = start_step
        self.end_step = start_step + num_steps
        self.enabled = num_steps > 0 and (all_processes or process_index == 0)
        self.running = False
        self._done = False

    def step(self, step: int) -> None:
        """Call once per step, before running step ``step``."""
        if not self.enabled or self._done:
            return
        if self.running and step >= self.end_step:
            self.close()
        elif not self.running and self.start_step <= step < self.end_step:
            # A resumed run that starts inside the window still traces its remainder.
            try:
                jax.profiler.start_trace(self.trace_dir)
            except RuntimeError as error:  # a trace started elsewhere must not stop training
                logging.warning("Profiler not started: %s", error)
                self._done = True
                return
            self.running = True
        elif step >= self.end_step:
            self._done = True

    def close(self) -> None:
        """Stops a running trace (its files are written now)."""
        if self.running:
            jax.profiler.stop_trace()
            self.running = False
            self._done = True
