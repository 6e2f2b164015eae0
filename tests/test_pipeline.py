"""The tf.data pipeline: determinism, exact resume, lifetime, process sharding, sources,
arrays."""
import io
import json

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dalle_jax.data import code_records
from dalle_jax.data import image_records
from dalle_jax.data import pipeline as pipeline_lib
from dalle_jax.data import sources
from dalle_jax.data import text_tokenizer
from dalle_jax.train import sharding as sharding_lib
from tests import code_shards

NUM_EXAMPLES = 97  # not a multiple of any batch size below: epochs end mid-batch
SHARD_SIZES = (30, 25, 20, 12, 10)


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _example_image(i, height=24, width=24):
    """An image that encodes its example number and has structure worth cropping."""
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[0, 0] = (i, 255 - i, 7)
    return image


def _write_split(directory, name, shard_sizes):
    """Shards of the given sizes holding examples 0, 1, ... in order."""
    starts = np.cumsum((0,) + tuple(shard_sizes))
    with image_records.SplitWriter(str(directory), name, "train", len(shard_sizes)) as writer:
        for s, size in enumerate(shard_sizes):
            writer.write_shard(s, (
                image_records.encode_record(_png(_example_image(i)),
                                            f"example {i} is a red circle", f"img{i}.png",
                                            24, 24)
                for i in range(starts[s], starts[s] + size)))
        writer.commit({})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("records")
    _write_split(directory, "five", SHARD_SIZES)
    _write_split(directory, "one", (NUM_EXAMPLES,))
    _write_split(directory, "sparse", (5, 0, 0, 4))  # more shards than examples need
    return str(directory)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text_tokenizer.model"
    captions = [f"example {i} is a red circle" for i in range(NUM_EXAMPLES)]
    text_tokenizer.train_text_tokenizer(captions * 5, path, vocab_size=60)
    return text_tokenizer.TextTokenizer(path, text_len=16, dropout=0.2)


_OPEN = []  # pipelines of the running test, closed when it ends


@pytest.fixture(autouse=True)
def _close_pipelines():
    yield
    while _OPEN:
        _OPEN.pop().close()


def _pipeline(data_dir, name="five", **kwargs):
    kwargs = {"batch_size": 8, "image_size": 12, "preprocess": "photo", "seed": 3,
              "shuffle_buffer": 16, "with_captions": True, "process_index": 0,
              "process_count": 1, **kwargs}
    _OPEN.append(pipeline_lib.InputPipeline(
        sources.RecordSource(data_dir, name, "train"), **kwargs))
    return _OPEN[-1]


def _ids(batch):
    return [int(c.split()[1]) for c, m in zip(batch["caption"], batch["mask"]) if m]


def _take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_contents(data_dir, tokenizer):
    batch = next(_pipeline(data_dir, text_tokenizer=tokenizer))
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, 12, 12, 3)
    assert batch["text_tokens"].dtype == np.int32 and batch["text_tokens"].shape == (8, 16)
    assert batch["text_truncated"].shape == (8,) and batch["mask"].all()
    decoded = tokenizer.decode(batch["text_tokens"])
    for text, caption, truncated in zip(decoded, batch["caption"], batch["text_truncated"]):
        assert (caption.startswith(text) and text != caption) if truncated else text == caption


def test_deterministic_given_seed(data_dir, tokenizer):
    a = _take(_pipeline(data_dir, text_tokenizer=tokenizer), 14)
    b = _take(_pipeline(data_dir, text_tokenizer=tokenizer), 14)
    _assert_same_batches(a, b)
    c = _take(_pipeline(data_dir, text_tokenizer=tokenizer, seed=4), 14)
    assert [_ids(x) for x in a] != [_ids(x) for x in c]
    # Epochs are reshuffled: the second epoch is not the first one again.
    first, second = sum(map(_ids, a[:12]), [])[:90], sum(map(_ids, a), [])[97:187]
    assert first != second


# Mid-epoch, at the epoch boundary, later.
@pytest.mark.parametrize("stop_after", [5, pytest.param(12, marks=pytest.mark.slow),
                                        pytest.param(19, marks=pytest.mark.slow)])
def test_exact_resume(data_dir, tokenizer, stop_after):
    uninterrupted = _take(_pipeline(data_dir, text_tokenizer=tokenizer), 26)
    first = _pipeline(data_dir, text_tokenizer=tokenizer)
    head = _take(first, stop_after)
    state = first.get_state()
    state = json.loads(json.dumps(state))  # as checkpointed
    resumed = _pipeline(data_dir, text_tokenizer=tokenizer)
    resumed.set_state(state)
    tail = _take(resumed, 26 - stop_after)
    _assert_same_batches(uninterrupted, head + tail)
    assert resumed.get_state()["examples_seen"] == 26 * 8


def test_closing_releases_the_iterator_and_keeps_the_position(data_dir, tokenizer):
    uninterrupted = _take(_pipeline(data_dir, text_tokenizer=tokenizer), 10)
    with _pipeline(data_dir, text_tokenizer=tokenizer) as pipeline:
        head = _take(pipeline, 4)
    assert pipeline._iterator is None, "leaving the with block closed the pipeline"
    head += _take(pipeline, 3)  # a closed pipeline continues where it stopped
    pipeline.close()
    _assert_same_batches(uninterrupted, head + _take(pipeline, 3))


def test_the_tf_data_graph_calls_no_python(data_dir, tokenizer):
    # Python inside the graph (tf.numpy_function, tf.py_function) runs on tf.data's
    # threads and needs the GIL: it can deadlock interpreter shutdown.
    pipeline = _pipeline(data_dir, text_tokenizer=tokenizer, caption_dropout=0.1)
    graph = tf.compat.v1.GraphDef.FromString(
        pipeline._build()._as_serialized_graph().numpy())
    ops = {node.op for node in graph.node}
    ops |= {node.op for function in graph.library.function for node in function.node_def}
    assert "TFRecordDataset" in ops and "StatelessRandomUniformFullIntV2" in ops
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}, sorted(ops)


def test_code_shards_read_back_and_refuse_a_newer_format(tmp_path):
    info = code_shards.write_code_shards(str(tmp_path), {"train": 6}, image_size=16,
                                         patch=8, num_shards=2)
    source = sources.CodeSource(str(tmp_path), "shapes", "train")
    assert source.metadata["format"] == code_records.FORMAT
    assert source.metadata["code_shape"] == list(info["grid"]) == [2, 2]
    with pipeline_lib.InputPipeline(source, batch_size=6, image_size=16, train=False,
                                    num_epochs=1, with_captions=True, process_index=0,
                                    process_count=1) as pipeline:
        batch = next(pipeline)
    # Shard s holds scenes s, s + 2, ...; reading interleaves them back into order.
    scenes = [code_shards.shapes.split_scene("train", i, image_size=16) for i in range(6)]
    np.testing.assert_array_equal(
        batch["codes"], np.stack([code_shards.patch_codes(x.image, 8, 4) for x in scenes]))
    assert list(batch["caption"]) == [x.caption for x in scenes]

    path = tmp_path / code_records.metadata_name("shapes", "train")
    metadata = json.loads(path.read_text())
    legacy = {k: v for k, v in metadata.items() if k not in ("format", "format_version")}
    path.write_text(json.dumps(legacy))  # written before the format was recorded
    assert sources.CodeSource(str(tmp_path), "shapes", "train").files() == source.files()
    newer = {**metadata, "format_version": code_records.FORMAT_VERSION + 1}
    path.write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="dalle_jax.codes format version 2"):
        sources.CodeSource(str(tmp_path), "shapes", "train")
    with pytest.raises(FileNotFoundError, match="encode the dataset first"):
        sources.CodeSource(str(tmp_path), "shapes", "validation")


def test_restore_refuses_another_stream(data_dir):
    state = _pipeline(data_dir).get_state()
    with pytest.raises(ValueError, match="seed"):
        _pipeline(data_dir, seed=5).set_state(state)
    with pytest.raises(ValueError, match="process_count"):
        _pipeline(data_dir, process_count=2).set_state(state)
    with pytest.raises(ValueError, match="files_fingerprint"):
        _pipeline(data_dir, name="one").set_state(state)


@pytest.mark.parametrize("process_count", [2, 3])
@pytest.mark.parametrize("name", ["five", "one"])  # by file, and by example
def test_processes_cover_each_epoch_disjointly(data_dir, name, process_count):
    per_process = []
    for index in range(process_count):
        pipeline = _pipeline(data_dir, name=name, num_epochs=2, process_index=index,
                             process_count=process_count, preprocess="resize", image_size=16)
        assert pipeline.shard_by_file == (name == "five")
        ids = sum(map(_ids, pipeline), [])
        half = len(ids) // 2
        epoch0, epoch1 = ids[:half], ids[half:]
        assert sorted(epoch0) == sorted(epoch1), "each epoch holds the same examples"
        assert len(set(epoch0)) == len(epoch0)
        per_process.append(set(epoch0))
    union = set().union(*per_process)
    assert union == set(range(NUM_EXAMPLES))
    assert sum(len(s) for s in per_process) == NUM_EXAMPLES, "processes overlap"


def test_empty_files_are_left_out(data_dir):
    ids = []
    for index in range(4):
        pipeline = _pipeline(data_dir, name="sparse", num_epochs=1, process_index=index,
                             process_count=4, preprocess="resize", image_size=16)
        assert not pipeline.shard_by_file, "two non-empty files cannot feed 4 processes"
        ids += sum(map(_ids, pipeline), [])
    assert sorted(ids) == list(range(9))
    with pytest.raises(ValueError, match="9 examples cannot feed 10 processes"):
        _pipeline(data_dir, name="sparse", process_index=0, process_count=10)


def test_eval_stream_is_ordered_and_padded(data_dir):
    pipeline = _pipeline(data_dir, train=False, num_epochs=1, preprocess="resize",
                         image_size=24)
    batches = list(pipeline)
    assert len(batches) == -(-NUM_EXAMPLES // 8)
    assert all(b["image"].shape == (8, 24, 24, 3) for b in batches)
    assert sum(b["mask"].sum() for b in batches) == NUM_EXAMPLES
    assert not batches[-1]["mask"][NUM_EXAMPLES % 8:].any()
    ids = sum(map(_ids, batches), [])
    assert sorted(ids) == list(range(NUM_EXAMPLES))
    # Without augmentation, pixels arrive unchanged (the plain resize is the identity
    # when the size already matches): example i's marker pixel survives.
    first = batches[0]
    for image, i in zip(first["image"], _ids(first)):
        assert image[0, 0].tolist() == [i, 255 - i, 7]


def test_make_global_batch_on_a_mesh(data_dir):
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    batch = next(_pipeline(data_dir, batch_size=16, preprocess="resize", image_size=16))
    arrays = sharding_lib.make_global_batch(batch, mesh)
    assert set(arrays) == {"image", "mask"}, "captions stay on the host"
    image = arrays["image"]
    assert image.shape == (16, 16, 16, 3)
    assert image.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    # Laid out exactly as the jitted steps expect their batch.
    assert image.sharding == sharding_lib.batch_sharding(mesh)
    assert len(image.addressable_shards) == 8
    assert image.addressable_shards[0].data.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(np.asarray(image), batch["image"])


class _TinyCaptioned(tfds.core.GeneratorBasedBuilder):
    """A tfds dataset whose features are named unlike ours: several captions per image."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "picture": tfds.features.Image(shape=(24, 24, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(20):
            yield i, {"picture": _example_image(i),
                      "captions": {"text": [f"example {i} caption {j}" for j in range(3)]}}


def test_tfds_source_with_mapped_feature_names(tmp_path):
    builder = _TinyCaptioned(data_dir=str(tmp_path))
    builder.download_and_prepare(file_format="tfrecord")
    source = sources.TfdsSource(builder, "train", "picture", "captions/text")
    with pipeline_lib.InputPipeline(
            source, batch_size=20, image_size=16, preprocess="resize", seed=0, num_epochs=1,
            with_captions=True, process_index=0, process_count=1) as train:
        batch = next(train)
    assert batch["image"].shape == (20, 16, 16, 3)
    chosen = {c.rsplit(" ", 1)[-1] for c in batch["caption"]}
    assert len(chosen) > 1, "training picks among the captions"
    with pipeline_lib.InputPipeline(
            source, batch_size=20, image_size=16, preprocess="resize", train=False,
            num_epochs=1, with_captions=True, process_index=0, process_count=1) as evaluation:
        eval_batch = next(evaluation)
    assert {c.rsplit(" ", 1)[-1] for c in eval_batch["caption"]} == {"0"}
    # Every caption of every example, for training the text tokenizer.
    captions = list(sources.iter_captions(source))
    assert sorted(captions) == sorted(f"example {i} caption {j}"
                                      for i in range(20) for j in range(3))
    with pytest.raises(ValueError, match="no feature 'caption'"):
        sources.TfdsSource(builder, "train", "picture", "caption")
