"""Preprocessing steps that turn a scan and its label map into network input, and back.

Each public function does one step; ``data/prepare.py`` chains them and writes the files.
Defaults follow the released data of the paper (Dou et al., TMI 2020): 256 x 256 slices,
three adjacent slices as the channels of one input, and a per-volume z-score after cutting
off the top 2 % of the intensity histogram.

One case goes through::

    read_case              image file or DICOM folder + label NIfTI
                           -> canonical RAS image, label [X, Y, Z] + what is needed to undo it
    map_labels             dataset ids -> task classes; all other ids -> background 0
    to_slices_last         [X, Y, Z] -> [H, W, D], slicing axis last, radiological view
    clip_percentiles, zscore          per-volume intensity normalisation (whole scan)
    label_crop_box | center_crop_box  square in-plane box (mm-square), may reach outside
    crop_hw, resample_hw   [H, W, D] -> [S, S, D] (image linear, label nearest)
    stack_slices           [S, S, D] -> [S, S, 3] input around slice k
    restore_prediction     [S, S, D] prediction -> NIfTI in the original scan's geometry

``prepare_volume`` runs the chain for one case and returns the JSON record (one entry of
``dataset.json``) that ``restore_prediction`` needs.

Conventions
-----------
* Canonical orientation is RAS (``nibabel.as_closest_canonical``): array axis 0 runs to the
  patient's Right, axis 1 to Anterior, axis 2 to Superior. DICOM geometry (LPS world) is
  converted to a nibabel-style RAS affine.
* In-plane view (``to_slices_last``), radiological convention: the patient's right is on the
  image left (W axis), and anterior (axial) or superior (coronal, sagittal) is up (row 0).
  Sagittal slices put anterior on the image left. Slices run along increasing canonical
  index (axial: inferior -> superior).
* Sizes of margins and crops are in millimetres; boxes are square in millimetres, so that
  resampling to S x S keeps the physical aspect ratio.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from lib import geometry
from lib.data import DataError
from lib.settings import CHOICES

IMAGE_SIZE = 256
CANONICAL = "RAS"

# slice axis -> ((canonical axis, flipped) for H, the same for W, canonical axis for D)
_VIEWS = {
    "axial": ((1, True), (0, True), 2),      # rows anterior -> posterior, cols patient R -> L
    "coronal": ((2, True), (0, True), 1),    # rows superior -> inferior, cols patient R -> L
    "sagittal": ((2, True), (1, True), 0),   # rows superior -> inferior, cols anterior -> posterior
}
SLICE_AXES = tuple(_VIEWS)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


# ----------------------------------------------------------------------------- reading
@dataclass
class Case:
    """One scan in canonical orientation plus what is needed to put results back.

    image: [X, Y, Z] float32, label: [X, Y, Z] int64 (ids as in the file), both RAS.
    ``original`` is JSON-serialisable: shape, affine, orientation codes, spacing, the NIfTI
    sform/qform (or the values a DICOM series implies) and the source format.
    """
    image_path: str
    label_path: str
    image: np.ndarray
    label: np.ndarray
    canonical_affine: np.ndarray
    original: dict
    notes: tuple = ()  # what reading did that the log should say (a label re-indexed)

    @property
    def original_shape(self) -> tuple:
        return tuple(self.original["shape"])

    @property
    def original_affine(self) -> np.ndarray:
        return np.array(self.original["affine"], dtype=np.float64)

    @property
    def orientation(self) -> str:
        return self.original["orientation"]

    @property
    def spacing(self) -> tuple:
        """Voxel size (mm) along the canonical axes X, Y, Z."""
        return tuple(float(s) for s in affine_spacing(self.canonical_affine))


def affine_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each array axis: the lengths of the affine's first three columns."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _drop_trailing_singletons(arr: np.ndarray, path: str) -> np.ndarray:
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    return arr


def _read_nifti(path: str):
    """NIfTI file -> (array [X, Y, Z] as stored, affine, header fields to restore it)."""
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DataError(f"{path}: not a NIfTI file")
        data = np.asarray(img.dataobj)
    except DataError:
        raise
    except Exception as err:  # nibabel raises many exception types for broken files
        raise DataError(f"{path}: cannot read NIfTI ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'unreadable'})") from None
    hdr = img.header
    sform, scode = hdr.get_sform(coded=True)
    header = {
        "format": "nifti",
        "sform": (hdr.get_sform() if sform is None else sform).tolist(),
        "sform_code": int(scode),
        "qform": hdr.get_qform().tolist(),
        "qform_code": int(hdr["qform_code"]),
        "zooms": [float(z) for z in hdr.get_zooms()[:3]],
        "xyz_unit": hdr.get_xyzt_units()[0],
    }
    return _drop_trailing_singletons(data, path), np.asarray(img.affine, dtype=np.float64), header


def _read_sitk(path: str):
    """DICOM series folder (or another SimpleITK format) -> (array [X, Y, Z], RAS affine, header).

    SimpleITK reports LPS world geometry and returns arrays [Z, Y, X]; both are converted to
    nibabel's conventions so that every reader yields the same kind of affine.
    """
    import SimpleITK as sitk

    try:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(path)
            if not series:
                raise DataError(f"{path}: folder holds no DICOM series")
            if len(series) > 1:
                raise DataError(f"{path}: folder holds {len(series)} DICOM series "
                                f"({', '.join(series[:3])}...); give a folder with one series")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(path, series[0]))
            image = reader.Execute()
            fmt = "dicom"
        else:
            image = sitk.ReadImage(path)
            fmt = "sitk"
    except DataError:
        raise
    except RuntimeError as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "unreadable")
        raise DataError(f"{path}: cannot read image ({first})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: expected a 3D single-channel image, got dimension "
                        f"{image.GetDimension()} with {image.GetNumberOfComponentsPerPixel()} "
                        "component(s)")
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(spacing)
    affine[:3, 3] = lps_to_ras @ origin
    header = {"format": fmt, "sform": affine.tolist(), "sform_code": 1,
              "qform": affine.tolist(), "qform_code": 1,
              "zooms": spacing.tolist(), "xyz_unit": "mm"}
    return data, affine, header


def read_volume(path: str):
    """Any supported input -> (array [X, Y, Z] as stored, RAS affine, header dict)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file does not exist")
    if os.path.isdir(path):
        return _read_sitk(path)
    if path.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)
    return _read_sitk(path)


def orientation_codes(affine: np.ndarray) -> str:
    """Closest axis codes of an affine, e.g. "RAS" or "LPS"."""
    return "".join(nio.aff2axcodes(affine))


def to_canonical(vol: np.ndarray, orientation: str) -> np.ndarray:
    """Reorder/flip a volume stored with ``orientation`` codes into RAS (no interpolation)."""
    move = nio.ornt_transform(nio.axcodes2ornt(orientation), nio.axcodes2ornt(CANONICAL))
    return nio.apply_orientation(vol, move)


def from_canonical(vol: np.ndarray, orientation: str) -> np.ndarray:
    """Inverse of ``to_canonical``: RAS array -> array stored with ``orientation`` codes."""
    move = nio.ornt_transform(nio.axcodes2ornt(CANONICAL), nio.axcodes2ornt(orientation))
    return nio.apply_orientation(vol, move)


def canonical_affine(affine: np.ndarray, shape: tuple) -> np.ndarray:
    """Affine of the canonical (RAS) array, as ``nibabel.as_closest_canonical`` computes it."""
    ornt = nio.io_orientation(affine)
    move = nio.ornt_transform(ornt, nio.axcodes2ornt(CANONICAL))
    return affine @ nio.inv_ornt_aff(move, shape)


def _geometry_difference(a: np.ndarray, b: np.ndarray, tol: float) -> str | None:
    """Describe how two affines differ, or None if spacing, direction and origin agree.

    tol is a fraction of the voxel size for spacing and origin and an absolute tolerance
    for the unit direction cosines.
    """
    sa, sb = affine_spacing(a), affine_spacing(b)
    voxel = float(np.max(np.maximum(sa, sb)))
    if np.any(np.abs(sa - sb) > tol * np.maximum(sa, sb)):
        return f"spacing {np.round(sb, 4).tolist()} vs image {np.round(sa, 4).tolist()}"
    if np.any(np.abs(a[:3, :3] / sa - b[:3, :3] / sb) > tol):
        return (f"direction {np.round(b[:3, :3] / sb, 4).tolist()} vs image "
                f"{np.round(a[:3, :3] / sa, 4).tolist()}")
    if np.any(np.abs(a[:3, 3] - b[:3, 3]) > tol * voxel):
        return f"origin {np.round(b[:3, 3], 4).tolist()} vs image {np.round(a[:3, 3], 4).tolist()}"
    return None


def read_case(image_path: str, label_path: str, tol: float = 1e-3,
              label_resample: str = "none") -> Case:
    """Read an image (NIfTI file or DICOM series folder) and its NIfTI label map.

    Checks that both have the same shape and geometry (spacing and origin within ``tol``
    voxels, direction cosines within ``tol``; see ``label_onto_image`` for labels stored
    otherwise and ``label_resample``), that the image is finite and the label holds integer
    ids. Returns a ``Case`` with RAS arrays [X, Y, Z]. Raises DataError with a one-line
    message naming the file.
    """
    image, img_affine, header = read_image(image_path)
    label, lab_affine, _ = read_volume(label_path)
    label, notes = label_onto_image(label, lab_affine, label_path, image.shape, img_affine,
                                    image_path, tol, label_resample)
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)):
            raise DataError(f"{label_path}: label holds NaN/Inf voxels")
        rounded = np.rint(label)
        if np.any(np.abs(label - rounded) > 1e-3):
            raise DataError(f"{label_path}: label holds non-integer values (is it an image?)")
        label = rounded
    elif label.dtype.kind not in "biu":
        raise DataError(f"{label_path}: unsupported label voxel type {label.dtype}")
    return make_case(image_path, label_path, image, img_affine, header,
                     label.astype(np.int64, copy=False), notes)


def read_image(path: str):
    """An image file or DICOM series: (array [X, Y, Z] float32 as stored, affine, header);
    DataError naming the file for a voxel type that is no number, or NaN/Inf voxels."""
    image, affine, header = read_volume(path)
    if image.dtype.kind not in "biuf":
        raise DataError(f"{path}: unsupported voxel type {image.dtype}")
    image = image.astype(np.float32, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        raise DataError(f"{path}: image holds {bad} NaN/Inf voxel(s)")
    return image, affine, header


def make_case(image_path: str, label_path: str, image, affine, header, label,
              notes=()) -> Case:
    """A Case of arrays as stored [X, Y, Z] (label on the image's grid): both reoriented to
    RAS, with what is needed to put results back in the original geometry."""
    orientation = orientation_codes(affine)
    original = {"shape": [int(s) for s in image.shape], "affine": affine.tolist(),
                "orientation": orientation, "spacing": affine_spacing(affine).tolist(),
                **header}
    return Case(image_path, label_path,
                np.ascontiguousarray(to_canonical(image, orientation)),
                np.ascontiguousarray(to_canonical(label, orientation)),
                canonical_affine(affine, image.shape), original, tuple(notes))


LABEL_RESAMPLING = CHOICES["LABEL_RESAMPLE"]


def label_onto_image(label, label_affine, label_path: str, image_shape, image_affine,
                     image_path: str, tol: float = 1e-3, resample: str = "none"):
    """(label on the image's voxel grid, notes for the log).

    A label of the image's shape and geometry is returned as it is. One stored in another
    axis order or direction on the same physical voxels (lib.geometry) is re-indexed exactly,
    with no interpolation, and a note says so. Any other label is a DataError naming the
    file (its shape or geometry differs from the image's), unless ``resample`` is "nearest":
    then it is resampled onto the image grid by nearest neighbour, and a note says so.
    """
    if resample not in LABEL_RESAMPLING:
        raise ValueError(f"label resampling must be one of {LABEL_RESAMPLING}, got {resample!r}")
    same_shape = tuple(label.shape[:3]) == tuple(image_shape[:3])
    if same_shape and _geometry_difference(image_affine, label_affine, tol) is None:
        return label, []
    alignment = geometry.grid_alignment(label_affine, label.shape, image_affine, image_shape,
                                        tol)
    if alignment is not None:
        return geometry.apply_alignment(label, alignment), [
            f"{label_path}: stored in another axis order or direction than {image_path} on "
            f"the same voxels; brought onto the image grid exactly ({geometry.describe(alignment)}"
            ", no interpolation)"]
    diff = (f"label shape {tuple(label.shape)} differs from image shape {tuple(image_shape)}"
            if not same_shape else "label geometry differs from image: "
            + str(_geometry_difference(image_affine, label_affine, tol)))
    if resample == "nearest" and label.ndim == 3:
        return geometry.resample_nearest(label, label_affine, image_affine, image_shape), [
            f"{label_path}: on another grid than {image_path} ({diff}); resampled onto the "
            "image grid by nearest neighbour (--label_resample nearest)"]
    if not same_shape:
        raise DataError(f"{label_path}: {diff} of {image_path}")
    raise DataError(f"{label_path}: label geometry differs from image {image_path}: "
                    f"{_geometry_difference(image_affine, label_affine, tol)}")


# ----------------------------------------------------------------------------- labels
def parse_label_map(text: str) -> dict[int, int]:
    """"205:1,420:2,500:3" -> {205: 1, 420: 2, 500: 3}. Targets must be 0..255."""
    mapping: dict[int, int] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            src, dst = int(parts[0]), int(parts[1])
        except ValueError:
            raise DataError(f"label map: bad entry {item!r} (expected source_id:class)") from None
        if src in mapping:
            raise DataError(f"label map: source id {src} is given twice")
        if not 0 <= dst <= 255:
            raise DataError(f"label map: class {dst} of id {src} is outside 0..255")
        mapping[src] = dst
    if not mapping:
        raise DataError("label map: no entry given")
    return mapping


def map_labels(label: np.ndarray, label_map: dict[int, int]):
    """Map dataset ids to task classes; ids not in the map become background 0.

    Returns (mapped uint8 array of label's shape, {dropped id: voxel count}); id 0 and ids
    mapped explicitly (even to 0) are not reported as dropped.
    """
    for dst in label_map.values():
        if not 0 <= int(dst) <= 255:
            raise DataError(f"label map: class {dst} is outside 0..255")
    ids, inverse, counts = np.unique(label, return_inverse=True, return_counts=True)
    lut = np.array([label_map.get(int(i), 0) for i in ids], dtype=np.uint8)
    mapped = lut[inverse.reshape(-1)].reshape(label.shape)
    dropped = {int(i): int(c) for i, c in zip(ids, counts) if int(i) not in label_map and i != 0}
    return mapped, dropped


def class_voxels(label: np.ndarray, num_classes: int) -> dict[str, int]:
    """Voxel count per class 0..num_classes-1 (JSON keys are strings)."""
    counts = np.bincount(label.reshape(-1).astype(np.int64), minlength=num_classes)
    return {str(c): int(counts[c]) for c in range(len(counts))}


# ----------------------------------------------------------------------------- slice axis
def _view(axis_name: str):
    if axis_name not in _VIEWS:
        raise ValueError(f"slice axis must be one of {', '.join(SLICE_AXES)}, got {axis_name!r}")
    return _VIEWS[axis_name]


def to_slices_last(vol: np.ndarray, axis_name: str = "axial") -> np.ndarray:
    """Canonical RAS volume [X, Y, Z] -> [H, W, D] with the slicing axis last.

    In-plane orientation is radiological (see module docstring) so that CT and MR slices
    look the same way up. Returns a view.
    """
    (h, hflip), (w, wflip), d = _view(axis_name)
    out = np.transpose(vol, (h, w, d) + tuple(range(3, vol.ndim)))
    flips = tuple(a for a, f in ((0, hflip), (1, wflip)) if f)
    return np.flip(out, flips) if flips else out


def from_slices_last(vol_hwd: np.ndarray, axis_name: str = "axial") -> np.ndarray:
    """Exact inverse of ``to_slices_last``: [H, W, D] -> canonical [X, Y, Z] (a view)."""
    (h, hflip), (w, wflip), d = _view(axis_name)
    flips = tuple(a for a, f in ((0, hflip), (1, wflip)) if f)
    vol = np.flip(vol_hwd, flips) if flips else vol_hwd
    order = np.argsort((h, w, d))
    return np.transpose(vol, tuple(order) + tuple(range(3, vol.ndim)))


def slices_last_index_matrix(axis_name: str, canonical_shape) -> np.ndarray:
    """4x4 matrix taking a slices-last voxel index (h, w, d, 1) to the canonical index."""
    (h, hflip), (w, wflip), d = _view(axis_name)
    mat = np.zeros((4, 4))
    mat[3, 3] = 1.0
    for out_axis, (src, flip) in enumerate(((h, hflip), (w, wflip), (d, False))):
        mat[src, out_axis] = -1.0 if flip else 1.0
        mat[src, 3] = canonical_shape[src] - 1 if flip else 0.0
    return mat


# ----------------------------------------------------------------------------- intensities
def clip_percentiles(img: np.ndarray, lower: float = 0.0, upper: float = 98.0):
    """Clip to the [lower, upper] percentiles of the whole volume.

    The default cuts off the top 2 % of the histogram (bright outliers: metal, contrast,
    MR bias hot spots). Returns (clipped float32 array, (low value, high value)).
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got "
                         f"{lower}, {upper}")
    lo, hi = np.percentile(img, [lower, upper])
    return np.clip(img, lo, hi).astype(np.float32), (float(lo), float(hi))


def zscore(img: np.ndarray, eps: float = 1e-6):
    """(img - mean) / std over the whole volume. Returns (float32 array, mean, std).

    A constant volume (std <= eps) is only centred, so it becomes all zeros instead of NaN.
    """
    mean = float(np.mean(img, dtype=np.float64))
    std = float(np.std(img, dtype=np.float64))
    out = (img.astype(np.float64) - mean) / (std if std > eps else 1.0)
    return out.astype(np.float32), mean, std


# ----------------------------------------------------------------------------- crop, resample
def _square_sides(extent_mm: float, spacing_hw) -> tuple[int, int]:
    # the small epsilon keeps exact multiples of the voxel size from rounding up
    return tuple(max(1, math.ceil(extent_mm / float(s) - 1e-6)) for s in spacing_hw)


def _place(start: int, size: int, length: int) -> int:
    """Shift a window [start, start+size) inside [0, length) when it fits; else centre it."""
    if size <= length:
        return min(max(start, 0), length - size)
    return -((size - length) // 2)


def label_crop_box(label_hwd: np.ndarray, margin: float = 10.0, min_size: float = 0.0,
                   spacing_hw=(1.0, 1.0)) -> tuple[int, int, int, int]:
    """Square in-plane box (h0, h1, w0, w1) around all labelled voxels (label > 0).

    label_hwd: [H, W, D], all slices count. margin and min_size are in mm (with the default
    spacing (1, 1) they are voxels): the box spans the labels' bounding box plus ``margin``
    on each side, widened to a square of at least ``min_size`` mm. The box is shifted to lie
    inside the volume when it fits; otherwise it reaches outside (``crop_hw`` pads). End
    indices are exclusive. Raises DataError if there is no labelled voxel.
    """
    hits = np.nonzero(np.any(label_hwd > 0, axis=2))
    if hits[0].size == 0:
        raise DataError("label has no voxel of any mapped class; cannot crop around it")
    lo = [int(hits[0].min()), int(hits[1].min())]
    hi = [int(hits[0].max()) + 1, int(hits[1].max()) + 1]
    extent = max((hi[i] - lo[i]) * float(spacing_hw[i]) for i in range(2)) + 2.0 * margin
    sides = _square_sides(max(extent, min_size), spacing_hw)
    box = []
    for i in range(2):
        start = lo[i] - (sides[i] - (hi[i] - lo[i])) // 2
        start = _place(start, sides[i], label_hwd.shape[i])
        box += [start, start + sides[i]]
    return tuple(box)


def center_crop_box(shape_hw, size: float | None = None,
                    spacing_hw=(1.0, 1.0)) -> tuple[int, int, int, int]:
    """Square box (h0, h1, w0, w1) of ``size`` mm centred in the plane.

    size None takes the longer side of the plane, so nothing is cut and the shorter side
    is padded. May reach outside the volume (``crop_hw`` pads).
    """
    if size is None:
        size = max(shape_hw[i] * float(spacing_hw[i]) for i in range(2))
    sides = _square_sides(size, spacing_hw)
    box = []
    for i in range(2):
        start = (shape_hw[i] - sides[i]) // 2
        box += [start, start + sides[i]]
    return tuple(box)


def labelled_slice_range(label_hwd: np.ndarray, margin_slices: int = 0) -> tuple[int, int]:
    """(d0, d1), end exclusive: slices holding a label, widened by margin_slices, clipped.

    Returns (0, 0) for a label without labelled voxels.
    """
    hits = np.nonzero(np.any(label_hwd > 0, axis=(0, 1)))[0]
    if hits.size == 0:
        return 0, 0
    depth = label_hwd.shape[2]
    return max(0, int(hits[0]) - margin_slices), min(depth, int(hits[-1]) + 1 + margin_slices)


def _overlap(box, shape_hw):
    """Slices of the volume and of the box covering their intersection."""
    h0, h1, w0, w1 = box
    vh = slice(max(h0, 0), min(h1, shape_hw[0]))
    vw = slice(max(w0, 0), min(w1, shape_hw[1]))
    bh = slice(vh.start - h0, vh.stop - h0)
    bw = slice(vw.start - w0, vw.stop - w0)
    return (vh, vw), (bh, bw)


def crop_hw(vol_hwd: np.ndarray, box, fill=0) -> np.ndarray:
    """[H, W, D] -> [h1-h0, w1-w0, D]; parts of the box outside the volume get ``fill``."""
    h0, h1, w0, w1 = box
    out = np.full((h1 - h0, w1 - w0) + vol_hwd.shape[2:], fill, dtype=vol_hwd.dtype)
    (vh, vw), (bh, bw) = _overlap(box, vol_hwd.shape)
    if vh.stop > vh.start and vw.stop > vw.start:
        out[bh, bw] = vol_hwd[vh, vw]
    return out


def uncrop_hw(patch: np.ndarray, box, shape_hw) -> np.ndarray:
    """Inverse of ``crop_hw``: paste [h1-h0, w1-w0, D] into zeros [H, W, D]; outside is lost."""
    out = np.zeros(tuple(shape_hw[:2]) + patch.shape[2:], dtype=patch.dtype)
    (vh, vw), (bh, bw) = _overlap(box, shape_hw)
    if vh.stop > vh.start and vw.stop > vw.start:
        out[vh, vw] = patch[bh, bw]
    return out


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of linear interpolation with pixel centres aligned.

    Output pixel i covers the same physical extent fraction as input coordinate
    (i + 0.5) * n_in / n_out - 0.5; coordinates beyond the edge take the edge value.
    """
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    mat = np.zeros((n_out, n_in))
    np.add.at(mat, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(mat, (np.arange(n_out), i1), frac)
    return mat


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    # the input pixel that contains each output pixel's centre: an integer up-sampling is
    # pure replication, so going back down recovers the input exactly
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64),
                      n_in - 1)


def resample_hw(vol_hwd: np.ndarray, out_hw, order: int = 1) -> np.ndarray:
    """Resample the two in-plane axes of [H, W, D] to out_hw; D is left unchanged.

    order 1: linear (images, float32 result); order 0: nearest (labels, dtype kept).
    """
    h, w = vol_hwd.shape[:2]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if (h, w) == (oh, ow):
        return vol_hwd.copy() if order == 0 else vol_hwd.astype(np.float32)
    if order == 0:
        return vol_hwd[_nearest_index(h, oh)][:, _nearest_index(w, ow)]
    if order != 1:
        raise ValueError(f"order must be 0 or 1, got {order}")
    out = np.tensordot(_linear_matrix(h, oh), vol_hwd.astype(np.float64), axes=(1, 0))
    out = np.tensordot(_linear_matrix(w, ow), out, axes=(1, 1)).swapaxes(0, 1)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------- slices
def stack_slices(vol_hwd: np.ndarray, k: int) -> np.ndarray:
    """Slices k-1, k, k+1 of [H, W, D] as [H, W, 3]; edge slices are repeated."""
    depth = vol_hwd.shape[2]
    if not 0 <= k < depth:
        raise IndexError(f"slice {k} outside 0..{depth - 1}")
    idx = np.clip([k - 1, k, k + 1], 0, depth - 1)
    return np.ascontiguousarray(vol_hwd[:, :, idx])


# ----------------------------------------------------------------------------- one case
def prepared_affine(canonical_aff: np.ndarray, canonical_shape, axis_name: str, box,
                    image_size: int) -> np.ndarray:
    """Affine of the prepared [S, S, D] volume in the same world space as the original.

    Chains: prepared index -> crop-box index (resampling with aligned pixel centres) ->
    slices-last index -> canonical index -> world.
    """
    h0, h1, w0, w1 = box
    scale = np.diag([(h1 - h0) / image_size, (w1 - w0) / image_size, 1.0, 1.0])
    scale[0, 3] = h0 + 0.5 * scale[0, 0] - 0.5
    scale[1, 3] = w0 + 0.5 * scale[1, 1] - 0.5
    return canonical_aff @ slices_last_index_matrix(axis_name, canonical_shape) @ scale


def prepare_volume(case: Case, label_map: dict[int, int], *, image_size: int = IMAGE_SIZE,
                   slice_axis: str = "axial", crop: str = "label", margin: float = 10.0,
                   min_crop_size: float = 0.0, crop_size: float | None = None,
                   clip_lower: float = 0.0, clip_upper: float = 98.0):
    """Run the chain for one case.

    Returns (image [S, S, D] float32 z-scored, label [S, S, D] uint8 classes, record) where
    record is JSON-serialisable and holds what ``restore_prediction`` needs plus statistics.
    Intensity statistics come from the whole scan before cropping, so they do not depend on
    the crop box or on padding. crop: "label" (box around the labels, ``margin`` mm) or
    "center" (``crop_size`` mm, default the whole plane).
    """
    mapped, dropped = map_labels(case.label, label_map)
    num_classes = max(label_map.values()) + 1
    image_hwd = to_slices_last(case.image, slice_axis)
    label_hwd = to_slices_last(mapped, slice_axis)
    spacing_hwd = _slices_last_spacing(case.spacing, slice_axis)
    clipped, (lo, hi) = clip_percentiles(image_hwd, clip_lower, clip_upper)
    normed, mean, std = zscore(clipped)
    if crop == "label":
        box = label_crop_box(label_hwd, margin, min_crop_size, spacing_hwd[:2])
    elif crop == "center":
        box = center_crop_box(label_hwd.shape[:2], crop_size, spacing_hwd[:2])
    else:
        raise ValueError(f"crop must be 'label' or 'center', got {crop!r}")
    # padding takes the darkest normalised value: outside the scan looks like air/background
    fill = np.float32(normed.min())
    image = resample_hw(crop_hw(normed, box, fill), (image_size, image_size), order=1)
    label = resample_hw(crop_hw(label_hwd, box, 0), (image_size, image_size), order=0)
    h0, h1, w0, w1 = box
    margin_slices = int(math.ceil(margin / spacing_hwd[2] - 1e-6)) if margin > 0 else 0
    record = {
        "image": os.path.abspath(case.image_path),
        "label": os.path.abspath(case.label_path),
        "original": case.original,
        "canonical": {"orientation": CANONICAL, "shape": [int(s) for s in case.image.shape],
                      "affine": case.canonical_affine.tolist(),
                      "spacing": [float(s) for s in case.spacing]},
        "slice_axis": slice_axis,
        "slices_last_shape": [int(s) for s in label_hwd.shape],
        "slices_last_spacing": spacing_hwd,
        "crop": crop,
        "crop_box": [int(h0), int(h1), int(w0), int(w1)],
        "labelled_slices": list(labelled_slice_range(label_hwd, margin_slices)),
        "prepared": {
            "shape": [int(s) for s in image.shape],
            "spacing": [(h1 - h0) * spacing_hwd[0] / image_size,
                        (w1 - w0) * spacing_hwd[1] / image_size, spacing_hwd[2]],
            "affine": prepared_affine(case.canonical_affine, case.image.shape, slice_axis,
                                      box, image_size).tolist(),
        },
        "intensity": {"clip_lower_percentile": float(clip_lower),
                      "clip_upper_percentile": float(clip_upper),
                      "clip_lower_value": lo, "clip_upper_value": hi,
                      "mean": mean, "std": std,
                      "min": float(image_hwd.min()), "max": float(image_hwd.max())},
        "class_voxels": class_voxels(mapped, num_classes),
        "prepared_class_voxels": class_voxels(label, num_classes),
        "dropped_ids": {str(k): v for k, v in sorted(dropped.items())},
    }
    return image, label, record


def _slices_last_spacing(spacing_xyz, axis_name: str) -> list[float]:
    (h, _), (w, _), d = _view(axis_name)
    return [float(spacing_xyz[h]), float(spacing_xyz[w]), float(spacing_xyz[d])]


# ----------------------------------------------------------------------------- inverse
def original_nifti(canonical_vol: np.ndarray, record: dict) -> nib.Nifti1Image:
    """Canonical [X, Y, Z] labels -> uint8 NIfTI with the original shape, affine and header."""
    return scan_nifti(from_canonical(canonical_vol, record["original"]["orientation"]), record)


def scan_nifti(data: np.ndarray, record: dict, dtype=np.uint8) -> nib.Nifti1Image:
    """An array in the original file's layout, [X, Y, Z] or [X, Y, Z, C] -> NIfTI of
    ``dtype`` with the original shape, affine and header.

    sform/qform (with their codes), zooms and the spatial unit are those of the original
    file, so that nibabel and SimpleITK read the same geometry as from the input.
    """
    orig = record["original"]
    data = np.ascontiguousarray(data)
    if list(data.shape[:3]) != list(orig["shape"]):
        raise ValueError(f"restored shape {data.shape} differs from original {orig['shape']}")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(dtype)
    img = nib.Nifti1Image(data.astype(dtype), np.array(orig["affine"]), hdr)
    img.header.set_qform(np.array(orig["qform"]), int(orig["qform_code"]))
    img.header.set_sform(np.array(orig["sform"]), int(orig["sform_code"]))
    img.header.set_zooms(tuple(orig["zooms"]) + (1.0,) * (data.ndim - 3))
    img.header.set_xyzt_units(xyz=orig["xyz_unit"])
    img.update_header()
    return img


def _check_prepared(shape, record: dict) -> None:
    expected = record["prepared"]["shape"]
    if list(shape[:3]) != list(expected):
        raise ValueError(f"prediction shape {tuple(shape)} differs from the prepared shape "
                         f"{tuple(expected)}")


def restore_prediction(pred_hwd: np.ndarray, record: dict) -> nib.Nifti1Image:
    """Prediction on the prepared volume [S, S, D] -> uint8 NIfTI in the original geometry.

    Undoes, in reverse order: in-plane resampling (nearest, to the crop-box size), the crop
    (outside the box is background 0), the slice-axis view and the canonical reorientation.
    ``record`` is the case's entry of dataset.json. When the crop box is no larger than S
    (the prepared volume up-samples), prepared labels come back exactly: the nearest-
    neighbour rule of ``resample_hw`` makes up- then down-sampling the identity.
    """
    pred = np.asarray(pred_hwd)
    _check_prepared(pred.shape, record)
    h0, h1, w0, w1 = record["crop_box"]
    patch = resample_hw(pred, (h1 - h0, w1 - w0), order=0)
    hwd = uncrop_hw(patch, record["crop_box"], record["slices_last_shape"])
    canonical = from_slices_last(hwd, record["slice_axis"])
    return original_nifti(canonical, record)


def restore_probabilities(probs_hwdc: np.ndarray, record: dict) -> np.ndarray:
    """Class probabilities on the prepared volume [S, S, D, C] -> [X, Y, Z, C] float32 in
    the original file's array layout (``scan_nifti`` writes it).

    The inverse steps of ``restore_prediction``, with linear in-plane resampling (each
    class's map is resampled alone, so every voxel still sums to 1); outside the crop box
    the background has probability 1. The argmax of the result is the label map at the
    scan's resolution, smoother than the nearest-neighbour one when the scan is finer than
    the prepared grid.
    """
    probs = np.asarray(probs_hwdc, np.float32)
    _check_prepared(probs.shape, record)
    h0, h1, w0, w1 = record["crop_box"]
    orientation = record["original"]["orientation"]
    out = np.empty(tuple(record["original"]["shape"]) + probs.shape[3:], np.float32)
    for c in range(probs.shape[3]):
        # background as 1 - p: the uncropped outside (0) then becomes probability 1
        p = 1.0 - probs[..., 0] if c == 0 else probs[..., c]
        hwd = uncrop_hw(resample_hw(p, (h1 - h0, w1 - w0), order=1), record["crop_box"],
                        record["slices_last_shape"])
        hwd = 1.0 - hwd if c == 0 else hwd
        out[..., c] = from_canonical(from_slices_last(hwd, record["slice_axis"]), orientation)
    return out
