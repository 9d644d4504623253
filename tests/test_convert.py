"""Official checkpoint import: strict key matching, layouts, the CLI and the TFLite graph."""
import importlib.util

import numpy as np
import pytest
import yaml

import xhrnet_tf
from conftest import (built_pose_model, config_path, randomise_weights, shared_path,
                      tiny_config)
from xhrnet_tf.config import config_to_dict, load_config
from xhrnet_tf.convert import (CheckpointMismatchError, export_official_state_dict,
                               load_official_weights, main, read_checkpoint)
from xhrnet_tf.tflite_utils import graph_report, interpreter, to_tflite

REF = ("refs", "sxhrnet_18_coco_256x192")


_tiny = tiny_config


_random_weights = randomise_weights


def test_reference_keys_all_consumed():
    state = read_checkpoint(shared_path(*REF, "state_dict.npz"))
    cfg, model = built_pose_model("x18.yaml")
    load_official_weights(model, state, cfg)  # raises on any leftover on either side
    again = export_official_state_dict(model, cfg)
    assert set(again) == {k for k in state if not k.endswith("num_batches_tracked")}
    for key, value in again.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


@pytest.mark.parametrize("unit", ["px", "naive", "baseline"])
def test_round_trip_through_official_names(unit):
    cfg = _tiny(unit=unit)
    src = xhrnet_tf.build_pose_model(cfg)
    _random_weights(src, seed=2)
    dst = xhrnet_tf.build_pose_model(cfg)
    load_official_weights(dst, export_official_state_dict(src, cfg), cfg)
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(src(x, training=False).numpy(), dst(x, training=False).numpy())


def test_other_variant_fails_listing_names():
    bigger = _tiny(num_modules=(1, 2, 1))
    state = export_official_state_dict(xhrnet_tf.build_pose_model(bigger), bigger)
    small = _tiny()
    with pytest.raises(CheckpointMismatchError,
                       match=r"unexpected key\(s\): backbone\.stage1\.1\.fuse_layers"):
        load_official_weights(xhrnet_tf.build_pose_model(small), state, small)
    px_state = export_official_state_dict(xhrnet_tf.build_pose_model(_tiny(unit="px")),
                                          _tiny(unit="px"))
    with pytest.raises(CheckpointMismatchError, match=r"missing key\(s\):.*branch2\.0\.conv"):
        load_official_weights(xhrnet_tf.build_pose_model(small), px_state, small)


def test_backbone_only_model_takes_backbone_keys():
    cfg = _tiny()
    state = export_official_state_dict(xhrnet_tf.build_pose_model(cfg), cfg)
    backbone = xhrnet_tf.build_backbone(cfg)
    load_official_weights(backbone, state, cfg)


def test_cli_converts_reference(tmp_path):
    ckpt = shared_path(*REF, "state_dict.npz")
    out = tmp_path / "x18.weights.h5"
    assert main(["--config", config_path("x18.yaml"), "--checkpoint", ckpt,
                 "--output", str(out)]) == 0
    model = xhrnet_tf.build_pose_model(load_config(config_path("x18.yaml")))
    model.load_weights(str(out))
    io = np.load(shared_path(*REF, "io.npz"))
    pred = model(np.transpose(io["input"], (0, 2, 3, 1)), training=False).numpy()
    ref = np.transpose(io["heatmap_fp64"], (0, 2, 3, 1))
    assert np.abs(pred - ref).max() / np.abs(ref).max() < 1e-5


def test_cli_reports_mismatch(tmp_path, capsys):
    cfg = _tiny(unit="naive")
    state = export_official_state_dict(xhrnet_tf.build_pose_model(cfg), cfg)
    ckpt = tmp_path / "naive.npz"
    np.savez(ckpt, **state)
    conf = tmp_path / "sx.yaml"
    conf.write_text(yaml.safe_dump(config_to_dict(xhrnet_tf.Config(model=_tiny()))))
    assert main(["--config", str(conf), "--checkpoint", str(ckpt),
                 "--output", str(tmp_path / "o.weights.h5")]) == 1
    err = capsys.readouterr().err
    assert "missing key(s)" in err and "unexpected key(s)" in err
    assert not (tmp_path / "o.weights.h5").exists()


def test_missing_checkpoint_and_pth_without_torch(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz: checkpoint not found"):
        read_checkpoint(str(tmp_path / "nope.npz"))
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"not really")
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed; the missing-torch message cannot be observed")
    with pytest.raises(ImportError, match="pip install torch"):
        read_checkpoint(str(pth))


def test_x18_tflite_is_delegate_friendly():
    """Builtin ops only, rank <= 4, no BATCH_MATMUL, and the same numbers as the official net."""
    state = read_checkpoint(shared_path(*REF, "state_dict.npz"))
    io = np.load(shared_path(*REF, "io.npz"))
    cfg, model = built_pose_model("x18.yaml")
    load_official_weights(model, state, cfg)
    tfl = to_tflite(model, batch_size=2)
    report = graph_report(tfl)
    assert report["custom_or_flex_ops"] == []
    assert report["max_rank"] <= 4
    assert "BATCH_MATMUL" not in report["ops"]
    assert "SHAPE" not in report["ops"]  # every reshape is static
    interp = interpreter(tfl)
    interp.set_tensor(interp.get_input_details()[0]["index"],
                      np.transpose(io["input"], (0, 2, 3, 1)))
    interp.invoke()
    out = interp.get_tensor(interp.get_output_details()[0]["index"])
    ref = np.transpose(io["heatmap_fp64"], (0, 2, 3, 1))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


def test_x18_fp16_and_dynamic_keep_the_keypoints():
    """Official weights: fp16 and dynamic-range models decode within 0.5 heatmap pixel of the
    official float64 heatmaps, and XNNPACK takes the whole fp32 graph."""
    from xhrnet_tf import codec
    from xhrnet_tf.export import _hook
    from xhrnet_tf.tflite_utils import xnnpack_report
    state = read_checkpoint(shared_path(*REF, "state_dict.npz"))
    io = np.load(shared_path(*REF, "io.npz"))
    cfg, model = built_pose_model("x18.yaml")
    load_official_weights(model, state, cfg)
    x = np.transpose(io["input"], (0, 2, 3, 1))
    ref, _ = codec.decode_heatmaps(np.transpose(io["heatmap_fp64"], (0, 2, 3, 1)))
    for fmt in ("fp32", "fp16", "dynamic"):
        content = to_tflite(model, batch_size=len(x), converter_hook=_hook(fmt))
        if fmt == "fp32":
            assert xnnpack_report(content)["whole_graph"]
        interp = interpreter(content)
        interp.set_tensor(interp.get_input_details()[0]["index"], x)
        interp.invoke()
        coords, _ = codec.decode_heatmaps(
            interp.get_tensor(interp.get_output_details()[0]["index"]))
        dist = np.linalg.norm(coords - ref, axis=-1)
        assert dist.max() <= 0.5, f"{fmt}: keypoints moved up to {dist.max():.2f} hm px"
