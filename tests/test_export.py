"""lib/export.py: a trained network as a SavedModel with one signature per modality.

The round trip loads the exports in a fresh Python process that cannot import this
repository (``-I``, another working directory) and runs TensorFlow's own CPU kernels
(TF_ENABLE_ONEDNN_OPTS=0, where this process runs oneDNN's): the exported graphs need
neither the project's code nor the exporting machine's kernels. The reference is the live
model's own output, as the test phase computes it.
"""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from lib import settings
from lib.config import constants
from lib.data import DataError
from lib.export import EXPORT_JSON, SIGNATURES, export_saved_model
from lib.layers import bn_layers, conv_kernels

NETWORKS = {
    "2d": dict(NETWORK="dilated_resnet_2d", IMAGE_SIZE=16, FEATURE_BASE=2, DROPOUT=0.25),
    "3d": dict(NETWORK="unet3d", PATCH_SIZE=[16, 16, 8], FEATURE_BASE=2),
}
PREPARATION = {"image_size": 16, "slice_axis": "axial", "clip_lower": 0.0, "clip_upper": 98.0,
               "crop_size_mm": None, "training_crop": "center", "source": "dataset.json"}
TIMEOUT = 240

CHILD = r"""
import importlib.util, json, sys
import numpy as np
import tensorflow as tf
report = {"repository_importable": [n for n in ("lib", "model_2d", "model_3d")
                                    if importlib.util.find_spec(n) is not None]}
for net in sys.argv[1:]:
    loaded = tf.saved_model.load(net + "_export")
    report[net] = sorted(loaded.signatures)
    x = np.load(net + "_x.npy")
    for m in ("ct", "mr"):
        for key, value in loaded.signatures[m](x=tf.constant(x)).items():
            assert value.dtype == tf.float32, (key, value.dtype)
            np.save(f"{net}_{m}_{key}.npy", value.numpy())
print(json.dumps(report))
"""


@pytest.fixture(autouse=True)
def float32_policy():
    keras.mixed_precision.set_dtype_policy("float32")  # other tests may leave bf16 set
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def tiny_config(net: str) -> dict:
    config = constants(vars(settings))
    config.update(N_CLASS=3, CLASS_NAMES=["organ_a", "organ_b"], SCHEME="ummkd", SEED=0,
                  SYNC_BN=False, TEST_MODEL="runs/tiny/checkpoints/model-7", **NETWORKS[net])
    return config


def build(net: str, config: dict):
    if net == "2d":
        from model_2d import build_model
    else:
        from model_3d import build_model
    return build_model(config)


def input_shape(net: str, config: dict) -> list:
    if net == "2d":
        return [config["IMAGE_SIZE"], config["IMAGE_SIZE"], 3]
    return [*config["PATCH_SIZE"], 1]


def as_trained(model, net: str, config: dict, seed: int = 0):
    """Weights far from the initial ones, BN per modality clearly apart: kernels at He
    scale (the initial 0.01 gives near-uniform outputs), random scale and shift per
    modality, and moving statistics that are each modality's own batch statistics
    (one training pass at momentum 0 on differently distributed inputs)."""
    rng = np.random.default_rng(seed)
    for kernel in conv_kernels(model):
        fan_in = int(np.prod(kernel.shape[:-1]))
        kernel.assign(rng.normal(0, np.sqrt(2.0 / fan_in), kernel.shape).astype(np.float32))
    layers = bn_layers(model)
    for bn in layers:
        bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape).astype(np.float32))
        bn.beta.assign(rng.normal(0, 0.3, bn.beta.shape).astype(np.float32))
    momentum = [bn.momentum for bn in layers]
    for bn in layers:
        bn.momentum = 0.0
    try:
        for m, (mean, std) in {"ct": (0.0, 1.0), "mr": (0.5, 2.0)}.items():
            x = rng.normal(mean, std, [2, *input_shape(net, config)]).astype(np.float32)
            model(x, modalities=(m,), training=True)
    finally:
        for bn, value in zip(layers, momentum):
            bn.momentum = value


def live_outputs(model, x):
    """{modality: (logits, probabilities)} as lib.evaluate.make_predict_fn computes them."""
    out = {}
    for m in SIGNATURES:
        logits = tf.cast(model(tf.constant(x), modalities=(m,), training=False), tf.float32)
        out[m] = (logits.numpy(), tf.nn.softmax(logits, axis=-1).numpy())
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Both tiny networks as trained, exported (the 3D one into an existing empty folder),
    and run by a fresh process."""
    keras.mixed_precision.set_dtype_policy("float32")
    folder = tmp_path_factory.mktemp("exports")
    rng = np.random.default_rng(1)
    result = {"folder": folder}
    for net in NETWORKS:
        config = tiny_config(net)
        model = build(net, config)
        as_trained(model, net, config)
        x = rng.normal(0.2, 1.2, [3, *input_shape(net, config)]).astype(np.float32)
        np.save(folder / f"{net}_x.npy", x)
        if net == "3d":
            (folder / "3d_export").mkdir()  # an empty folder is no obstacle
        path = export_saved_model(model, config, str(folder / f"{net}_export"),
                                  preparation=PREPARATION if net == "2d" else None,
                                  log=lambda *_: None)
        result[net] = dict(config=config, model=model, x=x, path=path,
                           live=live_outputs(model, x))
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, *NETWORKS], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result["child"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("net", list(NETWORKS))
def test_round_trip_in_a_fresh_process_matches_the_live_model(exports, net):
    child, folder, case = exports["child"], exports["folder"], exports[net]
    assert child["repository_importable"] == []  # the load used TensorFlow alone
    assert {"ct", "mr"} <= set(child[net])
    batch, spatial = case["x"].shape[0], case["x"].shape[1:-1]
    outs = {}
    for m in SIGNATURES:
        logits = np.load(folder / f"{net}_{m}_logits.npy")
        probs = np.load(folder / f"{net}_{m}_probabilities.npy")
        live_logits, live_probs = case["live"][m]
        assert logits.shape == probs.shape == (batch, *spatial, 3)
        np.testing.assert_allclose(probs, live_probs, rtol=0, atol=2e-5)
        scale = np.abs(live_logits).max()
        np.testing.assert_allclose(logits, live_logits, rtol=0, atol=1e-5 * max(scale, 1.0))
        np.testing.assert_allclose(probs, tf.nn.softmax(logits, axis=-1).numpy(),
                                   rtol=0, atol=1e-6)
        assert np.std(live_probs) > 0.05  # not near-uniform: the comparison means something
        outs[m] = probs
    # the same input through the two modalities' BN branches: far apart, as live
    live_gap = np.abs(case["live"]["ct"][1] - case["live"]["mr"][1]).max()
    assert live_gap > 0.05
    assert np.abs(outs["ct"] - outs["mr"]).max() == pytest.approx(live_gap, abs=1e-4)


def graph_ops(export_path: str) -> list:
    """(op, attrs) of every node of a SavedModel's graph and function library."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(export_path, "saved_model.pb"), "rb") as handle:
        saved.ParseFromString(handle.read())
    graph = saved.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return [(n.op, n.attr) for n in nodes]


def test_export_is_traced_under_the_portable_plan(exports):
    """The 2D network's dilated convolutions are exported as space-to-batch (runs on every
    device), not as a convolution op with dilations (this process's oneDNN plan)."""
    ops = graph_ops(exports["2d"]["path"])
    dilated = [op for op, attr in ops if op.startswith("Conv")
               and "dilations" in attr and set(attr["dilations"].list.i) != {1}]
    assert dilated == []
    assert any(op == "SpaceToBatchND" for op, _ in ops)


def test_float32_in_and_out_under_mixed_precision(tmp_path):
    """A bf16 network: the signatures take and return float32 and compute what the test
    phase computes with the live model (up to bf16 rounding of the two op plans)."""
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    config = tiny_config("3d")
    model = build("3d", config)
    assert model.compute_dtype == "bfloat16"
    as_trained(model, "3d", config)
    x = np.random.default_rng(2).normal(0, 1, [2, *input_shape("3d", config)]).astype(np.float32)
    live = live_outputs(model, x)
    path = export_saved_model(model, config, str(tmp_path / "bf16"), log=lambda *_: None)
    loaded = tf.saved_model.load(path)
    for m in SIGNATURES:
        out = loaded.signatures[m](x=tf.constant(x))
        assert out["logits"].dtype == out["probabilities"].dtype == tf.float32
        np.testing.assert_allclose(out["probabilities"].numpy(), live[m][1], atol=1e-2)
    with open(os.path.join(path, EXPORT_JSON), encoding="utf-8") as handle:
        assert json.load(handle)["compute_dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- refusals
def test_a_non_empty_folder_is_refused_and_left_untouched(exports, tmp_path):
    case = exports["2d"]
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="taken: exists already") as err:
        export_saved_model(case["model"], case["config"], str(target), log=lambda *_: None)
    assert str(target) in str(err.value) and "\n" not in str(err.value)
    assert os.listdir(target) == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(DataError, match="a_file: exists already"):
        export_saved_model(case["model"], case["config"], str(a_file), log=lambda *_: None)
    assert a_file.read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["a_file", "taken"]  # no temporary folder left


def test_a_failed_export_leaves_nothing(exports, tmp_path, monkeypatch):
    case = exports["2d"]

    def fail(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_saved_model(case["model"], case["config"], str(tmp_path / "new"),
                           log=lambda *_: None)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- export.json
def test_export_json_describes_inputs_classes_and_preparation(exports):
    for net in NETWORKS:
        case = exports[net]
        with open(os.path.join(case["path"], EXPORT_JSON), encoding="utf-8") as handle:
            info = json.load(handle)
        config = case["config"]
        assert info["network"] == config["NETWORK"]
        assert info["kind"] == net
        assert info["n_class"] == config["N_CLASS"]
        assert info["class_names"] == config["CLASS_NAMES"]
        assert info["checkpoint"] == config["TEST_MODEL"]
        assert info["compute_dtype"] == "float32"
        assert info["preparation"] == (PREPARATION if net == "2d" else None)
        assert sorted(info["signatures"]) == sorted(SIGNATURES)
        for m in SIGNATURES:
            sig = info["signatures"][m]
            assert sig["inputs"]["x"] == {"shape": [None, *case["x"].shape[1:]],
                                          "dtype": "float32"}
            live_shape = list(case["live"][m][1].shape[1:])
            for key in ("logits", "probabilities"):
                assert sig["outputs"][key]["shape"] == [None, *live_shape]
