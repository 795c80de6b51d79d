"""fastres.kernels: the compute kernels (float32, NHWC, Keras weight layouts).

Each public function checks its arguments and raises ValueError naming the
argument, accepts ``out=``, and calls a private compiled kernel.  The kernels
know nothing of models or files.
"""
from ._checks import same_padding
from .activation import KINDS as activation_kinds, activation
from ._im2col import im2col_forward
from ._memory import empty as aligned_empty
from ._numba import get_num_threads, set_num_threads, threading_layer
from .conv import (NO_BF16_OUTPUT, NO_RESIDUAL, Conv2DPlan, PackedConv2D, conv2d, dense, im2col_numba,
                   pack_conv2d, winograd_choice, zero_pad2d)
from .elementwise import add_relu, batch_norm, batch_norm_params, bias_add, fold_batch_norm, relu, softmax
from .pool import avg_pool2d, global_avg_pool2d, global_max_pool2d, max_pool2d

# Unchecked layer kernels, ``<layer>_forward(out, inp, ...)``: for an engine that has
# checked every shape when it planned the pass.  Their docstrings give the shapes.
from .activation import activation_forward
from .conv import conv2d_forward, zero_pad_forward
from .elementwise import add_forward, relu_forward, scale_shift_forward, softmax_forward
from .pool import global_pool_forward, pool2d_forward

__all__ = [
    "NO_BF16_OUTPUT", "NO_RESIDUAL", "Conv2DPlan", "PackedConv2D", "activation", "activation_forward",
    "activation_kinds",
    "add_forward", "batch_norm_params", "conv2d_forward",
    "global_pool_forward", "pool2d_forward", "relu_forward", "same_padding", "scale_shift_forward", "softmax_forward",
    "zero_pad_forward", "add_relu", "aligned_empty", "avg_pool2d", "batch_norm", "bias_add", "conv2d", "dense",
    "fold_batch_norm", "get_num_threads", "global_avg_pool2d", "global_max_pool2d", "im2col_forward",
    "im2col_numba", "max_pool2d", "pack_conv2d", "relu", "set_num_threads", "softmax",
    "threading_layer", "winograd_choice", "zero_pad2d",
]
