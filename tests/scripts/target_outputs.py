"""Run a few convolutions with the kernels compiled for this process's target; save the results.

Usage: python target_outputs.py OUT.npz   (the target comes from NUMBA_CPU_NAME / NUMBA_CPU_FEATURES)
"""
import sys

import numpy as np

import fastres.kernels as K
from fastres.kernels import _numba, bf16, conv

CASES = {  # name: (input shape, kernel shape, stride, padding, winograd)
    "1x1": ((2, 7, 9, 48), (1, 1, 48, 130), 1, "valid", None),
    "3x3s2": ((1, 13, 12, 33), (3, 3, 33, 70), 2, "same", None),
    "stem": ((1, 21, 19, 3), (7, 7, 3, 64), 2, "valid", None),
    "winograd": ((2, 11, 10, 20), (3, 3, 20, 36), 1, "same", True),
}
BF16_CASES = {  # name: (input shape, kernel shape, stride, padding): the bf16 kernel, with a residual and ReLU
    "bf16_1x1": ((2, 7, 9, 48), (1, 1, 48, 130), 1, "valid"),
    "bf16_3x3": ((1, 13, 12, 33), (3, 3, 33, 70), 1, "same"),
    "bf16_stem": ((1, 21, 19, 3), (7, 7, 3, 64), 2, "valid"),
}


def main(path):
    rng = np.random.default_rng(20261128)
    results = {}
    for name, (xs, ws, stride, padding, winograd) in CASES.items():
        x = rng.standard_normal(xs, dtype=np.float32)
        w = rng.standard_normal(ws, dtype=np.float32)
        b = rng.standard_normal(ws[-1], dtype=np.float32)
        if winograd:
            plan = K.Conv2DPlan(K.pack_conv2d(w), xs, 1, (1, 1, 1, 1), winograd=True)
            out = np.empty(plan.output_shape, np.float32)
            results[name] = plan(out, x, b, K.NO_RESIDUAL, True)
        else:
            results[name] = K.conv2d(x, w, b, strides=stride, padding=padding, relu=True)
        results[name + "_x"], results[name + "_w"], results[name + "_b"] = x, w, b
    for name, (xs, ws, stride, padding) in BF16_CASES.items():
        x = rng.standard_normal(xs, dtype=np.float32)
        w = rng.standard_normal(ws, dtype=np.float32)
        b = rng.standard_normal(ws[-1], dtype=np.float32)
        packed = K.pack_conv2d(w, precision="bf16")
        r = rng.standard_normal(K.conv2d(x, packed, b, strides=stride, padding=padding).shape, dtype=np.float32)
        results[name] = K.conv2d(x, packed, b, strides=stride, padding=padding, relu=True, residual=r)
        results[name + "_x"], results[name + "_w"], results[name + "_b"], results[name + "_r"] = x, w, b, r
        results[name + "_rounded"] = K.Conv2DPlan(packed, xs, stride, (ws[0] // 2,) * 4).rounds_input
    for name, precision in (("streamed", "fp32"), ("bf16_streamed", "bf16")):  # 3 tiles a task: the chunked kernel
        x = rng.standard_normal((1, 6, 6, 150), dtype=np.float32)  # padded: a 3x3 gives 4x4 pixels
        w = rng.standard_normal((3, 3, 150, 40), dtype=np.float32)
        b = rng.standard_normal(40, dtype=np.float32)
        out = np.empty((1, 4, 4, 40), np.float32)
        assert conv.direct_kernel(3, 1) is conv.conv2d_stream_forward
        conv.conv2d_stream_forward(out, x, K.pack_conv2d(w, precision=precision).panels,
                                   conv.pixel_starts(out.shape, x.shape, 1, 1), b, K.NO_RESIDUAL, 3, True,
                                   1, 1, K.NO_BF16_OUTPUT, 0, 0)
        results[name], results[name + "_x"], results[name + "_w"], results[name + "_b"] = out, x, w, b
    results["dense"] = K.dense(rng.standard_normal((3, 70), dtype=np.float32),
                               rng.standard_normal((70, 21), dtype=np.float32))
    np.savez(path, isa=_numba.ISA, tile=f"{conv.TILE}x{conv.PANEL}", cpu=_numba.CPU_NAME, bf16_dot=_numba.BF16_DOT,
             bf16_kernel=bf16.kernel(), **results)


if __name__ == "__main__":
    main(sys.argv[1])
