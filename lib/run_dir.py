"""The run folder OUTPUT_PATH: create it, compare a saved run's settings, resume or move
it aside, and trim its log to the restored step.

A run folder holds config.json (the resolved settings, written first), checkpoints/,
logs/ (TensorBoard), train.log and log.jsonl (lib/train.py), and results/ (lib/evaluate).
Nothing in it is ever deleted: a run of other settings is refused, resumed with RESUME,
or moved aside to ``OUTPUT_PATH.old-<time>`` with START_OVER.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import time

from lib.config import ConfigError, load_config, save_config
from lib.files import write_text

CONFIG_FILE = "config.json"
LOCK_SUFFIX = ".lock"  # OUTPUT_PATH.lock, beside the run folder: held while a run trains
LOG_FILE = "log.jsonl"
# Settings added after runs were saved: a saved config without one had this value.
LATER_KEYS = {"KD_CLASSES": "all", "OUT_OF_RANGE_LABELS": "error", "ADAM_EPSILON": 1e-7,
              "LABEL_RESAMPLE": "none", "LR_SCHEDULE": "step", "FOREGROUND_SHARE": 0.0}
# Settings that change neither what a run trains nor what its test reports.
BOOKKEEPING_KEYS = {"PHASE", "TENSORBOARD_PORT", "DISPLAY_STEP", "CHECKPOINT_SPACE",
                    "SUMMARY_STEP", "KEEP_CHECKPOINTS", "PROGRESS", "RESUME", "START_OVER",
                    "CHECK_DATA", "OUTPUT_PATH", "TEST_MODEL", "TEST_BATCH", "PRESET",
                    "CPU_DEVICES", "CHECKPOINT_MINUTES", "PREDICT_INPUT", "PREDICT_OUTPUT",
                    "PREDICT_MODALITY", "PREDICT_DATASET_JSON", "PREDICT_OVERWRITE",
                    "PREDICT_PROBABILITIES", "EXPORT_PATH"}
# Settings that may change between a run and its resumption without changing the run.
RESUMABLE_KEYS = BOOKKEEPING_KEYS | {
    "NUM_STEPS", "SOURCE_TEST_LIST", "TARGET_TEST_LIST", "TEST_STRIDE", "TEST_FLIP", "TEST_MIRROR",
    "LABEL_RESAMPLE", "PAPER_PROTOCOL", "NPZ_FLIP",  # NPZ_FLIP: the test flip of runs saved before TEST_FLIP
    "DATASET_JSON_SOURCE", "DATASET_JSON_TARGET", "SOURCE_VAL_LIST", "TARGET_VAL_LIST",
    "DISTRIBUTE", "LATERAL_PAIRS", "TEST_CHECKPOINT", "POSTPROCESS", "SOURCE_VAL_VOLUME_LIST",
    "TARGET_VAL_VOLUME_LIST", "VALIDATE_EVERY"}
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


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """Prefix of the newest complete checkpoint ``model-N`` in ``checkpoint_dir``, or None.

    Found from the files, not from the ``checkpoint`` state file, which a process killed
    mid-save may have left naming a checkpoint whose files are not all written: a
    checkpoint counts when its index (written last) and every data shard it names exist
    and the index reads.
    """
    import tensorflow as tf

    steps = []
    for name in os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []:
        stem, _, number = name[:-len(".index")].rpartition("-")
        if name.endswith(".index") and stem == "model" and number.isdigit():
            steps.append(int(number))
    for step in sorted(steps, reverse=True):
        prefix = os.path.join(checkpoint_dir, f"model-{step}")
        shards = glob.glob(glob.escape(prefix) + ".data-*-of-*")
        count = shards[0].rsplit("-of-", 1)[1] if shards else ""
        if not count.isdigit() or len(shards) != int(count):
            continue  # half written: the one before it is the latest
        try:
            tf.train.load_checkpoint(prefix)
        except (tf.errors.OpError, ValueError):
            continue
        return prefix
    return None


def latest_step(output_path: str) -> int:
    """Step of the latest complete checkpoint of a run (0 when there is none)."""
    prefix = latest_checkpoint(os.path.join(output_path, "checkpoints"))
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """``OUTPUT_PATH.lock`` (the pid and host of this process), held while a run trains.

    ``acquire`` refuses with a ConfigError while another process holds it. A lock left by
    a process that is gone (killed) is taken over, and the log says so; one of another host
    cannot be checked and is refused, naming the file to delete. The file sits beside the
    run folder, so START_OVER can move the folder aside while it is held.
    """

    def __init__(self, output_path: str):
        self.output_path = output_path
        self.path = output_path.rstrip(os.sep) + LOCK_SUFFIX
        self.held = False

    def acquire(self, logger=None) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_stale(me["host"], logger)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(me, handle)
            self.held = True
            return
        raise ConfigError(f"{self.output_path}: cannot take the lock {self.path}")

    def _take_over_stale(self, host_here: str, logger) -> None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                holder = json.load(handle)
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            pid, host = None, None  # unreadable: its writer was killed mid-write
        if host is not None and host != host_here:
            raise ConfigError(f"{self.output_path}: locked by pid {pid} on host {host} "
                              f"({self.path}); if that run is over, delete the file")
        if pid is not None and _alive(pid):
            raise ConfigError(f"{self.output_path}: another run (pid {pid}) is training "
                              "here; wait for it to end or use another OUTPUT_PATH")
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        if logger is not None:
            logger.info(f"{self.path}: took over the lock of pid {pid}, which is gone")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            self.held = False
