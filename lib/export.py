"""A trained network as a TensorFlow SavedModel that runs without this repository.

``export_saved_model(model, config, path)`` writes one serving signature per modality,
``"ct"`` and ``"mr"``: the same network and shared kernels, each signature through its
modality's batch-normalisation branch (scale, shift and moving statistics), as the test
phase computes it (lib.evaluate.make_predict_fn). Beside it, ``path/export.json`` says what
the inputs are and how scans must be prepared for them. Loading needs TensorFlow only::

    loaded = tf.saved_model.load(path)
    out = loaded.signatures["ct"](x=tf.constant(batch, tf.float32))
    out["probabilities"]  # [N, ..., N_CLASS] float32

No measurements here; tests/test_export.py checks the round trip in a fresh process.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import keras
import tensorflow as tf

from lib.data import DataError
from lib.fast_ops import OpPlan, use_plan
from lib.files import write_json

SIGNATURES = ("ct", "mr")  # the first is also TF-Serving's "serving_default" (ExportArchive)
INPUT_NAME = "x"
EXPORT_JSON = "export.json"
FORMAT = "ummkd-saved-model"
FORMAT_VERSION = 1

# config["NETWORK"] (the name the entry scripts record with checkpoints) -> kind; the model
# class name is the fallback for a configuration without it.
KINDS = {"dilated_resnet_2d": "2d", "unet3d": "3d"}
CLASS_KINDS = {"DilatedResNet2D": "2d", "UNet3D": "3d"}

# The plan the signatures are traced under: OpPlan's defaults, TensorFlow's own ops for every
# layer (dilated convolutions as tf.nn.convolution, i.e. space-to-batch, which runs on every
# device; native pooling, dropout and LeakyReLU; no custom gradients), so the graph holds no
# op chosen for this machine's kernels (oneDNN's dilated convolutions, say).
PORTABLE_PLAN = OpPlan("cpu")

INPUTS = {
    "2d": "3 adjacent slices [N, IMAGE_SIZE, IMAGE_SIZE, 3] float32, prepared and z-scored as "
          "the training data (slice k with k-1 and k+1, edge slices replicated); the output is "
          "the middle slice's",
    "3d": "slabs [N, h, w, d, 1] float32 of the training PATCH_SIZE, prepared and z-scored as "
          "the training data; test-time volumes are covered by overlapping slabs",
}


def _network_kind(model, config: dict) -> str:
    """"2d" or "3d": from config["NETWORK"], else from the model's class."""
    kind = KINDS.get(config.get("NETWORK")) or CLASS_KINDS.get(type(model).__name__)
    if kind is None:
        raise ValueError(f"export: unknown network {config.get('NETWORK')!r} "
                         f"({type(model).__name__}); expected one of {', '.join(KINDS)}")
    return kind


def _example_shape(kind: str, config: dict) -> list[int]:
    """One example's input shape (no batch axis), as the test phase feeds the network."""
    if kind == "2d":
        size = int(config["IMAGE_SIZE"])
        return [size, size, 3]
    return [int(p) for p in config["PATCH_SIZE"]] + [1]


def refuse_existing(path: str) -> None:
    """DataError when ``path`` exists and is not an empty folder."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise DataError(f"{path}: exists already and is not an empty folder; export to a new "
                        "path (nothing on disk is overwritten)")


def _description(model, config, kind, shape, preparation) -> dict:
    n_class = int(config["N_CLASS"])
    spec = lambda channels: {"shape": [None, *shape[:-1], channels], "dtype": "float32"}
    signature = {"inputs": {INPUT_NAME: spec(shape[-1])},
                 "outputs": {"logits": spec(n_class), "probabilities": spec(n_class)}}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "network": config.get("NETWORK"), "kind": kind, "model_class": type(model).__name__,
        "scheme": config.get("SCHEME"), "feature_base": config.get("FEATURE_BASE"),
        "signatures": {m: signature for m in SIGNATURES},
        "serving_default": SIGNATURES[0],
        "input": INPUTS[kind],
        "output": "logits and their softmax over the last axis (classes 0..N_CLASS-1, 0 = "
                  "background), the modality's BN branch",
        "n_class": n_class, "class_names": list(config["CLASS_NAMES"]),
        "checkpoint": config.get("TEST_MODEL") or None,
        "compute_dtype": model.compute_dtype,
        "op_plan": PORTABLE_PLAN.describe(),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "preparation": preparation,
    }


def export_saved_model(model, config: dict, path: str, preparation: dict | None = None,
                       log=print) -> str:
    """Write ``model`` as a SavedModel at ``path`` with the serving signatures "ct" and "mr";
    returns ``path``.

    Each signature takes ``x``, the network's preprocessed input, float32 with a free batch
    axis: [N, IMAGE_SIZE, IMAGE_SIZE, 3] for the 2D network (three adjacent z-scored slices;
    the output is the middle slice's), [N, h, w, d, 1] for the 3D one (slabs of PATCH_SIZE).
    It returns {"logits", "probabilities"}, both float32 [N, ..., N_CLASS], the
    probabilities the softmax over the last axis: exactly the test phase's computation,
    ``model(x, modalities=(m,), training=False)`` cast to float32 (lib.evaluate), through
    modality m's BN branch. The model computes in its own precision (its compute dtype,
    recorded in export.json); its first convolution casts the float32 input to it, so the
    signature's input and outputs are float32 under any mixed-precision policy.

    Every variable of the model is saved (``model.variables``: the BN scale, shift and
    moving statistics of both modalities included), not only what
    tf.train.Checkpoint(model=...) would follow (lib.train.model_variables). The graphs are
    traced under PORTABLE_PLAN, lib.fast_ops' OpPlan defaults (TensorFlow's own ops, dilated
    convolutions by space-to-batch), so that the export runs on any device whatever plan
    the model was trained under; the 3D network keeps the layout it was built in (depth-first
    or not, a property of the model, not of the trace), which computes the same function.

    ``path/export.json`` describes the network, the signatures' shapes, N_CLASS, CLASS_NAMES,
    the checkpoint (config["TEST_MODEL"], if set) and ``preparation`` (how scans must be
    prepared, e.g. lib.predict.recorded_preparation; may be None), so that a user knows how
    to make the inputs.

    A ``path`` that exists and is not an empty folder is refused (DataError); the export is
    written to a temporary sibling folder and renamed into place at the end, so a failure
    leaves nothing half-written at ``path``.
    """
    path = os.path.abspath(path)
    refuse_existing(path)
    kind = _network_kind(model, config)
    shape = _example_shape(kind, config)
    spec = tf.TensorSpec([None, *shape], tf.float32, name=INPUT_NAME)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".partial-{os.getpid()}-{name}-", dir=parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would stay on the renamed export
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)  # every variable of model.variables, whether an endpoint uses it

        def endpoint(modality):
            def serve(x):
                logits = tf.cast(model(x, modalities=(modality,), training=False), tf.float32)
                return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}
            return serve

        # Tracing happens in add_endpoint/write_out: both under the portable plan. The plan
        # is read while a layer is called, so a model built under another plan traces fine.
        with use_plan(PORTABLE_PLAN):
            for modality in SIGNATURES:
                archive.add_endpoint(modality, endpoint(modality), input_signature=[spec])
            archive.write_out(tmp, verbose=False)
        write_json(os.path.join(tmp, EXPORT_JSON),
                   _description(model, config, kind, shape, preparation), allow_nan=False)
        try:
            os.replace(tmp, path)  # over an empty folder only: a non-empty one raises
        except OSError as err:
            raise DataError(f"{path}: cannot move the export into place ({err.strerror}); "
                            "nothing was overwritten") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"exported {type(model).__name__} ({kind}, signatures {', '.join(SIGNATURES)}, "
        f"input [N, {', '.join(map(str, shape))}]) to {path}")
    return path

