import os
import sys
from pathlib import Path

# OpenBLAS's idle threads spin for about 2^28 cycles (~0.1 s) after each sgemm; the numpy im2col + BLAS
# references run between fastres's timed calls, and fastres's kernels then shared the cores with them (ResNet50's
# 56x56x64 3x3 at batch 8 on Winograd: 4.16 ms against 3.05 ms, Zen 4).  2^4 cycles: they sleep at once.  Read by
# OpenBLAS when numpy loads it, so set before anything imports numpy; a value in the environment wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

sys.path.insert(0, str(Path(__file__).parent))
