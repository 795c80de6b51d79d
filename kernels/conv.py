"""2-D convolution: a register-tiled direct kernel on packed weights.

Weights are packed once (``pack_conv2d``) into ``PANEL``-wide output-channel panels
(64 on AVX-512, 16 on AVX2, 8 elsewhere: ``_numba``),
``panels[b, (i*KW + j)*Cin + c, :] = w[i, j, c, PANEL*b : PANEL*b + PANEL]``.  A task owns
a group of panels and a run of output pixels; panel by panel, for every tile of ``TILE``
pixels it accumulates all kernel taps and input channels in ``TILE x PANEL`` accumulators kept
in vector registers (``_fma_tile``, explicit vectors in LLVM IR, started at the bias),
then adds the residual and applies ReLU while storing (and, where it feeds a bf16 convolution, writes a rounded
copy into that one's padded input: ``Conv2DPlan.feed``).  A task of 2 to 4 tiles (a layer of few pixels,
whose weights stream from memory) goes through its panels in L1-sized chunks instead, fetching the
next chunk while it computes this one (``conv2d_stream_forward``).  1x1 convolutions and dense layers
are the same kernel with one tap.  A kernel packed with ``im2col=True`` gathers its
receptive fields with the Cython ``im2col`` first and runs as a 1x1 (measured slower here).
"""
import copy
import math

import numpy as np
from llvmlite import ir
from numba import carray, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from . import _checks, _memory, amx, bf16, winograd2, wisdom
from .bf16 import _BFloat
from ._im2col import im2col_forward
from ._tile import is_bias, pixel_starts, start_accumulators, store_tile, store_tile_rounded
from ._numba import (BF16_DOT, CPU_NAME, ISA, PANEL, TILE, VECTOR_FLOATS, advance, cpu_model, evict_line,
                     fetch_line, get_num_threads, inline, jit, l2_bytes, next_task, peek_task, pjit,
                     stack_f32, stack_u64, task_counters)
from .winograd import input_transform_forward, output_transform_forward, pack_transformed

LINE_BYTES = 64
PREFETCH_ROWS = 48  # weight rows ahead that the kernel asks for (12 KiB at 64 channels)
L1_PANEL_ROWS = 128  # a panel of more rows (32 KiB) does not stay in L1 from one pass to the next
CHUNK = 16        # tiles per parallel task, before balancing (``work_split``)
ACC = TILE * PANEL  # accumulator floats per tile (a module constant, so Numba sees a literal)
# ``conv2d_stream_forward`` runs tasks of 2 to STREAM_TILES tiles, in chunks of STREAM_ROWS weight rows
# (8 KiB on AVX2)
STREAM_TILES = 4
STREAM_ACC = STREAM_TILES * ACC
STREAM_ROWS = max(64, 8192 // (4 * PANEL))
# a run's last tile of NARROW_TILE pixels or fewer computes only that many (``_fma_tile_narrow``,
# ``_fma_chunk_narrow``): ResNet50's pixel counts leave 4 pixels (16, 64, 196, 784 ...) or 1 (49) in the
# last tile of 6.  At 64x64 stage 4 (6 + 6 + 4 pixels) 0.87-0.94x the time, the whole pass 0.97x; 7x7
# layers 0.98-1.0x (Zen 3, same process).  One of TINY_TILE pixels or fewer (49 = 8 x 6 + 1, 392 = 65 x 6 + 2)
# runs a variant of its own (``_fma_tile_tiny``, ``_fma_chunk_tiny``): ResNet50 224x1's stage-5 1x1s 0.96-0.98x
# the time, stage 3's Winograd (49 blocks) 0.97x, in ``fastres profile`` (Zen 4, separate processes)
NARROW_TILE = TILE - 2
TINY_TILE = NARROW_TILE // 2
# ``conv2d_forward`` fetches the next panel during a panel's passes from cache where a panel holds more than
# FETCH_MIN_BYTES and at most FETCH_MAX_BYTES.  Without it the first pass of each panel waits on memory:
# float32 7x7x512 -> 2048 (128 KiB panels) took 0.95-0.99x the time with it, 14x14x256 -> 1024 (64 KiB)
# 0.97-0.99x, bf16 7x7x512 -> 2048 0.96x (Zen 4, weights evicted, same process).  A smaller panel's first
# pass is short and the fetches cost more than they save (bf16 28x28x128 -> 512, 16 KiB: 1.04x); a larger
# one and the next do not both stay in L2 (float32 7x7x2048 -> 512, 512 KiB: 1.0-1.02x).
FETCH_MIN_BYTES, FETCH_MAX_BYTES = 32 << 10, l2_bytes() // 8
# the prefetch hints' locality (LLVM's 3: prefetcht0, 2: prefetcht1): a panel's next rows, read within the
# pass, 3; another part of the weights, ``_fma_chunk``'s ``ahead`` (a chunk or panel read from the next call
# on), 2.  ``conv2d_stream_forward``'s layers at 64x64 (stage 4: 4x4x1024 -> 256, 4x4x256 3x3,
# 4x4x256 -> 1024) took 0.92-0.94x the time with 2 than with 3 (1: the same as 2, 0: 1.0x); the next-panel
# fetches of ``conv2d_forward`` 0.99-1.01x either way; its own rows ahead with 2 0.97-1.05x: kept at 3
# (Zen 4, weights evicted, same process)
FETCH_LOCALITY, AHEAD_LOCALITY = 3, 2
GROUP_BYTES = l2_bytes() // 4  # weight panels of one task (``work_split``'s rule): a quarter of L2
# Winograd where it was measured to win (Zen 3, 2 cores, weights evicted, against the direct kernel, vector
# transforms): 56x56x64 2.2x, 28x28x128 2.5x, 14x14x256 1.6x at batch 1; 7x7x512 1.2x at batch 4, 1.3x at
# batch 8.  At 64x64 ResNet50 took 0.93-0.95x the time with its 16x16x64 layers (19 MFLOP) on Winograd (in
# one process, against the direct kernel on its measured split): a call of one image of 16 blocks or more
# pays from WINOGRAD_SMALL_FLOPS.  It loses where its weights, 4x the direct ones, are many per block: they
# stream from memory (7x7x512: 0.96x at batch 1, 0.85x at batch 2, 9.4 and 4.7 MB per block), and gains
# nothing on tiny calls (8x8x64 at batch 1, 4.7 MFLOP: 1.03x).
WINOGRAD_MIN_TILES = 8  # 4x4 output blocks in the whole batch
WINOGRAD_MIN_FLOPS = 50e6  # of the direct convolution, per call
WINOGRAD_IMAGE_TILES, WINOGRAD_SMALL_FLOPS = 16, 10e6  # or this many blocks an image, and this many flops
WINOGRAD_BLOCK_BYTES = 3 << 20  # at most this many bytes of transformed weights per block
WINOGRAD_BYTES = 2 << 20  # transformed blocks of one pass: enough images to fill about this much
WINOGRAD_MEASURE_FLOPS = 20e6  # above this, the choice is measured once per machine (``wisdom``)
# A direct convolution of at most this many flops (ResNet50 at 64x64) takes its work split from ``wisdom``:
# ``work_split``'s rule, or one of these many tiles and panels per task where measured faster by SPLIT_MARGIN.
# (On a Zen 3, single 64x64 layers ran up to 1.4x faster on their best split, mostly with more panels per
# task; the whole 64x64 pass 0.95-1.0x the time, same process.)
SPLIT_MEASURE_FLOPS = 40e6
SPLIT_CHUNKS, SPLIT_GROUPS, SPLIT_MARGIN = (1, 2, 3, 4, 6, 8, 12), (1, 2, 4, 8, 16), 0.05
# what wisdom is recorded for (the kernels' design is named: choices measured for an earlier one are measured
# again; Winograd's input transforms reading the unpadded input made its layers cheaper against the direct
# kernel: on the Zen 4 the recorded bf16 choice for 56x56x64 was direct, measured afresh F(2x2, 3x3) 8 times of 8)
MACHINE = (f"{cpu_model()} | {CPU_NAME} | {ISA} | tile {TILE}x{PANEL} panel-major streamed, vector transforms"
           " of the unpadded input")


class PackedConv2D:
    """Convolution weights packed for ``conv2d``: made once by ``pack_conv2d``.

    ``shape`` is the kernel's HWIO shape.
    ``panels`` (1, ceil(Cout / PANEL), KH*KW*Cin, PANEL) feeds the direct kernel; a 3x3
    kernel also has Winograd packings, made on first use by ``winograd_panels(block)``: F(4x4, 3x3)'s
    36 transformed panel sets (four times the size of ``panels``) and F(2x2, 3x3)'s 16 (``winograd2``,
    16/9 the size).  With ``precision="bf16"``, ``panels`` is the bf16 packing of ``bf16.pack_bf16``,
    and the only Winograd packing is F(2x2, 3x3)'s in bf16, made from the rounded weights.
    ``release_direct`` makes a copy that keeps one Winograd packing and not the direct panels.
    """

    def __init__(self, shape, panels, im2col, precision="fp32"):
        self.shape = tuple(shape)
        self.panels = panels
        self.im2col = im2col    # True: the input is gathered with im2col and run as a 1x1
        self.precision = precision
        self._winograd = {}     # output block size (4: F(4x4, 3x3), 2: F(2x2, 3x3)) -> its packing
        self.base = 0           # the Winograd form kept where the direct panels went (``release_direct``), else 0

    @property
    def kernel_size(self):
        return self.shape[:2]

    @property
    def in_channels(self):
        return self.shape[2]

    @property
    def out_channels(self):
        return self.shape[3]

    def unpacked(self):
        """The (KH, KW, Cin, Cout) kernel, read back from the panels (no second copy is kept); without them
        (``release_direct``), from a float32 F(2x2, 3x3) packing (``winograd2.untransform_kernel``: the kernel
        to float32's rounding, not to the bit)."""
        kh, kw, cin, cout = self.shape
        if self.base:
            if self.base != 2 or self.precision != "fp32":
                raise ValueError(f"PackedConv2D.unpacked: only a {self.precision} F({self.base}x{self.base}, 3x3) "
                                 "packing is left, which cannot be read back")
            u = self._winograd[2].transpose(0, 2, 1, 3).reshape(16, cin, -1)[:, :, :cout]
            return winograd2.untransform_kernel(u)
        if self.precision == "bf16" and self.im2col:
            depth = 2 * self.panels.shape[2]
            return bf16.unpack_bf16(self.panels, (1, 1, depth, cout))[0, 0, : kh * kw * cin].reshape(self.shape)
        if self.precision == "bf16":
            return bf16.unpack_bf16(self.panels, self.shape)
        rows = self.panels[0].transpose(1, 0, 2).reshape(kh * kw * cin, -1)
        return rows[:, :cout].reshape(kh, kw, cin, cout)

    def drop_winograd(self, keep=0):
        """Release the Winograd packings but those of block size ``keep`` and ``base`` (plans that use one keep
        their own reference)."""
        self._winograd = {block: p for block, p in self._winograd.items() if block in (keep, self.base)}

    def release_direct(self, block):
        """A copy that holds only the Winograd packing of output block ``block`` (made here if need be), without
        the direct panels or other forms: it runs as Winograd at every shape (``winograd_forms``)."""
        panels = self.winograd_panels(block)
        released = copy.copy(self)
        released.panels, released._winograd, released.base = None, {block: panels}, block
        return released

    def winograd_forms(self):
        """The Winograd forms (output block sizes) this packing can run: those of its precision, or without the
        direct panels its ``base``, and F(4x4, 3x3) from a float32 F(2x2, 3x3) base (``unpacked``)."""
        if self.base and not (self.base == 2 and self.precision == "fp32"):
            return (self.base,)
        return WINOGRAD_FORMS[self.precision]

    def winograd_arrays(self):
        """The Winograd packings made so far."""
        return list(self._winograd.values())

    def winograd_panels(self, block=None):
        """The transformed kernel of Winograd F(block x block, 3x3), packed: block 4 (float32 only) gives
        (36, ceil(Cout / 64), Cin, 64), block 2 (16, ceil(Cout / 64), Cin, 64), in bf16 (16, ceil(Cout / 64),
        Cin/2, 64, 2).  ``block`` defaults to the precision's first form (``WINOGRAD_FORMS``)."""
        block = block or WINOGRAD_FORMS[self.precision][0]
        if block not in self.winograd_forms():
            raise ValueError(f"PackedConv2D.winograd_panels: no F({block}x{block}, 3x3) from this "
                             f"{self.precision} packing")
        if block not in self._winograd:
            if self.precision == "bf16":
                self._winograd[block] = winograd2.pack_transformed(self.unpacked())
            else:
                self._winograd[block] = pack_transformed(self.unpacked(), PANEL, winograd2._G if block == 2 else None)
        return self._winograd[block]


@pjit
def _pack_panels(panels, w3d):
    """Copy (S, K, Cout) kernels into 64-wide panels.

    Parameters
    ----------
    panels : float32 (S, nblk, K, 64), zero where a panel runs past Cout
    w3d : float32 (S, K, Cout)
    """
    sets, nblk, k, _ = panels.shape
    cout = w3d.shape[2]
    for task in prange(sets * nblk):
        s, b = task // nblk, task % nblk
        for r in range(k):
            for j in range(PANEL):
                c = b * PANEL + j
                panels[s, b, r, j] = w3d[s, r, c] if c < cout else 0.0


def _pack(w3d):
    sets, k, cout = w3d.shape
    panels = _memory.empty((sets, -(-cout // PANEL), k, PANEL))
    _pack_panels(panels, np.ascontiguousarray(w3d, dtype=np.float32))
    return panels


PRECISIONS = ("fp32", "bf16")
# the Winograd forms of each precision, by output block size, the default (``winograd=True``) first:
# F(4x4, 3x3) would multiply bf16's rounding error about ninefold (``winograd2``)
WINOGRAD_FORMS = {"fp32": (4, 2), "bf16": (2,)}


def pack_conv2d(w, im2col=False, precision="fp32"):
    """Pack a Keras HWIO convolution kernel (or a (in, out) dense kernel) for ``conv2d``.

    Parameters
    ----------
    w : float32 (KH, KW, Cin, Cout) or (Cin, Cout)
    im2col : bool
        Gather the receptive fields with the Cython ``im2col`` and run a 1x1
        convolution over them, instead of the direct kernel.  Off by default: it
        was measured slower everywhere here, the 7x7 stem included (2.1 ms
        against 1.45 ms at 224x224, batch 1; 20 ms against 13 ms at batch 8),
        because the gathered copy is 49x the input.
    precision : "fp32" or "bf16"
        bf16 rounds the weights to bfloat16 (nearest even) and keeps only those:
        half the memory; see ``fastres.kernels.bf16``.  Not with ``im2col``.

    Returns
    -------
    PackedConv2D
    """
    if isinstance(w, np.ndarray) and w.ndim == 2:
        w = w[None, None]
    w = _checks.array("pack_conv2d", "w", w, ndim=4)
    if precision not in PRECISIONS:
        raise ValueError(f"pack_conv2d: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    kh, kw, cin, cout = w.shape
    if precision == "bf16":
        if im2col:
            raise ValueError("pack_conv2d: im2col=True is for precision='fp32' only")
        if amx.gathered((kh, kw), cin):  # AMX runs it as im2col + 1x1 over whole tile rows
            rows = np.zeros((amx.im2col_depth((kh, kw), cin), cout), np.float32)
            rows[: kh * kw * cin] = w.reshape(-1, cout)
            return PackedConv2D(w.shape, bf16.pack_bf16(rows[None, None]), True, "bf16")
        return PackedConv2D(w.shape, bf16.pack_bf16(w), False, "bf16")
    return PackedConv2D(w.shape, _pack(w.reshape(1, kh * kw * cin, cout)), bool(im2col) and kh * kw > 1)


def split_candidates(runs, ntiles, nblk, threads, rule):
    """The (nchunks, group) a small convolution's split is chosen from, by name ("nchunks,group"): the
    ``rule`` (``work_split``'s) and every ``SPLIT_CHUNKS`` x ``SPLIT_GROUPS`` that makes 1 to 8 tasks a thread."""
    candidates = {f"{c},{g}": (c, g) for c in SPLIT_CHUNKS if c <= ntiles for g in SPLIT_GROUPS if g <= nblk
                  and threads <= runs * c * -(-nblk // g) <= 8 * threads}
    candidates[f"{rule[0]},{rule[1]}"] = tuple(rule)
    return candidates


def work_split(runs, ntiles, nblk, depth, threads, tile_pixels=TILE):
    """How ``conv2d_forward`` splits its work: (tasks per run along the pixels, panels per task).

    A task computes a group of panels (about ``GROUP_BYTES`` of weights), panel by panel,
    for a run of about ``CHUNK`` tiles.  The threads take the tasks as they finish their last
    (``next_task``), and the last ones to finish idle while the others end theirs, so the task count is grown
    until it is a multiple of ``threads`` (or at least 8 per thread) and at least 2 per
    thread.  Each cut along the pixels reads a
    group's weights once more, each cut along the panels a run's inputs: the side cut is
    the one with more pixels per run than channels per group (a layer of a few pixels, as
    at 64x64, splits its weights between the threads rather than its pixels).  Winograd's products
    are split the same way.  (Cutting their tiles into a multiple of ``threads`` runs, as the
    transforms cut them, so that each thread's products would stay in its own cache, read each
    weight set twice where a product has few tiles: the 224x224 stage-4 layers, 3 tiles a product,
    ran 1.25x as long, stages 2 and 3 1.03-1.05x; Zen 3.)  ``tile_pixels``: pixels per tile (AMX
    blocks hold 16 or 32).
    """
    group = max(1, min(nblk, GROUP_BYTES // (depth * PANEL * 4)))
    ngroups, nchunks = -(-nblk // group), -(-ntiles // CHUNK)
    while True:
        tasks = runs * nchunks * ngroups
        if tasks >= 2 * threads and (tasks % threads == 0 or tasks >= 8 * threads):
            break
        if nchunks < ntiles and (ngroups >= nblk or ntiles * tile_pixels / nchunks >= nblk * PANEL / ngroups):
            nchunks += 1
        elif ngroups < nblk:  # the largest group that makes more groups
            group = -(-nblk // (ngroups + 1))
            while -(-nblk // group) <= ngroups:
                group -= 1
            ngroups = -(-nblk // group)
        else:
            break
    return nchunks, group


_FMA_TILE_DOC = """``acc[t, :] = start[t, :] + sum over kernel rows i, steps q of x[xb[t] + i * row_stride + q] * panel[i * row + q, :]``.

    The tile's inner product, emitted in LLVM IR with explicit vectors: for each step, the
    panel row's ``PANEL / VECTOR_FLOATS`` weight vectors are loaded once, then each pixel's
    input is broadcast and multiplied into its accumulators (a multiply and an add marked
    ``contract``: one FMA where the target has FMA).  So the accumulators, the weight vectors
    and one broadcast are live at a time, ``TILE * PANEL / lanes + PANEL / lanes + 1``
    registers, whatever the auto-vectoriser would have chosen: written as Numba loops, LLVM
    held all six broadcasts at once on AVX2 (6 + 2 + 12 ymm of 16), spilled, and ran at half
    this speed (measured on an AMD Zen 3: 1x1 layers 53-59 GFLOPS against 96-107).

    bf16 panels (``bf16.pack_bf16``) hold two kernel rows per step, as pairs in 32-bit lanes,
    and the step covers inputs ``2q`` and ``2q + 1``.  On float32 inputs each row of the pair is
    widened to float32 in turn (its halves shifted up: the even row is the low half of each lane,
    the odd row the low half of the lanes loaded 2 bytes on) and multiplied with FMAs; on bf16
    inputs (uint16, only where ``BF16_DOT``) one ``vdpbf16ps`` adds both products.

    The accumulators start at ``bias[c0 : c0 + PANEL]``, zero past ``bias.size`` in a part panel
    (``_tile.start_accumulators``); the sums are left in ``acc``.

    acc : CPointer(float32), (TILE, PANEL) accumulators (``stack_f32``)
    x : float32, or uint16 (bf16) with bf16 panels, (flat) input; tile pixel t's kernel row i
        starts at ``xb[t] + i * row_stride``
    xb : CPointer(uint64), TILE offsets
    row_stride, kernel_h, row : int, input elements between kernel rows, rows, steps per row (KW * Cin,
        or KW * Cin / 2 pairs)
    panel : float32 (kernel_h * row, PANEL), or uint16 (kernel_h * row, PANEL, 2) bf16 pairs; C-contiguous
    fetch : bool, prefetch the panel ``PREFETCH_ROWS`` steps ahead (where it is not in L1)
    bias : float32 (Cout,), C-contiguous
    c0 : int, the panel's first output channel
"""


def _tile_intrinsic(pixels):
    """``_fma_tile`` for a tile's first ``pixels`` (``TILE``, or ``NARROW_TILE`` for a short last tile)."""

    def fma_tile(typingctx, acc, x, xb, row_stride, kernel_h, row, panel, fetch, bias, c0):
        if _tile_kinds(x, panel, bias) is None:
            return None

        def codegen(context, builder, signature, args):
            return _emit_tile(context, builder, signature, args, chunk=False, pixels=pixels)

        return types.void(acc, x, xb, row_stride, kernel_h, row, panel, fetch, bias, c0), codegen

    fma_tile.__doc__ = _FMA_TILE_DOC
    return intrinsic(fma_tile)


_fma_tile = _tile_intrinsic(TILE)
_fma_tile_narrow = _tile_intrinsic(NARROW_TILE)  # a run's last tile, where it holds NARROW_TILE pixels or fewer
_fma_tile_tiny = _tile_intrinsic(TINY_TILE)  # ... or TINY_TILE or fewer


def _chunk_intrinsic(pixels):
    """``_fma_chunk`` for a tile's first ``pixels`` (``TILE``, or ``NARROW_TILE`` for a short last tile)."""

    def fma_chunk(typingctx, acc, x, xb, row_stride, kernel_h, row, panel, fetch, bias, c0, first_row, resume,
                  ahead, ahead_at, ahead_step):
        if _tile_kinds(x, panel, bias) is None or not (isinstance(ahead, types.Array) and ahead.layout == "C"):
            return None

        def codegen(context, builder, signature, args):
            return _emit_tile(context, builder, signature, args, chunk=True, pixels=pixels)

        return (types.void(acc, x, xb, row_stride, kernel_h, row, panel, fetch, bias, c0, first_row, resume, ahead,
                           ahead_at, ahead_step), codegen)

    fma_chunk.__doc__ = """``_fma_tile`` over panel rows from ``first_row`` on, resuming from ``acc`` or starting at the bias,
    and prefetching another part of the weights as it goes (``conv2d_stream_forward``).

    The first ten arguments are ``_fma_tile``'s (``panel`` row ``first_row + i * row + q`` is step
    ``q`` of kernel row ``i``), then:

    first_row : int, the panel row of the first step
    resume : bool, start from the sums in ``acc`` (a previous chunk's) rather than the bias
    ahead : float32 or uint16 (flat), C-contiguous: where the prefetches point (the packed weights)
    ahead_at, ahead_step : int, step ``s`` prefetches ``ahead[ahead_at + s * ahead_step]`` (and, where a step's
        weights span several cache lines, as many lines from there), when ``fetch``
    """ + f"Computes the first {pixels} of the tile's ``TILE`` pixels."
    return intrinsic(fma_chunk)


_fma_chunk = _chunk_intrinsic(TILE)
_fma_chunk_narrow = _chunk_intrinsic(NARROW_TILE)  # a run's last tile, where it holds NARROW_TILE pixels or fewer
_fma_chunk_tiny = _chunk_intrinsic(TINY_TILE)  # ... or TINY_TILE or fewer


def _tile_kinds(x, panel, bias):
    """(bf16 panels, bf16 inputs) for ``_fma_tile``'s argument types, or None where it does not apply."""
    if not (isinstance(x, types.Array) and isinstance(panel, types.Array) and panel.layout == "C" and is_bias(bias)
            and (x.dtype, panel.dtype, panel.ndim) in ((types.float32, types.float32, 2),
                                                       (types.float32, types.uint16, 3), (types.uint16, types.uint16, 3))):
        return None
    pairs, dot = panel.dtype == types.uint16, x.dtype == types.uint16
    if dot and not BF16_DOT:
        raise errors.TypingError("conv2d_forward: bf16 (uint16) inputs need vdpbf16ps (AVX512-BF16), which this "
                                 f"target ({CPU_NAME}) lacks; give the bf16 weights float32 inputs")
    return pairs, dot


def _emit_tile(context, builder, signature, args, chunk, pixels=TILE):
    """The code of ``_fma_tile`` (``chunk`` False) and ``_fma_chunk`` (True), for a tile's first ``pixels``."""
    pairs, dot = _tile_kinds(signature.args[1], signature.args[6], signature.args[8])
    acc_ptr, x_arr, xb_ptr = args[:3]
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    vf, vi = ir.VectorType(ir.FloatType(), VECTOR_FLOATS), ir.VectorType(i32, VECTOR_FLOATS)
    stride, rows, steps = (context.cast(builder, v, t, types.uint64)
                           for v, t in zip(args[3:6], signature.args[3:6]))
    x_data = context.make_array(signature.args[1])(context, builder, x_arr).data
    w_data = context.make_array(signature.args[6])(context, builder, args[6]).data
    nvec = PANEL // VECTOR_FLOATS
    step_elements = 2 * PANEL if pairs else PANEL  # weight elements per step, 4 * PANEL bytes either way
    # one stack slot per accumulator vector: LLVM keeps them in registers through the loops
    slots, acc_vec = start_accumulators(context, builder, signature, args, acc_ptr, (8, 9), pixels)
    if chunk:
        first_row = context.cast(builder, args[10], signature.args[10], types.int64)
        w_data = builder.gep(w_data, [builder.mul(first_row, i64(step_elements))])
        with builder.if_then(context.cast(builder, args[11], signature.args[11], types.boolean)):
            for k, slot in enumerate(slots):
                builder.store(builder.load(builder.gep(acc_vec, [i64(k)]), align=4), slot)
        ahead_data = context.make_array(signature.args[12])(context, builder, args[12]).data
        ahead_data = builder.gep(ahead_data, [context.cast(builder, args[13], signature.args[13], types.int64)])
        ahead_step = context.cast(builder, args[14], signature.args[14], types.int64)
    splat = ir.Constant(ir.VectorType(i32, VECTOR_FLOATS), [0] * VECTOR_FLOATS)
    hint = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]), "llvm.prefetch.p0")
    if dot:
        vbf = ir.VectorType(_BFloat(), 2 * VECTOR_FLOATS)
        product = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vbf, vbf]),
                                                 f"llvm.x86.avx512bf16.dpbf16ps.{32 * VECTOR_FLOATS}")
    shift = ir.Constant(vi, [16] * VECTOR_FLOATS)

    def broadcast(pointer, vector):
        one = builder.insert_element(ir.Constant(vector, ir.Undefined), builder.load(pointer, align=4), i32(0))
        return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), splat)

    def accumulate(k, term):
        builder.store(builder.fadd(builder.load(slots[k]), term, flags=("contract",)), slots[k])

    def loops(with_fetch):
        with cgutils.for_range(builder, rows) as kernel_row:
            # a kernel row's taps and channels are one contiguous run of each pixel's input row
            x_row = builder.mul(kernel_row.index, stride)
            bases = [builder.gep(x_data, [builder.add(builder.load(builder.gep(xb_ptr, [i64(t)])), x_row)])
                     for t in range(pixels)]
            w_row = builder.gep(w_data, [builder.mul(builder.mul(kernel_row.index, steps), i64(step_elements))])
            with cgutils.for_range(builder, steps) as step:
                q = step.index
                w_at = builder.gep(w_row, [builder.mul(q, i64(step_elements))])
                if with_fetch:
                    if chunk:  # the part of the weights this call fetches for a later one
                        at = builder.add(builder.mul(kernel_row.index, steps), q)
                        fetch_at = builder.gep(ahead_data, [builder.mul(at, ahead_step)])
                    else:  # this panel, PREFETCH_ROWS steps on
                        fetch_at = builder.gep(w_at, [i64(PREFETCH_ROWS * step_elements)])
                    for line in range(0, step_elements, LINE_BYTES // (2 if pairs else 4)):
                        ahead = builder.bitcast(builder.gep(fetch_at, [i64(line)]), i8.as_pointer())
                        locality = AHEAD_LOCALITY if chunk else FETCH_LOCALITY
                        builder.call(hint, [ahead, i32(0), i32(locality), i32(1)])  # a read, of data
                if not pairs or dot:  # (the widened rows are loaded one at a time, below)
                    ws = [builder.load(builder.bitcast(builder.gep(w_at, [i64(VECTOR_FLOATS * j * (1 + pairs))]),
                                                       (vi if pairs else vf).as_pointer()), align=4)
                          for j in range(nvec)]
                if not pairs:
                    for t in range(pixels):
                        xt = broadcast(builder.gep(bases[t], [q]), vf)
                        for j, w in enumerate(ws):
                            accumulate(t * nvec + j, builder.fmul(xt, w, flags=("contract",)))
                elif dot:  # pixel t's pair of bf16 inputs, one 32-bit lane, to every lane
                    for t in range(pixels):
                        pair = builder.bitcast(builder.gep(bases[t], [builder.shl(q, i64(1))]), i32.as_pointer())
                        xt = builder.bitcast(broadcast(pair, vi), vbf)
                        for j, w in enumerate(ws):
                            k = t * nvec + j
                            builder.store(builder.call(product, [builder.load(slots[k]), xt, builder.bitcast(w, vbf)]),
                                          slots[k])
                else:  # the pair's rows widened to float32 one after the other, each times its own input
                    w_bytes = builder.bitcast(w_at, i8.as_pointer())
                    for e in range(2):
                        # row e of the pair: the lanes loaded 2e bytes on, shifted up (for the odd row the
                        # lane's upper half is the next lane's even value: shifted out).  Loaded again, not
                        # masked, so that the even row's vectors need not stay live (on AVX-512 they spilled)
                        row_e = [builder.bitcast(builder.shl(builder.load(builder.bitcast(
                            builder.gep(w_bytes, [i64(4 * VECTOR_FLOATS * j + 2 * e)]), vi.as_pointer()), align=2),
                            shift), vf) for j in range(nvec)]
                        for t in range(pixels):
                            xt = broadcast(builder.gep(bases[t], [builder.add(builder.shl(q, i64(1)), i64(e))]), vf)
                            for j in range(nvec):
                                accumulate(t * nvec + j, builder.fmul(xt, row_e[j], flags=("contract",)))

    with builder.if_else(context.cast(builder, args[7], signature.args[7], types.boolean)) as (then, otherwise):
        with then:
            loops(True)
        with otherwise:
            loops(False)
    for k, slot in enumerate(slots):
        builder.store(builder.load(slot), builder.gep(acc_vec, [i64(k)]), align=4)
    return context.get_dummy_value()


@inline
def _task_tiles(task, runs, ngroups, group, sets, ntiles, nchunks):
    """A direct-kernel task's (run, first panel, weight set, first tile, tile past the last), tasks numbered
    chunk-major (consecutive tasks share their tiles' inputs), as ``conv2d_forward`` and
    ``conv2d_stream_forward`` both hand them out."""
    chunk = task // (runs * ngroups)
    run = task // ngroups % runs
    return run, task % ngroups * group, run % sets, chunk * ntiles // nchunks, (chunk + 1) * ntiles // nchunks


@inline
def _narrow_tile(ntiles, run_pixels):
    """The run's last tile where it holds ``NARROW_TILE`` pixels or fewer (it computes only those), else -1;
    and whether it holds ``TINY_TILE`` or fewer."""
    last = run_pixels - (ntiles - 1) * TILE
    return (ntiles - 1 if last <= NARROW_TILE else -1), last <= TINY_TILE


@pjit
def conv2d_forward(out, inp, panels, starts, bias, residual, kernel_w, relu, nchunks, group, rounded, top,
                   left):
    """Direct convolution of a padded NHWC input with packed weights.

    The images of the batch may each have their own weights: with S weight sets,
    image ``n`` uses set ``n % S`` (Winograd runs its 36 products as 36 images).

    bf16 panels (``bf16.pack_bf16``) take float32 inputs, or bf16 ones where ``BF16_DOT`` (``_fma_tile``).

    Parameters
    ----------
    out : float32 (N, OH, OW, Cout), written
    inp : float32, or uint16 (bf16), (N, Hp, Wp, Cin), padded so that every tap is in bounds; Cin even with bf16 panels
    panels : float32 (S, nblk, KH*KW*Cin, PANEL) from ``pack_conv2d``, S 1 or N; or uint16 (1, nblk, KH*KW*Cin/2,
        PANEL, 2), bf16 pairs from ``bf16.pack_bf16`` (its buffer has the 2 readable bytes past the end
        that the widened products read)
    starts : int64 (runs, tiles * TILE) from ``pixel_starts`` (it holds the stride)
    bias : float32 (Cout,), C-contiguous
    residual : float32 (N, OH, OW, Cout) added before ReLU, or (0, 0, 0, 0) for none
    kernel_w : int, KW (KH follows from the panel depth)
    relu : bool, apply max(0, .) while storing
    nchunks, group : int, from ``work_split``: each run's tiles are cut into ``nchunks``
        even runs, its panels into groups of ``group``, and each pair is a task
    rounded : uint16 (N, OH + top + ..., OW + left + ..., Cout), or (0, 0, 0, 0): when not empty the output
        goes there too, rounded to bf16, at (top, left) of each image (the next convolution's padded bf16
        input: ``Conv2DPlan.feed``); Cout a multiple of ``PANEL`` then
    top, left : int
    """
    n, oh, ow, cout = out.shape
    wp, cin = inp.shape[2], inp.shape[3]
    sets, nblk, depth = panels.shape[0], panels.shape[1], panels.shape[2]
    row = kernel_w * cin // (2 if panels.ndim == 5 else 1)  # steps per kernel row: inputs, or pairs of them
    kernel_h = depth // row
    image_pixels = oh * ow
    has_residual = residual.size > 0
    x = inp.reshape(-1)
    y = out.reshape(n * image_pixels, cout)
    res = residual.reshape(-1, cout)
    to_bf16, y16 = rounded.size > 0, rounded.reshape(-1)
    place = (image_pixels, ow, top, left, rounded.shape[1], rounded.shape[2])
    # pixels are tiled image by image (when images have their own weights) or as one run
    runs = starts.shape[0]
    run_pixels = n * image_pixels // runs
    ntiles = starts.shape[1] // TILE
    # A task computes `group` panels for a run of tiles, panel by panel, each through all the tiles:
    # a panel is read from memory once, by its first tile's pass, and stays in L2 (or L1) for the others.
    # Against the earlier kernel (tile by tile through the whole group, prefetching the next tile's
    # inputs) ResNet50 took 0.95-0.97x the time at 64x64, 0.94x at 224x224 batch 1 and 0.96-1.02x at
    # batch 8; against tile by tile without that input prefetch, 0.99x at 64x64 and 224x224 batch 1,
    # 0.97x at batch 8 (Zen 3, same process).  A panel's later passes fetch the next panel
    # (``FETCH_MIN_BYTES``); on Zen 3 this had gained nothing for the whole ResNet50 (0.99-1.01x).
    ngroups = (nblk + group - 1) // group
    ntasks = runs * nchunks * ngroups
    narrow, tiny = _narrow_tile(ntiles, run_pixels)
    weights = panels.reshape(-1)
    panel_size = panels[0, 0].size  # elements
    fetch_next = FETCH_MIN_BYTES < panel_size * panels.itemsize <= FETCH_MAX_BYTES
    taken = task_counters()  # tasks taken so far from each thread's run of them
    # each thread takes its next task when done with its last (``next_task``: its own run of tasks first, then
    # the others'): on a shared VM one core can run slower than the other for a while, and a share fixed in
    # advance then waits for it.  The first iteration of each thread takes tasks until none are left; its
    # others find none.
    for _ in prange(ntasks):
        acc_ptr = stack_f32(ACC)
        acc = carray(acc_ptr, (TILE, PANEL))
        xb_ptr = stack_u64(TILE)
        xb = carray(xb_ptr, (TILE,))
        task = next_task(taken, ntasks)
        while task < ntasks:
            run, first, wset, begin, last = _task_tiles(task, runs, ngroups, group, sets, ntiles, nchunks)
            # the passes after a panel's first read it from cache, and fetch the next panel from memory as they
            # go, each its share (``ahead`` elements a step): the task's next panel, or after its last the first
            # of the task this thread will most likely take next (``peek_task``).  See ``FETCH_MIN_BYTES``.
            later = last - begin - 1
            ahead = (panel_size + later * depth - 1) // max(1, later * depth)
            for b in range(nblk):
                # (a loop over the task's own panels only, range(first, ...), runs 1.5x slower:
                # LLVM then keeps less in registers; measured on 56x56x64 -> 256)
                if b < first or b >= first + group:
                    continue
                c0 = b * PANEL
                panel = panels[wset, b]
                next_panel = -1
                for tile in range(begin, last):
                    local0 = tile * TILE
                    for t in range(TILE):  # unsigned offsets: no negative-index test per load
                        xb[t] = np.uint64(starts[run, local0 + t])
                    # prefetch a few rows ahead where the panel is not in L1: the first tile's pass reads it
                    # from memory, and later passes re-read a large one from L2 (the hardware prefetchers
                    # alone left the L2 re-reads waiting: 7x7x512 3x3 12% faster in the tile-by-tile order;
                    # ResNet50 1-2% faster in this one)
                    fetch = tile == begin or depth > L1_PANEL_ROWS
                    # ask for the next tile's residual, which its store reads: the residual was written
                    # layers ago (L3 or memory).  Residual 1x1s with the residual evicted 0.97-0.99x,
                    # ResNet50 224x1 0.98-1.0x (Zen 3, same process; most of what a residual cost was
                    # 4K aliasing: ``_memory.PAGE``)
                    if has_residual:
                        for t in range(TILE):
                            fetch_line(res, (run * run_pixels + local0 + TILE + t) * cout + c0)
                    if tile == begin + 1 and fetch_next:  # (after the first pass: the other threads have taken theirs)
                        next_panel = (wset * nblk + b + 1) * panel_size
                        if b + 1 == min(first + group, nblk):
                            following = peek_task(taken, ntasks)  # (a hint, not taken)
                            next_first, next_set = _task_tiles(following, runs, ngroups, group, sets, ntiles, nchunks)[1:3]
                            next_panel = (next_set * nblk + next_first) * panel_size if following < ntasks else -1
                    if next_panel >= 0:
                        at = next_panel + (tile - begin - 1) * ahead * depth
                        if tile == narrow and tiny:
                            _fma_chunk_tiny(acc_ptr, x, xb_ptr, wp * cin, kernel_h, row, panel, True, bias, c0, 0,
                                            False, weights, at, ahead)
                        elif tile == narrow:
                            _fma_chunk_narrow(acc_ptr, x, xb_ptr, wp * cin, kernel_h, row, panel, True, bias, c0, 0,
                                              False, weights, at, ahead)
                        else:
                            _fma_chunk(acc_ptr, x, xb_ptr, wp * cin, kernel_h, row, panel, True, bias, c0, 0, False,
                                       weights, at, ahead)
                    elif tile == narrow and tiny:
                        _fma_tile_tiny(acc_ptr, x, xb_ptr, wp * cin, kernel_h, row, panel, fetch, bias, c0)
                    elif tile == narrow:
                        _fma_tile_narrow(acc_ptr, x, xb_ptr, wp * cin, kernel_h, row, panel, fetch, bias, c0)
                    else:
                        _fma_tile(acc_ptr, x, xb_ptr, wp * cin, kernel_h, row, panel, fetch, bias, c0)
                    p0, end = run * run_pixels + local0, (run + 1) * run_pixels
                    store_tile(y, res, acc, acc_ptr, p0, c0, end, has_residual, relu)
                    if to_bf16:
                        store_tile_rounded(y16, y, p0, c0, end, place)
            task = next_task(taken, ntasks)


@pjit
def conv2d_stream_forward(out, inp, panels, starts, bias, residual, kernel_w, relu, nchunks, group, rounded,
                          top, left):
    """``conv2d_forward`` for tasks of a few tiles, overlapping the weights' stream from memory with the arithmetic.

    Same arguments and result as ``conv2d_forward``.  There, a task of a few tiles reads each panel
    from memory in its first tile's pass (waiting on memory) and then computes the other tiles from
    cache (the memory idle): at 64x64, stage 4 (4x4 pixels: 3 tiles) took the sum of its weight
    streaming time and its arithmetic time.  Here a task goes through its panels in chunks of
    ``STREAM_ROWS`` rows (8 KiB, which stays in L1): every tile's pass over a chunk adds to that tile's
    saved sums (``_fma_chunk``), and each pass prefetches its share of the next chunk, so the next
    chunk arrives while this one is computed.  Tiles past ``STREAM_TILES`` in a task are taken
    ``STREAM_TILES`` at a time.  The sums are added in the same order as ``conv2d_forward``'s: the
    results are the same to the bit.
    """
    n, oh, ow, cout = out.shape
    wp, cin = inp.shape[2], inp.shape[3]
    sets, nblk, depth = panels.shape[0], panels.shape[1], panels.shape[2]
    pair = 2 if panels.ndim == 5 else 1  # inputs per step
    row = kernel_w * cin // pair
    kernel_h = depth // row
    step_elements = PANEL * pair  # weight elements per step
    image_pixels = oh * ow
    has_residual = residual.size > 0
    x = inp.reshape(-1)
    y = out.reshape(n * image_pixels, cout)
    res = residual.reshape(-1, cout)
    to_bf16, y16 = rounded.size > 0, rounded.reshape(-1)
    place = (image_pixels, ow, top, left, rounded.shape[1], rounded.shape[2])
    weights = panels.reshape(-1)
    runs = starts.shape[0]
    run_pixels = n * image_pixels // runs
    ntiles = starts.shape[1] // TILE
    row_chunks = (row + STREAM_ROWS - 1) // STREAM_ROWS  # chunks per kernel row: a chunk never spans two
    panel_chunks = kernel_h * row_chunks
    ngroups = (nblk + group - 1) // group
    ntasks = runs * nchunks * ngroups
    narrow, tiny = _narrow_tile(ntiles, run_pixels)  # (16 pixels: 6 + 6 + 4)
    taken = task_counters()
    for _ in prange(ntasks):
        saved = stack_f32(STREAM_ACC)  # each tile's sums between chunks
        xb_ptr = stack_u64(TILE)
        xb = carray(xb_ptr, (TILE,))
        task = next_task(taken, ntasks)
        while task < ntasks:
            run, first, wset, begin, last = _task_tiles(task, runs, ngroups, group, sets, ntiles, nchunks)
            total = min(group, nblk - first) * panel_chunks
            for sub in range(begin, last, STREAM_TILES):
                count = min(STREAM_TILES, last - sub)
                for c in range(total):
                    b, part = first + c // panel_chunks, c % panel_chunks
                    i, q0 = part // row_chunks, part % row_chunks * STREAM_ROWS
                    steps = min(STREAM_ROWS, row - q0)
                    # the next chunk, cut in ``count`` shares, one fetched by each tile's pass over this one
                    fetch = c + 1 < total
                    ahead_at, share = 0, 0
                    if fetch:
                        next_part = (c + 1) % panel_chunks
                        next_q0 = next_part % row_chunks * STREAM_ROWS
                        next_row = next_part // row_chunks * row + next_q0
                        next_b = first + (c + 1) // panel_chunks
                        ahead_at = ((wset * nblk + next_b) * depth + next_row) * step_elements
                        ahead = min(STREAM_ROWS, row - next_q0) * step_elements
                        share = (ahead + count * steps - 1) // (count * steps)  # elements fetched per step
                    c0 = b * PANEL
                    panel = panels[wset, b]
                    for j in range(count):
                        local0 = (sub + j) * TILE
                        for t in range(TILE):
                            xb[t] = np.uint64(starts[run, local0 + t] + i * wp * cin + q0 * pair)
                        acc_ptr = advance(saved, j * ACC)
                        if sub + j == narrow and tiny:
                            _fma_chunk_tiny(acc_ptr, x, xb_ptr, 0, 1, steps, panel, fetch, bias, c0, i * row + q0,
                                            part > 0, weights, ahead_at + j * share * steps, share)
                        elif sub + j == narrow:
                            _fma_chunk_narrow(acc_ptr, x, xb_ptr, 0, 1, steps, panel, fetch, bias, c0, i * row + q0,
                                              part > 0, weights, ahead_at + j * share * steps, share)
                        else:
                            _fma_chunk(acc_ptr, x, xb_ptr, 0, 1, steps, panel, fetch, bias, c0, i * row + q0,
                                       part > 0, weights, ahead_at + j * share * steps, share)
                        if part == panel_chunks - 1:
                            p0, end = run * run_pixels + local0, (run + 1) * run_pixels
                            acc = carray(acc_ptr, (TILE, PANEL))
                            store_tile(y, res, acc, acc_ptr, p0, c0, end, has_residual, relu)
                            if to_bf16:
                                store_tile_rounded(y16, y, p0, c0, end, place)
            task = next_task(taken, ntasks)


def direct_kernel(ntiles, nchunks):
    """The direct kernel for a split of ``ntiles`` tiles per run into ``nchunks`` runs: ``conv2d_stream_forward``
    for tasks of 2 to ``STREAM_TILES`` tiles, else ``conv2d_forward`` (a one-tile task streams its weights
    through one pass, and a task of many tiles is bound by the arithmetic)."""
    return conv2d_stream_forward if 2 <= -(-ntiles // nchunks) <= STREAM_TILES else conv2d_forward


def winograd_starts(tiles, cin, products=36):
    """``pixel_starts`` of Winograd's products (36 in F(4x4, 3x3), 16 in F(2x2, 3x3)) over blocks stored as
    (tiles, products, cin).

    Returns
    -------
    int64 (products, ceil(tiles / TILE) * TILE): product ``s`` of block ``t`` starts at ``(t*products + s) * cin``
    """
    local = np.minimum(np.arange(-(-tiles // TILE) * TILE), tiles - 1)
    return ((local[None, :] * products + np.arange(products)[:, None]) * cin).astype(np.int64)


@pjit
def zero_pad_forward(out, inp, top, left):
    """Copy ``inp`` into the middle of ``out`` and zero the border and any extra channel.

    Row by row through 1-D views, so every inner loop runs over non-negative offsets
    and vectorises (4-D indexing tests each index for wrap-around and stays scalar).

    Parameters
    ----------
    out : float32 (N, H + top + bottom, W + left + right, Cp), Cp >= C, written
    inp : float32 (N, H, W, C)
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
            before, middle, after = dst[: left * cp], dst[left * cp: (left + w) * cp], dst[(left + w) * cp:]
            for k in range(before.size):
                before[k] = 0.0
            if c == cp:
                for k in range(middle.size):
                    middle[k] = src[k]
            else:
                for xx in range(w):
                    for ch in range(c):
                        middle[xx * cp + ch] = src[xx * c + ch]
                    for ch in range(c, cp):
                        middle[xx * cp + ch] = 0.0
            for k in range(after.size):
                after[k] = 0.0
        else:
            for k in range(dst.size):
                dst[k] = 0.0


def zero_pad2d(x, padding, out=None):
    """Zero-pad an NHWC batch, like Keras ``ZeroPadding2D``.

    Parameters
    ----------
    x : float32 (N, H, W, C)
    padding : int, (rows, cols) or ((top, bottom), (left, right))
    out : float32 (N, H + top + bottom, W + left + right, C), optional

    Returns
    -------
    float32 (N, H + top + bottom, W + left + right, C)
    """
    x = _checks.array("zero_pad2d", "x", x, ndim=4)
    (top, bottom), (left, right) = _pad_amounts(padding)
    n, h, w, c = x.shape
    out = _checks.output("zero_pad2d", out, (n, h + top + bottom, w + left + right, c))
    zero_pad_forward(out, x, top, left)
    return out


def _pad_amounts(padding):
    """Normalise Keras ZeroPadding2D's padding argument to ((top, bottom), (left, right))."""
    try:
        if isinstance(padding, (int, np.integer)):
            amounts = ((int(padding),) * 2,) * 2
        elif all(isinstance(p, (int, np.integer)) for p in padding):
            rows, cols = padding
            amounts = ((int(rows),) * 2, (int(cols),) * 2)
        else:
            (top, bottom), (left, right) = padding
            amounts = ((int(top), int(bottom)), (int(left), int(right)))
    except (TypeError, ValueError):
        raise ValueError(f"zero_pad2d: padding must be an int, a pair or a pair of pairs, got {padding!r}") from None
    if any(p < 0 for pair in amounts for p in pair) or any(isinstance(p, bool) for pair in amounts for p in pair):
        raise ValueError(f"zero_pad2d: padding must not be negative, got {padding!r}")
    return amounts


@pjit
def im2col_numba(out, inp, kernel_h, kernel_w, stride):
    """Numba twin of the Cython ``im2col_forward`` (the tests cross-check the two).

    Parameters
    ----------
    out : float32 (N*OH*OW, KH*KW*C), written
    inp : float32 (N, H, W, C), padded
    kernel_h, kernel_w, stride : int
    """
    n, h, w, c = inp.shape
    oh = (h - kernel_h) // stride + 1
    ow = (w - kernel_w) // stride + 1
    for row in prange(n * oh):
        b = row // oh
        yy = row % oh
        for xx in range(ow):
            col = 0
            for i in range(kernel_h):
                for j in range(kernel_w):
                    for ch in range(c):
                        out[row * ow + xx, col] = inp[b, yy * stride + i, xx * stride + j, ch]
                        col += 1


NO_RESIDUAL = np.zeros((0, 0, 0, 0), np.float32)
NO_BF16_OUTPUT = np.zeros((0, 0, 0, 0), np.uint16)


class Conv2DPlan:
    """A packed convolution prepared for one input shape, with its scratch buffers.

    ``conv2d`` makes one per call; the engine makes one per layer at plan time and
    calls its ``bind`` result on every forward pass.  Calling it checks nothing.  A stride-1 3x3
    convolution may run as Winograd F(4x4, 3x3) or F(2x2, 3x3) (only F(2x2, 3x3) in bf16):
    ``winograd=4`` or ``2`` forces the form, ``True`` the precision's first (``WINOGRAD_FORMS``),
    ``False`` the direct kernel; by default ``winograd_choice`` decides (``self.block`` is the form
    chosen, 0 for direct).

    A bf16 packing (``pack_conv2d(w, precision="bf16")``) runs on AMX where ``amx.usable`` (or,
    packed for it, gathered by im2col), else on ``conv2d_forward``'s bf16 products; a stride-1 3x3 on
    ``vdpbf16ps`` may run as Winograd F(2x2, 3x3) in bf16 (``winograd2``), chosen as above.  On AMX
    and ``vdpbf16ps`` (``bf16.use_dot``) it rounds the input to bf16 into
    ``rounded`` on each call (``rounds_input``); the widened products read the float32 input,
    padded (to an even channel count) like a float32 plan's.  ``feed`` lets one plan write
    the next one's bf16 input (``can_feed``).

    Parameters
    ----------
    packed : PackedConv2D
    input_shape : (N, H, W, Cin)
    stride : int
    pads : (top, bottom, left, right) rows/columns of zeros around the input
    """

    def __init__(self, packed, input_shape, stride, pads, winograd=None):
        n, h, w, _ = input_shape
        top, bottom, left, right = pads
        (kh, kw), cin, cout = packed.kernel_size, packed.in_channels, packed.out_channels
        self.packed, self.stride, self.pads = packed, stride, pads
        hp, wp = h + top + bottom, w + left + right
        cp = cin + cin % 2 if packed.precision == "bf16" else cin  # bf16 pairs never straddle two pixels
        oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
        self.output_shape = (n, oh, ow, cout)
        possible = _winograd_possible(packed, stride, pads)
        if winograd is None and possible:
            winograd = winograd_choice(packed, input_shape, stride, pads)
        if winograd is True:
            winograd = packed.winograd_forms()[0]
        if winograd and winograd not in packed.winograd_forms():
            raise ValueError(f"Conv2DPlan: winograd={winograd!r}, but this {packed.precision} packing runs the output "
                             f"blocks {packed.winograd_forms()} (or True, False, None)")
        self.winograd = bool(winograd) and possible
        if not self.winograd and packed.panels is None:
            raise ValueError(f"Conv2DPlan: this packing holds only Winograd weights (release_direct), and "
                             f"{'winograd=False' if possible else 'Winograd cannot run this convolution'}")
        self.block = winograd if self.winograd else 0
        self.cols = self.v = self.m = None
        self.amx = self.wide = False
        self.rounds_input = False                  # True: a bf16 input on AMX or vdpbf16ps, in ``rounded``
        self.bf16_output = (NO_BF16_OUTPUT, 0, 0)  # where ``feed`` sends the output instead of ``out``
        self.measure_split = True                 # a small direct convolution's split from ``wisdom``
        self.prerounded = False                   # True: the producer wrote this plan's bf16 input
        self.own_input = False                    # True: its bf16 input has its own buffer (``share_input``)
        if self.winograd:
            block, products = self.block, (self.block + 2) ** 2
            self.images, image_tiles = winograd_images(n, block, (oh, ow), cin, cout)
            # pad to whole input blocks (6x6 or 4x4): block * blocks + 2 rows and columns
            self.tiles_w = -(-ow // block)
            hp, wp = block * -(-oh // block) + 2, block * self.tiles_w + 2
            self.pads = (top, hp - h - top, left, wp - w - left)
            self.v = _memory.empty(products * self.images * image_tiles * cin,
                                   np.uint16 if packed.precision == "bf16" else np.float32)
            self.m = _memory.empty(products * self.images * image_tiles * cout)
            self.image_tiles, self.products = image_tiles, products
            self.transforms = ((winograd2.input_transform_forward, winograd2.output_transform_forward)
                               if block == 2 else (input_transform_forward, output_transform_forward))
            self.panels = packed.winograd_panels(block)
            self.no_bias = np.zeros(cout, np.float32)
            # the products run as 36 (16) "images" of tiles x 1, each with its weights: starts for a full
            # group of images and the last
            self.starts = {t: winograd_starts(t, cin, products)
                           for t in {self.images * image_tiles, (n % self.images or self.images) * image_tiles}}
        elif packed.precision == "bf16":  # on AMX and vdpbf16ps, the input rounded to bf16 while padded
            self.amx = amx.usable((kh, kw), cin, stride, pads) or packed.im2col
            self.rounds_input = self.amx or bf16.use_dot()
            if packed.im2col:  # rows of receptive fields, run as a 1x1 over (1, 1, N*OH*OW)
                depth = 2 * packed.panels.shape[2]
                self.rounded = _memory.zeros(n * oh * ow * depth + (amx.BLOCK + 1) * depth, np.uint16)
                self.rounded_shape = (n, oh, ow, depth)
                self.padded_bits = _memory.empty((n, hp, wp, cin), np.uint16)  # rounded and padded, then gathered
                self.wide = amx.wide_blocks(n * oh * ow)
                self.blocks = -(-n * oh * ow // amx.block_pixels(self.wide))
            elif self.amx:  # AMX tiles read up to a block of pixels past the end: a zeroed tail
                rows, cols = (hp, wp) if stride == 1 else (oh, ow)
                size = n * rows * cols * cp
                self.rounded = _memory.zeros(size + (amx.BLOCK + kw) * cp, np.uint16)
                self.rounded_shape = (n, rows, cols, cp)
                virtual = oh * (wp if stride == 1 else ow)  # per image, the padded width's columns included
                self.wide = amx.wide_blocks(n * virtual)
                self.blocks = -(-virtual // amx.block_pixels(self.wide))
            else:
                self.starts = pixel_starts(self.output_shape, (n, hp, wp, cp), stride, 1)
                if self.rounds_input:
                    self.rounded = _memory.empty((n, hp, wp, cp), np.uint16)
                    self.rounded_shape = self.rounded.shape
            if self.amx:  # the tiles load the bias of whole panels
                self.bias = np.zeros(packed.panels.shape[1] * PANEL, np.float32)
        elif packed.im2col:
            self.cols = _memory.empty((n * oh * ow, kh * kw * cin))
            self.starts = pixel_starts(self.output_shape, (n, oh, ow, kh * kw * cin), 1, 1)
        else:
            self.starts = pixel_starts(self.output_shape, (n, hp, wp, cin), stride, 1)
        # a float32 input is padded here (the widened bf16 products also need an even channel count); the
        # Winograd transforms read the unpadded input, with the padding as zeros
        padded = (any(self.pads) and not self.winograd or cp != cin) and not self.rounds_input
        self.padded = _memory.zeros((n, hp, wp, cp)) if padded else None
        self._splits = {}
        self.kernel = (_winograd_name(self.block) if self.winograd else "im2col + 1x1" if packed.im2col
                       else "direct") + f" {TILE}x{PANEL} {ISA}"  # what runs, as profile shows it
        if packed.precision == "bf16" and self.winograd:
            self.kernel = f"bf16 {_winograd_name(self.block)} {TILE}x{PANEL} {ISA} {bf16.kernel()}"
        elif packed.precision == "bf16":
            self.kernel = (("bf16 im2col + " if packed.im2col else "bf16 ") + amx.KERNEL + (" 16x64" if self.wide else " 32x32")
                           if self.amx else bf16.description())
        self._kernel = self.kernel  # ``bind`` adds ", streamed" where the split runs ``conv2d_stream_forward``

    def _split(self, panels, runs, ntiles):
        """``work_split`` for this call's weights and tiles at the current thread count (cached)."""
        key = (get_num_threads(), runs, ntiles, panels.shape)
        split = self._splits.get(key)
        if split is None:
            split = self._splits[key] = work_split(runs, ntiles, panels.shape[1], panels.shape[2], key[0],
                                                   amx.block_pixels(self.wide) if self.amx else TILE)
        return split

    @property
    def rounded_view(self):
        """The bf16 input as (N, H', W', C'): the padded input, the subsampled one or the gathered fields."""
        return self.rounded.reshape(-1)[: math.prod(self.rounded_shape)].reshape(self.rounded_shape)

    def can_feed(self, consumer):
        """True when this plan can write its output, rounded to bf16, straight into ``consumer``'s
        padded input: both on AMX, the consumer a stride-1 convolution of this output; or this plan on the
        direct kernel (``conv2d_forward``, whole panels) or Winograd F(2x2, 3x3) (its output transform; the
        consumer unpadded) and the consumer rounding its input for ``vdpbf16ps`` (``rounds_input``, not AMX),
        and, if this plan feeds one already, that one's input laid out as the consumer's.  On the direct
        kernel an unpadded consumer may see the output in another shape with the same pixels in the same
        order (a stacked pair's (1, 1, N*H*W, C) output read as (N, H, W, C)): ``flat_feed``."""
        n, oh, ow, cout = self.output_shape
        top, bottom, left, right = consumer.pads
        if not consumer.rounds_input or consumer.packed.im2col or self.packed.im2col:
            return False
        fits = consumer.rounded_view.shape == (n, oh + top + bottom, ow + left + right, cout)
        fed, fed_top, fed_left = self.bf16_output
        if fed.size and (self.amx or (fed.shape, fed_top, fed_left) != consumer.input_layout):
            return False  # it feeds one already (on AMX, the only one), whose input is laid out otherwise
        if self.amx or consumer.amx:
            return self.amx and consumer.amx and consumer.stride == 1 and fits
        if self.winograd:  # F(2x2, 3x3)'s output transform writes a copy where the consumer reads it unpadded
            return self.block == 2 and consumer.pads == (0, 0, 0, 0) and fits
        return cout % PANEL == 0 and (fits or self.flat_feed(consumer) and not fed.size)

    @property
    def input_layout(self):
        """(shape, top, left) of the bf16 input this plan reads: plans alike in it can read one copy."""
        return self.rounded_view.shape, self.pads[0], self.pads[2]

    @property
    def can_share_input(self):
        """True when this plan rounds its input itself on ``vdpbf16ps`` (nothing feeds it), so that it can
        round it for another plan of the same input (``share_input``)."""
        return self.rounds_input and not (self.prerounded or self.amx or self.packed.im2col)

    def flat_feed(self, consumer):
        """True when ``consumer`` reads this plan's output unpadded in another shape, its pixels in the same
        order and with the same channels (its bf16 input then takes this plan's output shape)."""
        view = consumer.rounded_view
        return (consumer.pads == (0, 0, 0, 0) and view.shape != self.output_shape
                and view.size == math.prod(self.output_shape) and view.shape[-1] == self.output_shape[-1])

    def feed(self, consumer):
        """From now on write the output, rounded to bf16, into ``consumer``'s bf16 input (``can_feed``).

        ``consumer`` then skips rounding its input; its zero border was written when it was made.  The direct
        kernel writes ``out`` as well (the copy is of the stored values: residual and ReLU applied); on AMX
        the output goes only to ``consumer``: there only for an output that nothing else reads, and
        without a residual.  A direct plan that feeds one convolution already feeds another whose input is
        laid out the same (a ResNet stage's projection beside its first 1x1) through the same buffer.
        """
        if not self.can_feed(consumer):
            raise ValueError("Conv2DPlan.feed: the consumer cannot take this plan's output as its bf16 input")
        fed = self.bf16_output[0]
        if fed.size:
            consumer.rounded = fed  # (the first consumer's buffer, whole: a direct plan's has no slack)
        else:
            consumer.rounded = _memory.zeros(consumer.rounded.shape, np.uint16)  # its own: its border stays 0
            view = consumer.rounded_view
            if self.flat_feed(consumer):  # (the same memory, in the shape the kernel writes: ``can_feed``)
                view = view.reshape(self.output_shape)
            self.bf16_output = (view, consumer.pads[0], consumer.pads[2])
        consumer.prerounded = True

    def share_input(self, other):
        """From now on ``other``, a convolution of the same input laid out the same and run after this one,
        reads the bf16 input this plan rounds (which this plan then rounds into a buffer of its own) instead
        of rounding it again: the batch part of a ``HeadPlan`` starts with two such (a ResNet stage's first
        1x1 and its projection)."""
        if not (self.can_share_input and other.can_share_input and self.input_layout == other.input_layout):
            raise ValueError("Conv2DPlan.share_input: the other convolution cannot read this bf16 input")
        if not self.own_input:
            self.rounded, self.own_input = _memory.empty(self.rounded.shape, np.uint16), True
        other.rounded, other.prerounded = self.rounded, True

    @staticmethod
    def _tiles(starts):
        """(runs, tiles per run) of ``pixel_starts``'s table."""
        return starts.shape[0], starts.shape[1] // TILE

    def __call__(self, out, x, bias, residual=NO_RESIDUAL, relu=False):
        """``out = relu?(conv(x) + bias + residual)`` (``bind`` and call).

        Parameters
        ----------
        out : float32 (N, OH, OW, Cout), C-contiguous
        x : float32 (N, H, W, Cin), C-contiguous
        bias : float32 (Cout,)
        residual : float32 (N, OH, OW, Cout) or NO_RESIDUAL
        relu : bool
        """
        return self.bind(out, x, bias, residual, relu)()

    def bind(self, out, x, bias, residual=NO_RESIDUAL, relu=False):
        """The convolution of ``x`` into ``out`` as a function of no arguments, returning ``out``.

        Every kernel argument (views, work split) is worked out here, for this plan's buffers as
        they are now and the current thread count; the arrays' contents are read when it is called.
        The engine binds each convolution once per plan and thread count: worked out on every call,
        the arguments cost 11% of a 64x64 fp32 pass, 15-20% of a bf16 one.  Bind again after ``feed``
        or a change of buffers.
        """
        calls = self._calls(out, x, bias, residual, relu)
        if len(calls) == 1:
            kernel, args = calls[0]

            def run():
                kernel(*args)
                return out
        else:
            def run():
                for kernel, args in calls:
                    kernel(*args)
                return out
        return run

    def _calls(self, out, x, bias, residual, relu):
        """The kernel calls of ``bind``: a list of (kernel, arguments)."""
        kh, kw = self.packed.kernel_size
        calls = []
        if self.rounds_input:
            bits = x.view(np.uint32)
            if not self.prerounded:  # else the producer has written it (``feed``)
                if self.packed.im2col:
                    calls.append((bf16.pad_to_bf16_forward, (self.padded_bits, bits, self.pads[0], self.pads[2])))
                    calls.append((amx.gather_bf16_forward, (self.rounded_view, self.padded_bits, kh, kw, self.stride)))
                elif self.amx and self.stride > 1:  # a strided 1x1: subsample, then a stride-1 1x1
                    calls.append((amx.subsample_to_bf16_forward, (self.rounded_view, bits, self.stride)))
                else:
                    calls.append((bf16.pad_to_bf16_forward, (self.rounded_view, bits, self.pads[0], self.pads[2])))
            if self.amx:
                calls.append((np.copyto, (self.bias[: bias.size], bias)))  # the tiles load whole panels of bias
                one_by_one = self.packed.im2col or self.stride > 1
                rows = out.reshape(1, 1, -1, out.shape[3]) if self.packed.im2col else out
                res = residual.reshape(rows.shape) if residual.size else residual
                calls.append((amx.conv2d_amx_forward, (
                    rows, self.rounded, self.packed.panels, self.bias, res, 1 if one_by_one else kh, 1 if one_by_one else kw,
                    relu, *self._split(self.packed.panels, rows.shape[0], self.blocks), *self.bf16_output, self.wide)))
                return calls
            x = self.rounded
        elif self.padded is not None:
            calls.append((zero_pad_forward, (self.padded, x, self.pads[0], self.pads[2])))
            x = self.padded
        if self.winograd:
            for first in range(0, out.shape[0], self.images):
                last = min(out.shape[0], first + self.images)
                tiles, products = (last - first) * self.image_tiles, self.products
                v = self.v[: products * tiles * x.shape[3]].reshape(tiles, products, 1, x.shape[3])
                m = self.m[: products * tiles * out.shape[3]].reshape(products, 1, tiles, out.shape[3])
                starts = self.starts[tiles]
                res = residual if residual.size == 0 else residual[first:last]
                input_transform, output_transform = self.transforms
                top, left = (0, 0) if self.padded is not None else (self.pads[0], self.pads[2])
                calls.append((input_transform, (v[:, :, 0], x[first:last], self.tiles_w, top, left)))
                runs, ntiles = self._tiles(starts)
                split = self._split(self.panels, runs, ntiles)
                kernel = direct_kernel(ntiles, split[0])  # (streamed at 224x224 stage 4: 3 tiles)
                calls.append((kernel, (m, v, self.panels, starts, self.no_bias, NO_RESIDUAL, 1, False, *split,
                                       NO_BF16_OUTPUT, 0, 0)))
                args = (out[first:last], m[:, 0], bias, res, relu)
                if self.block == 2:  # (F(2x2, 3x3)'s transform may write the next one's bf16 input too)
                    fed = self.bf16_output[0]
                    args += (fed[first:last] if fed.size else NO_BF16_OUTPUT,)
                calls.append((output_transform, args))
            return calls
        if self.cols is not None:
            calls.append((im2col_forward, (self.cols, x, kh, kw, self.stride)))
            x, kw = self.cols.reshape(*out.shape[:3], -1), 1
        split = self._split(self.packed.panels, *self._tiles(self.starts))
        small = 2 * out.size * math.prod(self.packed.kernel_size) * self.packed.in_channels <= SPLIT_MEASURE_FLOPS
        if small and self.measure_split and not self.packed.im2col:
            split = self._measured_split(x.shape, kw, split)
        kernel = direct_kernel(self._tiles(self.starts)[1], split[0])
        self.kernel = self._kernel + (", streamed" if kernel is conv2d_stream_forward else "")
        calls.append((kernel, (out, x, self.packed.panels, self.starts, bias, residual, kw, relu, *split,
                               *self.bf16_output)))
        return calls

    def _measured_split(self, in_shape, kernel_w, rule):
        """``work_split``'s (nchunks, group) for this small direct convolution, or the recorded or measured faster
        of a few others (``SPLIT_MEASURE_FLOPS``).  Timed with the weights evicted, as a forward pass meets them."""
        threads = get_num_threads()
        runs, ntiles = self._tiles(self.starts)
        nblk = self.packed.panels.shape[1]
        machine = f"{MACHINE} | {threads} threads"
        kh, kw = self.packed.kernel_size
        key = (f"split {kh}x{kw}/{self.stride} {'x'.join(map(str, in_shape))}->{self.packed.out_channels}"
               + ("" if self.packed.precision == "fp32" else f" {self.packed.precision}"
                  + (" inputs" if self.rounds_input else " weights")))
        known = wisdom.lookup(machine, key)
        if known is None and wisdom.mode() != "measure":
            return rule
        candidates = split_candidates(runs, ntiles, nblk, threads, rule)
        if known in candidates:
            return candidates[known]
        x = _memory.empty(in_shape, np.uint16 if self.rounds_input else np.float32)
        values = np.random.default_rng(0).standard_normal(in_shape, dtype=np.float32)
        x[...] = bf16.to_bf16(values) if self.rounds_input else values
        out = _memory.empty(self.output_shape)
        bias = np.zeros(self.packed.out_channels, np.float32)
        panels = self.packed.panels
        fixed = (out, x, panels, self.starts, bias, NO_RESIDUAL, kernel_w, True)
        no_copy = (NO_BF16_OUTPUT, 0, 0)
        runs_of = {name: lambda split=split: direct_kernel(ntiles, split[0])(*fixed, *split, *no_copy)
                   for name, split in candidates.items()}
        winner = wisdom.choose(machine, key, runs_of, f"{rule[0]},{rule[1]}",
                               before=lambda name: evict_forward(panels), margin=SPLIT_MARGIN)
        return candidates[winner]


@jit
def evict_forward(array):
    """Drop every cache line of a C-contiguous ``array`` from the caches (see ``evict_line``).

    Parameters
    ----------
    array : float32 or uint16 (any shape), C-contiguous
    """
    flat = array.reshape(-1)
    for i in range(0, flat.size, LINE_BYTES // flat.itemsize):
        evict_line(flat, i)


def winograd_images(n, block, output_size, cin, cout):
    """(images a Winograd F(block x block, 3x3) plan transforms at a time, its blocks of one image): a few images
    of a batch of ``n`` at a time, so that the transformed blocks stay in cache (about ``WINOGRAD_BYTES``).
    ``output_size``: (OH, OW)."""
    image_tiles = -(-output_size[0] // block) * -(-output_size[1] // block)
    products = (block + 2) ** 2
    return max(1, min(n, WINOGRAD_BYTES // (products * image_tiles * max(cin, cout) * 4))), image_tiles


def _winograd_name(block):
    """The name of Winograd F(block x block, 3x3), as ``Conv2DPlan.kernel`` and ``wisdom`` give it."""
    return f"winograd F({block}x{block},3x3)"


def _winograd_possible(packed, stride, pads):
    """Whether the convolution can run as Winograd: a stride-1 3x3, not gathered; in bf16 only on ``vdpbf16ps``
    (``bf16.use_dot``), with an even channel count, where AMX does not take the layer."""
    if tuple(packed.kernel_size) != (3, 3) or stride != 1 or packed.im2col:
        return False
    if packed.precision == "bf16":
        return packed.in_channels % 2 == 0 and bf16.use_dot() and not amx.usable((3, 3), packed.in_channels, 1, pads)
    return True


def winograd_choice(packed, input_shape, stride, pads, direct=True):
    """The Winograd form ``Conv2DPlan`` runs this convolution as when not told: its output block size (4 or 2,
    ``packed.winograd_forms()``), or 0 for the direct kernel.  With ``direct=False``, or without the direct
    panels (``release_direct``), always a form.

    A form is a candidate where its transformed weights are shared by enough of its output blocks (at most
    ``WINOGRAD_BLOCK_BYTES`` a block): too few blocks, and a timing with the weights hot in cache would say
    Winograd (7x7x512 at batch 1 in F(4x4)) where the forward pass reads them from memory.  Above
    ``WINOGRAD_MEASURE_FLOPS``, with ``WINOGRAD_MIN_TILES`` of a candidate's blocks or more, the recorded or
    measured fastest of the direct kernel and the candidates (``wisdom``; it needs the direct packing,
    ``packed.panels``).  Otherwise, or with wisdom off, the rule: the precision's first form where it is a
    candidate and there are ``WINOGRAD_MIN_TILES`` 4x4 output blocks and ``WINOGRAD_MIN_FLOPS``, or
    ``WINOGRAD_IMAGE_TILES`` 4x4 blocks an image and ``WINOGRAD_SMALL_FLOPS`` (4x4 blocks whatever the form);
    else F(2x2, 3x3) in float32 where F(4x4) is no candidate and F(2x2) is, with ``WINOGRAD_MIN_TILES`` 2x2
    blocks and ``WINOGRAD_MIN_FLOPS`` (ResNet50's stage 5 at batch 1 and 2).  Without the direct kernel,
    the rule's form, or else the first candidate, or else the first form.
    """
    direct = direct and packed.panels is not None
    if not _winograd_possible(packed, stride, pads):
        if not direct:
            raise ValueError("winograd_choice: direct=False for a convolution that cannot run as Winograd")
        return 0
    n, h, w, _ = input_shape
    top, bottom, left, right = pads
    cin, cout = packed.in_channels, packed.out_channels
    oh, ow = h + top + bottom - 2, w + left + right - 2
    flops = 2 * n * oh * ow * 9 * cin * cout
    weight_bytes = 2 if packed.precision == "bf16" else 4

    def blocks(block):
        return n * -(-oh // block) * -(-ow // block)

    forms = packed.winograd_forms()
    shared = [b for b in forms if (b + 2) ** 2 * cin * cout * weight_bytes <= WINOGRAD_BLOCK_BYTES * blocks(b)]
    image_tiles = blocks(4) // n
    large = blocks(4) >= WINOGRAD_MIN_TILES and flops >= WINOGRAD_MIN_FLOPS
    wide = image_tiles >= WINOGRAD_IMAGE_TILES and flops >= WINOGRAD_SMALL_FLOPS
    rule = 0
    if forms[0] in shared and (large or wide):
        rule = forms[0]
    elif (shared == [2] and packed.precision == "fp32" and blocks(2) >= WINOGRAD_MIN_TILES
          and flops >= WINOGRAD_MIN_FLOPS):
        rule = 2
    if not direct:
        rule = rule or (shared + list(forms))[0]
    measured = [b for b in shared if flops >= WINOGRAD_MEASURE_FLOPS and (blocks(b) >= WINOGRAD_MIN_TILES or wide)]
    names = {**({"direct": 0} if direct else {}), **{_winograd_name(b): b for b in measured}}
    return _measured_winograd(packed, input_shape, pads, names, rule) if len(names) > 1 else rule


def _measured_winograd(packed, input_shape, pads, names, rule):
    """The recorded or measured fastest way to run this stride-1 3x3 convolution of the ``names`` given (name ->
    0 for the direct kernel or a Winograd form's output block size); ``rule`` where nothing is recorded or measured."""
    threads = get_num_threads()
    key = (f"conv3x3 {'x'.join(map(str, input_shape))}->{packed.out_channels} pads {','.join(map(str, pads))}"
           + ("" if packed.precision == "fp32" else f" {packed.precision}")
           + f" [{' '.join(f'F{b}' if b else 'direct' for b in names.values())}]")  # (F4: F(4x4, 3x3))
    known = wisdom.lookup(f"{MACHINE} | {threads} threads", key)
    if known is not None or wisdom.mode() != "measure":
        return names.get(known, rule)
    x = _memory.empty(input_shape)
    x[...] = np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)
    bias = np.zeros(packed.out_channels, np.float32)
    plans = {name: Conv2DPlan(packed, input_shape, 1, pads, winograd=block) for name, block in names.items()}
    for plan in plans.values():
        plan.measure_split = False  # the direct kernel timed with the rule's split: one measurement at a time
    out = _memory.empty(next(iter(plans.values())).output_shape)
    runs = {name: (lambda plan=plan: plan(out, x, bias, NO_RESIDUAL, True)) for name, plan in plans.items()}
    # timed as a forward pass meets the layer: its input just written, its weights in memory (the
    # Winograd ones are 16/9 or 4x larger, and a hot-cache timing favours them)
    weights = {name: plan.panels if plan.winograd else packed.panels for name, plan in plans.items()}
    rule_name = next((name for name, block in names.items() if block == rule), None)
    winner = wisdom.choose(f"{MACHINE} | {threads} threads", key, runs, rule_name,
                           before=lambda name: evict_forward(weights[name]))
    packed.drop_winograd(keep=names[winner])  # the others were built only to be timed
    return names[winner]


def conv2d(x, w, bias=None, strides=1, padding="valid", relu=False, residual=None, out=None):
    """2-D convolution of an NHWC batch with TensorFlow's padding semantics.

    ``out = relu?(conv(x, w) + bias + residual)``, all applied while storing.

    Parameters
    ----------
    x : float32 (N, H, W, Cin)
    w : float32 (KH, KW, Cin, Cout) Keras HWIO kernel, or a ``PackedConv2D``
    bias : float32 (Cout,), optional
    strides : int or (int, int); both axes must be equal
    padding : "valid" or "same" (TensorFlow: an odd total pads one more at the bottom/right)
    relu : bool, apply ReLU after the bias and residual
    residual : float32 (N, OH, OW, Cout), optional, added before the ReLU
    out : float32 (N, OH, OW, Cout), optional

    Returns
    -------
    float32 (N, OH, OW, Cout)
    """
    x = _checks.array("conv2d", "x", x, ndim=4)
    packed = w if isinstance(w, PackedConv2D) else pack_conv2d(_checks.array("conv2d", "w", w, ndim=4))
    (kh, kw), cin, cout = packed.kernel_size, packed.in_channels, packed.out_channels
    if x.shape[3] != cin:
        raise ValueError(f"conv2d: x has {x.shape[3]} channels but w expects {cin} input channels")
    sh, sw = _checks.pair("conv2d", "strides", strides)
    if sh != sw:
        raise ValueError(f"conv2d: strides must be equal along both axes, got {strides!r}")
    mode = _checks.padding_mode("conv2d", padding)
    n, h, wd, _ = x.shape
    oh, top, bottom = _checks.output_size("conv2d", h, kh, sh, mode)
    ow, left, right = _checks.output_size("conv2d", wd, kw, sw, mode)
    bias = _checks.vector("conv2d", "bias", bias, cout)
    if bias is None:
        bias = np.zeros(cout, np.float32)
    if residual is None:
        residual = NO_RESIDUAL
    else:
        residual = _checks.array("conv2d", "residual", residual, ndim=4)
        if residual.shape != (n, oh, ow, cout):
            raise ValueError(f"conv2d: residual must have shape {(n, oh, ow, cout)}, got {residual.shape}")
    out = _checks.output("conv2d", out, (n, oh, ow, cout))
    return Conv2DPlan(packed, x.shape, sh, (top, bottom, left, right))(out, x, bias, residual, bool(relu))


def dense(x, w, bias=None, relu=False, out=None):
    """Fully connected layer ``out = relu?(x @ w + bias)`` on the convolution kernel.

    Parameters
    ----------
    x : float32 (N, Cin)
    w : float32 (Cin, Cout) Keras dense kernel, or its ``pack_conv2d`` packing
    bias : float32 (Cout,), optional
    relu : bool
    out : float32 (N, Cout), optional
    """
    x = _checks.array("dense", "x", x, ndim=2)
    if not isinstance(w, PackedConv2D):
        w = pack_conv2d(_checks.array("dense", "w", w, ndim=2))
    if w.kernel_size != (1, 1):
        raise ValueError(f"dense: w must be a (Cin, Cout) kernel, got a packed {w.shape} convolution")
    if x.shape[1] != w.in_channels:
        raise ValueError(f"dense: x has {x.shape[1]} features but w expects {w.in_channels}")
    out = _checks.output("dense", out, (x.shape[0], w.out_channels))
    conv2d(x[:, None, None, :], w, bias, relu=relu, out=out[:, None, None, :])
    return out
