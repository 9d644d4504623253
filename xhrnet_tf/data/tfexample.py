"""The tf.Example layout of one person instance, and its decoder.

Each record holds a JPEG of an enlarged crop around the person plus everything needed to train
on it and to map predictions back to the original image:

| feature | meaning |
|---|---|
| image/encoded | JPEG of the crop; pixels outside the original image are black |
| crop/offset, crop/factor | crop pixel = (image pixel - offset + 0.5) * factor - 0.5 |
| keypoints/xy, keypoints/visible | 17 x (x, y) in crop pixels, COCO visibility 0/1/2 |
| center, scale | the person box as mmpose centre/scale, in image coordinates |
| bbox, area, score, image_id, ann_id | COCO box, area, box score, ids (ann_id -1 for detections) |
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

NUM_JOINTS = 17


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def serialize_instance(jpeg: bytes, crop_offset, crop_factor: float, keypoints_xy,
                       visible, center, scale, bbox, area: float, score: float,
                       image_id: int, ann_id: int) -> bytes:
    """One person instance as a serialized tf.train.Example."""
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
        "crop/offset": _floats(crop_offset),
        "crop/factor": _floats([crop_factor]),
        "keypoints/xy": _floats(np.asarray(keypoints_xy).reshape(-1)),
        "keypoints/visible": _ints(np.asarray(visible).reshape(-1)),
        "center": _floats(center),
        "scale": _floats(scale),
        "bbox": _floats(bbox),
        "area": _floats([area]),
        "score": _floats([score]),
        "image_id": _ints([image_id]),
        "ann_id": _ints([ann_id]),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


_SPEC = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "crop/offset": tf.io.FixedLenFeature([2], tf.float32),
    "crop/factor": tf.io.FixedLenFeature([1], tf.float32),
    "keypoints/xy": tf.io.FixedLenFeature([NUM_JOINTS * 2], tf.float32),
    "keypoints/visible": tf.io.FixedLenFeature([NUM_JOINTS], tf.int64),
    "center": tf.io.FixedLenFeature([2], tf.float32),
    "scale": tf.io.FixedLenFeature([2], tf.float32),
    "bbox": tf.io.FixedLenFeature([4], tf.float32),
    "area": tf.io.FixedLenFeature([1], tf.float32),
    "score": tf.io.FixedLenFeature([1], tf.float32),
    "image_id": tf.io.FixedLenFeature([1], tf.int64),
    "ann_id": tf.io.FixedLenFeature([1], tf.int64),
}


def decode(serialized):
    """Decoder: serialized Example -> dict of tensors (image still JPEG-encoded)."""
    f = tf.io.parse_single_example(serialized, _SPEC)
    factor = f["crop/factor"][0]
    offset = f["crop/offset"]
    return {
        "jpeg": f["image/encoded"],
        "joints": tf.reshape(f["keypoints/xy"], [NUM_JOINTS, 2]),
        "visible": f["keypoints/visible"],
        # The person box in crop pixels, where augmentation and the affine warp happen.
        "crop_center": (f["center"] - offset + 0.5) * factor - 0.5,
        "crop_scale": f["scale"] * factor,
        "center": f["center"],
        "scale": f["scale"],
        "bbox": f["bbox"],
        "area": f["area"][0],
        "score": f["score"][0],
        "image_id": f["image_id"][0],
        "ann_id": f["ann_id"][0],
    }
