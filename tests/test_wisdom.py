"""Measured plan-time choices (kernels/wisdom.py): recorded once per machine, read back, never required."""
import json

import numpy as np
import pytest

import fastres.kernels as K
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
    assert choice == ("winograd" if plan.winograd else "direct")

    def no_timing(*args):
        raise AssertionError("a recorded choice was measured again")

    monkeypatch.setattr(wisdom, "choose", no_timing)
    monkeypatch.setitem(wisdom._state, "records", None)   # as a new process: read from the file
    assert K.Conv2DPlan(packed(rng), SHAPE, 1, PADS).winograd == plan.winograd


@pytest.mark.parametrize("choice", ["winograd", "direct"])
def test_a_recorded_choice_is_followed(store, rng, choice):
    key = f"conv3x3 {'x'.join(map(str, SHAPE))}->64 pads {','.join(map(str, PADS))}"
    store.write_text(json.dumps({f"{conv.MACHINE} | {K.get_num_threads()} threads": {key: choice}}))
    plan = K.Conv2DPlan(packed(rng), SHAPE, 1, PADS)
    assert plan.winograd == (choice == "winograd")
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
    rule = n * -(-h // 4) * -(-w // 4) >= conv.WINOGRAD_MIN_TILES and 2 * h * w * 9 * 32 * 64 >= conv.WINOGRAD_MIN_FLOPS
    assert K.Conv2DPlan(packed(rng), SHAPE, 1, PADS).winograd == rule
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
