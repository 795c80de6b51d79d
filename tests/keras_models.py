"""Reference Keras models built in the tests (fixed seeds, batch-norm statistics randomised).

``keras2()`` is tf_keras (the Keras 2 file format), ``keras3()`` is Keras 3.
"""
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def keras2():
    import tf_keras
    return tf_keras


def keras3():
    import keras
    return keras


def seed(keras, value=0):
    keras.utils.set_random_seed(value)


def all_layers(model):
    """Every layer of ``model``, inside nested models too."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from all_layers(layer)


def randomize_batch_norm(model, seed_value=0):
    """Give every BatchNormalization (nested ones too) non-trivial statistics so that folding is exercised."""
    rng = np.random.default_rng(seed_value)
    for layer in all_layers(model):
        if type(layer).__name__ == "BatchNormalization":
            new = []
            for w in layer.weights:
                name = w.name.split("/")[-1].split(":")[0]
                shape = tuple(w.shape)
                if name == "gamma":
                    new.append(rng.uniform(0.5, 1.5, shape))
                elif name == "beta":
                    new.append(rng.normal(0, 0.2, shape))
                elif name == "moving_mean":
                    new.append(rng.normal(0, 0.2, shape))
                else:
                    new.append(rng.uniform(0.5, 2.0, shape))
            layer.set_weights([a.astype(np.float32) for a in new])
    return model


def trained_like(model, x, seed_value=0, branch_gamma=(0.1, 0.3)):
    """Give a random-weight ResNet the statistics of a trained one, from a calibration batch ``x``.

    Random convolutions under random batch-norm statistics (``randomize_batch_norm``) lose the image
    on the way down a ResNet50: every input gets nearly the same logits and the same top-1 class.
    Calibrated statistics alone make it chaotic instead (a perturbation grows ~1.2x per block).
    A trained ResNet is neither, so here, as there:

    * every batch-norm's moving mean and variance are its input's statistics over ``x`` (each
      earlier layer normalised the same way), gamma and beta random as in ``randomize_batch_norm``;
    * the last batch-norm of each residual branch (``*_branch2c``, ``*_3_bn``) has a small gamma,
      drawn from ``branch_gamma``: the identity path carries the signal, as in trained ResNets;
    * the classifier (the last Dense) reads standardised features: its kernel is divided by the
      features' standard deviation over ``x`` and its bias centres them, so the logits, and the
      top classes, depend on the input.

    Keras 3 only.  Returns ``model``.
    """
    import re

    randomize_batch_norm(model, seed_value)
    rng = np.random.default_rng(seed_value + 1)
    layers = [l for l in all_layers(model) if type(l).__name__ == "BatchNormalization"]
    for layer in layers:
        if re.search(r"(branch2c|_3_bn)$", layer.name):
            layer.gamma.assign(rng.uniform(*branch_gamma, tuple(layer.gamma.shape)).astype(np.float32))
    momenta = [l.momentum for l in layers]
    for layer in layers:
        layer.momentum = 0.0   # one training-mode pass: moving statistics := this batch's statistics
    model(x, training=True)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    dense = model.layers[-1]
    features = np.asarray(type(model)(model.inputs, dense.input)(x, training=False), np.float64)
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-3
    kernel = np.asarray(dense.kernel, np.float64) / std[:, None]
    dense.kernel.assign(kernel.astype(np.float32))
    dense.bias.assign((-mean @ kernel).astype(np.float32))
    return model


def course_resnet50(keras, input_shape=(64, 64, 3), classes=6, activation=None):
    """The classic course ResNet50: res2a_branch2a / bn2a_branch2a names, AveragePooling2D(2) + Flatten + Dense."""
    L = keras.layers
    init = keras.initializers.GlorotUniform(seed=0)

    def block(x, f, filters, stage, name, s=None):
        """The course's identity block (s=None) or convolutional block (a projected shortcut, stride s)."""
        conv, bn = f"res{stage}{name}_branch", f"bn{stage}{name}_branch"
        f1, f2, f3 = filters
        shortcut = x
        x = L.Conv2D(f1, 1, strides=s or 1, padding="valid", name=conv + "2a", kernel_initializer=init)(x)
        x = L.BatchNormalization(axis=3, name=bn + "2a")(x)
        x = L.Activation("relu")(x)
        x = L.Conv2D(f2, f, padding="same", name=conv + "2b", kernel_initializer=init)(x)
        x = L.BatchNormalization(axis=3, name=bn + "2b")(x)
        x = L.Activation("relu")(x)
        x = L.Conv2D(f3, 1, padding="valid", name=conv + "2c", kernel_initializer=init)(x)
        x = L.BatchNormalization(axis=3, name=bn + "2c")(x)
        if s is not None:
            shortcut = L.Conv2D(f3, 1, strides=s, padding="valid", name=conv + "1", kernel_initializer=init)(shortcut)
            shortcut = L.BatchNormalization(axis=3, name=bn + "1")(shortcut)
        x = L.Add()([x, shortcut])
        return L.Activation("relu")(x)

    inp = keras.Input(input_shape)
    x = L.ZeroPadding2D((3, 3))(inp)
    x = L.Conv2D(64, 7, strides=2, name="conv1", kernel_initializer=init)(x)
    x = L.BatchNormalization(axis=3, name="bn_conv1")(x)
    x = L.Activation("relu")(x)
    x = L.MaxPooling2D((3, 3), strides=(2, 2))(x)
    for stage, filters, blocks, stride in [(2, 64, "abc", 1), (3, 128, "abcd", 2), (4, 256, "abcdef", 2), (5, 512, "abc", 2)]:
        for name in blocks:
            x = block(x, 3, [filters, filters, 4 * filters], stage, name, s=stride if name == "a" else None)
    x = L.AveragePooling2D((2, 2), name="avg_pool")(x)
    x = L.Flatten()(x)
    x = L.Dense(classes, activation=activation, name=f"fc{classes}", kernel_initializer=init)(x)
    return keras.Model(inp, x, name="ResNet50")


def applications_resnet(keras, depth=50, input_shape=(224, 224, 3), classes=1000):
    """keras.applications ResNet{50,101,152} with random weights and logits out."""
    make = {50: keras.applications.ResNet50, 101: keras.applications.ResNet101, 152: keras.applications.ResNet152}[depth]
    return make(weights=None, input_shape=input_shape, classes=classes, classifier_activation=None)


def small_sequential(keras):
    L = keras.layers
    return keras.Sequential([
        keras.Input((13, 11, 3)),
        L.Conv2D(8, 3, activation="relu"),
        L.BatchNormalization(),
        L.MaxPooling2D(2),
        L.Conv2D(12, 1, use_bias=False),
        L.ReLU(),
        L.Flatten(),
        L.Dense(7, activation="relu"),
        L.Dense(5),
    ])


def rare_options(keras):
    """Same-padding stride-2 conv, BN without scale (and without center), GlobalMaxPooling2D, AveragePooling same."""
    L = keras.layers
    inp = keras.Input((15, 14, 5))
    x = L.Conv2D(16, 3, strides=2, padding="same")(inp)
    x = L.BatchNormalization(scale=False, epsilon=0.01)(x)
    y = L.Activation("relu")(x)
    z = L.Conv2D(16, 1, padding="valid", use_bias=False)(y)
    z = L.BatchNormalization(center=False)(z)
    x = L.Add()([y, z])
    x = L.ReLU()(x)
    x = L.AveragePooling2D(3, strides=2, padding="same")(x)
    x = L.Conv2D(9, 2, strides=2, padding="same", activation="relu")(x)
    x = L.BatchNormalization()(x)         # after a relu: cannot be folded, runs as its own kernel
    x = L.GlobalMaxPooling2D()(x)
    x = L.Dense(4)(x)
    return keras.Model(inp, x)


def formats(version):
    """The file suffixes and the format fastres reports, for every format that Keras version writes."""
    return {"keras2": [(".h5", "keras2-h5")], "keras3": [(".h5", "keras3-h5"), (".keras", "keras3-zip")]}[version]


def transfer_models(keras, base, classes=5):
    """The models users build around a headless ResNet ``base`` (include_top=False, pooling=None).

    ``transfer``: the fine-tuning recipe (Rescaling, base(training=False), pooling, Dropout, Dense);
    ``nested`` and ``unnested``: one network (base, pooling, Dense) with the base as a layer and
    with the base's layers in the model itself; ``sequential``: Sequential([base, pooling, Dense]).
    The heads are linear: the tests compare logits.
    """
    L = keras.layers
    shape = tuple(base.input.shape[1:])
    inp = keras.Input(shape)
    x = L.Rescaling(1 / 127.5, offset=-1)(inp)
    x = base(x, training=False)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dropout(0.3)(x)
    transfer = keras.Model(inp, L.Dense(classes)(x))
    inp = keras.Input(shape)
    nested = keras.Model(inp, L.Dense(classes)(L.GlobalAveragePooling2D()(base(inp, training=False))))
    unnested = keras.Model(base.input, L.Dense(classes)(L.GlobalAveragePooling2D()(base.output)))
    sequential = keras.Sequential([keras.Input(shape), base, L.GlobalMaxPooling2D(), L.Dense(3)])
    return dict(transfer=transfer, nested=nested, unnested=unnested, sequential=sequential)
