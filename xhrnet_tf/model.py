"""X-HRNet backbone and top-down pose model as Functional tf_keras models."""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple, Union

import tf_keras
from tf_keras import layers

from xhrnet_tf import blocks
from xhrnet_tf.config import Config, ModelConfig, check_input_size


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One row of the architecture table."""
    index: int
    num_modules: int
    num_blocks: int
    channels: Tuple[int, ...]


def stage_table(model_cfg: ModelConfig) -> List[StageSpec]:
    """The architecture as a table: one row per stage (SPEC 1)."""
    return [StageSpec(s, model_cfg.num_modules[s], model_cfg.num_blocks[s],
                      tuple(model_cfg.num_channels[s])) for s in range(3)]


def _model_cfg(config: Union[Config, ModelConfig]) -> ModelConfig:
    return config.model if isinstance(config, Config) else config


def _input(model_cfg: ModelConfig, input_size: Optional[Sequence[int]]):
    size = tuple(input_size) if input_size is not None else tuple(model_cfg.input_size)
    if len(size) != 2 or any((not isinstance(v, int)) or v <= 0 or v % 32 for v in size):
        raise ValueError(f"input_size {size} must be two positive multiples of 32 (H, W)")
    check_input_size(model_cfg, size, "input_size")
    return layers.Input(shape=(size[0], size[1], 3), name="image")


def backbone_features(image, model_cfg: ModelConfig, int8_graph: bool = False,
                      paired: bool = False) -> List:
    """Stem, three stages and the IterativeHead; returns [h0, h1, h2, h3], finest first."""
    x = blocks.stem(image, model_cfg.stem_channels)
    xs, prev_channels = [x], [model_cfg.stem_channels]
    for spec in stage_table(model_cfg):
        xs = blocks.transition(xs, prev_channels, spec.channels, f"transition{spec.index}")
        for k in range(spec.num_modules):
            xs = blocks.lite_module(xs, model_cfg, spec.channels, spec.num_blocks,
                                    f"stage{spec.index}_module{k}", int8_graph, paired)
        prev_channels = list(spec.channels)
    return blocks.iterative_head(xs)


def build_backbone(config: Union[Config, ModelConfig], input_size: Optional[Sequence[int]] = None,
                   multiscale: bool = False, name: str = "xhrnet_backbone") -> tf_keras.Model:
    """X-HRNet backbone: image (N,H,W,3) -> the 40-channel feature at H/4 x W/4.

    With `multiscale=True` it returns all four IterativeHead outputs, finest first.
    `input_size` (H, W) defaults to the config's; any multiple of 32 up to the size the
    SUSA group weights cover (384x288 by default) works, larger raises ValueError.
    """
    model_cfg = _model_cfg(config)
    image = _input(model_cfg, input_size)
    feats = backbone_features(image, model_cfg)
    return tf_keras.Model(image, feats if multiscale else feats[0], name=name)


def build_pose_model(config: Union[Config, ModelConfig],
                     input_size: Optional[Sequence[int]] = None,
                     name: str = "xhrnet_pose", int8_graph: bool = False,
                     paired: bool = False) -> tf_keras.Model:
    """Top-down pose model: normalised image (N,H,W,3) -> heatmaps (N,H/4,W/4,num_joints).

    `int8_graph=True` builds the same function, with the same weights, in the form that
    converts to a faster int8 TFLite graph (`blocks.fuse`): for PTQ and QAT.
    `paired=True` builds consecutive shuffle units with one channel shuffle per pair
    (`blocks.shuffle_unit_pair`); its weights come from a model built without it through
    `paired_copy`, which permutes the second units' channels.
    """
    model_cfg = _model_cfg(config)
    image = _input(model_cfg, input_size)
    feats = backbone_features(image, model_cfg, int8_graph, paired)
    heatmaps = blocks.heatmap_head(feats[0], model_cfg.num_joints)
    return tf_keras.Model(image, heatmaps, name=name)


class WeightsError(ValueError):
    """Weights that are missing, unreadable, or saved from another model."""


def load_weights(model: tf_keras.Model, path: str, what: str = "this config's model",
                 hint: str = "pass weights saved by a run of the same config") -> None:
    """`model.load_weights(path)` with a one-line error that names the file and the fix.

    Keras reports a mismatch as a multi-line message about one layer's variables, and a file
    that is not HDF5 without its name.
    """
    if not path or (not os.path.exists(path) and not os.path.exists(path + ".index")):
        raise WeightsError(f"{path!r}: weights file not found")
    try:
        model.load_weights(path)
    except (ValueError, OSError, KeyError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"{path}: does not fit {what} ({first[:160]}); {hint}") from None


def saved_by_qat(path: str) -> Optional[bool]:
    """Whether a `.weights.h5` file holds a QAT model's weights (tfmot's input quantize layer
    is in it), read from the file alone; None when it is not such a file. Lets a wrong pair
    of weights and config fail before a QAT model, which takes half a minute, is built."""
    import h5py  # pylint: disable=import-outside-toplevel
    try:
        with h5py.File(path, "r") as f:
            if "layers" not in f:
                return None
            return "quantize_layer" in f["layers"]
    except OSError:
        return None


def check_weights_kind(path: str, qat: bool, flag: str = "--weights", hint: str = "") -> None:
    """WeightsError, before any model is built, when `path` holds a QAT run's weights where
    float ones are wanted or the reverse (see `saved_by_qat`)."""
    found = saved_by_qat(path)
    if found is None or found == qat:
        return
    have, want = ("a QAT run's", "a float model's") if found else ("a float model's",
                                                                   "a QAT run's")
    raise WeightsError(f"{flag} {path}: {have} weights, but {flag} takes {want}"
                       + (f"; {hint}" if hint else ""))


def paired_copy(config: Union[Config, ModelConfig], model: tf_keras.Model,
                int8_graph: bool = False) -> tf_keras.Model:
    """`model` rebuilt with paired shuffle units for export: the same function and weights,
    each pair's second unit with its channels permuted (`blocks.pair_permutation`)."""
    copy = build_pose_model(config, input_size=model.input_shape[1:3], int8_graph=int8_graph,
                            paired=True)
    perms = {layer.name[:-len("_gather")]: blocks.pair_permutation(layer.output_shape[-1])
             for layer in copy.layers if layer.name.endswith("_gather")}
    for layer in copy.layers:
        if not layer.weights:
            continue
        values = model.get_layer(layer.name).get_weights()
        perm = next((p for prefix, p in perms.items() if layer.name.startswith(prefix + "_")),
                    None)
        if perm is not None:
            values = [_permute_channels(w.name, v, perm) for w, v in zip(layer.weights, values)]
        layer.set_weights(values)
    return copy


def _permute_channels(name: str, value, perm: List[int]):
    # Channels are the last axes (vectors; kernels' input and output, a depthwise kernel's
    # (h, w, C, 1)); SUSA's group weights run along H or W.
    if "group_weight" in name:
        return value
    for axis in range(max(0, value.ndim - 2), value.ndim):
        if value.shape[axis] == len(perm):
            value = value.take(perm, axis=axis)
    return value
