"""Where int8 loses accuracy: every int8 tensor against its reference, op by op.

    python -m xhrnet_tf.tools.int8_debug --config configs/quickstart.yaml \
        --weights runs/quickstart/final.weights.h5 [--no_equalize] [--top 20]
    python -m xhrnet_tf.tools.int8_debug --config configs/quickstart_qat.yaml \
        --weights runs/quickstart_qat/final.weights.h5

With a float config, the int8 PTQ graph against the float graph. With a QAT config
(`train.qat: true`) and its run's weights, the int8 .tflite the run exports against its own
fake-quant graph, converted without quantising (every fake quant a QUANTIZE + DEQUANTIZE
in float): there the two should agree, and an op that adds error is one whose int8 kernel
rounds differently from what training simulated.

TFLite's own `tf.lite.experimental.QuantizationDebugger` stops on X-HRNet: its debug model,
which runs float ops on the int8 ops' dequantised inputs, fails in a DIV (SUSA's reciprocal
of the softmax sum is the graph's only one): "div.cc: data[i] != 0 was not true". This tool
converts the graph `export` converts for int8 (the int8 graph, paired shuffle units, with or
without the channel-0 equalisation) twice, in float and as full-integer PTQ calibrated on
training crops, runs both on held-out crops with every tensor kept, and compares the tensors
the two graphs name alike.

Printed per op (the int8 graph's execution order):
- error: ||int8 - float|| / ||float|| of the op's output, dequantised, per channel and
  averaged over channels; it carries what the ops before it lost (the accumulated error);
- added: error minus the largest error of the op's inputs, what this op lost itself (0 for
  ops that only pick or move values, such as REDUCE_MAX, RESHAPE or PAD);
- levels: rms(float) / int8 scale for the median channel, how many int8 steps a typical
  value spans. Under ~4 the range is set by a few outliers (values or channels) and most
  values round to a handful of levels.
Then the accumulated error at every fuse output and at the heatmaps, the figures that
follow AP: a large "added" inside SUSA's gate need not cost any (tflite/EXPERIMENTS.md,
session 19).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np

_FUSE_OUTPUT = re.compile(r"_fuse\d+_relu/Relu$")


@dataclasses.dataclass
class Row:
    op_index: int
    op: str
    name: str
    error: float
    added: float
    peak: float
    scale: float
    levels: float


def _run_keeping_tensors(content: bytes, images: Sequence[np.ndarray]):
    """All tensors of `content` on `images` (dequantised), its tensor details, ops and
    output tensors."""
    # pylint: disable=import-outside-toplevel
    from xhrnet_tf.tflite_utils import interpreter, no_delegate_resolver, quantize_input
    interp = interpreter(content, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=no_delegate_resolver())
    inp = interp.get_input_details()[0]
    details = interp.get_tensor_details()
    ops = interp._get_ops_details()  # pylint: disable=protected-access
    written = {t for op in ops for t in op["outputs"]}  # weights and constants stay out
    values: Dict[int, List[np.ndarray]] = {}
    for image in images:
        interp.set_tensor(inp["index"], quantize_input(image.reshape(inp["shape"]), inp))
        interp.invoke()
        for d in details:
            if (d["index"] not in written or d["dtype"] not in (np.float32, np.int8, np.uint8)
                    or not len(d["shape"])):
                continue
            try:
                v = interp.get_tensor(d["index"]).astype(np.float32)
            except ValueError:  # a tensor with no buffer (optional input)
                continue
            scale, zero = d["quantization"]
            values.setdefault(d["index"], []).append((v - zero) * scale if scale else v)
    return ({i: np.stack(v) for i, v in values.items()}, details, ops,
            [d["index"] for d in interp.get_output_details()])


def _unique_names(details) -> Dict[str, int]:
    seen: Dict[str, List[int]] = {}
    for d in details:
        seen.setdefault(d["name"], []).append(d["index"])
    return {name: idx[0] for name, idx in seen.items() if len(idx) == 1}


def channel_error(q: np.ndarray, f: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean over channels (last axis) of ||q - f|| / ||f||, and each channel's rms.

    Per channel, because a per-tensor int8 scale fails by channel: one channel that sets the
    range stays exact and carries the tensor's norm while the others round to a few levels.
    A channel's norm counts as at least 5% of the median channel's, so that channels that are
    all but zero in float do not swamp the mean.
    """
    f2, d2 = f.reshape(-1, f.shape[-1]), (q - f).reshape(-1, f.shape[-1])
    norms = np.linalg.norm(f2, axis=0)
    floor = 0.05 * float(np.median(norms))
    if floor == 0.0:  # most channels are 0: judge the rest against themselves
        floor = max(float(norms.max()), 1e-30)
    rel = np.linalg.norm(d2, axis=0) / np.maximum(norms, floor)
    return float(rel.mean()), norms / np.sqrt(f2.shape[0])


# Ops whose int8 kernels only pick or move values, on their input's grid: they round
# nothing, so what they show beyond their input's error is where that error sits (a row's
# maximum), not error of their own.
_SELECTING = {"REDUCE_MAX", "MAX_POOL_2D", "PAD", "RESHAPE", "TRANSPOSE", "SPLIT", "SLICE",
              "STRIDED_SLICE", "GATHER"}


def _rounded(ops) -> Dict[int, int]:
    """tensor -> the same values after the QUANTIZE + DEQUANTIZE that follow it.

    A fake-quant graph converted in float names a tensor as the int8 graph does but before
    its rounding; the values the next op reads, which the int8 tensor holds, come out of the
    DEQUANTIZE."""
    dequantized = {op["inputs"][0]: op["outputs"][0] for op in ops
                   if op["op_name"] == "DEQUANTIZE"}
    return {op["inputs"][0]: dequantized[op["outputs"][0]] for op in ops
            if op["op_name"] == "QUANTIZE" and op["outputs"][0] in dequantized}


def compare_graphs(float_content: bytes, int8_content: bytes,
                   images: Sequence[np.ndarray]) -> List[Row]:
    """One row per int8 op whose output the float graph also has (same tensor name, or the
    same place among the model's outputs). The float graph may be a fake-quant one."""
    fvals, fdetails, fops, fouts = _run_keeping_tensors(float_content, images)
    qvals, qdetails, qops, qouts = _run_keeping_tensors(int8_content, images)
    rounded = _rounded(fops)
    fnames = {name: rounded.get(i, i) for name, i in _unique_names(fdetails).items()}
    twins = dict(zip(qouts, fouts))
    errors: Dict[int, float] = {}
    rows = []
    for op in qops:
        before = max((errors[i] for i in op["inputs"] if i in errors), default=0.0)
        for out in op["outputs"]:
            name = qdetails[out]["name"]
            f = fvals.get(twins.get(out, fnames.get(name, -1)))
            q = qvals.get(out)
            inside = out not in twins and qdetails[out]["dtype"] == np.float32
            if f is None or q is None or f.shape != q.shape or inside:
                # No float twin: pass the inputs' error on, so that the next matched op is
                # not charged with it.
                errors[out] = before
                continue
            errors[out], rms = channel_error(q, f)
            scale = float(qdetails[out]["quantization"][0])
            added = 0.0 if op["op_name"] in _SELECTING else errors[out] - before
            rows.append(Row(op["index"], op["op_name"], name.split(";")[0], errors[out], added,
                            float(np.abs(f).max()), scale,
                            float(np.median(rms)) / scale if scale else float("inf")))
    return rows


def ptq_pair(config, model, images: Sequence[np.ndarray], equalize: bool) -> Tuple[bytes, bytes]:
    """The float and the int8 PTQ .tflite of the graph `export` converts for int8."""
    # pylint: disable=import-outside-toplevel
    from xhrnet_tf import export
    from xhrnet_tf.tflite_utils import to_tflite
    if equalize:
        model, _ = export.equalized_copy(config, model, list(images))
    deploy = export.int8_deploy_copy(config, model)
    return to_tflite(deploy), to_tflite(deploy, converter_hook=export.ptq_int8_hook(images,
                                                                                    "float"))


def qat_pair(qat_model) -> Tuple[bytes, bytes]:
    """A QAT model's fake-quant graph in float and the int8 .tflite a QAT run exports."""
    # pylint: disable=import-outside-toplevel
    from xhrnet_tf.qat import int8_hook
    from xhrnet_tf.tflite_utils import to_tflite
    return to_tflite(qat_model), to_tflite(qat_model, converter_hook=int8_hook())


def _levels(r: Row) -> str:
    return "-" if r.levels == float("inf") else f"{r.levels:.1f}"  # a float output


def report(rows: List[Row], top: int, reference: str = "float") -> str:
    lines = [f"{len(rows)} int8 tensors matched to {reference} ones\n",
             f"The {top} ops that add the most error:\n",
             "| op # | op | added | error | levels | float peak | int8 scale | tensor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r.added)[:top]:
        lines.append(f"| {r.op_index} | {r.op} | {r.added:+.3f} | {r.error:.3f} | "
                     f"{_levels(r)} | {r.peak:.4g} | {r.scale:.3g} | {r.name} |")
    lines += ["", "Accumulated error where the branches meet (fuse outputs) and at the end:\n",
              "| op # | error | levels | tensor |", "|---|---|---|---|"]
    for r in rows:
        if _FUSE_OUTPUT.search(r.name) or r is rows[-1]:
            name = r.name if r is not rows[-1] else f"{r.name} (the model's output)"
            lines.append(f"| {r.op_index} | {r.error:.3f} | {_levels(r)} | {name} |")
    return "\n".join(lines)


def _load(args):
    """(config, model, crops): the float model or, for a QAT config, the QAT model."""
    # pylint: disable=import-outside-toplevel
    import xhrnet_tf
    from xhrnet_tf import export, train
    from xhrnet_tf.model import check_weights_kind, load_weights
    cfg = xhrnet_tf.load_config(args.config)
    check_weights_kind(args.weights, cfg.train.qat,
                       hint=f"{args.config} has train.qat: {str(cfg.train.qat).lower()}")
    if cfg.train.qat:
        ptq_only = [f for f, v in (("--no_equalize", args.no_equalize),
                                   ("--calibration_samples", args.calibration_samples))
                    if v not in (None, False)]
        if ptq_only:
            raise ValueError(f"{', '.join(ptq_only)}: PTQ options, but {args.config} is a QAT "
                             "config, whose int8 ranges come from its run: drop them")
        model = train.build_model(cfg, init=False)
        hint = "a QAT config takes the weights its run saved (final.weights.h5)"
        count = args.check_samples
    else:
        model = xhrnet_tf.build_pose_model(cfg)
        hint = "--weights takes the float model's weights"
        fit = 100 if args.calibration_samples is None else args.calibration_samples
        count = fit + args.check_samples
    load_weights(model, args.weights, hint=hint)
    return cfg, model, export.training_calibration_images(cfg, count)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.tools.int8_debug", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="a float config (PTQ against float) or a QAT one (int8 against "
                        "fake quant)")
    p.add_argument("--weights", required=True,
                   help="the config's weights (.weights.h5): float, or a QAT run's")
    p.add_argument("--no_equalize", action="store_true",
                   help="PTQ: the plain graph instead of the channel-0 equalised one")
    p.add_argument("--calibration_samples", type=int, default=None,
                   help="PTQ: training crops the int8 ranges are calibrated on (default 100)")
    p.add_argument("--check_samples", type=int, default=8,
                   help="training crops the two graphs are compared on (held out of PTQ's "
                        "calibration)")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    if not os.path.isfile(args.weights):
        print(f"error: {args.weights}: weights file not found", file=sys.stderr)
        return 1
    if args.check_samples < 1:
        print(f"error: --check_samples {args.check_samples}: needs at least 1", file=sys.stderr)
        return 1
    try:
        cfg, model, crops = _load(args)
    except ValueError as e:  # ConfigError, WeightsError, ExportError
        print(f"error: {e}", file=sys.stderr)
        return 1
    if cfg.train.qat:
        check = crops
        reference, (ref_content, int8_content) = "fake-quant", qat_pair(model)
    else:
        if len(crops) <= args.check_samples:
            print(f"error: --check_samples {args.check_samples}: needs 1 to {len(crops) - 1} "
                  f"(found {len(crops)} training crops)", file=sys.stderr)
            return 1
        fit, check = crops[:-args.check_samples], crops[-args.check_samples:]
        reference = "float"
        ref_content, int8_content = ptq_pair(cfg, model, fit, not args.no_equalize)
    print(report(compare_graphs(ref_content, int8_content, check), args.top, reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
