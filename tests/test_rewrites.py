"""The rewrite passes one at a time, on small hand-made graphs (numbers: against numpy)."""
import numpy as np
import pytest

from fastres.graph import Activation, Layer
from fastres.rewrites import (PASSES, drop_identities, fold_into_consumer, fold_into_producer, fold_padding,
                              fuse_activation, rewrite, to_scale_shift)


def conv(name, src, padding="valid", kernel=3, filters=4, cin=3, rng=None):
    rng = rng or np.random.default_rng(0)
    return Layer(name, "Conv2D", [src], dict(filters=filters, kernel=(kernel, kernel), stride=1, padding=padding,
                                             use_bias=True, activation=Activation()),
                 weights=[rng.standard_normal((kernel, kernel, cin, filters)).astype(np.float32),
                          rng.standard_normal(filters).astype(np.float32)])


def rescaling(name, src, scale, offset):
    return Layer(name, "Rescaling", [src], dict(scale=(scale,), offset=(offset,)))


def kinds(layers):
    return [layer.kind for layer in layers]


@pytest.mark.parametrize("padding,kernel,offset,folds", [
    ("valid", 3, -1.0, True),    # no padded pixel: exact
    ("same", 1, -1.0, True),     # a 1x1 "same" convolution pads nothing
    ("same", 3, 0.0, True),      # a padded zero scaled is still zero
    ("same", 3, -1.0, False),    # a padded zero would have to become -1: left as a ScaleShift
])
def test_fold_into_consumer_only_where_exact(padding, kernel, offset, folds):
    layers = [Layer("in", "InputLayer", []), rescaling("r", "in", 0.5, offset), conv("c", "r", padding, kernel)]
    out, _ = rewrite(layers, "c", (6, 6, 3), passes=(to_scale_shift, fold_into_consumer))
    assert kinds(out) == (["InputLayer", "Conv2D"] if folds else ["InputLayer", "ScaleShift", "Conv2D"])
    if folds:  # the folded convolution on x equals the original on 0.5 x + offset, at an inner pixel
        x = np.random.default_rng(1).standard_normal((kernel, kernel, 3))
        w, b = layers[2].weights
        expected = np.tensordot(0.5 * x + offset, w, axes=3) + b
        np.testing.assert_allclose(np.tensordot(x, out[1].weights[0], axes=3) + out[1].weights[1], expected, rtol=1e-5)


def test_scale_shift_folds_into_producer_read_once_only():
    """A batch-norm after a convolution whose output is also read elsewhere (ResNet V2's pre-activation
    after an Add) cannot be folded: it becomes a ScaleShift, with its ReLU fused."""
    bn = Layer("bn", "BatchNormalization", ["c"], dict(epsilon=1e-3, center=True, scale=True, axis=-1),
               weights=[np.ones(4, np.float32) * 2, np.zeros(4, np.float32), np.zeros(4, np.float32), np.ones(4, np.float32)])
    layers = [Layer("in", "InputLayer", []), conv("c", "in"), bn, Layer("relu", "ReLU", ["bn"], dict(activation=Activation("relu"))),
              Layer("sum", "Add", ["c", "relu"])]
    out, output = rewrite(layers, "sum", (6, 6, 3), passes=(to_scale_shift, fold_into_producer, fuse_activation))
    assert kinds(out) == ["InputLayer", "Conv2D", "ScaleShift", "Add"] and output == "sum"
    assert out[2].activation.plain_relu and out[2].folded == ["relu"]
    single, _ = rewrite(layers[:3], "bn", (6, 6, 3), passes=(to_scale_shift, fold_into_producer))
    assert kinds(single) == ["InputLayer", "Conv2D"] and single[1].folded == ["bn"]


def test_identities_vanish_and_padding_folds():
    layers = [Layer("in", "InputLayer", []), Layer("drop", "Dropout", ["in"]),
              Layer("pad", "ZeroPadding2D", ["drop"], dict(pads=(1, 1, 2, 2))), conv("c", "pad"),
              Layer("lin", "Activation", ["c"], dict(activation=Activation()))]
    out, output = rewrite(layers, "lin", (6, 6, 3), passes=(drop_identities, fold_padding))
    assert kinds(out) == ["InputLayer", "Conv2D"] and output == "c" and out[1].pads == (1, 1, 2, 2)


def test_pass_order():
    assert [p.__name__ for p in PASSES] == ["drop_identities", "to_scale_shift", "fold_padding", "fold_into_producer",
                                            "fold_into_consumer", "fuse_add", "fuse_activation"]
