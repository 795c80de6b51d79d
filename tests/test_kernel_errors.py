"""Bad arguments raise ValueError naming the argument; nothing reaches a kernel."""
import numpy as np
import pytest

import fastres.kernels as K

X = np.zeros((1, 8, 8, 4), np.float32)
W = np.zeros((3, 3, 4, 6), np.float32)


@pytest.mark.parametrize("call,message", [
    (lambda: K.conv2d(X[0], W), "conv2d: x must have 4 dimensions"),
    (lambda: K.conv2d(X.astype(np.float64), W), "conv2d: x must be float32, got float64"),
    (lambda: K.conv2d(X, W[:, :, :3]), "x has 4 channels but w expects 3"),
    (lambda: K.conv2d(X, W[0]), "conv2d: w must have 4 dimensions"),
    (lambda: K.conv2d(np.zeros((0, 8, 8, 4), np.float32), W), "conv2d: x must not be empty"),
    (lambda: K.conv2d(X, W, bias=np.zeros(5, np.float32)), r"conv2d: bias must have shape \(6,\)"),
    (lambda: K.conv2d(X, W, strides=0), "conv2d: strides must be positive"),
    (lambda: K.conv2d(X, W, strides=(1, 2)), "strides must be equal"),
    (lambda: K.conv2d(X, W, padding="full"), 'padding must be "valid" or "same"'),
    (lambda: K.conv2d(X[:, :2, :2], W), "smaller than the window"),
    (lambda: K.conv2d(X, W, residual=np.zeros((1, 6, 6, 5), np.float32)), "residual must have shape"),
    (lambda: K.conv2d(X, W, out=np.zeros((1, 6, 6, 5), np.float32)), "out must have shape"),
    (lambda: K.conv2d(X, W, out=np.zeros((1, 6, 6, 6), np.float64)), "out must be a float32"),
    (lambda: K.conv2d([[1.0]], W), "x must be a numpy array"),
    (lambda: K.dense(np.zeros((2, 5), np.float32), np.zeros((4, 3), np.float32)), "x has 5 features but w expects 4"),
    (lambda: K.batch_norm(X, None, None, np.zeros(3, np.float32), np.ones(4, np.float32)), r"mean must have shape \(4,\)"),
    (lambda: K.batch_norm(X, None, None, np.zeros(4, np.float32), -np.ones(4, np.float32)), "var \\+ epsilon must be positive"),
    (lambda: K.add_relu(X, X[:, :4]), "a and b must have the same shape"),
    (lambda: K.max_pool2d(X, pool_size=(2, 0)), "pool_size must be positive"),
    (lambda: K.max_pool2d(X, pool_size=9), "smaller than the window"),
    (lambda: K.avg_pool2d(X[0]), "avg_pool2d: x must have 4 dimensions"),
    (lambda: K.zero_pad2d(X, -1), "padding must not be negative"),
    (lambda: K.global_avg_pool2d(X.astype(np.float16)), "must be float32"),
    (lambda: K.softmax(np.zeros((2, 0), np.float32)), "softmax: x must not be empty"),
    (lambda: K.activation(X, "gelu"), "activation: kind must be one of relu, sigmoid, tanh"),
    (lambda: K.activation(X, "relu", max_value=-1.0), "max_value and negative_slope must not be negative"),
    (lambda: K.activation(X, "relu", threshold=float("nan")), "threshold must be a finite number"),
    (lambda: K.activation(X.astype(np.float64), "tanh"), "activation: x must be float32"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
