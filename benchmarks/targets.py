"""ResNet50's 53 convolutions compiled for several x86 targets on this machine, each against its own peak.

Run with:  python benchmarks/targets.py [TARGET ...]     (default: host haswell skylake-avx512
icelake-server znver4).  For each target, a fresh process with ``NUMBA_CPU_NAME`` set and a cache
directory of its own runs ``test_conv_kernels.py::test_fma_peak`` and the 53-convolution chain at
224x224 and 64x64 under pytest-benchmark; this script reads their JSON and prints each target's ISA,
register tile, measured peak (median), chain time (median) and percent of its own peak.
A target whose ISA this CPU lacks is reported as such.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
TARGETS = ["host", "haswell", "skylake-avx512", "icelake-server", "znver4"]
TESTS = ["test_conv_kernels.py::test_fma_peak", "test_conv_kernels.py::test_resnet50_all_convs"]


def run_target(target, workdir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(workdir / "cache"), FASTRES_WISDOM="off")
    env.pop("NUMBA_CPU_FEATURES", None)
    env.pop("NUMBA_CPU_NAME", None)
    if target != "host":
        env["NUMBA_CPU_NAME"] = target
    report = workdir / "bench.json"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[str(HERE / t) for t in TESTS],
               "-k", "fastres or peak", "--benchmark-only", f"--benchmark-json={report}",
               "--benchmark-min-rounds=15"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=HERE)
    if run.returncode != 0:
        return f"failed: {run.stdout[-500:]} {run.stderr[-500:]}"
    return json.loads(report.read_text())["benchmarks"]


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
        line = [target, peak["extra_info"]["isa"], peak["extra_info"]["tile"], f"{peak_gflops:.0f}"]
        for size in (224, 64):
            chain = next(b for b in result if b["name"] == f"test_resnet50_all_convs[{size}-fastres]")
            gflops = chain["extra_info"]["gflop"] / chain["stats"]["median"]
            line += [f"{chain['stats']['median'] * 1e3:.2f}", f"{gflops:.0f}", f"{100 * gflops / peak_gflops:.0f}%"]
        rows.append(tuple(line))
    headers = ("target", "ISA", "tile", "peak GFLOPS", "224: ms", "GFLOPS", "% peak", "64: ms", "GFLOPS", "% peak")
    print(" | ".join(headers))
    for row in rows:
        print(" | ".join(row))


if __name__ == "__main__":
    main(sys.argv[1:] or TARGETS)
