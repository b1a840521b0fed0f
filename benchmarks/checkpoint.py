"""Seconds to write one training checkpoint (weights and Adam slots) of a network, and its size.

    python benchmarks/checkpoint.py --model=2d --feature_base=16 --saves=3

Builds the entry script's network at the paper's width (--feature_base) with the Trainer's
optimizer, writes --saves checkpoints through the Trainer (the loop's own save) and reports
the median time the loop is blocked per checkpoint and the bytes on disk. With a GPU's step
time (--step_ms) it also prints the share of a run spent writing checkpoints every
CHECKPOINT_SPACE steps, against one every CHECKPOINT_MINUTES (the paper presets' 10).
Prints ONE JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: python benchmarks/checkpoint.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import lib  # noqa: E402,F401  first: it sets the oneDNN default before TensorFlow loads
import numpy as np  # noqa: E402

from lib.cli import entry_module  # noqa: E402
from lib.config import defaults  # noqa: E402
from lib.runtime import get_logger, setup_runtime  # noqa: E402
from lib.train import Trainer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("2d", "3d"), default="2d")
    p.add_argument("--feature_base", type=int, default=16)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--step_ms", type=float, default=10.0, help="a GPU's time per step")
    p.add_argument("--minutes", type=float, default=10.0)
    args = p.parse_args(argv)
    module = entry_module(args.model)
    config = dict(defaults(vars(module)), FEATURE_BASE=args.feature_base, PRECISION="fp32",
                  KEEP_CHECKPOINTS=args.saves + 1)
    setup_runtime(config)
    model = module.network().build_model(config)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, model, out, get_logger(None, "bench"))
        trainer.logger.disabled = True
        times = []
        for k in range(1, args.saves + 1):
            t = time.perf_counter()
            path = trainer.save(k)
            times.append(time.perf_counter() - t)
        size = sum(os.path.getsize(os.path.join(out, "checkpoints", f))
                   for f in os.listdir(os.path.join(out, "checkpoints"))
                   if f.startswith(os.path.basename(path) + "."))
    seconds = float(np.median(times))
    space_s = config["CHECKPOINT_SPACE"] * args.step_ms / 1000.0
    print(json.dumps({
        "model": args.model, "feature_base": args.feature_base,
        "parameters": int(sum(int(np.prod(v.shape)) for v in model.trainable_variables)),
        "checkpoint_bytes": size, "checkpoint_mb": round(size / 2 ** 20, 1),
        "save_s": round(seconds, 3),
        "all_s": [round(t, 3) for t in times],
        "checkpoint_space": config["CHECKPOINT_SPACE"], "step_ms": args.step_ms,
        "share_writing_every_space": round(seconds / (seconds + space_s), 3),
        "share_writing_every_minutes": round(seconds / (seconds + 60 * args.minutes), 4)}))


if __name__ == "__main__":
    main()
