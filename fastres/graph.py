"""The layer graph: a Keras config parsed into layers, checked, shape-inferred and rewritten.

Rewrites (``fuse``): a BatchNormalization is folded into the Conv2D or Dense before it,
ZeroPadding2D into the convolution after it, an Add into the convolution that feeds it
(as the residual added while storing), a ReLU into whatever produces its input, and
identity layers (linear Activation, InputLayer) disappear.
"""
from dataclasses import dataclass, field

import numpy as np

from . import kernels as K
from .errors import ModelFormatError, UnsupportedLayerError

ACTIVATIONS = ("linear", "relu", "softmax")
SUPPORTED = (
    "InputLayer", "ZeroPadding2D", "Conv2D", "BatchNormalization", "Activation", "ReLU", "MaxPooling2D",
    "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten", "Dense", "Add",
)
ALIASES = {"Convolution2D": "Conv2D", "MaxPool2D": "MaxPooling2D", "AvgPool2D": "AveragePooling2D",
           "GlobalAvgPool2D": "GlobalAveragePooling2D", "GlobalMaxPool2D": "GlobalMaxPooling2D"}


@dataclass
class Layer:
    """One layer (later: one fused operation) of the graph."""

    name: str
    kind: str
    inputs: list
    attrs: dict = field(default_factory=dict)
    weights: list = field(default_factory=list)
    activation: str = None            # applied to the output: "linear", "relu" or "softmax"
    residual: str | None = None       # Conv2D/Dense: a value added before the activation
    pads: tuple = (0, 0, 0, 0)        # Conv2D: extra zeros (top, bottom, left, right) from a ZeroPadding2D
    folded: list = field(default_factory=list)  # names of the layers merged into this one

    def __post_init__(self):
        if self.activation is None:  # an Activation/ReLU layer's own activation is its operation, not a fusion
            own = self.kind not in ("Activation", "ReLU")
            self.activation = self.attrs.get("activation", "linear") if own else "linear"


# ---------------------------------------------------------------- parsing the config

def _pair(layer, key, value):
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ModelFormatError(f"layer {layer!r}: {key} must be an int or a pair of ints, got {value!r}")


def _activation(name, kind, value):
    if isinstance(value, dict):  # a serialised activation object
        value = (value.get("config") or {}).get("name", value.get("class_name"))
    value = "linear" if value in (None, "linear") else value
    if value not in ACTIVATIONS:
        raise UnsupportedLayerError(f"layer {name!r} ({kind}): activation {value!r} is not supported "
                                    f"(supported: {', '.join(ACTIVATIONS)})")
    return value


def _channels_last(name, kind, cfg):
    if cfg.get("data_format") not in (None, "channels_last"):
        raise UnsupportedLayerError(f"layer {name!r} ({kind}): data_format {cfg['data_format']!r} is not "
                                    "supported; fastres runs channels_last (NHWC) models")


def _padding(name, kind, cfg):
    padding = str(cfg.get("padding", "valid")).lower()
    if padding not in ("valid", "same"):
        raise UnsupportedLayerError(f"layer {name!r} ({kind}): padding {padding!r} is not supported")
    return padding


def _layer_attrs(name, kind, cfg):
    """The options of one layer, checked, as plain values."""
    if kind == "Conv2D":
        _channels_last(name, kind, cfg)
        if _pair(name, "dilation_rate", cfg.get("dilation_rate", 1)) != (1, 1) or cfg.get("groups", 1) != 1:
            raise UnsupportedLayerError(f"layer {name!r} (Conv2D): dilation and groups are not supported")
        strides = _pair(name, "strides", cfg.get("strides", 1))
        if strides[0] != strides[1]:
            raise UnsupportedLayerError(f"layer {name!r} (Conv2D): unequal strides {strides} are not supported")
        return dict(filters=int(cfg["filters"]), kernel=_pair(name, "kernel_size", cfg["kernel_size"]),
                    stride=strides[0], padding=_padding(name, kind, cfg), use_bias=bool(cfg.get("use_bias", True)),
                    activation=_activation(name, kind, cfg.get("activation")))
    if kind == "Dense":
        return dict(units=int(cfg["units"]), use_bias=bool(cfg.get("use_bias", True)),
                    activation=_activation(name, kind, cfg.get("activation")))
    if kind == "BatchNormalization":
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if axis not in (-1, 3):
            raise UnsupportedLayerError(f"layer {name!r} (BatchNormalization): axis {axis!r} is not supported (-1 or 3)")
        return dict(epsilon=float(cfg.get("epsilon", 1e-3)), center=bool(cfg.get("center", True)),
                    scale=bool(cfg.get("scale", True)), axis=axis)
    if kind == "Activation":
        return dict(activation=_activation(name, kind, cfg.get("activation")))
    if kind == "ReLU":
        if cfg.get("max_value") is not None or cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
            raise UnsupportedLayerError(f"layer {name!r} (ReLU): max_value, negative_slope and threshold are not supported")
        return dict(activation="relu")
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        _channels_last(name, kind, cfg)
        pool = _pair(name, "pool_size", cfg.get("pool_size", 2))
        strides = cfg.get("strides")
        return dict(pool=pool, stride=pool if strides is None else _pair(name, "strides", strides),
                    padding=_padding(name, kind, cfg))
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        _channels_last(name, kind, cfg)
        return dict(keepdims=bool(cfg.get("keepdims", False)))
    if kind == "ZeroPadding2D":
        _channels_last(name, kind, cfg)
        pad = cfg.get("padding", 1)
        if isinstance(pad, int):
            pad = ((pad, pad), (pad, pad))
        elif all(isinstance(p, int) for p in pad):
            pad = ((pad[0], pad[0]), (pad[1], pad[1]))
        (top, bottom), (left, right) = (_pair(name, "padding", p) for p in pad)
        return dict(pads=(top, bottom, left, right))
    return {}


def _inbound(name, nodes):
    """Names of the layers that feed ``name``, from either inbound_nodes form."""
    if not nodes:
        return []
    if len(nodes) > 1:
        raise UnsupportedLayerError(f"layer {name!r} is called {len(nodes)} times (a shared layer); not supported")
    node = nodes[0]
    found = []

    def walk(item):
        if isinstance(item, dict):
            history = (item.get("config") or {}).get("keras_history")
            if item.get("class_name") == "__keras_tensor__" and history:
                found.append(history)
                return
            for value in item.values():
                walk(value)
        elif isinstance(item, list):
            if len(item) >= 3 and isinstance(item[0], str) and isinstance(item[1], int):
                found.append(item)  # old form [layer, node, tensor, kwargs]
            else:
                for value in item:
                    walk(value)

    walk(node.get("args", []) if isinstance(node, dict) else node)
    for history in found:
        if history[1] != 0 or history[2] != 0:
            raise UnsupportedLayerError(f"layer {name!r} reads output {history[1]}/{history[2]} of "
                                        f"{history[0]!r}; only single-output layers are supported")
    return [h[0] for h in found]


def _input_shape(cfg):
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
    if shape is None:
        return None
    return tuple(shape[1:])


def parse_config(config):
    """Layers (in topological order) and the input shape (H, W, C; H and W may be None)."""
    if not isinstance(config, dict) or "class_name" not in config:
        raise ModelFormatError("the model config is not a Keras model config")
    kind = config["class_name"]
    body = config.get("config") or {}
    entries = body.get("layers") if isinstance(body, dict) else None
    if kind not in ("Functional", "Model", "Sequential") or not isinstance(entries, list):
        raise UnsupportedLayerError(f"model class {kind!r} is not supported (Sequential or Functional models)")
    layers, input_shape, previous = [], None, None
    for entry in entries:
        cfg = entry.get("config") or {}
        name = entry.get("name") or cfg.get("name")
        lkind = ALIASES.get(entry.get("class_name"), entry.get("class_name"))
        if lkind == "Lambda":
            raise UnsupportedLayerError(f"layer {name!r} is a Lambda layer: fastres never runs code from a model "
                                        "file, so Lambda layers are refused")
        if lkind not in SUPPORTED:
            raise UnsupportedLayerError(f"layer {name!r} has class {lkind!r}, which fastres does not support "
                                        f"(supported: {', '.join(SUPPORTED)})")
        if kind == "Sequential":
            inputs = [] if lkind == "InputLayer" or previous is None else [previous]
            if input_shape is None:
                input_shape = _input_shape(cfg) or (tuple(body["build_input_shape"][1:]) if body.get("build_input_shape") else None)
        else:
            inputs = _inbound(name, entry.get("inbound_nodes"))
        if lkind == "InputLayer":
            input_shape = _input_shape(cfg)
        layers.append(Layer(name, lkind, inputs, _layer_attrs(name, lkind, cfg)))
        previous = name
    if kind != "Sequential":
        outputs = body.get("output_layers")
        if outputs and isinstance(outputs[0], list) and len(outputs) > 1:
            raise UnsupportedLayerError(f"models with {len(outputs)} outputs are not supported")
        inputs = body.get("input_layers")
        if inputs and isinstance(inputs[0], list) and len(inputs) > 1:
            raise UnsupportedLayerError(f"models with {len(inputs)} inputs are not supported")
        output = outputs[0][0] if outputs and isinstance(outputs[0], list) else (outputs[0] if outputs else None)
        if output is None:
            raise ModelFormatError("the model config names no output layer")
        layers = _ordered(layers, output)
    if input_shape is None or len(input_shape) != 3:
        raise UnsupportedLayerError(f"the model's input shape {input_shape} is not an image batch (N, H, W, C)")
    if input_shape[2] is None:
        raise ModelFormatError("the model's input has no channel count")
    return layers, input_shape


def _ordered(layers, output):
    """Topological order of the layers the output depends on; checks every reference."""
    by_name = {layer.name: layer for layer in layers}
    if output not in by_name:
        raise ModelFormatError(f"the output layer {output!r} is not among the layers")
    order, state = [], {}

    def visit(name, child):
        if name not in by_name:
            raise ModelFormatError(f"layer {child!r} reads from {name!r}, which is not in the model")
        if state.get(name) == 1:
            raise ModelFormatError(f"the layer graph has a cycle through {name!r}")
        if state.get(name) == 2:
            return
        state[name] = 1
        for parent in by_name[name].inputs:
            visit(parent, name)
        state[name] = 2
        order.append(by_name[name])

    visit(output, output)
    return order


# ---------------------------------------------------------------- weights and shapes

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
    return []


def attach_weights(layers, weights, input_shape):
    """Give each layer its arrays from ``weights`` (name -> list), checking count and shapes."""
    shapes = infer_shapes(layers, input_shape)
    for layer in layers:
        in_shape = shapes[layer.inputs[0]] if layer.inputs else input_shape
        expected = _expected_weights(layer, in_shape)
        arrays = weights.get(layer.name, [])
        if not expected:
            continue
        if layer.name not in weights:
            raise ModelFormatError(f"layer {layer.name!r} ({layer.kind}) has no weights in the file")
        if len(arrays) != len(expected):
            raise ModelFormatError(f"layer {layer.name!r} ({layer.kind}) has {len(arrays)} weights in the file, "
                                   f"expected {len(expected)} ({', '.join(n for n, _ in expected)})")
        for (wname, shape), array in zip(expected, arrays):
            if array.shape != shape:
                raise ModelFormatError(f"layer {layer.name!r} ({layer.kind}): {wname} has shape {array.shape}, "
                                       f"expected {shape}")
            if not np.isfinite(array).all():
                raise ModelFormatError(f"layer {layer.name!r} ({layer.kind}): {wname} holds NaN or infinity")
        layer.weights = list(arrays)
    return shapes


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
            raise ModelFormatError(f"layer {layer.name!r} ({kind}) needs an image input, got shape {x}")
        if kind == "Conv2D":
            h, w, _ = x
            t, b, l, r = layer.pads
            h = None if h is None else h + t + b
            w = None if w is None else w + l + r
            (kh, kw), s = a["kernel"], a["stride"]
            out = (_spatial(h, kh, s, a["padding"], layer.name), _spatial(w, kw, s, a["padding"], layer.name), a["filters"])
        elif kind in ("MaxPooling2D", "AveragePooling2D"):
            (ph, pw), (sh, sw) = a["pool"], a["stride"]
            out = (_spatial(x[0], ph, sh, a["padding"], layer.name), _spatial(x[1], pw, sw, a["padding"], layer.name), x[2])
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
                raise ModelFormatError(f"layer {layer.name!r} (Add) joins inputs of shapes {ins}")
            out = ins[0]
        else:  # InputLayer, BatchNormalization, Activation, ReLU
            out = x
        if layer.residual is not None and shapes[layer.residual] != out:
            raise ModelFormatError(f"layer {layer.name!r}: residual of shape {shapes[layer.residual]} for output {out}")
        shapes[layer.name] = out
    return shapes


# ---------------------------------------------------------------- rewrites

def batch_norm_weights(layer):
    """(gamma, beta, mean, var) of a BatchNormalization layer; gamma/beta are None when Keras stores none."""
    w = iter(layer.weights)
    gamma = next(w) if layer.attrs["scale"] else None
    beta = next(w) if layer.attrs["center"] else None
    return gamma, beta, next(w), next(w)


def _consumers(layers):
    count = {}
    for layer in layers:
        for name in layer.inputs + ([layer.residual] if layer.residual else []):
            count[name] = count.get(name, 0) + 1
    return count


def fuse(layers, output):
    """Fold, fuse and drop layers; returns the new list (topologically ordered) and the output name."""
    layers = [Layer(l.name, l.kind, list(l.inputs), dict(l.attrs), list(l.weights), l.activation) for l in layers]
    rename = {}

    def source(name):
        while name in rename:
            name = rename[name]
        return name

    def remove(layer):
        rename[layer.name] = layer.inputs[0]
        layers.remove(layer)

    def single_producer(layer, kinds):
        """The layer that feeds ``layer``, if it is one of ``kinds`` and feeds nothing else."""
        producer = by_name.get(source(layer.inputs[0])) if len(layer.inputs) == 1 else None
        if producer is None or producer.kind not in kinds or _consumers(layers).get(producer.name) != 1:
            return None
        return producer if producer.name != output else None

    for step in ("identity", "pad", "fold", "add", "activation"):
        by_name = {layer.name: layer for layer in layers}
        for layer in list(layers):
            layer.inputs = [source(i) for i in layer.inputs]
            layer.residual = layer.residual and source(layer.residual)
            if step == "identity" and (layer.kind == "InputLayer" and layer.inputs or
                                        layer.kind == "Activation" and layer.attrs["activation"] == "linear"):
                remove(layer)
            elif step == "pad" and layer.kind == "Conv2D":
                pad = single_producer(layer, ("ZeroPadding2D",))
                if pad is not None:
                    layer.pads = pad.attrs["pads"]
                    layer.inputs = list(pad.inputs)
                    layer.folded.append(pad.name)
                    layers.remove(pad)
            elif step == "fold" and layer.kind == "BatchNormalization":
                conv = single_producer(layer, ("Conv2D", "Dense"))
                if conv is not None and conv.activation == "linear":
                    kernel = conv.weights[0]
                    bias = conv.weights[1] if len(conv.weights) > 1 else None
                    conv.weights = list(K.fold_batch_norm(kernel, bias, *batch_norm_weights(layer),
                                                          layer.attrs["epsilon"]))
                    conv.folded.append(layer.name)
                    remove(layer)
            elif step == "add" and layer.kind == "Add" and len(layer.inputs) == 2:
                for i, name in enumerate(layer.inputs):
                    conv = by_name.get(name)
                    other = layer.inputs[1 - i]
                    if (conv is not None and conv.kind == "Conv2D" and conv.activation == "linear"
                            and conv.residual is None and _consumers(layers).get(conv.name) == 1
                            and conv.name != output and other != conv.name):
                        conv.residual = other
                        conv.activation = layer.activation
                        conv.folded.append(layer.name)
                        # the conv now runs where the Add ran: after both of its inputs
                        layers.remove(conv)
                        layers[layers.index(layer)] = conv
                        rename[layer.name] = conv.name
                        break
            elif step == "activation" and layer.kind in ("Activation", "ReLU"):
                producer = single_producer(layer, ("Conv2D", "Dense", "BatchNormalization", "Add"))
                if producer is not None and producer.activation == "linear":
                    producer.activation = layer.attrs["activation"]
                    producer.folded.append(layer.name)
                    remove(layer)
        output = source(output)
    for layer in layers:
        layer.inputs = [source(i) for i in layer.inputs]
        layer.residual = layer.residual and source(layer.residual)
    return layers, output
