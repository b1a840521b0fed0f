"""The demo dataset: phantom CT and MR scans, prepared exactly as real scans would be.

``ensure_demo_data(folder, image_size, seed)`` generates the phantom volumes
(data/phantom.py) under ``folder/raw`` and runs the same data preparation as for real data
(data/prepare.py) once per modality into ``folder/mr`` and ``folder/ct``, with the training
volumes too (train_volume_list.txt, for the 3D network). It does nothing when the prepared
data are already there.
"""
from __future__ import annotations

import json
import os
import shutil

from data import phantom
from data.prepare import prepare
from lib.files import write_json, write_text

PHANTOM_LABELS = {1: 1, 2: 2, 3: 3, 4: 4}  # the phantom writes the class ids directly
SLICE_AXIS = "axial"


N_TRAIN, N_VAL, N_TEST = 20, 1, 3  # phantom subjects per modality


def ensure_demo_data(folder: str, image_size: int = 64, seed: int = 0, log=print) -> dict:
    """Lists of the prepared demo data, generating them first if needed.

    The data are built in a temporary sibling folder and renamed into place when complete,
    so an interrupted generation never leaves a folder that looks ready. ``demo.json``
    records the settings; data made with other settings are rebuilt.
    """
    lists = {m: os.path.join(folder, m, "train_list.txt") for m in phantom.MODALITIES}
    settings = {"image_size": image_size, "seed": seed, "n_train": N_TRAIN, "n_val": N_VAL,
                "n_test": N_TEST, "slice_axis": SLICE_AXIS, "version": 2}
    marker = os.path.join(folder, "demo.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            if json.load(handle) == settings:
                return lists
    log(f"generating the phantom demo data in {folder} ...")
    tmp = f"{folder.rstrip(os.sep)}.partial-{os.getpid()}"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    generated = phantom.generate(tmp, n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, seed=seed)
    for m, info in generated.items():
        prepare(info["cases"], PHANTOM_LABELS, os.path.join(tmp, m), modality=m,
                split=info["split"], image_size=image_size, slice_axis=SLICE_AXIS,
                crop="label", train_volumes=True, seed=seed, overwrite=True,
                log=lambda *a, **k: None)
    write_json(os.path.join(tmp, "demo.json"), settings)
    if os.path.isdir(folder):  # generated data of other settings: ours to replace
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    for m in generated:  # source paths recorded while building: point them at the final folder
        path = os.path.join(folder, m, "dataset.json")
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        write_text(path, text.replace(json.dumps(tmp)[1:-1], json.dumps(folder)[1:-1]))
    log("demo data ready")
    return lists
