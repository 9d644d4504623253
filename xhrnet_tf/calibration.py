"""int8 ranges (and BatchNorm statistics) of a QAT model, set from data.

A fresh QAT model (`xhrnet_tf.qat.quantize_model`) has tfmot's initial ranges. QAT
calibrates them before fine-tuning starts (`train`); the int8 export calibrates them, and
re-estimates BatchNorm with fake quantisation in the loop, to convert QAT's graph without
any training (`export.calibrated_qat_graph`).
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import tensorflow as tf
import tf_keras


def _range_variables(model):
    """(moving-average ranges, all-values ranges): every quantiser's min/max variable.

    tfmot creates them at [-6, 6]. Its moving averages decay by 0.999 per step, so after a
    380-step fine-tune 68% of the initial range is still in them, and the input's all-values
    range (min/max ever seen) never shrinks below +-6 at all (known: tensorflow/
    model-optimization#368). `calibrate_ranges` replaces them with the data's ranges.
    """
    from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import QuantizeLayer  # pylint: disable=import-outside-toplevel
    all_values = {id(v) for layer in model.layers
                  if isinstance(layer, QuantizeLayer) for v in layer.weights}
    ranges = [v for v in model.variables
              if not v.trainable and v.name.split(":")[0].endswith(("_min", "_max"))]
    return ([v for v in ranges if id(v) not in all_values],
            [v for v in ranges if id(v) in all_values])


@contextlib.contextmanager
def _ema_decay(decay: float):
    """tfmot's MovingAverageQuantizer hard-codes ema_decay=0.999; decay 0 makes one training
    step store exactly that batch's range."""
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops  # pylint: disable=import-outside-toplevel
    original = quant_ops.MovingAvgQuantize
    quant_ops.MovingAvgQuantize = functools.partial(_with_decay, original, decay)
    try:
        yield
    finally:
        quant_ops.MovingAvgQuantize = original


def _with_decay(original, decay, *args, **kwargs):
    return original(*args, **dict(kwargs, ema_decay=decay))


def _batch_norms(model) -> list:
    """Every BatchNormalization of a QAT model (tfmot wraps each one)."""
    inner = [getattr(layer, "layer", layer) for layer in model.layers]
    return [layer for layer in inner if isinstance(layer, tf_keras.layers.BatchNormalization)]


@contextlib.contextmanager
def _momentum(batch_norms, momentum: float):
    """Momentum 0 makes one training step store exactly that batch's statistics."""
    original = [bn.momentum for bn in batch_norms]
    for bn in batch_norms:
        bn.momentum = momentum
    try:
        yield
    finally:
        for bn, value in zip(batch_norms, original):
            bn.momentum = value


def calibrate_ranges(model, batches, strategy=None, batch_norm: bool = False) -> int:
    """Sets every int8 range of a fresh QAT model to what QAT's moving averages converge
    to on these batches (the mean of the per-batch ranges; the input quantiser's all-values
    range to the extremes). The forward passes run in training mode, as QAT does.

    `batch_norm=True` also sets every BatchNorm's moving statistics to the mean of the
    batches' statistics with fake quantisation in the loop (BN re-estimation): rounding
    shifts what each BN sees, and the float model's statistics no longer centre it. Without
    it (QAT, whose training steps re-estimate them anyway), BatchNorm statistics are put
    back after, as is every other variable. Returns the number of ranges set."""
    strategy = strategy or tf.distribute.get_strategy()
    moving, all_values = _range_variables(model)
    bns = _batch_norms(model) if batch_norm else []
    stats = [v for bn in bns for v in (bn.moving_mean, bn.moving_variance)]
    observed = moving + all_values + stats
    is_observed = {id(v) for v in observed}
    saved = [(v, v.numpy()) for v in model.variables if id(v) not in is_observed]
    seen = [[] for _ in observed]
    with _ema_decay(0.0), _momentum(bns, 0.0):
        step = tf.function(lambda x: strategy.run(lambda y: model(y, training=True),
                                                  args=(x,)))
        for batch in batches:
            for v in moving + all_values:
                v.assign(tf.zeros_like(v))
            step(tf.convert_to_tensor(batch))
            for values, v in zip(seen, observed):
                values.append(v.numpy())
    extremes = {id(v) for v in all_values}
    for v, values in zip(observed, seen):
        values = np.stack(values)
        if id(v) not in extremes:
            v.assign(values.mean(axis=0))
        elif v.name.split(":")[0].endswith("_min"):
            v.assign(values.min(axis=0))
        else:
            v.assign(values.max(axis=0))
    for v, value in saved:
        v.assign(value)
    return len(moving) + len(all_values)
