"""Where int8 PTQ loses accuracy: every int8 tensor against the float model's, op by op.

    python -m xhrnet_tf.tools.int8_debug --config configs/quickstart.yaml \
        --weights runs/quickstart/final.weights.h5 [--no_equalize] [--top 20]

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
- added: error minus the largest error of the op's inputs, what this op lost itself;
- levels: rms(float) / int8 scale for the median channel, how many int8 steps a typical
  value spans. Under ~4 the range is set by a few outliers (values or channels) and most
  values round to a handful of levels.
Then the accumulated error at every fuse output and at the heatmaps, the figures that
follow AP: a large "added" inside SUSA's gate need not cost any (tflite/README, session 19).
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


def compare_graphs(float_content: bytes, int8_content: bytes,
                   images: Sequence[np.ndarray]) -> List[Row]:
    """One row per int8 op whose output the float graph also has (same tensor name, or the
    same place among the model's outputs)."""
    fvals, fdetails, _, fouts = _run_keeping_tensors(float_content, images)
    qvals, qdetails, qops, qouts = _run_keeping_tensors(int8_content, images)
    fnames = _unique_names(fdetails)
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
            rows.append(Row(op["index"], op["op_name"], name.split(";")[0], errors[out],
                            errors[out] - before, float(np.abs(f).max()), scale,
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


def _levels(r: Row) -> str:
    return "-" if r.levels == float("inf") else f"{r.levels:.1f}"  # a float output


def report(rows: List[Row], top: int) -> str:
    lines = [f"{len(rows)} int8 tensors matched to float ones\n",
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.tools.int8_debug", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--weights", required=True, help="float weights (.weights.h5)")
    p.add_argument("--no_equalize", action="store_true",
                   help="the plain graph instead of the channel-0 equalised one")
    p.add_argument("--calibration_samples", type=int, default=100)
    p.add_argument("--check_samples", type=int, default=8,
                   help="held-out training crops the two graphs are compared on")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    import xhrnet_tf  # pylint: disable=import-outside-toplevel
    from xhrnet_tf import export  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.model import load_weights  # pylint: disable=import-outside-toplevel
    if not os.path.isfile(args.weights):
        print(f"error: {args.weights}: weights file not found", file=sys.stderr)
        return 1
    try:
        cfg = xhrnet_tf.load_config(args.config)
        model = xhrnet_tf.build_pose_model(cfg)
        load_weights(model, args.weights, hint="--weights takes the float model's weights")
        crops = export.training_calibration_images(
            cfg, args.calibration_samples + args.check_samples)
    except ValueError as e:  # ConfigError, WeightsError, ExportError
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.check_samples < 1 or len(crops) <= args.check_samples:
        print(f"error: --check_samples {args.check_samples}: needs 1 to {len(crops) - 1} "
              f"(found {len(crops)} training crops)", file=sys.stderr)
        return 1
    fit, check = crops[:-args.check_samples], crops[-args.check_samples:]
    float_content, int8_content = ptq_pair(cfg, model, fit, not args.no_equalize)
    print(report(compare_graphs(float_content, int8_content, check), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
