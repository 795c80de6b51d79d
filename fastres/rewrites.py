"""The rewrites: named passes over the layer graph, run in the order of ``PASSES``.

* ``drop_identities``: InputLayers of nested models, linear activations and the layers that
  are the identity at inference (Dropout, GaussianNoise, ...) disappear.
* ``to_scale_shift``: BatchNormalization, Rescaling and Normalization become one kind,
  ``ScaleShift`` (``y = x * scale + shift`` per channel).
* ``fold_padding``: a ZeroPadding2D goes into the convolution, or the "valid" pooling, after it
  (the pooling then takes the padded positions as zeros).
* ``fold_into_producer``: a ScaleShift after a Conv2D or Dense goes into its kernel and bias
  (exact), or into a ScaleShift before it.
* ``fold_into_consumer``: a ScaleShift before a Dense, or before a Conv2D that pads no zeros
  (or whose shift is zero), goes into its kernel and bias.  With zero padding it would be
  inexact at the borders (the padded zeros would be shifted too), so it stays a ScaleShift.
* ``fuse_add``: an Add goes into the convolution that feeds it (the residual added while storing).
* ``fuse_activation``: an activation layer goes into whatever produces its input.
* ``stack_shortcut``: a 1x1 convolution whose residual is another 1x1 convolution of an input of the same
  shape (a ResNet block's projection shortcut at stride 1, added to its last convolution) becomes one
  convolution of two inputs: the two inputs stacked as the rows of one image, a 2x1 kernel of the two
  kernels (the two biases summed).  The plan keeps the two inputs next to each other (``model._layout``).

A pass merges two layers only where the first one's output is read by the second alone and is
not the model's output.  Each pass is a function of the graph and can run alone (``rewrite(...,
passes=...)``), as the tests do.
"""
import numpy as np

from . import kernels as K
from .graph import (ACTIVATION_KINDS, AFFINE_KINDS, IDENTITY_KINDS, Layer, StoredKernel, batch_norm_weights,
                    infer_shapes)


class Graph:
    """The layers being rewritten, the output's name, and the names of removed layers' stand-ins."""

    def __init__(self, layers, output, input_shape, take_weights=False):
        self.layers = [Layer(l.name, l.kind, list(l.inputs), dict(l.attrs), list(l.weights), l.activation,
                             l.residual, l.pads, list(l.folded), l.key) for l in layers]
        if take_weights:  # the graph holds the only reference: kernels are folded in place
            for layer in layers:
                layer.weights = []
        self.owns_weights = take_weights
        self.output = output
        self.shapes = infer_shapes(self.layers, input_shape)
        self.renamed = {}

    def source(self, name):
        while name in self.renamed:
            name = self.renamed[name]
        return name

    def resolve(self):
        """Point every reference at the layers that remain."""
        for layer in self.layers:
            layer.inputs = [self.source(i) for i in layer.inputs]
            layer.residual = layer.residual and self.source(layer.residual)
        self.output = self.source(self.output)

    def remove(self, layer, into=None):
        """Drop ``layer``; its readers read its input.  ``into`` is the layer it was merged into."""
        self.renamed[layer.name] = layer.inputs[0]
        self.layers.remove(layer)
        if into is not None:
            into.folded.append(layer.name)
        self.resolve()

    def readers(self, name):
        return [l for l in self.layers if name in l.inputs or l.residual == name]

    def sole_reader(self, layer):
        """The one layer that reads ``layer``'s output, once and not as a residual; None if it is the output."""
        readers = self.readers(layer.name)
        if (len(readers) != 1 or layer.name == self.output or readers[0].inputs.count(layer.name) != 1
                or readers[0].residual == layer.name):
            return None
        return readers[0]

    def producer(self, layer, kinds):
        """The layer that feeds ``layer``, if it is one of ``kinds`` and feeds nothing else."""
        if len(layer.inputs) != 1:
            return None
        producer = next((l for l in self.layers if l.name == layer.inputs[0]), None)
        if producer is None or producer.kind not in kinds or self.sole_reader(producer) is not layer:
            return None
        return producer


def drop_identities(g):
    for layer in list(g.layers):
        if (layer.kind == "InputLayer" and layer.inputs or layer.kind in IDENTITY_KINDS
                or layer.kind in ACTIVATION_KINDS and layer.attrs["activation"].linear):
            g.remove(layer)


def _affine(layer, channels):
    """(scale, shift) of a BatchNormalization, Rescaling or Normalization layer, float64 (C,)."""
    a = layer.attrs
    if layer.kind == "BatchNormalization":
        scale, shift = K.batch_norm_params(layer.name, channels, *batch_norm_weights(layer), a["epsilon"])
        return scale.astype(np.float64), shift.astype(np.float64)
    if layer.kind == "Rescaling":
        scale, shift = (np.broadcast_to(np.asarray(a[k], np.float64), (channels,)) for k in ("scale", "offset"))
        return scale, shift
    # Normalization: (x - mean) / max(sqrt(variance), 1e-7), Keras's backend epsilon
    mean, variance = (layer.weights[0], layer.weights[1]) if a["mean"] is None else (a["mean"], a["variance"])
    mean, variance = (np.broadcast_to(np.asarray(v, np.float64), (channels,)) for v in (mean, variance))
    scale = 1.0 / np.maximum(np.sqrt(variance), 1e-7)
    return scale, -mean * scale


def to_scale_shift(g):
    for layer in g.layers:
        if layer.kind in AFFINE_KINDS:
            scale, shift = _affine(layer, g.shapes[layer.name][-1])
            layer.kind, layer.attrs = "ScaleShift", {"from": layer.kind}
            layer.weights = [scale.astype(np.float32), shift.astype(np.float32)]


def fold_padding(g):
    for layer in list(g.layers):
        pool = layer.kind in ("MaxPooling2D", "AveragePooling2D") and layer.attrs["padding"] == "valid"
        if (layer.kind == "Conv2D" or pool) and layer.pads == (0, 0, 0, 0):
            pad = g.producer(layer, ("ZeroPadding2D",))
            if pad is not None:
                layer.pads = pad.attrs["pads"]
                layer.inputs = list(pad.inputs)
                layer.folded.append(pad.name)
                g.layers.remove(pad)
                g.resolve()


def _kernel_and_bias(layer):
    """The float32 kernel (not copied) and the bias as float64 (zeros without one)."""
    kernel = layer.weights[0]
    bias = layer.weights[1].astype(np.float64) if len(layer.weights) > 1 else np.zeros(kernel.shape[-1])
    return kernel, bias


def _scaled(g, kernel, scale):
    """``kernel * scale`` (float32): in place when the graph owns the weights (``take_weights``), else a new array.

    A kernel still in the file (``StoredKernel``) records a per-output-channel scale, applied when it is packed.
    """
    if isinstance(kernel, StoredKernel):
        if scale.ndim == 1:
            return kernel.scaled(scale)
        kernel = kernel.read()
    if g.owns_weights and kernel.dtype == np.float32 and kernel.flags.writeable:
        kernel *= scale
        return kernel
    return kernel * scale


def fold_into_producer(g):
    for layer in list(g.layers):
        if layer.kind != "ScaleShift" or not layer.activation.linear:
            continue
        producer = g.producer(layer, ("Conv2D", "Dense", "ScaleShift"))
        if producer is None or not producer.activation.linear or producer.residual is not None:
            continue
        scale, shift = (w.astype(np.float64) for w in layer.weights)
        if producer.kind == "ScaleShift":
            first, second = producer.weights
            producer.weights = [first * scale, second * scale + shift]
        else:
            # float32 * float32 rounds once, as the float64 product rounded to float32 would: the
            # same kernel without a float64 copy of it (nor any copy, when the graph owns it)
            kernel, bias = _kernel_and_bias(producer)
            kernel = _scaled(g, kernel, layer.weights[0])
            producer.weights = [kernel, bias * scale + shift]
        producer.weights = [w if isinstance(w, StoredKernel) else w.astype(np.float32, copy=False)
                            for w in producer.weights]
        g.remove(layer, into=producer)


def _pads_zeros(conv):
    a = conv.attrs
    return conv.pads != (0, 0, 0, 0) or a["padding"] == "same" and a["kernel"] != (1, 1)


def fold_into_consumer(g):
    for layer in list(g.layers):
        if layer.kind != "ScaleShift" or not layer.activation.linear or layer.name == g.output:
            continue
        reader = g.sole_reader(layer)
        if reader is None or reader.kind not in ("Conv2D", "Dense"):
            continue
        scale, shift = (w.astype(np.float64) for w in layer.weights)
        if reader.kind == "Conv2D" and shift.any() and _pads_zeros(reader):
            continue  # inexact: the padded border would not be shifted
        kernel, bias = _kernel_and_bias(reader)
        if isinstance(kernel, StoredKernel):  # this fold needs the kernel itself (rare: a scale before a layer)
            kernel = kernel.read()
        # conv(x * s + t) = conv_{w * s}(x) + sum over the window and input channels of w * t
        input_axis = kernel.ndim - 2
        if shift.any():
            bias = bias + np.tensordot(kernel, shift, axes=([input_axis], [0])).reshape(-1, kernel.shape[-1]).sum(axis=0)
        kernel = _scaled(g, kernel, layer.weights[0].reshape((-1, 1)))  # float32, rounded once (see fold_into_producer)
        reader.weights = [kernel, bias.astype(np.float32)]
        g.remove(layer, into=reader)
        reader.folded.insert(0, reader.folded.pop())  # it ran before the reader


def fuse_add(g):
    for layer in list(g.layers):
        if layer.kind != "Add" or len(layer.inputs) != 2:
            continue
        for i, name in enumerate(layer.inputs):
            conv = next((l for l in g.layers if l.name == name), None)
            other = layer.inputs[1 - i]
            if (conv is not None and conv.kind == "Conv2D" and conv.activation.linear and conv.residual is None
                    and g.sole_reader(conv) is layer and other != conv.name):
                conv.residual = other
                conv.activation = layer.activation
                conv.folded.append(layer.name)
                # the conv now runs where the Add ran: after both of its inputs
                g.layers.remove(conv)
                g.layers[g.layers.index(layer)] = conv
                g.renamed[layer.name] = conv.name
                g.resolve()
                break


def fuse_activation(g):
    for layer in list(g.layers):
        if layer.kind in ACTIVATION_KINDS:
            producer = g.producer(layer, ("Conv2D", "Dense", "ScaleShift", "Add"))
            if producer is not None and producer.activation.linear:
                producer.activation = layer.attrs["activation"]
                g.remove(layer, into=producer)


def _plain_one_by_one(conv, shapes):
    a = conv.attrs
    return (conv.kind == "Conv2D" and len(conv.inputs) == 1 and a["kernel"] == (1, 1) and a["stride"] == 1
            and conv.pads == (0, 0, 0, 0) and shapes[conv.inputs[0]][-1] % 16 == 0)


def _read(kernel):
    return kernel.read() if isinstance(kernel, StoredKernel) else kernel


def stack_shortcut(g):
    # ResNet50's stage-2 first block, alone (56x56x64 -> 256, Zen 4): 0.89x the two convolutions' time at
    # batch 1, 0.76x at batch 8, no residual to read and 128 products a store instead of 64.  The channels
    # are whole cache lines (a multiple of 16), so the second input starts on a line as the first does.
    stacked = set()  # a value is one stacked input at most
    for conv in list(g.layers):
        first = next((l for l in g.layers if l.name == conv.residual), None)
        if (first is None or not _plain_one_by_one(conv, g.shapes) or not _plain_one_by_one(first, g.shapes)
                or first.residual is not None or not first.activation.linear or first.name == g.output
                or g.readers(first.name) != [conv] or conv.inputs[0] in first.inputs
                or g.shapes[first.inputs[0]] != g.shapes[conv.inputs[0]]
                or {first.inputs[0], conv.inputs[0]} & stacked):
            continue
        kernels = [_read(first.weights[0]), _read(conv.weights[0])]
        biases = [_kernel_and_bias(first)[1], _kernel_and_bias(conv)[1]]
        conv.weights = [np.concatenate(kernels, axis=0).astype(np.float32, copy=False),
                        (biases[0] + biases[1]).astype(np.float32)]
        conv.inputs = [first.inputs[0], conv.inputs[0]]
        conv.residual = None
        conv.folded = [first.name, *first.folded, *conv.folded]
        stacked |= set(conv.inputs)
        g.renamed[first.name] = conv.name
        g.layers.remove(first)
        g.resolve()


PASSES = (drop_identities, to_scale_shift, fold_padding, fold_into_producer, fold_into_consumer, fuse_add,
          fuse_activation, stack_shortcut)


def rewrite(layers, output, input_shape, passes=PASSES, take_weights=False):
    """Run ``passes`` over a copy of the layers; returns the new layers (topologically ordered) and output.

    ``take_weights`` empties the given layers' weight lists and lets the passes fold the kernels in
    place, so that the weights are never copied (one copy of the weights, not two).
    """
    g = Graph(layers, output, input_shape, take_weights)
    for step in passes:
        step(g)
    return g.layers, g.output
