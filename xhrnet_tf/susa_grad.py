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

import weakref

import numpy as np
import tensorflow as tf

# graph -> {value key: weak reference to its Const}. Weak both ways, so that the cache never
# keeps a traced graph alive (the graph holds its tensors, not the other way round).
_SHARED = weakref.WeakKeyDictionary()


def shared_constant(value, dtype=tf.int32):
    """`tf.constant(value)`, created once per graph.

    Every reduction axis, reshape shape and scalar otherwise becomes its own Const node: 66
    of the 184 ops of one SUSA's forward and backward pass. Each node of the training graph
    costs memory in TensorFlow's runtime, and X-HRNet-18 has 96 SUSAs.
    """
    if tf.executing_eagerly():
        return tf.constant(value, dtype)
    graph = tf.compat.v1.get_default_graph()
    cache = _SHARED.setdefault(graph, {})
    key = (tf.as_dtype(dtype).name, np.shape(value), tuple(np.ravel(value).tolist()))
    tensor = cache[key]() if key in cache else None
    if tensor is None:
        with graph.control_dependencies(None), tf.name_scope("shared_constants/"):
            tensor = tf.constant(value, dtype)
        cache[key] = weakref.ref(tensor)
    return tensor


def _layer_norm_backward(dgate, gate, normed, rstd, gamma):
    """Gradients of G = sigmoid(LN(u)) for a centred u, in float32: du, dgamma, dbeta."""
    spatial, channels = shared_constant((0, 1, 2)), shared_constant(-1)
    g32 = tf.cast(gate, tf.float32)
    dv = tf.cast(dgate, tf.float32) * g32 * (shared_constant(1.0, tf.float32) - g32)
    dgamma = tf.reduce_sum(dv * normed, axis=spatial)
    dbeta = tf.reduce_sum(dv, axis=spatial)
    dn = dv * tf.cast(gamma, tf.float32)
    # n = u * rsqrt(mean(u^2) + eps)  =>  du = r * (dn - n * mean(dn * n))
    du = rstd * (dn - normed * tf.reduce_mean(dn * normed, axis=channels, keepdims=True))
    return du, dgamma, dbeta


def _centred_conv_backward(du, t, conv_kernel):
    """Gradients of u = t @ (K - mean_out K) + (b - mean b): dt, dK, db."""
    c = t.shape[-1]
    rows, last = shared_constant((-1, c)), shared_constant(-1)
    k = tf.reshape(conv_kernel, shared_constant((c, c)))
    kc = k - tf.reduce_mean(k, axis=last, keepdims=True)
    du2 = tf.reshape(du, rows)
    dt = tf.reshape(tf.matmul(du2, kc, transpose_b=True), tf.shape(t))
    dkc = tf.matmul(tf.reshape(t, rows), du2, transpose_a=True)
    dk = tf.reshape(dkc - tf.reduce_mean(dkc, axis=last, keepdims=True),
                    shared_constant((1, 1, c, c)))
    dbc = tf.reduce_sum(du2, axis=shared_constant(0))
    return dt, dk, dbc - tf.reduce_mean(dbc)


def susa_backward(dy, x, params, saved, pool_axis: int, attend_axis: int, fusion: str):
    """Gradients for (x, group_weight, mean_kernel, mean_bias, conv_kernel, conv_bias,
    ln_gamma, ln_beta) given the output gradient dy and SUSA._forward's saved tensors."""
    group_weight, mean_kernel, _, conv_kernel, _, ln_gamma, _ = params
    e, den, t, normed, rstd, gate = saved
    pool, attend = shared_constant(pool_axis), shared_constant(attend_axis)
    if fusion == "mul":
        dx = dy * gate
        dgate = tf.reduce_sum(dy * x, axis=attend, keepdims=True)
    else:
        dx = dy
        dgate = tf.reduce_sum(dy, axis=attend, keepdims=True)
    du, dgamma, dbeta = _layer_norm_backward(dgate, gate, normed, rstd, ln_gamma)
    dt, dk, dcb = _centred_conv_backward(tf.cast(du, x.dtype), t, conv_kernel)

    # Softmax along the attend axis: dq = p * (dp - sum_b(p * dp)), where
    # sum_b(p * dp) = sum_a(dt * t) is the cheaper form (no full-size product).
    p = e / den
    dx += dt * p
    dp = tf.reduce_sum(dt * x, axis=pool, keepdims=True)
    dq = p * (dp - tf.reduce_sum(dt * t, axis=pool, keepdims=True))
    dmb = tf.reduce_sum(dq, axis=shared_constant((0, 1, 2)))

    # q's weighted mean: kernel[a, c] = g[a] * s[c].
    length = x.shape[pool_axis]
    shape = [1, 1, 1, 1]
    shape[pool_axis] = length
    g = tf.slice(group_weight, shared_constant((0,)), shared_constant((length,)))
    inv_length = shared_constant(1.0 / length, mean_kernel.dtype)
    s = mean_kernel * inv_length
    dx += dq * (tf.reshape(g, shared_constant(shape)) * s)
    dkernel = tf.reduce_sum(x * dq, axis=shared_constant((0, attend_axis)))  # (L, C)
    dg = tf.pad(tf.reduce_sum(dkernel * s, axis=shared_constant(-1)),
                shared_constant([[0, group_weight.shape[0] - length]]))
    dmk = tf.reduce_sum(dkernel * tf.reshape(g, shared_constant((length, 1))),
                        axis=shared_constant(0)) * inv_length
    grads = [dx, dg, dmk, dmb, dk, dcb, dgamma, dbeta]
    return [tf.cast(d, v.dtype) for d, v in zip(grads, [x, *params])]
