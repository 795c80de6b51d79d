"""Known architectures for weights-only files: ResNet50/101/152 in two naming layouts, and V2.

* ``applications``: keras.applications (``conv1_conv``, ``conv2_block1_1_conv``, ...,
  ``predictions``), batch-norm epsilon 1.001e-5, ``pool1_pad`` before the max-pool.
* ``v2``: keras.applications ResNet50V2/101V2/152V2, pre-activation blocks (batch-norm and
  ReLU before the convolutions, ``post_bn`` at the end), the stride on each stack's last block.
* ``classic``: the original Keras ResNet50 and the course model (``conv1``, ``bn_conv1``,
  ``res2a_branch2a``, ...), epsilon 1e-3, no padding before the max-pool.

Both end in a global average pool (the classic 7x7 or 2x2 AveragePooling2D + Flatten
is the same thing when the window covers the whole map) and a Dense layer whose
class count comes from the weights.  The input size is free.  A keras.applications file
without ``predictions`` (``include_top=False``) gives the feature map (N, h, w, 2048).
"""
from .errors import ModelFormatError
from .graph import Layer

BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3),
          "resnet50v2": (3, 4, 6, 3), "resnet101v2": (3, 4, 23, 3), "resnet152v2": (3, 8, 36, 3)}


def _conv(name, src, filters, kernel, stride=1, padding="valid", use_bias=True):
    return Layer(name, "Conv2D", [src], dict(filters=filters, kernel=(kernel, kernel), stride=stride,
                                             padding=padding, use_bias=use_bias, activation="linear"))


def _bn(name, src, epsilon):
    return Layer(name, "BatchNormalization", [src], dict(epsilon=epsilon, center=True, scale=True, axis=-1))


def _relu(name, src):
    return Layer(name, "Activation", [src], dict(activation="relu"))


def _pad(name, src, pad):
    return Layer(name, "ZeroPadding2D", [src], dict(pads=(pad,) * 4))


def _stem(preact):
    """keras.applications' stem; V2 (``preact``) has no batch-norm and ReLU after conv1."""
    layers = [Layer("input", "InputLayer", []), _pad("conv1_pad", "input", 3), _conv("conv1_conv", "conv1_pad", 64, 7, 2)]
    if not preact:
        layers += [_bn("conv1_bn", "conv1_conv", 1.001e-5), _relu("conv1_relu", "conv1_bn")]
    return layers + [_pad("pool1_pad", layers[-1].name, 1),
                     Layer("pool1_pool", "MaxPooling2D", ["pool1_pad"], dict(pool=(3, 3), stride=(2, 2), padding="valid"))]


def _top(layers, x, classes, activation):
    """Global average pool and the classifier, when the weights have one (``classes`` not None)."""
    if classes is None:
        return layers
    return layers + [Layer("avg_pool", "GlobalAveragePooling2D", [x], dict(keepdims=False)),
                     Layer("predictions", "Dense", ["avg_pool"], dict(units=classes, use_bias=True, activation=activation))]


def _v2(blocks, classes, activation):
    eps = 1.001e-5
    layers, x = _stem(True), "pool1_pool"
    for stage, (filters, count) in enumerate(zip((64, 128, 256, 512), blocks), start=2):
        for block in range(1, count + 1):
            p = f"conv{stage}_block{block}"
            stride = 2 if block == count and stage < 5 else 1
            layers += [_bn(p + "_preact_bn", x, eps), _relu(p + "_preact_relu", p + "_preact_bn")]
            if block == 1:
                shortcut = p + "_0_conv"
                layers.append(_conv(shortcut, p + "_preact_relu", 4 * filters, 1))
            elif stride > 1:
                shortcut = p + "_shortcut_pool"
                layers.append(Layer(shortcut, "MaxPooling2D", [x], dict(pool=(1, 1), stride=(stride, stride), padding="valid")))
            else:
                shortcut = x
            layers += [_conv(p + "_1_conv", p + "_preact_relu", filters, 1, use_bias=False), _bn(p + "_1_bn", p + "_1_conv", eps),
                       _relu(p + "_1_relu", p + "_1_bn"), _pad(p + "_2_pad", p + "_1_relu", 1),
                       _conv(p + "_2_conv", p + "_2_pad", filters, 3, stride, use_bias=False),
                       _bn(p + "_2_bn", p + "_2_conv", eps), _relu(p + "_2_relu", p + "_2_bn"),
                       _conv(p + "_3_conv", p + "_2_relu", 4 * filters, 1), Layer(p + "_out", "Add", [shortcut, p + "_3_conv"])]
            x = p + "_out"
    layers += [_bn("post_bn", x, eps), _relu("post_relu", "post_bn")]
    return _top(layers, "post_relu", classes, activation)


def _applications(blocks, classes, activation):
    eps = 1.001e-5
    layers, x = _stem(False), "pool1_pool"
    for stage, (filters, count) in enumerate(zip((64, 128, 256, 512), blocks), start=2):
        for block in range(1, count + 1):
            p = f"conv{stage}_block{block}"
            stride = 2 if block == 1 and stage > 2 else 1
            main = [_conv(p + "_1_conv", x, filters, 1, stride), _bn(p + "_1_bn", p + "_1_conv", eps),
                    _relu(p + "_1_relu", p + "_1_bn"),
                    _conv(p + "_2_conv", p + "_1_relu", filters, 3, 1, "same"), _bn(p + "_2_bn", p + "_2_conv", eps),
                    _relu(p + "_2_relu", p + "_2_bn")]
            last = _conv(p + "_3_conv", p + "_2_relu", 4 * filters, 1), _bn(p + "_3_bn", p + "_3_conv", eps)
            if block == 1:  # Keras's own layer order, which its .h5 loader relies on
                shortcut = p + "_0_bn"
                layers += main + [_conv(p + "_0_conv", x, 4 * filters, 1, stride), last[0],
                                  _bn(p + "_0_bn", p + "_0_conv", eps), last[1]]
            else:
                shortcut = x
                layers += main + list(last)
            layers += [Layer(p + "_add", "Add", [shortcut, p + "_3_bn"]), _relu(p + "_out", p + "_add")]
            x = p + "_out"
    return _top(layers, x, classes, activation)


def _classic(blocks, classes, activation, dense_name):
    eps = 1e-3
    layers = [Layer("input", "InputLayer", []),
              Layer("conv1_pad", "ZeroPadding2D", ["input"], dict(pads=(3, 3, 3, 3))),
              _conv("conv1", "conv1_pad", 64, 7, 2), _bn("bn_conv1", "conv1", eps), _relu("conv1_relu", "bn_conv1"),
              Layer("pool1", "MaxPooling2D", ["conv1_relu"], dict(pool=(3, 3), stride=(2, 2), padding="valid"))]
    x = "pool1"
    for stage, (filters, count) in enumerate(zip((64, 128, 256, 512), blocks), start=2):
        for block in range(count):
            letter = chr(ord("a") + block) if count <= 6 else ("a" if block == 0 else f"b{block}")
            conv, bn = f"res{stage}{letter}_branch", f"bn{stage}{letter}_branch"
            stride = 2 if block == 0 and stage > 2 else 1
            if block == 0:
                layers += [_conv(conv + "1", x, 4 * filters, 1, stride), _bn(bn + "1", conv + "1", eps)]
                shortcut = bn + "1"
            else:
                shortcut = x
            layers += [_conv(conv + "2a", x, filters, 1, stride), _bn(bn + "2a", conv + "2a", eps),
                       _relu(conv + "2a_relu", bn + "2a"),
                       _conv(conv + "2b", conv + "2a_relu", filters, 3, 1, "same"), _bn(bn + "2b", conv + "2b", eps),
                       _relu(conv + "2b_relu", bn + "2b"),
                       _conv(conv + "2c", conv + "2b_relu", 4 * filters, 1), _bn(bn + "2c", conv + "2c", eps),
                       Layer(f"add{stage}{letter}", "Add", [bn + "2c", shortcut]),
                       _relu(f"res{stage}{letter}_out", f"add{stage}{letter}")]
            x = f"res{stage}{letter}_out"
    layers += [Layer("avg_pool", "GlobalAveragePooling2D", [x], dict(keepdims=False)),
               Layer(dense_name, "Dense", ["avg_pool"], dict(units=classes, use_bias=True, activation=activation))]
    return layers


def build(architecture, weights, classifier_activation="softmax"):
    """Layers of ``architecture`` for the weights-only file whose arrays are ``weights``.

    The layout is recognised from the layer names; the classes from the last Dense kernel.
    """
    key = str(architecture).lower()
    if key not in BLOCKS:
        raise ModelFormatError(f"unknown architecture {architecture!r}; known: {', '.join(BLOCKS)}")
    names = set(weights)
    v2 = key.endswith("v2")
    if v2 != ("post_bn" in names) and "conv1_conv" in names:
        raise ModelFormatError(f"the weights are {'not ' if v2 else ''}ResNet V2 weights (post_bn is "
                               f"{'missing' if v2 else 'there'}): is the architecture {key!r} right?")
    if "conv1_conv" in names:
        dense = "predictions"
        layout = _v2 if v2 else _applications
        make = lambda classes: layout(BLOCKS[key], classes, classifier_activation)  # noqa: E731
    elif "res2a_branch2a" in names and not v2:
        dense = [n for n in weights if len(weights[n]) == 2 and weights[n][0].ndim == 2]
        if len(dense) != 1:
            raise ModelFormatError("cannot find the single Dense layer of the classic ResNet weights")
        dense = dense[0]
        make = lambda classes: _classic(BLOCKS[key], classes, classifier_activation, dense)  # noqa: E731
    else:
        raise ModelFormatError(f"the weights are neither keras.applications ({'conv1_conv'!r}, ...) nor classic "
                               f"({'res2a_branch2a'!r}, ...) {key} weights")
    if dense == "predictions" and not weights.get(dense):  # include_top=False: the feature map
        layers = make(None)
    elif dense not in weights or len(weights[dense]) != 2:
        raise ModelFormatError(f"the weights have no classifier layer {dense!r} (kernel and bias)")
    else:
        layers = make(weights[dense][0].shape[-1])
    missing = [l.name for l in layers if l.kind in ("Conv2D", "BatchNormalization", "Dense") and l.name not in names]
    if missing:
        raise ModelFormatError(f"the weights lack {len(missing)} layers of {key}, first {missing[0]!r}: "
                               "is the architecture right?")
    return layers
