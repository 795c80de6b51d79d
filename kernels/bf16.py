"""bfloat16 weights: half the weight memory; the packing and the rounding, shared by ``conv`` and ``amx``.

A bf16 value is the upper half of a float32 (8 exponent bits, 8 significant bits), kept
here as ``uint16`` and rounded to nearest even (``to_bf16``).

* Weights are folded in float32, then rounded once at pack time (``pack_bf16``) and kept
  only in bf16.  Their panels hold the rows in pairs, ``panels[0, b, p, j, e] =
  w[row 2p + e, 64b + j]``, because one ``vdpbf16ps`` (and one AMX ``tdpbf16ps`` row)
  adds two products per float32 lane.  The input channels are rounded up to an even count
  with a zero channel, so a pair never straddles two kernel rows.
* Activations stay float32 between layers, except where ``Conv2DPlan.feed`` hands a
  convolution's output, rounded, straight to the next one.  On AMX and ``vdpbf16ps`` each
  convolution rounds its input to bf16 while zero-padding it (``pad_to_bf16_forward``); the
  residual, the bias and the ReLU are applied in float32 as the tile is stored.
* Where AMX does not run (``amx.usable``), ``conv.conv2d_forward`` takes the bf16 panels:
  on ``vdpbf16ps`` and bf16 inputs where the target has AVX512-BF16 and it was measured
  faster (``use_dot``), else on float32 inputs (not rounded), the two rows of each weight
  pair widened to float32 by a shift (``conv._fma_tile``) and multiplied with float32 FMAs: half
  the weight bandwidth at about float32's arithmetic rate.  Accumulation is float32 in both.
* Winograd in bf16 is F(2x2, 3x3) only (``winograd2``), on ``vdpbf16ps`` where AMX does not
  run: F(4x4, 3x3)'s transforms multiply the rounding error of the bf16 inputs and weights
  about ninefold, F(2x2)'s about 1.5-fold.
"""
import numpy as np
from llvmlite import ir
from numba import prange

from . import _memory, wisdom
from ._numba import BF16_DOT, CPU_NAME, ISA, PANEL, TILE, cpu_model, get_num_threads, inline, pjit
from ._tile import pixel_starts


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
    out = np.empty(bits.shape, np.uint16)
    if bits.size:
        to_bf16_forward(out.reshape(-1), bits.reshape(-1))
    return out


ROUND_BLOCK = 1 << 16  # values rounded by one task of ``to_bf16_forward``


@pjit
def to_bf16_forward(out, bits):
    """``out[i] = _bf16_bits(bits[i])``: float32 values, given as their bits, rounded to bf16 (numpy's
    elementwise version, with its temporaries, took 0.13 s of a ResNet50 bf16 load).

    Parameters
    ----------
    out : uint16 (N,), written
    bits : uint32 (N,), the bits of float32 values (``x.view(np.uint32)``)
    """
    n = bits.size
    for task in prange((n + ROUND_BLOCK - 1) // ROUND_BLOCK):
        for i in range(task * ROUND_BLOCK, min(n, (task + 1) * ROUND_BLOCK)):
            out[i] = _bf16_bits(bits[i])


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
            elif c == 3 and cp == 4:  # the stem's 3 channels made 4: a pixel is one uint64 (little-endian), built in vectors
                pixels = middle.view(np.uint64)
                for xx in range(np.uint64(w)):
                    i = np.uint64(3) * xx
                    pixels[xx] = (np.uint64(_bf16_bits(src[i])) | (np.uint64(_bf16_bits(src[i + 1])) << 16)
                                  | (np.uint64(_bf16_bits(src[i + 2])) << 32))
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
    """LLVM's ``bfloat`` (llvmlite has no class for it): only named in ``vdpbf16ps``'s signature."""

    def _to_string(self):
        return "bfloat"

    # equal to every other instance: a kernel that emits the product twice (a whole tile and a short
    # one) finds the intrinsic already declared with another instance's vector type
    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


def pack_bf16(w):
    """Round a folded HWIO kernel to bf16 and pack it in row pairs for ``conv.conv2d_forward`` (and AMX).

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
    """Whether the products run on ``vdpbf16ps`` here, on bf16 inputs (else the bf16 weights are widened to
    float32 FMAs, and the inputs stay float32).

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
            _choice.append(wisdom.choose(machine, "bf16 products, widened on float32 inputs", runs,
                                         "vdpbf16ps") == "vdpbf16ps")
    return _choice[0]


def _product_timing(dot):
    """A call of the direct kernel with bf16 panels on a compute-bound layer (14x14x256 -> 256, 3x3), for
    ``use_dot``: bf16 inputs on ``vdpbf16ps`` (``dot``), else float32 inputs and widened weights."""
    from .conv import NO_BF16_OUTPUT, NO_RESIDUAL, conv2d_forward  # (conv imports this module)

    rng = np.random.default_rng(0)
    size, cp, cout = 16, 256, 256
    inp = rng.standard_normal((1, size, size, cp), dtype=np.float32)
    if dot:
        inp = to_bf16(inp)
    panels = pack_bf16(rng.standard_normal((3, 3, cp, cout), dtype=np.float32))
    out = _memory.empty((1, size - 2, size - 2, cout))
    starts = pixel_starts(out.shape, inp.shape, 1, 1)
    bias = np.zeros(cout, np.float32)
    chunks = max(1, min(starts.shape[1] // TILE, 2 * get_num_threads()))
    group = panels.shape[1]
    return lambda: conv2d_forward(out, inp, panels, starts, bias, NO_RESIDUAL, 3, True, chunks, group,
                                  NO_BF16_OUTPUT, 0, 0)


def kernel():
    """What computes the products of the direct bf16 kernel here."""
    return "vdpbf16ps" if use_dot() else "bf16 weights widened to fp32 FMA"


def description():
    """The direct bf16 kernel as ``fastres profile`` names it."""
    return f"direct bf16 {TILE}x{PANEL} {ISA} {kernel()}"
