"""Pooling with TensorFlow's semantics: windowed max/average and global pools.

"same" padding follows TensorFlow: the output is ceil(size / stride), the
padding is split with the extra row/column at the bottom/right, max-pooling
ignores the padded positions, and average-pooling divides by the number of
real pixels in each window (not by the window size).  A NaN anywhere in a
max-pooling window gives NaN.
"""
import numpy as np
from numba import prange

from . import _checks
from ._numba import inline, pjit


@inline
def _larger(v, m):
    """``v`` if it is larger than ``m`` or NaN, else ``m``: a max that keeps a NaN from either side."""
    return v if v > m or v != v else m


@inline
def _max3x3_forward(dst, r0, r1, r2, x0):
    """``dst[ch]`` = the max of the 3x3 window whose top-left pixel is (row ``r0``, column ``x0``).

    One pass over the channels with nine loads and one store: folded tap by tap into ``dst``,
    LLVM made each conditional store a masked store (``vmaskmovps``), which AMD CPUs run a dozen
    times slower than a plain one (ResNet50's pool1 took 0.5-0.8 ms on a Zen 3).

    Parameters
    ----------
    dst : float32 (C,), written
    r0, r1, r2 : float32 (W, C), three consecutive input rows
    x0 : int, the window's first column
    """
    a0, a1, a2, b0, b1, b2, c0, c1, c2 = r0[x0], r0[x0 + 1], r0[x0 + 2], r1[x0], r1[x0 + 1], r1[x0 + 2], r2[x0], \
        r2[x0 + 1], r2[x0 + 2]
    for ch in range(dst.size):
        top = _larger(a2[ch], _larger(a1[ch], a0[ch]))
        middle = _larger(b2[ch], _larger(b1[ch], b0[ch]))
        bottom = _larger(c2[ch], _larger(c1[ch], c0[ch]))
        dst[ch] = _larger(bottom, _larger(middle, top))


@pjit
def pool2d_forward(out, inp, pool, stride, pad, average, zeros):
    """Windowed max or average pooling; the padding is skipped, or (``zeros``) taken as zeros.

    Parameters
    ----------
    out : float32 (N, OH, OW, C), written
    inp : float32 (N, H, W, C)
    pool : (int, int) window (PH, PW)
    stride : (int, int)
    pad : (int, int) rows and columns of padding before the input (top, left)
    average : bool, True for the mean, False for the max
    zeros : bool, False: over real pixels only (TensorFlow's "same"); True: the padded positions
        are zeros, as after a ``ZeroPadding2D`` (the max of a window that reaches them is at least
        0, the mean divides by the whole window)
    """
    n, oh, ow, c = out.shape
    h, w = inp.shape[1], inp.shape[2]
    for row in prange(n * oh):
        b = row // oh
        y = row % oh
        y0 = max(y * stride[0] - pad[0], 0)
        y1 = min(y * stride[0] - pad[0] + pool[0], h)
        for x in range(ow):
            x0 = max(x * stride[1] - pad[1], 0)
            x1 = min(x * stride[1] - pad[1] + pool[1], w)
            dst = out[b, y, x]  # 1-D views: the channel loops vectorise
            if not average and pool[0] == 3 and pool[1] == 3 and y1 - y0 == 3 and x1 - x0 == 3:  # a whole 3x3 max window
                _max3x3_forward(dst, inp[b, y0], inp[b, y0 + 1], inp[b, y0 + 2], x0)
                continue
            for ch in range(c):
                dst[ch] = 0.0 if average else -np.inf
            for yy in range(y0, y1):
                for xx in range(x0, x1):
                    src = inp[b, yy, xx]
                    for ch in range(c):
                        v = src[ch]
                        if average:
                            dst[ch] += v
                        elif v > dst[ch] or v != v:  # a NaN anywhere in the window gives NaN
                            dst[ch] = v
            if average:
                scale = np.float32(1.0 / (pool[0] * pool[1] if zeros else (y1 - y0) * (x1 - x0)))
                for ch in range(c):
                    dst[ch] *= scale
            elif zeros and (y1 - y0 < pool[0] or x1 - x0 < pool[1]):
                for ch in range(c):
                    if dst[ch] < 0:  # a padded zero is larger (a NaN stays)
                        dst[ch] = 0.0


@pjit
def global_pool_forward(out, inp, average):
    """Mean or max over the spatial axes.

    Parameters
    ----------
    out : float32 (N, C), written
    inp : float32 (N, H*W, C)
    average : bool
    """
    n, hw, c = inp.shape
    for b in prange(n):
        for ch in range(c):
            out[b, ch] = 0.0 if average else -np.inf
        for p in range(hw):
            for ch in range(c):
                v = inp[b, p, ch]
                if average:
                    out[b, ch] += v
                elif v > out[b, ch] or v != v:  # a NaN gives NaN
                    out[b, ch] = v
        if average:
            for ch in range(c):
                out[b, ch] /= hw


def _pool2d(func, x, pool_size, strides, padding, average, out):
    x = _checks.array(func, "x", x, ndim=4)
    pool = _checks.pair(func, "pool_size", pool_size)
    stride = pool if strides is None else _checks.pair(func, "strides", strides)
    mode = _checks.padding_mode(func, padding)
    n, h, w, c = x.shape
    oh, top, _ = _checks.output_size(func, h, pool[0], stride[0], mode)
    ow, left, _ = _checks.output_size(func, w, pool[1], stride[1], mode)
    out = _checks.output(func, out, (n, oh, ow, c))
    pool2d_forward(out, x, pool, stride, (top, left), average, False)
    return out


def max_pool2d(x, pool_size=2, strides=None, padding="valid", out=None):
    """Max pooling of an NHWC batch (Keras ``MaxPooling2D``; ``strides`` defaults to ``pool_size``).

    Parameters
    ----------
    x : float32 (N, H, W, C)
    pool_size, strides : int or (int, int)
    padding : "valid" or "same"
    out : float32 (N, OH, OW, C), optional
    """
    return _pool2d("max_pool2d", x, pool_size, strides, padding, False, out)


def avg_pool2d(x, pool_size=2, strides=None, padding="valid", out=None):
    """Average pooling of an NHWC batch (Keras ``AveragePooling2D``).

    With "same" padding each window's sum is divided by its count of real
    pixels, as TensorFlow does.
    """
    return _pool2d("avg_pool2d", x, pool_size, strides, padding, True, out)


def _global_pool(func, x, average, out):
    x = _checks.array(func, "x", x, ndim=4)
    n, h, w, c = x.shape
    out = _checks.output(func, out, (n, c))
    global_pool_forward(out, x.reshape(n, h * w, c), average)
    return out


def global_avg_pool2d(x, out=None):
    """Mean over H and W: (N, H, W, C) -> (N, C)."""
    return _global_pool("global_avg_pool2d", x, True, out)


def global_max_pool2d(x, out=None):
    """Max over H and W: (N, H, W, C) -> (N, C)."""
    return _global_pool("global_max_pool2d", x, False, out)
