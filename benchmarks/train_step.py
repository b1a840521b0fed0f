"""Time real training steps of the project's own model, loss and optimizer on random data.

    python benchmarks/train_step.py --model=2d --image_size=128 --batch_size=4 \
        --feature_base=16 --precision=bf16 --steps=10 --warmup=3
    python benchmarks/train_step.py --model=3d --patch=128,128,8 --batch_size=1 --precision=bf16

Prints ONE JSON line. ``gflop_per_step`` is counted from the convolution shapes of one
forward pass of both modalities (2 x multiply-adds of every convolution, transposed ones
included), times 3 for forward + backward. ``peak_tflops`` is the best rate this same
process reaches, right before the timing, on large dense work of the same precision: the
maximum over (a) a 4096x4096x4096 matrix product and (b) a 3x3 convolution of
[8, 64, 64, 256] -> 256 channels, each run 5 times after a warm-up, best run taken.
``mfu`` = achieved_tflops / peak_tflops.

How close to the machine's limit: ``conv_only_s`` is what the step would take if it did
nothing but its convolutions, each timed alone at the rate its kernels reach on its shapes
(conv_only_seconds); ``conv_only_mfu`` is the MFU of that floor, and ``conv_share`` =
conv_only_s / step_time_s_median is the part of the step the convolutions account for
(an estimate: in the step, ops of both kinds share the cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: python benchmarks/train_step.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import lib  # noqa: E402,F401  first: it sets the oneDNN default before TensorFlow loads
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from lib import fast_ops  # noqa: E402
from lib.layers import MODALITIES, ModalityConv  # noqa: E402
from lib.runtime import setup_runtime  # noqa: E402

DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}


def network_convolutions(model, x, modalities=MODALITIES) -> list:
    """(ModalityConv, its Keras branch, input tensor, FLOPs) of every convolution that one
    forward pass of ``x`` computes; FLOPs are 2 x multiply-adds."""
    calls = []
    original = ModalityConv._apply

    def recording(self, layer, inp, training):
        out = original(self, layer, inp, training)
        k = np.prod(layer.kernel.shape)
        spatial = inp.shape[1:-1] if self.transpose else out.shape[1:-1]
        calls.append((self, layer, inp,
                      2.0 * float(inp.shape[0]) * float(np.prod(spatial)) * float(k)))
        return out

    ModalityConv._apply = recording
    try:
        model(x, modalities=modalities, training=False)
    finally:
        ModalityConv._apply = original
    return calls


def conv_flops(model, x, modalities=MODALITIES) -> float:
    """FLOPs (2 x MACs) of every convolution in one forward pass of ``x``."""
    return sum(flops for *_, flops in network_convolutions(model, x, modalities))


def conv_only_seconds(calls) -> float:
    """Seconds a training step spends if it did nothing but its convolutions.

    Each convolution of ``calls`` (network_convolutions) is timed alone, as the step
    computes it (the layer's own code: kernel cast, forward, input and kernel gradients),
    on the input it had in the recorded forward pass, with an output gradient of ones;
    best of 5 runs after a warm-up, summed over the layers. Everything else the step does (batch norm, LeakyReLU, dropout,
    losses, optimizer) is left out, so this is the step time's floor at the rates the
    convolution kernels reach on these shapes.
    """
    total = 0.0
    for conv, layer, x, _ in calls:

        @tf.function
        def forward_backward(x=x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = conv._apply(layer, x, True)
            dy = tf.ones_like(y)
            return tape.gradient(y, [x, layer.kernel], output_gradients=dy)

        total += _best_time(lambda: [g.numpy() for g in forward_backward()])
    return total


def _best_time(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def peak_tflops(precision: str) -> dict:
    dtype = DTYPES[precision]
    n = 4096
    a = tf.random.normal([n, n], dtype=tf.float32)
    a = tf.cast(a, dtype)
    matmul = tf.function(lambda: tf.matmul(a, a))
    t_mm = _best_time(lambda: matmul().numpy())
    x = tf.cast(tf.random.normal([8, 64, 64, 256]), dtype)
    w = tf.cast(tf.random.normal([3, 3, 256, 256]), dtype)
    conv = tf.function(lambda: tf.nn.conv2d(x, w, 1, "SAME"))
    t_conv = _best_time(lambda: conv().numpy())
    mm = 2 * n ** 3 / t_mm / 1e12
    cv = 2 * 8 * 64 * 64 * 9 * 256 * 256 / t_conv / 1e12
    return {"peak_tflops": max(mm, cv), "peak_matmul_tflops": mm, "peak_conv_tflops": cv}


def build(args, config):
    from lib.cli import entry_module

    shape = [args.image_size] * 2 + [3] if args.model == "2d" else list(args.patch) + [1]
    return entry_module(args.model).network().build_model(config), shape


def run(args) -> dict:
    from lib.cli import entry_module
    from lib.config import defaults

    # the entry script's settings as written (custom preset), with this benchmark's changes
    config = dict(defaults(vars(entry_module(args.model))), N_CLASS=args.n_class,
                  CLASS_NAMES=[f"class{c}" for c in range(1, args.n_class)],
                  FEATURE_BASE=args.feature_base, SCHEME=args.scheme, SEED=0,
                  PRECISION=args.precision, LEARNING_RATE=1e-3, CHECKPOINT_SPACE=10 ** 9,
                  DISPLAY_STEP=10 ** 9, NUM_STEPS=10 ** 9, XLA=args.xla)
    precision = setup_runtime(config)
    plan = fast_ops.active_plan()
    if args.plan:  # --plan=field=value,...: measure another path on this device
        plan = dataclasses.replace(plan, **dict(_plan_value(item) for item in args.plan))
    with fast_ops.use_plan(plan):
        return _timed(args, config, precision, plan)


def _timed(args, config, precision, plan) -> dict:
    peak = peak_tflops(precision)
    model, shape = build(args, config)
    from lib.train import Trainer

    workdir = tempfile.mkdtemp(prefix="ummkd_bench_")  # nothing is saved; removed at the end
    trainer = Trainer(config, model, workdir, logger=_Quiet())
    rng = np.random.default_rng(0)
    b = args.batch_size
    images = {m: tf.constant(rng.normal(size=[b] + shape), tf.float32) for m in MODALITIES}
    labels = {m: tf.constant(rng.integers(0, args.n_class, [b] + shape[:-1]), tf.int32)
              for m in MODALITIES}
    x = tf.concat([images[m] for m in MODALITIES], 0)
    calls = network_convolutions(model, x)
    flops = 3 * sum(f for *_, f in calls)
    for _ in range(args.warmup):
        float(trainer.train_step(images, labels)["total"])
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        float(trainer.train_step(images, labels)["total"])
        times.append(time.perf_counter() - t)
    trainer.close()
    shutil.rmtree(workdir, ignore_errors=True)
    conv_only = conv_only_seconds(calls)
    median = statistics.median(times)
    achieved = flops / median / 1e12
    out = {"model": args.model, "batch_size": b, "feature_base": args.feature_base,
           "precision": precision, "xla": bool(args.xla), "steps": args.steps,
           "step_time_s_median": median, "step_time_s_min": min(times),
           "images_per_s": 2 * b / median, "gflop_per_step": flops / 1e9,
           "achieved_tflops": achieved, **peak, "mfu": achieved / peak["peak_tflops"],
           "conv_only_s": conv_only, "conv_only_mfu": flops / conv_only / 1e12 /
           peak["peak_tflops"], "conv_share": conv_only / median,
           "traces": trainer.traces, "cpu": _cpu_name(), "threads": os.cpu_count(),
           "onednn": fast_ops.onednn_enabled(), "plan": dataclasses.asdict(plan)}
    if args.model == "2d":
        out["image_size"] = args.image_size
    else:
        out["patch"] = list(args.patch)
    return out


def _plan_value(item: str):
    """"field=value" of an OpPlan field, the value as the field's type."""
    key, _, value = item.partition("=")
    if key == "depth_first_3d":
        return key, value.lower() in ("1", "true", "yes")
    return key, value


class _Quiet:
    def info(self, *_):
        pass


def _cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("2d", "3d"), default="2d")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--patch", type=lambda s: [int(v) for v in s.split(",")],
                   default=[128, 128, 8])
    p.add_argument("--batch_size", type=int, default=4, help="per modality")
    p.add_argument("--feature_base", type=int, default=16)
    p.add_argument("--n_class", type=int, default=5)
    p.add_argument("--scheme", default="ummkd")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--xla", action="store_true", help="compile the step with XLA")
    p.add_argument("--plan", type=lambda s: [v for v in s.split(",") if v], default=[],
                   help="OpPlan fields to change, e.g. dilated_conv=space_to_batch,"
                        "wide_kernel_grad=native (lib/fast_ops.py)")
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(run(parse())))
