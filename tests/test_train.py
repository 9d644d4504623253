"""Training: recipe pieces, distribution, resume after kill -9, bad input, quickstart."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
import yaml

from conftest import REPO, TINY_MODEL, run_train as _run
from xhrnet_tf.config import Config, ModelConfig, config_from_dict, config_to_dict
from xhrnet_tf.recipe import WarmupStepDecay, joints_mse
from xhrnet_tf.runtime import cpu_graph_options
from xhrnet_tf.shape_layers import NearestUpsample



def test_warmup_and_step_schedule():
    s = WarmupStepDecay(2e-3, 500, 0.001, [1000, 1200])
    approx = lambda v: pytest.approx(v, rel=1e-4)  # noqa: E731  (float32 schedule)
    assert float(s(0)) == approx(2e-6)
    assert float(s(250)) == approx(2e-3 * (1 - 0.5 * 0.999))
    assert float(s(500)) == approx(2e-3)
    assert float(s(999)) == approx(2e-3)
    assert float(s(1000)) == approx(2e-4)
    assert float(s(1200)) == approx(2e-5)


def test_joints_mse_matches_definition():
    rng = np.random.default_rng(0)
    pred, gt = rng.random((2, 4, 3, 17)), rng.random((2, 4, 3, 17))
    w = rng.integers(0, 2, (2, 17)).astype(np.float64)
    ref = np.mean([np.mean(((pred[..., k] - gt[..., k]) * w[:, None, None, k]) ** 2)
                   for k in range(17)])
    assert float(tf.reduce_mean(joints_mse(pred, gt, w))) == pytest.approx(ref)


def test_grappler_is_off_only_inside_the_cpu_training_loop():
    def grappler_off():
        return tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer",
                                                                   False)
    before = grappler_off()
    with cpu_graph_options():
        assert grappler_off() == (not tf.config.list_logical_devices("GPU"))
    assert grappler_off() == before


def test_cpu_thread_pools_are_sized_before_the_first_op_and_only_warned_about_after():
    code = ("import tensorflow as tf\n"
            "from xhrnet_tf.runtime import set_cpu_threads\n"
            "print(set_cpu_threads(3, 1))\n"
            "tf.constant(1.0) + 1.0\n"  # starts the runtime: the pools are fixed from here
            "print(set_cpu_threads(3, 1), set_cpu_threads(2, 2))\n"
            "print(tf.config.threading.get_inter_op_parallelism_threads(),\n"
            "      tf.config.threading.get_intra_op_parallelism_threads())\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=300, check=True)
    assert res.stdout.split() == ["True", "True", "False", "3", "1"]
    warning = [ln for ln in res.stderr.splitlines() if "train.inter_op_threads" in ln]
    assert len(warning) == 1 and "not applied" in warning[0]


def test_nearest_upsample_matches_upsampling2d_and_its_gradient():
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 3, 5, 4)), tf.float32)
    ours, stock = NearestUpsample(4), tf_keras.layers.UpSampling2D(4)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        a, b = ours(x), stock(x)
        la, lb = tf.reduce_sum(a * a * 0.3), tf.reduce_sum(b * b * 0.3)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(tape.gradient(la, x).numpy(), tape.gradient(lb, x).numpy(),
                               rtol=1e-6)


@pytest.fixture(scope="module")
def train_only(tiny_data):
    """tiny_data's config without its validation set: these tests are about training, and
    each run's final evaluation would add ~8 s to it."""
    config, raw = tiny_data
    raw = dict(raw, data=dict(raw["data"], val_tfrecords="", val_annotations=""))
    path = os.path.join(os.path.dirname(config), "tiny_train_only.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(raw, f)
    return path, raw


@pytest.fixture(scope="module")
def five_steps(train_only, tmp_path_factory):
    """A run stopped after 5 steps, with one checkpoint: where the bad-start and NaN tests
    restart. Each test restarts a copy of it."""
    config, _ = train_only
    run = tmp_path_factory.mktemp("five") / "run"
    ok = _run(config, run, "--override=train.max_steps=5")
    assert ok.returncode == 0, ok.stderr[-2000:]
    return run


def _final_weights(model_dir, raw):
    import xhrnet_tf
    model = xhrnet_tf.build_pose_model(config_from_dict(raw))
    model.load_weights(os.path.join(model_dir, "final.weights.h5"))
    return model.get_weights()


@pytest.mark.early
def test_resume_after_kill_matches_uninterrupted_run(train_only, tmp_path):
    config, raw = train_only
    ref = _run(config, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = _run(config, tmp_path / "killed", wait=False)
    index = tmp_path / "killed" / "ckpt" / "checkpoint"
    deadline = time.time() + 600
    while not index.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final.weights.h5").exists()
    again = _run(config, tmp_path / "killed")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout
    assert tf.train.latest_checkpoint(str(tmp_path / "killed" / "ckpt")).endswith("ckpt-40")
    for a, b in zip(_final_weights(tmp_path / "ref", raw),
                    _final_weights(tmp_path / "killed", raw)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.early
def test_mirrored_strategy_on_two_cpu_devices(train_only, tmp_path):
    config, _ = train_only
    script = f"""
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import xhrnet_tf
from xhrnet_tf.config import replace
from xhrnet_tf.train import make_strategy, train
cfg = replace(xhrnet_tf.load_config({config!r}), {{"train.max_steps": 2}})
assert make_strategy().num_replicas_in_sync == 2
out = train(cfg, {str(tmp_path / 'm')!r}, mode="train")
print("STEPS", out["steps"])
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 replica(s)" in res.stdout and "STEPS 2" in res.stdout


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_mirrored_on_loopback(tiny_data, tmp_path):
    config, _ = tiny_data
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    script = """
import json, sys, numpy as np
import xhrnet_tf
from xhrnet_tf.config import replace
from xhrnet_tf.train import train
cfg = replace(xhrnet_tf.load_config(sys.argv[1]), {"train.max_steps": 2})
out = train(cfg, sys.argv[2], mode="train")
w = out["model"].get_weights()
np.savez(sys.argv[3], *w)
"""
    procs = []
    for i in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", script, config, str(tmp_path / "mw"),
             str(tmp_path / f"w{i}.npz")], env=env, cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 replica(s)" in outs[0][0]
    a, b = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert len(a.files) > 100
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    assert not any(n.startswith("worker_tmp") for n in os.listdir(tmp_path / "mw"))


def test_bad_starts_fail_with_one_line_and_keep_checkpoints(train_only, five_steps, tmp_path):
    config, raw = train_only
    res = _run(config, tmp_path / "a", "--override=train.epochz=3")
    assert res.returncode != 0 and "unknown key 'train.epochz'" in res.stderr
    res = _run(config, tmp_path / "a", "--override=data.train_tfrecords=/nope/x-*.tfrecord")
    assert "data.train_tfrecords: no TFRecord files match '/nope/x-*.tfrecord'" in res.stderr
    empty = tmp_path / "empty-00000-of-00001.tfrecord"
    tf.io.TFRecordWriter(str(empty)).close()
    res = _run(config, tmp_path / "a", f"--override=data.train_tfrecords={empty}")
    assert "hold no samples" in res.stderr
    shutil.copytree(five_steps, tmp_path / "b")
    before = sorted(os.listdir(tmp_path / "b" / "ckpt"))
    other = dict(raw, model=dict(raw["model"], num_blocks=[2, 1, 1]))
    other_cfg = tmp_path / "other.yaml"
    other_cfg.write_text(yaml.safe_dump(other))
    res = _run(str(other_cfg), tmp_path / "b", "--override=train.max_steps=10")
    assert res.returncode != 0 and "different model (model.num_blocks)" in res.stderr
    assert sorted(os.listdir(tmp_path / "b" / "ckpt")) == before


def test_nan_loss_stops_and_keeps_last_checkpoint(train_only, five_steps, tmp_path):
    config, _ = train_only
    shutil.copytree(five_steps, tmp_path / "n")
    # The copy's checkpoint index is relative, so the run restarts the copy, not the original.
    index = (tmp_path / "n" / "ckpt" / "checkpoint").read_text()
    assert 'model_checkpoint_path: "ckpt-5"' in index, index
    res = _run(config, tmp_path / "n", "--override=train.max_steps=10",
               "--override=train.learning_rate=1e30")
    assert res.returncode != 0
    assert re.search(r"loss became -?(nan|inf) at step", res.stderr.lower()), res.stderr[-500:]
    assert tf.train.latest_checkpoint(str(tmp_path / "n" / "ckpt")).endswith("ckpt-5")


@pytest.mark.early
def test_quickstart_shortened(tmp_path):
    """The quickstart flow end to end, on a small data set, model and step budget."""
    import xhrnet_tf
    from xhrnet_tf.config import replace
    from xhrnet_tf.train import train
    cfg = xhrnet_tf.load_config(os.path.join(REPO, "configs", "quickstart.yaml"))
    d = str(tmp_path / "qs")
    cfg = replace(cfg, {"data.synthetic_images": 16, "data.synthetic_dir": d,
                        "data.train_tfrecords": f"{d}/tfrecords/train-*.tfrecord",
                        "data.val_tfrecords": f"{d}/tfrecords/val-*.tfrecord",
                        "data.val_annotations": f"{d}/annotations/person_keypoints_val.json",
                        "model.num_modules": [1, 1, 1], "model.num_blocks": [1, 1, 1],
                        "train.max_steps": 3, "train.global_batch_size": 8})
    out = train(cfg, str(tmp_path / "run"))
    assert out["steps"] == 3 and 0.0 <= out["stats"]["AP"] <= 1.0
    assert os.path.getsize(out["tflite"]) > 100_000
    from xhrnet_tf.tflite_utils import interpreter  # equalised and paired: the same function
    lite = interpreter(model_path=out["tflite"])
    x = np.random.default_rng(0).normal(size=(1, 128, 96, 3)).astype(np.float32)
    lite.set_tensor(lite.get_input_details()[0]["index"], x)
    lite.invoke()
    ref = out["model"](x, training=False).numpy()
    got = lite.get_tensor(lite.get_output_details()[0]["index"])
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert os.path.exists(tmp_path / "run" / "val_results.json")
    assert os.listdir(tmp_path / "run" / "train")  # TensorBoard events


def test_mixed_precision_step_runs():
    from xhrnet_tf.train import build_training_state, make_train_step
    cfg = config_from_dict({"model": TINY_MODEL, "train": {"mixed_precision": True,
                                                           "global_batch_size": 2}})
    strategy = tf.distribute.get_strategy()
    model, opt, _, _, _ = build_training_state(cfg, strategy, 10, 1)
    assert model.get_layer("stem_conv1").compute_dtype == "bfloat16"
    step = make_train_step(cfg, strategy, model, opt)
    data = tf.data.Dataset.from_tensors((tf.random.normal((2, 64, 64, 3)), {
        "heatmaps": tf.random.uniform((2, 16, 16, 17)),
        "target_weights": tf.ones((2, 17))})).repeat()
    loss = float(step(iter(data)))
    assert np.isfinite(loss)
    assert ModelConfig  # the config dataclass stays importable alongside training code


@pytest.mark.slow
def test_training_step_runs_without_keeping_its_python_graph():
    """make_train_step's GraphFreeStep: the same losses as calling the tf.function, and no
    traced training graph left alive afterwards (SUSA's custom gradients used to pin it)."""
    import gc
    from tensorflow.python.framework.func_graph import FuncGraph
    from xhrnet_tf.train import build_training_state, make_train_step
    cfg = config_from_dict({"model": TINY_MODEL, "train": {"global_batch_size": 2}})
    strategy = tf.distribute.get_strategy()
    data = tf.data.Dataset.from_tensors((tf.random.normal((2, 64, 64, 3), seed=1), {
        "heatmaps": tf.random.uniform((2, 16, 16, 17), seed=2),
        "target_weights": tf.ones((2, 17))})).repeat()
    def traced_graphs():
        gc.collect()
        return {id(g) for g in gc.get_objects()
                if isinstance(g, FuncGraph) and g.name.startswith("train_step")}

    before = traced_graphs()
    losses = []
    for graph_free in (True, False):
        model, opt, _, _, _ = build_training_state(cfg, strategy, 10, 1)
        step = make_train_step(cfg, strategy, model, opt)
        if not graph_free:
            step = step._function  # the plain tf.function  # pylint: disable=protected-access
        it = iter(data)
        losses.append([float(step(it)) for _ in range(3)])
        if graph_free:
            assert traced_graphs() == before
    assert traced_graphs() != before  # the plain tf.function keeps its graph: the check works
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    assert losses[0][2] < losses[0][0]  # it trains


def test_training_step_is_traced_once():
    """Adam's slots exist before the first step: a tf.function that creates variables is
    traced twice, which doubled start-up time and tracing memory."""
    from xhrnet_tf.train import build_training_state, make_train_step
    cfg = config_from_dict({"model": TINY_MODEL, "train": {"global_batch_size": 2}})
    strategy = tf.distribute.get_strategy()
    model, opt, _, _, _ = build_training_state(cfg, strategy, 10, 1)
    assert all(opt.get_slot(v, "m") is not None for v in model.trainable_variables)
    function = make_train_step(cfg, strategy, model, opt)._function  # pylint: disable=protected-access
    data = tf.data.Dataset.from_tensors((tf.zeros((2, 64, 64, 3)), {
        "heatmaps": tf.zeros((2, 16, 16, 17)), "target_weights": tf.ones((2, 17))})).repeat()
    function.get_concrete_function(iter(data))
    assert function.experimental_get_tracing_count() == 1


@pytest.mark.slow
def test_xla_gradients_match_the_plain_ones(capfd):
    """jit_compile is the GPU path; on CPU it must compute the same step (and say it is slow)."""
    from xhrnet_tf.train import build_training_state, make_loss_and_grads
    raw = {"model": TINY_MODEL, "train": {"global_batch_size": 2}}
    model, opt, _, _, _ = build_training_state(config_from_dict(raw),
                                               tf.distribute.get_strategy(), 10, 1)
    rng = np.random.default_rng(3)
    images = tf.constant(rng.normal(size=(2, 64, 64, 3)), tf.float32)
    targets = {"heatmaps": tf.constant(rng.random((2, 16, 16, 17)), tf.float32),
               "target_weights": tf.ones((2, 17))}
    loss, grads = make_loss_and_grads(config_from_dict(raw), model, opt)(images, targets)
    raw["train"]["jit_compile"] = True
    xla_loss, xla_grads = make_loss_and_grads(config_from_dict(raw), model, opt)(images, targets)
    assert float(xla_loss) == pytest.approx(float(loss), rel=1e-5)
    assert len(xla_grads) == len(grads) == len(model.trainable_variables)
    for g, x, v in zip(grads, xla_grads, model.trainable_variables):
        scale = float(tf.reduce_max(tf.abs(g)))
        np.testing.assert_allclose(x.numpy(), g.numpy(), rtol=1e-3, atol=1e-4 * scale + 1e-9,
                                   err_msg=v.name)
    if not tf.config.list_logical_devices("GPU"):
        assert "train.jit_compile on a CPU" in capfd.readouterr().err


@pytest.mark.slow
def test_overfits_real_coco_sample(tmp_path):
    """X-HRNet-18 on the pose_minicoco train crops: AP >= 0.8 on the same images (flip test).

    Proves that data, model, loss, decoding and evaluation fit together. About 15-25 minutes.
    """
    from conftest import shared_path
    import xhrnet_tf
    from xhrnet_tf.config import replace
    from xhrnet_tf.data.create_tfrecords import create_tfrecords
    from xhrnet_tf.train import train
    root = shared_path("data", "pose_minicoco")
    ann = os.path.join(root, "annotations", "person_keypoints_train2017.json")
    images = os.path.join(root, "images", "train2017")
    for mode, prefix in (("train", "train"), ("val_gt", "evalset")):
        create_tfrecords(ann, images, str(tmp_path / prefix), mode=mode, workers=1, log=None)
    steps = int(os.environ.get("XHRNET_OVERFIT_STEPS", "300"))
    # The recipe of configs/minicoco_overfit.yaml, on this test's own TFRecords.
    cfg = replace(xhrnet_tf.load_config(os.path.join(REPO, "configs", "minicoco_overfit.yaml")), {
        "data.train_tfrecords": str(tmp_path / "train-*.tfrecord"),
        "data.val_tfrecords": str(tmp_path / "evalset-*.tfrecord"),
        "data.val_annotations": ann, "train.max_steps": steps})
    start = time.time()
    out = train(cfg, str(tmp_path / "run"))
    print(f"overfit: {steps} steps in {time.time() - start:.0f} s, AP {out['stats']['AP']:.4f}")
    assert out["stats"]["AP"] >= 0.8
