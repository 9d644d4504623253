"""Evaluation: pycocotools parity, OKS-NMS, rescoring, the --results CLI."""
import contextlib
import io
import json

import numpy as np
import pytest

from conftest import shared_path
from xhrnet_tf import evaluate
from xhrnet_tf.config import EvalConfig

VAL = ("data", "pose_minicoco", "annotations", "person_keypoints_val2017.json")


def _gt_as_results(ann_file, jitter=0.0, seed=0):
    rng = np.random.default_rng(seed)
    anns = json.load(open(ann_file, encoding="utf-8"))["annotations"]
    out = []
    for a in anns:
        if a.get("iscrowd") or a["num_keypoints"] == 0:
            continue
        kps = np.array(a["keypoints"], np.float64).reshape(17, 3)
        kps[:, :2] += rng.normal(0, jitter, (17, 2))
        kps[:, 2] = 1.0
        out.append({"image_id": a["image_id"], "category_id": 1, "score": float(rng.random()),
                    "keypoints": kps.ravel().tolist()})
    return out


def test_ground_truth_scores_ap_one():
    ann = shared_path(*VAL)
    stats = evaluate.coco_keypoint_eval(ann, _gt_as_results(ann), verbose=False)
    assert stats["AP"] == pytest.approx(1.0)


def test_results_cli_equals_pycocotools(tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    ann = shared_path(*VAL)
    results = _gt_as_results(ann, jitter=4.0, seed=1)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert evaluate.main(["--annotations", ann, "--results", str(path)]) == 0
    printed = capsys.readouterr().out
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann)
        ev = COCOeval(gt, gt.loadRes(str(path)), "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = evaluate.coco_keypoint_eval(ann, str(path), verbose=False)
    assert list(ours.values()) == [float(v) for v in ev.stats]
    assert 0.3 < ours["AP"] < 1.0
    assert f"{ev.stats[0]:0.3f}" in printed and "Average Precision" in printed


def test_results_cli_errors(tmp_path, capsys):
    ann = shared_path(*VAL)
    assert evaluate.main(["--annotations", ann, "--results", str(tmp_path / "none.json")]) == 1
    assert "none.json" in capsys.readouterr().err


def test_oks_nms_removes_duplicates():
    base = np.zeros((17, 3))
    base[:, 0] = np.linspace(100, 200, 17)
    base[:, 1] = np.linspace(50, 300, 17)
    base[:, 2] = 1
    far = base.copy()
    far[:, 0] += 400
    insts = [{"kps": base, "score": 0.9, "area": 20000.0},
             {"kps": base + [1.0, 1.0, 0], "score": 0.8, "area": 20000.0},
             {"kps": far, "score": 0.7, "area": 20000.0}]
    kept = evaluate.oks_nms(insts, 0.9)
    assert [k["score"] for k in kept] == [0.9, 0.7]


def test_rescoring_uses_confident_keypoints_and_box_score():
    coords = [np.zeros((17, 2))]
    vals = [np.array([0.9] * 10 + [0.1] * 7)[:, None]]
    metas = [{"center": np.array([0.0, 0.0]), "scale": np.array([1.0, 1.0]), "score": 0.5,
              "image_id": 3}]
    res = evaluate.results_from_predictions(coords, vals, metas, EvalConfig())
    assert res[0]["score"] == pytest.approx(0.9 * 0.5)


def test_periodic_evaluation_traces_the_model_once():
    """Training evaluates every few epochs: the inference function is traced once per model
    (plus one batch-size relaxation for the last, smaller batch), not at every evaluation."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import xhrnet_tf  # pylint: disable=import-outside-toplevel
    from conftest import tiny_config  # pylint: disable=import-outside-toplevel
    model = xhrnet_tf.build_pose_model(tiny_config())
    n = 7
    meta = {"center": np.full((n, 2), 32.0, np.float32), "scale": np.ones((n, 2), np.float32),
            "score": np.ones((n,), np.float32), "image_id": np.arange(n, dtype=np.int64)}
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((n, 64, 64, 3), np.float32), meta))
    for _ in range(3):
        results = evaluate.run_model(model, ds.batch(4), EvalConfig(), (16, 16))
        assert len(results) == n
    assert evaluate._predict_fn(model).experimental_get_tracing_count() <= 2  # pylint: disable=protected-access
