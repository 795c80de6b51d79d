"""The fastres command, end to end through its console script."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras_models as km

SCRIPT = shutil.which("fastres", path=os.path.dirname(sys.executable)) or shutil.which("fastres")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return dict(os.environ, FASTRES_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL="2")


def run(env, *args, timeout=900):
    assert SCRIPT, "the fastres console script is not installed"
    return subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def assert_user_error(result, text):
    """One clear line on stderr, a non-zero exit, no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("fastres: error:")]
    assert len(lines) == 1 and text in lines[0], result.stderr


@pytest.fixture(scope="module")
def default_model(env):
    from fastres.default_model import default_model_path

    os.environ["FASTRES_CACHE"] = env["FASTRES_CACHE"]
    try:
        return default_model_path(64)
    finally:
        del os.environ["FASTRES_CACHE"]


@pytest.mark.parametrize("command", [[], ["bench"], ["predict"], ["info"], ["profile"]])
def test_help(env, command):
    result = run(env, *command, "--help")
    assert result.returncode == 0 and "usage: fastres" in result.stdout
    if command:
        assert "--precision {fp32,bf16}" in result.stdout


def test_python_dash_m(env):
    result = subprocess.run([sys.executable, "-m", "fastres", "--version"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.startswith("fastres ")


def test_bench_with_no_model(env):
    """The README's main job: the built-in ResNet50 at 224x224, with cold and warm start-up."""
    result = run(env, "bench", "--runs", "2", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    assert "fastres" in result.stdout and "median ms" in result.stdout
    assert "warm Numba cache" in result.stdout and "cold" in result.stdout and "peak memory" in result.stdout
    assert list(Path(env["FASTRES_CACHE"]).glob("resnet50-224-*.h5"))


def test_bench_compare_json_and_plot(env, default_model, tmp_path):
    plot = tmp_path / "bench.png"
    result = run(env, "bench", default_model, "--runs", "2", "--warmup", "1", "--no-cold", "--batch", "2",
                 "--compare", "tensorflow,onnxruntime", "--json", "-", "--plot", plot)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    engines = report["engines"]
    assert report["input_shape"] == [None, 64, 64, 3] and report["batch"] == 2
    assert_machine(report["machine"])
    assert engines["fastres"]["status"] == "ok" and engines["fastres"]["median_ms"] > 0
    tf = engines["tensorflow"]
    assert tf["status"] == "ok" and tf["max_abs_diff"] <= 1e-4 * tf["reference_max_abs"]
    ort = engines["onnxruntime"]
    assert ort["status"] == "ok" or ort["status"].startswith("not installed")  # reported, never faked
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every engine that ran has its own start-up, measured the same way: a fresh process, load, one result
    for name, engine in engines.items():
        if engine["status"] == "ok":
            assert engine["first_result_seconds_warm"] > 0 and engine["peak_memory_bytes"] > 2**20, name
    assert engines["fastres"]["first_result_seconds_warm"] == report["first_result_seconds_warm"]
    assert engines["fastres"]["peak_memory_bytes"] == report["peak_memory_bytes"]


def test_bench_times_the_engines_in_turns():
    """Warm-up first, then turns of ``TURN`` passes, the order rotated each round, every pass timed."""
    import itertools

    from fastres import cli

    calls = []
    engines = {name: (lambda x, name=name: calls.append(name) or x) for name in ("a", "b", "c")}
    timed = cli._time_in_turns(engines, np.ones(2), runs=12, warmup=1, progress=False)
    assert all(len(timed[name][1]) == 12 and (timed[name][0] == 1).all() for name in engines)
    assert calls[:3] == ["a", "b", "c"] and cli.TURN == 5
    turns = [(name, len(list(group))) for name, group in itertools.groupby(calls[3:])]
    assert turns == [("a", 5), ("b", 5), ("c", 5), ("b", 5), ("c", 5), ("a", 5), ("c", 2), ("a", 2), ("b", 2)]


def test_a_rest_lasts_until_the_last_engines_threads_are_idle():
    """As a thread pool spinning on after a pass: a thread busy for 0.3 s (numpy, without the GIL)."""
    import threading
    import time

    from fastres import cli

    done = threading.Event()
    a, b = np.ones((200, 200)), np.ones((200, 200))

    def spin():
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            a @ b
        done.set()

    start = time.perf_counter()
    threading.Thread(target=spin).start()
    cli._rest()
    assert done.is_set() and time.perf_counter() - start >= 0.3
    start = time.perf_counter()
    cli._rest()   # nothing runs: the fixed rest and one quiet window
    assert time.perf_counter() - start < cli.REST_LIMIT


def test_startup_measurement_and_table():
    """The start-up plumbing with a stand-in engine: a fresh process, its own clock and peak memory."""
    from fastres import FastresError, cli, peers

    start = cli._startup("out = bytearray(64 << 20)\n", what="stand-in")  # touches 64 MiB
    assert 0 < start["seconds"] < 60 and start["peak_bytes"] >= 64 << 20
    with pytest.raises(FastresError, match="start-up measurement of stand-in failed.*ZeroDivisionError"):
        cli._startup("out = 1 / 0\n", what="stand-in")
    # a peer's script loads the peers module alone: fastres's own imports are not counted against it
    script = peers.first_result_script("onnxruntime", "model.h5", (8, 8, 3), 2, "model.onnx")
    head = script[:script.index("import numpy")]
    cli._startup(head + "import sys\nassert 'fastres' not in sys.modules and 'numba' not in sys.modules\n"
                 "assert peers.PEERS == " + repr(peers.PEERS) + "\n", what="peers module")
    assert "peer_forward('onnxruntime', 'model.h5', 2, 'model.onnx')" in script
    results = {"fastres": {"status": "ok", "first_result_seconds_warm": 0.914, "peak_memory_bytes": 250 << 20},
               "openvino": {"status": "ok", "startup_status": "the start-up measurement of openvino failed: ..."},
               "onnxruntime": {"status": "not installed (onnxruntime)"}}
    rows = cli._startup_rows(results)
    assert rows == [("fastres", "0.91", "250"), ("openvino", "-", "the start-up measurement of openvino failed: ...")]


def test_default_model_loads_in_keras(default_model):
    """The default model is a real Keras file: both Keras 3 and tf_keras load it, with fastres's answers."""
    import fastres

    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    ours = fastres.load(default_model).predict(x)
    for keras in (km.keras3(), km.keras2()):
        theirs = np.asarray(keras.models.load_model(default_model, compile=False)(x))
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_info_and_profile(env, default_model):
    info = run(env, "info", default_model, "--json")
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["format"] == "keras2-h5" and report["output_shape"] == [None, 1000]
    conv1 = next(r for r in report["layers"] if r["name"] == "conv1_conv")
    assert conv1["folded"] == ["conv1_pad", "conv1_bn", "conv1_relu"] and conv1["flops"] == 2 * 32 * 32 * 64 * 49 * 3
    keras_count = km.keras3().applications.ResNet50(weights=None, input_shape=(64, 64, 3)).count_params()
    assert report["file_params"] == keras_count
    assert report["total_params"] < keras_count  # batch-norms folded away
    text = run(env, "info", default_model)
    assert text.returncode == 0 and "GFLOPs per image" in text.stdout
    profile = run(env, "profile", default_model, "--runs", "2", "--json")
    assert profile.returncode == 0, profile.stderr
    report = json.loads(profile.stdout)
    layers = report["layers"]
    assert abs(sum(l["share"] for l in layers) - 1) < 1e-6 and all(l["seconds"] > 0 for l in layers)
    assert_machine(report["machine"])
    for layer in layers:   # every GFLOPS figure beside its share of this machine's measured peak
        assert layer["percent_of_peak"] == pytest.approx(100 * layer["gflops"] / report["machine"]["peak_gflops"])
    assert all(l["kernel"].split()[0] in ("direct", "winograd") for l in layers if l["kind"].startswith("Conv2D"))
    text = run(env, "profile", default_model, "--runs", "1").stdout
    assert "GFLOPS" in text and "% peak" in text and "FMA peak" in text


def test_bf16_precision(env, default_model, images):
    """--precision bf16 on info, profile, bench and predict: each says so, and which kernel computes."""
    from fastres.kernels import _numba, amx

    result = run(env, "info", default_model, "--precision", "bf16", "--json")
    info = json.loads(result.stdout)
    if not _numba.BF16_DOT:  # the load's warning, as one line
        assert "fastres: warning: this CPU has no AVX512-BF16" in result.stderr and "UserWarning" not in result.stderr
    fp32 = json.loads(run(env, "info", default_model, "--json").stdout)
    assert (info["precision"], info["products"], fp32["precision"]) == ("bf16", amx.products(), "fp32")
    assert 0.5 <= info["packed_weights_bytes"] / fp32["packed_weights_bytes"] < 0.501
    text = run(env, "info", default_model, "--precision", "bf16").stdout
    assert f"bf16 weights ({info['packed_weights_bytes'] / 2**20:.1f} MiB packed), products on {amx.products()}" in text
    profile = run(env, "profile", default_model, "--precision", "bf16", "--runs", "1", "--json")
    assert profile.returncode == 0, profile.stderr
    report = json.loads(profile.stdout)
    assert ("amx_peak_gflops" in report["machine"]) == amx.AMX
    for layer in report["layers"]:  # an AMX layer against AMX's peak, any other against the FMA peak
        peak = report["machine"]["amx_peak_gflops" if "amx" in layer["kernel"] else "peak_gflops"]
        assert layer["peak_gflops"] == peak and layer["percent_of_peak"] == pytest.approx(100 * layer["gflops"] / peak)
    assert report["precision"] == "bf16"
    assert all("bf16" in l["kernel"] for l in report["layers"] if l["kind"].startswith(("Conv2D", "Dense")))
    bench = run(env, "bench", default_model, "--precision", "bf16", "--runs", "1", "--warmup", "0", "--no-cold",
                "--compare", "tensorflow", "--json", "-")
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    engines = report["engines"]
    assert report["precision"] == "bf16" and engines["fastres"]["precision"] == "bf16"
    tf, fp32 = engines["tensorflow"], engines["fastres-fp32"]   # bf16 is timed beside fastres's own fp32
    assert list(engines) == ["fastres", "fastres-fp32", "tensorflow"]
    for peer in (tf, fp32):
        assert peer["precision"] == "fp32" and peer["max_abs_diff"] <= 5e-2 * peer["reference_max_abs"]
    predict = run(env, "predict", default_model, images / "img0.png", "--precision", "bf16", "--top", "1", "--json")
    assert predict.returncode == 0, predict.stderr
    assert json.loads(predict.stdout)["top"][0]["probability"] > 0
    assert_user_error(run(env, "info", default_model, "--precision", "fp16"), "argument --precision: invalid choice")


def test_bench_bf16_runs_fastres_and_openvino_at_both_precisions(env, default_model):
    result = run(env, "bench", default_model, "--precision", "bf16", "--runs", "1", "--warmup", "0", "--no-cold",
                 "--compare", "openvino")
    assert result.returncode == 0, result.stderr
    speed_table = result.stdout.split("load to first result")[0]  # the start-up table below names the engines too
    rows = {line.split()[0]: line.split() for line in speed_table.splitlines() if line.split()}
    assert rows["fastres"][1] == "bf16" and rows["fastres-fp32"][1] == "fp32"
    assert rows["openvino"][1] == "fp32" and rows["openvino-bf16"][1] == "bf16"


def assert_machine(machine):
    """bench and profile name what they measured on."""
    from fastres.kernels import _numba

    assert machine["isa"] == _numba.ISA and machine["vector_bits"] == 32 * _numba.VECTOR_FLOATS
    assert machine["cpu"] == _numba.cpu_model() and machine["llvm_cpu"] == _numba.CPU_NAME
    assert machine["peak_gflops"] > 0 and machine["read_gbps"] > 0 and machine["threads"] >= 1


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, suffix in enumerate([".png", ".jpg", ".png"]):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(folder / f"img{i}{suffix}")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(folder / "gray.jpg")  # converted to RGB
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return folder


def test_predict_files_dirs_globs_and_broken(env, default_model, images, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class-{i}\n" for i in range(1000)))
    result = run(env, "predict", default_model, images, "--top", "3", "--labels", labels, "--batch-size", "2", "--json")
    assert result.returncode == 1  # one image could not be read
    assert "broken.jpg" in result.stderr and "Traceback" not in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(Path(r["image"]).name for r in rows) == ["gray.jpg", "img0.png", "img1.jpg", "img2.png"]
    for row in rows:
        assert len(row["top"]) == 3 and row["top"][0]["label"].startswith("class-")
        probs = [t["probability"] for t in row["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
    single = run(env, "predict", default_model, images / "img0.png", str(images / "*.jpg"), "--preprocess", "tf")
    assert single.returncode == 1 and single.stdout.count(": ") == 3  # img0.png, img1.jpg, gray.jpg


def test_predict_matches_the_engine(env, default_model, images):
    """The scores printed are the engine's on the caffe-preprocessed, resized image."""
    from PIL import Image

    import fastres
    from fastres.images import preprocess

    result = run(env, "predict", default_model, images / "img0.png", "--top", "1", "--json")
    top = json.loads(result.stdout)["top"][0]
    pixels = np.asarray(Image.open(images / "img0.png").convert("RGB").resize((64, 64), Image.BILINEAR))
    expected = fastres.load(default_model).predict(preprocess(pixels[None], "caffe"))[0]
    assert top["class"] == int(expected.argmax()) and abs(top["probability"] - expected.max()) < 1e-6


def test_user_errors(env, default_model, tmp_path):
    assert_user_error(run(env, "info", tmp_path / "missing.h5"), "no such file")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not a model at all")
    assert_user_error(run(env, "info", junk), "not a Keras model file")
    assert_user_error(run(env, "bench", "--runs", "0"), "--runs")
    assert_user_error(run(env, "bench", "--compare", "pytorch"), "unknown engine 'pytorch'")
    assert_user_error(run(env, "profile", "--frobnicate"), "unrecognized arguments")
    missing_image = run(env, "predict", default_model, tmp_path / "none-here.png")
    assert missing_image.returncode == 1 and "none-here.png: no such file" in missing_image.stderr
    assert_user_error(run(env, "bench", default_model, "--input-size", "96", "--no-cold"), "takes 64x64 images")


def test_unsupported_model_error(env, tmp_path):
    keras = km.keras3()
    inp = keras.Input((8, 8, 3))
    out = keras.layers.Flatten()(keras.layers.Conv2DTranspose(2, 3, name="upsample")(inp))
    path = tmp_path / "unsupported.keras"
    keras.Model(inp, out).save(path)
    assert_user_error(run(env, "info", path), "layer 'upsample' has class 'Conv2DTranspose'")
