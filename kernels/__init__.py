"""fastres.kernels: the compute kernels (float32, NHWC, Keras weight layouts).

Each public function checks its arguments and raises ValueError naming the
argument, accepts ``out=``, and calls a private compiled kernel.  The kernels
know nothing of models or files.
"""
from ._im2col import im2col_forward
from ._numba import get_num_threads, set_num_threads, threading_layer
from .conv import PackedConv2D, conv2d, dense, im2col_numba, pack_conv2d, zero_pad2d
from .elementwise import add_relu, batch_norm, bias_add, fold_batch_norm, relu, softmax
from .pool import avg_pool2d, global_avg_pool2d, global_max_pool2d, max_pool2d

__all__ = [
    "PackedConv2D", "add_relu", "avg_pool2d", "batch_norm", "bias_add", "conv2d", "dense",
    "fold_batch_norm", "get_num_threads", "global_avg_pool2d", "global_max_pool2d", "im2col_forward",
    "im2col_numba", "max_pool2d", "pack_conv2d", "relu", "set_num_threads", "softmax",
    "threading_layer", "zero_pad2d",
]
