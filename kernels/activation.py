"""Elementwise activations beyond the plain ReLU: sigmoid, tanh, and Keras's general ReLU
(``max_value`` as in relu6, ``negative_slope`` as in LeakyReLU, ``threshold``).

The engine runs them in place on the output buffer of the layer they are fused into.
"""
import math

import numpy as np
from numba import prange

from . import _checks
from ._numba import pjit

KINDS = {"relu": 0, "sigmoid": 1, "tanh": 2}


@pjit
def activation_forward(out, inp, kind, max_value, negative_slope, threshold):
    """Elementwise activation, flat; ``out`` may be ``inp`` (in place).

    kind 0 (relu): ``y = x if x > threshold else 0``, then clipped to [0, max_value] when
    max_value is finite, then ``y -= negative_slope * max(threshold - x, 0)`` (Keras's order);
    kind 1: ``1 / (1 + exp(-x))``; kind 2: ``tanh(x)``.

    Parameters
    ----------
    out, inp : float32 (L,)
    kind : int, 0 relu, 1 sigmoid, 2 tanh
    max_value, negative_slope, threshold : float (max_value ``inf`` for none)
    """
    for i in prange(out.shape[0]):
        v = inp[i]
        if kind == 1:
            y = 1.0 / (1.0 + math.exp(-v))
        elif kind == 2:
            y = math.tanh(v)
        else:
            y = v if v > threshold else 0.0
            if max_value < math.inf:
                y = min(max(y, 0.0), max_value)
            if negative_slope != 0.0:
                y -= negative_slope * max(threshold - v, 0.0)
        out[i] = y


def activation(x, kind, max_value=None, negative_slope=0.0, threshold=0.0, out=None):
    """Apply ``kind`` ("relu", "sigmoid" or "tanh") elementwise; ``out=x`` works in place.

    Parameters
    ----------
    x : float32 (...)
    kind : "relu", "sigmoid" or "tanh"
    max_value : float >= 0 or None, negative_slope : float >= 0, threshold : float
        Keras's ``relu`` options (relu only): relu6 is ``max_value=6``, LeakyReLU(a) is ``negative_slope=a``.
    out : float32 like x, optional
    """
    if kind not in KINDS:
        raise ValueError(f"activation: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    for name, value in (("negative_slope", negative_slope), ("threshold", threshold), ("max_value", max_value)):
        if value is not None and (isinstance(value, bool) or not np.isfinite(value)):
            raise ValueError(f"activation: {name} must be a finite number, got {value!r}")
    if max_value is not None and max_value < 0 or negative_slope < 0:
        raise ValueError("activation: max_value and negative_slope must not be negative")
    x = _checks.array("activation", "x", x)
    out = _checks.output("activation", out, x.shape)
    activation_forward(out.reshape(-1), x.reshape(-1), KINDS[kind], math.inf if max_value is None else float(max_value),
                       float(negative_slope), float(threshold))
    return out
