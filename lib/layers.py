"""Layers whose weights are either shared by the modalities or held once per modality.

UMMKD shares every convolution kernel between CT and MR and keeps only batch
normalisation modality-specific. The baselines of the paper share more (joint training)
or less (individual networks, Y- and X-shaped networks), so both kinds of layer here take
a ``shared`` flag and the network decides per layer.

Calling convention, used by every layer in this module and by the networks::

    y = layer(x, modalities=("mr", "ct"), training=True)

``x`` holds the batches of the listed modalities concatenated along axis 0 in that order,
each of the same size, so a shared convolution runs once over both modalities (one large
batch instead of two small ones), and a modality-specific layer splits the batch, applies
each modality's branch to its part and concatenates the results. Evaluating one modality is
``modalities=("ct",)``. Shapes are channels-last: [B, H, W, C] in 2D, [B, H, W, D, C] in 3D.
"""
from __future__ import annotations

import itertools
import zlib

import keras
import tensorflow as tf

from lib.fast_ops import convolution, dropout, leaky_relu, per_axis, transposed_convolution

MODALITIES = ("mr", "ct")  # source first, target second, as in the original code
KERNEL_STDDEV = 0.01


def kernel_initializer(seed=None):
    return keras.initializers.TruncatedNormal(stddev=KERNEL_STDDEV, seed=seed)


def derive_seed(seed, *keys):
    """A seed of its own for one part of a model, from the model's seed and a path of keys.

    Keras initializers and seed generators given the same integer seed draw the same
    numbers, so every kernel and every dropout stream needs its own seed; deriving them from
    (seed, keys) keeps a seeded model reproducible. None (unseeded) stays None.
    """
    if seed is None:
        return None
    return zlib.crc32(repr((int(seed),) + tuple(keys)).encode()) & 0x7FFFFFFF


def seed_sequence(seed):
    """seeds() -> derive_seed(seed, 0), derive_seed(seed, 1), ...: one per sub-layer, in the
    order a model creates them."""
    counter = itertools.count()
    return lambda: derive_seed(seed, next(counter))


class PerModality(keras.layers.Layer):
    """Base class: one branch per modality, or a single branch shared by all of them.

    Subclasses implement ``make_branch(name, key)`` returning a Keras layer (key: "shared"
    or the modality).
    """

    def __init__(self, shared: bool = False, modalities=MODALITIES, **kwargs):
        super().__init__(**kwargs)
        self.shared = bool(shared)
        self.modalities = tuple(modalities)

    def _make_branches(self):
        """Called by subclasses at the end of __init__, once their settings are stored."""
        keys = ("shared",) if self.shared else self.modalities
        # A dict of layers keeps checkpoint names readable (".../branches/ct/...").
        self.branches = {key: self.make_branch(f"{self.name}_{key}", key) for key in keys}

    def make_branch(self, name: str, key: str) -> keras.layers.Layer:
        raise NotImplementedError

    def branch(self, modality: str) -> keras.layers.Layer:
        return self.branches["shared" if self.shared else modality]

    def build(self, input_shape):
        # Build every branch up front, so that all variables exist (and can be restored
        # from a checkpoint) even before each modality has been seen.
        for layer in self.branches.values():
            if not layer.built:
                layer.build(input_shape)
        self.built = True

    def _apply(self, layer, x, training):
        return layer(x, training=training)

    def call(self, x, modalities=MODALITIES, training=None):
        modalities = tuple(modalities)
        if self.shared:
            return self._apply(self.branches["shared"], x, training)
        if len(modalities) == 1:
            return self._apply(self.branch(modalities[0]), x, training)
        parts = tf.split(x, len(modalities), axis=0)
        return tf.concat([self._apply(self.branch(m), p, training)
                          for m, p in zip(modalities, parts)], axis=0)

    def compute_output_shape(self, input_shape):
        return next(iter(self.branches.values())).compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(shared=self.shared, modalities=list(self.modalities))
        return config


def _scale_shift(groups, scale, shift, slope):
    """groups * scale + shift, then LeakyReLU(slope) unless slope is None; compute dtype."""
    y = groups * tf.cast(scale, groups.dtype) + tf.cast(shift, groups.dtype)
    return y if slope is None else leaky_relu(y, slope)


def _replicas() -> int:
    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if context is not None else 1


@keras.saving.register_keras_serializable(package="ummkd")
class ModalityBatchNorm(keras.layers.Layer):
    """Batch normalisation with its own scale, shift and running statistics per modality.

    The parameters are stacked, row k for modality k: gamma, beta, moving_mean and
    moving_variance are [K, C]. A batch of M concatenated modalities is split along its
    leading axis (no copy) and each part normalised by TensorFlow's fused batch-norm op
    with its modality's row; statistics are float32 whatever the compute precision.

    ``activation_slope``: LeakyReLU slope applied to the output (None: no activation).
    ``synchronized``: under a tf.distribute
    strategy with several replicas, the statistics of each modality are those of the
    global batch (all-reduced sums), not of the replica's share.

    With ``shared=True`` there is one row, applied to the whole (mixed) batch: ordinary
    batch normalisation, the joint-training baseline.
    """

    def __init__(self, momentum: float = 0.9, epsilon: float = 1e-3, shared: bool = False,
                 modalities=MODALITIES, activation_slope: float | None = None,
                 synchronized: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.momentum, self.epsilon = float(momentum), float(epsilon)
        self.shared, self.modalities = bool(shared), tuple(modalities)
        self.activation_slope = None if activation_slope is None else float(activation_slope)
        self.synchronized = bool(synchronized)

    def build(self, input_shape):
        rows = 1 if self.shared else len(self.modalities)
        shape = (rows, int(input_shape[-1]))
        add = lambda name, init, trainable, **kw: self.add_weight(
            shape=shape, initializer=init, name=name, trainable=trainable, autocast=False,
            **kw)
        self.gamma = add("gamma", "ones", True)
        self.beta = add("beta", "zeros", True)
        # Under tf.distribute each replica's update is averaged over the replicas, so every
        # copy holds the same statistics (those of the global batch with synchronised BN,
        # else the mean of the replicas' own).
        self.moving_mean = add("moving_mean", "zeros", False, aggregation="mean")
        self.moving_variance = add("moving_variance", "ones", False, aggregation="mean")
        self.built = True

    def rows(self, modalities) -> list[int]:
        """Parameter rows of the given modalities (one shared row for a shared layer)."""
        return [0] if self.shared else [self.modalities.index(m) for m in modalities]

    def call(self, x, modalities=MODALITIES, training=None):
        rows = self.rows(tuple(modalities))
        if training and self.synchronized and _replicas() > 1:
            return self._synchronized_call(x, rows)
        channels = x.shape[-1]
        # One fused op per modality (oneDNN on the CPU, cuDNN on GPUs): statistics in
        # float32 whatever the compute precision, and a backward pass that is accurate in
        # bfloat16 (docs/performance.md). Splitting along the leading axis makes no copy.
        parts = tf.split(tf.reshape(x, [len(rows), -1, 1, channels]), len(rows), axis=0)
        gamma, beta = tf.gather(self.gamma, rows), tf.gather(self.beta, rows)
        if training:
            empty = tf.zeros([0], tf.float32)
            outs, means, variances = [], [], []
            for k, part in enumerate(parts):
                y, mean, var = tf.raw_ops.FusedBatchNormV3(
                    x=part, scale=gamma[k], offset=beta[k], mean=empty, variance=empty,
                    epsilon=self.epsilon, is_training=True, data_format="NHWC")[:3]
                n = tf.cast(tf.size(part) // channels, tf.float32)
                outs.append(y)
                means.append(mean)
                # The op returns the unbiased variance; the moving statistic (as the
                # normalisation) uses the batch's own.
                variances.append(var * (n - 1.0) / tf.maximum(n, 1.0))
            self._update(self.moving_mean, rows, tf.stack(means))
            self._update(self.moving_variance, rows, tf.stack(variances))
        else:
            moving_mean = tf.gather(self.moving_mean, rows)
            moving_var = tf.gather(self.moving_variance, rows)
            outs = [tf.raw_ops.FusedBatchNormV3(
                x=part, scale=gamma[k], offset=beta[k], mean=moving_mean[k],
                variance=moving_var[k], epsilon=self.epsilon, is_training=False,
                data_format="NHWC")[0] for k, part in enumerate(parts)]
        if self.activation_slope is not None:
            # On each part before the concat: the activation then runs inside each part's
            # fused op sequence (faster, docs/performance.md).
            outs = [leaky_relu(y, self.activation_slope) for y in outs]
        y = tf.concat(outs, axis=0) if len(outs) > 1 else outs[0]
        return tf.reshape(y, tf.shape(x))

    def _synchronized_call(self, x, rows):
        """Training with the statistics of the global batch (see _global_moments)."""
        channels = x.shape[-1]
        groups = tf.reshape(x, [len(rows), -1, channels])
        take = lambda v: tf.gather(v, rows)[:, None, :]  # [len(rows), 1, C]
        mean, var = self._global_moments(groups)
        self._update(self.moving_mean, rows, mean[:, 0, :])
        self._update(self.moving_variance, rows, var[:, 0, :])
        scale = take(self.gamma) * tf.math.rsqrt(var + self.epsilon)
        shift = take(self.beta) - mean * scale
        y = _scale_shift(groups, scale, shift, self.activation_slope)
        return tf.reshape(y, tf.shape(x))

    @staticmethod
    def _global_moments(groups):
        """Mean and variance [M, 1, C] of each modality over the batches of all replicas.

        Each replica contributes its count, sum and sum of squares about its own mean
        (Chan et al.'s pairwise combination), in one batched all-reduce per layer (the
        strategy's cross-device ops pack its three tensors); its gradient is the all-reduce
        of the gradients, so backpropagation sees the global statistics too. One layer's
        statistics need the previous layer's output, so layers cannot share a collective.
        """
        g = tf.cast(groups, tf.float32)
        n = tf.cast(tf.shape(g)[1], tf.float32)
        local_mean = tf.reduce_mean(g, axis=1, keepdims=True)
        local_m2 = tf.reduce_sum(tf.square(g - local_mean), axis=1, keepdims=True)
        context = tf.distribute.get_replica_context()
        total, sums, m2 = context.all_reduce(
            tf.distribute.ReduceOp.SUM,
            [n, n * local_mean, local_m2 + n * tf.square(local_mean)])
        mean = sums / total
        return mean, tf.maximum(m2 / total - tf.square(mean), 0.0)

    def _update(self, variable, rows, value):
        """Moving average of the listed rows only; the other modalities' rows stay as they are."""
        idx = tf.constant([[r] for r in rows])
        new = tf.gather_nd(variable, idx) * self.momentum + tf.stop_gradient(value) * (
            1.0 - self.momentum)
        variable.assign(tf.tensor_scatter_nd_update(variable, idx, new))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, epsilon=self.epsilon, shared=self.shared,
                      modalities=list(self.modalities), activation_slope=self.activation_slope,
                      synchronized=self.synchronized)
        return config


@keras.saving.register_keras_serializable(package="ummkd")
class ModalityConv(PerModality):
    """A 2D or 3D convolution, shared by the modalities (the default) or one per modality.

    ``kernel_size`` is an int or a tuple (3D kernels such as (3, 3, 1)); ``rank`` 2 or 3.
    The Keras layers of the branches own the variables; stride-1 convolutions and
    transposed ones with "same" padding are computed by lib.fast_ops, as the device's plan
    says, strided ones by the Keras layer. ``depth_first`` (3D): the input is
    [B, D, H, W, C] while kernel_size, strides and the kernel variable keep Keras'
    (H, W, D) order, so checkpoints are the same in either layout.
    """

    def __init__(self, filters: int, kernel_size=3, rank: int = 2, dilation_rate=1,
                 padding: str = "same", use_bias: bool = False, transpose: bool = False,
                 strides=1, shared: bool = True, modalities=MODALITIES, seed=None,
                 depth_first: bool = False, **kwargs):
        super().__init__(shared=shared, modalities=modalities, **kwargs)
        self.filters = int(filters)
        self.kernel_size = kernel_size
        self.rank = int(rank)
        self.dilation_rate = dilation_rate
        self.padding = padding
        self.use_bias = bool(use_bias)
        self.transpose = bool(transpose)
        self.strides = strides
        self.seed = seed
        self.depth_first = bool(depth_first)
        if self.depth_first and (self.rank != 3 or (
                padding != "same" if transpose else set(per_axis(strides, 3)) != {1})):
            raise ValueError("depth_first: for 3D stride-1 or 'same' transposed convolutions")
        self._make_branches()

    def make_branch(self, name, key):
        # modality-specific kernels start apart, as in the original code
        common = dict(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides,
                      padding=self.padding, use_bias=self.use_bias, name=name,
                      kernel_initializer=kernel_initializer(derive_seed(self.seed, key)))
        if self.transpose:
            cls = keras.layers.Conv2DTranspose if self.rank == 2 else keras.layers.Conv3DTranspose
            return cls(**common)
        cls = keras.layers.Conv2D if self.rank == 2 else keras.layers.Conv3D
        return cls(dilation_rate=self.dilation_rate, **common)

    def _apply(self, layer, x, training):
        dtype = layer.compute_dtype
        cast = lambda v: tf.cast(v, dtype)
        kernel, strides = cast(layer.kernel), per_axis(self.strides, self.rank)
        dilation = per_axis(self.dilation_rate, self.rank)
        if self.depth_first:  # the variable stays [kh, kw, kd, ...] as in Keras
            kernel = tf.transpose(kernel, [2, 0, 1, 3, 4])
            strides, dilation = [(v[2], v[0], v[1]) for v in (strides, dilation)]
        if self.transpose and self.padding == "same":
            y = transposed_convolution(cast(x), kernel, strides)
        elif self.transpose or strides != (1,) * self.rank:
            return layer(x)
        else:
            y = convolution(cast(x), kernel, dilation, self.padding)
        return tf.nn.bias_add(y, cast(layer.bias)) if self.use_bias else y

    def kernels(self):
        """The convolution kernels (not biases), for the L2 penalty."""
        return [layer.kernel for layer in self.branches.values()]

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, rank=self.rank,
                      dilation_rate=self.dilation_rate, padding=self.padding,
                      use_bias=self.use_bias, transpose=self.transpose, strides=self.strides,
                      seed=self.seed, depth_first=self.depth_first)
        return config


def conv_kernels(model: keras.layers.Layer) -> list:
    """All convolution kernels of a network (every ModalityConv branch), no BN parameters."""
    return [k for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, ModalityConv) for k in layer.kernels()]


def bn_layers(model: keras.layers.Layer) -> list:
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, ModalityBatchNorm)]


@keras.saving.register_keras_serializable(package="ummkd")
class ConvUnit(keras.layers.Layer):
    """Convolution, modality BN and LeakyReLU(0.2) as one unit, 2D or 3D.

    ``preact=True`` is the pre-activation unit of the 2D network:
    BN -> LeakyReLU -> conv -> dropout (training only; lib.fast_ops.dropout seeded by a Keras
    SeedGenerator, whose state is a model variable, so a resumed run continues its stream).
    ``preact=False`` is the unit of the 3D U-Net: conv -> BN -> LeakyReLU. Convolutions
    have no bias (BN follows or precedes). ``sync_bn``: synchronised BN statistics across
    tf.distribute replicas (see ModalityBatchNorm). ``depth_first``: see ModalityConv.
    """

    def __init__(self, filters: int, kernel_size=3, rank: int = 2, dilation_rate=1,
                 preact: bool = True, dropout: float = 0.0, conv_shared: bool = True,
                 bn_shared: bool = False, transpose: bool = False, strides=1,
                 modalities=MODALITIES, seed=None, sync_bn: bool = False,
                 depth_first: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.rank = int(filters), kernel_size, int(rank)
        self.dilation_rate, self.preact, self.dropout = dilation_rate, bool(preact), float(dropout)
        self.conv_shared, self.bn_shared = bool(conv_shared), bool(bn_shared)
        self.transpose, self.strides = bool(transpose), strides
        self.modalities, self.seed, self.sync_bn = tuple(modalities), seed, bool(sync_bn)
        self.conv = ModalityConv(filters, kernel_size, rank=rank, dilation_rate=dilation_rate,
                                 transpose=transpose, strides=strides, shared=conv_shared,
                                 modalities=modalities, seed=derive_seed(seed, "conv"),
                                 depth_first=depth_first, name="conv")
        self.depth_first = bool(depth_first)
        self.bn = ModalityBatchNorm(shared=bn_shared, modalities=modalities, activation_slope=0.2,
                                    synchronized=sync_bn, name="bn")
        self.seed_generator = (keras.random.SeedGenerator(derive_seed(seed, "dropout"))
                               if dropout > 0 else None)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if self.preact:
            self.bn.build(input_shape)
            self.conv.build(input_shape)
        else:
            self.conv.build(input_shape)
            self.bn.build(self.conv.compute_output_shape(input_shape))
        self.built = True

    def call(self, x, modalities=MODALITIES, training=None):
        if self.preact:
            x = self.conv(self.bn(x, modalities=modalities, training=training),
                          modalities=modalities)
            if training and self.seed_generator is not None:
                seed = self.seed_generator.next()
                if seed.dtype != tf.int32:  # stateless ops take int32 seeds
                    seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
                context = tf.distribute.get_replica_context()
                if context is not None and context.num_replicas_in_sync > 1:
                    # each replica drops its own elements (its batch is another one)
                    seed = tf.random.experimental.stateless_fold_in(
                        seed, context.replica_id_in_sync_group)
                x = dropout(x, self.dropout, seed)
            return x
        return self.bn(self.conv(x, modalities=modalities), modalities=modalities,
                       training=training)

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, rank=self.rank,
                      dilation_rate=self.dilation_rate, preact=self.preact,
                      dropout=self.dropout, conv_shared=self.conv_shared,
                      bn_shared=self.bn_shared, transpose=self.transpose,
                      strides=self.strides, modalities=list(self.modalities), seed=self.seed,
                      sync_bn=self.sync_bn, depth_first=self.depth_first)
        return config
