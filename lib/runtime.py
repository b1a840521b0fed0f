"""Process-wide runtime settings: precision policy, op plan, determinism, logging, TensorBoard.

Call ``setup_runtime(config)`` once, before any model is built: the Keras dtype policy
applies to layers created after it is set, and the op plan (lib.fast_ops.decide) to
models built after it.
"""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What this process trains on, as the run's decisions need it (tests inject it).

    gpus: (name, compute capability) of every visible GPU; empty on a CPU.
    cpu_bf16: the CPU has bfloat16 units (AMX or AVX-512 bf16) and this process runs
      oneDNN, the only CPU kernels that use them (on TensorFlow's own kernels the bf16 demo
      step took 3.4 s, against 0.12 s under oneDNN, on an AVX-512 bf16 EPYC).
    """
    gpus: tuple = ()
    cpu_bf16: bool = False

    @classmethod
    def detect(cls) -> "Hardware":
        gpus = []
        for gpu in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(gpu)
            gpus.append((details.get("device_name", gpu.name),
                         tuple(details.get("compute_capability", (0, 0)))))
        return cls(tuple(gpus), cpu_has_fast_bf16() and fast_ops.onednn_enabled())

    def describe(self) -> str:
        if not self.gpus:
            return (f"CPU only, no GPU visible to TensorFlow (bf16 units: "
                    f"{'yes' if self.cpu_bf16 else 'no'})")
        names = sorted({f"{n} (compute capability {c[0]}.{c[1]})" for n, c in self.gpus})
        return f"{len(self.gpus)} GPU(s): {', '.join(names)}"


def resolve_precision(precision: str, hardware: Hardware | None = None) -> str:
    """'auto' becomes what the slowest visible GPU runs fastest: 'bf16' on compute
    capability 8.0 or newer, 'fp16' (with dynamic loss scaling) on 7.x, whose tensor cores
    have no bfloat16, 'fp32' below; on a CPU 'bf16' where it has bfloat16 units, else
    'fp32'. Other values are returned as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"PRECISION: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    hardware = hardware or Hardware.detect()
    if hardware.gpus:
        lowest = min(c for _, c in hardware.gpus)
        return "bf16" if lowest >= (8, 0) else "fp16" if lowest >= (7, 0) else "fp32"
    return "bf16" if hardware.cpu_bf16 else "fp32"


def input_device(hardware: Hardware, strategy=None) -> str | None:
    """Where the training batches are prefetched: the GPU of a one-GPU run. A
    tf.distribute strategy's distributed dataset puts each replica's part on its device
    itself; on a CPU the batches are where they are made."""
    if not hardware.gpus:
        return None
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        return None
    return "/device:GPU:0"


def setup_runtime(config: dict, hardware: Hardware | None = None) -> str:
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
    precision = resolve_precision(config["PRECISION"], hardware)
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
