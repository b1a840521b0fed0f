"""Process-wide runtime settings: precision policy, op plan, determinism, logging, TensorBoard.

Call ``setup_runtime(config)`` once, before any model is built: the Keras dtype policy
applies to layers created after it is set, and the op plan (lib.fast_ops.decide) to
models built after it.
"""
from __future__ import annotations

import logging
import os
import random
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf

from lib import fast_ops
from lib.settings import CHOICES

PRECISIONS = CHOICES["PRECISION"]
_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX-512 bf16 units (read from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def gpu_has_fast_bf16() -> bool:
    """True when every visible GPU is compute capability 8.0 (Ampere) or newer."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return False
    for gpu in gpus:
        cc = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
        if tuple(cc) < (8, 0):
            return False
    return True


def resolve_precision(precision: str) -> str:
    """'auto' becomes 'bf16' where the hardware runs bfloat16 fast, else 'fp32'."""
    if precision not in PRECISIONS:
        raise ValueError(f"PRECISION: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if tf.config.list_physical_devices("GPU"):
        return "bf16" if gpu_has_fast_bf16() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def setup_runtime(config: dict) -> str:
    """Seeds, op determinism, the dtype policy and the device's op plan; returns the
    resolved precision."""
    seed = config["SEED"]
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        tf.random.set_seed(seed)
        keras.utils.set_random_seed(seed)
    if config["DETERMINISTIC"]:
        tf.config.experimental.enable_op_determinism()
    precision = resolve_precision(config["PRECISION"])
    keras.mixed_precision.set_dtype_policy(_POLICIES[precision])
    fast_ops.decide()
    return precision


def get_logger(output_path: str | None, name: str = "ummkd") -> logging.Logger:
    """A logger writing to the console and, when given, OUTPUT_PATH/train.log."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if output_path:
        os.makedirs(output_path, exist_ok=True)
        handler = logging.FileHandler(os.path.join(output_path, "train.log"), encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    return logger


def launch_tensorboard(logdir: str, port: int, logger) -> subprocess.Popen | None:
    """Start TensorBoard for ``logdir`` on 127.0.0.1:port as our own child process."""
    args = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir,
            "--host", "127.0.0.1", "--port", str(int(port))]
    try:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as err:
        logger.info(f"TensorBoard could not start ({err}); run it by hand: "
                    f"tensorboard --logdir {logdir}")
        return None
    logger.info(f"TensorBoard: http://127.0.0.1:{port}/ (logdir {logdir})")
    return proc
