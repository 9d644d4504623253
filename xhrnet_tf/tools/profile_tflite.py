"""Where a TFLite model's time goes on this CPU, kernel by kernel.

    python -m xhrnet_tf.tools.profile_tflite --config x18 [--format fp32|fp16|int8|qat]
        [--threads 1] [--seconds 10] [--top 25]
    python -m xhrnet_tf.tools.profile_tflite --tflite runs/quickstart/model_fp32.tflite

The Python interpreters (ai_edge_litert, tf.lite) expose no op profiler, and XNNPACK runs the
whole float graph as one delegate node. So the running interpreter is sampled with Linux
`perf` (Debian/Ubuntu package `linux-perf` or `linux-tools-generic`) and the samples are summed
per kernel: XNNPACK's micro-kernels are named by data type and operation
(`xnn_f32_dwconv_...`, `xnn_qs8_qc8w_gemm_...`, `xnn_x32_transposec_...`), TFLite's own kernels,
which run the ops XNNPACK did not take, by their op (`tflite::ops::builtin::exp::...`).
A config model gets `bench_tflite`'s unit-scale random weights and converter, so its profile
is that of the model `bench_tflite` times.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np

# (category, substrings of the symbol), first match wins; XNNPACK micro-kernel names.
_XNN_RULES = (
    ("depthwise conv", ("dwconv",)),
    ("conv as GEMM (1x1, dense 3x3, deconv)", ("gemm", "conv_hwc", "packw", "packx", "im2col")),
    ("transpose (shuffle, depth/space-to-space)", ("transpose",)),
    ("reduce (mean, sum, max)", ("rsum", "rdsum", "rmax", "rminmax", "reduce")),
    ("softmax", ("raddstoreexpminusmax", "raddexpminusmax", "vscaleexpminusmax")),
    ("quantize / requantize / dequantize", ("vcvt",)),
    ("elementwise binary (add, sub, mul, div)",
     ("vadd", "vsub", "vmul", "vdiv", "vrsub", "vrdiv", "vsqrdiff", "vmax", "vmin",
      "vprelu", "vbinary")),
    ("elementwise unary (relu, sigmoid, rsqrt, ...)",
     ("vclamp", "vrelu", "vlrelu", "vsigmoid", "vtanh", "vrsqrt", "vsqrt", "vexp", "vlog",
      "vneg", "vabs", "vsqr", "vunary", "vhswish", "velu", "lut")),
    ("copy (concat, slice, split)", ("copy", "memcpy", "fill", "zero", "pad")),
)


def categorize(symbol: str, dso: str = "") -> str:
    """The kind of work a sampled function does."""
    s = symbol.lower()
    if s.startswith("xnn_") or "xnnpack" in s:
        for name, keys in _XNN_RULES:
            if any(k in s for k in keys):
                return name
        return "XNNPACK runtime (operator setup, dispatch)"
    # Helpers of TFLite's own int8 kernels, attributed by profiling one-op models: the
    # reciprocal is DIV's, the per-element requantisation mostly a stand-alone RELU's.
    if "one_over_one_plus_x" in symbol:
        return "TFLite kernel, not delegated: div"
    if "MultiplyByQuantizedMultiplier" in symbol:
        return "TFLite int8 requantisation (in RELU and other undelegated kernels)"
    if "ReluX" in symbol or "::Relu" in symbol:
        return "TFLite kernel, not delegated: relu"
    m = re.search(r"tflite::ops::builtin::(\w+)::", symbol)
    if m:
        return f"TFLite kernel, not delegated: {m.group(1)}"
    if "reference_ops::RunBinaryOp" in symbol or "BroadcastBinary" in symbol:
        return "TFLite kernel, not delegated: elementwise binary"
    if "tflite::" in symbol:
        return "TFLite runtime / optimized_ops"
    if s.startswith(("__mem", "mem")) or "memcpy" in s or "memmove" in s or "memset" in s:
        return "copy (concat, slice, split)"
    if "pthreadpool" in s or "pthread" in s or "futex" in s:
        return "thread pool"
    if "python" in dso.lower() or s.startswith(("_py", "py")):
        return "Python (the timing loop)"
    return "other"


# perf pads the symbol column and may append empty columns ("-  -") after it.
_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.+?)(?:\s+-)*\s*$")


def parse_report(text: str) -> List[Tuple[float, str, str]]:
    """(percent, dso, symbol) rows of `perf report --stdio --no-children --sort dso,symbol`."""
    rows = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(4)))
    return rows


def _perf() -> str:
    perf = shutil.which("perf")
    if perf is None:
        raise RuntimeError("perf not found: install linux-perf (Debian) or linux-tools-generic "
                           "(Ubuntu) to profile, or use bench_tflite for latency alone")
    return perf


def profile(content: bytes, threads: int = 1, seconds: float = 10.0,
            frequency: int = 2999) -> Dict:
    """Samples `seconds` of back-to-back invokes; returns latency and the perf rows."""
    from xhrnet_tf.tflite_utils import interpreter  # pylint: disable=import-outside-toplevel
    perf = _perf()
    interp = interpreter(content, num_threads=threads)
    inp = interp.get_input_details()[0]
    x = np.random.default_rng(0).normal(size=inp["shape"])
    if inp["dtype"] != np.float32:
        x = np.clip(x * 40, -128, 127)
    interp.set_tensor(inp["index"], x.astype(inp["dtype"]))
    for _ in range(3):
        interp.invoke()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        rec = subprocess.Popen([perf, "record", "-q", "-F", str(frequency), "-p",
                                str(os.getpid()), "-o", data],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # perf attaches asynchronously
        if rec.poll() is not None:
            raise RuntimeError(f"perf record failed: {rec.stderr.read().decode().strip()[:300]}"
                               " (is /proc/sys/kernel/perf_event_paranoid above 2?)")
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            interp.invoke()
            times.append((time.perf_counter() - t0) * 1e3)
        rec.send_signal(signal.SIGINT)
        rec.wait(timeout=60)
        report = subprocess.run([perf, "report", "-i", data, "--stdio", "--no-children",
                                 "--sort", "dso,symbol", "--percent-limit", "0.01"],
                                capture_output=True, text=True, check=True).stdout
    return {"median_ms": float(np.median(times)), "invokes": len(times),
            "rows": parse_report(report)}


def summarize(rows: List[Tuple[float, str, str]]) -> List[Tuple[str, float]]:
    """Percent of samples per category, largest first."""
    total = collections.Counter()
    for pct, dso, sym in rows:
        total[categorize(sym, dso)] += pct
    return total.most_common()


def _model_content(args) -> bytes:
    if args.tflite:
        if not os.path.isfile(args.tflite):
            raise FileNotFoundError(f"{args.tflite}: .tflite file not found")
        with open(args.tflite, "rb") as f:
            return f.read()
    from xhrnet_tf.tools import bench_tflite  # pylint: disable=import-outside-toplevel
    _, model, cfg = bench_tflite.bench_model(args.config)
    return bench_tflite.convert(model, args.format, cfg)


def print_profile(res: Dict, top: int) -> None:
    med = res["median_ms"]
    print(f"\n{res['invokes']} invokes, median {med:.2f} ms; share of samples and the "
          "milliseconds of one invoke it stands for:\n")
    print("| where | share | ms |\n|---|---|---|")
    for name, pct in summarize(res["rows"]):
        print(f"| {name} | {pct:.1f}% | {pct * med / 100:.2f} |")
    print(f"\ntop {top} functions:\n\n| share | function |\n|---|---|")
    for pct, _, sym in sorted(res["rows"], reverse=True)[:top]:
        print(f"| {pct:.2f}% | `{sym[:110]}` |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.tools.profile_tflite",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config name in configs/ or YAML path, or mnv2_sb")
    src.add_argument("--tflite", help="profile this .tflite file as it is")
    p.add_argument("--format", default="fp32", choices=("fp32", "fp16", "dynamic", "int8", "qat"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    try:
        _perf()
        res = profile(_model_content(args), args.threads, args.seconds)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_profile(res, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
