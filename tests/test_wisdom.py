"""Measured plan-time choices (kernels/wisdom.py): recorded once per machine, read back, never required."""
import json

import numpy as np
import pytest

import fastres.kernels as K
import naive
from fastres.kernels import conv, wisdom

SHAPE, PADS = (1, 28, 28, 32), (1, 1, 1, 1)   # a 3x3 convolution above WINOGRAD_MEASURE_FLOPS


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A wisdom file of the test's own, in "measure" mode."""
    path = tmp_path / "wisdom.json"
    monkeypatch.setenv("FASTRES_WISDOM", str(path))
    monkeypatch.setitem(wisdom._state, "mode", None)
    monkeypatch.setitem(wisdom._state, "records", None)
    return path


def packed(rng):
    return K.pack_conv2d(rng.standard_normal((3, 3, SHAPE[3], 64), dtype=np.float32))


def test_shape_is_measured(rng):
    assert 2 * 28 * 28 * 9 * 32 * 64 >= conv.WINOGRAD_MEASURE_FLOPS


def test_first_plan_measures_and_records_then_later_plans_read(store, rng, monkeypatch):
    plan = K.Conv2DPlan(packed(rng), SHAPE, 1, PADS)
    records = json.loads(store.read_text())
    machine = f"{conv.MACHINE} | {K.get_num_threads()} threads"
    (key, choice), = records[machine].items()
    assert key.endswith("[direct F4 F2]")  # the candidates: the direct kernel, F(4x4, 3x3), F(2x2, 3x3)
    assert choice == (f"winograd F({plan.block}x{plan.block},3x3)" if plan.winograd else "direct")

    def no_timing(*args):
        raise AssertionError("a recorded choice was measured again")

    monkeypatch.setattr(wisdom, "choose", no_timing)
    monkeypatch.setitem(wisdom._state, "records", None)   # as a new process: read from the file
    assert K.Conv2DPlan(packed(rng), SHAPE, 1, PADS).block == plan.block


@pytest.mark.parametrize("choice,block", [("winograd F(4x4,3x3)", 4), ("winograd F(2x2,3x3)", 2), ("direct", 0)])
def test_a_recorded_choice_is_followed(store, rng, choice, block):
    key = f"conv3x3 {'x'.join(map(str, SHAPE))}->64 pads {','.join(map(str, PADS))} [direct F4 F2]"
    store.write_text(json.dumps({f"{conv.MACHINE} | {K.get_num_threads()} threads": {key: choice}}))
    plan = K.Conv2DPlan(packed(rng), SHAPE, 1, PADS)
    assert plan.block == block and plan.winograd == bool(block)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    out = np.empty(plan.output_shape, np.float32)
    bias = np.zeros(64, np.float32)
    reference = K.Conv2DPlan(plan.packed, SHAPE, 1, PADS, winograd=False)(np.empty_like(out), x, bias)
    np.testing.assert_allclose(plan(out, x, bias), reference, rtol=0, atol=3e-5 * np.abs(reference).max())


def test_off_follows_the_rule_and_writes_nothing(store, rng, monkeypatch):
    monkeypatch.setenv("FASTRES_WISDOM", "off")
    monkeypatch.setitem(wisdom._state, "mode", None)
    assert wisdom.mode() == "off"
    n, h, w, _ = SHAPE
    blocks, flops = -(-h // 4) * -(-w // 4), 2 * h * w * 9 * 32 * 64  # (one image)
    rule = (blocks >= conv.WINOGRAD_MIN_TILES and flops >= conv.WINOGRAD_MIN_FLOPS
            or blocks >= conv.WINOGRAD_IMAGE_TILES and flops >= conv.WINOGRAD_SMALL_FLOPS)
    assert n == 1 and 36 * 32 * 64 * 4 <= conv.WINOGRAD_BLOCK_BYTES * blocks
    assert K.Conv2DPlan(packed(rng), SHAPE, 1, PADS).block == (4 if rule else 0)
    assert not store.exists()


def test_read_mode_never_measures(store, rng, monkeypatch):
    wisdom.set_mode("read")
    monkeypatch.setattr(wisdom, "choose", lambda *a: pytest.fail("measured in read mode"))
    K.Conv2DPlan(packed(rng), SHAPE, 1, PADS)
    assert not store.exists()


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"x": 5}', ""])
def test_a_damaged_file_is_ignored_and_replaced(store, rng, content):
    store.write_text(content)
    K.Conv2DPlan(packed(rng), SHAPE, 1, PADS)
    assert isinstance(json.loads(store.read_text()), dict)


def test_an_unwritable_place_is_not_an_error(tmp_path, monkeypatch, rng):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FASTRES_WISDOM", str(blocker / "wisdom.json"))   # a directory that cannot exist
    monkeypatch.setitem(wisdom._state, "mode", None)
    monkeypatch.setitem(wisdom._state, "records", None)
    K.Conv2DPlan(packed(rng), SHAPE, 1, PADS)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="wisdom mode must be one of measure, read, off"):
        wisdom.set_mode("always")


SMALL = (1, 8, 8, 128)   # a 1x1 convolution to 512 channels: under SPLIT_MEASURE_FLOPS, so its work split is measured


def small_plan(rng):
    return K.Conv2DPlan(K.pack_conv2d(rng.standard_normal((1, 1, 128, 512), dtype=np.float32)), SMALL, 1, (0, 0, 0, 0))


def split_of(plan, x, out, bias):
    """(nchunks, group) of the plan's direct kernel call."""
    (kernel, args), = plan._calls(out, x, bias, conv.NO_RESIDUAL, False)
    assert kernel is conv.direct_kernel(plan.starts.shape[1] // conv.TILE, args[8])  # the split's kernel (nchunks)
    return args[8:10]  # (after them, the bf16 copy: ``Conv2DPlan.feed``)


def test_a_small_convolution_measures_its_split_once_and_any_split_gives_the_same_answer(store, rng, monkeypatch):
    assert 2 * 8 * 8 * 128 * 512 <= conv.SPLIT_MEASURE_FLOPS
    plan = small_plan(rng)
    x = rng.standard_normal(SMALL, dtype=np.float32)
    bias = rng.standard_normal(512, dtype=np.float32)
    out = np.empty(plan.output_shape, np.float32)
    split = split_of(plan, x, out, bias)
    machine = f"{conv.MACHINE} | {K.get_num_threads()} threads"
    (key, choice), = json.loads(store.read_text())[machine].items()
    assert key == "split 1x1/1 1x8x8x128->512" and choice == ",".join(map(str, split))
    monkeypatch.setattr(wisdom, "choose", lambda *a, **k: pytest.fail("a recorded split was measured again"))
    monkeypatch.setitem(wisdom._state, "records", None)   # as a new process: read from the file
    assert split_of(small_plan(rng), x, out, bias) == split
    reference = np.einsum("nhwc,co->nhwo", x.astype(np.float64), plan.packed.unpacked().astype(np.float64)[0, 0]) + bias
    np.testing.assert_allclose(plan(out, x, bias), reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def test_a_bf16_convolution_records_its_split_apart_from_float32(store, rng):
    """bf16 weights stream at half the bytes: their split is measured and kept under its own name."""
    w = rng.standard_normal((1, 1, 128, 512), dtype=np.float32)
    plan = K.Conv2DPlan(K.pack_conv2d(w, precision="bf16"), SMALL, 1, (0, 0, 0, 0))
    x = rng.standard_normal(SMALL, dtype=np.float32)
    bias = rng.standard_normal(512, dtype=np.float32)
    out = np.empty(plan.output_shape, np.float32)
    calls = plan._calls(out, x, bias, conv.NO_RESIDUAL, False)
    if plan.amx:
        pytest.skip("this 1x1 runs on AMX tiles, which split their work by rule")
    kernel, args = calls[-1]
    assert kernel is conv.direct_kernel(plan.starts.shape[1] // conv.TILE, args[8])
    machine = f"{conv.MACHINE} | {K.get_num_threads()} threads"
    (key, choice), = [(k, v) for k, v in json.loads(store.read_text())[machine].items() if k.startswith("split")]
    kind = "inputs" if plan.rounds_input else "weights"
    assert key == f"split 1x1/1 1x8x8x128->512 bf16 {kind}" and choice == ",".join(map(str, args[8:10]))
    rounded = naive.bf16_round(x) if plan.rounds_input else x
    reference = np.einsum("nhwc,co->nhwo", rounded, naive.bf16_round(w)[0, 0]) + bias
    np.testing.assert_allclose(plan(out, x, bias), reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def candidates():
    threads = K.get_num_threads()
    ntiles, nblk = -(-64 // conv.TILE), -(-512 // conv.PANEL)
    rule = conv.work_split(1, ntiles, nblk, 128, threads)
    return list(conv.split_candidates(1, ntiles, nblk, threads, rule).values())


@pytest.mark.parametrize("which", [0, -1])
def test_a_recorded_split_is_followed(store, rng, which):
    split = candidates()[which]
    plan = small_plan(rng)
    x = rng.standard_normal(SMALL, dtype=np.float32)
    bias = rng.standard_normal(512, dtype=np.float32)
    out = np.empty(plan.output_shape, np.float32)
    reference = plan(np.empty_like(out), x, bias)
    machine = f"{conv.MACHINE} | {K.get_num_threads()} threads"
    store.write_text(json.dumps({machine: {"split 1x1/1 1x8x8x128->512": f"{split[0]},{split[1]}"}}))
    wisdom._state["records"] = None   # read the file again
    assert split_of(plan, x, out, bias) == split
    np.testing.assert_allclose(plan(out, x, bias), reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max())


def test_a_split_that_is_not_a_candidate_is_measured_again(store, rng):
    machine = f"{conv.MACHINE} | {K.get_num_threads()} threads"
    store.write_text(json.dumps({machine: {"split 1x1/1 1x8x8x128->512": "999,1"}}))
    plan = small_plan(rng)
    x = rng.standard_normal(SMALL, dtype=np.float32)
    assert split_of(plan, x, np.empty(plan.output_shape, np.float32), np.zeros(512, np.float32)) in candidates()


def test_off_splits_by_the_rule(store, rng):
    wisdom.set_mode("off")
    plan = small_plan(rng)
    x = rng.standard_normal(SMALL, dtype=np.float32)
    out = np.empty(plan.output_shape, np.float32)
    threads = K.get_num_threads()
    rule = conv.work_split(1, -(-64 // conv.TILE), -(-512 // conv.PANEL), 128, threads)
    assert split_of(plan, x, out, np.zeros(512, np.float32)) == rule
    assert not store.exists()


class FakeClock:
    """``time.perf_counter`` for ``wisdom.choose``: each candidate advances it by its own cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def candidate(self, cost):
        def run():
            self.now += cost
        return run


@pytest.mark.parametrize("other_cost, winner", [(0.97, "rule"), (0.90, "other"), (1.2, "rule")])
def test_the_rule_stays_unless_another_is_faster_by_the_margin(store, monkeypatch, other_cost, winner):
    clock = FakeClock()
    monkeypatch.setattr(wisdom.time, "perf_counter", clock)
    candidates = {"rule": clock.candidate(1.0), "other": clock.candidate(other_cost)}
    assert wisdom.choose("machine", "key", candidates, "rule", margin=0.05) == winner
    assert json.loads(store.read_text()) == {"machine": {"key": winner}}
