"""Channel-0 equalisation: an exact weight rescaling that makes X-HRNet quantise to int8.

Why: channel 0 of every branch is a fixed point of the 2-group channel shuffle (out[0] = in[0]),
so it always lands in the half that a shuffle unit passes through untouched. No unit ever
rescales it, while each fusion adds to it again (branch 0 even twice: the official fuse quirk,
SPEC 5.3). It grows module after module until it is many times larger than any other channel
(x18 quickstart model: 148 against at most 36 for the other 39 channels of branch 0), and a
per-tensor int8 scale sized for that one channel leaves a few levels for all the others.

The fix changes no function: divide channel 0 of a branch tensor by s where it is produced
(the BN after each conv that writes it) and multiply the weights that read it by s (the
depthwise or 1x1 kernels of the fuse paths, transitions and head). ReLU, up/down-sampling and
the passthrough halves commute with a positive per-channel scale, and no shuffle unit reads
channel 0. Scales are chosen on calibration images so that channel 0 peaks as high as the
largest other channel, no higher. This is data-free-quantisation-style cross-layer equalisation
(Nagel et al., 2019) specialised to where X-HRNet needs it.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Tuple

import numpy as np

from xhrnet_tf.config import ModelConfig
from xhrnet_tf.model import stage_table


@dataclasses.dataclass
class Segment:
    """One branch tensor from where it is (re)created to where it is last read."""
    name: str
    producers: List[str] = dataclasses.field(default_factory=list)  # BN layers writing ch 0
    readers: List[str] = dataclasses.field(default_factory=list)  # conv layers reading ch 0
    probes: List[str] = dataclasses.field(default_factory=list)  # layers that show the tensor


def _transition(cur: Dict[int, Segment], prev: List[int], channels, t: str, segs: List):
    out = {}
    for i, c in enumerate(channels):
        if i < len(prev) and prev[i] == c:
            out[i] = cur[i]
            continue
        if i < len(prev):
            cur[i].readers.append(f"{t}_branch{i}_dw")
            out[i] = Segment(f"{t}_branch{i}", [f"{t}_branch{i}_pw_bn"])
        else:
            cur[len(prev) - 1].readers.append(f"{t}_branch{i}_step0_dw")
            last = i - len(prev)
            out[i] = Segment(f"{t}_branch{i}", [f"{t}_branch{i}_step{last}_pw_bn"])
        segs.append(out[i])
    return out


def _fuse(cur: Dict[int, Segment], n: int, m: str) -> None:
    for i in range(n):
        for j in range(n):
            if j > i:  # up path: 1x1 conv + BN, then nearest up-sampling
                cur[j].readers.append(f"{m}_fuse{i}_{j}_pw")
                cur[i].producers.append(f"{m}_fuse{i}_{j}_pw_bn")
            elif j < i:  # down path: stride-2 DW + 1x1 steps (from z0 for the official fuse)
                cur[j].readers.append(f"{m}_fuse{i}_{j}_step0_dw")
                cur[i].producers.append(f"{m}_fuse{i}_{j}_step{i - j - 1}_pw_bn")
        cur[i].probes.append(f"{m}_fuse{i}_add")


def segments(model_cfg: ModelConfig) -> List[Segment]:
    """Every branch tensor's channel-0 producers and readers, by layer name."""
    stem = Segment("stem", ["stem_branch1_1_bn"])  # the stem shuffle puts x1[0] at channel 0
    segs, cur, prev = [stem], {0: stem}, [model_cfg.stem_channels]
    for spec in stage_table(model_cfg):
        cur = _transition(cur, prev, spec.channels, f"transition{spec.index}", segs)
        for k in range(spec.num_modules):
            _fuse(cur, len(spec.channels), f"stage{spec.index}_module{k}")
        prev = list(spec.channels)
    n = len(prev)
    for p in range(n):  # IterativeHead, coarsest first; project p-1's output joins branch n-1-p
        b = n - 1 - p
        if p > 0:
            cur[b].producers.append(f"head_project{p - 1}_pw_bn")
        cur[b].readers.append(f"head_project{p}_dw")
    return segs


def rescale(model, segs: Iterable[Segment], scales: Dict[str, float]) -> None:
    """Divides channel 0 of each segment by its scale in place; the function is unchanged."""
    for seg in segs:
        s = float(scales.get(seg.name, 1.0))
        if s == 1.0:
            continue
        if not s > 0:
            raise ValueError(f"equalisation scale of {seg.name} must be positive, got {s}")
        # Whole-variable assigns: a distributed (mirrored) variable has no sliced assign.
        for name in seg.producers:
            bn = model.get_layer(name)
            for var in (bn.gamma, bn.beta):
                value = var.numpy()
                value[0] /= s
                var.assign(value)
        for name in seg.readers:
            kernel = model.get_layer(name).weights[0]  # (kh, kw, c_in, c_out or 1)
            value = kernel.numpy()
            value[:, :, 0, :] *= s
            kernel.assign(value)


def choose_scales(model, segs: List[Segment], images, batch_size: int = 16) -> Dict[str, float]:
    """Per segment, the factor that makes channel 0 as large as the largest other channel
    where it is largest relative to them (below 1 when channel 0 is the smaller one).
    `images`: normalised crops, each (1, h, w, 3) or a batch of them."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tf_keras  # pylint: disable=import-outside-toplevel
    probes = [(seg.name, p) for seg in segs for p in seg.probes]
    if not probes:
        return {}
    outputs = [model.get_layer(p).output for _, p in probes]
    probe_model = tf_keras.Model(model.input, outputs)
    peaks = np.zeros((len(probes), 2))
    images = list(images)
    # Batches, not single crops: an eager call walks the model's ~900 layers in Python; 64
    # crops one at a time took 48 s on the quickstart model, in batches of 16 4.4 s.
    for start in range(0, len(images), batch_size):
        batch = np.concatenate(images[start:start + batch_size])
        feats = probe_model(tf.constant(batch), training=False)
        for k, f in enumerate(feats):
            per_channel = np.abs(f.numpy()).max(axis=(0, 1, 2))
            peaks[k] = np.maximum(peaks[k], [per_channel[0], per_channel[1:].max()])
    scales: Dict[str, float] = {}
    for (name, _), (ch0, others) in zip(probes, peaks):
        if ch0 > 0 and others > 0:  # a dead channel 0 keeps its scale
            scales[name] = max(scales.get(name, 0.0), ch0 / others)
    return scales


def summary(scales: Dict[str, float]) -> str:
    """One log line: the factor channel 0 of each branch tensor was divided by."""
    return "channel-0 equalisation scales " + ", ".join(f"{k} {v:.2f}"
                                                        for k, v in scales.items())


def equalize(model, model_cfg: ModelConfig, images) -> Tuple[Dict[str, float], List[Segment]]:
    """Chooses the scales on `images` (normalised crops) and rescales `model` in place."""
    segs = segments(model_cfg)
    scales = choose_scales(model, segs, images)
    rescale(model, segs, scales)
    return scales, segs
