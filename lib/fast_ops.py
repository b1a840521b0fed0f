"""Every op that exists for speed on one kind of device, and the one decision that picks them.

The networks say what a layer is (kernel, dilation, sharing); the layers of lib/layers.py
compute it through the functions here: ``convolution``, ``transposed_convolution``,
``dropout`` and ``leaky_relu``. Each of them follows the active ``OpPlan``, which
``decide()`` makes once per run from the device and the TensorFlow build:

=============  =====================================================================
``gpu``        TensorFlow's own ops and their own gradients (cuDNN); no trick here
               was measured on a GPU, every one was tuned for oneDNN on a CPU
``cpu_onednn`` the CPU with TensorFlow's oneDNN kernels on (Intel with AVX-512 or AMX
               by default, any x86-64 with ``TF_ENABLE_ONEDNN_OPTS=1``): dilations
               in the convolution op, custom kernel gradients, byte dropout, a bf16
               LeakyReLU made of two ops, the 3D network depth-first inside
``cpu``        the CPU with TensorFlow's own (Eigen) kernels, which have no gradient
               for a dilated convolution: TensorFlow's ops, dilated convolutions as
               ``tf.nn.convolution`` (space-to-batch); only the 3D kernel gradients
               are sliced (made of TensorFlow's 2D kernel-gradient op, which every CPU
               has) and the 3D max pool folded to a 2D pool, as both were measured
               faster there too
=============  =====================================================================

Every fast path computes the same function as the portable op, and its gradients
(tests/test_fast_ops.py); which path each layer took is what ``describe()`` reports.
Tests and benchmarks switch plans with ``use_plan``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os

import tensorflow as tf

DEVICES = ("gpu", "cpu_onednn", "cpu")


@dataclasses.dataclass(frozen=True)
class OpPlan:
    """Which implementation each kind of layer uses.

    device:        one of DEVICES, the device the plan was made for; on "cpu_onednn" a
                   dilated convolution in a dtype oneDNN lacks falls back to space-to-batch
                   (dilated_gradient_runs).
    dilated_conv:  "direct" (the convolution op with its dilations and its own gradient)
                   or "space_to_batch" (tf.nn.convolution: runs on every device).
    wide_kernel_grad: "native" or "matmul": the kernel gradient of a wide 2D layer
                   (Cout >= 4 Cin >= 256, the 2D network's upsampling convolution) as one
                   matrix product per kernel offset (filter_gradient_matmul).
    kernel_grad_3d: "native" or "slices": kernel gradients of undilated 3D convolutions
                   as 2D kernel gradients per depth offset (filter_gradient_slices).
    depth_first_3d: the 3D network computes in [B, D, H, W, C] (what "slices" needs to
                   fold the depth axis into the batch without copies).
    dropout:       "native" (tf.nn.experimental.stateless_dropout) or "byte"
                   (byte_dropout: one random byte per element).
    leaky_relu:    "native" (tf.nn.leaky_relu) or "two_ops" (bf16/fp16 as Mul and
                   Maximum, see leaky_relu; float32 always takes the native op).
    pool_3d:       "native" (tf.nn.max_pool3d) or "folded" (max of the pairs along the
                   first spatial axis, then a 2D max pool: see max_pool_3d).
    """

    device: str
    dilated_conv: str = "space_to_batch"
    wide_kernel_grad: str = "native"
    kernel_grad_3d: str = "native"
    depth_first_3d: bool = False
    dropout: str = "native"
    leaky_relu: str = "native"
    pool_3d: str = "native"

    def __post_init__(self):
        choices = dict(device=DEVICES, dilated_conv=("direct", "space_to_batch"),
                       wide_kernel_grad=("native", "matmul"),
                       kernel_grad_3d=("native", "slices"), depth_first_3d=(True, False),
                       dropout=("native", "byte"), leaky_relu=("native", "two_ops"),
                       pool_3d=("native", "folded"))
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"OpPlan.{key}: expected one of {allowed}, got "
                                 f"{getattr(self, key)!r}")
        if self.kernel_grad_3d == "slices" and not self.depth_first_3d:
            raise ValueError("OpPlan: kernel_grad_3d='slices' needs depth_first_3d=True")

    def describe(self) -> str:
        """One line: the device and the path of each kind of layer."""
        return (f"{self.device}: dilated conv {self.dilated_conv}, wide-layer kernel grad "
                f"{self.wide_kernel_grad}, 3D kernel grad {self.kernel_grad_3d}"
                f"{' (depth-first)' if self.depth_first_3d else ''}, dropout "
                f"{self.dropout}, LeakyReLU {self.leaky_relu}, 3D max pool {self.pool_3d}")


# The plan of each kind of device. A fast path is listed only where it was measured faster
# on that kind of device (docs/performance.md).
PLANS = {
    "gpu": OpPlan("gpu", dilated_conv="direct"),
    "cpu_onednn": OpPlan("cpu_onednn", dilated_conv="direct", wide_kernel_grad="matmul",
                         kernel_grad_3d="slices", depth_first_3d=True, dropout="byte",
                         leaky_relu="two_ops"),
    "cpu": OpPlan("cpu", kernel_grad_3d="slices", depth_first_3d=True, pool_3d="folded"),
}

_active: OpPlan | None = None


def onednn_enabled() -> bool:
    """True when this TensorFlow process runs its oneDNN CPU kernels (the build has them,
    and the CPU is one they are on for by default or TF_ENABLE_ONEDNN_OPTS=1 was set:
    lib/__init__.py sets it on x86-64 CPUs where it is off by default)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # a build without the query: assume TF's default
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "") == "1"


def device_kind(gpus: int | None = None, onednn: bool | None = None) -> str:
    """"gpu", "cpu_onednn" or "cpu" for this process; either fact can be injected."""
    if gpus is None:
        gpus = len(tf.config.list_physical_devices("GPU"))
    if gpus:
        return "gpu"
    if onednn is None:
        onednn = onednn_enabled()
    return "cpu_onednn" if onednn else "cpu"


def decide(gpus: int | None = None, onednn: bool | None = None) -> OpPlan:
    """Make the plan of this device the active one and return it (once per run)."""
    global _active
    _active = PLANS[device_kind(gpus, onednn)]
    return _active


def active_plan() -> OpPlan:
    """The active plan; decided from the device the first time it is needed."""
    return _active if _active is not None else decide()


@contextlib.contextmanager
def use_plan(plan: OpPlan | str):
    """Run a block under another plan (an OpPlan or a device name), then restore."""
    global _active
    previous, _active = _active, PLANS[plan] if isinstance(plan, str) else plan
    try:
        yield _active
    finally:
        _active = previous


# ----------------------------------------------------------------------------- helpers
def per_axis(value, rank: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * rank


def same_padding(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> list:
    """[before, after] of TensorFlow's "same" padding along one axis."""
    span = dilation * (kernel - 1) + 1
    total = max((-(-size // stride) - 1) * stride + span - size, 0)
    return [total // 2, total - total // 2]


# ----------------------------------------------------------------------------- kernel gradients
def filter_gradient_matmul(x, dy, kernel_shape, dilation, padding: str):
    """Kernel gradient of a stride-1 convolution as one matrix product per kernel offset.

    x [B, *S_in, Cin], dy [B, *S_out, Cout] -> [*K, Cin, Cout]. Offset k of the kernel gets
    x's window at k, channels first and flattened, [Cin, B*prod(S_out)], times dy
    [B*prod(S_out), Cout]: one large product for a wide layer on a small image, where
    oneDNN's own kernel-gradient op runs far below its forward rate.
    """
    kernel_size, (cin, cout) = tuple(kernel_shape[:-2]), kernel_shape[-2:]
    rank = len(kernel_size)
    if padding == "same":
        x = tf.pad(x, [[0, 0]] + [same_padding(n, k, 1, d) for n, k, d in zip(
            x.shape[1:-1], kernel_size, dilation)] + [[0, 0]])
    out_size = list(dy.shape[1:-1])
    x = tf.transpose(x, [rank + 1] + list(range(rank + 1)))  # [Cin, B, *S_in]
    dy = tf.reshape(dy, [-1, cout])
    per_offset = [
        tf.matmul(tf.reshape(tf.slice(x, [0, 0] + [o * d for o, d in zip(offset, dilation)],
                                      [-1, -1] + out_size), [cin, -1]), dy)
        for offset in itertools.product(*[range(k) for k in kernel_size])]
    return tf.reshape(tf.stack(per_offset), list(kernel_size) + [cin, cout])


def filter_gradient_slices(x, dy, kernel_shape, strides=1, padding: str = "same"):
    """Kernel gradient of a 3D convolution as 2D kernel gradients, one per offset along the
    first spatial axis.

    x [B, S1, S2, S3, Cin], dy [B, S1', S2', S3', Cout] -> [k1, k2, k3, Cin, Cout], for the
    forward op conv3d(x, kernel, strides, padding) (no dilation). The first spatial axis is
    folded into the batch. At stride 1, kernel offset e pairs input row r + e - p (p: the
    padding before) with output row r: with the batch size known, each example's valid
    rows are slices along the leading axis of the folded tensors (no copy), and the
    examples' gradients are added. With a stride along S1, or a batch size known only at
    run time, the input rows of each offset are gathered from the padded input (copies).
    Used depth-first, [B, D, H, W, C], so that the folded axis is the short depth axis.
    """
    k1, k2, k3, cin, cout = (int(v) for v in kernel_shape)
    s1, s2, s3 = per_axis(strides, 3)
    n1, n2, n3 = (int(v) for v in x.shape[1:4])
    o1, o2, o3 = (int(v) for v in dy.shape[1:4])
    before = same_padding(n1, k1, s1)[0] if padding == "same" else 0

    def bpf(xe, dye):
        return tf.raw_ops.Conv2DBackpropFilter(
            input=xe, filter_sizes=[k2, k3, cin, cout], out_backprop=dye,
            strides=[1, s2, s3, 1], padding=padding.upper())

    if s1 == 1 and x.shape[0] is not None:
        xf = tf.reshape(x, [-1, n2, n3, cin])
        dyf = tf.reshape(dy, [-1, o2, o3, cout])
        per_offset = []
        for e in range(k1):
            shift = e - before
            lo, hi = max(0, -shift), min(o1, n1 - shift)  # output rows with an input row
            parts = [bpf(tf.slice(xf, [b * n1 + lo + shift, 0, 0, 0], [hi - lo, -1, -1, -1]),
                         tf.slice(dyf, [b * o1 + lo, 0, 0, 0], [hi - lo, -1, -1, -1]))
                     for b in range(int(x.shape[0])) if hi > lo]
            per_offset.append(tf.add_n(parts) if parts else
                              tf.zeros([k2, k3, cin, cout], x.dtype))
        return tf.stack(per_offset, axis=0)
    if padding == "same":
        x = tf.pad(x, [[0, 0], same_padding(n1, k1, s1), [0, 0], [0, 0], [0, 0]])
    dyf = tf.reshape(dy, [-1, o2, o3, cout])
    # A gather copies whole rows; a strided slice of bf16 was much slower.
    per_offset = [bpf(tf.reshape(tf.gather(x, tf.range(e, e + (o1 - 1) * s1 + 1, s1), axis=1),
                                 [-1, n2, n3, cin]), dyf)
                  for e in range(k1)]
    return tf.stack(per_offset, axis=0)


def kernel_gradient(plan: OpPlan, kernel_shape, dilation, transposed: bool = False) -> str:
    """"native", "matmul" or "slices": how the plan computes this convolution's kernel
    gradient. kernel_shape [*K, Cin, Cout] ([*K, Cout, Cin] when transposed)."""
    rank = len(kernel_shape) - 2
    if rank == 3:
        undilated = set(dilation) == {1}
        return "slices" if plan.kernel_grad_3d == "slices" and undilated else "native"
    cin, cout = int(kernel_shape[-2]), int(kernel_shape[-1])
    if plan.wide_kernel_grad == "matmul" and not transposed and cout >= 4 * cin >= 256:
        return "matmul"
    return "native"


# ----------------------------------------------------------------------------- convolutions
def convolution(x, kernel, dilation_rate=1, padding: str = "same", plan: OpPlan | None = None):
    """Stride-1 2D or 3D convolution, x [B, H, W(, D), Cin] * kernel [*K, Cin, Cout].

    Dilated ones follow plan.dilated_conv ("space_to_batch" is tf.nn.convolution, which
    reshuffles the input so that it needs no dilated kernel; "direct" passes the dilations
    to the op); kernel gradients follow ``kernel_gradient``. The layout is the tensor's:
    [B, D, H, W, C] works the same with a kernel in that order.
    """
    plan = plan or active_plan()
    rank = x.shape.rank - 2
    dilation = per_axis(dilation_rate, rank)
    pad = padding.upper()
    if set(dilation) != {1} and (plan.dilated_conv == "space_to_batch" or (
            plan.device == "cpu_onednn" and not dilated_gradient_runs(x.dtype))):
        return tf.nn.convolution(x, kernel, padding=pad, dilations=list(dilation))
    strides = [1] * (rank + 2)
    dilations = [1, *dilation, 1]
    data_format = "NHWC" if rank == 2 else "NDHWC"  # explicit: eager conv3d grads need it
    op = lambda x, kernel: (tf.nn.conv2d if rank == 2 else tf.nn.conv3d)(
        x, kernel, strides, pad, data_format=data_format, dilations=dilations)
    how = kernel_gradient(plan, kernel.shape, dilation)
    if how == "native":
        return op(x, kernel)
    backprop_input = (tf.raw_ops.Conv2DBackpropInput if rank == 2
                      else tf.raw_ops.Conv3DBackpropInputV2)

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            dx = backprop_input(input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                                strides=strides, padding=pad, dilations=dilations,
                                data_format=data_format)
            if how == "matmul":
                dw = filter_gradient_matmul(x, dy, kernel.shape, dilation, padding.lower())
            else:
                dw = filter_gradient_slices(x, dy, kernel.shape, 1, padding.lower())
            return dx, dw
        return op(x, kernel), grad

    return conv(x, kernel)


_DILATED_GRADIENT: dict = {}  # dtype name -> whether this process's CPU kernels have it


def dilated_gradient_runs(dtype) -> bool:
    """Whether this process's CPU kernels compute both gradients of a dilated 2D
    convolution in ``dtype``, tried once per dtype on a 5x5 image.

    oneDNN does in float32 on every x86-64 CPU, but bfloat16 and float16 only on CPUs with
    units for them; elsewhere TensorFlow falls back to its own kernels, which have no
    dilated gradient, and ``convolution`` takes space-to-batch for that dtype.
    """
    key = tf.as_dtype(dtype).name
    if key not in _DILATED_GRADIENT:
        with tf.init_scope():  # eager, also while a function is being traced
            image = tf.zeros([1, 5, 5, 1], dtype)
            common = dict(out_backprop=image, strides=[1, 1, 1, 1], padding="SAME",
                          dilations=[1, 2, 2, 1])
            try:
                tf.raw_ops.Conv2DBackpropFilter(input=image, filter_sizes=[3, 3, 1, 1],
                                                **common)
                tf.raw_ops.Conv2DBackpropInput(input_sizes=[1, 5, 5, 1],
                                               filter=tf.zeros([3, 3, 1, 1], dtype), **common)
                _DILATED_GRADIENT[key] = True
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                    tf.errors.NotFoundError):
                _DILATED_GRADIENT[key] = False
    return _DILATED_GRADIENT[key]


def transposed_convolution(x, kernel, strides, plan: OpPlan | None = None):
    """Transposed 2D or 3D convolution with "same" padding, as Keras' ConvNDTranspose.

    x [B, *S, Cin], kernel [*K, Cout, Cin] (Keras' layout) -> [B, *(S * strides), Cout].
    With "slices" (3D), the kernel gradient, which is the kernel gradient of the strided
    convolution that maps the output back to x, is filter_gradient_slices.
    """
    plan = plan or active_plan()
    rank = x.shape.rank - 2
    stride = per_axis(strides, rank)
    out_shape = tf.concat([tf.shape(x)[:1], [int(n) * s for n, s in zip(x.shape[1:-1], stride)],
                           [kernel.shape[-2]]], axis=0)
    full = [1, *stride, 1]
    op = lambda x, kernel: tf.nn.conv_transpose(x, kernel, out_shape, full, "SAME")
    if kernel_gradient(plan, kernel.shape, (1,) * rank, transposed=True) == "native":
        return op(x, kernel)

    @tf.custom_gradient
    def conv_t(x, kernel):  # 3D only: kernel_gradient gives "slices" to rank 3 alone
        def grad(dy):
            dx = tf.nn.conv3d(dy, kernel, full, "SAME")
            dw = filter_gradient_slices(dy, x, kernel.shape, stride, "same")
            return dx, dw
        return op(x, kernel), grad

    return conv_t(x, kernel)


# ----------------------------------------------------------------------------- elementwise
def byte_dropout(x, rate: float, seed):
    """Inverted dropout that draws one random byte per element (four per 32-bit draw).

    An element is dropped when its byte is below round(256 * rate), so the drop probability
    is rate rounded to a multiple of 1/256 (exact for the network's 0.25); kept elements
    are scaled by 1 / (keep probability). A quarter of the random numbers of a float
    uniform per element. ``seed``: a stateless seed, int32 [2].
    """
    threshold = int(round(256 * rate))
    if threshold <= 0:
        return x
    if threshold >= 256:
        return tf.zeros_like(x)
    n = tf.size(x)
    words = tf.random.stateless_uniform([(n + 3) // 4], seed=seed, minval=None, maxval=None,
                                        dtype=tf.int32)
    random_bytes = tf.reshape(tf.bitcast(words, tf.uint8), [-1])[:n]
    keep = tf.reshape(random_bytes >= threshold, tf.shape(x))
    scale = tf.where(keep, tf.constant(256.0 / (256 - threshold), x.dtype),
                     tf.constant(0.0, x.dtype))
    return x * scale


def dropout(x, rate: float, seed, plan: OpPlan | None = None):
    """Inverted dropout at ``rate`` with a stateless int32 [2] seed, as the plan says."""
    plan = plan or active_plan()
    if plan.dropout == "byte":
        return byte_dropout(x, rate, seed)
    if rate <= 0.0:
        return x
    return tf.nn.experimental.stateless_dropout(x, rate, seed)


def leaky_relu(x, slope: float, plan: OpPlan | None = None):
    """LeakyReLU, max(x, slope * x) for 0 <= slope <= 1: the values and gradient of
    tf.nn.leaky_relu.

    With "two_ops", bfloat16 and float16 are computed as Mul and Maximum, with the
    LeakyReluGrad op as the gradient: TensorFlow's CPU LeakyRelu kernel is not vectorised
    for these types. float32 keeps the single op.
    """
    plan = plan or active_plan()
    if plan.leaky_relu == "native" or x.dtype == tf.float32 or not 0.0 <= slope <= 1.0:
        return tf.nn.leaky_relu(x, slope)

    @tf.custom_gradient
    def two_ops(x):
        def grad(dy):
            return tf.raw_ops.LeakyReluGrad(gradients=dy, features=x, alpha=slope)
        return tf.maximum(x, x * tf.constant(slope, x.dtype)), grad

    return two_ops(x)


def max_pool_3d(x, plan: OpPlan | None = None):
    """2x2x2 max pooling with stride 2 ("valid") of x [B, S1, S2, S3, C], either layout.

    "folded": the maximum of each pair along S1, then a 2D max pool over (S2, S3) with S1
    folded into the batch. The same values; the gradient goes to the same element unless
    two elements of a window are equal (then to the one of the lower S1; MaxPool3D's
    gradient also picks one). TensorFlow's own CPU MaxPool3D gradient is far slower than
    its 2D one.
    """
    plan = plan or active_plan()
    if plan.pool_3d == "native":
        return tf.nn.max_pool3d(x, 2, 2, "VALID")
    n1 = 2 * (int(x.shape[1]) // 2)
    pairs = tf.maximum(x[:, 0:n1:2], x[:, 1:n1:2])  # [B, S1/2, S2, S3, C]
    s2, s3, c = (int(v) for v in x.shape[2:])
    pooled = tf.nn.max_pool2d(tf.reshape(pairs, [-1, s2, s3, c]), 2, 2, "VALID")
    return tf.reshape(pooled, [-1, n1 // 2, s2 // 2, s3 // 2, c])
