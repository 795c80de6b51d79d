"""fastres's convolution beside numpy im2col + BLAS, on every ResNet50 convolution shape.

Run with:  pytest benchmarks/test_conv_kernels.py --benchmark-only
One group per distinct shape (and one per whole sequence of 53 convolutions); and one per stride-1 3x3
at 224x1, 64x1 and 224x8 with the direct kernel beside the plan's choice (``-k winograd``);
compare the two rows of a group as a ratio of medians, never across runs.
"""
import numpy as np
import pytest

import fastres.kernels as K
from fastres.kernels.conv import evict_forward
from resnet50_shapes import distinct, resnet50_convs
from reference import conv2d_im2col_blas

SIZES = (224, 64)
CASES = [(size, conv, count) for size in SIZES for conv, count in distinct(resnet50_convs(size))]


def make_layer(conv, rng):
    x = rng.standard_normal((1, conv.size, conv.size, conv.cin), dtype=np.float32)
    w = (rng.standard_normal((conv.kernel, conv.kernel, conv.cin, conv.cout)) * np.sqrt(2 / (conv.kernel**2 * conv.cin)))
    return x, w.astype(np.float32)


def prepare(conv, x, w):
    """What the engine does at load and plan time: pack the weights, allocate the scratch buffers."""
    pads = (0, 0, 0, 0)
    if conv.padding == "same":
        pad = (conv.out_size - 1) * conv.stride + conv.kernel - conv.size
        pads = (pad // 2, pad - pad // 2) * 2
    return K.Conv2DPlan(K.pack_conv2d(w), x.shape, conv.stride, pads), np.zeros(conv.cout, np.float32)


def check(result, expected):
    scale = np.abs(expected).max()
    assert np.abs(result - expected).max() <= 1e-4 * scale


@pytest.mark.parametrize("engine", ["fastres", "numpy-im2col-blas"])
@pytest.mark.parametrize("size,conv,count", CASES, ids=[f"{s}-{c.key}" for s, c, _ in CASES])
def test_conv_shape(benchmark, engine, size, conv, count):
    benchmark.group = f"conv {conv.key} (ResNet50 at {size}, x{count})"
    benchmark.extra_info["gflop"] = conv.flops / 1e9
    rng = np.random.default_rng(0)
    x, w = make_layer(conv, rng)
    expected = conv2d_im2col_blas(x, w, conv.stride, conv.padding)
    if engine == "fastres":
        plan, bias = prepare(conv, x, w)
        out = np.empty_like(expected)
        plan(out, x, bias, K.NO_RESIDUAL, True)  # JIT warm-up
        result = benchmark(plan, out, x, bias, K.NO_RESIDUAL, True)
    else:
        result = benchmark(conv2d_im2col_blas, x, w, conv.stride, conv.padding)
    check(result, expected)


@pytest.mark.parametrize("engine", ["fastres", "numpy-im2col-blas"])
@pytest.mark.parametrize("size", SIZES)
def test_resnet50_all_convs(benchmark, engine, size):
    """The 53 convolutions of ResNet50 one after another, batch 1."""
    convs = resnet50_convs(size)
    benchmark.group = f"ResNet50's 53 convolutions at {size}x{size}, batch 1"
    benchmark.extra_info["gflop"] = sum(c.flops for c in convs) / 1e9
    rng = np.random.default_rng(0)
    layers = [(c, *make_layer(c, rng)) for c in convs]
    if engine == "fastres":
        plans = [(x, *prepare(c, x, w)) for c, x, w in layers]
        outs = [np.empty(plan.output_shape, np.float32) for _, plan, _ in plans]

        def run():
            for (x, plan, bias), out in zip(plans, outs):
                plan(out, x, bias, K.NO_RESIDUAL, True)
            return outs

        run()  # JIT warm-up
    else:
        def run():
            return [conv2d_im2col_blas(x, w, c.stride, c.padding) for c, x, w in layers]

    results = benchmark(run)
    c, x, w = layers[-1]
    check(results[-1], conv2d_im2col_blas(x, w, c.stride, c.padding))


WINOGRAD_CASES = [(size, batch, conv) for size, batch in ((224, 1), (64, 1), (224, 8))
                  for conv, _ in distinct(resnet50_convs(size)) if conv.kernel == 3 and conv.stride == 1]


@pytest.mark.parametrize("kernel", ["direct", "chosen"])
@pytest.mark.parametrize("size,batch,conv", WINOGRAD_CASES, ids=[f"{s}x{b}-{c.key}" for s, b, c in WINOGRAD_CASES])
def test_winograd_against_direct(benchmark, kernel, size, batch, conv):
    """Each stride-1 3x3 of ResNet50 on the direct kernel and as the plan runs it (Winograd where chosen, with
    ``extra_info["kernel"]`` naming it), the weights evicted before each call as a forward pass meets them.
    Issue 7's gate: a layer chosen for Winograd at 1.8x the direct kernel's speed or more."""
    benchmark.group = f"3x3 {conv.key} batch {batch} (ResNet50 at {size}): direct kernel and the plan's choice"
    benchmark.extra_info["gflop"] = batch * conv.flops / 1e9
    rng = np.random.default_rng(0)
    x, w = make_layer(conv, rng)
    x = np.repeat(x, batch, axis=0)
    packed = K.pack_conv2d(w)
    plan = K.Conv2DPlan(packed, x.shape, 1, (1, 1, 1, 1), winograd=False if kernel == "direct" else None)
    bias = np.zeros(conv.cout, np.float32)
    out = np.empty(plan.output_shape, np.float32)
    run = plan.bind(out, x, bias, K.NO_RESIDUAL, True)
    benchmark.extra_info["kernel"] = plan.kernel
    weights = plan.panels if plan.winograd else packed.panels

    def evict():
        evict_forward(weights)

    run()  # JIT warm-up (and the plan's measured choices)
    result = benchmark.pedantic(run, setup=evict, rounds=60, warmup_rounds=5)
    check(result, conv2d_im2col_blas(x, w, conv.stride, conv.padding))


def test_fma_peak(benchmark):
    """The machine's float32 multiply-add ceiling for the compiled width: the roofline of the rows above."""
    from fastres.kernels import roofline

    benchmark.group = "machine: FMA peak (independent vector multiply-adds on every thread)"
    out = np.empty((K.get_num_threads(), roofline.ACC), np.float32)
    roofline.fma_peak_forward(out, 16)  # JIT warm-up
    steps = roofline.PEAK_STEPS
    benchmark.extra_info["gflop"] = 2 * out.size * steps / 1e9
    benchmark.extra_info.update(isa=roofline.ISA, tile=f"{roofline.TILE}x{roofline.PANEL}")
    benchmark(roofline.fma_peak_forward, out, steps)
    # each accumulator follows a <- a * s + c from a = j: a = c / (1 - s) + (j - c / (1 - s)) * s ** steps
    scale, shift = 0.999999, 1e-7
    fixed = shift / (1 - scale)
    expected = fixed + (np.arange(roofline.ACC) - fixed) * scale ** steps
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-2, atol=1e-3)  # float32 drift


def test_read_bandwidth(benchmark):
    """The machine's read bandwidth from memory (a 256 MiB array summed on every thread): the other roofline,
    which bounds the 53 convolutions at 64x64 (their 98 MiB of weights)."""
    from fastres.kernels import roofline

    benchmark.group = "machine: read bandwidth (256 MiB summed on every thread)"
    threads = K.get_num_threads()
    data = np.empty((256 << 20) // 4 // threads * threads, np.float32)
    data.fill(0)  # (written, so that every page is mapped: np.zeros's pages would all read one zero page)
    data[:: data.size // threads] = 1  # one 1 a slice: each slice sums to 1 in any order
    out = np.empty(threads, np.float32)
    roofline.read_sum_forward(out, data[: threads * 1024])  # JIT warm-up
    benchmark.extra_info["gbytes"] = data.nbytes / 1e9
    benchmark(roofline.read_sum_forward, out, data)
    assert (out == 1).all()
