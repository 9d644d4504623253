"""tf.data input pipelines over the person-crop TFRecords."""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Iterable, Iterator, List, Optional

import tensorflow as tf

from xhrnet_tf.config import Config
from xhrnet_tf.data import augment, tfexample


class DataError(ValueError):
    """The input data cannot be read; the message names the file or config key."""


def input_sizes(config: Config):
    """(image_size, heatmap_size) as (width, height), from model.input_size (H, W)."""
    h, w = config.model.input_size
    return (w, h), (w // 4, h // 4)


def list_files(pattern: str, key: str) -> List[str]:
    if not pattern:
        raise DataError(f"{key} is empty: set it to a glob of TFRecord shards")
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise DataError(f"{key}: no TFRecord files match {pattern!r}")
    return files


def build_dataset(config: Config, training: bool,
                  input_context: Optional[tf.distribute.InputContext] = None,
                  files: Optional[List[str]] = None, batch_size: Optional[int] = None,
                  deterministic: bool = False, repeat: Optional[bool] = None,
                  skip: int = 0) -> tf.data.Dataset:
    """Batched dataset of (image, {heatmaps, target_weights}) for training, or
    (image, metadata incl. targets) for evaluation.

    `batch_size` defaults to the config's global batch; under tf.distribute the per-replica
    share is taken from `input_context`, and shards are split between input pipelines.
    `skip` drops that many training samples of this pipeline before decoding: with a
    deterministic pipeline, a resumed run sees exactly the samples it would have seen.
    """
    key = "data.train_tfrecords" if training else "data.val_tfrecords"
    if files is None:
        files = list_files(config.data.train_tfrecords if training else
                           config.data.val_tfrecords, key)
    repeat = training if repeat is None else repeat
    num_pipes = input_context.num_input_pipelines if input_context else 1
    pipe_id = input_context.input_pipeline_id if input_context else 0
    seed = config.train.seed

    ds = tf.data.Dataset.from_tensor_slices(files)
    shard_files = num_pipes > 1 and len(files) >= num_pipes
    if shard_files:
        ds = ds.shard(num_pipes, pipe_id)
    if training:
        ds = ds.shuffle(len(files), seed=seed)
    if repeat:
        ds = ds.repeat()
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if num_pipes > 1 and not shard_files:
        ds = ds.shard(num_pipes, pipe_id)
    if training:
        ds = ds.shuffle(config.data.shuffle_buffer, seed=seed)
    image_size, heatmap_size = input_sizes(config)
    if training:
        fn = functools.partial(augment.train_transform, data_cfg=config.data,
                               image_size=image_size, heatmap_size=heatmap_size, seed=seed)
        ds = ds.enumerate().skip(skip).map(lambda i, rec: fn(tfexample.decode(rec), i),
                                num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=deterministic)
    else:
        fn = functools.partial(augment.eval_transform, data_cfg=config.data,
                               image_size=image_size, heatmap_size=heatmap_size)
        ds = ds.map(lambda rec: fn(tfexample.decode(rec)), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=deterministic)
    batch = batch_size or config.train.global_batch_size
    if input_context:
        batch = input_context.get_per_replica_batch_size(batch)
    ds = ds.batch(batch, drop_remainder=training)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def count_records(files: List[str]) -> int:
    """Number of records in `files`, from the writer's summary JSON where there is one."""
    total, unknown = 0, []
    summaries = {}
    for path in files:
        m = re.match(r"(.*)-\d{5}-of-\d{5}\.tfrecord$", path)
        summary = None
        if m:
            if m.group(1) not in summaries:
                try:
                    with open(m.group(1) + ".json", encoding="utf-8") as f:
                        summaries[m.group(1)] = json.load(f)
                except (OSError, ValueError):
                    summaries[m.group(1)] = None
            summary = summaries[m.group(1)]
        name = os.path.basename(path)
        if summary and name in summary.get("shards", []):
            total += summary["counts"][summary["shards"].index(name)]
        else:
            unknown.append(path)
    for path in unknown:
        total += sum(1 for _ in tf.data.TFRecordDataset(path))
    return total


def find_corrupt_file(files: Iterable[str]) -> Optional[str]:
    """The first file whose records do not read back, or None."""
    for path in files:
        try:
            for _ in tf.data.TFRecordDataset(path):
                pass
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError):
            return path
    return None


def iterate(dataset: tf.data.Dataset, files: List[str]) -> Iterator:
    """Iterates `dataset`; a corrupt TFRecord becomes a DataError naming the file.

    TF's own error only gives a byte offset, so on failure the files are checked one by one.
    """
    try:
        yield from dataset
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        bad = find_corrupt_file(files)
        if bad is None:
            raise
        raise DataError(f"{bad}: corrupt TFRecord ({e.message.splitlines()[0]}); "
                        "re-create it with xhrnet_tf.data.create_tfrecords") from None
