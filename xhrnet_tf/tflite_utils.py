"""Float TFLite conversion and graph inspection.

Quantised export (fp16, dynamic range, int8, QAT) builds on `to_tflite` in the export module.
"""
from __future__ import annotations

import collections
import contextlib
import io
import os
import struct
import tempfile
import warnings
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from xhrnet_tf.layers import tflite_graph


def to_tflite(model, batch_size: int = 1, converter_hook=None) -> bytes:
    """Converts a Functional model with the plain builtin op set at a fixed batch size.

    A fixed batch keeps every reshape static (no SHAPE/PACK ops at run time). The converter
    freezes the traced function itself instead of first saving it as a temporary SavedModel
    (TensorFlow's default for concrete functions, which builds save/restore functions for
    every variable): the same ops and numbers in half the time (x18: 24.7 -> 11.6 s). That
    route writes no signature, so `_with_signature` adds the one the SavedModel route gave,
    with the tensors named as in the exported SavedModel: image in, heatmaps out.
    """
    spec = tf.TensorSpec((batch_size,) + tuple(model.input_shape[1:]), tf.float32)
    with tflite_graph():
        concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    holder = tf.Module()
    holder.model_variables = list(model.variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.experimental_lower_to_saved_model = False
    if converter_hook is not None:
        converter_hook(converter)
    with warnings.catch_warnings():
        # On this route TensorFlow asks for input statistics whenever the graph converts to
        # int8 (QAT); they only apply to an int8 input without a range, and every input here
        # is float or takes its range from the model's own input quantizer.
        warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
        content = converter.convert()
    return _with_signature(content)


def _with_signature(content: bytes, key: str = "serving_default") -> bytes:
    """`content` with one signature over its single subgraph: `image` in, `heatmaps` out."""
    from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=import-outside-toplevel
    from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=import-outside-toplevel
    flat = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    graph = flat.subgraphs[0]

    def tensor_map(name, index):
        entry = schema.TensorMapT()
        entry.name, entry.tensorIndex = name, index
        return entry

    signature = schema.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = key, 0
    signature.inputs = [tensor_map("image", graph.inputs[0])]
    signature.outputs = [tensor_map("heatmaps", graph.outputs[0])]
    flat.signatureDefs = [signature]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(flat))


def interpreter(model_content: Optional[bytes] = None, model_path: Optional[str] = None,
                num_threads: int = 1, **kwargs):
    """An ai_edge_litert interpreter with tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
    interp = Interpreter(model_content=model_content, model_path=model_path,
                         num_threads=num_threads, **kwargs)
    interp.allocate_tensors()
    return interp


def quantize_input(x: np.ndarray, detail: Dict) -> np.ndarray:
    """Float data in the dtype of an interpreter input (through its scale for int8/uint8)."""
    if detail["dtype"] == np.float32:
        return x.astype(np.float32)
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(detail["dtype"])


def dequantize_output(y: np.ndarray, detail: Dict) -> np.ndarray:
    """An interpreter output as float."""
    if detail["dtype"] == np.float32:
        return y
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - zero) * scale


def graph_report(model_content: bytes) -> Dict:
    """Op histogram and the properties delegates care about, read from the flatbuffer
    (`flatbuffer_ops`), so graphs with custom ops are reported too."""
    ops, max_rank = flatbuffer_ops(model_content)
    return {
        "ops": dict(ops),
        "num_ops": sum(ops.values()),
        "max_rank": max_rank,
        "custom_or_flex_ops": sorted(op[len("CUSTOM:"):] for op in ops
                                     if op.startswith("CUSTOM:")),
        "size_bytes": len(model_content),
    }


def float_kernels(model_content: bytes) -> List[str]:
    """Ops of a quantised model that read or write float32, except the QUANTIZE/DEQUANTIZE
    pairs at its ends: each is a float island (slower, and rejected by integer-only NPUs)."""
    interp = interpreter(model_content, experimental_op_resolver_type=no_delegate_resolver())
    dtypes = {t["index"]: t["dtype"] for t in interp.get_tensor_details()}
    found = []
    for op in interp._get_ops_details():  # pylint: disable=protected-access
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        tensors = [int(i) for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        if any(dtypes[i] == np.float32 for i in tensors):
            found.append(op["op_name"])
    return found


def xnnpack_report(model_content: bytes, num_threads: int = 1) -> Dict:
    """How XNNPACK (ai_edge_litert's default delegate) partitions the graph.

    The runtime logs "Replacing N out of N node(s)" only at verbose level when it takes the
    whole graph, so this reads the result from the graph instead: every DELEGATE node is one
    partition, and an op left to the builtin kernels shows as the producer of a tensor that a
    partition (or the graph output) consumes.
    """
    interp = interpreter(model_content, num_threads=num_threads)
    ops = interp._get_ops_details()  # pylint: disable=protected-access
    delegates = [op for op in ops if op["op_name"] == "DELEGATE"]
    producer = {int(t): op["op_name"] for op in ops if op["op_name"] != "DELEGATE"
                for t in op["outputs"]}
    delegated_out = {int(t) for op in delegates for t in op["outputs"]}
    consumed = {int(t) for op in delegates for t in op["inputs"]}
    consumed |= {d["index"] for d in interp.get_output_details()}
    left = collections.Counter(producer[t] for t in consumed - delegated_out if t in producer)
    return {"partitions": len(delegates), "undelegated_ops": dict(left),
            "whole_graph": len(delegates) == 1 and not left,
            "nodes": len(ops) - len(delegates)}


def gpu_compatibility(model_content: bytes) -> List[str]:
    """GPU-delegate warnings of tf.lite's Analyzer; an empty list means it found none.
    TensorFlow 2.21's Analyzer has its GPU rules compiled out and finds none for any graph
    (tests/test_delegates.py); `xhrnet_tf.litert_gpu` asks the GPU delegate itself."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.tflite")
        with open(path, "wb") as f:
            f.write(model_content)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            tf.lite.experimental.Analyzer.analyze(model_path=path, gpu_compatibility=True)
    text = out.getvalue()
    warnings = [line.strip() for line in text.splitlines() if "GPU COMPATIBILITY WARNING" in line]
    if not warnings and "looks compatible with GPU delegate" not in text:
        warnings.append("the Analyzer did not report GPU compatibility")
    return warnings


def is_full_integer(model_content: bytes) -> bool:
    """Whether activations run in int8: a QUANTIZE op (float input) or an integer input.
    fp16 and dynamic-range models have only DEQUANTIZE ops of their weights."""
    interp = interpreter(model_content, experimental_op_resolver_type=no_delegate_resolver())
    ops = {d["op_name"] for d in interp._get_ops_details()}  # pylint: disable=protected-access
    return "QUANTIZE" in ops or interp.get_input_details()[0]["dtype"] in (np.int8, np.uint8)


# What delegates need of a graph, in the order `delegate_checks` reports it.
DELEGATE_CHECKS = {
    "builtin_ops": "builtin ops only (no custom or Flex op)",
    "rank_le_4": "every tensor of rank <= 4 (no 5-D reshape or transpose)",
    "no_batch_matmul": "no BATCH_MATMUL",
    "gpu_delegate": "LiteRT's GPU accelerator runs the whole graph",
    "xnnpack_one_partition": "XNNPACK takes the whole graph as one partition",
    "integer_inside": "full int8: integer kernels from input to output",
}


def delegate_checks(model_content: bytes, gpu: bool = True) -> Dict[str, Dict]:
    """{check: {"ok": True/False (None: not applicable or not run), "detail": str}} for
    DELEGATE_CHECKS.

    The checks the tests make of every graph `export` writes, for any .tflite (one made by
    `tflite_convert`, say). The partitions are those of this machine's ai_edge_litert; a
    LiteRT of another release may take more or fewer ops. `gpu` runs the graph on LiteRT's
    GPU accelerator (`xhrnet_tf.litert_gpu`, a minute or more for a new graph on a software
    Vulkan driver); tf.lite's Analyzer is not asked, as in TensorFlow 2.21 it flags nothing."""
    from xhrnet_tf.litert_gpu import gpu_report  # pylint: disable=import-outside-toplevel
    report = graph_report(model_content)
    ops = report["ops"]
    custom = sorted(op for op in ops if op.startswith("CUSTOM:"))
    out = {
        "builtin_ops": (not custom, ", ".join(custom) or "all builtin"),
        "rank_le_4": (report["max_rank"] <= 4, f"max rank {report['max_rank']}"),
        "no_batch_matmul": ("BATCH_MATMUL" not in ops, f"{ops.get('BATCH_MATMUL', 0)} found"),
    }
    if custom:  # the interpreter cannot load the graph without their kernels
        out["xnnpack_one_partition"] = (False, "custom ops stay outside XNNPACK")
        out["integer_inside"] = (None, "not checked: the graph has custom ops")
    else:
        xnn = xnnpack_report(model_content)
        left = ", ".join(f"{op} x{n}" for op, n in sorted(xnn["undelegated_ops"].items()))
        out["xnnpack_one_partition"] = (
            xnn["whole_graph"], f"{xnn['partitions']} partition"
            + ("s" if xnn["partitions"] != 1 else "")
            + (f", left to TFLite's kernels: {left}" if left else ""))
        out["integer_inside"] = _integer_inside(model_content)
    if not gpu:
        out["gpu_delegate"] = (None, "not run (python -m xhrnet_tf.tools.check_tflite runs it)")
    else:
        run = gpu_report(model_content)
        out["gpu_delegate"] = ((run["ok"], run["detail"]) if run["available"] else
                               (None, f"not run: {run['reason']}"))
    return {name: dict(zip(("ok", "detail"), out[name])) for name in DELEGATE_CHECKS}


def _integer_inside(model_content: bytes):
    if not is_full_integer(model_content):
        return None, "not a full-integer model"
    floats = collections.Counter(float_kernels(model_content))
    return not floats, ", ".join(f"{op} x{n}" for op, n in sorted(floats.items())) or \
        "no float kernel"


def flatbuffer_ops(model_content: bytes):
    """(Counter of op names, the largest tensor rank) read from the flatbuffer itself, so
    graphs an interpreter cannot load (custom ops) are read too; custom ops as "CUSTOM:name".
    ValueError when the bytes are not a TFLite model."""
    from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=import-outside-toplevel
    if model_content[4:8] != b"TFL3":
        raise ValueError("no TFLite file identifier (TFL3)")
    try:
        model = schema.ModelT.InitFromPackedBuf(bytearray(model_content), 0)
    except (struct.error, IndexError, TypeError, UnicodeDecodeError):
        raise ValueError("truncated or corrupt flatbuffer") from None
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = []
    for code in model.operatorCodes:
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        custom = builtin == schema.BuiltinOperator.CUSTOM
        codes.append(f"CUSTOM:{code.customCode.decode()}" if custom
                     else names.get(builtin, str(builtin)))
    ops = collections.Counter(codes[op.opcodeIndex] for graph in model.subgraphs
                              for op in graph.operators or [])
    ranks = [len(t.shape) for graph in model.subgraphs for t in graph.tensors or []
             if t.shape is not None]
    return ops, max(ranks, default=0)


def checks_summary(checks: Optional[dict]) -> str:
    """' (delegate checks: ...)' for a .tflite's `delegate_checks`, '' for other files."""
    if not checks:
        return ""
    failed = [f"{name} ({c['detail']})" for name, c in checks.items() if c["ok"] is False]
    unrun = " (no GPU run)" if checks.get("gpu_delegate", {}).get("ok", True) is None else ""
    return " (delegate checks: " + ("failed " + "; ".join(failed) if failed else
                                    "passed") + unrun + ")"


def no_delegate_resolver():
    """The op resolver that runs a model's own builtin kernels, with no default delegate.

    Without delegates the op list and preserved tensors are the model's own ops, not
    XNNPACK partitions."""
    from ai_edge_litert.interpreter import OpResolverType  # pylint: disable=import-outside-toplevel
    return OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
