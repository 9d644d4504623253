"""The paper's training recipe pieces (SPEC 13): the learning-rate schedule and the loss."""
from __future__ import annotations

import tensorflow as tf
import tf_keras


@tf_keras.saving.register_keras_serializable(package="xhrnet_tf")
class WarmupStepDecay(tf_keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from ratio*lr over `warmup` steps, then x0.1 at each boundary step."""

    def __init__(self, base_lr, warmup_steps, warmup_ratio, boundaries):
        self.base_lr, self.warmup_steps = float(base_lr), int(warmup_steps)
        self.warmup_ratio, self.boundaries = float(warmup_ratio), [int(b) for b in boundaries]

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        decays = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries] + [0.0])
        lr = self.base_lr * tf.pow(0.1, decays)
        progress = step / max(self.warmup_steps, 1)
        warm = lr * (1.0 - (1.0 - progress) * (1.0 - self.warmup_ratio))
        return tf.where(step < self.warmup_steps, warm, lr)

    def get_config(self):
        return {"base_lr": self.base_lr, "warmup_steps": self.warmup_steps,
                "warmup_ratio": self.warmup_ratio, "boundaries": self.boundaries}


def joints_mse(pred, heatmaps, weights):
    """Per-sample target-weighted joints MSE: mean over joints and pixels (no 0.5 factor)."""
    w = weights[:, None, None, :]
    return tf.reduce_mean(tf.square(pred * w - heatmaps * w), axis=[1, 2, 3])
