"""Training and periodic evaluation with tf.distribute, by the paper's recipe (SPEC 13)."""
from __future__ import annotations

import math
import os
import shutil
import sys
import time

import tensorflow as tf
import tf_keras
import yaml
from tensorflow.python.eager import context

from xhrnet_tf.model import WeightsError, build_pose_model, load_weights
from xhrnet_tf.config import Config, config_to_dict
from xhrnet_tf.data import pipeline
from xhrnet_tf.graph_free import GraphFreeStep
from xhrnet_tf.recipe import WarmupStepDecay, joints_mse
from xhrnet_tf.runtime import cpu_graph_options, set_cpu_threads
from xhrnet_tf.train_eval import periodic_eval, val_available


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


def make_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored when TF_CONFIG describes a cluster, else Mirrored (local devices)."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy()


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)


def prepare_data(cfg: Config) -> None:
    """Generates the synthetic data set and its TFRecords when the config asks for it."""
    d = cfg.data
    if d.synthetic_images <= 0 or tf.io.gfile.glob(d.train_tfrecords or "/nonexistent"):
        return
    from xhrnet_tf.data import synthetic  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.data.create_tfrecords import create_tfrecords  # pylint: disable=import-outside-toplevel
    print(f"generating {d.synthetic_images} synthetic images in {d.synthetic_dir} ...")
    anns = synthetic.generate(d.synthetic_dir, d.synthetic_images, seed=cfg.train.seed)
    for split, mode in (("train", "train"), ("val", "val_gt")):
        create_tfrecords(anns[split], os.path.join(d.synthetic_dir, "images", split),
                         os.path.join(d.synthetic_dir, "tfrecords", split), shards=2,
                         mode=mode, overwrite=True, input_size=cfg.model.input_size, log=None)
    if not tf.io.gfile.glob(d.train_tfrecords):
        raise TrainingError(f"data.train_tfrecords {d.train_tfrecords!r} does not match the "
                            f"generated shards in {d.synthetic_dir}/tfrecords")


def check_model_dir(cfg: Config, model_dir: str, write: bool) -> None:
    """Refuses to resume a model_dir trained with a different architecture."""
    path = os.path.join(model_dir, "config.yaml")
    current = config_to_dict(cfg)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = yaml.safe_load(f) or {}
        diff = sorted(k for k, v in current["model"].items() if saved.get("model", {}).get(k) != v)
        if diff:
            raise TrainingError(f"{path}: the checkpoints in {model_dir} were trained with a "
                                f"different model (model.{', model.'.join(diff)}); use another "
                                "--model_dir or the original config")
    if write:  # atomically: other workers may be reading it at this moment
        os.makedirs(model_dir, exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            yaml.safe_dump(current, f, sort_keys=False)
        os.replace(path + ".tmp", path)


def build_model(cfg: Config, init: bool = True):
    """The model a config trains: float X-HRNet, its init_weights, and QAT if asked."""
    model = build_pose_model(cfg, int8_graph=cfg.train.qat)
    path = cfg.train.init_weights
    if init and path:
        if not os.path.isfile(path):
            raise TrainingError(f"train.init_weights {path!r}: file not found; train the float "
                                "model first or fix the path")
        try:
            load_weights(model, path, hint="point it at the float weights of this config's "
                         "model (a train.qat run starts from float weights)")
        except WeightsError as e:
            raise TrainingError(f"train.init_weights {e}") from None
    if cfg.train.qat:
        from xhrnet_tf import qat  # pylint: disable=import-outside-toplevel
        if init and path:
            qat.equalize_for_int8(model, cfg)
        model, report = qat.quantize_model(model)
        if init:
            qat.print_report(report)
    return model


QAT_CALIBRATION_BATCHES = 8


def _calibrate_qat_ranges(cfg: Config, model, strategy, files) -> None:
    """A fresh QAT run starts from the int8 ranges of augmented training batches, not
    tfmot's [-6, 6] (calibration.calibrate_ranges); a resumed one has them in its checkpoint."""
    from xhrnet_tf import calibration  # pylint: disable=import-outside-toplevel
    per_replica = max(1, cfg.train.global_batch_size // strategy.num_replicas_in_sync)
    ds = pipeline.build_dataset(cfg, training=True, files=files, batch_size=per_replica)
    batches = [images.numpy() for images, _ in ds.take(QAT_CALIBRATION_BATCHES)]
    count = calibration.calibrate_ranges(model, batches, strategy)
    print(f"QAT: {count} int8 ranges set from {len(batches)} training batches "
          f"({len(batches) * per_replica} crops) before fine-tuning")


def _mixed_precision_policy(cfg: Config) -> str:
    if not cfg.train.mixed_precision:
        return "float32"
    # float16 needs loss scaling but is what GPUs are fast at; CPUs prefer bfloat16.
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


def build_training_state(cfg: Config, strategy, steps_per_epoch: int, num_replicas: int = 1):
    """Model, optimizer and checkpoint, created under the strategy's scope.

    (`num_replicas` is accepted for callers' symmetry; lr scaling uses the global batch.)
    """
    policy = _mixed_precision_policy(cfg)
    tf_keras.mixed_precision.set_global_policy(policy)
    t = cfg.train
    lr = t.learning_rate
    if t.scale_lr_with_batch:
        lr *= t.global_batch_size / t.reference_batch_size
    schedule = WarmupStepDecay(lr, t.warmup_steps, t.warmup_ratio,
                               [e * steps_per_epoch for e in t.lr_steps])
    with strategy.scope():
        tf_keras.utils.set_random_seed(t.seed)
        model = build_model(cfg)
        # The legacy Adam updates each variable with one fused ResourceApplyAdam op (same
        # arithmetic); the new one emits ~30 ops per variable: 40k extra ops for X-HRNet, which
        # halves the time to trace and start the training step.
        optimizer = tf_keras.optimizers.legacy.Adam(schedule, beta_1=0.9, beta_2=0.999,
                                                    epsilon=1e-8)
        if policy == "mixed_float16":
            optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
        # Adam's slots would otherwise be created by the first traced step, and a tf.function
        # that creates variables is traced twice: creating them here halves the start-up
        # time and the tracing memory (x18: first step 30 -> 16 s; peak RSS at batch 32
        # 4.00 -> 3.89 GiB).
        optimizer._create_all_weights(model.trainable_variables)  # pylint: disable=protected-access
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    # Creating ~4k variables eagerly cached one kernel per variable (their names differ), which
    # are never run again: freed here, their memory serves the training graph instead (x18,
    # batch 32: peak RSS 3.89 -> 3.78 GiB).
    context.context().clear_kernel_cache()
    tf_keras.mixed_precision.set_global_policy("float32")
    del num_replicas
    return model, optimizer, schedule, step, ckpt


def make_loss_and_grads(cfg: Config, model, optimizer):
    """(images, targets) -> (loss, gradients) of one replica, XLA-compiled if configured."""
    scaled = isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
    global_batch = cfg.train.global_batch_size

    def loss_and_grads(images, targets):
        with tf.GradientTape() as tape:
            pred = tf.cast(model(images, training=True), tf.float32)
            per_sample = joints_mse(pred, targets["heatmaps"], targets["target_weights"])
            loss = tf.nn.compute_average_loss(per_sample, global_batch_size=global_batch)
            objective = optimizer.get_scaled_loss(loss) if scaled else loss
        grads = tape.gradient(objective, model.trainable_variables)
        return loss, grads

    if not cfg.train.jit_compile:
        # Runs inline: QAT's range updates sync across replicas, which a nested function forbids.
        return loss_and_grads
    if not tf.config.list_logical_devices("GPU"):
        print("warning: train.jit_compile on a CPU: XLA's CPU depthwise convolution (forward "
              "and backward) is ~19x slower than TensorFlow's kernel, so steps run 5-10x "
              "slower; set train.jit_compile=false unless a GPU is used", file=sys.stderr)
    return tf.function(loss_and_grads, jit_compile=True)


def make_train_step(cfg: Config, strategy, model, optimizer):
    """A tf.function that runs one distributed step and returns the mean loss."""
    scaled = isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
    compute = make_loss_and_grads(cfg, model, optimizer)

    def replica_step(images, targets):
        loss, grads = compute(images, targets)
        if scaled:
            grads = optimizer.get_unscaled_gradients(grads)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(iterator):
        images, targets = next(iterator)
        losses = strategy.run(replica_step, args=(images, targets))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    return GraphFreeStep(train_step)


def _restore(ckpt, manager, cfg_path: str) -> None:
    if not manager.latest_checkpoint:
        return
    try:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.InvalidArgumentError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise TrainingError(f"{manager.latest_checkpoint} does not match the model of "
                            f"{cfg_path}: {first}") from None
    print(f"resumed from {manager.latest_checkpoint} at step {int(ckpt.step.numpy())}")


def train(cfg: Config, model_dir: str, config_path: str = "<config>",
          mode: str = "train_and_eval") -> dict:
    """Trains (and evaluates); restarting the same call resumes from the last checkpoint."""
    set_cpu_threads(cfg.train.inter_op_threads, cfg.train.intra_op_threads)
    if mode == "eval":
        return evaluate_checkpoint(cfg, model_dir, config_path)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    prepare_data(cfg)
    files = pipeline.list_files(cfg.data.train_tfrecords, "data.train_tfrecords")
    num_samples = pipeline.count_records(files)
    if num_samples == 0:
        raise TrainingError(f"data.train_tfrecords {cfg.data.train_tfrecords!r}: the shards "
                            "hold no samples")
    strategy = make_strategy()
    chief = _is_chief(strategy)
    check_model_dir(cfg, model_dir, write=False)
    steps_per_epoch = max(1, num_samples // cfg.train.global_batch_size)
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    model, optimizer, schedule, step, ckpt = build_training_state(
        cfg, strategy, steps_per_epoch, strategy.num_replicas_in_sync)
    ckpt_dir = os.path.join(model_dir, "ckpt")
    if not chief:  # every worker saves; only the chief's copy is kept
        ckpt_dir = os.path.join(model_dir, f"worker_tmp_{strategy.cluster_resolver.task_id}")
    manager = tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=3)
    _restore(ckpt, manager, config_path)
    check_model_dir(cfg, model_dir, write=chief)
    start = int(step.numpy())
    if cfg.train.qat and start == 0:
        _calibrate_qat_ranges(cfg, model, strategy, files)

    def dataset_fn(ctx):
        done = start * cfg.train.global_batch_size // ctx.num_input_pipelines
        return pipeline.build_dataset(cfg, training=True, input_context=ctx, files=files,
                                      deterministic=cfg.train.deterministic, skip=done)

    dist = strategy.distribute_datasets_from_function(dataset_fn)
    train_step = make_train_step(cfg, strategy, model, optimizer)
    writer = tf.summary.create_file_writer(os.path.join(model_dir, "train")) if chief else None
    print(f"training {total} steps ({steps_per_epoch}/epoch, {num_samples} samples, global "
          f"batch {cfg.train.global_batch_size}, {strategy.num_replicas_in_sync} replica(s))")
    try:
        with cpu_graph_options():
            _loop(cfg, model, train_step, iter(dist), step, start, total, steps_per_epoch,
                  schedule, manager, writer, model_dir, chief)
    except KeyboardInterrupt:
        manager.save(checkpoint_number=int(step.numpy()))
        print(f"\ninterrupted at step {int(step.numpy())}; checkpoint saved to "
              f"{manager.latest_checkpoint}; run the same command again to resume",
              file=sys.stderr)
        raise
    finally:
        if not chief:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    return _finish(cfg, model, model_dir, chief, total)


def _loop(cfg, model, train_step, iterator, step, start, total, steps_per_epoch, schedule,
          manager, writer, model_dir, chief):
    bar = tf_keras.utils.Progbar(total, stateful_metrics=["loss", "lr", "img/s"],
                                 interval=5.0, unit_name="step")
    bar.update(start)
    t0, seen = time.perf_counter(), 0
    for i in range(start, total):
        loss = float(train_step(iterator))
        if not math.isfinite(loss):
            raise TrainingError(
                f"loss became {loss} at step {i + 1}; stopped without saving. The last good "
                f"checkpoint ({manager.latest_checkpoint or 'none yet'}) is intact; lower "
                "train.learning_rate or check the data")
        step.assign(i + 1)
        seen += cfg.train.global_batch_size
        rate = seen / (time.perf_counter() - t0)
        lr = float(schedule(i))
        bar.update(i + 1, [("loss", loss), ("lr", lr), ("img/s", rate)])
        if writer and ((i + 1) % cfg.train.log_every_steps == 0 or i + 1 == total):
            with writer.as_default(step=i + 1):
                tf.summary.scalar("loss", loss)
                tf.summary.scalar("learning_rate", lr)
                tf.summary.scalar("images_per_second", rate)
        if (i + 1) % cfg.train.checkpoint_every_steps == 0 or i + 1 == total:
            # A finite loss can still leave non-finite weights behind (an inf gradient in
            # the last update); never let those overwrite a good checkpoint.
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v))
                                    for v in model.trainable_variables])
            if not bool(finite):
                raise TrainingError(
                    f"weights became non-finite at step {i + 1}; stopped without saving. The "
                    f"last good checkpoint ({manager.latest_checkpoint or 'none yet'}) is "
                    "intact; lower train.learning_rate or check the data")
            manager.save(checkpoint_number=i + 1)
        epoch_end = (i + 1) % steps_per_epoch == 0
        if epoch_end and ((i + 1) // steps_per_epoch) % cfg.train.eval_every_epochs == 0 \
                and i + 1 < total:
            plain = _plain_copy(cfg, model)  # every worker takes part in reading the weights
            if chief:
                periodic_eval(cfg, plain, model_dir, writer, i + 1)


_PLAIN = {}


def _plain_copy(cfg: Config, model):
    """The trained weights in an undistributed model.

    Reading distributed variables (BN statistics are sync-on-read) is a collective op, so
    every worker calls this; the chief then evaluates and exports without collectives.
    """
    weights = model.get_weights()
    key = id(model)
    if key not in _PLAIN:
        _PLAIN.clear()
        _PLAIN[key] = build_model(cfg, init=False)
    _PLAIN[key].set_weights(weights)
    return _PLAIN[key]


def _finish(cfg, model, model_dir, chief, total) -> dict:
    model = _plain_copy(cfg, model)
    result = {"steps": total, "model": model}
    if chief:
        model.save_weights(os.path.join(model_dir, "final.weights.h5"))
        stats = periodic_eval(cfg, model, model_dir, None, total, verbose=True)
        if stats:
            result["stats"] = stats
        if cfg.train.export_tflite or cfg.train.qat:
            from xhrnet_tf.tflite_utils import (  # pylint: disable=import-outside-toplevel
                checks_summary, delegate_checks, to_tflite)
            if cfg.train.qat:
                from xhrnet_tf.qat import int8_hook  # pylint: disable=import-outside-toplevel
                name, hook, deploy = "model_qat_int8.tflite", int8_hook(), model
            else:  # the fp32 graph xhrnet_tf.export writes
                from xhrnet_tf import export  # pylint: disable=import-outside-toplevel
                images = export.training_calibration_images(cfg, 64)
                name, hook = "model_fp32.tflite", None
                deploy = export.float_deploy_copy(cfg, model, images)[0]
            path = os.path.join(model_dir, name)
            content = to_tflite(deploy, converter_hook=hook)  # no half-written file on failure
            with open(path, "wb") as f:
                f.write(content)
            result["tflite"] = path
            print(f"saved {path}{checks_summary(delegate_checks(content, gpu=False))}")
    return result


def evaluate_checkpoint(cfg: Config, model_dir: str, config_path: str) -> dict:
    """--mode=eval: the latest checkpoint of model_dir on the validation set."""
    check_model_dir(cfg, model_dir, write=False)
    if not val_available(cfg):
        raise TrainingError(f"{config_path}: data.val_tfrecords / data.val_annotations do not "
                            "point at existing files")
    model = build_model(cfg, init=False)
    ckpt = tf.train.Checkpoint(model=model)
    manager = tf.train.CheckpointManager(ckpt, os.path.join(model_dir, "ckpt"), max_to_keep=3)
    if not manager.latest_checkpoint:
        raise TrainingError(f"{model_dir}: no checkpoint to evaluate")
    ckpt.restore(manager.latest_checkpoint).expect_partial()
    stats = periodic_eval(cfg, model, model_dir, None, -1, verbose=True, keep_best=False)
    return {"stats": stats, "model": model}
