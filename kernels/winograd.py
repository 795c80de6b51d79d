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
from llvmlite import ir
from numba import carray, prange, types
from numba.extending import intrinsic

from . import _memory
from ._numba import VECTOR_FLOATS, inline, jit, pjit, stack_f32
from ._tile import store_vector

LANES = VECTOR_FLOATS  # channels transformed at once: in vector registers, or a last few in stack buffers
# stack buffer sizes as module constants, so Numba sees literals
LANES36, LANES24, LANES16 = 36 * LANES, 24 * LANES, 16 * LANES

# G (6x3): the kernel transform, applied in float64 at pack time
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])


def transform_kernel(w):
    """(3, 3, Cin, Cout) kernel -> (36, Cin, Cout) transformed kernel ``G g G^T``."""
    u = np.einsum("ai,ijco,bj->abco", _G, w.astype(np.float64), _G)
    return u.reshape(36, *w.shape[2:]).astype(np.float32)


def pack_transformed(w, panel, transform=None, products=None):
    """``transform_kernel(w)`` packed as the direct kernel packs its weights.

    Returns float32 (36, ceil(Cout / panel), Cin, panel), 64-byte aligned, zero past Cout: the
    ``(S, nblk, K, 64)`` panels of ``conv.pack_conv2d`` with a weight set per product.  ``transform``: G, by
    default this module's (6, 3); F(2x2, 3x3)'s (4, 3) (``winograd2._G``) gives its 16 products the same
    way, (16, ceil(Cout / panel), Cin, panel).  ``products``: a range of them only (``winograd2`` rounds
    four at a time to bf16), else all.  Worked out in float64 by ``transform_forward`` (numpy's
    elementwise version took 0.10 s of ResNet50's first pass).
    """
    _, _, cin, cout = w.shape
    transform = np.ascontiguousarray(_G if transform is None else transform, np.float64)
    products = range(transform.shape[0] ** 2) if products is None else products
    out = _memory.empty((len(products), -(-cout // panel), cin, panel))
    transform_forward(out, np.ascontiguousarray(w, np.float32), transform, products.start)
    return out


@pjit
def transform_forward(out, w, transform, first):
    """``out[p, blk, c, j] = (G g G^T)[a, b]`` of ``g = w[:, :, c, blk * panel + j]``, for products
    ``first + p = a * S + b``; zero past Cout.  In float64 (``G g``, then ``(G g) G^T``), each output rounded
    once to float32.

    Parameters
    ----------
    out : float32 (P, nblk, Cin, panel), written
    w : float32 (3, 3, Cin, Cout), C-contiguous
    transform : float64 (S, 3), G
    first : int, the first product
    """
    size = transform.shape[0]
    nblk, cin, panel = out.shape[1], out.shape[2], out.shape[3]
    cout = w.shape[3]
    for task in prange(nblk * cin):
        blk, c = task // cin, task % cin
        c0 = blk * panel
        k = min(panel, cout - c0)
        g = np.empty((3, 3, panel))     # the panel's kernels, one per output channel j
        t = np.empty((size, 3, panel))  # G g
        for i in range(3):
            for m in range(3):
                for j in range(k):
                    g[i, m, j] = w[i, m, c, c0 + j]
        for a in range(size):
            for m in range(3):
                for j in range(k):
                    t[a, m, j] = (transform[a, 0] * g[0, m, j] + transform[a, 1] * g[1, m, j]
                                  + transform[a, 2] * g[2, m, j])
        for p in range(out.shape[0]):
            a, b = (first + p) // size, (first + p) % size
            for j in range(k):
                out[p, blk, c, j] = (transform[b, 0] * t[a, 0, j] + transform[b, 1] * t[a, 1, j]
                                     + transform[b, 2] * t[a, 2, j])
            for j in range(k, panel):
                out[p, blk, c, j] = 0.0


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


class _Vector:
    """An LLVM float vector under construction, with the arithmetic ``_bt`` and ``_at`` use (their Python
    bodies then emit the vector code of the transforms: one formula for the scalar and the vector paths)."""

    __array_ufunc__ = None  # ``np.float32(4) * v`` goes to ``v.__rmul__``

    def __init__(self, builder, value):
        self.builder, self.value = builder, value

    def _make(self, value):
        return _Vector(self.builder, value)

    def __add__(self, other):
        return self._make(self.builder.fadd(self.value, other.value, flags=("contract",)))

    def __sub__(self, other):
        return self._make(self.builder.fsub(self.value, other.value, flags=("contract",)))

    def __rmul__(self, factor):
        splat = ir.Constant(self.value.type, [float(factor)] * self.value.type.count)
        return self._make(self.builder.fmul(splat, self.value, flags=("contract",)))


def _vector_access(context, builder, signature, args, array_at):
    """(load, store) of float vectors at element offsets of the 1-D float32 array argument ``array_at``."""
    vector = ir.VectorType(ir.FloatType(), VECTOR_FLOATS)
    data = context.make_array(signature.args[array_at])(context, builder, args[array_at]).data

    def address(offset):
        return builder.bitcast(builder.gep(data, [offset]), vector.as_pointer())

    return (lambda offset: _Vector(builder, builder.load(address(offset), align=4)),
            lambda offset, v: builder.store(v.value, address(offset), align=4))


def _is_flat(array):
    """A 1-D C-contiguous float32 array type."""
    return (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
            and array.dtype == types.float32)


def _two_sided(one_sided, block):
    """``one_sided`` (``_bt`` or ``_at``'s Python body) down each column of ``block`` (a list of rows of
    ``_Vector``), then across each row of that: ``B^T d B`` (or ``A^T m A``) as a list of rows."""
    columns = [one_sided(*(row[j] for row in block)) for j in range(len(block[0]))]   # (B^T d)[:, j]
    return [one_sided(*(column[i] for column in columns)) for i in range(len(columns[0]))]


def _input_block_codegen(context, builder, signature, args, one_sided, size, store):
    """Codegen of an input-transform intrinsic ``(flat, out, x, src, row, pixel, rows, cols)``: ``B^T d B``
    (``one_sided``: ``B^T`` applied to one column, the Python body of ``_bt``) of one ``size`` x ``size``
    block, element ``size * i + k`` given to ``store(offset, value)`` at ``out + (size * i + k) * pixel``.

    ``d[i][j]`` is the vector at ``x[src + i * row + j * pixel]``, or zeros where bit ``i`` of ``rows`` or
    bit ``j`` of ``cols`` is clear: the block's rows and columns in the padding.  A block wholly inside the
    input (every bit set) takes plain loads; one at an edge loads from an address clamped into the array
    and keeps zeros where a bit is clear (a select: masked loads, whose addresses at the edges lie outside
    the array, ran 2x slower at 7x7x512 on Zen 4).
    """
    i32, i64, i1 = ir.IntType(32), ir.IntType(64), ir.IntType(1)
    x = context.make_array(signature.args[2])(context, builder, args[2])
    out, src, row, pixel, rows, cols = (context.cast(builder, args[k], signature.args[k], types.int64)
                                        for k in (1, 3, 4, 5, 6, 7))
    vector = ir.VectorType(ir.FloatType(), VECTOR_FLOATS)
    data = x.data
    last = builder.sub(x.nitems, i64(VECTOR_FLOATS))  # the last whole vector's first element
    zero, every = ir.Constant(vector, [0.0] * VECTOR_FLOATS), i64((1 << size) - 1)

    def offset(i, j):
        return builder.add(src, builder.add(builder.mul(i64(i), row), builder.mul(i64(j), pixel)))

    def load(at):
        return builder.load(builder.bitcast(builder.gep(data, [at]), vector.as_pointer()), align=4)

    def plain(i, j):
        return _Vector(builder, load(offset(i, j)))

    def edge(i, j):
        inside = builder.and_(builder.trunc(builder.lshr(rows, i64(i)), i1),
                              builder.trunc(builder.lshr(cols, i64(j)), i1))
        at = offset(i, j)
        clamped = builder.select(builder.icmp_signed("<", at, i64(0)), i64(0), at)
        clamped = builder.select(builder.icmp_signed(">", clamped, last), last, clamped)
        return _Vector(builder, builder.select(inside, load(clamped), zero))

    def transform(load):
        block = _two_sided(one_sided, [[load(i, j) for j in range(size)] for i in range(size)])
        for i, row_i in enumerate(block):
            for k, value in enumerate(row_i):
                store(builder.add(out, builder.mul(i64(size * i + k), pixel)), value)

    whole = builder.and_(builder.icmp_unsigned("==", rows, every), builder.icmp_unsigned("==", cols, every))
    with builder.if_else(whole) as (then, otherwise):
        with then:
            transform(plain)
        with otherwise:
            transform(edge)


@intrinsic
def _input_block_vectors(typingctx, flat, out, x, src, row, pixel, rows, cols):
    """``B^T d B`` of ``VECTOR_FLOATS`` channels of one 6x6 block, in vector registers: ``d[i][j]`` at
    ``x[src + i * row + j * pixel]``, or zero where bit ``i`` of ``rows`` or bit ``j`` of ``cols`` is clear
    (the padding: ``_input_block_codegen``), element ``6i + j`` of the result at
    ``flat[out + (6i + j) * pixel]``.

    Written as explicit vectors: the Numba loops over lanes went through stack buffers, and ran at about
    800 cycles a block of 8 channels (Zen 3).
    """
    if not (_is_flat(flat) and _is_flat(x)
            and all(isinstance(a, types.Integer) for a in (out, src, row, pixel, rows, cols))):
        return None

    def codegen(context, builder, signature, args):
        store = _vector_access(context, builder, signature, args, 0)[1]
        _input_block_codegen(context, builder, signature, args, _bt.py_func, 6, store)
        return context.get_dummy_value()

    return types.void(flat, out, x, src, row, pixel, rows, cols), codegen


@intrinsic
def _output_block_vectors(typingctx, f, flat, src, plane, bias, ch0):
    """``A^T m A + bias[ch0:]`` of ``VECTOR_FLOATS`` channels of one block into ``f`` (16 x lanes), in vector
    registers: ``m``'s 36 values of the block are at ``flat[src + k * plane]``."""
    if not (isinstance(f, types.CPointer) and _is_flat(flat) and _is_flat(bias)
            and all(isinstance(a, types.Integer) for a in (src, plane, ch0))):
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        vector = ir.VectorType(ir.FloatType(), VECTOR_FLOATS)
        load = _vector_access(context, builder, signature, args, 1)[0]
        src_at, plane_step = (context.cast(builder, args[k], signature.args[k], types.int64) for k in (2, 3))
        f_vec = builder.bitcast(args[0], vector.as_pointer())
        channel_bias = _vector_access(context, builder, signature, args, 4)[0](
            context.cast(builder, args[5], signature.args[5], types.int64))
        m = [[load(builder.add(src_at, builder.mul(i64(6 * i + j), plane_step))) for j in range(6)]
             for i in range(6)]
        for i, row_i in enumerate(_two_sided(_at.py_func, m)):
            for k, value in enumerate(row_i):
                builder.store((value + channel_bias).value, builder.gep(f_vec, [i64(4 * i + k)]), align=4)
        return context.get_dummy_value()

    return types.void(f, flat, src, plane, bias, ch0), codegen


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


@inline
def block_origin(t, tiles_h, tiles_w, block):
    """(image, first row, first column) of output block ``t``, of ``block`` x ``block`` pixels: ``tiles_h`` x
    ``tiles_w`` blocks an image, numbered image by image, row by row (the transforms' order)."""
    img, rest = t // (tiles_h * tiles_w), t % (tiles_h * tiles_w)
    return img, rest // tiles_w * block, rest % tiles_w * block


@inline
def inside_bits(first, size, extent):
    """Bit ``k`` set for each of ``size`` rows (or columns) from ``first`` on that lie in ``0 .. extent - 1``:
    the others are a block's rows in the padding around the input."""
    bits = 0
    for k in range(size):
        if 0 <= first + k < extent:
            bits |= 1 << k
    return bits


@pjit
def input_transform_forward(v, inp, tiles_w, top, left):
    """``v[t, :, c] = B^T d B`` for every 6x6 input block ``d`` of every channel.

    The blocks tile the input padded with ``top`` rows and ``left`` columns of zeros (and as many at the
    bottom and right as the last blocks need), read from the unpadded input: a block's rows and columns
    in the padding are taken as zeros (``_input_block_codegen``), so no padded copy is made (ResNet50 at
    224x224: 0.992-0.997x the time of a zero-padded copy first, Zen 4).
    Block by block (``t``), so each block's 36 values are one contiguous run: 36
    planes of ``tiles * C`` would be 36 store streams a multiple of 4 KiB apart,
    which share one L1 set and ran 4x slower at 14x14x256.  ``LANES`` channels at a
    time are transformed in vector registers (``_input_block_vectors``: 2.8-4.3x faster
    than Numba loops over the lanes through stack buffers, which remain for a last few
    channels: ``_input_block``).

    Parameters
    ----------
    v : float32 (N*TH*TW, 36, C), written; element (i*6 + j) of each block's transform
    inp : float32 (N, H, W, C), C-contiguous, unpadded; 4*TH + 2 >= top + H, 4*TW + 2 >= left + W
        (TH, TW: blocks down and across)
    tiles_w : int, TW
    top, left : int, the padding above and to the left (0 or 1 for a "same" 3x3)
    """
    n, h, w, c = inp.shape
    tiles = v.shape[0]
    tiles_h = tiles // (n * tiles_w)
    x, flat = inp.reshape(-1), v.reshape(-1)
    row, pixel = np.uint64(w * c), np.uint64(c)  # unsigned: no negative-index test per load
    for t in prange(tiles):
        d = carray(stack_f32(LANES36), (36, LANES))
        e = carray(stack_f32(LANES36), (36, LANES))
        img, y0, x0 = block_origin(t, tiles_h, tiles_w, 4)
        rows, cols = inside_bits(y0 - top, 6, h), inside_bits(x0 - left, 6, w)
        # (at an edge the first row or column lies before the image: an address never read)
        base = np.uint64(((img * h + y0 - top) * w + x0 - left) * c)
        out = np.uint64(t * 36 * c)
        for ch0 in range(0, c, LANES):
            if ch0 + LANES <= c:
                _input_block_vectors(flat, out + np.uint64(ch0), x, base + np.uint64(ch0), row, pixel,
                                     rows, cols)
            else:
                _input_block(flat, out + np.uint64(ch0), x, base + np.uint64(ch0), row, pixel, rows, cols,
                             d, e, c - ch0)


@inline
def _input_block(flat, out, x, src, row, pixel, rows, cols, d, e, lanes):
    """Transform ``lanes`` channels of one 6x6 block from ``x[src + ...]`` into ``flat[out + ...]`` (zeros
    where bit ``i`` of ``rows`` or ``j`` of ``cols`` is clear)."""
    for i in range(6):
        for j in range(6):
            at = src + np.uint64(i) * row + np.uint64(j) * pixel
            inside = (rows >> i) & (cols >> j) & 1
            for l in range(lanes):
                d[i * 6 + j, l] = x[at + np.uint64(l)] if inside else F0
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

    ``LANES`` channels at a time in vector registers (``_output_block_vectors``, then ``store_vector``:
    1.4-2x faster than the Numba loops through stack buffers kept for a last few channels).

    Parameters
    ----------
    out : float32 (N, OH, OW, Cout), written (blocks past the edge are cut)
    m : float32 (36, N*TH*TW, Cout), the 36 products summed over input channels
    bias : float32 (Cout,), C-contiguous
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
        f_ptr = stack_f32(LANES16)
        f = carray(f_ptr, (16, LANES))
        img, y0, x0 = block_origin(t, tiles_h, tiles_w, 4)
        rows, cols = min(4, oh - y0), min(4, ow - x0)
        dst = np.uint64(((img * oh + y0) * ow + x0) * cout)
        for ch0 in range(0, cout, LANES):
            lanes = min(LANES, cout - ch0)
            if lanes == LANES:  # in vectors: the bias added in the transform, residual and ReLU in the store
                _output_block_vectors(f_ptr, flat, np.uint64(t * cout + ch0), plane, bias, ch0)
                for i in range(rows):
                    for j in range(cols):
                        o = dst + np.uint64(i) * row + np.uint64(j) * pixel + np.uint64(ch0)
                        store_vector(y, o, f_ptr, (i * 4 + j) * LANES, res, has_residual, relu)
                continue
            for k in range(36):  # the last few channels, through stack buffers
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
