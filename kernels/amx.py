"""bf16 convolution on Intel AMX tiles (``tdpbf16ps``), where the CPU and the OS allow it.

An AMX tile multiply adds a (16 x 32) bf16 block times a (32 x 16) bf16 block into a
(16 x 16) float32 block: 8192 multiply-adds per instruction.  The convolution runs as an
implicit GEMM: rows are output pixels, the depth is (kernel row, kernel column, 32
channels), columns are output channels.

* Pixels.  A stride-1 convolution is computed on the padded input's width: "virtual"
  pixel ``u`` of an image sits at padded position (u // Wp, u % Wp), so 16 consecutive
  pixels are 16 rows at one stride and a tile loads them straight from the bf16 input
  (``tileloadd``).  The Wp - OW columns past the output's right edge are computed and
  dropped.  A strided 1x1 convolution first subsamples its input
  (``subsample_to_bf16_forward``); inputs whose channels do not fill a 32-wide tile row
  (the 3-channel stem) are rounded and padded, then gathered (``gather_bf16_forward``) and run as a 1x1.
  Other strided convolutions use ``conv.conv2d_forward`` on the bf16 panels.
* Weights.  The bf16 panels of ``bf16.pack_bf16`` are already in AMX's pair layout: 16
  pair rows of 16 columns of a 64-column panel are one B tile, 256 bytes apart.
* Blocking (``_tile_block``).  A step computes 32 pixels x 32 output channels from two
  pixel and two weight tiles (all eight tile registers), or, for layers of few pixels,
  16 pixels x 64 channels from one pixel tile and the four weight tiles in turn.  The
  sums start at the bias (a stride-0 tile load), go to a stack block, and the residual
  and ReLU are applied in float32 as they are stored (``_tile.store_*_row``); or, where
  the only reader is the next convolution (``Conv2DPlan.feed``), they are stored rounded
  to bf16 straight into its padded input.

Linux asks a process to request AMX state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``) before
it may use it; ``AMX`` is True only when that succeeded, the CPU reports ``amx_bf16``,
the code-generation target has it, and ``FASTRES_AMX`` is not ``off``.
"""
import ctypes
import os
import time

import numpy as np
from llvmlite import ir
from numba import carray, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._numba import CPU_FEATURES, CPU_NAME, ISA, PANEL, X86, inline, pjit, stack_f32
from ._tile import store_block_row, store_panel_row
from . import bf16
from .bf16 import _bf16_bits

ROWS = 16        # pixels (and pair rows) per tile
DEPTH = 32       # bf16 channels per tile row (64 bytes)
BLOCK = 32       # pixels and output channels per step: 2 x 2 tiles
PREFETCH_STEPS = 4  # steps ahead whose weights are prefetched (0, 2, 4, 8 and 16 tried: 4 was best)
BLOCK_FLOATS = BLOCK * BLOCK  # a module constant, so Numba sees a literal
_AMX_CPUS = {"sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d", "diamondrapids"}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _request_permission():
    """Ask Linux for the AMX tile state (ARCH_REQ_XCOMP_PERM, XTILEDATA); True if granted."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    except (OSError, AttributeError):
        return False


def _target_has_amx():
    flags = CPU_FEATURES.split(",")
    if "+amx-bf16" in flags or "-amx-bf16" in flags:
        return "+amx-bf16" in flags and "+amx-tile" in flags
    return CPU_NAME in _AMX_CPUS


AMX = (os.environ.get("FASTRES_AMX", "").lower() not in ("0", "off", "no", "false") and X86 and ISA == "avx512"
       and {"amx_bf16", "amx_tile"} <= _cpu_flags() and _target_has_amx() and _request_permission())
KERNEL = "amx tdpbf16ps"

# ldtilecfg's 64 bytes: palette 1; tiles 0-7 of 16 rows x 64 bytes
CONFIG = np.zeros(64, np.uint8)
CONFIG[0] = 1
CONFIG[16:32].view(np.uint16)[:] = 64
CONFIG[48:56] = ROWS

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)


def _call(builder, name, args):
    fnty = ir.FunctionType(ir.VoidType(), [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _bytes(context, builder, array_type, array):
    """An i8* to an array's data."""
    return builder.bitcast(context.make_array(array_type)(context, builder, array).data, _I8.as_pointer())


@intrinsic
def _tiles_begin(typingctx, config):
    """Load the tile configuration (``CONFIG``) in the calling thread."""
    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.ldtilecfg", [_bytes(context, builder, signature.args[0], args[0])])
        return context.get_dummy_value()
    return types.void(config), codegen


@intrinsic
def _tiles_end(typingctx):
    """Release the calling thread's tile state."""
    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilerelease", [])
        return context.get_dummy_value()
    return types.void(), codegen


def _tile_block(a_tiles, b_tiles):
    """An intrinsic computing ``a_tiles * 16`` pixels x ``b_tiles * 16`` channels on the tiles.

    2 x 2 (32 pixels x 32 channels, tiles 0-3 the sums, 4-5 the pixels, 6-7 the weights): each tile
    load feeds two products.  1 x 4 (16 pixels x a whole 64-channel panel; tile 4 the pixels, 5 each
    weight tile in turn): for layers of few pixels, where the weights stream from memory: the four
    weight tiles of a step are the whole 256-byte pair rows, read in order, and no product is spent
    on a second, empty pixel tile.
    """
    rows_bytes = b_tiles * ROWS * 4  # one pixel's sums in the block: b_tiles * 16 floats

    def block(typingctx, out, x, x0, cp, row, kernel_h, kernel_w, panel, column, bias, c0):
        def codegen(context, builder, signature, args):
            dest = builder.bitcast(args[0], _I8.as_pointer())
            x_data, w_data = _bytes(context, builder, signature.args[1], args[1]), _bytes(context, builder, signature.args[7], args[7])
            x0, cp, row, kh, kw, column = (context.cast(builder, args[k], signature.args[k], types.int64)
                                           for k in (2, 3, 4, 5, 6, 8))
            two = _I64(2)
            chunks = builder.udiv(cp, _I64(DEPTH))
            a_stride, b_stride = builder.mul(cp, two), _I64(PANEL * 4)
            bias = _bytes(context, builder, signature.args[9], args[9])
            first = builder.mul(context.cast(builder, args[10], signature.args[10], types.int64), _I64(4))
            sums = [(a, b, a * b_tiles + b) for a in range(a_tiles) for b in range(b_tiles)]
            for _, b, acc in sums:  # every pixel row starts at the bias: a stride-0 load
                _call(builder, "llvm.x86.tileloadd64", [_I8(acc), builder.gep(bias, [builder.add(first, _I64(64 * b))]), _I64(0)])
            with cgutils.for_range(builder, kh) as i:
                with cgutils.for_range(builder, kw) as j:
                    tap = builder.add(builder.mul(i.index, kw), j.index)
                    x_tap = builder.add(builder.add(x0, builder.mul(i.index, row)), builder.mul(j.index, cp))
                    with cgutils.for_range(builder, chunks) as c:
                        a0 = builder.mul(builder.add(x_tap, builder.mul(c.index, _I64(DEPTH))), two)  # bytes
                        step = builder.add(builder.mul(tap, chunks), c.index)  # 16 pair rows per step
                        b0 = builder.mul(builder.add(builder.mul(step, _I64(ROWS * PANEL)), column), _I64(4))
                        # the weights of a later step, from memory while these tiles multiply (cold weights
                        # stall the tile loads otherwise); past the panel's end it is a harmless hint
                        ahead = builder.add(b0, _I64(PREFETCH_STEPS * ROWS * PANEL * 4))
                        for r in range(ROWS):
                            for line in range(b_tiles):
                                _call(builder, "llvm.prefetch.p0", [builder.gep(w_data, [builder.add(ahead, _I64(r * PANEL * 4 + 64 * line))]),
                                                                    _I32(0), _I32(3), _I32(1)])
                        for a in range(a_tiles):
                            offset = builder.add(a0, builder.mul(a_stride, _I64(ROWS * a)))
                            _call(builder, "llvm.x86.tileloadd64", [_I8(4 + a), builder.gep(x_data, [offset]), a_stride])
                        if a_tiles == 2:   # both weight tiles held: tiles 6 and 7
                            for b in range(b_tiles):
                                _call(builder, "llvm.x86.tileloadd64", [_I8(6 + b), builder.gep(w_data, [builder.add(b0, _I64(64 * b))]), b_stride])
                            for a, b, acc in sums:
                                _call(builder, "llvm.x86.tdpbf16ps", [_I8(acc), _I8(4 + a), _I8(6 + b)])
                        else:              # one weight tile at a time, in tile 5
                            for _, b, acc in sums:
                                _call(builder, "llvm.x86.tileloadd64", [_I8(5), builder.gep(w_data, [builder.add(b0, _I64(64 * b))]), b_stride])
                                _call(builder, "llvm.x86.tdpbf16ps", [_I8(acc), _I8(4), _I8(5)])
            for a, b, acc in sums:
                offset = _I64(a * ROWS * rows_bytes + 64 * b)
                _call(builder, "llvm.x86.tilestored64", [_I8(acc), builder.gep(dest, [offset]), _I64(rows_bytes)])
            return context.get_dummy_value()

        return types.void(out, x, x0, cp, row, kernel_h, kernel_w, panel, column, bias, c0), codegen

    block.__doc__ = f"""``out ({16 * a_tiles} x {16 * b_tiles}) = bias[c0:] + x-rows . panel-columns`` over every tap and channel.

    out : CPointer(float32), {16 * a_tiles} pixels x {16 * b_tiles} channels, row-major, written
    x : uint16 (flat) bf16 input; pixel p's tap (i, j) is at ``x0 + p*cp + i*row + j*cp``
    cp, row : int, channels (a multiple of 32) and elements per padded input row
    kernel_h, kernel_w : int
    panel : uint16 (pairs, 64, 2), C-contiguous; column : int, the block's first channel in the panel
    bias : float32, at least c0 + {16 * b_tiles} long; c0 : int
    """
    return intrinsic(block)


_block_square = _tile_block(2, 2)  # 32 pixels x 32 channels
_block_wide = _tile_block(1, 4)    # 16 pixels x 64 channels


@intrinsic
def _products_only(typingctx, out, a, steps):
    """``steps`` rounds of the 2 x 2 block's four tile products, with no load between them.

    out : CPointer(float32), 4 x 256 floats, written (the four sums, so the products are kept)
    a : uint16 (512 or more) bf16, C-contiguous: every pixel and weight tile is loaded from it
    steps : int
    """
    def codegen(context, builder, signature, args):
        dest = builder.bitcast(args[0], _I8.as_pointer())
        src = _bytes(context, builder, signature.args[1], args[1])
        for acc in range(4):
            _call(builder, "llvm.x86.tilezero", [_I8(acc)])
        for tile in range(4, 8):
            _call(builder, "llvm.x86.tileloadd64", [_I8(tile), src, _I64(64)])
        with cgutils.for_range(builder, context.cast(builder, args[2], signature.args[2], types.int64)):
            for acc, (pixels, weights) in enumerate(((4, 6), (4, 7), (5, 6), (5, 7))):
                _call(builder, "llvm.x86.tdpbf16ps", [_I8(acc), _I8(pixels), _I8(weights)])
        for acc in range(4):
            _call(builder, "llvm.x86.tilestored64", [_I8(acc), builder.gep(dest, [_I64(acc * 1024)]), _I64(64)])
        return context.get_dummy_value()
    return types.void(out, a, steps), codegen


@pjit
def peak_forward(out, a, steps):
    """On each kernel thread, ``steps`` rounds of four tile products (16 x 32 by 32 x 16 each).

    Parameters
    ----------
    out : float32 (tasks,), written: the sum of each task's sums (``steps * 32 * 1024`` for ones)
    a : uint16 (512 or more) bf16, the tiles' values
    steps : int
    """
    for task in prange(out.size):
        _tiles_begin(CONFIG)
        block_ptr = stack_f32(BLOCK_FLOATS)
        _products_only(block_ptr, a, steps)
        _tiles_end()
        block = carray(block_ptr, (BLOCK_FLOATS,))
        total = np.float32(0.0)
        for i in range(BLOCK_FLOATS):
            total += block[i]
        out[task] = total


PEAK_STEPS = 16384  # rounds of four tile products per thread (about 1 ms on Emerald Rapids)


def peak(threads, repeats=10):
    """The AMX bf16 product peak of ``threads`` kernel threads, in GFLOPS (best of ``repeats``); 0 without AMX."""
    if not AMX:
        return 0.0
    ones = np.full(512, 0x3F80, np.uint16)  # bf16 1.0
    out = np.empty(threads, np.float32)
    peak_forward(out, ones, 1)  # compile / warm up
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        peak_forward(out, ones, PEAK_STEPS)
        best = min(best, time.perf_counter() - start)
    return threads * PEAK_STEPS * 4 * 2 * ROWS * ROWS * DEPTH / best / 1e9


@inline
def _store_partial_row(y, res, block_ptr, p, dst, width, wide, has_residual, relu):
    """``y[dst + j] = relu?(block[p, j] + res[dst + j])`` for j < width (the block's row p, 32 or 64 wide)."""
    if wide and width == PANEL:
        store_panel_row(y, dst, block_ptr, p * PANEL, res, has_residual, relu)
    elif not wide and width == BLOCK:
        store_block_row(y, dst, block_ptr, p * BLOCK, res, has_residual, relu)
    else:
        block = carray(block_ptr, (BLOCK_FLOATS,))
        at = p * (PANEL if wide else BLOCK)
        for j in range(width):
            v = block[at + j] + res[dst + j] if has_residual else block[at + j]
            y[dst + j] = max(v, 0.0) if relu else v


@pjit
def conv2d_amx_forward(out, inp, panels, bias, residual, kernel_h, kernel_w, relu, nchunks, group, rounded, top, left,
                       wide):
    """Stride-1 convolution of a padded bf16 input on AMX tiles, accumulated in float32.

    Parameters
    ----------
    out : float32 (N, OH, OW, Cout), written
    inp : uint16 (N*Hp*Wp*Cp + slack,) bf16, the padded NHWC input, flat, with at least
        ``(BLOCK + KW) * Cp`` readable elements after it; OH = Hp - KH + 1, OW = Wp - KW + 1
    panels : uint16 (1, nblk, KH*KW*Cp/2, 64, 2) from ``bf16.pack_bf16``
    bias : float32 (nblk * 64,), the bias, zero past Cout
    residual : float32 (N, OH, OW, Cout) added before ReLU, or (0, 0, 0, 0) for none
    kernel_h, kernel_w : int
    relu : bool
    nchunks, group : int, from ``conv.work_split`` over (N, blocks of 32 or 16 pixels per image)
    rounded : uint16 (N, OH + top + ..., OW + left + ..., Cout), or (0, 0, 0, 0): when not empty the
        output goes there, rounded to bf16, at (top, left) of each image (the next convolution's
        padded input), and not to ``out``; no residual then
    top, left : int
    wide : bool, blocks of 16 pixels x 64 channels (``_block_wide``) rather than 32 x 32
    """
    n, oh, ow, cout = out.shape
    nblk, pairs = panels.shape[1], panels.shape[2]
    cp = 2 * pairs // (kernel_h * kernel_w)
    wp, hp = ow + kernel_w - 1, oh + kernel_h - 1
    virtual = oh * wp  # computed pixels per image, the padded width's extra columns included
    pixels, width = (ROWS, PANEL) if wide else (BLOCK, BLOCK)  # a block's pixels and channels
    blocks = (virtual + pixels - 1) // pixels
    has_residual = residual.size > 0
    y, res = out.reshape(-1), residual.reshape(-1)
    to_bf16, y16, rh, rw = rounded.size > 0, rounded.reshape(-1), rounded.shape[1], rounded.shape[2]
    ngroups = (nblk + group - 1) // group
    for task in prange(n * nchunks * ngroups):
        chunk, image, first = task // (n * ngroups), task // ngroups % n, task % ngroups * group
        _tiles_begin(CONFIG)
        block_ptr = stack_f32(BLOCK_FLOATS)
        for blk in range(chunk * blocks // nchunks, (chunk + 1) * blocks // nchunks):
            u0 = blk * pixels
            for b in range(first, min(first + group, nblk)):
                for part in range(PANEL // width):
                    c0 = b * PANEL + part * width
                    at = (image * hp * wp + u0) * cp
                    if wide:
                        _block_wide(block_ptr, inp, at, cp, wp * cp, kernel_h, kernel_w, panels[0, b], 0, bias, c0)
                    else:
                        _block_square(block_ptr, inp, at, cp, wp * cp, kernel_h, kernel_w, panels[0, b], part * width,
                                      bias, c0)
                    valid = min(width, cout - c0)
                    row, col = divmod(u0, wp)  # the block's first pixel, then step (no division per pixel)
                    for p in range(min(pixels, virtual - u0)):
                        if col < ow and valid > 0:
                            if to_bf16:  # whole rows: a fed consumer's channels fill tile rows
                                dst = ((image * rh + row + top) * rw + col + left) * cout + c0
                                if wide:
                                    store_panel_row(y16, dst, block_ptr, p * PANEL, res, False, relu)
                                else:
                                    store_block_row(y16, dst, block_ptr, p * BLOCK, res, False, relu)
                            else:
                                _store_partial_row(y, res, block_ptr, p, ((image * oh + row) * ow + col) * cout + c0,
                                                   valid, wide, has_residual, relu)
                        col += 1
                        if col == wp:
                            row, col = row + 1, 0
        _tiles_end()


@pjit
def subsample_to_bf16_forward(out, inp, step):
    """``out = bf16(inp[:, ::step, ::step, :])``, with zeros in any extra channel.

    Parameters
    ----------
    out : uint16 (N, ceil(H / step), ceil(W / step), Cp), Cp >= C, written
    inp : uint32 (N, H, W, C), the bits of a float32 input
    step : int
    """
    n, oh, ow, cp = out.shape
    c = inp.shape[3]
    for row in prange(n * oh):
        img, yy = row // oh, row % oh
        for xx in range(ow):
            dst, src = out[img, yy, xx], inp[img, yy * step, xx * step]
            for ch in range(c):
                dst[ch] = _bf16_bits(src[ch])
            for ch in range(c, cp):
                dst[ch] = 0


@pjit
def gather_bf16_forward(out, inp, kernel_h, kernel_w, stride):
    """Copy each output pixel's receptive field of a padded bf16 input into one row, zeros past its end.

    The input is rounded and padded first (``bf16.pad_to_bf16_forward``), so this is a copy of
    ``kernel_h`` runs of ``kernel_w * C`` values per pixel with no bounds test (3.1x faster than
    rounding tap by tap for ResNet50's stem).

    Parameters
    ----------
    out : uint16 (N, OH, OW, Kp) bf16, written: pixel (n, y, x) holds taps (i, j, c) in that order,
        then zeros up to Kp >= KH*KW*C
    inp : uint16 (N, Hp, Wp, C) bf16, padded so that every tap is in bounds
    kernel_h, kernel_w, stride : int
    """
    n, oh, ow, depth = out.shape
    hp, wp, c = inp.shape[1], inp.shape[2], inp.shape[3]
    src, dst = inp.reshape(-1), out.reshape(-1)  # flat, and no array view made per tap
    run = kernel_w * c  # a kernel row's taps are one contiguous run of the input row
    for line in prange(n * oh):
        img, oy = line // oh, line % oh
        for ox in range(ow):
            base = np.uint64((line * ow + ox) * depth)  # unsigned offsets: no wrap-around test, so it vectorises
            for i in range(kernel_h):
                first = np.uint64(((img * hp + oy * stride + i) * wp + ox * stride) * c)
                to = base + np.uint64(i * run)
                for k in range(np.uint64(run)):
                    dst[to + k] = src[first + k]
            for k in range(np.uint64(kernel_h * run), np.uint64(depth)):
                dst[base + k] = 0


def wide_blocks(pixels):
    """Whether a convolution computing ``pixels`` (the whole batch's, virtual ones included) uses 16 x 64
    blocks: where its weights serve at most four pixel tiles, so that streaming them decides."""
    return pixels <= 4 * ROWS


def block_pixels(wide):
    """Pixels per block: 16 (1 x 4 tiles) or 32 (2 x 2)."""
    return ROWS if wide else BLOCK


def gathered(kernel_size, in_channels):
    """True when a bf16 convolution runs on AMX as im2col + 1x1: channels that do not fill a tile row."""
    return AMX and (in_channels + in_channels % 2) % DEPTH != 0 and tuple(kernel_size) != (1, 1)


def im2col_depth(kernel_size, in_channels):
    """The gathered depth, KH*KW*Cin rounded up to whole tile rows (32)."""
    return -(-kernel_size[0] * kernel_size[1] * in_channels // DEPTH) * DEPTH


def usable(kernel_size, in_channels, stride, pads):
    """True when a bf16 convolution of this shape runs on AMX here (a strided one only as an unpadded 1x1)."""
    cp = in_channels + in_channels % 2
    return AMX and cp % DEPTH == 0 and (stride == 1 or tuple(kernel_size) == (1, 1) and not any(pads))


def products():
    """What computes a bf16 model's products on this machine, as ``fastres info`` and ``profile`` say it."""
    if AMX:
        return f"AMX tiles (tdpbf16ps); {bf16.kernel()} for strided convolutions larger than 1x1"
    return bf16.kernel() + ("" if bf16.BF16_DOT else " (no AVX512-BF16 on this CPU)")
