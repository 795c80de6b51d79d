"""bfloat16 convolution: half the weight memory; the vector kernel, and the rounding shared with ``amx``.

A bf16 value is the upper half of a float32 (8 exponent bits, 8 significant bits), kept
here as ``uint16`` and rounded to nearest even (``to_bf16``).

* Weights are folded in float32, then rounded once at pack time (``pack_bf16``) and kept
  only in bf16.  Their panels hold the rows in pairs, ``panels[0, b, p, j, e] =
  w[row 2p + e, 64b + j]``, because one ``vdpbf16ps`` (and one AMX ``tdpbf16ps`` row)
  adds two products per float32 lane.  The input channels are rounded up to an even count
  with a zero channel, so a pair never straddles two kernel rows.
* Activations stay float32 between layers, except where ``Conv2DPlan.feed`` hands a
  convolution's output, rounded, straight to the next one.  Otherwise each convolution
  rounds its input to bf16 while zero-padding it (``pad_to_bf16_forward``); the residual,
  the bias and the ReLU are applied in float32 as the tile is stored.
* This module's kernel (``conv2d_bf16_forward``, a 6 x 64 register tile like float32's)
  runs where AMX does not (``amx.usable``): its inner product (``_dot_tile``) is emitted in
  LLVM IR, on ``vdpbf16ps`` where the target has AVX512-BF16 and it was measured faster
  (``use_dot``), else with the two halves of each pair widened to float32 by a shift and a
  mask and multiplied with float32 FMAs (still half the weight bandwidth).  Accumulation
  is float32 in both.
* Winograd is not used in bf16: its transforms multiply the rounding error of the bf16
  inputs and weights.
"""
import numpy as np
from llvmlite import ir
from numba import carray, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _memory, wisdom
from ._numba import (BF16_DOT, CPU_NAME, ISA, PANEL, TILE, VECTOR_FLOATS, cpu_model, get_num_threads, inline,
                     next_task, pjit, prefetch, stack_f32, stack_u64)
from ._tile import is_bias, pixel_starts, start_accumulators, store_tile

LANES = VECTOR_FLOATS
ACC = TILE * PANEL
LINE_HALVES = 32  # bf16 values per 64-byte cache line


def to_bf16(x):
    """Round float32 values to bf16 (nearest, ties to even; a NaN stays a NaN).

    Parameters
    ----------
    x : float32 array

    Returns
    -------
    uint16 array of the same shape: the upper halves of the rounded float32 values
    """
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((bits >> 16) | np.uint32(0x40)).astype(np.uint16), rounded)


def from_bf16(h):
    """The float32 values of bf16 ``h`` (uint16), exactly."""
    return (np.asarray(h, np.uint16).astype(np.uint32) << 16).view(np.float32)


@inline
def _bf16_bits(bits):
    """``to_bf16`` of one float32 given as its uint32 bits."""
    if bits & 0x7FFFFFFF > 0x7F800000:
        return np.uint16((bits >> 16) | 0x40)
    return np.uint16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)


@pjit
def pad_to_bf16_forward(out, inp, top, left):
    """Round ``inp`` to bf16 into the middle of ``out``; zero the border and any extra channel.

    Parameters
    ----------
    out : uint16 (N, H + top + bottom, W + left + right, Cp), Cp >= C, written
    inp : uint32 (N, H, W, C), the bits of a float32 input (``x.view(np.uint32)``)
    top, left : int, rows and columns of zeros before the input
    """
    n, hp, wp, cp = out.shape
    h, w, c = inp.shape[1], inp.shape[2], inp.shape[3]
    rows_out, rows_in = out.reshape(n * hp, wp * cp), inp.reshape(n * h, w * c)
    for row in prange(n * hp):
        dst = rows_out[row]
        y = row % hp - top
        if 0 <= y < h:
            src = rows_in[row // hp * h + y]
            for k in range(left * cp):
                dst[k] = 0
            middle = dst[left * cp: (left + w) * cp]
            if c == cp:
                for k in range(middle.size):
                    middle[k] = _bf16_bits(src[k])
            else:
                for xx in range(w):
                    for ch in range(c):
                        middle[xx * cp + ch] = _bf16_bits(src[xx * c + ch])
                    for ch in range(c, cp):
                        middle[xx * cp + ch] = 0
            for k in range((left + w) * cp, dst.size):
                dst[k] = 0
        else:
            for k in range(dst.size):
                dst[k] = 0


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no class for it): only named in the intrinsic's signature."""

    def _to_string(self):
        return "bfloat"


@intrinsic
def _dot_tile(typingctx, acc, x, xb, row_stride, kernel_h, pairs, panel, dot, bias, c0):
    """``acc[t, :] = start[t, :] + sum over rows i, pairs q of x-pair(t, i, q) . panel[i * pairs + q]``, in LLVM IR.

    The accumulators start at ``bias[c0 : c0 + PANEL]``, zero past ``bias.size`` in a part panel
    (``_tile.start_accumulators``); the sums are left in ``acc``.

    acc : CPointer(float32), (TILE, PANEL) accumulators (``stack_f32``)
    x : uint16 (flat) bf16 input; tile pixel t's kernel row i starts at ``xb[t] + i * row_stride``
    xb : CPointer(uint64), TILE offsets
    row_stride, kernel_h, pairs : int, input elements between kernel rows, rows, pairs per row
    panel : uint16 (kernel_h * pairs, PANEL, 2), C-contiguous
    dot : bool, multiply with ``vdpbf16ps`` (only where ``BF16_DOT``), else widen to float32 FMAs
    bias : float32 (Cout,), C-contiguous
    c0 : int, the panel's first output channel
    """
    if not (isinstance(x, types.Array) and isinstance(panel, types.Array) and x.dtype == types.uint16
            and panel.dtype == types.uint16 and panel.layout == "C" and is_bias(bias)):
        return None
    counts = (row_stride, kernel_h, pairs)

    def codegen(context, builder, signature, args):
        acc_ptr, x_arr, xb_ptr = args[:3]
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vf, vi = ir.VectorType(ir.FloatType(), LANES), ir.VectorType(i32, LANES)
        stride, rows, npairs = (context.cast(builder, v, t, types.uint64) for v, t in zip(args[3:6], counts))
        x_data = context.make_array(signature.args[1])(context, builder, x_arr).data
        w_data = context.make_array(signature.args[6])(context, builder, args[6]).data
        slots, acc_vec = start_accumulators(context, builder, signature, args, acc_ptr, (8, 9))
        splat = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)

        def loops(use_dot):
            if use_dot:
                vbf = ir.VectorType(_BFloat(), 2 * LANES)
                product = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vbf, vbf]),
                                                         "llvm.x86.avx512bf16.dpbf16ps.512")
            shift = ir.Constant(vi, [16] * LANES)
            upper = ir.Constant(vi, [0xFFFF0000 - (1 << 32)] * LANES)  # as a signed i32
            with cgutils.for_range(builder, rows) as row:
                x_row = builder.mul(row.index, stride)
                w_row = builder.mul(row.index, npairs)
                with cgutils.for_range(builder, npairs) as pair:
                    q = pair.index
                    xs = []
                    for t in range(TILE):   # pixel t's pair of inputs, broadcast to every lane
                        offset = builder.add(builder.add(builder.load(builder.gep(xb_ptr, [i64(t)])), x_row),
                                             builder.shl(q, i64(1)))
                        both = builder.load(builder.bitcast(builder.gep(x_data, [offset]), i32.as_pointer()), align=4)
                        one = builder.insert_element(ir.Constant(vi, ir.Undefined), both, i32(0))
                        xs.append(builder.shuffle_vector(one, ir.Constant(vi, ir.Undefined), splat))
                    base = builder.mul(builder.add(w_row, q), i64(2 * PANEL))
                    ws = [builder.load(builder.bitcast(builder.gep(w_data, [builder.add(base, i64(2 * LANES * j))]),
                                                       vi.as_pointer()), align=4)
                          for j in range(PANEL // LANES)]
                    if use_dot:
                        xs = [builder.bitcast(v, vbf) for v in xs]
                        ws = [builder.bitcast(v, vbf) for v in ws]
                        for t in range(TILE):
                            for j, w in enumerate(ws):
                                slot = slots[t * len(ws) + j]
                                builder.store(builder.call(product, [builder.load(slot), xs[t], w]), slot)
                    else:   # the even element is the low half of each 32-bit lane: shift it up; the odd, mask it
                        halves = [(builder.bitcast(builder.shl(v, shift), vf), builder.bitcast(builder.and_(v, upper), vf))
                                  for v in xs + ws]
                        for t in range(TILE):
                            for j in range(len(ws)):
                                slot = slots[t * len(ws) + j]
                                total = builder.load(slot)
                                for h in range(2):
                                    term = builder.fmul(halves[t][h], halves[TILE + j][h], flags=("contract",))
                                    total = builder.fadd(total, term, flags=("contract",))
                                builder.store(total, slot)

        if BF16_DOT:
            with builder.if_else(context.cast(builder, args[7], signature.args[7], types.boolean)) as (then, otherwise):
                with then:
                    loops(True)
                with otherwise:
                    loops(False)
        else:
            loops(False)
        for k, slot in enumerate(slots):
            builder.store(builder.load(slot), builder.gep(acc_vec, [i64(k)]), align=4)
        return context.get_dummy_value()

    return types.void(acc, x, xb, row_stride, kernel_h, pairs, panel, dot, bias, c0), codegen


@pjit
def conv2d_bf16_forward(out, inp, panels, starts, bias, residual, kernel_w, relu, nchunks, group, dot):
    """Direct convolution of a padded bf16 NHWC input with bf16 panels, accumulated in float32.

    The same tiling, work split and store as ``conv.conv2d_forward``.

    Parameters
    ----------
    out : float32 (N, OH, OW, Cout), written
    inp : uint16 (N, Hp, Wp, Cp) bf16, padded so that every tap is in bounds; Cp even
    panels : uint16 (1, nblk, KH*KW*Cp/2, PANEL, 2) from ``pack_bf16``
    starts : int64 (1, tiles * TILE) from ``pixel_starts`` (it holds the stride)
    bias : float32 (Cout,), C-contiguous
    residual : float32 (N, OH, OW, Cout) added before ReLU, or (0, 0, 0, 0) for none
    kernel_w : int, KW (KH follows from the panel depth)
    relu : bool, apply max(0, .) while storing
    nchunks, group : int, from ``conv.work_split``
    dot : bool, products on ``vdpbf16ps`` (where ``BF16_DOT``; see ``use_dot``), else widened to FMAs
    """
    n, oh, ow, cout = out.shape
    wp, cp = inp.shape[2], inp.shape[3]
    nblk, depth = panels.shape[1], panels.shape[2]
    pairs = kernel_w * cp // 2
    kernel_h = depth // pairs
    has_residual = residual.size > 0
    x = inp.reshape(-1)
    y = out.reshape(-1, cout)
    res = residual.reshape(-1, cout)
    pixels = y.shape[0]
    ntiles = starts.shape[1] // TILE
    ngroups = (nblk + group - 1) // group
    ntasks = nchunks * ngroups
    taken = np.zeros(1, np.int64)  # tasks handed out so far
    for _ in prange(ntasks):  # each thread takes tasks until none are left, as in ``conv.conv2d_forward``
        acc_ptr, xb_ptr = stack_f32(ACC), stack_u64(TILE)
        acc, xb = carray(acc_ptr, (TILE, PANEL)), carray(xb_ptr, (TILE,))
        task = next_task(taken)
        while task < ntasks:
            chunk, first = task // ngroups, task % ngroups * group
            begin, last = chunk * ntiles // nchunks, (chunk + 1) * ntiles // nchunks
            for tile in range(begin, last):
                local0 = tile * TILE
                for t in range(TILE):
                    xb[t] = np.uint64(starts[0, local0 + t])
                if tile + 1 < last:  # the next tile's receptive fields, from memory while this one computes
                    for t in range(TILE):
                        for i in range(kernel_h):
                            at = starts[0, local0 + TILE + t] + i * wp * cp
                            for q in range(0, 2 * pairs, LINE_HALVES):
                                prefetch(x, at + q)
                for b in range(first, min(first + group, nblk)):
                    c0 = b * PANEL
                    _dot_tile(acc_ptr, x, xb_ptr, wp * cp, kernel_h, pairs, panels[0, b], dot, bias, c0)
                    store_tile(y, res, acc, acc_ptr, local0, c0, pixels, has_residual, relu)
            task = next_task(taken)


def pack_bf16(w):
    """Round a folded HWIO kernel to bf16 and pack it in row pairs for ``conv2d_bf16_forward``.

    Parameters
    ----------
    w : float32 (KH, KW, Cin, Cout)

    Returns
    -------
    uint16 (1, ceil(Cout / PANEL), KH*KW*Cp/2, PANEL, 2), 64-byte aligned; Cp = Cin rounded up to even
    """
    kh, kw, cin, cout = w.shape
    if cin % 2:
        w = np.concatenate([w, np.zeros((kh, kw, 1, cout), np.float32)], axis=2)
    depth, nblk = kh * kw * (cin + cin % 2), -(-cout // PANEL)
    rows = np.zeros((depth, nblk * PANEL), np.uint16)
    rows[:, :cout] = to_bf16(w.reshape(depth, cout))
    panels = _memory.empty((1, nblk, depth // 2, PANEL, 2), np.uint16)
    panels[0] = rows.reshape(depth // 2, 2, nblk, PANEL).transpose(2, 0, 3, 1)
    return panels


def unpack_bf16(panels, shape):
    """The float32 (KH, KW, Cin, Cout) kernel held by bf16 ``panels`` (the rounded values)."""
    kh, kw, cin, cout = shape
    nblk, half = panels.shape[1], panels.shape[2]
    rows = panels[0].transpose(1, 3, 0, 2).reshape(2 * half, nblk * PANEL)
    return from_bf16(rows[:, :cout]).reshape(kh, kw, cin + cin % 2, cout)[:, :, :cin]


_choice = []  # the measured (or ruled) answer of ``use_dot``, once per process


def use_dot():
    """Whether the products run on ``vdpbf16ps`` here (else bf16 is widened to float32 FMAs).

    The instruction does twice the multiply-adds of an FMA, but its throughput differs by
    CPU: on the Emerald Rapids VM it ran at half the FMA rate (bf16 took 1.8x float32's
    time), so where the CPU has it both are timed once on a 14x14x256 3x3 layer and the
    faster is recorded in ``wisdom``; with wisdom off the rule is to use it.
    """
    if not _choice:
        if not BF16_DOT:
            _choice.append(False)
        else:
            machine = f"{cpu_model()} | {CPU_NAME} | {ISA} | bf16 tile {TILE}x{PANEL} | {get_num_threads()} threads"
            runs = {name: _product_timing(name == "vdpbf16ps") for name in ("vdpbf16ps", "widened")}
            _choice.append(wisdom.choose(machine, "bf16 products", runs, "vdpbf16ps") == "vdpbf16ps")
    return _choice[0]


def _product_timing(dot):
    """A call of the direct bf16 kernel on a compute-bound layer (14x14x256 -> 256, 3x3), for ``use_dot``."""
    rng = np.random.default_rng(0)
    size, cp, cout = 16, 256, 256
    inp = to_bf16(rng.standard_normal((1, size, size, cp), dtype=np.float32))
    panels = pack_bf16(rng.standard_normal((3, 3, cp, cout), dtype=np.float32))
    out = _memory.empty((1, size - 2, size - 2, cout))
    starts = pixel_starts(out.shape, inp.shape, 1, 1)
    bias, none = np.zeros(cout, np.float32), np.zeros((0, 0, 0, 0), np.float32)
    chunks = max(1, min(starts.shape[1] // TILE, 2 * get_num_threads()))
    return lambda: conv2d_bf16_forward(out, inp, panels, starts, bias, none, 3, True, chunks, panels.shape[1], dot)


def kernel():
    """What computes the products of the direct bf16 kernel here."""
    return "vdpbf16ps" if use_dot() else "bf16 widened to fp32 FMA"


def description():
    """The direct bf16 kernel as ``fastres profile`` names it."""
    return f"direct bf16 {TILE}x{PANEL} {ISA} {kernel()}"
