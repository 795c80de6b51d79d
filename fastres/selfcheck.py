"""A short self-check: run every kernel once against numpy, then time ResNet50's convolutions.

``python -m fastres.selfcheck [--size 64] [--runs 10] [--threads N]``
"""
import argparse
import sys
import time

import numpy as np

from . import kernels as K
from .resnet50_shapes import resnet50_convs


def _check_kernels(rng):
    """Each kernel once on small data, compared with a plain numpy computation."""
    x = rng.standard_normal((2, 9, 9, 5), dtype=np.float32)
    w = rng.standard_normal((3, 3, 5, 7), dtype=np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = sum(np.einsum("nhwc,co->nhwo", padded[:, i:i + 9, j:j + 9], w[i, j]) for i in range(3) for j in range(3))
    checks = {
        "conv2d": np.allclose(K.conv2d(x, w, padding="same"), expected, atol=1e-4),
        "add_relu": np.array_equal(K.add_relu(x, x), np.maximum(2 * x, 0)),
        "max_pool2d": np.array_equal(K.max_pool2d(x, 3, 3), x[:, :9, :9].reshape(2, 3, 3, 3, 3, 5).max(axis=(2, 4))),
        "global_avg_pool2d": np.allclose(K.global_avg_pool2d(x), x.mean(axis=(1, 2)), atol=1e-6),
        "softmax": np.allclose(K.softmax(x).sum(axis=-1), 1, atol=1e-6),
    }
    for name, ok in checks.items():
        print(f"  {name:20s} {'ok' if ok else 'WRONG'}")
    return all(checks.values())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastres.selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="threads for the kernels (default: all cores)")
    args = parser.parse_args(argv)
    if args.size < 32 or args.runs < 1:
        parser.error("--size must be at least 32 and --runs at least 1")
    if args.threads is not None:
        K.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    print("kernels:")
    ok = _check_kernels(rng)
    convs = resnet50_convs(args.size)
    layers = []
    for c in convs:
        x = rng.standard_normal((1, c.size, c.size, c.cin), dtype=np.float32)
        w = rng.standard_normal((c.kernel, c.kernel, c.cin, c.cout), dtype=np.float32) * 0.05
        packed, bias = K.pack_conv2d(w), np.zeros(c.cout, np.float32)
        out = K.conv2d(x, packed, bias, strides=c.stride, padding=c.padding, relu=True)
        layers.append((c, x, packed, bias, out))
    print(f"first run of every kernel (compile or cache load): {time.perf_counter() - start:.2f} s")
    times = {}
    for _ in range(args.runs):
        for c, x, packed, bias, out in layers:
            t = time.perf_counter()
            K.conv2d(x, packed, bias, strides=c.stride, padding=c.padding, relu=True, out=out)
            times.setdefault(c.key, []).append(time.perf_counter() - t)
    print(f"ResNet50 convolutions at {args.size}x{args.size}, batch 1, {K.get_num_threads()} threads "
          f"({K.threading_layer()}), median of {args.runs}:")
    total = 0.0
    for c, *_ in layers:
        if c.key in times:
            median = float(np.median(times.pop(c.key)))
            count = sum(1 for d in convs if d.key == c.key)
            total += median * count
            print(f"  {c.key:28s} x{count}  {median * 1e3:7.3f} ms  {c.flops / median / 1e9:6.1f} GFLOPS")
    flops = sum(c.flops for c in convs)
    print(f"all 53 convolutions: {total * 1e3:.2f} ms, {flops / total / 1e9:.1f} GFLOPS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
