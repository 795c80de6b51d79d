"""Cache-line-aligned buffers.

numpy aligns large arrays to 16 bytes only, so a 64-byte vector load from a packed
weight panel or a 64-channel output row straddles two cache lines and costs two
loads (measured: the 1x1 convolutions ran 10-25% slower on AVX-512).  Every
buffer the kernels stream through is allocated here instead.
"""
import numpy as np

ALIGN = 64  # bytes: one cache line, one AVX-512 vector


def empty(shape, dtype=np.float32):
    """An uninitialised C-contiguous array whose first element is ``ALIGN``-byte aligned, with at least
    ``ALIGN`` bytes of readable memory after its last (the widened bf16 products read 2 bytes past a panel)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dtype.itemsize + 2 * ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip: skip + count * dtype.itemsize].view(dtype).reshape(shape)


def zeros(shape, dtype=np.float32):
    """A zero-filled ``empty``."""
    out = empty(shape, dtype)
    out.fill(0)
    return out
