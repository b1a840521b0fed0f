"""Tests of the synthetic CT/MR phantom generator (data/phantom.py)."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data import phantom  # noqa: E402

SHAPE = (48, 48, 24)
SPACING = (4.0, 4.0, 5.0)  # same field of view as the default grid


@pytest.fixture(scope="module")
def subjects():
    """ct and mr of seeds 1 and 2 (each seed: the same anatomy in both modalities)."""
    return {(m, s): phantom.make_subject(m, s, SHAPE, SPACING) for m in ("ct", "mr") for s in (1, 2)}


def canonical(array, affine):
    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(array, affine)).dataobj)


def test_deterministic_and_seed_dependent(subjects):
    for modality in ("ct", "mr"):
        image, label, affine = phantom.make_subject(modality, 1, SHAPE, SPACING)
        ref_image, ref_label, ref_affine = subjects[(modality, 1)]
        np.testing.assert_array_equal(image, ref_image)
        np.testing.assert_array_equal(label, ref_label)
        np.testing.assert_array_equal(affine, ref_affine)
        other_image, other_label, _ = subjects[(modality, 2)]
        assert not np.array_equal(label, other_label)
        assert np.abs(image - other_image).mean() > 10.0


def test_types_shapes_and_labels(subjects):
    for (modality, _), (image, label, affine) in subjects.items():
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == label.shape == SHAPE and affine.shape == (4, 4)
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}
        np.testing.assert_array_equal(image, np.round(image))  # stored as int16 losslessly
        # every class is sizeable: at least 0.1 % of the volume (heart ~ 4 %)
        counts = np.bincount(label.ravel(), minlength=5)
        assert (counts[1:] > 0.001 * label.size).all(), counts
        # each class is seen in several axial slices
        slices = [(label == c).any(axis=(0, 1)).sum() for c in range(1, 5)]
        assert min(slices) >= 4, slices


def test_ct_intensities(subjects):
    for seed in (1, 2):
        image, label, affine = subjects[("ct", seed)]
        myo, blood = image[label == 1].mean(), image[label == 3].mean()
        assert 20.0 < np.median(image[label == 1]) < 120.0
        assert blood > myo + 150.0
        assert 250.0 < np.median(image[label == 3]) < 450.0
        # air corners of the first and last slice
        corner = image[:3, :3, [0, -1]]
        assert abs(corner.mean() + 1000.0) < 20.0
        assert image.min() >= -1024 and image.max() <= 3071
        # lungs, from the internal tissue map: dark, and a sizeable part of the volume
        tissue = phantom._anatomy(seed, "ct", SHAPE, SPACING)[0]
        lungs = tissue == phantom.LUNG
        assert 0.05 < lungs.mean() < 0.3
        assert image[lungs].mean() < -500.0
        # lungs on both sides of the patient (RAS storage: x index < centre = patient's left)
        assert lungs[: SHAPE[0] // 3].sum() > 0.2 * lungs.sum()
        assert lungs[-SHAPE[0] // 3:].sum() > 0.2 * lungs.sum()
        bone = np.isin(tissue, [phantom.CORTICAL, phantom.CANCELLOUS])
        assert np.percentile(image[bone], 90) > 600.0  # thin bones lose contrast to blur


def test_mr_intensities(subjects):
    for seed in (1, 2):
        image, label, _ = subjects[("mr", seed)]
        assert image.min() >= 0.0
        myo, blood = np.median(image[label == 1]), np.median(image[label == 3])
        assert myo < 0.6 * blood
        # Rician noise floor: air is not zero but of the order of the noise sigma
        corner = image[:3, :3, [0, -1]]
        assert 0.5 * phantom.MR_NOISE_SIGMA < corner.mean() < 2.5 * phantom.MR_NOISE_SIGMA


def test_modalities_differ_in_appearance(subjects):
    """Same anatomy (seed 1) in both modalities: tissue contrasts are reordered."""
    tissue = phantom._anatomy(1, "ct", SHAPE, SPACING)[0]
    ct, mr = subjects[("ct", 1)][0], subjects[("mr", 1)][0][::-1, ::-1]  # MR to RAS order
    ct_med = {t: np.median(ct[tissue == t]) for t in (phantom.FAT, phantom.MUSCLE, phantom.MYO,
                                                     phantom.BLOOD, phantom.CORTICAL)}
    mr_med = {t: np.median(mr[tissue == t]) for t in ct_med}
    # fat: darker than muscle in CT, brighter in MR
    assert ct_med[phantom.FAT] < ct_med[phantom.MUSCLE] - 100
    assert mr_med[phantom.FAT] > 1.5 * mr_med[phantom.MUSCLE]
    # cortical bone: brightest in CT, darker than muscle in MR
    assert ct_med[phantom.CORTICAL] == max(ct_med.values())
    assert mr_med[phantom.CORTICAL] < mr_med[phantom.MUSCLE]
    # blood brighter than myocardium in both
    assert ct_med[phantom.BLOOD] > ct_med[phantom.MYO] and mr_med[phantom.BLOOD] > mr_med[phantom.MYO]


def test_bias_field_function():
    field = phantom.mr_bias_field(3, SHAPE, SPACING)
    assert field.shape == SHAPE and field.dtype == np.float32
    deviation = np.abs(field - 1.0).max()
    assert 0.2 - 1e-4 <= deviation <= 0.3 + 1e-4
    assert abs(field.mean() - 1.0) < 1e-3
    # smooth: neighbouring voxels differ by far less than the total range
    assert max(np.abs(np.diff(field, axis=a)).max() for a in range(3)) < 0.1 * np.ptp(field)
    np.testing.assert_array_equal(field, phantom.mr_bias_field(3, SHAPE, SPACING))
    assert not np.array_equal(field, phantom.mr_bias_field(4, SHAPE, SPACING))


def test_bias_field_applied_to_mr_only():
    """Noise-free signal: inside a uniform tissue (away from partial-volume edges) MR equals a
    constant times the bias field, while CT is constant (default grid: thick enough tissues)."""
    shape, spacing = phantom.DEFAULT_SHAPE, phantom.DEFAULT_SPACING
    for seed in (1, 2):
        field = phantom.mr_bias_field(seed, shape, spacing)  # LPS order, like the MR array
        tissue = phantom._anatomy(seed, "mr", shape, spacing)[0]
        mr = phantom._render("mr", seed, shape, spacing, clean=True)[0]
        ct = phantom._render("ct", seed, shape, spacing, clean=True)[0][::-1, ::-1]  # to LPS
        for t in (phantom.BLOOD, phantom.LIVER, phantom.LUNG):
            inner = ndimage.binary_erosion(tissue == t, np.ones((3, 3, 3)), iterations=3)
            assert inner.sum() > 50
            fld, mr_t, ct_t = field[inner], mr[inner], ct[inner]
            assert np.ptp(fld) > 0.03  # the field varies over the tissue ...
            assert np.ptp(mr_t) / mr_t.mean() > 0.8 * np.ptp(fld) / fld.mean()  # ... so does MR
            ratio = mr_t / fld
            assert np.ptp(ratio) / ratio.mean() < 0.01  # MR = constant x field
            assert np.ptp(ct_t) < 0.01 * abs(ct_t.mean())  # CT ignores the field


def test_storage_orientation_and_canonical_consistency(subjects):
    for seed in (1, 2):
        ct, ct_label, ct_affine = subjects[("ct", seed)]
        mr, mr_label, mr_affine = subjects[("mr", seed)]
        assert nib.aff2axcodes(ct_affine) == ("R", "A", "S")
        assert nib.aff2axcodes(mr_affine) == ("L", "P", "S")
        np.testing.assert_allclose(np.abs(np.diag(ct_affine)[:3]), SPACING)
        # volume centre at world origin
        centre = (np.array(SHAPE) - 1) / 2.0
        np.testing.assert_allclose(ct_affine[:3, :3] @ centre + ct_affine[:3, 3], 0, atol=1e-9)
        np.testing.assert_allclose(mr_affine[:3, :3] @ centre + mr_affine[:3, 3], 0, atol=1e-9)
        # same seed = same anatomy: identical label maps after canonical reorientation
        ct_c, mr_c = canonical(ct_label, ct_affine), canonical(mr_label, mr_affine)
        np.testing.assert_array_equal(ct_c, mr_c)
        # stored arrays differ (MR flipped in x and y)
        np.testing.assert_array_equal(mr_label, ct_label[::-1, ::-1, :])
    # different subjects and modalities: LV on the patient's left (low x in RAS), anterior
    # (high y); in the stored LPS array of MR it is on the high-x side instead
    for (modality, seed), (_, label, affine) in subjects.items():
        lv = np.argwhere(canonical(label, affine) == 3).mean(axis=0)
        assert lv[0] < SHAPE[0] / 2 and lv[1] > SHAPE[1] / 2, (modality, seed, lv)
        stored = np.argwhere(label == 3).mean(axis=0)
        assert (stored[0] > SHAPE[0] / 2) == (modality == "mr")
        # AA above (superior to) the LV centroid
        aa = np.argwhere(canonical(label, affine) == 4).mean(axis=0)
        assert aa[2] > lv[2]


def test_grid_size_keeps_anatomy():
    """The phantom fills the field of view: a finer grid gives the same anatomy."""
    _, coarse, coarse_aff = phantom.make_subject("ct", 5, (24, 24, 12), (8.0, 8.0, 10.0))
    _, fine, fine_aff = phantom.make_subject("ct", 5, SHAPE, SPACING)
    for c in range(1, 5):
        a = np.argwhere(coarse == c).mean(axis=0)
        b = np.argwhere(fine == c).mean(axis=0)
        world_a = coarse_aff[:3, :3] @ a + coarse_aff[:3, 3]
        world_b = fine_aff[:3, :3] @ b + fine_aff[:3, 3]
        assert np.abs(world_a - world_b).max() < 8.0, (c, world_a, world_b)


def test_subject_seeds():
    ct = phantom.subject_seeds(0, "ct", 6)
    mr = phantom.subject_seeds(0, "mr", 6)
    assert len(set(ct) | set(mr)) == 12
    assert phantom.subject_seeds(0, "ct", 3) == ct[:3]
    assert phantom.subject_seeds(1, "ct", 6) != ct


def test_generate_writes_unpaired_dataset(tmp_path):
    out = str(tmp_path / "phantom")
    result = phantom.generate(out, n_train=2, n_val=1, n_test=1, seed=3, shape=(32, 32, 16),
                              spacing=(6.0, 6.0, 7.5))
    assert set(result) == {"mr", "ct"}
    for modality in ("mr", "ct"):
        folder = os.path.join(out, "raw", modality)
        names = [f"{modality}_{k:04d}" for k in range(4)]
        expected = {f"{n}_{kind}.nii.gz" for n in names for kind in ("image", "label")}
        assert set(os.listdir(folder)) == expected | {"split.json"}  # no temp files left
        with open(os.path.join(folder, "split.json"), encoding="utf-8") as handle:
            split = json.load(handle)
        assert split == {"train": names[:2], "val": names[2:3], "test": names[3:]}
        assert result[modality]["split"] == split
        assert [c[2] for c in result[modality]["cases"]] == names
        seeds = phantom.subject_seeds(3, modality, 4)
        for (image_path, label_path, name), seed in zip(result[modality]["cases"], seeds):
            assert os.path.isfile(image_path) and os.path.isfile(label_path)
            img, lab = nib.load(image_path), nib.load(label_path)
            assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
            image, label, affine = phantom.make_subject(modality, seed, (32, 32, 16), (6.0, 6.0, 7.5))
            np.testing.assert_allclose(img.affine, affine)
            np.testing.assert_allclose(lab.affine, affine)
            assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
            np.testing.assert_allclose(img.header.get_zooms(), (6.0, 6.0, 7.5))
            np.testing.assert_array_equal(np.asarray(img.dataobj), image)
            np.testing.assert_array_equal(np.asarray(lab.dataobj), label)
    # unpaired: case k of MR is not the same person as case k of CT
    ct_lab = nib.load(result["ct"]["cases"][0][1])
    mr_lab = nib.load(result["mr"]["cases"][0][1])
    ct_c = np.asarray(nib.as_closest_canonical(ct_lab).dataobj)
    mr_c = np.asarray(nib.as_closest_canonical(mr_lab).dataobj)
    assert not np.array_equal(ct_c, mr_c)

    with pytest.raises(FileExistsError):
        phantom.generate(out, n_train=1, n_val=0, n_test=0, shape=(32, 32, 16))
    again = phantom.generate(out, n_train=1, n_val=0, n_test=1, seed=4, shape=(32, 32, 16),
                             spacing=(6.0, 6.0, 7.5), overwrite=True)
    assert sorted(os.listdir(os.path.join(out, "raw", "ct"))) == sorted(
        ["ct_0000_image.nii.gz", "ct_0000_label.nii.gz", "ct_0001_image.nii.gz",
         "ct_0001_label.nii.gz", "split.json"])
    assert again["ct"]["split"] == {"train": ["ct_0000"], "val": [], "test": ["ct_0001"]}


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        phantom.make_subject("pet", 0, SHAPE, SPACING)
    with pytest.raises(ValueError):
        phantom.generate(str(tmp_path), n_train=0, n_val=0, n_test=0)
