"""Segment new scans (PHASE="predict"): a trained model on unlabelled CT or MR, one label map
per scan in the scan's own shape, affine and orientation, and the volume of every class.

A scan is prepared as the run's training data were (lib/prep.py, with the settings that
data/prepare.py recorded in their dataset.json), except that the crop never looks at a label:
a centre crop of the extent the training crops had (the recorded size for ``--crop center``,
the mean training crop box for ``--crop label``), or the whole plane. The network's class
probabilities on the prepared volume are put back through the inverse of every step
(lib.prep.restore_probabilities): linear in-plane, the crop (background outside), the slice
axis, the reorientation; the label map is their argmax at the scan's own resolution. A DICOM
series gives a NIfTI in the series' geometry.
"""
from __future__ import annotations

import csv
import io
import os

import nibabel as nib
import numpy as np

from lib import prep
from lib.data import DataError
from lib.files import atomic_path, write_text

SCAN_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
VOLUMES_FILE = "volumes.csv"


# ---------------------------------------------------------------------- inputs
def _is_dicom_series(folder: str) -> bool:
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder))


def scan_name(path: str) -> str:
    """The name a scan's outputs take: its file name without the suffix, or its folder's."""
    base = os.path.basename(os.path.normpath(path))
    for suffix in SCAN_SUFFIXES:
        if base.endswith(suffix):
            return base[:-len(suffix)]
    return base


def find_scans(inputs) -> list[str]:
    """The scans ``inputs`` name: image files (NIfTI, MHA, NRRD), DICOM series folders, or
    folders holding either (one level down). DataError for a path that does not exist, a
    file that is no scan, or a folder without scans."""
    scans = []
    for path in inputs:
        if not os.path.exists(path):
            raise DataError(f"{path}: does not exist")
        if os.path.isfile(path):
            if not path.endswith(SCAN_SUFFIXES):
                raise DataError(f"{path}: not a scan (expected {', '.join(SCAN_SUFFIXES)} or "
                                "a DICOM series folder)")
            scans.append(path)
        elif _is_dicom_series(path):
            scans.append(path)
        else:
            found = [os.path.join(path, n) for n in sorted(os.listdir(path))]
            found = [p for p in found if (os.path.isfile(p) and p.endswith(SCAN_SUFFIXES))
                     or (os.path.isdir(p) and _is_dicom_series(p))]
            if not found:
                raise DataError(f"{path}: no scans in this folder (NIfTI/MHA/NRRD files or "
                                "DICOM series folders)")
            scans.extend(found)
    names = [scan_name(s) for s in scans]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"two scans named {twice[0]!r} ({', '.join(s for s in scans if scan_name(s) == twice[0])}); "
                        "their outputs would overwrite each other")
    return scans


def output_paths(scan: str, out_dir: str) -> dict:
    name = scan_name(scan)
    return {"labels": os.path.join(out_dir, f"{name}_seg.nii.gz"),
            "probabilities": os.path.join(out_dir, f"{name}_prob.nii.gz")}


def check_outputs(scans, inputs, out_dir: str, overwrite: bool) -> None:
    """DataError before any work: an output folder inside an input folder, or outputs that
    exist already (without ``overwrite``). Beside an input file is fine."""
    out = os.path.abspath(out_dir)
    for path in inputs:  # a folder of scans: later runs would take the outputs for scans
        folder = os.path.abspath(path)
        if os.path.isdir(path) and (out == folder or out.startswith(folder + os.sep)):
            raise DataError(f"{out_dir}: the output folder is inside the input folder {path}")
    if overwrite:
        return
    existing = [p for s in scans for p in output_paths(s, out_dir).values() if os.path.exists(p)]
    if os.path.exists(os.path.join(out_dir, VOLUMES_FILE)):
        existing.append(os.path.join(out_dir, VOLUMES_FILE))
    if existing:
        raise DataError(f"{existing[0]}: exists already ({len(existing)} output file(s) in "
                        f"{out_dir}); set --predict_overwrite=true to replace them")


# ---------------------------------------------------------------------- preparation
def recorded_preparation(dataset_json: str) -> dict:
    """How a run's training data were prepared, from the dataset.json data/prepare.py wrote:
    slice axis, in-plane size, clipping percentiles and the in-plane extent (mm) of the
    label-free centre crop (None: the whole plane)."""
    import json

    try:
        with open(dataset_json, encoding="utf-8") as handle:
            data = json.load(handle)
        settings = data["settings"]
        cases = [c for c in data["cases"] if c.get("split") in ("train", "val")] or data["cases"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{dataset_json}: not a dataset.json of data/prepare.py ({err})") from None
    if settings["crop"] == "center":
        extent = settings["crop_size_mm"]
    else:  # the label boxes differ per case: their mean extent, as a square
        extent = float(np.mean([max((c["crop_box"][1] - c["crop_box"][0]) * c["slices_last_spacing"][0],
                                    (c["crop_box"][3] - c["crop_box"][2]) * c["slices_last_spacing"][1])
                                for c in cases]))
    return {"image_size": int(settings["image_size"]), "slice_axis": settings["slice_axis"],
            "clip_lower": float(settings["clip_lower_percentile"]),
            "clip_upper": float(settings["clip_upper_percentile"]),
            "crop_size_mm": extent, "training_crop": settings["crop"], "source": dataset_json}


def read_scan(path: str) -> prep.Case:
    """An image (file or DICOM series) as a Case without a label (an all-background one)."""
    image, affine, header = prep.read_image(path)
    if min(image.shape) < 2:
        raise DataError(f"{path}: a 2D image (shape {tuple(image.shape)}); a scan has several "
                        "slices in each direction")
    return prep.make_case(path, "", image, affine, header, np.zeros(image.shape, np.uint8))


def prepare_scan(path: str, preparation: dict):
    """(prepared image [S, S, D] float32, record for restore_prediction) of one scan."""
    case = read_scan(path)
    image, _, record = prep.prepare_volume(
        case, {0: 0}, image_size=preparation["image_size"],
        slice_axis=preparation["slice_axis"], crop="center",
        crop_size=preparation["crop_size_mm"], clip_lower=preparation["clip_lower"],
        clip_upper=preparation["clip_upper"])
    return image, record


# ---------------------------------------------------------------------- the phase
def class_volumes_ml(labels: np.ndarray, affine, class_names) -> dict:
    """{class name: volume in mL} of a label map [X, Y, Z] with its voxel-to-world affine."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    counts = np.bincount(np.asarray(labels, np.int64).ravel(), minlength=len(class_names) + 1)
    return {name: float(counts[c]) * voxel_ml for c, name in enumerate(class_names, start=1)}


def segment_scan(predict, modality: str, path: str, preparation: dict,
                 probabilities: bool = False, postprocess=None):
    """(label map NIfTI, probabilities NIfTI or None) of one scan, both in its own geometry.

    ``predict(modality, image [S, S, D], probabilities=True) -> [S, S, D, C]``; the labels
    are uint8, the probabilities [X, Y, Z, C] float32 (every voxel sums to 1).
    ``postprocess``: labels [X, Y, Z] -> labels, applied to the argmax at the scan's
    resolution (the run's post-processing, lib/postprocess.py); the probabilities are the
    network's."""
    image, record = prepare_scan(path, preparation)
    probs = prep.restore_probabilities(predict(modality, image, probabilities=True), record)
    labels = np.argmax(probs, axis=-1)
    labels = prep.scan_nifti(postprocess(labels) if postprocess else labels, record)
    return labels, prep.scan_nifti(probs, record, np.float32) if probabilities else None


def predict_scans(predict, modality: str, scans, out_dir: str, preparation: dict,
                  class_names, log=print, progress: bool = True,
                  probabilities: bool = False, postprocess=None) -> list[dict]:
    """Segment every scan (``segment_scan``); write ``<name>_seg.nii.gz`` (uint8, the scan's
    geometry) per scan, with ``probabilities`` also ``<name>_prob.nii.gz`` ([X, Y, Z, C]
    float32, class 0 first), and volumes.csv; ``postprocess``: segment_scan's. Returns one row per scan (name, input, shape,
    the volume of every class in mL)."""
    from tqdm import tqdm

    rows = []
    for scan in tqdm(scans, desc="predict", disable=not progress, dynamic_ncols=True):
        nii, probs = segment_scan(predict, modality, scan, preparation, probabilities,
                                  postprocess)
        paths = output_paths(scan, out_dir)
        for key, img in (("labels", nii), ("probabilities", probs)):
            if img is not None:
                with atomic_path(paths[key]) as tmp:
                    nib.save(img, tmp)
        data = np.asarray(nii.dataobj)
        row = {"case": scan_name(scan), "input": os.path.abspath(scan),
               "shape": "x".join(str(s) for s in data.shape),
               **{f"{n}_ml": round(v, 3) for n, v in class_volumes_ml(
                   data, nii.affine, class_names).items()}}
        rows.append(row)
        log(f"{scan_name(scan)}: {paths['labels']} " + ", ".join(
            f"{n} {row[f'{n}_ml']:.1f} mL" for n in class_names))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(os.path.join(out_dir, VOLUMES_FILE), text.getvalue())
    return rows
