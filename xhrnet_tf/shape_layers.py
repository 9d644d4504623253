"""Custom layers that only move values; SUSA, the one that computes, is in `layers.py`.

* `ChannelSplit`: splits the channel axis (tf_keras has no stock split layer, and a sliced
  KerasTensor becomes a SlicingOpLambda that QAT cannot handle).
* `BilinearResize`: bilinear resize with align_corners=True (SPEC 2.6), which UpSampling2D and
  tf.image.resize cannot express.
* `NearestUpsample`, `Subsample2x`: nearest up-sampling and every-other-pixel subsampling
  written with ops that XNNPACK takes in float and int8 (the stock layers' ops it does not).
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras

_PACKAGE = "xhrnet_tf"


@tf_keras.saving.register_keras_serializable(package=_PACKAGE)
class ChannelSplit(tf_keras.layers.Layer):
    """Splits the last axis into pieces of the given sizes."""

    def __init__(self, sizes, **kwargs):
        super().__init__(**kwargs)
        self.sizes = [int(s) for s in sizes]

    def build(self, input_shape):
        c = tf.TensorShape(input_shape)[-1]
        if c is not None and c != sum(self.sizes):
            raise ValueError(f"{self.name}: {c} channels cannot split into {self.sizes}")
        super().build(input_shape)

    def call(self, x):
        # Equal pieces become SPLIT, which XNNPACK delegates; SPLIT_V (uneven sizes) it does
        # not, so uneven splits are written as slices (STRIDED_SLICE) instead.
        if len(set(self.sizes)) == 1:
            return tf.split(x, len(self.sizes), axis=-1)
        bounds = [sum(self.sizes[:i]) for i in range(len(self.sizes) + 1)]
        return [x[..., a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def compute_output_shape(self, input_shape):
        shape = tf.TensorShape(input_shape)
        return [shape[:-1].concatenate([s]) for s in self.sizes]

    def get_config(self):
        config = super().get_config()
        config.update(sizes=list(self.sizes))
        return config


@tf_keras.saving.register_keras_serializable(package=_PACKAGE)
class BilinearResize(tf_keras.layers.Layer):
    """Bilinear resize to the spatial size of a reference tensor, align_corners=True.

    Called as `layer([x, reference])`; maps to TFLite RESIZE_BILINEAR(align_corners=True).
    """

    def __init__(self, align_corners: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.align_corners = bool(align_corners)

    def call(self, inputs):
        x, ref = inputs
        size = ref.shape[1:3]
        if size[0] is None or size[1] is None:
            size = tf.shape(ref)[1:3]
        out = tf.compat.v1.image.resize_bilinear(
            x, size, align_corners=self.align_corners, half_pixel_centers=False)
        return tf.cast(out, x.dtype)

    def compute_output_shape(self, input_shape):
        x_shape, ref_shape = (tf.TensorShape(s) for s in input_shape)
        return tf.TensorShape([x_shape[0], ref_shape[1], ref_shape[2], x_shape[3]])

    def get_config(self):
        config = super().get_config()
        config.update(align_corners=self.align_corners)
        return config



@tf_keras.saving.register_keras_serializable(package=_PACKAGE)
class NearestUpsample(tf_keras.layers.Layer):
    """Nearest-neighbour up-sampling by an integer factor (pixel replication).

    Written as k*k channel copies rearranged by DEPTH_TO_SPACE instead of
    RESIZE_NEAREST_NEIGHBOR: XNNPACK has no nearest resize, so each of the fuse layers'
    up-samplings would otherwise cut the delegated graph into another partition. Both ops
    have XLA kernels and gradients, so jit_compile training works too.
    """

    def __init__(self, factor: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)
        if self.factor < 1 or self.factor & (self.factor - 1):
            raise ValueError(f"NearestUpsample factor must be a power of two, got {factor}")

    def call(self, x):
        k = self.factor
        copies = x
        # XNNPACK's concatenation takes at most 4 inputs: build the k*k copies by fours.
        while copies.shape[-1] < x.shape[-1] * k * k:
            n = min(4, x.shape[-1] * k * k // copies.shape[-1])
            copies = tf.concat([copies] * n, axis=-1)
        return tf.nn.depth_to_space(copies, k)

    def compute_output_shape(self, input_shape):
        s = tf.TensorShape(input_shape)
        mul = lambda v: None if v is None else v * self.factor  # noqa: E731
        return tf.TensorShape([s[0], mul(s[1]), mul(s[2]), s[3]])

    def get_config(self):
        config = super().get_config()
        config.update(factor=self.factor)
        return config



@tf_keras.saving.register_keras_serializable(package=_PACKAGE)
class Subsample2x(tf_keras.layers.Layer):
    """Keeps every other row and column, starting at the first: out[i, j] = x[2i, 2j].

    On even sizes this is SPACE_TO_DEPTH + a channel slice, which XNNPACK and the GPU delegate
    take in float and int8; XNNPACK rejects both a 1x1 pool and a stride-2 slice, and the int8
    converter leaves a SPLIT with unused outputs in float. Odd sizes fall back to the stride-2
    slice.
    """

    def call(self, x):
        h, w = x.shape[1], x.shape[2]
        if h is not None and w is not None and h % 2 == 0 and w % 2 == 0:
            return tf.nn.space_to_depth(x, 2)[..., :x.shape[-1]]
        return x[:, ::2, ::2, :]

    def compute_output_shape(self, input_shape):
        s = tf.TensorShape(input_shape)
        half = lambda v: None if v is None else (v + 1) // 2  # noqa: E731
        return tf.TensorShape([s[0], half(s[1]), half(s[2]), s[3]])
