"""Float TFLite conversion and graph inspection.

Quantised export (fp16, dynamic range, int8, QAT) builds on `to_tflite` in the export module.
"""
from __future__ import annotations

import collections
from typing import Dict, Optional

import tensorflow as tf


def to_tflite(model, batch_size: int = 1, converter_hook=None) -> bytes:
    """Converts a Functional model with the plain builtin op set at a fixed batch size.

    A fixed batch keeps every reshape static (no SHAPE/PACK ops at run time). The converter
    gets a bare tf.Module holding the variables instead of the Keras model, because saving a
    Keras model first traces every layer, which is four times slower for X-HRNet.
    """
    spec = tf.TensorSpec((batch_size,) + tuple(model.input_shape[1:]), tf.float32)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    holder = tf.Module()
    holder.model_variables = list(model.variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if converter_hook is not None:
        converter_hook(converter)
    return converter.convert()


def interpreter(model_content: Optional[bytes] = None, model_path: Optional[str] = None,
                num_threads: int = 1, **kwargs):
    """An ai_edge_litert interpreter with tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
    interp = Interpreter(model_content=model_content, model_path=model_path,
                         num_threads=num_threads, **kwargs)
    interp.allocate_tensors()
    return interp


def graph_report(model_content: bytes) -> Dict:
    """Op histogram and the properties delegates care about."""
    interp = interpreter(model_content,
                         experimental_op_resolver_type=_no_delegate_resolver())
    ops = collections.Counter(d["op_name"] for d in interp._get_ops_details())  # pylint: disable=protected-access
    ranks = [len(t["shape"]) for t in interp.get_tensor_details()]
    return {
        "ops": dict(ops),
        "num_ops": sum(ops.values()),
        "max_rank": max(ranks),
        "custom_or_flex_ops": sorted(op for op in ops if op.startswith("Flex") or
                                     op.upper() != op),
        "size_bytes": len(model_content),
    }


def _no_delegate_resolver():
    # Without delegates the op list shows the model's own ops, not XNNPACK partitions.
    from ai_edge_litert.interpreter import OpResolverType  # pylint: disable=import-outside-toplevel
    return OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
