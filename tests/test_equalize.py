"""Channel-0 equalisation: exact rescaling, scale choice, and what it does for int8."""
import numpy as np
import pytest
import tensorflow as tf

from conftest import randomise_weights, tiny_config
from xhrnet_tf import equalize, export
from xhrnet_tf.model import build_pose_model
from xhrnet_tf.tflite_utils import interpreter, to_tflite


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    model = build_pose_model(cfg)
    randomise_weights(model)
    images = [np.random.default_rng(i).normal(size=(1, 64, 64, 3)).astype(np.float32)
              for i in range(6)]
    return cfg, model, images


def _copy(cfg, model):
    m = build_pose_model(cfg)
    m.set_weights(model.get_weights())
    return m


def test_every_listed_layer_exists_and_every_fuse_is_probed(tiny):
    cfg, model, _ = tiny
    segs = equalize.segments(cfg)
    assert [s.name for s in segs][:2] == ["stem", "transition0_branch0"]
    for seg in segs:
        for name in seg.producers + seg.readers + seg.probes:
            model.get_layer(name)  # raises on a name the builder does not use
    fuse_adds = [l.name for l in model.layers if l.name.endswith(("_fuse0_add", "_fuse1_add",
                                                                   "_fuse2_add", "_fuse3_add"))]
    assert sorted(fuse_adds) == sorted(p for s in segs for p in s.probes)


def test_rescaling_keeps_the_function(tiny):
    cfg, model, images = tiny
    x = np.concatenate(images[:2])
    ref = model(x, training=False).numpy()
    m = _copy(cfg, model)
    segs = equalize.segments(cfg)
    equalize.rescale(m, segs, {s.name: 0.3 + 2.9 * i for i, s in enumerate(segs)})
    out = m(x, training=False).numpy()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    assert any(not np.array_equal(a, b) for a, b in zip(m.get_weights(), model.get_weights()))


def test_chosen_scales_track_an_inflated_channel_and_balance_it(tiny):
    cfg, model, images = tiny
    m = _copy(cfg, model)
    segs = equalize.segments(cfg)
    before = equalize.choose_scales(m, segs, images)
    equalize.rescale(m, segs, {"transition0_branch0": 1 / 30})  # channel 0 of branch 0 x30
    after = equalize.choose_scales(m, segs, images)
    assert after["transition0_branch0"] == pytest.approx(30 * before["transition0_branch0"],
                                                         rel=1e-3)
    assert after["transition0_branch1"] == pytest.approx(before["transition0_branch1"])
    equalize.rescale(m, segs, after)
    for name, s in equalize.choose_scales(m, segs, images).items():
        assert s == pytest.approx(1.0, rel=1e-3), name


def test_scales_do_not_depend_on_the_batching(tiny):
    cfg, model, images = tiny
    segs = equalize.segments(cfg)
    one_by_one = equalize.choose_scales(model, segs, images, batch_size=1)
    batched = equalize.choose_scales(model, segs, images, batch_size=3)
    assert one_by_one.keys() == batched.keys() and len(batched) > 1
    for name, s in one_by_one.items():
        assert batched[name] == pytest.approx(s, rel=1e-5), name


def _int8_error(model, images, x):
    content = to_tflite(model, converter_hook=export.ptq_int8_hook(images, "float"))
    interp = interpreter(content)
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    out = interp.get_tensor(interp.get_output_details()[0]["index"])
    ref = model(x, training=False).numpy()
    return np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(ref ** 2))


def test_equalisation_recovers_int8_from_an_outlier_channel(tiny):
    """The failure seen on trained models, made on purpose: channel 0 of branch 0 is 50x
    larger than the rest. Plain int8 loses the other channels; the equalised copy does not."""
    cfg, model, images = tiny
    m = _copy(cfg, model)
    equalize.rescale(m, equalize.segments(cfg), {"transition0_branch0": 1 / 50})
    x = np.random.default_rng(99).normal(size=(1, 64, 64, 3)).astype(np.float32)
    plain = _int8_error(m, images, x)
    fixed, scales = export.equalized_copy(cfg, m, images)
    assert scales["transition0_branch0"] > 10
    np.testing.assert_allclose(fixed(x, training=False).numpy(), m(x, training=False).numpy(),
                               rtol=1e-4, atol=1e-5 * float(tf.reduce_max(tf.abs(m(x)))))
    assert _int8_error(fixed, images, x) < 0.5 * plain
