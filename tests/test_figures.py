"""Tests of lib.figures: every figure function writes a non-empty PNG on tiny inputs."""
import json

import numpy as np
import pytest

from lib import figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 100 and data[:8] == PNG_MAGIC
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp_")]


def _volumes(depth=10, empty=False):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, 16, depth)).astype(np.float32)
    label = np.zeros((16, 16, depth), np.int32)
    pred = np.zeros_like(label)
    if not empty:
        label[4:9, 4:9, 2:7] = 1
        label[10:13, 3:6, 3:8] = 2
        pred[5:10, 4:9, 2:6] = 1
        pred[10:14, 3:6, 4:8] = 3
    return image, label, pred


@pytest.mark.parametrize("depth,empty,names", [
    (10, False, ["background", "a", "b", "c"]),  # names include background
    (10, True, ["a", "b", "c"]),  # no foreground anywhere: slices spread over the volume
    (3, False, ["a", "b", "c"]),  # fewer slices than requested columns
])
def test_slice_grid(tmp_path, depth, empty, names):
    image, label, pred = _volumes(depth, empty)
    out = tmp_path / "new" / "grid.png"
    figures.slice_grid(str(out), image, label, pred, n_class=4, class_names=names, title="t")
    _assert_png(out)


def test_pick_slices_within_foreground():
    _, label, pred = _volumes()
    picked = figures._pick_slices(label, pred, 4)
    assert picked[0] == 2 and picked[-1] == 7 and len(picked) == 4


def test_dice_boxplot(tmp_path):
    cases = [{"case": f"c{i}", "dice": {"a": 0.5 + 0.1 * i, "b": 0.8 - 0.1 * i}}
             for i in range(3)]
    results = {"mr": {"cases": cases}, "ct": {"cases": cases[:1]}}
    out = tmp_path / "box.png"
    figures.dice_boxplot(str(out), results, ["a", "b", "missing"])
    _assert_png(out)


def test_training_curves(tmp_path):
    log = tmp_path / "train.jsonl"
    lines = []
    for step in range(0, 50, 5):
        rec = {"step": step, "loss/total": 2.0 / (step + 1), "loss/mr_dice": 0.5,
               "loss/ct_dice": 0.6, "loss/mr_ce": 0.3, "loss/kd": 0.1, "loss/l2": 0.01,
               "lr": 1e-3}
        if step % 10 == 0:
            rec.update({"val/mr_dice_mean": 0.4, "val/ct_dice_mean": 0.3})
        lines.append(json.dumps(rec))
    lines.append("not json")
    lines.append('{"step": 55, "loss/total": 0.')  # half-written line after a crash
    log.write_text("\n".join(lines))
    assert len(figures.read_log(str(log))) == 10
    out = tmp_path / "curves" / "curves.png"
    figures.training_curves(str(out), str(log))
    _assert_png(out)


@pytest.mark.parametrize("content", ["", "\n\n", '{"step": 1, "loss/t'])
def test_training_curves_empty_log(tmp_path, content):
    log = tmp_path / "train.jsonl"
    log.write_text(content)
    out = tmp_path / "curves.png"
    figures.training_curves(str(out), str(log))
    _assert_png(out)


def test_training_curves_missing_log(tmp_path):
    out = tmp_path / "curves.png"
    figures.training_curves(str(out), str(tmp_path / "nope.jsonl"))
    _assert_png(out)
