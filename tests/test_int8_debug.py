"""int8_debug: finds the op whose int8 range drowns its values, and measures what it says."""
import numpy as np
import pytest
import tf_keras

from xhrnet_tf import export
from xhrnet_tf.tflite_utils import to_tflite
from xhrnet_tf.tools import int8_debug


def _three_convs(outlier: float):
    """conv a -> relu -> conv b -> conv c; b's channel 0 is `outlier` times its others and c
    reads it `outlier` times weaker, so the float function does not depend on `outlier`."""
    x = inp = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Conv2D(8, 1, activation="relu", name="a")(x)
    x = tf_keras.layers.Conv2D(8, 1, name="b")(x)
    x = tf_keras.layers.Conv2D(4, 1, name="c")(x)
    model = tf_keras.Model(inp, x)
    rng = np.random.default_rng(0)
    for layer in model.layers[1:]:
        kernel, bias = layer.get_weights()
        layer.set_weights([rng.normal(size=kernel.shape).astype(np.float32), bias])
    kb, bb = model.get_layer("b").get_weights()
    kc, bc = model.get_layer("c").get_weights()
    kb[..., 0] *= outlier
    kc[:, :, 0, :] /= outlier
    model.get_layer("b").set_weights([kb, bb])
    model.get_layer("c").set_weights([kc, bc])
    return model


def _compare(model):
    images = [np.random.default_rng(i).normal(size=(1, 8, 8, 3)).astype(np.float32)
              for i in range(12)]
    float_content = to_tflite(model)
    int8_content = to_tflite(model, converter_hook=export.ptq_int8_hook(images[:8], "float"))
    rows = int8_debug.compare_graphs(float_content, int8_content, images[8:])
    return rows, float_content, int8_content, images[8:]


def test_the_outlier_conv_adds_the_error_and_shows_few_levels():
    rows, float_content, int8_content, check = _compare(_three_convs(outlier=1000.0))
    by_layer = {r.name.split("/")[1]: r for r in rows[:-1]}
    assert {"a", "b"} <= set(by_layer), [r.name for r in rows]
    worst = max(rows, key=lambda r: r.added)
    assert worst.name.split("/")[1] == "b"
    assert by_layer["b"].levels < 4 < by_layer["a"].levels
    # The last row is the model's output (matched by place: the two graphs name it apart).
    ref = export.tflite_heatmaps(float_content, check)
    out = export.tflite_heatmaps(int8_content, check)
    norms = [np.linalg.norm(ref[..., k]) for k in range(ref.shape[-1])]
    expected = np.mean([np.linalg.norm(out[..., k] - ref[..., k]) / max(n, 0.05 * np.median(norms))
                        for k, n in enumerate(norms)])
    assert rows[-1].error == pytest.approx(expected, rel=1e-4)
    assert "| " + str(worst.op_index) + " |" in int8_debug.report(rows, top=3)


def test_without_the_outlier_no_op_adds_much():
    rows, *_ = _compare(_three_convs(outlier=1.0))
    assert max(r.added for r in rows) < 0.05, [(r.name, r.added) for r in rows]
    assert min(r.levels for r in rows) > 4


def test_missing_weights_is_one_line(tmp_path, capsys):
    missing = tmp_path / "none.weights.h5"
    assert int8_debug.main(["--config", "configs/quickstart.yaml",
                            "--weights", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(missing) in err


def test_qat_mode_compares_int8_with_the_fake_quant_graph():
    """Against its own fake-quant graph the int8 model of a QAT model agrees op by op, even
    where it drifts far from float (the outlier conv): what is left is rounding that training
    did not simulate."""
    import tensorflow_model_optimization as tfmot
    from xhrnet_tf import calibration
    model = _three_convs(outlier=1000.0)
    q = tfmot.quantization.keras.quantize_model(model)
    images = [np.random.default_rng(i).normal(size=(1, 8, 8, 3)).astype(np.float32)
              for i in range(12)]
    calibration.calibrate_ranges(q, images[:8])
    fake_quant, int8_content = int8_debug.qat_pair(q)
    rows = int8_debug.compare_graphs(fake_quant, int8_content, images[8:])
    assert len(rows) >= 3 and max(r.added for r in rows) < 0.02, [(r.name, r.added) for r in rows]
    # The same int8 graph against the float model: the outlier conv's error shows.
    against_float = int8_debug.compare_graphs(to_tflite(model), int8_content, images[8:])
    assert max(r.error for r in against_float) > 10 * max(r.error for r in rows)
    assert "matched to fake-quant ones" in int8_debug.report(rows, 3, "fake-quant")


def test_check_samples_below_one_is_one_line(tmp_path, capsys):
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"")
    assert int8_debug.main(["--config", "configs/quickstart_qat.yaml", "--weights",
                            str(weights), "--check_samples", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--check_samples 0" in err


@pytest.mark.parametrize("extra", [["--no_equalize"], ["--calibration_samples", "50"]])
def test_ptq_options_with_a_qat_config_are_one_line(tmp_path, capsys, extra):
    """A QAT config's int8 ranges come from its run: PTQ's options would be ignored, so they
    are refused before any model is built."""
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"")
    assert int8_debug.main(["--config", "configs/quickstart_qat.yaml", "--weights",
                            str(weights)] + extra) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and extra[0] in err and "quickstart_qat.yaml" in err


@pytest.mark.slow
def test_cli_with_a_qat_config(tiny_data, tmp_path, capsys):
    """A QAT config: its run's weights are compared against their own fake-quant graph, and
    float weights get a one-line error."""
    import yaml
    import xhrnet_tf
    from xhrnet_tf import train
    from conftest import randomise_weights
    _, raw = tiny_data
    raw = dict(raw, train=dict(raw["train"], qat=True))
    config = tmp_path / "qat.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = xhrnet_tf.load_config(str(config))
    qat_model = train.build_model(cfg, init=False)
    qat_model.save_weights(str(tmp_path / "qat.weights.h5"))
    float_model = xhrnet_tf.build_pose_model(cfg)
    randomise_weights(float_model, seed=2, scale=0.2)
    float_model.save_weights(str(tmp_path / "float.weights.h5"))
    assert int8_debug.main(["--config", str(config),
                            "--weights", str(tmp_path / "float.weights.h5")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "float.weights.h5" in err and "QAT" in err
    assert int8_debug.main(["--config", str(config), "--weights",
                            str(tmp_path / "qat.weights.h5"), "--check_samples", "2",
                            "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "matched to fake-quant ones" in out and "(the model's output)" in out
