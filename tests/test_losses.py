"""Losses on tiny tensors with values worked out by hand, and a numpy reference for KD."""
import math

import numpy as np
import pytest
import tensorflow as tf

from lib import losses

LABELS_2x2 = np.array([[[0, 0], [0, 1]]])  # [B=1, H=2, W=2]: three background, one class-1


def onehot(labels, c=2):
    return tf.one_hot(labels, c, dtype=tf.float32)


@pytest.mark.parametrize("probs, expected", [
    (onehot(LABELS_2x2), -1.0),       # perfect: Dice 1 for both classes
    (onehot(1 - LABELS_2x2), 0.0),    # disjoint: Dice 0 for both classes
    # uniform 0.5: class 0: 2*1.5/(4*0.25 + 3) = 0.75; class 1: 2*0.5/(1 + 1) = 0.5
    (tf.fill([1, 2, 2, 2], 0.5), -(0.75 + 0.5) / 2),
])
def test_dice_loss_by_hand(probs, expected):
    assert float(losses.dice_loss(probs, onehot(LABELS_2x2))) == pytest.approx(expected, abs=1e-6)


def test_dice_works_for_3d_shapes():
    y = onehot(np.zeros([1, 2, 2, 2], np.int64))  # [B, H, W, D, C], background only
    per_class = losses.dice_per_class(y, y).numpy()
    assert per_class == pytest.approx([1.0, 0.0], abs=1e-6)  # absent class: 0 / eps


def test_class_weights_by_hand():
    # counts [3, 1] of 4 pixels -> w = [1 - 3/4, 1 - 1/4]
    assert losses.class_weights(onehot(LABELS_2x2)).numpy() == pytest.approx([0.25, 0.75])


def test_weighted_cross_entropy_by_hand():
    probs = tf.fill([1, 2, 2, 2], 0.5)
    expected = (3 * 0.25 + 1 * 0.75) * math.log(2) / 4  # mean over the 4 pixels
    got = float(losses.weighted_cross_entropy(probs, onehot(LABELS_2x2)))
    assert got == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_clips_probabilities():
    probs = onehot(1 - LABELS_2x2)  # all wrong: p of the true class is 0 -> clipped to 0.005
    expected = (3 * 0.25 + 0.75) * -math.log(0.005) / 4
    assert float(losses.weighted_cross_entropy(probs, onehot(LABELS_2x2))) == pytest.approx(
        expected, rel=1e-6)


def test_kd_by_hand():
    # One pixel per class. MR logits [2, 0] on class 0 and [0, 2] on class 1; CT logits 0.
    labels = np.array([[[0, 1]]])
    mr = tf.constant([[[[2.0, 0.0], [0.0, 2.0]]]])
    ct = tf.zeros([1, 1, 2, 2])
    z = 2.0 / (1 + 1e-6) / 2.0                      # mean logit / T
    p = math.exp(z) / (math.exp(z) + 1.0)           # softmax([z, 0])[0]
    kl_mr_ct = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    kl_ct_mr = 0.5 * math.log(0.5 / p) + 0.5 * math.log(0.5 / (1 - p))
    expected = (kl_mr_ct + kl_ct_mr) / 2            # the same for both classes
    got = float(losses.kd_loss(mr, onehot(labels), ct, onehot(labels), 2.0))
    assert got == pytest.approx(expected, rel=1e-5)



def test_kd_classes_present_skips_a_class_missing_from_one_batch():
    # Three classes, two pixels per image. MR has classes 0 and 1, CT classes 0 and 2.
    # MR logits: class-0 pixel [2, 0, 0], class-1 pixel [0, 2, 0]; CT logits all 0.
    mr_labels, ct_labels = np.array([[[0, 1]]]), np.array([[[0, 2]]])
    mr = tf.constant([[[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]]])
    ct = tf.zeros([1, 1, 2, 3])
    z = 2.0 / (1 + 1e-6) / 2.0  # MR's class-0 and class-1 mean logit (one pixel), over T

    def sym_kl(p):  # against CT's uniform distribution (its logits are 0)
        u = np.full(3, 1 / 3)
        return (np.sum(p * np.log(p / u)) + np.sum(u * np.log(u / p))) / 2

    peaked = np.exp([z, 0, 0]) / np.exp([z, 0, 0]).sum()
    # Class 0 in both; class 1 only in MR (CT's mean is 0: uniform); class 2 only in CT
    # (MR's mean is 0: uniform, like CT's logits, so 0). "all" averages the three.
    expected_all = (sym_kl(peaked) + sym_kl(peaked[[1, 0, 2]]) + 0.0) / 3
    expected_present = sym_kl(peaked)  # class 0 only
    args = (mr, onehot(mr_labels, 3), ct, onehot(ct_labels, 3), 2.0)
    assert float(losses.kd_loss(*args)) == pytest.approx(expected_all, rel=1e-5)
    assert float(losses.kd_loss(*args, classes="present")) == pytest.approx(
        expected_present, rel=1e-5)
    # No class in both batches: no term at all.
    none = losses.kd_loss(mr, onehot(mr_labels, 3), ct, onehot(np.array([[[2, 2]]]), 3), 2.0,
                          classes="present")
    assert float(none) == 0.0
    with pytest.raises(ValueError, match="KD_CLASSES"):
        losses.kd_loss(*args, classes="some")

def numpy_kd(la, ya, lb, yb, c, t):
    def soft(logits, labels):
        out = []
        for k in range(c):
            mask = labels == k
            z = logits[mask].sum(0) / (mask.sum() + 1e-6) / t
            e = np.exp(z - z.max())
            out.append(e / e.sum())
        return np.array(out)
    qa, qb = soft(la, ya), soft(lb, yb)
    kl = lambda p, q: (p * np.log(p / q)).sum(-1)
    return np.mean((kl(qa, qb) + kl(qb, qa)) / 2)


@pytest.mark.parametrize("shape", [(2, 4, 4), (1, 4, 4, 3)])  # 2D and 3D batches
def test_kd_matches_numpy_reference_and_is_symmetric(shape):
    rng = np.random.default_rng(0)
    c = 4
    la, lb = rng.normal(size=shape + (c,)) * 3, rng.normal(size=shape + (c,))
    ya, yb = rng.integers(0, c, shape), rng.integers(0, c, shape)
    ab = float(losses.kd_loss(tf.constant(la, tf.float32), onehot(ya, c),
                              tf.constant(lb, tf.float32), onehot(yb, c), 2.0))
    ba = float(losses.kd_loss(tf.constant(lb, tf.float32), onehot(yb, c),
                              tf.constant(la, tf.float32), onehot(ya, c), 2.0))
    assert ab == pytest.approx(numpy_kd(la, ya, lb, yb, c, 2.0), rel=1e-4)
    assert ab == pytest.approx(ba, rel=1e-6)
    assert ab > 0
    same = float(losses.kd_loss(tf.constant(la, tf.float32), onehot(ya, c),
                                tf.constant(la, tf.float32), onehot(ya, c), 2.0))
    assert same == pytest.approx(0.0, abs=1e-7)


def test_kd_gradients_reach_both_modalities():
    rng = np.random.default_rng(1)
    la = tf.Variable(rng.normal(size=(1, 3, 3, 3)), dtype=tf.float32)
    lb = tf.Variable(rng.normal(size=(1, 3, 3, 3)), dtype=tf.float32)
    y = onehot(rng.integers(0, 3, (1, 3, 3)), 3)
    with tf.GradientTape() as tape:
        kd = losses.kd_loss(la, y, lb, y, 2.0)
    ga, gb = tape.gradient(kd, [la, lb])
    assert float(tf.reduce_sum(tf.abs(ga))) > 0 and float(tf.reduce_sum(tf.abs(gb))) > 0


def test_l2_penalty_by_hand():
    assert float(losses.l2_penalty([tf.ones([3, 3, 1, 1]), 2 * tf.ones([2])])) == pytest.approx(
        9 / 2 + 8 / 2)


def test_total_loss_combines_terms_with_weights():
    y = {"mr": LABELS_2x2, "ct": 1 - LABELS_2x2}
    logits = {"mr": tf.zeros([1, 2, 2, 2]), "ct": tf.zeros([1, 2, 2, 2])}
    kernels = [tf.ones([1, 1, 1, 2])]
    total, t = losses.total_loss(logits, y, kernels, n_class=2, miu_dice=2.0, miu_ce=3.0,
                                 miu_kd=0.5, miu_l2=0.1, temperature=2.0)
    expected = (2.0 * (t["mr_dice"] + t["ct_dice"]) + 3.0 * (t["mr_ce"] + t["ct_ce"])
                + 0.5 * t["kd"] + 0.1 * 1.0)
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    assert float(t["mr_dice"]) == pytest.approx(-(0.75 + 0.5) / 2, abs=1e-6)
    assert float(t["kd"]) == pytest.approx(0.0, abs=1e-7)  # equal logits everywhere
    # hard batch Dice of an all-background prediction: 2*3/(4+3) for class 0, 0 for class 1
    assert t["mr_batch_dice"].numpy() == pytest.approx([6 / 7, 0.0], abs=1e-6)


def test_losses_are_float32_for_bfloat16_logits():
    logits = {"mr": tf.zeros([1, 2, 2, 2], tf.bfloat16), "ct": tf.zeros([1, 2, 2, 2], tf.bfloat16)}
    total, _ = losses.total_loss(logits, {"mr": LABELS_2x2, "ct": LABELS_2x2}, [], n_class=2)
    assert total.dtype == tf.float32
