"""Argument checks shared by the public kernel wrappers.

Every problem is a ValueError whose message starts with the function and names
the argument, so a caller sees ``conv2d: x must be float32, got float64`` and
never a Numba typing error or a crash inside a kernel.
"""
import numpy as np

from . import _memory


def array(func, name, value, ndim=None, allow_empty=False):
    """Return ``value`` as a C-contiguous float32 array after checking it."""
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{func}: {name} must be a numpy array, got {type(value).__name__}")
    if value.dtype != np.float32:
        raise ValueError(f"{func}: {name} must be float32, got {value.dtype}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{func}: {name} must have {ndim} dimensions, got shape {value.shape}")
    if not allow_empty and value.size == 0:
        raise ValueError(f"{func}: {name} must not be empty, got shape {value.shape}")
    return np.ascontiguousarray(value)


def vector(func, name, value, length):
    """Return an optional per-channel vector (None stays None) of ``length`` float32."""
    if value is None:
        return None
    value = array(func, name, value, ndim=1)
    if value.shape[0] != length:
        raise ValueError(f"{func}: {name} must have shape ({length},), got {value.shape}")
    return value


def pair(func, name, value):
    """Return an int or a pair of ints as a tuple of two positive ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    try:
        first, second = (int(v) for v in value)
        if any(isinstance(v, bool) or int(v) != v for v in value):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"{func}: {name} must be an int or a pair of ints, got {value!r}") from None
    if first < 1 or second < 1:
        raise ValueError(f"{func}: {name} must be positive, got {value!r}")
    return first, second


def padding_mode(func, padding):
    """Return ``padding`` lower-cased after checking it is "valid" or "same"."""
    mode = padding.lower() if isinstance(padding, str) else padding
    if mode not in ("valid", "same"):
        raise ValueError(f'{func}: padding must be "valid" or "same", got {padding!r}')
    return mode


def output(func, out, shape):
    """Return ``out`` (allocated when None) after checking its shape, dtype and layout."""
    if out is None:
        return _memory.empty(shape)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise ValueError(f"{func}: out must be a float32 numpy array")
    if out.shape != tuple(shape):
        raise ValueError(f"{func}: out must have shape {tuple(shape)}, got {out.shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{func}: out must be C-contiguous and writeable")
    return out


def same_padding(size, kernel, stride):
    """TensorFlow's "same" padding for one axis: (output size, pad before, pad after).

    The output is ceil(size / stride); an odd total puts the extra row or
    column after (at the bottom or right), as TensorFlow does.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def output_size(func, size, kernel, stride, padding):
    """Output size and (before, after) padding of one spatial axis."""
    if padding == "same":
        out, before, after = same_padding(size, kernel, stride)
        return out, before, after
    if size < kernel:
        raise ValueError(f'{func}: input size {size} is smaller than the window {kernel} with padding "valid"')
    return (size - kernel) // stride + 1, 0, 0
