"""Segmentation metrics for UMMKD evaluation: Dice, ASSD and HD95 on 2D or 3D masks.

Definitions (all masks are boolean arrays of the same shape, 2D [H, W] or 3D [H, W, D]):

* Dice = 2|P ∩ G| / (|P| + |G|); 1.0 when both masks are empty.
* Surface of a mask: its voxels removed by one binary erosion with the face-connected
  structuring element (``generate_binary_structure(ndim, 1)``) and ``border_value=0``, so voxels
  on the array border count as surface.
* Surface distances: for every surface voxel of one mask, the Euclidean distance in mm (voxel
  spacing applied) to the nearest surface voxel of the other mask. Both directions are pooled
  (concatenated) into one array.
* ASSD = mean of the pooled distances; HD95 = 95th percentile of the pooled distances
  (``np.percentile`` with its default linear interpolation).
* The published evaluation scripts' protocol (``evaluate_case(..., protocol="paper")``):
  distances in voxels whatever the spacing, and ASSD = (mean(d_pg) + mean(d_gp)) / 2, the
  mean of the two directed means, which differs from the pooled mean whenever the two
  surfaces have different numbers of voxels.
* Empty masks: both empty -> Dice 1, ASSD/HD95 0.0; exactly one empty -> Dice 0 and ASSD/HD95
  NaN. The NaN is kept on purpose: summaries count such cases (``n_undefined``) and tables show
  them, instead of crashing or silently dropping the case.

Reporting helpers turn per-case results into summaries (mean/std per class), strict JSON, a CSV
with one row per (modality, case, class) and a plain-text table.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from lib.files import write_text

METRICS = ("dice", "assd", "hd95")


# ----------------------------------------------------------------------------- validation
def _as_masks(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {pred.ndim}D")
    return pred, gt


def _as_spacing(spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(spacing) != ndim:
        raise ValueError(f"spacing {spacing} needs one entry per axis ({ndim} axes)")
    if not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing {spacing} must be positive and finite")
    return spacing


# ----------------------------------------------------------------------------- metrics
def dice_score(pred, gt) -> float:
    """Dice overlap of two boolean masks of equal shape ([H, W] or [H, W, D]).

    Returns 1.0 when both masks are empty (nothing to find, nothing found).
    """
    pred, gt = _as_masks(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)
    return mask & ~eroded


def directed_surface_distances(pred, gt, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """(d_pg, d_gp): distances (mm) from each surface voxel of ``pred`` to the nearest
    surface voxel of ``gt``, and from ``gt`` to ``pred``.

    Args:
        pred, gt: boolean masks of equal shape, [H, W] or [H, W, D].
        spacing: voxel size per axis (len == ndim), or None for all ones.

    Both empty when both masks are empty. Raises ValueError when exactly one mask is empty
    (the distance is undefined); ``assd``/``hd95`` turn that case into NaN.
    """
    pred, gt = _as_masks(pred, gt)
    spacing = _as_spacing(spacing, pred.ndim)
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if not has_p and not has_g:
        return np.zeros(0, dtype=float), np.zeros(0, dtype=float)
    if has_p != has_g:
        raise ValueError("surface distance is undefined when exactly one mask is empty")

    # Crop to the union bounding box plus a one-voxel margin (clipped to the array): the
    # erosion still sees every neighbour it needs and original-border voxels stay on the crop
    # border, and all surface voxels lie inside the crop, so the EDT result is exact while
    # large volumes with small structures become cheap.
    coords = np.nonzero(pred | gt)
    window = tuple(
        slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n))
        for c, n in zip(coords, pred.shape)
    )
    sp, sg = _surface(pred[window]), _surface(gt[window])

    # EDT of ~surface gives, at every voxel, the distance to the nearest surface voxel.
    dt_to_g = ndimage.distance_transform_edt(~sg, sampling=spacing)
    dt_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return dt_to_g[sp].astype(float), dt_to_p[sg].astype(float)


def surface_distances(pred, gt, spacing=None) -> np.ndarray:
    """Pooled surface distances (mm): d_pg followed by d_gp (directed_surface_distances),
    one 1D array; empty when both masks are empty."""
    return np.concatenate(directed_surface_distances(pred, gt, spacing))


def _distance_stat(pred, gt, spacing, reduce) -> float:
    pred, gt = _as_masks(pred, gt)
    spacing = _as_spacing(spacing, pred.ndim)
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if has_p != has_g:
        return float("nan")
    if not has_p:
        return 0.0
    return float(reduce(surface_distances(pred, gt, spacing)))


def assd(pred, gt, spacing=None) -> float:
    """Average symmetric surface distance (mm): the mean of the pooled distances of both directions.

    This is the standard definition, as computed by medpy >= 0.5. Older medpy versions averaged
    the two directed means instead, ``(mean(d_pg) + mean(d_gp)) / 2``, which differs whenever
    the two surfaces have different numbers of voxels.

    Masks: [H, W] or [H, W, D] booleans; spacing: one entry per axis or None (all ones).
    Both empty -> 0.0; exactly one empty -> NaN.
    """
    return _distance_stat(pred, gt, spacing, np.mean)


def hd95(pred, gt, spacing=None) -> float:
    """95th percentile (np.percentile, linear interpolation) of the pooled surface distances (mm).

    Masks: [H, W] or [H, W, D] booleans; spacing: one entry per axis or None (all ones).
    Both empty -> 0.0; exactly one empty -> NaN.
    """
    return _distance_stat(pred, gt, spacing, lambda d: np.percentile(d, 95))


# ----------------------------------------------------------------------------- per case / summary
def class_items(classes) -> list[tuple[int, str]]:
    """(class_id, name) pairs from a dict {id: name} or a list of names for ids 1..len."""
    if isinstance(classes, Mapping):
        return [(int(k), str(v)) for k, v in classes.items()]
    if isinstance(classes, Sequence) and not isinstance(classes, (str, bytes)):
        return [(i + 1, str(name)) for i, name in enumerate(classes)]
    raise TypeError(f"classes must be a dict {{id: name}} or a list of names, got {type(classes)}")


PROTOCOLS = ("ours", "paper")


def evaluate_case(pred_labels, gt_labels, spacing, classes, protocol: str = "ours") -> dict:
    """Dice, ASSD and HD95 of each class of one case.

    Args:
        pred_labels, gt_labels: integer label maps of equal shape, [H, W] or [H, W, D].
            Labels outside ``classes`` belong to none of them.
        spacing: voxel size per axis, or None.
        classes: dict {class_id: name} or list of names for ids 1..len.
        protocol: "ours" (the module's definitions, distances in mm) or "paper", the
            published evaluation scripts': distances in voxels whatever the spacing, and
            ASSD = (mean(d_pg) + mean(d_gp)) / 2, the mean of the two directed means
            (HD95 stays the 95th percentile of the pooled distances, in voxels).

    Returns:
        {"dice": {name: float}, "assd": {name: float}, "hd95": {name: float}}; distances are
        NaN for a class present in exactly one of the two label maps.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    pred_labels = np.asarray(pred_labels)
    gt_labels = np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"pred shape {pred_labels.shape} != gt shape {gt_labels.shape}")
    spacing = _as_spacing(None if protocol == "paper" else spacing, pred_labels.ndim)
    out: dict = {m: {} for m in METRICS}
    for cid, name in class_items(classes):
        p, g = pred_labels == cid, gt_labels == cid
        out["dice"][name] = dice_score(p, g)
        if p.any() and g.any():
            d_pg, d_gp = directed_surface_distances(p, g, spacing)  # once for both statistics
            pooled = np.concatenate([d_pg, d_gp])
            out["assd"][name] = float((np.mean(d_pg) + np.mean(d_gp)) / 2.0
                                      if protocol == "paper" else np.mean(pooled))
            out["hd95"][name] = float(np.percentile(pooled, 95))
        else:
            out["assd"][name] = assd(p, g, spacing)
            out["hd95"][name] = hd95(p, g, spacing)
    return out


def _nan_mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v))  # population std (ddof=0)


def summarize(cases: list[dict], classes) -> dict:
    """Aggregate per-case results into per-class means and standard deviations.

    Args:
        cases: list of {"case": str, "dice": {name: float}, "assd": {...}, "hd95": {...}}.
        classes: dict {class_id: name} or list of names (as for ``evaluate_case``).

    Returns:
        {"dice_mean", "dice_std", "assd_mean", "assd_std", "hd95_mean", "hd95_std"}: dicts by
        class name, NaN cases ignored, population std (ddof=0); "dice_avg", "assd_avg",
        "hd95_avg": mean over classes of the per-class means (classes whose mean is undefined
        are skipped); "n_undefined": {name: number of cases with NaN ASSD/HD95};
        "n_cases": int; "classes": list of names. Callers usually add a "cases" list to form
        the per-modality result used by ``write_metrics_csv`` and ``format_table``.
    """
    names = [name for _, name in class_items(classes)]
    out: dict = {}
    for metric in METRICS:
        means, stds = {}, {}
        for name in names:
            vals = [c.get(metric, {}).get(name, float("nan")) for c in cases]
            means[name], stds[name] = _nan_mean_std([float("nan") if v is None else v for v in vals])
        out[f"{metric}_mean"], out[f"{metric}_std"] = means, stds
        out[f"{metric}_avg"] = _nan_mean_std(list(means.values()))[0]

    def undefined(case, name):
        vals = [case.get(m, {}).get(name) for m in ("assd", "hd95")]
        return any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals)

    out["n_undefined"] = {name: sum(undefined(c, name) for c in cases) for name in names}
    out["n_cases"] = len(cases)
    out["classes"] = names
    return out


def to_jsonable(obj):
    """Copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts.

    NaN and ±inf become None (strict JSON has no such numbers); numpy scalars and arrays
    become Python numbers and lists; tuples become lists; dict keys become strings.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


# ----------------------------------------------------------------------------- output
def _csv_number(v) -> str:
    if v is None:
        return ""
    f = float(v)
    return repr(f) if math.isfinite(f) else ""


def write_metrics_csv(path: str, results_by_modality: Mapping) -> None:
    """Write one row per (modality, case, class): modality,case,class,dice,assd,hd95.

    ``results_by_modality`` maps a modality name to a dict with a "cases" list (per-case dicts
    as in ``summarize``). NaN/None values become empty fields. The file is written atomically.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["modality", "case", "class", *METRICS])
    for modality, result in results_by_modality.items():
        for i, case in enumerate(result.get("cases", [])):
            case_id = case.get("case", str(i))
            names = list(case.get("dice", {}))
            for name in names:
                writer.writerow(
                    [modality, case_id, name]
                    + [_csv_number(case.get(m, {}).get(name)) for m in METRICS]
                )
    write_text(path, buf.getvalue())


def _cell(mean, std, n_undef: int, fmt: str) -> str:
    note = f" ({n_undef} undefined)" if n_undef else ""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return f"n/a{note}"
    text = f"{mean:{fmt}}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f"±{std:{fmt}}"
    return text + note


def format_table(results_by_modality: Mapping, classes) -> str:
    """Plain-text table: one row per class plus an "average" row.

    Columns are, for each modality in order, "<MOD> Dice" (mean±std) and "<MOD> ASSD (mm)"
    (mean±std; "(voxel)" when the modality's result says ``distance_unit`` "voxel"). A
    cell gets a "(k undefined)" note when k cases had NaN distances for that class and reads
    "n/a (k undefined)" when no case had a defined distance. The average row holds the mean
    over classes of the per-class means.
    """
    names = [name for _, name in class_items(classes)]
    header = ["class"]
    for mod in results_by_modality:
        unit = results_by_modality[mod].get("distance_unit", "mm")
        header += [f"{mod.upper()} Dice", f"{mod.upper()} ASSD ({unit})"]
    rows = []
    for name in names:
        row = [name]
        for res in results_by_modality.values():
            n_undef = int(res.get("n_undefined", {}).get(name, 0))
            row.append(_cell(res["dice_mean"].get(name), res["dice_std"].get(name), 0, ".3f"))
            row.append(_cell(res["assd_mean"].get(name), res["assd_std"].get(name), n_undef, ".2f"))
        rows.append(row)
    avg = ["average"]
    for res in results_by_modality.values():
        n_undef = sum(int(v) for v in res.get("n_undefined", {}).values())
        avg.append(_cell(res.get("dice_avg"), None, 0, ".3f"))
        avg.append(_cell(res.get("assd_avg"), None, n_undef, ".2f"))
    rows.append(avg)

    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    counts = ", ".join(
        f"{mod}: {res.get('n_cases', len(res.get('cases', [])))} cases"
        for mod, res in results_by_modality.items()
    )
    body = [line(header), sep, *(line(r) for r in rows[:-1]), sep, line(rows[-1])]
    return "\n".join([counts, *body]) + "\n"
