"""Training throughput and peak memory: X-HRNet-18/30, batch 32, 256x192, XLA off and on.

    python -m xhrnet_tf.tools.bench_train [--configs configs/x18.yaml configs/x30.yaml]
        [--batch 32] [--steps 5] [--xla off on] [--mixed_precision]

Each measurement runs in its own process (peak RSS is per process) on synthetic tensors, so
the input pipeline is not part of the figure; the first step (tracing, XLA compilation) is
timed apart from the steady-state steps.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _worker(config: str, batch: int, steps: int, xla: bool, mixed: bool = False) -> dict:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import xhrnet_tf  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.config import replace  # pylint: disable=import-outside-toplevel
    # pylint: disable=import-outside-toplevel
    from xhrnet_tf.runtime import cpu_graph_options, set_cpu_threads
    from xhrnet_tf.train import build_training_state, make_train_step
    cfg = replace(xhrnet_tf.load_config(config), {"train.global_batch_size": batch,
                                                  "train.jit_compile": xla,
                                                  "train.mixed_precision": mixed})
    set_cpu_threads(cfg.train.inter_op_threads, cfg.train.intra_op_threads)  # as train.train
    strategy = tf.distribute.get_strategy()
    model, opt, _, _, _ = build_training_state(cfg, strategy, 1000, 1)
    step = make_train_step(cfg, strategy, model, opt)
    h, w = cfg.model.input_size
    data = tf.data.Dataset.from_tensors((
        tf.random.normal((batch, h, w, 3)),
        {"heatmaps": tf.random.uniform((batch, h // 4, w // 4, 17)),
         "target_weights": tf.ones((batch, 17))})).repeat()
    it = iter(data)
    with cpu_graph_options():  # as train.train runs its steps
        t0 = time.perf_counter()
        float(step(it))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = float(step(it))
        per_step = (time.perf_counter() - t0) / steps
    try:  # the peak of live tensors, as the allocator counts it (oneDNN's BFC allocator)
        tensors = tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2 ** 30
    except ValueError:  # allocator without statistics (TF_ENABLE_ONEDNN_OPTS=0)
        tensors = float("nan")
    return {"config": config, "xla": xla, "images_per_s": batch / per_step,
            "tensor_peak_gib": tensors,
            "step_s": per_step, "first_step_s": first, "loss": loss,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        c, b, s, x, m = sys.argv[2:7]
        print(json.dumps(_worker(c, int(b), int(s), x == "on", m == "mixed")))
        return 0
    p = argparse.ArgumentParser(prog="python -m xhrnet_tf.tools.bench_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["configs/x18.yaml", "configs/x30.yaml"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--xla", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--mixed_precision", action="store_true",
                   help="train.mixed_precision (bfloat16 on a CPU, float16 on a GPU)")
    args = p.parse_args(argv)
    print(f"{'config':<22} {'XLA':>4} {'img/s':>8} {'s/step':>8} {'1st step s':>11} "
          f"{'peak RSS GiB':>13} {'tensors GiB':>12}")
    for config in args.configs:
        for xla in args.xla:
            res = subprocess.run([sys.executable, "-m", "xhrnet_tf.tools.bench_train",
                                  "--_worker", config, str(args.batch), str(args.steps), xla,
                                  "mixed" if args.mixed_precision else "float32"],
                                 capture_output=True, text=True, check=False)
            if res.returncode != 0:
                print(f"{config:<22} {xla:>4} failed: {res.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{config:<22} {xla:>4} {r['images_per_s']:>8.2f} {r['step_s']:>8.2f} "
                  f"{r['first_step_s']:>11.1f} {r['peak_rss_gib']:>13.2f} "
                  f"{r['tensor_peak_gib']:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
