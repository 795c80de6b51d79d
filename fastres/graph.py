"""The layer graph: layers with their options, output shapes, and weights checked against them.

A graph is a list of ``Layer`` in topological order; ``config`` builds it from a Keras
config (nested models flattened), ``architectures`` from a known layout, ``rewrites``
folds and fuses it, and ``model`` plans and runs it.
"""
from dataclasses import dataclass, field

import numpy as np

from . import limits
from .errors import ModelFormatError

# Layers that are the identity at inference (their randomness or penalty acts only in training).
IDENTITY_KINDS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
                  "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity")
ACTIVATION_KINDS = ("Activation", "ReLU", "LeakyReLU", "Softmax")
AFFINE_KINDS = ("BatchNormalization", "Rescaling", "Normalization")  # per-channel y = x * scale + shift


@dataclass(frozen=True)
class Activation:
    """An elementwise activation: ``kind`` "linear", "relu", "sigmoid", "tanh" or "softmax" (last axis).

    A "relu" follows Keras's ``relu(x, negative_slope, max_value, threshold)``.
    """

    kind: str = "linear"
    max_value: float | None = None
    negative_slope: float = 0.0
    threshold: float = 0.0

    @property
    def linear(self):
        return self.kind == "linear"

    @property
    def plain_relu(self):
        """max(x, 0): the form the convolution, add and scale-shift kernels apply while storing."""
        return self.kind == "relu" and self.max_value is None and not self.negative_slope and not self.threshold

    def __str__(self):
        if self.kind != "relu" or self.plain_relu:
            return self.kind
        if self.max_value == 6 and not self.negative_slope and not self.threshold:
            return "relu6"
        if self.max_value is None and not self.threshold:
            return f"leaky_relu({self.negative_slope:g})"
        options = {"max_value": self.max_value, "negative_slope": self.negative_slope, "threshold": self.threshold}
        return "relu(" + ", ".join(f"{k}={v:g}" for k, v in options.items() if v or k == "max_value" and v is not None) + ")"


LINEAR = Activation()


@dataclass
class Layer:
    """One layer (later: one fused operation) of the graph.

    A layer of a nested model is named by its path, ``"resnet50/conv1_conv"``; ``key`` is
    where its weights sit in the file (see ``kerasfile``), by default its name.
    """

    name: str
    kind: str
    inputs: list
    attrs: dict = field(default_factory=dict)
    weights: list = field(default_factory=list)
    activation: Activation = None     # applied to the output
    residual: str | None = None       # Conv2D/Dense: a value added before the activation
    pads: tuple = (0, 0, 0, 0)        # Conv2D, "valid" pooling: zeros (top, bottom, left, right) of a ZeroPadding2D
    folded: list = field(default_factory=list)  # names of the layers merged into this one
    key: str = None

    def __post_init__(self):
        if self.key is None:
            self.key = self.name
        if isinstance(self.attrs.get("activation"), str):  # architectures name them
            self.attrs["activation"] = Activation(self.attrs["activation"])
        if isinstance(self.activation, str):
            self.activation = Activation(self.activation)
        if self.activation is None:  # an activation layer's own activation is its operation, not a fusion
            own = self.kind not in ACTIVATION_KINDS
            self.activation = self.attrs.get("activation", LINEAR) if own else LINEAR

    @property
    def where(self):
        return layer_label(self.name, self.kind)


def layer_label(path, kind=None):
    """How messages name a layer: ``layer 'c1' (Conv2D) in model 'resnet50'`` for ``resnet50/c1``."""
    scope, _, own = path.rpartition("/")
    return f"layer {own!r}" + (f" ({kind})" if kind else "") + (f" in model {scope!r}" if scope else "")


# ---------------------------------------------------------------- weights

def _expected_weights(layer, in_shape):
    """(name, shape) of each weight Keras stores for this layer, in order."""
    a, cin = layer.attrs, in_shape[-1]
    if layer.kind == "Conv2D":
        found = [("kernel", (*a["kernel"], cin, a["filters"]))]
        return found + ([("bias", (a["filters"],))] if a["use_bias"] else [])
    if layer.kind == "Dense":
        return [("kernel", (cin, a["units"]))] + ([("bias", (a["units"],))] if a["use_bias"] else [])
    if layer.kind == "BatchNormalization":
        names = (["gamma"] if a["scale"] else []) + (["beta"] if a["center"] else []) + ["moving_mean", "moving_variance"]
        return [(n, (cin,)) for n in names]
    if layer.kind == "Normalization" and a["mean"] is None:  # adapted: the statistics are weights
        return [("mean", (cin,)), ("variance", (cin,)), ("count", ())]
    return []


def attach_weights(layers, weights, input_shape, limit=None):
    """Give each layer its arrays from ``weights`` (key -> list of ``kerasfile.StoredArray`` or arrays).

    Every count and shape is checked against the config, and the total against ``limit``
    bytes (default: ``limits.memory_limit()``), before any array is read.
    """
    shapes = infer_shapes(layers, input_shape)
    found, total = [], 0
    for layer in layers:
        in_shape = shapes[layer.inputs[0]] if layer.inputs else input_shape
        expected = _expected_weights(layer, in_shape)
        if not expected:
            continue
        if layer.key not in weights:
            raise ModelFormatError(f"{layer.where} has no weights in the file")
        arrays = weights[layer.key]
        if len(arrays) != len(expected):
            raise ModelFormatError(f"{layer.where} has {len(arrays)} weights in the file, "
                                   f"expected {len(expected)} ({', '.join(n for n, _ in expected)})")
        for (wname, shape), array in zip(expected, arrays):
            if tuple(array.shape) != shape:
                raise ModelFormatError(f"{layer.where}: {wname} has shape {tuple(array.shape)}, expected {shape}")
            total += 4 * int(np.prod(shape, dtype=object))
        found.append((layer, expected, arrays))
    limit = limits.memory_limit() if limit is None else limit
    if total > limit:
        raise ModelFormatError(f"the weights need {limits.human(total)}, over the memory limit of {limits.human(limit)}")
    for layer, expected, arrays in found:
        layer.weights = [StoredKernel(array, f"{layer.where}: {wname}")
                         if wname == "kernel" and hasattr(array, "reader") and array.size
                         else array.read() if hasattr(array, "read") else np.asarray(array, np.float32)
                         for (wname, _), array in zip(expected, arrays)]
        for (wname, _), array in zip(expected, layer.weights):
            if isinstance(array, StoredKernel):
                continue  # checked as it is read, when it is packed
            if not _all_finite(array):
                raise ModelFormatError(f"{layer.where}: {wname} holds NaN or infinity")
            if wname in ("moving_variance", "variance") and (array < 0).any():
                raise ModelFormatError(f"{layer.where}: {wname} holds negative values")
    return shapes


class StoredKernel:
    """A Conv2D or Dense kernel left in the file until the model packs it, straight into its panels.

    ``stored`` is the file's dataset (``kerasfile.StoredArray``, shape checked); ``scales`` are the
    per-output-channel float32 factors folded into the kernel since (batch-norms after the
    convolution), applied in order to the packed weights: the same float32 products as on the
    kernel itself.  ``read()`` gives the folded (KH, KW, Cin, Cout) or (Cin, Cout) array, for a
    fold that needs the kernel as it is (``rewrites.fold_into_consumer``).
    """

    def __init__(self, stored, where, scales=()):
        self.stored, self.where, self.scales = stored, where, tuple(scales)
        self.shape, self.ndim, self.size, self.nbytes = stored.shape, stored.ndim, stored.size, stored.nbytes
        self.dtype = np.dtype(np.float32)

    def scaled(self, scale):
        """This kernel times ``scale`` (float32 (Cout,)), still unread."""
        return StoredKernel(self.stored, self.where, (*self.scales, scale))

    def check(self, array):
        """Raise ModelFormatError when ``array`` (this kernel as read, before scaling) holds NaN or infinity."""
        if not _all_finite(array):
            raise ModelFormatError(f"{self.where} holds NaN or infinity")

    def read(self):
        array = self.stored.read()
        self.check(array)
        for scale in self.scales:
            array *= scale
        return array


def _all_finite(array):
    """True when ``array`` holds no NaN or infinity.

    One pass and no temporary: any NaN or infinity makes the sum NaN or infinite; a finite
    array whose sum overflows is checked value by value.
    """
    with np.errstate(all="ignore"):
        total = np.add.reduce(array, axis=None)
    return bool(np.isfinite(total)) or bool(np.isfinite(array).all())


def batch_norm_weights(layer):
    """(gamma, beta, mean, var) of a BatchNormalization layer; gamma/beta are None when Keras stores none."""
    w = iter(layer.weights)
    gamma = next(w) if layer.attrs["scale"] else None
    beta = next(w) if layer.attrs["center"] else None
    return gamma, beta, next(w), next(w)


# ---------------------------------------------------------------- shapes

def _spatial(size, kernel, stride, padding, name):
    if size is None:
        return None
    if padding == "same":
        return -(-size // stride)
    if size < kernel:
        raise ValueError(f"layer {name!r}: its input is {size} pixels wide, smaller than its {kernel}-pixel window")
    return (size - kernel) // stride + 1


def infer_shapes(layers, input_shape):
    """Output shape (without the batch axis) of every layer; spatial sizes may be None.

    Raises ValueError naming the layer when the input is too small, and
    ModelFormatError when layers do not fit together.
    """
    shapes = {}
    for layer in layers:
        ins = [shapes[i] for i in layer.inputs]
        x = ins[0] if ins else tuple(input_shape)
        a, kind = layer.attrs, layer.kind
        if kind in ("Conv2D", "MaxPooling2D", "AveragePooling2D", "ZeroPadding2D", "GlobalAveragePooling2D",
                    "GlobalMaxPooling2D") and len(x) != 3:
            raise ModelFormatError(f"{layer.where} needs an image input, got shape {x}")
        if kind == "Conv2D":
            if any(s != x for s in ins[1:]):  # two stacked inputs (``rewrites.stack_shortcut``)
                raise ModelFormatError(f"{layer.where} stacks inputs of shapes {ins}")
            h, w, _ = x
            t, b, l, r = layer.pads
            h = None if h is None else h + t + b
            w = None if w is None else w + l + r
            (kh, kw), s = a["kernel"], a["stride"]
            out = (_spatial(h, kh, s, a["padding"], layer.name), _spatial(w, kw, s, a["padding"], layer.name), a["filters"])
        elif kind in ("MaxPooling2D", "AveragePooling2D"):
            (ph, pw), (sh, sw) = a["pool"], a["stride"]
            t, b, l, r = layer.pads  # a ZeroPadding2D folded in (``rewrites.fold_padding``)
            h = None if x[0] is None else x[0] + t + b
            w = None if x[1] is None else x[1] + l + r
            out = (_spatial(h, ph, sh, a["padding"], layer.name), _spatial(w, pw, sw, a["padding"], layer.name), x[2])
        elif kind == "ZeroPadding2D":
            t, b, l, r = a["pads"]
            out = (None if x[0] is None else x[0] + t + b, None if x[1] is None else x[1] + l + r, x[2])
        elif kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            out = (1, 1, x[2]) if a["keepdims"] else (x[2],)
        elif kind == "Flatten":
            out = (None,) if any(d is None for d in x) else (int(np.prod(x)),)
        elif kind == "Dense":
            out = (*x[:-1], a["units"])
        elif kind == "Add":
            if len(ins) < 2 or any(s != ins[0] for s in ins):
                raise ModelFormatError(f"{layer.where} joins inputs of shapes {ins}")
            out = ins[0]
        else:  # InputLayer, per-channel affine layers, activations, identities
            out = x
        if layer.residual is not None and shapes[layer.residual] != out:
            raise ModelFormatError(f"{layer.where}: residual of shape {shapes[layer.residual]} for output {out}")
        shapes[layer.name] = out
    return shapes
