"""Validation on whole volumes during training, and the best checkpoint it selects.

Every VALIDATE_EVERY steps (and at the last step) the current model segments the validation
volumes (SOURCE_VAL_VOLUME_LIST, TARGET_VAL_VOLUME_LIST: "image,label" lines as the test
lists, such as data/prepare.py's val_volume_list.txt) exactly as the test phase segments a
test volume, and the Dice of every class is logged. The score is the mean over the
modalities with validation volumes of the mean Dice over the classes and cases; the
checkpoint of the highest score so far is kept in ``checkpoints/best/`` beside the latest
ones, with ``best.json`` ({"step", "score", "dice": {modality: {class: Dice}}}). Validation
patients come from the training data, never from the test set, so choosing on them leaves
the test unbiased (nnU-Net's rule).
"""
from __future__ import annotations

import json
import os

import numpy as np

from lib.files import write_json
from lib.postprocess import dice_per_class

BEST_DIR = "best"          # under <OUTPUT_PATH>/checkpoints
BEST_FILE = "best.json"    # in BEST_DIR
VOLUME_LISTS = {"mr": "SOURCE_VAL_VOLUME_LIST", "ct": "TARGET_VAL_VOLUME_LIST"}


def validation_lists(config: dict) -> dict:
    """{modality: validation volume list} of the modalities that have one."""
    return {m: config[key] for m, key in VOLUME_LISTS.items() if config.get(key)}


def load_validation_volumes(config: dict) -> dict:
    """{modality: [Volume]} of every validation volume list (lib.evaluate.load_test_volumes:
    same flips and label rule as the test volumes)."""
    from lib.evaluate import load_test_volumes

    return {m: [v for v, _ in load_test_volumes(path, flip=config["TEST_FLIP"],
                                                label_resample=config["LABEL_RESAMPLE"])]
            for m, path in validation_lists(config).items()}


def score(dice: dict) -> float:
    """The selection score: mean over modalities of the mean over classes of ``dice``
    ({modality: [n_class - 1] mean Dice over cases})."""
    return float(np.mean([np.mean(d) for d in dice.values()]))


class VolumeValidator:
    """``validator() -> {"dice": {modality: [n_class - 1]}, "score": float, "predictions":
    {modality: [label maps]}}``: the volumes segmented by ``predict(modality, image [H, W,
    D]) -> labels [H, W, D]`` (the network's predictor, with the model's current weights),
    Dice per class averaged over each modality's cases."""

    def __init__(self, predict, volumes: dict, n_class: int):
        if not any(volumes.values()):
            raise ValueError("no validation volumes")
        self.predict, self.volumes, self.n_class = predict, volumes, n_class

    def truths(self) -> dict:
        """{modality: [label maps]} of the validation volumes."""
        return {m: [v.label for v in vols] for m, vols in self.volumes.items()}

    def __call__(self) -> dict:
        predictions, dice = {}, {}
        for m, vols in self.volumes.items():
            predictions[m] = [np.asarray(self.predict(m, v.image)) for v in vols]
            dice[m] = np.mean([dice_per_class(p, v.label, self.n_class)
                               for p, v in zip(predictions[m], vols)], axis=0)
        return {"dice": dice, "score": score(dice), "predictions": predictions}


def best_dir(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, BEST_DIR)


def read_best(checkpoint_dir: str) -> dict | None:
    """The best.json of a run's checkpoint folder, or None when validation kept none; a
    file that is not the expected JSON raises ValueError naming it."""
    path = os.path.join(best_dir(checkpoint_dir), BEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            best = json.load(handle)
        return {"step": int(best["step"]), "score": float(best["score"]),
                "dice": best["dice"], "checkpoint": str(best["checkpoint"])}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a best-checkpoint record ({err})") from None


def best_checkpoint(checkpoint_dir: str) -> str | None:
    """The prefix of the best checkpoint, or None when there is none (no validation)."""
    best = read_best(checkpoint_dir)
    if best is None:
        return None
    prefix = os.path.join(best_dir(checkpoint_dir), best["checkpoint"])
    return prefix if os.path.exists(prefix + ".index") else None


def write_best(checkpoint_dir: str, step: int, value: float, dice: dict, class_names,
               prefix: str) -> None:
    """Record the best checkpoint (``prefix``, saved in best_dir) and its scores."""
    write_json(os.path.join(best_dir(checkpoint_dir), BEST_FILE),
               {"step": int(step), "score": float(value),
                "dice": {m: {n: float(x) for n, x in zip(class_names, d)}
                         for m, d in dice.items()},
                "checkpoint": os.path.basename(prefix)}, indent=1)
