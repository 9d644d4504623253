"""TFLite latency on this CPU: X-HRNet against two peers converted the same way.

    python -m xhrnet_tf.tools.bench_tflite [--configs x18,x30] [--formats fp32,fp16,int8[,qat]]
        [--threads 1,2] [--runs 40] [--json out.json]

Every model is converted from random weights with the package's own converter (fixed batch 1,
builtin ops; int8 is full-integer PTQ calibrated on random images) and run by ai_edge_litert
with its default XNNPACK delegate. The config-built networks get random weights with unit-scale
activations (`unit_scale_weights`), so their int8 scales, and with them XNNPACK's int8
partitioning, are a trained network's rather than those of the official init's vanishing
activations. The peers:
WNL-HRNet-18 (`configs/wnl18.yaml`, the naive 1x1-conv network the paper beats) and a
MobileNetV2 SimpleBaseline at 256x192 (the paper's MobileNetV2 row). Within one thread count
the models run round-robin, one invoke each per round, so drift of this shared machine hits all
of them alike and the ratios stay meaningful.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

PEER_WNL = "wnl18"
PEER_MNV2 = "mnv2_sb"


def mobilenetv2_simplebaseline(input_size=(256, 192)):
    """MobileNetV2 backbone + three 256-channel 4x4 stride-2 deconv/BN/ReLU + 1x1 conv to 17."""
    import tf_keras  # pylint: disable=import-outside-toplevel
    from tf_keras import layers  # pylint: disable=import-outside-toplevel
    h, w = input_size
    backbone = tf_keras.applications.MobileNetV2(input_shape=(h, w, 3), include_top=False,
                                                 weights=None)
    x = backbone.output
    for i in range(3):
        x = layers.Conv2DTranspose(256, 4, strides=2, padding="same", use_bias=False,
                                   name=f"deconv{i}")(x)
        x = layers.BatchNormalization(name=f"deconv{i}_bn")(x)
        x = layers.ReLU(name=f"deconv{i}_relu")(x)
    x = layers.Conv2D(17, 1, name="final_layer")(x)
    return tf_keras.Model(backbone.input, x, name="mobilenetv2_simplebaseline")


def unit_scale_weights(model, seed: int = 0) -> None:
    """He-normal conv kernels, SUSA pooling weights, biases and LayerNorm affine
    values near the init's, and BN statistics measured on a random batch: every BN output
    has unit scale, as in a trained network.

    The official init, N(0, 0.001), shrinks the activations about 1000x per conv; after a few
    layers their int8 scales are ~1e-9, and XNNPACK refuses int8 MULs whose scale ratios fall
    outside its range (measured: 96 more ops left out of x18's int8 partitions), a partitioning
    no trained model has. Timing in float does not depend on the values.
    """
    import tf_keras  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(seed)
    for v in model.weights:
        leaf, shape = v.name.split("/")[-1], tuple(v.shape)
        if leaf.startswith(("kernel", "depthwise_kernel")) and len(shape) == 4:
            fan_in = shape[0] * shape[1] * (1 if leaf.startswith("depthwise") else shape[2])
            v.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32))
        elif leaf.startswith("conv_kernel"):  # SUSA's 1x1 conv on the pooled vectors
            v.assign(rng.normal(0.0, np.sqrt(1.0 / shape[2]), shape).astype(np.float32))
        elif leaf.startswith("mean_kernel"):
            v.assign(np.ones(shape, np.float32))
        elif leaf.startswith(("ln_gamma", "ln_beta", "mean_bias", "conv_bias", "group_weight")):
            # Not the init's exact ones and zeros, which the converter multiplies and adds
            # away (192 ops fewer in x18 than any trained model has).
            base = 1.0 if leaf.startswith(("ln_gamma", "group_weight")) else 0.0
            v.assign(rng.normal(base, 0.1, shape).astype(np.float32))
    bns = [l for l in model.layers if isinstance(l, tf_keras.layers.BatchNormalization)]
    momenta = [l.momentum for l in bns]
    for layer in bns:  # one training-mode pass stores each BN's batch statistics
        layer.momentum = 0.0
    model(rng.normal(size=(4,) + tuple(model.input_shape[1:])).astype(np.float32), training=True)
    for layer, m in zip(bns, momenta):
        layer.momentum = m


def config_path(name: str) -> str:
    """A config name in the repository's configs/ (x18, wnl18, ...) or a YAML path."""
    if name.endswith(".yaml"):
        return name
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, "configs", f"{name}.yaml")


def bench_model(name: str) -> Tuple[str, object, Optional[object]]:
    """(key, model with bench weights, its Config) for a config name in configs/, a YAML
    path, or PEER_MNV2 (no Config)."""
    if name == PEER_MNV2:
        return PEER_MNV2, mobilenetv2_simplebaseline(), None
    import xhrnet_tf  # pylint: disable=import-outside-toplevel
    path = config_path(name)
    cfg = xhrnet_tf.load_config(path)
    model = xhrnet_tf.build_pose_model(cfg)
    unit_scale_weights(model)
    return os.path.splitext(os.path.basename(path))[0], model, cfg


def build_models(configs: List[str]) -> Dict[str, Tuple[object, Optional[object]]]:
    """name -> (model, its Config; None for MobileNetV2-SB)."""
    models = {}
    for name in list(configs) + [PEER_WNL, PEER_MNV2]:
        key, model, cfg = bench_model(name)
        models[key] = (model, cfg)
    return models


def convert(model, fmt: str, config=None, graphs: Optional[Dict] = None) -> bytes:
    """The package's converter; for an X-HRNet/WNL model (config given) the graphs `export`
    converts: int8 from `int8_deploy_copy`, float formats from the paired graph. "qat" is the
    int8 graph a QAT run exports (SUSA's LayerNorm as L2 normalisation, its query as a
    depthwise conv), ranges calibrated on the same random images as PTQ's. `graphs` keeps the
    deploy copies of this model between calls (each is a full rebuild of the network)."""
    from xhrnet_tf import qat  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.calibration import calibrate_ranges  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.export import (format_hook, int8_deploy_copy, int8_graph_copy,  # pylint: disable=import-outside-toplevel
                                  ptq_int8_hook)
    from xhrnet_tf.model import paired_copy  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.tflite_utils import to_tflite  # pylint: disable=import-outside-toplevel
    graphs = {} if graphs is None else graphs

    def deploy(kind, make):
        if config is None:
            return model
        if kind not in graphs:
            graphs[kind] = make(config, model)
        return graphs[kind]

    if fmt in ("int8", "qat"):
        rng = np.random.default_rng(0)
        shape = (1,) + tuple(model.input_shape[1:])
        images = [rng.normal(size=shape).astype(np.float32) for _ in range(8)]
        if fmt == "qat":
            qmodel, _ = qat.quantize_model(deploy("int8_graph", int8_graph_copy))
            calibrate_ranges(qmodel, images)
            return to_tflite(qmodel, converter_hook=qat.int8_hook())
        return to_tflite(deploy("int8_deploy", int8_deploy_copy),
                         converter_hook=ptq_int8_hook(images, "float"))
    return to_tflite(deploy("paired", paired_copy), converter_hook=format_hook(fmt))


def round_robin_order(keys: List, run_index: int) -> List:
    """The order of one round: each run starts at the next model, so that over the runs every
    model takes every position equally often."""
    start = run_index % len(keys)
    return keys[start:] + keys[:start]


def time_round_robin(contents: Dict[str, bytes], threads: int, runs: int,
                     warmup: int = 3) -> Dict[str, List[float]]:
    """Milliseconds per invoke of each model, timed in turns (machine drift hits all alike)."""
    from xhrnet_tf.tflite_utils import interpreter  # pylint: disable=import-outside-toplevel

    def ready(content):
        interp = interpreter(content, num_threads=threads)
        inp = interp.get_input_details()[0]
        interp.set_tensor(inp["index"], np.random.default_rng(0).normal(
            size=inp["shape"]).astype(inp["dtype"]))
        for _ in range(warmup):
            interp.invoke()
        return interp

    # Interpreters made later in a batch ran faster, whatever their turn: the first ~2% slower
    # than the rest, the rest ~1% apart in the order made (x18 fp32, copies of one model),
    # which biased every ratio against the models listed first. So the runs come in blocks,
    # each with fresh interpreters made in a rotated order, the first of them untimed.
    keys = list(contents)
    times = {key: [] for key in keys}
    blocks = min(len(keys), runs)
    for block in range(blocks):
        made = round_robin_order(keys, block)
        spare = ready(contents[made[0]])
        interps = {key: ready(contents[key]) for key in made}
        for run_index in range(runs // blocks + (block < runs % blocks)):
            for key in round_robin_order(made, run_index):
                t0 = time.perf_counter()
                interps[key].invoke()
                times[key].append((time.perf_counter() - t0) * 1e3)
        del spare, interps
    return times


def run(configs: List[str], formats: List[str], threads: List[int], runs: int) -> Dict:
    from xhrnet_tf.config import SUSA_UNITS  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.tflite_utils import graph_report, xnnpack_report  # pylint: disable=import-outside-toplevel
    models = build_models(configs)
    contents, rows = {}, []
    for name, (model, cfg) in models.items():
        graphs = {}
        for fmt in formats:
            if fmt == "qat" and cfg is None:
                continue  # QAT is the package's, for its own configs
            content = convert(model, fmt, cfg, graphs)
            contents[(name, fmt)] = content
            report = graph_report(content)
            xnn = xnnpack_report(content)
            rows.append({"model": name, "format": fmt, "size_mb": len(content) / 2 ** 20,
                         "ops": report["num_ops"], "xnnpack_partitions": xnn["partitions"]})
            print(f"converted {name} {fmt}: {len(content) / 2 ** 20:.2f} MB, "
                  f"{report['num_ops']} ops, {xnn['partitions']} XNNPACK partition(s)",
                  flush=True)
    latency = {}
    for t in threads:
        times = time_round_robin(contents, t, runs)
        for (name, fmt), ms in times.items():
            latency[(name, fmt, t)] = (float(np.median(ms)), float(np.percentile(ms, 90)))
    configs = [k for k in models if k not in (PEER_WNL, PEER_MNV2)]
    return {"rows": rows, "latency": latency, "threads": threads, "formats": formats,
            "configs": configs,
            "xhrnet": [k for k in configs if models[k][1].model.unit in SUSA_UNITS]}


def ratios(res: Dict) -> List[Dict]:
    """The issue's goals as same-run ratios. The goals against the peers are set for
    X-HRNet-18 (the MobileNetV2 one at one thread), int8 <= 0.6x fp32 for the X-HRNet
    networks; ablations such as x18_dwonly get their ratios printed without a goal."""
    lat = res["latency"]
    out = []

    def add(label, num, den, goal):
        if num in lat and den in lat:
            r = lat[num][0] / lat[den][0]
            out.append({"ratio": label, "value": r, "goal": goal,
                        "met": None if goal is None else r <= goal})

    for t in res["threads"]:
        for cfg in res["configs"]:
            x18 = cfg == "x18"
            int8_goal = 0.6 if cfg in res["xhrnet"] else None
            add(f"{cfg} fp32 / {PEER_MNV2} fp32 @{t}t", (cfg, "fp32", t), (PEER_MNV2, "fp32", t),
                0.17 if x18 and t == 1 else None)
            for fmt in res["formats"]:
                add(f"{cfg} / {PEER_WNL} {fmt} @{t}t", (cfg, fmt, t), (PEER_WNL, fmt, t),
                    0.8 if x18 else None)
            add(f"{cfg} int8 / fp32 @{t}t", (cfg, "int8", t), (cfg, "fp32", t), int8_goal)
            add(f"{cfg} qat int8 / fp32 @{t}t", (cfg, "qat", t), (cfg, "fp32", t), int8_goal)
    return out


def print_report(res: Dict) -> None:
    lat = res["latency"]
    head = "".join(f" | {t}t median | {t}t p90" for t in res["threads"])
    print(f"\n| model | format | size MB | ops | XNNPACK partitions{head} |")
    print("|---|---|---|---|---" + "|---|---" * len(res["threads"]) + "|")
    for row in res["rows"]:
        cells = "".join(f" | {lat[(row['model'], row['format'], t)][0]:.1f} ms"
                        f" | {lat[(row['model'], row['format'], t)][1]:.1f} ms"
                        for t in res["threads"])
        print(f"| {row['model']} | {row['format']} | {row['size_mb']:.2f} | {row['ops']} | "
              f"{row['xnnpack_partitions']}{cells} |")
    print("\n| ratio (medians) | value | goal | met |\n|---|---|---|---|")
    for r in ratios(res):
        goal = "-" if r["goal"] is None else f"<= {r['goal']}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        print(f"| {r['ratio']} | {r['value']:.3f} | {goal} | {met} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.tools.bench_tflite",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="x18,x30",
                   help="comma-separated config names in configs/ or YAML paths")
    p.add_argument("--formats", default="fp32,fp16,int8")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - {"fp32", "fp16", "dynamic", "int8", "qat"})
    if unknown:
        print(f"error: --formats: unknown {unknown}; choose from fp32, fp16, dynamic, int8, "
              "qat", file=sys.stderr)
        return 1
    res = run([c for c in args.configs.split(",") if c], formats,
              [int(t) for t in args.threads.split(",")], args.runs)
    print_report(res)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": res["rows"], "ratios": ratios(res),
                       "latency_ms": [{"model": m, "format": fm, "threads": t,
                                       "median": v[0], "p90": v[1]}
                                      for (m, fm, t), v in res["latency"].items()]}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
