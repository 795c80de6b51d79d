"""keras.applications ResNet V2 (pre-activation blocks) as full files and weights-only files."""
import numpy as np
import pytest

import fastres
import keras_models as km
from conftest import assert_matches

VERSIONS = ["keras2", "keras3"]


def images(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def build(keras, make, size, seed, classes=10):
    km.seed(keras, seed)
    model = make(weights=None, input_shape=(size, size, 3), classes=classes, classifier_activation=None)
    return km.randomize_batch_norm(model, seed_value=seed)


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    """One ResNet50V2 (64x64, 10 classes, logits) per Keras version, saved in every format."""
    folder = tmp_path_factory.mktemp("v2")
    found = {}
    for version in VERSIONS:
        keras = getattr(km, version)()
        model = build(keras, keras.applications.ResNet50V2, 64, 21)
        paths = {}
        for suffix, _ in km.formats(version):
            paths[suffix] = folder / f"resnet50v2_{version}{suffix}"
            model.save(paths[suffix])
        found[version] = keras, model, paths, folder
    return found


@pytest.mark.parametrize("version,suffix", [(v, s) for v in VERSIONS for s, _ in km.formats(v)])
def test_resnet50v2_file(v2, version, suffix):
    _, model, paths, _ = v2[version]
    fr = fastres.load(paths[suffix])
    x = images((2, 64, 64, 3), seed=22)
    assert_matches(fr.predict(x), model(x, training=False))
    rows = {row["name"]: row for row in fr.describe()}
    # the batch-norms after a convolution are folded into it; the pre-activation ones (after an Add
    # whose output is also the next shortcut) and post_bn run as one scale-shift+ReLU each
    assert not any(row["kind"].startswith("BatchNormalization") for row in rows.values())
    scale_shifts = sorted(name for name, row in rows.items() if row["kind"].startswith("ScaleShift"))
    assert scale_shifts == sorted([f"conv{s}_block{b}_preact_bn" for s, n in zip((2, 3, 4, 5), (3, 4, 6, 3))
                                   for b in range(1, n + 1)] + ["post_bn"])
    assert all(rows[name]["kind"] == "ScaleShift+relu" for name in scale_shifts)
    assert rows["conv3_block2_2_conv"]["folded"] == ["conv3_block2_2_pad", "conv3_block2_2_bn", "conv3_block2_2_relu"]


def test_resnet50v2_weights_only(v2):
    keras, model, _, folder = v2["keras2"]
    path = folder / "resnet50v2_weights.h5"
    model.save_weights(path)
    fr = fastres.load(path, architecture="resnet50v2", classifier_activation=None)
    assert fr.input_shape == (None, None, None, 3) and fr.output_shape == (None, 10)
    x = images((2, 64, 64, 3), seed=23)
    assert_matches(fr.predict(x), model(x, training=False))
    with pytest.raises(fastres.ModelFormatError, match="ResNet V2 weights .* is the architecture 'resnet50' right"):
        fastres.load(path, architecture="resnet50")


def test_resnet50v2_headless_weights_only(v2):
    """include_top=False weights: the architecture ends at post_relu, (N, h, w, 2048), any input size."""
    keras, model, _, folder = v2["keras2"]
    features = keras.Model(model.input, model.get_layer("post_relu").output)
    path = folder / "resnet50v2_features.h5"
    features.save_weights(path)
    fr = fastres.load(path, architecture="resnet50v2")
    assert fr.output_shape == (None, None, None, 2048)
    x = images((1, 64, 64, 3), seed=24)
    assert_matches(fr.predict(x), features(x, training=False))


@pytest.mark.parametrize("depth,version,weights_only", [(101, "keras3", False), (152, "keras2", True)])
def test_deeper_v2(depth, version, weights_only, tmp_path):
    keras = getattr(km, version)()
    make = {101: keras.applications.ResNet101V2, 152: keras.applications.ResNet152V2}[depth]
    model = build(keras, make, 32, depth, classes=7)
    path = tmp_path / (f"v2_{depth}.h5" if weights_only else f"v2_{depth}.keras")
    if weights_only:
        model.save_weights(path)
        fr = fastres.load(path, architecture=f"resnet{depth}v2", classifier_activation=None)
    else:
        model.save(path)
        fr = fastres.load(path)
    x = images((2, 32, 32, 3), seed=depth)
    assert_matches(fr.predict(x), model(x, training=False))
