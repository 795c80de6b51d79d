"""fastres: Keras ResNet inference on the CPU without a deep-learning framework.

    model = fastres.load("resnet50.h5")
    y = model.predict(x)            # x: float32 (N, H, W, C)
"""
from .errors import FastresError, InputError, ModelFormatError, UnsupportedLayerError
try:
    from .kernels import get_num_threads
except RuntimeError as exc:  # Numba found no writable place for the compiled kernels
    if "cannot cache function" not in str(exc):
        raise
    raise FastresError("fastres's compiled kernels have no writable cache directory (neither beside the installed "
                       "sources nor in the user's cache): set NUMBA_CACHE_DIR to a writable directory, or run "
                       f"'fastres compile' where the install is writable ({exc})") from None
from .limits import memory_limit, set_memory_limit
from .model import Model, load, set_num_threads

__version__ = "0.1.0"
__all__ = ["FastresError", "InputError", "Model", "ModelFormatError", "UnsupportedLayerError",
           "get_num_threads", "load", "memory_limit", "set_memory_limit", "set_num_threads"]
