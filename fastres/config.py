"""The Keras config parser: a model's JSON config -> graph layers, nested models flattened.

A Functional or Sequential model used as a layer (a transfer-learning base such as
``keras.applications.ResNet50``), at any depth, becomes its own layers named by their
path (``"resnet50/conv1_conv"``): its InputLayer reads what fed the model (and vanishes
in the rewrites) and whatever read the model reads its output layer.  Nothing from the
config is executed: every option is read as data and checked.
"""
import numpy as np

from . import limits
from .errors import FastresError, ModelFormatError, UnsupportedLayerError
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

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _int(where, key, value, low=1, high=limits.MAX_SIZE):
    """An int option in ``low .. high``."""
    if not _is_int(value) or not low <= value <= high:
        raise ModelFormatError(f"{where}: {key} must be an int from {low} to {high}, got {_short(value)}")
    return value


def _pair(where, key, value, low=1, high=limits.MAX_SIZE):
    """An int or a pair of ints option, each in ``low .. high``, as a pair."""
    if _is_int(value):
        value = (value, value)
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise ModelFormatError(f"{where}: {key} must be an int or a pair of ints, got {_short(value)}")
    return tuple(_int(where, key, v, low, high) for v in value)


def _short(value, width=80):
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


def _number(where, key, value, default, low=-np.inf):
    """A finite number option, at least ``low``."""
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < low:
        bound = "" if low == -np.inf else f" of at least {low:g}"
        raise ModelFormatError(f"{where}: {key} must be a finite number{bound}, got {_short(value)}")
    return float(value)


def _activation(where, value):
    if isinstance(value, dict):  # a serialised activation object
        value = (value.get("config") or {}).get("name", value.get("class_name"))
    value = "linear" if value is None else value
    if not isinstance(value, str) or value not in ACTIVATIONS:
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
        return dict(filters=_int(where, "filters", cfg.get("filters"), 1, limits.MAX_CHANNELS),
                    kernel=_pair(where, "kernel_size", cfg.get("kernel_size")),
                    stride=strides[0], padding=_padding(where, cfg), use_bias=bool(cfg.get("use_bias", True)),
                    activation=_activation(where, cfg.get("activation")))
    if kind == "Dense":
        return dict(units=_int(where, "units", cfg.get("units"), 1, limits.MAX_CHANNELS), use_bias=bool(cfg.get("use_bias", True)),
                    activation=_activation(where, cfg.get("activation")))
    if kind == "BatchNormalization":
        return dict(epsilon=_number(where, "epsilon", cfg.get("epsilon"), 1e-3, low=0.0), center=bool(cfg.get("center", True)),
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
        if _is_int(pad):
            pad = ((pad, pad), (pad, pad))
        elif isinstance(pad, (list, tuple)) and all(_is_int(p) for p in pad):
            pad = [(p, p) for p in pad]
        if not isinstance(pad, (list, tuple)) or len(pad) != 2:
            raise ModelFormatError(f"{where}: padding must be an int, a pair, or two pairs of ints, got {_short(pad)}")
        (top, bottom), (left, right) = (_pair(where, "padding", p, low=0) for p in pad)
        return dict(pads=(top, bottom, left, right))
    return {}


# ---------------------------------------------------------------- connections

def _reference(where, ref):
    """A (layer, node, tensor) reference, checked."""
    if (not isinstance(ref, (list, tuple)) or len(ref) < 3 or not isinstance(ref[0], str)
            or not _is_int(ref[1]) or not _is_int(ref[2])):
        raise ModelFormatError(f"{where}: {_short(ref)} is not a (layer, node, tensor) reference")
    return tuple(ref[:3])


def _inbound(where, nodes):
    """(layer, node, tensor) references that feed one call of a layer, from either inbound_nodes form."""
    if not nodes:
        return []
    if not isinstance(nodes, list):
        raise ModelFormatError(f"{where}: inbound_nodes must be a list, got {_short(nodes)}")
    if len(nodes) > 1:
        raise UnsupportedLayerError(f"{where} is called {len(nodes)} times (a shared layer); not supported")
    found, pending = [], [nodes[0].get("args", []) if isinstance(nodes[0], dict) else nodes[0]]
    while pending:  # depth-first, in order
        item = pending.pop()
        if isinstance(item, dict):
            history = (item.get("config") or {}).get("keras_history") if isinstance(item.get("config"), dict) else None
            if item.get("class_name") == "__keras_tensor__" and history:
                found.append(history)
            else:
                pending.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            if len(item) >= 3 and isinstance(item[0], str) and _is_int(item[1]):
                found.append(item)  # Keras 2 form [layer, node, tensor, call kwargs such as training=False]
            else:
                pending.extend(reversed(item))
    return [_reference(where, h) for h in found]


def _input_shape(where, cfg):
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
    if shape is None:
        return None
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 8:
        raise ModelFormatError(f"{where}: batch_shape must be a list, got {_short(shape)}")
    for size in shape[1:]:
        if size is not None:
            _int(where, "batch_shape", size, 1, limits.MAX_CHANNELS)
    return tuple(shape[1:])


def _single(body, key, what, label):
    """The one (layer, node, tensor) reference of a Functional model's input_layers or output_layers."""
    refs = body.get(key)
    if isinstance(refs, list) and refs and isinstance(refs[0], str):  # one reference, unwrapped
        refs = [refs]
    if not isinstance(refs, list) or not refs or not isinstance(refs[0], list) or len(refs[0]) < 3:
        raise ModelFormatError(f"{label} names no {what} layer")
    if len(refs) > 1:
        raise UnsupportedLayerError(f"{label} has {len(refs)} {what}s; fastres runs single-{what} models")
    return _reference(f"{label}: {key}", refs[0])


def _entry(entry, scope):
    """(name, kind, config) of one layer entry, checked to be data of the right types."""
    if not isinstance(entry, dict):
        raise ModelFormatError(f"{'model ' + repr('/'.join(scope)) if scope else 'the model'} lists a layer that is "
                               f"{_short(entry)}, not an object")
    cfg = entry.get("config", {})
    cfg = {} if cfg is None else cfg
    name = entry.get("name") or (cfg.get("name") if isinstance(cfg, dict) else None)
    kind = entry.get("class_name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ModelFormatError(f"a layer entry in {scope or 'the model'} has no valid name ({_short(name)})")
    if not isinstance(kind, str) or not isinstance(cfg, dict):
        raise ModelFormatError(f"{_where(name, scope)}: class_name must be text and config an object")
    return name, ALIASES.get(kind, kind), cfg


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
            raise UnsupportedLayerError(f"model class {_short(kind)} is not supported (Sequential or Functional models)")
        if len(scope) > limits.MAX_NESTED_MODELS:
            raise ModelFormatError(f"{label} nests models more than {limits.MAX_NESTED_MODELS} deep")
        if len(self.layers) + len(entries) > limits.MAX_LAYERS:
            raise ModelFormatError(f"the model has more than {limits.MAX_LAYERS} layers")
        model_input = None if kind == "Sequential" else _single(body, "input_layers", "input", label)[0]
        path = lambda name: "/".join((*scope, name))  # noqa: E731
        outputs = {}  # layer name -> graph name of its output
        previous = None
        parsed = [_entry(e, scope) for e in entries]
        if kind == "Sequential" and not any(k == "InputLayer" for _, k, _ in parsed):
            first = parsed[0][2] if parsed else {}
            shape = body.get("build_input_shape") or first.get("batch_input_shape")
            previous = self._input(path("input"), _input_shape(label, {"batch_shape": shape}), feed)
        for i, ((name, lkind, cfg), entry) in enumerate(zip(parsed, entries)):
            where = _where(name, scope, lkind)
            if name in outputs:
                raise ModelFormatError(f"{label} has two layers named {name!r}")
            if kind == "Sequential":
                inputs = [] if lkind == "InputLayer" else [previous]
            else:
                inputs = [_resolve(ref, outputs, path, where) for ref in _inbound(where, entry.get("inbound_nodes"))]
            if lkind in MODEL_CLASSES:
                if len(inputs) != 1:
                    raise UnsupportedLayerError(f"{where} has {len(inputs)} inputs; fastres runs single-input models")
                outputs[name] = self.model(entry, (*scope, name), inputs[0])
            elif lkind == "InputLayer":
                if name != model_input if kind != "Sequential" else i != 0:
                    raise ModelFormatError(f"{where} is not the input of {label}; a second input is not supported")
                outputs[name] = self._input(path(name), _input_shape(where, cfg), feed)
            else:
                _check_kind(_where(name, scope), lkind)
                if not inputs:
                    raise ModelFormatError(f"{where} has no inbound nodes: nothing feeds it")
                if (len(inputs) < 2) if lkind == "Add" else (len(inputs) != 1):
                    raise ModelFormatError(f"{where} has {len(inputs)} inputs; expected "
                                           + ("two or more" if lkind == "Add" else "one"))
                key = f"{scope[0]}/{name}" if scope else name  # see kerasfile: (outermost model, layer)
                self.layers.append(Layer(path(name), lkind, inputs, layer_attrs(where, lkind, cfg), key=key))
                outputs[name] = path(name)
            previous = outputs[name]
        if kind == "Sequential":
            if previous is None:
                raise ModelFormatError(f"{label} has no layers")
            return previous
        if model_input not in outputs or not any(n == model_input and k == "InputLayer" for n, k, _ in parsed):
            raise ModelFormatError(f"{label}'s input {model_input!r} is not one of its InputLayers")
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
        raise UnsupportedLayerError(f"{where} has class {_short(kind)}, which fastres does not support (supported: "
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
    try:
        output = parser.model(config)
    except FastresError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # a type nothing above expected
        raise ModelFormatError(f"the model config is malformed ({type(exc).__name__}: {exc})") from None
    input_shape = parser.input_shape
    if input_shape is None or len(input_shape) != 3:
        raise UnsupportedLayerError(f"the model's input shape {input_shape} is not an image batch (N, H, W, C)")
    if input_shape[2] is None:
        raise ModelFormatError("the model's input has no channel count")
    return _ordered(parser.layers, output), input_shape


def _ordered(layers, output):
    """Topological order of the layers the output depends on (walked without recursion); checks every reference."""
    by_name = {}
    for layer in layers:
        if layer.name in by_name:
            raise ModelFormatError(f"two layers are named {layer.name!r}")
        by_name[layer.name] = layer
    if output not in by_name:
        raise ModelFormatError(f"the output layer {output!r} is not among the layers")
    order, state = [], {}  # state: 1 while a layer's inputs are being visited, 2 once it is placed
    stack = [(output, output, False)]
    while stack:
        name, child, inputs_done = stack.pop()
        if inputs_done:
            state[name] = 2
            order.append(by_name[name])
            continue
        if name not in by_name:
            raise ModelFormatError(f"layer {child!r} reads from {name!r}, which is not in the model")
        if state.get(name) == 1:
            raise ModelFormatError(f"the layer graph has a cycle through {name!r}")
        if state.get(name) == 2:
            continue
        state[name] = 1
        stack.append((name, child, True))
        stack.extend((parent, name, False) for parent in reversed(by_name[name].inputs))
    return order
