"""In-graph top-down transforms (SPEC 13), the parser half of the pipeline.

Random flip, half-body, scale and rotation only change the affine transform from crop to
network input, so the image is resampled once, by one bilinear warp with the same sampling as
cv2.warpAffine (`warp`), from only the part of the JPEG crop it reads (`decode_window`).
Randomness is stateless and keyed by (seed, sample index), so a sample is augmented the same
way whatever the parallelism.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from xhrnet_tf import codec

UPPER_BODY = tuple(range(11))  # mmpose's upper_body_ids for COCO
_MEAN = np.array(codec.IMAGENET_MEAN, np.float32) * 255.0
_STD = np.array(codec.IMAGENET_STD, np.float32) * 255.0


def affine_matrix_tf(center, scale, rotation_deg, output_size: Sequence[int]):
    """TF twin of codec.affine_transform_matrix: 3x3 crop -> input map (float32)."""
    out_w, out_h = float(output_size[0]), float(output_size[1])
    s = out_w / (scale[0] * codec.PIXEL_STD)
    theta = rotation_deg * (math.pi / 180.0)
    cs, sn = tf.cos(theta) * s, tf.sin(theta) * s
    tx = out_w * 0.5 - (cs * center[0] + sn * center[1])
    ty = out_h * 0.5 - (-sn * center[0] + cs * center[1])
    return tf.stack([tf.stack([cs, sn, tx]), tf.stack([-sn, cs, ty]),
                     tf.constant([0.0, 0.0, 1.0])])


def canvas_size(output_size: Sequence[int]) -> int:
    """Side of the square pixel budget the compiled warp reads: room for a stored crop (about
    2.1x the input height square, see create_tfrecords)."""
    return int(math.ceil(2.25 * max(output_size)))


def warp(image, matrix, output_size: Sequence[int], normalized: bool = False):
    """Bilinear warp of an HWC image (uint8 or float) by a 3x3 forward matrix, as
    cv2.warpAffine with a constant 0 border; returns float32, ImageNet-normalised if asked
    (fused into the compiled warp: as a separate TF op it costs another 0.5 ms).

    TF's general kernel (ImageProjectiveTransformV3) costs ~2.2 ms at 256x192, most of a
    sample's time; the same sampling as an XLA-compiled gather costs ~0.7 ms. XLA needs a fixed
    shape, so the pixels go in as a flat buffer of canvas_size()**2 pixels plus the image's
    size; larger images take the general kernel.
    """
    side = canvas_size(output_size)
    dims = tf.shape(image)[:2]
    fits = dims[0] * dims[1] <= side * side
    scale, offset = (1.0 / _STD, -_MEAN / _STD) if normalized else ([1.0] * 3, [0.0] * 3)
    return tf.cond(fits, lambda: _warp_flat(image, matrix, output_size, side, scale, offset),
                   lambda: _warp_projective(image, matrix, output_size) * scale + offset)


def _warp_flat(image, matrix, output_size, side: int, scale, offset):
    dims = tf.shape(image)[:2]
    pixels = tf.reshape(image, [-1, 3])
    flat = tf.concat([pixels, tf.zeros([side * side - tf.shape(pixels)[0], 3], image.dtype)], 0)
    flat = tf.ensure_shape(flat, [side * side, 3])  # (concat copies; tf.pad is 10x slower)
    return _gather_bilinear(flat, tf.linalg.inv(matrix), dims, tf.constant(scale, tf.float32),
                            tf.constant(offset, tf.float32), int(output_size[0]),
                            int(output_size[1]))


@tf.function(jit_compile=True)
def _gather_bilinear(flat, inv, dims, scale, offset, out_w: int, out_h: int):
    """Samples the dims[0] x dims[1] image stored row-major at the start of `flat` (reads
    outside the image weigh zero), times `scale` plus `offset` per channel."""
    h, w = dims[0], dims[1]
    ys, xs = tf.meshgrid(tf.range(out_h, dtype=tf.float32), tf.range(out_w, dtype=tf.float32),
                         indexing="ij")
    # (clipped so that far-off positions stay far off without overflowing int32)
    sx = tf.clip_by_value(inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2], -2.0,
                          tf.cast(w, tf.float32) + 1.0)
    sy = tf.clip_by_value(inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2], -2.0,
                          tf.cast(h, tf.float32) + 1.0)
    x0f, y0f = tf.floor(sx), tf.floor(sy)
    fx, fy = (sx - x0f)[..., None], (sy - y0f)[..., None]
    x0, y0 = tf.cast(x0f, tf.int32), tf.cast(y0f, tf.int32)
    pixels = tf.cast(flat, tf.float32)

    def at(dx, dy):
        x, y = x0 + dx, y0 + dy
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        index = tf.clip_by_value(y, 0, h - 1) * w + tf.clip_by_value(x, 0, w - 1)
        return tf.gather(pixels, index) * tf.cast(inside, tf.float32)[..., None]

    top = at(0, 0) * (1.0 - fx) + at(1, 0) * fx
    bottom = at(0, 1) * (1.0 - fx) + at(1, 1) * fx
    return (top * (1.0 - fy) + bottom * fy) * scale + offset


def _warp_projective(image, matrix, output_size):
    # TF's kernel runs about 30% faster on float32 than on uint8 input.
    inv = tf.linalg.inv(matrix)
    transform = tf.reshape(inv, [9])[None, :8]  # output pixel -> input pixel
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None], transforms=transform,
        output_shape=tf.constant([output_size[1], output_size[0]], tf.int32),
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]


def jpeg_scale(jpeg, center, scale, out_width: int, max_zoom: float):
    """Chooses the coarsest JPEG scale 1/r (r = 1, 2, 4, 8) that still has at least one stored
    pixel per output pixel at `max_zoom`; returns (level, r, (H, W) at 1/r, center, scale)
    with center/scale moved to the 1/r image. Reads only the JPEG header.

    libjpeg's DCT-domain down-scaling costs a fraction of a full decode, and large people are
    stored with far more pixels than a 256x192 input can use.
    """
    density = out_width / (scale[0] * codec.PIXEL_STD) * max_zoom  # output px per crop px
    level = tf.clip_by_value(tf.floor(-tf.math.log(density) / math.log(2.0)), 0.0, 3.0)
    r = tf.pow(2.0, level)
    dims = tf.math.ceil(tf.cast(tf.io.extract_jpeg_shape(jpeg)[:2], tf.float32) / r)
    # Pixel j of the 1/r image covers stored pixels [j*r, (j+1)*r).
    return level, r, dims, (center + 0.5) / r - 0.5, scale / r


def decode_window(jpeg, level, dims, matrix, output_size: Sequence[int]):
    """Decodes, at JPEG scale level `level`, only the part of the crop that the warp by
    `matrix` (crop -> output) samples; returns (pixels, matrix from those pixels to output).

    The stored crop leaves room for any rotation and zoom, so a typical warp reads a third of
    it; libjpeg stops after the window's last row and skips the IDCT beside it (measured: a
    quarter window decodes ~20% faster than the whole crop; entropy decoding still runs).
    """
    w, h = float(output_size[0]), float(output_size[1])
    corners = tf.constant([[0.0, 0.0, 1.0], [w - 1, 0.0, 1.0], [0.0, h - 1, 1.0],
                           [w - 1, h - 1, 1.0]])
    src = tf.linalg.matmul(corners, tf.linalg.inv(matrix), transpose_b=True)[:, :2]
    hi = tf.stack([dims[1], dims[0]]) - 1.0
    lo_xy = tf.clip_by_value(tf.floor(tf.reduce_min(src, 0)) - 1.0, 0.0, hi)
    hi_xy = tf.clip_by_value(tf.floor(tf.reduce_max(src, 0)) + 2.0, lo_xy, hi)  # bilinear +1
    window = tf.cast(tf.stack([lo_xy[1], lo_xy[0], hi_xy[1] - lo_xy[1] + 1,
                               hi_xy[0] - lo_xy[0] + 1]), tf.int32)
    branches = [lambda r=r: tf.image.decode_and_crop_jpeg(
        jpeg, window, channels=3, ratio=r, dct_method="INTEGER_ACCURATE") for r in (1, 2, 4, 8)]
    image = tf.switch_case(tf.cast(level, tf.int32), branches)
    shift = tf.stack([tf.stack([1.0, 0.0, lo_xy[0]]), tf.stack([0.0, 1.0, lo_xy[1]]),
                      tf.constant([0.0, 0.0, 1.0])])
    return image, matrix @ shift


def _half_body_box(joints, visible, seed, aspect_ratio: float):
    """mmpose TopDownHalfBodyTransform: box of the upper or lower visible joints, x1.5.
    Returns (ok, center, scale); ok is False when fewer than two joints are selected."""
    vis = visible > 0
    is_upper = tf.constant([j in UPPER_BODY for j in range(17)])
    n_upper = tf.reduce_sum(tf.cast(vis & is_upper, tf.int32))
    n_lower = tf.reduce_sum(tf.cast(vis & ~is_upper, tf.int32))
    # mmpose draws randn() < 0.5 (p ~ 0.69), not a fair coin; kept for fidelity.
    pick_upper = (tf.random.stateless_normal([], seed) < 0.5) & (n_upper > 2)
    pick_upper = pick_upper | (n_lower <= 2)
    sel = vis & tf.where(pick_upper, is_upper, ~is_upper)
    count = tf.reduce_sum(tf.cast(sel, tf.float32))
    pts = tf.boolean_mask(joints, sel)
    center = tf.reduce_sum(pts, axis=0) / tf.maximum(count, 1.0)
    lt = tf.reduce_min(tf.concat([pts, [[1e9, 1e9]]], 0), axis=0)
    rb = tf.reduce_max(tf.concat([pts, [[-1e9, -1e9]]], 0), axis=0)
    w, h = rb[0] - lt[0], rb[1] - lt[1]
    w2 = tf.where(w > aspect_ratio * h, w, h * aspect_ratio)
    h2 = tf.where(w > aspect_ratio * h, w / aspect_ratio, h)
    scale = tf.stack([w2, h2]) / codec.PIXEL_STD * 1.5
    return count >= 2, center, scale


def train_transform(ex, index, data_cfg, image_size, heatmap_size, seed: int):
    """Decoded example -> (normalised image, {heatmaps, target_weights})."""
    seeds = tf.random.experimental.stateless_split(
        tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)]), 6)
    # Zoom-in reaches 1/(1 - scale_factor); half-body boxes may zoom further and then sample
    # a slightly coarser image, which the augmentation's own blur dwarfs.
    level, r, dims, center, scale = jpeg_scale(ex["jpeg"], ex["crop_center"], ex["crop_scale"],
                                               image_size[0], 1.0 / (1.0 - data_cfg.scale_factor))
    crop_w = dims[1]
    joints, visible = (ex["joints"] + 0.5) / r - 0.5, ex["visible"]

    flip = tf.random.stateless_uniform([], seeds[0]) < data_cfg.flip_prob
    perm = codec.flip_permutation()
    mirror = tf.constant([[-1.0, 0.0], [0.0, 1.0]])
    joints = tf.where(flip, tf.gather(joints, perm) @ mirror + [crop_w - 1.0, 0.0], joints)
    visible = tf.where(flip, tf.gather(visible, perm), visible)
    center = tf.where(flip, tf.stack([crop_w - 1.0 - center[0], center[1]]), center)

    aspect = image_size[0] / image_size[1]
    num_vis = tf.reduce_sum(tf.cast(visible > 0, tf.int32))
    try_half = ((num_vis > data_cfg.half_body_min_joints) &
                (tf.random.stateless_uniform([], seeds[1]) < data_cfg.half_body_prob))
    ok, hb_center, hb_scale = _half_body_box(joints, visible, seeds[2], aspect)
    use_half = try_half & ok
    center = tf.where(use_half, hb_center, center)
    scale = tf.where(use_half, hb_scale, scale)

    sf, rf = data_cfg.scale_factor, data_cfg.rotation_factor
    scale = scale * tf.clip_by_value(1.0 + sf * tf.random.stateless_normal([], seeds[3]),
                                     1.0 - sf, 1.0 + sf)
    rot = tf.clip_by_value(rf * tf.random.stateless_normal([], seeds[4]), -2 * rf, 2 * rf)
    rot = tf.where(tf.random.stateless_uniform([], seeds[5]) < data_cfg.rotation_prob, rot, 0.0)

    matrix = affine_matrix_tf(center, scale, rot, image_size)
    flip_m = tf.stack([tf.stack([tf.where(flip, -1.0, 1.0), 0.0,
                                 tf.where(flip, crop_w - 1.0, 0.0)]),
                       tf.constant([0.0, 1.0, 0.0]), tf.constant([0.0, 0.0, 1.0])])
    image, window_matrix = decode_window(ex["jpeg"], level, dims, matrix @ flip_m, image_size)
    out = warp(image, window_matrix, image_size, normalized=True)
    joints = joints @ tf.transpose(matrix[:2, :2]) + matrix[:2, 2]
    return out, targets(joints, visible, image_size, heatmap_size, data_cfg.heatmap_sigma,
                        data_cfg.unbiased_encoding)


def targets(joints, visible, image_size, heatmap_size, sigma, unbiased=False):
    """Heatmap targets; a keypoint outside the crop loses its target (weight 0).

    "Outside" is judged where the target's peak would sit, on the heatmap grid: a joint half a
    stride beyond the border still has a decodable peak on the edge pixel and keeps it.
    """
    stride = tf.constant([image_size[0] / heatmap_size[0], image_size[1] / heatmap_size[1]])
    mu = tf.floor(joints / stride + 0.5)
    inside = ((mu[:, 0] >= 0) & (mu[:, 0] < heatmap_size[0]) &
              (mu[:, 1] >= 0) & (mu[:, 1] < heatmap_size[1]))
    visible = tf.where(inside, visible, tf.zeros_like(visible))
    heatmaps, weights = codec.gaussian_heatmaps_tf(joints, visible, heatmap_size, image_size,
                                                   sigma, unbiased)
    return {"heatmaps": heatmaps, "target_weights": weights}


def eval_transform(ex, data_cfg, image_size, heatmap_size):
    """Decoded example -> (normalised image, metadata for mapping back and scoring)."""
    level, r, dims, center, scale = jpeg_scale(ex["jpeg"], ex["crop_center"], ex["crop_scale"],
                                               image_size[0], 1.0)
    matrix = affine_matrix_tf(center, scale, 0.0, image_size)
    image, window_matrix = decode_window(ex["jpeg"], level, dims, matrix, image_size)
    out = warp(image, window_matrix, image_size, normalized=True)
    joints = ((ex["joints"] + 0.5) / r - 0.5) @ tf.transpose(matrix[:2, :2]) + matrix[:2, 2]
    meta = {k: ex[k] for k in ("center", "scale", "bbox", "area", "score", "image_id", "ann_id")}
    meta.update(targets(joints, ex["visible"], image_size, heatmap_size, data_cfg.heatmap_sigma,
                        data_cfg.unbiased_encoding))
    return out, meta

