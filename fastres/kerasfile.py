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

Nothing from a file is executed: the config is JSON, read as data.  Nothing outside the
file is read: only hard links are followed, and a dataset with external raw storage, a
virtual dataset, or a filter other than HDF5's built-in deflate, shuffle and Fletcher-32 is
refused (an unknown filter would make HDF5 load a plugin library).  Every size is checked
before it is allocated (see ``limits``): attributes and zip members by their declared and
stored sizes, datasets by their shape, which ``graph.attach_weights`` compares with the
config before a byte of them is read (``StoredArray.read``).  The file stays open until
``ModelFile.close`` (``load`` reads it in a ``with`` block).
"""
import contextvars
import io
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field

import h5py
import numpy as np
from h5py import h5d, h5i, h5l, h5o, h5z

from . import limits
from .errors import ModelFormatError
from .h5raw import vlen_attribute

MODEL_CLASSES = ("Functional", "Model", "Sequential")  # a config entry of one of these is a nested model
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
SAFE_FILTERS = (h5z.FILTER_DEFLATE, h5z.FILTER_SHUFFLE, h5z.FILTER_FLETCHER32)  # built into HDF5
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
ZIP_BOMB_RATIO, ZIP_BOMB_FLOOR = 20, 64 << 20  # a compressed member may expand this much above the floor
# what a damaged HDF5 or zip file raises from h5py, zipfile and json
READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError, EOFError,
               zipfile.BadZipFile, NotImplementedError, RecursionError)
_raw = contextvars.ContextVar("raw")  # read(offset, size) of the HDF5 file being read, for h5raw


@dataclass
class ModelFile:
    """What a model file holds, as plain data; the weights are read when they are used.

    Use as a context manager (or call ``close``): the datasets are read from the open file.
    """

    format: str                      # "keras2-h5", "keras3-h5", "keras3-zip" or "weights-h5"
    keras_version: str
    config: dict | None              # the model config (None in a weights-only file)
    weights: dict = field(default_factory=dict)  # layer name (or "model/layer") -> StoredArray list, in Keras's order
    handles: list = field(default_factory=list)  # open files, closed last to first

    def close(self):
        while self.handles:
            self.handles.pop().close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StoredArray:
    """One weight in the file: its shape and dtype checked, its bytes not yet read.

    ``shape``, ``ndim``, ``size`` are the dataset's; ``where`` names it ("file: /path").
    """

    def __init__(self, dataset, where):
        # checked now, read later: the dataset is closed in between (HDF5 holds ~13 KiB per open dataset,
        # 4 MiB for ResNet50's 320) and opened again by its path, which was walked through hard links
        self._file, self._name = dataset.file, dataset.name.encode("utf8")
        self.where = where
        dsid = dataset.id  # h5py's low-level object: its properties cost less than the high-level ones
        shape = dsid.shape
        if shape is None:
            raise ModelFormatError(f"{where} is an empty (null) dataset")
        self.shape = tuple(int(d) for d in shape)
        self.ndim, self.size = len(self.shape), math.prod(self.shape)
        dtype = dsid.dtype
        if dtype.kind not in "fiu" or dtype.fields is not None or dtype.subdtype is not None:
            raise ModelFormatError(f"{where} holds {dtype} values; weights must be real numbers")
        plist = dsid.get_create_plist()
        if plist.get_layout() == h5d.VIRTUAL:
            raise ModelFormatError(f"{where} is a virtual dataset (its data lives in other files); refused")
        if plist.get_external_count():
            raise ModelFormatError(f"{where} keeps its data in an external file; fastres reads only the model file")
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        if any(f not in SAFE_FILTERS for f in filters):
            raise ModelFormatError(f"{where} uses HDF5 filter {filters}; only deflate, shuffle and fletcher32 are read")
        stored, declared = dsid.get_storage_size(), self.size * dtype.itemsize
        if not filters and self.size and stored != declared:
            raise ModelFormatError(f"{where} declares {limits.human(declared)} of data but stores {limits.human(stored)}")

    @property
    def nbytes(self):
        """Bytes of the float32 array ``read`` returns."""
        return 4 * self.size

    def read(self):
        """The dataset as a float32 array (converted by HDF5 while reading, one copy)."""
        out = np.empty(self.shape, np.float32)
        if self.size:
            self.reader()(out)
        return out

    def reader(self):
        """``read(out, source_sel=None, dest_sel=None)``: ``source_sel`` of the dataset into ``out[dest_sel]``.

        ``out`` is a C-contiguous float32 array; HDF5 converts while reading.  The dataset stays open
        as long as the function lives.
        """
        try:
            dataset = _open(self._file, self._name)
        except READ_ERRORS as exc:
            raise ModelFormatError(f"{self.where} cannot be read: {exc}") from None

        def read(out, source_sel=None, dest_sel=None):
            try:
                dataset.read_direct(out, source_sel, dest_sel)
            except READ_ERRORS as exc:
                raise ModelFormatError(f"{self.where} cannot be read: {exc}") from None
        return read


def read_model_file(path):
    """Read ``path``'s config and weight list into a ModelFile; every failure is a ModelFormatError naming the file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    handles = []
    try:
        if head.startswith(b"PK"):
            return _read_keras_zip(path, handles)
        if head == HDF5_SIGNATURE:
            # sec2, the plain POSIX driver: never the family/multi/split drivers, which open other files
            fh = open(path, "rb", buffering=0)
            handles.append(fh)
            token = _raw.set(lambda offset, size: os.pread(fh.fileno(), size, offset))
            try:
                f = h5py.File(path, "r", driver="sec2")
                handles.append(f)
                return _read_h5(f, path, handles)
            finally:
                _raw.reset(token)
    except ModelFormatError as exc:
        _close(handles)
        raise ModelFormatError(exc if str(path) in str(exc) else f"{path}: {exc}") from None
    except READ_ERRORS as exc:
        _close(handles)
        raise ModelFormatError(f"{path} is damaged or truncated: {type(exc).__name__}: {exc}") from None
    raise ModelFormatError(f"{path} is not a Keras model file (neither HDF5 .h5 nor a .keras zip)")


def _close(handles):
    while handles:
        try:
            handles.pop().close()
        except READ_ERRORS:
            pass


# ---------------------------------------------------------------- HDF5, through hard links only

def _child(group, name):
    """``group[name]`` (``name`` may hold slashes), following hard links only; None when absent."""
    node = group
    for part in name.split("/"):
        if not part:
            continue
        if not isinstance(node, h5py.Group):
            return None
        key = part.encode("utf8")
        if not node.id.links.exists(key):
            return None
        kind = node.id.links.get_info(key).type
        if kind != h5l.TYPE_HARD:
            what = {h5l.TYPE_SOFT: "a soft link", h5l.TYPE_EXTERNAL: "an external link (to another file)"}
            raise ModelFormatError(f"{node.name.rstrip('/')}/{part} is {what.get(kind, 'a user-defined link')}; "
                                   "fastres follows only hard links, inside the model file")
        node = _open(node, key)
    return node


def _open(group, key):
    """``group[key]`` through h5py's low-level calls (h5py's ``__getitem__`` also builds a File per call)."""
    oid = h5o.open(group.id, key)
    kind = h5i.get_type(oid)
    if kind == h5i.GROUP:
        return h5py.Group(oid)
    if kind == h5i.DATASET:
        return h5py.Dataset(oid, readonly=True)
    return h5py.Datatype(oid)


def _group(parent, name, where):
    node = _child(parent, name)
    if node is not None and not isinstance(node, h5py.Group):
        raise ModelFormatError(f"{where}: {node.name} is not a group")
    return node


def _dataset(parent, name, where):
    node = _child(parent, name)
    if node is not None and not isinstance(node, h5py.Dataset):
        raise ModelFormatError(f"{where}: {node.name} is not a dataset")
    return node


def _attr(group, name, limit):
    """An attribute's value (None when absent), its size checked before it is read."""
    if name not in group.attrs:
        return None
    attr = group.attrs.get_id(name)
    size = math.prod(attr.shape or ()) * attr.dtype.itemsize  # declared, before a byte is read
    if attr.dtype.kind == "O":  # variable-length text: read from the raw file, not by HDF5
        values = vlen_attribute(group, _raw.get(), name, limit)
        if values is not None:
            return values[0] if attr.shape == () and len(values) == 1 else np.array(values, dtype=object)
    if size > limit:
        raise ModelFormatError(f"attribute {name!r} of {group.name} is {limits.human(size)}, over the "
                               f"{limits.human(limit)} allowed")
    return group.attrs[name]


def _attr_list(group, name):
    """A list attribute, joined from ``name0``, ``name1``, ... when HDF5 split it."""
    value = _attr(group, name, limits.MAX_CONFIG_BYTES)
    if value is not None:
        values = list(np.atleast_1d(value))
    else:
        values, i = [], 0
        while (part := _attr(group, f"{name}{i}", limits.MAX_CONFIG_BYTES)) is not None:
            values.extend(np.atleast_1d(part))
            i += 1
            if len(values) > limits.MAX_LAYERS:
                break
    if len(values) > limits.MAX_LAYERS:
        raise ModelFormatError(f"attribute {name!r} of {group.name} lists {len(values)} names, over {limits.MAX_LAYERS}")
    if any(not isinstance(v, (bytes, str)) for v in values):
        raise ModelFormatError(f"attribute {name!r} of {group.name} holds {type(values[0]).__name__}s, not names")
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _text_attr(group, name, limit=limits.MAX_METADATA_BYTES):
    value = _attr(group, name, limit)
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if not isinstance(value, (bytes, str)):
        raise ModelFormatError(f"attribute {name!r} of {group.name} is not text")
    return value.decode("utf8") if isinstance(value, bytes) else value


def load_json(text, what, limit=limits.MAX_CONFIG_BYTES):
    """Parse ``text`` (str or bytes) as JSON, its size and nesting depth bounded."""
    if len(text) > limit:
        raise ModelFormatError(f"{what} is {limits.human(len(text))}, over the {limits.human(limit)} allowed")
    try:
        value = json.loads(text)
    except RecursionError:
        raise ModelFormatError(f"{what} nests deeper than {limits.MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{what} is not valid JSON: {exc}") from None
    if limits.json_depth(value) > limits.MAX_JSON_DEPTH:
        raise ModelFormatError(f"{what} nests deeper than {limits.MAX_JSON_DEPTH} levels")
    return value


def _read_h5(f, path, handles):
    config_text = _text_attr(f, "model_config", limits.MAX_CONFIG_BYTES)
    version = _text_attr(f, "keras_version") or ""
    if config_text is not None:
        root = _group(f, "model_weights", "model_weights")
        if root is None:
            raise ModelFormatError("the file has a model config but no model_weights group")
        config = load_json(config_text, "the model config")
        fmt = "keras3-h5" if version.startswith("3") else "keras2-h5"
        return ModelFile(fmt, version, config, _read_layer_groups(root, path, _nested_models(config)), handles)
    if "layer_names" in f.attrs or "layer_names0" in f.attrs:
        return ModelFile("weights-h5", version, None, _read_layer_groups(f, path), handles)
    if _child(f, "layers") is not None and _child(f, "vars") is not None:
        raise ModelFormatError("this is a Keras 3 .weights.h5 file; load the .keras or .h5 model file instead")
    raise ModelFormatError("the HDF5 file has neither a model_config nor layer_names: not a Keras model or weights file")


def _nested_models(config):
    """Names of the top-level layers of ``config`` that are models themselves."""
    body = config.get("config") if isinstance(config, dict) else None
    layers = body.get("layers") if isinstance(body, dict) else None
    found = set()
    for e in layers if isinstance(layers, list) else ():
        if isinstance(e, dict) and e.get("class_name") in MODEL_CLASSES:
            cfg = e.get("config") if isinstance(e.get("config"), dict) else {}
            found.add(str(e.get("name") or cfg.get("name")))
    return found


def _read_layer_groups(root, path, models=()):
    """Each layer group's arrays; a nested model's are split by the layer named in each weight name."""
    weights = {}
    for name in _attr_list(root, "layer_names"):
        group = _group(root, name, f"layer {name!r}")
        if group is None:
            kind = "nested model" if name in models else "layer"
            raise ModelFormatError(f"{kind} {name!r} is listed in layer_names but has no weights group")
        weights.setdefault(name, [])
        for wname in _attr_list(group, "weight_names"):
            key = name
            if name in models:
                parts = wname.split("/")
                if len(parts) < 2:
                    raise ModelFormatError(f"nested model {name!r}: weight {wname!r} names no layer")
                key = f"{name}/{parts[-2]}"
            where = f"layer {key.rpartition('/')[2]!r}" + (f" in model {name!r}" if name in models else "")
            dataset = _dataset(group, wname, where)
            if dataset is None:
                raise ModelFormatError(f"{where}: weight {wname!r} is listed but missing")
            weights.setdefault(key, []).append(StoredArray(dataset, f"{path}: {where}: {dataset.name}"))
    return weights


def _snake_case(name):
    """Keras 3's naming of a saved layer's group: ``BatchNormalization`` -> ``batch_normalization``."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


# ---------------------------------------------------------------- .keras zips

class _Window(io.RawIOBase):
    """A read-only, seekable view of ``size`` bytes at ``start`` of an open file: a stored zip member, uncopied."""

    def __init__(self, fh, start, size):
        super().__init__()
        self._fh, self._start, self._size, self._pos = fh, start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size=-1):
        """Up to ``size`` bytes (fewer at the end), unlike ``readinto``, which refuses to read past it."""
        size = self._size - self._pos if size < 0 else min(size, max(0, self._size - self._pos))
        out = bytearray(size)
        return bytes(out[: self.readinto(out)])

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        if self._pos + len(view) > self._size:  # h5py would fill the rest with zeros: a huge read would
            raise OSError("a read past the end of model.weights.h5")  # take its size in memory
        count = len(view)
        self._fh.seek(self._start + self._pos)
        got = self._fh.readinto(view[:count]) or 0
        self._pos += got
        return got


def _member_info(archive, name, path):
    """The ZipInfo of ``name``, checked: not encrypted, a method zipfile reads, declared sizes in bounds."""
    info = archive.getinfo(name)
    if info.flag_bits & 0x1:
        raise ModelFormatError(f"{path}: {name} is encrypted")
    if info.compress_type not in ZIP_METHODS:
        raise ModelFormatError(f"{path}: {name} uses zip compression method {info.compress_type}, which is not supported")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(ZIP_BOMB_FLOOR,
                                                                          ZIP_BOMB_RATIO * info.compress_size):
        raise ModelFormatError(f"{path}: {name} expands {info.compress_size} bytes to {limits.human(info.file_size)}: "
                               "a zip bomb")
    return info


def _read_member(archive, name, path, limit):
    """A member's bytes, at most ``limit`` of them, however much it declares or holds."""
    info = _member_info(archive, name, path)
    if info.file_size > limit:
        raise ModelFormatError(f"{path}: {name} is {limits.human(info.file_size)}, over the {limits.human(limit)} allowed")
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) != info.file_size:
        raise ModelFormatError(f"{path}: {name} holds {len(data)} bytes but declares {info.file_size}")
    return data


def _weights_member(archive, path, handles):
    """model.weights.h5 as a file object: a window on the zip when stored, else decompressed (bounded)."""
    name = "model.weights.h5"
    info = _member_info(archive, name, path)
    if info.compress_type != zipfile.ZIP_STORED:
        return io.BytesIO(_read_member(archive, name, path, limits.memory_limit()))
    fh = open(path, "rb", buffering=0)
    handles.append(fh)
    fh.seek(info.header_offset)
    header = fh.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ModelFormatError(f"{path}: {name} has no local zip header")
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    if info.file_size != info.compress_size or start + info.file_size > os.path.getsize(path):
        raise ModelFormatError(f"{path}: {name} declares {info.file_size} bytes, more than the file holds")
    return _Window(fh, start, info.file_size)


def _reader(fileobj):
    """``read(offset, size)`` on a seekable file object."""
    def read(offset, size):
        fileobj.seek(offset)
        return fileobj.read(size)
    return read


def _read_keras_zip(path, handles):
    archive = zipfile.ZipFile(path)
    handles.append(archive)
    names = set(archive.namelist())
    for needed in ("config.json", "model.weights.h5"):
        if needed not in names:
            raise ModelFormatError(f"{path} is a zip but not a .keras file: {needed} is missing")
    config = load_json(_read_member(archive, "config.json", path, limits.MAX_CONFIG_BYTES), "config.json")
    meta = {}
    if "metadata.json" in names:
        meta = load_json(_read_member(archive, "metadata.json", path, limits.MAX_METADATA_BYTES), "metadata.json",
                         limits.MAX_METADATA_BYTES)
    if not isinstance(config, dict) or not isinstance(meta, dict):
        raise ModelFormatError(f"{path}: config.json and metadata.json must each hold a JSON object")
    member = _weights_member(archive, path, handles)
    handles.append(member)
    token = _raw.set(_reader(member))
    try:
        f = h5py.File(member, "r")
        handles.append(f)
        weights = _read_saving_order(f, config, path)
    finally:
        _raw.reset(token)
    return ModelFile("keras3-zip", str(meta.get("keras_version", "3")), config, weights, handles)


def _read_saving_order(f, config, path):
    """Variables of a Keras 3 weights file, matched to the config's layers in saving order.

    Keras 3 names each layer's group after its class, counted in the order of
    ``model.layers`` (``conv2d``, ``conv2d_1``, ...), not after the layer's name; a nested
    model's group holds its own ``layers`` group, named the same way.
    """
    layers = config.get("config").get("layers") if isinstance(config.get("config"), dict) else None
    root = _group(f, "layers", "model.weights.h5")
    if not isinstance(layers, list) or root is None:
        raise ModelFormatError("model.weights.h5 has no layers group, or config.json lists no layers")
    weights = {}
    pending = [(root, layers, None)]  # nested models, walked without recursion
    while pending:
        group, entries, top = pending.pop()
        counts = {}
        for layer in entries:
            if not isinstance(layer, dict):
                raise ModelFormatError(f"config.json: a layer entry is {type(layer).__name__}, not an object")
            cfg = layer.get("config") if isinstance(layer.get("config"), dict) else {}
            kind = str(layer.get("class_name", ""))
            base = _snake_case(kind)
            index = counts.get(base, 0)
            counts[base] = index + 1
            group_name = base if index == 0 else f"{base}_{index}"
            name = str(layer.get("name") or cfg.get("name"))
            node = _group(group, group_name, f"layer {name!r}")
            if node is None:
                continue  # layers without variables may be absent
            if kind in MODEL_CLASSES:
                inner, inner_group = cfg.get("layers"), _group(node, "layers", f"model {name!r}")
                if inner_group is not None and isinstance(inner, list):
                    pending.append((inner_group, inner, top or name))
                continue
            vars_group = _group(node, "vars", f"layer {name!r}")
            if vars_group is None:
                continue
            saved_name = _text_attr(vars_group, "name")
            if saved_name is not None and saved_name != name:
                raise ModelFormatError(f"model.weights.h5: group {vars_group.parent.name} holds {saved_name!r}, "
                                       f"expected {name!r}")
            key = name if top is None else f"{top}/{name}"
            if key in weights:
                raise ModelFormatError(f"model.weights.h5: two layers named {name!r} in nested model {top!r}")
            where = f"layer {name!r}" + (f" in model {top!r}" if top else "")
            arrays = []
            for i in range(len(vars_group)):
                dataset = _dataset(vars_group, str(i), where)
                if dataset is None:
                    raise ModelFormatError(f"{where}: variable {i} of {vars_group.name} is missing")
                arrays.append(StoredArray(dataset, f"{path}: {where}: {dataset.name}"))
            weights[key] = arrays
    return weights
