"""Reading Keras model files: config and weights, without Keras.

Formats (see the README):
* Keras 2 full-model ``.h5`` (``model_config`` attribute, weights in ``model_weights/<layer>``,
  weight names ending in ``:0``; long attributes split into ``name0``, ``name1``, ...);
* Keras 3 legacy ``.h5`` (the same groups, names without ``:0``, new ``inbound_nodes`` form);
* Keras 3 ``.keras`` (a zip of ``config.json``, ``metadata.json`` and ``model.weights.h5``
  whose variables sit at ``layers/<path>/vars/<i>`` in saving order);
* weights-only ``.h5`` (root attribute ``layer_names``; needs ``architecture=``).

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


@dataclass
class ModelFile:
    """What a model file holds, as plain data."""

    format: str                      # "keras2-h5", "keras3-h5", "keras3-zip" or "weights-h5"
    keras_version: str
    config: dict | None              # the model config (None in a weights-only file)
    weights: dict = field(default_factory=dict)  # layer name -> list of arrays, in Keras's order


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
        return ModelFile(fmt, version, config, _read_layer_groups(f["model_weights"]))
    if "layer_names" in f.attrs or "layer_names0" in f.attrs:
        return ModelFile("weights-h5", version, None, _read_layer_groups(f))
    if "layers" in f and "vars" in f:
        raise ModelFormatError("this is a Keras 3 .weights.h5 file; load the .keras or .h5 model file instead")
    raise ModelFormatError("the HDF5 file has neither a model_config nor layer_names: not a Keras model or weights file")


def _read_layer_groups(root):
    weights = {}
    for name in _attr_list(root, "layer_names"):
        if name not in root:
            raise ModelFormatError(f"layer {name!r} is listed in layer_names but has no weights group")
        group = root[name]
        arrays = []
        for wname in _attr_list(group, "weight_names"):
            if wname not in group:
                raise ModelFormatError(f"layer {name!r}: weight {wname!r} is listed but missing")
            arrays.append(np.asarray(group[wname][()], dtype=np.float32))
        weights[name] = arrays
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
    ``model.layers`` (``conv2d``, ``conv2d_1``, ...), not after the layer's name.
    """
    layers = (config.get("config") or {}).get("layers")
    if not isinstance(layers, list) or "layers" not in f:
        raise ModelFormatError("model.weights.h5 has no layers group, or config.json lists no layers")
    counts, weights = {}, {}
    for layer in layers:
        base = _snake_case(str(layer.get("class_name", "")))
        index = counts.get(base, 0)
        counts[base] = index + 1
        group_name = base if index == 0 else f"{base}_{index}"
        name = layer.get("name") or (layer.get("config") or {}).get("name")
        if group_name not in f["layers"]:
            continue  # layers without variables may be absent
        vars_group = f["layers"][group_name].get("vars")
        if vars_group is None:
            continue
        saved_name = _text_attr(vars_group, "name")
        if saved_name is not None and saved_name != name:
            raise ModelFormatError(f"model.weights.h5: group layers/{group_name} holds {saved_name!r}, expected {name!r}")
        weights[name] = [np.asarray(vars_group[str(i)][()], dtype=np.float32) for i in range(len(vars_group))]
    return weights
