"""Evaluation during training: COCO AP on the validation shards, TensorBoard scalars and
example images, and the best-AP weights."""
from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from xhrnet_tf.config import Config
from xhrnet_tf.data import pipeline


def val_available(cfg: Config) -> bool:
    return bool(cfg.data.val_annotations and os.path.isfile(cfg.data.val_annotations)
                and tf.io.gfile.glob(cfg.data.val_tfrecords or "/nonexistent"))


def periodic_eval(cfg, model, model_dir, writer, step_num, verbose=False, keep_best=True):
    """Evaluates, logs AP and example predictions, and keeps the best weights."""
    if not val_available(cfg):
        return None
    from xhrnet_tf.evaluate import evaluate_model  # pylint: disable=import-outside-toplevel
    files = pipeline.list_files(cfg.data.val_tfrecords, "data.val_tfrecords")
    stats, _ = evaluate_model(model, cfg, files, cfg.data.val_annotations,
                              os.path.join(model_dir, "val_results.json"), verbose=verbose)
    print(f"\nstep {step_num}: val AP {stats['AP']:.4f} (AP50 {stats['AP50']:.4f})")
    if writer:
        with writer.as_default(step=step_num):
            for k, v in stats.items():
                tf.summary.scalar(f"val/{k}", v)
            tf.summary.image("val/predictions(red)_targets(green)",
                             example_images(cfg, model, files), max_outputs=4)
    best_path = os.path.join(model_dir, "best.json")
    best = json.load(open(best_path, encoding="utf-8")) if os.path.exists(best_path) else {}
    if keep_best and stats["AP"] > best.get("AP", -1.0):
        model.save_weights(os.path.join(model_dir, "best.weights.h5"))
        with open(best_path, "w", encoding="utf-8") as f:
            json.dump({"AP": stats["AP"], "step": step_num, "stats": stats}, f, indent=1)
    return stats


def example_images(cfg, model, files):
    """A few validation inputs with predicted (red) and target (green) keypoints."""
    import cv2  # pylint: disable=import-outside-toplevel
    from xhrnet_tf import codec  # pylint: disable=import-outside-toplevel
    images, meta = next(iter(pipeline.build_dataset(cfg, training=False, files=files,
                                                    batch_size=4, deterministic=True)))
    pred, _ = codec.decode_heatmaps(model(images, training=False).numpy())
    target, _ = codec.decode_heatmaps(meta["heatmaps"].numpy())
    weights = meta["target_weights"].numpy()
    std, mean = np.array(codec.IMAGENET_STD) * 255, np.array(codec.IMAGENET_MEAN) * 255
    out = []
    for b, img in enumerate(images.numpy()):
        canvas = np.ascontiguousarray((img * std + mean).clip(0, 255).astype(np.uint8))
        for k in range(pred.shape[1]):
            if weights[b, k] > 0:
                cv2.circle(canvas, tuple(int(v) for v in target[b, k] * 4), 3, (0, 255, 0), 1)
            cv2.circle(canvas, tuple(int(v) for v in pred[b, k] * 4), 2, (255, 0, 0), -1)
        out.append(canvas)
    return np.stack(out)
