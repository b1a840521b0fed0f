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

import keras
import tensorflow as tf

MODALITIES = ("mr", "ct")  # source first, target second, as in the original code
KERNEL_STDDEV = 0.01


def kernel_initializer(seed=None):
    return keras.initializers.TruncatedNormal(stddev=KERNEL_STDDEV, seed=seed)


class PerModality(keras.layers.Layer):
    """Base class: one branch per modality, or a single branch shared by all of them.

    Subclasses implement ``make_branch(name)`` returning a Keras layer.
    """

    def __init__(self, shared: bool = False, modalities=MODALITIES, **kwargs):
        super().__init__(**kwargs)
        self.shared = bool(shared)
        self.modalities = tuple(modalities)

    def _make_branches(self):
        """Called by subclasses at the end of __init__, once their settings are stored."""
        keys = ("shared",) if self.shared else self.modalities
        # A dict of layers keeps checkpoint names readable (".../branches/ct/...").
        self.branches = {key: self.make_branch(f"{self.name}_{key}") for key in keys}

    def make_branch(self, name: str) -> keras.layers.Layer:
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


@keras.saving.register_keras_serializable(package="ummkd")
class ModalityBatchNorm(keras.layers.Layer):
    """Batch normalisation with its own scale, shift and running statistics per modality.

    The parameters are stacked, row k for modality k: gamma, beta, moving_mean and
    moving_variance are [K, C]. A batch of M concatenated modalities is viewed as
    [M, B*H*W(*D), C], so the statistics of every modality come out of one moments op and
    one multiply-add normalises all of them: no split and concat per layer. Statistics are
    computed in float32 whatever the compute precision.

    With ``shared=True`` there is one row, applied to the whole (mixed) batch: ordinary
    batch normalisation, the joint-training baseline.
    """

    def __init__(self, momentum: float = 0.9, epsilon: float = 1e-3, shared: bool = False,
                 modalities=MODALITIES, **kwargs):
        super().__init__(**kwargs)
        self.momentum, self.epsilon = float(momentum), float(epsilon)
        self.shared, self.modalities = bool(shared), tuple(modalities)

    def build(self, input_shape):
        rows = 1 if self.shared else len(self.modalities)
        shape = (rows, int(input_shape[-1]))
        add = lambda name, init, trainable: self.add_weight(
            shape=shape, initializer=init, name=name, trainable=trainable, autocast=False)
        self.gamma = add("gamma", "ones", True)
        self.beta = add("beta", "zeros", True)
        self.moving_mean = add("moving_mean", "zeros", False)
        self.moving_variance = add("moving_variance", "ones", False)
        self.built = True

    def rows(self, modalities) -> list[int]:
        """Parameter rows of the given modalities (one shared row for a shared layer)."""
        return [0] if self.shared else [self.modalities.index(m) for m in modalities]

    def call(self, x, modalities=MODALITIES, training=None):
        rows = self.rows(tuple(modalities))
        channels = x.shape[-1]
        groups = tf.reshape(x, [len(rows), -1, channels])
        take = lambda v: tf.gather(v, rows)[:, None, :]  # [len(rows), 1, C]
        if training:
            mean, var = tf.nn.moments(tf.cast(groups, tf.float32), axes=[1], keepdims=True)
            self._update(self.moving_mean, rows, mean[:, 0, :])
            self._update(self.moving_variance, rows, var[:, 0, :])
        else:
            mean, var = take(self.moving_mean), take(self.moving_variance)
        scale = take(self.gamma) * tf.math.rsqrt(var + self.epsilon)
        shift = take(self.beta) - mean * scale
        y = groups * tf.cast(scale, x.dtype) + tf.cast(shift, x.dtype)
        return tf.reshape(y, tf.shape(x))

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
                      modalities=list(self.modalities))
        return config


@keras.saving.register_keras_serializable(package="ummkd")
class ModalityConv(PerModality):
    """A 2D or 3D convolution, shared by the modalities (the default) or one per modality.

    ``kernel_size`` is an int or a tuple (3D kernels such as (3, 3, 1)); ``rank`` 2 or 3.
    """

    def __init__(self, filters: int, kernel_size=3, rank: int = 2, dilation_rate=1,
                 padding: str = "same", use_bias: bool = False, transpose: bool = False,
                 strides=1, shared: bool = True, modalities=MODALITIES, seed=None, **kwargs):
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
        self._make_branches()

    def make_branch(self, name):
        common = dict(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides,
                      padding=self.padding, use_bias=self.use_bias, name=name,
                      kernel_initializer=kernel_initializer(self.seed))
        if self.transpose:
            cls = keras.layers.Conv2DTranspose if self.rank == 2 else keras.layers.Conv3DTranspose
            return cls(**common)
        cls = keras.layers.Conv2D if self.rank == 2 else keras.layers.Conv3D
        return cls(dilation_rate=self.dilation_rate, **common)

    def _apply(self, layer, x, training):
        return layer(x)

    def kernels(self):
        """The convolution kernels (not biases), for the L2 penalty."""
        return [layer.kernel for layer in self.branches.values()]

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, rank=self.rank,
                      dilation_rate=self.dilation_rate, padding=self.padding,
                      use_bias=self.use_bias, transpose=self.transpose, strides=self.strides,
                      seed=self.seed)
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
    BN -> LeakyReLU -> conv -> dropout (training only). ``preact=False`` is the unit of the
    3D U-Net: conv -> BN -> LeakyReLU. Convolutions have no bias (BN follows or precedes).
    """

    def __init__(self, filters: int, kernel_size=3, rank: int = 2, dilation_rate=1,
                 preact: bool = True, dropout: float = 0.0, conv_shared: bool = True,
                 bn_shared: bool = False, transpose: bool = False, strides=1,
                 modalities=MODALITIES, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.rank = int(filters), kernel_size, int(rank)
        self.dilation_rate, self.preact, self.dropout = dilation_rate, bool(preact), float(dropout)
        self.conv_shared, self.bn_shared = bool(conv_shared), bool(bn_shared)
        self.transpose, self.strides = bool(transpose), strides
        self.modalities, self.seed = tuple(modalities), seed
        self.conv = ModalityConv(filters, kernel_size, rank=rank, dilation_rate=dilation_rate,
                                 transpose=transpose, strides=strides, shared=conv_shared,
                                 modalities=modalities, seed=seed, name="conv")
        self.bn = ModalityBatchNorm(shared=bn_shared, modalities=modalities, name="bn")
        self.drop = keras.layers.Dropout(dropout, seed=seed) if dropout > 0 else None

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
            x = tf.nn.leaky_relu(self.bn(x, modalities=modalities, training=training), 0.2)
            x = self.conv(x, modalities=modalities)
            if self.drop is not None:
                x = self.drop(x, training=training)
            return x
        x = self.conv(x, modalities=modalities)
        return tf.nn.leaky_relu(self.bn(x, modalities=modalities, training=training), 0.2)

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, rank=self.rank,
                      dilation_rate=self.dilation_rate, preact=self.preact,
                      dropout=self.dropout, conv_shared=self.conv_shared,
                      bn_shared=self.bn_shared, transpose=self.transpose,
                      strides=self.strides, modalities=list(self.modalities), seed=self.seed)
        return config
