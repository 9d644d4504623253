"""Quantization-aware training with tensorflow-model-optimization.

`quantize_model(model)` returns the QAT model (tfmot's default 8-bit scheme) and a report of
how every layer is handled. tfmot knows the stock layers; the package's custom layers get
quantize configs here:

* `SUSA`: rebuilt with `fake_quant=True`, which puts a moving-average int8 range on every
  internal tensor (query, softmax pieces, products, LayerNorm scale and shift, gate), writes
  its LayerNorm as an L2 normalisation (one int8 kernel with a fixed grid, see
  `SUSA._int8_gate`) and puts its computed kernels (group weights x mean kernel; the conv
  with the LayerNorm mean folded in) and LayerNorm constants on the converter's int8 grids.
  Its output is fake-quantised by its quantize config, except where it feeds a concat.
* The transformed half of a shuffle unit (the layer, or px's concat, feeding the unit's
  concat) has no range of its own: it takes the concat's, as the converter's int8
  CONCATENATION needs (`_feeds_concat`).
* `DepthwiseConv2D` + its BN: the kernel gets one int8 range per channel. tfmot's conv
  quantizer is per-axis over the kernel's last axis, a depthwise kernel's depth multiplier,
  so it trains one range for all channels while the converter quantises per channel.
* `ChannelSplit`, `NearestUpsample`, `BilinearResize`, `Subsample2x`: move or interpolate
  values without changing their range, so the int8 kernels keep the input's scale; no
  quantiser is needed and none is added.

`print_report` says which layers got which treatment, so nothing stays float unannounced.
`xhrnet_tf.calibration.calibrate_ranges` sets every range from training batches before
fine-tuning starts.
"""
from __future__ import annotations

import collections
from typing import Dict, List, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras

from xhrnet_tf import quantize_configs
from xhrnet_tf.layers import CUSTOM_OBJECTS, SUSA
from xhrnet_tf.shape_layers import BilinearResize, ChannelSplit, NearestUpsample, Subsample2x

_PASSTHROUGH = (ChannelSplit, NearestUpsample, BilinearResize, Subsample2x)
# Stock layers whose int8 kernels must keep their input's scale. tfmot would give Reshape and
# Permute an output quantiser of their own, whose range then disagrees with the input's and
# the converter fails on the same-scale constraint of RESHAPE/TRANSPOSE.
_STOCK_PASSTHROUGH = (tf_keras.layers.Reshape, tf_keras.layers.Permute)
_qk = tfmot.quantization.keras


def quantize_scope():
    """Scope in which QAT models (and their checkpoints) deserialize."""
    return _qk.quantize_scope(dict(CUSTOM_OBJECTS, **quantize_configs.CONFIG_OBJECTS))


def _shared_add(layer) -> bool:
    """An Add whose sum is read by more than its ReLU (z0 of the official fuse, SPEC 5.3).

    tfmot quantises Add+ReLU at the ReLU's output only, which would leave this sum without a
    range and the converter would run that Add in float."""
    return isinstance(layer, tf_keras.layers.Add) and len(layer._outbound_nodes) > 1  # pylint: disable=protected-access


def _consumers(layer) -> list:
    return [node.outbound_layer for node in layer._outbound_nodes]  # pylint: disable=protected-access


def _feeds_concat(layer) -> bool:
    """A layer read only by a Concatenate, directly or through reshapes and transposes (the
    transformed half of every shuffle unit).

    Its output takes the concat's range instead of one of its own. With a range of its own,
    the converter (whose CONCATENATION needs one scale for all inputs and the output) ran
    the concat on it: it requantised the unit's pass-through half to it, clipping that half
    to the transformed half's range, and requantised the concat's output once more, where
    Keras rounds each value once, on the concat's range. Now the pass-through half is the
    only tensor requantised, to the concat's range, which is what Keras computes."""
    consumers = _consumers(layer)
    while len(consumers) == 1 and isinstance(consumers[0], _STOCK_PASSTHROUGH):
        consumers = _consumers(consumers[0])  # the channel shuffle after a px unit's concat
    return len(consumers) == 1 and isinstance(consumers[0], tf_keras.layers.Concatenate)


def _depthwise_bn(layer) -> bool:
    """A linear depthwise conv read only by a BatchNormalization (every one in X-HRNet)."""
    if not isinstance(layer, tf_keras.layers.DepthwiseConv2D) or \
            layer.get_config()["activation"] != "linear":
        return False
    consumers = _consumers(layer)
    return len(consumers) == 1 and isinstance(consumers[0], tf_keras.layers.BatchNormalization)


_REASONS = {
    "susa": ("custom", "output and all internal tensors fake-quantised; LayerNorm as one int8 "
                       "L2 normalisation; kernels and constants on the converter's grids"),
    "shared_add": ("custom", "sum read by more than its ReLU: output fake-quantised"),
    "passthrough": ("passthrough", "int8 kernel keeps the input scale"),
    "relu_input": ("passthrough", "x2 before the fuse's ReLU: the converter fuses the two, "
                                  "which then take the ReLU's range"),
    "scale": ("custom", "constant rescaling: output fake-quantised"),
    "depthwise": ("custom", "depthwise kernel quantised per channel (tfmot: one range for all "
                            "channels); its BN carries the range"),
    "depthwise_bn": ("custom", "BN of a depthwise conv: output fake-quantised (fused by the "
                               "converter)"),
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
    if _depthwise_bn(layer):
        return "depthwise"
    if isinstance(layer, tf_keras.layers.BatchNormalization) and \
            _depthwise_bn(layer._inbound_nodes[0].inbound_layers):  # pylint: disable=protected-access
        return "depthwise_bn"
    if isinstance(layer, tf_keras.layers.Rescaling):
        consumers = _consumers(layer)
        if len(consumers) == 1 and isinstance(consumers[0], tf_keras.layers.ReLU):
            return "relu_input"
        return "scale"
    return "default"


_OWN_OUTPUT_RANGE = ("susa", "shared_add", "scale", "depthwise_bn")
_CONCAT_REASONS = {
    "susa": "internal tensors fake-quantised as in every SUSA; output on the range of the "
            "concat it feeds",
    "depthwise_bn": "BN of a depthwise conv (fused by the converter): output on the range of "
                    "the concat it feeds",
}


def _treatment(layer) -> Tuple[str, bool]:
    """(kind, whether its output range is the concat's it feeds) of a layer."""
    kind = _classify(layer)
    own_range = kind in _OWN_OUTPUT_RANGE or isinstance(layer, tf_keras.layers.Concatenate)
    return kind, own_range and _feeds_concat(layer)


def describe(model: tf_keras.Model) -> List[Tuple[str, str, str]]:
    """(layer, treatment, why) for every layer of the float model."""
    rows = []
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.InputLayer):
            continue
        kind, concat = _treatment(layer)
        group, why = _REASONS[kind]
        if concat:
            group = "custom"
            why = _CONCAT_REASONS.get(kind, "output on the range of the concat it feeds")
        rows.append((layer.name, group, why))
    return rows


def quantize_model(model: tf_keras.Model) -> Tuple[tf_keras.Model, List[Tuple[str, str, str]]]:
    """QAT version of a float X-HRNet (its weights included) and the per-layer report."""
    no_quant = quantize_configs.NoQuantizeConfig
    out_quant = quantize_configs.OutputQuantizeConfig
    configs = {"susa": out_quant, "shared_add": out_quant, "passthrough": no_quant,
               "relu_input": no_quant, "scale": out_quant,
               "depthwise": quantize_configs.DepthwiseQuantizeConfig, "depthwise_bn": out_quant}
    clones = {}

    def annotate(layer):
        config = layer.get_config()
        if isinstance(layer, tf_keras.layers.InputLayer):
            return layer.__class__.from_config(config)
        kind, concat = _treatment(layer)
        if kind == "susa":
            config = dict(config, fake_quant=True)
        clone = layer.__class__.from_config(config)
        clones[layer.name] = clone
        make = no_quant if concat else configs.get(kind)
        return _qk.quantize_annotate_layer(clone, make() if make else None)

    annotated = tf_keras.models.clone_model(model, clone_function=annotate)
    for layer in model.layers:
        if layer.weights:
            # SUSA's fake-quant ranges come after its own weights and start fresh.
            values = layer.get_weights()
            target = clones[layer.name]
            target.set_weights(values + target.get_weights()[len(values):])
    with quantize_scope():
        qat = _qk.quantize_apply(annotated)
    _set_input_range(qat)
    return qat, describe(model)


def _set_input_range(qat_model) -> None:
    """Starts the input's int8 range at the bounds of a normalised image.

    tfmot starts it at [-6, 6] and its all-values quantiser only ever widens it, so the
    input kept 2.5x the step it needs ([-2.12, 2.64] for ImageNet normalisation). Data
    outside these bounds still widens it.
    """
    from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import QuantizeLayer  # pylint: disable=import-outside-toplevel
    from xhrnet_tf import codec  # pylint: disable=import-outside-toplevel
    mean, std = (np.asarray(v, np.float32) for v in (codec.IMAGENET_MEAN, codec.IMAGENET_STD))
    for layer in qat_model.layers:
        if isinstance(layer, QuantizeLayer):
            layer.quantizer_vars["min_var"].assign(float((-mean / std).min()))
            layer.quantizer_vars["max_var"].assign(float(((1 - mean) / std).max()))


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
