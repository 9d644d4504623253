"""Training entry point: `python train_main.py --config=configs/x30.yaml`.

Training (tf.distribute, the paper's recipe, checkpoints, evaluation) is not implemented yet:
this entry point validates the config and builds the model, then stops with a clear message
instead of pretending to train.
"""
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "YAML experiment config, e.g. configs/x30.yaml.")
flags.DEFINE_string("model_dir", None, "Directory for checkpoints and logs.")
flags.mark_flag_as_required("config")


def main(argv):
    del argv
    import xhrnet_tf  # pylint: disable=import-outside-toplevel
    try:
        cfg = xhrnet_tf.load_config(FLAGS.config)
    except xhrnet_tf.ConfigError as e:
        sys.exit(f"error: {e}")
    model = xhrnet_tf.build_pose_model(cfg)
    print(f"{FLAGS.config}: model '{model.name}' built, "
          f"{model.count_params():,} parameters (incl. BN statistics).")
    sys.exit("error: training is not implemented in this version of xhrnet_tf yet; "
             "see README.md for what works today.")


if __name__ == "__main__":
    app.run(main)
