"""tfmot quantize configs for the layers `qat.quantize_model` handles itself.

Kept apart from `qat` so that the classes exist once, at module level, where
`qat.quantize_scope` can name them for deserialization. Importing this module imports
tensorflow-model-optimization; only QAT code does.
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_model_optimization as tfmot

_qk = tfmot.quantization.keras


class NoQuantizeConfig(_qk.QuantizeConfig):
    """Layers whose int8 kernels keep the input's scale: nothing to fake-quantise."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}


class OutputQuantizeConfig(NoQuantizeConfig):
    """Fake-quantises the layer's output only (SUSA, and Adds read by more than a ReLU)."""

    def get_output_quantizers(self, layer):
        return [_qk.quantizers.MovingAverageQuantizer(
            num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]


class DepthwiseKernelQuantizer(_qk.quantizers.LastValueQuantizer):
    """Per-channel int8 range for a depthwise kernel (kh, kw, C, 1).

    tfmot's conv weight quantizer is per-axis over the kernel's last axis, which for a
    depthwise kernel is the depth multiplier: one range for all C channels
    (tensorflow/model-optimization#808), while the converter quantises the BN-folded
    kernel per channel. The channel axis is moved last for the per-channel fake quant.
    """

    def __init__(self):
        super().__init__(num_bits=8, per_axis=True, symmetric=True, narrow_range=True)

    def build(self, tensor_shape, name, layer):
        kh, kw, c, m = tensor_shape
        return super().build([kh, kw, m, c], name, layer)

    def __call__(self, inputs, training, weights, **kwargs):
        swapped = tf.transpose(inputs, (0, 1, 3, 2))
        return tf.transpose(super().__call__(swapped, training, weights, **kwargs),
                            (0, 1, 3, 2))

    def get_config(self):
        return {}


class DepthwiseQuantizeConfig(NoQuantizeConfig):
    """A depthwise conv read only by its BN: per-channel kernel, no range of its own
    (the BN's output carries it, as the converter fuses the two)."""

    def get_weights_and_quantizers(self, layer):
        return [(layer.depthwise_kernel, DepthwiseKernelQuantizer())]

    def set_quantize_weights(self, layer, quantize_weights):
        layer.depthwise_kernel = quantize_weights[0]


# The names QAT models are saved with; `qat.quantize_scope` maps them back to the classes.
CONFIG_OBJECTS = {cls.__name__: cls for cls in (
    NoQuantizeConfig, OutputQuantizeConfig, DepthwiseQuantizeConfig, DepthwiseKernelQuantizer)}
