"""Padding and pooling semantics against TensorFlow's own ops ("same", odd sizes, stride 2)."""
import numpy as np
import pytest

import fastres.kernels as K
from conftest import assert_close

import tensorflow as tf  # a test dependency: these tests must run, never skip


@pytest.mark.parametrize("size", [(7, 7), (8, 9), (13, 10)])
@pytest.mark.parametrize("kernel,stride", [(3, 2), (3, 1), (1, 2), (7, 2), (2, 2), (4, 3)])
def test_conv2d_same_matches_tf(size, kernel, stride, rng):
    x = rng.standard_normal((2, *size, 5), dtype=np.float32)
    w = rng.standard_normal((kernel, kernel, 5, 6), dtype=np.float32)
    expected = tf.nn.conv2d(x, w, strides=stride, padding="SAME").numpy().astype(np.float64)
    assert_close(K.conv2d(x, w, strides=stride, padding="same"), expected)


@pytest.mark.parametrize("size", [(7, 7), (8, 9), (13, 10)])
@pytest.mark.parametrize("kernel,stride", [(3, 2), (1, 2), (7, 2)])
def test_conv2d_valid_matches_tf(size, kernel, stride, rng):
    x = rng.standard_normal((1, *size, 3), dtype=np.float32)
    w = rng.standard_normal((kernel, kernel, 3, 4), dtype=np.float32)
    expected = tf.nn.conv2d(x, w, strides=stride, padding="VALID").numpy().astype(np.float64)
    assert_close(K.conv2d(x, w, strides=stride, padding="valid"), expected)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("size", [(7, 7), (8, 9), (12, 11)])
@pytest.mark.parametrize("pool,stride", [(3, 2), (2, 2), (3, 1)])
def test_pooling_matches_tf(padding, size, pool, stride, rng):
    x = rng.standard_normal((2, *size, 4), dtype=np.float32)
    tf_max = tf.nn.max_pool2d(x, pool, stride, padding).numpy().astype(np.float64)
    tf_avg = tf.nn.avg_pool2d(x, pool, stride, padding).numpy().astype(np.float64)
    assert_close(K.max_pool2d(x, pool, stride, padding.lower()), tf_max)
    assert_close(K.avg_pool2d(x, pool, stride, padding.lower()), tf_avg)
