"""X-HRNet human pose estimation for TensorFlow / tf_keras and TFLite."""
import os

# The package is built on tf_keras (Keras 2): with this set before TensorFlow loads, tf.keras
# is tf_keras too (as tensorflow_model_optimization sets it as well), and TensorFlow does not
# load Keras 3 (~30 MB per process). No effect when TensorFlow was imported first.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# Names resolve on first use, so that importing a TensorFlow-free module (codec, config, the
# data converters) does not load TensorFlow: each worker of create_tfrecords' spawn pool
# imports the package, and TensorFlow took 5.6 s and 540 MB of it per worker.
_LAZY = {
    "Config": "xhrnet_tf.config", "ConfigError": "xhrnet_tf.config",
    "ModelConfig": "xhrnet_tf.config", "load_config": "xhrnet_tf.config",
    "CUSTOM_OBJECTS": "xhrnet_tf.layers", "build_backbone": "xhrnet_tf.model",
    "build_pose_model": "xhrnet_tf.model", "PoseEstimator": "xhrnet_tf.inference",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib  # pylint: disable=import-outside-toplevel
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xhrnet_tf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", "build_backbone",
           "build_pose_model", "CUSTOM_OBJECTS", "PoseEstimator"]
__version__ = "0.1.0"
