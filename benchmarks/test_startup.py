"""Start-up with a warm Numba cache: a fresh process imports fastres.kernels and runs every kernel once.

The target is under one second.  Run with:  pytest benchmarks/test_startup.py --benchmark-only
"""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("warm_start.py")


def run_script():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_warm_start(benchmark):
    benchmark.group = "fresh process: import fastres.kernels, run every kernel once"
    run_script()  # fills the cache if it is cold
    output = benchmark.pedantic(run_script, rounds=5, iterations=1)
    assert output.startswith("import ")
