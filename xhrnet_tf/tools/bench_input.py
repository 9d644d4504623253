"""Input pipeline benchmark: augmented training samples per second at 256x192 with targets.

    python -m xhrnet_tf.tools.bench_input [--annotations A --images D] [--samples 512]

Measures, each pinned to 1 and to 2 cores in its own process:
* ours: the tf.data pipeline over TFRecord person crops (build_dataset, training=True);
* baseline: the mmpose way, per sample in Python: decode the full image with OpenCV, flip,
  half-body, scale/rotation, cv2.warpAffine, normalise, and Gaussian targets per joint; with
  2 cores it runs in 2 worker processes, as a PyTorch DataLoader would.
Without --annotations it generates the synthetic data set into a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

IMAGE_SIZE, HEATMAP_SIZE, SIGMA = (192, 256), (48, 64), 2.0


def _pin(cores: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))


def _mmpose_targets(joints, visible):
    """TopDownGenerateTarget (MSRA) as mmpose writes it: a window per joint."""
    w, h = HEATMAP_SIZE
    target = np.zeros((17, h, w), np.float32)
    weight = (visible > 0).astype(np.float32)
    r = int(SIGMA * 3)
    size = 2 * r + 1
    x = np.arange(size, dtype=np.float32)
    g = np.exp(-((x - r) ** 2 + (x[:, None] - r) ** 2) / (2 * SIGMA ** 2))
    for k in range(17):
        mu_x, mu_y = int(joints[k, 0] / 4 + 0.5), int(joints[k, 1] / 4 + 0.5)
        ul, br = (mu_x - r, mu_y - r), (mu_x + r + 1, mu_y + r + 1)
        if ul[0] >= w or ul[1] >= h or br[0] < 0 or br[1] < 0:
            weight[k] = 0
            continue
        gx, gy = (max(0, -ul[0]), min(br[0], w) - ul[0]), (max(0, -ul[1]), min(br[1], h) - ul[1])
        ix, iy = (max(0, ul[0]), min(br[0], w)), (max(0, ul[1]), min(br[1], h))
        if weight[k] > 0:
            target[k, iy[0]:iy[1], ix[0]:ix[1]] = g[gy[0]:gy[1], gx[0]:gx[1]]
    return target, weight


def baseline_sample(item, rng):
    """One augmented sample the straightforward way (see module doc)."""
    import cv2  # pylint: disable=import-outside-toplevel
    from xhrnet_tf import codec  # pylint: disable=import-outside-toplevel
    path, bbox, kps = item
    img = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    kps = np.array(kps, np.float32).reshape(17, 3)
    center, scale = codec.box_to_center_scale(bbox)
    joints, vis = kps[:, :2].copy(), kps[:, 2].copy()
    if rng.random() < 0.5:
        img = img[:, ::-1]
        joints[:, 0] = img.shape[1] - 1 - joints[:, 0]
        perm = codec.flip_permutation()
        joints, vis = joints[perm], vis[perm]
        center[0] = img.shape[1] - 1 - center[0]
    if (vis > 0).sum() > 8 and rng.random() < 0.3:
        sel = joints[vis > 0][:11] if rng.normal() < 0.5 else joints[vis > 0][11:]
        if len(sel) >= 2:
            lt, rb = sel.min(0), sel.max(0)
            center, scale = codec.box_to_center_scale((*lt, *(rb - lt)), padding=1.5)
    scale = scale * np.clip(1 + 0.25 * rng.normal(), 0.75, 1.25)
    rot = np.clip(30 * rng.normal(), -60, 60) if rng.random() < 0.6 else 0.0
    m = codec.affine_transform_matrix(center, scale, rot, IMAGE_SIZE)
    out = cv2.warpAffine(np.ascontiguousarray(img), m, IMAGE_SIZE, flags=cv2.INTER_LINEAR)
    out = (out.astype(np.float32) / 255 - codec.IMAGENET_MEAN) / codec.IMAGENET_STD
    joints = codec.apply_affine(joints, m)
    return out, _mmpose_targets(joints, vis)


def _baseline_chunk(args):
    items, seed = args
    rng = np.random.default_rng(seed)
    for item in items:
        baseline_sample(item, rng)
    return len(items)


def run_baseline(items, samples: int, cores: int) -> float:
    work = [items[i % len(items)] for i in range(samples)]
    chunks = [(work[i::cores * 4], i) for i in range(cores * 4)]
    _baseline_chunk((work[:16], 0))  # warm-up: imports and caches
    start = time.perf_counter()
    if cores == 1:
        done = sum(map(_baseline_chunk, chunks))
    else:
        with multiprocessing.get_context("fork").Pool(cores) as pool:
            done = sum(pool.map(_baseline_chunk, chunks))
    return done / (time.perf_counter() - start)


def run_ours(files, samples: int, cores: int) -> float:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import xhrnet_tf  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.config import Config  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.data.pipeline import build_dataset  # pylint: disable=import-outside-toplevel
    del xhrnet_tf
    tf.config.threading.set_inter_op_parallelism_threads(cores)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    ds = build_dataset(Config(), training=True, files=files, batch_size=32)
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    it = iter(ds.with_options(options))
    for _ in range(3):
        next(it)
    batches = max(1, samples // 32)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * 32 / (time.perf_counter() - start)


def _items(annotations, images):
    with open(annotations, encoding="utf-8") as f:
        coco = json.load(f)
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    return [(os.path.join(images, names[a["image_id"]]), a["bbox"], a["keypoints"])
            for a in coco["annotations"] if a.get("num_keypoints", 0) > 0 and not a["iscrowd"]]


def _worker(argv):
    kind, cores, samples, source = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    _pin(cores)
    if kind == "ours":
        rate = run_ours(source, samples, cores)
    else:
        rate = run_baseline(_items(*source), samples, cores)
    print(json.dumps({"rate": rate}))


def _measure(kind, cores, samples, source):
    out = subprocess.run([sys.executable, "-m", "xhrnet_tf.tools.bench_input", "--_worker",
                          kind, str(cores), str(samples), *source], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rate"]


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        _worker(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.tools.bench_input",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", help="COCO keypoints json (default: synthetic data)")
    p.add_argument("--images", help="image directory for --annotations")
    p.add_argument("--samples", type=int, default=512)
    args = p.parse_args(argv)
    from xhrnet_tf.data import synthetic  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.data.create_tfrecords import create_tfrecords  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory() as tmp:
        ann, images = args.annotations, args.images
        if not ann:
            ann = synthetic.generate(tmp, images=120, seed=0)["train"]
            images = os.path.join(tmp, "images", "train")
        files = create_tfrecords(ann, images, os.path.join(tmp, "tfr", "train"), shards=4,
                                 workers=2, log=None)["shards"]
        print(f"data: {ann} ({len(_items(ann, images))} instances), {args.samples} samples, "
              f"256x192 input, 64x48 targets, full augmentation")
        print(f"{'cores':>5} {'ours (samples/s)':>18} {'baseline (samples/s)':>21} {'ratio':>7}")
        for cores in (1, 2):
            ours = _measure("ours", cores, args.samples, files)
            base = _measure("baseline", cores, args.samples, [ann, images])
            print(f"{cores:>5} {ours:>18.1f} {base:>21.1f} {ours / base:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
