"""Measured plan-time choices, kept per machine on disk (FFTW's "wisdom").

Where a rule cannot say which way a convolution runs faster (today: Winograd
F(4x4, 3x3) or the direct kernel, for a stride-1 3x3 convolution; and how a
small direct convolution splits its work between the threads), the plan
times the candidates once on this machine and records the winner under a key naming the CPU,
the compiled ISA and tile, the thread count and the layer's shape.  Later plans
read the record: a load that finds its wisdom pays a dictionary look-up.

The file is ``$FASTRES_WISDOM`` if that is a path, else ``wisdom.json`` in
``$NUMBA_CACHE_DIR`` (beside Numba's cache) or in ``~/.cache/fastres``.  It is
only ever read as JSON.  ``FASTRES_WISDOM=off`` (or ``set_mode("off")``) turns
measuring and reading off: the choice is then the deterministic rule in
``conv.py``.  ``set_mode("read")`` uses recorded choices and never measures.
A file that cannot be written is not an error: the choice is then measured again
in the next process.
"""
import json
import os
import sys
import threading
import time

MODES = ("measure", "read", "off")
_lock = threading.Lock()
_state = {"mode": None, "records": None, "path": None}


def path():
    """Where the wisdom file is (whether it exists or not)."""
    env = os.environ.get("FASTRES_WISDOM", "")
    if env and env not in MODES:
        return env
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastres")
    return os.path.join(base, "wisdom.json")


def mode():
    """"measure" (the default), "read" or "off"."""
    if _state["mode"] is None:
        env = os.environ.get("FASTRES_WISDOM", "")
        _state["mode"] = env if env in MODES else "measure"
    return _state["mode"]


def set_mode(value):
    """Set how plan-time choices are made: "measure", "read" or "off" (see the module docstring)."""
    if value not in MODES:
        raise ValueError(f"wisdom mode must be one of {', '.join(MODES)}, got {value!r}")
    _state["mode"] = value


def _records():
    if _state["records"] is None or _state["path"] != path():
        _state["path"] = path()
        try:
            with open(_state["path"], encoding="utf-8") as f:
                records = json.load(f)
            _state["records"] = records if isinstance(records, dict) else {}
        except (OSError, ValueError):
            _state["records"] = {}
    return _state["records"]


def lookup(machine, key):
    """The recorded choice for ``key`` on ``machine``, or None (also when the mode is "off")."""
    if mode() == "off":
        return None
    with _lock:
        entry = _records().get(machine)
        return entry.get(key) if isinstance(entry, dict) else None


def record(machine, key, value):
    """Record a measured choice and write the file (best effort)."""
    with _lock:
        records = _records()
        records.setdefault(machine, {})[key] = value
        try:
            os.makedirs(os.path.dirname(_state["path"]) or ".", exist_ok=True)
            tmp = f"{_state['path']}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(records, f, indent=1, sort_keys=True)
            os.replace(tmp, _state["path"])
        except OSError:
            pass


def choose(machine, key, candidates, rule, before=None, margin=0.0):
    """Return the fastest of ``candidates`` for ``key`` (name -> callable running once).

    The recorded choice if there is one; else, in "measure" mode, times each
    candidate (best of a few runs, alternating; ``before(name)``, if given, runs
    untimed before each) and records the winner; else ``rule``.  With ``margin``,
    ``rule`` (one of the candidates) stays the choice unless another is faster by
    that fraction of its time (a noisy machine then does not move a choice for nothing).
    """
    known = lookup(machine, key)
    if known in candidates:
        return known
    if mode() != "measure":
        return rule
    ways = " or ".join(candidates) if len(candidates) <= 3 else f"{len(candidates)} ways"
    print(f"fastres: timing {key} once for this CPU ({ways})", file=sys.stderr, flush=True)
    best = {name: float("inf") for name in candidates}
    for run in candidates.values():
        run()  # warm-up: compile or load each kernel before any timing
    for _ in range(5):
        for name, run in candidates.items():
            if before is not None:
                before(name)
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    winner = min(best, key=best.get)
    if rule in best and best[winner] > (1 - margin) * best[rule]:
        winner = rule
    record(machine, key, winner)
    return winner
