"""The default model of ``fastres bench``: ResNet50 (keras.applications layout) with
deterministic weights, written by fastres itself with h5py as a Keras 2 full-model
``.h5`` that Keras 2 (tf_keras) and Keras 3 load as well.

The weights are seeded He-style initialisations and batch-norm statistics that are
not the identity, so folding is exercised; they classify nothing.
"""
import json
import os
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .architectures import BLOCKS, _applications

SEED = 20261128
KERAS_VERSION = "2.15.0"


def cache_dir():
    """``$FASTRES_CACHE``, else ``$XDG_CACHE_HOME/fastres``, else ``~/.cache/fastres``."""
    if os.environ.get("FASTRES_CACHE"):
        return Path(os.environ["FASTRES_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastres"


def default_model_path(input_size=224, classes=1000):
    """Path of the default model for ``input_size``, written on first use."""
    path = cache_dir() / f"resnet50-{input_size}-{classes}-seed{SEED}-v{__version__}.h5"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        write_resnet50(partial, input_size, classes)
        os.replace(partial, path)  # atomic: a concurrent run never sees half a file
    return path


def _layer_config(layer, input_size):
    a, base = layer.attrs, {"name": layer.name, "trainable": True, "dtype": "float32"}
    init = {"class_name": "HeNormal", "config": {"seed": None}}
    if layer.kind == "InputLayer":
        return {"batch_input_shape": [None, input_size, input_size, 3], "dtype": "float32", "sparse": False,
                "ragged": False, "name": layer.name}
    if layer.kind == "ZeroPadding2D":
        t, b, l, r = a["pads"]
        return {**base, "padding": [[t, b], [l, r]], "data_format": "channels_last"}
    if layer.kind == "Conv2D":
        return {**base, "filters": a["filters"], "kernel_size": list(a["kernel"]), "strides": [a["stride"]] * 2,
                "padding": a["padding"], "data_format": "channels_last", "dilation_rate": [1, 1], "groups": 1,
                "activation": str(a["activation"]), "use_bias": a["use_bias"], "kernel_initializer": init,
                "bias_initializer": {"class_name": "Zeros", "config": {}}, "kernel_regularizer": None,
                "bias_regularizer": None, "activity_regularizer": None, "kernel_constraint": None,
                "bias_constraint": None}
    if layer.kind == "BatchNormalization":
        return {**base, "axis": 3, "momentum": 0.99, "epsilon": a["epsilon"], "center": True, "scale": True}
    if layer.kind == "Activation":
        return {**base, "activation": str(a["activation"])}
    if layer.kind == "MaxPooling2D":
        return {**base, "pool_size": list(a["pool"]), "padding": a["padding"], "strides": list(a["stride"]),
                "data_format": "channels_last"}
    if layer.kind == "GlobalAveragePooling2D":
        return {**base, "data_format": "channels_last", "keepdims": False}
    if layer.kind == "Dense":
        return {**base, "units": a["units"], "activation": str(a["activation"]), "use_bias": True,
                "kernel_initializer": init, "bias_initializer": {"class_name": "Zeros", "config": {}}}
    return base  # Add


def _weights(layer, cin, rng):
    """Arrays in Keras's order: (name, array)."""
    if layer.kind == "Conv2D":
        kh, kw = layer.attrs["kernel"]
        fan_in = kh * kw * cin
        kernel = rng.standard_normal((kh, kw, cin, layer.attrs["filters"])) * np.sqrt(2.0 / fan_in)
        return [("kernel", kernel), ("bias", rng.normal(0, 0.01, layer.attrs["filters"]))]
    if layer.kind == "BatchNormalization":
        # the last batch-norm of each residual branch is damped, so 16 blocks stay in range
        damp = 0.2 if layer.name.endswith(("_3_bn", "_0_bn")) else 1.0
        return [("gamma", damp * rng.uniform(0.5, 1.5, cin)), ("beta", rng.normal(0, 0.1, cin)),
                ("moving_mean", rng.normal(0, 0.1, cin)), ("moving_variance", rng.uniform(0.5, 1.5, cin))]
    if layer.kind == "Dense":
        return [("kernel", rng.standard_normal((cin, layer.attrs["units"])) * np.sqrt(1.0 / cin)),
                ("bias", np.zeros(layer.attrs["units"]))]
    return []


def write_resnet50(path, input_size=224, classes=1000, seed=SEED):
    """Write ResNet50 with deterministic weights as a Keras 2 full-model .h5 at ``path``."""
    layers = _applications(BLOCKS["resnet50"], classes, "softmax")
    layers[0].name = "input_1"
    for layer in layers:
        layer.inputs = ["input_1" if name == "input" else name for name in layer.inputs]
    channels, rng = {"input_1": 3}, np.random.default_rng(seed)
    entries, weights = [], {}
    for layer in layers:
        cin = channels[layer.inputs[0]] if layer.inputs else 3
        channels[layer.name] = {"Conv2D": layer.attrs.get("filters"), "Dense": layer.attrs.get("units")}.get(layer.kind) or cin
        entries.append({"class_name": layer.kind, "config": _layer_config(layer, input_size), "name": layer.name,
                        "inbound_nodes": [[[name, 0, 0, {}] for name in layer.inputs]] if layer.inputs else []})
        weights[layer.name] = [(n, a.astype(np.float32)) for n, a in _weights(layer, cin, rng)]
    config = {"class_name": "Functional", "config": {"name": "resnet50", "trainable": True, "layers": entries,
                                                     "input_layers": [["input_1", 0, 0]],
                                                     "output_layers": [[layers[-1].name, 0, 0]]},
              "keras_version": KERAS_VERSION, "backend": "tensorflow"}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = KERAS_VERSION
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(config)
        group = f.create_group("model_weights")
        group.attrs["keras_version"] = KERAS_VERSION
        group.attrs["backend"] = "tensorflow"
        group.attrs["layer_names"] = np.array([l.name.encode() for l in layers])
        for layer in layers:
            g = group.create_group(layer.name)
            g.attrs["weight_names"] = np.array([f"{layer.name}/{n}:0".encode() for n, _ in weights[layer.name]])
            for n, array in weights[layer.name]:
                g.create_dataset(f"{layer.name}/{n}:0", data=array)
    return path
