"""Tests of lib.postprocess: hand-made masks and label maps with hand-worked Dice values."""
import json
import os

import numpy as np
import pytest

from lib import postprocess
from lib.postprocess import (CHOICE_FILE, apply, choose, dice_per_class, keep_largest,
                             largest_component, load_choice, save_choice)


def grid(*rows, dtype=np.int32):
    """2D label map from strings: a digit is that class, '.' is background."""
    return np.array([[0 if ch == "." else int(ch) for ch in row] for row in rows], dtype=dtype)


def vox(shape, voxels):
    m = np.zeros(shape, dtype=bool)
    for v in voxels:
        m[v] = True
    return m


# ----------------------------------------------------------------------------- largest_component
LARGEST_2D = [
    pytest.param(("111..",
                  ".....",
                  "...11"),
                 ("111..",
                  ".....",
                  "....."), id="blobs-3-and-2"),
    # 4-connectivity would see an L of 3 and a bar of 2; (1,0) and (2,1) touch diagonally.
    pytest.param(("11..",
                  "1...",
                  ".11."),
                 ("11..",
                  "1...",
                  ".11."), id="diagonal-touch-joins"),
    # Two components of 2: the one whose first voxel comes first in row-major order wins.
    pytest.param(("...11",
                  ".....",
                  "11..."),
                 ("...11",
                  ".....",
                  "....."), id="tie-lowest-label"),
    pytest.param(("....",
                  "...."),
                 ("....",
                  "...."), id="empty"),
]


@pytest.mark.parametrize("mask, expected", LARGEST_2D)
def test_largest_component_2d(mask, expected):
    mask = grid(*mask).astype(bool)
    before = mask.copy()
    out = largest_component(mask)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, grid(*expected).astype(bool))
    np.testing.assert_array_equal(mask, before)  # input untouched


def test_largest_component_3d_corner_touch_is_26_connected():
    shape = (4, 4, 4)
    a = [(0, 0, 0), (0, 1, 0)]
    b = [(1, 2, 1)]                 # touches (0, 1, 0) only by a corner: offset (1, 1, 1)
    c = [(3, 3, 2), (3, 3, 3)]      # far island of 2
    out = largest_component(vox(shape, a + b + c))
    # 26-connectivity: a+b is one component of 3 > 2. (6- or 18-connectivity would give a
    # tie of 2 between a and c and keep a alone.)
    np.testing.assert_array_equal(out, vox(shape, a + b))


def test_largest_component_3d_block_and_stray_and_empty():
    mask = np.zeros((6, 6, 5), dtype=bool)
    mask[1:3, 1:3, 1:3] = True      # 8 voxels
    mask[5, 5, 4] = True            # stray voxel
    expected = mask.copy()
    expected[5, 5, 4] = False
    np.testing.assert_array_equal(largest_component(mask), expected)
    empty = np.zeros((3, 3, 3), dtype=bool)
    out = largest_component(empty)
    assert out.shape == (3, 3, 3) and not out.any()


def test_largest_component_rejects_1d():
    with pytest.raises(ValueError, match="2D or 3D"):
        largest_component(np.ones(4, dtype=bool))


# ----------------------------------------------------------------------------- keep_largest
LABELS = ("11.2.",
          "1....",
          "...22",
          ".1.22")

KEEP_CASES = [
    pytest.param([], LABELS, id="none"),
    pytest.param([1], ("11.2.",
                       "1....",
                       "...22",
                       "...22"), id="class-1"),
    pytest.param([2], ("11...",
                       "1....",
                       "...22",
                       ".1.22"), id="class-2"),
    pytest.param([1, 2], ("11...",
                          "1....",
                          "...22",
                          "...22"), id="both"),
]


@pytest.mark.parametrize("classes, expected", KEEP_CASES)
def test_keep_largest_two_classes(classes, expected):
    labels = grid(*LABELS, dtype=np.uint8)
    before = labels.copy()
    out = keep_largest(labels, classes)
    assert out.dtype == np.uint8 and out is not labels
    np.testing.assert_array_equal(out, grid(*expected, dtype=np.uint8))
    np.testing.assert_array_equal(labels, before)


def test_keep_largest_other_class_does_not_bridge_islands():
    # The two 1-islands both touch the 2-bar; they stay two components of class 1.
    labels = grid("11.1",
                  "2222")
    np.testing.assert_array_equal(keep_largest(labels, [1]), grid("11..",
                                                                  "2222"))


# ----------------------------------------------------------------------------- dice
def test_dice_per_class_hand_values_and_absent_class():
    truth = grid("111...",
                 "111...")
    pred = grid("11....",
                "11..33")
    # class 1: |P|=4, |G|=6, overlap 4 -> 2*4/10 = 0.8; class 2 absent in both -> 1.0
    # (lib.metrics.dice_score); class 3 predicted only -> 0.0.
    np.testing.assert_allclose(dice_per_class(pred, truth, 4), [0.8, 1.0, 0.0])


# ----------------------------------------------------------------------------- choose
# Case 1: class 1 is a 2x2 square plus a predicted stray island of 2 (column 7): Dice
# 2*4/(6+4) = 0.8 before, 1.0 after. Class 2 is truly split (3 voxels in row 0, 2 in row 3),
# predicted exactly: 1.0 before; keeping the 3-part gives 2*3/(3+5) = 0.75. Class 3: one
# component, 2 predicted of 3 true: 2*2/(2+3) = 0.8 before and after (a tie).
TRUTH_1 = grid("11..222.",
               "11......",
               "........",
               ".....22.",
               "3.......",
               "33......")
PRED_1 = grid("11..222.",
              "11......",
              "........",
              ".....22.",
              "3......1",
              "3......1")
# Case 2: only class 2, one bar predicted exactly (1.0 before and after); classes 1 and 3
# absent from both maps score 1.0 (lib.metrics.dice_score). Class 4 exists nowhere.
TRUTH_2 = grid("........",
               "..2222..",
               "........",
               "........",
               "........",
               "........")
PRED_2 = TRUTH_2.copy()


def test_choose_keeps_for_stray_island_refuses_for_split_object():
    choice = choose([PRED_1, PRED_2], [TRUTH_1, TRUTH_2], n_class=5)
    assert choice["cases"] == 2
    assert choice["keep_largest"] == [1, 3]        # 2 refused, 4 absent everywhere
    assert set(choice["dice_before"]) == set(choice["dice_after"]) == {1, 2, 3}
    # class 1: (0.8 + 1.0) / 2 = 0.9 -> (1.0 + 1.0) / 2 = 1.0: kept.
    assert choice["dice_before"][1] == pytest.approx(0.9)
    assert choice["dice_after"][1] == pytest.approx(1.0)
    # class 2: (1.0 + 1.0) / 2 = 1.0 -> (0.75 + 1.0) / 2 = 0.875: refused.
    assert choice["dice_before"][2] == pytest.approx(1.0)
    assert choice["dice_after"][2] == pytest.approx(0.875)
    # class 3: (0.8 + 1.0) / 2 = 0.9 both: a tie keeps it (>=).
    assert choice["dice_before"][3] == pytest.approx(0.9)
    assert choice["dice_after"][3] == pytest.approx(0.9)
    json.dumps(choice, allow_nan=False)            # JSON-serialisable


def test_apply_uses_the_choice():
    choice = choose([PRED_1, PRED_2], [TRUTH_1, TRUTH_2], n_class=5)
    out = apply(PRED_1, choice)
    # Island of class 1 gone, both parts of class 2 kept.
    np.testing.assert_array_equal(out, grid("11..222.",
                                            "11......",
                                            "........",
                                            ".....22.",
                                            "3.......",
                                            "3......."))
    np.testing.assert_allclose(dice_per_class(out, TRUTH_1, 5), [1.0, 1.0, 0.8, 1.0])
    with pytest.raises(ValueError, match="keep_largest"):
        apply(PRED_1, {})


@pytest.mark.parametrize("preds, truths, n_class, message", [
    ([PRED_1], [TRUTH_1, TRUTH_2], 5, "1 predictions but 2 truths"),
    ([], [], 5, "at least one"),
    ([PRED_1], [TRUTH_1[:, :4]], 5, "case 0"),
    ([PRED_1], [TRUTH_1], 1, "n_class"),
])
def test_choose_rejects_bad_input(preds, truths, n_class, message):
    with pytest.raises(ValueError, match=message):
        choose(preds, truths, n_class)


# ----------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path):
    path = str(tmp_path / "run" / CHOICE_FILE)
    choice = choose([PRED_1, PRED_2], [TRUTH_1, TRUTH_2], n_class=5)
    save_choice(path, choice)
    assert load_choice(path) == choice             # int class ids restored
    on_disk = json.loads(open(path, encoding="utf-8").read())
    assert on_disk["keep_largest"] == [1, 3] and on_disk["dice_after"]["2"] == 0.875
    assert os.listdir(tmp_path / "run") == [CHOICE_FILE]   # no partial file left


def test_load_missing_is_none(tmp_path):
    assert load_choice(str(tmp_path / CHOICE_FILE)) is None


@pytest.mark.parametrize("text, what", [
    ('{"keep_largest": [1,', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"dice_before": {}}', 'missing key "keep_largest"'),
    ('{"keep_largest": 1}', "must be a list"),
    ('{"keep_largest": [0]}', "class id >= 1"),
    ('{"keep_largest": [true]}', "class id >= 1"),
    ('{"keep_largest": ["x"]}', "class id >= 1"),
    ('{"keep_largest": [], "dice_before": {"a": 0.5}}', '"dice_before" key'),
    ('{"keep_largest": [], "dice_after": {"1": 1.5}}', "Dice in \\[0, 1\\]"),
    ('{"keep_largest": [], "dice_after": {"1": NaN}}', "Dice in \\[0, 1\\]"),
    ('{"keep_largest": [], "cases": -1}', '"cases"'),
])
def test_load_malformed_names_file_and_problem(tmp_path, text, what):
    path = tmp_path / CHOICE_FILE
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=what) as err:
        load_choice(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_save_rejects_malformed_choice_and_writes_nothing(tmp_path):
    path = tmp_path / CHOICE_FILE
    with pytest.raises(ValueError, match="keep_largest"):
        save_choice(str(path), {"keep_largest": ["liver"]})
    assert not path.exists()


def test_no_tensorflow_import():
    import ast
    tree = ast.parse(open(postprocess.__file__, encoding="utf-8").read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "tensorflow" not in imported and "numpy" in imported
