"""PoseEstimator: image + person boxes -> keypoints, with a Keras model or a .tflite file."""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np

from xhrnet_tf import codec


class PoseEstimator:
    """Top-down keypoints for given person boxes.

    `__call__(image, boxes)` takes an RGB uint8 image (H, W, 3) and boxes (M, 4) as COCO
    (x, y, w, h), and returns (M, 17, 3): x, y in image pixels and the heatmap peak score.
    """

    def __init__(self, predict_fn, input_size: Sequence[int], flip_test: bool = True,
                 post_process: str = "default", batch_size: Optional[int] = None):
        self._predict = predict_fn
        self.input_size = (int(input_size[0]), int(input_size[1]))  # (H, W)
        self.flip_test = flip_test
        self.post_process = post_process
        self.batch_size = batch_size

    @property
    def predict_fn(self):
        """Normalised crops (N, H, W, 3) float32 -> heatmaps (N, H/4, W/4, 17)."""
        return self._predict

    @classmethod
    def from_model(cls, model, **kwargs) -> "PoseEstimator":
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        fn = tf.function(lambda x: model(x, training=False))
        h, w = model.input_shape[1:3]
        return cls(lambda x: fn(tf.constant(x)).numpy(), (h, w), **kwargs)

    @classmethod
    def from_weights(cls, config, weights: str, **kwargs) -> "PoseEstimator":
        import xhrnet_tf  # pylint: disable=import-outside-toplevel
        from xhrnet_tf.model import load_weights  # pylint: disable=import-outside-toplevel
        cfg = xhrnet_tf.load_config(config) if isinstance(config, str) else config
        model = xhrnet_tf.build_pose_model(cfg)
        load_weights(model, weights)
        return cls.from_model(model, **kwargs)

    @classmethod
    def from_tflite(cls, path: str, num_threads: int = 1, **kwargs) -> "PoseEstimator":
        # pylint: disable=import-outside-toplevel
        from xhrnet_tf.tflite_utils import dequantize_output, interpreter, quantize_input
        interp = interpreter(model_path=path, num_threads=num_threads)
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        batch, h, w = int(inp["shape"][0]), int(inp["shape"][1]), int(inp["shape"][2])

        def run(x):
            outs = []
            for i in range(0, len(x), batch):
                chunk = x[i:i + batch]
                pad = batch - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:],
                                                            chunk.dtype)])
                interp.set_tensor(inp["index"], quantize_input(chunk, inp))
                interp.invoke()
                outs.append(dequantize_output(interp.get_tensor(out["index"]), out)[:batch - pad])
            return np.concatenate(outs)

        return cls(run, (h, w), **kwargs)

    def crops(self, image: np.ndarray, boxes: np.ndarray):
        """Normalised network inputs and the centre/scale of each box."""
        h, w = self.input_size
        inputs, centers, scales = [], [], []
        for box in boxes:
            center, scale = codec.box_to_center_scale(box, aspect_ratio=w / h)
            m = codec.affine_transform_matrix(center, scale, 0.0, (w, h))
            crop = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR)
            inputs.append((crop.astype(np.float32) / 255.0 - codec.IMAGENET_MEAN)
                          / codec.IMAGENET_STD)
            centers.append(center)
            scales.append(scale)
        return np.stack(inputs).astype(np.float32), centers, scales

    def __call__(self, image: np.ndarray, boxes) -> np.ndarray:
        image = _check_image(image)
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
        if len(boxes) == 0:
            return np.zeros((0, 17, 3), np.float32)
        if not np.isfinite(boxes).all() or (boxes[:, 2:] <= 0).any():
            raise ValueError("boxes must be finite (x, y, w, h) with positive width and height")
        from xhrnet_tf.evaluate import predict_heatmaps  # pylint: disable=import-outside-toplevel
        inputs, centers, scales = self.crops(image, boxes)
        hm = predict_heatmaps(self._predict, inputs, self.flip_test, shift=True)
        coords, vals = codec.decode_heatmaps(hm, self.post_process)
        size = (hm.shape[2], hm.shape[1])
        out = [np.concatenate([codec.heatmap_to_image(coords[i], centers[i], scales[i], size),
                               vals[i]], axis=1) for i in range(len(boxes))]
        return np.stack(out).astype(np.float32)


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB (0-255), got dtype {image.dtype}")
    return image


def draw_skeletons(image: np.ndarray, keypoints: np.ndarray, threshold: float = 0.2):
    """RGB image with each person's skeleton drawn (joints below `threshold` left out)."""
    canvas = np.ascontiguousarray(image.copy())
    for person in keypoints:
        for a, b in codec.COCO_SKELETON:
            if person[a, 2] > threshold and person[b, 2] > threshold:
                cv2.line(canvas, tuple(int(v) for v in person[a, :2]),
                         tuple(int(v) for v in person[b, :2]), (255, 128, 0), 2)
        for x, y, s in person:
            if s > threshold:
                cv2.circle(canvas, (int(x), int(y)), 3, (255, 0, 0), -1)
    return canvas
