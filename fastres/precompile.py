"""Ahead-of-time compilation: every kernel the engine can run, compiled into Numba's cache.

For container images and read-only installs: run ``fastres compile`` once where the cache
is writable (at image build time), and later starts load the compiled kernels instead of
compiling them (~15 s).  The kernels are compiled for this machine's CPU (Numba's cache is
keyed by it): an image built on another CPU compiles again on first use.  Numba uses only a
cache directory it can write to, even to read from it: for a read-only install, set
``NUMBA_CACHE_DIR`` to the same writable directory when compiling and when running.

Numba's compile-time types depend on dtypes, ranks and layouts, never on sizes, so one small
synthetic model that holds every kind of fused operation (and a Winograd and an im2col
convolution, and a bf16 one) compiles everything a real model runs.
"""
import os
import tempfile
import time

import numpy as np

from . import kernels as K
from .errors import FastresError
from .graph import Activation, Layer
from .kernels import amx, roofline
from .model import Model


def cache_dir():
    """The directory Numba writes fastres's compiled kernels to (``NUMBA_CACHE_DIR`` or beside the sources)."""
    return K.conv2d_forward._cache._cache_path


def check_writable(path):
    """Raise FastresError with what to do when ``path`` cannot take new cache files."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fastres-probe-"):
            pass
    except OSError as exc:
        raise FastresError(f"the Numba cache directory {path} is not writable ({exc.strerror or exc}): run "
                           "'fastres compile' as a user who can write there (e.g. when the image is built), or set "
                           "NUMBA_CACHE_DIR to a writable directory") from None


def _synthetic_model():
    """A small model with every kind of fused operation fastres plans (random weights)."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def conv(name, src, filters, kernel, cin, padding="same", activation="linear"):
        return Layer(name, "Conv2D", [src], dict(filters=filters, kernel=(kernel, kernel), stride=1, padding=padding,
                                                 use_bias=True, activation=Activation(activation)),
                     [w(kernel, kernel, cin, filters), w(filters)])

    def act(name, src, **options):
        return Layer(name, "Activation", [src], dict(activation=Activation(**options)))

    c = 8
    bn = Layer("bn", "BatchNormalization", ["c1"], dict(epsilon=1e-3, center=True, scale=True, axis=-1),
               [w(c), w(c), w(c), np.abs(w(c)) + 0.5])
    layers = [
        Layer("input", "InputLayer", []),
        conv("c1", "input", c, 3, c, activation="relu"),       # padded input, ReLU in the store
        bn, act("sigmoid", "bn", kind="sigmoid"),               # a scale-shift step, an activation in place
        conv("c2", "sigmoid", c, 1, c),
        Layer("add", "Add", ["c2", "sigmoid"]), act("relu", "add", kind="relu"),   # a residual in the store
        Layer("pad", "ZeroPadding2D", ["relu"], dict(pads=(1, 1, 1, 1))),
        # "same": a "valid" pooling would take the padding in (``rewrites.fold_padding``)
        Layer("max", "MaxPooling2D", ["pad"], dict(pool=(3, 3), stride=(2, 2), padding="same")),
        Layer("avg", "AveragePooling2D", ["max"], dict(pool=(2, 2), stride=(1, 1), padding="same")),
        act("tanh", "avg", kind="tanh"), act("leaky", "tanh", kind="relu", negative_slope=0.2, max_value=6.0),
        Layer("sum", "Add", ["tanh", "leaky", "avg"]),
        Layer("gap", "GlobalAveragePooling2D", ["sum"], dict(keepdims=False)),
        Layer("gmp", "GlobalMaxPooling2D", ["sum"], dict(keepdims=True)),
        Layer("flat", "Flatten", ["gmp"]),
        Layer("d1", "Dense", ["gap"], dict(units=10, use_bias=True, activation=Activation("relu")), [w(c, 10), w(10)]),
        Layer("d2", "Dense", ["flat"], dict(units=10, use_bias=False, activation=Activation()), [w(c, 10)]),
        Layer("logits", "Add", ["d1", "d2"]), act("softmax", "logits", kind="softmax"),
    ]
    return Model(layers, "softmax", (16, 16, c), "synthetic", "", "<synthetic>")


def compile_all():
    """Compile every kernel into the cache; returns (cache directory, seconds).

    Raises
    ------
    FastresError
        When the cache directory is not writable (nothing would be kept).
    """
    path = cache_dir()
    check_writable(path)
    start = time.perf_counter()
    model = _synthetic_model()
    for batch in (1, 2):
        model.predict(np.ones((batch, 16, 16, 8), np.float32))
    x = np.ones((1, 12, 12, 16), np.float32)
    for packed, winograd in ((K.pack_conv2d(np.ones((3, 3, 16, 16), np.float32)), 4),
                             (K.pack_conv2d(np.ones((3, 3, 16, 16), np.float32)), 2),   # F(2x2, 3x3) in float32
                             (K.pack_conv2d(np.ones((3, 3, 16, 16), np.float32), im2col=True), False),
                             (K.pack_conv2d(np.ones((3, 3, 16, 16), np.float32), precision="bf16"), False),
                             # bf16 Winograd F(2x2, 3x3) where it can run (else the same direct plan again)
                             (K.pack_conv2d(np.ones((3, 3, 16, 16), np.float32), precision="bf16"), True)):
        plan = K.Conv2DPlan(packed, x.shape, 1, (1, 1, 1, 1), winograd=winograd)
        out = np.empty(plan.output_shape, np.float32)
        plan(out, x, np.zeros(16, np.float32), np.ones_like(out), True)
    # tasks of a few tiles (a 4x4 output, four panels): the streamed direct kernel
    x = np.ones((1, 4, 4, 16), np.float32)
    for precision in ("fp32", "bf16"):
        packed = K.pack_conv2d(np.ones((3, 3, 16, 64), np.float32), precision=precision)
        plan = K.Conv2DPlan(packed, x.shape, 1, (1,) * 4)
        plan.measure_split = False  # the rule's split, 3 tiles a task (no timing, nothing recorded)
        out = np.empty(plan.output_shape, np.float32)
        plan(out, x, np.zeros(64, np.float32), np.ones_like(out), True)
    # bf16's other paths: (on AMX) the tiles, a strided 1x1's subsampling and a fed output; the vector kernel
    x = np.ones((1, 12, 12, 32), np.float32)
    first = K.Conv2DPlan(K.pack_conv2d(np.ones((1, 1, 32, 32), np.float32), precision="bf16"), x.shape, 1, (0,) * 4)
    for kernel, stride, pads in (((3, 3, 32, 32), 1, (1,) * 4), ((1, 1, 32, 32), 2, (0,) * 4), ((3, 3, 32, 32), 2, (1,) * 4)):
        plan = K.Conv2DPlan(K.pack_conv2d(np.ones(kernel, np.float32), precision="bf16"), x.shape, stride, pads)
        if first.can_feed(plan):
            first.feed(plan)
            first(np.empty(first.output_shape, np.float32), x, np.zeros(32, np.float32))
        out = np.empty(plan.output_shape, np.float32)
        plan(out, x, np.zeros(32, np.float32), np.ones_like(out), True)
    # the roofline's kernels, with which bench and profile measure the machine
    roofline.fma_peak_forward(np.empty((1, roofline.ACC), np.float32), 1)
    roofline.read_sum_forward(np.empty(1, np.float32), np.ones(16, np.float32))
    if amx.AMX:
        amx.peak_forward(np.empty(1, np.float32), np.zeros(512, np.uint16), 1)
    return path, time.perf_counter() - start
