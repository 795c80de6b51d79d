"""Transfer-learning files: a headless keras.applications ResNet50 nested in a Functional or
Sequential model, in every format each Keras version writes, and ResNet50 feature extractors."""
import numpy as np
import pytest

import fastres
import keras_models as km
from conftest import assert_matches

VERSIONS = ["keras2", "keras3"]
CASES = [(v, suffix) for v in VERSIONS for suffix, _ in km.formats(v)]


def images(shape, seed=0, high=255.0):
    """Pixel-like inputs (0..255), as a user's images reach a model that rescales them itself."""
    return np.random.default_rng(seed).uniform(0, high, shape).astype(np.float32)


@pytest.fixture(scope="module")
def built():
    """One ResNet50 (include_top=False, any input size, random weights) per Keras version, the models
    built around it (keras_models.transfer_models) and its feature extractors."""
    found = {}
    for version in VERSIONS:
        keras = getattr(km, version)()
        km.seed(keras, 3)
        base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
        km.randomize_batch_norm(base, seed_value=3)
        for layer in base.layers[:100]:  # fine-tuning the top only: .h5 files then list the nested
            layer.trainable = False       # model's trainable weights first, the frozen ones after
        models = km.transfer_models(keras, base)
        L = keras.layers
        for pooling, pool in (("none", None), ("avg", L.GlobalAveragePooling2D), ("max", L.GlobalMaxPooling2D)):
            # what keras.applications.ResNet50(include_top=False, pooling=...) builds
            models[f"features_{pooling}"] = keras.Model(base.input, pool()(base.output) if pool else base.output)
        found.update({(version, name): model for name, model in models.items()})
    return found


def saved(built, version, name, suffix, folder):
    """The Keras model, and fastres's load of it saved as ``suffix`` (the ~95 MB file is deleted after)."""
    model = built[version, name]
    path = folder / f"{name}_{version}{suffix}"
    model.save(path)
    loaded = fastres.load(path)
    path.unlink()
    return model, loaded


@pytest.mark.parametrize("version,suffix", CASES)
def test_transfer_learning_model(built, version, suffix, tmp_path):
    """The README's fine-tuned model: Rescaling, ResNet50(training=False), pooling, Dropout, Dense."""
    model, fr = saved(built, version, "transfer", suffix, tmp_path)
    assert fr.file_format == dict(km.formats(version))[suffix] and fr.input_shape == (None, None, None, 3) and fr.output_shape == (None, 5)
    for size, seed in ((64, 1), (96, 2)):
        x = images((2, size, size, 3), seed)
        assert_matches(fr.predict(x), model(x, training=False))
    ops = {name: kind for name, kind, _ in fr.operations}
    names = [n.rpartition("/")[2] for n in ops]
    assert "dropout" not in names and not any(kind == "BatchNormalization" for kind in ops.values())
    assert ops["resnet50/conv1_conv"] == "Conv2D"
    # the rescaling (offset -1) is not folded into conv1: conv1 pads zeros, which would not be shifted
    assert [kind for kind in ops.values()].count("ScaleShift") == 1


@pytest.mark.parametrize("version,suffix", CASES)
def test_sequential_with_nested_resnet50(built, version, suffix, tmp_path):
    model, fr = saved(built, version, "sequential", suffix, tmp_path)
    x = images((2, 64, 64, 3), seed=4, high=1.0)
    assert_matches(fr.predict(x), model(x, training=False))


@pytest.mark.parametrize("version", VERSIONS)
def test_nested_folds_and_fuses_as_unnested(built, version, tmp_path):
    """Batch-norm folding and conv+add+ReLU fusion work inside the nested ResNet50 as in the flat one."""
    suffix = km.formats(version)[-1][0]
    loaded = {}
    for name in ("nested", "unnested"):
        model, loaded[name] = saved(built, version, name, suffix, tmp_path)
        x = images((1, 64, 64, 3), seed=5, high=1.0)
        assert_matches(loaded[name].predict(x), model(x, training=False))
    nested, unnested = ([(kind, len(folded)) for _, kind, folded in loaded[n].operations] for n in ("nested", "unnested"))
    assert len(nested) == len(unnested) and nested == unnested
    ops = loaded["nested"].operations
    conv1 = next(folded for name, _, folded in ops if name == "resnet50/conv1_conv")
    assert conv1 == ("resnet50/conv1_pad", "resnet50/conv1_bn", "resnet50/conv1_relu")
    fused_adds = [kind for _, kind, folded in ops if any(f.endswith("_add") for f in folded)]
    assert fused_adds == ["Conv2D"] * 16  # every residual Add of the 16 blocks, in a convolution's store


@pytest.mark.parametrize("version,suffix", CASES)
@pytest.mark.parametrize("pooling,size", [("none", 64), ("avg", 80), ("max", 32)])
def test_feature_extractor(built, version, suffix, pooling, size, tmp_path):
    model, fr = saved(built, version, f"features_{pooling}", suffix, tmp_path)
    x = images((2, size, size, 3), seed=size, high=1.0)
    result = fr.predict(x)
    side = -(-size // 32)
    assert result.shape == ((2, side, side, 2048) if pooling == "none" else (2, 2048))
    assert_matches(result, model(x, training=False))
