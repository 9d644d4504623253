"""A .tflite run on LiteRT's GPU accelerator, compared with the CPU.

    python -m xhrnet_tf.litert_gpu model.tflite [--enforce_f32]

ai_edge_litert ships LiteRT's GPU backend (ML Drift on WebGPU, the GPU path of LiteRT on
phones and desktops). With no GPU it runs on any Vulkan driver, a software one included:
Mesa's lavapipe (llvmpipe) from Mesa 23 on, e.g. Debian 12's `mesa-vulkan-drivers` from
bookworm-backports; Mesa 22's lavapipe lacks a feature Dawn needs ("No adapters found").
So on a server the GPU delegate itself says whether it takes the whole graph and what it
computes, which tf.lite's Analyzer no longer does: in TensorFlow 2.21 its GPU check
reports no warning for any graph, a Flex op or CUMSUM included.

It runs in a child process (`gpu_report`) that does not import TensorFlow: loading the GPU
accelerator into a process that has TensorFlow's own TFLite runtime crashed it (SIGSEGV),
and the GPU delegate aborts the process on some graphs it cannot build, where a child
process turns that into a report.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict

import numpy as np

_NO_ADAPTER = ("No adapters found", "Failed to initialize WebGPU environment")
# Lines of the child's log that say why a graph was refused, most telling first.
_WHY = ("unresolved custom op", "Check failed", "not supported", "Unsupported", "ERROR:")


def _run(path: str, enforce_f32: bool) -> Dict:
    """In this process (no TensorFlow here): the GPU run and the CPU (XNNPACK) run of one
    random input, and how far apart they are."""
    from ai_edge_litert.compiled_model import CompiledModel  # pylint: disable=import-outside-toplevel
    from ai_edge_litert.gpu_options import GpuOptions  # pylint: disable=import-outside-toplevel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator  # pylint: disable=import-outside-toplevel
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
    from ai_edge_litert.options import Options  # pylint: disable=import-outside-toplevel
    start = time.perf_counter()
    # GPU | CPU: ops the GPU does not take fall back to the CPU, so a partial graph is
    # reported as such instead of failing to build.
    accel = HardwareAccelerator.GPU | HardwareAccelerator.CPU
    model = CompiledModel.from_file(path, options=Options(
        hardware_accelerators=accel, gpu_options=GpuOptions(enforce_f32=enforce_f32)))
    cpu = Interpreter(model_path=path)
    cpu.allocate_tensors()
    inp, out = cpu.get_input_details()[0], cpu.get_output_details()[0]
    rng = np.random.default_rng(0)
    if inp["dtype"] == np.float32:
        x = rng.normal(size=inp["shape"]).astype(np.float32)
    else:
        info = np.iinfo(inp["dtype"])
        x = rng.integers(info.min, info.max, size=inp["shape"], endpoint=True).astype(inp["dtype"])
    inputs, outputs = model.create_input_buffers(0), model.create_output_buffers(0)
    inputs[0].write(x)
    model.run_by_index(0, inputs, outputs)
    gpu = outputs[0].read(int(np.prod(out["shape"])), out["dtype"]).reshape(out["shape"])
    seconds = time.perf_counter() - start
    cpu.set_tensor(inp["index"], x)
    cpu.invoke()
    ref = cpu.get_tensor(out["index"]).astype(np.float64)
    diff = np.abs(gpu.astype(np.float64) - ref)
    flat_gpu, flat_ref = gpu.reshape(-1, gpu.shape[-1]), ref.reshape(-1, ref.shape[-1])
    return {"available": True, "fully_accelerated": bool(model.is_fully_accelerated()),
            "enforce_f32": enforce_f32, "seconds": round(seconds, 1),
            "max_abs_diff": float(diff.max()), "peak": float(np.abs(ref).max()),
            "argmax_agree": float((flat_gpu.argmax(0) == flat_ref.argmax(0)).mean()),
            "finite": bool(np.isfinite(gpu).all() or not np.isfinite(ref).all())}


def gpu_report(model_content: bytes, enforce_f32: bool = False, timeout: float = 1800) -> Dict:
    """{"available": False, "reason"} when there is no WebGPU adapter; otherwise
    {"available": True, "ok": whether the GPU took the whole graph and its output is finite
    (where the CPU's is), "detail", and `_run`'s figures when it ran}."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.tflite")
        with open(path, "wb") as f:
            f.write(model_content)
        # Mesa's Vulkan loader complains without a runtime dir; any writable one will do.
        env = dict(os.environ, XDG_RUNTIME_DIR=os.environ.get("XDG_RUNTIME_DIR") or tmp)
        cmd = [sys.executable, os.path.abspath(__file__), path]  # as a script: no package import
        if enforce_f32:
            cmd.append("--enforce_f32")
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                                 check=False)
        except subprocess.TimeoutExpired:
            return {"available": True, "ok": False,
                    "detail": f"the GPU run did not finish in {timeout:.0f} s"}
    out_lines = res.stdout.strip().splitlines()
    if res.returncode == 0 and out_lines:
        report = json.loads(out_lines[-1])
        report["ok"] = report["fully_accelerated"] and report["finite"]
        report["detail"] = ("whole graph on the GPU" if report["fully_accelerated"] else
                            "part of the graph fell back to the CPU") + (
            "" if report["finite"] else ", but its output is not finite where the CPU's is") + (
            f", max |GPU - CPU| {report['max_abs_diff'] / max(report['peak'], 1e-12):.1e}"
            f" of the peak, argmax agrees {report['argmax_agree']:.0%}")
        return report
    if any(marker in res.stderr for marker in _NO_ADAPTER):
        return {"available": False, "reason": "no WebGPU adapter: install a Vulkan driver "
                "(Debian 12: mesa-vulkan-drivers from bookworm-backports)"}
    log = res.stderr.splitlines()
    why = next((ln for pattern in _WHY for ln in log if pattern in ln),
               f"exit status {res.returncode}")
    return {"available": True, "ok": False,
            "detail": "the GPU delegate refused the graph: "
                      + re.sub(r"^[FEWI]\d{4} \S+\s+\d+ ", "", why.strip())[:300]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.litert_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--enforce_f32", action="store_true",
                   help="float32 arithmetic on the GPU (default: float16, as on phones)")
    args = p.parse_args(argv)
    print(json.dumps(_run(args.model, args.enforce_f32)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
