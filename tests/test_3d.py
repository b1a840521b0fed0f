"""The 3D network: model shapes and sharing, slab sampling, sliding-window inference, and a
smoke run of 3d_implementation/main.py and test.py (train, checkpoint, resume, test)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, tiny_volume
from lib.data import slab_dataset, slab_starts, volume_bank, write_list
from lib.evaluate import make_predict_fn, predict_volume_3d, window_starts
from lib.fast_ops import PLANS, OpPlan, use_plan
from lib.layers import bn_layers, conv_kernels

HERE_3D = os.path.join(ROOT, "3d_implementation")
from model_3d import UNet3D  # noqa: E402


@pytest.fixture(autouse=True)
def float32_policy():
    import keras
    keras.mixed_precision.set_dtype_policy("float32")  # other tests may leave bf16 set


def n_weights(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


# ----------------------------------------------------------------------------- model
def test_output_shapes():
    model = UNet3D(n_class=3, feature_base=2).build_for((16, 16, 8))
    x = tf.random.normal([4, 16, 24, 8, 1])
    assert model(x, modalities=("mr", "ct"), training=False).shape == (4, 16, 24, 8, 3)
    assert model(x[:1], modalities=("ct",), training=True).shape == (1, 16, 24, 8, 3)


@pytest.mark.parametrize("plan", ["cpu_onednn", "cpu"])
def test_every_plan_computes_the_portable_network(plan, monkeypatch):
    """The network of each device's plan (depth-first inside, sliced kernel gradients, the
    folded pool) is the same function of the same weights as TensorFlow's plain ops on
    [B, H, W, D, C] (OpPlan's defaults), in value and in every gradient.

    The two layouts round differently (1e-6); at LeakyReLU's kink that can flip one
    element's slope and move every gradient behind it by a few per cent, so the networks
    are compared with a smooth LeakyReLU (the layout code under test is unchanged)."""
    monkeypatch.setattr(tf.nn, "leaky_relu", lambda x, alpha=0.2: (
        alpha * x + (1.0 - alpha) * tf.nn.softplus(4.0 * x) / 4.0))
    plans = (PLANS[plan], OpPlan("cpu"))  # the device's plan; every field portable
    nets = []
    for p in plans:
        with use_plan(p):
            nets.append(UNet3D(n_class=3, feature_base=2, seed=0).build_for((16, 8, 8)))
    assert [n.depth_first for n in nets] == [True, False]
    for a, b in zip(nets[1].variables, nets[0].variables):
        assert a.shape == b.shape
        a.assign(b)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=[4, 16, 8, 8, 1]), tf.float32)  # H != D on purpose
    up = tf.constant(rng.normal(size=[4, 16, 8, 8, 3]), tf.float32)

    @tf.function
    def run(net):
        with tf.GradientTape() as tape:
            y = net(x, modalities=("mr", "ct"), training=True)
            loss = tf.reduce_sum(y * up)
        return y, tape.gradient(loss, net.trainable_variables)

    results = []
    for net, p in zip(nets, plans):
        with use_plan(p):
            results.append(run(net))
    (y0, g0), (y1, g1) = results
    np.testing.assert_allclose(y0, y1, rtol=1e-4, atol=1e-5)
    for a, b in zip(g0, g1):
        a, b = tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy()
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(b).max()))


def test_modalities_differ_only_in_batch_norm():
    joint = UNet3D(n_class=3, feature_base=2, scheme="joint").build_for((8, 8, 8))
    sep = UNet3D(n_class=3, feature_base=2, scheme="separate_bn").build_for((8, 8, 8))
    assert [k.shape for k in conv_kernels(joint)] == [k.shape for k in conv_kernels(sep)]
    extra = n_weights(sep.variables) - n_weights(joint.variables)
    assert extra == sum(n_weights(layer.variables) for layer in bn_layers(joint)) > 0


def test_checkpoint_restores_every_variable(tmp_path):
    """BN statistics and the units kept in lists too (a fresh model has other layer names)."""
    import logging

    from lib.pipeline import _restore_for_test
    from lib.train import model_variables

    rng = np.random.default_rng(0)
    saved = UNet3D(n_class=3, feature_base=2, seed=0).build_for((8, 8, 8))
    for v in saved.variables:
        v.assign(rng.normal(size=v.shape).astype(np.float32))
    prefix = tf.train.Checkpoint(model=model_variables(saved)).save(
        str(tmp_path / "checkpoints" / "model"))
    fresh = UNet3D(n_class=3, feature_base=2, seed=1).build_for((8, 8, 8))
    _restore_for_test(fresh, {}, prefix, str(tmp_path), logging.getLogger("test"))
    assert len(fresh.variables) == len(saved.variables) > 0
    for a, b in zip(saved.variables, fresh.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ----------------------------------------------------------------------------- slabs
def test_slab_starts_stay_inside_and_centre_on_labels():
    rng = np.random.default_rng(0)
    patch = (16, 16, 8)
    for _ in range(500):
        size = np.array(patch) + rng.integers(0, 20, 3)
        lo = int(rng.integers(0, size[2]))
        labelled = np.array([lo, rng.integers(lo + 1, size[2] + 1)])
        u = rng.random(4)
        start = slab_starts(size, labelled, patch, u).numpy()
        assert np.all(start >= 0) and np.all(start + patch <= size)
        if u[0] >= 0.5:  # centred draw: the slab holds a labelled slice
            assert start[2] < labelled[1] and start[2] + patch[2] > labelled[0]


def test_slab_dataset_never_leaves_a_volume():
    patch = (16, 16, 8)
    shapes = [(20, 18, 5), (10, 12, 30), (24, 24, 12)]  # short, small in-plane, labels at end
    volumes = []
    for v, shape in enumerate(shapes):
        # the image value tells volume and depth; label 1 marks real voxels (padding is 0)
        image = 1000.0 * v + np.broadcast_to(np.arange(shape[2], dtype=np.float32), shape)
        label = np.ones(shape, np.int32)
        if v == 2:
            label[:, :, :10] = 0
        volumes.append((image, label))
    bank = volume_bank(volumes, patch)
    assert bank.sizes.tolist() == [[20, 18, 8], [16, 16, 30], [24, 24, 12]]
    assert bank.labelled.tolist() == [[0, 5], [0, 30], [10, 12]]
    seen, ends = set(), []
    for x, y in slab_dataset(bank, patch, 4, seed=3).take(100):
        assert x.shape == (4, *patch, 1) and y.dtype == tf.int32
        for xi, yi in zip(x.numpy()[..., 0], y.numpy()):
            v = int(xi.min() // 1000)
            assert int(xi.max() // 1000) == v  # one volume only
            depth = np.unique(xi - 1000 * v)
            seen.add(v)
            if v == 0:  # depth 5 padded to 8 with the last slice; in-plane fully inside
                assert depth.tolist() == [0, 1, 2, 3, 4] and yi.sum() == 16 * 16 * 5
            elif v == 1:  # in-plane 10x12 padded to the patch with label 0
                assert len(depth) == 8 and yi.sum() == 10 * 12 * 8
            else:
                assert len(depth) == 8 and 0 <= depth.min() and depth.max() <= 11
                ends.append(yi.any())
    assert seen == {0, 1, 2}
    assert np.mean(ends) >= 0.55  # centred draws (half) always reach the last two slices


def test_slab_dataset_is_reproducible():
    image, label = tiny_volume(np.random.default_rng(2), 24, 20)
    bank = volume_bank([(image, label)], (16, 16, 8))
    a = [x.numpy() for x, _ in slab_dataset(bank, (16, 16, 8), 2, seed=5).take(3)]
    b = [x.numpy() for x, _ in slab_dataset(bank, (16, 16, 8), 2, seed=5).take(3)]
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- inference
def test_sliding_window_matches_one_forward_pass():
    model = UNet3D(n_class=3, feature_base=2, seed=0).build_for((16, 16, 8))
    rng = np.random.default_rng(3)
    for v in model.variables:  # large weights: the initial logits are all but tied
        value = rng.normal(size=v.shape)
        v.assign((np.abs(value) + 0.5 if "variance" in v.path else value).astype(np.float32))
    image, _ = tiny_volume(rng, 16, 8)
    fn = make_predict_fn(model, (16, 16, 8, 1))
    pred = predict_volume_3d(fn, "ct", image, (16, 16, 8), 3)
    logits = model(image[None, ..., None], modalities=("ct",), training=False).numpy()[0]
    top2 = np.sort(logits, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 1e-3 * np.abs(top2[..., 1]).max()
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(pred[clear], np.argmax(logits, axis=-1)[clear])


def test_sliding_window_covers_every_voxel():
    patch, calls = (16, 16, 8), []

    def fake(modality):
        def predict(x):
            calls.append(x.shape)
            probs = np.zeros((*x.shape[:-1], 3), np.float32)
            probs[..., 1] = 1.0  # class 1 wherever a window reached
            return tf.constant(probs)
        return predict

    image = np.random.default_rng(4).normal(size=(40, 37, 21)).astype(np.float32)
    pred = predict_volume_3d(fake, "mr", image, patch, 3, stride_d=4)
    assert pred.shape == image.shape and np.all(pred == 1)
    assert all(s == (1, *patch, 1) for s in calls)
    assert len(calls) == len(window_starts(40, 16, 8)) * len(window_starts(37, 16, 8)) * \
        len(window_starts(21, 8, 4))
    small = predict_volume_3d(fake, "mr", image[:10, :12, :5], patch, 3)
    assert small.shape == (10, 12, 5) and np.all(small == 1)


# ----------------------------------------------------------------------------- smoke run
def write_volumes(root):
    """Tiny NIfTI train/val/test volumes for mr and ct; returns {m: {split: list path}}."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    lists = {}
    for m in ("mr", "ct"):
        folder = os.path.join(root, m)
        os.makedirs(folder)
        lists[m] = {}
        for split, shapes in (("train", [(16, 16, 6), (20, 16, 12)]), ("val", [(16, 16, 8)]),
                              ("test", [(20, 16, 12)])):
            entries = []
            for k, (size, _, depth) in enumerate(shapes):
                image, label = tiny_volume(rng, size, depth)
                image = image[:, :16]  # in-plane 20x16 or 16x16
                label = label[:, :16]
                paths = [os.path.join(folder, f"{m}_{split}{k}_{s}.nii.gz")
                         for s in ("image", "label")]
                nib.save(nib.Nifti1Image(image, np.eye(4)), paths[0])
                nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), paths[1])
                entries.append(",".join(paths))
            lists[m][split] = os.path.join(folder, f"{split}_list.txt")
            write_list(lists[m][split], entries)
    return lists


def run_script(script, args, cwd):
    proc = subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_main_trains_resumes_and_test_py_tests(tmp_path):
    lists = write_volumes(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    args = {"preset": "custom", "output_path": out, "patch_size": "16,16,8", "n_class": 3,
            "class_names": "a,b", "feature_base": 2, "batch_size": 1, "num_steps": 4,
            "checkpoint_space": 2, "display_step": 2, "summary_step": 1, "precision": "fp32",
            "progress": False,
            "source_train_list": lists["mr"]["train"], "source_val_list": lists["mr"]["val"],
            "target_train_list": lists["ct"]["train"], "target_val_list": lists["ct"]["val"],
            "source_test_list": lists["mr"]["test"], "target_test_list": lists["ct"]["test"]}
    argv = [f"--{k}={v}" for k, v in args.items()]
    run_script("main.py", argv, HERE_3D)
    ckpts = os.path.join(out, "checkpoints")
    assert tf.train.latest_checkpoint(ckpts).endswith("model-4")
    assert os.path.exists(os.path.join(ckpts, "model-2.index"))
    saved = json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))
    assert saved["PHASE"] == "train" and saved["PATCH_SIZE"] == [16, 16, 8]
    assert "IMAGE_SIZE" not in saved

    run_script("main.py", argv + ["--num_steps=6"], HERE_3D)
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    assert "model-4 at step 4" in log and "training steps 4..6" in log
    assert "traces of the step function: 1" in log

    # test.py, run from the repository root this time: the latest checkpoint by default
    proc = run_script(os.path.join("3d_implementation", "test.py"), argv + ["--num_steps=6"],
                      ROOT)
    assert "testing checkpoint" in proc.stdout
    report = json.load(open(os.path.join(out, "results", "metrics.json"), encoding="utf-8"))
    assert report["checkpoint"].endswith("model-6") and report["classes"] == ["a", "b"]
    for m in ("mr", "ct"):
        assert 0.0 <= report[m]["dice_avg"] <= 1.0
    pred = os.path.join(out, "results", "predictions", "ct_test0_pred.nii.gz")
    import nibabel as nib
    assert nib.load(pred).shape == (20, 16, 12)
