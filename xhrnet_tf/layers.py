"""The few custom layers X-HRNet needs; everything else is composed from stock tf_keras layers.

* `SUSA`: spatially unidimensional self-attention (SPEC 7), H-wise or W-wise.
* `ChannelSplit`, `BilinearResize`, `NearestUpsample`, `Subsample2x`: layers that only move
  values, in `shape_layers.py`.

All graphs stay rank <= 4 and use no batched matmul, so TFLite GPU/NNAPI delegates accept them.
`CUSTOM_OBJECTS` names them all for loading saved models.
"""
from __future__ import annotations

import contextlib
import threading

import tensorflow as tf
import tf_keras

from xhrnet_tf.shape_layers import BilinearResize, ChannelSplit, NearestUpsample, Subsample2x
from xhrnet_tf.susa_grad import shared_constant, susa_backward

_PACKAGE = "xhrnet_tf"
_TRACE = threading.local()


@contextlib.contextmanager
def tflite_graph():
    """Traces SUSA's query in the form TFLite/XNNPACK runs fast (see `SUSA._query`).

    For graphs made to be converted (`tflite_utils.to_tflite`, the exported SavedModel); the
    function is the same, only the ops differ.
    """
    previous = getattr(_TRACE, "tflite", False)
    _TRACE.tflite = True
    try:
        yield
    finally:
        _TRACE.tflite = previous


def conv_initializer():
    """Official init (SPEC 10): every conv weight ~ N(0, 0.001)."""
    return tf_keras.initializers.RandomNormal(mean=0.0, stddev=0.001)


@tf_keras.saving.register_keras_serializable(package=_PACKAGE)
class SUSA(tf_keras.layers.Layer):
    """Spatially unidimensional self-attention on an NHWC tensor.

    direction='h' (HSUSA): a per-row learned weighting pools over H, a softmax over W picks
    the columns each row attends to, and the result gates the feature row by row.
    direction='w' (WSUSA) swaps the roles of H and W. `fusion='mul'` multiplies the feature
    by the sigmoid gate (the official model); 'add' adds it (the paper's Table 5 ablation).
    """

    def __init__(self, direction: str = "h", max_length: int = 96, fusion: str = "mul",
                 epsilon: float = 1e-5, fake_quant: bool = False, split_output: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if direction not in ("h", "w"):
            raise ValueError(f"SUSA direction must be 'h' or 'w', got {direction!r}")
        if fusion not in ("mul", "add"):
            raise ValueError(f"SUSA fusion must be 'mul' or 'add', got {fusion!r}")
        self.direction = direction
        self.max_length = int(max_length)
        self.fusion = fusion
        self.epsilon = float(epsilon)
        # Quantization-aware training (xhrnet_tf.qat): every internal tensor gets a
        # moving-average int8 range, so the converter needs no calibration for SUSA.
        self.fake_quant = bool(fake_quant)
        self._quantizers = {}
        # int8 deploy graphs of paired units (blocks.shuffle_unit_pair): the output as its
        # two channel halves, each written by its own MUL. A SPLIT of one output instead
        # feeds the pair's concats from a same-scale op, and the int8 converter then gave
        # the pair's tensors two scales and requantised between them (48 QUANTIZE ops more
        # in x18, 2.4 AP points lost on the quickstart model).
        self.split_output = bool(split_output)
        if self.split_output and self.fake_quant:
            raise ValueError(f"{self.name}: split_output is for deploy graphs, not QAT")
        # Axis the learned weights pool over, and the axis the softmax runs along.
        self._pool_axis, self._attend_axis = (1, 2) if direction == "h" else (2, 1)

    def build(self, input_shape):
        shape = tf.TensorShape(input_shape)
        if shape.rank != 4 or shape[-1] is None:
            raise ValueError(f"{self.name}: expects NHWC input with known channels, got {shape}")
        length = shape[self._pool_axis]
        if length is not None and length > self.max_length:
            axis = "height" if self.direction == "h" else "width"
            raise ValueError(
                f"{self.name}: feature {axis} {length} exceeds the {self.max_length} learned "
                f"group weights; the input image is too large for this model")
        c = int(shape[-1])
        self.group_weight = self.add_weight(
            name="group_weight", shape=(self.max_length,), initializer="ones")
        self.mean_kernel = self.add_weight(name="mean_kernel", shape=(c,),
                                           initializer=conv_initializer())
        self.mean_bias = self.add_weight(name="mean_bias", shape=(c,), initializer="zeros")
        self.conv_kernel = self.add_weight(name="conv_kernel", shape=(1, 1, c, c),
                                           initializer=conv_initializer())
        self.conv_bias = self.add_weight(name="conv_bias", shape=(c,), initializer="zeros")
        self.ln_gamma = self.add_weight(name="ln_gamma", shape=(c,), initializer="ones")
        self.ln_beta = self.add_weight(name="ln_beta", shape=(c,), initializer="zeros")
        if self.fake_quant:
            self._build_quantizers()
        super().build(input_shape)

    # No range of their own: the max of the query (REDUCE_MAX keeps its input's int8 grid; a
    # narrower range of its own made the converter clip the query before the softmax's SUB)
    # and the gate (LOGISTIC's fixed int8 grid, see _int8_gate).
    _INTERNAL = ("query", "shifted", "exp", "den", "product", "num", "recip", "pooled",
                 "centred", "scaled", "ln")

    def _build_quantizers(self):
        from tensorflow_model_optimization.quantization.keras import quantizers  # pylint: disable=import-outside-toplevel
        for tensor in self._INTERNAL:
            q = quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                                  narrow_range=False)
            self._quantizers[tensor] = (q, q.build(None, f"fq_{tensor}", self))

    def _fq(self, tensor, x, training):
        if not self.fake_quant:
            return x
        quantizer, weights = self._quantizers[tensor]
        return quantizer(x, training, weights)

    def _kernel_fq(self, kernel, depthwise=False):
        """QAT: a computed kernel on the converter's int8 grid (symmetric, one scale per
        output channel), so training sees the weights the .tflite runs."""
        if not self.fake_quant:
            return kernel
        if depthwise:  # (h, w, C, 1): the channels are the output channels
            return tf.transpose(self._kernel_fq(tf.transpose(kernel, (0, 1, 3, 2))),
                                (0, 1, 3, 2))
        bound = tf.stop_gradient(tf.maximum(
            tf.reduce_max(tf.abs(kernel), axis=(0, 1, 2)), 1e-12))
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            kernel, -bound, bound, num_bits=8, narrow_range=True)

    def _const_fq(self, value):
        """QAT: a constant operand of an int8 MUL/ADD on the converter's grid (one
        asymmetric scale whose range holds 0)."""
        if not self.fake_quant:
            return value
        low = tf.stop_gradient(tf.minimum(tf.reduce_min(value), 0.0))
        high = tf.stop_gradient(tf.maximum(tf.reduce_max(value), 0.0))
        return tf.quantization.fake_quant_with_min_max_vars(value, low, high, num_bits=8)

    def _params(self):
        # Read once per call (and cast to the compute dtype under mixed precision), so the
        # fused-gradient path sees tensors, not variables.
        return [tf.convert_to_tensor(w) for w in (
            self.group_weight, self.mean_kernel, self.mean_bias, self.conv_kernel,
            self.conv_bias, self.ln_gamma, self.ln_beta)]

    def _query(self, x, group_weight, mean_kernel, mean_bias):
        """Weighted mean along the pool axis, then mean_conv (per-channel scale and bias).

        Both are linear, so they fold into one (length, C) weight, applied in one of two
        forms. TensorFlow runs a depthwise conv whose kernel spans the pool axis fastest
        (MUL + SUM instead made x18 training 28% slower). XNNPACK runs that conv as a
        grouped GEMM with one channel per group, wasting 15 of every 16 lanes, so graphs
        traced for TFLite (`tflite_graph`) use MUL + SUM: x18 fp32 14.2 -> 12.5 ms
        (tools/profile_tflite). QAT keeps the depthwise form, trained and converted: in int8
        the MUL + SUM form rounds the full-size product to int8 before summing, and the one
        QAT run with it ended 6.4 AP points below the float control (2.7 with this form).
        """
        length = x.shape[self._pool_axis]
        if length is None:  # spatial size known only at run time: shapes pack the tensor
            length = tf.shape(x)[self._pool_axis]
            const, divisor = (lambda v: v), tf.cast(length, x.dtype)
        else:  # shared constants keep the training graph small (susa_grad)
            const, divisor = shared_constant, shared_constant(float(length), x.dtype)
        g = tf.slice(group_weight, const((0,)), const((length,)))
        tflite = getattr(_TRACE, "tflite", False) and not self.fake_quant
        if tflite and self.direction == "h":
            # XNNPACK applies an (H, 1, C) operand C values at a time (2.1x the time of a
            # (1, W, C) one at C = 20), a per-row scalar (H, 1, 1) over whole rows: weight
            # the rows, then scale the channels of the pooled (1, W, C) vector. x18 fp32
            # -1.2% (A/B, 3 x 100 runs), and 48 (H, 1, C) constants fewer in the file.
            rows = tf.reshape(g, const((length, 1, 1)))
            pooled = tf.reduce_sum(x * rows, axis=const(1), keepdims=True)
            return pooled * (mean_kernel / divisor) + mean_bias
        g_shape = (length, 1, 1, 1) if self.direction == "h" else (1, length, 1, 1)
        kernel = (tf.reshape(g, const(g_shape))
                  * tf.reshape(mean_kernel / divisor, const((1, 1, x.shape[-1], 1))))
        if not tflite:
            kernel = self._kernel_fq(kernel, depthwise=True)
            q = tf.nn.depthwise_conv2d(x, kernel, strides=(1, 1, 1, 1), padding="VALID")
            return q + mean_bias
        kernel = tf.reshape(kernel, const((1, length, x.shape[-1])))
        pooled = tf.reduce_sum(x * kernel, axis=const(2), keepdims=True)
        return pooled + mean_bias

    def _centred_conv(self, t, conv_kernel, conv_bias):
        """conv(t) minus its mean over channels, as one conv.

        The LayerNorm's mean is linear in t, so it folds into the kernel and bias (subtract
        their means over the output channels): two ops fewer per SUSA in every exported graph,
        about 7% of X-HRNet-18's TFLite latency, with the same function and gradients.
        """
        last = shared_constant(-1)
        kernel = conv_kernel - tf.reduce_mean(conv_kernel, axis=last, keepdims=True)
        bias = conv_bias - tf.reduce_mean(conv_bias, axis=last)
        return tf.nn.conv2d(t, self._kernel_fq(kernel), strides=1, padding="VALID") + bias

    def _gate(self, centred, ln_gamma, ln_beta, training):
        """sigmoid(LayerNorm(u)) from the centred u, plus the normalised u and 1/std.
        Statistics run in float32 even under mixed precision: the variance of c values is
        where float16 loses the gate."""
        if self.fake_quant:
            return self._int8_gate(centred, ln_gamma, ln_beta, training), None, None
        c32 = tf.cast(centred, tf.float32)
        var = tf.reduce_mean(c32 * c32, axis=shared_constant(-1), keepdims=True)
        rstd = tf.math.rsqrt(var + shared_constant(self.epsilon, tf.float32))
        normed = c32 * rstd
        v = normed * tf.cast(ln_gamma, tf.float32) + tf.cast(ln_beta, tf.float32)
        return tf.sigmoid(tf.cast(v, centred.dtype)), normed, rstd

    def _int8_gate(self, centred, ln_gamma, ln_beta, training):
        """The QAT gate: LayerNorm of the centred u as sqrt(C) * u / ||u|| (the same function
        but for rows of u that are all but 0), which converts to one int8 L2_NORMALIZATION
        (fused by the converter only with an epsilon below 1e-3). Its integer kernel keeps
        the sum of squares in 32 bits and has a fixed output grid of 1/128. The variance,
        rsqrt and product each rounded to int8 took ranges set by rare rows (a variance grid
        of 0.025 for values of 0.02-0.2, an rsqrt grid of 0.73); with calibrated ranges the
        SUSA's Keras-vs-TFLite error (same input) fell from 0.024 to 0.018 mean, 0.090 to
        0.030 max.
        """
        fq = lambda name, v: self._fq(name, v, training)  # noqa: E731
        channels = int(centred.shape[-1])
        unit = tf.math.l2_normalize(centred, axis=-1, epsilon=1e-4)
        unit = tf.quantization.fake_quant_with_min_max_args(unit, -1.0, 127.0 / 128.0,
                                                             num_bits=8)
        gamma = self._const_fq(ln_gamma * channels ** 0.5)
        v = fq("ln", fq("scaled", unit * gamma) + self._const_fq(ln_beta))
        # TFLite's int8 LOGISTIC writes on a fixed grid of 1/256 from 0: a learned range
        # would add a requantising op that rounds twice.
        return tf.quantization.fake_quant_with_min_max_args(tf.sigmoid(v), 0.0, 255.0 / 256.0,
                                                            num_bits=8)

    def _forward(self, x, params, training):
        """The output and the small tensors the fused backward pass reuses."""
        group_weight, mean_kernel, mean_bias, conv_kernel, conv_bias, ln_gamma, ln_beta = params
        fq = lambda name, v: self._fq(name, v, training)  # noqa: E731
        axis = shared_constant(self._attend_axis)
        q = fq("query", self._query(x, group_weight, mean_kernel, mean_bias))
        # q is (N,1,w,c) for 'h', (N,h,1,c) for 'w'. Softmax along the attend axis, normalised
        # after the weighted sum: sum(x*e)/sum(e) equals sum(x*softmax(q)) and divides a
        # tensor smaller by a factor of the length.
        shifted = fq("shifted", q - tf.reduce_max(q, axis=axis, keepdims=True))
        e = fq("exp", tf.exp(shifted))
        num = fq("num", tf.reduce_sum(fq("product", x * e), axis=axis, keepdims=True))
        den = fq("den", tf.reduce_sum(e, axis=axis, keepdims=True))
        # A reciprocal of the small den, then a MUL: TFLite's int8 DIV (a reciprocal per
        # element) on num took 2.8 ms of X-HRNet-18's 16.5 ms int8 run, XNNPACK does not take
        # it, and it takes the MUL (int8 16.5 -> 13.2 ms; PTQ AP unchanged, 0.360 / 0.357).
        t = fq("pooled", num * fq("recip", tf.math.reciprocal(den)))
        centred = fq("centred", self._centred_conv(t, conv_kernel, conv_bias))
        gate, normed, rstd = self._gate(centred, ln_gamma, ln_beta, training)
        fuse = (lambda a, b: a * b) if self.fusion == "mul" else (lambda a, b: a + b)
        if self.split_output:
            pieces = zip(tf.split(x, 2, axis=-1), tf.split(gate, 2, axis=-1))
            return [fuse(a, b) for a, b in pieces], None
        return fuse(x, gate), (e, den, t, normed, rstd, gate)

    def call(self, x, training=None):
        params = self._params()
        if tf.is_tensor(training):  # a symbolic learning phase: autograph makes tfmot's `if` a cond
            return self._forward(x, params, training)[0]
        return self._unconverted_call(x, params, training)

    # `call` itself stays undecorated: tfmot reads its signature to pass `training` on.
    @tf.autograph.experimental.do_not_convert
    def _unconverted_call(self, x, params, training):
        # Only Python-level branches (static shapes, flags, tfmot's `if not training` on a
        # Python bool): autograph changes no op here, and converting every nested call cost
        # 16% of an x18 build and 15% of building its QAT model.
        if (training is True and not self.fake_quant and not self.split_output
                and x.shape[1:3].is_fully_defined()):
            return self._fused_gradient_call(x, params)
        return self._forward(x, params, training)[0]

    def _fused_gradient_call(self, x, params):
        """Same forward, hand-derived backward (xhrnet_tf.susa_grad): autodiff spends ~160
        graph ops per SUSA on its gradient, 60% of X-HRNet's training graph, and that graph
        costs memory and start-up time in every training run."""
        @tf.custom_gradient
        def fused(x, *params):
            y, saved = self._forward(x, params, True)

            def grad(dy):
                return susa_backward(dy, x, params, saved, self._pool_axis, self._attend_axis,
                                     self.fusion)
            return y, grad
        return fused(x, *params)

    def compute_output_shape(self, input_shape):
        if not self.split_output:
            return input_shape
        shape = tf.TensorShape(input_shape)
        half = shape[:-1].concatenate([shape[-1] // 2])
        return [half, half]

    def get_config(self):
        config = super().get_config()
        config.update(direction=self.direction, max_length=self.max_length,
                      fusion=self.fusion, epsilon=self.epsilon, fake_quant=self.fake_quant,
                      split_output=self.split_output)
        return config


CUSTOM_OBJECTS = {"SUSA": SUSA, "ChannelSplit": ChannelSplit, "BilinearResize": BilinearResize,
                  "NearestUpsample": NearestUpsample, "Subsample2x": Subsample2x}
