"""Tests of lib.metrics: hand-computed cases, a brute-force reference and the reporting helpers."""
import csv
import itertools
import json
import math

import numpy as np
import pytest

from lib import metrics
from lib.metrics import (assd, dice_score, evaluate_case, format_table, hd95, summarize,
                         surface_distances, to_jsonable, write_metrics_csv)


def _mask(shape, voxels):
    m = np.zeros(shape, dtype=bool)
    for v in voxels:
        m[v] = True
    return m


def _cube_pair():
    # 3x3x3 cube at axis-0 indices 1..3 and the same cube shifted by +1 (indices 2..4), inside
    # a 7x6x6 array so neither cube touches the array border.
    a = np.zeros((7, 6, 6), dtype=bool)
    a[1:4, 1:4, 1:4] = True
    return a, np.roll(a, 1, axis=0)


# Cube reasoning, spacing (2.0, 1.0, 0.5); cube A has layers i = 0, 1, 2 (relative), cube B
# i = 1, 2, 3. Each surface is the cube minus its centre: 26 voxels (A's centre is (1,1,1),
# B's is (2,1,1)).
# A -> B:
#   layer i=0 (9 voxels): B has nothing at i=0 and B's layer i=1 is a full face, so the
#     nearest B surface voxel is one step along axis 0: 9 x 2.0.
#   layer i=1 (8 surface voxels, centre excluded): B's i=1 layer is a full face: 8 x 0.
#   layer i=2 (9 voxels): all are B surface except B's centre (2,1,1), whose nearest B surface
#     voxel is one step along axis 2 (the cheapest axis): 8 x 0 and 1 x 0.5.
# B -> A is the mirror image: 9 x 2.0 (layer 3), 8 x 0 (layer 2), 8 x 0 + 1 x 0.5 (layer 1).
# Pooled 52 distances: 32 x 0, 2 x 0.5, 18 x 2.0.
#   ASSD = (2 * 0.5 + 18 * 2.0) / 52 = 37 / 52.
#   HD95: sorted position 0.95 * 51 = 48.45 lies between entries 48 and 49, both 2.0 -> 2.0.
#   Dice = 2 * 18 / (27 + 27) = 2/3.
CUBE_A, CUBE_B = _cube_pair()

HAND_CASES = [
    # id, pred, gt, spacing, dice, assd, hd95
    ("same voxel", _mask((5, 5, 5), [(2, 2, 2)]), _mask((5, 5, 5), [(2, 2, 2)]), (1, 1, 1),
     1.0, 0.0, 0.0),
    # two voxels 2 apart along axis 2 with spacing 3 there: both directed distances are 6 mm
    ("voxel shifted 2 on axis 2", _mask((5, 5, 7), [(2, 2, 1)]), _mask((5, 5, 7), [(2, 2, 3)]),
     (1.0, 1.0, 3.0), 0.0, 6.0, 6.0),
    ("voxel shifted 2 on axis 0", _mask((7, 5, 5), [(1, 2, 2)]), _mask((7, 5, 5), [(3, 2, 2)]),
     (3.0, 0.7, 0.2), 0.0, 6.0, 6.0),
    ("cube shifted 1 on axis 0", CUBE_A, CUBE_B, (2.0, 1.0, 0.5), 2 / 3, 37 / 52, 2.0),
    # surfaces of different sizes: pred {(2,0)}, gt {(2,0),(2,1)}: pooled [0 | 0, 1] ->
    # ASSD 1/3 (old medpy's mean of directed means would give (0 + 0.5) / 2 = 0.25);
    # HD95 at sorted position 0.95 * 2 = 1.9: 0 + 0.9 * (1 - 0) = 0.9.
    ("unequal surfaces 2D", _mask((5, 5), [(2, 0)]), _mask((5, 5), [(2, 0), (2, 1)]), None,
     2 / 3, 1 / 3, 0.9),
    ("both empty", np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1, 2, 3),
     1.0, 0.0, 0.0),
    ("empty pred", np.zeros((4, 4, 4), bool), _mask((4, 4, 4), [(1, 1, 1)]), (1, 2, 3),
     0.0, math.nan, math.nan),
    ("empty gt", _mask((4, 4), [(1, 1)]), np.zeros((4, 4), bool), (1, 2), 0.0, math.nan, math.nan),
]


@pytest.mark.parametrize("name,pred,gt,spacing,dice,assd_mm,hd95_mm", HAND_CASES,
                         ids=[c[0] for c in HAND_CASES])
def test_hand_computed(name, pred, gt, spacing, dice, assd_mm, hd95_mm):
    assert dice_score(pred, gt) == pytest.approx(dice, abs=1e-12)
    for fn, want in ((assd, assd_mm), (hd95, hd95_mm)):
        got = fn(pred, gt, spacing)
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, abs=1e-6)


def test_cube_pooled_distances():
    d = np.sort(surface_distances(CUBE_A, CUBE_B, (2.0, 1.0, 0.5)))
    want = np.array([0.0] * 32 + [0.5] * 2 + [2.0] * 18)
    np.testing.assert_allclose(d, want, atol=1e-12)


def test_surface_distances_one_empty_raises():
    with pytest.raises(ValueError):
        surface_distances(np.zeros((3, 3), bool), _mask((3, 3), [(1, 1)]))
    assert surface_distances(np.zeros((3, 3), bool), np.zeros((3, 3), bool)).size == 0


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1, 1, 1, 1), (1.0, 0.0, 1.0), (1, -1, 1)])
def test_bad_spacing(spacing):
    m = _mask((4, 4, 4), [(1, 1, 1)])
    with pytest.raises(ValueError):
        assd(m, m, spacing)


def test_shape_mismatch():
    with pytest.raises(ValueError):
        dice_score(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


# ----------------------------------------------------------------------------- brute force
def _brute_surface(mask):
    """Surface by explicit face-neighbour check: a voxel is surface if any face neighbour is
    outside the mask or outside the array (padding with False makes the border count)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    surface = np.zeros_like(mask)
    for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
        neighbour = np.roll(padded, -step, axis=axis)[inner]  # neighbour[x] = padded[x + step]
        surface |= mask & ~neighbour
    return surface


def _brute_distances(pred, gt, spacing):
    sp = np.argwhere(_brute_surface(pred)) * np.asarray(spacing, float)
    sg = np.argwhere(_brute_surface(gt)) * np.asarray(spacing, float)
    pair = np.sqrt(((sp[:, None, :] - sg[None, :, :]) ** 2).sum(-1))
    return np.concatenate([pair.min(axis=1), pair.min(axis=0)])


def _random_masks(rng, shape, kind):
    if kind == "noise":
        return rng.random(shape) < 0.3, rng.random(shape) < 0.5
    if kind == "sparse":
        return rng.random(shape) < 0.03, rng.random(shape) < 0.05
    # blobs: thresholded smoothed noise gives compact shapes of different sizes
    from scipy import ndimage
    a = ndimage.gaussian_filter(rng.random(shape), 1.5)
    b = ndimage.gaussian_filter(rng.random(shape), 1.5)
    return a > np.percentile(a, 60), b > np.percentile(b, 75)


@pytest.mark.parametrize("seed,shape,kind,spacing", [
    (0, (12, 10, 8), "noise", (1.2, 0.7, 2.5)),
    (1, (12, 10, 8), "sparse", (0.5, 1.0, 3.0)),
    (2, (12, 10, 8), "blobs", (2.0, 1.0, 0.5)),
    (3, (9, 11, 6), "blobs", (0.8, 0.8, 4.0)),
    (4, (16, 13), "blobs", (0.6, 1.7)),
    (5, (15, 9), "noise", (1.0, 2.0)),
])
def test_against_brute_force(seed, shape, kind, spacing):
    rng = np.random.default_rng(seed)
    pred, gt = _random_masks(rng, shape, kind)
    assert pred.any() and gt.any()
    want = _brute_distances(pred, gt, spacing)
    got = surface_distances(pred, gt, spacing)
    np.testing.assert_allclose(np.sort(got), np.sort(want), atol=1e-6)
    assert assd(pred, gt, spacing) == pytest.approx(want.mean(), abs=1e-6)
    assert hd95(pred, gt, spacing) == pytest.approx(np.percentile(want, 95), abs=1e-6)
    inter = np.logical_and(pred, gt).sum()
    assert dice_score(pred, gt) == pytest.approx(2 * inter / (pred.sum() + gt.sum()), abs=1e-12)


def test_padding_does_not_change_interior_result():
    # The bounding-box crop must be exact: same masks embedded in a larger zero array.
    rng = np.random.default_rng(7)
    pred, gt = _random_masks(rng, (8, 7, 6), "blobs")
    pad = ((5, 3), (2, 9), (4, 4))
    big_p, big_g = np.pad(pred, pad), np.pad(gt, pad)
    spacing = (1.3, 0.4, 2.2)
    # The border of the small array counted as surface; in the padded array those voxels are
    # surface only if they face background, so compare with the brute force on the big array.
    want = _brute_distances(big_p, big_g, spacing)
    np.testing.assert_allclose(np.sort(surface_distances(big_p, big_g, spacing)),
                               np.sort(want), atol=1e-6)


# ----------------------------------------------------------------------------- reporting
CLASSES = {1: "A", 2: "B"}


def _tiny_cases():
    # 2D 5x5 label maps, spacing (1.0, 1.5).
    gt = np.zeros((5, 5), int)
    gt[1, 1], gt[3, 3] = 1, 2
    pred1 = np.zeros((5, 5), int)
    pred1[1, 1], pred1[3, 1] = 1, 2  # A exact; B 2 voxels off along axis 1 -> 3.0 mm
    pred2 = np.zeros((5, 5), int)  # empty prediction: distances undefined
    c1 = {"case": "c1", **evaluate_case(pred1, gt, (1.0, 1.5), CLASSES)}
    c2 = {"case": "c2", **evaluate_case(pred2, gt, (1.0, 1.5), CLASSES)}
    return c1, c2


def test_evaluate_case():
    c1, c2 = _tiny_cases()
    assert c1["dice"] == {"A": 1.0, "B": 0.0}
    assert c1["assd"] == pytest.approx({"A": 0.0, "B": 3.0})
    assert c1["hd95"] == pytest.approx({"A": 0.0, "B": 3.0})
    assert c2["dice"] == {"A": 0.0, "B": 0.0}
    assert all(math.isnan(c2[m][k]) for m in ("assd", "hd95") for k in "AB")
    # list form of classes means ids 1..len
    assert evaluate_case(np.zeros((5, 5), int), np.zeros((5, 5), int), None, ["A", "B"]) == {
        "dice": {"A": 1.0, "B": 1.0}, "assd": {"A": 0.0, "B": 0.0}, "hd95": {"A": 0.0, "B": 0.0}}


def test_summarize_and_json():
    cases = list(_tiny_cases())
    s = summarize(cases, CLASSES)
    assert s["dice_mean"] == pytest.approx({"A": 0.5, "B": 0.0})
    assert s["dice_std"] == pytest.approx({"A": 0.5, "B": 0.0})  # population std of [1, 0]
    assert s["assd_mean"] == pytest.approx({"A": 0.0, "B": 3.0})  # NaN of c2 ignored
    assert s["assd_std"] == pytest.approx({"A": 0.0, "B": 0.0})
    assert s["hd95_mean"] == pytest.approx({"A": 0.0, "B": 3.0})
    assert s["dice_avg"] == pytest.approx(0.25)
    assert s["assd_avg"] == pytest.approx(1.5)
    assert s["n_undefined"] == {"A": 1, "B": 1}
    assert s["n_cases"] == 2

    only_empty = summarize(cases[1:], CLASSES)
    assert math.isnan(only_empty["assd_mean"]["A"]) and math.isnan(only_empty["assd_avg"])

    doc = to_jsonable({**only_empty, "cases": cases[1:], "arr": np.array([1.0, np.nan]),
                       "np": np.float32(0.5), "i": np.int64(3), "inf": float("inf")})
    text = json.dumps(doc, allow_nan=False)  # strict JSON must not raise
    back = json.loads(text)
    assert back["assd_mean"]["A"] is None
    assert back["cases"][0]["assd"]["B"] is None
    assert back["arr"] == [1.0, None] and back["np"] == 0.5 and back["i"] == 3
    assert back["inf"] is None


def _results():
    c1, c2 = _tiny_cases()
    return {"mr": {**summarize([c1, c2], CLASSES), "cases": [c1, c2]},
            "ct": {**summarize([c2], CLASSES), "cases": [c2]}}


def test_write_metrics_csv(tmp_path):
    path = tmp_path / "sub" / "metrics.csv"
    write_metrics_csv(str(path), _results())
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [list(r) for r in rows[:1]] == [["modality", "case", "class", "dice", "assd", "hd95"]]
    assert [(r["modality"], r["case"], r["class"]) for r in rows] == [
        ("mr", "c1", "A"), ("mr", "c1", "B"), ("mr", "c2", "A"), ("mr", "c2", "B"),
        ("ct", "c2", "A"), ("ct", "c2", "B")]
    assert float(rows[1]["assd"]) == pytest.approx(3.0)
    assert rows[2]["dice"] == "0.0" and rows[2]["assd"] == "" and rows[2]["hd95"] == ""
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]  # no temp file left


def test_format_table():
    text = format_table(_results(), CLASSES)
    lines = text.splitlines()
    assert "mr: 2 cases" in lines[0] and "ct: 1 cases" in lines[0]
    header = lines[1]
    assert header.index("MR Dice") < header.index("MR ASSD") < header.index("CT Dice") < \
        header.index("CT ASSD")
    row_a = next(line for line in lines if line.startswith("A "))
    row_b = next(line for line in lines if line.startswith("B "))
    avg = next(line for line in lines if line.startswith("average"))
    assert "0.500±0.500" in row_a and "0.00±0.00 (1 undefined)" in row_a
    assert "3.00±0.00 (1 undefined)" in row_b
    assert row_a.count("n/a (1 undefined)") == 1  # CT: the only case is undefined
    assert "0.250" in avg and "1.50" in avg
    assert "n/a (2 undefined)" in avg
    assert "MR ASSD (mm)" in header and "CT ASSD (mm)" in header
    results = _results()
    results["ct"]["distance_unit"] = "voxel"  # an .npz test set with no recorded spacing
    header = format_table(results, CLASSES).splitlines()[1]
    assert "MR ASSD (mm)" in header and "CT ASSD (voxel)" in header


def test_class_items():
    assert metrics.class_items(["x", "y"]) == [(1, "x"), (2, "y")]
    assert metrics.class_items({3: "z", 1: "w"}) == [(3, "z"), (1, "w")]
    with pytest.raises(TypeError):
        metrics.class_items("xy")
