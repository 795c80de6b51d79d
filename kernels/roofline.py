"""The machine's roofline: its float32 FMA peak for the compiled width, and its read bandwidth.

``fma_peak()`` runs a kernel of independent vector multiply-adds (as many
accumulators as the convolution's register tile, so the same registers and
ports) on every kernel thread; ``read_bandwidth()`` sums a buffer far larger
than the caches on every kernel thread; where AMX is usable, ``amx.peak()`` runs
the bf16 kernel's four tile products with nothing else between them.  Both return the best of a few repeats,
as a roofline wants the machine's ceiling, not its average.  ``machine()``
gathers them with the CPU's name, ISA and vector width.
"""
import functools
import os
import time

import numpy as np
from numba import carray, prange

from . import amx
from ._numba import CPU_NAME, ISA, VECTOR_FLOATS, cpu_model, get_num_threads, l2_bytes, pjit, stack_f32
from .conv import ACC, PANEL, TILE

PEAK_STEPS = 65536  # multiply-adds per accumulator per call


@pjit
def fma_peak_forward(out, steps):
    """``steps`` multiply-adds on each of ACC independent float32 accumulators, per task.

    Parameters
    ----------
    out : float32 (tasks, ACC), written (the accumulators, so the work is not dead)
    steps : int
    """
    scale, shift = np.float32(0.999999), np.float32(1e-7)
    for task in prange(out.shape[0]):
        acc = carray(stack_f32(ACC), (ACC,))
        for j in range(ACC):
            acc[j] = np.float32(j)
        for _ in range(steps):
            for j in range(ACC):
                acc[j] = acc[j] * scale + shift
        for j in range(ACC):
            out[task, j] = acc[j]


@pjit
def read_sum_forward(out, data):
    """Sum each of ``out.shape[0]`` equal slices of ``data`` (a streaming read).

    Parameters
    ----------
    out : float32 (tasks,), written
    data : float32 (tasks * n,)
    """
    n = data.size // out.shape[0]
    for task in prange(out.shape[0]):
        part = data[task * n: (task + 1) * n]
        total = np.float32(0.0)
        for i in range(n):
            total += part[i]
        out[task] = total


def _best(run, repeats):
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def fma_peak(repeats=20, threads=None):
    """The float32 multiply-add peak of ``threads`` kernel threads (default: all), in GFLOPS (best of ``repeats``)."""
    threads = threads or get_num_threads()
    out = np.empty((threads, ACC), np.float32)  # one task a thread
    fma_peak_forward(out, 16)  # compile / warm up
    seconds = _best(lambda: fma_peak_forward(out, PEAK_STEPS), repeats)
    return 2 * threads * ACC * PEAK_STEPS / seconds / 1e9


def read_bandwidth(nbytes=256 << 20, repeats=5):
    """Read bandwidth of the kernel threads streaming ``nbytes`` from memory, in GB/s."""
    threads = get_num_threads()
    data = np.ones(nbytes // 4 // threads * threads, np.float32)
    out = np.empty(threads, np.float32)
    read_sum_forward(out, data[: threads * 1024])
    seconds = _best(lambda: read_sum_forward(out, data), repeats)
    return data.nbytes / seconds / 1e9


@functools.lru_cache(maxsize=None)
def _measure(threads):
    peak = fma_peak()
    return peak, fma_peak(threads=1) if threads > 1 else peak, read_bandwidth(), amx.peak(threads)


SCALING_FLOOR = 0.7  # of the thread count: a peak under this many times one thread's is flagged (``machine``)


def machine(measure=True):
    """What the figures were measured on: CPU, ISA, width, tile, threads, and (measured) peak and bandwidth.

    ``peak_gflops`` is the float32 FMA peak; where AMX is usable, ``amx_peak_gflops`` is its bf16
    tile-product peak.  ``peak_one_thread_gflops`` is one thread's FMA peak, and ``cores_short`` is True
    where the threads together made under ``SCALING_FLOOR`` times the thread count of it: the
    threads shared cores (SMT siblings) or a core was busy, or taken away by the VM, while the peak was
    measured (a 2-core VM gave half its speed for seconds at a time: 116 GFLOPS on 2 threads, one
    thread's rate, against 232 outside those spells), and every figure of the run may be off.
    The measurement (about 0.3 s) is made once per thread count and process.
    """
    info = {
        "cpu": cpu_model(), "llvm_cpu": CPU_NAME, "isa": ISA, "vector_bits": 32 * VECTOR_FLOATS,
        "tile": f"{TILE}x{PANEL}", "threads": get_num_threads(), "cores": os.cpu_count(), "l2_bytes": l2_bytes(),
    }
    if measure:
        peak, one_thread, bandwidth, amx_peak = _measure(info["threads"])
        info.update(peak_gflops=round(peak, 1), peak_one_thread_gflops=round(one_thread, 1), read_gbps=round(bandwidth, 1),
                    cores_short=bool(info["threads"] > 1 and peak < SCALING_FLOOR * info["threads"] * one_thread))
        if amx.AMX:
            info["amx_peak_gflops"] = round(amx_peak, 1)
    return info
