"""Steps per second of the training loop (lib.train.Trainer.fit) against the same loop with a
host read of the loss and the step after every step (the loop before it became host-free).

    python benchmarks/train_loop.py --steps=60 --repeats=3

Both run in this process on the same Trainer, alternating (A, B, A, B, ...), on endless
batches of random data in the demo's 2D shapes (--image_size, --feature_base,
--batch_size); --summary_step is the loop's SUMMARY_STEP (where it reads the device). On a
CPU the two should match (its kernels run as they are called); on a GPU the host-free loop
lets the host queue steps ahead of the device. Prints ONE JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: python benchmarks/train_loop.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import lib  # noqa: E402,F401  first: it sets the oneDNN default before TensorFlow loads
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from lib import settings  # noqa: E402
from lib.config import defaults  # noqa: E402
from lib.fast_ops import active_plan  # noqa: E402
from lib.runtime import get_logger, setup_runtime  # noqa: E402
from lib.train import Trainer  # noqa: E402
from model_2d import build_model  # noqa: E402


def batches(size, batch):
    rng = np.random.default_rng(0)
    x = {m: tf.constant(rng.normal(size=[batch, size, size, 3]), tf.float32) for m in ("mr", "ct")}
    y = {m: tf.constant(rng.integers(0, 5, [batch, size, size]), tf.uint8) for m in ("mr", "ct")}
    while True:
        yield x, y


def timed_fit(trainer, steps, reads_every_step):
    real = trainer.train_step
    if reads_every_step:  # the loop as it was: loss and step read to the host per step
        def step(images, labels):
            terms = real(images, labels)
            float(terms["total"])
            int(trainer.optimizer.iterations.numpy())
            return terms
        trainer.train_step = step
    start = int(trainer.optimizer.iterations.numpy())
    t = time.perf_counter()
    trainer.fit(batches(trainer.config["IMAGE_SIZE"], trainer.config["BATCH_SIZE"]),
                num_steps=start + steps)
    elapsed = time.perf_counter() - t
    trainer.train_step = real
    return steps / elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--feature_base", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--summary_step", type=int, default=10)
    args = p.parse_args(argv)
    config = dict(defaults(vars(settings)), NETWORK="dilated_resnet_2d", N_CLASS=5,
                  CLASS_NAMES=["a", "b", "c", "d"], IMAGE_SIZE=args.image_size,
                  FEATURE_BASE=args.feature_base, DROPOUT=0.25, BATCH_SIZE=args.batch_size,
                  LEARNING_RATE=1e-3, LR_SCHEDULE="step", LR_DECAY_STEPS=1000,
                  SUMMARY_STEP=args.summary_step,
                  DISPLAY_STEP=10 ** 9, CHECKPOINT_SPACE=10 ** 9, PROGRESS=False,
                  PRECISION="fp32")
    precision = setup_runtime(config)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, build_model(config), out, get_logger(None, "bench"))
        trainer.logger.disabled = True
        timed_fit(trainer, 5, False)  # warm-up: tracing
        rates = {"host_free": [], "read_every_step": []}
        for _ in range(args.repeats):
            rates["host_free"].append(timed_fit(trainer, args.steps, False))
            rates["read_every_step"].append(timed_fit(trainer, args.steps, True))
    print(json.dumps({
        "steps_per_s": {k: round(float(np.median(v)), 3) for k, v in rates.items()},
        "all": {k: [round(r, 3) for r in v] for k, v in rates.items()},
        "ratio_host_free": round(float(np.median(rates["host_free"])
                                       / np.median(rates["read_every_step"])), 3),
        "config": {k: config[k] for k in ("IMAGE_SIZE", "FEATURE_BASE", "BATCH_SIZE",
                                          "SUMMARY_STEP")},
        "precision": precision, "plan": active_plan().describe(),
        "tensorflow": tf.__version__}))


if __name__ == "__main__":
    main()
