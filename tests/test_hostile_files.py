"""Hostile and mutated model files: each loads and runs with finite output or raises a FastresError.

One named test per class of defect found by the fuzzing run of issue 9, then a seeded fuzzer
over configs, HDF5 bytes and zip members that runs in subprocesses (a crash or hang is
caught and pinned to its mutant).
"""
import io
import json
import os
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

import fastres
import keras_models as km
from conftest import assert_matches

WORKER = Path(__file__).parent / "scripts" / "fuzz_worker.py"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A Keras 2 Sequential .h5, a Keras 3 Functional .h5 and .keras, and a model nesting a Sequential model."""
    folder = tmp_path_factory.mktemp("hostile")
    keras = km.keras2()
    km.seed(keras, 0)
    km.small_sequential(keras).save(folder / "seq.h5")
    keras3 = km.keras3()
    km.seed(keras3, 0)
    model = km.rare_options(keras3)
    model.save(folder / "func.h5")
    model.save(folder / "func.keras")
    inp = keras3.Input((13, 11, 3))
    x = km.small_sequential(keras3)(inp, training=False)
    keras3.Model(inp, keras3.layers.Dense(3)(x)).save(folder / "nested.keras")
    return folder


def refused(path, *parts, error=fastres.ModelFormatError):
    """Loading ``path`` raises ``error`` whose message names the file and holds each of ``parts``."""
    with pytest.raises(error) as info:
        fastres.load(path)
    message = str(info.value)
    assert str(path) in message, message
    for part in parts:
        assert part in message, message
    return message


def h5_config(files, new, edit, base="seq.h5"):
    """A copy of ``base`` whose model_config was changed by ``edit(config)``."""
    path = files / new
    path.write_bytes((files / base).read_bytes())
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        edit(config)
        f.attrs["model_config"] = json.dumps(config)
    return path


def rezip(files, new, members=None, edit_config=None, base="func.keras"):
    """A copy of a .keras file with members replaced (name -> bytes) or its config edited."""
    path = files / new
    with zipfile.ZipFile(files / base) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if edit_config and item == "config.json":
                config = json.loads(data)
                edit_config(config)
                data = json.dumps(config).encode()
            dst.writestr(item, (members or {}).get(item, data))
    return path


def layer_entries(config, kind):
    return [e for e in config["config"]["layers"] if e["class_name"] == kind]


def set_option(kind, key, value, index=0):
    def edit(config):
        layer_entries(config, kind)[index]["config"][key] = value
    return edit


# ------------------------------------------------------------------ 1. bad config values

@pytest.mark.parametrize("edit,parts", [
    (lambda c: layer_entries(c, "Conv2D")[0]["config"].pop("filters"), ["layer 'conv2d", "filters must be an int"]),
    (lambda c: c["config"]["layers"].insert(2, 5), ["lists a layer that is 5"]),
    (set_option("Conv2D", "strides", [0, 0]), ["strides must be an int from 1"]),
    (set_option("Conv2D", "kernel_size", "3"), ["kernel_size must be an int or a pair"]),
    (set_option("Dense", "units", [7]), ["units must be an int"]),
    (set_option("BatchNormalization", "epsilon", "big"), ["epsilon must be a finite number"]),
    (set_option("Conv2D", "activation", ["relu"]), ["activation ['relu'] is not supported"]),
])
def test_bad_config_values(files, edit, parts):
    error = fastres.UnsupportedLayerError if "activation" in parts[0] else fastres.ModelFormatError
    refused(h5_config(files, "bad_value.h5", edit), *parts, error=error)


# ------------------------------------------------------------------ 2. .keras zips

def _patch_zip_header(data, name, field_offset, central_offset, value):
    """Set a 2-byte field in ``name``'s local header and central directory entry."""
    data = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo(name)
    data[info.header_offset + field_offset: info.header_offset + field_offset + 2] = value.to_bytes(2, "little")
    central = bytes(data).find(b"PK\x01\x02")
    while central >= 0:
        length = int.from_bytes(data[central + 28: central + 30], "little")
        if bytes(data[central + 46: central + 46 + length]).decode() == name:
            data[central + central_offset: central + central_offset + 2] = value.to_bytes(2, "little")
        central = bytes(data).find(b"PK\x01\x02", central + 4)
    return bytes(data)


@pytest.mark.parametrize("case,parts", [
    ("metadata_list", ["metadata.json must each hold a JSON object"]),
    ("config_null", ["config.json and metadata.json must each hold a JSON object"]),
    ("method_99", ["compression method 99"]),
    ("encrypted", ["config.json is encrypted"]),
])
def test_bad_keras_zip(files, case, parts):
    if case == "metadata_list":
        path = rezip(files, f"{case}.keras", {"metadata.json": b"[]"})
    elif case == "config_null":
        path = rezip(files, f"{case}.keras", {"config.json": b"null"})
    else:
        field = (8, 10, 99) if case == "method_99" else (6, 8, 1)  # (local offset, central offset, value)
        path = files / f"{case}.keras"
        path.write_bytes(_patch_zip_header((files / "func.keras").read_bytes(), "config.json", *field))
    refused(path, *parts)


# ------------------------------------------------------------------ 3. recursion

def test_deep_json_is_refused(files):
    deep = h5_config(files, "deep.h5", lambda c: c["config"].__setitem__("extra", None))
    with h5py.File(deep, "r+") as f:
        f.attrs["model_config"] = f.attrs["model_config"].replace('"extra": null', '"extra": ' + "[" * 5000 + "]" * 5000)
    refused(deep, "nests deeper than")


def test_1200_layer_chain_loads(tmp_path):
    keras = km.keras3()
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 2)).astype(np.float32) * 30
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # Keras itself recurses over the graph; fastres must not need this
    try:
        inp = keras.Input((4, 4, 2))
        y = keras.layers.Conv2D(3, 1, name="first")(inp)
        for i in range(1200):
            y = keras.layers.ReLU(max_value=float(50 - i % 7), name=f"r{i}")(y)
        model = keras.Model(inp, y)
        model.save(tmp_path / "chain.keras")
        expected = model(x)
    finally:
        sys.setrecursionlimit(limit)
    assert_matches(fastres.load(tmp_path / "chain.keras").predict(x), expected)


# ------------------------------------------------------------------ 4, 5. links and storage outside the file

def _replace_weight(path, make):
    """Replace the first kernel dataset of ``path`` by ``make(group, name)``; the file stays valid HDF5."""
    with h5py.File(path, "r+") as f:
        found = []
        f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) and "kernel" in n or n.endswith("vars/0")
                     and isinstance(o, h5py.Dataset) else None)
        group, _, name = found[0].rpartition("/")
        del f[group][name]
        make(f[group], name, f)


def _secret(files):
    secret = files / "secret.bin"
    secret.write_bytes(np.arange(1 << 14, dtype=np.float32).tobytes())
    return secret


LINKS = {
    "soft_self": (lambda g, n, f, s: g.__setitem__(n, h5py.SoftLink(f"{g.name}/{n}")), "is a soft link"),
    "soft_dangling": (lambda g, n, f, s: g.__setitem__(n, h5py.SoftLink("/nowhere")), "is a soft link"),
    "external_link": (lambda g, n, f, s: g.__setitem__(n, h5py.ExternalLink(str(s), "/data")), "is an external link"),
    "external_storage": (lambda g, n, f, s: g.create_dataset(n, shape=(3, 3, 3, 16), dtype="<f4", external=[(str(s), 0, 1728)]),
                         "keeps its data in an external file"),
    "virtual": (lambda g, n, f, s: g.create_virtual_dataset(n, _layout(s)), "is a virtual dataset"),
}


def _layout(secret):
    layout = h5py.VirtualLayout(shape=(3, 3, 3, 16), dtype="<f4")
    layout[...] = h5py.VirtualSource(str(secret) + ".h5", "data", shape=(3, 3, 3, 16))
    return layout


@pytest.mark.parametrize("case", sorted(LINKS))
@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_nothing_outside_the_file_is_read(files, case, suffix):
    secret = _secret(files)
    with h5py.File(str(secret) + ".h5", "w") as f:
        f["data"] = np.ones((3, 3, 3, 16), np.float32)
    make, message = LINKS[case]
    path = files / f"{case}{suffix}"
    if suffix == ".h5":
        path.write_bytes((files / "func.h5").read_bytes())
        _replace_weight(path, lambda g, n, f: make(g, n, f, secret))
    else:
        inner = files / f"{case}_weights.h5"
        with zipfile.ZipFile(files / "func.keras") as archive:
            inner.write_bytes(archive.read("model.weights.h5"))
        _replace_weight(inner, lambda g, n, f: make(g, n, f, secret))
        path = rezip(files, path.name, {"model.weights.h5": inner.read_bytes()})
    refused(path, message)


# ------------------------------------------------------------------ 6. sizes checked before allocation

@pytest.mark.parametrize("options,message", [({}, "declares 3.6 TiB of data but stores 0 bytes"),
                                             ({"compression": "gzip"}, "kernel has shape (1000000, 1000000), expected")])
def test_huge_declared_kernel_is_not_allocated(files, options, message):
    path = files / "huge.h5"
    path.write_bytes((files / "func.h5").read_bytes())
    _replace_weight(path, lambda g, n, f: g.create_dataset(n, shape=(10 ** 6, 10 ** 6), dtype="<f4", **options))
    refused(path, message)


def test_huge_text_attribute_length_is_not_allocated(files):
    """A variable-length string's declared length (HDF5 allocates it before reading) is checked in the raw header."""
    path = files / "huge_text.h5"
    data = bytearray((files / "seq.h5").read_bytes())
    with h5py.File(files / "seq.h5", "r") as f:
        first = f["model_weights"].attrs["layer_names"][0]
    at = data.index(b"layer_names\0")
    # the first heap ID after the name: the first name's length, a collection address inside the file, an index
    heap_id = next(i for i in range(at, at + 512) if struct.unpack_from("<I", data, i)[0] == len(first)
                   and 0 < struct.unpack_from("<Q", data, i + 4)[0] < len(data))
    data[heap_id: heap_id + 4] = struct.pack("<I", 0xFFFFFFF0)
    path.write_bytes(bytes(data))
    refused(path, "attribute 'layer_names' of /model_weights declares 4.0 GiB of text")


def test_zip_bomb_and_huge_config(files):
    bomb = files / "bomb.keras"
    with zipfile.ZipFile(files / "func.keras") as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in ("config.json", "metadata.json"):
            dst.writestr(item, src.read(item))
        with dst.open("model.weights.h5", "w", force_zip64=True) as member:
            for _ in range(96):
                member.write(bytes(1 << 20))
    refused(bomb, "model.weights.h5 expands", "zip bomb")
    big = files / "bigconfig.keras"
    with zipfile.ZipFile(files / "func.keras") as src, zipfile.ZipFile(big, "w") as dst:
        dst.writestr("config.json", src.read("config.json") + b" " * (65 << 20))
        dst.writestr("model.weights.h5", src.read("model.weights.h5"))
    refused(big, "config.json is 65.0 MiB, over the 64.0 MiB allowed")


# ------------------------------------------------------------------ 7-10. absurd sizes and connections

def test_absurd_padding(tmp_path):
    keras = km.keras3()
    inp = keras.Input((6, 5, 2))
    x = keras.layers.Conv2D(3, 3)(keras.layers.ZeroPadding2D(1, name="pad")(inp))
    keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x)).save(tmp_path / "pad.h5")
    for padding, parts in [(10 ** 9, ["layer 'pad'", "padding must be an int from 0"]),
                           (30000, ["one image needs", "GiB of buffers, over the memory limit"])]:
        refused(h5_config(tmp_path, "bad_pad.h5", set_option("ZeroPadding2D", "padding", padding), "pad.h5"), *parts)


@pytest.mark.parametrize("case,edit,parts", [
    ("pool_0", set_option("MaxPooling2D", "pool_size", [0, 0]), ["pool_size must be an int from 1"]),
    ("pool_negative", set_option("MaxPooling2D", "pool_size", -2), ["pool_size must be an int from 1"]),
    ("strides_negative", set_option("MaxPooling2D", "strides", [2, -1]), ["strides must be an int from 1"]),
])
def test_absurd_pool_sizes(files, case, edit, parts):
    refused(h5_config(files, f"{case}.h5", edit), *parts)


def test_negative_moving_variance(files):
    path = files / "negvar.h5"
    path.write_bytes((files / "seq.h5").read_bytes())
    with h5py.File(path, "r+") as f:
        found = []
        f.visititems(lambda n, o: found.append(n) if "moving_variance" in n and isinstance(o, h5py.Dataset) else None)
        f[found[0]][0] = -1.0
    refused(path, "(BatchNormalization): moving_variance holds negative values")
    with h5py.File(path, "r+") as f:
        f[found[0]][0] = 0.0
    zero = h5_config(path.parent, "zerovar.h5", set_option("BatchNormalization", "epsilon", 0), base=path.name)
    refused(zero, "var + epsilon must be positive")  # 1 / sqrt(0): refused, not run


def test_unconnected_conv(files):
    def edit(config):
        layer_entries(config, "Conv2D")[1]["inbound_nodes"] = []
    refused(rezip(files, "unconnected.keras", edit_config=edit), "(Conv2D) has no inbound nodes")


def test_second_input_layer_is_refused(files, tmp_path):
    keras = km.keras3()
    img, img2 = keras.Input((4, 4, 2), name="img"), keras.Input((4, 4, 2), name="img2")
    x = keras.layers.Conv2D(3, 1)(keras.layers.Add()([img, img2]))
    keras.Model([img, img2], keras.layers.Flatten()(x)).save(tmp_path / "two.keras")

    def edit(config):
        config["config"]["input_layers"] = config["config"]["input_layers"][:1]
    path = rezip(tmp_path, "second_input.keras", edit_config=edit, base="two.keras")
    refused(path, "layer 'img2' (InputLayer) is not the input of the model")


# ------------------------------------------------------------------ 12. weights that are not real numbers

@pytest.mark.parametrize("dtype,text", [(np.complex64, "complex64"), ("S8", "|S8")])
def test_weights_must_be_real_numbers(files, dtype, text):
    path = files / f"weights_{text.strip('|')}.h5"
    path.write_bytes((files / "func.h5").read_bytes())
    _replace_weight(path, lambda g, n, f: g.create_dataset(n, data=np.zeros((3, 3, 5, 16), dtype)))
    refused(path, f"holds {text} values; weights must be real numbers")


# ------------------------------------------------------------------ 13. predict converts one batch at a time

def test_predict_converts_one_batch_at_a_time(tmp_path):
    keras = km.keras3()
    km.seed(keras, 3)
    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 1)(inp)))
    model.save(tmp_path / "free.keras")
    fr = fastres.load(tmp_path / "free.keras")
    pixel = np.random.default_rng(0).standard_normal((1, 1, 1, 3))
    view = np.broadcast_to(pixel, (256, 224, 224, 3))  # 1 GiB as float64, 0.4 GiB as float32, if converted whole
    fr.predict(view[:8], batch_size=8)  # plans and compiles outside the measurement
    tracemalloc.start()
    try:
        y = fr.predict(view, batch_size=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"predict allocated {peak / 2 ** 20:.0f} MiB"
    assert_matches(y[:2], model(view[:2].astype(np.float32)))
    assert np.array_equal(y, np.broadcast_to(y[:1], y.shape))


def test_plan_over_the_memory_limit_is_an_input_error(tmp_path):
    keras = km.keras3()
    inp = keras.Input((None, None, 3))
    keras.Model(inp, keras.layers.Conv2D(4, 3, padding="same")(inp)).save(tmp_path / "conv.keras")
    fr = fastres.load(tmp_path / "conv.keras", memory_limit="16M")
    x = np.broadcast_to(np.float32(1), (64, 128, 128, 3))
    with pytest.raises(fastres.InputError, match=r"a batch of 64 images of 128x128 needs .* MiB of buffers, over the "
                                                 r"memory limit of 16.0 MiB; pass batch_size=\d+ or less"):
        fr.predict(x)
    assert fr.predict(x[:8], batch_size=2).shape == (8, 128, 128, 4)


# ------------------------------------------------------------------ threads belong to the model

def test_threads_hold_in_a_worker_thread(files):
    code = f"""
import threading, numba, numpy as np, fastres, fastres.model as fm
seen = []
run = fm.Plan.run
fm.Plan.run = lambda self, x, out=None, threads=None: (seen.append((numba.get_num_threads(), threads)),
                                                     run(self, x, out, threads))[1]
model = fastres.load({str(files / 'seq.h5')!r}, threads=1)
assert fastres.get_num_threads() == 2, "load(threads=) changed the caller's count"
worker = threading.Thread(target=model.predict, args=(np.zeros((1, 13, 11, 3), np.float32),))
worker.start(); worker.join()
model.predict(np.zeros((1, 13, 11, 3), np.float32))
assert seen == [(1, 1), (1, 1)] and fastres.get_num_threads() == 2, seen  # (the count, and what run was told)
"""
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


# ------------------------------------------------------------------ the seeded fuzzer

@pytest.mark.parametrize("kind,count", [("config", 120), ("h5bytes", 120), ("zip", 90)])
def test_fuzzed_files(files, kind, count):
    bases = {"config": ["seq.h5", "func.h5", "func.keras", "nested.keras"], "h5bytes": ["seq.h5", "func.h5"],
             "zip": ["func.keras", "nested.keras"]}
    args = [sys.executable, str(WORKER), kind, str(sum(kind.encode())), str(count), *(str(files / b) for b in bases[kind])]
    run = subprocess.run(args, capture_output=True, text=True, timeout=60 + 12 * count)
    lines = run.stdout.splitlines()
    started = [l.split()[0] for l in lines if l.endswith(" start")]
    assert run.returncode == 0, f"the worker died ({run.returncode}) on mutant {started[-1:]}: {run.stderr[-2000:]}"
    results = [l for l in lines if not l.endswith(" start")]
    assert len(results) == count
    bad = [l for l in results if " BAD " in l]
    assert not bad, "\n".join(bad)
    outcomes = {l.split()[1] for l in results}
    assert "refused" in outcomes  # the mutations reach the checks
    peak = max(int(l.rsplit("rss=", 1)[1].removesuffix("MiB")) for l in results)
    assert peak < 1024, f"a mutant took the worker to {peak} MiB"  # small models: ~200 MiB with Numba
