"""PHASE "predict": segmenting scans without labels (lib/predict.py, lib.pipeline._predict)."""
import csv
import json
import os
import re

import nibabel as nib
import numpy as np
import pytest

from lib import predict
from lib.data import DataError

AFFINE = np.array([[-1.5, 0, 0, 90.0], [0, 1.5, 0, -60.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])


def scan(path, shape=(40, 36, 12), affine=AFFINE, seed=0):
    """A phantom scan: a bright box (the "organ") in noise; returns its path."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 0.1, shape).astype(np.float32)
    image[10:25, 8:20, 3:9] += 3.0
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return str(path)


def threshold(modality, image, probabilities=False):
    """A stand-in network: class 1 where the prepared (z-scored) image is bright (with
    ``probabilities``: one-hot [S, S, D, 2])."""
    assert modality == "ct" and image.dtype == np.float32
    labels = (image > 1.0).astype(np.uint8)
    return np.eye(2, dtype=np.float32)[labels] if probabilities else labels


PREPARATION = {"image_size": 32, "slice_axis": "axial", "clip_lower": 0.0, "clip_upper": 98.0,
               "crop_size_mm": None, "training_crop": "center", "source": "test"}


# ---------------------------------------------------------------------- inputs
def test_find_scans_files_folders_and_bad_inputs(tmp_path):
    (tmp_path / "in").mkdir()
    a = scan(tmp_path / "in" / "a.nii.gz")
    b = scan(tmp_path / "in" / "b.nii")
    (tmp_path / "in" / "notes.txt").write_text("not a scan")
    assert predict.find_scans([str(tmp_path / "in")]) == [a, b]  # sorted, other files skipped
    assert predict.find_scans([b]) == [b]
    assert predict.scan_name(a) == "a" and predict.scan_name(b) == "b"
    (tmp_path / "empty").mkdir()
    for inputs, message in [([str(tmp_path / "empty")], "no scans in this folder"),
                            ([str(tmp_path / "in" / "notes.txt")], "not a scan"),
                            ([str(tmp_path / "missing.nii.gz")], "does not exist"),
                            ([a, str(tmp_path / "in")], "two scans named 'a'")]:
        with pytest.raises(DataError, match=message) as err:
            predict.find_scans(inputs)
        assert "\n" not in str(err.value)


def test_outputs_inside_the_input_or_existing_are_refused(tmp_path):
    a = scan(tmp_path / "a.nii.gz")
    with pytest.raises(DataError, match="the output folder is inside the input folder"):
        predict.check_outputs([a], [str(tmp_path)], str(tmp_path / "out"), False)
    out = tmp_path.parent / f"{tmp_path.name}_out"
    predict.check_outputs([a], [a], str(out), False)  # beside the input: fine
    out.mkdir(exist_ok=True)
    (out / "a_seg.nii.gz").write_bytes(b"old")
    with pytest.raises(DataError, match="a_seg.nii.gz: exists already.*--predict_overwrite"):
        predict.check_outputs([a], [a], str(out), False)
    predict.check_outputs([a], [a], str(out), True)
    assert (out / "a_seg.nii.gz").read_bytes() == b"old"  # checking never touches it


@pytest.mark.parametrize("shape, message", [((40, 36, 1), "a 2D image"),
                                            ((40, 36), "expected a 3D volume")])
def test_a_2d_image_is_refused(tmp_path, shape, message):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), AFFINE), str(path))
    with pytest.raises(DataError, match=message):
        predict.read_scan(str(path))


def test_an_unreadable_file_is_refused(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="broken.nii.gz: cannot read"):
        predict.read_scan(str(path))


# ---------------------------------------------------------------------- preparation
def test_recorded_preparation_of_label_crops_is_their_mean_extent(tmp_path):
    import json

    cases = [{"split": "train", "crop_box": [10, 50, 0, 30], "slices_last_spacing": [1.5, 1.0, 2]},
             {"split": "val", "crop_box": [0, 20, 0, 40], "slices_last_spacing": [1.0, 2.0, 2]},
             {"split": "test", "crop_box": [0, 99, 0, 99], "slices_last_spacing": [9.0, 9.0, 2]}]
    settings = {"crop": "label", "crop_size_mm": None, "image_size": 64, "slice_axis": "axial",
                "clip_lower_percentile": 0.5, "clip_upper_percentile": 99.0}
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"settings": settings, "cases": cases}))
    got = predict.recorded_preparation(str(path))
    # train: max(40 x 1.5, 30 x 1.0) = 60 mm; val: max(20 x 1.0, 40 x 2.0) = 80 mm; test not used
    assert got["crop_size_mm"] == pytest.approx(70.0)
    assert (got["image_size"], got["slice_axis"], got["clip_lower"], got["clip_upper"]) == (
        64, "axial", 0.5, 99.0)
    path.write_text(json.dumps({"settings": dict(settings, crop="center", crop_size_mm=120.0),
                                "cases": cases}))
    assert predict.recorded_preparation(str(path))["crop_size_mm"] == 120.0
    path.write_text("{}")
    with pytest.raises(DataError, match="not a dataset.json of data/prepare.py"):
        predict.recorded_preparation(str(path))


# ---------------------------------------------------------------------- geometry
def test_masks_have_the_scan_geometry_and_any_orientation_gives_the_same_mask(tmp_path):
    """The mask of a scan has its exact shape and affine; the same scan stored LPS (axes
    flipped) gives the same mask, voxel for voxel, once reoriented. The box is where the
    scan is bright, so the mask is right too."""
    ras = scan(tmp_path / "ras.nii.gz")
    data = np.asarray(nib.load(ras).dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    lps = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(data[::-1, ::-1].copy(), AFFINE @ flip), str(lps))
    out = tmp_path.parent / f"{tmp_path.name}_pred"
    rows = predict.predict_scans(threshold, "ct", [ras, str(lps)], str(out), PREPARATION,
                                 ["organ"], log=lambda m: None, progress=False,
                                 probabilities=True)
    masks = {}
    for name, path in (("ras", ras), ("lps", str(lps))):
        mask, src = nib.load(str(out / f"{name}_seg.nii.gz")), nib.load(path)
        assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
        assert mask.get_data_dtype() == np.uint8
        masks[name] = np.asarray(mask.dataobj)
        # the probabilities: [X, Y, Z, 2] in the same geometry, summing to 1, argmax = mask
        probs = nib.load(str(out / f"{name}_prob.nii.gz"))
        assert probs.shape == src.shape + (2,) and np.allclose(probs.affine, src.affine)
        p = np.asarray(probs.dataobj)
        assert np.allclose(p.sum(-1), 1.0, atol=1e-5)
        assert np.array_equal(np.argmax(p, -1), masks[name])
    assert np.array_equal(masks["lps"][::-1, ::-1], masks["ras"])
    truth = np.zeros(data.shape, bool)
    truth[10:25, 8:20, 3:9] = True
    dice = 2 * np.sum(truth & (masks["ras"] == 1)) / (truth.sum() + (masks["ras"] == 1).sum())
    assert dice > 0.9
    # volumes.csv: the volume of the mask, voxels x 1.5 x 1.5 x 2.0 mm^3
    expected = float((masks["ras"] == 1).sum()) * 4.5 / 1000.0
    assert rows[0]["organ_ml"] == pytest.approx(expected, abs=1e-3)
    with open(out / "volumes.csv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [r["case"] for r in table] == ["ras", "lps"]
    assert float(table[1]["organ_ml"]) == pytest.approx(expected, abs=1e-3)


def test_class_volumes_in_ml():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[:2] = 1
    labels[3, 3, 3] = 2
    affine = np.diag([2.0, 2.0, 2.5, 1.0])  # 10 mm^3 per voxel
    assert predict.class_volumes_ml(labels, affine, ["a", "b", "c"]) == pytest.approx({
        "a": 32 * 10 / 1000, "b": 10 / 1000, "c": 0.0})


# ---------------------------------------------------------------------- the phase
def test_predict_phase_end_to_end_and_its_errors(tiny_data, tmp_path, capsys):
    """Train a tiny run on prepared data, then segment an unlabelled scan with it; the
    errors that need no work come before any model is built."""
    import main_combine
    from conftest import tiny_overrides
    from lib.cli import main

    from data.prepare import prepare

    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    cases = []
    for k in range(3):
        image = rng.normal(0, 0.1, (20, 20, 6)).astype(np.float32)
        label = np.zeros((20, 20, 6), np.uint8)
        label[5:12, 6:14, 1:5] = 1
        image[label == 1] += 2.0
        nib.save(nib.Nifti1Image(image, np.diag([1.2, 1.2, 2.0, 1])), str(raw / f"c{k}_image.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.diag([1.2, 1.2, 2.0, 1])), str(raw / f"c{k}_label.nii.gz"))
        cases.append((str(raw / f"c{k}_image.nii.gz"), str(raw / f"c{k}_label.nii.gz"), f"c{k}"))
    for m in ("mr", "ct"):
        prepare(cases, {1: 1}, str(tmp_path / m), modality=m,
                split={"c0": "train", "c1": "train", "c2": "test"}, image_size=16,
                overwrite=True, log=lambda *a, **k: None)
    lists = {m: {"train": str(tmp_path / m / "train_list.txt"), "val": "",
                 "test": str(tmp_path / m / "test_list.txt")} for m in ("mr", "ct")}
    out = str(tmp_path / "run")

    def run(*extra):
        args = tiny_overrides(lists, out, n_class=2, class_names="organ", **dict(extra))
        return main(vars(main_combine), main_combine.network, args, main_combine.PRESETS,
                    main_combine._ROOT)

    assert run(("phase", "train"), ("num_steps", 2), ("source_val_list", ""),
               ("target_val_list", "")) == 0
    # The test phase also scores each test case in its original scan's geometry: the scan
    # segmented as the predict phase would, against the full-resolution label map.
    assert run(("phase", "test")) == 0
    report = json.load(open(os.path.join(out, "results", "metrics.json"), encoding="utf-8"))
    for m in ("mr", "ct"):
        (case,) = report["scan_geometry"][m]["cases"]
        # both modalities test a case "c2": each keeps its own files
        scan_mask = nib.load(os.path.join(out, "results", "predictions", f"{m}_c2_scan.nii.gz"))
        assert os.path.isfile(os.path.join(out, "results", "predictions", f"{m}_c2_pred.nii.gz"))
        dataset = json.load(open(tmp_path / m / "dataset.json", encoding="utf-8"))
        (record,) = [c for c in dataset["cases"] if c["name"] == "c2"]
        gt = np.asarray(nib.load(str(tmp_path / m / record["files"]["gt"])).dataobj) == 1
        pred = np.asarray(scan_mask.dataobj) == 1
        assert scan_mask.shape == (20, 20, 6)
        expected = 2 * np.sum(pred & gt) / (pred.sum() + gt.sum())
        assert case["case"] == "c2" and case["dice"]["organ"] == pytest.approx(expected)
    assert os.path.exists(os.path.join(out, "results", "metrics_scan_geometry.csv"))
    # ... and the CT mask is the predict phase's (PREDICT_MODALITY ct)
    scan_mask = nib.load(os.path.join(out, "results", "predictions", "ct_c2_scan.nii.gz"))
    same = str(tmp_path / "same")
    assert run(("phase", "predict"), ("predict_input", str(raw / "c2_image.nii.gz")),
               ("predict_output", same)) == 0
    assert np.array_equal(np.asarray(nib.load(os.path.join(same, "c2_image_seg.nii.gz")).dataobj),
                          np.asarray(scan_mask.dataobj))
    # PHASE "export": the SavedModel (its round trip: tests/test_export.py) with how each
    # modality's scans are prepared; an existing export is kept
    assert run(("phase", "export")) == 0
    described = json.load(open(os.path.join(out, "saved_model", "export.json"), encoding="utf-8"))
    assert described["checkpoint"].endswith("model-2")
    assert set(described["preparation"]) == {"ct", "mr"}
    assert described["preparation"]["ct"]["image_size"] == 16
    assert run(("phase", "export")) == 2
    assert re.search(r"saved_model: exists already", capsys.readouterr().err)
    new = scan(tmp_path / "new_ct.nii.gz", shape=(24, 22, 7), affine=np.diag([1.2, 1.2, 2, 1]))
    capsys.readouterr()
    pred_dir = str(tmp_path / "masks")
    assert run(("phase", "predict"), ("predict_input", new), ("predict_output", pred_dir)) == 0
    mask = nib.load(os.path.join(pred_dir, "new_ct_seg.nii.gz"))
    assert mask.shape == (24, 22, 7) and np.allclose(mask.affine, nib.load(new).affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert "segmenting 1 ct scan(s)" in capsys.readouterr().out
    for extra, message in [
        ((("predict_input", new), ("predict_output", pred_dir)), "exists already"),
        ((("predict_input", str(tmp_path / "none.nii.gz")),), "none.nii.gz: does not exist"),
        ((("predict_input", new), ("test_model", out + "/checkpoints/model-99")),
         "TEST_MODEL: checkpoint .*model-99 does not exist"),
        ((("predict_input", new), ("feature_base", 4)), "was saved with another network"),
        ((("predict_input", new), ("predict_modality", "pet")), "PREDICT_MODALITY: expected ct or mr"),
        ((), "PREDICT_INPUT: no scans given"),
    ]:
        assert run(("phase", "predict"), *extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert re.search(message, err), (message, err)
    assert open(os.path.join(pred_dir, "volumes.csv")).read().startswith("case,input,shape,organ_ml")


# ---------------------------------------------------------------------- inference
def test_gaussian_weights_are_nnunets():
    from lib.evaluate import gaussian_weights

    w = gaussian_weights((8, 4, 16))
    ref = np.ones((8, 4, 16))
    for axis, n in enumerate((8, 4, 16)):
        g = np.exp(-((np.arange(n) - (n - 1) / 2) ** 2) / (2 * (n / 8) ** 2))
        ref = ref * g.reshape([-1 if a == axis else 1 for a in range(3)])
    assert np.allclose(w, ref / ref.max(), rtol=1e-6) and w.max() == pytest.approx(1.0)


def test_overlapping_windows_are_blended_by_their_gaussian_weights():
    """Depth 12, slabs of 8 at depths 0 and 4: the first window says class 0, the second
    class 1. Where they overlap (4..7) the window whose centre is nearer wins: 0 at 4 and 5,
    1 at 6 and 7 (plain averaging would tie everywhere there)."""
    import tensorflow as tf

    from lib.evaluate import predict_volume_3d

    calls = []

    def fake(modality):
        def fn(x):
            probs = np.zeros((*x.shape[:-1], 2), np.float32)
            probs[..., len(calls) % 2] = 1.0
            calls.append(1)
            return tf.constant(probs)
        return fn

    image = np.zeros((8, 8, 12), np.float32)
    pred = predict_volume_3d(fake, "ct", image, (8, 8, 8), 2, stride_d=4)
    assert len(calls) == 2
    assert pred[0, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]


def test_mirroring_is_the_mean_of_the_flipped_predictions():
    import tensorflow as tf

    from lib.evaluate import mirrored

    rng = np.random.default_rng(0)
    ramp = rng.normal(size=(1, 5, 6, 3)).astype(np.float32)  # position-dependent: not symmetric

    def fn(x):
        return tf.nn.softmax(x * 2.0 + ramp, axis=-1)

    x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)

    def numpy_fn(a):
        e = np.exp(a * 2.0 + ramp - (a * 2.0 + ramp).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    expected = np.mean([np.flip(numpy_fn(np.flip(x, f)), f) if f else numpy_fn(x)
                        for f in [(), (1,), (2,), (1, 2)]], axis=0)
    got = np.asarray(mirrored(fn, [1, 2], True)(tf.constant(x)))
    assert np.allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, numpy_fn(x), atol=1e-3)  # it did change the prediction
    assert mirrored(fn, [1, 2], False) is fn
