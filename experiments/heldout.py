"""The held-out comparison on real patients: data, splits, per-patient results, statistics.

``experiments/compare.py --preset=heldout`` uses this module to
* write the splits as files (data/prepare.py's ``--split_file`` format) under
  ``<out>/splits/``: the 20 CHAOS MR patients in K folds (every patient tested once, by the
  models of the one fold that did not train on it), and the CT split (``ct_0001`` of
  ../shared/data/abdomen_real trains, the DICOM patient of ../shared/data/ct_dicom_real
  tests, in every fold);
* prepare the data of every fold through data/prepare.py, in a child process each, under
  ``<out>/data/``: ``mr_fold<k>/`` and ``ct/``;
* collect every test patient's Dice per class from the runs' metrics.json (classes the
  patient's label map does not hold are marked absent, never scored 0 or 1), with the
  Wilcoxon signed-rank test of UMMKD against each baseline, paired over patients, and a
  figure of the per-patient Dice.

Paths are those of the shared data folder (``SHARED``, ../shared/data beside the repository).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
LABEL_MAPS = {"mr": "1:1,2:2,3:3,4:4",      # CHAOS ids are the classes already
              "ct": "5:1,2:2,3:3,1:4"}      # TotalSegmentator ids: liver, kidneys, spleen
CT_TRAIN = ("abdomen_real/ct_0001_image.nii.gz", "abdomen_real/ct_0001_label.nii.gz")
CT_TEST = ("ct_dicom_real/series", "ct_dicom_real/segmentation.nii.gz")
MR_FOLDER = "chaos_t2_mr"


class HeldOutError(RuntimeError):
    """The held-out data or a split file is not as expected; the message names the file."""


# ---------------------------------------------------------------------- splits
def chaos_cases(folder: str) -> list[tuple[str, str, str]]:
    """(image, label, case name) of every CHAOS patient in ``folder``, by patient id."""
    if not os.path.isdir(folder):
        raise HeldOutError(f"{folder}: the CHAOS MR folder is missing")
    ids = sorted((int(m.group(1)) for m in (re.fullmatch(r"image_(\d+)\.nii\.gz", n)
                                            for n in os.listdir(folder)) if m))
    cases = []
    for i in ids:
        label = os.path.join(folder, f"label_{i}.nii.gz")
        if not os.path.isfile(label):
            raise HeldOutError(f"{label}: missing (the label of image_{i}.nii.gz)")
        cases.append((os.path.join(folder, f"image_{i}.nii.gz"), label, f"image_{i}"))
    if not cases:
        raise HeldOutError(f"{folder}: no image_<id>.nii.gz files")
    return cases


def make_folds(names, k: int, seed: int = 0, n_val: int = 0) -> list[dict]:
    """K folds over ``names``: a seeded permutation cut into K test groups of sizes differing
    by at most one; each fold {"train": the others less ``n_val`` validation patients drawn
    among them (seeded), "val": those, "test": its group}, names in their given order within
    each list. Validation patients are never test patients of their fold."""
    names = list(names)
    if not 2 <= k <= len(names):
        raise HeldOutError(f"folds: expected 2..{len(names)} folds of {len(names)} patients, "
                           f"got {k}")
    order = np.random.default_rng(seed).permutation(len(names))
    groups = [set(int(i) for i in part) for part in np.array_split(order, k)]
    folds = []
    for f, g in enumerate(groups):
        rest = [i for i in range(len(names)) if i not in g]
        if not 0 <= n_val < len(rest):
            raise HeldOutError(f"validation: expected 0..{len(rest) - 1} patients of the "
                               f"{len(rest)} a fold trains on, got {n_val}")
        pick = np.random.default_rng([seed, f]).permutation(len(rest))[:n_val]
        val = {rest[int(j)] for j in pick}
        folds.append({"train": [n for i, n in enumerate(names) if i not in g and i not in val],
                      "val": [n for i, n in enumerate(names) if i in val],
                      "test": [n for i, n in enumerate(names) if i in g]})
    return folds


def write_split(path: str, split: dict) -> str:
    """Write a split file; an existing one is kept if it holds the same split and refused
    (HeldOutError naming it) if it holds another, so a rerun never changes a split."""
    from lib.files import write_json

    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            try:
                old = json.load(handle)
            except ValueError:
                old = None
        if old != split:
            raise HeldOutError(f"{path}: holds another split; move it away to make a new one")
        return path
    write_json(path, split, indent=1)
    return path


def splits(out: str, k: int, seed: int = 0, n_val: int = 0) -> dict:
    """{"mr": [fold split files], "ct": split file}, written under ``out``/splits; each MR
    fold holds ``n_val`` validation patients out of its training patients."""
    mr_names = [name for _, _, name in chaos_cases(os.path.join(SHARED, MR_FOLDER))]
    folder = os.path.join(out, "splits")
    mr = [write_split(os.path.join(folder, f"mr_fold{f}.json"), split)
          for f, split in enumerate(make_folds(mr_names, k, seed, n_val))]
    ct = write_split(os.path.join(folder, "ct.json"),
                     {"train": ["ct_0001"], "val": [], "test": ["series"]})
    return {"mr": mr, "ct": ct}


# ---------------------------------------------------------------------- data
# data/prepare.py settings of every fold: whole volumes as training slices (the sampler
# forces a share onto the organs, FOREGROUND_SHARE) and the intensity clip
PREPARATION = {"train_slices": "all", "clip_upper_percentile": 99.5}


def _prepared(out_dir: str, split_file: str, image_size: int, train_volumes: bool) -> bool:
    path = os.path.join(out_dir, "dataset.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    with open(split_file, encoding="utf-8") as handle:
        split = json.load(handle)
    want = {p: sorted(split.get(p, [])) for p in ("train", "val", "test")}
    return (data["settings"]["image_size"] == image_size
            and all(data["settings"].get(k) == v for k, v in PREPARATION.items())
            and (data["settings"]["train_volumes"] or not train_volumes)
            and {p: sorted(v) for p, v in data["splits"].items()} == want)


def prepare_data(out: str, split_files: dict, image_size: int, log=print,
                 train_volumes: bool = False) -> dict:
    """Prepare every fold's MR data and the CT data with data/prepare.py (child processes),
    skipping folders already prepared with the same split and size. Returns the list files:
    {"mr": [{"train", "test"} per fold], "ct": {"train", "test"}}; with ``train_volumes``
    (the 3D network) the training lists are those of whole volumes."""
    mr_cases = chaos_cases(os.path.join(SHARED, MR_FOLDER))
    jobs = [("mr", os.path.join(out, "data", f"mr_fold{f}"), split, mr_cases)
            for f, split in enumerate(split_files["mr"])]
    ct_cases = [(os.path.join(SHARED, a), os.path.join(SHARED, b), None)
                for a, b in (CT_TRAIN, CT_TEST)]
    jobs.append(("ct", os.path.join(out, "data", "ct"), split_files["ct"], ct_cases))
    for modality, folder, split, cases in jobs:
        if _prepared(folder, split, image_size, train_volumes):
            continue
        log(f"preparing {os.path.relpath(folder, ROOT)} ({len(cases)} {modality} scans)")
        args = [sys.executable, os.path.join(ROOT, "data", "prepare.py"), "--modality", modality,
                "--images", *[c[0] for c in cases], "--labels", *[c[1] for c in cases],
                "--label_map", LABEL_MAPS[modality], "--split_file", split,
                "--slice_axis", "axial", "--image_size", str(image_size), "--out_dir", folder,
                "--train_slices", PREPARATION["train_slices"],
                "--clip_upper", str(PREPARATION["clip_upper_percentile"]),
                *(["--train_volumes"] if train_volumes else [])]
        if os.path.isdir(folder):
            args.append("--overwrite")  # data/prepare.py's own folder of another split
        proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise HeldOutError(f"data/prepare.py for {folder}: "
                               + (proc.stderr.strip().splitlines() or ["failed"])[-1])
    train = "train_volume_list.txt" if train_volumes else "train_list.txt"
    lists = lambda folder: {"train": os.path.join(folder, train),
                            "test": os.path.join(folder, "test_list.txt"),
                            "val": (os.path.join(folder, "val_volume_list.txt")
                                    if os.path.isfile(os.path.join(folder, "val_volume_list.txt"))
                                    else "")}
    return {"mr": [lists(os.path.join(out, "data", f"mr_fold{f}"))
                   for f in range(len(split_files["mr"]))],
            "ct": lists(os.path.join(out, "data", "ct"))}


# ---------------------------------------------------------------------- results
PROTOCOLS = {"prepared": None, "scan": "scan_geometry"}  # metrics.json sections


def absent_classes(dataset_json: str) -> dict:
    """{case name: set of class ids without a voxel in its label map} from the
    class_voxels data/prepare.py recorded for each case."""
    with open(dataset_json, encoding="utf-8") as handle:
        cases = json.load(handle)["cases"]
    return {c["name"]: {int(k) for k, v in c["class_voxels"].items() if int(k) > 0 and v == 0}
            for c in cases}


def patient_rows(report: dict, absent: dict, **keys) -> list[dict]:
    """One row per (protocol, modality, case, class) of a metrics.json report: dice, assd,
    hd95, and ``absent`` (the class has no voxel in the case's labels: its metrics are left
    empty, not counted as 0 or 1). ``keys`` (scheme, seed, fold) start every row."""
    rows = []
    classes = report["classes"]
    for protocol, section in PROTOCOLS.items():
        source = report.get(section, {}) if section else report
        for modality in ("mr", "ct"):
            for case in source.get(modality, {}).get("cases", []):
                gone = absent.get(modality, {}).get(case["case"], set())
                for cid, name in enumerate(classes, start=1):
                    row = {**keys, "protocol": protocol, "modality": modality,
                           "case": case["case"], "class": name, "absent": cid in gone}
                    for metric in ("dice", "assd", "hd95"):
                        value = case.get(metric, {}).get(name)
                        row[metric] = (None if cid in gone or value is None
                                       or (isinstance(value, float) and math.isnan(value))
                                       else float(value))
                    rows.append(row)
    return rows


def write_rows(path: str, rows: list[dict]) -> None:
    """comparison.csv: the per-patient rows (absent classes: empty metrics, absent=1)."""
    from lib.files import write_text

    fields = ["scheme", "seed", "fold", "protocol", "modality", "case", "class", "absent",
              "dice", "assd", "hd95"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "absent": int(row["absent"]),
                         **{m: "" if row[m] is None else f"{row[m]:.6g}"
                            for m in ("dice", "assd", "hd95")}})
    write_text(path, buf.getvalue())


def tests(rows, protocol: str, modality: str, scheme: str, organ: str | None = None) -> dict:
    """{(case, seed, fold): Dice} of one scheme's tests: of ``organ``, or (None) the mean over
    the organs the case holds; absent organs are left out."""
    values: dict = {}
    for r in rows:
        if (r["protocol"], r["modality"], r["scheme"]) != (protocol, modality, scheme):
            continue
        if r["absent"] or r["dice"] is None or (organ is not None and r["class"] != organ):
            continue
        values.setdefault((r["case"], r["seed"], r["fold"]), []).append(r["dice"])
    return {key: float(np.mean(v)) for key, v in sorted(values.items())}


def per_patient(rows, protocol: str, modality: str, scheme: str, organ: str | None = None):
    """{case: Dice} of one scheme (``tests``), the mean over seeds and folds where a case was
    tested more than once (the CT patient, in every fold)."""
    by_case: dict = {}
    for (case, _, _), v in tests(rows, protocol, modality, scheme, organ).items():
        by_case.setdefault(case, []).append(v)
    return {case: float(np.mean(v)) for case, v in sorted(by_case.items())}


def seed_means(rows, protocol: str, modality: str, scheme: str,
               organ: str | None = None) -> dict:
    """{seed: mean Dice over that seed's tests} (``tests``): each seed's figure of the
    table, whose spread over seeds says how far a rerun with another seed may move it."""
    by_seed: dict = {}
    for (_, seed, _), v in tests(rows, protocol, modality, scheme, organ).items():
        by_seed.setdefault(seed, []).append(v)
    return {seed: float(np.mean(v)) for seed, v in sorted(by_seed.items())}


def paired_test(a: dict, b: dict) -> dict:
    """Wilcoxon signed-rank test of a against b ({case: value}), paired over the cases both
    hold (scipy, two-sided; zero differences dropped, as Wilcoxon's original test):
    {"n": cases, "mean_difference": mean of a - b, "statistic": W, "p": p-value}; p None
    when fewer than 2 cases differ."""
    from scipy import stats

    cases = sorted(set(a) & set(b))
    diff = np.array([a[c] - b[c] for c in cases], np.float64)
    out = {"n": len(cases), "mean_difference": float(diff.mean()) if len(cases) else None,
           "statistic": None, "p": None}
    if np.count_nonzero(diff) >= 2:
        result = stats.wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
        out["statistic"], out["p"] = float(result.statistic), float(result.pvalue)
    return out


def paired_figure(path: str, rows, protocol: str, schemes, pair=("ummkd", "separate_bn"),
                  title: str = "") -> None:
    """Per-patient Dice (mean over the organs each holds), one point per patient and scheme,
    one panel per modality; lines join each patient's ``pair`` of schemes."""
    from lib.figures import _MODALITY_COLORS, _new_figure, _save

    fig = _new_figure((4.0 + 1.2 * len(schemes), 4.0))
    for k, modality in enumerate(("mr", "ct")):
        ax = fig.add_subplot(1, 2, k + 1)
        points = {s: per_patient(rows, protocol, modality, s) for s in schemes}
        cases = sorted({c for p in points.values() for c in p})
        # each patient at the same small offset in every column, so that lines meet its points
        offset = dict(zip(cases, np.linspace(-0.12, 0.12, len(cases)) if len(cases) > 1
                          else [0.0] * len(cases)))
        for i, s in enumerate(schemes):
            ax.scatter([i + offset[c] for c in points[s]], list(points[s].values()), s=14,
                       color=_MODALITY_COLORS[i % len(_MODALITY_COLORS)], zorder=3)
        if all(p in schemes for p in pair):
            ia, ib = schemes.index(pair[0]), schemes.index(pair[1])
            for case in sorted(set(points[pair[0]]) & set(points[pair[1]])):
                ax.plot([ia + offset[case], ib + offset[case]],
                        [points[pair[0]][case], points[pair[1]][case]],
                        color="0.6", linewidth=0.7, zorder=2)
        ax.set_xticks(range(len(schemes)))
        ax.set_xticklabels(schemes, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice per patient (mean over its organs)")
        n = max((len(v) for v in points.values()), default=0)
        ax.set_title(f"{modality.upper()}, {n} held-out patient(s)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def learning_curves(path: str, runs: dict, title: str = "") -> None:
    """The validation score (lib/validation.py: mean Dice over the validation patients'
    organs) against the training step, one line per run; ``runs``: {label: run folder}
    (its log.jsonl). Runs without validation lines are left out."""
    from lib.figures import _new_figure, _save, read_log

    fig = _new_figure((6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for label, folder in runs.items():
        points = sorted((r["step"], r["volumes/score"]) for r in
                        read_log(os.path.join(folder, "log.jsonl")) if "volumes/score" in r)
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation Dice (mean over organs)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
