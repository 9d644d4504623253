"""TensorFlow runtime settings for training: graph rewriting and CPU thread pools."""
from __future__ import annotations

import contextlib
import sys

import tensorflow as tf


@contextlib.contextmanager
def cpu_graph_options():
    """Without a GPU, Grappler spent 10-20 s rewriting the training graph (35k ops then) and the
    steps run no faster for it (measured on x18 and the quickstart model); GPUs keep it."""
    if tf.config.list_logical_devices("GPU"):
        yield
        return
    saved = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options(
            {"disable_meta_optimizer": saved.get("disable_meta_optimizer", False)})


def set_cpu_threads(inter_op: int, intra_op: int) -> bool:
    """Sizes TensorFlow's two CPU thread pools (0 keeps TensorFlow's choice); True if applied.

    Small models train faster with one thread per op and several ops at once: the quickstart
    model gained 8% on average on 2 cores (single runs up to a fifth), x18 and x30 at
    256x192 lost 5-10% (bench_train, sessions 12-13). The pools are fixed once TensorFlow's context starts, so this must run before
    the first op; later it warns instead of failing, because only speed is at stake.
    """
    current = (tf.config.threading.get_inter_op_parallelism_threads(),
               tf.config.threading.get_intra_op_parallelism_threads())
    wanted = (inter_op or current[0], intra_op or current[1])
    if wanted == current:
        return True
    try:
        tf.config.threading.set_inter_op_parallelism_threads(wanted[0])
        tf.config.threading.set_intra_op_parallelism_threads(wanted[1])
    except RuntimeError:
        print(f"warning: train.inter_op_threads={inter_op}, train.intra_op_threads={intra_op} "
              "not applied: TensorFlow was already running; set them before any TensorFlow op "
              "(or use TF_NUM_INTEROP_THREADS / TF_NUM_INTRAOP_THREADS)", file=sys.stderr)
        return False
    return True
