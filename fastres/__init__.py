"""fastres: Keras ResNet inference on the CPU without a deep-learning framework.

    model = fastres.load("resnet50.h5")
    y = model.predict(x)            # x: float32 (N, H, W, C)
"""
from .errors import FastresError, InputError, ModelFormatError, UnsupportedLayerError
from .kernels import get_num_threads
from .limits import memory_limit, set_memory_limit
from .model import Model, load, set_num_threads

__version__ = "0.1.0"
__all__ = ["FastresError", "InputError", "Model", "ModelFormatError", "UnsupportedLayerError",
           "get_num_threads", "load", "memory_limit", "set_memory_limit", "set_num_threads"]
