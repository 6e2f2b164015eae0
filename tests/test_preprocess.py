"""Image decoding, the paper's training crop and the evaluation resizes."""
import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from dalle_jax.data import preprocess

RES = 32


def _x_ramp(height, width):
    """uint8 [H, W, 3] whose every pixel holds its column index."""
    assert width <= 256
    return tf.constant(np.broadcast_to(
        np.arange(width, dtype=np.uint8)[None, :, None], (height, width, 3)).copy())


def _seed(i):
    return tf.constant([i, 17], tf.int64)


def _encode(pixels, image_format):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def test_decode_image_gives_three_channels():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    decoded = preprocess.decode_image(tf.constant(_encode(rgb, "PNG")))
    assert decoded.dtype == tf.uint8
    np.testing.assert_array_equal(decoded.numpy(), rgb)
    decoded_gray = preprocess.decode_image(tf.constant(_encode(gray, "PNG"))).numpy()
    np.testing.assert_array_equal(decoded_gray, np.repeat(gray[..., None], 3, axis=-1))
    assert preprocess.decode_image(tf.constant(_encode(rgb, "JPEG"))).shape == (5, 7, 3)


@pytest.mark.parametrize("shape", [(60, 200), (200, 60), (40, 40), (20, 30)])
def test_output_shapes_and_dtypes_inside_tf_data(shape):
    image = _x_ramp(*shape)

    def preprocess_all(image, seed):
        return (preprocess.photo_train_crop(image, RES, seed),
                preprocess.center_crop_resize(image, RES),
                preprocess.plain_resize(image, RES))

    dataset = tf.data.Dataset.from_tensors((image, _seed(0))).map(
        lambda image, seed: preprocess_all(tf.ensure_shape(image, [None, None, 3]), seed))
    for output_spec in dataset.element_spec:
        assert output_spec.shape == (RES, RES, 3) and output_spec.dtype == tf.uint8
    for output in next(iter(dataset)):
        assert output.shape == (RES, RES, 3)


def test_photo_train_crop_is_a_function_of_the_seed():
    image = tf.constant(np.random.default_rng(1).integers(0, 256, (90, 150, 3), np.uint8))
    first = preprocess.photo_train_crop(image, RES, _seed(3)).numpy()
    np.testing.assert_array_equal(first, preprocess.photo_train_crop(image, RES, _seed(3)).numpy())
    crops = {preprocess.photo_train_crop(image, RES, _seed(i)).numpy().tobytes()
             for i in range(12)}
    assert len(crops) >= 10


@pytest.mark.parametrize("transpose", [False, True])
def test_square_crop_centre_lies_in_the_central_band(transpose):
    height, width = 60, 240  # band of centres: [90, 150]; crop starts in [60, 120]
    image = _x_ramp(height, width)
    if transpose:  # a tall image: the band runs along the rows
        image = tf.transpose(image, [1, 0, 2])
    starts = []
    for i in range(200):
        crop = preprocess.photo_square_crop(image, _seed(i)).numpy()
        assert crop.shape == (60, 60, 3)
        columns = crop[:, :, 0].T if transpose else crop[:, :, 0]
        np.testing.assert_array_equal(columns[0], np.arange(columns[0, 0], columns[0, 0] + 60))
        starts.append(int(columns[0, 0]))
    assert min(starts) >= 60 and max(starts) <= 120
    assert min(starts) < 70 and max(starts) > 110  # the whole band is used


def test_square_crop_stays_inside_a_nearly_square_image():
    image = _x_ramp(90, 100)  # band of centres [37.5, 62.5] would start at -7.5
    starts = {int(preprocess.photo_square_crop(image, _seed(i))[0, 0, 0]) for i in range(100)}
    assert min(starts) == 0 and max(starts) <= 10


def test_photo_train_crop_draws_pixels_from_the_band_only():
    image = _x_ramp(60, 240)  # the square crop covers columns [60, 180) at most
    seen = np.concatenate([preprocess.photo_train_crop(image, RES, _seed(i)).numpy().ravel()
                           for i in range(30)])
    assert seen.min() >= 60 and seen.max() <= 179


def test_photo_train_crop_resizes_to_between_res_and_nine_eighths_res():
    # A 0..255 ramp area-resized to t px steps 256 / t per column, so a res-wide
    # window spans about (res - 1) * 256 / t: 248 at t = res, 220 at t = 9/8 res.
    image = tf.constant(np.broadcast_to(
        np.arange(256, dtype=np.uint8)[None, :, None], (256, 256, 3)).copy())
    spans = {int(np.ptp(preprocess.photo_train_crop(image, RES, _seed(i)).numpy()[0, :, 0]
                        .astype(int))) for i in range(30)}
    assert min(spans) >= 218 and max(spans) <= 250
    assert len(spans) >= 4  # several sizes t are drawn


def test_center_crop_resize_of_a_known_image():
    columns = np.arange(8, dtype=np.uint8) * 10  # 0, 10, ..., 70
    image = tf.constant(np.broadcast_to(columns[None, :, None], (4, 8, 3)).copy())
    # Central 4x4 square holds columns 20..50; area resize to 2x2 averages pairs.
    result = preprocess.center_crop_resize(image, 2)
    assert result.dtype == tf.uint8
    np.testing.assert_array_equal(result.numpy()[..., 0], [[25, 45], [25, 45]])
    tall = tf.transpose(image, [1, 0, 2])
    np.testing.assert_array_equal(
        preprocess.center_crop_resize(tall, 2).numpy()[..., 0], [[25, 25], [45, 45]])


def test_plain_resize():
    image = tf.constant(np.random.default_rng(2).integers(0, 256, (RES, RES, 3), np.uint8))
    assert preprocess.plain_resize(image, RES) is image  # statically res x res

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def resize_unknown_shape(image):
        return preprocess.plain_resize(image, RES)

    np.testing.assert_array_equal(resize_unknown_shape(image).numpy(), image.numpy())
    blocks = tf.constant(np.kron(np.arange(4, dtype=np.uint8).reshape(2, 2) * 50,
                                 np.ones((4, 4), np.uint8))[..., None].repeat(3, -1))
    np.testing.assert_array_equal(
        preprocess.plain_resize(blocks, 2).numpy()[..., 0], [[0, 50], [100, 150]])
