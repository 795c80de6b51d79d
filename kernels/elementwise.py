"""Channel-wise and element-wise kernels: batch-norm, bias, ReLU, fused add+ReLU, softmax.

Every array is viewed as (rows, C) with C the last (channel) axis, so one
kernel serves NHWC images and (N, features) vectors alike.
"""
import numpy as np
from numba import prange

from . import _checks
from ._numba import jit, pjit


@pjit
def scale_shift_forward(out, inp, scale, shift, relu):
    """``out = relu?(inp * scale + shift)`` along the last axis.

    Parameters
    ----------
    out : float32 (R, C), written
    inp : float32 (R, C)
    scale, shift : float32 (C,)
    relu : bool
    """
    rows, channels = inp.shape
    for r in prange(rows):
        for c in range(channels):
            v = inp[r, c] * scale[c] + shift[c]
            if relu:
                v = max(v, 0.0)
            out[r, c] = v


@pjit
def add_forward(out, a, b, relu):
    """``out = relu?(a + b)``, flat.

    Parameters
    ----------
    out, a, b : float32 (L,)
    relu : bool
    """
    for i in prange(out.shape[0]):
        v = a[i] + b[i]
        if relu:
            v = max(v, 0.0)
        out[i] = v


@pjit
def relu_forward(out, inp):
    """``out = max(inp, 0)``, flat.

    Parameters
    ----------
    out, inp : float32 (L,)
    """
    for i in prange(out.shape[0]):
        out[i] = max(inp[i], 0.0)


@jit
def softmax_forward(out, inp):
    """Numerically stable softmax over the last axis.

    Parameters
    ----------
    out, inp : float32 (R, C)
    """
    rows, channels = inp.shape
    for r in range(rows):
        top = inp[r, 0]
        for c in range(1, channels):
            top = max(top, inp[r, c])
        total = 0.0
        for c in range(channels):
            e = np.exp(inp[r, c] - top)
            out[r, c] = e
            total += e
        for c in range(channels):
            out[r, c] = out[r, c] / total


def _channels_last(func, x):
    x = _checks.array(func, "x", x)
    if x.ndim < 1:
        raise ValueError(f"{func}: x must have at least one dimension")
    return x, x.reshape(-1, x.shape[-1])


def batch_norm_params(func, channels, gamma, beta, mean, var, epsilon):
    """Per-channel (scale, shift) of an inference batch-norm: y = x * scale + shift."""
    mean = _checks.vector(func, "mean", mean, channels)
    var = _checks.vector(func, "var", var, channels)
    gamma = _checks.vector(func, "gamma", gamma, channels)
    beta = _checks.vector(func, "beta", beta, channels)
    if mean is None or var is None:
        raise ValueError(f"{func}: mean and var are required")
    if not np.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"{func}: epsilon must be a non-negative number, got {epsilon!r}")
    if np.any(var + epsilon <= 0):
        raise ValueError(f"{func}: var + epsilon must be positive in every channel")
    inv = 1.0 / np.sqrt(var.astype(np.float64) + epsilon)
    scale = inv if gamma is None else gamma * inv
    shift = -mean * scale if beta is None else beta - mean * scale
    return scale.astype(np.float32), shift.astype(np.float32)


def batch_norm(x, gamma, beta, mean, var, epsilon=1e-3, relu=False, out=None):
    """Inference batch-normalisation over the last axis, as Keras computes it.

    ``out = gamma * (x - mean) / sqrt(var + epsilon) + beta``; ``gamma`` or
    ``beta`` may be None (Keras ``scale=False`` / ``center=False``).

    Parameters
    ----------
    x : float32 (..., C)
    gamma, beta : float32 (C,) or None
    mean, var : float32 (C,)
    epsilon : float
    relu : bool, apply ReLU after the normalisation
    out : float32 like x, optional
    """
    x, rows = _channels_last("batch_norm", x)
    scale, shift = batch_norm_params("batch_norm", x.shape[-1], gamma, beta, mean, var, epsilon)
    out = _checks.output("batch_norm", out, x.shape)
    scale_shift_forward(out.reshape(rows.shape), rows, scale, shift, bool(relu))
    return out


def fold_batch_norm(w, bias, gamma, beta, mean, var, epsilon=1e-3):
    """Fold an inference batch-norm into the convolution or dense layer before it.

    Parameters
    ----------
    w : float32 (KH, KW, Cin, Cout) or (Cin, Cout), the layer's kernel
    bias : float32 (Cout,) or None
    gamma, beta, mean, var, epsilon : the batch-norm's parameters (gamma/beta may be None)

    Returns
    -------
    (w_folded, bias_folded) : float32 arrays of the shapes of ``w`` and (Cout,)
    """
    w = _checks.array("fold_batch_norm", "w", w)
    if w.ndim not in (2, 4):
        raise ValueError(f"fold_batch_norm: w must be a (KH, KW, Cin, Cout) or (Cin, Cout) kernel, got shape {w.shape}")
    cout = w.shape[-1]
    bias = _checks.vector("fold_batch_norm", "bias", bias, cout)
    scale, shift = batch_norm_params("fold_batch_norm", cout, gamma, beta, mean, var, epsilon)
    folded = (w.astype(np.float64) * scale).astype(np.float32)
    new_bias = shift if bias is None else (bias.astype(np.float64) * scale + shift).astype(np.float32)
    return folded, new_bias


def bias_add(x, bias, relu=False, out=None):
    """``out = relu?(x + bias)`` with ``bias`` (C,) along the last axis of ``x``."""
    x, rows = _channels_last("bias_add", x)
    bias = _checks.vector("bias_add", "bias", bias, x.shape[-1])
    if bias is None:
        raise ValueError("bias_add: bias is required")
    out = _checks.output("bias_add", out, x.shape)
    scale_shift_forward(out.reshape(rows.shape), rows, np.ones_like(bias), bias, bool(relu))
    return out


def add_relu(a, b, relu=True, out=None):
    """Fused ``out = max(a + b, 0)`` (``relu=False``: a plain add), e.g. a residual join."""
    a = _checks.array("add_relu", "a", a)
    b = _checks.array("add_relu", "b", b)
    if a.shape != b.shape:
        raise ValueError(f"add_relu: a and b must have the same shape, got {a.shape} and {b.shape}")
    out = _checks.output("add_relu", out, a.shape)
    add_forward(out.reshape(-1), a.reshape(-1), b.reshape(-1), bool(relu))
    return out


def relu(x, out=None):
    """``out = max(x, 0)``; NaN stays NaN."""
    x = _checks.array("relu", "x", x)
    out = _checks.output("relu", out, x.shape)
    relu_forward(out.reshape(-1), x.reshape(-1))
    return out


def softmax(x, out=None):
    """Softmax over the last axis, stable for large logits."""
    x, rows = _channels_last("softmax", x)
    out = _checks.output("softmax", out, x.shape)
    softmax_forward(out.reshape(rows.shape), rows)
    return out
