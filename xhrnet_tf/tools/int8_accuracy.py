"""How much int8 loses: float Keras vs int8 PTQ .tflite vs QAT int8 .tflite on the same crops.

    python -m xhrnet_tf.tools.int8_accuracy --config configs/quickstart.yaml \\
        --weights runs/quickstart/best.weights.h5 \\
        [--qat_config configs/quickstart_qat.yaml --qat_weights runs/quickstart_qat/final.weights.h5]
        [--control_weights runs/quickstart_float_ft/final.weights.h5]
        [--annotations person_keypoints_val2017.json --images DIR]   # else the config's val set

The int8 PTQ variants are those `export --formats int8` chooses from (`export.ptq_variants`);
`--ptq_variants none` skips them (minutes each on a full-size model) to score QAT runs alone.
Every variant sees the same evaluation crops (ground-truth boxes) with the config's flip test
and decoding. Printed per variant: COCO keypoint AP (pycocotools) and the mean distance, in
heatmap pixels, of its keypoints from the float model's. PTQ is calibrated on the config's
training TFRecords (else on the synthetic set), never on the evaluation crops.
`--control_weights` adds the fair reference for QAT: the float model fine-tuned with QAT's
schedule in float (configs/quickstart_float_ft.yaml), scored the same way, and the gap.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Callable, Dict

import numpy as np


QAT, CONTROL = "int8 QAT (.tflite)", "float control: QAT's schedule in float (Keras)"
PTQ_LABELS = {"plain": "int8 PTQ (.tflite)", "equalised": "int8 PTQ, equalised (.tflite)",
              "qat_graph": "int8 QAT graph, calibrated, no training (.tflite)"}


def _keras_predict(model) -> Callable[[np.ndarray], np.ndarray]:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    fn = tf.function(lambda x: model(x, training=False))
    return lambda x: fn(tf.constant(x)).numpy()


def _tflite_predict(content: bytes) -> Callable[[np.ndarray], np.ndarray]:
    from xhrnet_tf.inference import PoseEstimator  # pylint: disable=import-outside-toplevel
    with tempfile.NamedTemporaryFile(suffix=".tflite", delete=False) as f:
        f.write(content)
    est = PoseEstimator.from_tflite(f.name)
    os.unlink(f.name)
    return est.predict_fn


def _eval_shards(cfg, annotations, images, tmp):
    from xhrnet_tf.data import pipeline  # pylint: disable=import-outside-toplevel
    if not annotations:
        return pipeline.list_files(cfg.data.val_tfrecords, "data.val_tfrecords"), \
            cfg.data.val_annotations
    from xhrnet_tf.data.create_tfrecords import create_tfrecords  # pylint: disable=import-outside-toplevel
    out = create_tfrecords(annotations, images, os.path.join(tmp, "val"), shards=1,
                           mode="val_gt", workers=1, input_size=cfg.model.input_size, log=None)
    return out["shards"], annotations


def compare(cfg, weights, qat_cfg=None, qat_weights=None, annotations=None, images=None,
            calibration_samples=200, control_weights=None,
            ptq_variants=tuple(PTQ_LABELS)) -> Dict[str, Dict[str, float]]:
    import xhrnet_tf  # pylint: disable=import-outside-toplevel
    from xhrnet_tf import evaluate, export, qat  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.data import pipeline  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.model import load_weights  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.tflite_utils import to_tflite  # pylint: disable=import-outside-toplevel
    model = xhrnet_tf.build_pose_model(cfg)
    load_weights(model, weights, hint="--weights takes the float model's weights")
    variants = {"float (Keras)": _keras_predict(model)}
    if ptq_variants:
        calib = export.training_calibration_images(cfg, calibration_samples)
        converted = export.ptq_variants(cfg, model, calib, variants=ptq_variants)
        for name, content in converted.items():
            variants[PTQ_LABELS[name]] = _tflite_predict(content)
    if control_weights:
        control = xhrnet_tf.build_pose_model(cfg)
        load_weights(control, control_weights,
                     hint="--control_weights takes float weights of the same config")
        variants[CONTROL] = _keras_predict(control)
    if qat_weights:
        qmodel, _ = qat.quantize_model(xhrnet_tf.build_pose_model(qat_cfg or cfg,
                                                                  int8_graph=True))
        load_weights(qmodel, qat_weights, "the QAT model",
                     hint="--qat_weights takes the weights a train.qat run saved, with its "
                          "config as --qat_config")
        variants[QAT] = _tflite_predict(
            to_tflite(qmodel, converter_hook=qat.int8_hook()))
    with tempfile.TemporaryDirectory() as tmp:
        files, ann = _eval_shards(cfg, annotations, images, tmp)
        ds = pipeline.build_dataset(cfg, training=False, files=files, batch_size=16,
                                    deterministic=True)
        batches = [(img.numpy(), {k: v.numpy() for k, v in meta.items()}) for img, meta in ds]
    _, heatmap_size = pipeline.input_sizes(cfg)
    out, ref = {}, None
    for name, fn in variants.items():
        results, raw = evaluate.predict_results(fn, batches, cfg.eval, heatmap_size)
        stats = evaluate.coco_keypoint_eval(ann, results, verbose=False)
        raw = np.stack(raw)
        ref = raw if ref is None else ref
        dist = float(np.linalg.norm(raw - ref, axis=-1).mean())
        out[name] = {"AP": stats["AP"], "AP50": stats["AP50"], "mean_dist_hm_px": dist,
                     "instances": len(raw)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.tools.int8_accuracy",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--weights", required=True, help="float weights (.weights.h5)")
    p.add_argument("--qat_config", help="config of the QAT run (default: --config)")
    p.add_argument("--qat_weights", help="weights saved by a train.qat run")
    p.add_argument("--annotations", help="COCO keypoint json to evaluate on (with --images)")
    p.add_argument("--images")
    p.add_argument("--control_weights",
                   help="float weights fine-tuned with QAT's schedule in float: QAT's reference")
    p.add_argument("--calibration_samples", type=int, default=200)
    p.add_argument("--ptq_variants", default=",".join(PTQ_LABELS),
                   help=f"comma-separated, from {','.join(PTQ_LABELS)}; 'none' for none")
    args = p.parse_args(argv)
    ptq = [] if args.ptq_variants == "none" else args.ptq_variants.split(",")
    import xhrnet_tf  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.export import check_int8_variants  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.model import check_weights_kind  # pylint: disable=import-outside-toplevel
    for path in (args.weights, args.qat_weights, args.control_weights):
        if path and not os.path.isfile(path):
            print(f"error: {path}: weights file not found", file=sys.stderr)
            return 1
    try:  # the cheap checks first: a mix-up would otherwise show after minutes of PTQ
        if ptq:
            check_int8_variants(ptq, "--ptq_variants")
        for flag, path, qat in (("--weights", args.weights, False),
                                ("--qat_weights", args.qat_weights, True),
                                ("--control_weights", args.control_weights, False)):
            if path:
                check_weights_kind(path, qat, flag)
        cfg = xhrnet_tf.load_config(args.config)
        qat_cfg = xhrnet_tf.load_config(args.qat_config) if args.qat_config else None
        res = compare(cfg, args.weights, qat_cfg, args.qat_weights, args.annotations,
                      args.images, args.calibration_samples, args.control_weights, ptq)
    except ValueError as e:  # ConfigError, WeightsError, DataError
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = next(iter(res.values()))["instances"]
    print(f"\n{n} instances; distances are to the float model's keypoints, in heatmap pixels\n")
    print("| model | AP | AP50 | mean distance (hm px) |\n|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['AP']:.4f} | {r['AP50']:.4f} | {r['mean_dist_hm_px']:.3f} |")
    if QAT in res and CONTROL in res:
        gap = 100 * (res[QAT]["AP"] - res[CONTROL]["AP"])
        print(f"\nQAT int8 - float control: {gap:+.2f} AP points (goal: no more than 1.0 below)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
