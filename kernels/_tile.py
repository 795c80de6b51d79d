"""The register tile's store, shared by the float32 and the bf16 convolution kernels."""
from ._numba import PANEL, TILE, inline


@inline
def store_tile(y, res, acc, p0, c0, pixels, has_residual, relu):
    """``y[p0 + t, c0 + j] = relu?(acc[t, j] + res[p0 + t, c0 + j])`` for the tile's valid part.

    Parameters
    ----------
    y : float32 (pixels, Cout), written
    res : float32 (pixels, Cout), read when ``has_residual``
    acc : float32 (TILE, PANEL), the tile's sums (bias included)
    p0, c0 : int, the tile's first pixel and output channel
    pixels : int, the pixels of ``y`` the tile may write (its run's end)
    has_residual, relu : bool
    """
    cout = y.shape[1]
    if c0 + PANEL <= cout and p0 + TILE <= pixels:
        # a whole tile: constant trip counts and one loop per case vectorise best
        if has_residual and relu:
            for t in range(TILE):
                for j in range(PANEL):
                    y[p0 + t, c0 + j] = max(acc[t, j] + res[p0 + t, c0 + j], 0.0)
        elif has_residual:
            for t in range(TILE):
                for j in range(PANEL):
                    y[p0 + t, c0 + j] = acc[t, j] + res[p0 + t, c0 + j]
        elif relu:
            for t in range(TILE):
                for j in range(PANEL):
                    y[p0 + t, c0 + j] = max(acc[t, j], 0.0)
        else:
            for t in range(TILE):
                for j in range(PANEL):
                    y[p0 + t, c0 + j] = acc[t, j]
    else:
        for t in range(min(TILE, pixels - p0)):
            for j in range(min(PANEL, cout - c0)):
                v = acc[t, j]
                if has_residual:
                    v += res[p0 + t, c0 + j]
                if relu:
                    v = max(v, 0.0)
                y[p0 + t, c0 + j] = v
