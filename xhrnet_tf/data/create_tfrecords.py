"""COCO keypoint annotations -> sharded TFRecords of person crops.

    python -m xhrnet_tf.data.create_tfrecords --annotations person_keypoints_train2017.json \\
        --images train2017/ --output data/tfrecords/train --shards 32 [--mode train]

Modes: `train` and `val_gt` take non-crowd persons with keypoints (mmpose's filter);
`val_det` takes person boxes from a detection results file (`--detections`, with
`--det_score_threshold`). Bad instances (missing or corrupt images, truncated JPEGs, unknown
image ids, empty or out-of-image boxes, NaN keypoints) are skipped and counted by reason; a
record is only written once it is complete, and shards appear under their final names only
when the whole conversion succeeded.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from xhrnet_tf import codec

MODES = ("train", "val_gt", "val_det")
# Crops keep the pixel density a 256x192 input needs at the strongest zoom-in (scale 0.75);
# more would only cost decode time. Pass --input_size 384 288 for the 384x288 models.
DEFAULT_INPUT_SIZE = (256, 192)  # (height, width)
MAX_ZOOM = 1 / 0.75


class ConversionError(ValueError):
    """The conversion cannot start (bad arguments or inputs as a whole)."""


def clean_box(bbox, width: int, height: int) -> Optional[List[float]]:
    """mmpose's box sanitising: clip to the image; None when nothing is left."""
    if len(bbox) != 4 or not all(math.isfinite(float(v)) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 > x1 and y2 > y1:
        return [x1, y1, x2 - x1, y2 - y1]
    return None


def _instances(coco: dict, mode: str, detections: Optional[list], threshold: float,
               skipped: collections.Counter) -> Dict[int, list]:
    """Instances grouped by image id, after every check that needs no pixels."""
    images = {img["id"]: img for img in coco.get("images", [])}
    by_image: Dict[int, list] = collections.defaultdict(list)
    if mode == "val_det":
        sources = [dict(d, id=-1, score=d.get("score", 1.0)) for d in detections
                   if d.get("category_id", 1) == 1 and d.get("score", 1.0) >= threshold]
        skipped["below_score_threshold"] += len(detections) - len(sources)
    else:
        sources = [a for a in coco.get("annotations", []) if a.get("category_id", 1) == 1]
    for obj in sources:
        img = images.get(obj.get("image_id"))
        if img is None:
            skipped["unknown_image_id"] += 1
            continue
        if mode != "val_det":
            if obj.get("iscrowd", 0) or obj.get("num_keypoints", 0) == 0:
                skipped["crowd_or_no_keypoints"] += 1
                continue
            kps = np.asarray(obj.get("keypoints", []), np.float64)
            if kps.size != 51 or not np.isfinite(kps).all():
                skipped["nan_or_malformed_keypoints"] += 1
                continue
            if obj.get("area", 1.0) <= 0:
                skipped["bad_box"] += 1
                continue
        else:
            kps = np.zeros(51)
        box = clean_box(obj.get("bbox", []), img["width"], img["height"])
        if box is None:
            skipped["bad_box"] += 1
            continue
        area = float(obj.get("area", box[2] * box[3]))
        by_image[img["id"]].append(dict(bbox=box, keypoints=kps.reshape(17, 3), area=area,
                                        score=float(obj.get("score", 1.0)), ann_id=obj["id"]))
    return by_image


def read_image(path: str) -> Tuple[Optional[np.ndarray], str]:
    """BGR image, or None with the reason ('missing_image' / 'corrupt_image')."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None, "missing_image"
    # OpenCV decodes a truncated JPEG with a grey tail and only a warning; catch it here.
    if data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n")[-2:] == b"\xff\xd9":
        return None, "corrupt_image"
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return None, "corrupt_image"
    return img, ""


def crop_instance(img: np.ndarray, inst: dict, input_width: int, image_id: int) -> bytes:
    """Crops the area any augmentation can sample (scale x1.25, any rotation), serialises it.

    The crop is shrunk when the person is larger than the input can resolve at MAX_ZOOM.
    """
    from xhrnet_tf.data.tfexample import serialize_instance  # pylint: disable=import-outside-toplevel
    center, scale = codec.box_to_center_scale(inst["bbox"])
    half = 0.5 * math.hypot(*(scale * codec.PIXEL_STD * 1.25)) + 2.0
    x0, y0 = int(math.floor(center[0] - half)), int(math.floor(center[1] - half))
    side = int(math.ceil(2 * half)) + 1
    crop = np.zeros((side, side, 3), np.uint8)
    h, w = img.shape[:2]
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
    factor = 1.0
    target = int(math.ceil(side * input_width * MAX_ZOOM / (scale[0] * codec.PIXEL_STD)))
    if target < side:
        crop = cv2.resize(crop, (target, target), interpolation=cv2.INTER_AREA)
        factor = target / side
    ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    kps = inst["keypoints"]
    visible = (kps[:, 2] > 0).astype(np.int64) * kps[:, 2].astype(np.int64)
    xy = (kps[:, :2] - np.array([x0, y0]) + 0.5) * factor - 0.5
    xy[visible == 0] = 0.0
    return serialize_instance(jpeg.tobytes(), (x0, y0), factor, xy, visible, center, scale,
                              inst["bbox"], inst["area"], inst["score"], image_id,
                              inst["ann_id"])


def _process_image(job) -> Tuple[List[bytes], collections.Counter]:
    path, image_id, instances, input_width = job
    skipped: collections.Counter = collections.Counter()
    img, reason = read_image(path)
    if img is None:
        skipped[reason] += len(instances)
        return [], skipped
    records = []
    for inst in instances:
        try:
            records.append(crop_instance(img, inst, input_width, image_id))
        except (RuntimeError, ValueError, cv2.error):
            skipped["encode_failed"] += 1
    return records, skipped


@contextlib.contextmanager
def _job_runner(workers: int):
    """imap over a spawn pool; in-process for one worker (no start-up cost for small jobs)."""
    if workers <= 1:
        yield map
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield lambda fn, jobs: pool.imap(fn, jobs, chunksize=4)


def shard_names(prefix: str, shards: int) -> List[str]:
    return [f"{prefix}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]


def _prepare_output(prefix: str, shards: int, overwrite: bool) -> None:
    existing = sorted(glob.glob(f"{glob.escape(prefix)}-*-of-*.tfrecord"))
    if existing and not overwrite:
        raise ConversionError(f"{prefix}: {len(existing)} shard(s) already exist (e.g. "
                              f"{existing[0]}); pass --overwrite to replace them")
    for path in existing + glob.glob(f"{glob.escape(prefix)}.json"):
        os.remove(path)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)


def _load_inputs(annotations: str, images: str, mode: str, detections: Optional[str]):
    if mode not in MODES:
        raise ConversionError(f"--mode {mode!r}: expected one of {MODES}")
    for path, what in ((annotations, "annotations file"), (images, "images directory")):
        if not os.path.exists(path):
            raise ConversionError(f"{path}: {what} not found")
    try:
        with open(annotations, encoding="utf-8") as f:
            coco = json.load(f)
        dets = None
        if mode == "val_det":
            if not detections:
                raise ConversionError("--mode val_det needs --detections FILE")
            with open(detections, encoding="utf-8") as f:
                dets = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read input JSON: {e}") from None
    return coco, dets


def create_tfrecords(annotations: str, images: str, output: str, shards: int = 1,
                     mode: str = "train", detections: Optional[str] = None,
                     det_score_threshold: float = 0.0, overwrite: bool = False,
                     workers: int = 0, input_size=DEFAULT_INPUT_SIZE,
                     log=sys.stderr) -> dict:
    """Writes the shards and returns a summary: {'written': n, 'skipped': {reason: n}}."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if shards < 1:
        raise ConversionError(f"--shards {shards}: must be at least 1")
    coco, dets = _load_inputs(annotations, images, mode, detections)
    _prepare_output(output, shards, overwrite)
    skipped: collections.Counter = collections.Counter()
    by_image = _instances(coco, mode, dets, det_score_threshold, skipped)
    names = {img["id"]: img["file_name"] for img in coco.get("images", [])}
    jobs = [(os.path.join(images, names[i]), i, insts, int(input_size[1]))
            for i, insts in sorted(by_image.items())]
    final = shard_names(output, shards)
    writers = [tf.io.TFRecordWriter(p + ".tmp") for p in final]
    written, start = 0, time.time()
    workers = workers or min(os.cpu_count() or 1, 8)
    with _job_runner(workers) as run:
        for done, (records, bad) in enumerate(run(_process_image, jobs), 1):
            skipped.update(bad)
            for rec in records:
                writers[written % shards].write(rec)
                written += 1
            if log and (done % 200 == 0 or done == len(jobs)):
                rate = done / max(time.time() - start, 1e-9)
                print(f"  {done}/{len(jobs)} images, {written} instances ({rate:.1f} img/s)",
                      file=log)
    for w, path in zip(writers, final):
        w.close()
        os.replace(path + ".tmp", path)
    summary = {"written": written, "skipped": dict(sorted(skipped.items())), "shards": final,
               "counts": [written // shards + (i < written % shards) for i in range(shards)],
               "mode": mode}
    # Readers take the epoch length from here instead of scanning every record.
    with open(f"{output}.json", "w", encoding="utf-8") as f:
        json.dump(dict(summary, shards=[os.path.basename(p) for p in final]), f, indent=1)
    if log:
        reasons = ", ".join(f"{k}: {v}" for k, v in summary["skipped"].items()) or "none"
        print(f"wrote {written} instances to {shards} shard(s) {output}-*; "
              f"skipped {sum(skipped.values())} ({reasons})", file=log)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.data.create_tfrecords",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="COCO person_keypoints_*.json")
    p.add_argument("--images", required=True, help="directory of the images")
    p.add_argument("--output", required=True, help="shard prefix, e.g. data/tfrecords/train")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--mode", default="train", choices=MODES)
    p.add_argument("--detections", default=None, help="detection results JSON (val_det)")
    p.add_argument("--det_score_threshold", type=float, default=0.0)
    p.add_argument("--overwrite", action="store_true", help="replace existing shards")
    p.add_argument("--workers", type=int, default=0, help="processes (default: cores)")
    p.add_argument("--input_size", type=int, nargs=2, default=DEFAULT_INPUT_SIZE,
                   metavar=("H", "W"), help="largest model input the crops must serve")
    args = p.parse_args(argv)
    try:
        create_tfrecords(args.annotations, args.images, args.output, args.shards, args.mode,
                         args.detections, args.det_score_threshold, args.overwrite,
                         args.workers, tuple(args.input_size))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
