"""The bf16 convolution's three inner products, each against the naive reference on bf16-rounded values.

On this machine bf16 runs on AMX tiles where the CPU has them (``amx.AMX``), else on
``vdpbf16ps`` (AVX512-BF16), else widened to float32 FMAs.  Every test here runs on
any CPU: where AMX is missing the same cases check the kernel that replaces it, and
``FASTRES_AMX=off`` in a subprocess checks the non-AMX kernel on an AMX machine.
The tests of other code-generation targets (``test_targets.py``) cover the widened path.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from numba.core.errors import TypingError

import fastres.kernels as K
from fastres.kernels import amx, bf16, conv

import naive
import test_bf16

BOUND = 1e-5  # of the largest |output|, as tests/test_bf16.py: only the float32 sums differ from the reference
CASES = test_bf16.CASES  # name: (input NHWC, kernel HWIO, stride, padding, residual)


def rounded(a):
    return bf16.from_bf16(bf16.to_bf16(a))


def run_case(name, seed=0):
    xs, ws, stride, padding, with_residual = CASES[name]
    rng = np.random.default_rng([seed, len(name)])
    x = rng.standard_normal(xs, dtype=np.float32)
    w = rng.standard_normal(ws, dtype=np.float32)
    b = rng.standard_normal(ws[-1], dtype=np.float32)
    packed = K.pack_conv2d(w, precision="bf16")
    want = naive.conv2d(rounded(x) if test_bf16.rounds_input(packed, xs, stride) else x, rounded(w), b, stride, padding)
    residual = rng.standard_normal(want.shape, dtype=np.float32) if with_residual else None
    if residual is not None:
        want = want + residual
    got = K.conv2d(x, packed, b, strides=stride, padding=padding, relu=True, residual=residual)
    return got, np.maximum(want, 0)


def expected_kernel(name):
    """The kernel ``Conv2DPlan`` should pick for a case on this machine."""
    xs, ws, stride, _, _ = CASES[name]
    cin = ws[2]
    if amx.gathered(ws[:2], cin):
        return "im2col + amx"
    if amx.usable(ws[:2], cin, stride, (0, 0, 0, 0) if ws[0] == 1 else (1, 1, 1, 1)):
        return "amx"
    return bf16.kernel()


@pytest.mark.parametrize("name", list(CASES))
def test_the_kernel_that_runs_is_the_one_reported(name):
    xs, ws, stride, padding, _ = CASES[name]
    packed = K.pack_conv2d(np.zeros(ws, np.float32), precision="bf16")
    pads = (0, 0, 0, 0) if ws[0] == 1 else (ws[0] // 2,) * 4
    plan = K.Conv2DPlan(packed, xs, stride, pads)
    assert expected_kernel(name) in plan.kernel
    assert plan.winograd is False  # Winograd is never used in bf16


def test_both_vector_products_match_naive():
    """The widened weights on float32 inputs, and vdpbf16ps on bf16 inputs where the CPU has it: whichever
    ``use_dot`` picks, both are right."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 11, 10, 64), dtype=np.float32)   # already padded
    w = rng.standard_normal((3, 3, 64, 70), dtype=np.float32)
    panels = bf16.pack_bf16(w)
    for dot in (False, True) if bf16.BF16_DOT else (False,):
        out = np.empty((2, 5, 4, 70), np.float32)
        starts = conv.pixel_starts(out.shape, x.shape, 2, 1)
        conv.conv2d_forward(out, bf16.to_bf16(x) if dot else x, panels, starts, np.zeros(70, np.float32),
                            K.NO_RESIDUAL, 3, False, 2, 1, K.NO_BF16_OUTPUT, 0, 0)
        want = naive.conv2d(rounded(x) if dot else x, rounded(w), stride=2)
        assert np.abs(out - want).max() / np.abs(want).max() <= BOUND, dot


def test_bf16_inputs_without_vdpbf16ps_are_refused():
    """A bf16 input needs vdpbf16ps: elsewhere the kernel refuses it when compiled, naming the fix."""
    if bf16.BF16_DOT:
        pytest.skip("this CPU has AVX512-BF16: bf16 inputs are valid here")
    panels = bf16.pack_bf16(np.ones((1, 1, 8, 16), np.float32))
    out = np.empty((1, 1, 6, 16), np.float32)
    x = np.zeros((1, 1, 6, 8), np.uint16)
    with pytest.raises(TypingError, match="vdpbf16ps"):
        conv.conv2d_forward(out, x, panels, conv.pixel_starts(out.shape, x.shape, 1, 1), np.zeros(16, np.float32),
                            K.NO_RESIDUAL, 1, False, 1, 1, K.NO_BF16_OUTPUT, 0, 0)


def test_amx_is_used_exactly_where_the_machine_allows_it():
    flags = amx._cpu_flags()
    if not {"amx_bf16", "amx_tile"} <= flags or os.environ.get("FASTRES_AMX", "").lower() in ("0", "off", "no", "false"):
        assert not amx.AMX
    plan = K.Conv2DPlan(K.pack_conv2d(np.zeros((1, 1, 64, 64), np.float32), precision="bf16"), (1, 4, 4, 64), 1,
                        (0, 0, 0, 0))
    assert ("amx" in plan.kernel) == amx.AMX


def test_the_amx_peak_is_measured_where_amx_runs():
    """Each of the 1024 sums of ``steps`` rounds of 16 x 32 by 32 x 16 ones is ``32 * steps``."""
    if amx.AMX:
        out = np.empty(2, np.float32)
        amx.peak_forward(out, np.full(512, 0x3F80, np.uint16), 10)  # bf16 1.0
        np.testing.assert_array_equal(out, 10 * 32 * 1024)
        assert amx.peak(K.get_num_threads(), repeats=2) > 100  # GFLOPS: an AMX core does about 1000
    else:
        assert amx.peak(K.get_num_threads()) == 0.0


def test_bf16_weights_take_half_the_memory():
    w = np.ones((3, 3, 256, 256), np.float32)
    assert K.pack_conv2d(w, precision="bf16").panels.nbytes * 2 == K.pack_conv2d(w).panels.nbytes


def test_packed_bf16_weights_read_back_rounded():
    rng = np.random.default_rng(3)
    for shape in [(3, 3, 64, 70), (7, 7, 3, 64), (1, 1, 5, 9)]:
        w = rng.standard_normal(shape, dtype=np.float32)
        np.testing.assert_array_equal(K.pack_conv2d(w, precision="bf16").unpacked(), rounded(w))


def test_dense_in_bf16():
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((3, 2048), dtype=np.float32), rng.standard_normal((2048, 1000), dtype=np.float32)
    packed = K.pack_conv2d(w, precision="bf16")
    got = K.dense(x, packed)
    x = rounded(x) if test_bf16.rounds_input(packed, (3, 1, 1, 2048), 1) else x
    want = x.astype(np.float64) @ rounded(w).astype(np.float64)
    assert np.abs(got - want).max() / np.abs(want).max() <= BOUND


SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
import test_amx
out = {{}}
for name in test_amx.CASES:
    got, want = test_amx.run_case(name)
    out[name] = [float(np.abs(got - want).max() / np.abs(want).max()), test_amx.expected_kernel(name)]
print(json.dumps(out))
"""


def test_without_amx_the_vector_kernel_gives_the_same_answers():
    env = dict(os.environ, FASTRES_AMX="off")
    script = SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (err, kernel) in results.items():
        assert err <= BOUND, f"{name} without AMX: relative error {err:.2e}"
        assert "amx" not in kernel and kernel == bf16.kernel()


@pytest.mark.parametrize("shape,stride,pads", [
    ((2, 9, 10, 64), 1, (1, 1, 1, 1)), ((1, 4, 5, 64), 1, (1, 1, 1, 1)), ((1, 7, 6, 64), 2, (0, 1, 1, 0)),
    ((2, 13, 8, 64), 1, (2, 0, 1, 3))], ids=["32x32 blocks", "16x64 blocks", "strided", "uneven pads"])
def test_a_plan_can_feed_the_next_convolution_its_bf16_input(shape, stride, pads):
    """The producer rounds its output straight into the consumer's padded input: same answer, bit for bit.
    Both on AMX (a stride-1 consumer), or the producer on the direct kernel (its residual added, its float32
    output written too) and the consumer on vdpbf16ps."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape, dtype=np.float32)
    w1, w2 = rng.standard_normal((1, 1, 64, 64), dtype=np.float32), rng.standard_normal((3, 3, 64, 96), dtype=np.float32)
    b1, b2 = rng.standard_normal(64, dtype=np.float32), rng.standard_normal(96, dtype=np.float32)
    # the direct kernel's copy is of the stored values, the residual added (on AMX a fed output takes none)
    residual = K.NO_RESIDUAL if amx.AMX else rng.standard_normal((*shape[:3], 64), dtype=np.float32)
    outs = []
    for fused in (False, True):
        first = K.Conv2DPlan(K.pack_conv2d(w1, precision="bf16"), x.shape, 1, (0, 0, 0, 0))
        second = K.Conv2DPlan(K.pack_conv2d(w2, precision="bf16"), first.output_shape, stride, pads,
                              winograd=False)
        middle, out = np.full(first.output_shape, np.nan, np.float32), np.empty(second.output_shape, np.float32)
        if fused:
            assert first.can_feed(second) == (amx.AMX and stride == 1 or not amx.AMX and bf16.use_dot())
            if not first.can_feed(second):
                with pytest.raises(ValueError, match="cannot take"):
                    first.feed(second)
                return
            first.feed(second)
        for _ in range(2):  # the consumer's zero border must survive repeated calls
            first(middle, x, b1, residual, True)
            second(out, middle, b2, K.NO_RESIDUAL, False)
        # fed on AMX, the float32 output is not written; on the direct kernel it is, as before
        assert np.isnan(middle).any() == (fused and first.amx)
        outs.append((out, middle))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    if not first.amx:
        np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_a_direct_plan_feeds_two_consumers_of_one_layout_through_one_buffer():
    """A ResNet stage's input goes to its first 1x1 and to its projection (both stride 2, unpadded): the
    producer writes one rounded copy, which both read; a consumer padded otherwise is not fed.  On AMX
    (strided 1x1s subsample first) or without vdpbf16ps, neither is fed."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 8, 10, 64), dtype=np.float32)
    weights = [rng.standard_normal(shape, dtype=np.float32) for shape in
               [(1, 1, 64, 64), (1, 1, 64, 64), (1, 1, 64, 128), (3, 3, 64, 32)]]
    biases = [rng.standard_normal(w.shape[-1], dtype=np.float32) for w in weights]
    results = []
    for fused in (False, True):
        packs = [K.pack_conv2d(w, precision="bf16") for w in weights]
        first = K.Conv2DPlan(packs[0], x.shape, 1, (0, 0, 0, 0))
        shape = first.output_shape
        unpadded = (0, 0, 0, 0)
        plans = [K.Conv2DPlan(packs[1], shape, 2, unpadded), K.Conv2DPlan(packs[2], shape, 2, unpadded),
                 K.Conv2DPlan(packs[3], shape, 1, (1, 1, 1, 1), winograd=False)]
        if fused:
            direct = not amx.AMX and bf16.use_dot()
            assert first.can_feed(plans[0]) == direct
            if direct:
                first.feed(plans[0])
                assert first.can_feed(plans[1]) and not first.can_feed(plans[2])
                first.feed(plans[1])
                assert np.shares_memory(plans[1].rounded, plans[0].rounded) and not plans[2].prerounded
        middle = np.empty(shape, np.float32)
        first(middle, x, biases[0], K.NO_RESIDUAL, True)
        outs = []
        for plan, bias in zip(plans, biases[1:]):
            outs.append(np.empty(plan.output_shape, np.float32))
            plan(outs[-1], middle, bias, K.NO_RESIDUAL, False)
        results.append(outs)
    for unfed, fed in zip(*results):
        np.testing.assert_array_equal(unfed, fed)


def test_a_direct_plan_feeds_a_consumer_that_reads_its_output_in_another_shape():
    """A stacked pair's output is one row of N*H*W pixels, (1, 1, N*H*W, C); the next 1x1 reads it as
    (N, H, W, C): the producer writes the copy in its own shape into the consumer's buffer, bit for bit the
    consumer's own rounding.  A padded consumer, or one reading a different count of values, is not fed."""
    rng = np.random.default_rng(9)
    n, h, w = 2, 5, 7
    x = rng.standard_normal((1, 1, n * h * w, 64), dtype=np.float32)
    w1 = rng.standard_normal((1, 1, 64, 128), dtype=np.float32)
    w2 = rng.standard_normal((1, 1, 128, 64), dtype=np.float32)
    b1, b2 = rng.standard_normal(128, dtype=np.float32), rng.standard_normal(64, dtype=np.float32)
    results = []
    for fused in (False, True):
        first = K.Conv2DPlan(K.pack_conv2d(w1, precision="bf16"), x.shape, 1, (0, 0, 0, 0))
        second = K.Conv2DPlan(K.pack_conv2d(w2, precision="bf16"), (n, h, w, 128), 1, (0, 0, 0, 0))
        padded = K.Conv2DPlan(K.pack_conv2d(w2, precision="bf16"), (n, h, w, 128), 1, (0, 0, 1, 1),
                              winograd=False)
        fewer = K.Conv2DPlan(K.pack_conv2d(w2, precision="bf16"), (1, h, w, 128), 1, (0, 0, 0, 0))
        direct = not amx.AMX and bf16.use_dot()
        if fused:
            assert first.can_feed(second) == direct
            if not direct:
                return
            assert not first.can_feed(padded) and not first.can_feed(fewer)
            first.feed(second)
        middle, out = np.empty(first.output_shape, np.float32), np.empty(second.output_shape, np.float32)
        first(middle, x, b1, K.NO_RESIDUAL, True)
        second(out, middle.reshape(n, h, w, 128), b2, K.NO_RESIDUAL, False)
        if fused:
            np.testing.assert_array_equal(second.rounded_view, bf16.to_bf16(middle).reshape(n, h, w, 128))
        results.append((middle, out))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_two_convolutions_of_one_input_round_it_once():
    """A stage's first 1x1 and its projection read the same input (the batch part of a ``HeadPlan``, where no
    convolution feeds them): the first rounds it into a buffer of its own, the second reads that, with the
    same answers; a convolution whose input is padded otherwise cannot share it."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 8, 10, 64), dtype=np.float32)
    weights = [rng.standard_normal(shape, dtype=np.float32) for shape in [(1, 1, 64, 64), (1, 1, 64, 128)]]
    biases = [rng.standard_normal(w.shape[-1], dtype=np.float32) for w in weights]
    results = []
    for shared in (False, True):
        plans = [K.Conv2DPlan(K.pack_conv2d(w, precision="bf16"), x.shape, 2, (0, 0, 0, 0)) for w in weights]
        padded = K.Conv2DPlan(K.pack_conv2d(weights[0], precision="bf16"), x.shape, 1, (1, 1, 1, 1),
                              winograd=False)
        if not plans[0].rounds_input or plans[0].amx:  # (AMX subsamples a strided 1x1's input first)
            with pytest.raises(ValueError, match="cannot read"):
                plans[0].share_input(plans[1])
            return
        if shared:
            with pytest.raises(ValueError, match="cannot read"):
                plans[0].share_input(padded)
            plans[0].share_input(plans[1])
            assert plans[0].own_input and plans[1].prerounded and plans[1].rounded is plans[0].rounded
        outs = [np.full(plan.output_shape, np.nan, np.float32) for plan in plans]
        for _ in range(2):
            for plan, out, bias in zip(plans, outs, biases):
                plan(out, x, bias, K.NO_RESIDUAL, True)
        results.append(outs)
    for unshared, shared in zip(*results):
        np.testing.assert_array_equal(unshared, shared)


@pytest.mark.parametrize("shape", [(1, 9, 7, 64), (2, 8, 8, 64)], ids=["edge blocks", "whole blocks"])
def test_a_winograd_plan_feeds_an_unpadded_consumer(shape):
    """F(2x2, 3x3)'s output transform writes the copy (its edge blocks' repeated rows and columns included)
    for a 1x1 that reads it unpadded; a padded consumer is not fed."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal(shape, dtype=np.float32)
    w1 = rng.standard_normal((3, 3, 64, 64), dtype=np.float32)
    w2 = rng.standard_normal((1, 1, 64, 96), dtype=np.float32)
    b1, b2 = rng.standard_normal(64, dtype=np.float32), rng.standard_normal(96, dtype=np.float32)
    results = []
    for fused in (False, True):
        first = K.Conv2DPlan(K.pack_conv2d(w1, precision="bf16"), x.shape, 1, (1, 1, 1, 1), winograd=2)
        second = K.Conv2DPlan(K.pack_conv2d(w2, precision="bf16"), first.output_shape, 1, (0, 0, 0, 0))
        padded = K.Conv2DPlan(K.pack_conv2d(w1, precision="bf16"), first.output_shape, 1, (1, 1, 1, 1),
                              winograd=False)
        if not first.winograd:  # bf16 Winograd runs on vdpbf16ps only, where AMX does not take the layer
            assert not bf16.use_dot() or amx.usable((3, 3), 64, 1, (1, 1, 1, 1))
            return
        if fused:
            assert first.can_feed(second) and not first.can_feed(padded)
            first.feed(second)
        middle, out = np.empty(first.output_shape, np.float32), np.empty(second.output_shape, np.float32)
        first(middle, x, b1, K.NO_RESIDUAL, True)
        second(out, middle, b2, K.NO_RESIDUAL, False)
        if fused:
            np.testing.assert_array_equal(second.rounded_view, bf16.to_bf16(middle))
        results.append((middle, out))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("stride", [1, 2])
def test_gathering_a_thin_input_matches_naive_im2col(stride):
    """The stem's gather (plain Numba, any CPU): each pixel's taps in order, then zeros to the row's end."""
    x = np.random.default_rng(stride).integers(0, 1 << 16, (2, 11, 9, 3), dtype=np.uint16)
    kh, kw = 7, 5
    depth = amx.im2col_depth((kh, kw), 3)
    out = np.full((2, (11 - kh) // stride + 1, (9 - kw) // stride + 1, depth), 7, np.uint16)
    amx.gather_bf16_forward(out, x, kh, kw, stride)
    rows = out.reshape(-1, depth)
    np.testing.assert_array_equal(rows[:, : kh * kw * 3], naive.im2col(x, kh, kw, stride))
    assert not rows[:, kh * kw * 3:].any()
