"""Load seeded mutants of model files, one after another, in a process of their own.

    python fuzz_worker.py KIND SEED COUNT BASE... (KIND: config, h5bytes or zip)

For each mutant it prints one line, ``<index> ok`` (loaded and ran with finite output),
``<index> overflow`` (weights mutated into huge finite numbers overflow to infinity, the same
on every call, as in Keras) or ``<index> refused <FastresError subclass>``, before which it prints ``<index> start``: a
crash or a hang is then pinned to the mutant that caused it.  Each result line ends with the
process's peak RSS so far (``rss=<n>MiB``).  Anything else that escapes
(a KeyError, a RecursionError, ...) is printed as ``<index> BAD <type>: <message>``.
Nothing here needs Keras: the parent test writes the base files.
"""
import faulthandler
import io
import json
import os
import signal
import sys
import tempfile
import zipfile

import h5py
import numpy as np

import fastres

SECONDS_PER_MUTANT = 5
HOSTILE = [0, -1, -(10 ** 9), 10 ** 9, 10 ** 30, 1.5, 1e308, float("nan"), None, True, "x", "", [], {}, [0, 0],
           [-3, 2], [[1, 2], [3]], {"class_name": "Lambda"}, 5]


def _nodes(value, path=()):
    """Every (path, value) in a JSON value, breadth-first, without recursion."""
    found, pending = [], [(path, value)]
    while pending:
        path, value = pending.pop(0)
        found.append((path, value))
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        pending.extend(((*path, k), v) for k, v in items)
    return found


def mutate_config(config, rng):
    """Replace, delete or duplicate one or two nodes of a parsed config."""
    for _ in range(int(rng.integers(1, 3))):
        nodes = [(p, v) for p, v in _nodes(config) if p]
        path, _ = nodes[int(rng.integers(len(nodes)))]
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        action = rng.integers(4)
        if action == 0 and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == 1 and isinstance(parent, list):
            parent.insert(path[-1], json.loads(json.dumps(parent[path[-1]])))
        else:
            parent[path[-1]] = HOSTILE[int(rng.integers(len(HOSTILE)))]
    return config


def mutate_bytes(data, rng):
    """Overwrite one to eight runs of 1-8 bytes with random bytes."""
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        at, size = int(rng.integers(len(data))), int(rng.integers(1, 9))
        data[at:at + size] = rng.bytes(min(size, len(data) - at))
    return bytes(data)


def _edit_zip(data, edit):
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, edit(item.filename, src.read(item)))
    return out.getvalue()


def make_mutant(kind, base, rng, target):
    """Write a mutant of the file ``base`` to ``target``."""
    data = open(base, "rb").read()
    if kind == "h5bytes":
        data = mutate_bytes(data, rng)
    elif kind == "zip":
        which = rng.integers(3)
        if which == 0:  # the zip structure itself
            data = mutate_bytes(data, rng)
        else:  # one member's bytes, or its config
            member = "model.weights.h5" if which == 1 else "config.json"

            def edit(name, content):
                if name != member:
                    return content
                if member == "config.json":
                    return json.dumps(mutate_config(json.loads(content), rng)).encode()
                return mutate_bytes(content, rng)
            data = _edit_zip(data, edit)
    elif kind == "config":
        if data.startswith(b"PK"):
            data = _edit_zip(data, lambda name, c: json.dumps(mutate_config(json.loads(c), rng)).encode()
                             if name == "config.json" else c)
        else:
            with open(target, "wb") as fh:
                fh.write(data)
            with h5py.File(target, "r+") as f:
                config = json.loads(f.attrs["model_config"])
                f.attrs["model_config"] = json.dumps(mutate_config(config, rng))
            return
    with open(target, "wb") as fh:
        fh.write(data)


def peak_rss_mib():
    """This process's peak RSS (VmHWM; ru_maxrss would include the parent's, inherited across fork)."""
    try:
        with open("/proc/self/status") as status:
            line = next((l for l in status if l.startswith("VmHWM:")), "VmHWM: 0 kB")
    except OSError:  # not Linux: not measured
        return 0
    return int(line.split()[1]) >> 10


def _timeout(signum, frame):
    raise TimeoutError(f"more than {SECONDS_PER_MUTANT} s")


def main():
    kind, seed, count, bases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    fastres.set_memory_limit("1G")
    signal.signal(signal.SIGALRM, _timeout)
    rng = np.random.default_rng(seed)
    folder = tempfile.mkdtemp()
    for index in range(count):
        base = bases[index % len(bases)]
        target = os.path.join(folder, f"mutant{index}" + os.path.splitext(base)[1])
        make_mutant(kind, base, rng, target)
        print(index, "start", flush=True)
        signal.alarm(SECONDS_PER_MUTANT)  # a Python-level hang; a hang inside C ends the process:
        faulthandler.dump_traceback_later(2 * SECONDS_PER_MUTANT, exit=True)
        try:
            model = fastres.load(target)
            shape = [8 if d is None else d for d in model.input_shape[1:]]
            x = np.linspace(-2, 2, int(np.prod(shape)), dtype=np.float32).reshape(1, *shape)
            y = model.predict(x)
            line = "ok"
            if not np.isfinite(y).all():  # weights mutated to huge finite values overflow, as in Keras;
                same = np.array_equal(y, model.predict(x), equal_nan=True)  # unwritten memory would differ
                line = "overflow" if same else "BAD non-finite output that differs between calls"
        except fastres.FastresError as exc:
            line = f"refused {type(exc).__name__}" if str(target) in str(exc) else f"BAD unnamed file: {exc}"
        except BaseException as exc:  # noqa: BLE001 - what the test is looking for
            line = f"BAD {type(exc).__name__}: {str(exc)[:300]}"
        finally:
            signal.alarm(0)
            faulthandler.cancel_dump_traceback_later()
        print(index, line, f"rss={peak_rss_mib()}MiB", flush=True)
        os.remove(target)


if __name__ == "__main__":
    main()
