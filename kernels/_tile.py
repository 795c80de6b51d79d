"""The register tile's geometry, start and store, shared by the float32, bf16 and AMX convolution kernels.

``pixel_starts`` gives each tile's input offsets; ``start_accumulators`` starts the
float32 and bf16 kernels' accumulators at the bias; the rest of this module is the store.

The store adds the residual and applies ReLU to a row of accumulators as it writes the
output.  Written as a Numba loop it stays scalar: LLVM unrolls a loop of 32 or 64 fully,
and then cannot tell that the output and the residual (or the accumulators, once their
address has been passed to an intrinsic) do not overlap, so it will not combine the
scalar stores into vectors (measured: 64 ``vmovss`` for a 32-float copy, and the AMX
convolution's store cost 5x its tile products).  ``store_panel_row`` and
``store_block_row`` emit the vector loads and stores themselves, and round to bf16 on the
way for a uint16 output.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._numba import PANEL, TILE, VECTOR_FLOATS, inline, jit


@jit
def pixel_starts(out_shape, in_shape, stride, runs):
    """Offset in the flat padded input of each output pixel's first tap, per tile.

    Parameters
    ----------
    out_shape : (N, OH, OW, Cout)
    in_shape : (N, Hp, Wp, Cin), the padded input
    stride : int
    runs : int, 1, or N when every image has its own weights (tiles then stop at image ends)

    Returns
    -------
    int64 (runs, ceil(pixels per run / TILE) * TILE); a run's last tile repeats its last pixel
    """
    n, oh, ow = out_shape[0], out_shape[1], out_shape[2]
    hp, wp, cin = in_shape[1], in_shape[2], in_shape[3]
    run_pixels = n * oh * ow // runs
    ntiles = (run_pixels + TILE - 1) // TILE
    starts = np.empty((runs, ntiles * TILE), np.int64)
    for run in range(runs):
        for local in range(ntiles * TILE):
            q = run * run_pixels + min(local, run_pixels - 1)
            img, rest = q // (oh * ow), q % (oh * ow)
            starts[run, local] = ((img * hp + rest // ow * stride) * wp + rest % ow * stride) * cin
    return starts


def start_accumulators(context, builder, signature, args, acc_ptr, which, pixels=TILE):
    """Codegen for the tile intrinsics: ``pixels * PANEL / lanes`` stack slots holding the tile's
    accumulator vectors, started at the bias of the panel (zero past its last channel, in a part
    panel).  Returns (the slots, ``acc_ptr`` as a vector pointer, where the tile's sums go).

    ``which`` = (index of the bias argument, index of the first-channel argument) in ``args``; the bias is a
    C-contiguous float32 array.  Loading the bias here, in vectors, matters: set by a Numba loop, LLVM
    unrolled it into scalar stores, and each accumulator vector loaded after them waited for its eight or
    sixteen stores (a store-forwarding stall: 0.55 ms of a 1.6 ms 56x56x64 -> 256 1x1 on a Zen 3).  A part
    panel's vectors are masked loads (``llvm.masked.load``), so no lane past the bias is read.
    LLVM promotes the slots to registers through the caller's loops.
    """
    i1, i32, i64 = ir.IntType(1), ir.IntType(32), ir.IntType(64)
    vector = ir.VectorType(ir.FloatType(), VECTOR_FLOATS)
    lanes64 = ir.VectorType(i64, VECTOR_FLOATS)
    mask_type = ir.VectorType(i1, VECTOR_FLOATS)
    acc_vec = builder.bitcast(acc_ptr, vector.as_pointer())
    nvec = PANEL // VECTOR_FLOATS
    slots = [cgutils.alloca_once(builder, vector) for _ in range(pixels * nvec)]
    bias_at, first_at = which
    bias = context.make_array(signature.args[bias_at])(context, builder, args[bias_at])
    first = context.cast(builder, args[first_at], signature.args[first_at], types.int64)
    cout = builder.extract_value(bias.shape, 0)
    panel_bias = builder.bitcast(builder.gep(bias.data, [first]), vector.as_pointer())
    masked_load = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vector, [vector.as_pointer(), i32, mask_type, vector]),
        f"llvm.masked.load.v{VECTOR_FLOATS}f32.p0")

    undefined, to_all = ir.Constant(lanes64, ir.Undefined), ir.Constant(ir.VectorType(i32, VECTOR_FLOATS), [0] * VECTOR_FLOATS)
    left = builder.shuffle_vector(builder.insert_element(undefined, builder.sub(cout, first), i32(0)), undefined, to_all)
    whole = builder.icmp_signed("<=", builder.add(first, i64(PANEL)), cout)
    starts = [[None] * nvec, [None] * nvec]
    with builder.if_else(whole) as (then, otherwise):
        with then:
            for j in range(nvec):
                starts[0][j] = builder.load(builder.gep(panel_bias, [i64(j)]), align=4)
            whole_block = builder.block
        with otherwise:
            for j in range(nvec):
                lane = ir.Constant(lanes64, [j * VECTOR_FLOATS + k for k in range(VECTOR_FLOATS)])
                mask = builder.icmp_signed("<", lane, left)
                zero = ir.Constant(vector, [0.0] * VECTOR_FLOATS)
                starts[1][j] = builder.call(masked_load, [builder.gep(panel_bias, [i64(j)]), i32(4), mask, zero])
            part_block = builder.block
    merged = [builder.phi(vector) for _ in range(nvec)]  # phis first: they head the block
    for j, start in enumerate(merged):
        start.add_incoming(starts[0][j], whole_block)
        start.add_incoming(starts[1][j], part_block)
        for t in range(pixels):
            builder.store(start, slots[t * nvec + j])
    return slots, acc_vec


def rounded_vector(builder, value):
    """Codegen: the bf16 bits (an i16 vector) of a float vector: to nearest, ties to even; a NaN stays a (quiet) NaN."""
    lanes = value.type.count
    i32s, i16s = ir.VectorType(ir.IntType(32), lanes), ir.VectorType(ir.IntType(16), lanes)
    bits = builder.bitcast(value, i32s)
    high = builder.lshr(bits, ir.Constant(i32s, [16] * lanes))
    odd = builder.and_(high, ir.Constant(i32s, [1] * lanes))
    up = builder.add(bits, builder.add(odd, ir.Constant(i32s, [0x7FFF] * lanes)))
    near = builder.lshr(up, ir.Constant(i32s, [16] * lanes))
    nan = builder.fcmp_unordered("uno", value, value)
    quiet = builder.or_(high, ir.Constant(i32s, [0x40] * lanes))
    return builder.trunc(builder.select(nan, quiet, near), i16s)


def is_bias(bias):
    """True when ``bias`` is typed as ``start_accumulators`` needs it: a C-contiguous float32 vector."""
    return isinstance(bias, types.Array) and bias.dtype == types.float32 and bias.layout == "C" and bias.ndim == 1


def _row_store(count):
    """An intrinsic storing ``count`` floats (a multiple of the vector width), see ``store_row``."""

    def store_row(typingctx, y, dst, acc, src, res, has_residual, relu):
        acc_array = isinstance(acc, types.Array) and acc.layout == "C" and acc.dtype == types.float32
        if not (isinstance(y, types.Array) and isinstance(res, types.Array) and y.layout == "C"
                and res.layout == "C" and (isinstance(acc, types.CPointer) or acc_array)):
            return None

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            vector = ir.VectorType(ir.FloatType(), VECTOR_FLOATS)
            y_data = context.make_array(signature.args[0])(context, builder, args[0]).data
            res_data = context.make_array(signature.args[4])(context, builder, args[4]).data
            dst_at = context.cast(builder, args[1], signature.args[1], types.int64)
            src_at = context.cast(builder, args[3], signature.args[3], types.int64)
            with_residual = context.cast(builder, args[5], signature.args[5], types.boolean)
            with_relu = context.cast(builder, args[6], signature.args[6], types.boolean)
            zero = ir.Constant(vector, [0.0] * VECTOR_FLOATS)

            def at(base, pointer, k):
                return builder.bitcast(builder.gep(pointer, [builder.add(base, i64(k * VECTOR_FLOATS))]), vector.as_pointer())

            acc_data = args[2]
            if isinstance(signature.args[2], types.Array):
                acc_data = context.make_array(signature.args[2])(context, builder, args[2]).data
            values = [builder.load(at(src_at, acc_data, k), align=4) for k in range(count // VECTOR_FLOATS)]

            to_bf16 = signature.args[0].dtype == types.uint16
            i16s = ir.VectorType(ir.IntType(16), VECTOR_FLOATS)

            def store(add_residual):
                for k, value in enumerate(values):
                    if add_residual:
                        value = builder.fadd(value, builder.load(at(dst_at, res_data, k), align=4))
                    negative = builder.fcmp_ordered("<", value, zero)  # a NaN stays a NaN, as max(v, 0.0)
                    value = builder.select(with_relu, builder.select(negative, zero, value), value)
                    if to_bf16:
                        place = builder.gep(y_data, [builder.add(dst_at, i64(k * VECTOR_FLOATS))])
                        builder.store(rounded_vector(builder, value), builder.bitcast(place, i16s.as_pointer()), align=2)
                    else:
                        builder.store(value, at(dst_at, y_data, k), align=4)

            with builder.if_else(with_residual) as (then, otherwise):
                with then:
                    store(True)
                with otherwise:
                    store(False)
            return context.get_dummy_value()

        return types.void(y, dst, acc, src, res, has_residual, relu), codegen

    store_row.__doc__ = f"""``y[dst + j] = relu?(acc[src + j] + res[dst + j])`` for j < {count}, in vectors.

    y, res : float32, C-contiguous, of any shape: indexed flat (so a caller passes its 2-D output as
        it is: a ``reshape(-1)`` in a tile loop called Numba's reshape helper and counted references,
        every tile); ``res`` is read only when ``has_residual``; a uint16
        ``y`` receives the values rounded to bf16 (``bf16.to_bf16``), and then ``res`` must be
        laid out as ``y`` is
    acc : CPointer(float32), e.g. a ``stack_f32`` buffer, or a C-contiguous float32 array (indexed flat)
    dst, src : int, element offsets
    """
    return intrinsic(store_row)


store_panel_row = _row_store(PANEL)
store_block_row = _row_store(32)  # an AMX block row (amx.BLOCK)
store_vector = _row_store(VECTOR_FLOATS)  # a Winograd output block's pixel


@inline
def store_tile(y, res, acc, acc_ptr, p0, c0, pixels, has_residual, relu):
    """``y[p0 + t, c0 + j] = relu?(acc[t, j] + res[p0 + t, c0 + j])`` for the tile's valid part.

    Parameters
    ----------
    y : float32 (pixels, Cout), C-contiguous, written
    res : float32 (pixels, Cout), read when ``has_residual``
    acc : float32 (TILE, PANEL), the tile's sums (bias included); ``acc_ptr`` its address
    p0, c0 : int, the tile's first pixel and output channel
    pixels : int, the pixels of ``y`` the tile may write (its run's end)
    has_residual, relu : bool
    """
    cout = y.shape[1]
    if c0 + PANEL <= cout and p0 + TILE <= pixels:
        for t in range(TILE):
            store_panel_row(y, (p0 + t) * cout + c0, acc_ptr, t * PANEL, res, has_residual, relu)
    else:
        for t in range(min(TILE, pixels - p0)):
            for j in range(min(PANEL, cout - c0)):
                v = acc[t, j]
                if has_residual:
                    v += res[p0 + t, c0 + j]
                if relu:
                    v = max(v, 0.0)
                y[p0 + t, c0 + j] = v


@inline
def store_tile_rounded(y16, y, p0, c0, pixels, place):
    """A copy of a tile ``store_tile`` wrote, rounded to bf16, each output pixel at its place in a
    zero-bordered NHWC buffer (the next convolution's bf16 input: ``Conv2DPlan.feed``).

    Parameters
    ----------
    y16 : uint16 (N * RH * RW * Cout,), flat, written
    y : float32 (N * OH * OW, Cout), C-contiguous, the output as stored
    p0, c0, pixels : int, as ``store_tile``'s; the panel is whole (Cout a multiple of PANEL)
    place : (OH * OW, OW, top, left, RH, RW): output pixel ``p`` (image n, row r, column c) goes to row
        ``top + r``, column ``left + c`` of image n
    """
    image_pixels, ow, top, left, rh, rw = place
    cout = y.shape[1]
    for t in range(min(TILE, pixels - p0)):
        image, at = divmod(p0 + t, image_pixels)
        row, col = divmod(at, ow)
        dst = ((image * rh + row + top) * rw + col + left) * cout + c0
        store_panel_row(y16, dst, y, (p0 + t) * cout + c0, y16, False, False)
