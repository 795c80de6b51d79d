"""Bad files and bad inputs give the right FastresError with a message that names the problem."""
import json
import zipfile

import h5py
import numpy as np
import pytest

import fastres
import keras_models as km
from conftest import assert_matches


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small Keras 2 .h5 and Keras 3 .keras model, saved once for the module."""
    folder = tmp_path_factory.mktemp("bad")
    keras = km.keras2()
    km.seed(keras, 0)
    km.small_sequential(keras).save(folder / "good.h5")
    keras3 = km.keras3()
    km.seed(keras3, 0)
    km.rare_options(keras3).save(folder / "good.keras")
    return folder


def copy(saved, name, new):
    target = saved / new
    target.write_bytes((saved / name).read_bytes())
    return target


def test_random_bytes_empty_and_missing(saved):
    random = saved / "random.h5"
    random.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(fastres.ModelFormatError, match="not a Keras model file"):
        fastres.load(random)
    empty = saved / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(fastres.ModelFormatError, match="not a Keras model file"):
        fastres.load(empty)
    with pytest.raises(fastres.ModelFormatError, match="cannot read"):
        fastres.load(saved / "does-not-exist.h5")


@pytest.mark.parametrize("name", ["good.h5", "good.keras"])
def test_truncated_file(saved, name):
    data = (saved / name).read_bytes()
    cut = saved / f"cut-{name}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(fastres.ModelFormatError, match="damaged or truncated|not a .keras file"):
        fastres.load(cut)


def test_missing_weights_group(saved):
    path = copy(saved, "good.h5", "missing.h5")
    with h5py.File(path, "r+") as f:
        layer = [n for n in f["model_weights"] if n.startswith("conv2d")][0]
        del f["model_weights"][layer]
    with pytest.raises(fastres.ModelFormatError, match=f"layer '{layer}'"):
        fastres.load(path)


def test_kernel_of_wrong_shape(saved):
    path = copy(saved, "good.h5", "wrongshape.h5")
    with h5py.File(path, "r+") as f:
        layer = [n for n in f["model_weights"] if n.startswith("dense")][-1]  # Keras numbers names per process
        group = f["model_weights"][layer]
        name = [n for n in group.attrs["weight_names"] if "kernel" in str(n)][0]
        name = name.decode() if isinstance(name, bytes) else name
        del group[name]
        group[name] = np.zeros((3, 7), np.float32)
    with pytest.raises(fastres.ModelFormatError, match=rf"layer '{layer}' \(Dense\): kernel has shape \(3, 7\)"):
        fastres.load(path)


def _edit_keras_config(saved, new, edit):
    path = saved / new
    with zipfile.ZipFile(saved / "good.keras") as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "config.json":
                config = json.loads(data)
                edit(config["config"]["layers"])
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    return path


def test_unsupported_layer(saved):
    def edit(layers):
        layers[-1]["class_name"] = "Conv3D"
        layers[-1]["config"]["name"] = layers[-1]["name"] = "leaky"
    path = _edit_keras_config(saved, "unsupported.keras", edit)
    with pytest.raises(fastres.UnsupportedLayerError, match="layer 'leaky' has class 'Conv3D'"):
        fastres.load(path)


def test_lambda_layer_is_refused_not_run(saved):
    keras = km.keras2()
    inp = keras.Input((4, 4, 1))
    out = keras.layers.Lambda(lambda t: t * 2, name="doubler")(inp)
    path = saved / "lambda.h5"
    keras.Model(inp, keras.layers.Flatten()(out)).save(path)
    with pytest.raises(fastres.UnsupportedLayerError, match="layer 'doubler' is a Lambda layer"):
        fastres.load(path)


def test_unsupported_option(saved):
    def edit(layers):
        conv = [entry for entry in layers if entry["class_name"] == "Conv2D"][0]
        conv["config"]["dilation_rate"] = [2, 2]
    with pytest.raises(fastres.UnsupportedLayerError, match="dilation"):
        fastres.load(_edit_keras_config(saved, "dilated.keras", edit))


@pytest.mark.parametrize("x,message", [
    (np.zeros((13, 11, 3), np.float32), r"expected a batch of images \(N, 13, 11, 3\)"),
    (np.zeros((2, 13, 11, 4), np.float32), r"axis 3 is 4, not 3"),
    (np.zeros((2, 12, 11, 3), np.float32), r"axis 1 is 12, not 13"),
    (np.zeros((1, 13, 11, 3), np.complex64), "dtype complex64"),
    (np.array([["a"]]), "dtype <U1"),
])
def test_bad_inputs(saved, x, message):
    model = fastres.load(saved / "good.h5")
    with pytest.raises(fastres.InputError, match=message):
        model.predict(x)


def test_bad_batch_size(saved):
    model = fastres.load(saved / "good.h5")
    with pytest.raises(fastres.InputError, match="batch_size must be a positive int"):
        model.predict(np.zeros((1, 13, 11, 3), np.float32), batch_size=0)


def test_input_too_small_for_free_size_model(saved, tmp_path):
    keras = km.keras3()
    km.seed(keras, 1)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 5, name="wide")(inp)
    path = tmp_path / "free.keras"
    keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x)).save(path)
    fr = fastres.load(path)
    assert fr.input_shape == (None, None, None, 3)
    assert fr.predict(np.ones((1, 9, 6, 3), np.float32)).shape == (1, 4)
    with pytest.raises(fastres.InputError, match="too small for this model: layer 'wide'"):
        fr.predict(np.zeros((1, 3, 8, 3), np.float32))
    with pytest.raises(fastres.InputError, match=r"expected \(N, H, W, 3\) \(axis 3 is 1, not 3\)"):
        fr.predict(np.zeros((1, 9, 6, 1), np.float32))


def test_architecture_for_a_full_model(saved):
    with pytest.raises(fastres.FastresError, match="only for weights-only files"):
        fastres.load(saved / "good.h5", architecture="resnet50")


# ------------------------------------------------------------------ nested models

def _nested(keras, shared=False, two_outputs=False):
    """A model nesting 'mid', which nests 'inner' (a conv 'c1' and a batch-norm)."""
    L = keras.layers
    inp = keras.Input((8, 8, 3))
    y = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="c1")(inp))
    inner = keras.Model(inp, [y, L.ReLU(name="second")(y)] if two_outputs else y, name="inner")
    inp = keras.Input((8, 8, 3))
    x = inner(inp)
    mid = keras.Model(inp, L.ReLU(name="relu")(x[0] if two_outputs else x), name="mid")
    inp = keras.Input((8, 8, 3))
    x = mid(inp, training=False)
    if shared:
        x = keras.layers.Add()([x, mid(inp)])
    return keras.Model(inp, L.Dense(2, name="head")(L.Flatten()(x)))


@pytest.fixture(scope="module")
def nested_files(saved):
    files = {}
    for version in ("keras2", "keras3"):
        keras = getattr(km, version)()
        km.seed(keras, 2)
        model = km.randomize_batch_norm(_nested(keras))
        for suffix, _ in km.formats(version):
            files[version, suffix] = saved / f"nested_{version}{suffix}"
            model.save(files[version, suffix])
        files[version] = model
    return files


@pytest.mark.parametrize("version,suffix", [("keras2", ".h5"), ("keras3", ".h5"), ("keras3", ".keras")])
def test_nested_model_loads(nested_files, version, suffix):
    """The good file the tests below damage: two levels of nesting, read in full."""
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    assert_matches(fastres.load(nested_files[version, suffix]).predict(x), nested_files[version](x, training=False))


@pytest.mark.parametrize("version", ["keras2", "keras3"])
def test_nested_weights_missing_h5(nested_files, saved, version):
    path = copy(saved, nested_files[version, ".h5"].name, f"nested_missing_{version}.h5")
    with h5py.File(path, "r+") as f:
        del f["model_weights"]["mid"]["c1"]  # the datasets of layer c1, inside the group of model 'mid'
    with pytest.raises(fastres.ModelFormatError, match="layer 'c1' in model 'mid': weight 'c1/kernel(:0)?' is listed but missing"):
        fastres.load(path)
    with h5py.File(path, "r+") as f:
        del f["model_weights"]["mid"]
    with pytest.raises(fastres.ModelFormatError, match="nested model 'mid' is listed in layer_names but has no weights"):
        fastres.load(path)


def _edit_keras_member(source, path, member, edit):
    """Copy the .keras zip ``source`` to ``path`` with ``member``'s bytes replaced by ``edit(bytes)``."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            dst.writestr(item, edit(data) if item == member else data)


def test_nested_weights_missing_keras(nested_files, saved):
    path = saved / "nested_missing.keras"

    def drop_conv_weights(data):
        weights = saved / "weights_edit.h5"
        weights.write_bytes(data)
        with h5py.File(weights, "r+") as f:
            del f["layers/functional/layers/functional/layers/conv2d/vars"]
        return weights.read_bytes()

    _edit_keras_member(nested_files["keras3", ".keras"], path, "model.weights.h5", drop_conv_weights)
    with pytest.raises(fastres.ModelFormatError, match=r"layer 'c1' \(Conv2D\) in model 'mid/inner' has no weights"):
        fastres.load(path)


@pytest.mark.parametrize("version", ["keras2", "keras3"])
@pytest.mark.parametrize("problem,error,message", [
    ("shared", fastres.UnsupportedLayerError, r"layer 'mid' \(Functional\) is called 2 times \(a shared layer\)"),
    ("two_outputs", fastres.UnsupportedLayerError, "model 'mid/inner' has 2 outputs"),
])
def test_shared_or_multi_output_nested_model(saved, version, problem, error, message):
    keras = getattr(km, version)()
    path = saved / f"nested_{problem}_{version}.h5"
    _nested(keras, **{problem: True}).save(path)
    with pytest.raises(error, match=message):
        fastres.load(path)


def test_unknown_layer_inside_nested_model(nested_files, saved):
    path = saved / "nested_unknown.keras"

    def make_c1_conv3d(data):
        config = json.loads(data)
        mid = next(e for e in config["config"]["layers"] if e["name"] == "mid")
        inner = next(e for e in mid["config"]["layers"] if e["name"] == "inner")
        next(e for e in inner["config"]["layers"] if e["name"] == "c1")["class_name"] = "Conv3D"
        return json.dumps(config).encode()

    _edit_keras_member(nested_files["keras3", ".keras"], path, "config.json", make_c1_conv3d)
    with pytest.raises(fastres.UnsupportedLayerError, match="layer 'c1' in model 'mid/inner' has class 'Conv3D'"):
        fastres.load(path)
