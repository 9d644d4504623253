"""Custom layers against straight NumPy transcriptions of the SPEC's formulas."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from xhrnet_tf import blocks
from xhrnet_tf.layers import SUSA, tflite_graph
from xhrnet_tf.shape_layers import BilinearResize, ChannelSplit

RNG = np.random.default_rng(0)


def _susa_reference(x, direction, gw, a, b, conv_w, conv_b, gamma, beta, fusion="mul"):
    """SPEC 7.1/7.2 in float64, NHWC, one step per table row."""
    x = x.astype(np.float64)
    n, h, w, c = x.shape
    if direction == "h":
        s = (x * gw[:h, None, None]).mean(axis=1)  # (n, w, c)
        q = a * s + b
        p = np.exp(q - q.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)  # softmax over W
        t = np.einsum("nhwc,nwc->nhc", x, p)
    else:
        s = (x * gw[None, :w, None]).mean(axis=2)  # (n, h, c)
        q = a * s + b
        p = np.exp(q - q.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)  # softmax over H
        t = np.einsum("nhwc,nhc->nwc", x, p)
    u = t @ conv_w + conv_b  # conv_w[in, out]
    mu = u.mean(-1, keepdims=True)
    var = ((u - mu) ** 2).mean(-1, keepdims=True)
    gate = 1 / (1 + np.exp(-((u - mu) / np.sqrt(var + 1e-5) * gamma + beta)))
    gate = gate[:, :, None, :] if direction == "h" else gate[:, None, :, :]
    return x * gate if fusion == "mul" else x + gate


@pytest.mark.parametrize("direction", ["h", "w"])
@pytest.mark.parametrize("fusion", ["mul", "add"])
def test_susa_matches_spec(direction, fusion):
    n, h, w, c = 2, 12, 10, 6
    layer = SUSA(direction, max_length=16, fusion=fusion)
    x = RNG.normal(size=(n, h, w, c)).astype(np.float32)
    layer.build(x.shape)
    weights = [RNG.normal(size=v.shape).astype(np.float32) for v in layer.get_weights()]
    weights[-2] = np.abs(weights[-2]) + 0.5  # LayerNorm gamma
    layer.set_weights(weights)
    gw, a, b, conv_w, conv_b, gamma, beta = weights
    ref = _susa_reference(x, direction, gw, a, b, conv_w[0, 0], conv_b, gamma, beta, fusion)
    np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-5, atol=1e-5)
    with tflite_graph():  # the query as MUL + SUM instead of one depthwise conv
        np.testing.assert_allclose(layer(x).numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["h", "w"])
@pytest.mark.parametrize("fusion", ["mul", "add"])
def test_susa_hand_written_gradient_equals_autodiff(direction, fusion):
    """training=True runs SUSA's hand-derived backward (xhrnet_tf.susa_grad); inference
    calls run plain autodiff. Both must give the same gradients for x and every weight, with
    the input shorter than max_length (the unused group weights get zero gradient)."""
    n, h, w, c = 2, 12, 10, 6
    layer = SUSA(direction, max_length=16, fusion=fusion)
    x = tf.constant(RNG.normal(size=(n, h, w, c)).astype(np.float32))
    layer.build(x.shape)
    weights = [RNG.normal(size=v.shape).astype(np.float32) for v in layer.get_weights()]
    weights[3] *= 0.5  # conv kernel: keeps the gate off saturation, so gradients are large
    layer.set_weights(weights)
    dy = tf.constant(RNG.normal(size=(n, h, w, c)).astype(np.float32))

    def grads(training):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=training) * dy)
        return loss, tape.gradient(loss, [x] + layer.trainable_weights)

    loss_fused, fused = grads(True)
    loss_auto, auto = grads(None)
    assert float(loss_fused) == pytest.approx(float(loss_auto), rel=1e-6)
    for variable, a, b in zip(["x"] + [v.name for v in layer.trainable_weights], auto, fused):
        scale = float(tf.reduce_max(tf.abs(a)))
        assert scale > 0 or direction == "w" and "group" in variable, variable
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5 * max(scale, 1.0),
                                   err_msg=variable)


@pytest.mark.parametrize("direction", ["h", "w"])
def test_susa_with_unknown_spatial_size_matches_the_static_graph(direction):
    """A model built on (None, None, c) inputs takes the run-time-length path of SUSA."""
    x = RNG.normal(size=(2, 12, 10, 6)).astype(np.float32)
    layer = SUSA(direction, max_length=16)
    static = tf_keras.Model(*(lambda i: (i, layer(i)))(tf_keras.Input(x.shape[1:])))
    layer.set_weights([RNG.normal(size=v.shape).astype(np.float32) for v in layer.weights])
    dynamic = tf_keras.Model(*(lambda i: (i, layer(i)))(tf_keras.Input((None, None, 6))))
    run = tf.function(lambda t: dynamic(t), input_signature=[
        tf.TensorSpec((None, None, None, 6), tf.float32)])
    np.testing.assert_allclose(run(x).numpy(), static(x).numpy(), rtol=1e-5, atol=1e-6)
    with tflite_graph():
        lite = tf.function(lambda t: dynamic(t), input_signature=[
            tf.TensorSpec((None, None, None, 6), tf.float32)]).get_concrete_function()
    np.testing.assert_allclose(lite(x).numpy(), static(x).numpy(), rtol=1e-5, atol=1e-6)


def test_susa_rejects_input_longer_than_group_weight():
    with pytest.raises(ValueError, match="exceeds the 8 learned group weights"):
        SUSA("h", max_length=8)(tf_keras.Input((16, 4, 2)))


def test_susa_config_round_trip():
    layer = SUSA("w", max_length=50, fusion="add", name="unit_wsusa")
    clone = SUSA.from_config(layer.get_config())
    assert (clone.direction, clone.max_length, clone.fusion, clone.name) == ("w", 50, "add",
                                                                             "unit_wsusa")
    with pytest.raises(ValueError, match="direction"):
        SUSA("x")


@pytest.mark.parametrize("fusion", ["mul", "add"])
def test_susa_split_output_is_the_output_in_halves(fusion):
    x = RNG.normal(size=(2, 6, 5, 8)).astype(np.float32)
    whole = SUSA("h", max_length=8, fusion=fusion, name="s")
    halves = SUSA.from_config(dict(whole.get_config(), split_output=True))
    ref = whole(x).numpy()
    halves(x)
    halves.set_weights(whole.get_weights())
    a, b = (t.numpy() for t in halves(x))
    np.testing.assert_allclose(np.concatenate([a, b], axis=-1), ref, rtol=1e-6, atol=1e-6)
    assert SUSA.from_config(halves.get_config()).split_output
    with pytest.raises(ValueError, match="not QAT"):
        SUSA("h", split_output=True, fake_quant=True)


def test_channel_shuffle_matches_mmpose():
    x = RNG.normal(size=(2, 4, 3, 8)).astype(np.float32)
    inp = tf_keras.Input(x.shape[1:])
    model = tf_keras.Model(inp, blocks.channel_shuffle(inp, 2, "shuffle"))
    out = model(x).numpy()
    # SPEC 2.5: output channel 2p+q is input channel q*C/2+p.
    for p in range(4):
        for q in range(2):
            np.testing.assert_array_equal(out[..., 2 * p + q], x[..., q * 4 + p])


def test_channel_split():
    x = RNG.normal(size=(1, 2, 2, 6)).astype(np.float32)
    a, b = ChannelSplit([2, 4])(x)
    np.testing.assert_array_equal(a.numpy(), x[..., :2])
    np.testing.assert_array_equal(b.numpy(), x[..., 2:])
    with pytest.raises(ValueError, match="cannot split"):
        ChannelSplit([2, 2])(tf_keras.Input((2, 2, 6)))


def _resize_align_corners(x, out_h, out_w):
    n, h, w, c = x.shape
    ys = np.arange(out_h) * (h - 1) / (out_h - 1)
    xs = np.arange(out_w) * (w - 1) / (out_w - 1)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    out = np.empty((n, out_h, out_w, c))
    for i in range(n):
        img = x[i]
        top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
        bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
        out[i] = top * (1 - fy) + bottom * fy
    return out


def test_bilinear_resize_is_align_corners():
    x = RNG.normal(size=(2, 4, 3, 5)).astype(np.float32)
    ref = np.zeros((2, 8, 6, 1), np.float32)
    out = BilinearResize()([x, ref]).numpy()
    np.testing.assert_allclose(out, _resize_align_corners(x, 8, 6), rtol=1e-5, atol=1e-6)
    assert BilinearResize.from_config(BilinearResize().get_config()).align_corners


def test_stride2_conv_pads_symmetrically():
    """A 3x3 stride-2 conv must sample like PyTorch's padding=1, not TF's SAME."""
    x = RNG.normal(size=(1, 8, 8, 1)).astype(np.float32)
    inp = tf_keras.Input((8, 8, 1))
    model = tf_keras.Model(inp, blocks.conv_bn(inp, 1, 3, "c", stride=2, bn=False))
    kernel = RNG.normal(size=(3, 3, 1, 1)).astype(np.float32)
    model.get_layer("c").set_weights([kernel, np.zeros(1, np.float32)])
    padded = np.pad(x[0, :, :, 0], 1)
    ref = np.array([[np.sum(padded[2 * i:2 * i + 3, 2 * j:2 * j + 3] * kernel[:, :, 0, 0])
                     for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(model(x).numpy()[0, :, :, 0], ref, rtol=1e-5, atol=1e-5)
