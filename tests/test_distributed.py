"""fastres.distributed on a real Dask LocalCluster (worker processes), against in-process predict."""
import json
import os
import signal
import subprocess
import sys

import dask.array as da  # the test extra installs Dask: these tests never skip
import distributed
import keras_models as km
import numpy as np
import pytest
from test_cli import assert_user_error, run

import fastres
import fastres.distributed as fd
import fastres.images as fi


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A 32x32 ResNet50 with 10 classes (a Keras .h5 that fastres writes), small enough for many tasks."""
    from fastres.default_model import write_resnet50

    return str(write_resnet50(tmp_path_factory.mktemp("model") / "resnet50-32.h5", input_size=32, classes=10))


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    """Photos of several sizes and formats, a grey one, a broken one, a missing one, in a fixed order."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(37):
        path = folder / f"img{i:02d}{'.jpg' if i % 3 else '.png'}"
        Image.fromarray(rng.integers(0, 256, (24 + i, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(folder / "grey.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths[5:5] = [str(folder / "grey.jpg"), str(folder / "broken.jpg"), str(folder / "missing.jpg")]
    return paths


@pytest.fixture(scope="module")
def reference(model_path, image_paths):
    """In-process records (the engine in this process, images decoded in line), batch 4."""
    return list(fi.classify(fastres.load(model_path), image_paths, "tf", top=3, batch_size=4, readers=0))


@pytest.fixture(scope="module")
def client():
    """A real local cluster: 2 worker processes x 1 thread each."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        c.wait_for_workers(2)
        yield c


def test_reference_has_results_and_errors(reference, image_paths):
    assert [r["image"] for r in reference] == image_paths
    errors = [r for r in reference if "error" in r]
    assert [os.path.basename(r["image"]) for r in errors] == ["broken.jpg", "missing.jpg"]
    assert all(len(r["top"]) == 3 for r in reference if "top" in r)


def test_predict_array_matches_in_process(client, model_path):
    x = np.random.default_rng(1).standard_normal((11, 32, 32, 3)).astype(np.float32)
    lazy = fd.predict_array(model_path, da.from_array(x, chunks=(3, 16, 32, 3)), client=client)
    assert lazy.shape == (11, 10) and lazy.chunks[0] == (3, 3, 3, 2)
    np.testing.assert_array_equal(lazy.compute(), fastres.load(model_path).predict(x, batch_size=3))


def test_predict_array_feature_map(client, tmp_path):
    """A model without its top gives (N, h, w, 2048) chunks; a plain numpy array is accepted as one chunk."""
    keras = km.keras3()
    path = str(tmp_path / "features.keras")
    keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3)).save(path)
    x = np.random.default_rng(2).standard_normal((5, 32, 32, 3)).astype(np.float32)
    chunked = fd.predict_array(path, da.from_array(x, chunks=2), batch_size=1, client=client)
    expected = fastres.load(path).predict(x, batch_size=1)
    assert chunked.shape == expected.shape and expected.ndim == 4
    np.testing.assert_array_equal(chunked.compute(), expected)
    np.testing.assert_array_equal(fd.predict_array(path, x, batch_size=1).compute(), expected)


def test_predict_array_errors(model_path, tmp_path):
    x = np.zeros((4, 32, 32, 3), np.float32)
    with pytest.raises(fastres.InputError, match="axis 1 is 16"):
        fd.predict_array(model_path, x[:, :16])  # the model takes 32x32
    with pytest.raises(fastres.InputError, match="expected a batch of images"):
        fd.predict_array(model_path, x[0])
    with pytest.raises(fastres.FastresError, match="no such file"):
        fd.predict_array(tmp_path / "none.h5", x)


def test_predict_files_matches_in_process(client, model_path, image_paths, reference):
    records = fd.predict_files(model_path, image_paths, preprocess="tf", top=3, batch_size=4, client=client)
    assert records == reference  # identical scores, input order, errors by path in place


def test_predict_files_glob_and_scheduler_address(client, model_path, image_paths, reference):
    folder = os.path.dirname(image_paths[0])
    records = fd.predict_files(model_path, os.path.join(folder, "img*.jpg"), preprocess="tf", top=3, batch_size=4,
                               client=client.scheduler.address)
    jpegs = sorted(p for p in image_paths if os.path.basename(p).startswith("img") and p.endswith(".jpg"))
    assert [r["image"] for r in records] == jpegs
    by_path = {r["image"]: r for r in reference}
    assert all("top" in r and r == by_path[r["image"]] for r in records)


def test_predict_files_relative_paths(client, model_path, image_paths, reference, monkeypatch):
    """Paths relative to the caller's directory (the workers' is another) come back as given."""
    folder = os.path.dirname(image_paths[0])
    monkeypatch.chdir(folder)
    relative = [os.path.basename(p) for p in image_paths]
    records = fd.predict_files(model_path, relative, preprocess="tf", top=3, batch_size=4, client=client)
    assert records == [{**r, "image": os.path.basename(r["image"])} for r in reference]


def test_task_threads_share_the_cores(client):
    """2 workers x 1 task thread on one machine: each task's kernels get half the cores (at least 1)."""
    slots = fd._host_slots(client)
    assert sum(slots.values()) == 2
    probe = lambda s, t: (fd._set_task_threads(t, s), fastres.get_num_threads())[1]  # noqa: E731
    threads = client.gather([client.submit(probe, slots, None, pure=False) for _ in range(4)])
    cores = len(os.sched_getaffinity(0))
    assert all(1 <= t and 2 * t <= max(cores, 2) for t in threads), threads
    assert client.submit(probe, slots, 1, pure=False).result() == 1


def test_a_killed_worker_loses_no_image_and_doubles_none(model_path, image_paths, reference):
    """A worker process killed in the middle of a run: Dask reschedules its work, every image comes back once."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        c.wait_for_workers(2)
        records = fd.iter_predict_files(model_path, image_paths, "tf", 3, 4, client=c, window=3)
        first = next(records)  # batch 0 is collected; batches 1 and 2 are running or held on the workers
        busy = {w: set(c.processing().get(w, ())) | set(keys) for w, keys in c.has_what().items()}
        victim = max(busy, key=lambda w: len(busy[w]))
        assert busy[victim], "the victim has work of this run"
        pid = c.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        rest = list(records)
        assert pid not in c.run(os.getpid).values()  # the worker really died (the nanny started another)
    assert [first, *rest] == reference


def test_core_import_needs_no_dask():
    code = ("import sys, fastres, fastres.cli, fastres.images, fastres.peers\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'dask', 'distributed', 'tqdm', 'tensorflow'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.fixture(scope="module")
def env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def test_cli_workers_and_scheduler_match_in_process(env, client, model_path, image_paths):
    """Same lines, same order, same exit status in-process (decoding ahead or in line) and on Dask."""
    common = [model_path, *image_paths, "--batch-size", "4", "--top", "3", "--preprocess", "tf"]
    in_process = run(env, "predict", *common, "--json")
    assert in_process.returncode == 1, in_process.stderr  # broken.jpg and missing.jpg
    rows = [json.loads(line) for line in in_process.stdout.splitlines()]
    assert len(rows) == len(image_paths) - 2
    dash_m = subprocess.run([sys.executable, "-m", "fastres", "predict", *common, "--json", "--workers", "1"],
                            capture_output=True, text=True, env=env, timeout=900)  # python -m: worker processes are spawned
    for other in (run(env, "predict", *common, "--json", "--readers", "0"),
                  run(env, "predict", *common, "--json", "--workers", "2"),
                  run(env, "predict", *common, "--json", "--scheduler", client.scheduler.address), dash_m):
        assert (other.returncode, other.stdout) == (1, in_process.stdout), other.stderr
        assert [l for l in other.stderr.splitlines() if "cannot read" in l] == \
               [l for l in in_process.stderr.splitlines() if "cannot read" in l]
    text = run(env, "predict", *common, "--scheduler", client.scheduler.address)
    assert text.stdout.splitlines() == [f"{r['image']}: " + ", ".join(f"{t['label']} ({t['probability']:.3f})"
                                                                      for t in r["top"]) for r in rows]


def test_cli_dask_user_errors(env, model_path, image_paths):
    assert_user_error(run(env, "predict", model_path, image_paths[0], "--workers", "2", "--scheduler", "tcp://x:1"),
                      "not allowed with")
    assert_user_error(run(env, "predict", model_path, image_paths[0], "--workers", "0"), "--workers")
    unreachable = run(env, "predict", model_path, image_paths[0], "--scheduler", "tcp://127.0.0.1:9")
    assert_user_error(unreachable, "cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert unreachable.returncode == 2
