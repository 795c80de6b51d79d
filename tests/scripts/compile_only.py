"""Compile (never run) the direct convolution kernels and the Winograd transforms for this process's target,
and print "ok".

Usage: NUMBA_CPU_NAME=znver4 python compile_only.py   (works on a CPU that cannot run the target's code:
importing fastres and compiling run none of it)
"""
from numba import types

from fastres.kernels import _numba, conv, winograd


def main():
    f32, u16, i64 = types.float32, types.uint16, types.int64

    def array(dtype, ndim):
        return types.Array(dtype, ndim, "C")

    pairs = [(array(f32, 4), array(f32, 4)), (array(f32, 4), array(u16, 5))]
    if _numba.BF16_DOT:
        pairs.append((array(u16, 4), array(u16, 5)))
    for x, panels in pairs:
        # (out, inp, panels, starts, bias, residual, kernel_w, relu, nchunks, group, rounded, top, left)
        signature = (array(f32, 4), x, panels, array(i64, 2), array(f32, 1), array(f32, 4), i64,
                     types.boolean, i64, i64, array(u16, 4), i64, i64)
        for kernel in (conv.conv2d_forward, conv.conv2d_stream_forward):
            kernel.compile(signature)
    # the Winograd transforms' vector code
    winograd.input_transform_forward.compile((array(f32, 3), array(f32, 4), i64, i64, i64))
    winograd.output_transform_forward.compile((array(f32, 4), array(f32, 3), array(f32, 1), array(f32, 4),
                                               types.boolean))
    print("ok", _numba.CPU_NAME, _numba.ISA, f"{conv.TILE}x{conv.PANEL}", "bf16 dot" if _numba.BF16_DOT else "")


if __name__ == "__main__":
    main()
