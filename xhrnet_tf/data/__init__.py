"""COCO keypoints -> TFRecord person crops -> tf.data pipelines, and synthetic data."""
