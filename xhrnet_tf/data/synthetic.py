"""A synthetic COCO-keypoints data set of rendered people, for demos and the quickstart.

    python -m xhrnet_tf.data.synthetic --output data/synthetic --images 600 --seed 0

Writes `images/{train,val}/*.jpg` and `annotations/person_keypoints_{train,val}.json` in COCO
format. Each image holds several articulated figures with COCO's 17-joint topology (filled
torso, two-tone limbs with mannequin joint discs, and a head with eyes, ears and nose), in
random poses, sizes, positions, rotations and colours, over textured noise with clutter;
later figures and clutter occlude earlier ones (visibility 1) and figures may leave the frame
(visibility 0). Left limbs are drawn darker than right ones, so left and right can be told
apart, as they can on real people.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import cv2
import numpy as np

from xhrnet_tf import codec

IMAGE_W, IMAGE_H = 320, 256
LIMBS = ((5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16))


def _rot(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _limb(start, length, angle):
    """Point `length` away from `start`, `angle` radians from straight down."""
    return start + length * np.array([math.sin(angle), math.cos(angle)])


def skeleton(rng: np.random.Generator, height: float) -> np.ndarray:
    """17 joints (x, y) relative to the pelvis, front-facing: the figure's left is image right."""
    h = height
    pelvis = np.zeros(2)
    neck = pelvis + [0, -0.30 * h]
    head = neck + [0, -0.11 * h]
    j = np.zeros((17, 2))
    j[0] = head + [0, 0.015 * h]
    j[1], j[2] = head + [0.025 * h, -0.015 * h], head + [-0.025 * h, -0.015 * h]
    j[3], j[4] = head + [0.055 * h, 0], head + [-0.055 * h, 0]
    j[5], j[6] = neck + [0.11 * h, 0], neck + [-0.11 * h, 0]
    j[11], j[12] = pelvis + [0.07 * h, 0], pelvis + [-0.07 * h, 0]
    for side, sign in ((0, 1.0), (1, -1.0)):  # 0 = left (image right)
        sh, el, wr = 5 + side, 7 + side, 9 + side
        upper = sign * rng.uniform(-0.3, 2.6)
        j[el] = _limb(j[sh], 0.17 * h, upper)
        j[wr] = _limb(j[el], 0.15 * h, upper + sign * rng.uniform(0, 2.0))
        hip, knee, ankle = 11 + side, 13 + side, 15 + side
        thigh = sign * rng.uniform(-0.25, 0.9)
        j[knee] = _limb(j[hip], 0.24 * h, thigh)
        j[ankle] = _limb(j[knee], 0.23 * h, thigh - sign * rng.uniform(0, 1.4))
    return j


def _draw_figure(canvas, mask, joints, h, colors):
    """Draws one figure on `canvas` and marks its pixels in `mask`."""
    torso_c, left_c, right_c, skin = colors
    joint_c = tuple(255 - v for v in torso_c)
    pts = lambda idx: np.round(joints[list(idx)]).astype(np.int32)  # noqa: E731
    width = max(2, int(0.06 * h))
    for target, value in ((canvas, None), (mask, 255)):
        col = lambda c: c if value is None else value  # noqa: E731
        cv2.fillConvexPoly(target, pts((5, 6, 12, 11)), col(torso_c))
        for a, b in LIMBS:
            c = left_c if a % 2 == 1 else right_c
            if a in (7, 8, 13, 14):  # forearm and shin a shade lighter than the upper segment
                c = tuple(min(255, int(v * 1.25) + 25) for v in c)
            p, q = pts((a, b))
            cv2.line(target, tuple(map(int, p)), tuple(map(int, q)), col(c), width)
        for k in range(5, 17):  # a mannequin's joint discs: each joint has local evidence
            cv2.circle(target, tuple(map(int, pts((k,))[0])), max(2, int(0.04 * h)),
                       col(joint_c), -1)
        neck = np.round((joints[5] + joints[6]) / 2).astype(int)
        head = np.round((joints[3] + joints[4]) / 2).astype(int)
        cv2.line(target, tuple(map(int, neck)), tuple(map(int, head)), col(skin), width)
        cv2.circle(target, tuple(map(int, head)), max(2, int(0.065 * h)), col(skin), -1)
    dot = max(1, int(0.012 * h))
    for k, c in ((1, (20, 20, 20)), (2, (20, 20, 20)), (0, (40, 40, 200)), (3, (90, 60, 40)),
                 (4, (90, 60, 40))):
        cv2.circle(canvas, tuple(map(int, np.round(joints[k]))), dot, c, -1)


def _background(rng):
    noise = rng.normal(0, 1, (IMAGE_H // 8, IMAGE_W // 8, 3)).astype(np.float32)
    bg = cv2.resize(noise, (IMAGE_W, IMAGE_H), interpolation=cv2.INTER_CUBIC)
    bg = (bg * rng.uniform(20, 60) + rng.uniform(60, 200, 3)).clip(0, 255)
    bg += rng.normal(0, rng.uniform(2, 12), bg.shape)
    bg = bg.clip(0, 255).astype(np.uint8)
    for _ in range(rng.integers(2, 7)):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        p = tuple(int(v) for v in rng.integers(0, [IMAGE_W, IMAGE_H]))
        cv2.line(bg, p, tuple(int(v) for v in rng.integers(0, [IMAGE_W, IMAGE_H])), c,
                 int(rng.integers(1, 6)))
    return bg


def render_image(rng: np.random.Generator):
    """One image and its figures: list of (joints (17,2), full mask)."""
    img = _background(rng)
    owner = np.zeros((IMAGE_H, IMAGE_W), np.int32)  # which figure owns each pixel
    figures = []
    for pid in range(1, int(rng.integers(1, 5)) + 1):
        h = rng.uniform(70, 230)
        joints = skeleton(rng, h) @ _rot(rng.normal(0, 0.35)).T
        joints += rng.uniform([-0.1 * IMAGE_W, 0.1 * IMAGE_H], [1.1 * IMAGE_W, 1.1 * IMAGE_H])
        colors = [tuple(int(v) for v in rng.integers(30, 256, 3)) for _ in range(2)]
        left = tuple(int(v * 0.55) for v in colors[1])
        skin = tuple(int(v) for v in rng.integers(90, 240, 3))
        mask = np.zeros((IMAGE_H, IMAGE_W), np.uint8)
        _draw_figure(img, mask, joints, h, (colors[0], left, colors[1], skin))
        owner[mask > 0] = pid
        figures.append((joints, mask))
    for _ in range(rng.integers(0, 3)):  # clutter in front of the figures
        centre = tuple(int(v) for v in rng.integers(0, [IMAGE_W, IMAGE_H]))
        axes = tuple(int(v) for v in rng.integers(5, 30, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        cv2.ellipse(owner, centre, axes, 0, 0, 360, -1, -1)
    return cv2.GaussianBlur(img, (3, 3), 0.6), owner, figures


def annotate(owner, figures, image_id: int, next_ann_id: int):
    anns = []
    for pid, (joints, mask) in enumerate(figures, 1):
        ys, xs = np.nonzero(mask)
        if xs.size == 0:
            continue
        kps = np.zeros((17, 3))
        for k, (x, y) in enumerate(joints):
            xi, yi = int(round(x)), int(round(y))
            if 0 <= xi < IMAGE_W and 0 <= yi < IMAGE_H:
                kps[k] = [x, y, 2 if owner[yi, xi] == pid else 1]
        x0, y0 = float(xs.min()), float(ys.min())
        anns.append({"id": next_ann_id + len(anns), "image_id": image_id, "category_id": 1,
                     "bbox": [x0, y0, float(xs.max()) - x0 + 1, float(ys.max()) - y0 + 1],
                     "area": float(np.sum(owner == pid)), "iscrowd": 0,
                     "keypoints": [round(float(v), 2) for v in kps.reshape(-1)],
                     "num_keypoints": int(np.sum(kps[:, 2] > 0))})
    return anns


def _categories():
    return [{"id": 1, "name": "person", "supercategory": "person",
             "keypoints": list(codec.COCO_KEYPOINTS),
             "skeleton": [[a + 1, b + 1] for a, b in codec.COCO_SKELETON]}]


def generate(output: str, images: int, seed: int = 0, val_fraction: float = 0.2) -> dict:
    """Writes the data set; returns {split: annotation file path}."""
    if images < 2:
        raise ValueError(f"--images {images}: need at least 2 (one per split)")
    rng = np.random.default_rng(seed)
    num_val = max(1, int(round(images * val_fraction)))
    splits = {"train": images - num_val, "val": num_val}
    paths, image_id, ann_id = {}, 1, 1
    os.makedirs(os.path.join(output, "annotations"), exist_ok=True)
    for split, count in splits.items():
        img_dir = os.path.join(output, "images", split)
        os.makedirs(img_dir, exist_ok=True)
        coco = {"images": [], "annotations": [], "categories": _categories()}
        for _ in range(count):
            img, owner, figures = render_image(rng)
            name = f"{image_id:08d}.jpg"
            cv2.imwrite(os.path.join(img_dir, name), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            coco["images"].append({"id": image_id, "file_name": name, "width": IMAGE_W,
                                   "height": IMAGE_H})
            anns = annotate(owner, figures, image_id, ann_id)
            coco["annotations"].extend(anns)
            ann_id += len(anns)
            image_id += 1
        paths[split] = os.path.join(output, "annotations", f"person_keypoints_{split}.json")
        with open(paths[split], "w", encoding="utf-8") as f:
            json.dump(coco, f)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val_fraction", type=float, default=0.2)
    args = p.parse_args(argv)
    try:
        paths = generate(args.output, args.images, args.seed, args.val_fraction)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
