"""X-HRNet human pose estimation for TensorFlow / tf_keras and TFLite."""
from xhrnet_tf.config import Config, ConfigError, ModelConfig, load_config
from xhrnet_tf.layers import CUSTOM_OBJECTS
from xhrnet_tf.model import build_backbone, build_pose_model

__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", "build_backbone",
           "build_pose_model", "CUSTOM_OBJECTS"]
__version__ = "0.1.0"
