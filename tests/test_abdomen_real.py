"""End to end on the real abdominal CT and MR pair in ../shared: prepare, train, test, and
predict the real DICOM CT series.

The same commands as README's abdomen section, at a tiny size so that it runs in CI.
"""
import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import main_combine
from conftest import ROOT, SHARED_REAL
from lib.cli import main

pytestmark = pytest.mark.skipif(not os.path.isdir(SHARED_REAL),
                                reason="../shared/data/abdomen_real is not there")
SERIES = os.path.join(SHARED_REAL, "..", "ct_dicom_real", "series")


def prepare(m, part, out):
    args = [sys.executable, os.path.join(ROOT, "data", "prepare.py"), "--modality", m,
            "--images", os.path.join(SHARED_REAL, f"{m}_0001_image.nii.gz"),
            "--labels", os.path.join(SHARED_REAL, f"{m}_0001_label.nii.gz"),
            "--label_map", "5:1,2:2,3:3,1:4", f"--{part}", f"{m}_0001", "--image_size", "32",
            "--out_dir", out]
    subprocess.run(args, check=True, capture_output=True, cwd=ROOT)


def test_prepare_train_and_test_the_real_pair(tmp_path):
    base = tmp_path / "abdomen"
    for m in ("ct", "mr"):
        for part in ("train", "test"):
            prepare(m, part, str(base / f"{m}_{part}"))
    out = str(tmp_path / "run")
    args = {"preset": "abdomen", "output_path": out, "image_size": 32, "feature_base": 2,
            "num_steps": 30, "checkpoint_space": 30, "display_step": 30, "progress": False,
            "precision": "fp32"}
    for m, src in (("mr", "source"), ("ct", "target")):
        args[f"{src}_train_list"] = str(base / f"{m}_train" / "train_list.txt")
        args[f"{src}_test_list"] = str(base / f"{m}_test" / "test_list.txt")
    assert main(vars(main_combine), main_combine.network, [f"--{k}={v}" for k, v in args.items()],
                main_combine.PRESETS, main_combine._ROOT) == 0
    report = json.load(open(os.path.join(out, "results", "metrics.json"), encoding="utf-8"))
    assert report["classes"] == ["liver", "right_kidney", "left_kidney", "spleen"]
    for m in ("mr", "ct"):
        dice = report[m]["cases"][0]["dice"]
        assert set(dice) == set(report["classes"])
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in dice.values())
        # The prediction is saved in the geometry of the original scan.
        original = os.path.join(SHARED_REAL, f"{m}_0001_image.nii.gz")
        pred = os.path.join(out, "results", "predictions", f"{m}_0001_pred.nii.gz")
        a, b = nib.load(original), nib.load(pred)
        assert a.shape == b.shape
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
        sa, sb = sitk.ReadImage(original), sitk.ReadImage(pred)
        assert sa.GetSize() == sb.GetSize()
        np.testing.assert_allclose(sa.GetSpacing(), sb.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(sa.GetOrigin(), sb.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(sa.GetDirection(), sb.GetDirection(), atol=1e-6)
        # and the reference labels saved beside it land on the original's organs
        gt = np.asarray(nib.load(pred.replace("_pred", "_gt")).dataobj)
        lab = np.asarray(nib.load(original.replace("_image", "_label")).dataobj)
        assert np.array_equal(gt == 1, lab == 5)  # liver
    # ... and each test scan is also scored in its own geometry, over the whole scan
    for m in ("mr", "ct"):
        (case,) = report["scan_geometry"][m]["cases"]
        assert case["case"] == f"{m}_0001" and set(case["dice"]) == set(report["classes"])
        scan = nib.load(os.path.join(out, "results", "predictions", f"{m}_0001_scan.nii.gz"))
        assert scan.shape == nib.load(os.path.join(SHARED_REAL, f"{m}_0001_image.nii.gz")).shape

    # The real DICOM series, unlabelled: a NIfTI mask in the series' exact geometry
    if not os.path.isdir(SERIES):
        return
    masks = str(tmp_path / "masks")
    predict_args = [f"--{k}={v}" for k, v in args.items()] + [
        "--phase=predict", "--predict_modality=ct", f"--predict_input={SERIES}",
        f"--predict_output={masks}"]
    assert main(vars(main_combine), main_combine.network, predict_args, main_combine.PRESETS,
                main_combine._ROOT) == 0
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(SERIES))
    series, mask = reader.Execute(), sitk.ReadImage(os.path.join(masks, "series_seg.nii.gz"))
    assert mask.GetSize() == series.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(mask.GetSpacing(), series.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(mask.GetOrigin(), series.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(mask.GetDirection(), series.GetDirection(), atol=1e-6)
    assert open(os.path.join(masks, "volumes.csv")).readline().startswith(
        "case,input,shape,liver_ml,right_kidney_ml")
