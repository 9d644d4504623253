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
