"""Training-mode fidelity of the blocks: batch statistics and running averages as the official
PyTorch code computes them (inference parity is in test_model.py)."""
import numpy as np
import pytest
import tf_keras

import xhrnet_tf
from conftest import randomise_weights, tiny_config
from xhrnet_tf import blocks


def _running_mean_update_ratio(model, layer_name, x):
    """How far one training call moves the BN's moving mean toward the batch mean of its
    input: 1 - momentum for one update per step."""
    bn = model.get_layer(layer_name)
    probe = tf_keras.Model(model.input, bn.input)
    batch_mean = probe(x, training=True).numpy().mean(axis=(0, 1, 2))
    before = bn.moving_mean.numpy()
    model(x, training=True)
    return (bn.moving_mean.numpy() - before) / (batch_mean - before)


@pytest.mark.parametrize("fuse_mode", ["official", "standard"])
def test_fuse_running_statistics_follow_the_official_double_evaluation(fuse_mode):
    """The official fuse runs F_i0(z_0) twice per step, so those BNs move their running
    statistics twice per step (SPEC 5.3): 1 - 0.9**2 = 0.19 of the way to the batch statistic.
    Every other BN moves once (0.1)."""
    model = xhrnet_tf.build_pose_model(tiny_config(fuse_mode=fuse_mode))
    randomise_weights(model)
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    quirk = 0.19 if fuse_mode == "official" else 0.1
    for name, expected in [("stage0_module0_fuse1_0_step0_dw_bn", quirk),
                           ("stage1_module0_fuse2_0_step1_pw_bn", quirk),
                           ("stage1_module0_fuse2_1_step0_dw_bn", 0.1),
                           ("stage0_module0_fuse0_1_pw_bn", 0.1)]:
        ratio = _running_mean_update_ratio(model, name, x)
        np.testing.assert_allclose(ratio, expected, rtol=1e-3, err_msg=name)


def test_int8_graph_is_the_same_function_with_the_same_weights():
    """`int8_graph=True` writes branch 0's fuse ReLU as relu(2z) / 2 (so the int8 converter
    fuses it into a MUL that XNNPACK takes); weights and outputs are those of the plain model."""
    cfg = tiny_config()
    plain = xhrnet_tf.build_pose_model(cfg)
    randomise_weights(plain)
    int8 = xhrnet_tf.build_pose_model(cfg, int8_graph=True)
    assert [w.name for w in int8.weights] == [w.name for w in plain.weights]
    int8.set_weights(plain.get_weights())
    assert len(int8.layers) > len(plain.layers)
    assert int8.get_layer("stage0_module0_fuse0_relu_in").scale == 2.0
    x = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(int8(x, training=False).numpy(),
                                  plain(x, training=False).numpy())
