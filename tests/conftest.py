"""Shared test fixtures: tiny synthetic datasets in the project's own formats."""
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # on sys.path: pytest.ini

import lib  # noqa: E402,F401  before TensorFlow: the oneDNN default the entry scripts get

SHARED_REAL = os.path.join(ROOT, "..", "shared", "data", "abdomen_real")


def tiny_volume(rng, size=16, depth=6, n_class=3):
    """A [size, size, depth] image with one bright square per class and its label map."""
    image = rng.normal(0, 0.1, (size, size, depth)).astype(np.float32)
    label = np.zeros((size, size, depth), np.int32)
    for c in range(1, n_class):
        x, y = rng.integers(1, size - 6, 2)
        label[x:x + 5, y:y + 5, :] = c
        image[x:x + 5, y:y + 5, :] += c
    return image, label


def write_tiny_dataset(root, size=16, depth=6, n_class=3, n_train=2, n_test=1, seed=0,
                       label_layout="released"):
    """Train/val TFRecords and NIfTI test volumes for mr and ct; returns {m: {split: list}}."""
    import nibabel as nib

    from lib.data import write_list, write_slices
    from lib.evaluate import stack_context

    rng = np.random.default_rng(seed)
    lists = {}
    for m in ("mr", "ct"):
        folder = os.path.join(root, m)
        os.makedirs(folder, exist_ok=True)
        files = {"train": [], "val": [], "test": []}
        for k in range(n_train + 1 + n_test):
            image, label = tiny_volume(rng, size, depth, n_class)
            split = "train" if k < n_train else ("val" if k == n_train else "test")
            if split == "test":
                affine = np.diag([1.5, 1.5, 2.0, 1.0])
                ip = os.path.join(folder, f"{m}_{k}_image.nii.gz")
                lp = os.path.join(folder, f"{m}_{k}_label.nii.gz")
                nib.save(nib.Nifti1Image(image, affine), ip)
                nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), lp)
                files["test"].append(f"{ip},{lp}")
                continue
            stacks = stack_context(image)
            for d in range(depth):
                path = os.path.join(folder, f"{m}_{k}_{d}.tfrecords")
                write_slices(path, [(stacks[d], label[:, :, d])], label_layout)
                files[split].append(path)
        lists[m] = {}
        for split, entries in files.items():
            path = os.path.join(folder, f"{split}_list.txt")
            write_list(path, entries)
            lists[m][split] = path
    return lists


def show_dropout(unit) -> None:
    """Set a built 2D dropout ConvUnit (4 channels) so that its output is zero exactly where
    dropout dropped: BN(ones) = beta = 1, LeakyReLU keeps it, a kernel of ones makes it
    positive. Its output on ones then shows the dropout mask."""
    import tensorflow as tf

    unit.conv.branches["shared"].kernel.assign(tf.ones([3, 3, 4, 4]))
    unit.bn.beta.assign(tf.ones_like(unit.bn.beta))


def tiny_overrides(lists, output, **extra):
    """Command-line overrides for main_combine.py on a tiny dataset."""
    args = {"preset": "custom", "output_path": output, "image_size": 16, "n_class": 3,
            "feature_base": 2, "batch_size": 2, "num_steps": 4, "checkpoint_space": 2,
            "display_step": 2, "summary_step": 1, "class_names": "a,b",
            "source_train_list": lists["mr"]["train"], "source_val_list": lists["mr"]["val"],
            "target_train_list": lists["ct"]["train"], "target_val_list": lists["ct"]["val"],
            "source_test_list": lists["mr"]["test"], "target_test_list": lists["ct"]["test"],
            "precision": "fp32", "progress": False, "test_batch": 4}
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


@pytest.fixture
def tiny_data(tmp_path):
    return write_tiny_dataset(str(tmp_path / "data"))
