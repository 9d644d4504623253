"""X-HRNet building blocks as plain functions over stock tf_keras layers (NHWC).

Every layer gets a deterministic name that says where it sits, e.g.
`stage1_module2_branch0_unit1_hsusa`; `xhrnet_tf.convert` maps official checkpoint keys onto
these names, so renaming a layer here means updating the converter too.
"""
from __future__ import annotations

from typing import List, Sequence

from tf_keras import layers

from xhrnet_tf.layers import SUSA, conv_initializer
from xhrnet_tf.shape_layers import BilinearResize, ChannelSplit, NearestUpsample, Subsample2x

# PyTorch BatchNorm defaults in Keras terms (SPEC 2.2): eps 1e-5, running = 0.9 * running + ...
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


def batch_norm(x, name: str, momentum: float = BN_MOMENTUM):
    return layers.BatchNormalization(momentum=momentum, epsilon=BN_EPSILON, name=name)(x)


def conv_bn(x, filters: int, kernel: int, name: str, *, stride: int = 1,
            depthwise: bool = False, relu: bool = False, bn: bool = True,
            momentum: float = BN_MOMENTUM, padded: bool = False):
    """Conv (no bias when followed by BN) -> BN -> optional ReLU.

    Stride-2 convs pad one pixel on all sides and convolve VALID, as PyTorch does; TF's SAME
    would pad only bottom/right and shift the sampling grid by one pixel (SPEC 2.1).
    `padded=True`: x is already padded by the caller (shared with other convs).
    """
    padding = "same"
    if stride == 2:
        if not padded:
            x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding=padding, use_bias=not bn,
                                   depthwise_initializer=conv_initializer(), name=name)(x)
    else:
        x = layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=not bn,
                          kernel_initializer=conv_initializer(), name=name)(x)
    if bn:
        x = batch_norm(x, f"{name}_bn", momentum)
    if relu:
        x = layers.ReLU(name=f"{name}_relu")(x)
    return x


def channel_shuffle(x, groups: int, name: str):
    """mmpose channel_shuffle in NHWC with rank-4 tensors only (SPEC 2.5).

    (N,H,W,C) -> (N,H*W,g,C/g) -> swap the last two axes -> (N,H,W,C). Folding H and W keeps
    the tensor 4-D, which GPU/NNAPI delegates require.
    """
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    x = layers.Reshape((h * w, groups, c // groups), name=f"{name}_fold")(x)
    x = layers.Permute((1, 3, 2), name=f"{name}_swap")(x)
    return layers.Reshape((h, w, c), name=f"{name}_unfold")(x)


def stem(x, channels: int, name: str = "stem"):
    """SPEC 3: conv s2 + ReLU, split, two ShuffleNet branches (one down-sampling), shuffle."""
    x = conv_bn(x, channels, 3, f"{name}_conv1", stride=2, relu=True)
    half = channels // 2
    x1, x2 = ChannelSplit([half, half], name=f"{name}_split")(x)
    x1 = conv_bn(x1, half, 3, f"{name}_branch1_0", stride=2, depthwise=True)
    x1 = conv_bn(x1, half, 1, f"{name}_branch1_1", relu=True)
    x2 = conv_bn(x2, channels, 1, f"{name}_branch2_0", relu=True)
    x2 = conv_bn(x2, channels, 3, f"{name}_branch2_1", stride=2, depthwise=True)
    x2 = conv_bn(x2, half, 1, f"{name}_branch2_2", relu=True)
    x = layers.Concatenate(name=f"{name}_concat")([x1, x2])
    return channel_shuffle(x, 2, f"{name}_shuffle")


def _susa(x, direction: str, model_cfg, name: str, split_output: bool = False):
    max_length = model_cfg.max_height if direction == "h" else model_cfg.max_width
    return SUSA(direction, max_length, fusion=model_cfg.fusion, split_output=split_output,
                name=name)(x)


def _hwsusa(x, model_cfg, name: str):
    """SPEC 6.3: half the channels get H-attention, half W-attention, then a 2-shuffle."""
    c = x.shape[-1]
    a, b = ChannelSplit([c // 2, c // 2], name=f"{name}_split")(x)
    a = _susa(a, "h", model_cfg, f"{name}_h")
    b = _susa(b, "w", model_cfg, f"{name}_w")
    x = layers.Concatenate(name=f"{name}_concat")([a, b])
    return channel_shuffle(x, 2, f"{name}_shuffle")


def unit_branch(y, model_cfg, name: str, halves: bool = False, int8_graph: bool = False):
    """The transformed half of a shuffle unit (official `branch2`) for each unit type.

    `halves`: returned as its two channel halves (see `shuffle_unit_pair`). In int8 graphs an
    SX branch's last SUSA writes them with two MULs (`SUSA.split_output`), which keeps the
    pair at one int8 scale; float graphs split the output, 7% faster in XNNPACK (x18 fp32).
    """
    f = y.shape[-1]
    unit = model_cfg.unit
    if halves and not (unit == "sx" and int8_graph):
        return ChannelSplit([f // 2, f // 2], name=f"{name}_branch_split")(
            unit_branch(y, model_cfg, name))
    if unit == "sx":
        first, last = ("w", "h") if model_cfg.susa_order == "wh" else ("h", "w")
        y = _susa(y, first, model_cfg, f"{name}_{first}susa")
        y = conv_bn(y, f, 3, f"{name}_dw", depthwise=True)
        return _susa(y, last, model_cfg, f"{name}_{last}susa", split_output=halves)
    if unit == "px":
        y = _hwsusa(y, model_cfg, f"{name}_hwsusa0")
        y = conv_bn(y, f, 3, f"{name}_dw", depthwise=True)
        return _hwsusa(y, model_cfg, f"{name}_hwsusa2")
    if unit == "naive":
        y = conv_bn(y, f, 1, f"{name}_pw0", relu=True)
        y = conv_bn(y, f, 3, f"{name}_dw", depthwise=True)
        return conv_bn(y, f, 1, f"{name}_pw2", relu=True)
    if unit == "baseline":
        return conv_bn(y, f, 3, f"{name}_dw", depthwise=True)
    raise ValueError(f"unknown unit type {unit!r}")


def shuffle_unit(x, model_cfg, name: str):
    """Stride-1 shuffle unit (SPEC 6): split, transform one half, concat, shuffle. No residual."""
    c = x.shape[-1]
    x1, x2 = ChannelSplit([c // 2, c // 2], name=f"{name}_split")(x)
    y = unit_branch(x2, model_cfg, name)
    x = layers.Concatenate(name=f"{name}_concat")([x1, y])
    return channel_shuffle(x, 2, f"{name}_shuffle")


def shuffle_unit_pair(x, model_cfg, name0: str, name1: str, int8_graph: bool = False):
    """Two consecutive shuffle units with one channel shuffle instead of two (deploy graphs).

    The first unit splits x into (x1a, x1b | x2) and turns x2 into y = (ya | yb). The second
    unit's halves are interleavings of these quarters: its first half holds (x1a, ya), its
    second (x1b, yb). The second branch acts on each channel alike (SUSA, its LayerNorm and
    the depthwise conv are equivariant under a channel permutation), so it runs on
    [x1b | yb] with its per-channel weights permuted to match (`pair_permutation`), giving
    z = (z1 | z2). Both shuffles together are then one 4-group shuffle of
    [x1a | z1 | ya | z2]: same function, one transpose where there were two, and a
    transpose of (C/4, 4) blocks, which XNNPACK runs at about twice the speed per value of
    a 2-group shuffle's (C/2, 2) blocks. The branches hand over their outputs in halves
    (`unit_branch`). Not for 'px' units, whose branch splits its channels into halves.
    """
    c = x.shape[-1]
    q = c // 4
    x1a, x1b, x2 = ChannelSplit([q, q, 2 * q], name=f"{name0}_split")(x)
    ya, yb = unit_branch(x2, model_cfg, name0, halves=True, int8_graph=int8_graph)
    gather = layers.Concatenate(name=f"{name1}_gather")([x1b, yb])
    z1, z2 = unit_branch(gather, model_cfg, name1, halves=True, int8_graph=int8_graph)
    t = layers.Concatenate(name=f"{name1}_concat")([x1a, z1, ya, z2])
    return channel_shuffle(t, 4, f"{name1}_shuffle")


def pair_permutation(half: int) -> List[int]:
    """Channel j of the paired second branch's input is channel pair_permutation[j] of the
    unpaired one (half = its channel count): [x1b | yb] against their interleaving."""
    q = half // 2
    return [2 * r + j for j in (0, 1) for r in range(q)]


def transition(inputs: List, in_channels: Sequence[int], out_channels: Sequence[int],
               name: str) -> List:
    """SPEC 4: adapt existing branches (DW+BN+PW+BN when channels change) and grow new ones
    from the last previous branch with stride-2 DW steps."""
    outputs = []
    for i, c_out in enumerate(out_channels):
        if i < len(in_channels):
            x = inputs[i]
            if in_channels[i] != c_out:
                x = conv_bn(x, in_channels[i], 3, f"{name}_branch{i}_dw", depthwise=True)
                x = conv_bn(x, c_out, 1, f"{name}_branch{i}_pw")
            outputs.append(x)
            continue
        x = inputs[-1]
        steps = i + 1 - len(in_channels)
        for t in range(steps):
            c_in = x.shape[-1]
            c = c_out if t == steps - 1 else c_in
            step = f"{name}_branch{i}_step{t}_dw"
            x = _dw_stride2_subsampled(x, step) if t == 0 else \
                conv_bn(x, c_in, 3, step, stride=2, depthwise=True)
            x = conv_bn(x, c, 1, f"{name}_branch{i}_step{t}_pw")
        outputs.append(x)
    return outputs


def _dw_stride2_subsampled(x, name: str):
    """3x3 stride-2 DW conv + BN, computed as stride 1 then every other pixel.

    Same numbers as PyTorch's pad-1 stride-2 conv in inference. The transition's input also
    enters the next stage's split/concat units, whose int8 scales TFLite ties together; a PAD
    on that tensor (a same-scale op) then makes the converter leave PAD and DW conv in float.
    Without the PAD the whole int8 graph stays integer, for 4x the MACs of one small layer.
    The BN sits before the subsample so that conv and BN fold, in TFLite and in QAT (tfmot
    has no quantization for a BN that does not follow a conv). In training its batch
    statistics therefore cover every stride-1 position, not only the stride-2 outputs the
    official BN sees: a small difference in these three BNs' statistics, none in inference.
    """
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False,
                               depthwise_initializer=conv_initializer(), name=name)(x)
    x = batch_norm(x, f"{name}_bn")
    return Subsample2x(name=f"{name}_subsample")(x)


def fuse_path(x, i: int, j: int, channels: Sequence[int], name: str,
              momentum: float = BN_MOMENTUM):
    """F_ij of SPEC 5.2: up path (PW+BN+nearest upsample) or down path (DW-s2 steps).

    A down path's x arrives zero-padded by one pixel (see `fuse`)."""
    if j > i:
        x = conv_bn(x, channels[i], 1, f"{name}_pw", momentum=momentum)
        factor = 2 ** (j - i)
        return NearestUpsample(factor, name=f"{name}_up")(x)
    steps = i - j
    for t in range(steps):
        last = t == steps - 1
        c_out = channels[i] if last else channels[j]
        x = conv_bn(x, channels[j], 3, f"{name}_step{t}_dw", stride=2, depthwise=True,
                    momentum=momentum, padded=t == 0)
        x = conv_bn(x, c_out, 1, f"{name}_step{t}_pw", relu=not last, momentum=momentum)
    return x


def fuse(xs: List, channels: Sequence[int], fuse_mode: str, name: str,
         int8_graph: bool = False) -> List:
    """Multi-resolution fusion of one module (SPEC 5.3).

    'official' reproduces the in-place aliasing of the official code: branch 0 enters its own
    sum twice, and the other outputs see the pre-ReLU fused branch 0 (z0) through F_i0,
    counted twice. The terms are summed in the official accumulation order, except that the
    repeated first term comes third (see below). F_i0 runs once and its output is added twice;
    the official code runs it twice per training step, so its BNs update their running
    statistics twice: momentum 0.9**2 here gives the same running averages (SPEC 5.3).
    'standard' is the plain HRNet sum x_i + sum_j F_ij(x_j).
    `int8_graph`: branch 0's ReLU written relu(2 z0) / 2 (see below); same function.
    """
    n = len(xs)
    outputs, z0, padded = [], None, {}

    def pad(j, src):
        # One zero-padded copy per source feeds all of its down paths' first stride-2
        # convs: training keeps each conv's input for the backward pass, and three copies
        # of branch 0 cost 16 MB per module at batch 32 (x18, 256x192).
        if j not in padded:
            padded[j] = layers.ZeroPadding2D(1, name=f"{name}_fuse_pad{j}")(src)
        return padded[j]

    for i in range(n):
        terms = []
        for j in range(n):
            quirk = fuse_mode == "official" and j == 0 and i > 0
            src = z0 if quirk else xs[j]
            momentum = BN_MOMENTUM ** 2 if quirk else BN_MOMENTUM
            if j < i:
                src = pad(j, src)
            term = src if i == j else fuse_path(src, i, j, channels, f"{name}_fuse{i}_{j}",
                                                momentum)
            terms.append(term)
        if fuse_mode == "official":
            # The first term enters twice. Added as the third term, not the second: an Add
            # of one tensor with itself breaks the int8 converter's same-scale propagation,
            # and the reordering changes the float sum only by rounding (~1e-7 relative).
            terms.insert(min(2, len(terms)), terms[0])
        z = _sum_in_order(terms, f"{name}_fuse{i}_add")
        if i == 0:
            z0 = z
        if int8_graph and i == 0 and fuse_mode == "official" and n > 1:
            # z0 is also read before the ReLU, so the ReLU cannot fuse into its Add, and a
            # stand-alone int8 RELU is one XNNPACK refuses (TFLite's kernel took 28% of the
            # int8 x18). relu(2z) / 2 is exactly relu(z) and converts to a MUL with a fused
            # ReLU, which XNNPACK takes: int8 x18 23.0 -> 16.4 ms. Only in graphs made for
            # int8 (PTQ, QAT): it costs float training ~8% and fp32 TFLite 1%.
            z = layers.Rescaling(2.0, name=f"{name}_fuse{i}_relu_in")(z)
            z = layers.ReLU(name=f"{name}_fuse{i}_relu")(z)
            outputs.append(layers.Rescaling(0.5, name=f"{name}_fuse{i}_relu_out")(z))
            continue
        outputs.append(layers.ReLU(name=f"{name}_fuse{i}_relu")(z))
    return outputs


def _sum_in_order(terms: List, name: str):
    """Left-to-right sum as a chain of two-input Adds (the same arithmetic as one n-input Add).

    Each partial sum is then a layer output, so QAT gives it an int8 range; inside one
    n-input Add it would have none and the converter would keep those adds in float.
    """
    z = terms[0]
    for k, term in enumerate(terms[1:], start=1):
        last = k == len(terms) - 1
        z = layers.Add(name=name if last else f"{name}_partial{k}")([z, term])
    return z


def lite_module(xs: List, model_cfg, channels: Sequence[int], num_blocks: int,
                name: str, int8_graph: bool = False, paired: bool = False) -> List:
    """One multi-branch module: `num_blocks` shuffle units per branch, then the fusion.
    `paired`: consecutive units as `shuffle_unit_pair`s where the unit type allows it."""
    ys = []
    pairs = paired and model_cfg.unit != "px"
    for b, x in enumerate(xs):
        u = 0
        while u < num_blocks:
            unit = f"{name}_branch{b}_unit{u}"
            if pairs and u + 1 < num_blocks:
                x = shuffle_unit_pair(x, model_cfg, unit, f"{name}_branch{b}_unit{u + 1}",
                                      int8_graph)
                u += 2
                continue
            x = shuffle_unit(x, model_cfg, unit)
            u += 1
        ys.append(x)
    return fuse(ys, channels, model_cfg.fuse_mode, name, int8_graph)


def iterative_head(xs: List, name: str = "head") -> List:
    """SPEC 8: coarse-to-fine refinement, bilinear (align_corners=True) up-sampling.

    Returns the refined features at all resolutions, finest first.
    """
    rev = xs[::-1]
    out, last = [], None
    for p, s in enumerate(rev):
        if last is not None:
            up = BilinearResize(name=f"{name}_project{p}_resize")([last, s])
            s = layers.Add(name=f"{name}_project{p}_add")([s, up])
        c_in = s.shape[-1]
        c_out = rev[p + 1].shape[-1] if p + 1 < len(rev) else c_in
        s = conv_bn(s, c_in, 3, f"{name}_project{p}_dw", depthwise=True)
        s = conv_bn(s, c_out, 1, f"{name}_project{p}_pw", relu=True)
        out.append(s)
        last = s
    return out[::-1]


def heatmap_head(x, num_joints: int, name: str = "final_layer"):
    """SPEC 9: one 1x1 conv with bias to the joint heatmaps."""
    return layers.Conv2D(num_joints, 1, use_bias=True, kernel_initializer=conv_initializer(),
                         name=name)(x)
