"""The kernels compiled for other x86 targets give the same answers (NUMBA_CPU_NAME on this machine).

Each target runs in its own process (Numba's target is fixed per process) with its own cache
directory; it needs only the ISA to be a subset of this CPU's.  Targets this CPU cannot run are
skipped by name: the project's machines change CPU between sessions (AVX-512 Zen 4 and Emerald Rapids
run every target; an AVX2-only Zen 3 runs host, haswell and x86-64).
"""
import os
import subprocess
import sys
from pathlib import Path

import llvmlite.binding as ll
import numpy as np
import pytest

from conftest import assert_close
import naive
from fastres.kernels import _numba

SCRIPT = Path(__file__).parent / "scripts" / "target_outputs.py"
# LLVM CPU name -> (ISA fastres should detect, register tile)
TARGETS = {
    "host": (None, None),
    "haswell": ("avx2", "6x16"),
    "skylake-avx512": ("avx512", "6x64"),
    "icelake-server": ("avx512", "6x64"),
    "znver4": ("avx512", "6x64"),
    "x86-64": ("generic", "4x8"),
}
# targets whose bf16 products run on vdpbf16ps (AVX512-BF16); the others widen bf16 to float32
_BF16_DOT = {"haswell": False, "skylake-avx512": False, "icelake-server": False, "znver4": True, "x86-64": False}
_NEEDS = {"haswell": {"avx2", "fma"}, "skylake-avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
          "icelake-server": {"avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512vnni", "vaes"},
          "znver4": {"avx512f", "avx512bw", "avx512vl", "avx512bf16", "avx512vnni"}}


def _host_features():
    return {f[1:] for f in ll.get_host_cpu_features().flatten().split(",") if f.startswith("+")}


def _missing(target):
    """The features ``target`` needs that this CPU lacks (empty: its code runs here)."""
    return _NEEDS.get(target, set()) - _host_features()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """target -> the saved results of tests/scripts/target_outputs.py compiled for it."""
    results = {}
    for target in TARGETS:
        missing = _missing(target)
        if missing:
            results[target] = f"this CPU lacks {', '.join(sorted(missing))}"
            continue
        tmp = tmp_path_factory.mktemp(target)
        env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp / "cache"))
        env.pop("NUMBA_CPU_FEATURES", None)
        env.pop("NUMBA_CPU_NAME", None)
        if target != "host":
            env["NUMBA_CPU_NAME"] = target
        run = subprocess.run([sys.executable, str(SCRIPT), str(tmp / "out.npz")], env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{target}: {run.stderr[-3000:]}"
        results[target] = dict(np.load(tmp / "out.npz"))
    return results


@pytest.mark.parametrize("target", list(TARGETS))
def test_target_detects_its_isa_and_tile(outputs, target):
    if isinstance(outputs[target], str):
        pytest.skip(outputs[target])
    isa, tile = TARGETS[target]
    if target == "host":
        isa, tile = _numba.ISA, None
    assert str(outputs[target]["isa"]) == isa
    if tile:
        assert str(outputs[target]["tile"]) == tile


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "host"])
def test_target_gives_the_hosts_answers(outputs, target):
    if isinstance(outputs[target], str):
        pytest.skip(outputs[target])
    got, host = outputs[target], outputs["host"]
    for name in ("1x1", "3x3s2", "stem", "dense", "streamed", "bf16_streamed"):
        assert_close(got[name], host[name].astype(np.float64), rtol=1e-5)
    assert_close(got["winograd"], host["winograd"].astype(np.float64), rtol=3e-5)
    for name in ("bf16_1x1", "bf16_3x3", "bf16_stem"):   # the same roundings, float32 sums in another order
        if bool(got[name + "_rounded"]) == bool(host[name + "_rounded"]):  # (else each is held to naive below)
            assert_close(got[name], host[name].astype(np.float64), rtol=1e-5)


@pytest.mark.parametrize("target", list(TARGETS))
def test_target_matches_naive(outputs, target):
    if isinstance(outputs[target], str):
        pytest.skip(outputs[target])
    got = outputs[target]
    for name, stride, padding, rtol in (("1x1", 1, "valid", 1e-5), ("3x3s2", 2, "same", 1e-5),
                                        ("stem", 2, "valid", 1e-5), ("winograd", 1, "same", 3e-5)):
        x, w, b = got[name + "_x"], got[name + "_w"], got[name + "_b"]
        assert_close(got[name], naive.conv2d(x, w, b, stride, padding, relu=True), rtol=rtol)
    x, w, b = got["streamed_x"], got["streamed_w"], got["streamed_b"]
    assert_close(got["streamed"], naive.conv2d(x, w, b, relu=True))


@pytest.mark.parametrize("target", list(TARGETS))
def test_target_bf16_matches_naive_bf16(outputs, target):
    """Every target's bf16 kernel (vdpbf16ps, or bf16 widened to float32) against the naive bf16 reference."""
    if isinstance(outputs[target], str):
        pytest.skip(outputs[target])
    got = outputs[target]
    expected = _numba.BF16_DOT if target == "host" else _BF16_DOT[target]
    assert bool(got["bf16_dot"]) == expected
    if not expected:   # the weights widened, the inputs kept float32
        assert str(got["bf16_kernel"]) == "bf16 weights widened to fp32 FMA"
        assert not any(got[name + "_rounded"] for name in ("bf16_1x1", "bf16_3x3", "bf16_stem"))
    for name, stride, padding in (("bf16_1x1", 1, "valid"), ("bf16_3x3", 1, "same"), ("bf16_stem", 2, "valid")):
        x, w, b, r, rounded = (got[name + suffix] for suffix in ("_x", "_w", "_b", "_r", "_rounded"))
        want = naive.conv2d_bf16(x, w, b, stride, padding, relu=True, residual=r, round_input=bool(rounded))
        assert_close(got[name], want, rtol=1e-5)
    x, w, b = got["bf16_streamed_x"], got["bf16_streamed_w"], got["bf16_streamed_b"]  # (float32 inputs, always)
    assert_close(got["bf16_streamed"], naive.conv2d_bf16(x, w, b, relu=True, round_input=False), rtol=1e-5)


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "host"])
def test_every_targets_direct_kernels_compile(outputs, target, tmp_path):
    """Compiled, not run, so that a target this CPU cannot run is still checked: on an AVX2-only machine a
    codegen error in the AVX-512 or vdpbf16ps paths would otherwise show only on the next AVX-512 one.
    A target that runs here has compiled the same kernels for ``outputs`` (not compiled twice)."""
    if not _missing(target):
        assert isinstance(outputs[target], dict), outputs[target]
        return
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), NUMBA_CPU_NAME=target)
    env.pop("NUMBA_CPU_FEATURES", None)
    run = subprocess.run([sys.executable, str(SCRIPT.parent / "compile_only.py")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"{target}: {run.stderr[-3000:]}"
    isa, tile = TARGETS[target]
    assert run.stdout.split()[:4] == ["ok", target, isa, tile]
    assert ("bf16 dot" in run.stdout) == _BF16_DOT[target]


@pytest.mark.parametrize("cpu,isa", [("haswell", "avx2"), ("skylake-avx512", "avx512"), ("znver4", "avx512"),
                                     ("sapphirerapids", "avx512"), ("x86-64", "generic"), ("x86-64-v3", "avx2")])
def test_isa_probe_reads_the_targets_isa(cpu, isa):
    # compiles a probe for the named CPU and reads the assembly: no need to run on that CPU
    assert _numba._probe_isa(cpu, "") == isa


def test_avx512_turns_off_llvms_256_bit_preference():
    if _numba.ISA == "avx512":
        assert "-prefer-256-bit" in _numba.CPU_FEATURES.split(",")
    else:
        assert "prefer-256-bit" not in _numba.CPU_FEATURES
