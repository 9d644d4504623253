"""Shared test helpers: paths to ../shared, a cache of built models, quiet TF logs."""
import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
CONFIGS = os.path.join(REPO, "configs")


def shared_path(*parts):
    """Path of a file in ../shared; skips the test, naming the file, when it is missing."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"shared file missing: {path}")
    return path


def config_path(name):
    return os.path.join(CONFIGS, name)


@functools.lru_cache(maxsize=None)
def built_pose_model(config_name, input_size=None):
    """Model builds take seconds; tests that only read a model share one instance."""
    import xhrnet_tf
    cfg = xhrnet_tf.load_config(config_path(config_name))
    return cfg, xhrnet_tf.build_pose_model(cfg, input_size=input_size)


# The smallest network with every code path: one module per stage, one unit per branch.
TINY_MODEL = {"num_modules": [1, 1, 1], "num_blocks": [1, 1, 1], "input_size": [64, 64]}


def tiny_config(**kw):
    """ModelConfig of the tiny network, with overrides."""
    from xhrnet_tf.config import ModelConfig
    base = {k: tuple(v) for k, v in TINY_MODEL.items()}
    base.update(kw)
    return ModelConfig(**base)


def randomise_weights(model, seed=1, scale=0.3):
    """Non-trivial weights (BN statistics included) so a lost weight shows in the output."""
    import numpy as np
    rng = np.random.default_rng(seed)
    for w in model.weights:
        v = rng.normal(0.0, scale, size=w.shape)
        if "moving_variance" in w.name or "gamma" in w.name:
            v = np.abs(v) + 0.5
        w.assign(v.astype(np.float32))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Synthetic images as TFRecords, and a tiny-model config file reading them."""
    import yaml
    from xhrnet_tf.config import Config, config_to_dict
    from xhrnet_tf.data import synthetic
    from xhrnet_tf.data.create_tfrecords import create_tfrecords
    root = tmp_path_factory.mktemp("tiny")
    anns = synthetic.generate(str(root / "syn"), images=12, seed=3)
    for split, mode in (("train", "train"), ("val", "val_gt")):
        create_tfrecords(anns[split], str(root / "syn" / "images" / split),
                         str(root / "tfr" / split), shards=2, mode=mode, workers=1,
                         input_size=(64, 64), log=None)
    raw = config_to_dict(Config())
    raw["model"].update(TINY_MODEL)
    raw["data"].update(train_tfrecords=str(root / "tfr" / "train-*.tfrecord"),
                       val_tfrecords=str(root / "tfr" / "val-*.tfrecord"),
                       val_annotations=anns["val"], shuffle_buffer=16, heatmap_sigma=1.0)
    raw["train"].update(global_batch_size=4, max_steps=40, checkpoint_every_steps=5,
                        deterministic=True, log_every_steps=5, warmup_steps=5)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), raw


def run_train(config, model_dir, *extra, env=None, wait=True):
    """train_main.py in a subprocess (so a test can kill it)."""
    import subprocess
    import sys
    cmd = [sys.executable, os.path.join(REPO, "train_main.py"), f"--config={config}",
           f"--model_dir={model_dir}", "--mode=train", *extra]
    env = dict(os.environ, **(env or {}))
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


# Module-scoped fixtures that take half a minute to build (a QAT model, an export, a short
# run). Under xdist each worker that runs one of their tests builds its own copy; grouping
# their tests (pytest.ini: --dist loadgroup) builds each once.
SHARED_FIXTURES = ("exported", "quantized", "calibrated", "fresh_qat", "tiny_model", "tiny",
                   "five_steps")


@pytest.hookimpl(tryfirst=True)  # xdist reads the groups in its own hook of this name
def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in item.fixturenames]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
    # xdist hands out the groups first (most tests first), then single tests in this order:
    # long ones left to the end would run alone while the other worker idles.
    items.sort(key=lambda item: item.get_closest_marker("early") is None)
