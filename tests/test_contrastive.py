"""The contrastive model: its losses, the chunked sigmoid loss on a mesh, the task."""
import math

import jax
import numpy as np
import pytest

from dalle_jax import errors
from dalle_jax.config import load_config_file
from dalle_jax.evaluation import contrastive as evaluation_lib
from dalle_jax.models import contrastive
from dalle_jax.stages import contrastive as stage
from dalle_jax.train import sharding as sharding_lib
from dalle_jax.train import trainer

# Three images and three captions, unit vectors in 2-d; their cosines are written out
# below.
Z_IMG = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
Z_TXT = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
# cos(image i, caption j):
COS = [[1.0, 0.6, 0.0],
       [0.0, 0.8, 1.0],
       [0.6, 1.0, 0.8]]


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_sigmoid_loss_by_hand():
    t, b = 10.0, -10.0
    expected = 0.0
    for i in range(3):
        for j in range(3):
            y = 1.0 if i == j else -1.0
            expected -= _log_sigmoid(y * (t * COS[i][j] + b))
    expected /= 3  # per image
    got = contrastive.sigmoid_loss(Z_IMG, Z_TXT, math.log(t), b)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # A padding row (weight 0) leaves the loss of the other two pairs.
    w = np.array([1.0, 1.0, 0.0], np.float32)
    expected2 = -sum(_log_sigmoid((1.0 if i == j else -1.0) * (t * COS[i][j] + b))
                     for i in range(2) for j in range(2)) / 2
    assert float(contrastive.sigmoid_loss(Z_IMG, Z_TXT, math.log(t), b, w)) == pytest.approx(
        expected2, rel=1e-5)


def test_softmax_loss_by_hand():
    t = 5.0
    i2t = [-math.log(math.exp(t * COS[i][i]) / sum(math.exp(t * COS[i][j]) for j in range(3)))
           for i in range(3)]
    t2i = [-math.log(math.exp(t * COS[j][j]) / sum(math.exp(t * COS[i][j]) for i in range(3)))
           for j in range(3)]
    expected = (sum(i2t) + sum(t2i)) / 6
    got = contrastive.softmax_loss(Z_IMG, Z_TXT, math.log(t), 123.0)  # bias cancels
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_chunked_sigmoid_loss_equals_the_whole_matrix_on_8_devices():
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    z_img = rng.normal(size=(32, 16)).astype(np.float32)
    z_txt = rng.normal(size=(32, 16)).astype(np.float32)
    z_img /= np.linalg.norm(z_img, axis=1, keepdims=True)
    z_txt /= np.linalg.norm(z_txt, axis=1, keepdims=True)
    weights = np.ones((32,), np.float32)
    weights[-3:] = 0.0  # padding rows
    log_t, bias = np.float32(math.log(8.0)), np.float32(-3.0)
    whole = contrastive.sigmoid_loss(z_img, z_txt, log_t, bias, weights)
    grad_whole = jax.grad(contrastive.sigmoid_loss, argnums=(0, 1, 2, 3))(
        z_img, z_txt, log_t, bias, weights)
    for shape in (dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1),
                  dict(data=4, fsdp=1, tensor=2)):
        mesh = sharding_lib.make_mesh(_mesh_config(**shape))
        batch = sharding_lib.batch_sharding(mesh)
        args = [jax.device_put(a, batch) for a in (z_img, z_txt)]
        w = jax.device_put(weights, batch)
        fn = jax.jit(lambda a, b_, lt, bb, ww: contrastive.sigmoid_loss_chunked(
            a, b_, lt, bb, ww, mesh, sharding_lib.BATCH_AXES))
        assert float(fn(*args, log_t, bias, w)) == pytest.approx(float(whole), rel=1e-5)
        grads = jax.jit(jax.grad(lambda a, b_, lt, bb: contrastive.sigmoid_loss_chunked(
            a, b_, lt, bb, w, mesh, sharding_lib.BATCH_AXES), argnums=(0, 1, 2, 3)))(
                *args, log_t, bias)
        for g, ref in zip(grads, grad_whole):
            np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-6)
        # No device computes the whole [32, 32] matrix: each block is [n, n] with n the
        # local batch.
        hlo = fn.lower(*args, log_t, bias, w).compile().as_text()
        assert "f32[32,32]" not in hlo


def _mesh_config(**shape):
    import ml_collections
    return ml_collections.ConfigDict(dict(dcn_data=1, **shape))


def test_retrieval_recalls_count_equal_captions_as_one():
    z = np.eye(4, dtype=np.float32)
    perfect = evaluation_lib.retrieval_recalls(z, z, ks=(1,))
    assert perfect == {"image_to_text_r@1": 1.0, "text_to_image_r@1": 1.0}
    swapped = z[[1, 0, 2, 3]]  # captions 0 and 1 exchanged
    r = evaluation_lib.retrieval_recalls(z, swapped, ks=(1, 2))
    assert r["image_to_text_r@1"] == 0.5 and r["image_to_text_r@2"] == 1.0
    # ... unless they are the same caption.
    assert evaluation_lib.retrieval_recalls(z, swapped, ks=(1,),
                                         image_ids=np.array([7, 7, 2, 3])) == perfect


def _tiny_config():
    config = load_config_file("configs/contrastive_shapes.py:runlocal")
    config.data.image_size = 16
    config.model.update(image_widths=(8, 16))
    return config


def test_a_tiny_model_learns_to_retrieve_on_a_toy_set():
    """Eight colours, one caption each: after training, each image's best caption is
    its own far above chance (1/8)."""
    config = _tiny_config()
    config.model.update(text_layers=1, embed_dim=16)
    cfg = stage.model_config(config)
    model = contrastive.ContrastiveModel(cfg)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                        [255, 0, 255], [0, 255, 255], [255, 255, 255], [128, 64, 0]],
                       np.uint8)
    images = np.zeros((8, 16, 16, 3), np.uint8)
    images[:, 4:12, 4:12] = colours[:, None, None]
    tokens = np.zeros((8, cfg.text_len), np.int32)
    tokens[:, 0] = np.arange(2, 10)  # one token per caption
    tokens[:, 1] = 11
    variables = stage.init_variables(model, jax.random.key(0))
    import optax
    tx = optax.adam(3e-3)
    params = variables["params"]
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss_fn(p):
            zi, zt, lt, b = model.apply({"params": p}, images, tokens)
            return contrastive.sigmoid_loss(zi, zt, lt, b)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    zi, zt, _, _ = model.apply({"params": params}, images, tokens)
    before = evaluation_lib.retrieval_recalls(zi, zt, ks=(1,))
    for _ in range(150):
        params, opt, loss = step(params, opt)
    zi = model.apply({"params": params}, images, method="embed_images")
    zt = model.apply({"params": params}, tokens, method="embed_texts")
    np.testing.assert_allclose(np.linalg.norm(np.asarray(zi), axis=1), 1.0, rtol=1e-5)
    after = evaluation_lib.retrieval_recalls(zi, zt, ks=(1,))
    assert after["image_to_text_r@1"] >= 0.75 and after["text_to_image_r@1"] >= 0.75, (
        before, after)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_the_task_trains_on_a_mesh_and_reports_retrieval(loss):
    config = _tiny_config()
    config.contrastive.loss = loss
    config.mesh.update(data=4, fsdp=2, tensor=1)
    mesh = sharding_lib.make_mesh(config.mesh)
    task = stage.ContrastiveTask(config, None, mesh)
    assert task.flops_per_example > 0
    training = trainer.build(config, task, mesh, sharding_lib.logical_rules(config.sharding))
    state = training.init(jax.random.key(0))
    rng = jax.random.key_data(jax.random.key(1))
    r = np.random.default_rng(0)
    images = r.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    tokens = np.zeros((16, 32), np.int32)
    tokens[:, :3] = r.integers(2, 500, (16, 3))
    batch = {"image": images, "text_tokens": tokens, "mask": np.ones((16,), bool)}
    losses = []
    for _ in range(6):
        state, metrics = training.train_step(state, batch, rng)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert {"temperature", "bias", "positive_logit"} <= set(metrics)
    _, eval_metrics = training.eval_step(state.params, state.model_state, batch, state.step)
    assert {"image_to_text_r@1", "text_to_image_r@10"} <= set(eval_metrics)
    assert float(eval_metrics["text_to_image_r@10"]) >= float(eval_metrics["text_to_image_r@1"])


def test_an_unknown_loss_is_a_config_error():
    config = _tiny_config()
    config.contrastive.loss = "triplet"
    with pytest.raises(errors.ConfigError, match="contrastive.loss"):
        stage.ContrastiveTask(config, None, None)


def test_every_parameter_has_logical_axis_names():
    import flax.linen as nn
    config = _tiny_config()
    model = contrastive.ContrastiveModel(stage.model_config(config))
    boxed = jax.eval_shape(lambda k: stage.init_variables(model, k), jax.random.key(0))
    leaves = jax.tree.leaves(boxed["params"],
                             is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == len(x.value.shape) for x in leaves)
