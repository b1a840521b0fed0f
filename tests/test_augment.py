"""lib/augment.py: the geometry lands where the docstring says, image and label stay aligned,
each transform is seeded and a resumed stream repeats it; the learning-rate schedules."""
import math

import numpy as np
import pytest
import tensorflow as tf

from lib import augment as aug
from lib import data

OFF = {name: (0.0, v, v) for name, v in aug.IDENTITY.items()}


def only(**on):
    """Every transform off except ``on`` ({name: (low, high)}), which is always applied."""
    return {**OFF, **{name: (1.0, lo, hi) for name, (lo, hi) in on.items()}}


def drawn_values(params, seed):
    return {k: v.numpy() for k, v in aug.draw(params, tf.constant(seed, tf.int64)).items()}


def test_identity_returns_image_and_label_exactly():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(9, 7, 3)).astype(np.float32)
    label = rng.integers(0, 4, (9, 7)).astype(np.int32)
    fn = aug.make_augment(OFF)
    out_image, out_label = fn(image, label, tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(out_image.numpy(), image)
    np.testing.assert_array_equal(out_label.numpy(), label)


@pytest.mark.parametrize("angle, zoom, shift", [
    (90.0, 1.0, (0.0, 0.0)),      # a quarter turn about the centre
    (0.0, 2.0, (0.0, 0.0)),       # doubled about the centre
    (0.0, 1.0, (0.25, -0.125)),   # 4 rows down, 2 columns left on 16 x 16
    (30.0, 1.2, (0.1, 0.05)),
])
def test_a_known_point_lands_where_the_transform_says(angle, zoom, shift):
    """A 1-pixel label at p lands at c + t + zoom R(angle) (p - c) (rounded); the
    coordinates every output pixel samples are that map's inverse."""
    size = 16
    c = (size - 1) / 2
    p = np.array([5.0, 9.0])
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    q = c + np.array(shift) * size + zoom * rot @ (p - c)
    drawn = drawn_values(OFF, [0, 0])
    drawn.update(rotate=np.float32(angle), scale=np.float32(zoom),
                 shift=np.array(shift, np.float32))
    coords = aug.source_coordinates({k: tf.constant(v) for k, v in drawn.items()},
                                    (size, size)).numpy()
    qi = np.round(q).astype(int)
    # the output pixel nearest q samples the input within half a pixel (/ zoom) of p
    assert np.linalg.norm(coords[qi[0], qi[1]] - p) <= 0.5 * math.sqrt(2) / zoom + 1e-5
    # and exactly: the inverse map at q is p
    inv = rot.T @ (q - c - np.array(shift) * size) / zoom + c
    np.testing.assert_allclose(inv, p, atol=1e-9)


def test_quarter_turn_of_a_label_by_hand():
    """4 x 4, 90 degrees: (y, x) -> (c + (x - c)... worked by hand: R(90) (dy, dx) =
    (-dx, dy), so the pixel (0, 3) (dy = -1.5, dx = 1.5) lands at (0, 0)."""
    label = np.zeros((4, 4), np.int32)
    label[0, 3] = 1
    label[1, 3] = 2
    drawn = {k: tf.constant(v) for k, v in drawn_values(OFF, [0, 0]).items()}
    drawn["rotate"] = tf.constant(90.0)
    coords = aug.source_coordinates(drawn, (4, 4))
    out = aug.sample(tf.constant(label[:, :, None]), coords, 0, 0).numpy()[:, :, 0]
    want = np.zeros((4, 4), np.int32)
    want[0, 0] = 1   # (0, 3): dy, dx = -1.5, 1.5 -> (-1.5, -1.5) -> (0, 0)
    want[0, 1] = 2   # (1, 3): dy, dx = -0.5, 1.5 -> (-1.5, -0.5) -> (0, 1)
    np.testing.assert_array_equal(out, want)


def test_spatial_transforms_keep_image_and_label_aligned():
    label = np.zeros((32, 32), np.int32)
    label[6:20, 8:26] = 1
    label[10:16, 12:18] = 2
    image = np.repeat(label[:, :, None].astype(np.float32), 3, axis=2)
    fn = aug.make_augment(only(rotate=(-30, 30), scale=(0.8, 1.3), shift=(-0.1, 0.1),
                               elastic=(0, 2)))
    for k in range(5):
        out_image, out_label = fn(image, label, tf.constant([3, k], tf.int64))
        out_image, out_label = out_image.numpy(), out_label.numpy()
        assert not np.array_equal(out_label, label)
        # bilinear image and nearest label through one map: rounding the image gives the
        # label away from the edges
        assert np.mean(np.rint(out_image[:, :, 1]) == out_label) > 0.95


def test_draws_are_seeded_and_gated_by_their_probability():
    params = only(brightness=(0.5, 2.0))
    a = aug.make_augment(params)
    image = np.full((8, 8, 3), 2.0, np.float32)
    label = np.zeros((8, 8), np.int32)
    x1 = a(image, label, tf.constant([5, 6], tf.int64))[0].numpy()
    x2 = a(image, label, tf.constant([5, 6], tf.int64))[0].numpy()
    x3 = a(image, label, tf.constant([5, 7], tf.int64))[0].numpy()
    np.testing.assert_array_equal(x1, x2)
    assert not np.array_equal(x1, x3)
    m = drawn_values(params, [5, 6])["brightness"]
    np.testing.assert_allclose(x1, 2.0 * m, rtol=1e-6)
    # probability 0.5: over 400 seeds, about half are left alone
    half = {**OFF, "brightness": (0.5, 0.5, 2.0)}
    applied = [drawn_values(half, [9, k])["brightness"] != 1.0 for k in range(400)]
    assert 160 < sum(applied) < 240


@pytest.mark.parametrize("name, low, high, check", [
    # gamma keeps the mean and standard deviation
    ("gamma", 0.5, 0.5, lambda x, y: (np.isclose(y.mean(), x.mean(), atol=1e-4)
                                      and np.isclose(y.std(), x.std(), rtol=1e-3))),
    # contrast keeps the mean (before the clip) and the range
    ("contrast", 1.5, 1.5, lambda x, y: y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6),
    # noise of std 0.1: the difference has that std
    ("noise", 0.1, 0.1, lambda x, y: abs(np.std(y - x) - 0.1) < 0.01),
    # blur keeps a constant image and the mean of a smooth one
    ("blur", 1.0, 1.0, lambda x, y: np.isclose(y.mean(), x.mean(), atol=0.02)),
    # the bias field leaves the minimum where it was
    ("bias_field", 0.3, 0.3, lambda x, y: np.isclose(y.min(), x.min(), atol=1e-5)),
])
def test_intensity_transforms(name, low, high, check):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 48, 3)).astype(np.float32)
    label = np.zeros((48, 48), np.int32)
    y, out_label = aug.make_augment(only(**{name: (low, high)}))(
        x, label, tf.constant([1, 1], tf.int64))
    y = y.numpy()
    assert not np.allclose(y, x)
    assert check(x, y)
    np.testing.assert_array_equal(out_label.numpy(), label)


def test_gamma_by_hand():
    """x = [0, 1, 2, 3] (one column): rescaled [0, 1/3, 2/3, 1] squared: [0, 1/9, 4/9, 1]
    x 3 = [0, 1/3, 4/3, 3], then given the mean 1.5 and std of x back."""
    x = tf.constant([0.0, 1.0, 2.0, 3.0])
    y = np.array([0, 1 / 3, 4 / 3, 3])
    want = (y - y.mean()) / y.std() * np.std([0, 1, 2, 3]) + 1.5
    np.testing.assert_allclose(aug.gamma(x, tf.constant(2.0)).numpy(), want, rtol=1e-5)
    np.testing.assert_array_equal(aug.gamma(x, tf.constant(1.0)).numpy(), x.numpy())


def test_augmented_stream_resumes_exactly(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "slices.tfrecords")
    data.write_slices(path, [(rng.normal(size=(16, 16, 3)).astype(np.float32),
                              rng.integers(0, 3, (16, 16))) for _ in range(3)])
    fn = aug.make_augment({**OFF, "rotate": (0.5, -20, 20), "gamma": (0.5, 0.7, 1.5),
                           "noise": (0.5, 0.0, 0.1)})

    def batches(start_step, n):
        ds = data.slice_dataset([path], 16, 2, seed=1, start_step=start_step, augment=fn)
        return [(x.numpy(), y.numpy()) for x, y in (b for _, b in zip(range(n), ds))]

    full, resumed = batches(0, 5), batches(3, 2)
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_forced_foreground_share(tmp_path):
    """Records 0, 2 of 5 hold foreground: with share 1 every draw is one of them; with share
    0 the draws are exactly the uniform stream's."""
    paths = []
    for k in range(5):
        label = np.zeros((4, 4), np.int32)
        if k in (0, 2):
            label[1, 1] = 1
        paths.append(str(tmp_path / f"s{k}.tfrecords"))
        data.write_slices(paths[-1], [(np.zeros((4, 4, 3), np.float32), label)])
    fg = data.foreground_records(paths, n_class=2)
    np.testing.assert_array_equal(fg, [True, False, True, False, False])
    draw = lambda share: [f.decode() for _, f, _ in data.sample_records(
        paths, 3, 0, fg, share).take(60).as_numpy_iterator()]
    assert set(draw(1.0)) == {paths[0], paths[2]}
    uniform = [f.decode() for _, f, _ in data.sample_records(paths, 3, 0).take(60)
               .as_numpy_iterator()]
    assert draw(0.0) == uniform
    third = draw(1 / 3)
    share_fg = np.mean([p in (paths[0], paths[2]) for p in third])
    assert share_fg > 0.4  # 1/3 forced + 2/3 x 2/5 uniform = 0.6 expected


@pytest.mark.parametrize("schedule, step, want", [
    # poly: 1e-3 x (1 - t / 1000)^0.9
    ("poly", 0, 1e-3),
    ("poly", 500, 1e-3 * 0.5 ** 0.9),
    ("poly", 900, 1e-3 * 0.1 ** 0.9),
    ("poly", 1000, 0.0),
    # step: 1e-3 x 0.95^floor(t / 100)
    ("step", 0, 1e-3),
    ("step", 99, 1e-3),
    ("step", 100, 0.95e-3),
    ("step", 950, 1e-3 * 0.95 ** 9),
])
def test_learning_rate_schedules(schedule, step, want):
    from lib.train import learning_rate_schedule

    config = dict(LR_SCHEDULE=schedule, LEARNING_RATE=1e-3, NUM_STEPS=1000,
                  LR_DECAY_STEPS=100, LR_DECAY=0.95)
    got = float(learning_rate_schedule(config)(step))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_poly_follows_the_run_length():
    from lib.train import learning_rate_schedule

    base = dict(LR_SCHEDULE="poly", LEARNING_RATE=1e-3, LR_DECAY_STEPS=40, LR_DECAY=0.95)
    short = learning_rate_schedule({**base, "NUM_STEPS": 400})
    long = learning_rate_schedule({**base, "NUM_STEPS": 4000})
    # halfway through either run the rate is the same fraction of the start
    assert float(short(200)) == pytest.approx(float(long(2000)), rel=1e-6)
