"""The 2D dilated residual network of UMMKD.

Input [B, H, W, 3] (three adjacent slices; H and W multiples of 8), output logits
[B, H, W, n_class] for the middle slice. With f = feature_base:

    conv 3x3 3->f
    G1  R(f, f)                      maxpool 2     stage "first"
    G2  R(f, 2f)                     maxpool 2     stage "encoder" (G2..G7)
    G3  R(2f, 4f), R(4f, 4f)         maxpool 2
    G4  R(4f, 8f), R(8f, 8f)
    G5  R(8f, 16f), R(16f, 16f)
    G6  R(16f, 16f) x2
    G7  R(16f, 32f), R(32f, 32f)
    G8  R(32f, 32f, dilation 2) x2                 stage "decoder" (G8, G9)
    G9  U(32f, 32f) x2
    G10 symmetric pad 1, conv 3x3 valid 32f -> 64*8*n_class, BN, LeakyReLU,
        depth_to_space x8 -> 8*n_class channels at full resolution   stage "last"
    out symmetric pad 2, conv 5x5 valid 8*n_class -> n_class (with bias)

U(cin, cout, d) = BN -> LeakyReLU(0.2) -> conv 3x3 dilation d -> dropout (training only);
R(cin, cout, d) = U(cin, cout, d), U(cout, cout, d) plus a shortcut: the input itself, or,
when cout = 2 cin, the input zero-padded with cin/2 channels on each side.

Which convolutions and BN layers are modality-specific follows the sharing scheme
(lib/schemes.py); for UMMKD every kernel is shared and every BN is per modality.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from lib.layers import (MODALITIES, ConvUnit, ModalityBatchNorm, ModalityConv, derive_seed,
                        seed_sequence)
from lib.schemes import get_scheme

DOWNSAMPLING = 8  # three 2x max-pools; undone by depth_to_space


@keras.saving.register_keras_serializable(package="ummkd")
class ResidualBlock(keras.layers.Layer):
    """R(cin, cout, dilation): two pre-activation units and a (zero-padded) shortcut.

    Input [B, H, W, cin] -> output [B, H, W, cout], with cout equal to cin or 2*cin.
    """

    def __init__(self, filters: int, dilation_rate: int = 1, dropout: float = 0.25,
                 conv_shared: bool = True, bn_shared: bool = False, modalities=MODALITIES,
                 seed=None, sync_bn: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.dilation_rate, self.dropout = int(filters), int(dilation_rate), dropout
        self.conv_shared, self.bn_shared = conv_shared, bn_shared
        self.modalities, self.seed, self.sync_bn = tuple(modalities), seed, bool(sync_bn)
        unit = dict(rank=2, dilation_rate=dilation_rate, preact=True, dropout=dropout,
                    conv_shared=conv_shared, bn_shared=bn_shared, modalities=modalities,
                    sync_bn=sync_bn)
        self.unit1 = ConvUnit(filters, 3, name="unit1", seed=derive_seed(seed, 1), **unit)
        self.unit2 = ConvUnit(filters, 3, name="unit2", seed=derive_seed(seed, 2), **unit)

    def build(self, input_shape):
        cin = int(input_shape[-1])
        if self.filters not in (cin, 2 * cin):
            raise ValueError(f"residual block: {cin} -> {self.filters} channels is neither "
                             "identity nor doubling")
        self.unit1.build(input_shape)
        self.unit2.build(tuple(input_shape[:-1]) + (self.filters,))
        self.built = True

    def call(self, x, modalities=MODALITIES, training=None):
        y = self.unit1(x, modalities=modalities, training=training)
        y = self.unit2(y, modalities=modalities, training=training)
        cin = x.shape[-1]
        if self.filters == 2 * cin:
            x = tf.pad(x, [[0, 0], [0, 0], [0, 0], [cin // 2, cin - cin // 2]])
        return x + y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.filters,)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, dilation_rate=self.dilation_rate,
                      dropout=self.dropout, conv_shared=self.conv_shared,
                      bn_shared=self.bn_shared, modalities=list(self.modalities),
                      seed=self.seed, sync_bn=self.sync_bn)
        return config


@keras.saving.register_keras_serializable(package="ummkd")
class DilatedResNet2D(keras.Model):
    """The UMMKD 2D network; call as ``model(x, modalities=("mr", "ct"), training=...)``.

    ``x`` is [M*B, H, W, 3] with the M modalities' batches concatenated in the order given
    (see lib/layers.py); the output is [M*B, H, W, n_class] logits in the same order.
    """

    def __init__(self, n_class: int = 5, feature_base: int = 16, scheme: str = "ummkd",
                 dropout: float = 0.25, modalities=MODALITIES, seed=None,
                 sync_bn: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.n_class, self.feature_base, self.scheme = int(n_class), int(feature_base), scheme
        self.dropout, self.modalities, self.seed = float(dropout), tuple(modalities), seed
        self.sync_bn = bool(sync_bn)
        sch = get_scheme(scheme)
        f = self.feature_base
        seeds = seed_sequence(seed)  # one per layer, in creation order

        def block(filters, stage, dilation=1):
            return ResidualBlock(filters, dilation, dropout, sch.conv_shared(stage),
                                 sch.bn_shared(stage), modalities, seeds(), sync_bn)

        self.stem = ModalityConv(f, 3, rank=2, shared=sch.conv_shared("first"),
                                 modalities=modalities, seed=seeds(), name="stem")
        # (block list, max-pool after the group?) in network order.
        self.groups = [
            [block(f, "first")],
            [block(2 * f, "encoder")],
            [block(4 * f, "encoder"), block(4 * f, "encoder")],
            [block(8 * f, "encoder"), block(8 * f, "encoder")],
            [block(16 * f, "encoder"), block(16 * f, "encoder")],
            [block(16 * f, "encoder"), block(16 * f, "encoder")],
            [block(32 * f, "encoder"), block(32 * f, "encoder")],
            [block(32 * f, "decoder", 2), block(32 * f, "decoder", 2)],
        ]
        self.pool_after = (0, 1, 2)
        unit = dict(rank=2, preact=True, dropout=dropout, conv_shared=sch.conv_shared("decoder"),
                    bn_shared=sch.bn_shared("decoder"), modalities=modalities,
                    sync_bn=sync_bn)
        self.g9 = [ConvUnit(32 * f, 3, seed=seeds(), **unit),
                   ConvUnit(32 * f, 3, seed=seeds(), **unit)]
        up_channels = DOWNSAMPLING * DOWNSAMPLING * DOWNSAMPLING * self.n_class
        self.g10_conv = ModalityConv(up_channels, 3, rank=2, padding="valid",
                                     shared=sch.conv_shared("last"), modalities=modalities,
                                     seed=seeds(), name="g10_conv")
        self.g10_bn = ModalityBatchNorm(shared=sch.bn_shared("last"), modalities=modalities,
                                        activation_slope=0.2, synchronized=sync_bn,
                                        name="g10_bn")
        self.out_conv = ModalityConv(self.n_class, 5, rank=2, padding="valid", use_bias=True,
                                     shared=sch.conv_shared("last"), modalities=modalities,
                                     seed=seeds(), name="out_conv")

    def call(self, x, modalities=MODALITIES, training=None):
        kw = dict(modalities=modalities)
        x = self.stem(x, **kw)
        for i, group in enumerate(self.groups):
            for blk in group:
                x = blk(x, training=training, **kw)
            if i in self.pool_after:
                x = tf.nn.max_pool2d(x, 2, 2, "VALID")
        for unit in self.g9:
            x = unit(x, training=training, **kw)
        x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
        x = self.g10_conv(x, **kw)
        x = self.g10_bn(x, training=training, **kw)  # with its LeakyReLU(0.2)
        x = tf.nn.depth_to_space(x, DOWNSAMPLING)
        x = tf.pad(x, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="SYMMETRIC")
        return self.out_conv(x, **kw)

    def build_for(self, image_size: int = 64):
        """Create every variable by one forward pass on zeros (all modalities)."""
        m = len(self.modalities)
        self(tf.zeros([m, image_size, image_size, 3]), modalities=self.modalities,
             training=False)
        return self

    def get_config(self):
        return dict(n_class=self.n_class, feature_base=self.feature_base, scheme=self.scheme,
                    dropout=self.dropout, modalities=list(self.modalities), seed=self.seed,
                    sync_bn=self.sync_bn, name=self.name)


def build_model(config: dict) -> DilatedResNet2D:
    """The 2D network for a resolved configuration (keys N_CLASS, FEATURE_BASE, SCHEME...)."""
    model = DilatedResNet2D(n_class=config["N_CLASS"], feature_base=config["FEATURE_BASE"],
                            scheme=config["SCHEME"], dropout=config["DROPOUT"],
                            seed=config["SEED"], sync_bn=config["SYNC_BN"],
                            name="ummkd_2d")
    return model.build_for(DOWNSAMPLING * 2)
