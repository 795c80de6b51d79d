"""Slow, obviously correct references for every kernel (float64, loops and einsum)."""
import numpy as np


def same_pads(size, kernel, stride):
    """TensorFlow "same" padding for one axis: (before, after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv2d(x, w, bias=None, stride=1, padding="valid", relu=False, residual=None):
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    kh, kw, _, cout = w.shape
    if padding == "same":
        x = np.pad(x, ((0, 0), same_pads(x.shape[1], kh, stride), same_pads(x.shape[2], kw, stride), (0, 0)))
    n, h, wd, _ = x.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.zeros((n, oh, ow, cout))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride, :]
            out += np.einsum("nhwc,co->nhwo", patch, w[i, j])
    if bias is not None:
        out += bias
    if residual is not None:
        out += residual
    return np.maximum(out, 0) if relu else out


def batch_norm(x, gamma, beta, mean, var, epsilon):
    y = (x.astype(np.float64) - mean) / np.sqrt(var.astype(np.float64) + epsilon)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


def pool2d(x, pool, stride, padding, average):
    """Loop over every window, keeping only the real (unpadded) pixels."""
    n, h, w, c = x.shape
    if padding == "same":
        oh, ow = -(-h // stride[0]), -(-w // stride[1])
        top, left = same_pads(h, pool[0], stride[0])[0], same_pads(w, pool[1], stride[1])[0]
    else:
        oh, ow = (h - pool[0]) // stride[0] + 1, (w - pool[1]) // stride[1] + 1
        top = left = 0
    out = np.zeros((n, oh, ow, c))
    for y in range(oh):
        for xx in range(ow):
            rows = [r for r in range(y * stride[0] - top, y * stride[0] - top + pool[0]) if 0 <= r < h]
            cols = [q for q in range(xx * stride[1] - left, xx * stride[1] - left + pool[1]) if 0 <= q < w]
            window = x[:, rows][:, :, cols].astype(np.float64)
            out[:, y, xx] = window.mean(axis=(1, 2)) if average else window.max(axis=(1, 2))
    return out


def im2col(x, kh, kw, stride):
    n, h, w, c = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    rows = []
    for b in range(n):
        for y in range(oh):
            for xx in range(ow):
                rows.append(x[b, y * stride : y * stride + kh, xx * stride : xx * stride + kw, :].reshape(-1))
    return np.array(rows)


def softmax(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def dense(x, w, bias=None, relu=False):
    out = x.astype(np.float64) @ w.astype(np.float64)
    if bias is not None:
        out += bias
    return np.maximum(out, 0) if relu else out


def activation(x, kind, max_value=None, negative_slope=0.0, threshold=0.0):
    """Keras's definitions, term by term: relu(x, negative_slope, max_value, threshold), sigmoid, tanh."""
    x = x.astype(np.float64)
    if kind == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if kind == "tanh":
        return np.tanh(x)
    y = np.where(x > threshold, x, 0.0)
    if max_value is not None:
        y = np.clip(y, 0.0, max_value)
    return y - negative_slope * np.maximum(threshold - x, 0.0)


def bf16_round(x):
    """``x`` rounded to bfloat16 (nearest, ties to even) and back to float64: ml_dtypes' rounding
    (it comes with TensorFlow), not fastres's."""
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def conv2d_bf16(x, w, bias=None, stride=1, padding="valid", relu=False, residual=None, round_input=True):
    """``conv2d`` with w (and x, with ``round_input``) rounded to bf16 first; products and sums in float64,
    bias/residual/ReLU exact."""
    return conv2d(bf16_round(x) if round_input else x, bf16_round(w), bias, stride, padding, relu, residual)


def winograd2_bf16(x, w, bias=None, padding="valid", relu=False, residual=None):
    """A stride-1 3x3 convolution as Winograd F(2x2, 3x3) in bf16: ``G bf16(w) G^T`` and ``B^T d B`` each rounded
    to bf16, the products summed and ``A^T . A`` applied in float64, then bias, residual and ReLU.  ``B^T d B``
    is summed in float32 in the kernel's order (B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
    so that both round the same float32 values to bf16."""
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    at = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float)
    if padding == "same":
        x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    n, h, wd, _ = x.shape
    oh, ow = h - 2, wd - 2
    th, tw = -(-oh // 2), -(-ow // 2)
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 2 * th + 2 - h), (0, 2 * tw + 2 - wd), (0, 0)))
    u = bf16_round(np.einsum("ai,ijco,bj->abco", g, bf16_round(w), g))
    d = np.stack([np.stack([x[:, 2 * a:2 * a + 4, 2 * b:2 * b + 4] for b in range(tw)], 1) for a in range(th)], 1)
    d = d.astype(np.float32)                                                          # (n, th, tw, 4, 4, C)
    e = np.stack([d[:, :, :, 0] - d[:, :, :, 2], d[:, :, :, 1] + d[:, :, :, 2],       # B^T d, in float32 as
                  d[:, :, :, 2] - d[:, :, :, 1], d[:, :, :, 1] - d[:, :, :, 3]], 3)   # the kernel sums it
    v = bf16_round(np.stack([e[..., 0, :] - e[..., 2, :], e[..., 1, :] + e[..., 2, :],
                             e[..., 2, :] - e[..., 1, :], e[..., 1, :] - e[..., 3, :]], 4))
    y = np.einsum("ia,npqabo,jb->npiqjo", at, np.einsum("npqabc,abco->npqabo", v, u), at)
    out = y.reshape(n, 2 * th, 2 * tw, -1)[:, :oh, :ow]
    if bias is not None:
        out = out + bias
    if residual is not None:
        out = out + residual
    return np.maximum(out, 0) if relu else out
