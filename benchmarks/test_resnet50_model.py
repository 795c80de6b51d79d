"""Whole-model forward passes: fastres beside TensorFlow, ONNX Runtime and OpenVINO.

Run with:  pytest benchmarks/test_resnet50_model.py --benchmark-only --benchmark-columns=median,iqr,rounds
(install the peers with ``pip install -e ".[bench]"``).  The model is ResNet50 in the
keras.applications layout with fastres's deterministic weights (``fastres bench``'s default
model, a Keras .h5); every engine runs that same file: TensorFlow through Keras under
``tf.function`` with ``training=False``, ONNX Runtime and OpenVINO through tf2onnx.
fastres and OpenVINO run at both precisions ("-bf16": fastres rounds its weights and
inputs to bf16, OpenVINO is asked for bf16 with its INFERENCE_PRECISION_HINT).
One group per (input size, batch); read the ratios of medians inside a group.  Every
benchmark asserts that its output agrees with TensorFlow's fp32 output: within 1e-4 of
the largest value in fp32, within 2e-2 in bf16 (the accuracy gate of tests/test_bf16.py).
"""
import os
import time

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fastres  # noqa: E402
from fastres.peers import peer_forward  # noqa: E402
from fastres.default_model import default_model_path  # noqa: E402

CONFIGS = [(224, 1), (224, 8), (64, 1)]
ENGINES = ["fastres", "fastres-bf16", "tensorflow", "onnxruntime", "openvino", "openvino-bf16"]
_forward_cache = {}


def forward_for(engine, size):
    """A forward function per (engine, input size), built once per session."""
    key = (engine, size)
    if key not in _forward_cache:
        path = str(default_model_path(size))
        if engine.startswith("fastres"):
            _forward_cache[key] = fastres.load(path, precision="bf16" if engine.endswith("bf16") else "fp32").predict
        else:
            try:
                _forward_cache[key] = peer_forward(engine, path)
            except ImportError as exc:
                _forward_cache[key] = f"{engine} is not installed ({exc.name})"
    return _forward_cache[key]


_references = {}


def reference(size, batch):
    """TensorFlow's output for every configuration, computed once before the first benchmark.

    Running TensorFlow just before an engine is timed would leave its thread pool spinning on
    the two cores while the engine runs (a 2-thread Numba pass then loses whole time slices).
    """
    if not _references:
        for s, b in CONFIGS:
            x = np.random.default_rng(1).standard_normal((b, s, s, 3)).astype(np.float32)
            _references[s, b] = forward_for("tensorflow", s)(x)
        time.sleep(2)  # let TensorFlow's threads stop spinning
    return _references[size, batch]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size,batch", CONFIGS, ids=[f"{s}x{s}-batch{b}" for s, b in CONFIGS])
def test_resnet50_forward(benchmark, engine, size, batch):
    benchmark.group = f"ResNet50 forward, {size}x{size}, batch {batch}"
    forward = forward_for(engine, size)
    if isinstance(forward, str):
        pytest.skip(forward)
    x = np.random.default_rng(1).standard_normal((batch, size, size, 3)).astype(np.float32)
    expected = reference(size, batch)
    forward(x)  # plans, JIT and graph warm-up, outside the timing
    result = np.asarray(benchmark(forward, x))
    tolerance = 2e-2 if engine.endswith("bf16") else 1e-4
    assert np.abs(result - expected).max() <= tolerance * np.abs(expected).max()
