"""Draw the skeletons of given people on an image.

    python -m xhrnet_tf.demo --image IMG --boxes boxes.json --weights W --config C --output out.png
    python -m xhrnet_tf.demo --image IMG --boxes boxes.json --tflite model.tflite --output out.png

boxes.json is a list of COCO boxes [x, y, w, h] (or of objects with a "bbox" key, such as a
detection results file filtered to one image).
"""
import argparse
import json
import sys

import cv2
import numpy as np

from xhrnet_tf.inference import PoseEstimator, draw_skeletons


def _boxes(path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return np.array([d["bbox"] if isinstance(d, dict) else d for d in data], np.float64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--boxes", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--weights")
    p.add_argument("--config", default="configs/x18.yaml")
    p.add_argument("--tflite")
    args = p.parse_args(argv)
    try:
        bgr = cv2.imread(args.image)
        if bgr is None:
            raise ValueError(f"{args.image}: cannot read the image")
        if args.tflite:
            est = PoseEstimator.from_tflite(args.tflite)
        elif args.weights:
            est = PoseEstimator.from_weights(args.config, args.weights)
        else:
            raise ValueError("give --weights (with --config) or --tflite")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        kps = est(rgb, _boxes(args.boxes))
        cv2.imwrite(args.output, cv2.cvtColor(draw_skeletons(rgb, kps), cv2.COLOR_RGB2BGR))
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({len(kps)} people)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
