"""The backward pass of SUSA (`xhrnet_tf.layers.SUSA`), derived by hand.

Autodiff of SUSA's forward emits ~160 graph ops per layer (broadcast reductions, shape
constants, the folded kernels' chains); X-HRNet-18 has 96 SUSAs, so they were 60% of the
training graph, which TensorFlow keeps twice in memory (Python graph and runtime) and traces
at every start. This is the same gradient in ~45 ops. `tests/test_layers.py` checks it against
autodiff for both directions and both fusions.

Notation (direction 'h': pool axis a = H, attend axis b = W; 'w' swaps them):
    q = sum_a(x * g[a]) * s + mean_bias           s = mean_kernel / L,  L = x.shape[a]
    p = softmax_b(q) = e / den                    t = sum_b(x * p)
    u = t @ Kc + cbc                              Kc, cbc: conv kernel and bias minus their
                                                  means over output channels
    n = u * r, r = rsqrt(mean_c(u^2) + eps)       v = n * gamma + beta,  G = sigmoid(v)
    y = x * G   (fusion 'mul')  or  x + G  ('add')
"""
from __future__ import annotations

import tensorflow as tf


def _layer_norm_backward(dgate, gate, normed, rstd, gamma):
    """Gradients of G = sigmoid(LN(u)) for a centred u, in float32: du, dgamma, dbeta."""
    g32 = tf.cast(gate, tf.float32)
    dv = tf.cast(dgate, tf.float32) * g32 * (1.0 - g32)
    dgamma = tf.reduce_sum(dv * normed, axis=(0, 1, 2))
    dbeta = tf.reduce_sum(dv, axis=(0, 1, 2))
    dn = dv * tf.cast(gamma, tf.float32)
    # n = u * rsqrt(mean(u^2) + eps)  =>  du = r * (dn - n * mean(dn * n))
    du = rstd * (dn - normed * tf.reduce_mean(dn * normed, axis=-1, keepdims=True))
    return du, dgamma, dbeta


def _centred_conv_backward(du, t, conv_kernel):
    """Gradients of u = t @ (K - mean_out K) + (b - mean b): dt, dK, db."""
    c = t.shape[-1]
    k = conv_kernel[0, 0]
    kc = k - tf.reduce_mean(k, axis=-1, keepdims=True)
    du2 = tf.reshape(du, (-1, c))
    dt = tf.reshape(tf.matmul(du2, kc, transpose_b=True), tf.shape(t))
    dkc = tf.matmul(tf.reshape(t, (-1, c)), du2, transpose_a=True)
    dk = (dkc - tf.reduce_mean(dkc, axis=-1, keepdims=True))[None, None]
    dbc = tf.reduce_sum(du2, axis=0)
    return dt, dk, dbc - tf.reduce_mean(dbc)


def susa_backward(dy, x, params, saved, pool_axis: int, attend_axis: int, fusion: str):
    """Gradients for (x, group_weight, mean_kernel, mean_bias, conv_kernel, conv_bias,
    ln_gamma, ln_beta) given the output gradient dy and SUSA._forward's saved tensors."""
    group_weight, mean_kernel, _, conv_kernel, _, ln_gamma, _ = params
    e, den, t, normed, rstd, gate = saved
    if fusion == "mul":
        dx = dy * gate
        dgate = tf.reduce_sum(dy * x, axis=attend_axis, keepdims=True)
    else:
        dx = dy
        dgate = tf.reduce_sum(dy, axis=attend_axis, keepdims=True)
    du, dgamma, dbeta = _layer_norm_backward(dgate, gate, normed, rstd, ln_gamma)
    dt, dk, dcb = _centred_conv_backward(tf.cast(du, x.dtype), t, conv_kernel)

    # Softmax along the attend axis: dq = p * (dp - sum_b(p * dp)), where
    # sum_b(p * dp) = sum_a(dt * t) is the cheaper form (no full-size product).
    p = e / den
    dx += dt * p
    dp = tf.reduce_sum(dt * x, axis=pool_axis, keepdims=True)
    dq = p * (dp - tf.reduce_sum(dt * t, axis=pool_axis, keepdims=True))
    dmb = tf.reduce_sum(dq, axis=(0, 1, 2))

    # q's weighted mean: kernel[a, c] = g[a] * s[c].
    length = x.shape[pool_axis]
    shape = [1, 1, 1, 1]
    shape[pool_axis] = length
    g = group_weight[:length]
    s = mean_kernel / length
    dx += dq * (tf.reshape(g, shape) * s)
    dkernel = tf.reduce_sum(x * dq, axis=(0, attend_axis))  # (L, C)
    dg = tf.pad(tf.reduce_sum(dkernel * s, axis=-1),
                [[0, group_weight.shape[0] - length]])
    dmk = tf.reduce_sum(dkernel * g[:, None], axis=0) / length
    grads = [dx, dg, dmk, dmb, dk, dcb, dgamma, dbeta]
    return [tf.cast(d, v.dtype) for d, v in zip(grads, [x, *params])]
