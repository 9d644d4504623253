"""Quantization-aware training with tensorflow-model-optimization.

`quantize_model(model)` returns the QAT model (tfmot's default 8-bit scheme) and a report of
how every layer is handled. tfmot knows the stock layers; the package's custom layers get
quantize configs here:

* `SUSA`: rebuilt with `fake_quant=True`, which puts a moving-average int8 range on every
  internal tensor (query, softmax pieces, products, LayerNorm pieces, gate), and its output
  is fake-quantised by its quantize config. Its kernels are computed from several variables
  (the query kernel is group weights x mean kernel; the LayerNorm mean is folded into the
  conv), so the converter quantises them per channel from their trained float values.
* `ChannelSplit`, `NearestUpsample`, `BilinearResize`, `Subsample2x`: move or interpolate
  values without changing their range, so the int8 kernels keep the input's scale; no
  quantiser is needed and none is added.

`print_report` says which layers got which treatment, so nothing stays float unannounced.
"""
from __future__ import annotations

import collections
import functools
from typing import Dict, List, Tuple

import tf_keras

from xhrnet_tf.layers import (CUSTOM_OBJECTS, SUSA, BilinearResize, ChannelSplit,
                              NearestUpsample, Subsample2x)

_PASSTHROUGH = (ChannelSplit, NearestUpsample, BilinearResize, Subsample2x)
# Stock layers whose int8 kernels must keep their input's scale. tfmot would give Reshape and
# Permute an output quantiser of their own, whose range then disagrees with the input's and
# the converter fails on the same-scale constraint of RESHAPE/TRANSPOSE.
_STOCK_PASSTHROUGH = (tf_keras.layers.Reshape, tf_keras.layers.Permute)


def _tfmot():
    import tensorflow_model_optimization as tfmot  # pylint: disable=import-outside-toplevel
    return tfmot.quantization.keras


@functools.lru_cache(maxsize=None)
def _config_classes():
    qk = _tfmot()

    class NoQuantizeConfig(qk.QuantizeConfig):
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
            return [qk.quantizers.MovingAverageQuantizer(
                num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]

    return NoQuantizeConfig, OutputQuantizeConfig


def quantize_scope():
    """Scope in which QAT models (and their checkpoints) deserialize."""
    no_quant, out_quant = _config_classes()
    objects = dict(CUSTOM_OBJECTS, NoQuantizeConfig=no_quant, OutputQuantizeConfig=out_quant)
    return _tfmot().quantize_scope(objects)


def _shared_add(layer) -> bool:
    """An Add whose sum is read by more than its ReLU (z0 of the official fuse, SPEC 5.3).

    tfmot quantises Add+ReLU at the ReLU's output only, which would leave this sum without a
    range and the converter would run that Add in float."""
    return isinstance(layer, tf_keras.layers.Add) and len(layer._outbound_nodes) > 1  # pylint: disable=protected-access


_REASONS = {
    "susa": ("custom", "output and all internal tensors fake-quantised; kernels quantised per "
                       "channel by the converter"),
    "shared_add": ("custom", "sum read by more than its ReLU: output fake-quantised"),
    "passthrough": ("passthrough", "int8 kernel keeps the input scale"),
    "relu_input": ("passthrough", "x2 before the fuse's ReLU: the converter fuses the two, "
                                  "which then take the ReLU's range"),
    "scale": ("custom", "constant rescaling: output fake-quantised"),
    "default": ("default", "tfmot 8-bit scheme (per-channel weights; conv+BN(+ReLU) "
                           "quantised as one)"),
}


def _classify(layer) -> str:
    """How QAT treats a layer: one of the keys of _REASONS."""
    if isinstance(layer, SUSA):
        return "susa"
    if _shared_add(layer):
        return "shared_add"
    if isinstance(layer, _PASSTHROUGH + _STOCK_PASSTHROUGH):
        return "passthrough"
    if isinstance(layer, tf_keras.layers.Rescaling):
        consumers = [node.outbound_layer for node in layer._outbound_nodes]  # pylint: disable=protected-access
        if len(consumers) == 1 and isinstance(consumers[0], tf_keras.layers.ReLU):
            return "relu_input"
        return "scale"
    return "default"


def describe(model: tf_keras.Model) -> List[Tuple[str, str, str]]:
    """(layer, treatment, why) for every layer of the float model."""
    return [(layer.name,) + _REASONS[_classify(layer)] for layer in model.layers
            if not isinstance(layer, tf_keras.layers.InputLayer)]


def quantize_model(model: tf_keras.Model) -> Tuple[tf_keras.Model, List[Tuple[str, str, str]]]:
    """QAT version of a float X-HRNet (its weights included) and the per-layer report."""
    qk = _tfmot()
    no_quant, out_quant = _config_classes()
    configs = {"susa": out_quant, "shared_add": out_quant, "passthrough": no_quant,
               "relu_input": no_quant, "scale": out_quant}
    clones = {}

    def annotate(layer):
        config = layer.get_config()
        if isinstance(layer, tf_keras.layers.InputLayer):
            return layer.__class__.from_config(config)
        kind = _classify(layer)
        if kind == "susa":
            config = dict(config, fake_quant=True)
        clone = layer.__class__.from_config(config)
        clones[layer.name] = clone
        make = configs.get(kind)
        return qk.quantize_annotate_layer(clone, make() if make else None)

    annotated = tf_keras.models.clone_model(model, clone_function=annotate)
    for layer in model.layers:
        if layer.weights:
            # SUSA's fake-quant ranges come after its own weights and start fresh.
            values = layer.get_weights()
            target = clones[layer.name]
            target.set_weights(values + target.get_weights()[len(values):])
    with quantize_scope():
        qat = qk.quantize_apply(annotated)
    return qat, describe(model)


def print_report(rows: List[Tuple[str, str, str]], verbose: bool = False) -> Dict[str, int]:
    counts = collections.Counter(kind for _, kind, _ in rows)
    print(f"QAT: {counts['default']} layers by tfmot's 8-bit scheme, {counts['custom']} by "
          f"the package's quantize configs, {counts['passthrough']} pass-through layers; no "
          "layer stays float")
    for reason, n in collections.Counter((kind, reason) for _, kind, reason in rows).items():
        print(f"  {n:>4} x {reason[0]}: {reason[1]}")
    if verbose:
        for name, kind, _ in rows:
            print(f"  {name}: {kind}")
    return dict(counts)


def int8_hook(io_type: str = "float"):
    """Converter settings for a QAT model: every range comes from training, so there is no
    representative data set; int8 kernels throughout, float or int8/uint8 at the ends."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    def hook(converter):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if io_type != "float":
            dtype = {"int8": tf.int8, "uint8": tf.uint8}[io_type]
            converter.inference_input_type = dtype
            converter.inference_output_type = dtype
    return hook


def equalize_for_int8(model, cfg) -> Dict[str, float]:
    """Channel-0 equalisation (xhrnet_tf.equalize) of the float model QAT starts from.

    Same function, but the outlier channel no longer sets the int8 ranges QAT begins with;
    on the quickstart model that alone lifts int8 PTQ from AP 0.02 to 0.12. Calibrated on
    the training TFRecords (or the synthetic set when there are none).
    """
    from xhrnet_tf import equalize, export  # pylint: disable=import-outside-toplevel
    images = export.training_calibration_images(cfg, 64)
    scales, _ = equalize.equalize(model, cfg.model, images)
    print("QAT: " + equalize.summary(scales))
    return scales

