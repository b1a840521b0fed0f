"""The run folder OUTPUT_PATH: create it, compare a saved run's settings, resume or move
it aside, and trim its log to the restored step.

A run folder holds config.json (the resolved settings, written first), checkpoints/,
logs/ (TensorBoard), train.log and log.jsonl (lib/train.py), and results/ (lib/evaluate).
Nothing in it is ever deleted: a run of other settings is refused, resumed with RESUME,
or moved aside to ``OUTPUT_PATH.old-<time>`` with START_OVER.
"""
from __future__ import annotations

import json
import os
import time

from lib.config import ConfigError, load_config, save_config
from lib.files import write_text

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
# Settings added after runs were saved: a saved config without one had this value.
LATER_KEYS = {"KD_CLASSES": "all", "OUT_OF_RANGE_LABELS": "error", "ADAM_EPSILON": 1e-7}
# Settings that change neither what a run trains nor what its test reports.
BOOKKEEPING_KEYS = {"PHASE", "TENSORBOARD_PORT", "DISPLAY_STEP", "CHECKPOINT_SPACE",
                    "SUMMARY_STEP", "KEEP_CHECKPOINTS", "PROGRESS", "RESUME", "START_OVER",
                    "CHECK_DATA", "OUTPUT_PATH", "TEST_MODEL", "TEST_BATCH", "PRESET",
                    "CPU_DEVICES"}
# Settings that may change between a run and its resumption without changing the run.
RESUMABLE_KEYS = BOOKKEEPING_KEYS | {
    "NUM_STEPS", "SOURCE_TEST_LIST", "TARGET_TEST_LIST", "TEST_STRIDE", "TEST_FLIP",
    "PAPER_PROTOCOL", "NPZ_FLIP",  # NPZ_FLIP: the test flip of runs saved before TEST_FLIP
    "DATASET_JSON_SOURCE", "DATASET_JSON_TARGET", "SOURCE_VAL_LIST", "TARGET_VAL_LIST",
    "DISTRIBUTE"}
# Settings that define the network: a checkpoint only fits a network with the same ones
# (and with dropout on or off alike: see network_differences).
NETWORK_KEYS = ("NETWORK", "N_CLASS", "FEATURE_BASE", "SCHEME")


def config_differences(saved: dict, config: dict, keys=None) -> list[str]:
    """Human-readable differences between two configurations: of ``keys``, or of every key
    but RESUMABLE_KEYS."""
    names = keys if keys is not None else sorted((set(saved) | set(config)) - RESUMABLE_KEYS)
    return [f"{key}={saved.get(key, LATER_KEYS.get(key))!r} there, {config.get(key)!r} now"
            for key in names if saved.get(key, LATER_KEYS.get(key)) != config.get(key)]


def network_differences(saved: dict, config: dict) -> list[str]:
    """The differences that make a checkpoint not fit: NETWORK_KEYS, and DROPOUT switched on
    or off (a dropout layer owns a seed-generator variable, and checkpoints list the
    variables by position); another dropout rate is the same network."""
    diffs = config_differences(saved, config, NETWORK_KEYS)
    if bool(saved.get("DROPOUT")) != bool(config.get("DROPOUT")):
        diffs.append(f"DROPOUT={saved.get('DROPOUT')!r} there, {config.get('DROPOUT')!r} now")
    return diffs


def check_output(config: dict, output_path: str) -> str:
    """What to do with OUTPUT_PATH, without touching it: "new", "resume" or "start_over".

    A run of the same configuration is resumed; a run of a different one is refused
    unless START_OVER (the old run will be moved aside, never deleted) or RESUME (continue
    it with the new settings, same network only) is set.
    """
    path = os.path.join(output_path, CONFIG_FILE)
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(output_path, "checkpoints")) and not config["START_OVER"]:
            raise ConfigError(f"{output_path}: holds checkpoints but no {CONFIG_FILE}; set "
                              "--start_over=true to move them aside and start again")
        return "start_over" if os.path.isdir(output_path) and config["START_OVER"] else "new"
    saved = load_config(path)
    diffs = config_differences(saved, config)
    if config["START_OVER"]:
        return "start_over"
    if diffs and not config["RESUME"]:
        raise ConfigError(f"{output_path}: holds a run of a different configuration ("
                          + "; ".join(diffs) + "); set --resume=true to continue it or "
                          "--start_over=true to move it aside and start again")
    net = network_differences(saved, config)
    if net:
        raise ConfigError(f"{output_path}: cannot resume a different network ("
                          + "; ".join(net) + "); set --start_over=true or use another "
                          "OUTPUT_PATH")
    return "resume"


def latest_step(output_path: str) -> int:
    """Step of the latest complete checkpoint of a run (0 when there is none)."""
    import tensorflow as tf

    prefix = tf.train.latest_checkpoint(os.path.join(output_path, "checkpoints"))
    return int(prefix.rsplit("-", 1)[1]) if prefix else 0


def start_output(config: dict, output_path: str, action: str, logger) -> None:
    """Carry out check_output's decision and save the configuration (the first write)."""
    if action == "start_over" and os.path.isdir(output_path):
        moved = f"{output_path.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(output_path, moved)
        logger.info(f"START_OVER: moved the previous run to {moved}")
    save_config(config, os.path.join(output_path, CONFIG_FILE))


def trim_log(path: str, step: int) -> int:
    """Drop the lines of a JSON-lines log whose "step" is after ``step``; returns how many.

    A run killed between checkpoints has logged steps that its resumed run trains and logs
    again. An unreadable last line without its newline (cut off by the kill) goes too, so
    that the next line is not appended to it; other lines stay as they are. Rewritten
    atomically, and only when something is dropped.
    """
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.readlines()

    def after(line: str, last: bool) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return last and not line.endswith("\n")
        value = record.get("step") if isinstance(record, dict) else None
        return isinstance(value, (int, float)) and value > step

    keep = [line for i, line in enumerate(lines) if not after(line, i == len(lines) - 1)]
    if len(keep) == len(lines):
        return 0
    write_text(path, "".join(keep))
    return len(lines) - len(keep)
