"""Reading Keras model files: config and weights, without Keras.

Formats (see the README):
* Keras 2 full-model ``.h5`` (``model_config`` attribute, weights in ``model_weights/<layer>``,
  weight names ending in ``:0``; long attributes split into ``name0``, ``name1``, ...);
* Keras 3 legacy ``.h5`` (the same groups, names without ``:0``, new ``inbound_nodes`` form);
* Keras 3 ``.keras`` (a zip of ``config.json``, ``metadata.json`` and ``model.weights.h5``
  whose variables sit at ``layers/<path>/vars/<i>`` in saving order);
* weights-only ``.h5`` (root attribute ``layer_names``; needs ``architecture=``).

A nested model (a Functional or Sequential model used as a layer) keeps its weights
differently in each format: in ``.h5`` files, in the group of the outermost nested model,
under names ``<layer>/<variable>`` of its innermost layers, at any depth; in ``.keras``
files, in ``layers/functional/layers/<class group>/vars``, one level per model.  Both
are read as ``weights["<outermost model>/<layer>"]``.

Nothing from a file is executed: the config is JSON, read as data.
"""
import io
import json
import re
import zipfile
from dataclasses import dataclass, field

import h5py
import numpy as np

from .errors import ModelFormatError

MODEL_CLASSES = ("Functional", "Model", "Sequential")  # a config entry of one of these is a nested model


@dataclass
class ModelFile:
    """What a model file holds, as plain data."""

    format: str                      # "keras2-h5", "keras3-h5", "keras3-zip" or "weights-h5"
    keras_version: str
    config: dict | None              # the model config (None in a weights-only file)
    weights: dict = field(default_factory=dict)  # layer name (or "model/layer") -> arrays, in Keras's order


def read_model_file(path):
    """Read ``path`` into a ModelFile; every failure is a ModelFormatError naming the file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if head.startswith(b"PK"):
            return _read_keras_zip(path)
        if head == b"\x89HDF\r\n\x1a\n":
            with h5py.File(path, "r") as f:
                return _read_h5(f)
    except ModelFormatError:
        raise
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path} is damaged or truncated: {exc}") from None
    raise ModelFormatError(f"{path} is not a Keras model file (neither HDF5 .h5 nor a .keras zip)")


def _attr_list(group, name):
    """A list attribute, joined from ``name0``, ``name1``, ... when HDF5 split it."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values.extend(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _text_attr(group, name):
    value = group.attrs.get(name)
    if value is None:
        return None
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _read_h5(f):
    config_text = _text_attr(f, "model_config")
    version = _text_attr(f, "keras_version") or ""
    if config_text is not None:
        if "model_weights" not in f:
            raise ModelFormatError("the file has a model config but no model_weights group")
        config = json.loads(config_text)
        fmt = "keras3-h5" if version.startswith("3") else "keras2-h5"
        return ModelFile(fmt, version, config, _read_layer_groups(f["model_weights"], _nested_models(config)))
    if "layer_names" in f.attrs or "layer_names0" in f.attrs:
        return ModelFile("weights-h5", version, None, _read_layer_groups(f))
    if "layers" in f and "vars" in f:
        raise ModelFormatError("this is a Keras 3 .weights.h5 file; load the .keras or .h5 model file instead")
    raise ModelFormatError("the HDF5 file has neither a model_config nor layer_names: not a Keras model or weights file")


def _nested_models(config):
    """Names of the top-level layers of ``config`` that are models themselves."""
    layers = (config.get("config") or {}).get("layers") if isinstance(config, dict) else None
    return {(e.get("name") or (e.get("config") or {}).get("name")) for e in layers or []
            if isinstance(e, dict) and e.get("class_name") in MODEL_CLASSES}


def _read_layer_groups(root, models=()):
    """Each layer group's arrays; a nested model's are split by the layer named in each weight name."""
    weights = {}
    for name in _attr_list(root, "layer_names"):
        if name not in root:
            kind = "nested model" if name in models else "layer"
            raise ModelFormatError(f"{kind} {name!r} is listed in layer_names but has no weights group")
        group = root[name]
        weights.setdefault(name, [])
        for wname in _attr_list(group, "weight_names"):
            key = name
            if name in models:
                parts = wname.split("/")
                if len(parts) < 2:
                    raise ModelFormatError(f"nested model {name!r}: weight {wname!r} names no layer")
                key = f"{name}/{parts[-2]}"
            if wname not in group:
                raise ModelFormatError(f"layer {key.rpartition('/')[2]!r}"
                                       + (f" in model {name!r}" if name in models else "")
                                       + f": weight {wname!r} is listed but missing")
            weights.setdefault(key, []).append(np.asarray(group[wname][()], dtype=np.float32))
    return weights


def _snake_case(name):
    """Keras 3's naming of a saved layer's group: ``BatchNormalization`` -> ``batch_normalization``."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _read_keras_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        for needed in ("config.json", "model.weights.h5"):
            if needed not in names:
                raise ModelFormatError(f"{path} is a zip but not a .keras file: {needed} is missing")
        config = json.loads(archive.read("config.json"))
        meta = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
        data = archive.read("model.weights.h5")
    with h5py.File(io.BytesIO(data), "r") as f:
        weights = _read_saving_order(f, config)
    return ModelFile("keras3-zip", str(meta.get("keras_version", "3")), config, weights)


def _read_saving_order(f, config):
    """Variables of a Keras 3 weights file, matched to the config's layers in saving order.

    Keras 3 names each layer's group after its class, counted in the order of
    ``model.layers`` (``conv2d``, ``conv2d_1``, ...), not after the layer's name; a nested
    model's group holds its own ``layers`` group, named the same way.
    """
    layers = (config.get("config") or {}).get("layers")
    if not isinstance(layers, list) or "layers" not in f:
        raise ModelFormatError("model.weights.h5 has no layers group, or config.json lists no layers")
    weights = {}
    _read_layers_group(f["layers"], layers, None, weights)
    return weights


def _read_layers_group(group, layers, top, weights):
    counts = {}
    for layer in layers:
        kind = str(layer.get("class_name", ""))
        base = _snake_case(kind)
        index = counts.get(base, 0)
        counts[base] = index + 1
        group_name = base if index == 0 else f"{base}_{index}"
        name = layer.get("name") or (layer.get("config") or {}).get("name")
        if group_name not in group:
            continue  # layers without variables may be absent
        if kind in MODEL_CLASSES:
            inner = (layer.get("config") or {}).get("layers")
            if "layers" in group[group_name] and isinstance(inner, list):
                _read_layers_group(group[group_name]["layers"], inner, top or name, weights)
            continue
        vars_group = group[group_name].get("vars")
        if vars_group is None:
            continue
        saved_name = _text_attr(vars_group, "name")
        if saved_name is not None and saved_name != name:
            raise ModelFormatError(f"model.weights.h5: group {vars_group.parent.name} holds {saved_name!r}, "
                                   f"expected {name!r}")
        key = name if top is None else f"{top}/{name}"
        if key in weights:
            raise ModelFormatError(f"model.weights.h5: two layers named {name!r} in nested model {top!r}")
        weights[key] = [np.asarray(vars_group[str(i)][()], dtype=np.float32) for i in range(len(vars_group))]
