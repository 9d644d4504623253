"""Train, evaluate, or both:

    python train_main.py --config=configs/x30.yaml --model_dir=runs/x30 [--mode=train_and_eval]
        [--override train.global_batch_size=256 --override train.mixed_precision=true]

Restarting the same command resumes from the last checkpoint in --model_dir. With TF_CONFIG
set it trains across machines (MultiWorkerMirroredStrategy); otherwise on all local devices.
"""
import sys

import yaml
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "YAML experiment config, e.g. configs/x30.yaml.")
flags.DEFINE_string("model_dir", None, "Checkpoints, TensorBoard logs, results "
                    "(default: runs/<config name>).")
flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"],
                  "train_and_eval evaluates periodically and at the end.")
flags.DEFINE_multi_string("override", [], "section.key=value, type-checked against the config.")
flags.mark_flag_as_required("config")


def _overrides(items):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--override {item!r}: expected section.key=value")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads "1e30" as a string; users mean a number
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def main(argv):
    del argv
    import os  # pylint: disable=import-outside-toplevel
    import xhrnet_tf  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.config import replace  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.train import TrainingError, train  # pylint: disable=import-outside-toplevel
    try:
        cfg = xhrnet_tf.load_config(FLAGS.config)
        cfg = replace(cfg, _overrides(FLAGS.override), "--override") if FLAGS.override else cfg
        model_dir = FLAGS.model_dir or os.path.join(
            "runs", os.path.splitext(os.path.basename(FLAGS.config))[0])
        train(cfg, model_dir, FLAGS.config, FLAGS.mode)
    except (ValueError, TrainingError, FileNotFoundError) as e:  # ConfigError, DataError too
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
