"""Top-down heatmap codec (SPEC 13), kept apart from the model and the data pipeline.

Conventions: images and heatmaps are NHWC / (H, W, K); sizes are given as (width, height),
as in mmpose; a person box is (x, y, w, h); `scale` is the box size in units of 200 px.
Encoding exists twice, in NumPy and in TensorFlow for the tf.data pipeline, and the tests
hold the two equal. Decoding is NumPy only, so evaluation and TFLite inference need no graph.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

PIXEL_STD = 200.0
COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
                 (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4),
                 (3, 5), (4, 6))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def flip_permutation(num_joints: int = 17, pairs=COCO_FLIP_PAIRS) -> np.ndarray:
    """Index array that swaps left and right joints."""
    perm = np.arange(num_joints)
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


def box_to_center_scale(box: Sequence[float], aspect_ratio: float = 0.75,
                        padding: float = 1.25) -> Tuple[np.ndarray, np.ndarray]:
    """(x, y, w, h) -> centre and scale, with the box grown to the model's W/H aspect."""
    x, y, w, h = (float(v) for v in box)
    center = np.array([x + w * 0.5, y + h * 0.5], np.float32)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], np.float32) * padding
    return center, scale


def affine_transform_matrix(center, scale, rotation: float, output_size: Sequence[int],
                            inverse: bool = False) -> np.ndarray:
    """2x3 matrix from image to crop (or back with `inverse`), mmpose's definition.

    mmpose builds it from three point pairs; the same map in closed form is
    dst = s * R(-rot) (src - center) + output_centre, with s = output width / box width.
    """
    src_w = float(scale[0]) * PIXEL_STD
    out_w, out_h = float(output_size[0]), float(output_size[1])
    s = out_w / src_w
    theta = math.radians(rotation)
    cs, sn = math.cos(theta), math.sin(theta)
    a = np.array([[cs, sn], [-sn, cs]]) * s
    c = np.asarray(center, np.float64)
    t = np.array([out_w * 0.5, out_h * 0.5]) - a @ c
    m = np.hstack([a, t[:, None]])
    if inverse:
        a_inv = np.linalg.inv(a)
        m = np.hstack([a_inv, (-a_inv @ t)[:, None]])
    return m.astype(np.float64)


def apply_affine(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Applies a 2x3 affine matrix to (..., 2) points."""
    pts = np.asarray(points, np.float64)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def gaussian_heatmaps(joints: np.ndarray, visible: np.ndarray, heatmap_size: Sequence[int],
                      image_size: Sequence[int], sigma: float,
                      unbiased: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """MSRA targets (mmpose TopDownGenerateTarget, unbiased_encoding=False by default).

    joints: (K, 2) in input-image pixels; visible: (K,) > 0 for labelled joints.
    Returns heatmaps (H, W, K) float32 and target weights (K,) float32. The peak sits on the
    integer pixel `int(joint / stride + 0.5)` and the Gaussian is cut at 3 sigma; a joint whose
    window lies fully outside the heatmap gets weight 0.
    `unbiased=True` is DARK's unbiased encoding (mmpose unbiased_encoding=True): the Gaussian
    is centred on the sub-pixel location `joint / stride` and not cut. Up to half a heatmap
    pixel of rounding leaves the target, which matters most on small heatmaps; decode such
    models with post_process='dark'.
    """
    w, h = int(heatmap_size[0]), int(heatmap_size[1])
    stride = np.array([image_size[0] / w, image_size[1] / h])
    radius = sigma * 3
    mu = np.asarray(joints, np.float64) / stride  # (K, 2)
    if not unbiased:
        mu = np.floor(mu + 0.5)
    weight = (np.asarray(visible) > 0).astype(np.float32)
    outside = ((mu[:, 0] - radius >= w) | (mu[:, 1] - radius >= h) |
               (mu[:, 0] + radius + 1 < 0) | (mu[:, 1] + radius + 1 < 0))
    weight[outside] = 0.0
    xs = np.arange(w)[None, :, None] - mu[None, None, :, 0]  # (1, W, K)
    ys = np.arange(h)[:, None, None] - mu[None, None, :, 1]  # (H, 1, K)
    window = ((np.abs(xs) <= radius) & (np.abs(ys) <= radius)) | unbiased
    g = np.exp(-(xs ** 2 + ys ** 2) / (2 * sigma ** 2)) * window
    return (g * (weight > 0)).astype(np.float32), weight


def gaussian_heatmaps_tf(joints, visible, heatmap_size: Sequence[int],
                         image_size: Sequence[int], sigma: float, unbiased: bool = False):
    """TensorFlow twin of `gaussian_heatmaps` for use inside tf.data."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    w, h = int(heatmap_size[0]), int(heatmap_size[1])
    stride = tf.constant([image_size[0] / w, image_size[1] / h], tf.float32)
    radius = sigma * 3.0
    mu = tf.cast(joints, tf.float32) / stride
    if not unbiased:
        mu = tf.floor(mu + 0.5)
    weight = tf.cast(visible > 0, tf.float32)
    outside = ((mu[:, 0] - radius >= w) | (mu[:, 1] - radius >= h) |
               (mu[:, 0] + radius + 1 < 0) | (mu[:, 1] + radius + 1 < 0))
    weight = tf.where(outside, 0.0, weight)
    # The Gaussian and its square window are separable: two 1-D profiles and one product
    # instead of an exp over the whole (H, W, K) map.
    xs = tf.range(w, dtype=tf.float32)[:, None] - mu[None, :, 0]  # (W, K)
    ys = tf.range(h, dtype=tf.float32)[:, None] - mu[None, :, 1]  # (H, K)
    gx = tf.exp(-xs ** 2 / (2.0 * sigma ** 2))
    gy = tf.exp(-ys ** 2 / (2.0 * sigma ** 2))
    if not unbiased:
        gx *= tf.cast(tf.abs(xs) <= radius, tf.float32)
        gy *= tf.cast(tf.abs(ys) <= radius, tf.float32)
    gx = gx * tf.cast(weight > 0, tf.float32)[None, :]
    return gy[:, None, :] * gx[None, :, :], weight


def argmax_preds(heatmaps: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(N, H, W, K) -> integer peak coords (N, K, 2) as (x, y) and peak values (N, K, 1).
    A channel whose maximum is not positive gets coordinate (0, 0), as in mmpose."""
    n, h, w, k = heatmaps.shape
    flat = heatmaps.transpose(0, 3, 1, 2).reshape(n, k, h * w)
    idx = flat.argmax(axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2)
    coords = np.stack([idx % w, idx // w], axis=-1).astype(np.float32)
    coords *= (maxvals > 0.0)
    return coords, maxvals.astype(np.float32)


def _refine_default(coords: np.ndarray, heatmaps: np.ndarray) -> np.ndarray:
    """Quarter-pixel shift toward the higher neighbour (mmpose post_process='default')."""
    n, h, w, k = heatmaps.shape
    out = coords.copy()
    for i in range(n):
        for j in range(k):
            px, py = int(coords[i, j, 0]), int(coords[i, j, 1])
            if 1 < px < w - 1 and 1 < py < h - 1:
                hm = heatmaps[i, :, :, j]
                diff = np.array([hm[py, px + 1] - hm[py, px - 1],
                                 hm[py + 1, px] - hm[py - 1, px]])
                out[i, j] += np.sign(diff) * 0.25
    return out


def _refine_dark(coords: np.ndarray, heatmaps: np.ndarray, kernel: int = 11) -> np.ndarray:
    """DARK (distribution-aware) refinement: blur, log, one Newton step (Zhang et al. 2020)."""
    import cv2  # pylint: disable=import-outside-toplevel
    n, h, w, k = heatmaps.shape
    out = coords.copy()
    for i in range(n):
        for j in range(k):
            hm = heatmaps[i, :, :, j].astype(np.float64)
            peak = hm.max()
            blurred = cv2.GaussianBlur(hm, (kernel, kernel), 0)
            if blurred.max() > 0:
                blurred *= peak / blurred.max()
            lg = np.log(np.maximum(blurred, 1e-10))
            px, py = int(coords[i, j, 0]), int(coords[i, j, 1])
            if not (1 < px < w - 2 and 1 < py < h - 2):
                continue
            dx = 0.5 * (lg[py, px + 1] - lg[py, px - 1])
            dy = 0.5 * (lg[py + 1, px] - lg[py - 1, px])
            dxx = 0.25 * (lg[py, px + 2] - 2 * lg[py, px] + lg[py, px - 2])
            dyy = 0.25 * (lg[py + 2, px] - 2 * lg[py, px] + lg[py - 2, px])
            dxy = 0.25 * (lg[py + 1, px + 1] - lg[py - 1, px + 1] - lg[py + 1, px - 1]
                          + lg[py - 1, px - 1])
            det = dxx * dyy - dxy ** 2
            if det != 0:
                hessian_inv = np.array([[dyy, -dxy], [-dxy, dxx]]) / det
                out[i, j] -= hessian_inv @ np.array([dx, dy])
    return out


def decode_heatmaps(heatmaps: np.ndarray, post_process: str = "default"):
    """Heatmaps (N, H, W, K) -> sub-pixel coords in heatmap pixels (N, K, 2), scores (N, K, 1)."""
    heatmaps = np.asarray(heatmaps, np.float32)
    coords, maxvals = argmax_preds(heatmaps)
    if post_process == "default":
        coords = _refine_default(coords, heatmaps)
    elif post_process == "dark":
        coords = _refine_dark(coords, heatmaps)
    elif post_process != "none":
        raise ValueError(f"post_process must be 'default', 'dark' or 'none', got {post_process!r}")
    return coords, maxvals


def heatmap_to_image(coords: np.ndarray, center, scale, heatmap_size: Sequence[int]) -> np.ndarray:
    """Maps (K, 2) heatmap coordinates of one instance back to image pixels (mmpose 0.x)."""
    box = np.asarray(scale, np.float64) * PIXEL_STD
    factor = box / np.asarray(heatmap_size, np.float64)
    return coords * factor + np.asarray(center, np.float64) - box * 0.5


def flip_back(heatmaps: np.ndarray, pairs=COCO_FLIP_PAIRS, shift: bool = True) -> np.ndarray:
    """Heatmaps of a horizontally flipped input -> heatmaps of the original (N, H, W, K).

    Mirrors W, swaps left/right channels and, with `shift`, moves the map one pixel right
    (first column kept), which compensates the flip's half-pixel misalignment (SPEC 13).
    """
    out = heatmaps[:, :, ::-1, :][..., flip_permutation(heatmaps.shape[-1], pairs)].copy()
    if shift:
        out[:, :, 1:, :] = out[:, :, :-1, :].copy()
    return out
