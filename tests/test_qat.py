"""Quantization-aware training: every layer handled, integer TFLite, save/restore, resume."""
import os

import numpy as np
import pytest
import tensorflow as tf
import yaml

import xhrnet_tf
import xhrnet_tf.config
from xhrnet_tf import calibration, qat
from xhrnet_tf.layers import SUSA
from xhrnet_tf.tflite_utils import (float_kernels, gpu_compatibility, graph_report, interpreter,
                                    no_delegate_resolver, to_tflite, xnnpack_report)

from conftest import randomise_weights, run_train, tiny_config


def _tiny_pose_config():
    import dataclasses
    return dataclasses.replace(xhrnet_tf.config.Config(), model=tiny_config())


@pytest.fixture(scope="module")
def quantized():
    cfg = _tiny_pose_config()
    model = xhrnet_tf.build_pose_model(cfg, int8_graph=True)  # what train.qat builds
    randomise_weights(model, seed=4, scale=0.2)
    q, rows = qat.quantize_model(model)
    return cfg, model, q, rows


def _images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 64, 64, 3)).astype(np.float32)


def test_every_layer_is_accounted_for(quantized, capsys):
    _, model, q, rows = quantized
    names = [r[0] for r in rows]
    assert len(names) == len(model.layers) - 1  # all but the input
    kinds = {r[1] for r in rows}
    assert kinds <= {"default", "custom", "passthrough"}
    susa = {l.name for l in model.layers if isinstance(l, SUSA)}
    assert susa and all(kind == "custom" for name, kind, _ in rows if name in susa)
    counts = qat.print_report(rows)
    assert "no layer stays float" in capsys.readouterr().out
    assert sum(counts.values()) == len(rows)
    # Every SUSA of the QAT model carries its internal ranges.
    inner = [l.layer for l in q.layers if isinstance(getattr(l, "layer", None), SUSA)]
    assert len(inner) == len(susa) and all(l.fake_quant for l in inner)
    assert all(any("fq_ln" in w.name for w in l.weights) for l in inner)


def test_qat_model_keeps_float_weights_and_converts_to_integer_tflite(quantized):
    _, model, q, _ = quantized
    x = _images(4)
    float_out = model(x, training=False).numpy()
    for _ in range(3):  # ranges follow the data, as in fine-tuning (BN stays in inference)
        for layer in q.layers:
            if hasattr(layer, "layer") and "bn" in layer.name:
                layer.trainable = False
        q(x, training=True)
    out = q(x, training=False).numpy()
    assert np.corrcoef(out.ravel(), float_out.ravel())[0, 1] > 0.9
    content = to_tflite(q, converter_hook=qat.int8_hook())
    assert float_kernels(content) == []
    report = graph_report(content)
    assert report["custom_or_flex_ops"] == [] and report["max_rank"] <= 4
    assert gpu_compatibility(content) == []
    # SUSA's LayerNorm is one int8 L2_NORMALIZATION, not SQUARE/MEAN/ADD/RSQRT/MUL.
    assert report["ops"]["L2_NORMALIZATION"] == len(
        [l for l in q.layers if isinstance(getattr(l, "layer", None), SUSA)])
    assert "RSQRT" not in report["ops"]
    # The fuse's ReLU fuses into a MUL (int8_graph): only SUSA's EXP/DIV/L2_NORMALIZATION
    # stay outside.
    assert set(xnnpack_report(content)["undelegated_ops"]) <= {"EXP", "DIV", "L2_NORMALIZATION"}
    interp = interpreter(content)
    interp.set_tensor(interp.get_input_details()[0]["index"], x[:1])
    interp.invoke()
    lite = interp.get_tensor(interp.get_output_details()[0]["index"])
    assert np.corrcoef(lite.ravel(), out[:1].ravel())[0, 1] > 0.98


def test_depthwise_kernels_are_quantised_per_channel():
    """tfmot gives a depthwise kernel one int8 range for all channels; the converter quantises
    the BN-folded kernel per channel. QAT must train what the .tflite runs."""
    import tf_keras
    inp = tf_keras.Input((8, 8, 4))
    x = tf_keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(inp)
    model = tf_keras.Model(inp, tf_keras.layers.BatchNormalization(name="dw_bn")(x))
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 1)).astype(np.float32)
    scale = 10.0 ** -np.arange(4, dtype=np.float32)  # 1 ... 1e-3, undone by the BN
    kernel *= scale[None, None, :, None]
    model.get_layer("dw").set_weights([kernel])
    model.get_layer("dw_bn").set_weights([1 / scale, np.zeros(4), np.zeros(4), np.ones(4)])
    q, rows = qat.quantize_model(model)
    assert dict((name, kind) for name, kind, _ in rows) == {"dw": "custom", "dw_bn": "custom"}
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
    for _ in range(3):
        q(x, training=True)
    wrapper = q.get_layer("quant_dw")
    (weight, quantizer, variables), = wrapper._weight_vars  # pylint: disable=protected-access
    assert tuple(variables["min_var"].shape) == (4,)
    fq = quantizer(weight, False, variables).numpy()
    # Within half a step of each channel's own grid; one range for all channels would round
    # the 1e-3 channel to zero.
    step = np.abs(kernel).max((0, 1, 3)) / 127
    assert np.all(np.abs(fq - kernel) <= step[None, None, :, None] * 0.5 + 1e-9)
    interp = interpreter(to_tflite(q, converter_hook=qat.int8_hook()))
    interp.set_tensor(interp.get_input_details()[0]["index"], x[:1])
    interp.invoke()
    lite = interp.get_tensor(interp.get_output_details()[0]["index"])
    keras = q(x[:1], training=False).numpy()
    for c in range(4):  # the .tflite runs the model QAT trained, channel by channel
        err = np.abs(lite[..., c] - keras[..., c]).max() / np.abs(keras[..., c]).max()
        assert err < 0.05, (c, err)


@pytest.mark.slow  # a QAT build and int8 conversion of its own (26 s) for one number
def test_input_range_starts_at_the_normalised_image_bounds():
    """tfmot starts the input range at [-6, 6] and only widens it: 2.5x the int8 step a
    normalised image needs."""
    q, _ = qat.quantize_model(xhrnet_tf.build_pose_model(_tiny_pose_config(), int8_graph=True))
    content = to_tflite(q, converter_hook=qat.int8_hook("int8"))
    scale, _ = interpreter(content).get_input_details()[0]["quantization"]
    low, high = -0.485 / 0.229, (1 - 0.406) / 0.225
    assert scale == pytest.approx((high - low) / 255, rel=1e-3)


def test_susa_trains_on_the_int8_weights_the_converter_makes():
    """SUSA's kernels are computed from several variables, so tfmot cannot quantise them;
    in QAT the layer puts each on the converter's grid itself and still passes gradients."""
    layer = SUSA("h", max_length=8, fake_quant=True)
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 8, 6, 4)).astype(np.float32))
    layer(x, training=True)
    kernel = np.random.default_rng(1).normal(size=(1, 1, 4, 4)).astype(np.float32)
    kernel[..., 3] *= 1e-3  # its own scale per output channel
    fq = layer._kernel_fq(tf.constant(kernel)).numpy()  # pylint: disable=protected-access
    step = np.abs(kernel).max(axis=(0, 1, 2)) / 127
    np.testing.assert_allclose(fq, np.round(kernel / step) * step, rtol=1e-5, atol=1e-9)
    gamma = tf.constant([0.5, -1.0, 2.0, 0.0])
    fq_gamma = layer._const_fq(gamma).numpy()  # pylint: disable=protected-access
    assert fq_gamma[3] == 0 and np.abs(fq_gamma - gamma.numpy()).max() <= 3.0 / 255 / 2 + 1e-6
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True) ** 2)
    grads = tape.gradient(loss, [layer.conv_kernel, layer.mean_kernel, layer.ln_gamma])
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)


def test_susa_takes_a_symbolic_training_flag():
    """SUSA runs without autograph for speed; a training flag that is a tensor (a symbolic
    learning phase) still works, through autograph, and in either state."""
    layer = SUSA("h", max_length=8, fake_quant=True)
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 8, 6, 4)).astype(np.float32))
    layer(x)
    step = tf.function(lambda x, t: layer(x, training=t))
    np.testing.assert_array_equal(step(x, tf.constant(False)), layer(x, training=False))
    before = [v.numpy() for v in layer.weights if "fq_" in v.name]
    step(x, tf.constant(True))  # training: the moving-average ranges move
    after = [v.numpy() for v in layer.weights if "fq_" in v.name]
    assert before and any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_susa_int8_graph_has_no_requantising_ops():
    """Every SUSA tensor's range is one its int8 kernel can write: a QUANTIZE inside means a
    range the kernel cannot keep (REDUCE_MAX must keep its input's, LOGISTIC writes 1/256),
    and a requantised query was clipped before the softmax."""
    import tf_keras
    inp = tf_keras.Input((8, 6, 16))
    y = SUSA("h", max_length=8, name="s")(tf_keras.layers.Conv2D(16, 1, name="c")(inp))
    q, _ = qat.quantize_model(tf_keras.Model(inp, y))
    x = np.random.default_rng(0).normal(size=(2, 8, 6, 16)).astype(np.float32)
    q(x, training=True)
    content = to_tflite(q, converter_hook=qat.int8_hook())
    ops = graph_report(content)["ops"]
    assert ops["QUANTIZE"] == 1 and ops["L2_NORMALIZATION"] == 1, ops  # the input's only
    assert float_kernels(content) == []


def test_qat_checkpoint_round_trip(quantized, tmp_path):
    cfg, _, q, _ = quantized
    x = _images(2, seed=1)
    q(x, training=True)
    ref = q(x, training=False).numpy()
    path = tf.train.Checkpoint(model=q).save(str(tmp_path / "ckpt"))
    fresh, _ = qat.quantize_model(xhrnet_tf.build_pose_model(cfg, int8_graph=True))
    tf.train.Checkpoint(model=fresh).restore(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(fresh(x, training=False).numpy(), ref)


def test_weights_files_say_whether_a_qat_run_saved_them(quantized, tmp_path):
    """What export reads to refuse a float/QAT mix-up before building a model."""
    from xhrnet_tf.model import saved_by_qat
    _, model, q, _ = quantized
    q.save_weights(str(tmp_path / "q.weights.h5"))
    model.save_weights(str(tmp_path / "f.weights.h5"))
    (tmp_path / "junk.weights.h5").write_bytes(b"not hdf5")
    assert saved_by_qat(str(tmp_path / "q.weights.h5")) is True
    assert saved_by_qat(str(tmp_path / "f.weights.h5")) is False
    assert saved_by_qat(str(tmp_path / "junk.weights.h5")) is None


def _calibrated_tiny_model(unit="sx"):
    """(float output, QAT model with calibrated ranges, its fake-quant error to float before
    calibration, the other variables before calibration, number of ranges set, images)."""
    import dataclasses
    import tf_keras
    from xhrnet_tf.config import Config
    cfg = dataclasses.replace(Config(), model=tiny_config(unit=unit))
    model = xhrnet_tf.build_pose_model(cfg, int8_graph=True)
    randomise_weights(model, seed=7, scale=0.2)
    x = _images(8, seed=2)
    # BN statistics of this data, as a trained model's match its data: calibration runs in
    # training mode (as QAT does), the comparison in inference mode.
    bns = [l for l in model.layers if isinstance(l, tf_keras.layers.BatchNormalization)]
    for layer in bns:
        layer.momentum = 0.0
    model(x, training=True)
    reference = model(x, training=False).numpy()
    q, _ = qat.quantize_model(model)

    before = _relative_rms(q(x, training=False).numpy(), reference)
    kept = [v.numpy() for v in q.variables if "_min" not in v.name and "_max" not in v.name]
    count = calibration.calibrate_ranges(q, [x[:4], x[4:]])
    return reference, q, before, kept, count, x


def _relative_rms(a, b):
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


@pytest.fixture(scope="module")
def calibrated():
    return _calibrated_tiny_model()


def test_calibrated_ranges_replace_tfmots_initial_ones(calibrated):
    """tfmot starts every range at [-6, 6] and moves it by 0.1% a step; calibration sets
    the data's ranges before fine-tuning, and the fake-quantised model then tracks float."""
    reference, q, before, kept, count, x = calibrated
    moving, all_values = calibration._range_variables(q)  # pylint: disable=protected-access
    assert count == len(moving) + len(all_values) > 100 and len(all_values) == 2
    values = {v.name.split(":")[0].rsplit("_", 1)[-1]: float(v.numpy()) for v in all_values}
    assert values == {"min": min(float(x.min()), 0.0), "max": max(float(x.max()), 0.0)}
    assert not any(np.any(np.abs(v.numpy()) == 6.0) for v in moving)
    # BN statistics, optimizer steps and weights are as before.
    after = [v.numpy() for v in q.variables if "_min" not in v.name and "_max" not in v.name]
    assert all(np.array_equal(a, b) for a, b in zip(kept, after))
    after = _relative_rms(q(x, training=False).numpy(), reference)
    assert after < 0.25 < before, (before, after)


def _requantizations(content):
    """(producer, consumers) of every QUANTIZE that reads an int8 tensor: a rescaling the
    Keras graph does not have unless the two ranges around it are the same ones."""
    interp = interpreter(content, experimental_op_resolver_type=no_delegate_resolver())
    dtypes = {t["index"]: t["dtype"] for t in interp.get_tensor_details()}
    ops = interp._get_ops_details()  # pylint: disable=protected-access
    producer = {int(t): op["op_name"] for op in ops for t in op["outputs"]}
    found = []
    for op in ops:
        source = int(op["inputs"][0])
        if op["op_name"] == "QUANTIZE" and dtypes[source] == np.int8:
            out = int(op["outputs"][0])
            found.append((producer[source], tuple(sorted(
                c["op_name"] for c in ops if out in [int(i) for i in c["inputs"]]))))
    return found


@pytest.mark.parametrize("unit", ["sx", pytest.param("px", marks=pytest.mark.slow)])
def test_int8_model_computes_what_fake_quant_computes(calibrated, unit):
    """With ranges fitted to the data, the converted model still runs the fake-quant model.

    The transformed half of a shuffle unit had a range of its own: the converter then
    requantised the pass-through half to it before the concat (clipping it to the other
    half's range) and the concat's output once more (relative error 0.40 on this model with
    SX units). Now the pass-through half is requantised once, to the concat's range."""
    reference, q, _, _, _, x = calibrated if unit == "sx" else _calibrated_tiny_model(unit)
    content = to_tflite(q, converter_hook=qat.int8_hook())
    assert _requantizations(content) and \
        set(_requantizations(content)) == {("SPLIT", ("CONCATENATION",))}
    interp = interpreter(content)
    errors = []
    for image in x[:4]:
        interp.set_tensor(interp.get_input_details()[0]["index"], image[None])
        interp.invoke()
        lite = interp.get_tensor(interp.get_output_details()[0]["index"])
        errors.append(_relative_rms(lite, q(image[None], training=False).numpy()))
    assert max(errors) < 0.2, errors


@pytest.mark.slow
def test_qat_run_resumes_and_exports_int8(tiny_data, tmp_path):
    _, raw = tiny_data
    qat_dir = tmp_path / "qat"
    # Float weights with trained-like magnitudes: the official N(0, 0.001) init gives
    # activations near 1e-9 deep in the net, whose int8 scales underflow in the converter.
    float_model = xhrnet_tf.build_pose_model(xhrnet_tf.config.config_from_dict(raw))
    randomise_weights(float_model, seed=5, scale=0.2)
    float_model.save_weights(str(tmp_path / "float.weights.h5"))
    raw = dict(raw, train=dict(raw["train"], qat=True, max_steps=2, checkpoint_every_steps=1,
                               init_weights=str(tmp_path / "float.weights.h5")))
    qat_cfg = tmp_path / "qat.yaml"
    qat_cfg.write_text(yaml.safe_dump(raw))
    res = run_train(str(qat_cfg), qat_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no layer stays float" in res.stdout
    assert "QAT: channel-0 equalisation scales transition0_branch0" in res.stdout
    assert "int8 ranges set from 8 training batches" in res.stdout
    lite = (qat_dir / "model_qat_int8.tflite").read_bytes()
    assert float_kernels(lite) == []
    again = run_train(str(qat_cfg), qat_dir, "--override=train.max_steps=3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and "at step 2" in again.stdout
    assert "int8 ranges set" not in again.stdout  # the checkpoint has the trained ranges
    assert tf.train.latest_checkpoint(str(qat_dir / "ckpt")).endswith("ckpt-3")
    # The export command takes the QAT run's weights for --formats qat.
    from xhrnet_tf import export
    assert export.main(["--config", str(qat_cfg), "--weights",
                        str(qat_dir / "final.weights.h5"), "--output_dir",
                        str(tmp_path / "exp"), "--formats", "qat"]) == 0
    assert float_kernels((tmp_path / "exp" / "model_qat_int8.tflite").read_bytes()) == []


def test_qat_bad_starts(tiny_data, tmp_path):
    config, raw = tiny_data
    raw = dict(raw, train=dict(raw["train"], qat=True, max_steps=1,
                               init_weights=str(tmp_path / "missing.weights.h5")))
    path = tmp_path / "qat.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = run_train(str(path), tmp_path / "run")
    assert res.returncode != 0
    assert "train.init_weights" in res.stderr and "file not found" in res.stderr
    assert not os.path.exists(tmp_path / "run" / "ckpt")
    raw["train"].update(init_weights="", mixed_precision=True)
    path.write_text(yaml.safe_dump(raw))
    res = run_train(str(path), tmp_path / "run")
    assert res.returncode != 0 and "exclude each other" in res.stderr


def test_int8_accuracy_without_ptq_scores_only_the_models_given(tiny_data, tmp_path, capsys):
    """`--ptq_variants none` (QAT runs scored alone); weights of the wrong kind and unknown
    variants fail in one line before anything is built."""
    import h5py
    from xhrnet_tf.config import config_from_dict
    from xhrnet_tf.tools import int8_accuracy
    config, raw = tiny_data
    model = xhrnet_tf.build_pose_model(config_from_dict(raw))
    randomise_weights(model, seed=6, scale=0.2)
    model.save_weights(str(tmp_path / "f.weights.h5"))
    res = int8_accuracy.compare(config_from_dict(raw), str(tmp_path / "f.weights.h5"),
                                control_weights=str(tmp_path / "f.weights.h5"), ptq_variants=())
    assert set(res) == {"float (Keras)", int8_accuracy.CONTROL}
    assert res[int8_accuracy.CONTROL]["AP"] == res["float (Keras)"]["AP"]
    with h5py.File(tmp_path / "q.weights.h5", "w") as f:  # a QAT run's layout
        f.create_group("layers/quantize_layer")
    for extra, named in ((["--weights", str(tmp_path / "q.weights.h5")], "--weights"),
                         (["--weights", str(tmp_path / "f.weights.h5"), "--qat_weights",
                           str(tmp_path / "f.weights.h5")], "--qat_weights"),
                         (["--weights", str(tmp_path / "f.weights.h5"), "--ptq_variants",
                           "plain,equalized"], "--ptq_variants")):
        assert int8_accuracy.main(["--config", config] + extra) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"error: {named} "), err


@pytest.mark.slow  # a reporting tool; 29 s of QAT and PTQ conversions
def test_int8_accuracy_tool_scores_each_variant(tiny_data, tmp_path):
    from xhrnet_tf.config import config_from_dict, replace
    from xhrnet_tf.tools import int8_accuracy
    _, raw = tiny_data
    cfg = replace(config_from_dict(raw), {"data.train_tfrecords": ""})  # calibrate: synthetic
    model = xhrnet_tf.build_pose_model(cfg)
    randomise_weights(model, seed=6, scale=0.2)
    model.save_weights(str(tmp_path / "f.weights.h5"))
    # The control is the same weights here, so it must score exactly as the float model.
    res = int8_accuracy.compare(cfg, str(tmp_path / "f.weights.h5"), calibration_samples=8,
                                control_weights=str(tmp_path / "f.weights.h5"))
    assert set(res) == {"float (Keras)", int8_accuracy.CONTROL,
                        *int8_accuracy.PTQ_LABELS.values()}
    assert res["float (Keras)"]["mean_dist_hm_px"] == 0.0
    assert res[int8_accuracy.CONTROL]["mean_dist_hm_px"] == 0.0
    assert res[int8_accuracy.CONTROL]["AP"] == res["float (Keras)"]["AP"]
    for r in res.values():
        assert 0.0 <= r["AP"] <= 1.0 and r["instances"] > 0
        assert np.isfinite(r["mean_dist_hm_px"])
