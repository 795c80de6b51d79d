"""``fastres.load`` and the Model: a fused layer graph, planned per input shape, run on the kernels."""
import contextlib
import math
import threading
import time
import warnings

import numba
import numpy as np

from . import architectures, kernels as K, limits
from .errors import FastresError, InputError, ModelFormatError
from .config import parse_config
from .graph import ACTIVATION_KINDS, Layer, StoredKernel, attach_weights, infer_shapes
from .kerasfile import read_model_file
from .kernels import _numba, amx, bf16
from .kernels._memory import PAGE
from .kernels.conv import PANEL
from .rewrites import rewrite


PRECISIONS = ("fp32", "bf16")
# bytes between the page offsets of a plan's value slots (``_memory.PAGE``): 1 KiB + a line, so that up
# to 16 slots differ by at least a line modulo 1 KiB (ResNet's rows with a residual are 1 KiB or a
# multiple).  With every slot at the same offset, ResNet50's 1x1s with a residual took 1.03-1.05x the
# time, the whole 224x1 pass 0.99-1.04x, 224x8 1.03x (Zen 3, same process)
SLOT_STAGGER = 1088


def load(path, architecture=None, threads=None, classifier_activation="softmax", memory_limit=None,
         precision="fp32"):
    """Load a Keras model file and return a Model that runs it with fastres's kernels.

    Parameters
    ----------
    path : str or os.PathLike
        A Keras 2 or 3 full-model ``.h5``, a Keras 3 ``.keras``, or a weights-only ``.h5``.
    architecture : "resnet50", "resnet101", "resnet152" or "resnet50v2", "resnet101v2", "resnet152v2",
        for a weights-only file only.
    threads : int, optional
        Threads this model's kernels use, in whatever thread calls ``predict``; default:
        the count ``fastres.set_num_threads`` set (else all cores).
    classifier_activation : "softmax" or None
        For a weights-only file: the last layer's activation (None gives logits),
        as keras.applications' argument of the same name.
    memory_limit : int or str, optional
        Bytes (or a size such as ``"2G"``) the weights, and each plan's buffers, may take;
        default: ``fastres.limits.memory_limit()`` (half the physical memory).
    precision : "fp32" or "bf16"
        bf16 rounds every Conv2D and Dense kernel (folded in float32) to bfloat16 once, here,
        and keeps only that: half the weight memory; each convolution rounds its input to bf16
        and accumulates in float32.  The products run on AMX tiles where the CPU and OS allow
        it (``fastres.kernels.amx``), else on ``vdpbf16ps`` or float32 FMAs (``fastres.kernels.bf16``);
        on a CPU without AVX512-BF16 (so no faster arithmetic), with a warning.

    Raises
    ------
    ModelFormatError, UnsupportedLayerError
        Naming the file, the layer and the problem, for any file that cannot be run.
    """
    threads = _checked_threads(threads)
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise FastresError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if precision == "bf16" and not _numba.BF16_DOT:
        warnings.warn("fastres: this CPU has no AVX512-BF16; bf16 runs with bf16 weights widened to float32 for the "
                      "products (the inputs stay float32): half the weight memory and traffic, not twice the "
                      "arithmetic rate", stacklevel=2)
    try:
        limit = limits.resolve_limit(memory_limit)
    except ValueError as exc:
        raise FastresError(str(exc)) from None
    try:
        with read_model_file(path) as data:
            layers, output, input_shape = _graph(path, data, architecture, classifier_activation, limit)
            return Model(layers, output, input_shape, data.format, data.keras_version, str(path),
                         threads=threads, memory_limit=limit, precision=precision)
    except FastresError as exc:
        if str(path) in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}") from None
    except ValueError as exc:  # a kernel refusing folded values, e.g. a batch-norm with variance + epsilon = 0
        raise ModelFormatError(f"{path}: {exc}") from None
    except (MemoryError, RecursionError) as exc:  # a bound this module missed: still the file's fault
        raise ModelFormatError(f"{path}: the model needs more than this process has ({type(exc).__name__})") from None


def _graph(path, data, architecture, classifier_activation, limit):
    """The checked layer graph of a read file, its weights attached: (layers, output, input shape)."""
    if data.config is None:
        if architecture is None:
            raise ModelFormatError(f"{path} holds weights only; pass architecture= (one of "
                                   f"{', '.join(architectures.BLOCKS)})")
        if classifier_activation not in (None, "linear", "softmax"):
            raise FastresError(f"classifier_activation must be 'softmax' or None, got {classifier_activation!r}")
        layers = architectures.build(architecture, data.weights, classifier_activation or "linear")
        input_shape, output = (None, None, 3), layers[-1].name
    else:
        if architecture is not None:
            raise FastresError(f"{path} is a full model; architecture= is only for weights-only files")
        layers, input_shape = parse_config(data.config)
        output = layers[-1].name
    try:
        attach_weights(layers, data.weights, input_shape, limit)
    except ValueError as exc:
        raise ModelFormatError(f"the model does not fit its own input shape {input_shape}: {exc}") from None
    return layers, output, input_shape


_default_threads = None  # set_num_threads's count: models without their own use it in every thread


def set_num_threads(n):
    """Set the number of threads of the kernels (1 .. cores), for every thread that runs a model.

    A model loaded with ``threads=`` keeps its own count.  Raises FastresError for a bad ``n``.
    """
    global _default_threads
    try:
        K.set_num_threads(n)
    except ValueError as exc:
        raise FastresError(str(exc)) from None
    _default_threads = n


def _checked_threads(n):
    """``n`` (None stays None) if it is a thread count the kernels accept, else FastresError."""
    cores = numba.config.NUMBA_NUM_THREADS
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cores):
        raise FastresError(f"threads must be an int between 1 and {cores}, got {n!r}")
    return n


@contextlib.contextmanager
def _threads(n):
    """Run the kernels in this thread on ``n`` threads (Numba's count is per calling thread); yields the count
    in effect.  (``numba.get_num_threads`` is asked once: right after a pass has streamed the weights through the
    caches it took 15 us, a third of a percent of a 64x64 pass.)"""
    before = numba.get_num_threads()
    if n is None or n == before:
        yield before
        return
    numba.set_num_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(before)


class Model:
    """A loaded model.  ``predict`` is safe to call from several threads at once."""

    def __init__(self, layers, output, input_shape, file_format, keras_version, path, threads=None,
                 memory_limit=None, precision="fp32"):
        self.layers = layers                       # as in the file (their weights are dropped once packed)
        self.file_format, self.keras_version, self.path = file_format, keras_version, path
        self.threads = threads                     # None: fastres.set_num_threads's count, else all cores
        self.memory_limit = limits.resolve_limit(memory_limit)
        self.precision = precision                 # "fp32" or "bf16": how the Conv2D/Dense weights are kept
        self._input_shape = tuple(input_shape)
        self._layer_params = {l.name: sum(w.size for w in l.weights) for l in layers}
        self.weights_bytes = sum(w.nbytes for l in layers for w in l.weights)
        self.file_params = sum(self._layer_params.values())
        self._ops, self._output = rewrite(layers, output, input_shape, take_weights=True)
        if None not in self._input_shape:  # a fixed size: refuse now what no input could run
            need = plan_bytes(self._ops, self._output, (1, *self._input_shape), precision)
            if need > self.memory_limit:
                raise ModelFormatError(f"one image needs {limits.human(need)} of buffers, over the memory limit of "
                                       f"{limits.human(self.memory_limit)}")
        self._params = {op.name: sum(w.size for w in op.weights) for op in self._ops}
        self._packed, self._bias = {}, {}
        for op in self._ops:
            if op.kind in ("Conv2D", "Dense"):
                kernel = op.weights[0]
                if isinstance(kernel, StoredKernel):  # read, checked, folded (and rounded) straight into its panels
                    packed = _pack_stored(kernel, precision)
                else:
                    packed = K.pack_conv2d(kernel, precision=precision)
                self._packed[op.name] = packed
                self._bias[op.name] = op.weights[1] if len(op.weights) > 1 else np.zeros(kernel.shape[-1], np.float32)
                op.weights = []  # only the packed copy stays in memory, released layer by layer
                del kernel
        self._local = threading.local()
        self._shapes = {}  # every layer's output shape, by input image shape (H, W, C)
        self.last_kernels = {}  # after profile(): the kernel each convolution ran, by layer name

    @property
    def packed_bytes(self):
        """Bytes of the packed Conv2D/Dense weights the model keeps (bf16: about half of fp32's).

        The direct kernel's panels, or for a 3x3 layer that a plan runs as Winograd its transformed
        packing (F(4x4, 3x3): four times larger, F(2x2, 3x3): 16/9), made when first planned (the direct panels
        then go: ``_release_direct``).
        """
        return sum(a.nbytes for p in self._packed.values() for a in (p.panels, *p.winograd_arrays()) if a is not None)

    @property
    def input_shape(self):
        """(None, H, W, C); H and W are None when any size is accepted."""
        return (None, *self._input_shape)

    @property
    def output_shape(self):
        return (None, *infer_shapes(self._ops, self._input_shape)[self._output])

    @property
    def operations(self):
        """The fused operations that run, in order (name, kind, folded layers)."""
        return [(op.name, op.kind, tuple(op.folded)) for op in self._ops]

    def summary(self, print_fn=print):
        """Print each layer of the file with its output shape and parameter count."""
        shapes = infer_shapes(self.layers, self._input_shape)
        rows = [(l.name, l.kind, str((None, *shapes[l.name])), self._layer_params[l.name]) for l in self.layers]
        width = max(len(r[0]) + len(r[1]) for r in rows) + 3
        lines = [f"{'layer (class)':{width}s} {'output shape':22s} params"]
        lines += [f"{f'{n} ({k})':{width}s} {s:22s} {p:,}" for n, k, s, p in rows]
        lines.append(f"total parameters: {sum(r[3] for r in rows):,}; "
                     f"{len(self._ops)} fused operations after folding and fusion")
        text = "\n".join(lines)
        print_fn(text)
        return text

    @property
    def output_is_probability(self):
        """True when the model ends in a softmax (its outputs are probabilities)."""
        last = next(op for op in self._ops if op.name == self._output)
        own = last.attrs["activation"] if last.kind in ACTIVATION_KINDS else last.activation
        return "softmax" in (own.kind, last.activation.kind)

    def describe(self, input_shape=None):
        """One dict per fused operation: name, kind, folded layers, output shape, parameters, FLOPs.

        ``input_shape`` is (H, W, C) for a model whose input size is free (default 224x224).
        FLOPs count a multiply-add as two, per image.
        """
        shape = self._concrete_input(input_shape)
        shapes = infer_shapes(self._ops, shape)
        rows = []
        for op in self._ops:
            out = shapes[op.name]
            ins = shapes[op.inputs[0]] if op.inputs else shape
            params = self._params[op.name]
            if op.kind == "Conv2D":  # (of each input: two stacked ones, ``rewrites.stack_shortcut``)
                kh, kw = op.attrs["kernel"]
                flops = 2 * int(np.prod(out)) * kh * kw * ins[-1] * len(op.inputs)
            elif op.kind == "Dense":
                flops = 2 * int(np.prod(out)) * ins[-1]
            elif op.kind in ("MaxPooling2D", "AveragePooling2D"):
                flops = int(np.prod(out)) * int(np.prod(op.attrs["pool"]))
            elif op.kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
                flops = int(np.prod(ins))
            elif op.kind in ("ScaleShift", "Add", *ACTIVATION_KINDS):
                flops = 2 * int(np.prod(out))
            else:
                flops = 0
            kind = "+".join([op.kind] * len(op.inputs)) if op.kind == "Conv2D" else op.kind
            kind += ("" if op.activation.linear else f"+{op.activation}") + ("+residual" if op.residual else "")
            rows.append({"name": op.name, "kind": kind, "folded": list(op.folded), "output_shape": [None, *out],
                         "params": int(params), "flops": int(flops)})
        return rows

    def _concrete_input(self, input_shape):
        if input_shape is None:
            input_shape = tuple(224 if d is None else d for d in self._input_shape)
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or any(w is not None and w != g for w, g in zip(self._input_shape, input_shape)):
            raise InputError(f"input shape {input_shape} does not fit the model's input {self.input_shape[1:]}")
        return input_shape

    def profile(self, x, runs=10):
        """Median seconds of each fused operation over ``runs`` forward passes of ``x``.

        Returns a list of (name, seconds) in execution order, one entry per fused operation.
        """
        x = self._check_input(x)
        with self._threads():
            self._run(x)  # plans and compiles
        plan = self._local.plans[x.shape]
        self.last_kernels = dict(plan.kernels)  # which kernel each convolution ran (profile shows it)
        samples = {name: [] for name in dict.fromkeys(plan.names)}
        for _ in range(max(1, runs)):
            plan.input[...] = x
            spent = dict.fromkeys(samples, 0.0)
            with self._threads():
                for name, step in zip(plan.names, plan.steps):
                    start = time.perf_counter()
                    step()
                    spent[name] += time.perf_counter() - start
            for name, seconds in spent.items():
                samples[name].append(seconds)
        return [(name, float(np.median(times))) for name, times in samples.items()]

    # ------------------------------------------------------------------ predict

    def _threads(self):
        """The thread count of this model's kernels, set for the calling thread while it runs."""
        return _threads(self.threads or _default_threads)

    def _check_input(self, x):
        """``x`` as an array of a real dtype and the model's shape (not converted: ``predict`` converts per batch)."""
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except (TypeError, ValueError) as exc:
                raise InputError(f"x cannot be converted to an array: {exc}") from None
        if x.dtype.kind not in "fiub":
            raise InputError(f"x has dtype {x.dtype}; expected float32 (or a real numeric type to convert)")
        if x.ndim != 4:
            raise InputError(f"x has shape {x.shape}; expected a batch of images {self._expected_input()}")
        for axis, (got, want) in enumerate(zip(x.shape[1:], self._input_shape), start=1):
            if want is not None and got != want:
                raise InputError(f"x has shape {x.shape}; expected {self._expected_input()} (axis {axis} is {got}, "
                                 f"not {want})")
        return x

    def _expected_input(self):
        """The input shape for messages: ``(N, 224, 224, 3)``, ``H`` and ``W`` where the size is free."""
        h, w, c = ("H" if self._input_shape[0] is None else self._input_shape[0],
                   "W" if self._input_shape[1] is None else self._input_shape[1], self._input_shape[2])
        return f"(N, {h}, {w}, {c})"

    def predict(self, x, batch_size=None):
        """Run the model on ``x`` (N, H, W, C) and return its output (N, ...) as float32.

        ``batch_size`` splits a large batch into runs of at most that many images; each run's
        slice of ``x`` is converted to float32 as it is copied into the plan's input buffer.

        Raises
        ------
        InputError
            For a wrong shape or dtype, or when one run's buffers would exceed the memory limit.
        """
        x = self._check_input(x)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        n = x.shape[0]
        step = max(1, n if batch_size is None else min(batch_size, n))
        out_shape = self._plan_shapes(x.shape)[self._output]
        out_bytes = 4 * n * math.prod(out_shape)
        if out_bytes > self.memory_limit:
            raise InputError(f"the output for {n} images is {limits.human(out_bytes)}, over the memory limit of "
                             f"{limits.human(self.memory_limit)}")
        out = np.empty((n, *out_shape), np.float32)
        with self._threads() as threads:
            for i in range(0, n, step):
                self._run(x[i:i + step], out[i:i + step], threads)
        return out

    def _plan_shapes(self, shape):
        """Every layer's output shape for a batch of ``shape`` (kept per image shape: a walk of the graph
        costs 0.1 ms, 1% of a 64x64 pass)."""
        shapes = self._shapes.get(shape[1:])
        if shapes is None:
            try:
                shapes = infer_shapes(self._ops, shape[1:])
            except ValueError as exc:
                raise InputError(f"x has shape {shape}, too small for this model: {exc}") from None
            if len(self._shapes) >= 16:
                self._shapes.clear()
            self._shapes[shape[1:]] = shapes
        return shapes

    def _run(self, x, out=None, threads=None):
        """Run ``x`` (one batch) through its plan (made on first use, per input shape and calling thread) into
        ``out``; ``threads``: the kernels' thread count in this thread, where the caller knows it."""
        plans = getattr(self._local, "plans", None)
        if plans is None:
            plans = self._local.plans = {}
        plan = plans.get(x.shape)
        if plan is None:
            if len(plans) >= 4:  # keep the memory of a few input shapes per thread
                plans.pop(next(iter(plans)))
            cut, need = _head(self._ops, self._output, x.shape, self.precision, self.memory_limit)
            if need > self.memory_limit:
                one = plan_bytes(self._ops, self._output, (1, *x.shape[1:]), self.precision)
                fit = self.memory_limit // max(1, one)
                raise InputError(f"a batch of {x.shape[0]} images of {x.shape[1]}x{x.shape[2]} needs "
                                 f"{limits.human(need)} of buffers, over the memory limit of "
                                 f"{limits.human(self.memory_limit)}"
                                 + (f"; pass batch_size={fit} or less" if fit else ""))
            plan = plans[x.shape] = Plan(self, x.shape) if cut is None else HeadPlan(self, x.shape, cut)
        return plan.run(x, out, threads)


def _pack_stored(kernel, precision="fp32", chunk_bytes=1 << 20):
    """``K.pack_conv2d`` of a kernel still in the file, read straight into its panels: no copy of the whole kernel.

    The panels are ``[Cout/64][KH*KW*Cin][64]``: the kernel's rows (KH*KW*Cin of them, Cout wide) are read
    about ``chunk_bytes`` at a time, each chunk a contiguous run of the dataset, into a small buffer, checked,
    scaled by the folded batch-norms and copied into their place in every panel; in bf16 rounded there, into
    panels of row pairs (``kernels.bf16.pack_bf16``), so no float32 copy of the kernel is made either.  A bf16
    kernel with an odd number of input channels, or one that AMX gathers (the thin stem), is read whole.
    """
    shape = kernel.shape if kernel.ndim == 4 else (1, 1, *kernel.shape)
    *lead, cin, cout = kernel.shape
    half = precision == "bf16"
    if half and (cin % 2 or amx.gathered(shape[:2], cin)):
        return K.pack_conv2d(kernel.read(), precision="bf16")
    nblk, width = -(-cout // PANEL), -(-cout // PANEL) * PANEL
    depth = math.prod(shape[:3])
    panels = (K.aligned_empty((1, nblk, depth // 2, PANEL, 2), np.uint16) if half
              else K.aligned_empty((1, nblk, depth, PANEL)))
    step = max(1, min(cin, chunk_bytes // (4 * width)))
    step = max(2, step - step % 2) if half else step  # whole row pairs (Cin is even)
    rows = np.zeros((step, width), np.float32)  # zero past Cout: the last panel's padding
    at, read = 0, kernel.stored.reader()
    for index in np.ndindex(*lead):
        for c0 in range(0, cin, step):
            n = min(step, cin - c0)
            read(rows, (*index, slice(c0, c0 + n), slice(None)), np.s_[:n, :cout])
            kernel.check(rows[:n])
            for scale in kernel.scales:  # in order: the same float32 products as on the whole kernel
                rows[:n, :cout] *= scale
            if half:
                pairs = bf16.to_bf16(rows[:n]).reshape(n // 2, 2, nblk, PANEL)
                panels[0, :, at // 2:(at + n) // 2] = pairs.transpose(2, 0, 3, 1)
            else:
                panels[0, :, at:at + n] = rows[:n].reshape(n, nblk, PANEL).transpose(1, 0, 2)
            at += n
    return K.PackedConv2D(shape, panels, False, precision)


def _last_uses(ops, output):
    """The index of the last operation that reads each value (an input or a residual); ``len(ops)`` for ``output``."""
    last_use = {}
    for i, op in enumerate(ops):
        for name in op.inputs + ([op.residual] if op.residual else []):
            last_use[name] = i
    last_use[output] = len(ops)
    return last_use


def _stacked_inputs(ops):
    """{value: (its partner, its place 0 or 1)} for the two inputs of each stacked convolution (``rewrites.stack_shortcut``)."""
    pairs = {}
    for op in ops:
        if op.kind == "Conv2D" and len(op.inputs) == 2:
            first, second = op.inputs
            pairs[first], pairs[second] = (second, 0), (first, 1)
    return pairs


def _over_residual(op, i, last_use, pairs, shapes):
    """Whether operation ``i`` may store its output over its residual: it is the residual's last reader, reads
    it only as the residual, and neither is a stacked input.  Every kernel reads a residual element just
    before it writes the output element at the same place, and nothing else there: a 56x56 64 -> 256 1x1
    with its residual evicted took 0.630 ms against 0.714 into another buffer (Zen 4), the line already
    being in cache for the write, and the slot is one fewer."""
    name = op.residual
    return (name is not None and last_use[name] == i and name not in op.inputs
            and shapes[name] == shapes[op.name] and name not in pairs and op.name not in pairs)


def _layout(ops, output, shapes, n):
    """Buffers of one forward pass: (slot of each value, its offset in the slot in floats, size of each slot).

    A value's slot is reused once its last reader has run; a Flatten is a view of its input.  The two
    inputs of a stacked convolution share one slot, the first input then the second: the first of them
    made takes the slot for both.  An operation that is the last reader of its residual writes over it
    (``_over_residual``).
    """
    last_use = _last_uses(ops, output)
    pairs = _stacked_inputs(ops)
    slots, free, slot_of, offset_of, users = [], [], {}, {}, {}
    for i, op in enumerate(ops):
        size = n * math.prod(shapes[op.name])
        if op.kind == "Flatten":
            slot, offset_of[op.name] = slot_of[op.inputs[0]], offset_of[op.inputs[0]]
        elif op.name in slot_of:  # the second made of a stacked pair: its place is kept
            slot = slot_of[op.name]
        elif _over_residual(op, i, last_use, pairs, shapes) and users[slot_of[op.residual]] == {op.residual}:
            slot, offset_of[op.name] = slot_of[op.residual], offset_of[op.residual]
        else:
            joint = 2 * size if op.name in pairs else size
            fits = [s for s in free if slots[s] >= joint]
            if fits:
                slot = min(fits, key=lambda s: slots[s])
                free.remove(slot)
            else:
                slot = len(slots)
                slots.append(joint)
            offset_of[op.name] = 0
            if op.name in pairs:
                partner, place = pairs[op.name]
                slot_of[partner], offset_of[op.name], offset_of[partner] = slot, place * size, (1 - place) * size
                users.setdefault(slot, set()).add(partner)
        slot_of[op.name] = slot
        users.setdefault(slot, set()).add(op.name)
        for name in [v for v in slot_of if last_use.get(v, -1) == i and v != output]:
            users[slot_of[name]].discard(name)
            if not users[slot_of[name]] and slot_of[name] not in free:
                free.append(slot_of[name])
    return slot_of, offset_of, slots


def _scratch_bytes(op, shapes, input_shape, n, precision="fp32"):
    """An upper estimate of the scratch a Conv2D or Dense plan allocates, by kind (bytes).

    "own": its tile starts; "padded": its padded input; "v", "m": its Winograd blocks.  A plan's
    convolutions share one buffer of each of the last three kinds (``_SharedScratch``), so a plan
    needs the largest of each.  The Winograd kernel packing is a weight, made once per layer, and
    not counted here.  In bf16 each convolution's bf16 (or, widened, float32) copy of its (padded)
    input, or of its gathered receptive fields, is counted whole (most share one buffer, but a fed one
    has its own), and a stride-1 3x3 may run Winograd F(2x2, 3x3) (its padded float32 input, bf16 ``v``
    and float32 ``m``).
    """
    found = {"own": 0, "padded": 0, "v": 0, "m": 0}
    if op.kind not in ("Conv2D", "Dense"):
        return found
    x = shapes[op.inputs[0]] if op.inputs else input_shape
    out = shapes[op.name]
    found["own"] = 8 * (n * math.prod(out[:-1]) + 64)  # the tile starts, int64
    if precision == "bf16":
        (kh, kw), cin = op.attrs["kernel"] if op.kind == "Conv2D" else (1, 1), x[-1]
        rows, cols = (x[0] + sum(op.pads[:2]) + kh, x[1] + sum(op.pads[2:]) + kw) if op.kind == "Conv2D" else (1, 1)
        padded = math.prod(x[:-1]) if op.kind == "Dense" else rows * cols * (cin + 1)
        gathered = math.prod(out[:-1]) * amx.im2col_depth((kh, kw), cin) if amx.gathered((kh, kw), cin) else 0
        rounded = (padded + gathered) * len(op.inputs)  # a gathering plan keeps its rounded, padded input too
        # (counted at 4 bytes: where the bf16 weights are widened, the padded input stays float32)
        found["own"] += 4 * (n * rounded + (32 + kw) * (kh * kw * cin + 32))  # and a tile block's slack
        if op.kind == "Conv2D" and (kh, kw) == (3, 3) and op.attrs["stride"] == 1:  # Winograd F(2x2, 3x3)
            found["padded"] = 4 * n * (x[0] + sum(op.pads[:2]) + 4) * (x[1] + sum(op.pads[2:]) + 4) * cin
            blocks = _winograd_blocks(out, n, cin, "bf16")
            found["v"], found["m"] = 2 * blocks * cin, 4 * blocks * out[-1]
        return found
    if op.kind == "Conv2D":
        (kh, kw), cin, cout = op.attrs["kernel"], x[-1], out[-1]
        winograd = (kh, kw) == (3, 3) and op.attrs["stride"] == 1
        if any(op.pads) or winograd or op.attrs["padding"] == "same" and (kh, kw) != (1, 1):
            rows, cols = x[0] + sum(op.pads[:2]) + kh + 6, x[1] + sum(op.pads[2:]) + kw + 6  # "same", whole blocks
            found["padded"] = 4 * n * rows * cols * cin
        if winograd:
            blocks = _winograd_blocks(out, n, cin, "fp32")
            found["v"], found["m"] = 4 * blocks * cin, 4 * blocks * cout
    return found


def _winograd_blocks(out, n, cin, precision):
    """The most products x blocks a Winograd plan of any of the precision's forms holds at once (``Conv2DPlan``'s
    ``images`` at a time: ``conv.winograd_images``), for an output of (OH, OW, Cout)."""
    most = 0
    for block in K.conv.WINOGRAD_FORMS[precision]:
        images, image_tiles = K.conv.winograd_images(n, block, out[:2], cin, out[-1])
        most = max(most, (block + 2) ** 2 * image_tiles * images)
    return most


def plan_bytes(ops, output, shape, precision="fp32", cut=None):
    """Bytes a plan for input ``shape`` (N, H, W, C) allocates: its buffers, convolution scratch and output copy
    (for a batch cut after the value ``cut``, a ``HeadPlan``: the image-by-image part's, the batch part's,
    their one shared scratch and the batch's input)."""
    shapes = infer_shapes(ops, shape[1:])
    n = shape[0]
    parts = [(ops, output, shape)]
    if cut is not None:
        head_ops, tail_ops = _split_at(ops, cut)
        parts = [(head_ops, cut, (1, *shape[1:])), (tail_ops, output, (n, *shapes[cut]))]
    total, scratch = 0 if cut is None else 4 * math.prod(shape), []
    for part_ops, part_output, part_shape in parts:
        part_shapes = infer_shapes(part_ops, part_shape[1:])
        _, _, slots = _layout(part_ops, part_output, part_shapes, part_shape[0])
        total += 4 * (sum(slots) + part_shape[0] * math.prod(part_shapes[part_output]))
        scratch += [_scratch_bytes(op, part_shapes, part_shape[1:], part_shape[0], precision) for op in part_ops]
    shared = sum(max((s.get(kind, 0) for s in scratch), default=0) for kind in _SharedScratch.KINDS)
    return total + sum(s["own"] for s in scratch) + shared


class _SharedScratch:
    """One buffer per kind of convolution scratch, shared by all the convolutions of a plan.

    A Conv2DPlan's padded input (``padded``), Winograd blocks (``v``, ``m``), im2col columns
    (``cols``) and bf16 input (``rounded``) are written whole before they are read, within its
    own call, and a plan runs one convolution at a time (a plan belongs to one thread): they can
    all live in the same memory.  (A bf16 input that another convolution writes, ``feed``, gets
    its own buffer again.)  ``share`` points a convolution's buffers at the plan's (its own are released at
    once); ``finish`` points every convolution at the final, largest buffer of each kind.
    """

    KINDS = ("padded", "v", "m", "cols", "rounded")

    def __init__(self):
        self.buffers, self.users = {}, []

    def share(self, conv):
        for kind in self.KINDS:
            own = getattr(conv, kind, None)
            if not isinstance(own, np.ndarray) or own.size == 0:
                continue
            key = (kind, own.dtype.str)
            buffer = self.buffers.get(key)
            if buffer is None or buffer.size < own.size:  # earlier users move to the new one in ``finish``
                buffer = self.buffers[key] = K.aligned_empty(own.size, own.dtype)
            setattr(conv, kind, buffer[:own.size].reshape(own.shape))
            self.users.append((conv, kind, key, own.shape))

    def finish(self):
        for conv, kind, key, shape in self.users:
            if kind == "rounded" and (conv.prerounded or conv.own_input):  # fed, or read by others: its own
                continue
            setattr(conv, kind, self.buffers[key][:math.prod(shape)].reshape(shape))
        self.users = []


def _cuts(ops, output):
    """The values after which a batch can run its first operations image by image (``HeadPlan``): each the
    only value that later operations read of what came before it (in ResNet, every block's output), in
    order."""
    last_use = _last_uses(ops, output)
    cuts, live = [], set()
    for i, op in enumerate(ops[:-1]):
        live = {name for name in live | {op.name} if last_use.get(name, -1) > i}
        if live == {op.name} and op.kind not in ("InputLayer", "Flatten"):
            cuts.append(op.name)
    return cuts


def _head(ops, output, shape, precision, limit):
    """``(cut, bytes)`` for a batch of ``shape``: ``cut`` None (one plain plan) where its buffers fit in
    ``limit`` bytes, else the first cut whose ``HeadPlan`` fits (``plan_bytes``: the fewest operations run
    image by image), and the bytes it needs; where none fits, the fewest bytes any would need.

    Run as one batch, every value is the batch's; cut, the values before the cut are one image's.  The
    plain plan is the faster: since a convolution stores its output over its residual (``_over_residual``),
    at 224x224 batch 8 the cut after stage 3 took 1.03-1.04x the time in fp32 and bf16, batch 16 1.045x and
    1.048x, after stage 2 batch 8 0.99-1.01x, batch 4 1.01-1.02x (Zen 4, one process, alternating); before,
    the cut after stage 3 was the faster at batch 8 (0.961x).  So a batch is cut only to fit the memory
    limit: at 224x224 batch 32, 243 MiB of buffers as one batch, 136 MiB cut after stage 3.
    """
    need = plan_bytes(ops, output, shape, precision)
    if need <= limit or shape[0] < 2:
        return None, need
    for cut in _cuts(ops, output):
        cut_need = plan_bytes(ops, output, shape, precision, cut)
        if cut_need <= limit:
            return cut, cut_need
        need = min(need, cut_need)
    return None, need


def _split_at(ops, cut):
    """(the operations up to ``cut``, an InputLayer named ``cut`` followed by the operations after it)."""
    k = [op.name for op in ops].index(cut) + 1
    return ops[:k], [Layer(cut, "InputLayer", [])] + ops[k:]


class Plan:
    """One forward pass for one input shape: every buffer allocated once, steps bound to them.

    ``ops`` and ``output``: a part of the model's graph (``HeadPlan``), by default all of it; ``shapes``
    every value's shape without the batch axis (by default the model's for ``shape``); ``scratch`` a
    ``_SharedScratch`` shared with another plan run by the same thread, which the caller finishes (by
    default the plan's own).
    """

    def __init__(self, model, shape, ops=None, output=None, shapes=None, scratch=None):
        ops, output = (model._ops, model._output) if ops is None else (ops, output)
        shapes = model._plan_shapes(shape) if shapes is None else shapes
        n = shape[0]
        slot_of, offset_of, slots = _layout(ops, output, shapes, n)
        # 64-byte aligned (whole-line vector stores), and each slot at its own offset in its pages: a kernel
        # reading one slot while it writes another (a residual, an input) then never waits on 4K aliasing
        stores = [K.aligned_empty(size, page_offset=SLOT_STAGGER * i % PAGE) for i, size in enumerate(slots)]

        def view(name, count=1):  # ``count`` values from ``name``'s place in its slot (a stacked pair: 2)
            at, size = offset_of[name], n * math.prod(shapes[name])
            return stores[slot_of[name]][at:at + count * size].reshape((count * n, *shapes[name]))

        values = {name: view(name) for name in slot_of}
        self.steps, self.names, self.kernels = [], [], {}
        own_scratch = scratch is None
        scratch = _SharedScratch() if own_scratch else scratch
        for op in ops:
            if op.kind == "InputLayer":
                self.input = values[op.name]
            elif op.kind != "Flatten":  # a Flatten is a view of its input's buffer
                ins = [values[name] for name in op.inputs]
                if op.kind == "Conv2D" and len(ins) == 2:  # both inputs, one after the other (``_layout``)
                    ins = [view(op.inputs[0], 2)]
                steps = _steps(model, op, ins, values[op.name], values.get(op.residual), scratch)
                self.kernels.update({op.name: step.kernel for step in steps if hasattr(step, "kernel")})
                self.steps.extend(steps)
                self.names.extend([op.name] * len(steps))
        if own_scratch:
            scratch.finish()
        self.output = values[output]
        if model.precision == "bf16":
            _feed_convolutions(ops, output, {n: st.conv for n, st in zip(self.names, self.steps) if hasattr(st, "conv")})
        self.threads = None  # the thread count the convolutions are bound for (``bind``)

    def bind(self):
        """Bind every convolution step to its buffers and to the calling thread's thread count."""
        self.threads = K.get_num_threads()
        for i, step in enumerate(self.steps):
            if hasattr(step, "args"):
                bound = step.conv.bind(*step.args)
                bound.kernel, bound.conv, bound.args = step.conv.kernel, step.conv, step.args
                self.kernels[self.names[i]] = step.conv.kernel  # (the split may name the kernel: ", streamed")
                self.steps[i] = bound

    def run(self, x, out=None, threads=None):
        """Copy ``x`` (converted to float32) into the input buffer, run every step, return the output (a copy).
        ``threads``: the kernels' thread count in this thread, where the caller knows it (else asked)."""
        if self.threads != (threads or K.get_num_threads()):  # each work split is made for one thread count
            self.bind()
        self.input[...] = x
        for step in self.steps:
            step()
        if out is None:
            return self.output.copy()
        out[...] = self.output
        return out


class HeadPlan:
    """A forward pass of a batch whose first operations run image by image (``_head``), the rest as a batch.

    Between two ResNet blocks only the block's output is carried on; where the batch's buffers would exceed
    the memory limit, each image goes through the part before such a point on its own (its buffers are one
    image's), into its place in the batch's value at the cut, and the later layers then run on the whole
    batch.  The same kernels on the same values: the results are the plain ``Plan``'s to the bit.  It has
    ``Plan``'s attributes and methods, so ``profile`` times it the same way (the head's layers summed over
    the images).
    """

    def __init__(self, model, shape, cut):
        shapes = model._plan_shapes(shape)
        n = shape[0]
        head_ops, tail_ops = _split_at(model._ops, cut)
        scratch = _SharedScratch()  # the two parts run one after the other: one padded input, one set of blocks
        self.head = Plan(model, (1, *shape[1:]), head_ops, cut, shapes, scratch)
        self.tail = Plan(model, (n, *shapes[cut]), tail_ops, model._output, shapes, scratch)
        scratch.finish()
        self.input = K.aligned_empty((n, *shape[1:]))
        self.output, self.kernels = self.tail.output, {**self.head.kernels, **self.tail.kernels}
        self.first, self.cut, self.threads = head_ops[1].name if len(head_ops) > 1 else cut, cut, None
        self._flatten()

    def _flatten(self):
        """``steps`` and ``names``: for each image, copy it in, the head's steps, copy its value at the cut out;
        then the tail's steps (the copies are counted with the first and last operation of the head)."""
        self.steps, self.names = [], []
        for i in range(self.input.shape[0]):
            self.steps += [lambda i=i: np.copyto(self.head.input, self.input[i:i + 1]), *self.head.steps,
                           lambda i=i: np.copyto(self.tail.input[i:i + 1], self.head.output)]
            self.names += [self.first, *self.head.names, self.cut]
        self.steps += self.tail.steps
        self.names += self.tail.names

    def bind(self):
        """``Plan.bind`` for both parts."""
        self.head.bind()
        self.tail.bind()
        self.kernels = {**self.head.kernels, **self.tail.kernels}
        self.threads = K.get_num_threads()
        self._flatten()

    run = Plan.run


def _feed_convolutions(ops, output, convs):
    """Let a bf16 convolution write its output, rounded, straight into the next one's padded input.

    Where a Conv2D's output is a Conv2D's only input (``Conv2DPlan.can_feed``), the producer stores it,
    rounded to bf16, into the consumer's input buffer, and the consumer has nothing to round or pad.  On the
    direct kernel (and F(2x2, 3x3) Winograd's output transform, for an unpadded consumer) the producer
    writes its float32 output too, for any other reader (a residual, another convolution), and consumers
    whose inputs are laid out alike share one copy (a ResNet stage's first 1x1 and projection): at 64x64,
    46 of a pass's 50 rounding calls go.  On AMX it writes only the bf16 copy, so there only an output that
    nothing else reads (in a ResNet bottleneck: of the first two of its three convolutions), without a
    residual, is fed.  Then convolutions that round the same input, laid out alike, which nothing feeds,
    round it once (``Conv2DPlan.share_input``: a stage's first 1x1 and projection at the start of a
    ``HeadPlan``'s batch part).  ``convs`` maps each convolution's name to its plan.
    """
    readers = {}
    for op in ops:
        for name in op.inputs + ([op.residual] if op.residual else []):
            readers.setdefault(name, []).append(op)
    for op in ops:
        stored_whole = op.activation.linear or op.activation.plain_relu  # no second, in-place step
        if op.name not in convs or not stored_whole:
            continue
        users, producer = readers.get(op.name, []), convs[op.name]
        only_reader = op.name != output and len(users) == 1 and op.residual is None
        for consumer in users:
            if (consumer.name in convs and consumer.inputs == [op.name] and consumer.residual != op.name
                    and (only_reader or not producer.amx) and producer.can_feed(convs[consumer.name])):
                producer.feed(convs[consumer.name])  # (several consumers of one layout share its buffer)
    # convolutions that round one input nothing feeds them, laid out alike: the first rounds it for the others
    alike = {}
    for op in ops:
        conv = convs.get(op.name)
        if conv is not None and len(op.inputs) == 1 and conv.can_share_input:
            alike.setdefault((op.inputs[0], conv.input_layout), []).append(conv)
    for first, *later in alike.values():
        for conv in later:
            first.share_input(conv)


def _release_direct(model, name, block):
    """Keep only the Winograd packing of output block ``block`` of layer ``name``; returns the new packing.  The
    direct one is 1/4 its size in F(4x4, 3x3), 9/16 in F(2x2, 3x3).

    Called where Winograd is chosen for one image, so for every batch size (``_steps``), in a model of
    one input size: the model's packing is replaced by a copy without the direct panels, and every
    later plan runs this layer as Winograd, in the form chosen for its batch (from a float32 F(2x2, 3x3)
    packing, F(4x4, 3x3) is made from the kernel read back from it: ``PackedConv2D.unpacked``).  The form
    kept is the one-image choice whatever the batch planned first.  A layer chosen Winograd only from some
    batch size on, or in a model whose input size is free (a smaller image may be direct), keeps both
    packings, so that an input shape runs one way whatever ran before it (the two round differently, about
    1e-5 of the output; releasing on the first Winograd plan made a Dask worker's results depend on the
    batches it had met, and a free-size model's on the sizes).
    """
    model._packed[name] = model._packed[name].release_direct(block)
    return model._packed[name]


def _activation_step(act, out, inp):
    """The kernel call that applies ``act`` (not linear) to ``inp`` into ``out`` (possibly in place)."""
    if act.kind == "softmax":
        rows_in, rows_out = inp.reshape(-1, inp.shape[-1]), out.reshape(-1, out.shape[-1])
        return lambda: K.softmax_forward(rows_out, rows_in)
    flat_in, flat_out = inp.reshape(-1), out.reshape(-1)
    if act.plain_relu:
        return lambda: K.relu_forward(flat_out, flat_in)
    kind = K.activation_kinds[act.kind]
    args = (math.inf if act.max_value is None else act.max_value, act.negative_slope, act.threshold)
    return lambda: K.activation_forward(flat_out, flat_in, kind, *args)


def _steps(model, op, ins, out, residual, scratch):
    """The kernel calls of one fused operation, as closures over its buffers.

    The convolution, scale-shift and add kernels apply a plain ReLU while storing; any other
    activation fused into an operation runs in place on its output buffer, as a second step
    of the same operation.
    """
    x, kind, a, act = ins[0] if ins else None, op.kind, op.attrs, op.activation
    relu = act.plain_relu
    steps = []
    if kind in ("Conv2D", "Dense"):
        packed, bias = model._packed[op.name], model._bias[op.name]
        if kind == "Dense":
            x4, out4 = x.reshape(-1, 1, 1, x.shape[-1]), out.reshape(-1, 1, 1, out.shape[-1])
            pads, stride = (0, 0, 0, 0), 1
        elif len(op.inputs) == 2:  # stacked inputs (2N, H, W, C): one image of 2 rows, a 2x1 kernel
            x4, out4 = x.reshape(1, 2, -1, x.shape[-1]), out.reshape(1, 1, -1, out.shape[-1])
            pads, stride = (0, 0, 0, 0), 1
        else:
            x4, out4, stride = x, out, a["stride"]
            t, b, l, r = op.pads
            if a["padding"] == "same":
                _, pt, pb = K.same_padding(x.shape[1] + t + b, a["kernel"][0], stride)
                _, pl, pr = K.same_padding(x.shape[2] + l + r, a["kernel"][1], stride)
                t, b, l, r = t + pt, b + pb, l + pl, r + pr
            pads = (t, b, l, r)
        # Winograd (a form chosen for this batch) at every batch size where it is chosen for one image, else as
        # chosen for this batch: an input shape runs the same way whatever ran before it (``_release_direct``)
        one = K.winograd_choice(packed, (1, *x4.shape[1:]), stride, pads)
        if one and packed.panels is not None and None not in model._input_shape:
            packed = _release_direct(model, op.name, one)
        block = K.winograd_choice(packed, x4.shape, stride, pads, direct=False) if one else None
        conv = K.Conv2DPlan(packed, x4.shape, stride, pads, winograd=block)
        scratch.share(conv)
        res = K.NO_RESIDUAL if residual is None else residual
        steps.append(lambda: conv(out4, x4, bias, res, relu))  # ``Plan`` replaces it with a bound call
        steps[-1].kernel, steps[-1].conv, steps[-1].args = conv.kernel, conv, (out4, x4, bias, res, relu)
    elif kind == "ScaleShift":
        scale, shift = op.weights
        rows_in, rows_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])
        steps.append(lambda: K.scale_shift_forward(rows_out, rows_in, scale, shift, relu))
    elif kind in ACTIVATION_KINDS:
        steps.append(_activation_step(a["activation"], out, x))
    elif kind == "Add":
        flat_out = out.reshape(-1)
        first, rest = ins[0].reshape(-1), [i.reshape(-1) for i in ins[1:]]
        for j, other in enumerate(rest):
            src = first if j == 0 else flat_out
            last = j == len(rest) - 1
            steps.append(lambda src=src, other=other, last=last: K.add_forward(flat_out, src, other, relu and last))
    elif kind in ("MaxPooling2D", "AveragePooling2D"):
        (ph, pw), (sh, sw) = a["pool"], a["stride"]
        top, _, left, _ = op.pads  # a folded ZeroPadding2D: its zeros are in the windows
        zeros = any(op.pads)
        if a["padding"] == "same":
            top = K.same_padding(x.shape[1], ph, sh)[1]
            left = K.same_padding(x.shape[2], pw, sw)[1]
        average = kind == "AveragePooling2D"
        steps.append(lambda: K.pool2d_forward(out, x, (ph, pw), (sh, sw), (top, left), average, zeros))
    elif kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        average = kind == "GlobalAveragePooling2D"
        x3, out2 = x.reshape(x.shape[0], -1, x.shape[3]), out.reshape(out.shape[0], -1)
        steps.append(lambda: K.global_pool_forward(out2, x3, average))
    elif kind == "ZeroPadding2D":
        t, _, l, _ = a["pads"]
        steps.append(lambda: K.zero_pad_forward(out, x, t, l))
    else:
        raise ModelFormatError(f"internal: no kernel for {kind} layer {op.name!r}")
    if not act.linear and not (relu and kind in ("Conv2D", "Dense", "ScaleShift", "Add")):
        steps.append(_activation_step(act, out, out))  # in place
    return steps
