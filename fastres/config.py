"""The Keras config parser: a model's JSON config -> graph layers, nested models flattened.

A Functional or Sequential model used as a layer (a transfer-learning base such as
``keras.applications.ResNet50``), at any depth, becomes its own layers named by their
path (``"resnet50/conv1_conv"``): its InputLayer reads what fed the model (and vanishes
in the rewrites) and whatever read the model reads its output layer.  Nothing from the
config is executed: every option is read as data and checked.
"""
import numpy as np

from .errors import ModelFormatError, UnsupportedLayerError
from .graph import ACTIVATION_KINDS, AFFINE_KINDS, IDENTITY_KINDS, Activation, Layer, layer_label
from .kerasfile import MODEL_CLASSES

SUPPORTED = (
    "InputLayer", "ZeroPadding2D", "Conv2D", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D",
    "GlobalMaxPooling2D", "Flatten", "Dense", "Add", *ACTIVATION_KINDS, *AFFINE_KINDS, *IDENTITY_KINDS,
)
ALIASES = {"Convolution2D": "Conv2D", "MaxPool2D": "MaxPooling2D", "AvgPool2D": "AveragePooling2D",
           "GlobalAvgPool2D": "GlobalAveragePooling2D", "GlobalMaxPool2D": "GlobalMaxPooling2D"}
# Activation names Keras writes, as fastres's Activation
ACTIVATIONS = {"linear": Activation(), "relu": Activation("relu"), "relu6": Activation("relu", max_value=6.0),
               "leaky_relu": Activation("relu", negative_slope=0.2), "sigmoid": Activation("sigmoid"),
               "tanh": Activation("tanh"), "softmax": Activation("softmax")}


def _where(name, scope, kind=None):
    return layer_label("/".join((*scope, name)), kind)


# ---------------------------------------------------------------- one layer's options

def _pair(where, key, value):
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ModelFormatError(f"{where}: {key} must be an int or a pair of ints, got {value!r}")


def _number(where, key, value, default):
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFormatError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def _activation(where, value):
    if isinstance(value, dict):  # a serialised activation object
        value = (value.get("config") or {}).get("name", value.get("class_name"))
    value = "linear" if value is None else value
    if value not in ACTIVATIONS:
        raise UnsupportedLayerError(f"{where}: activation {value!r} is not supported "
                                    f"(supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[value]


def _relu(where, cfg):
    """A ReLU layer's options (Keras 2 writes them as 0-d arrays, i.e. numbers)."""
    max_value = cfg.get("max_value")
    act = Activation("relu", None if max_value is None else _number(where, "max_value", max_value, None),
                     _number(where, "negative_slope", cfg.get("negative_slope"), 0.0),
                     _number(where, "threshold", cfg.get("threshold"), 0.0))
    if act.max_value is not None and act.max_value < 0 or act.negative_slope < 0:
        raise UnsupportedLayerError(f"{where}: max_value and negative_slope must not be negative")
    return act


def _last_axis(where, axis):
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
    if axis not in (-1, 3):
        raise UnsupportedLayerError(f"{where}: axis {axis!r} is not supported (-1 or 3, the channels)")
    return axis


def _channel_values(where, key, value):
    """A scalar or a per-channel list of numbers (Rescaling, Normalization), as a tuple; None stays None."""
    if isinstance(value, dict) and value.get("class_name") == "__numpy__":  # Keras's form of a numpy array
        value = (value.get("config") or {}).get("value")
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ModelFormatError(f"{where}: {key} must be a number or a list of numbers, got {value!r}") from None
    if any(d != 1 for d in array.shape[:-1]):
        raise UnsupportedLayerError(f"{where}: {key} of shape {array.shape} is not per-channel (last axis)")
    if not np.isfinite(array).all():
        raise ModelFormatError(f"{where}: {key} holds NaN or infinity")
    return tuple(array.reshape(-1).tolist())


def _channels_last(where, cfg):
    if cfg.get("data_format") not in (None, "channels_last"):
        raise UnsupportedLayerError(f"{where}: data_format {cfg['data_format']!r} is not supported; fastres runs "
                                    "channels_last (NHWC) models")


def _padding(where, cfg):
    padding = str(cfg.get("padding", "valid")).lower()
    if padding not in ("valid", "same"):
        raise UnsupportedLayerError(f"{where}: padding {padding!r} is not supported")
    return padding


def layer_attrs(where, kind, cfg):
    """The options of one layer, checked, as plain values."""
    if kind == "Conv2D":
        _channels_last(where, cfg)
        if _pair(where, "dilation_rate", cfg.get("dilation_rate", 1)) != (1, 1) or cfg.get("groups", 1) != 1:
            raise UnsupportedLayerError(f"{where}: dilation and groups are not supported")
        strides = _pair(where, "strides", cfg.get("strides", 1))
        if strides[0] != strides[1]:
            raise UnsupportedLayerError(f"{where}: unequal strides {strides} are not supported")
        return dict(filters=int(cfg["filters"]), kernel=_pair(where, "kernel_size", cfg["kernel_size"]),
                    stride=strides[0], padding=_padding(where, cfg), use_bias=bool(cfg.get("use_bias", True)),
                    activation=_activation(where, cfg.get("activation")))
    if kind == "Dense":
        return dict(units=int(cfg["units"]), use_bias=bool(cfg.get("use_bias", True)),
                    activation=_activation(where, cfg.get("activation")))
    if kind == "BatchNormalization":
        return dict(epsilon=float(cfg.get("epsilon", 1e-3)), center=bool(cfg.get("center", True)),
                    scale=bool(cfg.get("scale", True)), axis=_last_axis(where, cfg.get("axis", -1)))
    if kind == "Rescaling":
        return dict(scale=_channel_values(where, "scale", cfg.get("scale", 1.0)),
                    offset=_channel_values(where, "offset", cfg.get("offset", 0.0)))
    if kind == "Normalization":
        if cfg.get("invert"):
            raise UnsupportedLayerError(f"{where}: invert=True is not supported")
        mean, variance = (_channel_values(where, k, cfg.get(k)) for k in ("mean", "variance"))
        if (mean is None) != (variance is None):
            raise ModelFormatError(f"{where}: the config gives one of mean and variance without the other")
        return dict(axis=_last_axis(where, cfg.get("axis", -1)), mean=mean, variance=variance)
    if kind == "Activation":
        return dict(activation=_activation(where, cfg.get("activation")))
    if kind == "ReLU":
        return dict(activation=_relu(where, cfg))
    if kind == "LeakyReLU":
        slope = cfg.get("negative_slope", cfg.get("alpha"))
        return dict(activation=Activation("relu", negative_slope=_number(where, "negative_slope", slope, 0.3)))
    if kind == "Softmax":
        _last_axis(where, cfg.get("axis", -1))
        return dict(activation=Activation("softmax"))
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        _channels_last(where, cfg)
        pool = _pair(where, "pool_size", cfg.get("pool_size", 2))
        strides = cfg.get("strides")
        return dict(pool=pool, stride=pool if strides is None else _pair(where, "strides", strides),
                    padding=_padding(where, cfg))
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        _channels_last(where, cfg)
        return dict(keepdims=bool(cfg.get("keepdims", False)))
    if kind == "ZeroPadding2D":
        _channels_last(where, cfg)
        pad = cfg.get("padding", 1)
        if isinstance(pad, int):
            pad = ((pad, pad), (pad, pad))
        elif all(isinstance(p, int) for p in pad):
            pad = ((pad[0], pad[0]), (pad[1], pad[1]))
        (top, bottom), (left, right) = (_pair(where, "padding", p) for p in pad)
        return dict(pads=(top, bottom, left, right))
    return {}


# ---------------------------------------------------------------- connections

def _inbound(where, nodes):
    """(layer, node, tensor) references that feed one call of a layer, from either inbound_nodes form."""
    if not nodes:
        return []
    if len(nodes) > 1:
        raise UnsupportedLayerError(f"{where} is called {len(nodes)} times (a shared layer); not supported")
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
                found.append(item)  # Keras 2 form [layer, node, tensor, call kwargs such as training=False]
            else:
                for value in item:
                    walk(value)

    node = nodes[0]
    walk(node.get("args", []) if isinstance(node, dict) else node)
    return [tuple(h[:3]) for h in found]


def _input_shape(cfg):
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
    return None if shape is None else tuple(shape[1:])


def _single(body, key, what, label):
    """The one (layer, node, tensor) reference of a Functional model's input_layers or output_layers."""
    refs = body.get(key)
    if isinstance(refs, list) and refs and isinstance(refs[0], str):  # one reference, unwrapped
        refs = [refs]
    if not refs or not isinstance(refs[0], list) or len(refs[0]) < 3:
        raise ModelFormatError(f"{label} names no {what} layer")
    if len(refs) > 1:
        raise UnsupportedLayerError(f"{label} has {len(refs)} {what}s; fastres runs single-{what} models")
    return tuple(refs[0][:3])


class _Parser:
    """Flattens one config into ``layers``; a nested model recurses with a longer ``scope``."""

    def __init__(self):
        self.layers = []
        self.input_shape = None

    def model(self, config, scope=(), feed=None):
        """Add the layers of one model; ``feed`` is the graph name of what feeds it (None at the top).

        Returns the graph name of the model's output.  Keras lists layers in topological
        order, so every reference is to a layer already read.
        """
        kind = config.get("class_name")
        body = config.get("config") if isinstance(config.get("config"), dict) else {}
        entries = body.get("layers")
        label = f"model {'/'.join(scope)!r}" if scope else "the model"
        if kind not in MODEL_CLASSES or not isinstance(entries, list):
            raise UnsupportedLayerError(f"model class {kind!r} is not supported (Sequential or Functional models)")
        if kind != "Sequential":
            _single(body, "input_layers", "input", label)
        path = lambda name: "/".join((*scope, name))  # noqa: E731
        outputs = {}  # layer name -> graph name of its output
        previous = None
        if kind == "Sequential" and not any(e.get("class_name") == "InputLayer" for e in entries):
            first = (entries[0].get("config") or {}) if entries else {}
            shape = body.get("build_input_shape") or first.get("batch_input_shape")
            previous = self._input(path("input"), None if shape is None else tuple(shape[1:]), feed)
        for entry in entries:
            cfg = entry.get("config") or {}
            name = entry.get("name") or cfg.get("name")
            lkind = ALIASES.get(entry.get("class_name"), entry.get("class_name"))
            where = _where(name, scope, lkind)
            if kind == "Sequential":
                inputs = [] if lkind == "InputLayer" else [previous]
            else:
                inputs = [_resolve(ref, outputs, path, where) for ref in _inbound(where, entry.get("inbound_nodes"))]
            if lkind in MODEL_CLASSES:
                if len(inputs) != 1:
                    raise UnsupportedLayerError(f"{where} has {len(inputs)} inputs; fastres runs single-input models")
                outputs[name] = self.model(entry, (*scope, name), inputs[0])
            elif lkind == "InputLayer":
                outputs[name] = self._input(path(name), _input_shape(cfg), feed)
            else:
                _check_kind(_where(name, scope), lkind)
                key = f"{scope[0]}/{name}" if scope else name  # see kerasfile: (outermost model, layer)
                self.layers.append(Layer(path(name), lkind, inputs, layer_attrs(where, lkind, cfg), key=key))
                outputs[name] = path(name)
            previous = outputs[name]
        if kind == "Sequential":
            return previous
        return _resolve(_single(body, "output_layers", "output", label), outputs, path, label)

    def _input(self, name, shape, feed):
        """An InputLayer; in a nested model it reads ``feed`` (and vanishes in the rewrites)."""
        if feed is None and self.input_shape is None:
            self.input_shape = shape
        self.layers.append(Layer(name, "InputLayer", [] if feed is None else [feed]))
        return name


def _check_kind(where, kind):
    if kind == "Lambda":
        raise UnsupportedLayerError(f"{where} is a Lambda layer: fastres never runs code from a model file, so "
                                    "Lambda layers are refused")
    if kind not in SUPPORTED:
        raise UnsupportedLayerError(f"{where} has class {kind!r}, which fastres does not support (supported: "
                                    f"{', '.join(SUPPORTED)}, and nested Functional/Sequential models)")


def _resolve(ref, outputs, path, where):
    """Graph name of the tensor ``ref`` = (layer, node, tensor) in the model whose ``outputs`` are given."""
    name, node, tensor = ref
    if name not in outputs:
        raise ModelFormatError(f"{where} reads from {name!r}, which is not in the model")
    nested = outputs[name] != path(name)
    # a nested model is called once (checked); Keras 2 numbers that call 1, its node 0 being its construction
    if tensor != 0 or node != 0 and not nested:
        raise UnsupportedLayerError(f"{where} reads output {node}/{tensor} of {name!r}; only single-output, "
                                    "single-call layers are supported")
    return outputs[name]


def parse_config(config):
    """Layers (in topological order) and the input shape (H, W, C; H and W may be None)."""
    if not isinstance(config, dict) or "class_name" not in config:
        raise ModelFormatError("the model config is not a Keras model config")
    parser = _Parser()
    output = parser.model(config)
    input_shape = parser.input_shape
    if input_shape is None or len(input_shape) != 3:
        raise UnsupportedLayerError(f"the model's input shape {input_shape} is not an image batch (N, H, W, C)")
    if input_shape[2] is None:
        raise ModelFormatError("the model's input has no channel count")
    return _ordered(parser.layers, output), input_shape


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
