"""Import an official X-HRNet / mmpose checkpoint into the tf_keras model.

    python -m xhrnet_tf.convert --config configs/x18.yaml --checkpoint FILE --output x18.weights.h5

FILE is an mmcv `.pth` (needs PyTorch) or an `.npz` keyed by the official names (SPEC 11).
The mapping walks the same architecture table as the builder; every official key must be
consumed and every Keras weight filled, otherwise the error lists the names left over.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from xhrnet_tf.config import Config, ModelConfig, load_config
from xhrnet_tf.model import stage_table

# (kind, keras layer name, official key or key prefix)
Entry = Tuple[str, str, str]


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model built from the config."""


def _conv_module(name: str, prefix: str, depthwise: bool = False) -> List[Entry]:
    """mmcv ConvModule: `{prefix}.conv.weight` + `{prefix}.bn.*`."""
    return [("dw" if depthwise else "conv", name, f"{prefix}.conv.weight"),
            ("bn", f"{name}_bn", f"{prefix}.bn")]


def _sequential_dw_pw(dw_name: str, pw_name: str, prefix: str) -> List[Entry]:
    """nn.Sequential(DW conv, BN, PW conv, BN[, ReLU]): keys .0 .1 .2 .3."""
    return [("dw", dw_name, f"{prefix}.0.weight"), ("bn", f"{dw_name}_bn", f"{prefix}.1"),
            ("conv", pw_name, f"{prefix}.2.weight"), ("bn", f"{pw_name}_bn", f"{prefix}.3")]


def _unit_entries(m: ModelConfig, name: str, prefix: str) -> List[Entry]:
    if m.unit == "sx":
        first, last = ("w", "h") if m.susa_order == "wh" else ("h", "w")
        return ([("susa", f"{name}_{first}susa", f"{prefix}.0")]
                + _conv_module(f"{name}_dw", f"{prefix}.1", depthwise=True)
                + [("susa", f"{name}_{last}susa", f"{prefix}.2")])
    if m.unit == "px":
        out = []
        for part in (0, 2):
            out += [("susa", f"{name}_hwsusa{part}_h", f"{prefix}.{part}.hconv"),
                    ("susa", f"{name}_hwsusa{part}_w", f"{prefix}.{part}.wconv")]
            if part == 0:
                out += _conv_module(f"{name}_dw", f"{prefix}.1", depthwise=True)
        return out
    if m.unit == "naive":
        return (_conv_module(f"{name}_pw0", f"{prefix}.0")
                + _conv_module(f"{name}_dw", f"{prefix}.1", depthwise=True)
                + _conv_module(f"{name}_pw2", f"{prefix}.2"))
    return _conv_module(f"{name}_dw", f"{prefix}.0", depthwise=True)  # baseline


def _fuse_entries(channels: Sequence[int], name: str, prefix: str) -> Iterator[Entry]:
    n = len(channels)
    for i in range(n):
        for j in range(n):
            q, k = f"{prefix}.fuse_layers.{i}.{j}", f"{name}_fuse{i}_{j}"
            if j > i:
                yield ("conv", f"{k}_pw", f"{q}.0.weight")
                yield ("bn", f"{k}_pw_bn", f"{q}.1")
            for t in range(i - j):
                yield from _sequential_dw_pw(f"{k}_step{t}_dw", f"{k}_step{t}_pw", f"{q}.{t}")


def official_entries(m: ModelConfig, with_head: bool = True) -> List[Entry]:
    """Every (kind, keras layer, official key) pair of the model, in build order."""
    out: List[Entry] = _conv_module("stem_conv1", "backbone.stem.conv1")
    out += _conv_module("stem_branch1_0", "backbone.stem.branch1.0", depthwise=True)
    out += _conv_module("stem_branch1_1", "backbone.stem.branch1.1")
    out += _conv_module("stem_branch2_0", "backbone.stem.branch2.0")
    out += _conv_module("stem_branch2_1", "backbone.stem.branch2.1", depthwise=True)
    out += _conv_module("stem_branch2_2", "backbone.stem.branch2.2")
    prev = [m.stem_channels]
    for spec in stage_table(m):
        s = spec.index
        for i, c in enumerate(spec.channels):
            t_name, t_key = f"transition{s}_branch{i}", f"backbone.transition{s}.{i}"
            if i < len(prev) and prev[i] != c:
                out += _sequential_dw_pw(f"{t_name}_dw", f"{t_name}_pw", t_key)
            for t in range(i + 1 - len(prev)):
                out += _sequential_dw_pw(f"{t_name}_step{t}_dw", f"{t_name}_step{t}_pw",
                                         f"{t_key}.{t}")
        for k in range(spec.num_modules):
            mod_name, mod_key = f"stage{s}_module{k}", f"backbone.stage{s}.{k}"
            for b in range(len(spec.channels)):
                for u in range(spec.num_blocks):
                    out += _unit_entries(m, f"{mod_name}_branch{b}_unit{u}",
                                         f"{mod_key}.layers.{b}.{u}.branch2")
            out += list(_fuse_entries(spec.channels, mod_name, mod_key))
        prev = list(spec.channels)
    for p in range(4):
        key = f"backbone.head_layer.projects.{p}"
        out += _conv_module(f"head_project{p}_dw", f"{key}.depthwise_conv", depthwise=True)
        out += _conv_module(f"head_project{p}_pw", f"{key}.pointwise_conv")
    if with_head:
        out.append(("convb", "final_layer", "keypoint_head.final_layer"))
    return out


def _keys_of(kind: str, key: str) -> List[str]:
    if kind in ("conv", "dw"):
        return [key]
    if kind == "convb":
        return [f"{key}.weight", f"{key}.bias"]
    if kind == "bn":
        return [f"{key}.{s}" for s in ("weight", "bias", "running_mean", "running_var")]
    return [f"{key}.{s}" for s in ("group_weight", "mean_conv.conv.weight", "mean_conv.conv.bias",
                                   "conv.conv.weight", "conv.conv.bias", "ln.weight", "ln.bias")]


def _to_keras(kind: str, arrays: List[np.ndarray]) -> List[np.ndarray]:
    """PyTorch layouts -> Keras layouts (SPEC 2.1)."""
    if kind == "conv":
        return [arrays[0].transpose(2, 3, 1, 0)]
    if kind == "dw":
        return [arrays[0].transpose(2, 3, 0, 1)]
    if kind == "convb":
        return [arrays[0].transpose(2, 3, 1, 0), arrays[1]]
    if kind == "bn":
        return arrays
    gw, mean_w, mean_b, conv_w, conv_b, ln_w, ln_b = arrays
    return [gw.reshape(-1), mean_w.reshape(-1), mean_b, conv_w.transpose(2, 3, 1, 0), conv_b,
            ln_w, ln_b]


def _to_official(kind: str, values: List[np.ndarray], layer=None) -> List[np.ndarray]:
    """Inverse of `_to_keras`; SUSA group weights get the official (1,1,L,1)/(1,1,1,L) shape."""
    if kind == "conv":
        return [values[0].transpose(3, 2, 0, 1)]
    if kind == "dw":
        return [values[0].transpose(2, 3, 0, 1)]
    if kind == "convb":
        return [values[0].transpose(3, 2, 0, 1), values[1]]
    if kind == "bn":
        return values
    gw, mean_w, mean_b, conv_w, conv_b, ln_w, ln_b = values
    c = mean_w.shape[0]
    gw = gw.reshape((1, 1, -1, 1) if layer.direction == "h" else (1, 1, 1, -1))
    return [gw, mean_w.reshape(c, 1, 1, 1), mean_b, conv_w.transpose(3, 2, 0, 1), conv_b,
            ln_w, ln_b]


def export_official_state_dict(model, config) -> Dict[str, np.ndarray]:
    """The model's weights under the official key names and PyTorch layouts."""
    m = config.model if isinstance(config, Config) else config
    with_head = "final_layer" in {layer.name for layer in model.layers}
    state = {}
    for kind, name, key in official_entries(m, with_head=with_head):
        layer = model.get_layer(name)
        values = _to_official(kind, layer.get_weights(), layer)
        state.update(zip(_keys_of(kind, key), values))
    return state


def read_checkpoint(path: str) -> Dict[str, np.ndarray]:
    """Official state_dict as numpy arrays, from `.npz` or an mmcv/PyTorch `.pth`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            state = {k: data[k] for k in data.files}
    elif path.endswith((".pth", ".pt")):
        try:
            import torch  # pylint: disable=import-outside-toplevel
        except ImportError:
            raise ImportError(f"{path}: reading .pth checkpoints needs PyTorch; install it with "
                              "`pip install torch` (or pass an .npz of the state_dict)") from None
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        state = {k: v.detach().cpu().numpy() for k, v in ckpt.items() if hasattr(v, "detach")}
    else:
        raise ValueError(f"{path}: unknown checkpoint format; expected .pth or .npz")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_official_weights(model, state: Dict[str, np.ndarray], config) -> None:
    """Fills `model` (built from `config`) from an official state_dict, strictly."""
    m = config.model if isinstance(config, Config) else config
    layer_names = {layer.name for layer in model.layers}
    entries = official_entries(m, with_head="final_layer" in layer_names)
    expected = {k for kind, _, key in entries for k in _keys_of(kind, key)}
    present = {k for k in state if not k.endswith("num_batches_tracked")}
    if "final_layer" not in layer_names:  # a backbone-only model takes the backbone part
        present = {k for k in present if not k.startswith("keypoint_head.")}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    covered = {name for _, name, _ in entries}
    unfilled = sorted(layer.name for layer in model.layers if layer.weights and
                      layer.name not in covered)
    if missing or unexpected or unfilled:
        raise CheckpointMismatchError(_mismatch_message(missing, unexpected, unfilled))
    for kind, name, key in entries:
        layer = model.get_layer(name)
        values = _to_keras(kind, [np.asarray(state[k]) for k in _keys_of(kind, key)])
        want = [tuple(w.shape) for w in layer.get_weights()]
        got = [tuple(v.shape) for v in values]
        if want != got:
            raise CheckpointMismatchError(
                f"{key}: shapes {got} do not fit Keras layer '{name}' {want}; the checkpoint "
                "is from a different variant or input size than the config")
        layer.set_weights(values)


def _mismatch_message(missing, unexpected, unfilled) -> str:
    def show(items):
        return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
    if unfilled:
        parts.append(f"{len(unfilled)} Keras layer(s) without weights: {show(unfilled)}")
    return ("checkpoint does not match the config (is it another variant?): "
            + "; ".join(parts))


def convert(config_path: str, checkpoint: str, output: str):
    """Builds the pose model of `config_path`, fills it from `checkpoint`, saves `output`."""
    from xhrnet_tf.model import build_pose_model  # pylint: disable=import-outside-toplevel
    config = load_config(config_path)
    state = read_checkpoint(checkpoint)
    model = build_pose_model(config)
    load_official_weights(model, state, config)
    if output:
        model.save_weights(output)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xhrnet_tf.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config of the variant")
    parser.add_argument("--checkpoint", required=True, help="official .pth or .npz")
    parser.add_argument("--output", required=True, help="Keras weights file (*.weights.h5)")
    args = parser.parse_args(argv)
    try:
        convert(args.config, args.checkpoint, args.output)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
