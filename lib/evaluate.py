"""Test phase shared by the 2D and 3D networks.

Every voxel of every test volume is predicted through its modality's BN branch:
* 2D: every slice, with its 3-slice context (edge slices replicated), batched over slices;
* 3D: overlapping slabs along depth (and in-plane tiles when the volume is larger than the
  patch), with the softmax averaged where windows overlap.
With TEST_MIRROR the softmax is also averaged over flipped inputs (``mirrored``), the
classes of LATERAL_PAIRS swapped in the flips along the patient's left-right axis.
Then Dice, ASSD and HD95 per class and case (lib/metrics.py), and under
OUTPUT_PATH/results/: metrics.json, metrics.csv, predictions/<case>_pred.nii.gz (a name that
two test cases share gets its modality in front: ``prediction_stems``) and
<case>_gt.nii.gz (in the geometry of the original scan when data preparation recorded it in
dataset.json next to the test list, else in the test file's own grid and layout), and
figures/. With PAPER_PROTOCOL, the same predictions are also scored as the published
scripts did (``paper_coverage``, metrics.evaluate_case's "paper" protocol).

Volumes are [H, W, D] numpy arrays, slices along the last axis (lib/data.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np
import tensorflow as tf

from lib import figures, metrics, prep
from lib.config import lateral_permutation  # noqa: F401  (re-exported: the predictors' parser)
from lib.data import LabelCount, Volume, case_name, load_volume, read_list
from lib.files import atomic_path, write_json
from lib.settings import CHOICES

DATASET_JSON = "dataset.json"


# ---------------------------------------------------------------------- 2D prediction
def stack_context(image_hwd: np.ndarray) -> np.ndarray:
    """[H, W, D] -> [D, H, W, 3]: slice k with its neighbours k-1, k+1 (edges replicated)."""
    d = image_hwd.shape[2]
    idx = np.clip(np.arange(d)[:, None] + np.array([-1, 0, 1])[None, :], 0, d - 1)
    return np.ascontiguousarray(np.transpose(image_hwd[:, :, idx], (2, 0, 1, 3)))


def make_predict_fn(model, example_shape):
    """modality -> a compiled function x [N, *example_shape] -> softmax [N, ..., C] float32.

    example_shape is [S, S, 3] for the 2D network and [h, w, d, 1] for the 3D one; each
    modality's function is traced once and reused for every volume.
    """
    fns = {}

    def for_modality(modality):
        if modality not in fns:
            @tf.function(input_signature=[tf.TensorSpec([None, *example_shape], tf.float32)])
            def predict(x):
                logits = model(x, modalities=(modality,), training=False)
                return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
            fns[modality] = predict
        return fns[modality]

    return for_modality


def left_right_axis(slice_axis: str = "axial") -> int:
    """The axis of a prepared [H, W, D] volume along which the patient's right-left runs:
    the one that lib.prep's canonical axis 0 (RAS: towards the patient's Right) becomes
    under ``to_slices_last``; W (1) for axial and coronal slices, D (2) for sagittal ones."""
    matrix = prep.slices_last_index_matrix(slice_axis, (1, 1, 1))
    return int(np.flatnonzero(matrix[0, :3])[0])


# The patient's left-right axis of the network inputs for axially prepared volumes (the
# default): W, axis 2 of x [N, H, W, C] (2D) and of the windows x [N, h, w, d, 1] (3D);
# TEST_FLIP's flip of axes 0 and 1 reverses W, it does not move it.
LATERAL_AXIS_2D = 1 + left_right_axis("axial")
LATERAL_AXIS_3D = 1 + left_right_axis("axial")


def mirrored(fn, axes, mirror: bool, lateral_axis: int | None = None,
             permutation: list[int] | None = None):
    """``fn`` (x [N, *spatial, C] -> probabilities [N, *spatial, K]) or, with ``mirror``, the
    mean of its probabilities over every combination of flips along ``axes`` (test-time
    augmentation: each flipped input's output flipped back).

    A flip along the patient's left-right axis turns a right-sided organ into something
    that looks like its left-sided counterpart: the output of every combination that flips
    ``lateral_axis`` has its channels permuted after being flipped back, channel k taking
    ``permutation[k]`` (``lateral_permutation`` of LATERAL_PAIRS: the pairs swapped).
    Without a permutation every output keeps its channels, which assumes that no class has
    a left-right counterpart (LATERAL_PAIRS empty). A permutation needs ``lateral_axis``
    among ``axes``; without ``mirror`` it is not used.
    """
    if not mirror:
        return fn
    import itertools

    if permutation is not None and lateral_axis not in axes:
        raise ValueError(f"mirrored: a channel permutation needs the lateral axis among the "
                         f"flipped axes {list(axes)}, got lateral_axis={lateral_axis!r}")
    combos = [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]

    def averaged(x):
        total = 0.0
        for flip in combos:
            p = fn(tf.reverse(x, flip) if flip else x)
            p = tf.reverse(p, flip) if flip else p
            if permutation is not None and lateral_axis in flip:
                p = tf.gather(p, permutation, axis=-1)
            total += p
        return total / len(combos)

    return averaged


def predict_volume_2d(predict_fn, modality: str, image_hwd: np.ndarray, image_size: int,
                      batch_size: int = 16, mirror: bool = False,
                      probabilities: bool = False, *,
                      permutation: list[int] | None = None) -> np.ndarray:
    """Label map [H, W, D] (int32) for every slice of a volume, or with ``probabilities``
    the class probabilities [H, W, D, C] (float32).

    Slices whose in-plane size is not image_size are resized for the network (bilinear) and
    the class probabilities are resized back before the argmax. ``mirror``: averaged over
    the in-plane flips (``mirrored``), the outputs of the flips along W (LATERAL_AXIS_2D)
    with their channels permuted by ``permutation`` (``lateral_permutation``; None: none).
    """
    h, w, d = image_hwd.shape
    stacks = stack_context(image_hwd.astype(np.float32))
    fn = mirrored(predict_fn(modality), [1, 2], mirror, LATERAL_AXIS_2D, permutation)
    out = None
    for start in range(0, d, batch_size):
        x = tf.constant(stacks[start:start + batch_size])
        if (h, w) != (image_size, image_size):
            x = tf.image.resize(x, [image_size, image_size], method="bilinear")
        probs = fn(x)
        if (h, w) != (image_size, image_size):
            probs = tf.image.resize(probs, [h, w], method="bilinear")
        probs = np.transpose(np.asarray(probs), (1, 2, 0, 3))  # [H, W, batch, C]
        if out is None:
            out = np.empty((h, w, d) + (probs.shape[3:] if probabilities else ()),
                           np.float32 if probabilities else np.int32)
        out[:, :, start:start + batch_size] = probs if probabilities else np.argmax(probs, -1)
    return out


# ---------------------------------------------------------------------- 3D prediction
def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets of windows of length ``patch`` covering [0, size) with the given stride.

    The last window is shifted back to end at ``size``, so every position is covered and no
    window leaves the volume. A volume shorter than the patch gets one window at 0 (the
    caller pads it).
    """
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch + 1, max(1, stride)))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def gaussian_weights(patch, sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """[h, w, d] weights of a window's voxels when windows are blended: a Gaussian centred
    on the window, sigma = ``sigma_scale`` x the window size per axis (nnU-Net's 1/8), the
    centre 1; voxels near the border count less, as the network sees less around them."""
    weights = np.ones([], np.float64)
    for n in patch:
        x = np.arange(n) - (n - 1) / 2.0
        weights = np.multiply.outer(weights, np.exp(-x ** 2 / (2.0 * (sigma_scale * n) ** 2)))
    weights = weights / weights.max()
    return np.maximum(weights, weights[weights > 0].min()).astype(np.float32)


def predict_volume_3d(predict_fn, modality: str, image_hwd: np.ndarray, patch, n_class: int,
                      stride_d: int | None = None, batch_size: int = 1,
                      mirror: bool = False, probabilities: bool = False, *,
                      permutation: list[int] | None = None) -> np.ndarray:
    """Label map [H, W, D] (int32) by sliding patches over the whole volume, the softmax of
    overlapping windows blended with Gaussian weights (``gaussian_weights``); with
    ``probabilities``, the blended class probabilities [H, W, D, C] (float32).

    Depth windows step by ``stride_d`` (default: half a patch); in-plane windows tile with
    half-patch overlap when the volume is larger than the patch; volumes smaller than the
    patch are zero-padded (edge-replicated) and cropped back. ``batch_size`` windows go
    through the network at once; ``mirror`` averages each over the flips of its three axes
    (``mirrored``), the outputs of the flips along w (LATERAL_AXIS_3D) with their channels
    permuted by ``permutation`` (``lateral_permutation``; None: none).
    """
    ph, pw, pd = patch
    h, w, d = image_hwd.shape
    pad = [(0, max(0, ph - h)), (0, max(0, pw - w)), (0, max(0, pd - d))]
    img = np.pad(image_hwd.astype(np.float32), pad, mode="edge")
    H, W, D = img.shape
    stride_d = stride_d or max(1, pd // 2)
    probs = np.zeros((H, W, D, n_class), np.float32)
    counts = np.zeros((H, W, D, 1), np.float32)
    weight = gaussian_weights(patch)[..., None]
    windows = [(i, j, k) for i in window_starts(H, ph, ph // 2)
               for j in window_starts(W, pw, pw // 2) for k in window_starts(D, pd, stride_d)]
    fn = mirrored(predict_fn(modality), [1, 2, 3], mirror, LATERAL_AXIS_3D, permutation)
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        x = np.stack([img[i:i + ph, j:j + pw, k:k + pd] for i, j, k in chunk])[..., None]
        p = np.asarray(fn(tf.constant(x)))
        for (i, j, k), pi in zip(chunk, p):
            probs[i:i + ph, j:j + pw, k:k + pd] += weight * pi
            counts[i:i + ph, j:j + pw, k:k + pd] += weight
    probs = (probs / counts)[:h, :w, :d]
    return probs if probabilities else np.argmax(probs, axis=-1).astype(np.int32)


# ---------------------------------------------------------------------- evaluation
TEST_FLIPS = CHOICES["TEST_FLIP"]


def flips(entry: str, prepared: bool, rule: str) -> bool:
    """Whether a test volume is flipped on axes 0 and 1 to the training slices' layout.

    ``rule`` (TEST_FLIP): "npz" flips .npz files (the original test format stores them
    flipped; data/prepare.py writes its .npz files the same way); "released" flips NIfTI
    volumes too unless data/prepare.py wrote them (``prepared``: a dataset.json record):
    the released cardiac test volumes are flipped against the released training slices;
    "none" flips nothing.
    """
    if rule not in TEST_FLIPS:
        raise ValueError(f"TEST_FLIP: expected one of {', '.join(TEST_FLIPS)}, got {rule!r}")
    if rule == "none":
        return False
    return entry.endswith(".npz") or (rule == "released" and not prepared)


def _dataset_records(list_path: str) -> dict:
    """{case name: dataset.json record} of the dataset.json next to the list file or in its
    parent folder (the layout written by data/prepare.py); {} when there is none."""
    base = os.path.dirname(os.path.abspath(list_path))
    for folder in (base, os.path.dirname(base)):
        path = os.path.join(folder, DATASET_JSON)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                info = json.load(handle)
            return {c["name"]: {**c, "_folder": folder}
                    for c in info.get("cases", []) if "name" in c}
    return {}


def load_test_volumes(list_path: str, flip: str = "npz", label_resample: str = "none"
                      ) -> list[tuple[Volume, dict | None]]:
    """Volumes of a test list with their dataset.json record (None when there is none).

    Each volume is flipped or not by the TEST_FLIP rule ``flip`` (see ``flips``). A volume
    whose file has no voxel size (.npz) takes the prepared spacing of its record, so that
    surface distances are in mm either way. ``label_resample``: load_volume's.
    """
    records = _dataset_records(list_path)
    out = []
    for entry in read_list(list_path):
        record = records.get(case_name(entry.split(",")[0]))
        volume = load_volume(entry, flip=flips(entry, record is not None, flip),
                             label_resample=label_resample)
        spacing = (record or {}).get("prepared", {}).get("spacing")
        if volume.spacing is None and spacing:
            # .npz files carry no geometry; data preparation recorded the prepared voxel size
            volume = dataclasses.replace(volume, spacing=tuple(float(v) for v in spacing))
        out.append((volume, record))
    return out


def prediction_stems(test_lists: dict) -> dict[str, list[str]]:
    """{modality: [file stem per test-list entry]}: the case name, unless another entry of
    any modality has the same name; then ``<modality>_<name>``, and ``_<k>`` (1, 2, ...)
    after it where one modality repeats a name. So no prediction overwrites another."""
    names = {m: [case_name(e.split(",")[0]) for e in read_list(p)] for m, p in test_lists.items()}
    counts: dict[str, int] = {}
    for name in (n for ns in names.values() for n in ns):
        counts[name] = counts.get(name, 0) + 1
    stems = {}
    for modality, ns in names.items():
        seen: dict[str, int] = {}
        stems[modality] = []
        for name in ns:
            if counts[name] == 1:
                stems[modality].append(name)
                continue
            seen[name] = seen.get(name, 0) + 1
            repeats = ns.count(name) > 1
            stems[modality].append(f"{modality}_{name}" + (f"_{seen[name]}" if repeats else ""))
    return stems


def count_test_labels(volumes, n_class: int) -> LabelCount:
    """The labels of test volumes (Volume objects) counted against 0..n_class-1, naming
    each volume by its label file."""
    labels = LabelCount(n_class)
    for volume in volumes:
        labels.add(volume.label, volume.meta.get("label_file", volume.name))
    return labels


def paper_coverage(depth: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """[D] bool: the slices the original 2D test predicts; the others stay background.

    The original takes slices 1..D-2 (those with both neighbours) in a shuffled order and
    predicts floor(D / batch_size) batches of them, so the first and last slices and, when
    D mod batch_size > 2, another D mod batch_size - 2 slices drawn at random are left out.
    Its shuffle was unseeded; here it is drawn from ``seed``.
    """
    frames = np.arange(1, depth - 1)
    np.random.default_rng(seed).shuffle(frames)
    covered = np.zeros(depth, bool)
    covered[frames[: (depth // batch_size) * batch_size]] = True
    return covered


def _save_labels(path: str, labels: np.ndarray, record: dict | None, affine) -> None:
    """Write a label map atomically: in the original scan's geometry when data preparation
    recorded it (``record``), else on the test volume's own grid (``affine``)."""
    import nibabel as nib

    if record is not None:
        from lib.prep import restore_prediction
        img = restore_prediction(labels, record)
    else:
        img = nib.Nifti1Image(labels.astype(np.uint8),
                              affine if affine is not None else np.eye(4))
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def score_in_scan_geometry(predict, modality: str, record: dict, gt_path: str,
                           preparation: dict, classes: dict, pred_path: str,
                           postprocess=None) -> dict | None:
    """Metrics of one test case in its original scan's geometry, or None when the scan or
    its full-resolution ground truth ``gt_path`` (data/prepare.py's ``<case>_gt.nii.gz``) is
    missing.

    The original scan is segmented as PHASE "predict" would segment it (lib.predict:
    prepared by ``preparation``, the training data's, with the label-free crop, and put
    back at the scan's resolution), written to ``pred_path``, and scored against the
    original label map over the whole scan at the original voxel size: false positives far
    from the organs count, unlike on the test file's label-cropped grid."""
    import nibabel as nib

    from lib.predict import segment_scan

    if not os.path.exists(record.get("image", "")) or not os.path.isfile(gt_path):
        return None
    labels, _ = segment_scan(predict, modality, record["image"], preparation,
                             postprocess=postprocess)
    with atomic_path(pred_path) as tmp:
        nib.save(labels, tmp)
    gt = nib.load(gt_path)
    return metrics.evaluate_case(np.asarray(labels.dataobj), np.asarray(gt.dataobj),
                                 tuple(float(z) for z in gt.header.get_zooms()[:3]), classes)


def evaluate(predict, test_lists: dict, class_names: list[str], output_path: str,
             checkpoint: str, log=print, log_path: str | None = None, *, flip: str = "npz",
             out_of_range: str = "error", paper_protocol: bool = False,
             coverage=None, preparations: dict | None = None,
             progress: bool = False, label_resample: str = "none",
             postprocess: dict | None = None) -> dict:
    """Predict every test volume of every modality, score it and write the results.

    predict(modality, image [H, W, D]) -> labels [H, W, D]; test_lists maps modality ->
    list file; class_names are the names of classes 1..C-1. ``flip``: the TEST_FLIP rule
    (``flips``). Ground-truth labels outside 0..C-1 follow ``out_of_range``
    (OUT_OF_RANGE_LABELS): an error naming the file, or no class (they count for none).
    ``paper_protocol``: also score as the published scripts did (metrics.evaluate_case's
    "paper" protocol), on the same predictions with the slices outside ``coverage(depth)``
    ([D] bool; None: every slice) set to background; written beside ours as
    ``paper_protocol`` in metrics.json and metrics_paper_protocol.csv.
    ``preparations`` ({modality: lib.predict.recorded_preparation}): also score each test
    case whose original scan is recorded in its dataset.json in that scan's own geometry
    (``score_in_scan_geometry``), written as ``scan_geometry`` in metrics.json and
    metrics_scan_geometry.csv, the masks as predictions/<case>_scan.nii.gz.
    ``progress``: a progress bar over the test volumes. ``label_resample``: LABEL_RESAMPLE
    (load_volume). ``postprocess``: {modality: labels -> labels} applied to every prediction
    of that modality before it is scored or written (both protocols). Returns the
    metrics.json dict.
    """
    from tqdm import tqdm

    results_dir = os.path.join(output_path, "results")
    pred_dir = os.path.join(results_dir, "predictions")
    fig_dir = os.path.join(results_dir, "figures")
    os.makedirs(pred_dir, exist_ok=True)
    os.makedirs(fig_dir, exist_ok=True)
    classes = {c: name for c, name in enumerate(class_names, start=1)}
    n_class = len(class_names) + 1
    report = {"checkpoint": checkpoint, "classes": list(class_names)}
    paper, scan = {}, {}
    stems = prediction_stems(test_lists)
    for modality, list_path in test_lists.items():
        cases, paper_cases, scan_cases, shown, unit = [], [], [], False, "mm"
        preparation = (preparations or {}).get(modality)
        post = (postprocess or {}).get(modality)
        volumes = load_test_volumes(list_path, flip=flip, label_resample=label_resample)
        count_test_labels([v for v, _ in volumes], n_class).apply(
            out_of_range, f"{modality} test volumes", log)
        flipped = sum(v.flipped for v, _ in volumes)
        if flipped:
            log(f"  {modality}: {flipped} of {len(volumes)} test volumes flipped on axes 0 "
                f"and 1 to the training slices' layout (TEST_FLIP={flip})")
        for (volume, record), stem in tqdm(zip(volumes, stems[modality]),
                                           desc=f"test {modality}", total=len(volumes),
                                           disable=not progress, dynamic_ncols=True):
            if "note" in volume.meta:  # a label re-indexed onto its image's grid
                log(f"  {modality}: {volume.meta['note']}")
            if volume.spacing is None and unit == "mm":
                unit = "voxel"
                log(f"  {modality}: {volume.name} has no voxel size (an .npz file without a "
                    f"dataset.json record): its surface distances are in voxels")
            t0 = time.time()
            pred = predict(modality, volume.image)
            if post is not None:
                pred = post(pred)
            case = {"case": volume.name,
                    **metrics.evaluate_case(pred, volume.label, volume.spacing, classes)}
            cases.append(case)
            if paper_protocol:
                covered = pred if coverage is None else np.where(
                    coverage(pred.shape[2])[None, None, :], pred, 0)
                paper_cases.append({"case": volume.name, **metrics.evaluate_case(
                    covered, volume.label, None, classes, protocol="paper")})
            stem = os.path.join(pred_dir, stem)
            exact_gt = (os.path.join(record["_folder"], record["files"]["gt"])
                        if record is not None and record.get("files", {}).get("gt") else "")
            # labels of no class are written as background, as the original did
            gt = np.where((volume.label >= 0) & (volume.label < n_class), volume.label, 0)
            # on the volume's own grid, in the file's layout; restore_prediction takes the
            # prepared (training) layout
            back = (lambda a: np.flip(a, (0, 1))) if volume.flipped and record is None else (
                lambda a: a)
            _save_labels(stem + "_pred.nii.gz", back(pred), record, volume.affine)
            if os.path.isfile(exact_gt):
                # data preparation wrote the mapped labels at full resolution: use them
                shutil.copyfile(exact_gt, stem + "_gt.nii.gz")
            else:
                _save_labels(stem + "_gt.nii.gz", back(gt), record, volume.affine)
            if not shown:
                figures.slice_grid(os.path.join(fig_dir, f"{modality}_slices.png"),
                                   volume.image, gt, pred, n_class, class_names,
                                   title=f"{modality.upper()} {volume.name}")
                shown = True
            scored = None
            if preparation is not None and record is not None:
                scored = score_in_scan_geometry(predict, modality, record, exact_gt,
                                                preparation, classes, stem + "_scan.nii.gz",
                                                post)
                if scored is not None:
                    scan_cases.append({"case": volume.name, **scored})
            log(f"  {modality} {volume.name}: Dice " + ", ".join(
                f"{k} {v:.3f}" for k, v in case["dice"].items())
                + ("" if scored is None else "; in the scan's geometry " + ", ".join(
                    f"{k} {v:.3f}" for k, v in scored["dice"].items()))
                + f" ({time.time() - t0:.1f} s)")
        report[modality] = {**metrics.summarize(cases, classes), "distance_unit": unit,
                            "cases": cases}
        if paper_protocol:
            paper[modality] = {**metrics.summarize(paper_cases, classes),
                               "distance_unit": "voxel", "cases": paper_cases}
        if scan_cases:
            scan[modality] = {**metrics.summarize(scan_cases, classes), "distance_unit": "mm",
                              "cases": scan_cases}
        elif preparation is not None:
            log(f"  {modality}: no test case has its original scan and full-resolution "
                "labels recorded (data/prepare.py's dataset.json): not scored in the scan's "
                "geometry")
    modality_results = {m: report[m] for m in test_lists}
    metrics.write_metrics_csv(os.path.join(results_dir, "metrics.csv"), modality_results)
    figures.dice_boxplot(os.path.join(fig_dir, "dice_boxplot.png"), modality_results,
                         class_names)
    if log_path and os.path.exists(log_path):
        figures.training_curves(os.path.join(fig_dir, "training_curves.png"), log_path)
    if paper_protocol:
        report["paper_protocol"] = paper
        metrics.write_metrics_csv(os.path.join(results_dir, "metrics_paper_protocol.csv"),
                                  paper)
    if scan:
        report["scan_geometry"] = scan
        metrics.write_metrics_csv(os.path.join(results_dir, "metrics_scan_geometry.csv"),
                                  scan)
    write_json(os.path.join(results_dir, "metrics.json"), metrics.to_jsonable(report),
               allow_nan=False)
    log(metrics.format_table(modality_results, classes))
    if paper_protocol:
        log("the published scripts' protocol (README, \"Evaluation\"), same predictions:")
        log(metrics.format_table(paper, classes))
    if scan:
        log("in each scan's own geometry (the whole scan, label-free crop, original spacing):")
        log(metrics.format_table(scan, classes))
    log(f"results written to {results_dir}")
    return report
