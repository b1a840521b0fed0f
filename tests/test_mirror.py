"""Test-time mirroring knows left from right: LATERAL_PAIRS, lib.config.lateral_permutation
and the channel swap of lib.evaluate.mirrored in the flips along the patient's left-right
axis (W of the prepared [H, W, D] volumes), for the 2D and the 3D predictions.

The worked example: three classes [background, right organ, left organ] (LATERAL_PAIRS
["1:2"]) and a fake network that knows the radiological view: a bright voxel in image
column 0 (the patient's right) is mostly "right", in column 1 mostly "left". Its
probabilities, per input value and column (the other axes do not matter):

    bright, column 0: [.1, .7, .2]      dark, column 0: [.8, .15, .05]
    bright, column 1: [.1, .1, .8]      dark, column 1: [.6, .3, .1]

The input, one 2 x 2 slice [H, W]: row 0 = [bright, dark], row 1 = [dark, dark], i.e. a
right organ at row 0, column 0. Flipping W moves the bright voxel to column 1, where the
network calls it "left"; flipped back, column 0 then reads [.1, .1, .8]. Flips along H
change nothing here (the network ignores the row), so every combination's output is one of
two: unflipped A or W-flipped B (flipped back), each for half the combinations:

    row 0: A = [.1, .7, .2], [.6, .3, .1]     B = [.1, .1, .8], [.8, .15, .05]
    row 1: A = [.8, .15, .05], [.6, .3, .1]   B = [.6, .3, .1], [.8, .15, .05]

* pairs swapped in the W flips: mean(A, swap(B)), row 0 column 0 = [.1, .75, .15]: right;
* no swap (LATERAL_PAIRS empty, the old behaviour): mean(A, B), row 0 column 0 =
  [.1, .4, .5]: the right organ is labelled left;
* the swap on the wrong axis (H): mean(A, swap(A), B, swap(B)), classes 1 and 2 tie.
"""
import numpy as np
import pytest
import tensorflow as tf

from lib.config import ConfigError, lateral_permutation, resolve, validate
from lib.evaluate import (LATERAL_AXIS_2D, LATERAL_AXIS_3D, left_right_axis, mirrored,
                          predict_volume_2d, predict_volume_3d)

BRIGHT = [[.1, .7, .2], [.1, .1, .8]]  # [column, class]
DARK = [[.8, .15, .05], [.6, .3, .1]]
SLICE = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)  # [H, W]: bright at row 0, column 0
SWAP = [0, 2, 1]  # lateral_permutation(["1:2"], 3)

NO_SWAP = [[[.1, .4, .5], [.7, .225, .075]],
           [[.7, .225, .075], [.7, .225, .075]]]
SWAPPED = [[[.1, .75, .15], [.7, .175, .125]],
           [[.7, .125, .175], [.7, .175, .125]]]
WRONG_AXIS = [[[.1, .45, .45], [.7, .15, .15]],
              [[.7, .15, .15], [.7, .15, .15]]]


def fake_network(column_axis: int, rank: int):
    """x [N, *spatial, C] (channel C // 2 read) -> probabilities [N, *spatial, 3] from
    BRIGHT / DARK by the voxel's value and its index along ``column_axis`` (size 2)."""
    shape = [1] * rank + [3]
    shape[column_axis] = 2
    bright = tf.reshape(tf.constant(BRIGHT, tf.float32), shape)
    dark = tf.reshape(tf.constant(DARK, tf.float32), shape)

    def fn(x):
        lit = x[..., x.shape[-1] // 2:x.shape[-1] // 2 + 1] > 0.5
        return tf.where(lit, bright, dark)

    return fn


# ---------------------------------------------------------------------- the parser
@pytest.mark.parametrize("pairs, n_class, expected", [
    ([], 5, None),
    (["2:3"], 5, [0, 1, 3, 2, 4]),                    # the abdominal classes
    (("2:3",), 5, [0, 1, 3, 2, 4]),
    (["3:2"], 5, [0, 1, 3, 2, 4]),                    # a pair in either order
    ([" 1 : 4", "2:3"], 5, [0, 4, 3, 2, 1]),
    (["1:2"], 3, SWAP),
])
def test_lateral_permutation(pairs, n_class, expected):
    assert lateral_permutation(pairs, n_class) == expected


@pytest.mark.parametrize("pairs, message", [
    ("2:3", r'^LATERAL_PAIRS: expected a list of "a:b" strings, got \'2:3\'$'),
    (None, r'^LATERAL_PAIRS: expected a list of "a:b" strings, got None$'),
    (["2-3"], r'^LATERAL_PAIRS: \'2-3\' is not "a:b" with class ids a and b$'),
    (["2:3:4"], r'^LATERAL_PAIRS: \'2:3:4\' is not "a:b"'),
    (["kidney:3"], r'^LATERAL_PAIRS: \'kidney:3\' is not "a:b"'),
    (["2:"], r'^LATERAL_PAIRS: \'2:\' is not "a:b"'),
    (["-1:2"], r'^LATERAL_PAIRS: \'-1:2\' is not "a:b"'),
    ([23], r'^LATERAL_PAIRS: 23 is not "a:b"'),
    (["0:2"], r"^LATERAL_PAIRS: class 0 in '0:2' is not in 1\.\.4 \(N_CLASS=5, background 0 "
              r"excluded\)$"),
    (["2:5"], r"^LATERAL_PAIRS: class 5 in '2:5' is not in 1\.\.4 \(N_CLASS=5"),
    (["2:2"], r"^LATERAL_PAIRS: '2:2' pairs class 2 with itself$"),
    (["2:3", "3:4"], r"^LATERAL_PAIRS: class 3 is in '2:3' and '3:4'; a class has one "
                     r"counterpart$"),
    (["2:3", "3:2"], r"^LATERAL_PAIRS: class 3 is in '2:3' and '3:2'"),
    (["1:4", "4:2"], r"^LATERAL_PAIRS: class 4 is in '1:4' and '4:2'"),
])
def test_lateral_permutation_refuses(pairs, message):
    with pytest.raises(ConfigError, match=message) as err:
        lateral_permutation(pairs, 5)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- the settings
@pytest.mark.parametrize("network, preset, pairs", [
    ("2d", "abdomen", ["2:3"]), ("2d", "heldout", ["2:3"]), ("2d", "demo", []),
    ("2d", "paper", []), ("3d", "paper", ["2:3"]), ("3d", "heldout", ["2:3"]),
    ("3d", "demo", []),
])
def test_presets_pair_the_kidneys(network, preset, pairs):
    """The abdominal presets swap right_kidney (2) and left_kidney (3); the cardiac ones
    (no lateral classes) swap nothing."""
    from lib.cli import entry_module

    module = entry_module(network)
    config = resolve(vars(module), [f"--preset={preset}"], module.PRESETS)
    validate(config)
    assert config["LATERAL_PAIRS"] == pairs
    if pairs:
        names = ["background"] + config["CLASS_NAMES"]
        assert [names[int(c)] for c in pairs[0].split(":")] == ["right_kidney", "left_kidney"]


@pytest.mark.parametrize("argv, expected", [
    (["--lateral_pairs=2:3"], ["2:3"]),
    (['--lateral_pairs=["1:4", "2:3"]'], ["1:4", "2:3"]),
    (["--lateral_pairs=[]"], []),
])
def test_lateral_pairs_on_the_command_line(argv, expected):
    from lib.cli import entry_module

    module = entry_module("2d")
    config = resolve(vars(module), ["--preset=abdomen", *argv], module.PRESETS)
    validate(config)
    assert config["LATERAL_PAIRS"] == expected


@pytest.mark.parametrize("argv, message", [
    (["--lateral_pairs=2:5"], r"^LATERAL_PAIRS: class 5 in '2:5' is not in 1\.\.4"),
    (["--lateral_pairs=2:3", "--n_class=3", "--class_names=a,b"],
     r"^LATERAL_PAIRS: class 3 in '2:3' is not in 1\.\.2"),
    (["--lateral_pairs=2-3"], r"^LATERAL_PAIRS: '2-3' is not \"a:b\""),
])
def test_validate_checks_lateral_pairs(argv, message):
    from lib.cli import entry_module

    for network in ("2d", "3d"):
        module = entry_module(network)
        config = resolve(vars(module), ["--preset=heldout", *argv], module.PRESETS)
        with pytest.raises(ConfigError, match=message):
            validate(config)


# ---------------------------------------------------------------------- the lateral axis
@pytest.mark.parametrize("slice_axis, axis, right", [
    ("axial", 1, 0), ("coronal", 1, 0),  # in-plane, radiological view: image left
    ("sagittal", 2, -1),                  # the slices, left -> right: the last
])
def test_left_right_axis_follows_prep(slice_axis, axis, right):
    """A slab at the patient's far right (RAS axis 0, last index) lands, in the prepared
    slices-last volume, at one end (``right``) of the axis ``left_right_axis`` names; the
    other two axes do not separate it."""
    from lib.prep import to_slices_last

    canonical = np.zeros((3, 4, 5))
    canonical[2] = 1.0
    hwd = to_slices_last(canonical, slice_axis)
    assert left_right_axis(slice_axis) == axis
    assert np.all(np.take(hwd, right, axis=axis) == 1.0)
    assert np.sum(hwd) == np.take(hwd, right, axis=axis).size  # nothing elsewhere
    assert LATERAL_AXIS_2D == 2 and LATERAL_AXIS_3D == 2  # axial: W of [N, H, W, ...]


# ---------------------------------------------------------------------- 2D and 3D
@pytest.mark.parametrize("lateral_axis, permutation, expected, labels", [
    (None, None, NO_SWAP, [[2, 0], [0, 0]]),        # LATERAL_PAIRS empty: the right organ is "left"
    (2, SWAP, SWAPPED, [[1, 0], [0, 0]]),           # swapped in the W flips: right
    (1, SWAP, WRONG_AXIS, None),                    # swapped in the H flips: a tie
])
def test_mirrored_2d(lateral_axis, permutation, expected, labels):
    x = tf.constant(SLICE[None, :, :, None])  # [1, H, W, 1]
    fn = fake_network(2, 3)
    got = np.asarray(mirrored(fn, [1, 2], True, lateral_axis, permutation)(x))[0]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    if labels is not None:
        np.testing.assert_array_equal(np.argmax(got, -1), labels)
    assert mirrored(fn, [1, 2], False, lateral_axis, permutation) is fn


def test_the_swap_matters():
    """Without the swap the right organ's voxel is labelled left: the two averages differ."""
    assert not np.allclose(SWAPPED, NO_SWAP, atol=0.1)
    assert np.argmax(SWAPPED[0][0]) == 1 and np.argmax(NO_SWAP[0][0]) == 2


def test_mirrored_refuses_a_permutation_off_the_flipped_axes():
    with pytest.raises(ValueError, match="lateral axis among the flipped axes"):
        mirrored(fake_network(2, 3), [1, 2], True, None, SWAP)
    with pytest.raises(ValueError, match="lateral axis among the flipped axes"):
        mirrored(fake_network(2, 3), [1, 2], True, 3, SWAP)


@pytest.mark.parametrize("permutation, expected", [(None, NO_SWAP), (SWAP, SWAPPED)])
def test_predict_volume_2d(permutation, expected):
    """The whole 2D path: [H, W, D] volume -> 3-slice stacks x [D, H, W, 3] -> mirrored
    over axes 1, 2 with the swap in the W flips -> [H, W, D, C]."""
    image = SLICE[:, :, None]  # [2, 2, 1]
    probs = predict_volume_2d(lambda m: fake_network(2, 3), "ct", image, 2, mirror=True,
                              probabilities=True, permutation=permutation)
    assert probs.shape == (2, 2, 1, 3)
    np.testing.assert_allclose(probs[:, :, 0], expected, atol=1e-6)
    labels = predict_volume_2d(lambda m: fake_network(2, 3), "ct", image, 2, mirror=True,
                               permutation=permutation)
    assert labels[0, 0, 0] == (1 if permutation else 2)


@pytest.mark.parametrize("permutation, expected", [(None, NO_SWAP), (SWAP, SWAPPED)])
def test_predict_volume_3d(permutation, expected):
    """The whole 3D path: one window x [1, h, w, d, 1] = [1, 2, 2, 2, 1] mirrored over
    axes 1, 2, 3 (8 combinations, 4 flipping w): the same averages on both slices, as the
    network ignores h and d."""
    image = np.repeat(SLICE[:, :, None], 2, axis=2)  # [2, 2, 2]: the slice twice
    probs = predict_volume_3d(lambda m: fake_network(2, 4), "mr", image, (2, 2, 2), 3,
                              mirror=True, probabilities=True, permutation=permutation)
    assert probs.shape == (2, 2, 2, 3)
    for k in range(2):
        np.testing.assert_allclose(probs[:, :, k], expected, atol=1e-6)


@pytest.mark.parametrize("pairs, expected", [([], NO_SWAP), (["1:2"], SWAPPED)])
@pytest.mark.parametrize("network", ["2d", "3d"])
def test_predictors_pass_lateral_pairs(network, pairs, expected):
    """network().predictor reads LATERAL_PAIRS: a fake model whose logits are the log of
    the fake network's probabilities, mirrored through the entry script's predictor."""
    from lib.cli import entry_module

    module = entry_module(network)
    fake = fake_network(2, 3 if network == "2d" else 4)

    def model(x, modalities, training):
        return tf.math.log(fake(x))

    config = {"IMAGE_SIZE": 2, "PATCH_SIZE": [2, 2, 1], "TEST_BATCH": 1, "TEST_STRIDE": 0,
              "TEST_MIRROR": True, "N_CLASS": 3, "LATERAL_PAIRS": pairs}
    predict = module.network().predictor(model, config)
    probs = predict("ct", SLICE[:, :, None], probabilities=True)
    np.testing.assert_allclose(probs[:, :, 0], expected, atol=1e-6)
