import os

import numpy as np
import pytest

# Plan-time choices by the deterministic rule, never by timing this machine (tests/test_wisdom.py
# turns measuring on where it is the subject); subprocesses inherit this.
os.environ["FASTRES_WISDOM"] = "off"


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: every test has its own fixed data."""
    seed = sum(request.node.name.encode()) * 7919
    return np.random.default_rng(seed)


def assert_close(actual, expected, rtol=1e-5):
    """float32 result against a float64 reference, relative to the reference's largest magnitude."""
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(np.abs(expected).max(), 1e-6)
    err = np.abs(actual - expected).max() / scale
    assert err <= rtol, f"max error {err:.3g} x largest reference magnitude (allowed {rtol:g})"


def assert_matches(result, expected):
    """fastres against Keras: max abs difference within 1e-4 of the reference's largest magnitude, same argmax."""
    expected = np.asarray(expected, np.float64)
    assert result.dtype == np.float32 and result.shape == expected.shape
    scale = np.abs(expected).max()
    err = np.abs(result - expected).max()
    assert err <= 1e-4 * scale, f"max difference {err:.3g} against largest reference {scale:.3g}"
    np.testing.assert_array_equal(result.argmax(axis=-1), expected.argmax(axis=-1))
