"""Winograd F(2x2, 3x3), in float32 and in bf16, for stride-1 3x3 convolutions.

Each 2x2 block of output comes from a 4x4 block of padded input:
``Y = A^T [(G g G^T) * (B^T d B)] A``.  The 16 element-wise products, summed over input
channels, run on the direct kernel as 16 "images" of 1x1 convolutions with their own
weights (as ``winograd``'s F(4x4, 3x3) runs its 36): 2.25x fewer multiplications than the
direct convolution, where F(4x4) makes 4x fewer with weights 4x the direct ones.  In bf16 (on
``vdpbf16ps``) the transformed weights ``G g G^T`` are rounded to bf16 at pack time, the
transformed inputs ``B^T d B`` as they are made; in either precision the sums are float32, and
``A^T .. A``, the bias, the residual and the ReLU are applied in float32.

Why F(2x2) in bf16 and not F(4x4): the transforms' coefficients (0, +-1, 1/2 here; up to 8
and 5 in F(4x4)) multiply the rounding error.  On a 28x28x128 layer (He-normal weights,
inputs after a ReLU, against float64), the error's RMS relative to the output's: direct bf16
(weights and inputs rounded) 2.4e-3, F(2x2) 3.4e-3, F(4x4) 2.1e-2.

Why F(2x2) in float32 too: where a layer has few output pixels (7x7 at batch 1), F(4x4)'s
weights are read from memory for 4 blocks, and the direct kernel won; F(2x2)'s (16/9 the direct
ones) serve 16 blocks.  ResNet50's 7x7x512 -> 512 at batch 1 (Zen 4, weights evicted, same process):
direct 1.16 ms, F(4x4) 1.10 ms, F(2x2) 0.81 ms.
"""
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from . import _memory
from ._numba import PANEL, VECTOR_FLOATS, jit, pjit
from ._tile import rounded_vector
from .bf16 import _bf16_bits, to_bf16
from .winograd import _input_block_codegen, _is_flat, block_origin, inside_bits
from .winograd import pack_transformed as pack_float32

PRODUCTS = 16  # (2 + 2) x (2 + 2)
BLOCK = 2      # output rows and columns of a block

# G (4x3): the kernel transform
_G = np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]])


def untransform_kernel(u):
    """The (3, 3, Cin, Cout) kernel ``g`` back from its 16 products' weights (16, Cin, Cout) ``u = G g G^T`` (element
    ``4a + b``), float32.

    ``g = P u P^T`` with ``P = [[1, 0, 0, 0], [0, 1, -1, 0], [0, 0, 0, 1]]`` (``P G`` is the identity): each
    weight is one to four of ``u``'s, so it comes back to float32's rounding of them.
    """
    u = u.reshape(4, 4, *u.shape[1:]).astype(np.float64)
    rows = (u[0], u[1] - u[2], u[3])                                  # P u: (3 rows, 4 columns, Cin, Cout)
    return np.stack([np.stack((r[0], r[1] - r[2], r[3])) for r in rows]).astype(np.float32)


def pack_transformed(w):
    """``G g G^T`` of a (3, 3, Cin, Cout) kernel, rounded to bf16 and packed for the direct kernel.

    Returns uint16 (16, ceil(Cout / PANEL), Cin/2, PANEL, 2), 64-byte aligned: ``bf16.pack_bf16``'s
    panels with a weight set per product (element ``4a + b`` of the transform).  Cin must be even.
    The products are worked out as the float32 packing's (``winograd.pack_transformed(w, PANEL, _G)``),
    four at a time (a quarter of it in float32 at once), then rounded.
    """
    if w.shape[2] % 2:
        raise ValueError(f"winograd2.pack_transformed: {w.shape[2]} input channels, an even count is needed")
    _, _, cin, cout = w.shape
    nblk = -(-cout // PANEL)
    panels = _memory.empty((PRODUCTS, nblk, cin // 2, PANEL, 2), np.uint16)
    for a in range(4):
        four = range(4 * a, 4 * a + 4)
        bits = to_bf16(pack_float32(w, PANEL, _G, four))                           # (4, nblk, Cin, PANEL)
        panels[four.start:four.stop] = bits.reshape(4, nblk, cin // 2, 2, PANEL).transpose(0, 1, 2, 4, 3)
    return panels


@intrinsic
def _float_bits(typingctx, x):
    """The bits of a float32, as a uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(x), codegen


def _stored(value, v):
    """``value`` as ``v`` holds it: a float32 as is, or its bf16 bits (``bf16._bf16_bits``) for a uint16 ``v``."""


@overload(_stored)
def _stored_overload(value, v):
    if v.dtype == types.uint16:
        return lambda value, v: _bf16_bits(_float_bits(value))
    return lambda value, v: value


@jit
def _bt(d0, d1, d2, d3):
    """B^T applied to one column of four values: B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@intrinsic
def _input_block_vectors(typingctx, flat, out, x, src, row, pixel, rows, cols):
    """``B^T d B`` of ``VECTOR_FLOATS`` channels of one 4x4 block, in vector registers: ``d[i][j]`` at
    ``x[src + i * row + j * pixel]``, or zero where bit ``i`` of ``rows`` or bit ``j`` of ``cols`` is clear
    (the padding: ``winograd._input_block_codegen``), element ``4i + j`` of the result at
    ``flat[out + (4i + j) * pixel]``, rounded to bf16 where ``flat`` is uint16, else float32.

    Written as explicit vectors: as a Numba loop over channels (16 loads and 16 stores a channel, in two
    arrays LLVM cannot tell apart) it stayed scalar, 0.7 ms for 56x56x64 (Zen 4).
    """
    if not (isinstance(flat, types.Array) and flat.ndim == 1 and flat.layout == "C"
            and flat.dtype in (types.uint16, types.float32)
            and _is_flat(x)
            and all(isinstance(a, types.Integer) for a in (out, src, row, pixel, rows, cols))):
        return None

    def codegen(context, builder, signature, args):
        rounds = signature.args[0].dtype == types.uint16
        kind = ir.VectorType(ir.IntType(16) if rounds else ir.FloatType(), VECTOR_FLOATS)
        out_data = context.make_array(signature.args[0])(context, builder, args[0]).data

        def store(at, value):
            place = builder.bitcast(builder.gep(out_data, [at]), kind.as_pointer())
            if rounds:
                builder.store(rounded_vector(builder, value.value), place, align=2)
            else:
                builder.store(value.value, place, align=4)

        _input_block_codegen(context, builder, signature, args, _bt.py_func, 4, store)
        return context.get_dummy_value()

    return types.void(flat, out, x, src, row, pixel, rows, cols), codegen


@pjit
def input_transform_forward(v, inp, tiles_w, top, left):
    """``v[t, 4i + j, c] = (B^T d B)[i, j]`` for every 4x4 input block ``d`` (blocks 2 apart) of every channel,
    rounded to bf16 where ``v`` is uint16.

    The blocks tile the input padded with ``top`` rows and ``left`` columns of zeros (and as many at the
    bottom and right as the last blocks need), read from the unpadded input with the padding's rows and
    columns as zeros (as ``winograd.input_transform_forward``).  ``VECTOR_FLOATS`` channels at a time in
    vector registers (``_input_block_vectors``), a last few one by one.

    Parameters
    ----------
    v : float32, or uint16 (bf16), (N*TH*TW, 16, C), written
    inp : float32 (N, H, W, C), C-contiguous, unpadded; 2*TH + 2 >= top + H, 2*TW + 2 >= left + W
        (TH, TW: blocks down and across)
    tiles_w : int, TW
    top, left : int, the padding above and to the left
    """
    n, h, w, c = inp.shape
    tiles = v.shape[0]
    tiles_h = tiles // (n * tiles_w)
    x, flat = inp.reshape(-1), v.reshape(-1)
    vectors = c - c % VECTOR_FLOATS
    zero = np.float32(0.0)
    for t in prange(tiles):
        img, y0, x0 = block_origin(t, tiles_h, tiles_w, BLOCK)
        y0, x0 = y0 - top, x0 - left  # the block's first row and column in the unpadded input
        rows, cols = inside_bits(y0, 4, h), inside_bits(x0, 4, w)
        first = ((img * h + y0) * w + x0) * c  # (before the image at its top or left edge: never read there)
        o = t * PRODUCTS * c
        for ch in range(0, vectors, VECTOR_FLOATS):
            _input_block_vectors(flat, o + ch, x, first + ch, w * c, c, rows, cols)
        if vectors < c:  # a last few channels, one at a time, through one 4x4 block
            d = np.zeros((4, 4), np.float32)
            for ch in range(vectors, c):
                for i in range(4):
                    for j in range(4):
                        d[i, j] = inp[img, y0 + i, x0 + j, ch] if (rows >> i) & (cols >> j) & 1 else zero
                # B^T down the columns
                c0, c1 = _bt(d[0, 0], d[1, 0], d[2, 0], d[3, 0]), _bt(d[0, 1], d[1, 1], d[2, 1], d[3, 1])
                c2, c3 = _bt(d[0, 2], d[1, 2], d[2, 2], d[3, 2]), _bt(d[0, 3], d[1, 3], d[2, 3], d[3, 3])
                for i in range(4):  # then B across each row
                    r = _bt(c0[i], c1[i], c2[i], c3[i])
                    for k in range(4):
                        v[t, 4 * i + k, ch] = _stored(r[k], v)


@pjit
def output_transform_forward(out, m, bias, residual, relu, rounded):
    """``out = relu?(A^T m A + bias + residual)`` for every 2x2 output block.

    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].  A block cut by the edge (an odd output size) writes its
    missing row or column onto the last one it has, before the right values (all of a channel's reads
    come before its writes, so ``out`` may be ``residual``).

    Parameters
    ----------
    out : float32 (N, OH, OW, Cout), written
    m : float32 (16, N*TH*TW, Cout), the 16 products summed over input channels
    bias : float32 (Cout,)
    residual : float32 (N, OH, OW, Cout), or (0, 0, 0, 0) for none
    relu : bool
    rounded : uint16 (N, OH, OW, Cout), or (0, 0, 0, 0): when not empty the output goes there too, rounded to
        bf16 (the next convolution's unpadded bf16 input: ``conv.Conv2DPlan.feed``)
    """
    _, oh, ow, cout = out.shape
    tiles = m.shape[1]
    tiles_h, tiles_w = (oh + 1) // BLOCK, (ow + 1) // BLOCK
    has_residual = residual.size > 0
    flat, y = m.reshape(-1), out.reshape(-1)
    res = residual.reshape(-1) if has_residual else y  # (read only when has_residual)
    to_bf16, y16 = rounded.size > 0, rounded.reshape(-1)
    plane = tiles * cout  # the products' offsets, unsigned
    p1, p2, p3, p4, p5 = np.uint64(plane), np.uint64(2 * plane), np.uint64(3 * plane), np.uint64(4 * plane), np.uint64(5 * plane)
    p6, p7, p8, p9, p10 = np.uint64(6 * plane), np.uint64(7 * plane), np.uint64(8 * plane), np.uint64(9 * plane), np.uint64(10 * plane)
    p11, p12, p13, p14, p15 = (np.uint64(11 * plane), np.uint64(12 * plane), np.uint64(13 * plane), np.uint64(14 * plane),
                               np.uint64(15 * plane))
    zero = np.float32(0.0)
    for t in prange(tiles):
        img, y0, x0 = block_origin(t, tiles_h, tiles_w, BLOCK)
        y1, x1 = min(y0 + 1, oh - 1), min(x0 + 1, ow - 1)
        # unsigned offsets: no negative-index test per load, and the loop over channels vectorises
        o00, o01 = np.uint64(((img * oh + y0) * ow + x0) * cout), np.uint64(((img * oh + y0) * ow + x1) * cout)
        o10, o11 = np.uint64(((img * oh + y1) * ow + x0) * cout), np.uint64(((img * oh + y1) * ow + x1) * cout)
        m0 = np.uint64(t * cout)
        for chi in range(cout):
            ch = np.uint64(chi)
            k = m0 + ch
            # A^T down each column, then across each row
            a0 = flat[k] + flat[k + p4] + flat[k + p8]
            b0 = flat[k + p4] - flat[k + p8] - flat[k + p12]
            a1 = flat[k + p1] + flat[k + p5] + flat[k + p9]
            b1 = flat[k + p5] - flat[k + p9] - flat[k + p13]
            a2 = flat[k + p2] + flat[k + p6] + flat[k + p10]
            b2 = flat[k + p6] - flat[k + p10] - flat[k + p14]
            a3 = flat[k + p3] + flat[k + p7] + flat[k + p11]
            b3 = flat[k + p7] - flat[k + p11] - flat[k + p15]
            v00, v01 = a0 + a1 + a2 + bias[ch], a1 - a2 - a3 + bias[ch]
            v10, v11 = b0 + b1 + b2 + bias[ch], b1 - b2 - b3 + bias[ch]
            if has_residual:
                v00, v01, v10, v11 = v00 + res[o00 + ch], v01 + res[o01 + ch], v10 + res[o10 + ch], v11 + res[o11 + ch]
            if relu:
                v00, v01, v10, v11 = max(v00, zero), max(v01, zero), max(v10, zero), max(v11, zero)
            y[o11 + ch] = v11
            y[o10 + ch] = v10
            y[o01 + ch] = v01
            y[o00 + ch] = v00
            if to_bf16:  # (in the same order: an edge block's repeated row or column ends right)
                y16[o11 + ch] = _stored(v11, y16)
                y16[o10 + ch] = _stored(v10, y16)
                y16[o01 + ch] = _stored(v01, y16)
                y16[o00 + ch] = _stored(v00, y16)
