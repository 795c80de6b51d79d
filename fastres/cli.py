"""The ``fastres`` command: bench, predict, info, profile.

Every command has ``--help``.  A user's mistake (a missing file, an unsupported
model, a bad option) prints one line on stderr and exits with status 2; a
broken image in ``predict`` is reported by name and the others go on (exit 1).
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

from . import __version__
from .errors import FastresError
from .images import PREPROCESS_MODES, classify, expand, image_shape
from .model import PRECISIONS
from .peers import PEER_PRECISION, PEERS
from .progress import progress_bar


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{message} (see '{self.prog} --help')")


class _UsageError(Exception):
    pass


def main(argv=None):
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            parser.print_help()
            return 2
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args)
    except (_UsageError, FastresError) as exc:
        print(f"fastres: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastres: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """fastres's own warnings as one line, ``fastres: warning: ...``; any other as Python shows it."""
    text = str(message)
    if text.startswith("fastres: "):
        print(f"fastres: warning: {text[len('fastres: '):]}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _build_parser():
    parser = _Parser(prog="fastres", description="Keras ResNet inference on the CPU without a deep-learning framework.")
    parser.add_argument("--version", action="version", version=f"fastres {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND", parser_class=_Parser)

    bench = sub.add_parser("bench", help="time a model against TensorFlow, ONNX Runtime and OpenVINO",
                           description="Time forward passes of MODEL (default: a ResNet50 with deterministic weights "
                                       "that fastres writes as a Keras .h5) and of the peers named by --compare.")
    bench.add_argument("model", nargs="?", help="a Keras .h5/.keras file (default: the built-in ResNet50)")
    bench.add_argument("--input-size", type=_positive, default=None, help="image height and width (default: the model's, else 224)")
    bench.add_argument("--batch", type=_positive, default=1, help="images per forward pass (default 1)")
    bench.add_argument("--architecture", help="for a weights-only file: resnet50, resnet101 or resnet152")
    bench.add_argument("--threads", type=_positive, default=None, help="threads for every engine (default: all cores)")
    bench.add_argument("--runs", type=_positive, default=20, help="timed forward passes per engine; the engines take turns of 5 (default 20)")
    bench.add_argument("--warmup", type=_nonnegative, default=3, help="untimed passes first (default 3)")
    bench.add_argument("--compare", default="", help="peers, comma-separated: " + ",".join(PEERS))
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE ('-' for stdout, which silences the table)")
    bench.add_argument("--plot", metavar="FILE.png", help="draw the latencies as a PNG (needs matplotlib)")
    bench.add_argument("--no-cold", action="store_true", help="skip the cold-start measurement (it compiles every kernel afresh)")
    _precision_option(bench, " (bf16 also times fastres in fp32, and OpenVINO at both precisions when "
                             "--compare names openvino)")
    bench.set_defaults(run=_bench)

    predict = sub.add_parser("predict", help="classify images",
                             description="Classify images (files, directories or glob patterns) and print the top classes, "
                                         "in the order given: in this process (decoding ahead of the engine in "
                                         "--readers threads), on a local Dask cluster (--workers) or on a running one "
                                         "(--scheduler).")
    predict.add_argument("model", help="a Keras .h5/.keras file")
    predict.add_argument("images", nargs="+", help="image files, directories or glob patterns")
    predict.add_argument("--preprocess", choices=PREPROCESS_MODES, default="caffe",
                         help="keras.applications preprocessing: caffe (RGB->BGR, ImageNet mean; ResNet50's), "
                              "tf ([-1, 1]), torch (ImageNet mean/std), unit ([0, 1]), none (raw 0..255); default caffe")
    predict.add_argument("--top", type=_positive, default=5, help="classes to show per image (default 5)")
    predict.add_argument("--labels", metavar="FILE", help="class names, one per line")
    predict.add_argument("--batch-size", type=_positive, default=16, help="images per forward pass (default 16)")
    predict.add_argument("--input-size", type=_positive, default=None, help="resize to this size when the model's is free (default 224)")
    predict.add_argument("--architecture", help="for a weights-only file: resnet50, resnet101 or resnet152")
    predict.add_argument("--threads", type=_positive, default=None,
                         help="kernel threads (default: all cores; on Dask, each task's share of its machine's cores)")
    predict.add_argument("--readers", type=_nonnegative, default=2,
                         help="threads decoding images ahead of the engine, in-process (default 2; 0: in line)")
    where = predict.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="run on the Dask cluster at ADDRESS (needs fastres[dask])")
    where.add_argument("--workers", type=_positive, metavar="N",
                       help="run on a local Dask cluster of N single-threaded worker processes (needs fastres[dask])")
    predict.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    _precision_option(predict)
    predict.set_defaults(run=_predict)

    info = sub.add_parser("info", help="describe a model file after folding and fusion",
                          description="Show the file's format, shapes, and each fused layer with its parameters and FLOPs.")
    info.add_argument("model", help="a Keras .h5/.keras file")
    info.add_argument("--architecture", help="for a weights-only file: resnet50, resnet101 or resnet152")
    info.add_argument("--input-size", type=_positive, default=None, help="for a model whose input size is free (default 224)")
    info.add_argument("--json", action="store_true", help="print JSON")
    _precision_option(info)
    info.set_defaults(run=_info)

    profile = sub.add_parser("profile", help="time each fused layer of a model",
                             description="Run MODEL and show each fused layer's median time, GFLOPS and share of the total.")
    profile.add_argument("model", nargs="?", help="a Keras .h5/.keras file (default: the built-in ResNet50)")
    profile.add_argument("--architecture", help="for a weights-only file: resnet50, resnet101 or resnet152")
    profile.add_argument("--input-size", type=_positive, default=None, help="for a model whose input size is free (default 224)")
    profile.add_argument("--batch", type=_positive, default=1, help="images per pass (default 1)")
    profile.add_argument("--runs", type=_positive, default=10, help="passes; the median is shown (default 10)")
    profile.add_argument("--threads", type=_positive, default=None, help="threads (default: all cores)")
    profile.add_argument("--json", action="store_true", help="print JSON")
    _precision_option(profile)
    profile.set_defaults(run=_profile)

    compile_ = sub.add_parser("compile", help="compile every kernel into the cache ahead of time",
                              description="Compile every kernel into Numba's cache (for container images and "
                                          "read-only installs); fails clearly when the cache is not writable.")
    compile_.set_defaults(run=_compile)
    return parser


def _precision_option(parser, more=""):
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 (default), or bf16: weights rounded to bfloat16 once at load (half the memory), "
                             "float32 accumulation; each convolution's input rounded to bf16 where the products run on "
                             "bf16 instructions (AMX, vdpbf16ps)" + more)


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _nonnegative(text):
    return 0 if text.strip() == "0" else _positive(text)


# ---------------------------------------------------------------- shared helpers

def _load(path, architecture=None, threads=None, precision="fp32"):
    from . import load

    if path is not None and not os.path.exists(path):
        raise FastresError(f"no such file: {path}")
    return load(path, architecture=architecture, threads=threads, precision=precision)


def _model_and_input(args):
    """The model (default: the built-in ResNet50) and the (H, W, C) it runs on."""
    from .default_model import default_model_path

    path = args.model or str(default_model_path(args.input_size or 224))
    model = _load(path, args.architecture, getattr(args, "threads", None), getattr(args, "precision", "fp32"))
    return path, model, image_shape(model, args.input_size)


def _table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ---------------------------------------------------------------- info and profile

def _info(args):
    path, model, shape = _model_and_input(args)
    rows = model.describe(shape)
    report = {"file": path, "format": model.file_format, "keras_version": model.keras_version,
              "input_shape": list(model.input_shape), "output_shape": list(model.output_shape),
              "input_used": [None, *shape], "layers": rows,
              "total_params": sum(r["params"] for r in rows), "total_flops": sum(r["flops"] for r in rows),
              "file_params": model.file_params, "precision": model.precision, "products": _products(model),
              "packed_weights_bytes": model.packed_bytes}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{path}: {model.file_format} (Keras {model.keras_version or 'unknown'})")
    print(f"input {model.input_shape}, output {model.output_shape}; FLOPs per image at {shape[0]}x{shape[1]}")
    print(f"{model.precision} weights ({model.packed_bytes / 2**20:.1f} MiB packed), products on {_products(model)}")
    print(_table(["layer", "kind (fused)", "output shape", "params", "MFLOPs"],
                 [(r["name"], r["kind"] + (f" <- {len(r['folded'])} folded" if r["folded"] else ""),
                   str(tuple(r["output_shape"])), f"{r['params']:,}", f"{r['flops'] / 1e6:,.1f}") for r in rows]))
    print(f"total: {len(rows)} fused layers, {report['total_params']:,} parameters after folding "
          f"({report['file_params']:,} in the file), {report['total_flops'] / 1e9:.2f} GFLOPs per image")
    return 0


def _products(model):
    """What computes a convolution's products at the model's precision, on this CPU."""
    from .kernels import _numba, amx

    return amx.products() if model.precision == "bf16" else f"{_numba.ISA} fp32 FMA (direct or Winograd)"


def _machine_line(m):
    """One line naming what the figures were measured on."""
    amx_peak = f", AMX bf16 peak {m['amx_peak_gflops']:.0f} GFLOPS" if "amx_peak_gflops" in m else ""
    short = (f"\nwarning: {m['threads']} threads made only {m['peak_gflops'] / m['peak_one_thread_gflops']:.1f}x one "
             "thread's FMA rate: they share cores, or a core was busy (or taken by the VM) while measuring; the "
             "figures of this run may be off" if m.get("cores_short") else "")
    return (f"{m['cpu']} ({m['llvm_cpu']}), {m['isa']} {m['vector_bits']}-bit, tile {m['tile']}, "
            f"{m['threads']} threads: FMA peak {m['peak_gflops']:.0f} GFLOPS{amx_peak}, read {m['read_gbps']:.0f} GB/s"
            + short)


def _peak_of(kernel, machine):
    """The peak a layer is measured against: AMX's for the AMX kernels, the float32 FMA peak for the rest."""
    return machine.get("amx_peak_gflops", 0.0) if "amx" in kernel else machine["peak_gflops"]


def _profile(args):
    from .kernels import roofline

    path, model, shape = _model_and_input(args)
    x = np.random.default_rng(0).standard_normal((args.batch, *shape)).astype(np.float32)
    times = dict(model.profile(x, args.runs))
    machine = roofline.machine()
    rows = [dict(r, seconds=times.get(r["name"], 0.0), kernel=model.last_kernels.get(r["name"], ""))
            for r in model.describe(shape) if r["name"] in times]
    total = sum(r["seconds"] for r in rows)
    for r in rows:
        r["gflops"] = r["flops"] * args.batch / r["seconds"] / 1e9 if r["seconds"] else 0.0
        r["peak_gflops"] = _peak_of(r["kernel"], machine)
        r["percent_of_peak"] = 100 * r["gflops"] / r["peak_gflops"] if r["peak_gflops"] else 0.0
        r["share"] = r["seconds"] / total if total else 0.0
    if args.json:
        print(json.dumps({"file": path, "batch": args.batch, "input_shape": [None, *shape], "runs": args.runs,
                          "precision": model.precision, "machine": machine, "total_seconds": total, "layers": rows},
                         indent=1))
        return 0
    print(f"{path}: batch {args.batch} at {shape[0]}x{shape[1]}, {model.precision}, "
          f"median of {args.runs} runs per layer")
    print(_machine_line(machine))
    print(_table(["layer", "kind (fused)", "kernel", "ms", "GFLOPS", "% peak", "share"],
                 [(r["name"], r["kind"], r["kernel"], f"{r['seconds'] * 1e3:.3f}", f"{r['gflops']:.1f}",
                   f"{r['percent_of_peak']:.0f}%", f"{100 * r['share']:.1f}%") for r in rows]))
    flops = sum(r["flops"] for r in rows) * args.batch
    # the time the layers would take at their peaks, against the time they took
    ideal = sum(r["flops"] * args.batch / r["peak_gflops"] / 1e9 for r in rows if r["peak_gflops"])
    which = ": AMX's for the AMX layers, the FMA peak for the rest" if any("amx" in r["kernel"] for r in rows) else ""
    print(f"sum: {total * 1e3:.2f} ms, {flops / total / 1e9:.1f} GFLOPS ({100 * ideal / total:.0f}% of peak{which})")
    return 0


# ---------------------------------------------------------------- predict

def _predict(args):
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise FastresError("fastres predict needs Pillow: pip install 'fastres[images]'") from None
    path, model, shape = _model_and_input(args)
    if shape[2] != 3:
        raise FastresError(f"{path} takes {shape[2]}-channel input; predict reads RGB images")
    labels = _labels(args.labels, model.output_shape[-1])
    paths = list(expand(args.images))
    if args.scheduler or args.workers:
        try:
            from .distributed import iter_predict_files
        except ImportError as exc:
            raise FastresError(str(exc)) from None
        records = iter_predict_files(path, paths, args.preprocess, args.top, args.batch_size, args.input_size,
                                     args.architecture, args.threads, client=args.scheduler, workers=args.workers,
                                     precision=args.precision)
    else:
        records = classify(model, paths, args.preprocess, args.top, args.batch_size, args.input_size, args.readers)
    bar = progress_bar(len(paths), "predict", enabled=not sys.stdout.isatty())  # a terminal shows the lines
    failures = 0
    for record in records:
        bar.update()
        if "error" in record:
            failures += 1
            bar.write(f"fastres: cannot read {record['image']}: {record['error']}", file=sys.stderr)
            continue
        found = [{"class": t["class"], "label": labels[t["class"]] if labels else str(t["class"]),
                  "probability": t["probability"]} for t in record["top"]]
        if args.json:
            print(json.dumps({"image": record["image"], "top": found}))
        else:
            print(f"{record['image']}: " + ", ".join(f"{f['label']} ({f['probability']:.3f})" for f in found))
    bar.close()
    if not paths:
        raise FastresError("no images found")
    return 1 if failures else 0


def _labels(filename, classes):
    """Class names from ``filename`` (one per line, ``classes`` of them), or None."""
    if not filename:
        return None
    try:
        with open(filename, encoding="utf8") as fh:
            labels = [line.rstrip("\n") for line in fh]
    except OSError as exc:
        raise FastresError(f"cannot read labels {filename}: {exc.strerror}") from None
    if len(labels) != classes:
        raise FastresError(f"{filename} has {len(labels)} lines but the model has {classes} classes")
    return labels


# ---------------------------------------------------------------- bench

_CLOCK_START = "import json, resource, sys, time\nstart = time.perf_counter()\n"
_CLOCK_STOP = (
    "seconds = time.perf_counter() - start\n"
    "try:  # VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec)\n"
    "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
    "    peak = int(hwm.split()[1]) * 1024\n"
    "except (OSError, IndexError):\n"
    "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
    "print(json.dumps({'seconds': seconds, 'peak_bytes': peak}))\n"
)


def _fastres_first_result(path, shape, threads, precision="fp32"):
    """Python source that loads ``path`` with fastres and runs one batch-1 pass of zeros (see ``_startup``)."""
    return ("import numpy as np, fastres\n"
            f"m = fastres.load({str(path)!r}, threads={threads!r}, precision={precision!r})\n"
            f"out = m.predict(np.zeros((1, {shape[0]}, {shape[1]}, {shape[2]}), np.float32))\n")


def _startup(script, cold=False, what="fastres"):
    """Seconds from start to the first result, and peak memory (VmHWM), of ``script`` in a fresh process.

    ``script`` is Python source that imports an engine, loads the model and computes one result
    (``_fastres_first_result``, ``peers.first_result_script``); the clock starts before its first import.
    ``cold`` gives it an empty Numba cache.  Returns {"seconds", "peak_bytes"}.
    """
    import subprocess
    import tempfile

    code = _CLOCK_START + script + _CLOCK_STOP
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as empty_cache:
        if cold:
            env["NUMBA_CACHE_DIR"] = empty_cache
        try:
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
        except subprocess.TimeoutExpired:
            raise FastresError(f"the start-up measurement of {what} took over 30 minutes") from None
    if run.returncode != 0:
        raise FastresError(f"the start-up measurement of {what} failed: {run.stderr.strip().splitlines()[-1:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


TURN = 5            # passes an engine runs before the next one takes its turn
TURN_REST = 0.02    # seconds between turns at least, and then until the last engine's threads are idle
QUIET_CPU = 0.05    # idle: the process used at most this share of one core over a QUIET_WINDOW
QUIET_WINDOW = 0.01
REST_LIMIT = 1.0    # seconds: a rest never lasts longer


def _rest():
    """Sleep ``TURN_REST``, then until this process's threads are idle (at most ``REST_LIMIT``).

    An engine's thread pool goes on spinning for a while after a pass: ONNX Runtime 1.32's for
    about 45 ms on a 2-core Zen 3 VM, fastres's (OpenMP) about 10 ms, OpenVINO's not at all.  The
    engine timed next would share the cores with it: fastres's first pass after an ONNX Runtime
    turn took 2.3x its time, with a fixed 20 ms rest.
    """
    time.sleep(TURN_REST)
    deadline = time.perf_counter() + REST_LIMIT
    while time.perf_counter() < deadline:
        used = time.process_time()
        time.sleep(QUIET_WINDOW)
        if time.process_time() - used <= QUIET_CPU * QUIET_WINDOW:
            return


def _time_in_turns(engines, x, runs, warmup, progress):
    """Time the engines taking turns; returns {name: (last output, seconds of each timed pass)}.

    Each engine first runs its ``warmup`` passes.  The timed passes then go round in turns of
    ``TURN`` passes per engine, the order rotated every round, with a rest after each turn
    until the engine's threads are idle (``_rest``).  The machine's speed drifts over tens of
    seconds (a shared VM); timed one after the other, each engine would get a different phase
    of it, and the one timed right after another would share the cores with that engine's
    still-spinning threads.
    """
    names = list(engines)
    bar = progress_bar(len(names) * (runs + warmup), "timing " + ", ".join(names), progress)
    outs, times = {}, {name: [] for name in names}
    for name in names:
        for _ in range(warmup):
            outs[name] = engines[name](x)
            bar.update()
        _rest()
    for turn in range(-(-runs // TURN)):
        for name in names[turn % len(names):] + names[: turn % len(names)]:
            for _ in range(min(TURN, runs - turn * TURN)):
                start = time.perf_counter()
                outs[name] = engines[name](x)
                times[name].append(time.perf_counter() - start)
                bar.update()
            _rest()
    bar.close()
    return {name: (np.asarray(outs[name], np.float32), times[name]) for name in names}


def _prepare_peers(peers, path, threads, shape, results, folder, say):
    """Load each peer; returns ({name: forward function}, {name: its start-up script}).

    A peer that cannot run is reported in ``results`` instead.  The ONNX peers share one
    conversion of the model, written to ``folder`` beforehand.
    """
    from .peers import ONNX_PEERS, export_onnx, first_result_script, peer_forward

    onnx, forwards, scripts = None, {}, {}
    for name in peers:
        try:
            say(f"preparing {name} ...")
            if name in ONNX_PEERS and onnx is None:
                onnx = export_onnx(path, folder, threads)
            forwards[name] = peer_forward(name, path, threads, onnx=onnx if name in ONNX_PEERS else None)
        except ImportError as exc:
            results[name] = {"status": f"not installed ({exc.name or exc})"}
            continue
        except Exception as exc:  # a peer that cannot run this model is reported, not fatal
            results[name] = {"status": f"failed: {exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}"}
            continue
        scripts[name] = first_result_script(name, path, shape, threads, onnx if name in ONNX_PEERS else None)
    return forwards, scripts


def _startup_rows(results):
    """Table rows (engine, first result s, peak MiB) of the engines whose start-up was measured or failed."""
    rows = []
    for name, r in results.items():
        if "first_result_seconds_warm" in r:
            rows.append((name, f"{r['first_result_seconds_warm']:.2f}", f"{r['peak_memory_bytes'] / 2**20:.0f}"))
        elif "startup_status" in r:
            rows.append((name, "-", r["startup_status"]))
    return rows


def _bench(args):
    peers = [p.strip().lower() for p in args.compare.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise _UsageError(f"--compare: unknown engine {unknown[0]!r}; choose from {', '.join(PEERS)}")
    if args.precision == "bf16" and "openvino" in peers and "openvino-bf16" not in peers:
        peers.insert(peers.index("openvino") + 1, "openvino-bf16")  # the peer at both precisions
    quiet = args.json == "-"
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    path, model, shape = _model_and_input(args)
    from .kernels import get_num_threads

    threads = args.threads or get_num_threads()
    x = np.random.default_rng(0).standard_normal((args.batch, *shape)).astype(np.float32)
    say(f"fastres bench: {path}, batch {args.batch} at {shape[0]}x{shape[1]}x{shape[2]}, {threads} threads, "
        f"fastres in {model.precision}")
    results = {}
    import tempfile

    precisions = {"fastres": model.precision, **PEER_PRECISION}
    with tempfile.TemporaryDirectory() as folder:  # the ONNX peers' model, converted once
        forwards, scripts = _prepare_peers(peers, path, threads, shape, results, folder, say)
        if model.precision != "fp32":  # fastres at both precisions too: what bf16 gains here
            peers.insert(0, "fastres-fp32")
            precisions["fastres-fp32"] = "fp32"
            forwards = {"fastres-fp32": _load(path, args.architecture, args.threads).predict, **forwards}
        timed = _time_in_turns({"fastres": model.predict, **forwards}, x, args.runs, args.warmup, not quiet)
        del forwards  # the peers' memory is not the start-up measurement's
        reference, times = timed.pop("fastres")
        results = {"fastres": {"status": "ok", "precision": model.precision, "times": times}, **results}
        for name, (out, peer_times) in timed.items():
            results[name] = {"status": "ok", "precision": precisions[name], "times": peer_times,
                             "max_abs_diff": float(np.abs(out - reference).max()),
                             "reference_max_abs": float(np.abs(reference).max())}
        results = {name: results[name] for name in ["fastres", *peers]}  # in the order asked for
        say("measuring this machine's FMA peak and read bandwidth ...")
        from .kernels import roofline

        machine = roofline.machine()
        say("measuring start-up in fresh processes ...")
        first = _fastres_first_result(path, shape, args.threads, model.precision)
        warm = _startup(first)
        cold = None if args.no_cold else _startup(first, cold=True)
        results["fastres"].update(first_result_seconds_warm=warm["seconds"], peak_memory_bytes=warm["peak_bytes"])
        for name, script in scripts.items():
            try:
                start = _startup(script, what=name)
                results[name].update(first_result_seconds_warm=start["seconds"], peak_memory_bytes=start["peak_bytes"])
            except FastresError as exc:  # reported beside the peer's times, not fatal
                results[name]["startup_status"] = str(exc)
    fast_median = float(np.median(times))
    for name, r in results.items():
        if r["status"] == "ok":
            t = np.asarray(r["times"])
            r.update(median_ms=float(np.median(t) * 1e3), p90_ms=float(np.percentile(t, 90) * 1e3),
                     images_per_second=args.batch / float(np.median(t)),
                     fastres_speedup=float(np.median(t)) / fast_median)
    report = {"model": path, "precision": model.precision, "packed_weights_bytes": model.packed_bytes,
              "machine": machine, "batch": args.batch, "input_shape": [None, *shape], "threads": threads,
              "runs": args.runs,
              "warmup": args.warmup, "engines": results, "first_result_seconds_warm": warm["seconds"],
              "first_result_seconds_cold": cold and cold["seconds"], "peak_memory_bytes": warm["peak_bytes"],
              "weights_bytes": model.weights_bytes}
    if args.json:
        text = json.dumps(report, indent=1)
        if quiet:
            print(text)
        else:
            with open(args.json, "w", encoding="utf8") as fh:
                fh.write(text + "\n")
    if not quiet:
        rows = []
        for name, r in results.items():
            if r["status"] != "ok":
                rows.append((name, precisions.get(name, "-"), "-", "-", "-", "-", r["status"]))
                continue
            diff = "(reference)" if name == "fastres" else f"{r['max_abs_diff']:.2e} (of {r['reference_max_abs']:.2e})"
            rows.append((name, r["precision"], f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}",
                         f"{r['images_per_second']:.1f}", f"{r['fastres_speedup']:.2f}x", diff))
        print(_machine_line(machine))
        print(_table(["engine", "precision", "median ms", "p90 ms", "images/s", "fastres speed-up",
                      "max |diff| vs fastres"], rows))
        print(f"load to first result: {warm['seconds']:.2f} s with a warm Numba cache"
              + ("" if cold is None else f", {cold['seconds']:.2f} s cold (compiling every kernel)"))
        print(f"peak memory (fresh process, load + one batch-1 pass): {warm['peak_bytes'] / 2**20:.0f} MiB; "
              f"weights {model.weights_bytes / 2**20:.0f} MiB")
        if len(results) > 1:
            print("start-up, each engine in a fresh process (import, load, one batch-1 pass; warm Numba cache; "
                  "the ONNX peers' conversion done beforehand, not counted):")
            print(_table(["engine", "first result s", "peak MiB"], _startup_rows(results)))
    if args.plot:
        _plot(report, args.plot)
        say(f"plot written to {args.plot}")
    return 0


def _plot(report, filename):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FastresError("--plot needs matplotlib: pip install 'fastres[plot]'") from None
    engines = [(n, r) for n, r in report["engines"].items() if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(engines) + 1.6))
    names = [n for n, _ in engines]
    medians = [r["median_ms"] for _, r in engines]
    p90 = [r["p90_ms"] - r["median_ms"] for _, r in engines]
    ax.barh(names, medians, xerr=[[0] * len(p90), p90], color=["#d62728" if n == "fastres" else "#7f7f7f" for n in names])
    for i, value in enumerate(medians):
        ax.text(value, i, f" {value:.1f} ms", va="center")
    shape = report["input_shape"]
    ax.set_xlabel("latency per forward pass, ms (bar: median, whisker: p90)")
    ax.set_xlim(0, max(m + p for m, p in zip(medians, p90)) * 1.25)
    ax.set_title(f"batch {report['batch']}, {shape[1]}x{shape[2]}, {report['threads']} threads", fontsize=10)
    ax.invert_yaxis()
    fig.tight_layout()
    try:
        fig.savefig(filename, dpi=100)
    except OSError as exc:
        raise FastresError(f"cannot write {filename}: {exc.strerror}") from None
    finally:
        plt.close(fig)


def _compile(args):
    from .precompile import compile_all

    path, seconds = compile_all()
    print(f"fastres: every kernel compiled into {path} in {seconds:.1f} s")
    return 0
