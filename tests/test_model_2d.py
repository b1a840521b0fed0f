"""The 2D network and the modality layers: shapes, sharing, BN statistics, configs."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from lib.layers import ConvUnit, ModalityBatchNorm, ModalityConv, bn_layers, conv_kernels
from conftest import show_dropout
from model_2d import DilatedResNet2D, ResidualBlock


def n_weights(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_output_shape(size):
    model = DilatedResNet2D(n_class=5, feature_base=2)
    y = model(tf.zeros([2, size, size, 3]), modalities=("mr", "ct"), training=False)
    assert y.shape == (2, size, size, 5)


def test_paper_size_parameter_count():
    model = DilatedResNet2D(n_class=5, feature_base=16).build_for(16)
    # Hand count of conv weights (see model_2d docstring): 39,297,456 3x3 kernels plus the
    # 5x5 output conv 40*5*25 = 5,000.
    assert n_weights(conv_kernels(model)) == 39_302_456
    gammas = [layer.gamma for layer in bn_layers(model)]  # [2 modalities, channels] each
    assert n_weights(gammas) == 20_192  # = 2 * 10,096: scale + shift per channel, per modality


def test_adding_a_modality_adds_only_bn_variables():
    joint = DilatedResNet2D(n_class=3, feature_base=2, scheme="joint").build_for(16)
    sep = DilatedResNet2D(n_class=3, feature_base=2, scheme="separate_bn").build_for(16)
    assert n_weights(conv_kernels(joint)) == n_weights(conv_kernels(sep))
    extra = n_weights(sep.variables) - n_weights(joint.variables)
    bn_joint = sum(n_weights(l.variables) for l in bn_layers(joint))
    assert extra == bn_joint  # exactly one more copy of every BN variable
    def non_bn_shapes(m):
        bn_ids = {id(v) for layer in bn_layers(m) for v in layer.variables}
        return sorted(tuple(v.shape) for v in m.variables if id(v) not in bn_ids)
    assert non_bn_shapes(joint) == non_bn_shapes(sep)


def test_individual_doubles_conv_weights():
    joint = DilatedResNet2D(n_class=3, feature_base=2, scheme="joint").build_for(16)
    ind = DilatedResNet2D(n_class=3, feature_base=2, scheme="individual").build_for(16)
    assert n_weights(conv_kernels(ind)) == 2 * n_weights(conv_kernels(joint))


def test_each_modality_bn_moves_only_its_own_statistics():
    bn = ModalityBatchNorm()  # rows: 0 = mr, 1 = ct
    x = tf.constant(np.random.default_rng(0).normal(3.0, 2.0, (4, 2, 2, 3)), tf.float32)
    bn(x, modalities=("ct",), training=False)  # build
    bn(x, modalities=("ct",), training=True)
    moving = bn.moving_mean.numpy()
    np.testing.assert_array_equal(moving[0], 0.0)  # MR untouched
    # momentum 0.9: new mean = 0.9 * 0 + 0.1 * batch mean
    assert moving[1] == pytest.approx(0.1 * x.numpy().mean(axis=(0, 1, 2)), rel=1e-5)


def test_fused_bn_normalises_each_modality_with_its_own_statistics():
    rng = np.random.default_rng(3)
    xm, xc = rng.normal(0, 1, (2, 3, 3, 4)), rng.normal(5, 3, (2, 3, 3, 4))
    bn = ModalityBatchNorm(epsilon=1e-3)
    bn.build((4, 3, 3, 4))
    gamma = np.array([[1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5]], np.float32)
    beta = np.array([[0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    y = bn(tf.constant(np.concatenate([xm, xc]), tf.float32), training=True).numpy()
    for k, part in enumerate((xm, xc)):
        mean, var = part.mean((0, 1, 2)), part.var((0, 1, 2))
        ref = (part - mean) / np.sqrt(var + 1e-3) * gamma[k] + beta[k]
        np.testing.assert_allclose(y[2 * k:2 * k + 2], ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy()[k], 0.9 + 0.1 * var, rtol=1e-5)
    # inference uses the moving statistics of the requested modality only
    z = bn(tf.constant(xc, tf.float32), modalities=("ct",), training=False).numpy()
    mm, mv = bn.moving_mean.numpy()[1], bn.moving_variance.numpy()[1]
    np.testing.assert_allclose(z, (xc - mm) / np.sqrt(mv + 1e-3) * gamma[1] + beta[1],
                               rtol=1e-4, atol=1e-5)


def test_fused_batch_equals_separate_passes():
    rng = np.random.default_rng(1)
    model = DilatedResNet2D(n_class=3, feature_base=2, dropout=0.0)
    xm = tf.constant(rng.normal(size=(2, 16, 16, 3)), tf.float32)
    xc = tf.constant(rng.normal(2.0, 3.0, size=(2, 16, 16, 3)), tf.float32)
    fused = model(tf.concat([xm, xc], 0), modalities=("mr", "ct"), training=True)
    ym = model(xm, modalities=("mr",), training=True)
    yc = model(xc, modalities=("ct",), training=True)
    np.testing.assert_allclose(fused.numpy(), np.concatenate([ym, yc]), rtol=1e-4, atol=1e-5)


def test_zero_padded_shortcut():
    block = ResidualBlock(4, dropout=0.0)
    x = tf.random.normal([1, 4, 4, 2])
    block(x, modalities=("mr",), training=False)
    for unit in (block.unit1, block.unit2):  # zero kernels: the block is its shortcut
        for layer in unit.conv.branches.values():
            layer.kernel.assign(tf.zeros_like(layer.kernel))
    y = block(x, modalities=("mr",), training=False).numpy()
    np.testing.assert_array_equal(y[..., 0], 0)
    np.testing.assert_array_equal(y[..., 3], 0)
    np.testing.assert_allclose(y[..., 1:3], x.numpy())


@pytest.mark.parametrize("layer", [
    ModalityBatchNorm(momentum=0.8, shared=True),
    ModalityConv(4, (3, 3, 1), rank=3, shared=False, use_bias=True),
    ConvUnit(4, 3, rank=2, dilation_rate=2, dropout=0.1, bn_shared=True),
    ResidualBlock(8, dilation_rate=2, dropout=0.0),
])
def test_layers_round_trip_get_config(layer):
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_model_round_trips_get_config():
    model = DilatedResNet2D(n_class=3, feature_base=2, scheme="individual")
    clone = DilatedResNet2D.from_config(model.get_config())
    assert clone.get_config() == model.get_config()


@pytest.mark.parametrize("scheme", ["ummkd", "individual"])
def test_seeded_model_gives_every_kernel_its_own_start(scheme):
    """Keras initializers with one integer seed repeat their numbers: each kernel (and each
    modality's own kernel) must get a seed of its own, and the same SEED the same model."""
    def kernels(seed):
        model = DilatedResNet2D(n_class=3, feature_base=2, scheme=scheme, seed=seed)
        model.build_for(16)
        return [k.numpy() for k in conv_kernels(model)]

    first, again = kernels(0), kernels(0)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    same_shape = [(a, b) for i, a in enumerate(first) for b in first[:i] if a.shape == b.shape]
    assert len(same_shape) > 10
    assert not any(np.array_equal(a, b) for a, b in same_shape)
    assert not np.array_equal(first[0], kernels(1)[0])
    # every dropout layer draws its own stream (one seed for all gave every layer one mask)
    model = DilatedResNet2D(n_class=3, feature_base=2, scheme=scheme, seed=0)
    model.build_for(16)
    states = [tuple(v.numpy().tolist()) for v in model.non_trainable_variables
              if "seed_generator" in v.path]
    assert len(states) == 30 and len(set(states)) == 30


def test_dropout_masks_differ_between_layers():
    """The two units of a seeded residual block drop different elements (with one seed for
    both they dropped the same). Between replicas: tests/test_distribute.py."""
    x = tf.ones([2, 8, 8, 4])
    block = ResidualBlock(4, seed=0)
    block.build(x.shape)
    units = [block.unit1, block.unit2]
    for unit in units:
        show_dropout(unit)
    kept = [unit(x, training=True).numpy() != 0 for unit in units]
    assert 0.6 < kept[0].mean() < 0.9 and not np.array_equal(kept[0], kept[1])
