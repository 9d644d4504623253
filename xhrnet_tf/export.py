"""Export a trained model: SavedModel, .tflite files and a JSON sidecar.

    python -m xhrnet_tf.export --config configs/x18.yaml --weights runs/x18/best.weights.h5 \\
        --output_dir export/x18 --formats fp32,fp16,dynamic,int8 [--tfrecords 'val-*.tfrecord']

* `saved_model/`: signature `serving_default` (image -> heatmaps) and `keypoints` (image ->
  heatmaps, keypoints in input pixels, scores); `tflite_convert --saved_model_dir` works on it.
* `model_<format>.tflite`: fp32; fp16 weights; dynamic-range int8 weights; full-integer int8
  (post-training quantisation calibrated on person crops from `--tfrecords`, or from the
  synthetic data set when none are given), with float, int8 or uint8 input/output. Three
  conversions are tried and the one closest to float on held-out crops is kept
  (`--int8_variants`, `ptq_int8`; model.json says which): the converter's PTQ, the same after
  the channel-0 equalisation (`xhrnet_tf.equalize`, same function: the one channel per branch
  that no unit ever rescales no longer eats the int8 range), and QAT's graph with its ranges
  and BatchNorm statistics calibrated with fake quantisation in the loop, no training.
* `model_qat_int8.tflite` (`--formats qat`, weights of a `train.qat: true` run): full-integer
  int8 with every range learned in quantization-aware training, no calibration.
* `model.json`: input size and normalisation, keypoint names, flip pairs, skeleton, files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from xhrnet_tf import codec
from xhrnet_tf.config import Config
from xhrnet_tf.layers import tflite_graph

FORMATS = ("fp32", "fp16", "dynamic", "int8", "qat")


class ExportError(ValueError):
    """The export cannot be done as asked; the message says why."""


def keypoints_from_heatmaps(heatmaps):
    """In-graph argmax decoding with mmpose's quarter-pixel shift, in input pixels."""
    n, h, w, k = heatmaps.shape
    flat = tf.reshape(tf.transpose(heatmaps, [0, 3, 1, 2]), [-1, k, h * w])
    idx = tf.argmax(flat, axis=-1, output_type=tf.int32)
    scores = tf.reduce_max(flat, axis=-1)
    x, y = idx % w, idx // w
    hm = tf.transpose(heatmaps, [0, 3, 1, 2])

    def at(yy, xx):
        yy, xx = tf.clip_by_value(yy, 0, h - 1), tf.clip_by_value(xx, 0, w - 1)
        return tf.gather_nd(hm, tf.stack([yy, xx], -1), batch_dims=2)

    inner = (x > 1) & (x < w - 1) & (y > 1) & (y < h - 1)
    dx = tf.sign(at(y, x + 1) - at(y, x - 1))
    dy = tf.sign(at(y + 1, x) - at(y - 1, x))
    shift = tf.where(inner[..., None], tf.stack([dx, dy], -1) * 0.25, 0.0)
    coords = tf.cast(tf.stack([x, y], -1), tf.float32) + shift
    coords *= tf.cast(scores > 0, tf.float32)[..., None]  # as codec.argmax_preds does
    return coords * 4.0, scores


def save_saved_model(model, path: str, batch_size: Optional[int] = None) -> None:
    """SavedModel with two signatures; holds the variables, not the Keras object (fast)."""
    spec = tf.TensorSpec((batch_size,) + tuple(model.input_shape[1:]), tf.float32, name="image")
    module = tf.Module()
    module.model_variables = list(model.variables)

    @tf.function(input_signature=[spec])
    def serve(image):
        return {"heatmaps": model(image, training=False)}

    @tf.function(input_signature=[spec])
    def keypoints(image):
        heatmaps = model(image, training=False)
        kps, scores = keypoints_from_heatmaps(heatmaps)
        return {"heatmaps": heatmaps, "keypoints": kps, "scores": scores}

    module.serve, module.keypoints_fn = serve, keypoints
    with tflite_graph():  # the SavedModel is made for tflite_convert and serving
        tf.saved_model.save(module, path, signatures={"serving_default": serve,
                                                      "keypoints": keypoints})


def _calibration_files(tfrecords: str) -> List[str]:
    files = sorted(tf.io.gfile.glob(tfrecords))
    if not files:
        raise ExportError(f"--tfrecords {tfrecords!r}: no files match; int8 needs "
                          "calibration data (the float formats' equalisation uses it too): "
                          "pass a glob of person-crop TFRecords, or no --tfrecords for "
                          "synthetic crops")
    return files


def calibration_images(config: Config, tfrecords: Optional[str], count: int) -> List[np.ndarray]:
    """Normalised person crops for int8 calibration."""
    from xhrnet_tf.data import pipeline  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory() as tmp:
        if tfrecords:
            files = _calibration_files(tfrecords)
        else:
            from xhrnet_tf.data import synthetic  # pylint: disable=import-outside-toplevel
            from xhrnet_tf.data.create_tfrecords import create_tfrecords  # pylint: disable=import-outside-toplevel
            anns = synthetic.generate(tmp, images=max(8, count // 2), seed=1)
            files = create_tfrecords(anns["train"], os.path.join(tmp, "images", "train"),
                                     os.path.join(tmp, "calib"), mode="val_gt", workers=1,
                                     input_size=config.model.input_size, log=None)["shards"]
        ds = pipeline.build_dataset(config, training=False, files=files, batch_size=1,
                                    deterministic=True)
        images = [img.numpy() for img, _ in ds.take(count)]
    if not images:
        raise ExportError("calibration (int8, and the channel-0 equalisation of the float "
                          "formats) found no samples in the given TFRecords")
    return images


def training_calibration_images(config: Config, count: int) -> List[np.ndarray]:
    """Calibration crops from the config's training TFRecords, or synthetic ones if absent."""
    pattern = config.data.train_tfrecords
    return calibration_images(config, pattern if pattern and tf.io.gfile.glob(pattern) else None,
                              count)


def ptq_int8_hook(images: Iterable[np.ndarray], io_type: str):
    """Converter settings for full-integer post-training quantisation calibrated on `images`;
    `io_type` float, int8 or uint8 is the type of the model's input and output."""
    def hook(converter):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([img] for img in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io_type != "float":
            dtype = {"int8": tf.int8, "uint8": tf.uint8}[io_type]
            converter.inference_input_type = dtype
            converter.inference_output_type = dtype
    return hook


def float_deploy_copy(config: Config, model, images: List[np.ndarray]):
    """(graph, scales): what the SavedModel and the float .tflite files get, `model` with
    channel 0 equalised (`xhrnet_tf.equalize`, the same function) and its shuffle units paired.

    Channel 0 of each branch doubles module after module (see `equalize`): with x30's
    bench weights it reached 8.9e4 in the last fuse sums, past float16's 65504, and the GPU
    delegate (float16 arithmetic by default, as on phones) gave NaN heatmaps; equalised, the
    largest activation was 200 and the GPU ran it."""
    from xhrnet_tf import build_pose_model, equalize  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.model import paired_copy  # pylint: disable=import-outside-toplevel
    copy = build_pose_model(config, input_size=model.input_shape[1:3])
    copy.set_weights(model.get_weights())
    model_cfg = config.model if isinstance(config, Config) else config
    scales, _ = equalize.equalize(copy, model_cfg, images[:64])
    return paired_copy(config, copy), scales


def int8_graph_copy(config: Config, model):
    """`model` rebuilt with `int8_graph=True` (see `build_pose_model`), same weights."""
    from xhrnet_tf import build_pose_model  # pylint: disable=import-outside-toplevel
    copy = build_pose_model(config, input_size=model.input_shape[1:3], int8_graph=True)
    copy.set_weights(model.get_weights())
    return copy


def int8_deploy_copy(config: Config, model):
    """The graph int8 PTQ converts: the int8 graph, for SX units with paired shuffle units
    (`model.paired_copy`). x18 int8 6-8% faster, quickstart model's PTQ AP unchanged (0.360
    against 0.355 plain). Other unit types stay unpaired: their pairs end in a SPLIT of the
    branch output, which the converter requantises (49 QUANTIZE ops in WNL-HRNet-18)."""
    if (config.model if isinstance(config, Config) else config).unit != "sx":
        return int8_graph_copy(config, model)
    from xhrnet_tf.model import paired_copy  # pylint: disable=import-outside-toplevel
    return paired_copy(config, model, int8_graph=True)


def equalized_copy(config: Config, model, images: List[np.ndarray]):
    """A copy of `model` with X-HRNet's outlier channels rescaled for int8 (same function).

    See `xhrnet_tf.equalize`: without it, channel 0 of each branch, which no shuffle unit
    ever transforms, dominates its tensor's int8 range. Returns (copy, scales).
    """
    from xhrnet_tf import equalize  # pylint: disable=import-outside-toplevel
    copy = int8_graph_copy(config, model)
    model_cfg = config.model if isinstance(config, Config) else config
    scales, _ = equalize.equalize(copy, model_cfg, images[:64])
    return copy, scales


def tflite_heatmaps(content: bytes, images: List[np.ndarray]) -> np.ndarray:
    """Float heatmaps of a .tflite model on float crops, whatever its input/output types."""
    # pylint: disable=import-outside-toplevel
    from xhrnet_tf.tflite_utils import dequantize_output, interpreter, quantize_input
    interp = interpreter(content)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    results = []
    for image in images:
        interp.set_tensor(inp["index"], quantize_input(image.reshape(inp["shape"]), inp))
        interp.invoke()
        results.append(dequantize_output(interp.get_tensor(out["index"]), out))
    return np.concatenate(results)


PTQ_VARIANTS = ("plain", "equalised", "qat_graph")


def check_int8_variants(variants: Sequence[str], flag: str = "--int8_variants") -> None:
    unknown = sorted(set(variants) - set(PTQ_VARIANTS))
    if unknown or not variants:
        raise ExportError(f"{flag} {unknown or '(none)'}: choose from "
                          f"{list(PTQ_VARIANTS)}")


def calibrated_qat_graph(equalised, images: List[np.ndarray], io_type: str = "float",
                         batch_size: int = 32) -> bytes:
    """Full-integer int8 with no training: QAT's graph of the (equalised) model, its int8
    ranges and BatchNorm statistics calibrated with fake quantisation in the loop
    (`calibration.calibrate_ranges(batch_norm=True)`), converted as a QAT model is.

    On session 19's quickstart model it scores AP 0.46 against the converter's PTQ 0.33
    (float 0.50), half of the gain from the BatchNorm re-estimation (tflite/EXPERIMENTS.md).
    It runs QAT's graph, x18 1.34x slower than the one PTQ converts on an x86 CPU: SUSA's
    query stays a depthwise conv (MUL + SUM would round the full-size product to int8)."""
    from xhrnet_tf import calibration, qat  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.tflite_utils import to_tflite  # pylint: disable=import-outside-toplevel
    qmodel, _ = qat.quantize_model(equalised)
    # Whole batches only: BatchNorm statistics of a few crops are noise.
    end = len(images) // batch_size * batch_size or len(images)
    batches = [np.concatenate(images[i:i + batch_size]) for i in range(0, end, batch_size)]
    calibration.calibrate_ranges(qmodel, batches, batch_norm=True)
    return to_tflite(qmodel, converter_hook=qat.int8_hook(io_type))


def ptq_variants(config: Config, model, images: List[np.ndarray], io_type: str = "float",
                 variants: Sequence[str] = PTQ_VARIANTS) -> Dict[str, bytes]:
    """Full-integer int8 of `model` calibrated on `images`, {variant: tflite}: "plain" and
    "equalised" are the converter's PTQ of the (paired) int8 graph, without and with the
    channel-0 equalisation; "qat_graph" is `calibrated_qat_graph` of the equalised model."""
    from xhrnet_tf.tflite_utils import to_tflite  # pylint: disable=import-outside-toplevel
    check_int8_variants(variants)
    hook = ptq_int8_hook(images, io_type)
    out = {}
    if "plain" in variants:
        out["plain"] = to_tflite(int8_deploy_copy(config, model), converter_hook=hook)
    if {"equalised", "qat_graph"} & set(variants):
        from xhrnet_tf.equalize import summary  # pylint: disable=import-outside-toplevel
        equalised, scales = equalized_copy(config, model, images)
        print("int8: " + summary(scales))
        if "equalised" in variants:
            out["equalised"] = to_tflite(int8_deploy_copy(config, equalised),
                                         converter_hook=hook)
        if "qat_graph" in variants:
            out["qat_graph"] = calibrated_qat_graph(equalised, images, io_type)
    return out


def ptq_int8(config: Config, model, images: List[np.ndarray], io_type: str = "float",
             variants: Sequence[str] = PTQ_VARIANTS) -> Tuple[bytes, Dict[str, float]]:
    """Full-integer int8 in each of `variants` (`ptq_variants`), keeping the one whose
    heatmaps are closer to float on held-out crops.

    Which one is best depends on the model: equalisation brings the converter's PTQ back
    from collapse on some models (AP 0.02 -> 0.12) and causes it on others (0.35 -> 0.09 on
    session 7's quickstart model). The relative heatmap error, ||int8 - float||^2 /
    ||float||^2 on crops left out of the calibration, picked the better one where they
    differed by several points of AP (the mean keypoint distance over all joints did not).
    Returns the .tflite and the errors by variant ({} for a single variant).
    """
    several = len(variants) > 1 and len(images) > 1
    held = max(1, len(images) // 5) if several else 0
    fit, check = images[:len(images) - held], images[len(images) - held:]
    converted = ptq_variants(config, model, fit, io_type, variants)
    if not several:
        return next(iter(converted.values())), {}
    ref = model(np.concatenate(check), training=False).numpy()
    errors = {name: float(np.sum((tflite_heatmaps(c, check) - ref) ** 2) / np.sum(ref ** 2))
              for name, c in converted.items()}
    best = min(errors, key=errors.get)
    print(f"int8: relative heatmap error on {len(check)} held-out crops: " +
          ", ".join(f"{k} {v:.4f}" for k, v in errors.items()) + f"; keeping {best}")
    return converted[best], errors


def format_hook(fmt: str):
    """Converter settings for fp32 (None), fp16 or dynamic-range weights."""
    def hook(converter):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if fmt == "fp16":
            converter.target_spec.supported_types = [tf.float16]
    return None if fmt == "fp32" else hook


def sidecar(config: Config, files: dict, int8: Optional[dict] = None,
            checks: Optional[dict] = None, float_scales: Optional[dict] = None) -> dict:
    h, w = config.model.input_size
    extra = {key: value for key, value in (("int8", int8), ("delegate_checks", checks),
                                           ("float_channel0_scales", float_scales)) if value}
    return {
        "model": "X-HRNet", "unit": config.model.unit, "input_size": {"height": h, "width": w},
        "input": "RGB float32, (pixel / 255 - mean) / std (unless an int8/uint8 input says "
                 "otherwise in its TFLite quantisation parameters)",
        "mean": list(codec.IMAGENET_MEAN), "std": list(codec.IMAGENET_STD),
        "heatmap_size": {"height": h // 4, "width": w // 4}, "stride": 4,
        "keypoints": list(codec.COCO_KEYPOINTS),
        "flip_pairs": [list(p) for p in codec.COCO_FLIP_PAIRS],
        "skeleton": [list(p) for p in codec.COCO_SKELETON],
        "box": {"aspect_ratio": w / h, "padding": 1.25, "pixel_std": codec.PIXEL_STD},
        "files": files, **extra,
    }


def export(config: Config, weights: str, output_dir: str, formats: List[str],
           tfrecords: Optional[str] = None, int8_io: str = "float",
           calibration_samples: int = 200,
           int8_variants: Sequence[str] = PTQ_VARIANTS) -> dict:
    from xhrnet_tf.model import (  # pylint: disable=import-outside-toplevel
        WeightsError, build_pose_model, check_weights_kind, load_weights)
    from xhrnet_tf.tflite_utils import delegate_checks, to_tflite  # pylint: disable=import-outside-toplevel
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"--formats: unknown {unknown}; choose from {list(FORMATS)}")
    if "qat" in formats and len(formats) > 1:
        raise ExportError("--formats: 'qat' takes the weights of a QAT run (train.qat: true), "
                          "the other formats float weights; export them separately")
    if not weights or not os.path.isfile(weights):
        raise ExportError(f"--weights {weights!r}: file not found; export needs trained weights")
    check_int8_variants(int8_variants)
    if tfrecords and "qat" not in formats:
        _calibration_files(tfrecords)  # fails before the model is built, not after
    try:
        check_weights_kind(weights, "qat" in formats, hint=(
            "pass the final.weights.h5 of a run with train.qat: true" if "qat" in formats
            else "export a QAT run's weights with its config and --formats qat"))
    except WeightsError as e:
        raise ExportError(str(e)) from None
    model = build_pose_model(config, int8_graph="qat" in formats)
    if "qat" in formats:
        from xhrnet_tf import qat  # pylint: disable=import-outside-toplevel
        model, _ = qat.quantize_model(model)
    kind = "a QAT run's model (train.qat: true)" if "qat" in formats else "this config's model"
    try:
        load_weights(model, weights, kind, hint="pass the weights a run of this config saved")
    except WeightsError as e:
        raise ExportError(str(e)) from None
    calib = None if "qat" in formats else calibration_images(
        config, tfrecords, calibration_samples if "int8" in formats else 64)
    os.makedirs(output_dir, exist_ok=True)
    files = {"saved_model": "saved_model"}
    # Float graphs are equalised and pair the shuffle units (one channel shuffle per pair;
    # x18 ~12% faster in XNNPACK); int8 PTQ pairs them too where the unit allows
    # (`int8_deploy_copy`). QAT's graph is the one it trained: its fake-quant ranges belong
    # to the plain graph.
    if "qat" in formats:
        deploy, scales = model, None
    else:
        deploy, scales = float_deploy_copy(config, model, calib)
    save_saved_model(deploy, os.path.join(output_dir, "saved_model"))
    int8_info, checks = None, {}
    for fmt in formats:
        if fmt == "int8":
            content, errors = ptq_int8(config, model, calib, int8_io, int8_variants)
            int8_info = {"variant": min(errors, key=errors.get) if errors else
                         int8_variants[0], "relative_heatmap_error_held_out": errors}
        elif fmt == "qat":
            from xhrnet_tf.qat import int8_hook  # pylint: disable=import-outside-toplevel
            content = to_tflite(model, converter_hook=int8_hook(int8_io))
        else:
            content = to_tflite(deploy, converter_hook=format_hook(fmt))
        files[fmt] = f"model_{fmt}.tflite" if fmt != "qat" else "model_qat_int8.tflite"
        with open(os.path.join(output_dir, files[fmt]), "wb") as f:
            f.write(content)
        # No GPU run here: on a software Vulkan driver it compiles for a minute or more.
        checks[files[fmt]] = delegate_checks(content, gpu=False)
    with open(os.path.join(output_dir, "model.json"), "w", encoding="utf-8") as f:
        json.dump(sidecar(config, files, int8_info, checks, scales), f, indent=1)
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--formats", default="fp32,fp16,dynamic,int8")
    p.add_argument("--tfrecords", help="glob of person-crop TFRecords for int8 calibration")
    p.add_argument("--int8_io", default="float", choices=["float", "int8", "uint8"])
    p.add_argument("--calibration_samples", type=int, default=200)
    p.add_argument("--int8_variants", default=",".join(PTQ_VARIANTS),
                   help="int8 conversions to try, keeping the one closest to float on "
                        "held-out crops: plain (the converter's PTQ), equalised (the same "
                        "after the channel-0 equalisation), qat_graph (QAT's graph with "
                        "ranges and BatchNorm calibrated, no training; the slowest to build)")
    args = p.parse_args(argv)
    import xhrnet_tf  # pylint: disable=import-outside-toplevel
    try:
        cfg = xhrnet_tf.load_config(args.config)
        files = export(cfg, args.weights, args.output_dir,
                       [f.strip() for f in args.formats.split(",") if f.strip()],
                       args.tfrecords, args.int8_io, args.calibration_samples,
                       [v.strip() for v in args.int8_variants.split(",") if v.strip()])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from xhrnet_tf.tflite_utils import checks_summary  # pylint: disable=import-outside-toplevel
    with open(os.path.join(args.output_dir, "model.json"), encoding="utf-8") as f:
        checks = json.load(f).get("delegate_checks", {})
    for fmt, name in files.items():
        print(f"{fmt:>12}: {os.path.join(args.output_dir, name)}{checks_summary(checks.get(name))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
