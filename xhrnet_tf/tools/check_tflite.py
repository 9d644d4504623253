"""Checks what phones' delegates need of .tflite files, any .tflite, not only the package's.

    python -m xhrnet_tf.tools.check_tflite export/x18/model_fp32.tflite [more.tflite ...]
        [--ignore xnnpack_one_partition] [--json] [--no_gpu]

For each file: builtin ops only, every tensor of rank <= 4, no BATCH_MATMUL, LiteRT's GPU
accelerator running the whole graph (and how far its output is from the CPU's; see
xhrnet_tf/litert_gpu.py for the Vulkan driver it needs on a machine without a GPU),
XNNPACK (ai_edge_litert's CPU delegate) taking the whole graph as one partition and, for
full-integer models, no float kernel between the QUANTIZE and DEQUANTIZE at the ends: the
checks the tests make of every graph `export` writes.

Exit status 0 when every check that applies passes (checks named in --ignore do not count),
1 when one fails, 2 when a file cannot be read. X-HRNet's int8 models fail
xnnpack_one_partition by design on today's XNNPACK, which has no int8 kernel for SUSA's EXP,
DIV and RSQRT (tflite/README.md, "Known limit: int8 and XNNPACK").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence

from xhrnet_tf.tflite_utils import DELEGATE_CHECKS, delegate_checks


class CheckError(ValueError):
    """A file that cannot be checked."""


def check_file(path: str, gpu: bool = True) -> Dict:
    """{"file", "bytes", "checks"} of one .tflite; CheckError names the file when it is
    missing or not a TFLite model."""
    if not os.path.isfile(path):
        raise CheckError(f"{path}: file not found; pass the path of a .tflite model")
    with open(path, "rb") as f:
        content = f.read()
    try:
        checks = delegate_checks(content, gpu=gpu)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckError(f"{path}: not a readable TFLite model ({first}); pass a .tflite "
                         "file that tflite_convert or xhrnet_tf.export wrote") from None
    return {"file": path, "bytes": len(content), "checks": checks}


def failures(result: Dict, ignore: Sequence[str] = ()) -> List[str]:
    return [name for name, c in result["checks"].items()
            if c["ok"] is False and name not in ignore]


def format_result(result: Dict, ignore: Sequence[str] = ()) -> str:
    size = result["bytes"]
    lines = [f"{result['file']} ({size / 2 ** 20:.2f} MB)" if size >= 10 ** 5 else
             f"{result['file']} ({size} bytes)"]
    for name, c in result["checks"].items():
        mark = {True: "ok", False: "FAIL", None: "n/a"}[c["ok"]]
        if c["ok"] is False and name in ignore:
            mark = "fail (ignored)"
        lines.append(f"  {mark:<14} {DELEGATE_CHECKS[name]}: {c['detail']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.tools.check_tflite",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help=".tflite files")
    p.add_argument("--ignore", default="",
                   help=f"comma-separated checks that do not fail the run: {list(DELEGATE_CHECKS)}")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no_gpu", action="store_true",
                   help="skip the run on LiteRT's GPU accelerator (a minute or more for a new "
                        "graph on a software Vulkan driver)")
    args = p.parse_args(argv)
    ignore = [n.strip() for n in args.ignore.split(",") if n.strip()]
    unknown = sorted(set(ignore) - set(DELEGATE_CHECKS))
    if unknown:
        print(f"error: --ignore {unknown}: no such check; choose from {list(DELEGATE_CHECKS)}",
              file=sys.stderr)
        return 2
    results, unreadable = [], 0
    for path in args.files:  # an unreadable file does not cost the others their report
        try:
            results.append(check_file(path, gpu=not args.no_gpu))
        except CheckError as e:
            print(f"error: {e}", file=sys.stderr)
            unreadable += 1
    failed = {r["file"]: failures(r, ignore) for r in results}
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(format_result(r, ignore))
    bad = {f: names for f, names in failed.items() if names}
    for f, names in bad.items():
        print(f"{f}: failed {', '.join(names)}", file=sys.stderr)
    return 2 if unreadable else 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
