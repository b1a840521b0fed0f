"""The held-out comparison (experiments/heldout.py): splits, absent classes, the paired test."""
import json
import os

import numpy as np
import pytest

from conftest import ROOT  # noqa: F401  (the repository on sys.path)
from experiments import heldout


def test_folds_test_every_patient_once_and_never_train_on_it():
    names = [f"image_{i}" for i in (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34,
                                    36, 37, 38, 39)]
    folds = heldout.make_folds(names, 4, seed=0)
    assert len(folds) == 4 and all(len(f["test"]) == 5 for f in folds)
    for fold in folds:
        assert not set(fold["train"]) & set(fold["test"])
        assert sorted(fold["train"] + fold["test"]) == sorted(names)
    assert sorted(n for f in folds for n in f["test"]) == sorted(names)
    assert heldout.make_folds(names, 4, seed=0) == folds  # seeded: the same split again
    assert heldout.make_folds(names, 4, seed=1) != folds
    assert [len(f["test"]) for f in heldout.make_folds(names[:7], 3)] == [3, 2, 2]
    with pytest.raises(heldout.HeldOutError, match="expected 2..7 folds"):
        heldout.make_folds(names[:7], 8)


def test_validation_patients_come_from_the_training_patients_of_their_fold():
    names = [f"p{i}" for i in range(20)]
    plain = heldout.make_folds(names, 4, seed=0)
    folds = heldout.make_folds(names, 4, seed=0, n_val=3)
    for fold, base in zip(folds, plain):
        assert fold["test"] == base["test"]  # the test groups do not move
        assert len(fold["val"]) == 3 and len(fold["train"]) == 12
        assert set(fold["val"]) <= set(base["train"])
        assert not set(fold["val"]) & set(fold["train"])
        assert sorted(fold["train"] + fold["val"]) == sorted(base["train"])
    assert heldout.make_folds(names, 4, seed=0, n_val=3) == folds
    with pytest.raises(heldout.HeldOutError, match="expected 0..14 patients"):
        heldout.make_folds(names, 4, seed=0, n_val=15)


def test_split_files_are_kept_and_never_changed(tmp_path):
    path = str(tmp_path / "splits" / "mr_fold0.json")
    split = {"train": ["a", "b"], "val": [], "test": ["c"]}
    heldout.write_split(path, split)
    assert json.load(open(path)) == split
    heldout.write_split(path, split)  # the same split: kept
    with pytest.raises(heldout.HeldOutError, match="mr_fold0.json: holds another split"):
        heldout.write_split(path, {"train": ["a"], "val": [], "test": ["b", "c"]})
    assert json.load(open(path)) == split


@pytest.mark.skipif(not os.path.isdir(os.path.join(heldout.SHARED, heldout.MR_FOLDER)),
                    reason="../shared/data/chaos_t2_mr is not there")
def test_the_real_split_files(tmp_path):
    files = heldout.splits(str(tmp_path), 4, n_val=3)
    folds = [json.load(open(p)) for p in files["mr"]]
    tested = [n for f in folds for n in f["test"]]
    assert len(tested) == len(set(tested)) == 20
    assert all(not set(f["train"]) & set(f["test"]) for f in folds)
    assert all(len(f["val"]) == 3 and not set(f["val"]) & set(f["test"]) for f in folds)
    assert json.load(open(files["ct"])) == {"train": ["ct_0001"], "val": [], "test": ["series"]}


def test_a_class_absent_from_a_case_is_reported_absent(tmp_path):
    """The DICOM patient has no kidney: its kidney Dice (1 when nothing is predicted, 0
    otherwise) is neither counted nor averaged; the case's average is over its organs."""
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"cases": [
        {"name": "series", "class_voxels": {"0": 9, "1": 5, "2": 0, "3": 4}},
        {"name": "ct_0001", "class_voxels": {"0": 9, "1": 5, "2": 3, "3": 4}}]}))
    absent = heldout.absent_classes(str(dataset))
    assert absent == {"series": {2}, "ct_0001": set()}
    report = {"classes": ["liver", "kidney", "spleen"],
              "ct": {"cases": [{"case": "series", "dice": {"liver": 0.8, "kidney": 1.0,
                                                           "spleen": 0.4},
                                "assd": {"liver": 2.0, "kidney": 0.0, "spleen": 3.0},
                                "hd95": {"liver": 5.0, "kidney": 0.0, "spleen": 6.0}}]}}
    rows = heldout.patient_rows(report, {"ct": absent}, scheme="ummkd", seed=0, fold=0)
    kidney = [r for r in rows if r["class"] == "kidney"]
    assert kidney == [{"scheme": "ummkd", "seed": 0, "fold": 0, "protocol": "prepared",
                       "modality": "ct", "case": "series", "class": "kidney", "absent": True,
                       "dice": None, "assd": None, "hd95": None}]
    assert heldout.per_patient(rows, "prepared", "ct", "ummkd") == {"series": pytest.approx(0.6)}
    assert heldout.per_patient(rows, "prepared", "ct", "ummkd", "kidney") == {}
    heldout.write_rows(str(tmp_path / "comparison.csv"), rows)
    lines = open(tmp_path / "comparison.csv").read().splitlines()
    assert lines[0] == "scheme,seed,fold,protocol,modality,case,class,absent,dice,assd,hd95"
    assert "ummkd,0,0,prepared,ct,series,kidney,1,,," in lines


@pytest.mark.parametrize("differences, statistic, p", [
    # all 5 positive: W- = 0; of the 2^5 sign patterns only "all +" and "all -" are as
    # extreme, two-sided p = 2 / 32
    ([0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 2 / 32),
    # ranks 1..6, rank 1 negative: W- = 1; P(W- <= 1) = |{{}, {1}}| / 2^6, two-sided x 2
    ([-0.01, 0.02, 0.03, 0.04, 0.05, 0.06], 1.0, 2 * 2 / 64),
])
def test_the_paired_test_on_hand_worked_examples(differences, statistic, p):
    b = {f"p{i}": 0.5 for i in range(len(differences))}
    a = {k: v + d for (k, v), d in zip(b.items(), differences)}
    a["only_in_a"] = 0.9  # not paired: left out
    got = heldout.paired_test(a, b)
    assert got["n"] == len(differences)
    assert got["mean_difference"] == pytest.approx(np.mean(differences))
    assert got["statistic"] == pytest.approx(statistic)
    assert got["p"] == pytest.approx(p)
    one = heldout.paired_test({"x": 0.7}, {"x": 0.5})  # a single patient: no test
    assert one["n"] == 1 and one["p"] is None


def test_the_tables_report_absent_classes_and_the_paired_tests():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare", os.path.join(ROOT, "experiments", "compare.py"))
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    rows = []
    for scheme, shift in (("ummkd", 0.1), ("joint", 0.0)):
        for i in range(5):
            rows.append({"scheme": scheme, "seed": 0, "fold": i % 2, "protocol": "prepared",
                         "modality": "mr", "case": f"p{i}", "class": "liver", "absent": False,
                         "dice": 0.5 + 0.01 * i + shift, "assd": 1.0, "hd95": 2.0})
        for fold in (0, 1):  # the one CT patient, tested by both folds; no kidney
            rows += [{"scheme": scheme, "seed": 0, "fold": fold, "protocol": "prepared",
                      "modality": "ct", "case": "series", "class": name, "absent": absent,
                      "dice": None if absent else 0.6 + shift + 0.1 * fold, "assd": None,
                      "hd95": None} for name, absent in (("liver", False), ("kidney", True))]
    text = compare.heldout_tables(rows, ["ummkd", "joint"], ["liver", "kidney"],
                                  {"ummkd": 10, "joint": 5}, ["a note"])
    # MR: 5 patients, UMMKD 0.1 better on each: W- = 0, p = 2 / 2^5
    assert "| joint | +0.100, p 0.0625 (n=5) | absent | +0.100, p 0.0625 (n=5) |" in text
    # CT: the patient's two tests (0.7, 0.8 for UMMKD), kidney absent, no test with 1 patient
    assert "| ummkd | 10 | 0.750 ± 0.050 (2, 1) | absent | 0.750 ± 0.050 (2, 1) |" in text
    assert "| joint | +0.100, p n/a (n=1) | absent | +0.100, p n/a (n=1) |" in text


def test_the_per_patient_figure_is_drawn(tmp_path):
    rows = [{"scheme": s, "seed": 0, "fold": 0, "protocol": "prepared", "modality": m,
             "case": f"p{i}", "class": "liver", "absent": False, "dice": 0.5 + 0.1 * i,
             "assd": 1.0, "hd95": 2.0}
            for s in ("ummkd", "separate_bn") for m in ("mr", "ct") for i in range(3)]
    path = tmp_path / "comparison.png"
    heldout.paired_figure(str(path), rows, "prepared", ["ummkd", "separate_bn"], title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_seed_spread_is_each_seed_alone():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare", os.path.join(ROOT, "experiments", "compare.py"))
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    rows = [{"scheme": "ummkd", "seed": seed, "fold": 0, "protocol": "prepared",
             "modality": "mr", "case": case, "class": "liver", "absent": False,
             "dice": dice, "assd": None, "hd95": None}
            for seed, case, dice in ((0, "a", 0.5), (0, "b", 0.7), (1, "a", 0.4), (1, "b", 0.5))]
    # seed 0: (0.5 + 0.7) / 2 = 0.6; seed 1: (0.4 + 0.5) / 2 = 0.45; spread 0.15
    assert heldout.seed_means(rows, "prepared", "mr", "ummkd") == pytest.approx({0: 0.6, 1: 0.45})
    text = compare.heldout_tables(rows, ["ummkd"], ["liver"], {"ummkd": 1}, [])
    assert "| ummkd | 0.600 | 0.450 | - | - | 0.150 | - |" in text
    assert "Seed spread" not in compare.heldout_tables(rows[:2], ["ummkd"], ["liver"], {}, [])


def test_learning_curves_read_the_validation_lines(tmp_path):
    run = tmp_path / "fold0"
    run.mkdir()
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 10, "loss/total": 1.0}, {"step": 10, "volumes/score": 0.4},
        {"step": 20, "volumes/score": 0.6}]) + "\n")
    empty = tmp_path / "none"
    empty.mkdir()
    path = str(tmp_path / "curves.png")
    heldout.learning_curves(path, {"fold 0": str(run), "no validation": str(empty)})
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
