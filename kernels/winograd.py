"""Winograd F(4x4, 3x3) for stride-1 3x3 convolutions (Lavin and Gray, 2016).

Each 4x4 block of output comes from a 6x6 block of padded input:
``Y = A^T [(G g G^T) * (B^T d B)] A``.  The 36 element-wise products, summed over
input channels, are 36 independent matrix products (tiles x Cin) @ (Cin x Cout),
run by the direct kernel as 36 "images" of 1x1 convolutions with their own
weights.  This does 4x fewer multiplications than the direct convolution; the
float32 error grows to about 1e-5 of the output's magnitude (the direct kernel:
about 1e-6).
"""
import numpy as np
from numba import prange

from ._numba import jit, pjit

# G (6x3): the kernel transform, applied in float64 at pack time
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])


def transform_kernel(w):
    """(3, 3, Cin, Cout) kernel -> (36, Cin, Cout) transformed kernel ``G g G^T``."""
    u = np.einsum("ai,ijco,bj->abco", _G, w.astype(np.float64), _G)
    return u.reshape(36, *w.shape[2:]).astype(np.float32)


# float32 constants: a Python float would promote the arithmetic to float64
F0, F2, F4, F5, F8 = np.float32(0.0), np.float32(2.0), np.float32(4.0), np.float32(5.0), np.float32(8.0)


@jit
def _bt(d0, d1, d2, d3, d4, d5):
    """B^T applied to one column of six values."""
    return (F4 * d0 - F5 * d2 + d4,
            d3 + d4 - F4 * (d1 + d2),
            F4 * (d1 - d2) - d3 + d4,
            F2 * (d3 - d1) - d2 + d4,
            F2 * (d1 - d3) - d2 + d4,
            F4 * d1 - F5 * d3 + d5)


@jit
def _at(m0, m1, m2, m3, m4, m5):
    """A^T applied to one column of six values."""
    return (m0 + m1 + m2 + m3 + m4,
            m1 - m2 + F2 * (m3 - m4),
            m1 + m2 + F4 * (m3 + m4),
            m1 - m2 + F8 * (m3 - m4) + m5)


@jit
def _store6(v, first, t, ch, r):
    """v[first + j, t, ch] = r[j] for j < 6."""
    v[first, t, ch] = r[0]
    v[first + 1, t, ch] = r[1]
    v[first + 2, t, ch] = r[2]
    v[first + 3, t, ch] = r[3]
    v[first + 4, t, ch] = r[4]
    v[first + 5, t, ch] = r[5]


@jit
def _finish(r, bias, res, relu):
    """The four outputs of one row: bias, the residual's four values, ReLU."""
    a, b, c, d = r[0] + bias + res[0], r[1] + bias + res[1], r[2] + bias + res[2], r[3] + bias + res[3]
    if relu:
        a, b, c, d = max(a, 0.0), max(b, 0.0), max(c, 0.0), max(d, 0.0)
    return a, b, c, d


@pjit
def input_transform_forward(v, inp, tiles_w):
    """``v[:, t, c] = B^T d B`` for every 6x6 input block ``d`` of every channel.

    Parameters
    ----------
    v : float32 (36, N*TH*TW, C), written; element (i*6 + j) of each block's transform
    inp : float32 (N, 4*TH + 2, 4*TW + 2, C), padded (TH, TW: blocks down and across)
    tiles_w : int, TW
    """
    n, hp, wp, c = inp.shape
    tiles = v.shape[1]
    tiles_h = tiles // (n * tiles_w)
    x = inp.reshape(-1)
    for t in prange(tiles):
        img, rest = t // (tiles_h * tiles_w), t % (tiles_h * tiles_w)
        base = ((img * hp + rest // tiles_w * 4) * wp + rest % tiles_w * 4) * c
        row = wp * c
        for ch in range(c):
            o = base + ch
            # rows of the block after B^T along the vertical axis, one column at a time
            c0 = _bt(x[o], x[o + row], x[o + 2 * row], x[o + 3 * row], x[o + 4 * row], x[o + 5 * row])
            o += c
            c1 = _bt(x[o], x[o + row], x[o + 2 * row], x[o + 3 * row], x[o + 4 * row], x[o + 5 * row])
            o += c
            c2 = _bt(x[o], x[o + row], x[o + 2 * row], x[o + 3 * row], x[o + 4 * row], x[o + 5 * row])
            o += c
            c3 = _bt(x[o], x[o + row], x[o + 2 * row], x[o + 3 * row], x[o + 4 * row], x[o + 5 * row])
            o += c
            c4 = _bt(x[o], x[o + row], x[o + 2 * row], x[o + 3 * row], x[o + 4 * row], x[o + 5 * row])
            o += c
            c5 = _bt(x[o], x[o + row], x[o + 2 * row], x[o + 3 * row], x[o + 4 * row], x[o + 5 * row])
            # then B^T across each row; straight-line code so the channel loop vectorises
            _store6(v, 0, t, ch, _bt(c0[0], c1[0], c2[0], c3[0], c4[0], c5[0]))
            _store6(v, 6, t, ch, _bt(c0[1], c1[1], c2[1], c3[1], c4[1], c5[1]))
            _store6(v, 12, t, ch, _bt(c0[2], c1[2], c2[2], c3[2], c4[2], c5[2]))
            _store6(v, 18, t, ch, _bt(c0[3], c1[3], c2[3], c3[3], c4[3], c5[3]))
            _store6(v, 24, t, ch, _bt(c0[4], c1[4], c2[4], c3[4], c4[4], c5[4]))
            _store6(v, 30, t, ch, _bt(c0[5], c1[5], c2[5], c3[5], c4[5], c5[5]))


@pjit
def output_transform_forward(out, m, bias, residual, relu):
    """``out = relu?(A^T m A + bias + residual)`` for every 4x4 output block.

    Parameters
    ----------
    out : float32 (N, OH, OW, Cout), written (blocks past the edge are cut)
    m : float32 (36, N*TH*TW, Cout), the 36 products summed over input channels
    bias : float32 (Cout,)
    residual : float32 (N, OH, OW, Cout), or (0, 0, 0, 0) for none
    relu : bool
    """
    n, oh, ow, cout = out.shape
    tiles = m.shape[1]
    tiles_h, tiles_w = (oh + 3) // 4, (ow + 3) // 4
    has_residual = residual.size > 0
    for t in prange(tiles):
        img, rest = t // (tiles_h * tiles_w), t % (tiles_h * tiles_w)
        y0, x0 = rest // tiles_w * 4, rest % tiles_w * 4
        rows, cols = min(4, oh - y0), min(4, ow - x0)
        zero = (F0, F0, F0, F0)
        for ch in range(cout):
            # A^T down each of the six columns, then across each of the four rows
            k0 = _at(m[0, t, ch], m[6, t, ch], m[12, t, ch], m[18, t, ch], m[24, t, ch], m[30, t, ch])
            k1 = _at(m[1, t, ch], m[7, t, ch], m[13, t, ch], m[19, t, ch], m[25, t, ch], m[31, t, ch])
            k2 = _at(m[2, t, ch], m[8, t, ch], m[14, t, ch], m[20, t, ch], m[26, t, ch], m[32, t, ch])
            k3 = _at(m[3, t, ch], m[9, t, ch], m[15, t, ch], m[21, t, ch], m[27, t, ch], m[33, t, ch])
            k4 = _at(m[4, t, ch], m[10, t, ch], m[16, t, ch], m[22, t, ch], m[28, t, ch], m[34, t, ch])
            k5 = _at(m[5, t, ch], m[11, t, ch], m[17, t, ch], m[23, t, ch], m[29, t, ch], m[35, t, ch])
            r0 = _at(k0[0], k1[0], k2[0], k3[0], k4[0], k5[0])
            r1 = _at(k0[1], k1[1], k2[1], k3[1], k4[1], k5[1])
            r2 = _at(k0[2], k1[2], k2[2], k3[2], k4[2], k5[2])
            r3 = _at(k0[3], k1[3], k2[3], k3[3], k4[3], k5[3])
            if rows == 4 and cols == 4:
                if has_residual:
                    _store4(out, img, y0, x0, ch, _finish(r0, bias[ch], residual[img, y0, x0:x0 + 4, ch], relu))
                    _store4(out, img, y0 + 1, x0, ch, _finish(r1, bias[ch], residual[img, y0 + 1, x0:x0 + 4, ch], relu))
                    _store4(out, img, y0 + 2, x0, ch, _finish(r2, bias[ch], residual[img, y0 + 2, x0:x0 + 4, ch], relu))
                    _store4(out, img, y0 + 3, x0, ch, _finish(r3, bias[ch], residual[img, y0 + 3, x0:x0 + 4, ch], relu))
                else:
                    _store4(out, img, y0, x0, ch, _finish(r0, bias[ch], zero, relu))
                    _store4(out, img, y0 + 1, x0, ch, _finish(r1, bias[ch], zero, relu))
                    _store4(out, img, y0 + 2, x0, ch, _finish(r2, bias[ch], zero, relu))
                    _store4(out, img, y0 + 3, x0, ch, _finish(r3, bias[ch], zero, relu))
            else:  # a block cut by the bottom or right edge
                block = (r0, r1, r2, r3)
                for i in range(rows):
                    r = block[i]
                    for j in range(cols):
                        val = r[j] + bias[ch]
                        if has_residual:
                            val += residual[img, y0 + i, x0 + j, ch]
                        if relu:
                            val = max(val, 0.0)
                        out[img, y0 + i, x0 + j, ch] = val


@jit
def _store4(out, img, y, x, ch, r):
    """out[img, y, x + j, ch] = r[j] for j < 4."""
    out[img, y, x, ch] = r[0]
    out[img, y, x + 1, ch] = r[1]
    out[img, y, x + 2, ch] = r[2]
    out[img, y, x + 3, ch] = r[3]
