"""Writer -> TFRecord -> reader, augmentation definitions, bad input, synthetic data."""
import contextlib
import io
import json
import os

import cv2
import numpy as np
import pytest
import tensorflow as tf

import xhrnet_tf
from conftest import config_path, shared_path
from xhrnet_tf import codec
from xhrnet_tf.config import replace
from xhrnet_tf.data import augment, pipeline, synthetic, tfexample
from xhrnet_tf.data.create_tfrecords import ConversionError, create_tfrecords, main

NO_AUG = {"data.flip_prob": 0.0, "data.half_body_prob": 0.0, "data.scale_factor": 0.0,
          "data.rotation_prob": 0.0}


def _config(**overrides):
    cfg = xhrnet_tf.load_config(config_path("x18.yaml"))
    return replace(cfg, overrides) if overrides else cfg


def _coco_eval(ann_file, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        ev = COCOeval(gt, gt.loadRes(results), "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0]


def test_writer_reader_round_trip_scores_coco_ap(tmp_path):
    root = shared_path("data", "pose_minicoco")
    ann = os.path.join(root, "annotations", "person_keypoints_val2017.json")
    summary = create_tfrecords(ann, os.path.join(root, "images", "val2017"),
                               str(tmp_path / "val"), shards=2, mode="val_gt", workers=1,
                               log=None)
    assert summary["written"] == 40 and summary["skipped"] == {"crowd_or_no_keypoints": 25}
    cfg = _config()
    ds = pipeline.build_dataset(cfg, training=False, files=summary["shards"], batch_size=16,
                                deterministic=True)
    results = []
    for _, meta in pipeline.iterate(ds, summary["shards"]):
        coords, scores = codec.decode_heatmaps(meta["heatmaps"].numpy(), "default")
        for i in range(coords.shape[0]):
            pts = codec.heatmap_to_image(coords[i], meta["center"][i].numpy(),
                                         meta["scale"][i].numpy(), (48, 64))
            results.append({"image_id": int(meta["image_id"][i]), "category_id": 1,
                            "keypoints": np.concatenate([pts, scores[i]], 1).ravel().tolist(),
                            "score": 1.0})
    ap = _coco_eval(ann, results)
    print(f"writer -> TFRecord -> reader round-trip AP on pose_minicoco val: {ap:.4f}")
    assert len(results) == 40 and ap >= 0.95


def test_tf_affine_and_warp_match_opencv():
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (300, 260, 3)).astype(np.float32), (0, 0), 3)
    center, scale, rot = np.array([130.0, 150.0]), np.array([0.9, 1.2]), 23.0
    ref_m = codec.affine_transform_matrix(center, scale, rot, (192, 256))
    m = augment.affine_matrix_tf(tf.constant(center, tf.float32), tf.constant(scale, tf.float32),
                                 tf.constant(rot), (192, 256)).numpy()
    np.testing.assert_allclose(m[:2], ref_m, rtol=1e-5, atol=1e-3)
    ours = augment.warp(tf.constant(img), tf.constant(m), (192, 256)).numpy()
    ref = cv2.warpAffine(img, ref_m, (192, 256), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    inner = np.s_[2:-2, 2:-2]
    # cv2 quantises sampling positions to 1/32 px; on this smooth image that is < 0.5 grey level.
    assert np.abs(ours[inner] - ref[inner]).max() < 0.5


@pytest.mark.parametrize("rot,flip,scale", [(0.0, False, (0.9, 1.2)), (23.0, True, (0.9, 1.2)),
                                            (-40.0, True, (2.5, 3.3))])  # last: past the edge
def test_compiled_warp_matches_the_general_kernel(rot, flip, scale):
    rng = np.random.default_rng(1)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (300, 260, 3)), (0, 0), 3).astype(np.uint8)
    m = np.vstack([codec.affine_transform_matrix(np.array([130.0, 150.0]), np.array(scale),
                                                 rot, (192, 256)), [0, 0, 1]]).astype(np.float32)
    if flip:
        m = m @ np.array([[-1, 0, 259], [0, 1, 0], [0, 0, 1]], np.float32)
    # pylint: disable-next=protected-access
    general = augment._warp_projective(tf.constant(img), tf.constant(m), (192, 256)).numpy()
    ours = augment.warp(tf.constant(img), tf.constant(m), (192, 256)).numpy()
    assert np.abs(ours - general).max() < 0.05  # edges included: both blend with the 0 border
    ref = cv2.warpAffine(img, m[:2], (192, 256), flags=cv2.INTER_LINEAR)
    # Away from the image edge (where cv2's 1/32-px positions meet a step to 0), and for
    # uint8 output rounding, within a grey level.
    inside = cv2.erode(cv2.warpAffine(np.ones((300, 260), np.uint8), m[:2], (192, 256),
                                      flags=cv2.INTER_NEAREST), np.ones((5, 5), np.uint8)) > 0
    assert inside.sum() > 1000 and np.abs(ours - ref)[inside].max() <= 1.0


@pytest.mark.parametrize("extra_rows", [-300, 10])  # within the compiled warp's budget, beyond
def test_warp_of_wide_and_oversized_images(extra_rows):
    side = augment.canvas_size((192, 256))
    h = side + extra_rows
    img = np.random.default_rng(2).integers(0, 255, (h, side, 3)).astype(np.uint8)
    m = tf.constant([[1.0, 0.0, -3.0], [0.0, 1.0, 100.0 - h], [0.0, 0.0, 1.0]])
    out = augment.warp(tf.constant(img), m, (192, 256)).numpy()  # a shift by (-3, 100 - h)
    expected = np.zeros((256, 192, 3), np.float32)
    expected[:100] = img[h - 100:, 3:195]  # the last 100 rows, then the zero border
    np.testing.assert_allclose(out, expected, atol=1e-3)


def _dot_dataset(tmp_path, n_images=3):
    """COCO-format images of black background with one white dot per joint."""
    rng = np.random.default_rng(3)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    for i in range(1, n_images + 1):
        img = np.zeros((240, 320, 3), np.uint8)
        kps = np.zeros((17, 3))
        kps[:, 0] = rng.uniform(110, 210, 17)
        kps[:, 1] = rng.uniform(40, 200, 17)
        kps[:, 2] = 2
        for x, y, _ in kps:
            cv2.circle(img, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1)
        kps[:, :2] = np.round(kps[:, :2])
        cv2.imwrite(str(img_dir / f"{i}.png"), img)
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": 320, "height": 240})
        coco["annotations"].append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
                                    "bbox": [100, 30, 120, 180], "area": 5000.0,
                                    "num_keypoints": 17, "keypoints": kps.ravel().tolist()})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    return str(ann), str(img_dir)


def test_augmented_heatmap_peaks_sit_on_transformed_keypoints(tmp_path):
    ann, imgs = _dot_dataset(tmp_path)
    summary = create_tfrecords(ann, imgs, str(tmp_path / "dots"), workers=1, log=None)
    cfg = _config(**{"data.rotation_prob": 1.0, "data.half_body_prob": 0.0})
    ds = pipeline.build_dataset(cfg, training=True, files=summary["shards"], batch_size=4,
                                deterministic=True)
    checked = 0
    for images, target in ds.take(3):
        bright = images.numpy().mean(-1) > 1.0  # white after ImageNet normalisation
        for b in range(images.shape[0]):
            for k in np.nonzero(target["target_weights"][b].numpy())[0]:
                hm = target["heatmaps"][b, :, :, k].numpy()
                py, px = np.unravel_index(hm.argmax(), hm.shape)
                # The dot in the warped image must lie under the heatmap peak (stride 4).
                win = bright[b, max(py * 4 - 6, 0):py * 4 + 7, max(px * 4 - 6, 0):px * 4 + 7]
                assert win.any(), f"no keypoint dot under peak of joint {k}"
                checked += 1
    assert checked > 100


def test_flip_swaps_left_and_right(tmp_path):
    ann, imgs = _dot_dataset(tmp_path, n_images=1)
    files = create_tfrecords(ann, imgs, str(tmp_path / "d"), workers=1, log=None)["shards"]
    plain = _config(**NO_AUG)
    flipped = _config(**dict(NO_AUG, **{"data.flip_prob": 1.0}))
    get = lambda cfg: next(iter(pipeline.build_dataset(  # noqa: E731
        cfg, training=True, files=files, batch_size=1, deterministic=True)))
    img_a, tgt_a = get(plain)
    img_b, tgt_b = get(flipped)
    # The flipped sample is the mirror image, one pixel over (the reason for shift_heatmap).
    np.testing.assert_allclose(img_b[0, :, 1:].numpy(), img_a[0, :, ::-1][:, :-1].numpy(),
                               atol=0.05)
    perm = codec.flip_permutation()
    for k in range(17):
        ya, xa = np.unravel_index(tgt_a["heatmaps"][0, :, :, perm[k]].numpy().argmax(), (64, 48))
        yb, xb = np.unravel_index(tgt_b["heatmaps"][0, :, :, k].numpy().argmax(), (64, 48))
        assert ya == yb and abs((47 - xa) - xb) <= 1, k


def test_keypoints_moved_outside_get_zero_weight():
    joints = tf.constant([[10.0, 10.0], [-3.0, 20.0], [195.0, 30.0], [50.0, 300.0]])
    visible = tf.constant([2, 2, 2, 1], tf.int64)
    out = augment.targets(joints, visible, (192, 256), (48, 64), 2.0)
    np.testing.assert_array_equal(out["target_weights"].numpy(), [1, 0, 0, 0])
    assert not out["heatmaps"][..., 1:].numpy().any()


def test_sharding_and_determinism(tmp_path):
    ann, imgs = _dot_dataset(tmp_path, n_images=3)
    files = create_tfrecords(ann, imgs, str(tmp_path / "d"), workers=1, log=None)["shards"]
    cfg = _config()
    ids = []
    for pipe in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipe,
                                         num_replicas_in_sync=2)
        ds = pipeline.build_dataset(cfg, training=False, files=files, batch_size=2,
                                    input_context=ctx, deterministic=True)
        ids.append([int(i) for _, m in ds for i in m["image_id"]])
    assert sorted(ids[0] + ids[1]) == [1, 2, 3] and not set(ids[0]) & set(ids[1])
    runs = [next(iter(pipeline.build_dataset(cfg, training=True, files=files, batch_size=3,
                                             deterministic=True)))[0].numpy() for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


def _broken_dataset(tmp_path):
    """Synthetic images, then every kind of damage the writer must survive."""
    paths = synthetic.generate(str(tmp_path / "syn"), images=6, seed=4, val_fraction=0.2)
    ann_path = paths["train"]
    img_dir = tmp_path / "syn" / "images" / "train"
    coco = json.loads(open(ann_path, encoding="utf-8").read())
    names = [im["file_name"] for im in coco["images"]]
    data = (img_dir / names[0]).read_bytes()
    (img_dir / names[0]).write_bytes(data[: len(data) // 2])  # truncated JPEG
    (img_dir / names[1]).write_bytes(b"this is not an image")  # corrupt
    os.remove(img_dir / names[2])  # missing
    good = [a for a in coco["annotations"] if a["image_id"] == coco["images"][3]["id"]
            and a["num_keypoints"] > 0][0]
    extra = [dict(good, id=9001, image_id=777),  # unknown image
             dict(good, id=9002, bbox=[10, 10, 0, 0]),  # zero area
             dict(good, id=9003, bbox=[5000, 5000, 30, 30]),  # outside the image
             dict(good, id=9004, keypoints=[float("nan")] * 51)]  # NaN keypoints
    coco["annotations"] += extra
    with open(ann_path, "w", encoding="utf-8") as f:
        json.dump(coco, f)
    per_image = {im["id"]: 0 for im in coco["images"]}
    for a in coco["annotations"]:
        if a["image_id"] in per_image and a["num_keypoints"] > 0 and a["id"] < 9000:
            per_image[a["image_id"]] += 1
    return ann_path, str(img_dir), coco, per_image


def test_writer_skips_and_counts_bad_input(tmp_path):
    ann, imgs, coco, per_image = _broken_dataset(tmp_path)
    ids = [im["id"] for im in coco["images"]]
    summary = create_tfrecords(ann, imgs, str(tmp_path / "out"), shards=2, workers=2, log=None)
    skipped = summary["skipped"]
    assert skipped["unknown_image_id"] == 1
    assert skipped["bad_box"] == 2
    assert skipped["nan_or_malformed_keypoints"] == 1
    assert skipped["corrupt_image"] == per_image[ids[0]] + per_image[ids[1]]
    assert skipped["missing_image"] == per_image[ids[2]]
    assert summary["written"] == sum(per_image[i] for i in ids[3:])
    n = 0
    for path in summary["shards"]:  # every written record is complete and decodes
        for rec in tf.data.TFRecordDataset(path):
            ex = tfexample.decode(rec)
            assert tf.io.decode_jpeg(ex["jpeg"]).shape[-1] == 3
            n += 1
    assert n == summary["written"]


def test_detections_with_unknown_image_ids(tmp_path):
    ann, imgs = _dot_dataset(tmp_path, n_images=2)
    dets = [{"image_id": 1, "category_id": 1, "bbox": [100, 30, 120, 180], "score": 0.9},
            {"image_id": 2, "category_id": 1, "bbox": [100, 30, 120, 180], "score": 0.1},
            {"image_id": 99, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.9}]
    det_file = tmp_path / "dets.json"
    det_file.write_text(json.dumps(dets))
    summary = create_tfrecords(ann, imgs, str(tmp_path / "det"), mode="val_det",
                               detections=str(det_file), det_score_threshold=0.5, workers=1,
                               log=None)
    assert summary["written"] == 1
    assert summary["skipped"] == {"below_score_threshold": 1, "unknown_image_id": 1}


def test_existing_output_needs_overwrite(tmp_path, capsys):
    ann, imgs = _dot_dataset(tmp_path, n_images=1)
    args = ["--annotations", ann, "--images", imgs, "--output", str(tmp_path / "o"),
            "--workers", "1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err
    with pytest.raises(ConversionError, match="pass --overwrite"):
        create_tfrecords(ann, imgs, str(tmp_path / "o"), workers=1, log=None)
    assert main(args + ["--overwrite"]) == 0
    with pytest.raises(ConversionError, match="nope.json: annotations file not found"):
        create_tfrecords(str(tmp_path / "nope.json"), imgs, str(tmp_path / "p"), log=None)


def test_corrupt_tfrecord_names_the_file(tmp_path):
    ann, imgs = _dot_dataset(tmp_path, n_images=3)
    files = create_tfrecords(ann, imgs, str(tmp_path / "d"), shards=3, workers=1,
                             log=None)["shards"]
    data = bytearray(open(files[1], "rb").read())
    data[40:60] = b"\x00" * 20
    with open(files[1], "wb") as f:
        f.write(data)
    ds = pipeline.build_dataset(_config(), training=False, files=files, batch_size=1)
    with pytest.raises(pipeline.DataError, match=r"d-00001-of-00003\.tfrecord: corrupt"):
        list(pipeline.iterate(ds, files))


def test_missing_tfrecords_are_named():
    cfg = _config(**{"data.train_tfrecords": "/nonexistent/train-*.tfrecord"})
    with pytest.raises(pipeline.DataError, match=r"data.train_tfrecords: no TFRecord files"):
        pipeline.build_dataset(cfg, training=True)


def test_data_converters_do_not_load_tensorflow():
    """The converters' spawn workers import these modules; TensorFlow would cost each of them
    seconds and hundreds of MB."""
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    code = ("import sys, xhrnet_tf, xhrnet_tf.data.create_tfrecords, xhrnet_tf.data.synthetic; "
            "print(sorted(m for m in ('tensorflow', 'tf_keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_synthetic_set_is_valid_coco_and_converts(tmp_path):
    paths = synthetic.generate(str(tmp_path / "s"), images=10, seed=0)
    coco = json.loads(open(paths["train"], encoding="utf-8").read())
    anns = [a for a in coco["annotations"] if a["num_keypoints"] > 0]
    assert len(coco["images"]) == 8 and len(anns) >= 8
    vis = np.concatenate([np.array(a["keypoints"]).reshape(17, 3)[:, 2] for a in anns])
    assert (vis == 2).any() and (vis == 1).any()  # visible and occluded joints both occur
    gt_as_results = [{"image_id": a["image_id"], "category_id": 1, "score": 1.0,
                      "keypoints": a["keypoints"]} for a in anns]
    assert _coco_eval(paths["train"], gt_as_results) == pytest.approx(1.0)
    summary = create_tfrecords(paths["train"], str(tmp_path / "s" / "images" / "train"),
                               str(tmp_path / "s_tfr"), workers=1, log=None)
    assert summary["written"] == len(anns)
