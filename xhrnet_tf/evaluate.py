"""Top-down COCO keypoint evaluation (SPEC 13), scored by pycocotools.

    python -m xhrnet_tf.evaluate --config configs/x18.yaml --weights x18.weights.h5 \\
        --annotations person_keypoints_val2017.json --images val2017/ [--detections FILE]
    python -m xhrnet_tf.evaluate --annotations person_keypoints_val2017.json --results R.json

The first form converts the images to TFRecord crops (ground-truth boxes, or detections above
`eval.det_score_threshold`), runs the model with flip test, decodes, rescores, applies OKS-NMS,
writes the COCO results JSON and prints pycocotools' keypoint table. The second scores an
existing results file, so other systems can be compared on the same footing.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import weakref
from typing import Dict, List, Optional

import numpy as np

from xhrnet_tf import codec

COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87,
                        .87, .89, .89]) / 10.0
STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def coco_keypoint_eval(annotations: str, results, verbose: bool = True) -> Dict[str, float]:
    """pycocotools COCOeval on keypoints; `results` is a list or a results JSON path."""
    from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel
    from pycocotools.cocoeval import COCOeval  # pylint: disable=import-outside-toplevel
    if isinstance(results, str):
        with open(results, encoding="utf-8") as f:
            results = json.load(f)
    if not results:
        raise ValueError("no keypoint results to evaluate")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        gt = COCO(annotations)
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.useSegm = None
        ev.evaluate()
        ev.accumulate()
    with contextlib.redirect_stdout(sys.stdout if verbose else quiet):
        ev.summarize()
    return dict(zip(STAT_NAMES, (float(v) for v in ev.stats)))


def oks_iou(g, others, area_g, areas):
    """OKS between one instance and several (mmpose's oks_iou), keypoints (17, 3)."""
    var = (COCO_SIGMAS * 2) ** 2
    d = ((others[:, :, 0] - g[:, 0]) ** 2 + (others[:, :, 1] - g[:, 1]) ** 2)
    e = d / var / ((area_g + areas[:, None]) / 2 + np.spacing(1)) / 2
    return np.mean(np.exp(-e), axis=1)


def oks_nms(instances: List[dict], threshold: float) -> List[dict]:
    """Greedy NMS by OKS over one image's instances, highest score first."""
    order = sorted(range(len(instances)), key=lambda i: -instances[i]["score"])
    keep = []
    while order:
        i, rest = order[0], order[1:]
        keep.append(i)
        if not rest:
            break
        kps = np.stack([instances[j]["kps"] for j in rest])
        areas = np.array([instances[j]["area"] for j in rest])
        ious = oks_iou(instances[i]["kps"], kps, instances[i]["area"], areas)
        order = [j for j, v in zip(rest, ious) if v <= threshold]
    return [instances[i] for i in keep]


def results_from_predictions(coords, maxvals, metas, eval_cfg) -> List[dict]:
    """Rescoring (box score x mean confident keypoint score) and per-image OKS-NMS."""
    by_image: Dict[int, List[dict]] = {}
    for kp, score, meta in zip(coords, maxvals, metas):
        conf = score[:, 0]
        good = conf > eval_cfg.vis_threshold
        mean = float(conf[good].mean()) if good.any() else 0.0
        area = float(np.prod(meta["scale"] * codec.PIXEL_STD))
        inst = {"kps": np.concatenate([kp, score], 1), "score": mean * float(meta["score"]),
                "area": area, "image_id": int(meta["image_id"])}
        by_image.setdefault(inst["image_id"], []).append(inst)
    results = []
    for image_id, insts in sorted(by_image.items()):
        for inst in oks_nms(insts, eval_cfg.oks_threshold):
            results.append({"image_id": image_id, "category_id": 1, "score": inst["score"],
                            "keypoints": [round(float(v), 3) for v in inst["kps"].ravel()]})
    return results


def predict_heatmaps(predict_fn, images: np.ndarray, flip_test: bool, shift: bool):
    """Heatmaps of a batch, averaged with the flipped-back heatmaps of the mirrored batch."""
    heatmaps = np.asarray(predict_fn(images), np.float32)
    if flip_test:
        flipped = np.asarray(predict_fn(np.ascontiguousarray(images[:, :, ::-1])), np.float32)
        heatmaps = (heatmaps + codec.flip_back(flipped, shift=shift)) * 0.5
    return heatmaps


_PREDICT = weakref.WeakKeyDictionary()


def _predict_fn(model):
    """One inference tf.function per model, so that training's periodic evaluations trace it
    once instead of at every evaluation; the last, smaller batch relaxes the batch size once."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if model not in _PREDICT:
        ref = weakref.ref(model)  # the cache must not keep the model alive
        _PREDICT[model] = tf.function(lambda x: ref()(x, training=False), reduce_retracing=True)
    return _PREDICT[model]


def run_model(model, dataset, eval_cfg, heatmap_size) -> List[dict]:
    """COCO keypoint results of `model` on an evaluation dataset of (image, metadata)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    predict = _predict_fn(model)
    batches = ((images.numpy(), {k: v.numpy() for k, v in meta.items()})
               for images, meta in dataset)
    return predict_results(lambda x: predict(tf.constant(x)).numpy(), batches, eval_cfg,
                           heatmap_size)[0]


def predict_results(predict_fn, batches, eval_cfg, heatmap_size):
    """COCO keypoint results of `predict_fn` (NumPy crops -> heatmaps: Keras or TFLite) over
    NumPy (images, metadata) batches, and every crop's keypoints in heatmap pixels."""
    coords_all, vals_all, metas, raw = [], [], [], []
    for images, meta in batches:
        hm = predict_heatmaps(predict_fn, images, eval_cfg.flip_test, eval_cfg.shift_heatmap)
        in_image, vals, crop_meta, coords = decode_batch(hm, meta, eval_cfg, heatmap_size)
        coords_all += in_image
        vals_all += vals
        metas += crop_meta
        raw.extend(coords)
    return results_from_predictions(coords_all, vals_all, metas, eval_cfg), raw


def decode_batch(heatmaps, meta, eval_cfg, heatmap_size):
    """Keypoints of a batch in image pixels, their scores, per-crop metadata, and the
    keypoints in heatmap pixels."""
    coords, vals = codec.decode_heatmaps(heatmaps, eval_cfg.post_process)
    in_image, metas = [], []
    for i in range(len(coords)):
        m = {k: meta[k][i] for k in ("center", "scale", "score", "image_id")}
        in_image.append(codec.heatmap_to_image(coords[i], m["center"], m["scale"],
                                               heatmap_size))
        metas.append(m)
    return in_image, list(vals), metas, coords


def evaluate_model(model, config, files: List[str], annotations: str,
                   results_path: Optional[str] = None, verbose: bool = True):
    """Runs the model on evaluation shards and scores it; returns (stats, results)."""
    from xhrnet_tf.data import pipeline  # pylint: disable=import-outside-toplevel
    ds = pipeline.build_dataset(config, training=False, files=files, batch_size=32,
                                deterministic=True)
    _, heatmap_size = pipeline.input_sizes(config)
    results = run_model(model, ds, config.eval, heatmap_size)
    if results_path:
        with open(results_path, "w", encoding="utf-8") as f:
            json.dump(results, f)
    return coco_keypoint_eval(annotations, results, verbose=verbose), results


def _evaluate_images(args) -> int:
    import xhrnet_tf  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.data.create_tfrecords import create_tfrecords  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.model import load_weights  # pylint: disable=import-outside-toplevel
    cfg = xhrnet_tf.load_config(args.config)
    model = xhrnet_tf.build_pose_model(cfg)
    load_weights(model, args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        mode = "val_det" if args.detections else "val_gt"
        shards = create_tfrecords(args.annotations, args.images, os.path.join(tmp, "val"),
                                  shards=1, mode=mode, detections=args.detections,
                                  det_score_threshold=cfg.eval.det_score_threshold,
                                  input_size=cfg.model.input_size)["shards"]
        out = args.output or "keypoint_results.json"
        stats, _ = evaluate_model(model, cfg, shards, args.annotations, out)
    print(f"wrote {out}; AP {stats['AP']:.4f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="COCO person_keypoints_*.json")
    p.add_argument("--results", help="score this COCO keypoint results file and stop")
    p.add_argument("--config")
    p.add_argument("--weights")
    p.add_argument("--images")
    p.add_argument("--detections", help="person detection results instead of GT boxes")
    p.add_argument("--output", help="where to write the results JSON")
    args = p.parse_args(argv)
    try:
        if args.results:
            coco_keypoint_eval(args.annotations, args.results)
            return 0
        missing = [f"--{k}" for k in ("config", "weights", "images") if not getattr(args, k)]
        if missing:
            p.error(f"{', '.join(missing)} required unless --results is given")
        return _evaluate_images(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
