"""The roofline self-check, the work split and buffer alignment."""
import numpy as np
import pytest

import fastres.kernels as K
from fastres.kernels import _memory, conv, roofline


def test_fma_peak_kernel_computes_its_recurrence():
    out = np.empty((3, conv.ACC), np.float32)
    roofline.fma_peak_forward(out, 50)
    expected = np.arange(conv.ACC, dtype=np.float64)
    for _ in range(50):
        expected = expected * np.float32(0.999999) + np.float32(1e-7)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-5)


def test_read_sum_kernel_sums_each_slice(rng):
    data = rng.standard_normal(4 * 1000, dtype=np.float32)
    out = np.empty(4, np.float32)
    roofline.read_sum_forward(out, data)
    np.testing.assert_allclose(out, data.reshape(4, -1).sum(axis=1, dtype=np.float64), rtol=1e-4, atol=1e-3)


def test_machine_names_what_the_figures_are_for():
    m = roofline.machine()
    assert m["isa"] in ("avx512", "avx2", "generic") and m["vector_bits"] in (512, 256, 128)
    assert m["tile"] == f"{conv.TILE}x{conv.PANEL}" and m["threads"] == K.get_num_threads()
    assert m["cpu"] and m["llvm_cpu"]
    assert m["peak_gflops"] > 1 and m["read_gbps"] > 0.5
    assert m["peak_one_thread_gflops"] > 1 and isinstance(m["cores_short"], bool)
    assert m["cores_short"] == (m["peak_gflops"] < roofline.SCALING_FLOOR * m["threads"] * m["peak_one_thread_gflops"]
                                and m["threads"] > 1)


def test_the_machine_line_warns_when_the_threads_did_not_scale():
    from fastres.cli import _machine_line

    m = dict(cpu="AMD EPYC", llvm_cpu="znver4", isa="avx512", vector_bits=512, tile="6x64", threads=2,
             peak_gflops=117.0, peak_one_thread_gflops=116.0, read_gbps=34.0, cores_short=True)
    line = _machine_line(m)
    assert "FMA peak 117 GFLOPS" in line and "warning: 2 threads made only 1.0x one thread's FMA rate" in line
    assert "warning" not in _machine_line(dict(m, peak_gflops=232.0, cores_short=False))


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("runs,ntiles,nblk,depth", [(1, 1, 1, 64), (1, 16, 4, 64), (1, 523, 1, 256), (1, 9, 32, 512),
                                                     (1, 9, 8, 2048), (36, 3, 4, 256), (1, 33, 4, 1024)])
def test_work_split_covers_everything_in_balanced_tasks(runs, ntiles, nblk, depth, threads):
    nchunks, group = conv.work_split(runs, ntiles, nblk, depth, threads)
    assert 1 <= nchunks <= ntiles and 1 <= group <= nblk
    tiles = [(c + 1) * ntiles // nchunks - c * ntiles // nchunks for c in range(nchunks)]
    assert sum(tiles) == ntiles and max(tiles) - min(tiles) <= 1
    ngroups = -(-nblk // group)
    tasks = runs * nchunks * ngroups
    if runs * ntiles * nblk >= 2 * threads:   # enough work to share
        assert tasks >= 2 * threads and (tasks % threads == 0 or tasks >= 8 * threads)


def test_a_layer_of_few_pixels_splits_its_weights_and_one_of_many_its_pixels():
    # 4x4 pixels (3 tiles) x 256 channels: each thread reads half the weights, once
    assert conv.work_split(1, 3, 4, 1024, 2) == (1, 1)
    # 56x56 pixels (523 tiles) x 64 channels: the pixels are cut, the one panel is shared
    nchunks, group = conv.work_split(1, 523, 1, 64, 2)
    assert nchunks >= 4 and group == 1


@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 3, 3, 17), (100001,)])
def test_buffers_are_cache_line_aligned(shape):
    a = K.aligned_empty(shape)
    assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous
    assert a.ctypes.data % _memory.ALIGN == 0
    assert _memory.zeros(shape).ctypes.data % _memory.ALIGN == 0 and not _memory.zeros(shape).any()


@pytest.mark.parametrize("offset", [0, 64, 1088, 4032])
def test_buffers_start_where_asked_in_their_page(offset):
    a = K.aligned_empty((1000, 3), page_offset=offset)
    assert a.shape == (1000, 3) and a.flags.c_contiguous and a.ctypes.data % _memory.PAGE == offset
    a[...] = 1.0  # the whole array is writable memory
    assert a.sum() == 3000


@pytest.mark.parametrize("offset", [32, -64, 4096])
def test_a_page_offset_off_the_lines_or_the_page_is_refused(offset):
    with pytest.raises(ValueError, match="page_offset"):
        K.aligned_empty(10, page_offset=offset)


def test_a_plans_value_buffers_differ_in_their_page_offsets(rng, tmp_path):
    """A convolution reading its input while it stores its output must not wait on 4K aliasing: the two start
    at different offsets modulo 1 KiB (ResNet's rows are 1 KiB multiples).  Its residual, read for the last
    time, is the output's own buffer (``model._over_residual``): each element read just before it is
    written."""
    import fastres
    import keras_models as km
    keras = km.keras3()
    inp = keras.Input((8, 8, 256))
    x = keras.layers.Conv2D(64, 1, activation="relu", name="a")(inp)
    x = keras.layers.Conv2D(256, 1, name="b")(x)
    keras.Model(inp, keras.layers.ReLU()(keras.layers.Add()([x, inp]))).save(tmp_path / "residual.keras")
    engine = fastres.load(tmp_path / "residual.keras")
    x = rng.standard_normal((1, 8, 8, 256), dtype=np.float32)
    engine.predict(x)
    plan = engine._local.plans[x.shape]
    assert [op for op in engine._ops if op.name == "b"][0].residual is not None  # the add is fused into "b"
    out, inp, _, residual, _ = plan.steps[plan.names.index("b")].args
    assert residual is plan.input and out.ctypes.data == residual.ctypes.data
    assert inp.ctypes.data % 1024 != out.ctypes.data % 1024


def test_packed_weights_and_plan_buffers_are_aligned(rng):
    packed = K.pack_conv2d(rng.standard_normal((3, 3, 24, 40), dtype=np.float32))
    assert packed.panels.ctypes.data % _memory.ALIGN == 0
    assert packed.winograd_panels().ctypes.data % _memory.ALIGN == 0
    plan = K.Conv2DPlan(packed, (1, 16, 16, 24), 1, (1, 1, 1, 1), winograd=True)
    assert all(b.ctypes.data % _memory.ALIGN == 0 for b in (plan.v, plan.m))
    direct = K.Conv2DPlan(packed, (1, 16, 16, 24), 1, (1, 1, 1, 1), winograd=False)  # (Winograd pads nothing)
    assert direct.padded.ctypes.data % _memory.ALIGN == 0
    assert K.conv2d(rng.standard_normal((1, 5, 5, 24), dtype=np.float32), packed).ctypes.data % _memory.ALIGN == 0


def test_evict_keeps_the_data(rng):
    # clflush writes a line back before dropping it: the contents must not change
    a = rng.standard_normal((37, 19), dtype=np.float32)
    before = a.copy()
    a[3, 4] = 7.0
    conv.evict_forward(a)
    before[3, 4] = 7.0
    np.testing.assert_array_equal(a, before)


def test_wisdom_times_with_the_weights_evicted(monkeypatch, rng, tmp_path):
    from fastres.kernels import wisdom

    monkeypatch.setenv("FASTRES_WISDOM", str(tmp_path / "w.json"))
    monkeypatch.setitem(wisdom._state, "mode", None)
    monkeypatch.setitem(wisdom._state, "records", None)
    evicted = []
    monkeypatch.setattr(conv, "evict_forward", lambda a: evicted.append(a.shape))
    packed = K.pack_conv2d(rng.standard_normal((3, 3, 32, 64), dtype=np.float32))
    K.Conv2DPlan(packed, (1, 28, 28, 32), 1, (1, 1, 1, 1))
    assert (36, -(-64 // conv.PANEL), 32, conv.PANEL) in evicted and packed.panels.shape in evicted   # both candidates' weights
