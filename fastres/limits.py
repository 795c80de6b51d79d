"""The bounds a model file and a plan are held to, checked before anything is allocated.

A model file comes from a stranger: its config may declare any size, nest JSON to any
depth, and its datasets may declare any shape.  Every such number is checked against
one of these bounds first, so that a hostile file is refused with a FastresError rather
than exhausting memory or the stack.

The memory limit (bytes a loaded model's weights, or one plan's buffers, may take) is by
default ``DEFAULT_MEMORY_FRACTION`` of physical memory; ``set_memory_limit`` or the
environment variable ``FASTRES_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix) sets it,
and ``load(memory_limit=)`` sets it for one model.
"""
import os

MAX_CONFIG_BYTES = 64 << 20     # a model config (JSON); ResNet152's is about 0.5 MiB
MAX_METADATA_BYTES = 1 << 20    # a .keras file's metadata.json
MAX_JSON_DEPTH = 128            # nesting of the config; each nested model adds about 6 levels
MAX_NESTED_MODELS = 16          # nested models inside nested models
MAX_LAYERS = 100_000
MAX_SIZE = 1 << 16              # kernel, stride, pool, padding and image sizes, in pixels
MAX_CHANNELS = 1 << 20          # filters, units, channels
DEFAULT_MEMORY_FRACTION = 0.5

_memory_limit = None  # set_memory_limit's value; None: the environment's or the default


def physical_memory():
    """Bytes of physical memory (1 TiB when the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def parse_bytes(text):
    """``"1.5G"`` -> 1610612736; plain numbers are bytes.  Raises ValueError."""
    text = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if text and text[-1] in "KMGT":
        scale, text = 1 << (10 * ("KMGT".index(text[-1]) + 1)), text[:-1]
    value = float(text) * scale
    if not value > 0 or value == float("inf"):
        raise ValueError(f"not a positive size: {text!r}")
    return int(value)


def memory_limit():
    """The bytes one model's weights, or one plan's buffers, may take."""
    if _memory_limit is not None:
        return _memory_limit
    env = os.environ.get("FASTRES_MEMORY_LIMIT")
    if env:
        try:
            return parse_bytes(env)
        except ValueError:
            pass
    return int(physical_memory() * DEFAULT_MEMORY_FRACTION)


def set_memory_limit(limit):
    """Set the memory limit in bytes (an int or a string such as ``"2G"``); None restores the default.

    Raises
    ------
    ValueError
        When ``limit`` is not a positive size.
    """
    global _memory_limit
    _memory_limit = None if limit is None else _checked_limit(limit)


def _checked_limit(limit):
    if isinstance(limit, bool) or not isinstance(limit, (int, float, str)):
        raise ValueError(f"memory_limit must be a number of bytes or a size such as '2G', got {limit!r}")
    return parse_bytes(limit)


def resolve_limit(limit):
    """``limit`` checked (None: the process's limit)."""
    return memory_limit() if limit is None else _checked_limit(limit)


def human(nbytes):
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} EiB"


def json_depth(value):
    """The nesting depth of a parsed JSON value, walked without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            items = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        depth = max(depth, level)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((child, level + 1) for child in items)
    return depth
