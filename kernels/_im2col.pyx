# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False, nonecheck=False
"""im2col in Cython: copy every receptive field of an NHWC image into one row.

Used by the convolution when the input has few channels (the 7x7 stem with
three), where gathering the taps once and running the packed GEMM is faster
than reading three floats per tap in the direct kernel.
"""
from cython.parallel cimport prange


def im2col_forward(float[:, ::1] out, const float[:, :, :, ::1] inp,
                   Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t stride):
    """Fill ``out`` with the receptive fields of ``inp``.

    Parameters
    ----------
    out : float32 (N*OH*OW, KH*KW*C), C-contiguous
        One row per output pixel, taps in (kh, kw, c) order, the order of a
        Keras HWIO kernel reshaped to (KH*KW*C, Cout).
    inp : float32 (N, H, W, C), C-contiguous, already padded
    kh, kw, stride : int
        Kernel size and stride; OH = (H - kh) // stride + 1, likewise OW.
    """
    cdef Py_ssize_t n = inp.shape[0], h = inp.shape[1], w = inp.shape[2], c = inp.shape[3]
    cdef Py_ssize_t oh = (h - kh) // stride + 1, ow = (w - kw) // stride + 1
    cdef Py_ssize_t row, b, y, x, i, j, ch, col
    if out.shape[0] != n * oh * ow or out.shape[1] != kh * kw * c:
        raise ValueError(f"im2col_forward: out must have shape ({n * oh * ow}, {kh * kw * c}), "
                         f"got ({out.shape[0]}, {out.shape[1]})")
    for row in prange(n * oh, nogil=True, schedule="static"):
        b = row // oh
        y = row % oh
        for x in range(ow):
            col = 0
            for i in range(kh):
                for j in range(kw):
                    for ch in range(c):
                        out[row * ow + x, col] = inp[b, y * stride + i, x * stride + j, ch]
                        col = col + 1
