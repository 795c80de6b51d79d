"""Whole-model forward passes: fastres beside TensorFlow on keras.applications ResNet50.

Run with:  pytest benchmarks/test_resnet50_model.py --benchmark-only --benchmark-columns=median,iqr,rounds
One group per (input size, batch); read the ratio of medians inside a group.
TensorFlow runs the Keras model under ``tf.function`` with ``training=False``.
"""
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fastres  # noqa: E402

CONFIGS = [(224, 1), (224, 8), (64, 1)]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    import keras

    folder = tmp_path_factory.mktemp("bench")
    made = {}
    for size in sorted({s for s, _ in CONFIGS}):
        keras.utils.set_random_seed(0)
        model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classifier_activation=None)
        rng = np.random.default_rng(0)
        for layer in model.layers:  # batch-norm statistics that are not the identity
            if type(layer).__name__ == "BatchNormalization":
                gamma, beta, mean, var = layer.get_weights()
                layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                                   rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2, var.shape)])
        path = folder / f"resnet50_{size}.keras"
        model.save(path)
        made[size] = (model, path)
    return made


def check(result, expected):
    expected = np.asarray(expected)
    assert np.abs(result - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("engine", ["fastres", "tensorflow"])
@pytest.mark.parametrize("size,batch", CONFIGS, ids=[f"{s}x{s}-batch{b}" for s, b in CONFIGS])
def test_resnet50_forward(benchmark, saved_models, engine, size, batch):
    import tensorflow as tf

    model, path = saved_models[size]
    benchmark.group = f"ResNet50 forward, {size}x{size}, batch {batch}"
    x = np.random.default_rng(1).standard_normal((batch, size, size, 3)).astype(np.float32)
    expected = model(x, training=False)
    if engine == "fastres":
        fr = fastres.load(path)
        fr.predict(x)  # plan and JIT warm-up, outside the timing
        result = benchmark(fr.predict, x)
    else:
        forward = tf.function(lambda t: model(t, training=False))
        forward(tf.constant(x))  # trace outside the timing
        result = benchmark(lambda: forward(tf.constant(x)).numpy())
    check(result, expected)
