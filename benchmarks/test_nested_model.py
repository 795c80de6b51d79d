"""A transfer-learning file (ResNet50 nested as a layer) runs as fast as the same network unnested.

Run with:  pytest benchmarks/test_nested_model.py --benchmark-only --benchmark-columns=median,iqr,rounds
One group, both files from one Keras 3 ResNet50 (include_top=False, random weights, 128x128) with the
same pooling + Dense head: ``nested`` has the ResNet50 as a layer, ``unnested`` has its layers in the
model.  fastres flattens the nested model before folding and fusion, so both run the same operations.
Each benchmark asserts its output against Keras's.
"""
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fastres  # noqa: E402

SIZE = 128


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    inp = keras.Input((SIZE, SIZE, 3))
    head = lambda x: keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(x))  # noqa: E731
    models = {"nested": keras.Model(inp, head(base(inp, training=False))), "unnested": keras.Model(base.input, head(base.output))}
    x = np.random.default_rng(1).standard_normal((1, SIZE, SIZE, 3)).astype(np.float32)
    folder = tmp_path_factory.mktemp("nested_bench")
    found = {}
    for name, model in models.items():
        model.save(folder / f"{name}.keras")
        found[name] = fastres.load(folder / f"{name}.keras"), np.asarray(model(x, training=False))
    return found, x


@pytest.mark.parametrize("layout", ["nested", "unnested"])
def test_resnet50_nested_vs_unnested(benchmark, files, layout):
    benchmark.group = f"ResNet50 {SIZE}x{SIZE} batch 1: nested as a layer vs unnested"
    loaded, x = files
    model, expected = loaded[layout]
    assert len(model.operations) == len(loaded["nested" if layout == "unnested" else "unnested"][0].operations)
    model.predict(x)  # plans and compiles outside the timing
    result = benchmark(model.predict, x)
    assert np.abs(result - expected).max() <= 1e-4 * np.abs(expected).max()
    np.testing.assert_array_equal(result.argmax(-1), expected.argmax(-1))
