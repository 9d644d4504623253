"""X-HRNet human pose estimation for TensorFlow / tf_keras and TFLite."""
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
