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
