"""Heatmap codec: definitions, NumPy/TF agreement and a COCOeval round trip on real data."""
import contextlib
import io
import json

import cv2
import numpy as np
import pytest

from conftest import shared_path
from xhrnet_tf import codec

IMAGE_SIZE, HEATMAP_SIZE = (192, 256), (48, 64)  # (width, height)


def _mmpose_affine(center, scale, rot, output_size):
    """mmpose's three-point construction, as a reference for the closed form."""
    src_w = scale[0] * 200.0
    t = np.deg2rad(rot)
    src_dir = np.array([-(src_w * -0.5) * np.sin(t), (src_w * -0.5) * np.cos(t)])
    dst_dir = np.array([0.0, output_size[0] * -0.5])
    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0], src[1] = center, center + src_dir
    dst[0] = [output_size[0] * 0.5, output_size[1] * 0.5]
    dst[1] = dst[0] + dst_dir
    for pts in (src, dst):
        d = pts[0] - pts[1]
        pts[2] = pts[1] + np.array([-d[1], d[0]])
    return cv2.getAffineTransform(src, dst)


@pytest.mark.parametrize("rot", [0.0, 25.0, -47.5])
def test_affine_matches_mmpose_construction(rot):
    center, scale = np.array([320.0, 210.0]), np.array([1.1, 1.4666])
    m = codec.affine_transform_matrix(center, scale, rot, IMAGE_SIZE)
    np.testing.assert_allclose(m, _mmpose_affine(center, scale, rot, IMAGE_SIZE), atol=1e-3)
    inv = codec.affine_transform_matrix(center, scale, rot, IMAGE_SIZE, inverse=True)
    pts = np.array([[10.0, 20.0], [300.0, 150.0]])
    np.testing.assert_allclose(codec.apply_affine(codec.apply_affine(pts, m), inv), pts,
                               atol=1e-9)


def test_box_to_center_scale_fixes_aspect_and_pads():
    center, scale = codec.box_to_center_scale((100, 50, 60, 200))
    np.testing.assert_allclose(center, [130, 150])
    np.testing.assert_allclose(scale, [150 / 200 * 1.25, 200 / 200 * 1.25])
    _, wide = codec.box_to_center_scale((0, 0, 300, 100))
    np.testing.assert_allclose(wide, [300 / 200 * 1.25, 400 / 200 * 1.25])


def test_gaussian_targets_follow_msra_definition():
    joints = np.array([[100.0, 40.0], [-50.0, 10.0], [10.0, 10.0]])
    visible = np.array([2, 2, 0])
    hm, weight = codec.gaussian_heatmaps(joints, visible, HEATMAP_SIZE, IMAGE_SIZE, 2.0)
    assert hm.shape == (64, 48, 3)
    np.testing.assert_array_equal(weight, [1, 0, 0])  # outside; unlabelled
    mu_x, mu_y = int(100 / 4 + 0.5), int(40 / 4 + 0.5)
    assert hm[mu_y, mu_x, 0] == 1.0 and np.unravel_index(hm[..., 0].argmax(), (64, 48)) == (
        mu_y, mu_x)
    assert hm[mu_y, mu_x + 6, 0] == pytest.approx(np.exp(-36 / 8))
    assert hm[mu_y, mu_x + 7, 0] == 0.0  # cut at 3 sigma
    assert not hm[..., 1:].any()


def test_tf_encoder_equals_numpy():
    rng = np.random.default_rng(0)
    joints = rng.uniform(-30, 220, size=(17, 2))
    visible = rng.integers(0, 3, size=17)
    ref_hm, ref_w = codec.gaussian_heatmaps(joints, visible, HEATMAP_SIZE, IMAGE_SIZE, 2.0)
    hm, w = codec.gaussian_heatmaps_tf(joints.astype(np.float32), visible, HEATMAP_SIZE,
                                       IMAGE_SIZE, 2.0)
    np.testing.assert_allclose(hm.numpy(), ref_hm, atol=1e-6)
    np.testing.assert_array_equal(w.numpy(), ref_w)


def test_unbiased_targets_keep_the_subpixel_location():
    """DARK's unbiased encoding centres the Gaussian on joint / stride, uncut; with DARK
    decoding the round trip is exact to 0.05 heatmap px, where the rounded MSRA target loses
    up to half a pixel."""
    rng = np.random.default_rng(2)
    joints = rng.uniform(20, 170, size=(17, 2))
    visible = np.full(17, 2)
    errors = {}
    for unbiased in (False, True):
        hm, w = codec.gaussian_heatmaps(joints, visible, HEATMAP_SIZE, IMAGE_SIZE, 2.0,
                                        unbiased=unbiased)
        np.testing.assert_array_equal(w, 1)
        tf_hm, _ = codec.gaussian_heatmaps_tf(joints.astype(np.float32), visible, HEATMAP_SIZE,
                                              IMAGE_SIZE, 2.0, unbiased=unbiased)
        np.testing.assert_allclose(tf_hm.numpy(), hm, atol=1e-5)
        coords, _ = codec.decode_heatmaps(hm[None], "dark")
        errors[unbiased] = np.abs(coords[0] - joints / 4.0).max()
    assert errors[True] < 0.05 < 0.25 < errors[False] <= 0.5 + 1e-6, errors
    hm, _ = codec.gaussian_heatmaps(joints[:1], visible[:1], HEATMAP_SIZE, IMAGE_SIZE, 2.0,
                                    unbiased=True)
    assert (hm > 0).sum() > 13 * 13  # not cut to the 3-sigma window


@pytest.mark.parametrize("post", ["default", "dark", "none"])
def test_decode_recovers_subpixel_peak(post):
    x0, y0 = 20.3, 31.8
    xs, ys = np.meshgrid(np.arange(48), np.arange(64))
    hm = np.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / 8.0)[None, :, :, None]
    coords, score = codec.decode_heatmaps(hm, post)
    err = np.abs(coords[0, 0] - [x0, y0]).max()
    assert err <= {"none": 0.5, "default": 0.3, "dark": 0.05}[post]
    assert score[0, 0, 0] == pytest.approx(hm.max())


def test_flip_back_swaps_joints_and_shifts():
    rng = np.random.default_rng(1)
    hm = rng.random((1, 8, 6, 17)).astype(np.float32)
    flipped_input_maps = hm[:, :, ::-1, :][..., codec.flip_permutation()]
    back = codec.flip_back(flipped_input_maps, shift=False)
    np.testing.assert_array_equal(back, hm)
    shifted = codec.flip_back(flipped_input_maps, shift=True)
    np.testing.assert_array_equal(shifted[:, :, 1:], hm[:, :, :-1])
    np.testing.assert_array_equal(shifted[:, :, 0], hm[:, :, 0])
    assert codec.flip_permutation()[5] == 6 and codec.flip_permutation()[0] == 0


def test_codec_round_trip_scores_coco_ap():
    """GT -> crop -> heatmaps -> decode -> image -> COCOeval on real COCO val annotations."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    ann_file = shared_path("data", "pose_minicoco", "annotations",
                           "person_keypoints_val2017.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
    results = []
    for ann in gt.loadAnns(gt.getAnnIds(iscrowd=False)):
        if ann["num_keypoints"] == 0:
            continue
        kps = np.array(ann["keypoints"], np.float64).reshape(17, 3)
        center, scale = codec.box_to_center_scale(ann["bbox"])
        to_crop = codec.affine_transform_matrix(center, scale, 0.0, IMAGE_SIZE)
        hm, _ = codec.gaussian_heatmaps(codec.apply_affine(kps[:, :2], to_crop), kps[:, 2],
                                        HEATMAP_SIZE, IMAGE_SIZE, 2.0)
        coords, scores = codec.decode_heatmaps(hm[None], "default")
        pts = codec.heatmap_to_image(coords[0], center, scale, HEATMAP_SIZE)
        kp = np.concatenate([pts, scores[0]], axis=1)
        results.append({"image_id": ann["image_id"], "category_id": 1,
                        "keypoints": kp.reshape(-1).tolist(), "score": 1.0})
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(json.loads(json.dumps(results)))
        ev = COCOeval(gt, dt, "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap = ev.stats[0]
    print(f"codec round-trip keypoint AP on pose_minicoco val: {ap:.4f}")
    assert ap >= 0.95
