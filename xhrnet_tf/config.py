"""Typed experiment configuration read from one flat YAML file.

A config file has the sections `model`, `data`, `train` and `eval`; each maps onto a frozen
dataclass below. Unknown keys, wrong types and inconsistent values fail at load time with the
file and the key named, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Literal, Tuple

import yaml


# The unit types whose branches hold SUSA layers (X-HRNet's); naive and baseline have none.
SUSA_UNITS = ("sx", "px")


class ConfigError(ValueError):
    """A configuration file or value is invalid."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Unit of every branch: sx/px are X-HRNet's SUSA units, naive is Lite-HRNet's
    # ShuffleNet-style unit (WNL-HRNet), baseline is naive without its two 1x1 convs.
    unit: Literal["sx", "px", "naive", "baseline"] = "sx"
    num_modules: Tuple[int, ...] = (2, 4, 2)
    num_blocks: Tuple[int, ...] = (2, 2, 2)
    num_channels: Tuple[Tuple[int, ...], ...] = ((40, 80), (40, 80, 160), (40, 80, 160, 320))
    stem_channels: int = 32
    susa_order: Literal["wh", "hw"] = "wh"  # paper Table 6: which SUSA comes first in SX
    fusion: Literal["mul", "add"] = "mul"  # paper Table 5: how the SUSA gate meets the feature
    fuse_mode: Literal["official", "standard"] = "official"  # SPEC 5.3
    # Lengths of the learned group_weight vectors (branch-0 size at 384x288 in the official code).
    max_height: int = 96
    max_width: int = 72
    num_joints: int = 17
    input_size: Tuple[int, int] = (256, 192)  # (height, width)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_tfrecords: str = ""  # glob of training shards
    val_tfrecords: str = ""  # glob of evaluation shards
    val_annotations: str = ""  # COCO keypoint json used by COCOeval
    heatmap_sigma: float = 2.0
    # DARK's unbiased target encoding (sub-pixel Gaussian centre); pair with
    # eval.post_process: dark. Off in the paper's recipe (SPEC 13).
    unbiased_encoding: bool = False
    flip_prob: float = 0.5
    half_body_prob: float = 0.3
    half_body_min_joints: int = 8
    scale_factor: float = 0.25
    rotation_factor: float = 30.0
    rotation_prob: float = 0.6
    shuffle_buffer: int = 2048
    # > 0: generate a synthetic data set of this many images into synthetic_dir (and its
    # TFRecords) when train_tfrecords matches nothing. Used by the quickstart.
    synthetic_images: int = 0
    synthetic_dir: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    global_batch_size: int = 512
    epochs: int = 210
    learning_rate: float = 2e-3
    lr_steps: Tuple[int, ...] = (170, 200)  # epochs at which lr is multiplied by 0.1
    warmup_steps: int = 500
    warmup_ratio: float = 0.001
    scale_lr_with_batch: bool = False  # linear scaling relative to reference_batch_size
    reference_batch_size: int = 512
    mixed_precision: bool = False
    jit_compile: bool = False
    checkpoint_every_steps: int = 1000
    eval_every_epochs: int = 10
    seed: int = 0
    max_steps: int = 0  # > 0 stops after this many steps (smoke tests), else epochs
    log_every_steps: int = 50
    deterministic: bool = False  # reproducible input order and augmentation (slower)
    export_tflite: bool = False  # write model_dir/model_fp32.tflite when training ends
    # Start from these float weights (a .weights.h5 saved by training) before step 0.
    init_weights: str = ""
    # Quantization-aware training (xhrnet_tf.qat): fine-tune the fake-quantised model and
    # export model_dir/model_qat_int8.tflite. Usually with init_weights and a short schedule.
    qat: bool = False
    # TensorFlow's CPU thread pools (ops run at once, threads per op); 0 keeps TensorFlow's
    # choice. See xhrnet_tf.runtime.set_cpu_threads for when 1 thread per op pays.
    inter_op_threads: int = 0
    intra_op_threads: int = 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    flip_test: bool = True
    shift_heatmap: bool = True
    post_process: Literal["default", "dark", "none"] = "default"
    use_gt_bbox: bool = True
    detection_file: str = ""
    det_score_threshold: float = 0.0
    vis_threshold: float = 0.2
    oks_threshold: float = 0.9


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Checks `value` against the annotation `hint` and returns it in canonical form."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, typing.get_args(hint)[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {hint!r} at {where}")


def _build_section(cls, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {names}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def validate_model(m: ModelConfig, where: str = "model") -> None:
    """Raises ConfigError when the architecture fields are inconsistent with each other."""
    if len(m.num_modules) != 3 or len(m.num_blocks) != 3 or len(m.num_channels) != 3:
        raise ConfigError(f"{where}: num_modules, num_blocks and num_channels need 3 stages")
    if any(v < 1 for v in m.num_modules + m.num_blocks):
        raise ConfigError(f"{where}.num_modules/num_blocks: every entry must be >= 1")
    for s, chans in enumerate(m.num_channels):
        if len(chans) != s + 2:
            raise ConfigError(f"{where}.num_channels[{s}]: stage {s} has {s + 2} branches, "
                              f"got {len(chans)} channel counts {list(chans)}")
        if s > 0 and tuple(chans[:-1]) != tuple(m.num_channels[s - 1]):
            raise ConfigError(f"{where}.num_channels[{s}]: existing branches must keep their "
                              f"channels {list(m.num_channels[s - 1])}, got {list(chans)}")
        divisor = 4 if m.unit == "px" else 2
        for b, c in enumerate(chans):
            if c <= 0 or c % divisor:
                raise ConfigError(f"{where}.num_channels[{s}][{b}]: {c} must be a positive "
                                  f"multiple of {divisor} for unit '{m.unit}'")
    if m.stem_channels <= 0 or m.stem_channels % 2:
        raise ConfigError(f"{where}.stem_channels: {m.stem_channels} must be positive and even")
    h, w = m.input_size
    if h % 32 or w % 32 or h <= 0 or w <= 0:
        raise ConfigError(f"{where}.input_size: {list(m.input_size)} must be positive "
                          "multiples of 32 (four stride-2 levels below the input)")
    check_input_size(m, (h, w), where)


def check_input_size(m: ModelConfig, size: Tuple[int, int], where: str = "model") -> None:
    """The SUSA group weights cover at most max_height x max_width branch-0 positions."""
    h, w = size
    if m.unit in SUSA_UNITS and (h // 4 > m.max_height or w // 4 > m.max_width):
        raise ConfigError(
            f"{where}: input {h}x{w} is larger than this model supports "
            f"({4 * m.max_height}x{4 * m.max_width}: the SUSA group weights have "
            f"{m.max_height}/{m.max_width} entries); use a smaller input or raise "
            "model.max_height/max_width and retrain")


def config_from_dict(raw: Any, source: str = "<dict>") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; valid are {list(sections)}")
    hints = typing.get_type_hints(Config)
    built = {name: _build_section(hints[name], raw.get(name), f"{source}: {name}")
             for name in sections}
    cfg = Config(**built)
    validate_model(cfg.model, f"{source}: model")
    if cfg.train.qat and cfg.train.mixed_precision:
        raise ConfigError(f"{source}: train.qat and train.mixed_precision exclude each other: "
                          "QAT simulates int8 on float32; set mixed_precision: false")
    if cfg.train.qat and cfg.train.jit_compile:
        raise ConfigError(f"{source}: train.qat and train.jit_compile exclude each other: "
                          "QAT's range updates sync across replicas, which XLA clusters "
                          "cannot; set jit_compile: false")
    return cfg


def load_config(path: str | os.PathLike) -> Config:
    """Reads and validates a YAML experiment config; errors name the file and the key."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return config_from_dict(raw if raw is not None else {}, path)


def config_to_dict(cfg: Config) -> dict:
    """Plain-python form (lists, not tuples) that `config_from_dict` reads back."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return {sec: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, sec)).items()}
            for sec in ("model", "data", "train", "eval")}


def replace(cfg: Config, overrides: dict, source: str = "--override") -> Config:
    """Applies {'section.key': value} overrides with the same checks as a file."""
    raw = config_to_dict(cfg)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in raw or key not in raw[section]:
            raise ConfigError(f"{source}: unknown key '{dotted}'")
        raw[section][key] = value
    return config_from_dict(raw, source)
