"""Tests of lib/prep.py: each preprocessing step against known answers, and the inverse.

Synthetic volumes are tiny; the real CT/MR pair (../shared/data/abdomen_real) is used when
present, prepared at 64 x 64 to stay fast.
"""
import importlib.util
import json
import os

import nibabel as nib
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from lib import prep  # noqa: E402
from lib.data import DataError, load_volume  # noqa: E402

REAL = os.path.join(REPO, "..", "shared", "data", "abdomen_real")
REAL_MAP = {5: 1, 2: 2, 3: 3, 1: 4}


def _load_prepare_module():
    spec = importlib.util.spec_from_file_location("prepare_cli", os.path.join(REPO, "data",
                                                                             "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- helpers
def ras_affine(spacing, origin):
    aff = np.diag(list(spacing) + [1.0])
    aff[:3, 3] = origin
    return aff


def as_lps(arr_ras, aff_ras):
    """The same scan stored LPS: axes 0 and 1 reversed, affine adjusted to match."""
    nx, ny = arr_ras.shape[:2]
    flip = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return np.ascontiguousarray(arr_ras[::-1, ::-1]), aff_ras @ flip


def as_sar(arr_ras, aff_ras):
    """The same scan stored with axes permuted (z, y, x): orientation codes SAR."""
    perm = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    return np.ascontiguousarray(arr_ras.transpose(2, 1, 0)), aff_ras @ perm


def save(path, arr, aff, sform_code=2, qform_code=0):
    img = nib.Nifti1Image(arr, aff)
    img.header.set_sform(aff, sform_code)
    img.header.set_qform(aff, qform_code)
    nib.save(img, str(path))
    return str(path)


def synthetic_case(rng, shape=(40, 20, 6)):
    """Canonical (RAS) image and label: organ 5 (with id 2 inside), stray id 9 elsewhere."""
    image = rng.normal(100.0, 20.0, size=shape).astype(np.float32)
    label = np.zeros(shape, np.int16)
    label[15:25, 7:13, 1:5] = 5
    label[16:19, 8:10, 2:4] = 2
    label[2:4, 1:3, 0] = 9
    image[label == 5] += 200.0
    return image, label


def dice(a, b):
    return 2.0 * np.sum(a & b) / max(np.sum(a) + np.sum(b), 1)


# ----------------------------------------------------------------------------- reading
def test_reorientation_lps_sar_and_ras_give_identical_canonical_arrays(tmp_path):
    rng = np.random.default_rng(0)
    image, label = synthetic_case(rng)
    aff = ras_affine((1.0, 2.0, 3.0), (-12.5, 30.25, -100.0))
    got = {}
    for codes, store in (("RAS", lambda a, f: (a, f)), ("LPS", as_lps), ("SAR", as_sar)):
        img_s, aff_s = store(image, aff)
        lab_s, _ = store(label, aff)
        case = prep.read_case(save(tmp_path / f"{codes}_i.nii.gz", img_s, aff_s),
                              save(tmp_path / f"{codes}_l.nii.gz", lab_s, aff_s))
        assert case.orientation == codes
        assert case.original_shape == img_s.shape
        np.testing.assert_allclose(case.original_affine, aff_s, atol=1e-5)
        # nibabel's own canonical form is the reference
        ref = nib.as_closest_canonical(nib.Nifti1Image(img_s, aff_s))
        np.testing.assert_allclose(case.canonical_affine, ref.affine, atol=1e-5)
        np.testing.assert_array_equal(case.image, np.asarray(ref.dataobj))
        got[codes] = case
    for codes in ("LPS", "SAR"):
        np.testing.assert_array_equal(got[codes].image, got["RAS"].image)
        np.testing.assert_array_equal(got[codes].label, got["RAS"].label)
        np.testing.assert_allclose(got[codes].canonical_affine, aff, atol=1e-5)
    assert got["SAR"].spacing == pytest.approx((1.0, 2.0, 3.0))
    # and back: from_canonical restores the stored arrays exactly
    np.testing.assert_array_equal(prep.from_canonical(got["SAR"].label, "SAR"),
                                  as_sar(label, aff)[0])


def _message(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_read_case_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(1)
    image, label = synthetic_case(rng)
    aff = ras_affine((1.0, 2.0, 3.0), (0.0, 0.0, 0.0))
    img = save(tmp_path / "img.nii.gz", image, aff)
    lab = save(tmp_path / "lab.nii.gz", label, aff)

    with pytest.raises(DataError) as err:
        prep.read_case(str(tmp_path / "missing.nii.gz"), lab)
    assert "missing.nii.gz" in _message(err) and "does not exist" in _message(err)

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    with pytest.raises(DataError) as err:
        prep.read_case(img, str(bad))
    assert _message(err).startswith(str(bad))

    small = save(tmp_path / "small.nii.gz", label[:, :, :5], aff)
    with pytest.raises(DataError) as err:
        prep.read_case(img, small)
    assert "small.nii.gz" in _message(err) and "shape" in _message(err)

    shifted = save(tmp_path / "shifted.nii.gz", label, ras_affine((1.0, 2.0, 3.0), (0.5, 0, 0)))
    with pytest.raises(DataError) as err:
        prep.read_case(img, shifted)
    assert "shifted.nii.gz" in _message(err) and "origin" in _message(err)

    spaced = save(tmp_path / "spaced.nii.gz", label, ras_affine((1.0, 2.0, 3.1), (0, 0, 0)))
    with pytest.raises(DataError) as err:
        prep.read_case(img, spaced)
    assert "spacing" in _message(err)

    # within tolerance (float32 rounding of a header) is accepted
    nearly = save(tmp_path / "nearly.nii.gz", label, ras_affine((1.0, 2.0, 3.0), (1e-5, 0, 0)))
    prep.read_case(img, nearly)

    nan_image = image.copy()
    nan_image[3, 4, 2] = np.nan
    nan_path = save(tmp_path / "nan.nii.gz", nan_image, aff)
    with pytest.raises(DataError) as err:
        prep.read_case(nan_path, lab)
    assert "nan.nii.gz" in _message(err) and "NaN" in _message(err)

    with pytest.raises(DataError) as err:
        prep.read_case(img, img)  # an image passed as the label
    assert "non-integer" in _message(err)


# ----------------------------------------------------------------------------- labels
def test_parse_label_map():
    assert prep.parse_label_map("205:1, 420:2,500:3,820:4") == {205: 1, 420: 2, 500: 3, 820: 4}
    for bad in ("205-1", "205:x", "1:2,1:3", "1:300", ""):
        with pytest.raises(DataError):
            prep.parse_label_map(bad)


def test_map_labels_maps_and_counts_dropped_ids():
    label = np.array([[0, 5, 5, 2], [9, 9, 9, 1], [7, 0, 2, 5]])
    mapped, dropped = prep.map_labels(label, {5: 1, 2: 2, 1: 0})
    np.testing.assert_array_equal(mapped, [[0, 1, 1, 2], [0, 0, 0, 0], [0, 0, 2, 1]])
    assert mapped.dtype == np.uint8
    # 1 is mapped explicitly (to background), so it is not "dropped"; 0 never is
    assert dropped == {9: 3, 7: 1}
    assert prep.class_voxels(mapped, 3) == {"0": 7, "1": 3, "2": 2}


# ----------------------------------------------------------------------------- slice axes
@pytest.mark.parametrize("axis", prep.SLICE_AXES)
def test_slices_last_round_trip(axis):
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    hwd = prep.to_slices_last(vol, axis)
    np.testing.assert_array_equal(prep.from_slices_last(hwd, axis), vol)
    # the index matrix describes the same mapping as the array operation
    mat = prep.slices_last_index_matrix(axis, vol.shape)
    for idx in ((0, 0, 0), (1, 2, 3), tuple(s - 1 for s in hwd.shape)):
        x, y, z = (mat @ np.array(list(idx) + [1.0]))[:3].astype(int)
        assert hwd[idx] == vol[x, y, z]


def test_views_are_radiological():
    vol = np.zeros((4, 5, 6))
    vol[3, 4, :] = 1.0   # patient right (x max) and anterior (y max), every slice
    axial = prep.to_slices_last(vol, "axial")
    assert axial.shape == (5, 4, 6)
    assert np.all(axial[0, 0, :] == 1.0)  # anterior up, patient right on the image left
    vol[:] = 0.0
    vol[3, :, 5] = 1.0   # patient right, superior
    coronal = prep.to_slices_last(vol, "coronal")
    assert coronal.shape == (6, 4, 5) and np.all(coronal[0, 0, :] == 1.0)
    vol[:] = 0.0
    vol[:, 4, 5] = 1.0   # anterior, superior
    sagittal = prep.to_slices_last(vol, "sagittal")
    assert sagittal.shape == (6, 5, 4) and np.all(sagittal[0, 0, :] == 1.0)


# ----------------------------------------------------------------------------- crop, resample
def test_label_crop_box_known_answers():
    label = np.zeros((40, 30, 5), np.uint8)
    label[10:20, 5:11, 2] = 1
    # extent max(10, 6) + 2 * 2 = 14, centred on the labels
    assert prep.label_crop_box(label, margin=2) == (8, 22, 1, 15)
    # anisotropic: 10 px * 1 mm vs 6 px * 2 mm -> 12 mm + 4 mm = 16 mm square
    assert prep.label_crop_box(label, margin=2, spacing_hw=(1.0, 2.0)) == (7, 23, 4, 12)
    # min_size widens to 20; the columns would start at -2 and are shifted inside
    assert prep.label_crop_box(label, margin=0, min_size=20) == (5, 25, 0, 20)
    # near the edge the box shifts inside rather than padding
    edge = np.zeros((40, 30, 2), np.uint8)
    edge[0:4, 26:30, 0] = 1
    assert prep.label_crop_box(edge, margin=3) == (0, 10, 20, 30)
    # larger than the volume: centred, reaching outside on both sides
    assert prep.label_crop_box(edge, margin=20) == (-2, 42, -7, 37)
    with pytest.raises(DataError):
        prep.label_crop_box(np.zeros((5, 5, 2)), margin=1)
    assert prep.center_crop_box((40, 30)) == (0, 40, -5, 35)
    assert prep.center_crop_box((40, 30), size=20, spacing_hw=(1.0, 2.0)) == (10, 30, 10, 20)
    assert prep.labelled_slice_range(label, 1) == (1, 4)
    assert prep.labelled_slice_range(label, 5) == (0, 5)


def test_crop_pads_and_uncrop_inverts():
    vol = np.arange(6 * 5 * 2).reshape(6, 5, 2)
    box = (-1, 7, 1, 4)
    patch = prep.crop_hw(vol, box, fill=-7)
    assert patch.shape == (8, 3, 2)
    assert np.all(patch[0] == -7) and np.all(patch[7] == -7)
    np.testing.assert_array_equal(patch[1:7], vol[:, 1:4])
    back = prep.uncrop_hw(patch, box, vol.shape)
    np.testing.assert_array_equal(back[:, 1:4], vol[:, 1:4])
    assert np.all(back[:, [0, 4]] == 0)


def test_resample_exact_for_integer_factors_and_linear_for_ramps():
    rng = np.random.default_rng(2)
    lab = rng.integers(0, 5, size=(8, 6, 3)).astype(np.uint8)
    up = prep.resample_hw(lab, (16, 18), order=0)
    assert up.dtype == np.uint8
    np.testing.assert_array_equal(up, np.repeat(np.repeat(lab, 2, 0), 3, 1))
    np.testing.assert_array_equal(prep.resample_hw(up, (8, 6), order=0), lab)
    ramp = np.tile(np.arange(8.0)[:, None, None], (1, 4, 2))
    out = prep.resample_hw(ramp, (16, 4), order=1)
    # pixel centres aligned: output i sits at input (i + 0.5) / 2 - 0.5, edges clamp
    expected = np.clip((np.arange(16) + 0.5) / 2 - 0.5, 0, 7)
    np.testing.assert_allclose(out[:, 0, 0], expected, atol=1e-6)
    const = np.full((7, 9, 2), 3.5)
    np.testing.assert_allclose(prep.resample_hw(const, (5, 12)), 3.5, atol=1e-6)


# ----------------------------------------------------------------------------- intensities
def test_clip_percentiles_and_zscore_match_numpy():
    rng = np.random.default_rng(3)
    img = rng.gamma(2.0, 50.0, size=(10, 12, 7)).astype(np.float32)
    clipped, (lo, hi) = prep.clip_percentiles(img)
    assert lo == pytest.approx(img.min())
    assert hi == pytest.approx(np.percentile(img, 98.0))
    np.testing.assert_allclose(clipped, np.clip(img, img.min(), np.percentile(img, 98.0)))
    assert np.mean(img > hi) == pytest.approx(0.02, abs=0.002)
    _, (lo5, hi90) = prep.clip_percentiles(img, 5.0, 90.0)
    assert (lo5, hi90) == pytest.approx(tuple(np.percentile(img, [5.0, 90.0])))
    z, mean, std = prep.zscore(clipped)
    assert mean == pytest.approx(float(np.mean(clipped, dtype=np.float64)))
    assert std == pytest.approx(float(np.std(clipped, dtype=np.float64)))
    assert z.mean() == pytest.approx(0.0, abs=1e-5) and z.std() == pytest.approx(1.0, abs=1e-5)
    flat, _, flat_std = prep.zscore(np.full((3, 3, 3), 7.0))
    assert flat_std == 0.0 and np.all(flat == 0.0)
    with pytest.raises(ValueError):
        prep.clip_percentiles(img, 50.0, 40.0)


# ----------------------------------------------------------------------------- slices
def test_stack_slices_replicates_edges():
    vol = np.arange(2 * 2 * 4, dtype=np.float32).reshape(2, 2, 4)
    first = prep.stack_slices(vol, 0)
    assert first.shape == (2, 2, 3)
    np.testing.assert_array_equal(first, vol[:, :, [0, 0, 1]])
    np.testing.assert_array_equal(prep.stack_slices(vol, 2), vol[:, :, [1, 2, 3]])
    np.testing.assert_array_equal(prep.stack_slices(vol, 3), vol[:, :, [2, 3, 3]])
    with pytest.raises(IndexError):
        prep.stack_slices(vol, 4)


# ----------------------------------------------------------------------------- inverse
def test_restore_prediction_synthetic_lps_exact(tmp_path):
    rng = np.random.default_rng(4)
    image, label = synthetic_case(rng)
    aff = ras_affine((1.0, 2.0, 3.0), (-12.5, 30.25, -100.0))
    img_s, aff_s = as_lps(image, aff)
    lab_s, _ = as_lps(label, aff)
    case = prep.read_case(save(tmp_path / "i.nii.gz", img_s, aff_s, 1, 1),
                          save(tmp_path / "l.nii.gz", lab_s, aff_s, 1, 1))
    assert case.orientation == "LPS"
    label_map = {5: 1, 2: 2}
    # labels span 12 mm (H, 2 mm rows) by 10 mm (W, 1 mm columns); + 2 x 10 mm margin is a
    # 32 mm square = 16 x 32 voxels, resampled to 32 x 32: factor 2 and identity, exact
    prepared_img, prepared_lab, record = prep.prepare_volume(case, label_map, image_size=32,
                                                             margin=10.0)
    assert record["crop_box"] == [2, 18, 4, 36]
    assert prepared_img.shape == prepared_lab.shape == (32, 32, 6)
    assert record["prepared"]["spacing"] == pytest.approx([1.0, 1.0, 3.0])
    assert record["dropped_ids"] == {"9": 4}
    record = json.loads(json.dumps(record))  # must survive dataset.json

    restored = prep.restore_prediction(prepared_lab, record)
    expected, _ = prep.map_labels(lab_s, label_map)
    assert restored.shape == lab_s.shape
    assert restored.get_data_dtype() == np.uint8
    np.testing.assert_allclose(restored.affine, aff_s, atol=1e-5)
    assert int(restored.header["sform_code"]) == 1 and int(restored.header["qform_code"]) == 1
    np.testing.assert_array_equal(np.asarray(restored.dataobj), expected)

    # probabilities come back linearly: one-hot labels whose rows were replicated 2x by the
    # preparation average back to one-hot, so their argmax is the same exact label map;
    # outside the crop box the background has probability 1
    one_hot = np.eye(3, dtype=np.float32)[prepared_lab]
    probs = prep.restore_probabilities(one_hot, record)
    assert probs.shape == lab_s.shape + (3,) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.argmax(probs, -1), expected)
    outside = prep.from_canonical(prep.from_slices_last(
        prep.uncrop_hw(np.ones((16, 32, 6)), record["crop_box"], record["slices_last_shape"]),
        "axial"), "LPS") == 0
    assert outside.any() and np.all(probs[outside] == [1.0, 0.0, 0.0])
    nii = prep.scan_nifti(probs, record, np.float32)
    assert nii.shape == lab_s.shape + (3,)
    np.testing.assert_allclose(nii.affine, aff_s, atol=1e-5)

    # the prepared affine puts every prepared voxel where its label came from
    prep_aff = np.array(record["prepared"]["affine"])
    idx = np.argwhere(np.ones(prepared_lab.shape, bool))
    world = prep_aff @ np.c_[idx, np.ones(len(idx))].T
    orig = np.rint(np.linalg.inv(aff_s) @ world).astype(int)[:3]
    inside = np.all((orig >= 0) & (orig < np.array(lab_s.shape)[:, None]), axis=0)
    np.testing.assert_array_equal(prepared_lab[tuple(idx[inside].T)],
                                  expected[tuple(orig[:, inside])])
    zooms = np.linalg.norm(prep_aff[:3, :3], axis=0)
    np.testing.assert_allclose(zooms, record["prepared"]["spacing"])

    # the ground truth route: canonical mapped label straight back to the original grid
    mapped_canonical, _ = prep.map_labels(case.label, label_map)
    gt = prep.original_nifti(mapped_canonical, record)
    np.testing.assert_array_equal(np.asarray(gt.dataobj), expected)
    with pytest.raises(ValueError):
        prep.restore_prediction(prepared_lab[:, :, :3], record)


# ----------------------------------------------------------------------------- real data
def _require_real():
    if not os.path.isdir(REAL):
        pytest.skip("real abdominal pair not present at ../shared/data/abdomen_real")


def test_real_pair_prepare_and_restore(tmp_path):
    _require_real()
    import SimpleITK as sitk

    prepare = _load_prepare_module().prepare
    for modality in ("ct", "mr"):
        image = os.path.join(REAL, f"{modality}_0001_image.nii.gz")
        label = os.path.join(REAL, f"{modality}_0001_label.nii.gz")
        out = tmp_path / modality
        dataset = prepare([(image, label, None)], REAL_MAP, str(out), modality=modality,
                          split={"test": [f"{modality}_0001"]}, image_size=64,
                          log=lambda *_: None)
        name = f"{modality}_0001"
        with open(out / "dataset.json", encoding="utf-8") as handle:
            (record,) = json.load(handle)["cases"]
        assert record["name"] == name and record["split"] == "test"
        assert record == json.loads(json.dumps(dataset["cases"][0]))
        assert record["original"]["orientation"] == ("RAS" if modality == "ct" else "LPS")
        pred = np.asarray(nib.load(out / "test" / f"{name}_label.nii.gz").dataobj)
        restored_path = tmp_path / f"{name}_restored.nii.gz"
        nib.save(prep.restore_prediction(pred, record), restored_path)

        orig_nib, rest_nib = nib.load(label), nib.load(restored_path)
        assert rest_nib.shape == orig_nib.shape
        np.testing.assert_allclose(rest_nib.affine, orig_nib.affine, atol=1e-4)
        orig_itk, rest_itk = sitk.ReadImage(label), sitk.ReadImage(str(restored_path))
        assert rest_itk.GetSize() == orig_itk.GetSize()
        np.testing.assert_allclose(rest_itk.GetSpacing(), orig_itk.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(rest_itk.GetOrigin(), orig_itk.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(rest_itk.GetDirection(), orig_itk.GetDirection(), atol=1e-6)

        expected, _ = prep.map_labels(np.asarray(orig_nib.dataobj), REAL_MAP)
        restored = np.asarray(rest_nib.dataobj)
        scores = {c: dice(restored == c, expected == c) for c in range(1, 5)}
        assert scores[1] > 0.9, scores  # liver
        assert min(scores.values()) > 0.85, scores
        gt = np.asarray(nib.load(out / "test" / f"{name}_gt.nii.gz").dataobj)
        np.testing.assert_array_equal(gt, expected)

        # the .npz test file reads back (with the original reader's flip) as the NIfTI pair
        vol_npz = load_volume(str(out / "test" / f"{name}.npz"))
        vol_nii = load_volume(f"{out / 'test' / name}_image.nii.gz,"
                              f"{out / 'test' / name}_label.nii.gz")
        np.testing.assert_array_equal(vol_npz.image, vol_nii.image)
        np.testing.assert_array_equal(vol_npz.label, vol_nii.label)
        assert vol_nii.spacing == pytest.approx(tuple(record["prepared"]["spacing"]), abs=1e-4)
        assert abs(float(vol_nii.image.mean())) < 0.5
