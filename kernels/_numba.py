"""The one place that holds fastres's Numba settings.

Every kernel module imports its decorators from here, so the flags are never
repeated on a decorator:

* ``fastmath``: contraction, reassociation, reciprocal and no-signed-zero, but
  neither ``nnan`` nor ``ninf`` (max-pooling and "same" padding rely on ``-inf``,
  and a NaN in an input must stay a NaN in the output).
* ``cache=True``: compiled kernels are written to Numba's cache, so a warm start
  costs milliseconds instead of seconds.
* ``boundscheck=False`` and ``error_model="numpy"``: the public wrappers check
  every shape before a kernel runs; the kernels themselves do no checking.
* Threading layer ``omp``. ``workqueue`` costs ~90 us per parallel call and aborts
  the process when two Python threads enter a parallel kernel at once; ``tbb`` is
  not a dependency.  ``NUMBA_THREADING_LAYER`` in the environment still wins.
* The code-generation target, so that the vector width is fastres's choice and not
  LLVM's tuning: see ``ISA`` below.

The instruction set and the vector width
-----------------------------------------
``ISA`` is ``"avx512"``, ``"avx2"`` (AVX2 with FMA) or ``"generic"`` (anything else:
SSE-only x86, or another architecture, where 128-bit vectors are assumed),
found by compiling a two-line probe for the target Numba will compile for (the
host, or ``NUMBA_CPU_NAME``); ``VECTOR_FLOATS`` is its width in float32 lanes
(16, 8, 4).  The convolution's register tile is chosen from these (``conv.py``).

On AVX-512 fastres turns off LLVM's ``prefer-256-bit`` tuning: LLVM's models of
Intel server cores (Skylake-X to Emerald Rapids) carry it, and the auto-vectoriser
then splits the 6 x 64 accumulator tile into 48 ymm registers, twice the register
file, and spills (ResNet50 ran 1.45x slower).  This is a process-wide Numba
setting: **the user's own Numba code in the same process is compiled with 512-bit
vectors too**, and its cached functions recompile once (Numba's cache is keyed by
the target).  It does not apply when Numba has compiled something before fastres
was imported (the target is fixed by then); fastres then reads the width Numba
really uses and picks its tile from that.  ``NUMBA_CPU_FEATURES`` in the
environment is taken as it is; ``NUMBA_CPU_NAME=haswell`` (or any LLVM CPU name)
compiles for that CPU's own features rather than the host's, which is how the
tests run the kernels for other x86 targets on one machine.
"""
import os
import platform

import llvmlite.binding as ll
import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "omp"

_BF16_PROBE = """
define void @probe(ptr %acc, ptr %a) "min-legal-vector-width"="512" {
  %c = load <16 x float>, ptr %acc
  %x = load <32 x bfloat>, ptr %a
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c, <32 x bfloat> %x, <32 x bfloat> %x)
  store <16 x float> %r, ptr %acc
  ret void
}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
"""

_PROBE = """
define void @probe(ptr %a, ptr %b) "min-legal-vector-width"="512" {
  %x = load <16 x float>, ptr %a
  %y = call <16 x float> @llvm.fma.v16f32(<16 x float> %x, <16 x float> %x, <16 x float> %x)
  store <16 x float> %y, ptr %a
  %u = load <8 x float>, ptr %b
  %v = call <8 x float> @llvm.fma.v8f32(<8 x float> %u, <8 x float> %u, <8 x float> %u)
  store <8 x float> %v, ptr %b
  ret void
}
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
"""


def _assembly(probe, cpu_name, features):
    """``probe`` (LLVM IR) compiled for the target, as assembly text; "" if this LLVM cannot build it."""
    try:
        ll.initialize_native_target()
        ll.initialize_native_asmprinter()
        machine = ll.Target.from_default_triple().create_target_machine(cpu=cpu_name, features=features, opt=2)
        return machine.emit_assembly(ll.parse_assembly(probe))
    except RuntimeError:  # an LLVM that cannot build the probe for this target
        return ""


def _probe_isa(cpu_name, features):
    """Compile ``_PROBE`` for the target and read the ISA off the assembly ("generic" if it cannot say)."""
    asm = _assembly(_PROBE, cpu_name, features)
    if "zmm" in asm:
        return "avx512"
    return "avx2" if "vfmadd" in asm and "ymm" in asm else "generic"


def _started_codegen():
    """Numba's CPU code generator if it exists already (its target can no longer change), else None."""
    from numba.core.registry import cpu_target
    if "_toplevel_target_context" not in vars(cpu_target):
        return None
    return cpu_target.target_context.codegen()


def _choose_target():
    """Set Numba's target features for this process; return (cpu name, features, ISA)."""
    config = numba.config
    codegen = _started_codegen()
    if codegen is not None:                       # too late to choose: use what Numba compiles for
        cpu_name, features = codegen._get_host_cpu_name(), codegen._tm_features
        isa = _probe_isa(cpu_name, features)
        if isa == "avx512" and "-prefer-256-bit" not in features:
            isa = "avx2"                          # the auto-vectoriser will emit 256-bit vectors
        return cpu_name, features, isa
    cpu_name = config.CPU_NAME or ll.get_host_cpu_name()
    if config.CPU_FEATURES is not None:           # the user's (or "generic"'s) features, as they are
        features = config.CPU_FEATURES
    elif config.CPU_NAME is not None:             # another CPU: its own features, not the host's
        features = ""
    else:
        features = ll.get_host_cpu_features().flatten()
    isa = _probe_isa(cpu_name, features)
    if isa == "avx512" and "prefer-256-bit" not in features:
        features = f"{features},-prefer-256-bit".lstrip(",")
    config.CPU_FEATURES = features
    return cpu_name, features, isa


CPU_NAME, CPU_FEATURES, ISA = _choose_target()
VECTOR_FLOATS = {"avx512": 16, "avx2": 8, "generic": 4}[ISA]
# The convolution's register tile, TILE output pixels x PANEL output channels, fills the vector
# register file without spilling: TILE * PANEL / lanes accumulators, PANEL / lanes weight vectors
# and a broadcast.  AVX-512: 6 x 64 = 24 zmm + 4 + 1 of 32.  AVX2: 6 x 16 = 12 ymm + 2 + 1 of 16.
# generic (SSE: no FMA, so a product register too): 4 x 8 = 8 xmm + 2 + 2 of 16.
PANEL, TILE = {"avx512": (64, 6), "avx2": (16, 6), "generic": (8, 4)}[ISA]
# LLVM CPU names with AVX512-BF16, for NUMBA_CPU_NAME targets (whose features LLVM does not list):
# LLVM aborts the process on a bf16 intrinsic for a target without it, so the probe runs only here.
_BF16_CPUS = {"cooperlake", "sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d",
              "diamondrapids", "znver4", "znver5"}


def _has_bf16_dot(cpu_name, features, isa):
    """True when the target has AVX512-BF16 (its features say so, or its CPU name) and LLVM emits it."""
    flags = features.split(",")
    named = "+avx512bf16" not in flags and "-avx512bf16" not in flags  # the CPU's own features decide
    listed = cpu_name in _BF16_CPUS if named else "+avx512bf16" in flags
    return isa == "avx512" and listed and "vdpbf16ps" in _assembly(_BF16_PROBE, cpu_name, features)


# AVX512-BF16's ``vdpbf16ps``: two bf16 products per float32 lane, 32 per instruction (Zen 4,
# Cooper Lake, Sapphire Rapids and later).  Without it bf16 weights are widened to float32.
BF16_DOT = _has_bf16_dot(CPU_NAME, CPU_FEATURES, ISA)
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def l2_bytes(default=1 << 20):
    """The size of one core's L2 cache (sysfs), or ``default`` where the system does not say."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            with open(os.path.join(base, index, "level"), encoding="ascii") as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(base, index, "size"), encoding="ascii") as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return default


def cpu_model():
    """The CPU's name as the system reports it (``/proc/cpuinfo``), else the platform's description."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

_FLAGS = dict(fastmath=set(FASTMATH), cache=True, boundscheck=False, error_model="numpy", nogil=True)


def jit(func):
    """Compile ``func`` serially with fastres's flags."""
    return numba.njit(**_FLAGS)(func)


def inline(func):
    """Compile ``func`` with fastres's flags, inlined into its callers in Numba's IR.

    For helpers that take stack buffers: inlined, LLVM sees that the buffers are
    distinct allocations and vectorises the helper's loops; called, it must assume
    they overlap and keeps them scalar.
    """
    return numba.njit(inline="always", **_FLAGS)(func)


def pjit(func):
    """Compile ``func`` with fastres's flags and ``parallel=True`` (``prange``)."""
    return numba.njit(parallel=True, **_FLAGS)(func)


def set_num_threads(n):
    """Set how many threads the parallel kernels use (1 .. the number of cores)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"set_num_threads: n must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {n}")
    numba.set_num_threads(n)


def get_num_threads():
    """Return how many threads the parallel kernels use."""
    return numba.get_num_threads()


def threading_layer():
    """Return the name of the threading layer in use (after a parallel kernel has run)."""
    return numba.threading_layer()


def _stack_array(element, numba_type):
    """An intrinsic returning a pointer to ``size`` elements on the caller's stack."""

    def stack_array(typingctx, size):
        if not isinstance(size, types.IntegerLiteral):
            return None
        count = size.literal_value

        def codegen(context, builder, signature, args):
            slot = cgutils.alloca_once(builder, ir.ArrayType(element, count))
            return builder.bitcast(slot, ir.PointerType(element))

        return types.CPointer(numba_type)(size), codegen

    return intrinsic(stack_array)


stack_f32 = _stack_array(ir.FloatType(), types.float32)
stack_f32.__doc__ = """Return a pointer to ``size`` float32 on the stack of the calling function.

``size`` must be a compile-time constant.  The array lives in the function's
entry block, so LLVM can keep it in vector registers; wrap it with
``numba.carray``.  This is what makes the convolution accumulators fast:
an ``np.zeros`` in the loop lives on the heap and is 50x slower.
"""
stack_u64 = _stack_array(ir.IntType(64), types.uint64)
stack_u64.__doc__ = """Return a pointer to ``size`` uint64 on the stack (offsets kept in registers).

Unsigned offsets matter: Numba wraps a negative signed index around, which costs a
test and a mask on every load of the convolution's inner loop; an unsigned one cannot
be negative.
"""


@intrinsic
def advance(typingctx, pointer, count):
    """``pointer + count`` elements: a pointer into a part of a ``stack_f32`` buffer."""
    if not (isinstance(pointer, types.CPointer) and isinstance(count, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.gep(args[0], [context.cast(builder, args[1], signature.args[1], types.int64)])

    return pointer(pointer, count), codegen


def _line_intrinsic(name, extra_args, doc):
    """An intrinsic ``f(array, index)`` that calls the LLVM intrinsic ``name`` on the element's address.

    ``array`` must be C-contiguous and ``index`` an integer; the address is not bounds-checked (cache
    operations: ``evict_line``'s callers stay in the array, ``fetch_line``'s may ask past its end).
    ``extra_args`` follow the
    address, as i32 constants; with ``name`` None the call compiles to nothing.
    """

    def line_op(typingctx, array, index):
        if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            if name is not None:
                data = context.make_array(signature.args[0])(context, builder, args[0]).data
                address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
                i32 = ir.IntType(32)
                fnty = ir.FunctionType(ir.VoidType(), [address.type] + [i32] * len(extra_args))
                hint = cgutils.get_or_insert_function(builder.module, fnty, name)
                builder.call(hint, [address] + [i32(a) for a in extra_args])
            return context.get_dummy_value()

        return types.void(array, index), codegen

    line_op.__doc__ = doc
    return intrinsic(line_op)


evict_line = _line_intrinsic("llvm.x86.sse2.clflush" if X86 else None, (), """Write back and drop
``array.reshape(-1)[index]``'s cache line from every cache level (x86 ``clflush``; elsewhere nothing).

For timing a kernel as a forward pass meets it, with its weights in memory rather than in cache.
""")


fetch_line = _line_intrinsic("llvm.prefetch.p0", (0, 3, 1), """Ask for ``array.reshape(-1)[index]``'s cache
line, to read (LLVM ``prefetch``: a hint, which never faults, even past the array's end).
""")


@intrinsic
def _fetch_add(typingctx, counters, index):
    """Atomically add 1 to ``counters[index]`` (int64) and return its old value."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64
            and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        at = builder.gep(data, [context.cast(builder, args[1], signature.args[1], types.intp)])
        return builder.atomic_rmw("add", at, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(counters, index), codegen


@intrinsic
def _thread_count(typingctx):
    """``numba.get_num_threads()``, for parallel kernels: a call of the threading layer's symbol, as
    Numba's own ``prange`` code makes (Numba's overload calls it through a ctypes pointer, which keeps a
    kernel out of the cache)."""

    def codegen(context, builder, signature, args):
        count = cgutils.get_or_insert_function(builder.module, ir.FunctionType(cgutils.intp_t, []),
                                               "get_num_threads")
        return builder.call(count, [])

    return types.intp(), codegen


@inline
def task_counters():
    """The ``taken`` counters of ``next_task`` for one call of a parallel kernel: one per thread, zero."""
    return np.zeros(_thread_count(), np.int64)


@inline
def _segment(taken, ntasks, segment):
    """(first, past the last) task of ``segment``: the tasks cut into ``taken.size`` even runs."""
    return segment * ntasks // taken.size, (segment + 1) * ntasks // taken.size


@inline
def next_task(taken, ntasks):
    """The calling thread's next task of ``ntasks`` (``ntasks`` when none is left), taken from the counters
    ``taken`` (``task_counters``).

    This is how the parallel kernels share out their tasks.  Thread ``i`` owns the ``i``-th of
    ``taken.size`` even runs of tasks and takes them in order; when its own are gone it takes the
    next untaken task of the following runs in turn.  A thread slowed by another process on its core
    (a shared VM) thus takes fewer tasks, where Numba's ``prange`` gives each thread an equal share
    fixed in advance and the slowed thread holds up the call.  And a thread mostly works on the same
    part of the image in every layer, as ``prange``'s own even split does, so the rows it reads are
    mostly those it wrote, in its own core's cache.  Against one shared counter handing out the tasks
    in turn, ResNet50 took 0.98-0.99x the time at 224x224 batch 1 and 64x64 and 0.997x at 224x224
    batch 8 on a calm 2-core VM, 0.87-0.93x at 224x224 batch 1 and 8 while that VM ran slow (Zen 4).
    """
    me = numba.get_thread_id() % taken.size
    for k in range(taken.size):
        segment = (me + k) % taken.size
        first, end = _segment(taken, ntasks, segment)
        task = first + _fetch_add(taken, segment)
        if task < end:
            return task
    return ntasks


@inline
def peek_task(taken, ntasks):
    """The task ``next_task`` would most likely give the calling thread next (read, not taken); ``ntasks``
    when its own run is done."""
    me = numba.get_thread_id() % taken.size
    first, end = _segment(taken, ntasks, me)
    task = first + taken[me]
    return task if task < end else ntasks
