"""Import fastres.kernels and run every kernel once; prints the seconds (run in a fresh process)."""
import time
t0 = time.perf_counter()
import numpy as np
import fastres.kernels as K
t1 = time.perf_counter()
x = np.ones((1, 8, 8, 16), np.float32)
K.conv2d(x, np.ones((3, 3, 16, 8), np.float32), padding="same", relu=True, residual=np.ones((1, 8, 8, 8), np.float32))
K.Conv2DPlan(K.pack_conv2d(np.ones((3, 3, 16, 8), np.float32)), x.shape, 1, (1, 1, 1, 1), winograd=True)(np.empty((1, 8, 8, 8), np.float32), x, np.zeros(8, np.float32))
K.conv2d(x, np.ones((3, 3, 16, 8), np.float32), padding="same", relu=False)
K.conv2d(x, K.pack_conv2d(np.ones((3, 3, 16, 8), np.float32), im2col=True), padding="same")
K.batch_norm(x, None, None, np.zeros(16, np.float32), np.ones(16, np.float32)); K.add_relu(x, x); K.relu(x); K.bias_add(x, np.ones(16, np.float32))
K.max_pool2d(x, 2); K.avg_pool2d(x, 2); K.global_avg_pool2d(x); K.global_max_pool2d(x); K.zero_pad2d(x, 1)
K.dense(np.ones((2, 16), np.float32), np.ones((16, 4), np.float32)); K.softmax(np.ones((2, 4), np.float32))
K.fold_batch_norm(np.ones((3, 3, 16, 8), np.float32), None, None, None, np.zeros(8, np.float32), np.ones(8, np.float32))
t2 = time.perf_counter()
print(f"import {t1-t0:.2f} s, every kernel once {t2-t1:.2f} s, total {t2-t0:.2f} s")
