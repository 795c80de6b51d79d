"""``fastres compile``: every kernel into the cache ahead of time, and clear messages when the cache is not writable."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastres
from fastres import precompile

SCRIPT = shutil.which("fastres", path=os.path.dirname(sys.executable)) or shutil.which("fastres")


def test_synthetic_model_holds_every_operation_kind():
    model = precompile._synthetic_model()
    kinds = {kind for _, kind, _ in model.operations}
    assert kinds >= {"Conv2D", "Dense", "ScaleShift", "Add", "Activation", "MaxPooling2D", "AveragePooling2D",
                     "GlobalAveragePooling2D", "GlobalMaxPooling2D", "ZeroPadding2D", "Flatten"}
    y = model.predict(np.ones((2, 16, 16, 8), np.float32))
    np.testing.assert_allclose(y.sum(axis=-1), 1, rtol=1e-5)  # it ends in a softmax


def test_compile_command():
    """Into the cache the tests use (compiling into an empty one takes ~30 s here)."""
    result = subprocess.run([SCRIPT, "compile"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    cache = precompile.cache_dir()
    assert f"every kernel compiled into {cache}" in result.stdout
    assert len([name for name in os.listdir(cache) if name.endswith(".nbc")]) >= 10


def test_unwritable_cache_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(fastres.FastresError, match="a-file/cache is not writable .* set NUMBA_CACHE_DIR"):
        precompile.check_writable(str(blocker / "cache"))


def test_no_cache_directory_at_all_is_a_clear_error():
    code = ("import numba.core.caching as c\n"
            "c.CacheImpl._locator_classes = []  # what Numba finds when no cache directory is writable\n"
            "import fastres\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "no writable cache directory" in result.stderr and "NUMBA_CACHE_DIR" in result.stderr
