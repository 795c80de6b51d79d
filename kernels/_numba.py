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
"""
import os

import numba
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "omp"

FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

_FLAGS = dict(fastmath=set(FASTMATH), cache=True, boundscheck=False, error_model="numpy", nogil=True)


def jit(func):
    """Compile ``func`` serially with fastres's flags."""
    return numba.njit(**_FLAGS)(func)


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


@intrinsic
def stack_f32(typingctx, size):
    """Return a pointer to ``size`` float32 on the stack of the calling function.

    ``size`` must be a compile-time constant.  The array lives in the function's
    entry block, so LLVM can keep it in vector registers; wrap it with
    ``numba.carray``.  This is what makes the convolution accumulators fast:
    an ``np.zeros`` in the loop lives on the heap and is 50x slower.
    """
    if not isinstance(size, types.IntegerLiteral):
        return None
    count = size.literal_value

    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once(builder, ir.ArrayType(ir.FloatType(), count))
        return builder.bitcast(slot, ir.PointerType(ir.FloatType()))

    return types.CPointer(types.float32)(size), codegen
