"""On-the-fly data augmentation of 2D training slices, for tf.data ``map``.

Real scanners differ from patient to patient in intensity (gain, contrast, a smooth MR bias
field, noise, sharpness) and patients in pose and size; the transforms below cover both,
after nnU-Net's (Isensee et al. 2021) augmentation and in its order: spatial (rotation,
scaling, shift, optional elastic deformation) on image and label alike, then the image
alone: bias field, noise, blur, brightness, contrast, gamma.

Every transform has a probability and a range, ``(p, low, high)``: with probability p a
value is drawn uniformly in [low, high] (the AUG_* settings of main_combine.py):

==============  =====================================================================
rotate          angle in degrees, about the slice centre
scale           zoom factor (> 1 enlarges the anatomy)
shift           translation as a fraction of the slice's height / width (each axis)
elastic         largest displacement in pixels of a smooth random field (4 x 4 control
                points, bilinear in between)
bias_field      amplitude a of a smooth multiplicative field exp(a f), f in [-1, 1] from
                4 x 4 control points; applied above the slice's minimum
noise           standard deviation of added Gaussian noise (z-score units)
blur            Gaussian sigma in pixels (separable, mirrored edges)
brightness      intensity multiplier
contrast        factor about the slice's mean, clipped to its former range
gamma           exponent on the intensities rescaled to [0, 1]; mean and std kept
==============  =====================================================================

Geometry: a point (y, x) of the input lands at c + t + zoom R(angle) ((y, x) - c) of the
output, c the slice centre ((H - 1) / 2, (W - 1) / 2), t the shift in pixels,
R(a) = [[cos a, -sin a], [sin a, cos a]]; each output pixel samples the input at the
inverse of that point (plus the elastic displacement): bilinearly for the image (outside:
the slice's minimum, "air"), by nearest neighbour for the label (outside: 0).

Every draw is a pure function of the call's seed (int32/int64 [2]): lib.data derives one
from (SEED, k) for the k-th training slice, so a run resumed at any step repeats the
augmentation of an uninterrupted one, whatever the order in which tf.data runs the calls.
"""
from __future__ import annotations

import math

import tensorflow as tf

# name -> (probability, low, high): the order is the order of application
TRANSFORMS = ("rotate", "scale", "shift", "elastic", "bias_field", "noise", "blur",
              "brightness", "contrast", "gamma")
SPATIAL = TRANSFORMS[:4]
IDENTITY = {"rotate": 0.0, "scale": 1.0, "shift": 0.0, "elastic": 0.0, "bias_field": 0.0,
            "noise": 0.0, "blur": 0.0, "brightness": 1.0, "contrast": 1.0, "gamma": 1.0}
CONTROL_POINTS = 4  # per side, of the elastic and bias fields


def settings_of(config: dict) -> dict:
    """{transform: (p, low, high)} from the AUG_<TRANSFORM> settings of ``config``."""
    return {name: tuple(float(v) for v in config[f"AUG_{name.upper()}"])
            for name in TRANSFORMS}


def draw(params: dict, seed) -> dict:
    """The values of one call: {transform: scalar float32 tensor}, the identity value
    (IDENTITY) where the transform is not applied; for "shift" a [2] tensor (y, x
    fractions), for "elastic" and "bias_field" also "<name>_field": the [G, G(, 2)] control
    values in [-1, 1]."""
    seed = tf.cast(seed, tf.int64)
    n = len(TRANSFORMS)
    gate = tf.random.stateless_uniform([n], seed=seed)
    value = tf.random.stateless_uniform([n + 1], seed=tf.random.experimental.stateless_fold_in(
        seed, 1))
    out = {}
    for i, name in enumerate(TRANSFORMS):
        p, lo, hi = params[name]
        on = gate[i] < p
        v = lo + value[i] * (hi - lo)
        if name == "shift":
            v = lo + tf.stack([value[i], value[n]]) * (hi - lo)
            out[name] = tf.where(on, v, tf.zeros([2]))
        else:
            out[name] = tf.where(on, v, IDENTITY[name])
    g = CONTROL_POINTS
    fields = tf.random.experimental.stateless_fold_in(seed, 2)
    out["elastic_field"] = tf.random.stateless_uniform([g, g, 2], seed=fields, minval=-1.0,
                                                       maxval=1.0)
    out["bias_field_field"] = tf.random.stateless_uniform(
        [g, g], seed=tf.random.experimental.stateless_fold_in(seed, 3), minval=-1.0,
        maxval=1.0)
    out["noise_seed"] = tf.random.experimental.stateless_fold_in(seed, 4)
    return out


def source_coordinates(drawn: dict, size) -> tf.Tensor:
    """[H, W, 2] input (y, x) sampled by every output pixel: the inverse of the spatial
    transform (module docstring) plus the elastic displacement."""
    size = tf.convert_to_tensor(size, tf.int32)
    hf, wf = tf.cast(size[0], tf.float32), tf.cast(size[1], tf.float32)
    yy, xx = tf.meshgrid(tf.range(hf), tf.range(wf), indexing="ij")
    cy, cx = (hf - 1.0) * 0.5, (wf - 1.0) * 0.5
    angle = drawn["rotate"] * (math.pi / 180.0)
    zoom = drawn["scale"]
    qy = yy - cy - drawn["shift"][0] * hf
    qx = xx - cx - drawn["shift"][1] * wf
    cos, sin = tf.cos(angle), tf.sin(angle)
    # R(-angle) (q - c - t) / zoom
    py = (cos * qy + sin * qx) / zoom + cy
    px = (-sin * qy + cos * qx) / zoom + cx
    coords = tf.stack([py, px], axis=-1)
    field = smooth_field(drawn["elastic_field"], size)
    return coords + drawn["elastic"] * field


def smooth_field(control, size) -> tf.Tensor:
    """Control values [G, G(, K)] -> [H, W(, K)] by bilinear interpolation with the corners
    on the slice's corner pixels."""
    flat = control.shape.rank == 2
    c = control[:, :, None] if flat else control
    out = tf.image.resize(c[None], size, method="bilinear", antialias=False)[0]
    return out[:, :, 0] if flat else out


def sample(image, coords, order: int, fill) -> tf.Tensor:
    """image [H, W, C] at coords [H', W', 2] (y, x): bilinear (order 1) or nearest (order
    0); points outside the image take ``fill``. Identity coordinates return the image
    exactly."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    fill = tf.cast(fill, image.dtype)
    padded = tf.pad(image, [[1, 1], [1, 1], [0, 0]], constant_values=fill)
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    y = tf.clip_by_value(coords[..., 0], -1.0, hf)
    x = tf.clip_by_value(coords[..., 1], -1.0, wf)
    if order == 0:
        iy = tf.cast(tf.round(y), tf.int32) + 1
        ix = tf.cast(tf.round(x), tf.int32) + 1
        return tf.gather_nd(padded, tf.stack([iy, ix], -1))
    y0, x0 = tf.floor(y), tf.floor(x)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    iy0 = tf.cast(y0, tf.int32) + 1
    ix0 = tf.cast(x0, tf.int32) + 1
    iy1 = tf.minimum(iy0 + 1, h + 1)
    ix1 = tf.minimum(ix0 + 1, w + 1)
    at = lambda a, b: tf.gather_nd(padded, tf.stack([a, b], -1))
    top = at(iy0, ix0) * (1.0 - wx) + at(iy0, ix1) * wx
    bottom = at(iy1, ix0) * (1.0 - wx) + at(iy1, ix1) * wx
    return top * (1.0 - wy) + bottom * wy


def _blur(image, sigma, radius: int):
    """Separable Gaussian blur of [H, W, C] with mirrored edges; sigma 0 is the identity."""
    if radius == 0:
        return image
    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(t / tf.maximum(sigma, 1e-6)))
    k = k / tf.reduce_sum(k)
    c = tf.shape(image)[-1]
    x = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "SYMMETRIC")
    ky = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, c, 1])
    kx = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, c, 1])
    x = tf.nn.depthwise_conv2d(x, ky, [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, kx, [1, 1, 1, 1], "VALID")
    return tf.where(sigma > 0, x[0], image)


def intensity(image, drawn: dict, blur_radius: int) -> tf.Tensor:
    """The image-only transforms of one draw on [H, W, C] float32 (C adjacent slices alike)."""
    lo = tf.reduce_min(image)
    bias = tf.exp(drawn["bias_field"] * smooth_field(drawn["bias_field_field"],
                                                      tf.shape(image)[:2]))
    x = tf.where(drawn["bias_field"] != 0.0, lo + (image - lo) * bias[:, :, None], image)
    x = x + drawn["noise"] * tf.random.stateless_normal(tf.shape(x), seed=drawn["noise_seed"])
    x = _blur(x, drawn["blur"], blur_radius)
    x = x * drawn["brightness"]
    mean, x_lo, x_hi = tf.reduce_mean(x), tf.reduce_min(x), tf.reduce_max(x)
    x = tf.where(drawn["contrast"] != 1.0,
                 tf.clip_by_value((x - mean) * drawn["contrast"] + mean, x_lo, x_hi), x)
    return gamma(x, drawn["gamma"])


def gamma(x, g) -> tf.Tensor:
    """x rescaled to [0, 1] over its range, raised to ``g``, mapped back to the range, then
    given its former mean and standard deviation; g = 1 is the identity."""
    mean, std = tf.reduce_mean(x), tf.math.reduce_std(x)
    lo, hi = tf.reduce_min(x), tf.reduce_max(x)
    rng = tf.maximum(hi - lo, 1e-6)
    y = tf.pow((x - lo) / rng, g) * rng + lo
    y_mean, y_std = tf.reduce_mean(y), tf.math.reduce_std(y)
    y = (y - y_mean) / tf.maximum(y_std, 1e-6) * std + mean
    return tf.where(g != 1.0, y, x)


def make_augment(params: dict):
    """``augment(image [H, W, C] float32, label [H, W] or [H, W, C'] int, seed int [2]) ->
    (image, label)``: one draw of every transform of ``params`` ({transform: (p, low,
    high)}, module docstring; lib.config.validate checks the settings), the spatial ones
    applied to image and label alike."""
    spatial = any(params[name][0] > 0 for name in SPATIAL)
    blur_radius = int(math.ceil(3.0 * params["blur"][2])) if params["blur"][0] > 0 else 0

    def augment(image, label, seed):
        image = tf.convert_to_tensor(image, tf.float32)
        label = tf.convert_to_tensor(label)
        drawn = draw(params, seed)
        out_image, out_label = image, label
        if spatial:
            coords = source_coordinates(drawn, tf.shape(image)[:2])
            out_image = sample(image, coords, 1, tf.reduce_min(image))
            lab = label[:, :, None] if label.shape.rank == 2 else label
            lab = sample(lab, coords, 0, tf.zeros([], lab.dtype))
            out_label = lab[:, :, 0] if label.shape.rank == 2 else lab
        out_image = intensity(out_image, drawn, blur_radius)
        return tf.ensure_shape(out_image, image.shape), tf.ensure_shape(out_label, label.shape)

    return augment
