"""End-to-end tests of data/prepare.py on tiny synthetic scans written into tmp_path.

Runs that check the real command (interpreter start, one-line stderr, exit status) go
through subprocess; the many bad-input variants call the same ``main(argv)`` in-process,
because every subprocess pays a TensorFlow import of several seconds.
"""
import importlib.util
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from lib import prep  # noqa: E402
from lib.data import load_volume, parse_slice, read_list  # noqa: E402

SCRIPT = os.path.join(REPO, "data", "prepare.py")
SHAPE = (24, 20, 8)
AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.5, 0, 20.0], [0, 0, 3.0, -50.0], [0, 0, 0, 1]])


def _module():
    spec = importlib.util.spec_from_file_location("prepare_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PREPARE = _module()


def make_volumes(seed):
    """Image with brighter organs; label ids 5 and 2 (mapped) and 7 (dropped)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[6:14, 5:12, 2:6] = 5
    label[15:19, 12:16, 3:5] = 2
    label[1:3, 1:3, 0:2] = 7
    image = rng.normal(0.0, 30.0, SHAPE) + 150.0 * (label == 5) + 80.0 * (label == 2)
    return image.astype(np.float32), label


def write_nifti(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def write_case(folder, name, seed=0, image=None, label=None, label_affine=AFFINE):
    os.makedirs(folder, exist_ok=True)
    img, lab = make_volumes(seed)
    img = img if image is None else image
    lab = lab if label is None else label
    return (write_nifti(os.path.join(folder, f"{name}_image.nii.gz"), img),
            write_nifti(os.path.join(folder, f"{name}_label.nii.gz"), lab, label_affine))


def run_cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def leftovers(parent):
    """Hidden temporary/backup folders the command may have left next to the output."""
    return [n for n in os.listdir(parent) if n.startswith(".") and (".partial-" in n
                                                                  or ".old-" in n)]


# ----------------------------------------------------------------------------- success
def test_cli_end_to_end(tmp_path):
    cases = [write_case(tmp_path / "in", n, seed=i) for i, n in enumerate("abc")]
    out = tmp_path / "out"
    res = run_cli("--modality", "ct", "--images", *[c[0] for c in cases], "--labels",
                  *[c[1] for c in cases], "--label_map", "5:1,2:2", "--train", "a", "--val", "b",
                  "--test", "c", "--image_size", 32, "--augment_copies", 1, "--out_dir", out)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "error" not in res.stderr
    assert "dropped label ids (id:voxels) 7:8" in res.stdout
    assert leftovers(tmp_path) == []

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["splits"] == {"train": ["a"], "val": ["b"], "test": ["c"]}
    assert dataset["num_classes"] == 3 and dataset["settings"]["image_size"] == 32
    rec = {r["name"]: r for r in dataset["cases"]}["c"]
    assert rec["dropped_ids"] == {"7": 8}
    assert rec["class_voxels"] == {"0": 24 * 20 * 8 - 224 - 32, "1": 224, "2": 32}
    assert rec["original"]["orientation"] == "RAS" and rec["original"]["shape"] == list(SHAPE)

    # training slices: labelled slices 2..5 +- ceil(10 mm / 3 mm) = 4 slices -> all 8, twice
    train = read_list(str(out / "train_list.txt"))
    assert len(train) == 2 * 8
    assert sum("_aug0_" in p for p in train) == 8
    assert all(os.path.isfile(p) for p in train)
    assert os.path.basename(train[0]) == "a_0000.tfrecords"
    import tensorflow as tf

    seen = set()
    for path in train:
        for serialized in tf.data.TFRecordDataset(path):
            image, label = parse_slice(serialized)
            assert image.shape == (32, 32, 3) and label.shape == (32, 32)
            seen |= set(np.unique(label.numpy()).tolist())
    assert seen == {0, 1, 2}

    # validation slices are the stacks of the validation volume
    val_vol = load_volume(read_list(str(out / "val_volume_list.txt"))[0])
    val_files = read_list(str(out / "val_list.txt"))
    for k in (0, 3, 7):
        path = [p for p in val_files if p.endswith(f"b_{k:04d}.tfrecords")][0]
        image, label = parse_slice(next(iter(tf.data.TFRecordDataset(path))))
        np.testing.assert_allclose(image.numpy(), prep.stack_slices(val_vol.image, k))
        np.testing.assert_array_equal(label.numpy(), val_vol.label[:, :, k])

    # test volume: NIfTI and .npz agree, spacing carried in the affine, ground truth exact
    test_entry = read_list(str(out / "test_list.txt"))[0]
    nii = load_volume(test_entry)
    npz = load_volume(read_list(str(out / "test_npz_list.txt"))[0])
    assert nii.image.shape == (32, 32, 8)
    np.testing.assert_array_equal(nii.image, npz.image)
    np.testing.assert_array_equal(nii.label, npz.label)
    assert nii.spacing == pytest.approx(tuple(rec["prepared"]["spacing"]), abs=1e-5)
    # lib/evaluate.py finds the case's record next to the list (for restore_prediction)
    from lib.evaluate import load_test_volumes

    ((volume, found),) = load_test_volumes(str(out / "test_list.txt"))
    assert volume.name == "c" and found is not None and found["name"] == "c"
    # the .npz file has no geometry: its record's spacing makes the distances mm, not voxels
    ((npz_volume, _),) = load_test_volumes(str(out / "test_npz_list.txt"))
    assert npz.spacing is None
    assert npz_volume.spacing == pytest.approx(nii.spacing, abs=1e-5)
    restored = prep.restore_prediction(volume.label, found)
    gt = nib.load(out / "test" / "c_gt.nii.gz")
    np.testing.assert_array_equal(np.asarray(restored.dataobj), np.asarray(gt.dataobj))
    np.testing.assert_array_equal(np.asarray(gt.dataobj),
                                  prep.map_labels(make_volumes(2)[1], {5: 1, 2: 2})[0])
    np.testing.assert_allclose(gt.affine, AFFINE)


def write_dicom_series(folder, arr_xyz, spacing, origin):
    """A DICOM series (one file per slice, identity direction) of an int16 [X, Y, Z] array."""
    import SimpleITK as sitk

    os.makedirs(folder)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr_xyz.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        position = "\\".join(f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        for tag, value in (("0008|0060", "CT"), ("0020|000d", uid + ".1"),
                           ("0020|000e", uid + ".2"), ("0008|0018", f"{uid}.3.{k}"),
                           ("0020|0013", str(k + 1)), ("0020|0032", position),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", str(spacing[2]))):
            piece.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"slice{k:03d}.dcm"))
        writer.Execute(piece)
    return image


def test_cli_dicom_series_input(tmp_path):
    import SimpleITK as sitk

    img, lab = make_volumes(3)
    series = tmp_path / "in" / "patient7"
    dicom = write_dicom_series(str(series), np.rint(img).astype(np.int16), (1.5, 2.0, 3.0),
                               (10.0, -20.0, 5.0))
    label = sitk.GetImageFromArray(np.ascontiguousarray(lab.transpose(2, 1, 0)))
    label.CopyInformation(dicom)
    label_path = str(tmp_path / "in" / "patient7_label.nii.gz")
    sitk.WriteImage(label, label_path)

    case = prep.read_case(str(series), label_path)
    assert case.original["format"] == "dicom" and case.orientation == "LPS"
    np.testing.assert_array_equal(prep.from_canonical(case.image, "LPS"), np.rint(img))

    out = tmp_path / "out"
    res = run_cli("--modality", "ct", "--images", series, "--labels", label_path,
                  "--label_map", "5:1,2:2", "--test", "patient7", "--image_size", 16,
                  "--out_dir", out)
    assert res.returncode == 0, res.stderr
    (record,) = json.loads((out / "dataset.json").read_text())["cases"]
    assert record["name"] == "patient7"
    assert record["original"]["format"] == "dicom"
    gt = sitk.ReadImage(str(out / "test" / "patient7_gt.nii.gz"))
    assert gt.GetSize() == dicom.GetSize()
    np.testing.assert_allclose(gt.GetSpacing(), dicom.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(gt.GetOrigin(), dicom.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(gt.GetDirection(), dicom.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(gt).transpose(2, 1, 0),
                                  prep.map_labels(lab, {5: 1, 2: 2})[0])


# ----------------------------------------------------------------------------- bad input
def _assert_one_line_error(text, *needles):
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("error: ")
    assert "Traceback" not in text
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def test_cli_bad_input_subprocess(tmp_path):
    good = write_case(tmp_path / "in", "good")
    nan_img, _ = make_volumes(0)
    nan_img[3, 3, 3] = np.nan
    bad = write_case(tmp_path / "in", "bad", image=nan_img)
    out = tmp_path / "out"
    res = run_cli("--modality", "mr", "--images", good[0], bad[0], "--labels", good[1], bad[1],
                  "--label_map", "5:1", "--out_dir", out)
    assert res.returncode == 2
    _assert_one_line_error(res.stderr, bad[0], "NaN")
    assert not out.exists() and leftovers(tmp_path) == []

    res = run_cli("--modality", "mr", "--images", good[0], "--label_map", "5:1")
    assert res.returncode == 2
    _assert_one_line_error(res.stderr, "--out_dir")


def _bad_case(kind, folder):
    """Write a broken case; return (image, label, the file the message must name)."""
    img, lab = make_volumes(9)
    if kind == "missing":
        return str(folder / "nowhere_image.nii.gz"), write_case(folder, "m")[1], "nowhere"
    if kind == "unreadable":
        image, label = write_case(folder, "u")
        with open(label, "wb") as handle:
            handle.write(b"garbage, not a NIfTI file")
        return image, label, label
    if kind == "shape":
        image, label = write_case(folder, "s", label=lab[:, :, :7])
        return image, label, label
    if kind == "geometry":
        moved = AFFINE.copy()
        moved[0, 3] += 1.0
        image, label = write_case(folder, "g", label_affine=moved)
        return image, label, label
    if kind == "no_mapped_label":
        image, label = write_case(folder, "e", label=np.where(lab == 7, 7, 0).astype(np.uint8))
        return image, label, label
    if kind == "nan":
        img[0, 0, 0] = np.inf
        image, label = write_case(folder, "n", image=img)
        return image, label, image
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "unreadable", "shape", "geometry",
                                  "no_mapped_label", "nan"])
def test_bad_case_gives_one_line_error_and_writes_nothing(tmp_path, capsys, kind):
    good = write_case(tmp_path / "in", "good")
    image, label, named = _bad_case(kind, tmp_path / "in")
    out = tmp_path / "out"
    # the bad case comes last: every case is checked before anything is written
    code = PREPARE.main(["--modality", "ct", "--images", good[0], image, "--labels", good[1],
                         label, "--label_map", "5:1,2:2", "--out_dir", str(out)])
    assert code == 2
    _assert_one_line_error(capsys.readouterr().err, named)
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("extra, needle", [
    (["--label_map", "5:1,5:2"], "given twice"),
    (["--label_map", "5:1", "--test", "zzz"], "zzz"),
    (["--label_map", "5:1", "--clip_upper", "0"], "percentiles"),
    (["--label_map", "5:1", "--images", "IMAGE", "IMAGE"], "2 image(s) but 1 label(s)"),
])
def test_bad_arguments(tmp_path, capsys, extra, needle):
    image, label = write_case(tmp_path / "in", "a")
    args = ["--modality", "ct", "--images", image, "--labels", label, "--out_dir",
            str(tmp_path / "out")] + [image if a == "IMAGE" else a for a in extra]
    assert PREPARE.main(args) == 2
    _assert_one_line_error(capsys.readouterr().err, needle)
    assert not (tmp_path / "out").exists()


def test_output_inside_input_folder_is_refused(tmp_path, capsys):
    image, label = write_case(tmp_path / "in", "a")
    out = tmp_path / "in" / "prepared"
    assert PREPARE.main(["--modality", "ct", "--images", image, "--labels", label,
                         "--label_map", "5:1", "--out_dir", str(out)]) == 2
    _assert_one_line_error(capsys.readouterr().err, str(out), "inside input folder")
    assert not out.exists()
    # and the other way round: the inputs inside the output folder
    assert PREPARE.main(["--modality", "ct", "--images", image, "--labels", label,
                         "--label_map", "5:1", "--out_dir", str(tmp_path)]) == 2
    _assert_one_line_error(capsys.readouterr().err, "contains input folder")


# ----------------------------------------------------------------------------- overwrite
def test_overwrite_semantics(tmp_path, capsys, monkeypatch):
    image, label = write_case(tmp_path / "in", "a")
    out = tmp_path / "out"
    base = ["--modality", "ct", "--images", image, "--labels", label, "--label_map", "5:1,2:2",
            "--test", "a", "--out_dir", str(out)]
    assert PREPARE.main(base + ["--image_size", "16"]) == 0
    first = (out / "dataset.json").read_text()
    capsys.readouterr()

    assert PREPARE.main(base + ["--image_size", "8"]) == 2
    _assert_one_line_error(capsys.readouterr().err, str(out), "--overwrite")
    assert (out / "dataset.json").read_text() == first

    # a failure half-way through writing leaves the old output untouched
    def broken_save(*_args, **_kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(PREPARE.nib, "save", broken_save)
    assert PREPARE.main(base + ["--image_size", "8", "--overwrite"]) == 1
    assert "disk full" in capsys.readouterr().err
    monkeypatch.undo()
    assert (out / "dataset.json").read_text() == first
    assert leftovers(tmp_path) == []

    assert PREPARE.main(base + ["--image_size", "8", "--overwrite"]) == 0
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["settings"]["image_size"] == 8
    assert nib.load(out / "test" / "a_image.nii.gz").shape == (8, 8, 8)
    assert leftovers(tmp_path) == []

    # a non-empty folder that is not prepared output is never replaced
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert PREPARE.main(base[:-1] + [str(other), "--overwrite"]) == 2
    _assert_one_line_error(capsys.readouterr().err, str(other), "no prepared data")
    assert (other / "keep.txt").read_text() == "mine"


def test_cases_csv_and_fraction_split(tmp_path):
    cases = [write_case(tmp_path / "in", n, seed=i) for i, n in enumerate("abcd")]
    csv_path = tmp_path / "in" / "cases.csv"
    csv_path.write_text("image,label,split\n" + "".join(
        f"{os.path.basename(i)},{os.path.basename(l)},{s}\n"
        for (i, l), s in zip(cases, ["train", "train", "val", "test"])))
    rows = PREPARE.read_cases_csv(str(csv_path))
    assert [r[2] for r in rows] == ["train", "train", "val", "test"]
    assert rows[0][0] == cases[0][0]
    names = ["a", "b", "c", "d"]
    split = PREPARE.fraction_split(names, 0.25, 0.25, seed=1)
    assert sorted(split.values()) == ["test", "train", "train", "val"]
    assert split == PREPARE.fraction_split(names, 0.25, 0.25, seed=1)
    assert PREPARE.resolve_split(names, {"test": ["d"]}) == {"a": "train", "b": "train",
                                                             "c": "train", "d": "test"}
    out = tmp_path / "out"
    dataset = PREPARE.prepare([(i, l, None) for i, l in cases[:2]], "5:1,2:2", str(out),
                              modality="mr", split={"a": "train", "b": "test"}, image_size=16,
                              train_slices="all", label_layout="single", log=lambda *_: None)
    assert dataset["cases"][0]["name"] == "a" and dataset["cases"][0]["num_slice_files"] == 8
    assert dataset["lists"] == {"train": "train_list.txt", "test": "test_list.txt",
                                "test_npz": "test_npz_list.txt"}
