"""nnU-Net's connected-component post-processing, chosen on validation volumes.

Why: a CNN labels voxels one by one and often leaves stray islands, e.g. a small spleen blob
on the liver's side of the abdomen. An organ is one connected object, so keeping only the
largest connected component of a class removes such false positives. It can also hurt: when
the true object looks split in the volume (thin parts, partial volume) the smaller true part
is thrown away. nnU-Net therefore measures it on validation cases and keeps the step for a
class only where it did not lower that class's mean Dice.

Contract (numpy + scipy.ndimage only, no TensorFlow):

* ``largest_component(mask)``: bool mask [H, W, D] (or [H, W]) -> bool mask with only its
  largest connected component. Full connectivity (26-neighbourhood in 3D, 8 in 2D:
  ``ndimage.generate_binary_structure(rank, rank)``). An empty mask stays empty. Ties between
  equally large components go to the lowest label index of ``ndimage.label``, i.e. the
  component whose first voxel comes first in C (row-major) order.
* ``keep_largest(labels, classes)``: label map [H, W, D] of class ids -> new array, same
  shape and dtype, where the voxels of each listed class outside that class's largest
  component became background (0). Other classes are untouched; a class's components are
  found on its own mask, so touching a different class never joins two islands.
* ``dice_per_class(pred, truth, n_class)`` -> float array [n_class - 1], Dice of classes
  1..n_class-1, computed with ``lib.metrics.dice_score`` (the project's one Dice): a class
  absent from both maps scores 1.0.
* ``choose(predictions, truths, n_class)`` -> the choice dict (below), nnU-Net's rule.
* ``apply(labels, choice)``: ``keep_largest`` for ``choice["keep_largest"]``.
* ``save_choice(path, choice)`` / ``load_choice(path)``: the choice as JSON (atomic write
  via ``lib.files.write_json``), conventionally named ``CHOICE_FILE`` in the run folder.

The choice dict, JSON-serialisable::

    {"keep_largest": [class ids, ascending],
     "dice_before": {class id: mean Dice as predicted},
     "dice_after": {class id: mean Dice after keep_largest for that class only},
     "cases": number of validation cases,
     "checkpoint": the checkpoint whose predictions chose it (optional; the run records it)}

Class ids are ints in memory; JSON stores the dict keys as strings and ``load_choice``
turns them back into ints, so a saved choice loads equal to the one saved.
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from lib.files import write_json
from lib.metrics import dice_score

CHOICE_FILE = "postprocessing_{modality}.json"  # in the run folder, one per modality


# ----------------------------------------------------------------------------- components
def largest_component(mask: np.ndarray) -> np.ndarray:
    """Only the largest connected component of ``mask``.

    Args:
        mask: boolean (or 0/1) array, [H, W] or [H, W, D].

    Returns:
        New bool array of the same shape. Connectivity is full (8 neighbours in 2D, 26 in 3D),
        so voxels touching only by an edge or a corner belong to one component. An empty mask
        gives an empty mask. Ties go to the lowest ``ndimage.label`` index: the component
        whose first voxel comes first in C (row-major) order.
    """
    mask = np.asarray(mask).astype(bool)  # always a copy
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be 2D or 3D, got {mask.ndim}D")
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labelled, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0  # background
    return labelled == int(np.argmax(sizes))  # argmax: first (lowest) label among ties


def _class_ids(classes) -> list[int]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (Sequence, np.ndarray, set, frozenset)):
        raise TypeError(f"classes must be a list of class ids, got {type(classes).__name__}")
    ids = []
    for c in classes:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, numbers.Integral):
            raise TypeError(f"class ids must be integers, got {c!r}")
        ids.append(int(c))
    return ids


def keep_largest(labels: np.ndarray, classes) -> np.ndarray:
    """Label map with each listed class reduced to its largest connected component.

    Args:
        labels: integer label map, [H, W, D] (or [H, W]).
        classes: class ids to clean; voxels of such a class outside its largest component
            become background (0). Class 0 (background) is a no-op.

    Returns:
        A new array of the same shape and dtype; ``labels`` is not modified.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be 2D or 3D, got {labels.ndim}D")
    out = labels.copy()
    for c in _class_ids(classes):
        if c == 0:
            continue
        mask = labels == c
        if mask.any():
            out[mask & ~largest_component(mask)] = 0
    return out


# ----------------------------------------------------------------------------- choice
def dice_per_class(pred, truth, n_class: int) -> np.ndarray:
    """Dice of classes 1..n_class-1 of two label maps of equal shape ([H, W, D] or [H, W]).

    Uses ``lib.metrics.dice_score``: 2|P ∩ G| / (|P| + |G|), and 1.0 for a class absent from
    both maps. Returns a float array [n_class - 1] (index i is class i + 1).
    """
    n_class = _n_class(n_class)
    pred, truth = np.asarray(pred), np.asarray(truth)
    return np.array([dice_score(pred == c, truth == c) for c in range(1, n_class)], dtype=float)


def _n_class(n_class) -> int:
    if isinstance(n_class, (bool, np.bool_)) or not isinstance(n_class, numbers.Integral) or n_class < 2:
        raise ValueError(f"n_class must be an integer >= 2 (background + classes), got {n_class!r}")
    return int(n_class)


def choose(predictions, truths, n_class: int) -> dict:
    """Decide, per class, whether to keep only its largest connected component (nnU-Net).

    Args:
        predictions, truths: lists of label maps of the validation cases, pairwise of equal
            shape ([H, W, D] or [H, W]); one pair per case.
        n_class: number of classes including background; classes 1..n_class-1 are tested.

    For each class c: the mean over cases of Dice(c) as predicted ("dice_before") and after
    ``keep_largest`` for c only ("dice_after"). c is chosen iff dice_after >= dice_before:
    a tie keeps the step. (nnU-Net's own code, v1 and v2, uses a strict ``>``; ties there
    leave the prediction alone.) Classes are disjoint in a label map, so testing each class
    on the raw predictions equals nnU-Net's sequential per-class tests.

    Dice is ``lib.metrics.dice_score``, which scores a class absent from both maps 1.0 where
    nnU-Net uses NaN and a NaN-ignoring mean. Keeping the largest component never empties a
    non-empty mask, so such a case scores the same before and after: the decision is the
    same as nnU-Net's, only the reported means include those 1.0s.

    A class absent from every truth and every prediction is not chosen and is left out of
    "dice_before"/"dice_after". nnU-Net first also tests treating all foreground classes as
    one object ("keep the largest foreground component"); that step is skipped here.

    Returns:
        {"keep_largest": [ids], "dice_before": {id: float}, "dice_after": {id: float},
        "cases": N}, JSON-serialisable.
    """
    n_class = _n_class(n_class)
    predictions, truths = list(predictions), list(truths)
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions but {len(truths)} truths")
    if not predictions:
        raise ValueError("choose needs at least one validation case")
    pairs = []
    for i, (p, t) in enumerate(zip(predictions, truths)):
        p, t = np.asarray(p), np.asarray(t)
        if p.shape != t.shape:
            raise ValueError(f"case {i}: prediction shape {p.shape} != truth shape {t.shape}")
        pairs.append((p, t))

    keep, before, after = [], {}, {}
    for c in range(1, n_class):
        masks = [(p == c, t == c) for p, t in pairs]
        if not any(pm.any() or tm.any() for pm, tm in masks):
            continue
        before[c] = float(np.mean([dice_score(pm, tm) for pm, tm in masks]))
        after[c] = float(np.mean([dice_score(largest_component(pm), tm) for pm, tm in masks]))
        if after[c] >= before[c]:
            keep.append(c)
    return {"keep_largest": keep, "dice_before": before, "dice_after": after,
            "cases": len(pairs)}


def apply(labels: np.ndarray, choice: Mapping) -> np.ndarray:
    """``keep_largest(labels, choice["keep_largest"])``: a new label map, same shape/dtype."""
    return keep_largest(labels, _checked(choice, "choice")["keep_largest"])


# ----------------------------------------------------------------------------- files
def _int_id(key, what: str) -> int:
    if isinstance(key, (bool, np.bool_)):
        raise ValueError(f"{what} must be an integer class id >= 1, got {key!r}")
    if isinstance(key, str):
        try:
            key = int(key)
        except ValueError:
            raise ValueError(f"{what} must be an integer class id >= 1, got {key!r}") from None
    if not isinstance(key, numbers.Integral) or key < 1:
        raise ValueError(f"{what} must be an integer class id >= 1, got {key!r}")
    return int(key)


def _checked(choice, where: str) -> dict:
    """The choice with plain Python types and int class ids; ValueError('<where>: ...')."""
    try:
        if not isinstance(choice, Mapping):
            raise ValueError(f"expected a JSON object, got {type(choice).__name__}")
        if "keep_largest" not in choice:
            raise ValueError('missing key "keep_largest"')
        ids = choice["keep_largest"]
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
            raise ValueError(f'"keep_largest" must be a list of class ids, got {ids!r}')
        out: dict = {"keep_largest": [_int_id(c, '"keep_largest" entry') for c in ids]}
        for key in ("dice_before", "dice_after"):
            if key not in choice:
                continue
            table = choice[key]
            if not isinstance(table, Mapping):
                raise ValueError(f'"{key}" must be an object {{class id: Dice}}, got {table!r}')
            values = {}
            for k, v in table.items():
                c = _int_id(k, f'"{key}" key')
                if (isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real)
                        or not math.isfinite(float(v)) or not 0.0 <= float(v) <= 1.0):
                    raise ValueError(f'"{key}"[{k!r}] must be a Dice in [0, 1], got {v!r}')
                values[c] = float(v)
            out[key] = values
        if "checkpoint" in choice:
            if not isinstance(choice["checkpoint"], str):
                raise ValueError(f'"checkpoint" must be a checkpoint name, got '
                                 f'{choice["checkpoint"]!r}')
            out["checkpoint"] = choice["checkpoint"]
        if "cases" in choice:
            n = choice["cases"]
            if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) or n < 0:
                raise ValueError(f'"cases" must be a non-negative integer, got {n!r}')
            out["cases"] = int(n)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return out


def save_choice(path: str, choice: Mapping) -> None:
    """Write ``choice`` (as returned by ``choose``) to ``path`` as JSON, atomically.

    ``path`` is the file, conventionally ``os.path.join(run_dir,
    CHOICE_FILE.format(modality=m))``. A malformed
    choice raises ValueError and writes nothing.
    """
    write_json(path, _checked(choice, f"post-processing choice for {path}"), allow_nan=False)


def load_choice(path: str) -> dict | None:
    """The choice saved at ``path``, or None when the file does not exist.

    Only "keep_largest" is required; "dice_before", "dice_after" and "cases" are checked when
    present. Class ids come back as ints. A malformed file raises ValueError with one line
    naming the file and what is wrong.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} "
                         f"column {err.colno})") from None
    return _checked(data, path)
