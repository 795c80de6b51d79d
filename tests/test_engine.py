"""fastres.load(...).predict against TensorFlow on real Keras models and files, logits compared."""
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest

import fastres
import keras_models as km
from conftest import assert_matches


def images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def build_and_save(keras, build, seed, path, weights_only=False):
    """Build a reference model with fixed seeds and randomised batch-norm statistics, and save it."""
    km.seed(keras, seed)
    model = km.randomize_batch_norm(build(), seed_value=seed)
    if weights_only:
        model.save_weights(path)
    else:
        model.save(path)
    return model


# ------------------------------------------------------------------ the course ResNet50

@pytest.mark.parametrize("version,suffix", [("keras2", ".h5"), ("keras3", ".h5"), ("keras3", ".keras")])
def test_course_resnet50(version, suffix, files):
    keras = getattr(km, version)()
    path = files / f"course_{version}{suffix}"
    model = build_and_save(keras, lambda: km.course_resnet50(keras), 1, path)
    x = images((3, 64, 64, 3), seed=2)
    fr = fastres.load(path)
    assert fr.input_shape == (None, 64, 64, 3) and fr.output_shape == (None, 6)
    assert fr.file_format == {"keras2": "keras2-h5", "keras3": "keras3-h5" if suffix == ".h5" else "keras3-zip"}[version]
    assert_matches(fr.predict(x), model(x, training=False))
    assert "res2a_branch2a" in fr.summary(print_fn=lambda s: None)
    # every batch-norm is folded and every Add fused into a convolution
    kinds = [kind for _, kind, _ in fr.operations]
    assert "BatchNormalization" not in kinds and "Add" not in kinds and "Activation" not in kinds
    # the stride-1 projection shortcut (res2a_branch1) and the block's last convolution run as one
    stacked = [row for row in fr.describe() if row["kind"] == "Conv2D+Conv2D+relu"]
    assert len(stacked) == 1 and {stacked[0]["name"], stacked[0]["folded"][0]} == {"res2a_branch1", "res2a_branch2c"}


def test_course_resnet50_softmax_output(files):
    keras = km.keras2()
    path = files / "course_softmax.h5"
    model = build_and_save(keras, lambda: km.course_resnet50(keras, activation="softmax"), 3, path)
    x = images((2, 64, 64, 3), seed=4)
    probs = fastres.load(path).predict(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    assert_matches(probs, model(x, training=False))


# ------------------------------------------------------------------ keras.applications

@pytest.mark.parametrize("depth,size,batch,version", [
    (50, 224, 1, "keras3"), (50, 96, 2, "keras2"), (101, 64, 2, "keras3"), (152, 64, 1, "keras2"),
])
def test_applications_resnet(depth, size, batch, version, files):
    keras = getattr(km, version)()
    path = files / f"resnet{depth}_{size}_{version}{'.keras' if version == 'keras3' else '.h5'}"
    model = build_and_save(keras, lambda: km.applications_resnet(keras, depth, (size, size, 3), classes=10), depth, path)
    x = images((batch, size, size, 3), seed=depth)
    fr = fastres.load(path)
    assert_matches(fr.predict(x), model(x, training=False))
    assert [row["name"] for row in fr.describe() if row["kind"] == "Conv2D+Conv2D+relu"] == ["conv2_block1_0_conv"]


def test_resnet101_at_224(files):
    keras = km.keras2()
    path = files / "resnet101_224.h5"
    model = build_and_save(keras, lambda: km.applications_resnet(keras, 101, (224, 224, 3)), 7, path)
    x = images((1, 224, 224, 3), seed=7)
    assert_matches(fastres.load(path).predict(x), model(x, training=False))


# ------------------------------------------------------------------ weights-only files

def test_weights_only_applications_layout(files):
    keras = km.keras2()
    path = files / "resnet50_weights.h5"
    model = build_and_save(keras, lambda: km.applications_resnet(keras, 50, (224, 224, 3), classes=12), 11, path,
                           weights_only=True)
    fr = fastres.load(path, architecture="resnet50", classifier_activation=None)
    assert fr.input_shape == (None, None, None, 3) and fr.output_shape == (None, 12)
    x = images((1, 224, 224, 3), seed=11)
    assert_matches(fr.predict(x), model(x, training=False))
    smaller = km.applications_resnet(keras, 50, (80, 80, 3), classes=12)  # the input size is free
    smaller.load_weights(path)
    x = images((2, 80, 80, 3), seed=12)
    assert_matches(fr.predict(x), smaller(x, training=False))
    # include_top=False weights (no predictions layer): the feature map, (N, h, w, 2048)
    features = keras.Model(smaller.input, smaller.get_layer("conv5_block3_out").output)
    features.save_weights(files / "resnet50_features.h5")
    fr = fastres.load(files / "resnet50_features.h5", architecture="resnet50")
    assert fr.output_shape == (None, None, None, 2048)
    assert_matches(fr.predict(x), features(x, training=False))


def test_weights_only_classic_layout(files):
    keras = km.keras2()
    path = files / "course_weights.h5"
    model = build_and_save(keras, lambda: km.course_resnet50(keras), 12, path, weights_only=True)
    x = images((2, 64, 64, 3), seed=12)
    assert_matches(fastres.load(path, architecture="resnet50", classifier_activation=None).predict(x),
                   model(x, training=False))
    probs = fastres.load(path, architecture="resnet50").predict(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)


def test_weights_only_needs_architecture(files):
    path = files / "course_weights.h5"
    if not path.exists():
        pytest.skip("made by test_weights_only_classic_layout")  # same module, runs first
    with pytest.raises(fastres.ModelFormatError, match="weights only; pass architecture="):
        fastres.load(path)
    with pytest.raises(fastres.ModelFormatError, match="unknown architecture"):
        fastres.load(path, architecture="vgg16")
    with pytest.raises(fastres.ModelFormatError, match="lack .* layers of resnet101"):
        fastres.load(path, architecture="resnet101")


# ------------------------------------------------------------------ small models and rare options

@pytest.mark.parametrize("version", ["keras2", "keras3"])
@pytest.mark.parametrize("build,shape", [(km.small_sequential, (13, 11, 3)), (km.rare_options, (15, 14, 5))])
def test_small_models(version, build, shape, files):
    keras = getattr(km, version)()
    path = files / f"{build.__name__}_{version}.h5"
    model = build_and_save(keras, lambda: build(keras), 5, path)
    x = images((3, *shape), seed=5)
    assert_matches(fastres.load(path).predict(x), model(x, training=False))


def test_split_attributes(files):
    """HDF5 splits long attributes into layer_names0, layer_names1, ...; fastres joins them."""
    keras = km.keras2()
    path = files / "split.h5"
    model = build_and_save(keras, lambda: km.rare_options(keras), 6, path)
    with h5py.File(path, "r+") as f:
        for group in [f["model_weights"]] + [f["model_weights"][n] for n in f["model_weights"]]:
            for attr in ("layer_names", "weight_names"):
                if attr in group.attrs and len(group.attrs[attr]) > 1:
                    values = list(group.attrs[attr])
                    del group.attrs[attr]
                    group.attrs[attr + "0"] = values[: len(values) // 2]
                    group.attrs[attr + "1"] = values[len(values) // 2 :]
    x = images((2, 15, 14, 5), seed=6)
    assert_matches(fastres.load(path).predict(x), model(x, training=False))


# ------------------------------------------------------------------ engine behaviour

@pytest.fixture(scope="module")
def small(files):
    keras = km.keras3()
    path = files / "small.keras"
    model = build_and_save(keras, lambda: km.rare_options(keras), 8, path)
    return model, path


def test_batches_dtypes_and_empty(small):
    model, path = small
    fr = fastres.load(path)
    x = images((7, 15, 14, 5), seed=9)
    expected = model(x, training=False)
    assert_matches(fr.predict(x, batch_size=3), expected)
    assert_matches(fr.predict(x.astype(np.float64)), expected)
    assert_matches(fr.predict(x[:1]), expected[:1])
    empty = fr.predict(x[:0])
    assert empty.shape == (0, 4) and empty.dtype == np.float32


def test_concurrent_predicts_match_serial(small):
    _, path = small
    fr = fastres.load(path)
    inputs = [images((2, 15, 14, 5), seed=s) for s in range(6)]
    serial = [fr.predict(x) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            results[i] = fr.predict(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)


def test_no_framework_imported(small):
    _, path = small
    code = (
        "import sys, numpy as np, fastres\n"
        f"m = fastres.load({str(path)!r})\n"
        "m.predict(np.zeros((1, 15, 14, 5), np.float32))\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'keras', 'tf_keras', 'torch', 'jax')]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_threads_argument(small):
    _, path = small
    before = fastres.get_num_threads()
    assert fastres.load(path, threads=1).threads == 1
    assert fastres.get_num_threads() == before  # the count belongs to the model (tests/test_hostile_files.py)
    with pytest.raises(fastres.FastresError, match="between 1 and"):
        fastres.load(path, threads=0)


def test_a_plan_binds_its_convolutions_again_for_another_thread_count(small):
    """The convolutions are bound once per plan and thread count (``Plan.bind``): a model run on 1 thread,
    then on all, rebinds its plan and gives the same answer (the work splits differ, not the sums)."""
    _, path = small
    x = images((2, 15, 14, 5), seed=7)
    one, every = fastres.load(path, threads=1), fastres.load(path, threads=fastres.get_num_threads())
    first = one.predict(x)
    plan = one._local.plans[x.shape]
    assert plan.threads == 1 and all(hasattr(s, "conv") == hasattr(s, "args") for s in plan.steps)
    one.threads = every.threads
    np.testing.assert_array_equal(one.predict(x), first)
    assert plan.threads == every.threads and one._local.plans[x.shape] is plan
    np.testing.assert_array_equal(every.predict(x), first)


def _one_convolution(w, b, input_shape):
    """A model of one 3x3 "same" Conv2D + ReLU named "c", kernel ``w`` (a copy) and bias ``b``, built in memory."""
    from fastres.graph import Activation, Layer

    layers = [Layer("input", "InputLayer", []),
              Layer("c", "Conv2D", ["input"], dict(filters=w.shape[3], kernel=(3, 3), stride=1, padding="same",
                                                  use_bias=True, activation=Activation("relu")), [w.copy(), b])]
    return fastres.Model(layers, "c", input_shape, "test", "", "<test>")


def test_one_packing_per_convolution(rng):
    """A 3x3 convolution keeps the weights its plans can run: in a model of one input size where one image
    runs it as Winograd, only the Winograd packing stays; where the input size is free, both (a smaller
    image runs direct, whatever ran before it)."""
    import naive
    from conftest import assert_close

    w = (rng.standard_normal((3, 3, 64, 64)) * 0.05).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)

    def model(size=None):
        return _one_convolution(w, b, (size, size, 64))

    small, big = images((1, 8, 8, 64), seed=5), images((1, 56, 56, 64), seed=6)
    expected = {x.shape: naive.conv2d(x, w, b, padding="same", relu=True) for x in (small, big)}
    fr = model()
    assert_close(fr.predict(small), expected[small.shape])       # too small for Winograd: direct
    assert fr._local.plans[small.shape].kernels["c"].startswith("direct")
    assert_close(fr.predict(big), expected[big.shape], rtol=1e-4)  # Winograd; the size is free: both packings
    assert fr._local.plans[big.shape].kernels["c"].startswith("winograd")
    assert fr._packed["c"].panels is not None and list(fr._packed["c"]._winograd) == [4]
    fr._local.plans.clear()
    first = fr.predict(small)                                    # a new plan: direct, as on a fresh model
    assert fr._local.plans[small.shape].kernels["c"].startswith("direct")
    np.testing.assert_array_equal(first, model().predict(small))
    fixed = model(56)
    assert_close(fixed.predict(big), expected[big.shape], rtol=1e-4)
    assert fixed._packed["c"].panels is None                     # one size, Winograd for one image: released
    odd, done = images((3, 56, 56, 64), seed=7), []
    thread = threading.Thread(target=lambda: done.append(fixed.predict(odd)))  # its own plans, Winograd too
    thread.start()
    thread.join()
    assert_close(done[0], naive.conv2d(odd, w, b, padding="same", relu=True), rtol=1e-4)
    fresh = model()
    fresh.predict(small)
    assert fresh._packed["c"].panels is not None and fresh._packed["c"]._winograd == {}  # direct only


def test_a_batch_runs_the_same_whatever_ran_before(rng):
    """A layer that is direct for one image and Winograd for three (8x8x128: 4 blocks an image) runs each
    batch size one way, whichever came first: the same bits either way (a Dask worker meets its chunks
    in any order)."""
    w = (rng.standard_normal((3, 3, 128, 128)) * 0.05).astype(np.float32)
    b = rng.standard_normal(128).astype(np.float32)

    def model():
        return _one_convolution(w, b, (8, 8, 128))

    x = images((3, 8, 8, 128), seed=8)
    one_first, three_first = model(), model()
    results = {"one first": [one_first.predict(x[:1]), one_first.predict(x)]}
    results["three first"] = [three_first.predict(x), three_first.predict(x[:1])][::-1]
    for fr in (one_first, three_first):
        assert fr._local.plans[x[:1].shape].kernels["c"].startswith("direct")
        assert fr._local.plans[x.shape].kernels["c"].startswith("winograd")
    for got, want in zip(results["three first"], results["one first"]):
        np.testing.assert_array_equal(got, want)


def test_a_layer_released_to_f2x2_runs_f4x4_at_a_larger_batch_the_same_whatever_ran_first(rng):
    """7x7x384: F(2x2, 3x3) for one image (F(4x4)'s 21 MB of weights would serve 4 blocks), F(4x4, 3x3) for two
    (8 blocks).  Only the F(2x2) packing is kept (one image chose Winograd); F(4x4) is made from the kernel read
    back from it, the same whichever batch came first."""
    import naive
    from conftest import assert_close

    w = (rng.standard_normal((3, 3, 384, 384)) * 0.02).astype(np.float32)
    b = rng.standard_normal(384).astype(np.float32)
    x = images((2, 7, 7, 384), seed=9)
    one_first, two_first = (_one_convolution(w, b, (7, 7, 384)) for _ in range(2))
    results = {"one first": [one_first.predict(x[:1]), one_first.predict(x)]}
    results["two first"] = [two_first.predict(x), two_first.predict(x[:1])][::-1]
    expected = naive.conv2d(x, w, b, padding="same", relu=True)
    for fr in (one_first, two_first):
        assert fr._local.plans[x[:1].shape].kernels["c"].startswith("winograd F(2x2,3x3)")
        assert fr._local.plans[x.shape].kernels["c"].startswith("winograd F(4x4,3x3)")
        assert fr._packed["c"].panels is None and fr._packed["c"].base == 2
    for got, want in zip(results["two first"], results["one first"]):
        np.testing.assert_array_equal(got, want)
    assert_close(results["one first"][0], expected[:1], rtol=3e-6)
    assert_close(results["one first"][1], expected, rtol=1e-4)


# ------------------------------------------------------------------ a batch cut in two (model.HeadPlan)

def test_a_batch_is_cut_only_to_fit_the_memory_limit():
    """``_cuts``: ResNet50 can be cut after any block (one value goes on), never inside one.  ``_head``: one
    plain plan where it fits the limit, else the first cut that fits, else the fewest bytes any cut needs."""
    from fastres import architectures, model

    layers = architectures._applications(architectures.BLOCKS["resnet50"], 1000, "softmax")
    shape = (8, 224, 224, 3)
    output = layers[-1].name
    cuts = model._cuts(layers, output)
    blocks = [f"conv{stage}_block{block}_out" for stage, count in zip((2, 3, 4, 5), (3, 4, 6, 3))
              for block in range(1, count + 1)]
    assert [cut for cut in cuts if cut.endswith("_out")] == blocks and "conv2_block1_1_relu" not in cuts
    plain = model.plan_bytes(layers, output, shape)
    needs = {cut: model.plan_bytes(layers, output, shape, cut=cut) for cut in cuts}
    assert model._head(layers, output, shape, "fp32", plain) == (None, plain)
    one = (1, *shape[1:])  # one image is never cut
    assert model._head(layers, output, one, "fp32", 1) == (None, model.plan_bytes(layers, output, one))
    for limit in (plain - 1, plain // 2, plain // 4):
        first = next(cut for cut in cuts if needs[cut] <= limit)
        assert model._head(layers, output, shape, "fp32", limit) == (first, needs[first])
    assert model._head(layers, output, shape, "fp32", 1) == (None, min(needs.values()))


@pytest.fixture(scope="module")
def resnet50_160(files):
    keras = km.keras3()
    path = files / "resnet50_160.keras"
    return build_and_save(keras, lambda: km.applications_resnet(keras, 50, (160, 160, 3), classes=10), 11, path), path


def test_a_batch_over_the_memory_limit_runs_its_first_blocks_image_by_image(resnet50_160):
    """Under a memory limit that one batch's buffers exceed, a batch of 6 runs its first blocks image by image
    and the rest as a batch: the plain plan's results to the bit, Keras's within the usual bound, profiled
    layer by layer as the plain plan is; under a limit no cut fits, an InputError that says what would."""
    from fastres import model as engine

    keras_model, path = resnet50_160
    x = images((6, 160, 160, 3), seed=12)
    plain = fastres.load(path)
    expected = plain.predict(x)
    assert type(plain._local.plans[x.shape]) is engine.Plan
    need = engine.plan_bytes(plain._ops, plain._output, x.shape)
    fr = fastres.load(path)
    fr.memory_limit = need - 1  # (at load the limit holds the weights too: 90 MiB here)
    got = fr.predict(x)
    plan = fr._local.plans[x.shape]
    assert isinstance(plan, engine.HeadPlan)
    assert plan.cut == engine._head(fr._ops, fr._output, x.shape, "fp32", need - 1)[0]
    assert engine.plan_bytes(fr._ops, fr._output, x.shape, cut=plan.cut) <= need - 1
    np.testing.assert_array_equal(got, expected)
    assert_matches(got, keras_model(x, training=False))
    profile = fr.profile(x, runs=1)
    assert [name for name, _ in profile] == [op.name for op in fr._ops if op.kind != "InputLayer"]
    one = engine.plan_bytes(fr._ops, fr._output, (1, *x.shape[1:]))
    fr.memory_limit = one
    with pytest.raises(fastres.InputError, match="over the memory limit.*pass batch_size=1 or less"):
        fr.predict(x[:5])  # (a shape not planned yet)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 64])
def test_kernels_read_straight_into_panels(chunk_bytes, precision, files, monkeypatch):
    """load reads each kernel from the file into its packed panels, batch-norms folded there, a chunk of rows
    at a time: the very weights that folding the whole kernel and packing it gives."""
    from fastres import kernels as K, limits, model as M
    from fastres.kerasfile import read_model_file
    from fastres.rewrites import rewrite

    keras = km.keras3()
    path = files / "panels.h5"
    if not path.exists():
        build_and_save(keras, lambda: km.rare_options(keras), 8, path)
    real = M._pack_stored
    monkeypatch.setattr(M, "_pack_stored", lambda kernel, precision: real(kernel, precision, chunk_bytes))
    fr = fastres.load(path, precision=precision)
    with read_model_file(path) as data:  # the reference: every array read whole, folded, then packed
        layers, output, shape = M._graph(path, data, None, "softmax", limits.memory_limit())
        for layer in layers:
            layer.weights = [w.read() if hasattr(w, "read") else w for w in layer.weights]
        ops, _ = rewrite(layers, output, shape)
    packed = [op for op in ops if op.kind in ("Conv2D", "Dense")]
    assert len(packed) == 4 and any(op.folded for op in packed)  # three convolutions (two with a batch-norm), a dense
    for op in packed:
        np.testing.assert_array_equal(fr._packed[op.name].panels, K.pack_conv2d(op.weights[0], precision=precision).panels)
