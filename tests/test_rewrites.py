"""The rewrite passes one at a time, on small hand-made graphs (numbers: against numpy)."""
import numpy as np
import pytest

from fastres.graph import Activation, Layer
from fastres.model import _layout
from fastres.rewrites import (PASSES, drop_identities, fold_into_consumer, fold_into_producer, fold_padding,
                              fuse_activation, rewrite, to_scale_shift)


def conv(name, src, padding="valid", kernel=3, filters=4, cin=3, rng=None, stride=1):
    rng = rng or np.random.default_rng(0)
    return Layer(name, "Conv2D", [src], dict(filters=filters, kernel=(kernel, kernel), stride=stride, padding=padding,
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
                                            "fold_into_consumer", "fuse_add", "fuse_activation", "stack_shortcut"]


def projection_block(cin=16, stride=1, same_input=False):
    """A bottleneck block's end: ``body`` (a 3x3 of the input), then Add(1x1 of the input, 1x1 of ``body``), ReLU."""
    rng = np.random.default_rng(2)
    return [Layer("in", "InputLayer", []), conv("body", "in", "same", 3, cin, cin, rng, stride),
            conv("shortcut", "in", "valid", 1, 32, cin, rng, stride),
            conv("last", "in" if same_input else "body", "valid", 1, 32, cin, rng),
            Layer("sum", "Add", ["shortcut", "last"], dict(activation=Activation())),
            Layer("out", "ReLU", ["sum"], dict(activation=Activation("relu")))]


def test_a_stride_1_projection_shortcut_stacks_with_the_last_convolution():
    layers = projection_block()
    out, output = rewrite(layers, "out", (6, 6, 16))
    assert kinds(out) == ["InputLayer", "Conv2D", "Conv2D"] and output == "shortcut"
    stacked = out[2]
    assert stacked.inputs == ["body", "in"] and stacked.residual is None and stacked.activation.plain_relu
    assert stacked.folded == ["last", "sum", "out"] and stacked.weights[0].shape == (2, 1, 16, 32)
    # a pixel of each input: the 2x1 kernel on the two stacked equals the two convolutions summed
    rng = np.random.default_rng(3)
    body, x = rng.standard_normal(16), rng.standard_normal(16)
    (w_short, b_short), (w_last, b_last) = layers[2].weights, layers[3].weights
    expected = x @ w_short[0, 0] + b_short + body @ w_last[0, 0] + b_last
    kernel, bias = stacked.weights
    np.testing.assert_allclose(body @ kernel[0, 0] + x @ kernel[1, 0] + bias, expected, rtol=1e-5)


@pytest.mark.parametrize("cin,stride,same_input", [(16, 2, False), (8, 1, False), (16, 1, True)])
def test_a_projection_shortcut_stays_apart(cin, stride, same_input):
    """Strided (the inputs differ in shape), channels not whole cache lines, or both reading the same input."""
    out, _ = rewrite(projection_block(cin, stride, same_input), "out", (6, 6, cin))
    assert kinds(out) == ["InputLayer", "Conv2D", "Conv2D", "Conv2D"] and out[3].residual is not None


def test_stacked_inputs_share_a_slot_first_then_second():
    out, output = rewrite(projection_block(), "out", (6, 6, 16))
    shapes = {"in": (6, 6, 16), "body": (6, 6, 16), "shortcut": (6, 6, 32)}
    slot_of, offset_of, slots = _layout(out, output, shapes, 3)
    size = 3 * 6 * 6 * 16
    assert slot_of["in"] == slot_of["body"] and slots[slot_of["in"]] == 2 * size
    assert (offset_of["body"], offset_of["in"]) == (0, size) and slot_of["shortcut"] != slot_of["in"]


def test_a_convolution_stores_over_its_residual_only_as_its_last_reader():
    """Over the residual where nothing reads it after (the plan's input too), not where it is read again, is
    the convolution's own input, or is the output."""
    def residual_conv(name, src, residual):
        layer = conv(name, src, "same", 1, 4, 4)
        layer.residual = residual
        return layer
    ops = [Layer("in", "InputLayer", []), conv("a", "in", "same", 3, 4, 4),
           residual_conv("own", "a", "a"),        # reads ``a`` as its input too
           residual_conv("b", "own", "in"),       # ``in`` is read again by ``c``
           residual_conv("c", "b", "in"),         # the last reader of ``in``
           residual_conv("d", "c", "own"),        # the last reader of ``own``
           residual_conv("e", "d", "d")]
    shapes = {op.name: (5, 5, 4) for op in ops}
    slot_of, _, slots = _layout(ops, "e", shapes, 2)
    assert slot_of["own"] != slot_of["a"] and slot_of["b"] != slot_of["in"]
    assert slot_of["c"] == slot_of["in"] and slot_of["d"] == slot_of["own"] and slot_of["e"] != slot_of["d"]
    ops[-1] = residual_conv("e", "d", "c")  # ``c`` is the output: never written over
    slot_of, _, _ = _layout(ops + [residual_conv("f", "e", "c")], "c", shapes | {"f": (5, 5, 4)}, 2)
    assert slot_of["f"] != slot_of["c"]
