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
from numba import carray, prange

from . import _memory
from ._numba import VECTOR_FLOATS, inline, jit, pjit, stack_f32

LANES = VECTOR_FLOATS  # channels transformed at once, in stack buffers the loops vectorise over
# stack buffer sizes as module constants, so Numba sees literals
LANES36, LANES24, LANES16 = 36 * LANES, 24 * LANES, 16 * LANES

# G (6x3): the kernel transform, applied in float64 at pack time
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])


def transform_kernel(w):
    """(3, 3, Cin, Cout) kernel -> (36, Cin, Cout) transformed kernel ``G g G^T``."""
    u = np.einsum("ai,ijco,bj->abco", _G, w.astype(np.float64), _G)
    return u.reshape(36, *w.shape[2:]).astype(np.float32)


def _combine(coefficients, terms):
    """``sum(c * t)`` over the non-zero coefficients (a zero term adds nothing; ``G`` is a third zeros)."""
    total = None
    for c, t in zip(coefficients, terms):
        if c:
            total = c * t if total is None else total + c * t
    return total


def pack_transformed(w, panel):
    """``transform_kernel(w)`` packed as the direct kernel packs its weights, made one panel at a time.

    Returns float32 (36, ceil(Cout / panel), Cin, panel), 64-byte aligned, zero past Cout: the
    ``(S, nblk, K, 64)`` panels of ``conv.pack_conv2d`` with a weight set per product.  Each panel
    is transformed in float64 with elementwise operations (no BLAS, whose threads would spin beside
    Numba's; no einsum, which took 20 ms per 256-channel layer), so the transient memory is a few
    panels' worth rather than two float64 copies of the whole transformed kernel.
    """
    _, _, cin, cout = w.shape
    nblk = -(-cout // panel)
    out = _memory.empty((36, nblk, cin, panel))
    for blk in range(nblk):
        c0 = blk * panel
        k = min(panel, cout - c0)
        g = w[:, :, :, c0:c0 + k].astype(np.float64)                    # (3 rows i, 3 columns j, Cin, k)
        t = np.stack([_combine(_G[a], g) for a in range(6)])            # G g: (6 rows a, 3 columns j, Cin, k)
        for b in range(6):                                               # (G g G^T)[a, b] for every a at once
            out[b::6, blk, :, :k] = _combine(_G[b], t.transpose(1, 0, 2, 3))
        if k < panel:
            out[:, blk, :, k:] = 0.0
    return out


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


@inline
def _bt_lanes(dst, out0, out_step, src, in0, in_step, lanes):
    """dst[out0 + i * out_step, :lanes] = (B^T applied to src[in0 + k * in_step, :lanes])[i], i < 6."""
    for l in range(lanes):
        r = _bt(src[in0, l], src[in0 + in_step, l], src[in0 + 2 * in_step, l], src[in0 + 3 * in_step, l],
                src[in0 + 4 * in_step, l], src[in0 + 5 * in_step, l])
        dst[out0, l] = r[0]  # (a loop over r[i] would index the tuple at run time)
        dst[out0 + out_step, l] = r[1]
        dst[out0 + 2 * out_step, l] = r[2]
        dst[out0 + 3 * out_step, l] = r[3]
        dst[out0 + 4 * out_step, l] = r[4]
        dst[out0 + 5 * out_step, l] = r[5]


@inline
def _at_lanes(dst, out0, out_step, src, in0, in_step, lanes):
    """dst[out0 + i * out_step, :lanes] = (A^T applied to src[in0 + k * in_step, :lanes])[i], i < 4."""
    for l in range(lanes):
        r = _at(src[in0, l], src[in0 + in_step, l], src[in0 + 2 * in_step, l], src[in0 + 3 * in_step, l],
                src[in0 + 4 * in_step, l], src[in0 + 5 * in_step, l])
        dst[out0, l] = r[0]
        dst[out0 + out_step, l] = r[1]
        dst[out0 + 2 * out_step, l] = r[2]
        dst[out0 + 3 * out_step, l] = r[3]


@pjit
def input_transform_forward(v, inp, tiles_w):
    """``v[t, :, c] = B^T d B`` for every 6x6 input block ``d`` of every channel.

    Block by block (``t``), so each block's 36 values are one contiguous run: 36
    planes of ``tiles * C`` would be 36 store streams a multiple of 4 KiB apart,
    which share one L1 set and ran 4x slower at 14x14x256.  ``LANES`` channels at a
    time go through stack buffers: the loops over them vectorise (in place, the 36
    loads and 36 stores would need more overlap checks than LLVM makes, and stay scalar).

    Parameters
    ----------
    v : float32 (N*TH*TW, 36, C), written; element (i*6 + j) of each block's transform
    inp : float32 (N, 4*TH + 2, 4*TW + 2, C), padded (TH, TW: blocks down and across)
    tiles_w : int, TW
    """
    n, hp, wp, c = inp.shape
    tiles = v.shape[0]
    tiles_h = tiles // (n * tiles_w)
    x, flat = inp.reshape(-1), v.reshape(-1)
    row, pixel = np.uint64(wp * c), np.uint64(c)  # unsigned: no negative-index test per load
    for t in prange(tiles):
        d = carray(stack_f32(LANES36), (36, LANES))
        e = carray(stack_f32(LANES36), (36, LANES))
        img, rest = t // (tiles_h * tiles_w), t % (tiles_h * tiles_w)
        base = np.uint64(((img * hp + rest // tiles_w * 4) * wp + rest % tiles_w * 4) * c)
        out = np.uint64(t * 36 * c)
        for ch0 in range(0, c, LANES):
            if ch0 + LANES <= c:  # a constant lane count: the loops vectorise without remainders
                _input_block(flat, out + np.uint64(ch0), x, base + np.uint64(ch0), row, pixel, d, e, LANES)
            else:
                _input_block(flat, out + np.uint64(ch0), x, base + np.uint64(ch0), row, pixel, d, e, c - ch0)


@inline
def _input_block(flat, out, x, src, row, pixel, d, e, lanes):
    """Transform ``lanes`` channels of one 6x6 block from ``x[src + ...]`` into ``flat[out + ...]``."""
    for i in range(6):
        for j in range(6):
            at = src + np.uint64(i) * row + np.uint64(j) * pixel
            for l in range(lanes):
                d[i * 6 + j, l] = x[at + np.uint64(l)]
    for j in range(6):  # B^T down each column, then across each row
        _bt_lanes(e, j, 6, d, j, 6, lanes)
    for i in range(6):
        _bt_lanes(d, 6 * i, 1, e, 6 * i, 1, lanes)
    for k in range(36):
        at = out + np.uint64(k) * pixel
        for l in range(lanes):
            flat[at + np.uint64(l)] = d[k, l]


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
    flat, y, res = m.reshape(-1), out.reshape(-1), residual.reshape(-1)
    plane, pixel, row = np.uint64(tiles * cout), np.uint64(cout), np.uint64(ow * cout)
    for t in prange(tiles):
        d = carray(stack_f32(LANES36), (36, LANES))
        e = carray(stack_f32(LANES24), (24, LANES))
        f = carray(stack_f32(LANES16), (16, LANES))
        img, rest = t // (tiles_h * tiles_w), t % (tiles_h * tiles_w)
        y0, x0 = rest // tiles_w * 4, rest % tiles_w * 4
        rows, cols = min(4, oh - y0), min(4, ow - x0)
        dst = np.uint64(((img * oh + y0) * ow + x0) * cout)
        for ch0 in range(0, cout, LANES):
            lanes = min(LANES, cout - ch0)
            for k in range(36):
                src = np.uint64(k) * plane + np.uint64(t * cout + ch0)
                for l in range(lanes):
                    d[k, l] = flat[src + np.uint64(l)]
            for j in range(6):  # A^T down each column, then across each row
                _at_lanes(e, j, 6, d, j, 6, lanes)
            for i in range(4):
                _at_lanes(f, 4 * i, 1, e, 6 * i, 1, lanes)
            for i in range(rows):
                for j in range(cols):
                    o = dst + np.uint64(i) * row + np.uint64(j) * pixel + np.uint64(ch0)
                    for l in range(lanes):
                        val = f[i * 4 + j, l] + bias[ch0 + l]
                        if has_residual:
                            val += res[o + np.uint64(l)]
                        if relu:
                            val = max(val, F0)
                        y[o + np.uint64(l)] = val
