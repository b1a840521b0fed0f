"""The authors' released MM-WHS files as they are: label 5, the original's one-hot, the
released test orientation and the published evaluation protocol.

The four real records are read from ../shared/data/mmwhs_released_sample (skipped where
that folder is absent). Expected values come from code written here: a protobuf walk over
the raw bytes, and numpy versions of the original formulas.
"""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

import main_combine
from conftest import ROOT
from lib import metrics
from lib.data import (DataError, LabelCount, load_training_volumes, parse_slice,
                      read_records, validate_tfrecords, volume_bank)
from lib.evaluate import evaluate, flips, paper_coverage
from lib.losses import total_loss
from lib.cli import main

RELEASED = os.path.join(ROOT, "..", "shared", "data", "mmwhs_released_sample")
RECORDS = {(m, split): os.path.join(RELEASED, f"data_{split}_{m}_image_01.tfrecords")
           for m in ("mr", "ct") for split in ("training", "validation")}
needs_release = pytest.mark.skipif(not os.path.isdir(RELEASED),
                                   reason="../shared/data/mmwhs_released_sample not present")


# ------------------------------------------------------------- the raw bytes, by hand
def _varint(buf: bytes, i: int):
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, value) of a protobuf message: varints as int, the rest as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            size = 4 if wire == 5 else 8
            value, i = buf[i:i + size], i + size
        yield number, value


def raw_label_and_image(path):
    """(label [H, W, 3] float32, image [H, W, 3] float32) of a one-record file, from its
    bytes: TFRecord framing, then Example > Features > map<string, Feature>."""
    blob = open(path, "rb").read()
    length = int.from_bytes(blob[:8], "little")
    assert len(blob) == length + 16  # one record per file, as released
    (features,) = [v for n, v in _fields(blob[12:12 + length]) if n == 1]
    found = {}
    for _, entry in _fields(features):
        kv = dict(_fields(entry))
        feature = dict(_fields(kv[2]))
        if 1 in feature:  # BytesList
            found[kv[1].decode()] = dict(_fields(feature[1]))[1]
        elif 3 in feature:  # Int64List, packed
            packed, values, i = dict(_fields(feature[3]))[1], [], 0
            while i < len(packed):
                v, i = _varint(packed, i)
                values.append(v)
            found[kv[1].decode()] = values[0]
    shape = [found[f"dsize_dim{i}"] for i in range(3)]
    return (np.frombuffer(found["label_vol"], np.float32).reshape(shape),
            np.frombuffer(found["data_vol"], np.float32).reshape(shape))


# ------------------------------------------------------------- label 5
@needs_release
@pytest.mark.parametrize("key", sorted(RECORDS))
def test_share_of_label_5_matches_a_count_from_the_raw_bytes(key):
    label, _ = raw_label_and_image(RECORDS[key])
    middle = label[:, :, 1]
    expected = np.count_nonzero(middle == 5) / middle.size
    assert set(np.unique(middle)) <= {0, 1, 2, 3, 4, 5} and expected > 0.01
    counted = LabelCount(5)
    assert validate_tfrecords([RECORDS[key]], labels=counted) == 1
    assert counted.pixels == 256 * 256 and set(counted.outside) == {5}
    assert counted.outside[5] / counted.pixels == pytest.approx(expected, abs=1e-12)
    with pytest.raises(DataError, match=r"label values outside 0\.\.4 \(value 5 on "
                                         rf"{100 * expected:.2f}% of the pixels"):
        counted.apply("error", "these slices")


def _numpy_original_loss(logits, labels, kernels, temperature=2.0):
    """The original's objective in numpy: _label_decomp's one-hot (a loop over classes
    0..C-1, so other labels give all zeros), Dice with p^2, class-weighted CE averaged
    over every pixel, the class-mean-logit KD, and the kernels' L2."""
    c = logits["mr"].shape[-1]
    per, means = {}, {}
    for m in ("mr", "ct"):
        z = logits[m].astype(np.float64)
        y = np.stack([(labels[m] == i) for i in range(c)], -1).astype(np.float64)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        dice = -np.mean([2 * np.sum(p[..., i] * y[..., i])
                         / (np.sum(p[..., i] ** 2) + np.sum(y[..., i]) + 1e-7)
                         for i in range(c)])
        raw = sum(-(1 - y[..., i].sum() / y.sum()) * y[..., i]
                  * np.log(np.clip(p[..., i], 0.005, 1)) for i in range(c))
        per[m] = dice + np.mean(raw)
        flat_z, flat_y = z.reshape(-1, c), y.reshape(-1, c)
        means[m] = (flat_y.T @ flat_z) / (flat_y.sum(0)[:, None] + 1e-6)  # [class, logit]
    q = {m: np.exp(means[m] / temperature) / np.exp(means[m] / temperature).sum(-1,
                                                                                 keepdims=True)
         for m in means}
    kl = lambda a, b: np.sum(a * np.log(a / b), -1)
    kd = np.mean((kl(q["mr"], q["ct"]) + kl(q["ct"], q["mr"])) / 2)
    l2 = sum(np.sum(k.astype(np.float64) ** 2) / 2 for k in kernels)
    return per["mr"] + per["ct"] + 0.5 * kd + 1e-4 * l2


@needs_release
def test_loss_with_ignore_is_the_original_formula_on_a_real_batch():
    """One batch per modality: the training and the validation record (label 5 in both)."""
    rng = np.random.default_rng(0)
    labels, raw_labels, logits = {}, {}, {}
    for m in ("mr", "ct"):
        files = [RECORDS[(m, "training")], RECORDS[(m, "validation")]]
        parsed = [parse_slice(read_records(f, 0), 256, f, 5, "ignore")[1] for f in files]
        labels[m] = tf.stack(parsed)
        raw_labels[m] = np.stack([np.rint(raw_label_and_image(f)[0][:, :, 1]) for f in files])
        logits[m] = rng.normal(0, 2, (2, 256, 256, 5)).astype(np.float32)
    # what the pipeline gives label 5: no class (the value 5 = N_CLASS), nothing else changed
    for m in labels:
        np.testing.assert_array_equal(labels[m].numpy(), raw_labels[m])
    kernels = [rng.normal(0, 0.1, (3, 3, 3, 4)).astype(np.float32)]
    got, _ = total_loss({m: tf.constant(v) for m, v in logits.items()}, labels,
                        [tf.constant(k) for k in kernels], n_class=5)
    want = _numpy_original_loss(logits, raw_labels, kernels)
    # float32 sums over 131,072 pixels here, float64 in numpy: about 1e-5 apart
    assert float(got) == pytest.approx(want, rel=1e-4)
    # ignoring is not background: with label 5 read as 0 the loss moves by about 6e-3
    as_background = {m: np.where(v == 5, 0, v) for m, v in raw_labels.items()}
    assert abs(_numpy_original_loss(logits, as_background, kernels) - want) > 2e-3


@needs_release
def test_training_on_the_four_real_records_and_the_error_rule(tmp_path, capsys):
    lists = {}
    for (m, split), path in RECORDS.items():
        lists[(m, split)] = str(tmp_path / f"{m}_{split}_list")
        with open(lists[(m, split)], "w", encoding="utf-8") as handle:
            handle.write(path + "\n")
    args = ["--preset=paper", "--phase=train", "--image_size=256", "--feature_base=2",
            "--batch_size=1", "--num_steps=2", "--checkpoint_space=2", "--display_step=2",
            "--progress=false",
            f"--source_train_list={lists[('mr', 'training')]}",
            f"--target_train_list={lists[('ct', 'training')]}",
            f"--source_val_list={lists[('mr', 'validation')]}",
            f"--target_val_list={lists[('ct', 'validation')]}"]

    def run(extra):
        return main(vars(main_combine), main_combine.network, args + extra,
                    main_combine.PRESETS, main_combine._ROOT)

    refused = str(tmp_path / "refused")
    assert run([f"--output_path={refused}", "--out_of_range_labels=error"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert RECORDS[("mr", "training")] in err and "label values outside 0..4" in err
    assert not os.path.exists(refused)

    out = str(tmp_path / "run")
    assert run([f"--output_path={out}"]) == 0
    logged = capsys.readouterr().out
    label, _ = raw_label_and_image(RECORDS[("mr", "training")])
    share = 100 * np.count_nonzero(label[:, :, 1] == 5) / label[:, :, 1].size
    assert f"mr training slices: labels outside 0..4: value 5 on {share:.2f}%" in logged
    assert os.path.exists(os.path.join(out, "checkpoints", "model-2.index"))


def test_3d_volumes_with_labels_outside_the_classes(tmp_path):
    image = np.zeros((8, 8, 6), np.float32)
    label = np.zeros((8, 8, 6), np.int16)
    label[2:4, 2:4, 1] = 1
    label[2:6, 2:6, 4] = 7  # no class; slice 4 has nothing else
    label[0, 0, 5] = -1
    paths = [str(tmp_path / n) for n in ("img.nii.gz", "lab.nii.gz")]
    nib.save(nib.Nifti1Image(image, np.eye(4)), paths[0])
    nib.save(nib.Nifti1Image(label, np.eye(4)), paths[1])
    listed = tmp_path / "list.txt"
    listed.write_text(",".join(paths) + "\n")
    with pytest.raises(DataError, match=r"lab\.nii\.gz: label values outside 0\.\.2 \("
                                        r"values 7 on 4\.17%, -1 on 0\.26% of the pixels"):
        load_training_volumes(str(listed), 3, "error")
    ((_, loaded),) = load_training_volumes(str(listed), 3, "ignore")
    expected = label.copy()
    expected[(label < 0) | (label >= 3)] = 3  # N_CLASS: no class
    np.testing.assert_array_equal(loaded, expected)
    # only slice 1 holds a class: slabs are centred on it, not on the no-class slices
    assert volume_bank([(image, loaded)], (8, 8, 2), 3).labelled.tolist() == [[1, 2]]


# ------------------------------------------------------------- test orientation
@pytest.mark.parametrize("entry, prepared, rule, expected", [
    ("a.npz", False, "npz", True), ("a.nii.gz,b.nii.gz", False, "npz", False),
    ("a.npz", False, "released", True), ("a.nii.gz,b.nii.gz", False, "released", True),
    ("a.nii.gz,b.nii.gz", True, "released", False), ("a.npz", True, "released", True),
    ("a.npz", False, "none", False), ("a.nii.gz,b.nii.gz", False, "none", False)])
def test_which_test_volumes_are_flipped(entry, prepared, rule, expected):
    assert flips(entry, prepared, rule) is expected


def _released_test_case(folder):
    """A test volume in the released layout: the training slices' arrays flipped on axes 0
    and 1, written as NIfTI with no dataset.json. Class 1 in the top half of the training
    layout, class 2 in the bottom half, and a patch of label 5 (no class)."""
    image = np.zeros((16, 12, 7), np.float32)
    label = np.zeros((16, 12, 7), np.int16)
    image[2:6, 3:9], label[2:6, 3:9] = 1.0, 1
    image[10:14, 2:6], label[10:14, 2:6] = 1.0, 2
    label[11:13, 8:10] = 5
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    paths = [os.path.join(folder, f"ct_1001_{k}.nii.gz") for k in ("image", "label")]
    nib.save(nib.Nifti1Image(np.flip(image, (0, 1)).copy(), affine), paths[0])
    nib.save(nib.Nifti1Image(np.flip(label, (0, 1)).copy(), affine), paths[1])
    listed = os.path.join(folder, "ct_test_list")
    with open(listed, "w", encoding="utf-8") as handle:
        handle.write(",".join(paths) + "\n")
    return listed, image, label, paths


def _knows_the_training_layout(modality, image):
    """A 'network' that learnt the training layout: bright pixels in the top half are
    class 1, in the bottom half class 2."""
    pred = np.zeros(image.shape, np.int32)
    top = np.arange(image.shape[0])[:, None, None] < image.shape[0] // 2
    pred[(image > 0.5) & top] = 1
    pred[(image > 0.5) & ~top] = 2
    return pred


def test_a_released_orientation_nifti_test_volume_is_scored_on_the_right_voxels(tmp_path):
    listed, image, label, paths = _released_test_case(str(tmp_path))
    out = str(tmp_path / "run")
    logged = []
    report = evaluate(_knows_the_training_layout, {"ct": listed}, ["a", "b"], out, "ckpt",
                      log=logged.append, flip="released", out_of_range="ignore",
                      paper_protocol=True, coverage=lambda depth: paper_coverage(depth, 4))
    case = report["ct"]["cases"][0]
    assert case["dice"] == {"a": 1.0, "b": 1.0}  # label 5 counts for no class
    assert any("1 of 1 test volumes flipped" in line for line in logged)
    assert any("value 5 on 2.08% of the pixels" in line for line in logged)  # 28 of 1344
    # written back in the file's own layout and grid: it overlays the released file
    pred = nib.load(os.path.join(out, "results", "predictions", "ct_1001_pred.nii.gz"))
    file_label = np.asarray(nib.load(paths[1]).dataobj)
    np.testing.assert_array_equal(np.asarray(pred.dataobj),
                                  np.where(file_label == 5, 0, file_label))
    np.testing.assert_allclose(pred.affine, nib.load(paths[0]).affine)
    gt = nib.load(os.path.join(out, "results", "predictions", "ct_1001_gt.nii.gz"))
    np.testing.assert_array_equal(np.asarray(gt.dataobj), np.where(file_label == 5, 0,
                                                                    file_label))
    # the published protocol on the same prediction: depth 7, batch 4 -> slices 0 and 6
    # and one of 1..5 stay background: Dice 2 * 4 / (4 + 7) for both classes
    paper = report["paper_protocol"]["ct"]["cases"][0]
    assert paper["dice"] == pytest.approx({"a": 8 / 11, "b": 8 / 11})
    saved = json.load(open(os.path.join(out, "results", "metrics.json")))
    assert saved["paper_protocol"]["ct"]["distance_unit"] == "voxel"
    assert os.path.exists(os.path.join(out, "results", "metrics_paper_protocol.csv"))

    # not flipped (the layout of data this project wrote), the classes swap halves
    wrong = evaluate(_knows_the_training_layout, {"ct": listed}, ["a", "b"],
                     str(tmp_path / "wrong"), "ckpt", log=lambda *_: None, flip="npz",
                     out_of_range="ignore")
    assert wrong["ct"]["cases"][0]["dice"] == {"a": 0.0, "b": 0.0}
    # the OUT_OF_RANGE_LABELS rule holds at test time too
    with pytest.raises(DataError, match=rf"{paths[1]}: label values outside 0\.\.2"):
        evaluate(_knows_the_training_layout, {"ct": listed}, ["a", "b"],
                 str(tmp_path / "err"), "ckpt", log=lambda *_: None, flip="released")


# ------------------------------------------------------------- the published protocol
@pytest.mark.parametrize("depth, batch, uncovered", [
    (10, 8, 2),    # slices 1..8 fill one batch: only the two ends are left out
    (15, 8, 7),    # one batch of the 13 slices 1..13: 5 more left out
    (17, 8, 2),    # two batches cover all 15 slices 1..15 (the last one part-filled)
    (7, 4, 3)])    # one batch of the 5 slices 1..5: 1 more left out
def test_paper_coverage_counts(depth, batch, uncovered):
    covered = paper_coverage(depth, batch, seed=3)
    assert covered.shape == (depth,) and not covered[0] and not covered[-1]
    assert int((~covered).sum()) == uncovered
    np.testing.assert_array_equal(covered, paper_coverage(depth, batch, seed=3))


def test_paper_protocol_assd_is_the_mean_of_directed_means_in_voxels():
    """pred {(1, 0)}, gt {(1, 2), (1, 3)}; columns 2 mm apart. d_pg = [2], d_gp = [2, 3]
    voxels: the published ASSD (2 + 2.5) / 2 = 2.25 voxels whatever the spacing; ours
    pools [4, 4, 6] mm: 14 / 3."""
    pred = np.zeros((3, 6), np.int32)
    gt = np.zeros((3, 6), np.int32)
    pred[1, 0] = 1
    gt[1, 2:4] = 1
    ours = metrics.evaluate_case(pred, gt, (1.0, 2.0), ["a"])
    paper = metrics.evaluate_case(pred, gt, (1.0, 2.0), ["a"], protocol="paper")
    assert ours["assd"]["a"] == pytest.approx(14 / 3)
    assert paper["assd"]["a"] == pytest.approx(2.25)
    assert paper["hd95"]["a"] == pytest.approx(np.percentile([2, 2, 3], 95))
    assert paper["dice"] == ours["dice"] == {"a": 0.0}


def test_test_labels_outside_the_classes_stop_train_test_before_training(tmp_path, capsys):
    from conftest import tiny_overrides, write_tiny_dataset
    from lib.data import read_list

    lists = write_tiny_dataset(str(tmp_path / "data"))
    label_file = read_list(lists["ct"]["test"])[0].split(",")[1]
    img = nib.load(label_file)
    label = np.asarray(img.dataobj).copy()
    label[0, 0, 0] = 9  # N_CLASS = 3
    nib.save(nib.Nifti1Image(label, img.affine), label_file)
    out = str(tmp_path / "run")
    assert main(vars(main_combine), main_combine.network, tiny_overrides(lists, out),
                main_combine.PRESETS, main_combine._ROOT) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {label_file}: label values outside 0..2 (value 9 on ")
    assert "\n" not in err and not os.path.exists(out)
