"""The 53 convolutions of keras.applications ResNet50, in execution order."""
from typing import NamedTuple


class ConvShape(NamedTuple):
    name: str
    size: int       # input height = width
    cin: int
    cout: int
    kernel: int
    stride: int
    padding: str    # as Keras applies it: the stem is padded by ZeroPadding2D, then "valid"

    @property
    def out_size(self):
        if self.padding == "same":
            return -(-self.size // self.stride)
        return (self.size - self.kernel) // self.stride + 1

    @property
    def flops(self):
        return 2 * self.out_size**2 * self.cout * self.kernel**2 * self.cin

    @property
    def key(self):
        return f"{self.size}x{self.size}x{self.cin}-{self.kernel}x{self.kernel}/{self.stride}-{self.cout}"


def resnet50_convs(image_size):
    """Every convolution of ResNet50 (v1, keras.applications layout) at ``image_size``."""
    convs = [ConvShape("conv1_conv", image_size + 6, 3, 64, 7, 2, "valid")]
    size = -(-(image_size + 6 - 7 + 1) // 2)          # after conv1 (valid, stride 2)
    size = (size + 2 - 3) // 2 + 1                     # after pool1_pad + 3x3/2 max-pool
    cin = 64
    for stage, (filters, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=2):
        for block in range(1, blocks + 1):
            s = stride if block == 1 else 1
            prefix = f"conv{stage}_block{block}"
            out = -(-size // s)
            if block == 1:
                convs.append(ConvShape(prefix + "_0_conv", size, cin, 4 * filters, 1, s, "valid"))
            convs.append(ConvShape(prefix + "_1_conv", size, cin, filters, 1, s, "valid"))
            convs.append(ConvShape(prefix + "_2_conv", out, filters, filters, 3, 1, "same"))
            convs.append(ConvShape(prefix + "_3_conv", out, filters, 4 * filters, 1, 1, "valid"))
            size, cin = out, 4 * filters
    return convs


def distinct(convs):
    """One ConvShape per distinct (size, cin, cout, kernel, stride), with its count."""
    seen = {}
    for c in convs:
        key = c.key
        seen.setdefault(key, [c, 0])[1] += 1
    return [(c, n) for c, n in seen.values()]
