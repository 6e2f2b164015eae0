"""Jobs that use the input pipeline exit: no tf.data iterator blocks interpreter shutdown.

A pipeline whose tf.data graph called back into Python (the text tokenizer through
``tf.numpy_function``) could hang at exit: the finalising main thread, holding the
GIL, destroyed the iterator and waited for a worker thread that was waiting for the
GIL. It happened in a fraction of runs, so the job runs many times.
"""
import io
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from dalle_jax.data import image_records
from dalle_jax.data import text_tokenizer
from dalle_jax.train import trainer
from tests import toy_task

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = 20
EXIT_BOUND_S = 60

# Pulls two batches and exits, closing the pipeline or (the leak case) leaving it to
# interpreter shutdown with its prefetch threads still filling the buffer.
JOB = """
import sys
from dalle_jax.data import pipeline, sources, text_tokenizer
data_dir, model_path, mode = sys.argv[1:]
data = pipeline.InputPipeline(
    sources.RecordSource(data_dir, "exit", "train"), batch_size=4, image_size=8,
    text_tokenizer=text_tokenizer.TextTokenizer(model_path, text_len=12, dropout=0.1),
    prefetch=8, process_index=0, process_count=1)
if mode == "context":
    with data:
        next(data), next(data)
else:
    next(data), next(data)
print("pulled", flush=True)
"""


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A small image–caption split and a text tokenizer trained on its captions."""
    directory = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(0)
    captions = [f"example {i} is a red circle near the {('top', 'bottom', 'left')[i % 3]}"
                for i in range(64)]
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)

    def png(image):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    with image_records.SplitWriter(str(directory), "exit", "train", 4) as writer:
        for shard in range(4):
            writer.write_shard(shard, (
                image_records.encode_record(png(images[i]), captions[i], f"{i}", 16, 16)
                for i in range(shard, 64, 4)))
        writer.commit({})
    model_path = directory / "text_tokenizer.model"
    text_tokenizer.train_text_tokenizer(captions * 4, model_path, vocab_size=60)
    return str(directory), str(model_path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["leak"] * RUNS + ["context"] * 2)
def test_a_job_with_a_pipeline_exits(split, mode):
    data_dir, model_path = split
    try:
        result = subprocess.run([sys.executable, "-c", JOB, data_dir, model_path, mode],
                                cwd=ROOT, capture_output=True, text=True,
                                timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the job did not exit within {EXIT_BOUND_S}s "
                    f"(stdout: {e.stdout!r}); a tf.data iterator blocked shutdown")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pulled" in result.stdout


@pytest.mark.slow
def test_the_trainer_closes_its_data(tmp_path):
    config = toy_task.get_config("synthetic=True")
    config.update(total_steps=2, batch_size=8)
    config.optimizer.warmup_steps = 1
    config.train.eval_every = 1
    config.checkpoint.save_every = 100
    task = toy_task.ToyTask(config, str(tmp_path), None)
    opened = []

    def recorded(make):
        def make_and_record(*args, **kwargs):
            opened.append(make(*args, **kwargs))
            return opened[-1]
        return make_and_record

    task.train_data = recorded(task.train_data)
    task.eval_data = recorded(task.eval_data)
    trainer.train_and_evaluate(config, str(tmp_path), task=task, console=lambda line: None)
    assert len(opened) == 1 + 3, "the train data and an eval pass at steps 1, 2 and the end"
    assert all(data.closed for data in opened)
