"""The pipelined image reader: decoding ahead of the engine in threads, bounded, in order, errors in place."""
import sys
import threading
import time

import numpy as np
import pytest

import fastres.images as fi


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("reader")
    rng = np.random.default_rng(0)
    found = []
    for i in range(12):
        path = folder / f"p{i:02d}{'.jpg' if i % 2 else '.png'}"
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(path)
        found.append(str(path))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    found[3:3] = [str(folder / "broken.png"), str(folder / "missing.jpg"), str(folder / "none-*.jpg")]
    return found


def test_threads_give_what_the_caller_thread_gives(paths):
    inline = list(fi.read_images(paths, (16, 24), readers=0))
    ahead = list(fi.read_images(paths, (16, 24), readers=3, ahead=4))
    assert [p for p, _, _ in ahead] == paths
    for (_, a, a_error), (_, b, b_error) in zip(inline, ahead):
        assert a_error == b_error
        assert (a is None and b is None) or (a.shape == (16, 24, 3) and np.array_equal(a, b))
    assert [e for _, _, e in ahead if e][1:] == ["no such file", fi.NO_MATCH]
    assert "not a readable image" in ahead[3][2]


def test_reads_ahead_in_other_threads_and_no_further(paths, monkeypatch):
    """While the caller holds the first image, exactly `ahead` + 1 images have been decoded, not on its thread."""
    calls = []
    original = fi.read_image
    monkeypatch.setattr(fi, "read_image", lambda path, size: calls.append(threading.get_ident()) or original(path, size))
    reader = fi.read_images(paths, (16, 24), readers=2, ahead=5)
    first = next(reader)
    assert first[0] == paths[0]
    deadline = time.monotonic() + 60
    while len(calls) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # nothing more may start while the caller holds the generator
    assert len(calls) == 6 and threading.get_ident() not in calls
    assert len(list(reader)) == len(paths) - 1 and len(calls) == len(paths)


def test_classify_batches_skip_unreadable_images(paths):
    import fastres
    from fastres.default_model import write_resnet50

    class Recorder:
        """A model that records the batches it is given (and runs the real one)."""

        def __init__(self, model):
            self.model, self.batches = model, []

        def __getattr__(self, name):
            return getattr(self.model, name)

        def predict(self, x):
            self.batches.append(x.shape[0])
            return self.model.predict(x)

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model = Recorder(fastres.load(write_resnet50(f"{folder}/m.h5", input_size=32, classes=4)))
    records = list(fi.classify(model, paths, "caffe", top=2, batch_size=4, readers=2))
    assert [r["image"] for r in records] == paths
    readable = [sum("top" in r for r in records[i:i + 4]) for i in range(0, len(records), 4)]
    assert model.batches == readable and sum(readable) == len(paths) - 3  # runs of 4 paths, less the unreadable
    assert all(len(r["top"]) == 2 and r["top"][0]["probability"] >= r["top"][1]["probability"]
               for r in records if "top" in r)


def test_progress_bar_is_tqdm_on_a_terminal(monkeypatch):
    import io

    from fastres.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = progress_bar(4, "predict")
    bar.update(4)
    bar.write("fastres: cannot read x.jpg", file=sys.stderr)
    bar.close()
    assert type(bar).__module__.startswith("tqdm") and bar.n == 4 and "predict" in sys.stderr.getvalue()
    assert "fastres: cannot read x.jpg\n" in sys.stderr.getvalue()
    assert not hasattr(progress_bar(4, "predict", enabled=False), "n")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed: no bar, no error
    silent = progress_bar(4, "predict")
    silent.update()
    silent.write("a line")
    silent.close()
    assert not type(silent).__module__.startswith("tqdm") and sys.stderr.getvalue().endswith("a line\n")
