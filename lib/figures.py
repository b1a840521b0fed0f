"""Result figures for UMMKD runs: slice grids, per-class Dice box plots and training curves.

Figures are built with matplotlib's object-oriented API on an explicit Agg canvas: pyplot is
never imported, so no window can open, no global backend is switched for the caller, and
figures are not kept alive by pyplot's registry (each one is freed once the function returns).
Every PNG is written atomically (lib/files.py: a temporary file renamed into place) so
a crash never leaves a half-written image; parent folders are created.

Volumes are numpy arrays [H, W, D] (in-plane axes first, slices along the last axis), as in
``lib.data``.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from lib.files import atomic_path

# Distinct colours for classes 1..; background (0) is never drawn.
_CLASS_COLORS = ("tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple",
                 "tab:cyan", "tab:pink", "tab:olive", "tab:brown", "tab:gray")
_MODALITY_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def _new_figure(figsize) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str, dpi: int = 100) -> None:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        fig.clear()


def _class_color(c: int):
    return _CLASS_COLORS[(c - 1) % len(_CLASS_COLORS)]


def _foreground_name(class_names, n_class: int, c: int) -> str:
    # class_names may or may not include the background entry; accept both.
    names = list(class_names or [])
    if len(names) == n_class:
        return str(names[c])
    if len(names) == n_class - 1:
        return str(names[c - 1])
    return str(names[c]) if c < len(names) else f"class {c}"


# ----------------------------------------------------------------------------- slice grid
def _pick_slices(label: np.ndarray, pred: np.ndarray, n_slices: int) -> list[int]:
    depth = label.shape[2]
    fg = np.nonzero(label.reshape(-1, depth).any(axis=0))[0]
    if fg.size == 0:  # no ground truth: show where the prediction is, else anywhere
        fg = np.nonzero(pred.reshape(-1, depth).any(axis=0))[0]
    if fg.size == 0:
        fg = np.arange(depth)
    idx = np.round(np.linspace(0, fg.size - 1, min(n_slices, fg.size))).astype(int)
    return sorted(set(int(fg[i]) for i in idx))


def _overlay_rgba(labels2d: np.ndarray, n_class: int, alpha: float) -> np.ndarray:
    rgba = np.zeros(labels2d.shape + (4,), dtype=float)  # background stays transparent
    for c in range(1, n_class):
        r, g, b, _ = to_rgba(_class_color(c))
        rgba[labels2d == c] = (r, g, b, alpha)
    return rgba


def slice_grid(path: str, image, label, pred, n_class: int, class_names, n_slices: int = 6,
               title: str = "", alpha: float = 0.5) -> None:
    """Save a 3-row grid of axial slices: image, ground truth overlay, prediction overlay.

    Args:
        path: output PNG path.
        image: [H, W, D] intensities (displayed with a 1-99 percentile window).
        label, pred: [H, W, D] integer label maps with classes 0..n_class-1 (0 = background).
        n_class: number of classes including background.
        class_names: names of all n_class classes (background first) or of the n_class-1
            foreground classes.
        n_slices: number of columns; slices are spread evenly over those that contain
            ground-truth foreground (then prediction foreground, then the whole volume).
    """
    image, label, pred = np.asarray(image), np.asarray(label), np.asarray(pred)
    if image.ndim != 3 or label.shape != image.shape or pred.shape != image.shape:
        raise ValueError(f"need equal [H, W, D] volumes, got {image.shape}, {label.shape}, "
                         f"{pred.shape}")
    slices = _pick_slices(label, pred, max(int(n_slices), 1))
    finite = image[np.isfinite(image)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1.0

    ncol = len(slices)
    fig = _new_figure((2.2 * ncol + 1.8, 7.0))
    axes = fig.subplots(3, ncol, squeeze=False)
    row_titles = ("image", "ground truth", "prediction")
    for j, z in enumerate(slices):
        img = image[:, :, z]
        for i, overlay in enumerate((None, label[:, :, z], pred[:, :, z])):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if overlay is not None:
                ax.imshow(_overlay_rgba(overlay, n_class, alpha), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"slice {z}", fontsize=9)
            if j == 0:
                ax.set_ylabel(row_titles[i])
    handles = [Patch(facecolor=_class_color(c), alpha=alpha,
                     label=_foreground_name(class_names, n_class, c)) for c in range(1, n_class)]
    if handles:
        fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=1.0 - 1.6 / (2.2 * ncol + 1.8), bottom=0.02,
                        top=0.88 if title else 0.93, wspace=0.05, hspace=0.08)
    _save(fig, path)


# ----------------------------------------------------------------------------- dice box plot
def dice_boxplot(path: str, results_by_modality: Mapping, class_names, title: str = "") -> None:
    """Save a box plot of per-case Dice per class, one box per modality within each class group.

    Args:
        results_by_modality: {modality: {"cases": [{"case": str, "dice": {name: float}, ...}]}}.
        class_names: class names to show, in order (names absent from the results are skipped).
    """
    modalities = list(results_by_modality)
    names = [str(n) for n in class_names]
    fig = _new_figure((max(4.0, 1.1 * len(names) * max(len(modalities), 1) + 1.5), 4.0))
    ax = fig.subplots()
    group = len(modalities) + 1  # one empty slot between class groups
    for m, mod in enumerate(modalities):
        cases = results_by_modality[mod].get("cases", [])
        data, positions = [], []
        for k, name in enumerate(names):
            vals = np.array([c.get("dice", {}).get(name, np.nan) for c in cases], dtype=float)
            vals = vals[np.isfinite(vals)]
            if vals.size:
                data.append(vals)
                positions.append(k * group + m)
        color = _MODALITY_COLORS[m % len(_MODALITY_COLORS)]
        if data:
            ax.boxplot(data, positions=positions, widths=0.7, patch_artist=True,
                       boxprops={"facecolor": color, "alpha": 0.6},
                       medianprops={"color": "black"}, showfliers=False)
            # Points show every case: boxes of one or two cases are otherwise invisible.
            for pos, vals in zip(positions, data):
                jitter = np.linspace(-0.15, 0.15, vals.size) if vals.size > 1 else np.zeros(1)
                ax.scatter(pos + jitter, vals, s=10, color="black", alpha=0.7, zorder=3)
    ax.set_xticks([k * group + (len(modalities) - 1) / 2 for k in range(len(names))])
    ax.set_xticklabels(names, rotation=20)
    ax.set_xlim(-1, max(len(names), 1) * group - 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles=[Patch(facecolor=_MODALITY_COLORS[m % len(_MODALITY_COLORS)], alpha=0.6,
                             label=str(mod)) for m, mod in enumerate(modalities)],
              loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------- training curves
def read_log(log_path: str) -> list[dict]:
    """Records of a JSON-lines training log; malformed lines (e.g. a half-written last line
    after a crash), non-object lines and lines without a numeric "step" are skipped."""
    records = []
    if not os.path.isfile(log_path):
        return records
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and _number(rec.get("step")) is not None:
                records.append(rec)
    return records


def _number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


# Panels in display order: (title, predicate on key). A key goes to the first panel that takes it.
_PANELS = (
    ("total loss", lambda k: k == "loss/total"),
    ("Dice loss", lambda k: re.fullmatch(r"loss/(.*_)?dice", k) is not None),
    ("cross-entropy", lambda k: re.fullmatch(r"loss/(.*_)?ce", k) is not None),
    ("KD loss", lambda k: k.startswith("loss/kd")),
    ("other losses", lambda k: k.startswith("loss/")),
    ("validation Dice", lambda k: k.startswith("val/")),
    ("Dice on the validation volumes", lambda k: k.startswith("volumes/")),
    ("learning rate", lambda k: k == "lr"),
    ("other", lambda k: True),
)


def training_curves(path: str, log_path: str, title: str = "") -> None:
    """Save training curves from a JSON-lines log (one {"step": int, key: value, ...} per line).

    Panels (only those with data): total loss, Dice losses per modality, CE per modality, KD,
    other losses (e.g. L2), validation Dice (batches), Dice on the validation volumes
    (lib/validation.py), learning rate, any other numeric key. Keys missing
    on some lines are plotted from the lines that have them. An empty or unreadable log gives
    a figure that says so.
    """
    records = read_log(log_path)
    series: dict[str, tuple[list, list]] = {}
    for rec in records:
        step = _number(rec["step"])
        for key, value in rec.items():
            v = _number(value)
            if key == "step" or v is None:
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(step)
            ys.append(v)

    panels = []
    remaining = list(series)
    for panel_title, takes in _PANELS:
        keys = [k for k in remaining if takes(k)]
        remaining = [k for k in remaining if k not in keys]
        if keys:
            panels.append((panel_title, sorted(keys)))

    if not panels:
        fig = _new_figure((5.0, 2.5))
        fig.text(0.5, 0.5, f"no training log entries in\n{os.path.basename(log_path)}",
                 ha="center", va="center")
        _save(fig, path)
        return

    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = _new_figure((4.5 * ncol, 3.2 * nrow))
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax, (panel_title, keys) in zip(axes, panels):
        for key in keys:
            xs, ys = series[key]
            order = np.argsort(xs, kind="stable")
            ax.plot(np.asarray(xs)[order], np.asarray(ys)[order], label=key,
                    marker="o" if len(xs) < 20 else None, markersize=3)
        if panel_title == "learning rate" and all(v > 0 for k in keys for v in series[k][1]):
            ax.set_yscale("log")
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
