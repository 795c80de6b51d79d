"""Cache-line-aligned buffers.

numpy aligns large arrays to 16 bytes only, so a 64-byte vector load from a packed
weight panel or a 64-channel output row straddles two cache lines and costs two
loads (measured: the 1x1 convolutions ran 10-25% slower on AVX-512).  Every
buffer the kernels stream through is allocated here instead.
"""
import numpy as np

ALIGN = 64  # bytes: one cache line, one AVX-512 vector
# A load whose address matches an earlier, still pending store's in its low 12 bits waits for that store
# (4K aliasing).  A convolution storing its output while it reads a residual laid out the same way, both
# buffers at the same offset in their pages, waits so on every row whose size divides 4 KiB: a 56x56
# 64->256 1x1 with a residual took 0.742 ms, 0.708 ms with the residual one cache line further on in its
# page, 0.676 ms without a residual (Zen 3).
PAGE = 4096


def empty(shape, dtype=np.float32, page_offset=None):
    """An uninitialised C-contiguous array whose first element is ``ALIGN``-byte aligned, with at least
    ``ALIGN`` bytes of readable memory after its last (the widened bf16 products read 2 bytes past a panel).

    ``page_offset`` (bytes, a multiple of ``ALIGN``): the first element at exactly that offset past a
    4 KiB page boundary.  Buffers that one kernel reads and writes at the same time should differ
    there (see ``PAGE``).
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if page_offset is not None and (page_offset % ALIGN or not 0 <= page_offset < PAGE):
        raise ValueError(f"empty: page_offset must be a multiple of {ALIGN} in [0, {PAGE}), "
                         f"got {page_offset}")
    period, offset = (ALIGN, 0) if page_offset is None else (PAGE, page_offset)
    raw = np.empty(count * dtype.itemsize + period + ALIGN, np.uint8)
    skip = (offset - raw.ctypes.data) % period
    return raw[skip: skip + count * dtype.itemsize].view(dtype).reshape(shape)


def zeros(shape, dtype=np.float32):
    """A zero-filled ``empty``."""
    out = empty(shape, dtype)
    out.fill(0)
    return out
