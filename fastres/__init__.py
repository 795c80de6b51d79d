"""fastres: Keras ResNet inference on the CPU without a deep-learning framework."""
from .kernels import get_num_threads, set_num_threads

__version__ = "0.1.0"
