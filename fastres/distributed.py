"""Batch inference past one machine on Dask (``pip install 'fastres[dask]'``).

    from fastres.distributed import predict_files
    results = predict_files("flowers.keras", "/shared/photos/*.jpg", preprocess="tf", workers=4)

:func:`predict_array` maps a chunked ``dask.array`` of images through the model (``map_blocks``);
:func:`predict_files` classifies image files on a file system the workers share, one record per image in
input order.  Both run on the ``Client`` given (any scheduler address) or start a ``LocalCluster``.

Only the model's path travels with a task: each worker process loads the model once and keeps it,
keyed by path and file modification time (:func:`cached_model`).

Threads: a task's kernels run on the cores of its machine divided by the task threads of all the workers
on that machine (counted from the scheduler when the work is submitted; a worker that joins later counts
its own threads only), at least one.  So N workers x T task threads never ask for more than the cores:
2 workers x 1 thread on 2 cores run one kernel thread each; 1 worker x 1 thread runs two.  ``threads=``
sets the kernel threads of every task instead.  Dask's own local schedulers (no ``Client``) leave
fastres's default, all cores.

Nothing else in fastres imports this module, so Dask is needed only here.
"""
import os
import threading
from collections import deque
from contextlib import contextmanager

import numba
import numpy as np

try:
    import dask.array as da
    from distributed import Client, LocalCluster, default_client, get_worker
    from distributed.comm import get_address_host
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"fastres.distributed needs Dask: pip install 'fastres[dask]' ({exc})") from exc

from . import images as _images
from .errors import FastresError, InputError
from .model import load, set_num_threads
from .progress import progress_bar

__all__ = ["cached_model", "iter_predict_files", "predict_array", "predict_files"]

_models = {}
_models_lock = threading.Lock()


def cached_model(path, architecture=None, precision="fp32"):
    """The model at ``path``, loaded once per process and loaded again when the file changes.

    Parameters
    ----------
    path : str or os.PathLike
        A Keras model file (the same path on every worker: a shared file system).
    architecture : str, optional
        For a weights-only file, as in :func:`fastres.load`.
    precision : "fp32" or "bf16"
        As in :func:`fastres.load`.

    Returns
    -------
    fastres.Model
    """
    path = os.path.abspath(path)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise FastresError(f"no such file: {path}") from None
    key = (path, stat.st_mtime_ns, stat.st_size, architecture, precision)
    with _models_lock:
        if key not in _models:
            for old in [k for k in _models if k[0] == path and k[1:3] != key[1:3]]:
                del _models[old]  # the file changed: drop the old model
            _models[key] = load(path, architecture=architecture, precision=precision)
        return _models[key]


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _host_slots(client):
    """Task threads per machine: every worker's ``nthreads``, summed by host."""
    if client is None:
        return {}
    slots = {}
    for address, info in client.scheduler_info(n_workers=-1)["workers"].items():
        host = get_address_host(address)
        slots[host] = slots.get(host, 0) + info["nthreads"]
    return slots


def _set_task_threads(threads, slots):
    """Set this task's kernel threads: ``threads``, else this machine's cores / its task threads."""
    if threads is None:
        try:
            worker = get_worker()
        except ValueError:  # not on a Dask worker: leave fastres's default
            return
        share = slots.get(get_address_host(worker.address)) or worker.state.nthreads
        threads = _cores() // share
    set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def _default_client():
    try:
        return default_client()
    except ValueError:
        return None


# ---------------------------------------------------------------- arrays

def predict_array(model_path, images, batch_size=None, architecture=None, threads=None, client=None,
                  precision="fp32"):
    """The model's outputs for a chunked array of images, as a lazy ``dask.array``.

    Parameters
    ----------
    model_path : str
        A Keras model file that every worker can read at this path.
    images : dask.array.Array or array-like
        (N, H, W, C), as ``Model.predict`` takes it (preprocessed); chunked along N (a chunk is one task;
        chunks along other axes are merged).
    batch_size : int, optional
        Images per forward pass inside a chunk (default: the whole chunk).
    architecture : str, optional
        For a weights-only file.
    threads : int, optional
        Kernel threads per task (default: the task's share of its machine's cores).
    client : distributed.Client, optional
        Used to count the workers' threads per machine (default: the current default client, if any).
        The result runs on whatever scheduler computes it.
    precision : "fp32" or "bf16"
        As in :func:`fastres.load`.

    Returns
    -------
    dask.array.Array
        float32 (N, ...) with the model's output shape, chunked along N like ``images``.

    Raises
    ------
    InputError
        ``images`` is not 4-D or does not fit the model.
    """
    images = da.asarray(images)
    if images.ndim != 4:
        raise InputError(f"images has shape {images.shape}; expected a batch of images (N, H, W, C)")
    images = images.rechunk({1: -1, 2: -1, 3: -1})
    model = cached_model(model_path, architecture, precision)  # here only for the output shape (and a clear error)
    tail = model.predict(np.zeros((0, *images.shape[1:]), images.dtype)).shape[1:]
    return images.map_blocks(
        _predict_block, model_path=os.fspath(model_path), architecture=architecture, batch_size=batch_size,
        threads=threads, slots=_host_slots(client or _default_client()), precision=precision,
        dtype=np.float32, chunks=(images.chunks[0], *((d,) for d in tail)),
        drop_axis=list(range(1 + len(tail), 4)) or None, meta=np.empty((0,) * (1 + len(tail)), np.float32))


def _predict_block(block, model_path, architecture, batch_size, threads, slots, precision="fp32"):
    model = cached_model(model_path, architecture, precision)
    _set_task_threads(threads, slots)
    return model.predict(block, batch_size=batch_size)


# ---------------------------------------------------------------- files

def predict_files(model_path, paths, preprocess="caffe", top=5, batch_size=16, **options):
    """Classify image files on a Dask cluster: one record per image, in input order.

    Parameters
    ----------
    model_path : str
        A Keras classifier file that every worker can read at this path.
    paths : str or iterable of str
        Image files, directories or glob patterns (expanded here, read by the workers: a shared file system).
    preprocess : {"caffe", "tf", "torch", "unit", "none"}
        keras.applications preprocessing (:func:`fastres.images.preprocess`).
    top : int
        Classes per image.
    batch_size : int
        Images per task and per forward pass.
    **options
        ``input_size``, ``architecture``, ``threads``, ``client``, ``workers``, ``progress``, ``window``,
        ``precision``:
        see :func:`iter_predict_files`.

    Returns
    -------
    list of dict
        ``{"image": path, "top": [{"class": i, "probability": p}, ...]}``, or ``{"image": path, "error": why}``
        for a file that cannot be read (not fatal).
    """
    return list(iter_predict_files(model_path, paths, preprocess, top, batch_size, **options))


def iter_predict_files(model_path, paths, preprocess="caffe", top=5, batch_size=16, input_size=None,
                       architecture=None, threads=None, client=None, workers=None, progress=False, window=None,
                       precision="fp32"):
    """:func:`predict_files` as a generator: records in input order, as soon as they are ready.

    Parameters
    ----------
    input_size : int, optional
        Image size for a model whose input size is free (default 224).
    architecture : str, optional
        For a weights-only file.
    threads : int, optional
        Kernel threads per task (default: the task's share of its machine's cores).
    client : distributed.Client or str, optional
        A client, or a scheduler address to connect to.  Without it (and without ``workers``) a
        ``LocalCluster`` with one single-threaded worker process per core runs the work.
    workers : int, optional
        Start a ``LocalCluster`` of this many single-threaded worker processes.
    progress : bool
        A progress bar on stderr (tqdm, when installed and stderr is a terminal).
    window : int, optional
        Batches submitted ahead of the one being collected (default: 4 per task thread, at least 8);
        bounds the memory of the client and the scheduler for millions of images.
    precision : "fp32" or "bf16"
        As in :func:`fastres.load`.

    Notes
    -----
    A worker that dies is replaced and its tasks run again (Dask reschedules them); each batch is one
    task whose result is collected once, so every image appears exactly once.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(_images.expand(paths))
    batches = deque(paths[i:i + batch_size] for i in range(0, len(paths), batch_size))
    model_path = os.path.abspath(model_path)
    bar = progress_bar(len(paths), "predict", progress)
    try:
        with _connect(client, workers) as c:
            slots = _host_slots(c)
            window = window or max(8, 4 * sum(slots.values()))
            pending = deque()
            while batches or pending:
                while batches and len(pending) < window:
                    batch = batches.popleft()  # the workers get absolute paths; the records keep the given ones
                    pending.append((batch, c.submit(_classify_paths, [os.path.abspath(p) for p in batch], model_path,
                                                    architecture, preprocess, top, input_size, threads, slots,
                                                    precision)))
                batch, future = pending.popleft()
                records = future.result()
                bar.update(len(records))
                for record, given in zip(records, batch):
                    yield {**record, "image": given}
    finally:
        bar.close()


def _classify_paths(paths, model_path, architecture, preprocess, top, input_size, threads, slots, precision="fp32"):
    model = cached_model(model_path, architecture, precision)
    _set_task_threads(threads, slots)
    return list(_images.classify(model, paths, preprocess, top, batch_size=len(paths), input_size=input_size,
                                 readers=0))


@contextmanager
def _connect(client, workers):
    """The client to run on: the one given, one connected to an address, or a new local cluster's."""
    if isinstance(client, Client):
        yield client
    elif client is not None:
        try:
            connected = Client(client, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise FastresError(f"cannot reach the Dask scheduler at {client}: {exc}") from None
        with connected:
            yield connected
    else:
        if workers is not None and workers < 1:
            raise FastresError(f"workers must be at least 1, got {workers}")
        with LocalCluster(n_workers=workers or _cores(), threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as local:
            yield local
