"""X-HRNet human pose estimation for TensorFlow / tf_keras and TFLite."""
import os

# The package is built on tf_keras (Keras 2): with this set before TensorFlow loads, tf.keras
# is tf_keras too (as tensorflow_model_optimization sets it as well), and TensorFlow does not
# load Keras 3 (~30 MB per process). No effect when TensorFlow was imported first.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# pylint: disable=wrong-import-position
from xhrnet_tf.config import Config, ConfigError, ModelConfig, load_config
from xhrnet_tf.layers import CUSTOM_OBJECTS
from xhrnet_tf.model import build_backbone, build_pose_model


def __getattr__(name):
    # PoseEstimator pulls in OpenCV; import it on first use only.
    if name == "PoseEstimator":
        from xhrnet_tf.inference import PoseEstimator  # pylint: disable=import-outside-toplevel
        return PoseEstimator
    raise AttributeError(f"module 'xhrnet_tf' has no attribute {name!r}")

__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", "build_backbone",
           "build_pose_model", "CUSTOM_OBJECTS", "PoseEstimator"]
__version__ = "0.1.0"
