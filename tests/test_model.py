"""The network: exact sizes, parity with the official outputs, variants and save/load."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import xhrnet_tf
from conftest import (built_pose_model, config_path, randomise_weights, shared_path,
                      tiny_config)
from xhrnet_tf.config import ConfigError, ModelConfig
from xhrnet_tf.convert import load_official_weights, read_checkpoint
from xhrnet_tf.tools.complexity import complexity

REF = ("refs", "sxhrnet_18_coco_256x192")
# One xdist worker runs both x30 tests, so the (cached) 12 s build happens once.
X30_GROUP = pytest.mark.xdist_group("x30")


@pytest.mark.parametrize("name,params,backbone", [
    ("x18.yaml", 1_342_049, 1_341_352),
    pytest.param("x30.yaml", 2_117_657, 2_116_960, marks=X30_GROUP),
    pytest.param("px30.yaml", 1_781_369, 1_780_672, marks=pytest.mark.slow),  # 36 s build
    ("x18_dwonly.yaml", 885_985, 885_288),  # the latency ablation: x18 without SUSA
])
def test_parameter_counts_are_exact(name, params, backbone):
    cfg, model = built_pose_model(name)
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == params
    assert params - backbone == 17 * 40 + 17  # the 1x1 heatmap head


@pytest.mark.parametrize("name,size,paper_flops,official_conv_macs", [
    ("x18.yaml", None, 194.44, 233.93),
    pytest.param("x30.yaml", None, 300.21, 371.09, marks=X30_GROUP),
    ("x18.yaml", (384, 288), 433.16, 521.95),
    ("x30_384.yaml", None, 668.03, 827.41),
    ("x18_dwonly.yaml", None, 188.67, 228.09),
])
def test_paper_flops_and_macs(name, size, paper_flops, official_conv_macs):
    cfg, model = built_pose_model(name, size)
    res = complexity(model, cfg.model.fuse_mode)
    assert res["paper_flops_M"] == pytest.approx(paper_flops, rel=1e-3)
    assert res["official_graph_conv_macs"] / 1e6 == pytest.approx(official_conv_macs, rel=1e-4)


# io.npz name -> Keras layer whose output it is (NCHW there, NHWC here).
INTERMEDIATES = {
    "stem": "stem_shuffle_unfold",
    "stage0.in.1": "transition0_branch1_step0_pw_bn",
    "unit.branch2.0": "stage0_module0_branch0_unit0_wsusa",
    "unit.branch2.1": "stage0_module0_branch0_unit0_dw_bn",
    "unit.branch2.2": "stage0_module0_branch0_unit0_hsusa",
    "unit.out": "stage0_module0_branch0_unit0_shuffle_unfold",
    "stage0.out.0": "stage0_module1_fuse0_relu",
    "stage0.out.1": "stage0_module1_fuse1_relu",
    "stage1.out.2": "stage1_module3_fuse2_relu",
    "stage2.in.3": "transition2_branch3_step0_pw_bn",
    "stage2.out.0": "stage2_module1_fuse0_relu",
    "stage2.out.3": "stage2_module1_fuse3_relu",
    "iterative_head.out.2": "head_project1_pw_relu",
    "backbone.out": "head_project3_pw_relu",
}


def test_parity_with_official_reference():
    state = read_checkpoint(shared_path(*REF, "state_dict.npz"))
    io = np.load(shared_path(*REF, "io.npz"))
    cfg, model = built_pose_model("x18.yaml")
    load_official_weights(model, state, cfg)
    probe = tf_keras.Model(model.input, [model.get_layer(n).output for n in INTERMEDIATES.values()]
                           + [model.output])
    outs = probe(np.transpose(io["input"], (0, 2, 3, 1)), training=False)
    errors = {}
    for key, out in zip(list(INTERMEDIATES) + ["heatmap_fp64"], outs):
        ref = np.transpose(io[key], (0, 2, 3, 1)).astype(np.float64)
        errors[key] = np.abs(out.numpy() - ref).max() / np.abs(ref).max()
    bad = {k: v for k, v in errors.items() if not v <= 1e-5}
    assert not bad, f"relative error above 1e-5 at {bad}"


_tiny = tiny_config


VARIANTS = {
    "sx": _tiny(),
    "px": _tiny(unit="px"),
    "naive": _tiny(unit="naive"),
    "baseline": _tiny(unit="baseline"),
    "order_hw": _tiny(susa_order="hw"),
    "fusion_add": _tiny(fusion="add"),
    "fuse_standard": _tiny(fuse_mode="standard"),
}


_randomise = randomise_weights


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_keras_round_trip(variant, tmp_path):
    model = xhrnet_tf.build_pose_model(VARIANTS[variant])
    _randomise(model)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    before = model(x, training=False).numpy()
    assert before.shape == (2, 16, 16, 17) and np.isfinite(before).all()
    path = str(tmp_path / "m.keras")
    model.save(path)
    after = tf_keras.models.load_model(path)(x, training=False).numpy()
    np.testing.assert_array_equal(before, after)


def test_variants_differ():
    """Each ablation knob changes the computation (same weights where shapes allow)."""
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
    outs = {}
    for name in ("sx", "order_hw", "fusion_add", "fuse_standard"):
        model = xhrnet_tf.build_pose_model(VARIANTS[name])
        _randomise(model, seed=3)
        outs[name] = model(x, training=False).numpy()
    for name in ("order_hw", "fusion_add", "fuse_standard"):
        assert np.abs(outs[name] - outs["sx"]).max() > 1e-3, name


@pytest.mark.parametrize("unit", ["sx", "naive", "px"])
@pytest.mark.early
def test_paired_units_compute_the_same_function(unit, tmp_path):
    """The float exports' graph (`paired_copy`: one channel shuffle per pair of units, the
    second unit's channels permuted) computes what the trained model does; with an odd unit
    count the last unit stays single. PX units split their channels inside, so they stay
    unpaired. The paired SX model also saves and loads as a Keras model."""
    from xhrnet_tf.model import paired_copy
    cfg = tiny_config(unit=unit, num_blocks=(2, 3, 2))
    model = xhrnet_tf.build_pose_model(cfg)
    _randomise(model, seed=6)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    ref = model(x, training=False).numpy()
    for int8_graph in (False, True) if unit != "px" else (False,):
        paired = paired_copy(cfg, model, int8_graph=int8_graph)
        out = paired(x, training=False).numpy()
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), int8_graph
        pairs = sum(layer.name.endswith("_gather") for layer in paired.layers)
        assert pairs == (0 if unit == "px" else 2 + 3 * 1 + 4 * 1)  # per branch, per stage
    if unit != "sx":
        return
    path = str(tmp_path / "paired.keras")
    paired.save(path)
    np.testing.assert_array_equal(tf_keras.models.load_model(path)(x).numpy(),
                                  paired(x).numpy())


def _save_load(model, x, fmt, tmp_path):
    before = model(x, training=False).numpy()
    if fmt == "h5":
        path = str(tmp_path / "m.h5")
        model.save(path)
        out = tf_keras.models.load_model(path)(x, training=False).numpy()
        np.testing.assert_array_equal(out, before)
        return
    path = str(tmp_path / "saved")
    tf.saved_model.save(model, path)
    fn = tf.saved_model.load(path).signatures["serving_default"]
    out = list(fn(image=tf.constant(x)).values())[0].numpy()
    # A SavedModel runs as an optimised graph whose float summation order differs from eager
    # Keras: equal to float32 rounding (a lost or misplaced weight changes the output by O(1)).
    assert np.abs(out - before).max() <= 1e-5 * np.abs(before).max()


# The SavedModel case (27 s) is slow: the export tests load the exported SavedModel too.
@pytest.mark.parametrize("fmt", ["h5", pytest.param("savedmodel", marks=pytest.mark.slow)])
def test_save_load_formats(fmt, tmp_path):
    model = xhrnet_tf.build_pose_model(_tiny())
    _randomise(model, seed=5)
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
    _save_load(model, x, fmt, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["h5", "savedmodel"])
def test_x18_save_load_formats(fmt, tmp_path):
    _, model = built_pose_model("x18.yaml")
    x = np.random.default_rng(0).normal(size=(1, 256, 192, 3)).astype(np.float32)
    _save_load(model, x, fmt, tmp_path)


def test_weights_that_do_not_fit_give_one_line_errors(tmp_path):
    """Missing, non-HDF5 and other-model weights: one line naming the file and the fix."""
    from xhrnet_tf.inference import PoseEstimator
    from xhrnet_tf.model import WeightsError, load_weights
    naive = str(tmp_path / "naive.weights.h5")
    xhrnet_tf.build_pose_model(_tiny(unit="naive")).save_weights(naive)
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not HDF5")
    sx = xhrnet_tf.build_pose_model(_tiny())
    cases = {str(tmp_path / "missing.weights.h5"): "weights file not found",
             str(junk): "does not fit this config's model", naive: "does not fit"}
    for path, expected in cases.items():
        with pytest.raises(WeightsError) as info:
            load_weights(sx, path)
        message = str(info.value)
        assert path in message and expected in message and "\n" not in message, message
    with pytest.raises(WeightsError, match="same config"):
        PoseEstimator.from_weights(xhrnet_tf.Config(model=_tiny()), naive)
    # Weights of the same network still load, and change the output.
    ok = str(tmp_path / "sx.weights.h5")
    other = xhrnet_tf.build_pose_model(_tiny())
    _randomise(other, seed=4)
    other.save_weights(ok)
    load_weights(sx, ok)
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(sx(x).numpy(), other(x).numpy())


def test_backbone_outputs():
    cfg = _tiny()
    feat = xhrnet_tf.build_backbone(cfg)
    assert feat.output_shape == (None, 16, 16, 40)
    multi = xhrnet_tf.build_backbone(cfg, multiscale=True)
    # SPEC 8: the head projects each level down to the next finer level's channels.
    assert [o[1:] for o in multi.output_shape] == [(16, 16, 40), (8, 8, 40), (4, 4, 80),
                                                   (2, 2, 160)]


def test_other_input_sizes_and_too_large():
    cfg = _tiny()
    model = xhrnet_tf.build_pose_model(cfg, input_size=(96, 64))
    assert model.output_shape == (None, 24, 16, 17)
    model = xhrnet_tf.build_pose_model(cfg, input_size=(384, 288))
    assert model.output_shape == (None, 96, 72, 17)
    with pytest.raises(ConfigError, match="input 416x288 is larger than this model supports"):
        xhrnet_tf.build_pose_model(cfg, input_size=(416, 288))
    with pytest.raises(ValueError, match="multiples of 32"):
        xhrnet_tf.build_pose_model(cfg, input_size=(100, 64))


def test_layer_names_say_where_they_are():
    names = {layer.name for layer in xhrnet_tf.build_pose_model(_tiny()).layers}
    for expected in ("stem_conv1", "transition0_branch1_step0_dw",
                     "stage1_module0_branch2_unit0_hsusa", "stage2_module0_fuse3_0_step2_pw",
                     "head_project3_pw", "final_layer"):
        assert expected in names
    assert not any(n.startswith(("lambda", "tf.", "tf_op")) for n in names)


def test_default_init_follows_official():
    model = xhrnet_tf.build_pose_model(_tiny())
    kernel = model.get_layer("stage0_module0_fuse0_1_pw").get_weights()[0]
    assert 0.0005 < kernel.std() < 0.002
    susa = model.get_layer("stage0_module0_branch0_unit0_hsusa").get_weights()
    np.testing.assert_array_equal(susa[0], np.ones(96, np.float32))  # group_weight
    bn = model.get_layer("stem_conv1_bn")
    assert bn.epsilon == 1e-5 and bn.momentum == 0.9


def test_model_config_is_hashable_dataclass():
    assert dataclasses.is_dataclass(ModelConfig) and hash(_tiny()) == hash(_tiny())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["x30.yaml", "x18_384.yaml", "x30_384.yaml", "px30.yaml",
                                  "wnl18.yaml"])
def test_full_size_configs_round_trip(name, tmp_path):
    cfg = xhrnet_tf.load_config(config_path(name))
    model = xhrnet_tf.build_pose_model(cfg)
    _randomise(model, seed=7)
    h, w = cfg.model.input_size
    x = np.random.default_rng(0).normal(size=(1, h, w, 3)).astype(np.float32)
    _save_load(model, x, "h5", tmp_path)
