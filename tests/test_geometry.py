"""Labels stored in another axis order or direction than their scan (lib/geometry.py)."""
import itertools
import os

import numpy as np
import pytest

from lib import geometry

FIXED = np.array([[0.8, 0, 0, -40.0], [0, 0.8, 0, 12.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
SHAPE = (4, 5, 6)


def stored_otherwise(axes, flips):
    """A fixed-grid array stored with its axes reordered and flipped, and the affine of that
    storage, worked out by hand: moving index v -> fixed index u, u[axes[i]]... inverted."""
    fixed = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    # moving = transpose(flip(fixed, flips), inverse of axes): moving axis k is fixed axis
    # order[k]; a fixed axis in flips runs backwards.
    order = list(np.argsort(axes))
    moving = np.transpose(np.flip(fixed, flips) if flips else fixed, order)
    to_fixed = np.zeros((4, 4))
    to_fixed[3, 3] = 1
    for i in range(3):  # fixed index u_i from the moving index along moving axis axes[i]
        sign = -1.0 if i in flips else 1.0
        to_fixed[i, axes[i]] = sign
        to_fixed[i, 3] = SHAPE[i] - 1 if i in flips else 0.0
    return fixed, moving, FIXED @ to_fixed


@pytest.mark.parametrize("axes, flips", [
    ((0, 1, 2), ()), ((0, 1, 2), (1,)), ((0, 1, 2), (0, 1)), ((2, 0, 1), ()),
    ((1, 0, 2), (2,)), ((2, 1, 0), (0, 1, 2)),
])
def test_alignment_undoes_any_axis_order_and_direction(axes, flips):
    fixed, moving, affine = stored_otherwise(axes, flips)
    alignment = geometry.grid_alignment(affine, moving.shape, FIXED, SHAPE)
    assert alignment == (tuple(axes), tuple(flips))
    assert np.array_equal(geometry.apply_alignment(moving, alignment), fixed)
    assert geometry.is_identity(alignment) == (axes == (0, 1, 2) and not flips)


def test_every_signed_permutation_round_trips():
    for axes in itertools.permutations(range(3)):
        for n in range(4):
            for flips in itertools.combinations(range(3), n):
                fixed, moving, affine = stored_otherwise(axes, flips)
                alignment = geometry.grid_alignment(affine, moving.shape, FIXED, SHAPE)
                assert np.array_equal(geometry.apply_alignment(moving, alignment), fixed)


@pytest.mark.parametrize("change", ["half_voxel_shift", "spacing", "extent", "rotation"])
def test_other_grids_have_no_alignment(change):
    _, moving, affine = stored_otherwise((0, 1, 2), (1,))
    shape = moving.shape
    if change == "half_voxel_shift":
        affine = affine.copy()
        affine[0, 3] += 0.4  # half of a 0.8 mm voxel
    elif change == "spacing":
        affine = affine @ np.diag([1.0, 1.0, 1.2, 1.0])
    elif change == "extent":
        shape = (4, 5, 7)
    else:  # 10 degrees about z
        c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
        affine = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]) @ affine
    assert geometry.grid_alignment(affine, shape, FIXED, SHAPE) is None


def test_read_case_brings_a_flipped_nifti_label_onto_the_image(tmp_path):
    import nibabel as nib

    from lib import prep

    fixed, moving, affine = stored_otherwise((0, 1, 2), (1,))
    image = (fixed * 1.0).astype(np.float32)
    nib.save(nib.Nifti1Image(image, FIXED), str(tmp_path / "image.nii.gz"))
    nib.save(nib.Nifti1Image((moving % 3).astype(np.uint8), affine),
             str(tmp_path / "label.nii.gz"))
    nib.save(nib.Nifti1Image((fixed % 3).astype(np.uint8), FIXED), str(tmp_path / "ref.nii.gz"))
    case = prep.read_case(str(tmp_path / "image.nii.gz"), str(tmp_path / "label.nii.gz"))
    ref = prep.read_case(str(tmp_path / "image.nii.gz"), str(tmp_path / "ref.nii.gz"))
    assert np.array_equal(case.label, ref.label) and ref.notes == ()
    assert len(case.notes) == 1 and "flipped along 1, no interpolation" in case.notes[0]
    shifted = affine.copy()
    shifted[0, 3] += 0.4
    nib.save(nib.Nifti1Image((moving % 3).astype(np.uint8), shifted),
             str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(prep.DataError, match="shifted.nii.gz: label geometry differs from "
                                             "image .*image.nii.gz: direction"):
        prep.read_case(str(tmp_path / "image.nii.gz"), str(tmp_path / "shifted.nii.gz"))


DICOM = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ct_dicom_real")


@pytest.mark.skipif(not os.path.isdir(DICOM), reason="needs ../shared/data/ct_dicom_real")
def test_the_real_dicom_label_equals_nearest_neighbour_resampling():
    """The real series' label (stored LAS, the series LPS) re-indexed exactly equals
    SimpleITK's nearest-neighbour resampling of it onto the series, voxel for voxel."""
    import SimpleITK as sitk

    from lib import prep

    series, label_path = os.path.join(DICOM, "series"), os.path.join(DICOM, "segmentation.nii.gz")
    case = prep.read_case(series, label_path)
    assert len(case.notes) == 1 and "flipped along 1" in case.notes[0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(series))
    image = reader.Execute()
    resampled = sitk.Resample(sitk.ReadImage(label_path), image, sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0)
    expected = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # [X, Y, Z] as stored
    stored = prep.from_canonical(case.label, case.orientation)
    assert stored.shape == (512, 512, 20)
    assert np.array_equal(stored, expected)
    assert int((stored == 5).sum()) == 366708 and int((stored == 1).sum()) == 130634


def test_the_test_phase_brings_a_flipped_label_onto_its_image(tmp_path):
    import nibabel as nib

    from lib.data import DataError, load_volume

    fixed, moving, affine = stored_otherwise((1, 0, 2), (2,))
    nib.save(nib.Nifti1Image(fixed.astype(np.float32), FIXED), str(tmp_path / "i.nii.gz"))
    nib.save(nib.Nifti1Image((moving % 3).astype(np.uint8), affine), str(tmp_path / "l.nii.gz"))
    volume = load_volume(f"{tmp_path / 'i.nii.gz'},{tmp_path / 'l.nii.gz'}")
    assert np.array_equal(volume.label, fixed % 3)
    assert "exactly (axes (1, 0, 2), flipped along 2, no interpolation)" in volume.meta["note"]
    other = affine @ np.diag([1.0, 1.0, 1.2, 1.0])  # another slice spacing
    nib.save(nib.Nifti1Image((moving % 3).astype(np.uint8), other), str(tmp_path / "o.nii.gz"))
    with pytest.raises(DataError, match="o.nii.gz: label shape"):
        load_volume(f"{tmp_path / 'i.nii.gz'},{tmp_path / 'o.nii.gz'}")
    nib.save(nib.Nifti1Image((fixed % 3).astype(np.uint8), FIXED @ np.diag([1, 1, 1.2, 1])),
             str(tmp_path / "g.nii.gz"))
    with pytest.raises(DataError, match="g.nii.gz: label geometry differs from image"):
        load_volume(f"{tmp_path / 'i.nii.gz'},{tmp_path / 'g.nii.gz'}")


# ---------------------------------------------------------------------- other grids, on request
def test_nearest_resampling_of_another_grid_matches_simpleitk():
    """A label on a coarser, shifted and LPS-stored grid, resampled onto the image grid: the
    same voxels as SimpleITK's nearest-neighbour resampling (no exact ties by construction)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 4, (5, 6, 4)).astype(np.uint8)
    # 1.3 mm x 1.1 mm x 3.7 mm voxels, axes 0 and 1 running backwards, origin off the grid
    moving_affine = np.array([[-1.3, 0, 0, -36.3], [0, -1.1, 0, 16.9], [0, 0, 3.7, 6.1],
                              [0, 0, 0, 1]])
    out = geometry.resample_nearest(coarse, moving_affine, FIXED, (7, 8, 6))
    assert out.shape == (7, 8, 6) and out.dtype == np.uint8

    def to_sitk(array, affine):  # NIfTI's RAS affine -> ITK's LPS geometry
        lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        img = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)))
        img.SetSpacing(spacing.tolist())
        img.SetDirection((lps / spacing).ravel().tolist())
        img.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]).tolist())
        return img

    reference = sitk.Resample(to_sitk(coarse, moving_affine),
                              to_sitk(np.zeros((7, 8, 6), np.uint8), FIXED),
                              sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    expected = np.transpose(sitk.GetArrayFromImage(reference), (2, 1, 0))
    assert np.array_equal(out, expected)
    assert (out == 0).any() and len(np.unique(out)) > 2  # part inside, part outside


def test_a_label_on_another_grid_is_refused_unless_resampling_is_asked(tmp_path, capsys):
    import nibabel as nib

    from data.prepare import main as prepare_main
    from lib.data import DataError, load_volume
    from lib.prep import read_case

    out, tmp_path = tmp_path, tmp_path / "in"
    tmp_path.mkdir()
    image = np.zeros((12, 10, 6), np.float32)
    image[3:9, 2:8, 1:5] = 1.0
    nib.save(nib.Nifti1Image(image, FIXED), str(tmp_path / "i.nii.gz"))
    # the same field of view at half the in-plane resolution: each label voxel covers 2 x 2
    # image voxels, its centre half an image voxel past the first one's
    coarse = np.zeros((6, 5, 6), np.uint8)
    coarse[1:5, 1:4, 1:5] = 1
    to_coarse = np.array([[2.0, 0, 0, 0.5], [0, 2.0, 0, 0.5], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(coarse, FIXED @ to_coarse), str(tmp_path / "l.nii.gz"))
    with pytest.raises(DataError, match="l.nii.gz: label shape"):
        read_case(str(tmp_path / "i.nii.gz"), str(tmp_path / "l.nii.gz"))
    case = read_case(str(tmp_path / "i.nii.gz"), str(tmp_path / "l.nii.gz"),
                     label_resample="nearest")
    expected = np.zeros(image.shape, np.int64)
    expected[2:10, 2:8, 1:5] = 1  # label voxel i covers image voxels 2i and 2i + 1
    assert np.array_equal(case.label, expected)
    assert "resampled onto the image grid by nearest neighbour" in case.notes[0]
    argv = ["--modality", "ct", "--images", str(tmp_path / "i.nii.gz"), "--labels",
            str(tmp_path / "l.nii.gz"), "--label_map", "1:1", "--test", "i", "--image_size", "8"]
    assert prepare_main(argv + ["--out_dir", str(out / "refused")]) == 2
    assert "l.nii.gz: label shape (6, 5, 6) differs" in capsys.readouterr().err
    assert not os.path.exists(out / "refused")
    assert prepare_main(argv + ["--out_dir", str(out / "ok"), "--label_resample",
                                "nearest"]) == 0
    # the test phase's (and 3D training's) list entries follow the same rule
    entry = f"{tmp_path / 'i.nii.gz'},{tmp_path / 'l.nii.gz'}"
    with pytest.raises(DataError, match="l.nii.gz: label shape"):
        load_volume(entry)
    volume = load_volume(entry, label_resample="nearest")
    assert np.array_equal(volume.label, expected)
    assert "by nearest neighbour" in volume.meta["note"]
