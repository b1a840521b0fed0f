"""Losses of UMMKD, written once for 2D and 3D.

Logits are [B, *spatial, C] (2D: [B, H, W, C]; 3D: [B, H, W, D, C]); labels are integer
class ids [B, *spatial]. Every sum runs over the whole batch and all spatial positions, as
in the paper's code, so Dice and the class weights are statistics of the batch, not means
of per-image values. All losses are computed in float32, whatever the compute precision.

The Dice core ``dice_per_class`` is shared with the batch Dice metric that training logs:
with one-hot predictions p**2 == p, so the same formula gives the hard Dice.

Under tf.distribute each replica holds part of the batch. Every ratio is taken of sums that
have gone through ``global_sum`` (lib/distribute.py: all-reduced across replicas, gradient
of the replica's own part), so R replicas with B/R examples each compute the loss of the
whole batch of B, and their gradients add up to its gradient. On one device ``global_sum``
is the identity: the same code.
"""
from __future__ import annotations

import tensorflow as tf

from lib.config import ConfigError
from lib.distribute import global_sum, replicated
from lib.settings import CHOICES

DICE_EPS = 1e-7
CE_CLIP = 0.005
KD_COUNT_EPS = 1e-6
KD_CLASSES = CHOICES["KD_CLASSES"]  # which classes the KD term averages over (kd_loss)


def _spatial_axes(x):
    """All axes but the last: batch and spatial positions."""
    return list(range(x.shape.rank - 1))


def dice_per_class(probs, onehot, square_probs: bool = True):
    """[C] Dice per class: 2 sum(p y) / (sum(p^2) + sum(y) + eps), sums over batch and space.

    The three [C] sums are all-reduced together (one collective) across replicas.
    """
    axes = _spatial_axes(probs)
    sums = global_sum(tf.stack([
        tf.reduce_sum(probs * onehot, axes),
        tf.reduce_sum(tf.square(probs) if square_probs else probs, axes),
        tf.reduce_sum(onehot, axes)]))  # [3, C]: intersection, sum(p^2), sum(y)
    return 2.0 * sums[0] / (sums[1] + sums[2] + DICE_EPS)


def dice_loss(probs, onehot):
    """-(1/C) sum_c Dice_c, background included, p squared in the denominator. Range [-1, 0]."""
    return -tf.reduce_mean(dice_per_class(probs, onehot, square_probs=True))


def class_weights(onehot):
    """[C] w_c = 1 - sum(y_c) / sum(y): rarer classes weigh more; from the current batch."""
    counts = global_sum(tf.reduce_sum(onehot, _spatial_axes(onehot)))
    return 1.0 - counts / tf.reduce_sum(counts)


def weighted_cross_entropy(probs, onehot):
    """Mean over pixels of sum_c -w_c y_c log(clip(p_c, 0.005, 1)).

    The mean is (sum over the batch's pixels) / (its pixel count), both all-reduced.
    """
    w = class_weights(onehot)
    log_p = tf.math.log(tf.clip_by_value(probs, CE_CLIP, 1.0))
    per_pixel = tf.reduce_sum(-w * onehot * log_p, axis=-1)
    pixels = tf.cast(tf.size(per_pixel), tf.float32)
    total = global_sum(tf.stack([tf.reduce_sum(per_pixel), pixels]))  # [sum, count]
    return total[0] / total[1]


def class_mean_logits(logits, onehot):
    """([C, C], [C]): row c is the mean logit vector over the pixels whose ground truth is
    c; and the pixel count of each class (both over the global batch)."""
    axes = _spatial_axes(logits)
    flat_logits = tf.reshape(logits, [-1, logits.shape[-1]])
    flat_onehot = tf.reshape(onehot, [-1, onehot.shape[-1]])
    sums = tf.matmul(flat_onehot, flat_logits, transpose_a=True)  # [C(gt), C(logit)]
    counts = tf.reduce_sum(onehot, axes)[:, None]
    # One collective for both: [C, C + 1], the last column the counts.
    both = global_sum(tf.concat([sums, counts], axis=1))
    return both[:, :-1] / (both[:, -1:] + KD_COUNT_EPS), both[:, -1]


def check_kd_classes(classes: str) -> None:
    """A one-line ConfigError (a ValueError) unless ``classes`` is one of KD_CLASSES."""
    if classes not in KD_CLASSES:
        raise ConfigError(f"KD_CLASSES: expected one of {', '.join(KD_CLASSES)}, "
                          f"got {classes!r}")


def kd_loss(logits_a, onehot_a, logits_b, onehot_b, temperature: float = 2.0,
            classes: str = "all"):
    """Symmetric KL between the class-wise soft predictions of two modalities.

    For each class c: q_c(m) = softmax(z_c(m) / T), z_c(m) the mean logits of modality m over
    its pixels of class c; loss_c = (KL(q_c(a)||q_c(b)) + KL(q_c(b)||q_c(a))) / 2.
    ``classes="all"`` (the paper): the mean of loss_c over every class. A class absent from
    one modality's batch then has z_c = 0 there, a uniform distribution, so the term pulls
    the other modality's prediction for that class towards uniform. ``classes="present"``:
    the mean over the classes present in both batches (0 if there is none). Gradients flow
    into both modalities.
    """
    check_kd_classes(classes)
    mean_a, count_a = class_mean_logits(logits_a, onehot_a)
    mean_b, count_b = class_mean_logits(logits_b, onehot_b)
    log_qa = tf.nn.log_softmax(mean_a / temperature, axis=-1)
    log_qb = tf.nn.log_softmax(mean_b / temperature, axis=-1)
    qa, qb = tf.exp(log_qa), tf.exp(log_qb)
    kl_ab = tf.reduce_sum(qa * (log_qa - log_qb), axis=-1)
    kl_ba = tf.reduce_sum(qb * (log_qb - log_qa), axis=-1)
    per_class = (kl_ab + kl_ba) / 2.0
    if classes == "all":
        return tf.reduce_mean(per_class)
    present = tf.cast((count_a > 0) & (count_b > 0), per_class.dtype)
    return tf.reduce_sum(per_class * present) / tf.maximum(tf.reduce_sum(present), 1.0)


def l2_penalty(kernels):
    """sum over kernels of sum(w^2)/2 (convolution kernels only, never BN parameters).

    Every replica holds the same kernels, so this is the full penalty on each of them;
    total_loss passes it through ``replicated`` so the summed gradient counts it once.
    """
    return tf.add_n([tf.nn.l2_loss(tf.cast(k, tf.float32)) for k in kernels])


def segmentation_terms(logits, labels, n_class: int):
    """Per-modality terms: dict with probs, onehot, dice (loss), ce and per-class batch Dice."""
    logits = tf.cast(logits, tf.float32)
    onehot = tf.one_hot(labels, n_class, dtype=tf.float32)
    probs = tf.nn.softmax(logits, axis=-1)
    hard = tf.one_hot(tf.argmax(logits, axis=-1), n_class, dtype=tf.float32)
    return {"logits": logits, "onehot": onehot, "dice": dice_loss(probs, onehot),
            "ce": weighted_cross_entropy(probs, onehot),
            "batch_dice": dice_per_class(hard, onehot, square_probs=False)}


def total_loss(logits_by_modality: dict, labels_by_modality: dict, kernels, *, n_class: int,
               miu_dice: float = 1.0, miu_ce: float = 1.0, miu_kd: float = 0.5,
               miu_l2: float = 1e-4, temperature: float = 2.0, kd_classes: str = "all"):
    """The UMMKD objective and its terms.

    Total = miu_dice * sum_m dice_m + miu_ce * sum_m ce_m + miu_kd * KD + miu_l2 * L2, with
    KD between the first two modalities (mr, ct), over ``kd_classes`` (see kd_loss). Returns
    (total, terms) where terms maps "<modality>_dice", "<modality>_ce",
    "<modality>_batch_dice" ([C]), "kd", "l2".
    """
    terms, per = {}, {}
    for m, logits in logits_by_modality.items():
        per[m] = segmentation_terms(logits, labels_by_modality[m], n_class)
        terms[f"{m}_dice"] = per[m]["dice"]
        terms[f"{m}_ce"] = per[m]["ce"]
        terms[f"{m}_batch_dice"] = per[m]["batch_dice"]
    total = tf.add_n([miu_dice * per[m]["dice"] + miu_ce * per[m]["ce"] for m in per])
    mods = list(per)
    if miu_kd > 0 and len(mods) >= 2:
        a, b = per[mods[0]], per[mods[1]]
        terms["kd"] = kd_loss(a["logits"], a["onehot"], b["logits"], b["onehot"], temperature,
                             kd_classes)
        total += miu_kd * terms["kd"]
    else:
        terms["kd"] = tf.constant(0.0)
    terms["l2"] = replicated(l2_penalty(kernels)) if kernels else tf.constant(0.0)
    total += miu_l2 * terms["l2"]
    terms["total"] = total
    return total, terms
