"""Layers around the ResNet body: inference identities, preprocessing, and head activations,
each in a small Keras 2 and Keras 3 model saved in every format, fastres against Keras."""
import numpy as np
import pytest

import fastres
import keras_models as km
from conftest import assert_matches

CASES = [(v, suffix) for v in ("keras2", "keras3") for suffix, _ in km.formats(v)]


def images(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def load_both(version, suffix, build, folder, seed=0):
    """Build ``build(keras)`` with a fixed seed, randomise its batch-norms, save it, and load it in fastres."""
    keras = getattr(km, version)()
    km.seed(keras, seed)
    model = km.randomize_batch_norm(build(keras), seed_value=seed)
    path = folder / f"{build.__name__}_{version}{suffix}"
    model.save(path)
    fr = fastres.load(path)
    return model, fr, [kind for _, kind, _ in fr.operations]


def identities(keras):
    L = keras.layers
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same")(inp)
    x = L.Dropout(0.5)(x)
    x = L.SpatialDropout2D(0.3)(x)
    x = L.GaussianNoise(0.2)(x)
    x = L.BatchNormalization()(x)
    x = L.GaussianDropout(0.2)(x)
    x = L.AlphaDropout(0.1)(x)
    x = L.ActivityRegularization(l1=0.01)(x)
    x = L.Identity()(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(4)(L.Dropout(0.2)(x)))


@pytest.mark.parametrize("version,suffix", CASES)
def test_inference_identities_vanish(version, suffix, tmp_path):
    model, fr, kinds = load_both(version, suffix, identities, tmp_path)
    x = images((3, 12, 12, 3), seed=1)
    assert_matches(fr.predict(x), model(x, training=False))
    # with the identities gone, the batch-norm and ReLU fold into the convolution
    assert kinds == ["InputLayer", "Conv2D", "GlobalAveragePooling2D", "Dense"]


def rescaled_border(keras):
    """A per-channel Rescaling with an offset before a "same" convolution: not foldable."""
    L = keras.layers
    inp = keras.Input((9, 10, 3))
    scale = np.array([1 / 255, 2 / 255, 3 / 255], np.float32)  # Keras writes a numpy array as a "__numpy__" dict
    x = L.Rescaling(scale, offset=[-1.0, 0.5, -0.25])(inp)
    return keras.Model(inp, L.Conv2D(6, 3, padding="same")(x))


@pytest.mark.parametrize("version,suffix", CASES)
def test_rescaling_before_zero_padding_stays_exact(version, suffix, tmp_path):
    model, fr, kinds = load_both(version, suffix, rescaled_border, tmp_path)
    x = images((2, 9, 10, 3), seed=2, scale=100.0) + 128
    result, expected = fr.predict(x), np.asarray(model(x, training=False))
    assert_matches(result, expected)
    for border in (np.s_[:, [0, -1]], np.s_[:, :, [0, -1]]):  # the padded rows and columns
        assert_matches(result[border], expected[border])
    assert kinds == ["InputLayer", "ScaleShift", "Conv2D"]


def padded_max_pool(keras):
    """ZeroPadding2D before a "valid" max pooling, as ResNet50's pool1_pad and pool1_pool, but with
    negative values at the borders, where the padded zeros win."""
    L = keras.layers
    inp = keras.Input((9, 8, 3))
    x = L.Conv2D(6, 3, padding="same", bias_initializer=keras.initializers.Constant(-2.0))(inp)
    x = L.ZeroPadding2D(((1, 2), (0, 1)))(x)
    return keras.Model(inp, L.MaxPooling2D(3, strides=2)(x))


def padded_average_pool(keras):
    """ZeroPadding2D before a "valid" average pooling: the padded zeros count in the mean."""
    L = keras.layers
    inp = keras.Input((9, 8, 3))
    x = L.Conv2D(6, 3, padding="same", bias_initializer=keras.initializers.Constant(-2.0))(inp)
    x = L.ZeroPadding2D(1)(x)
    return keras.Model(inp, L.AveragePooling2D(2)(x))


@pytest.mark.parametrize("build", [padded_max_pool, padded_average_pool])
@pytest.mark.parametrize("version,suffix", CASES)
def test_zero_padding_folds_into_the_pooling_after_it(version, suffix, build, tmp_path):
    model, fr, kinds = load_both(version, suffix, build, tmp_path)
    x = images((2, 9, 8, 3), seed=4)
    expected = np.asarray(model(x, training=False))
    pool = "MaxPooling2D" if build is padded_max_pool else "AveragePooling2D"
    assert kinds == ["InputLayer", "Conv2D", pool]  # the ZeroPadding2D is gone
    if build is padded_max_pool:
        assert (expected == 0).any()  # windows where a padded zero is the largest value
    assert_matches(fr.predict(x), expected)


def preprocessing_folded(keras):
    """Normalization before a valid convolution, a scale-only Rescaling before a "same" one and an
    adapted Normalization before a Dense: each folds exactly into the layer it feeds."""
    L = keras.layers
    inp = keras.Input((9, 10, 3))
    x = L.Normalization(mean=[120.0, 110.0, 100.0], variance=[3000.0, 2500.0, 4000.0])(inp)
    x = L.Conv2D(6, 3, padding="valid", activation="relu")(x)
    x = L.Rescaling(2.0)(x)
    x = L.Conv2D(5, 3, padding="same")(x)
    x = L.GlobalAveragePooling2D()(x)
    norm = L.Normalization()
    norm.adapt(np.random.default_rng(0).standard_normal((64, 5)).astype(np.float32) * 3 + 1)
    return keras.Model(inp, L.Dense(4)(norm(x)))


@pytest.mark.parametrize("version,suffix", CASES)
def test_preprocessing_folds_where_exact(version, suffix, tmp_path):
    model, fr, kinds = load_both(version, suffix, preprocessing_folded, tmp_path)
    x = images((3, 9, 10, 3), seed=3, scale=50.0) + 120
    assert_matches(fr.predict(x), model(x, training=False))
    assert kinds == ["InputLayer", "Conv2D", "Conv2D", "GlobalAveragePooling2D", "Dense"]


def activations(keras):
    """Every ReLU option, LeakyReLU, tanh and sigmoid, on convolutions, a batch-norm and an Add."""
    L = keras.layers
    inp = keras.Input((10, 10, 3))
    x = L.Conv2D(8, 3, activation="tanh")(inp)
    x = L.Conv2D(8, 3, padding="same")(x)
    x = L.ReLU(max_value=6.0)(x)
    y = L.Conv2D(8, 1)(x)
    y = L.LeakyReLU(0.2)(y)
    y = L.Conv2D(8, 3, padding="same")(y)
    y = L.ReLU(negative_slope=0.1, threshold=0.5)(y)
    y = L.Conv2D(8, 1)(y)
    y = L.BatchNormalization()(y)
    y = L.ReLU(max_value=4.0, negative_slope=0.05, threshold=0.25)(y)
    z = L.Conv2D(8, 1, activation="sigmoid")(y)
    x = L.Activation("tanh")(L.Add()([x, L.Conv2D(8, 1)(z)]))
    x = L.GlobalMaxPooling2D()(x)
    return keras.Model(inp, L.Dense(6)(x))


@pytest.mark.parametrize("version,suffix", CASES)
def test_activations_fused(version, suffix, tmp_path):
    model, fr, kinds = load_both(version, suffix, activations, tmp_path)
    x = images((2, 10, 10, 3), seed=4, scale=8.0)  # large enough to reach relu6's clip and the thresholds
    assert_matches(fr.predict(x), model(x, training=False))
    assert kinds == ["InputLayer"] + ["Conv2D"] * 7 + ["GlobalMaxPooling2D", "Dense"]
    kinds = [row["kind"] for row in fr.describe((10, 10, 3))]
    assert kinds[1:4] == ["Conv2D+tanh", "Conv2D+relu6", "Conv2D+leaky_relu(0.2)"]


@pytest.mark.parametrize("version,suffix", CASES)
@pytest.mark.parametrize("head", ["sigmoid", "tanh", "softmax"])
@pytest.mark.parametrize("form", ["dense", "layer"])
def test_head_activations(version, suffix, head, form, tmp_path):
    def head_model(keras):
        L = keras.layers
        inp = keras.Input((8, 8, 3))
        x = L.GlobalAveragePooling2D()(L.Conv2D(16, 3, activation="relu")(inp))
        if form == "dense":
            return keras.Model(inp, L.Dense(5, activation=head)(x))
        return keras.Model(inp, L.Activation(head)(L.Dense(5)(x)))

    model, fr, kinds = load_both(version, suffix, head_model, tmp_path)
    x = images((4, 8, 8, 3), seed=5, scale=3.0)
    assert_matches(fr.predict(x), model(x, training=False))
    assert kinds == ["InputLayer", "Conv2D", "GlobalAveragePooling2D", "Dense"]
    assert fr.output_is_probability == (head == "softmax")


def keras3_activation_names(keras):
    L = keras.layers
    inp = keras.Input((8, 8, 3))
    x = L.Activation("relu6")(L.Conv2D(8, 3)(inp))
    x = L.Conv2D(8, 3, activation="leaky_relu")(x)
    x = L.Softmax()(L.Dense(4)(L.Flatten()(x)))
    return keras.Model(inp, x)


def test_keras3_activation_names(tmp_path):
    model, fr, kinds = load_both("keras3", ".keras", keras3_activation_names, tmp_path)
    x = images((3, 8, 8, 3), seed=6, scale=10.0)
    assert_matches(fr.predict(x), model(x, training=False))
    assert "Activation" not in kinds and "Softmax" not in kinds


def sequential_blocks(keras):
    """Sequential models (without an Input) nested in a Functional one: the batch-norm inside the first
    folds into the convolution outside it, across the boundary."""
    L = keras.layers
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3)(inp)
    x = keras.Sequential([L.BatchNormalization(), L.ReLU()], name="bn_relu")(x, training=False)
    return keras.Model(inp, keras.Sequential([L.GlobalAveragePooling2D(), L.Dense(4)], name="head")(x))


@pytest.mark.parametrize("version,suffix", CASES)
def test_nested_sequential_blocks(version, suffix, tmp_path):
    model, fr, kinds = load_both(version, suffix, sequential_blocks, tmp_path)
    x = images((2, 8, 8, 3), seed=7)
    assert_matches(fr.predict(x), model(x, training=False))
    assert kinds == ["InputLayer", "Conv2D", "GlobalAveragePooling2D", "Dense"]
    assert [name.rpartition("/")[0] for name, _, _ in fr.operations] == ["", "", "head", "head"]


def residuals(keras):
    """Residual adds a convolution may store over (the last reader of the value it adds) and ones it may not
    (the value is its own input too, or is read again), the model's input among them."""
    L = keras.layers
    inp = keras.Input((6, 6, 128))  # two panels of outputs: stored over its own input, the second reads wrong
    a = L.Conv2D(128, 3, padding="same")(inp)
    b = L.Add()([L.Conv2D(128, 1)(a), a])  # ``a`` is the convolution's input as well
    c = L.Conv2D(128, 3, padding="same", activation="relu")(b)
    d = L.Add()([L.Conv2D(128, 1)(c), b])  # the last reader of ``b``
    e = L.Add()([L.Conv2D(128, 1)(d), inp])  # the input, read again below
    f = L.ReLU()(L.Add()([L.Conv2D(128, 1)(e), inp]))  # its last reader
    return keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(f)))


@pytest.mark.parametrize("version,suffix", [CASES[0], CASES[-1]])
def test_convolutions_storing_over_their_residual(version, suffix, tmp_path):
    model, fr, kinds = load_both(version, suffix, residuals, tmp_path)
    assert kinds == ["InputLayer"] + ["Conv2D"] * 6 + ["GlobalAveragePooling2D", "Dense"]
    for seed in (8, 9):  # twice: a pass that wrote over its input buffer leaves the next one right
        x = images((2, 6, 6, 128), seed=seed)
        assert_matches(fr.predict(x), model(x, training=False))
