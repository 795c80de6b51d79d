"""Classifying a folder of JPEGs: in-process (pipelined reader) and on a Dask LocalCluster, beside the engine alone.

Run with:  pytest benchmarks/test_batch_inference.py --benchmark-only --benchmark-columns=median,iqr,rounds
(needs ``pip install -e ".[dask]"``).  ResNet50 at 224x224 (``fastres bench``'s default model), batch 16,
256 photo-like 500x375 JPEGs written here.  Group "256 JPEGs" times one pass over all of them:

- ``arrays``: ``model.predict`` on the images already decoded and preprocessed (the engine alone), 2 threads;
- ``files``: what ``fastres predict`` runs in-process (:func:`fastres.images.classify`), decoding ahead of
  the engine in 2 reader threads, 2 kernel threads;
- ``files-inline``: the same, decoding in line (``--readers 0``);
- ``dask-2x1``: :func:`fastres.distributed.predict_files` on a LocalCluster of 2 worker processes x 1 thread.

The issue's ratios are files / arrays and dask-2x1 / files in images per second (inverse medians).
Group "per-batch costs" times the parts docs/scaling.md builds its table from: decoding 16 JPEGs,
the engine on 16 images with 1 and 2 threads, a task's round trip with 16 records, a 16-image float32
chunk sent to a worker, and 500 empty tasks through the scheduler.  Every benchmark checks its results.
"""
import distributed
import numpy as np
import pytest

import fastres
import fastres.distributed as fd
import fastres.images as fi

IMAGES, BATCH, SIZE = 256, 16, 224
PEDANTIC = {"rounds": 3, "iterations": 1, "warmup_rounds": 1}


@pytest.fixture(scope="module")
def model_path():
    from fastres.default_model import default_model_path

    return str(default_model_path(SIZE))


@pytest.fixture(scope="module")
def model(model_path):
    fastres.set_num_threads(min(2, fastres.get_num_threads()))
    return fastres.load(model_path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """256 photo-like JPEGs (smooth colour fields with grain), 500x375 as most of ImageNet, quality 90."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    written = []
    for i in range(IMAGES):
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(field, np.float32) + rng.normal(0, 6, (375, 500, 3))
        path = folder / f"photo{i:03d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        written.append(str(path))
    return written


@pytest.fixture(scope="module")
def decoded(paths):
    return fi.preprocess(np.stack([fi.read_image(p, (SIZE, SIZE))[0] for p in paths]), "caffe")


@pytest.fixture(scope="module")
def reference(model, paths):
    return list(fi.classify(model, paths, "caffe", top=5, batch_size=BATCH, readers=0))


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        c.wait_for_workers(2)
        yield c


def test_arrays(benchmark, model, decoded, reference):
    benchmark.group = f"{IMAGES} JPEGs, ResNet50 {SIZE}x{SIZE}, batch {BATCH}"
    out = benchmark.pedantic(model.predict, (decoded,), {"batch_size": BATCH}, **PEDANTIC)
    assert [int(i) for i in out.argmax(axis=1)] == [r["top"][0]["class"] for r in reference]


@pytest.mark.parametrize("readers", [2, 0], ids=["files", "files-inline"])
def test_files(benchmark, model, paths, reference, readers):
    benchmark.group = f"{IMAGES} JPEGs, ResNet50 {SIZE}x{SIZE}, batch {BATCH}"
    run = lambda: list(fi.classify(model, paths, "caffe", top=5, batch_size=BATCH, readers=readers))  # noqa: E731
    assert benchmark.pedantic(run, **PEDANTIC) == reference


def test_dask_2x1(benchmark, client, model_path, paths, reference):
    """Same images in the same order; scores to float32 rounding (a 1-thread worker's wisdom may pick
    another convolution kernel than this 2-thread process: the tests run with FASTRES_WISDOM=off and
    compare bit for bit)."""
    benchmark.group = f"{IMAGES} JPEGs, ResNet50 {SIZE}x{SIZE}, batch {BATCH}"
    run = lambda: fd.predict_files(model_path, paths, "caffe", top=5, batch_size=BATCH, client=client)  # noqa: E731
    records = benchmark.pedantic(run, **PEDANTIC)
    assert [r["image"] for r in records] == paths
    got, want = ([r["top"][0]["probability"] for r in rs] for rs in (records, reference))
    np.testing.assert_allclose(got, want, rtol=1e-4)


# ---------------------------------------------------------------- the parts of docs/scaling.md's table

def test_cost_decode(benchmark, paths):
    import os

    benchmark.group = "per-batch costs (16 images)"
    benchmark.extra_info["jpeg_bytes_per_image"] = sum(os.path.getsize(p) for p in paths) / len(paths)
    images = benchmark(lambda: [fi.read_image(p, (SIZE, SIZE)) for p in paths[:BATCH]])
    assert all(error is None and image.shape == (SIZE, SIZE, 3) for image, error in images)


@pytest.mark.parametrize("threads", [1, 2])
def test_cost_engine(benchmark, model, decoded, threads):
    benchmark.group = "per-batch costs (16 images)"
    before = fastres.get_num_threads()
    fastres.set_num_threads(threads)
    try:
        out = benchmark.pedantic(model.predict, (decoded[:BATCH],), rounds=5, warmup_rounds=1)
    finally:
        fastres.set_num_threads(before)
    assert out.shape == (BATCH, 1000)


def test_cost_task_round_trip(benchmark, client, reference):
    benchmark.group = "per-batch costs (16 images)"
    records = reference[:BATCH]
    assert benchmark(lambda: client.submit(list, records, pure=False).result()) == records


def test_cost_chunk_transfer(benchmark, client, decoded):
    benchmark.group = "per-batch costs (16 images)"
    chunk = np.ascontiguousarray(decoded[:BATCH])
    assert benchmark(lambda: client.submit(len, chunk, pure=False).result()) == BATCH


def test_cost_scheduler_500_tasks(benchmark, client):
    benchmark.group = "per-batch costs (16 images)"
    assert benchmark.pedantic(lambda: client.gather(client.map(abs, range(-500, 0), pure=False)),
                              rounds=5, warmup_rounds=1) == list(range(500, 0, -1))
