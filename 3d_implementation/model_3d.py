"""The 3D U-Net of UMMKD, on slabs [B, H, W, D, 1] (H, W, D multiples of 8).

Units are conv -> modality BN -> LeakyReLU(0.2) (lib.layers.ConvUnit with preact=False),
no conv bias, kernels truncated normal (stddev 0.01). With f = feature_base:

    level 1  3x3x3 1->f, f->2f              maxpool 2x2x2   stage "first"
    level 2  3x3x3 2f->2f, 2f->4f           maxpool         stage "encoder"
    level 3  3x3x1 4f->4f, 4f->8f           maxpool         stage "encoder"
    level 4  3x3x1 8f->8f, 8f->16f  (bottom)                stage "encoder"
    up3      transposed 3x3x1 16f->8f, concat level 3, 3x3x1 -> 8f, 8f    stage "decoder"
    up2      transposed 3x3x1 8f->8f, concat level 2, 3x3x3 -> 4f, 4f     stage "decoder"
    up1      transposed 3x3x3 4f->4f, concat level 1, 3x3x3 -> 2f, 2f     stage "last"
    logits   1x1x1 conv with bias 2f -> n_class                           stage "last"

Transposed convolutions have stride 2 in all three axes and are followed by BN and
LeakyReLU. Sharing follows the scheme (lib/schemes.py), as in 2D.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from lib.fast_ops import active_plan, max_pool_3d
from lib.layers import MODALITIES, ConvUnit, ModalityConv, seed_sequence
from lib.schemes import get_scheme

DOWNSAMPLING = 8


@keras.saving.register_keras_serializable(package="ummkd")
class UNet3D(keras.Model):
    """Call as ``model(x, modalities=("mr", "ct"), training=...)`` (see lib/layers.py)."""

    def __init__(self, n_class: int = 5, feature_base: int = 16, scheme: str = "ummkd",
                 modalities=MODALITIES, seed=None, sync_bn: bool = False,
                 depth_first: bool | None = None, **kwargs):
        super().__init__(**kwargs)
        self.n_class, self.feature_base, self.scheme = int(n_class), int(feature_base), scheme
        self.modalities, self.seed, self.sync_bn = tuple(modalities), seed, bool(sync_bn)
        # The layout the device's plan computes in (lib.fast_ops.OpPlan.depth_first_3d;
        # None: as the plan says). Kernels keep Keras' order: same weights either way.
        self.depth_first = (active_plan().depth_first_3d if depth_first is None
                            else bool(depth_first))
        sch = get_scheme(scheme)
        f = self.feature_base
        seeds = seed_sequence(seed)  # one per layer, in creation order

        def unit(filters, kernel, stage, **kw):
            return ConvUnit(filters, kernel, rank=3, preact=False, depth_first=self.depth_first,
                            conv_shared=sch.conv_shared(stage), bn_shared=sch.bn_shared(stage),
                            modalities=modalities, seed=seeds(), sync_bn=sync_bn, **kw)

        k3, k1 = (3, 3, 3), (3, 3, 1)
        self.enc = [
            [unit(f, k3, "first"), unit(2 * f, k3, "first")],
            [unit(2 * f, k3, "encoder"), unit(4 * f, k3, "encoder")],
            [unit(4 * f, k1, "encoder"), unit(8 * f, k1, "encoder")],
            [unit(8 * f, k1, "encoder"), unit(16 * f, k1, "encoder")],
        ]
        up = dict(transpose=True, strides=2)
        self.dec = [
            (unit(8 * f, k1, "decoder", **up), [unit(8 * f, k1, "decoder"),
                                                unit(8 * f, k1, "decoder")]),
            (unit(8 * f, k1, "decoder", **up), [unit(4 * f, k3, "decoder"),
                                                unit(4 * f, k3, "decoder")]),
            (unit(4 * f, k3, "last", **up), [unit(2 * f, k3, "last"), unit(2 * f, k3, "last")]),
        ]
        self.logits = ModalityConv(self.n_class, 1, rank=3, use_bias=True,
                                   shared=sch.conv_shared("last"), modalities=modalities,
                                   seed=seeds(), name="logits",
                                   depth_first=self.depth_first)

    def call(self, x, modalities=MODALITIES, training=None):
        kw = dict(modalities=modalities, training=training)
        if self.depth_first:
            x = tf.transpose(x, [0, 3, 1, 2, 4])
        skips = []
        for level, units in enumerate(self.enc):
            for u in units:
                x = u(x, **kw)
            if level < len(self.enc) - 1:
                skips.append(x)
                x = max_pool_3d(x)
        for (upconv, units), skip in zip(self.dec, reversed(skips)):
            x = tf.concat([upconv(x, **kw), skip], axis=-1)
            for u in units:
                x = u(x, **kw)
        logits = self.logits(x, modalities=modalities)
        return tf.transpose(logits, [0, 2, 3, 1, 4]) if self.depth_first else logits

    def build_for(self, patch=(8, 8, 8)):
        m = len(self.modalities)
        self(tf.zeros([m, *patch, 1]), modalities=self.modalities, training=False)
        return self

    def get_config(self):
        return dict(n_class=self.n_class, feature_base=self.feature_base, scheme=self.scheme,
                    modalities=list(self.modalities), seed=self.seed, sync_bn=self.sync_bn,
                    name=self.name)


def build_model(config: dict) -> UNet3D:
    model = UNet3D(n_class=config["N_CLASS"], feature_base=config["FEATURE_BASE"],
                   scheme=config["SCHEME"], seed=config["SEED"],
                   sync_bn=config["SYNC_BN"], name="ummkd_3d")
    return model.build_for((DOWNSAMPLING, DOWNSAMPLING, DOWNSAMPLING))
