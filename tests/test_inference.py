"""PoseEstimator with Keras and TFLite back ends, and the demo CLI."""
import json

import cv2
import numpy as np
import pytest

import xhrnet_tf
from xhrnet_tf import demo
from conftest import randomise_weights, tiny_config
from xhrnet_tf.inference import PoseEstimator
from xhrnet_tf.tflite_utils import to_tflite

TINY = tiny_config()


@pytest.fixture(scope="module")
def tiny_model():
    model = xhrnet_tf.build_pose_model(TINY)
    randomise_weights(model, seed=0, scale=0.2)
    return model


def _image():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)


def test_keras_and_tflite_estimators_agree(tiny_model, tmp_path):
    boxes = [[10, 20, 50, 80], [80, 5, 60, 100]]
    keras_est = PoseEstimator.from_model(tiny_model)
    out = keras_est(_image(), boxes)
    assert out.shape == (2, 17, 3) and np.isfinite(out).all()
    path = tmp_path / "tiny.tflite"
    content = to_tflite(tiny_model)
    path.write_bytes(content)
    _assert_serving_signature(content, tiny_model)
    lite = PoseEstimator.from_tflite(str(path))(_image(), boxes)
    np.testing.assert_allclose(lite[..., 2], out[..., 2], rtol=1e-3, atol=1e-4)
    assert np.abs(lite[..., :2] - out[..., :2]).max() < 1.0
    # keypoints land inside (the padded) boxes
    for b, person in zip(boxes, out):
        assert (person[:, 0] > b[0] - b[2]).all() and (person[:, 0] < b[0] + 2 * b[2]).all()


def _assert_serving_signature(content, model):
    """Android's Interpreter.runSignature and iOS's signature runner need one: image in,
    heatmaps out, named as in the exported SavedModel."""
    from xhrnet_tf.tflite_utils import interpreter
    interp = interpreter(content)
    assert interp.get_signature_list() == {
        "serving_default": {"inputs": ["image"], "outputs": ["heatmaps"]}}
    x = np.random.default_rng(2).normal(size=(1,) + model.input_shape[1:]).astype(np.float32)
    heat = interp.get_signature_runner("serving_default")(image=x)["heatmaps"]
    np.testing.assert_allclose(heat, model(x, training=False).numpy(), rtol=1e-4, atol=1e-5)


def test_bad_image_and_boxes_are_clear_errors(tiny_model):
    est = PoseEstimator.from_model(tiny_model)
    with pytest.raises(ValueError, match="uint8"):
        est(_image().astype(np.float32), [[0, 0, 10, 10]])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        est(_image()[..., 0], [[0, 0, 10, 10]])
    with pytest.raises(ValueError, match="positive width"):
        est(_image(), [[0, 0, 0, 10]])
    assert est(_image(), []).shape == (0, 17, 3)


def test_demo_draws(tiny_model, tmp_path):
    weights = tmp_path / "tiny.weights.h5"
    tiny_model.save_weights(str(weights))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  num_modules: [1, 1, 1]\n  num_blocks: [1, 1, 1]\n"
                   "  input_size: [64, 64]\n")
    img = tmp_path / "img.png"
    cv2.imwrite(str(img), _image())
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"bbox": [10, 20, 50, 80]}]))
    out = tmp_path / "out.png"
    assert demo.main(["--image", str(img), "--boxes", str(boxes), "--weights", str(weights),
                      "--config", str(cfg), "--output", str(out)]) == 0
    drawn = cv2.imread(str(out))
    assert drawn.shape == (120, 160, 3) and not np.array_equal(drawn, cv2.imread(str(img)))
    assert demo.main(["--image", str(tmp_path / "nope.png"), "--boxes", str(boxes),
                      "--weights", str(weights), "--output", str(out)]) == 1
