"""What one SUSA costs in XNNPACK fp32, against the full-size memory traffic it cannot avoid.

    python -m xhrnet_tf.tools.bench_susa [--config x18] [--threads 1] [--runs 300]

For every (input shape, direction) of SUSA in the config's network, four one-input TFLite
models are timed round-robin, each a chain of `--chain` identical steps (so that the invoke
overhead spreads over them):

* `SUSA`: the layer as exported (random weights, the `tflite_graph` form of its query);
* `skeleton`: only its full-size work, the three broadcast MULs and two SUMs (query weighting,
  attention-weighted sum, gate), with SUSA's own broadcast shapes; of its small ops only one
  scaling of a pooled vector, which keeps the chain finite;
* `gate MUL`: only the last of these, the output times its gate: a lower bound for any SUSA;
* `good MUL`: the same MUL with the operand broadcast along H instead, (1, W, C), whose rows
  XNNPACK streams in full; an (H, 1, C) operand is applied C values at a time.

The table gives microseconds per instance and the network's totals (instances x time), to
set against `bench_tflite`'s x18 - x18_dwonly, the latency SUSA adds to the network.
"""
from __future__ import annotations

import argparse
import collections
import sys
from typing import Dict, List, Tuple

import numpy as np

KINDS = ("SUSA", "skeleton", "gate MUL", "good MUL")


def susa_instances(config) -> Dict[Tuple[Tuple[int, int, int], str], int]:
    """{((H, W, C), direction): number of SUSA layers} of the config's network."""
    from xhrnet_tf.layers import SUSA  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.model import build_pose_model  # pylint: disable=import-outside-toplevel
    model = build_pose_model(config)
    counts = collections.Counter(
        (tuple(int(d) for d in layer.input_shape[1:]), layer.direction)
        for layer in model.layers if isinstance(layer, SUSA))
    return dict(sorted(counts.items(), key=lambda kv: (-np.prod(kv[0][0]), kv[0][1])))


def chain_model(kind: str, shape, direction: str, steps: int, seed: int = 0):
    """A Functional model of `steps` chained copies of one `kind` (see KINDS)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tf_keras  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.layers import SUSA  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(seed)
    h, w, c = shape
    # Broadcast operands as SUSA's: 'h' weights its query (H,1,1), attends (1,W,C) and gates
    # (H,1,C); 'w' weights (1,W,C), attends (H,1,C), gates (1,W,C).
    pool, attend = (1, 2) if direction == "h" else (2, 1)
    operand = lambda dims: tf.constant(  # noqa: E731
        rng.uniform(0.9, 1.1, dims).astype(np.float32))
    inp = tf_keras.Input(shape, batch_size=1)
    x = inp
    for _ in range(steps):
        if kind == "SUSA":
            layer = SUSA(direction, max(h, w))
            x = layer(x)
            for v in layer.weights:
                base = 1.0 if "gamma" in v.name or "group" in v.name else 0.0
                v.assign(rng.normal(base, 0.3, v.shape).astype(np.float32))
        elif kind == "skeleton":  # scaled by the lengths so that the chain stays finite
            weight = operand((1, 1, w, c) if pool == 2 else (1, h, 1, 1)) / shape[pool - 1]
            q = tf.reduce_sum(x * weight, axis=pool, keepdims=True)
            num = tf.reduce_sum(x * q, axis=attend, keepdims=True)
            x = x * (num / shape[attend - 1])
        elif kind == "gate MUL" and direction == "h":
            x = x * operand((1, h, 1, c))
        else:
            x = x * operand((1, 1, w, c))
    return tf_keras.Model(inp, x)


def measure(config, threads: int = 1, runs: int = 300, steps: int = 8) -> List[Dict]:
    """One row per (shape, direction): instances and median us per instance of each kind."""
    from xhrnet_tf.tflite_utils import to_tflite  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.tools.bench_tflite import time_round_robin  # pylint: disable=import-outside-toplevel
    rows, contents = [], {}
    for (shape, direction), count in susa_instances(config).items():
        rows.append({"shape": shape, "direction": direction, "count": count})
        for kind in KINDS:
            contents[(len(rows) - 1, kind)] = to_tflite(chain_model(kind, shape, direction,
                                                                    steps))
    # round-robin: drift of the machine hits every model alike
    for (i, kind), ms in time_round_robin(contents, threads, runs, warmup=5).items():
        rows[i][kind] = float(np.median(ms)) * 1e3 / steps
    return rows


def totals(rows: List[Dict]) -> Dict[str, float]:
    """Milliseconds per network invoke: sum over shapes of instances x time."""
    return {kind: sum(r["count"] * r[kind] for r in rows) / 1e3 for kind in KINDS}


def print_report(rows: List[Dict]) -> None:
    print("| H x W x C | direction | instances | " + " | ".join(f"{k} us" for k in KINDS) +
          " |\n|---|---|---" + "|---" * len(KINDS) + "|")
    for r in rows:
        print(f"| {'x'.join(map(str, r['shape']))} | {r['direction']} | {r['count']} | " +
              " | ".join(f"{r[k]:.1f}" for k in KINDS) + " |")
    print("| total (ms per invoke) | | {} | ".format(sum(r["count"] for r in rows)) +
          " | ".join(f"{v:.2f}" for v in totals(rows).values()) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.tools.bench_susa",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="x18", help="config name in configs/ or a YAML path")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--chain", type=int, default=8, help="steps per timed model")
    args = p.parse_args(argv)
    import xhrnet_tf  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.config import SUSA_UNITS  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.tools.bench_tflite import config_path  # pylint: disable=import-outside-toplevel
    try:
        config = xhrnet_tf.load_config(config_path(args.config))
    except (OSError, ValueError) as e:
        print(f"error: --config: {e}", file=sys.stderr)
        return 1
    if config.model.unit not in SUSA_UNITS:
        print(f"error: --config {args.config}: unit '{config.model.unit}' has no SUSA layer; "
              "choose an X-HRNet config (unit sx or px)", file=sys.stderr)
        return 1
    rows = measure(config, args.threads, args.runs, args.chain)
    print_report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
