"""Prepare one modality's scans for training and evaluation (command and importable function).

Example::

    python data/prepare.py --modality ct --images a.nii.gz b.nii.gz --labels a_seg.nii.gz \\
        b_seg.nii.gz --label_map 5:1,2:2,3:3,1:4 --test b --out_dir prepared/ct

Inputs: image NIfTI files or DICOM series folders, label NIfTI files (``--images/--labels``
or ``--cases_csv`` with ``image,label[,split]`` lines). Every case is read and checked
before anything is written; the output is built in a hidden sibling folder and renamed into
place at the end, so a failure never leaves partial output and ``--overwrite`` keeps the old
output until the new one is complete.

Output folder (S = image size, D = slices of the scan)::

    train/<case>_<k:04d>.tfrecords        one slice per file, released format (lib.data)
    train/<case>_aug<c>_<k:04d>.tfrecords offline augmented copies (--augment_copies)
    val/<case>_<k:04d>.tfrecords          validation slices
    val/<case>_image.nii.gz, _label.nii.gz, _gt.nii.gz   validation volumes (like test/)
    train/<case>_image.nii.gz, _label.nii.gz, _gt.nii.gz training volumes for the 3D
                                          network (only with --train_volumes)
    test/<case>_image.nii.gz              float32 [S, S, D], z-scored, slices last
    test/<case>_label.nii.gz              uint8 [S, S, D] classes
    test/<case>.npz                       arr_0 image, arr_1 label, flipped on axes 0 and 1
                                          (the original test format; load_volume undoes it)
    test/<case>_gt.nii.gz                 uint8 mapped label in the original scan's geometry
    train_list.txt, val_list.txt          TFRecord paths (relative to the list file)
    test_list.txt, val_volume_list.txt    "image,label" NIfTI pairs
    train_volume_list.txt                 "image,label" pairs (only with --train_volumes)
    test_npz_list.txt                     .npz paths
    dataset.json                          settings and "cases": a list of per-case records
                                          (lib.prep.prepare_volume + name, split, files);
                                          lib.prep.restore_prediction(pred, record) needs one

Errors in the input give one line "error: ..." on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

SPLITS = ("train", "val", "test")
FORMAT = "ummkd-prepared"
FORMAT_VERSION = 1
# --augment_copies: every copy rotated, scaled, shifted and brightened (lib/augment.py)
OFFLINE_AUGMENTATION = {"rotate": (1.0, -15.0, 15.0), "scale": (1.0, 0.9, 1.1),
                        "shift": (1.0, -0.05, 0.05), "elastic": (0.0, 0.0, 0.0),
                        "bias_field": (0.0, 0.0, 0.0), "noise": (0.0, 0.0, 0.0),
                        "blur": (0.0, 0.0, 0.0), "brightness": (1.0, 0.9, 1.1),
                        "contrast": (0.0, 1.0, 1.0), "gamma": (0.0, 1.0, 1.0)}


def _import_quietly():
    """Import TensorFlow (via lib.data) with fd 2 silenced.

    TensorFlow's C++ runtime writes several log lines to stderr at import time, before any
    Python-side setting can stop them; they would bury the one-line error this command
    promises; device discovery (which logs a failed CUDA probe on CPU-only machines) is
    done inside the same window. Python errors raised by the import still show once fd 2 is
    restored.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow

        tensorflow.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


if __name__ == "__main__":
    _import_quietly()

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from lib import prep  # noqa: E402
from lib.files import atomic_path, write_json  # noqa: E402
from lib.data import DataError, case_name, write_list, write_slices  # noqa: E402


# ----------------------------------------------------------------------------- inputs
def read_cases_csv(path: str) -> list[tuple[str, str, str | None]]:
    """Lines ``image,label[,split]`` -> [(image, label, split or None)].

    Relative paths are resolved against the CSV's folder; blank lines, lines starting with
    '#' and a header line starting with "image" are skipped.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: cases file does not exist")
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, encoding="utf-8", newline="") as handle:
        for lineno, row in enumerate(csv.reader(handle), 1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if lineno == 1 and row[0].lower() == "image":
                continue
            if len(row) not in (2, 3) or not row[0] or not row[1]:
                raise DataError(f"{path}:{lineno}: expected 'image,label[,split]', got "
                                f"{','.join(row)!r}")
            split = row[2] if len(row) == 3 and row[2] else None
            if split is not None and split not in SPLITS:
                raise DataError(f"{path}:{lineno}: split must be one of {', '.join(SPLITS)}, "
                                f"got {split!r}")
            image, label = (p if os.path.isabs(p) else os.path.join(base, p) for p in row[:2])
            rows.append((image, label, split))
    if not rows:
        raise DataError(f"{path}: cases file lists no case")
    return rows


def input_case_name(image_path: str) -> str:
    """Case name of an input: file name without extension and _image suffix, or folder name."""
    path = image_path.rstrip("/\\")
    if os.path.isdir(path):
        return os.path.basename(path)
    name = case_name(path)
    for ext in (".mha", ".mhd", ".nrrd", ".nhdr"):
        if name.endswith(ext):
            name = case_name(name[: -len(ext)] + ".nii")
    return name


def resolve_split(names: list[str], split) -> dict[str, str]:
    """Assign every case to train/val/test.

    split: {case: "train"|"val"|"test"} or {"train": [cases], "val": [...], "test": [...]}.
    In the second form cases listed nowhere go to train when "train" is not given;
    otherwise every case must be listed exactly once.
    """
    split = dict(split or {})
    if split and set(split) <= set(SPLITS) and all(isinstance(v, (list, tuple))
                                                    for v in split.values()):
        assignment: dict[str, str] = {}
        for part, members in split.items():
            for name in members:
                if name in assignment:
                    raise DataError(f"split: case {name!r} is in both {assignment[name]} "
                                    f"and {part}")
                assignment[name] = part
        if "train" not in split:
            for name in names:
                assignment.setdefault(name, "train")
    else:
        assignment = {str(k): v for k, v in split.items()}
        for name, part in assignment.items():
            if part not in SPLITS:
                raise DataError(f"split: case {name!r} has split {part!r}; expected one of "
                                f"{', '.join(SPLITS)}")
    unknown = sorted(set(assignment) - set(names))
    if unknown:
        raise DataError(f"split: unknown case(s) {', '.join(unknown)}; cases are "
                        f"{', '.join(names)}")
    missing = [n for n in names if n not in assignment]
    if missing:
        raise DataError(f"split: case(s) {', '.join(missing)} have no split")
    return {n: assignment[n] for n in names}


def fraction_split(names: list[str], test_fraction: float, val_fraction: float = 0.0,
                   seed: int = 0) -> dict[str, str]:
    """Random split with round(n * fraction) test and val cases (seeded, reproducible)."""
    if not (0.0 <= test_fraction <= 1.0 and 0.0 <= val_fraction <= 1.0
            and test_fraction + val_fraction <= 1.0):
        raise DataError(f"split fractions must lie in [0, 1] and sum to at most 1, got "
                        f"test {test_fraction}, val {val_fraction}")
    order = list(np.random.default_rng(seed).permutation(len(names)))
    n_test = int(round(len(names) * test_fraction))
    n_val = int(round(len(names) * val_fraction))
    out = {}
    for rank, idx in enumerate(order):
        out[names[idx]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return {n: out[n] for n in names}


def _input_folders(cases) -> list[str]:
    folders = set()
    for image, label, _ in cases:
        for path in (image, label):
            real = os.path.realpath(path)
            folders.add(real if os.path.isdir(real) else os.path.dirname(real))
    return sorted(folders)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out_dir(out_dir: str, cases, overwrite: bool) -> None:
    """Refuse output folders that would mix with inputs or clobber data we did not write."""
    real_out = os.path.realpath(out_dir)
    for folder in _input_folders(cases):
        if _inside(real_out, folder):
            raise DataError(f"{out_dir}: output folder is inside input folder {folder}")
        if _inside(folder, real_out):
            raise DataError(f"{out_dir}: output folder contains input folder {folder}")
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise DataError(f"{out_dir}: output path exists and is not a folder")
        if os.listdir(out_dir):
            if not os.path.isfile(os.path.join(out_dir, "dataset.json")):
                raise DataError(f"{out_dir}: output folder is not empty and holds no prepared "
                                "data (no dataset.json); refusing to replace it")
            if not overwrite:
                raise DataError(f"{out_dir}: output folder already holds prepared data; "
                                "pass --overwrite to replace it")


def _swap_in(tmp: str, out_dir: str) -> None:
    """Move the finished tmp folder to out_dir, replacing an old output only now."""
    backup = None
    if os.path.isdir(out_dir):
        parent = os.path.dirname(os.path.abspath(out_dir))
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rmdir(backup)
        os.rename(out_dir, backup)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if backup is not None:
            os.rename(backup, out_dir)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


# ----------------------------------------------------------------------------- writing
def _nifti(data: np.ndarray, affine, dtype) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=dtype), np.asarray(affine))
    img.header.set_qform(np.asarray(affine), 1)
    img.header.set_sform(np.asarray(affine), 1)
    img.header.set_xyzt_units(xyz="mm")
    return img


def _write_volume(folder: str, name: str, image, label, record, case_label_mapped,
                  with_npz: bool) -> dict:
    """Test-style files of one case; returns their paths relative to the output folder."""
    affine = record["prepared"]["affine"]
    paths = {"image": os.path.join(folder, f"{name}_image.nii.gz"),
             "label": os.path.join(folder, f"{name}_label.nii.gz"),
             "gt": os.path.join(folder, f"{name}_gt.nii.gz")}
    for key, img in (("image", _nifti(image, affine, np.float32)),
                     ("label", _nifti(label, affine, np.uint8)),
                     ("gt", prep.original_nifti(case_label_mapped, record))):
        with atomic_path(paths[key]) as tmp:
            nib.save(img, tmp)
    if with_npz:
        paths["npz"] = os.path.join(folder, f"{name}.npz")
        # the original reader flips axes 0 and 1 of .npz volumes, so store them flipped
        with atomic_path(paths["npz"]) as tmp:
            np.savez_compressed(tmp, np.flip(image, (0, 1)).astype(np.float32),
                                np.flip(label, (0, 1)).astype(np.uint8))
    return paths


def _write_slice_files(folder, name, image, label, slice_range, label_layout, prefix=""):
    paths = []
    for k in range(*slice_range):
        path = os.path.join(folder, f"{name}{prefix}_{k:04d}.tfrecords")
        write_slices(path, [(prep.stack_slices(image, k), label[:, :, k])], label_layout)
        paths.append(path)
    return paths


def _augmented_copy(augment, image, label, seed_pair):
    """One augmented copy of a case [S, S, D]: one random transform for all its slices."""
    import tensorflow as tf

    aug_img, aug_lab = augment(image, label, seed=tf.constant(seed_pair, dtype=tf.int64))
    return aug_img.numpy(), aug_lab.numpy().astype(label.dtype)


def _relative(paths: dict, root: str) -> dict:
    return {k: os.path.relpath(v, root) for k, v in paths.items()}


# ----------------------------------------------------------------------------- main function
def prepare(cases, label_map, out_dir, *, modality, split, image_size=prep.IMAGE_SIZE,
            slice_axis="axial", crop="label", margin=10.0, min_crop_size=0.0, crop_size=None,
            clip_lower=0.0, clip_upper=98.0, augment_copies=0, label_layout="released",
            train_slices="labelled", train_volumes=False, overwrite=False, seed=0,
            label_resample="none", log=print) -> dict:
    """Prepare one modality's cases into ``out_dir`` and return the dataset.json content.

    cases: [(image_path, label_path, case_name or None)]; label_map: {dataset id: class} or
    "id:class,..."; split: see ``resolve_split``. margin, min_crop_size and crop_size are in
    mm; the labelled slice range for training is widened by ``margin`` mm too.
    train_slices: "labelled" (train/val slices only in the labelled range +- margin) or
    "all". train_volumes: also write whole training volumes (the 3D network trains on slabs
    of them). label_resample: "none" (a label on another grid than its image is an error,
    unless it is the same voxels in another axis order or direction) or "nearest" (resample
    it onto the image grid). Raises DataError for bad input before anything is written.
    """
    if isinstance(label_map, str):
        label_map = prep.parse_label_map(label_map)
    label_map = {int(k): int(v) for k, v in label_map.items()}
    _check_settings(image_size, slice_axis, crop, margin, min_crop_size, crop_size,
                    clip_lower, clip_upper, augment_copies, label_layout, train_slices)
    cases = [(str(img), str(lab), name or input_case_name(str(img)))
             for img, lab, name in cases]
    if not cases:
        raise DataError("no case given")
    names = [c[2] for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"duplicate case name(s) {', '.join(dupes)}; give unique file names")
    assignment = resolve_split(names, split)
    check_out_dir(out_dir, cases, overwrite)

    # validation pass: read everything once so that bad input is found before any write
    for image_path, label_path, _ in cases:
        case = prep.read_case(image_path, label_path, label_resample=label_resample)
        for note in case.notes:
            log(note)
        mapped, _ = prep.map_labels(case.label, label_map)
        if crop == "label" and not mapped.any():
            raise DataError(f"{label_path}: label has no voxel of any mapped class "
                            f"{sorted(label_map)}; cannot crop around it")
        del case, mapped
    if "test" not in assignment.values():
        log("note: no test case; all cases go to train/val")

    settings = {"modality": modality, "image_size": int(image_size), "slice_axis": slice_axis,
                "crop": crop, "margin_mm": float(margin), "min_crop_size_mm": float(min_crop_size),
                "crop_size_mm": None if crop_size is None else float(crop_size),
                "clip_lower_percentile": float(clip_lower),
                "clip_upper_percentile": float(clip_upper), "normalisation": "zscore",
                "augment_copies": int(augment_copies), "label_layout": label_layout,
                "train_slices": train_slices, "train_volumes": bool(train_volumes),
                "seed": int(seed), "label_resample": label_resample,
                "orientation": prep.CANONICAL,
                "view": "radiological: patient right on image left; anterior (axial) or "
                        "superior (coronal, sagittal) up"}
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.partial-",
                           dir=parent)
    try:
        dataset = _write_all(tmp, cases, assignment, label_map, settings, log)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir}")
    return dataset


def _check_settings(image_size, slice_axis, crop, margin, min_crop_size, crop_size,
                    clip_lower, clip_upper, augment_copies, label_layout, train_slices):
    problems = []
    if int(image_size) < 8:
        problems.append(f"image size must be at least 8, got {image_size}")
    if slice_axis not in prep.SLICE_AXES:
        problems.append(f"slice axis must be one of {', '.join(prep.SLICE_AXES)}")
    if crop not in ("label", "center"):
        problems.append(f"crop must be 'label' or 'center', got {crop!r}")
    if margin < 0 or min_crop_size < 0 or (crop_size is not None and crop_size <= 0):
        problems.append("margin and crop sizes must not be negative")
    if not 0.0 <= clip_lower < clip_upper <= 100.0:
        problems.append(f"clip percentiles must satisfy 0 <= lower < upper <= 100, got "
                        f"{clip_lower}, {clip_upper}")
    if augment_copies < 0:
        problems.append("augment copies must not be negative")
    if label_layout not in ("released", "single"):
        problems.append(f"label layout must be 'released' or 'single', got {label_layout!r}")
    if train_slices not in ("labelled", "all"):
        problems.append(f"train slices must be 'labelled' or 'all', got {train_slices!r}")
    if problems:
        raise DataError("; ".join(problems))


def _write_all(root, cases, assignment, label_map, settings, log) -> dict:
    for part in SPLITS:
        os.makedirs(os.path.join(root, part))
    lists = {"train": [], "val": [], "test": [], "test_npz": [], "val_volume": [],
             "train_volume": []}
    records = []
    augment = None
    if settings["augment_copies"] > 0:
        from lib.augment import make_augment
        augment = make_augment(OFFLINE_AUGMENTATION)
    for index, (image_path, label_path, name) in enumerate(cases):
        part = assignment[name]
        case = prep.read_case(image_path, label_path, label_resample=settings["label_resample"])
        image, label, record = prep.prepare_volume(
            case, label_map, image_size=settings["image_size"],
            slice_axis=settings["slice_axis"], crop=settings["crop"],
            margin=settings["margin_mm"], min_crop_size=settings["min_crop_size_mm"],
            crop_size=settings["crop_size_mm"],
            clip_lower=settings["clip_lower_percentile"],
            clip_upper=settings["clip_upper_percentile"])
        record = {"name": name, "split": part, **record}
        folder = os.path.join(root, part)
        depth = image.shape[2]
        slice_range = ((0, depth) if settings["train_slices"] == "all"
                       else tuple(record["labelled_slices"]))
        files: dict = {}
        if part in ("train", "val"):
            slices = _write_slice_files(folder, name, image, label, slice_range,
                                        settings["label_layout"])
            if part == "train":
                for copy in range(settings["augment_copies"]):
                    aug_img, aug_lab = _augmented_copy(augment, image, label,
                                                       (settings["seed"], index * 1000 + copy))
                    slices += _write_slice_files(folder, name, aug_img, aug_lab, slice_range,
                                                 settings["label_layout"], f"_aug{copy}")
            lists[part] += slices
            record["train_slice_range"] = list(slice_range)
            record["num_slice_files"] = len(slices)
        if part in ("val", "test") or (part == "train" and settings["train_volumes"]):
            mapped, _ = prep.map_labels(case.label, label_map)
            paths = _write_volume(folder, name, image, label, record, mapped,
                                  with_npz=part == "test")
            files.update(_relative(paths, root))
            pair = f"{paths['image']},{paths['label']}"
            if part == "test":
                lists["test"].append(pair)
                lists["test_npz"].append(paths["npz"])
            elif part == "train":
                lists["train_volume"].append(pair)
            else:
                lists["val_volume"].append(pair)
        record["files"] = files
        records.append(record)
        dropped = record["dropped_ids"]
        shown = ", ".join(f"{k}:{v}" for k, v in dropped.items()) or "none"
        log(f"{name} ({part}): {case.orientation} {tuple(case.original_shape)} -> "
            f"{tuple(image.shape)}, crop box {record['crop_box']}; dropped label ids "
            f"(id:voxels) {shown}")
    list_files = {}
    for key, filename in (("train", "train_list.txt"), ("val", "val_list.txt"),
                          ("test", "test_list.txt"), ("test_npz", "test_npz_list.txt"),
                          ("val_volume", "val_volume_list.txt"),
                          ("train_volume", "train_volume_list.txt")):
        if lists[key]:
            write_list(os.path.join(root, filename), lists[key])
            list_files[key] = filename
    dataset = {
        "format": FORMAT, "version": FORMAT_VERSION, "modality": settings["modality"],
        "settings": settings,
        "label_map": {str(k): v for k, v in sorted(label_map.items())},
        "num_classes": max(label_map.values()) + 1,
        "splits": {p: [r["name"] for r in records if r["split"] == p] for p in SPLITS},
        "lists": list_files,
        # a list of records with "name" (lib/evaluate.py looks them up by that key)
        "cases": records,
    }
    write_json(os.path.join(root, "dataset.json"), dataset, indent=1)
    return dataset


# ----------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, exit 2, like every other input error of this command
        self.exit(2, f"error: {message.splitlines()[0]}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--modality", required=True, help="name stored in dataset.json (ct, mr, ...)")
    p.add_argument("--images", nargs="+", help="image NIfTI files or DICOM series folders")
    p.add_argument("--labels", nargs="+", help="label NIfTI files, same order as --images")
    p.add_argument("--cases_csv", help="CSV with image,label[,split] lines (instead of "
                                       "--images/--labels)")
    p.add_argument("--label_map", required=True, help="dataset id:class pairs, e.g. 5:1,2:2")
    p.add_argument("--split_file", help='JSON {"train": [cases], "val": [...], "test": [...]}'
                                        ' or {case: split}')
    for part in SPLITS:
        p.add_argument(f"--{part}", nargs="+", metavar="CASE", help=f"case names for {part}")
    p.add_argument("--test_fraction", type=float, help="random fraction of cases for test")
    p.add_argument("--val_fraction", type=float, default=0.0,
                   help="random fraction for val (with --test_fraction)")
    p.add_argument("--slice_axis", default="axial", choices=prep.SLICE_AXES)
    p.add_argument("--image_size", type=int, default=prep.IMAGE_SIZE)
    p.add_argument("--crop", default="label", choices=("label", "center"))
    p.add_argument("--margin", type=float, default=10.0,
                   help="mm around the labels (crop and training slice range)")
    p.add_argument("--min_crop_size", type=float, default=0.0, help="mm, label crop")
    p.add_argument("--crop_size", type=float, help="mm, centre crop (default: whole plane)")
    p.add_argument("--clip_lower", type=float, default=0.0, help="lower percentile")
    p.add_argument("--clip_upper", type=float, default=98.0, help="upper percentile")
    p.add_argument("--augment_copies", type=int, default=0,
                   help="offline augmented copies per training case")
    p.add_argument("--label_layout", default="released", choices=("released", "single"))
    p.add_argument("--train_slices", default="labelled", choices=("labelled", "all"))
    p.add_argument("--train_volumes", action="store_true",
                   help="also write the training volumes as NIfTI (for the 3D network)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label_resample", default="none", choices=prep.LABEL_RESAMPLING,
                   help="a label on another voxel grid than its image: refuse (none) or "
                        "resample it onto the image grid by nearest neighbour")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing prepared folder (only once the new one is done)")
    return p


def _cases_and_split(args):
    if args.cases_csv and (args.images or args.labels):
        raise DataError("give either --cases_csv or --images/--labels, not both")
    if args.cases_csv:
        rows = read_cases_csv(args.cases_csv)
    else:
        if not args.images or not args.labels:
            raise DataError("give --images and --labels (or --cases_csv)")
        if len(args.images) != len(args.labels):
            raise DataError(f"{len(args.images)} image(s) but {len(args.labels)} label(s)")
        rows = [(i, l, None) for i, l in zip(args.images, args.labels)]
    cases = [(i, l, input_case_name(i)) for i, l, _ in rows]
    names = [c[2] for c in cases]
    explicit = {p: getattr(args, p) for p in SPLITS if getattr(args, p)}
    sources = sum(bool(x) for x in (args.split_file, explicit, args.test_fraction is not None))
    if sources > 1:
        raise DataError("give only one of --split_file, --train/--val/--test, --test_fraction")
    if args.split_file:
        try:
            with open(args.split_file, encoding="utf-8") as handle:
                split = json.load(handle)
        except (OSError, ValueError) as err:
            raise DataError(f"{args.split_file}: cannot read split file ({err})") from None
        if not isinstance(split, dict):
            raise DataError(f"{args.split_file}: split file must hold a JSON object")
    elif explicit:
        split = explicit
    elif args.test_fraction is not None:
        split = fraction_split(names, args.test_fraction, args.val_fraction, args.seed)
    elif any(s for _, _, s in rows):
        if not all(s for _, _, s in rows):
            raise DataError(f"{args.cases_csv}: give a split on every line or on none")
        split = {n: s for n, (_, _, s) in zip(names, rows)}
    else:
        split = {n: "train" for n in names}
    return cases, split


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cases, split = _cases_and_split(args)
        prepare(cases, args.label_map, args.out_dir, modality=args.modality, split=split,
                image_size=args.image_size, slice_axis=args.slice_axis, crop=args.crop,
                margin=args.margin, min_crop_size=args.min_crop_size, crop_size=args.crop_size,
                clip_lower=args.clip_lower, clip_upper=args.clip_upper,
                augment_copies=args.augment_copies, label_layout=args.label_layout,
                train_slices=args.train_slices, train_volumes=args.train_volumes,
                overwrite=args.overwrite, seed=args.seed, label_resample=args.label_resample)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
