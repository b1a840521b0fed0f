"""The demo dataset: phantom CT and MR scans, prepared exactly as real scans would be.

``ensure_demo_data(folder, image_size, seed)`` generates the phantom volumes
(data/phantom.py) under ``folder/raw`` and runs the same data preparation as for real data
(data/prepare.py) once per modality into ``folder/mr`` and ``folder/ct``, with the training
volumes too (train_volume_list.txt, for the 3D network). It does nothing when the prepared
data are already there.
"""
from __future__ import annotations

import os
import shutil
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(_HERE))

from data import phantom  # noqa: E402
from data.prepare import prepare  # noqa: E402

PHANTOM_LABELS = {1: 1, 2: 2, 3: 3, 4: 4}  # the phantom writes the class ids directly
SLICE_AXIS = "axial"


def ensure_demo_data(folder: str, image_size: int = 64, seed: int = 0, log=print) -> dict:
    """Lists of the prepared demo data, generating them first if needed."""
    lists = {m: os.path.join(folder, m, "train_list.txt") for m in phantom.MODALITIES}
    # train_volume_list.txt: demo folders written before the 3D network lack it
    if all(os.path.exists(os.path.join(folder, m, name)) for m in lists
           for name in ("dataset.json", "train_volume_list.txt")):
        return lists
    log(f"generating the phantom demo data in {folder} ...")
    raw = os.path.join(folder, "raw")
    if os.path.isdir(raw):  # a half-finished earlier attempt: phantoms are cheap to remake
        shutil.rmtree(raw)
    generated = phantom.generate(folder, seed=seed)
    for m, info in generated.items():
        prepare(info["cases"], PHANTOM_LABELS, os.path.join(folder, m), modality=m,
                split=info["split"], image_size=image_size, slice_axis=SLICE_AXIS,
                crop="label", train_volumes=True, seed=seed, overwrite=True,
                log=lambda *a, **k: None)
    log("demo data ready")
    return lists
