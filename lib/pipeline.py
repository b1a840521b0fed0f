"""``train_and_evaluate(config, network)``: the whole run behind every entry script.

The entry scripts (main_combine.py for 2D, 3d_implementation/main.py and test.py for 3D)
only hold their settings and a ``Network`` description: how to build the model, how to
make the training batches and how to predict a test volume. Everything else (output
folder checks, checkpoints and resuming, the training loop, the test phase) lives here and
is the same for both.

With DISTRIBUTE set, the model is built and trained under the tf.distribute strategy
(lib/distribute.py); every worker trains, only the chief writes OUTPUT_PATH and runs the
test phase.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import keras
import tensorflow as tf

from lib.config import ConfigError, load_config, validate
from lib.data import compact_batches
from lib.distribute import distribute_dataset, is_chief, make_strategy
from lib.fast_ops import active_plan
from lib.runtime import Hardware, get_logger, input_device, setup_runtime
from lib.run_dir import (CONFIG_FILE, LOG_FILE, RunLock, check_output, latest_checkpoint,
                         latest_step, network_differences, start_output)
from lib.settings import kd_weight
from lib.train import Trainer, TrainingError, first_batch, model_variables
from lib.validation import (VolumeValidator, best_checkpoint, load_validation_volumes,
                            validation_lists)

MODALITY_LISTS = {"mr": ("SOURCE_TRAIN_LIST", "SOURCE_VAL_LIST", "SOURCE_TEST_LIST"),
                  "ct": ("TARGET_TRAIN_LIST", "TARGET_VAL_LIST", "TARGET_TEST_LIST")}


@dataclass
class Network:
    """What differs between the 2D and the 3D variant."""
    name: str
    build_model: Callable        # config -> built Keras model
    train_datasets: Callable     # (config, {m: train list}, {m: val list}, start step)
                                 # -> (train, val) datasets, resumable at the start step
    predictor: Callable          # (model, config) -> predict(modality, image_hwd,
                                 # probabilities=False) -> labels [H, W, D] (or [H, W, D, C])
    prepare_data: Callable | None = None  # config -> None: create demo data if needed
    paper_coverage: Callable | None = None  # (config, depth) -> [D] bool: the slices the
                                 # original test predicts (PAPER_PROTOCOL); None: all


PATH_KEYS = ("TEST_MODEL", "PREDICT_INPUT", "PREDICT_OUTPUT", "PREDICT_DATASET_JSON",
             "EXPORT_PATH")


def resolve_paths(config: dict, root: str) -> dict:
    """Relative paths in the settings are relative to the repository root."""
    def absolute(value):
        return value if os.path.isabs(value) else os.path.normpath(os.path.join(root, value))

    out = dict(config)
    for key, value in config.items():
        if not (key.endswith("_LIST") or key.endswith("_PATH") or key in PATH_KEYS):
            continue
        if isinstance(value, str) and value:
            out[key] = absolute(value)
        elif isinstance(value, list):
            out[key] = [absolute(v) for v in value]
    return out


def checkpoint_to_test(config: dict, prefix: str | None, output_path: str) -> str:
    """The checkpoint prefix to test or predict with, checked before any model is built: it
    exists and was saved with this network. Without ``prefix`` (TEST_MODEL): the run's best
    on its validation volumes with TEST_CHECKPOINT "best" (lib/validation.py), else, or when
    the run validated on none, its latest."""
    if not prefix:
        checkpoints = os.path.join(output_path, "checkpoints")
        if config["TEST_CHECKPOINT"] == "best":
            prefix = best_checkpoint(checkpoints)
        prefix = prefix or latest_checkpoint(checkpoints)
        if not prefix:
            raise ConfigError(f"{output_path}: no checkpoint to test; train first or set "
                              "--test_model=PREFIX")
    if not os.path.exists(prefix + ".index"):
        raise ConfigError(f"TEST_MODEL: checkpoint {prefix} does not exist "
                          f"(no {os.path.basename(prefix)}.index)")
    saved_cfg = os.path.join(os.path.dirname(os.path.dirname(prefix)), CONFIG_FILE)
    if os.path.exists(saved_cfg):
        diffs = network_differences(load_config(saved_cfg), config)
        if diffs:
            raise ConfigError(f"TEST_MODEL: {prefix} was saved with another network: "
                              + "; ".join(diffs))
    return prefix


def training_dataset_json(config: dict, modality: str) -> str | None:
    """The dataset.json that says how the run's ``modality`` training data were prepared:
    PREDICT_DATASET_JSON, else the one data/prepare.py wrote beside the training list; None
    when there is none (data prepared elsewhere, such as the released TFRecords)."""
    if config["PREDICT_DATASET_JSON"]:
        return config["PREDICT_DATASET_JSON"]
    path = os.path.join(os.path.dirname(config[MODALITY_LISTS[modality][0]]), "dataset.json")
    return path if os.path.isfile(path) else None


def _restore_for_test(model, config: dict, prefix: str | None, output_path: str, logger,
                      action: str = "testing"):
    """Restore the model weights of a checkpoint prefix (default: the run's latest)."""
    prefix = checkpoint_to_test(config, prefix, output_path)
    status = tf.train.Checkpoint(model=model_variables(model)).restore(prefix).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as err:
        raise ConfigError(f"TEST_MODEL: {prefix} does not match this network ({err})") from None
    logger.info(f"{action} checkpoint {prefix}")
    return prefix


def train_and_evaluate(config: dict, network: Network) -> dict | None:
    """Train and/or test as PHASE says; returns the metrics.json content of a test phase.

    A training run holds OUTPUT_PATH's lock (lib.run_dir.RunLock) from before its first
    look at the folder until it returns, so a second run on it is refused."""
    validate(config)  # before anything is written (lib/cli.py checked already)
    lock = RunLock(config["OUTPUT_PATH"])
    try:
        return _run(config, network, lock)
    finally:
        lock.release()


def _run(config: dict, network: Network, lock: RunLock) -> dict | None:
    phase, output_path = config["PHASE"], config["OUTPUT_PATH"]
    strategy = make_strategy(config)  # first: it may configure the devices
    chief = is_chief(strategy)
    hardware = Hardware.detect()
    precision = setup_runtime(config, hardware)
    if config["PRESET"] == "paper" and not hardware.gpus and phase != "test":
        get_logger(None).warning("warning: the paper preset is about to train on the CPU (no "
                                 "GPU visible to TensorFlow): expect days; see README, "
                                 "Training on GPUs")
    if phase == "test":  # a wrong checkpoint is reported before data or a model are made
        checkpoint_to_test(config, config["TEST_MODEL"] or None, output_path)
    if phase == "predict":
        return _predict(config, network, strategy)
    if phase == "export":
        return _export(config, network, strategy)
    if network.prepare_data is not None:
        network.prepare_data(config)
    lists = {m: {k: config[key] for k, key in zip(("train", "val", "test"), keys)}
             for m, keys in MODALITY_LISTS.items()}
    if phase in ("test", "train_test"):  # fail before training, not after it
        from lib.data import check_list_files
        from lib.evaluate import count_test_labels, load_test_volumes
        for m in lists:
            check_list_files(lists[m]["test"])
            if phase == "train_test" and config["OUT_OF_RANGE_LABELS"] == "error":
                volumes = [v for v, _ in load_test_volumes(
                    lists[m]["test"], label_resample=config["LABEL_RESAMPLE"])]
                count_test_labels(volumes, config["N_CLASS"]).apply("error",
                                                                    f"{m} test volumes")
    training = phase in ("train", "train_test")
    if training and chief:  # multi-worker runs lock once, on the chief
        lock.acquire(get_logger(None))
    # Everything that can be wrong is checked before the first write to OUTPUT_PATH.
    action = check_output(config, output_path) if training else None
    logger = get_logger(None)
    logger.info(f"{network.name}: preset {config['PRESET']}, scheme {config['SCHEME']}, "
                f"precision {precision}, output {output_path}")
    device = input_device(hardware, strategy) if training else None
    logger.info(f"devices: {hardware.describe()}; ops {active_plan().describe()}")
    logger.info(f"fast paths: precision {precision}"
                f"{' (dynamic loss scaling)' if precision == 'fp16' else ''}, XLA "
                f"{'on' if config['XLA'] else 'off'}, training batches "
                + (f"prefetched to {device}" if device else
                   "prefetched to each replica's device" if strategy.num_replicas_in_sync > 1
                   else "on the host") + ", labels uint8 in transit")
    if config["DISTRIBUTE"]:
        logger.info(f"DISTRIBUTE={config['DISTRIBUTE']}: {strategy.num_replicas_in_sync} "
                    f"replicas, {config['BATCH_SIZE'] // strategy.num_replicas_in_sync} "
                    f"examples per modality each, synchronised BN {bool(config['SYNC_BN'])}"
                    + ("" if chief else "; this worker writes nothing to OUTPUT_PATH"))
    if training:  # before the model is built (which takes a while at the paper's size)
        from lib.data import check_list_files
        for m in lists:
            check_list_files(lists[m]["train"])
    with strategy.scope():  # variables mirrored on every replica
        model = network.build_model(config)
    n_params = sum(int(v.shape.num_elements()) for v in model.trainable_variables)
    logger.info(f"scheme {config['SCHEME']}: {n_params:,} trainable parameters, "
                f"KD weight {kd_weight(config):g}")
    checkpoint = config["TEST_MODEL"] or None
    if training:
        start = latest_step(output_path) if action == "resume" else 0
        train, val = network.train_datasets(
            config, {m: lists[m]["train"] for m in lists},
            {m: lists[m]["val"] for m in lists if lists[m]["val"]}, start)
        dtype = keras.mixed_precision.dtype_policy().compute_dtype
        train = distribute_dataset(strategy, compact_batches(train, dtype, config["N_CLASS"]),
                                   device)
        val = (distribute_dataset(strategy, compact_batches(val, dtype, config["N_CLASS"]))
               if val is not None else None)
        train_iter, batch = first_batch(train)
        validator = None
        if validation_lists(config):  # read (and checked) before anything is written
            validator = VolumeValidator(network.predictor(model, config),
                                        load_validation_volumes(config), config["N_CLASS"])
        if chief:
            start_output(config, output_path, action, logger)
            logger = get_logger(output_path)
        trainer = Trainer(config, model, output_path, logger, strategy, validator)
        if trainer.restore() != start:
            raise TrainingError(f"{output_path}: restored step {trainer.step}, expected {start}")
        trainer.fit(train_iter, val, first_batch=batch)
    if phase == "train" or not chief:
        return None
    checkpoint = _restore_for_test(model, config, checkpoint, output_path, logger)
    from lib.evaluate import evaluate

    predict = network.predictor(model, config)
    from lib.predict import recorded_preparation
    preparations = {m: recorded_preparation(found) for m in lists
                    if (found := training_dataset_json(config, m))}
    coverage = None
    if network.paper_coverage is not None:
        coverage = lambda depth: network.paper_coverage(config, depth)
    post = postprocessing(config, network, model, checkpoint, output_path, logger.info,
                          choose=True)
    return evaluate(predict, {m: lists[m]["test"] for m in lists}, config["CLASS_NAMES"],
                    output_path, checkpoint, log=logger.info,
                    log_path=os.path.join(output_path, LOG_FILE), flip=config["TEST_FLIP"],
                    out_of_range=config["OUT_OF_RANGE_LABELS"],
                    paper_protocol=config["PAPER_PROTOCOL"], coverage=coverage,
                    preparations=preparations, progress=config["PROGRESS"],
                    label_resample=config["LABEL_RESAMPLE"], postprocess=post)


def postprocessing(config: dict, network: Network, model, checkpoint: str, output_path: str,
                   log, choose: bool = False) -> dict:
    """{modality: labels [H, W, D] -> labels}: the largest-component rule of
    lib/postprocess.py for the restored ``checkpoint`` (POSTPROCESS). With ``choose`` (the
    test phase) and validation volumes, it is chosen on them now, per modality, and written
    to the run folder (postprocessing_<modality>.json, with the checkpoint's name);
    otherwise (predict, or no validation volumes) the choice recorded there for this
    checkpoint is used, and none when there is none."""
    import functools

    from lib import postprocess

    if not config["POSTPROCESS"]:
        return {}
    name = os.path.relpath(checkpoint, os.path.join(output_path, "checkpoints"))
    path = lambda m: os.path.join(output_path, postprocess.CHOICE_FILE.format(modality=m))
    choices = {}
    if choose and validation_lists(config):
        validator = VolumeValidator(network.predictor(model, config),
                                    load_validation_volumes(config), config["N_CLASS"])
        predictions, truths = validator()["predictions"], validator.truths()
        for m in predictions:
            choices[m] = {**postprocess.choose(predictions[m], truths[m], config["N_CLASS"]),
                          "checkpoint": name}
            postprocess.save_choice(path(m), choices[m])
    else:
        for m in MODALITY_LISTS:
            found = postprocess.load_choice(path(m))
            if found is not None and found.get("checkpoint") == name:
                choices[m] = found
    names = dict(enumerate(config["CLASS_NAMES"], start=1))
    for m, choice in choices.items():
        log(f"post-processing {m} ({name}, chosen on {choice.get('cases', '?')} validation "
            f"volumes): largest connected component of "
            + (", ".join(names[c] for c in choice["keep_largest"]) or "no class"))
    return {m: functools.partial(postprocess.apply, choice=c) for m, c in choices.items()}


def _predict(config: dict, network: Network, strategy) -> list[dict]:
    """PHASE "predict" (lib/predict.py): every check that needs no work first (inputs,
    outputs, checkpoint, preparation), then the model, then the scans."""
    from lib import predict

    if not config["PREDICT_INPUT"]:
        raise ConfigError("PREDICT_INPUT: no scans given; set --predict_input=SCAN[,SCAN...] "
                          "(NIfTI files, DICOM series folders or folders of either)")
    output_path, modality = config["OUTPUT_PATH"], config["PREDICT_MODALITY"]
    scans = predict.find_scans(config["PREDICT_INPUT"])
    out_dir = config["PREDICT_OUTPUT"] or os.path.join(output_path, "predictions")
    predict.check_outputs(scans, config["PREDICT_INPUT"], out_dir, config["PREDICT_OVERWRITE"])
    prefix = checkpoint_to_test(config, config["TEST_MODEL"] or None, output_path)
    dataset_json = training_dataset_json(config, modality)
    if not dataset_json:
        raise ConfigError(f"PREDICT_DATASET_JSON: how this run's {modality} training data were "
                          "prepared is unknown (no dataset.json beside "
                          f"{config[MODALITY_LISTS[modality][0]]}); give "
                          "--predict_dataset_json=PATH of a data/prepare.py run with the same "
                          "settings")
    preparation = predict.recorded_preparation(dataset_json)
    logger = get_logger(None)
    logger.info(f"{network.name}: segmenting {len(scans)} {modality} scan(s) with {prefix}; "
                f"preparation of {dataset_json} (slice axis {preparation['slice_axis']}, "
                f"{preparation['image_size']} px, centre crop "
                + (f"{preparation['crop_size_mm']:.0f} mm" if preparation["crop_size_mm"]
                   else "none (the whole plane)") + f") -> {out_dir}")
    with strategy.scope():
        model = network.build_model(config)
    _restore_for_test(model, config, prefix, output_path, logger, "segmenting with")
    post = postprocessing(config, network, model, prefix, output_path, logger.info)
    return predict.predict_scans(network.predictor(model, config), modality, scans, out_dir,
                                 preparation, config["CLASS_NAMES"], log=logger.info,
                                 progress=config["PROGRESS"],
                                 probabilities=config["PREDICT_PROBABILITIES"],
                                 postprocess=post.get(modality))


def _export(config: dict, network: Network, strategy) -> str:
    """PHASE "export" (lib/export.py): the checkpoint as a SavedModel with one signature per
    modality, at EXPORT_PATH (default OUTPUT_PATH/saved_model), with how each modality's
    scans were prepared when the run knows it."""
    from lib import export, predict

    output_path = config["OUTPUT_PATH"]
    path = config["EXPORT_PATH"] or os.path.join(output_path, "saved_model")
    export.refuse_existing(path)  # before any work
    prefix = checkpoint_to_test(config, config["TEST_MODEL"] or None, output_path)
    preparation = {m: predict.recorded_preparation(found) for m in MODALITY_LISTS
                   if (found := training_dataset_json(config, m))}
    logger = get_logger(None)
    with strategy.scope():
        model = network.build_model(config)
    _restore_for_test(model, config, prefix, output_path, logger, "exporting")
    return export.export_saved_model(model, {**config, "TEST_MODEL": prefix}, path,
                                     preparation or None, log=logger.info)
