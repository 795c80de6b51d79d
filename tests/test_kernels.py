"""Every kernel against its slow reference in tests/naive.py."""
import numba
import numpy as np
import pytest
from numba import prange

import fastres.kernels as K
from fastres.kernels._numba import PANEL, jit, next_task, peek_task, pjit, task_counters
from conftest import assert_close
import naive

CONV_CASES = [
    # (n, h, w, cin, cout, kernel, stride, padding)
    (2, 9, 11, 5, 7, 3, 1, "same"),
    (3, 13, 8, 17, 70, 3, 2, "same"),
    (1, 12, 12, 33, 130, 3, 2, "same"),
    (2, 15, 15, 3, 64, 7, 2, "valid"),   # stem-like
    (2, 11, 14, 3, 19, 7, 2, "same"),
    (2, 7, 9, 48, 65, 1, 1, "valid"),
    (2, 9, 9, 40, 129, 1, 2, "valid"),
    (1, 6, 5, 8, 3, 5, 1, "same"),
    (2, 5, 6, 20, 10, 2, 2, "valid"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv2d_matches_naive(case, rng):
    n, h, w, cin, cout, k, s, pad = case
    x = rng.standard_normal((n, h, w, cin), dtype=np.float32)
    kernel = rng.standard_normal((k, k, cin, cout), dtype=np.float32)
    bias = rng.standard_normal(cout, dtype=np.float32)
    assert_close(K.conv2d(x, kernel, bias, strides=s, padding=pad), naive.conv2d(x, kernel, bias, s, pad))


@pytest.mark.parametrize("case", CONV_CASES[:5], ids=lambda c: "x".join(map(str, c)))
def test_conv2d_fused_residual_relu(case, rng):
    n, h, w, cin, cout, k, s, pad = case
    x = rng.standard_normal((n, h, w, cin), dtype=np.float32)
    kernel = rng.standard_normal((k, k, cin, cout), dtype=np.float32)
    bias = rng.standard_normal(cout, dtype=np.float32)
    packed = K.pack_conv2d(kernel)
    expected_shape = naive.conv2d(x, kernel, stride=s, padding=pad).shape
    residual = rng.standard_normal(expected_shape, dtype=np.float32) * 5
    out = np.full(expected_shape, np.nan, np.float32)
    result = K.conv2d(x, packed, bias, strides=s, padding=pad, relu=True, residual=residual, out=out)
    assert result is out
    expected = naive.conv2d(x, kernel, bias, s, pad, relu=True, residual=residual)
    assert (expected == 0).any() and (expected > 0).any()
    assert_close(out, expected)



STREAM_CASES = [
    # (h, w, cin, cout, kernel, stride, nchunks, group): tasks of 1 to 9 tiles, kernel rows of
    # 24 to 3 * 300 steps (one chunk, several, a part chunk), part panels, several panels a task; last
    # tiles of 1, 2, 3 and 4 pixels (computed as TINY_TILE-pixel tiles, 1 and 2, and NARROW_TILE-pixel ones
    # on AVX2 and AVX-512) and of 5
    (4, 4, 256, 256, 3, 1, 1, 1),
    (4, 4, 64, 40, 1, 1, 1, 2),
    (3, 5, 24, 33, 3, 1, 2, 1),
    (8, 8, 300, 20, 3, 2, 1, 1),
    (7, 7, 40, 35, 1, 1, 1, 1),
    (7, 7, 40, 35, 1, 1, 3, 2),
    (2, 2, 700, 16, 1, 1, 1, 1),
    (2, 4, 64, 40, 1, 1, 1, 1),
    (1, 11, 64, 40, 1, 1, 1, 1),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: "x".join(map(str, c)))
def test_streamed_kernel_matches_naive_and_the_panel_kernel_to_the_bit(case, precision, rng):
    """``conv2d_stream_forward`` adds the products chunk by chunk in the panel kernel's order.  bf16 weights
    take float32 inputs, and bf16 ones too where the CPU has vdpbf16ps (``BF16_DOT``)."""
    h, w, cin, cout, k, stride, nchunks, group = case
    x = rng.standard_normal((1, h, w, cin), dtype=np.float32)
    kernel = rng.standard_normal((k, k, cin, cout), dtype=np.float32)
    bias = rng.standard_normal(cout, dtype=np.float32)
    packed = K.pack_conv2d(kernel, precision=precision)
    p = k // 2
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    shape = naive.conv2d(padded, kernel, stride=stride).shape
    residual = rng.standard_normal(shape, dtype=np.float32)
    starts = K.conv.pixel_starts(shape, padded.shape, stride, 1)
    for rounded in (False, True) if precision == "bf16" and K.bf16.BF16_DOT else (False,):
        if precision == "bf16":
            want = naive.conv2d_bf16(padded, kernel, bias, stride, relu=True, residual=residual, round_input=rounded)
        else:
            want = naive.conv2d(padded, kernel, bias, stride, relu=True, residual=residual)
        inputs = K.bf16.to_bf16(padded) if rounded else padded
        outs = []
        for kernel_fn in (K.conv.conv2d_stream_forward, K.conv.conv2d_forward):
            out = np.full(shape, np.nan, np.float32)
            kernel_fn(out, inputs, packed.panels, starts, bias, residual, k, True, nchunks, group,
                      K.NO_BF16_OUTPUT, 0, 0)
            outs.append(out)
        assert_close(outs[0], want, rtol=1e-5 if precision == "fp32" else 2e-5)
        assert np.array_equal(outs[0], outs[1])


def test_tasks_of_two_to_four_tiles_take_the_streamed_kernel():
    conv = K.conv
    assert conv.direct_kernel(3, 1) is conv.conv2d_stream_forward  # stage 4 at 64x64: 16 pixels, 3 tiles
    assert conv.direct_kernel(9, 3) is conv.conv2d_stream_forward
    assert conv.direct_kernel(1, 1) is conv.conv2d_forward  # one tile: its one pass streams anyway
    assert conv.direct_kernel(9, 1) is conv.conv2d_forward  # bound by the arithmetic
    plan = conv.Conv2DPlan(K.pack_conv2d(np.ones((3, 3, 256, 256), np.float32)), (1, 4, 4, 256), 1, (1, 1, 1, 1))
    plan.measure_split = False
    out, x = np.empty((1, 4, 4, 256), np.float32), np.ones((1, 4, 4, 256), np.float32)
    (kernel, _), = [call for call in plan._calls(out, x, np.zeros(256, np.float32), K.NO_RESIDUAL, False)
                    if call[0] in (conv.conv2d_forward, conv.conv2d_stream_forward)]
    assert kernel is conv.conv2d_stream_forward
    assert plan.kernel == f"direct {conv.TILE}x{PANEL} {conv.ISA}, streamed"  # as profile shows it

def test_conv2d_non_contiguous_input(rng):
    base = rng.standard_normal((2, 19, 17, 24), dtype=np.float32)
    x = base[:, ::2, 1::2, ::2]  # strided in every axis
    assert not x.flags.c_contiguous
    kernel = rng.standard_normal((3, 3, 12, 21), dtype=np.float32)
    kernel_view = np.asfortranarray(kernel)
    assert_close(K.conv2d(x, kernel_view, padding="same"), naive.conv2d(x, kernel, padding="same"))


def test_packed_weights_layout(rng):
    panel = PANEL  # output channels per panel: 64 on AVX-512, 16 on AVX2, 8 elsewhere
    cout = panel + 6
    kernel = rng.standard_normal((3, 3, 10, cout), dtype=np.float32)
    packed = K.pack_conv2d(kernel)
    assert packed.panels.shape == (1, 2, 90, panel)
    assert packed.shape == (3, 3, 10, cout)
    np.testing.assert_array_equal(packed.panels[0, 0], kernel.reshape(90, cout)[:, :panel])
    np.testing.assert_array_equal(packed.panels[0, 1, :, :6], kernel.reshape(90, cout)[:, panel:])
    assert not packed.panels[0, 1, :, 6:].any()


def test_cython_im2col_matches_numba_and_naive(rng):
    x = rng.standard_normal((2, 11, 13, 3), dtype=np.float32)
    expected = naive.im2col(x, 7, 5, 2)
    cython_out = np.empty(expected.shape, np.float32)
    numba_out = np.empty(expected.shape, np.float32)
    K.im2col_forward(cython_out, x, 7, 5, 2)
    K.im2col_numba(numba_out, x, 7, 5, 2)
    np.testing.assert_array_equal(cython_out, expected)
    np.testing.assert_array_equal(numba_out, expected)


@pytest.mark.parametrize("case", [(2, 15, 15, 3, 64, 7, 2, "valid"), (1, 11, 14, 3, 19, 7, 2, "same"), (2, 9, 8, 5, 70, 3, 1, "same")])
def test_conv2d_through_im2col(case, rng):
    n, h, w, cin, cout, k, s, pad = case
    x = rng.standard_normal((n, h, w, cin), dtype=np.float32)
    kernel = rng.standard_normal((k, k, cin, cout), dtype=np.float32)
    bias = rng.standard_normal(cout, dtype=np.float32)
    packed = K.pack_conv2d(kernel, im2col=True)
    assert packed.im2col
    assert_close(K.conv2d(x, packed, bias, strides=s, padding=pad, relu=True), naive.conv2d(x, kernel, bias, s, pad, relu=True))


def test_cython_im2col_rejects_wrong_out(rng):
    x = rng.standard_normal((1, 8, 8, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="out must have shape"):
        K.im2col_forward(np.empty((5, 5), np.float32), x, 3, 3, 1)


@pytest.mark.parametrize("scale,center", [(True, True), (False, True), (True, False), (False, False)])
def test_batch_norm_matches_naive(scale, center, rng):
    x = rng.standard_normal((2, 5, 7, 13), dtype=np.float32)
    gamma = rng.uniform(0.5, 2, 13).astype(np.float32) if scale else None
    beta = rng.standard_normal(13, dtype=np.float32) if center else None
    mean = rng.standard_normal(13, dtype=np.float32)
    var = rng.uniform(0.1, 3, 13).astype(np.float32)
    assert_close(K.batch_norm(x, gamma, beta, mean, var, 1.001e-5), naive.batch_norm(x, gamma, beta, mean, var, 1.001e-5))
    assert_close(K.batch_norm(x, gamma, beta, mean, var, 1e-3, relu=True),
                 np.maximum(naive.batch_norm(x, gamma, beta, mean, var, 1e-3), 0))


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_batch_norm_conv_and_dense(with_bias, rng):
    x = rng.standard_normal((2, 6, 6, 9), dtype=np.float32)
    kernel = rng.standard_normal((3, 3, 9, 11), dtype=np.float32)
    bias = rng.standard_normal(11, dtype=np.float32) if with_bias else None
    gamma, beta, mean = (rng.standard_normal(11, dtype=np.float32) for _ in range(3))
    var = rng.uniform(0.2, 2, 11).astype(np.float32)
    folded, new_bias = K.fold_batch_norm(kernel, bias, gamma, beta, mean, var, 1e-3)
    expected = naive.batch_norm(naive.conv2d(x, kernel, bias, padding="same"), gamma, beta, mean, var, 1e-3)
    assert_close(K.conv2d(x, folded, new_bias, padding="same"), expected)

    feats = rng.standard_normal((3, 9), dtype=np.float32)
    dense_kernel = rng.standard_normal((9, 11), dtype=np.float32)
    folded, new_bias = K.fold_batch_norm(dense_kernel, bias, gamma, beta, mean, var, 1e-3)
    expected = naive.batch_norm(naive.dense(feats, dense_kernel, bias), gamma, beta, mean, var, 1e-3)
    assert_close(K.dense(feats, folded, new_bias), expected)


def test_add_relu_relu_bias_add(rng):
    a = rng.standard_normal((2, 5, 3, 7), dtype=np.float32)
    b = rng.standard_normal((2, 5, 3, 7), dtype=np.float32)
    bias = rng.standard_normal(7, dtype=np.float32)
    np.testing.assert_array_equal(K.add_relu(a, b), np.maximum(a + b, 0))
    np.testing.assert_array_equal(K.add_relu(a, b, relu=False), a + b)
    np.testing.assert_array_equal(K.relu(a), np.maximum(a, 0))
    np.testing.assert_allclose(K.bias_add(a, bias), a + bias, rtol=1e-6)
    np.testing.assert_allclose(K.bias_add(a, bias, relu=True), np.maximum(a + bias, 0), rtol=1e-6)


def test_relu_keeps_nan():
    assert np.isnan(K.relu(np.array([np.nan, -1.0], np.float32))[0])


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("pool,stride", [((3, 3), (2, 2)), ((2, 2), (2, 2)), ((3, 2), (1, 2))])
def test_pooling_matches_naive(padding, pool, stride, rng):
    x = rng.standard_normal((2, 9, 8, 5), dtype=np.float32)
    assert_close(K.max_pool2d(x, pool, stride, padding), naive.pool2d(x, pool, stride, padding, False))
    assert_close(K.avg_pool2d(x, pool, stride, padding), naive.pool2d(x, pool, stride, padding, True))


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (2, 0, 1, 3), (4, 4, 4, 4)])
def test_pooling_with_zero_padding_matches_naive_on_the_padded_input(pads, average, rng):
    """``zeros=True`` is a ZeroPadding2D and a "valid" pool in one pass (negative inputs: the zeros win)."""
    x = rng.standard_normal((2, 7, 6, 5), dtype=np.float32) - 1
    t, b, l, r = pads
    padded = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
    want = naive.pool2d(padded, (3, 3), (2, 2), "valid", average)
    out = np.empty(want.shape, np.float32)
    K.pool2d_forward(out, x, (3, 3), (2, 2), (t, l), average, True)
    assert_close(out, want)


@pytest.mark.parametrize("pool,stride", [((3, 3), (2, 2)), ((2, 2), (2, 2)), ((3, 3), (1, 1))])
@pytest.mark.parametrize("tap", [(0, 0), (1, 1), (2, 2), (2, 0)])
def test_a_nan_anywhere_in_a_max_window_gives_nan(pool, stride, tap, rng):
    """Whatever tap of the window holds it (the 3x3 fast path and the general loop), and only there."""
    x = rng.standard_normal((1, 7, 7, 9), dtype=np.float32)
    x[0, 2 + tap[0], 2 + tap[1], 4] = np.nan   # inside the window of output (1, 1) for stride 2, (2, 2) for 1
    out = K.max_pool2d(x, pool, stride)
    got = np.isnan(out)
    rows = np.arange(out.shape[1])[:, None] * stride[0]
    cols = np.arange(out.shape[2])[None, :] * stride[1]
    r, c = 2 + tap[0], 2 + tap[1]
    covers = (rows <= r) & (r < rows + pool[0]) & (cols <= c) & (c < cols + pool[1])
    np.testing.assert_array_equal(got[0, :, :, 4], covers)
    assert not got[0, :, :, [0, 1, 2, 3, 5, 6, 7, 8]].any()


def test_global_max_keeps_a_nan(rng):
    x = rng.standard_normal((2, 5, 5, 3), dtype=np.float32)
    x[0, 1, 2, 1] = np.nan
    got = np.isnan(K.global_max_pool2d(x))
    np.testing.assert_array_equal(got, [[False, True, False], [False, False, False]])


def test_pool_strides_default_to_pool_size(rng):
    x = rng.standard_normal((1, 8, 8, 3), dtype=np.float32)
    assert_close(K.avg_pool2d(x, 2), naive.pool2d(x, (2, 2), (2, 2), "valid", True))


def test_global_pools(rng):
    x = rng.standard_normal((3, 5, 7, 11), dtype=np.float32)
    assert_close(K.global_avg_pool2d(x), x.astype(np.float64).mean(axis=(1, 2)))
    assert_close(K.global_max_pool2d(x), x.astype(np.float64).max(axis=(1, 2)))


def test_zero_pad2d(rng):
    x = rng.standard_normal((2, 4, 5, 3), dtype=np.float32)
    expected = np.pad(x, ((0, 0), (1, 2), (3, 0), (0, 0)))
    np.testing.assert_array_equal(K.zero_pad2d(x, ((1, 2), (3, 0))), expected)
    np.testing.assert_array_equal(K.zero_pad2d(x, 2), np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0))))
    np.testing.assert_array_equal(K.zero_pad2d(x, (1, 0)), np.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0))))


@pytest.mark.parametrize("relu", [False, True])
def test_dense_matches_naive(relu, rng):
    x = rng.standard_normal((5, 130), dtype=np.float32)
    w = rng.standard_normal((130, 70), dtype=np.float32)
    bias = rng.standard_normal(70, dtype=np.float32)
    assert_close(K.dense(x, w, bias, relu=relu), naive.dense(x, w, bias, relu))
    assert_close(K.dense(x, K.pack_conv2d(w), bias, relu=relu), naive.dense(x, w, bias, relu))


def test_softmax_is_stable(rng):
    x = (rng.standard_normal((4, 9)) * 50 + 1000).astype(np.float32)
    out = K.softmax(x)
    assert np.isfinite(out).all()
    assert_close(out, naive.softmax(x))


def test_num_threads_control():
    before = K.get_num_threads()
    try:
        K.set_num_threads(1)
        assert K.get_num_threads() == 1
    finally:
        K.set_num_threads(before)
    with pytest.raises(ValueError, match="n must be between"):
        K.set_num_threads(0)
    with pytest.raises(ValueError, match="n must be an int"):
        K.set_num_threads(1.5)


@pjit
def _take_tasks(seen, ntasks):
    """Every thread takes tasks as the convolutions do; ``seen[thread, task]`` counts what each took."""
    taken = task_counters()
    for _ in prange(ntasks):
        me = numba.get_thread_id()
        task = next_task(taken, ntasks)
        while task < ntasks:
            seen[me, task] += 1
            task = next_task(taken, ntasks)


@jit
def _peeks_and_takes(taken, ntasks):
    """(what ``peek_task`` said, what ``next_task`` gave) at each step, on one thread, until none is left."""
    steps = np.empty((ntasks + 1, 2), np.int64)
    for k in range(ntasks + 1):
        steps[k, 0] = peek_task(taken, ntasks)
        steps[k, 1] = next_task(taken, ntasks)
    return steps


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ntasks", [0, 1, 2, 3, 33, 200])
def test_next_task_hands_out_every_task_once(threads, ntasks):
    before = K.get_num_threads()
    K.set_num_threads(threads)
    try:
        for _ in range(20):
            seen = np.zeros((threads, ntasks), np.int64)
            _take_tasks(seen, ntasks)
            assert (seen.sum(axis=0) == 1).all()
    finally:
        K.set_num_threads(before)


@pytest.mark.parametrize("ntasks", [1, 5, 33])
def test_next_task_takes_own_run_first_then_the_others(ntasks):
    # on one thread (id 0) with counters for three: its own run of tasks in order, then the second's and the
    # third's, each in order; ``peek_task`` foretells each of its own and then says none
    steps = _peeks_and_takes(np.zeros(3, np.int64), ntasks)
    own = ntasks // 3
    assert steps[:, 1].tolist() == list(range(ntasks)) + [ntasks]
    assert steps[:, 0].tolist() == list(range(own)) + [ntasks] * (ntasks + 1 - own)
    # a thread whose run is partly taken (by another) goes on from where the counter stands
    taken = np.array([0, 2, 0], np.int64)
    steps = _peeks_and_takes(taken, 9)
    assert steps[:7, 1].tolist() == [0, 1, 2, 5, 6, 7, 8] and (steps[7:, 1] == 9).all()


def test_threading_layer_is_omp(rng):
    K.relu(rng.standard_normal(10, dtype=np.float32))
    assert K.threading_layer() == "omp"


@pytest.mark.parametrize("case", [
    # (n, h, w, cin, cout, padding)
    (1, 9, 7, 9, 7, "same"),
    (3, 14, 13, 20, 70, "same"),     # batch above 1, edge blocks cut on both sides
    (2, 11, 10, 12, 4, "valid"),
    (2, 28, 28, 130, 66, "same"),    # the default rule picks Winograd here
])
@pytest.mark.parametrize("block", [4, 2])
def test_winograd_matches_naive(case, block, rng):
    n, h, w, cin, cout, padding = case
    x = rng.standard_normal((n, h, w, cin), dtype=np.float32)
    kernel = rng.standard_normal((3, 3, cin, cout), dtype=np.float32)
    bias = rng.standard_normal(cout, dtype=np.float32)
    expected = naive.conv2d(x, kernel, bias, 1, padding)
    residual = rng.standard_normal(expected.shape, dtype=np.float32)
    pads = (1, 1, 1, 1) if padding == "same" else (0, 0, 0, 0)
    plan = K.Conv2DPlan(K.pack_conv2d(kernel), x.shape, 1, pads, winograd=block)
    assert plan.winograd and plan.block == block and f"F({block}x{block},3x3)" in plan.kernel
    out = np.empty(expected.shape, np.float32)
    plan(out, x, bias, residual, True)
    # F(4x4, 3x3) trades precision for speed: about 1e-5 of the output's magnitude; F(2x2, 3x3) about 1e-6
    assert_close(out, np.maximum(expected + residual, 0), rtol=3e-5 if block == 4 else 3e-6)


@pytest.mark.parametrize("pads", [(2, 0, 1, 3), (0, 1, 0, 0), (3, 3, 2, 2)])
@pytest.mark.parametrize("block", [4, 2])
def test_winograd_reads_unpadded_input_with_any_padding(pads, block, rng):
    # the transforms take the padding's rows and columns as zeros (no padded copy): pads of every size
    # on each side, as a ZeroPadding2D folded into the convolution makes them; 20 channels: a vector and
    # a tail
    x = rng.standard_normal((2, 9, 11, 20), dtype=np.float32)
    kernel = rng.standard_normal((3, 3, 20, 24), dtype=np.float32)
    bias = rng.standard_normal(24, dtype=np.float32)
    top, bottom, left, right = pads
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    expected = naive.conv2d(padded, kernel, bias, 1, "valid")
    plan = K.Conv2DPlan(K.pack_conv2d(kernel), x.shape, 1, pads, winograd=block)
    assert plan.winograd and plan.padded is None
    out = np.full(expected.shape, np.nan, np.float32)
    plan(out, x, bias)
    assert_close(out, expected, rtol=3e-5 if block == 4 else 3e-6)


@pytest.mark.parametrize("form", ["F4", "F2"])
def test_winograd_weight_transform_matches_einsum(form, rng):
    # G g G^T of every input and output channel, packed in panels (zero past Cout), against numpy's einsum
    # in float64; a range of the products alone gives those products
    from fastres.kernels import winograd, winograd2
    transform = winograd._G if form == "F4" else winograd2._G
    size = transform.shape[0]
    w = rng.standard_normal((3, 3, 21, 70), dtype=np.float32)
    expected = np.einsum("ai,ijco,bj->abco", transform, w.astype(np.float64), transform)
    expected = expected.reshape(size * size, 21, 70)
    packed = winograd.pack_transformed(w, PANEL, transform)
    assert packed.shape == (size * size, 2, 21, PANEL)
    got = packed.transpose(0, 2, 1, 3).reshape(size * size, 21, 2 * PANEL)
    np.testing.assert_allclose(got[:, :, :70], expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    assert (got[:, :, 70:] == 0).all()
    part = winograd.pack_transformed(w, PANEL, transform, range(5, 9))
    np.testing.assert_array_equal(part, packed[5:9])


def test_winograd_products_of_few_tiles_stream_and_match_naive(rng):
    """A 14x14 layer at batch 1 (ResNet50's stage 4 at 224x224): 16 blocks, 3 tiles a product, whose tiles are
    not cut in two (each weight set read once) and run on the streamed kernel."""
    x = rng.standard_normal((1, 14, 14, 24), dtype=np.float32)
    kernel = rng.standard_normal((3, 3, 24, 40), dtype=np.float32)
    bias = rng.standard_normal(40, dtype=np.float32)
    plan = K.Conv2DPlan(K.pack_conv2d(kernel), x.shape, 1, (1, 1, 1, 1), winograd=True)
    out = np.empty((1, 14, 14, 40), np.float32)
    calls = plan._calls(out, x, bias, K.conv.NO_RESIDUAL, True)
    products = [args for kernel_fn, args in calls if kernel_fn is K.conv.conv2d_stream_forward]
    assert len(products) == 1 and products[0][8] == 1  # nchunks: one run of all 3 tiles a product
    plan(out, x, bias, relu=True)
    assert_close(out, np.maximum(naive.conv2d(x, kernel, bias, 1, "same"), 0), rtol=3e-5)


def test_a_packing_released_to_f2x2_reads_its_kernel_back_and_runs_f4x4(rng):
    x = rng.standard_normal((2, 9, 7, 20), dtype=np.float32)
    kernel = rng.standard_normal((3, 3, 20, 70), dtype=np.float32)
    bias = rng.standard_normal(70, dtype=np.float32)
    expected = np.maximum(naive.conv2d(x, kernel, bias, 1, "same"), 0)
    whole = K.pack_conv2d(kernel)
    packed = whole.release_direct(2)
    assert packed.panels is None and packed.winograd_forms() == (4, 2) and whole.panels is not None
    assert_close(packed.unpacked(), kernel.astype(np.float64), rtol=1e-6)   # float32's rounding of G g G^T
    for block in (2, 4):
        plan = K.Conv2DPlan(packed, x.shape, 1, (1, 1, 1, 1), winograd=block)
        assert_close(plan(np.empty(expected.shape, np.float32), x, bias, relu=True), expected, rtol=3e-5)
    assert K.winograd_choice(packed, (1, 4, 4, 20), 1, (1, 1, 1, 1)) in (2, 4)   # never the direct kernel now
    only = whole.release_direct(4)
    assert only.winograd_forms() == (4,)
    with pytest.raises(ValueError, match="cannot be read back"):
        only.unpacked()
    with pytest.raises(ValueError, match="winograd=2"):
        K.Conv2DPlan(only, x.shape, 1, (1, 1, 1, 1), winograd=2)


def test_winograd_is_chosen_only_where_it_wins():
    big = K.pack_conv2d(np.zeros((3, 3, 512, 512), np.float32))
    assert K.Conv2DPlan(big, (4, 7, 7, 512), 1, (1, 1, 1, 1)).block == 4     # 16 blocks, 2.4 MB of weights each
    # F(4x4)'s 8 blocks at 4.7 MB each stream from memory; F(2x2)'s 32 blocks share 16.8 MB (0.5 MB each)
    assert K.Conv2DPlan(big, (2, 7, 7, 512), 1, (1, 1, 1, 1)).block == 2
    assert K.Conv2DPlan(big, (1, 7, 7, 512), 1, (1, 1, 1, 1)).block == 2     # 16 blocks (1 MB each)
    assert not K.Conv2DPlan(big, (1, 4, 4, 512), 1, (1, 1, 1, 1)).winograd    # 4 blocks (4.2 MB each)
    assert not K.Conv2DPlan(big, (2, 14, 14, 512), 2, (1, 1, 1, 1)).winograd   # stride 2
    small = K.pack_conv2d(np.zeros((3, 3, 64, 64), np.float32))
    assert K.Conv2DPlan(small, (1, 56, 56, 64), 1, (1, 1, 1, 1)).block == 4
    assert K.Conv2DPlan(small, (1, 16, 16, 64), 1, (1, 1, 1, 1)).winograd       # 19 MFLOP, 16 blocks
    assert not K.Conv2DPlan(small, (1, 8, 8, 64), 1, (1, 1, 1, 1)).winograd    # 4.7 MFLOP
    assert not K.Conv2DPlan(small, (3, 8, 8, 64), 1, (1, 1, 1, 1)).winograd    # 12 blocks of 4 an image, 14 MFLOP
    assert not K.Conv2DPlan(K.pack_conv2d(np.zeros((3, 3, 256, 256), np.float32)), (1, 4, 4, 256), 1,
                            (1, 1, 1, 1)).winograd                               # 1 block
    assert not K.Conv2DPlan(K.pack_conv2d(np.zeros((5, 5, 64, 64), np.float32)), (1, 56, 56, 64), 1, (2, 2, 2, 2)).winograd


@pytest.mark.parametrize("kind,options", [
    ("sigmoid", {}), ("tanh", {}), ("relu", {"max_value": 6.0}), ("relu", {"negative_slope": 0.3}),
    ("relu", {"threshold": 0.5}), ("relu", {"threshold": -0.5}),
    ("relu", {"max_value": 2.0, "negative_slope": 0.1, "threshold": 0.7}),
])
def test_activation_matches_naive(kind, options, rng):
    x = rng.standard_normal((3, 5, 7, 11), dtype=np.float32) * 5
    expected = naive.activation(x, kind, **options)
    assert_close(K.activation(x, kind, **options), expected)
    inplace = x.copy()
    assert K.activation(inplace, kind, out=inplace, **options) is inplace
    assert_close(inplace, expected)


def test_packing_keeps_one_copy_and_reads_it_back(rng):
    w = rng.standard_normal((3, 3, 20, 70), dtype=np.float32)
    packed = K.pack_conv2d(w)
    assert not hasattr(packed, "weights")   # the Winograd packing is made from the panels
    np.testing.assert_array_equal(packed.unpacked(), w)
