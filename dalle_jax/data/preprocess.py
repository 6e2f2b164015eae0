"""Image decoding and resizing as TensorFlow ops, for use inside tf.data maps.

All randomness comes from stateless ops driven by an explicit ``seed`` (an int32 or
int64 tensor of shape [2]), so the same seed always gives the same crop. Every
function returns uint8 images of static shape [res, res, 3].
"""
from __future__ import annotations

import tensorflow as tf

# Paper (DALL·E, appendix): the square crop's centre lies in this band of the long side.
CROP_CENTRE_BAND = (3 / 8, 5 / 8)
# ... and the crop is resized to a random side in [res, round(MAX_UPSCALE * res)].
MAX_UPSCALE = 9 / 8


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG or PNG → uint8 [H, W, 3]; grayscale is repeated over the channels."""
    image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8,
                               expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _area_resize(image: tf.Tensor, size) -> tf.Tensor:
    """Area resize to ``size`` × ``size``, as float32."""
    return tf.image.resize(image, tf.stack([size, size]), method="area")


def _height_width(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    shape = tf.shape(image)
    return shape[0], shape[1]


def _square_crop_at(image: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
    """The square of side min(H, W) starting ``offset`` pixels along the long side."""
    height, width = _height_width(image)
    side = tf.minimum(height, width)
    is_tall = height > width
    return tf.image.crop_to_bounding_box(
        image,
        offset_height=tf.where(is_tall, offset, 0),
        offset_width=tf.where(is_tall, 0, offset),
        target_height=side,
        target_width=side)


def photo_square_crop(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random square crop of side min(H, W) centred in the central band of the long side.

    The centre is uniform in ``CROP_CENTRE_BAND`` (as fractions of the long side) and
    the crop is then shifted, if needed, to lie inside the image.
    """
    height, width = _height_width(image)
    side = tf.minimum(height, width)
    long_side = tf.maximum(height, width)
    low, high = CROP_CENTRE_BAND
    band_position = tf.random.stateless_uniform([], seed=seed, minval=low, maxval=high)
    centre = band_position * tf.cast(long_side, tf.float32)
    offset = tf.cast(tf.round(centre - tf.cast(side, tf.float32) / 2), tf.int32)
    offset = tf.clip_by_value(offset, 0, long_side - side)
    return _square_crop_at(image, offset)


def photo_train_crop(image: tf.Tensor, res: int, seed: tf.Tensor) -> tf.Tensor:
    """The DALL·E paper's training augmentation of real photos → uint8 [res, res, 3].

    A random square crop from the central band of the long side
    (:func:`photo_square_crop`), an area resize to a random side t in
    [res, round(9/8 res)], then a random res × res crop. No flip: captions name sides.
    """
    crop_seed, size_seed, position_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=3))
    square = photo_square_crop(image, crop_seed)
    max_size = round(MAX_UPSCALE * res)
    size = tf.random.stateless_uniform(
        [], seed=size_seed, minval=res, maxval=max_size + 1, dtype=tf.int32)
    resized = _area_resize(square, size)
    cropped = tf.image.stateless_random_crop(resized, [res, res, 3], seed=position_seed)
    return _to_uint8(cropped)


def center_crop_resize(image: tf.Tensor, res: int) -> tf.Tensor:
    """Evaluation path: the central square, area-resized → uint8 [res, res, 3]."""
    height, width = _height_width(image)
    offset = (tf.maximum(height, width) - tf.minimum(height, width)) // 2
    resized = _area_resize(_square_crop_at(image, offset), res)
    resized.set_shape([res, res, 3])
    return _to_uint8(resized)


def plain_resize(image: tf.Tensor, res: int) -> tf.Tensor:
    """Area resize to res × res (no crop); images already that size pass unchanged."""
    if image.shape[0] == res and image.shape[1] == res:
        return tf.cast(image, tf.uint8)
    height, width = _height_width(image)
    resized = tf.cond(
        tf.logical_and(tf.equal(height, res), tf.equal(width, res)),
        lambda: tf.cast(image, tf.uint8),
        lambda: _to_uint8(_area_resize(image, res)))
    return tf.ensure_shape(resized, [res, res, 3])
