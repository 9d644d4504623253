"""Parameter and compute counts of an X-HRNet config.

    python -m xhrnet_tf.tools.complexity --config configs/x18.yaml [--input_size 384 288] [--json]

Three numbers that are often confused (SPEC 12):
* real MACs of this graph: every conv and every attention product, each time it runs;
* real MACs of the official PyTorch graph, which evaluates the fuse paths F_i0 twice (SPEC 5.3);
* the paper's "FLOPs": the repository's torchstat rule (per module instance, last call only,
  conv MACs + bias adds + 2x BN + 1x ReLU + output size of nn.Upsample, nothing for attention),
  divided by 2**20.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Dict

import numpy as np
import tf_keras

from xhrnet_tf.config import ConfigError, load_config
from xhrnet_tf.layers import SUSA
from xhrnet_tf.model import build_pose_model
from xhrnet_tf.shape_layers import NearestUpsample

_FUSE_RELU = re.compile(r"_fuse(\d+)_relu$")
_FUSE_FROM_Z0 = re.compile(r"_fuse([1-9]\d*)_0_")  # F_i0, i >= 1: run twice officially


def _numel(shape) -> int:
    return int(np.prod([d for d in shape[1:]]))


def _susa_counts(layer: SUSA):
    _, h, w, c = layer.input_shape
    q_len, t_len = (w, h) if layer.direction == "h" else (h, w)
    mean_conv = c * q_len  # depthwise 1x1 over the pooled vector
    conv = c * c * t_len
    attention = h * w * c  # the (h x w) . (w x 1) products of every channel
    bias_adds = c * q_len + c * t_len
    return mean_conv + conv, attention, bias_adds


def _layer_counts(layer) -> Dict[str, int]:
    """Per-layer counts for one call: conv MACs, attention MACs and the torchstat terms."""
    out = dict(conv=0, attention=0, bias=0, bn=0, relu=0, upsample=0)
    if isinstance(layer, tf_keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        out["conv"] = kh * kw * _numel(layer.output_shape)
    elif isinstance(layer, tf_keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        cin = layer.input_shape[-1]
        out["conv"] = kh * kw * cin * _numel(layer.output_shape)
        if layer.use_bias:
            out["bias"] = _numel(layer.output_shape)
    elif isinstance(layer, SUSA):
        out["conv"], out["attention"], out["bias"] = _susa_counts(layer)
    elif isinstance(layer, tf_keras.layers.BatchNormalization):
        out["bn"] = 2 * _numel(layer.input_shape)
    elif isinstance(layer, tf_keras.layers.ReLU):
        out["relu"] = _numel(layer.input_shape)
    elif isinstance(layer, NearestUpsample):
        out["upsample"] = int(np.prod(layer.output_shape[1:3]))  # torchstat drops channels
    return out


def _counted_by_torchstat(name: str, fuse_relus: Dict[str, int]) -> bool:
    """The official module shares one ReLU over all fused outputs; torchstat keeps its last
    (lowest-resolution) call only."""
    m = _FUSE_RELU.search(name)
    if not m:
        return True
    module = name[:m.start()]
    return int(m.group(1)) == fuse_relus[module]


def complexity(model: tf_keras.Model, fuse_mode: str = "official") -> Dict[str, float]:
    fuse_relus: Dict[str, int] = {}
    for layer in model.layers:
        m = _FUSE_RELU.search(layer.name)
        if m:
            key = layer.name[:m.start()]
            fuse_relus[key] = max(fuse_relus.get(key, 0), int(m.group(1)))
    conv = attention = official_extra = 0
    stat = subsampled_extra = 0
    names = {layer.name for layer in model.layers}
    for layer in model.layers:
        c = _layer_counts(layer)
        conv += c["conv"]
        attention += c["attention"]
        base = layer.name[:-3] if layer.name.endswith("_bn") else layer.name
        if f"{base}_subsample" in names:
            # Stride 1 + subsample here, stride 2 officially: the official graph does 1/4.
            subsampled_extra += c["conv"] * 3 // 4
            for key in ("conv", "bn"):
                c[key] -= c[key] * 3 // 4
        if fuse_mode == "official" and _FUSE_FROM_Z0.search(layer.name):
            official_extra += c["conv"]
        if _counted_by_torchstat(layer.name, fuse_relus):
            stat += c["conv"] + c["bias"] + c["bn"] + c["relu"] + c["upsample"]
    params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    return {
        "params": params,
        "macs": conv + attention,
        "conv_macs": conv,
        "attention_macs": attention,
        "official_graph_macs": conv - subsampled_extra + official_extra + attention,
        "official_graph_conv_macs": conv - subsampled_extra + official_extra,
        "torchstat_flops": stat,
        "paper_flops_M": stat / 2 ** 20,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xhrnet_tf.tools.complexity",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--input_size", type=int, nargs=2, metavar=("H", "W"), default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        model = build_pose_model(cfg, input_size=args.input_size)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    res = complexity(model, cfg.model.fuse_mode)
    size = args.input_size or list(cfg.model.input_size)
    res["input_size"] = list(size)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{args.config} @ {size[0]}x{size[1]}")
    print(f"  trainable parameters      {res['params']:>15,}")
    print(f"  MACs (this graph)         {res['macs'] / 1e6:>15.2f} M "
          f"(conv {res['conv_macs'] / 1e6:.2f} M + attention {res['attention_macs'] / 1e6:.2f} M)")
    print(f"  MACs (official graph)     {res['official_graph_macs'] / 1e6:>15.2f} M "
          "(fuse paths from branch 0 evaluated twice)")
    print(f"  paper FLOPs (torchstat)   {res['paper_flops_M']:>15.2f} M "
          "(per-module count / 2**20, SPEC 12)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
