"""ResNet50's 53 convolutions compiled for several x86 targets on this machine, each against its own peak.

Run with:  python benchmarks/targets.py [TARGET ...]     (default: host haswell skylake-avx512
icelake-server znver4).  For each target, a fresh process with ``NUMBA_CPU_NAME`` set and a cache
directory of its own runs ``test_conv_kernels.py::test_fma_peak``, ``test_read_bandwidth`` and the
53-convolution chain at 224x224 and 64x64 under pytest-benchmark; this script reads their JSON and prints
each target's ISA, register tile, measured peak (median), chain time (median), percent of its own peak, and
percent of its roofline: the sum over the convolutions of the larger of their arithmetic at the peak and
their weights at the measured read bandwidth (at 64x64 the weights decide).
A target whose ISA this CPU lacks is reported as such.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from resnet50_shapes import resnet50_convs

HERE = Path(__file__).parent
TARGETS = ["host", "haswell", "skylake-avx512", "icelake-server", "znver4"]
TESTS = ["test_conv_kernels.py::test_fma_peak", "test_conv_kernels.py::test_read_bandwidth",
         "test_conv_kernels.py::test_resnet50_all_convs"]


def run_target(target, workdir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(workdir / "cache"), FASTRES_WISDOM="off")
    env.pop("NUMBA_CPU_FEATURES", None)
    env.pop("NUMBA_CPU_NAME", None)
    if target != "host":
        env["NUMBA_CPU_NAME"] = target
    report = workdir / "bench.json"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[str(HERE / t) for t in TESTS],
               "-k", "fastres or peak or bandwidth", "--benchmark-only", f"--benchmark-json={report}",
               "--benchmark-min-rounds=15"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=HERE)
    if run.returncode != 0:
        return f"failed: {run.stdout[-500:]} {run.stderr[-500:]}"
    return json.loads(report.read_text())["benchmarks"]


def roofline_seconds(size, peak_gflops, read_gbps):
    """The 53 convolutions' roofline at ``size``: each takes at least its direct-kernel arithmetic at the peak
    and its float32 weights at the read bandwidth."""
    return sum(max(c.flops / (peak_gflops * 1e9), 4 * c.kernel**2 * c.cin * c.cout / (read_gbps * 1e9))
               for c in resnet50_convs(size))


def main(targets):
    rows = []
    for target in targets:
        print(f"{target}: compiling and timing ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result = run_target(target, Path(tmp))
        if isinstance(result, str):
            rows.append((target, result))
            continue
        peak = next(b for b in result if b["name"] == "test_fma_peak")
        peak_gflops = peak["extra_info"]["gflop"] / peak["stats"]["median"]
        read = next(b for b in result if b["name"] == "test_read_bandwidth")
        read_gbps = read["extra_info"]["gbytes"] / read["stats"]["median"]
        line = [target, peak["extra_info"]["isa"], peak["extra_info"]["tile"], f"{peak_gflops:.0f}",
                f"{read_gbps:.0f}"]
        for size in (224, 64):
            chain = next(b for b in result if b["name"] == f"test_resnet50_all_convs[{size}-fastres]")
            seconds = chain["stats"]["median"]
            gflops = chain["extra_info"]["gflop"] / seconds
            floor = roofline_seconds(size, peak_gflops, read_gbps)
            line += [f"{seconds * 1e3:.2f}", f"{gflops:.0f}", f"{100 * gflops / peak_gflops:.0f}%",
                     f"{100 * floor / seconds:.0f}%"]
        rows.append(tuple(line))
    headers = ("target", "ISA", "tile", "peak GFLOPS", "read GB/s", "224: ms", "GFLOPS", "% peak",
               "% roofline", "64: ms", "GFLOPS", "% peak", "% roofline")
    print(" | ".join(headers))
    for row in rows:
        print(" | ".join(row))


if __name__ == "__main__":
    main(sys.argv[1:] or TARGETS)
