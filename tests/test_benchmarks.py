"""Benchmark scripts in tiny configurations (their JSON, never their speed), and precision."""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT
from lib import losses
from lib.layers import conv_kernels

TRAIN_KEYS = {"model", "batch_size", "feature_base", "precision", "xla", "steps",
              "step_time_s_median", "step_time_s_min", "images_per_s", "gflop_per_step",
              "achieved_tflops", "peak_tflops", "mfu", "conv_only_s", "conv_only_mfu",
              "conv_share", "onednn", "plan", "cpu"}


def bench(script, *args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = [l for l in out.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, out.stdout
    return json.loads(lines[0])


def test_train_step_benchmark_2d_json_and_flop_count():
    r = bench("train_step.py", "--model=2d", "--image_size=16", "--batch_size=1",
              "--feature_base=2", "--precision=fp32", "--steps=2", "--warmup=1")
    assert TRAIN_KEYS | {"image_size"} <= set(r)
    assert r["traces"] == 1  # the step function traced once
    assert r["plan"]["device"] == ("cpu_onednn" if r["onednn"] else "cpu")  # no GPU here
    # Hand count at 16x16, f=2, n_class=5, one image per modality (2 images), forward x 3:
    # full resolution 16x16: stem 3->2 and G1 (2 convs 2->2);
    # 8x8: G2 (2->4, 4->4); 4x4: G3 (4->8, 8->8, 8->8, 8->8);
    # 2x2: G4..G9 and G10 (3x3 valid on padded 4x4 -> 2x2), then 5x5 at 16x16.
    k = 9
    macs = 256 * k * (3 * 2 + 2 * 2 * 2) + 64 * k * (2 * 4 + 4 * 4) + 16 * k * (4 * 8 + 3 * 8 * 8)
    f = 2
    g4_9 = [(4 * f, 8 * f), (8 * f, 8 * f), (8 * f, 8 * f), (8 * f, 8 * f),   # G4
            (8 * f, 16 * f)] + [(16 * f, 16 * f)] * 3 + [(16 * f, 16 * f)] * 4 + \
           [(16 * f, 32 * f)] + [(32 * f, 32 * f)] * 3 + [(32 * f, 32 * f)] * 4 + \
           [(32 * f, 32 * f)] * 2                                              # G5..G9
    macs += 4 * k * sum(a * b for a, b in g4_9)
    macs += 4 * k * 32 * f * 64 * 8 * 5 + 256 * 25 * 40 * 5
    assert r["gflop_per_step"] == pytest.approx(3 * 2 * 2 * macs / 1e9, rel=1e-9)
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / r["peak_tflops"])
    assert r["conv_only_s"] > 0
    assert r["conv_share"] == pytest.approx(r["conv_only_s"] / r["step_time_s_median"])
    assert r["conv_only_mfu"] == pytest.approx(
        r["gflop_per_step"] / 1e3 / r["conv_only_s"] / r["peak_tflops"])


def test_train_step_benchmark_3d_json():
    r = bench("train_step.py", "--model=3d", "--patch=16,16,8", "--batch_size=1",
              "--feature_base=2", "--precision=bf16", "--steps=1", "--warmup=1",
              "--plan=kernel_grad_3d=native,depth_first_3d=false")
    assert TRAIN_KEYS | {"patch"} <= set(r) and r["patch"] == [16, 16, 8]
    # the plan given on the command line is the one measured
    assert (r["plan"]["kernel_grad_3d"], r["plan"]["depth_first_3d"]) == ("native", False)


def test_input_pipeline_benchmark_json():
    r = bench("input_pipeline.py", "--slices=16", "--image_size=16", "--batch_size=4",
              "--batches=3", "--shard_size=8", "--augment")
    for layout in ("one_per_file", "sharded"):
        assert set(r[layout]) == {"pipeline_slices_per_s", "plain_read_slices_per_s", "ratio",
                                  "tf_read_file_slices_per_s", "tf_read_file_ratio",
                                  "augmented_slices_per_s",
                                  "augmented_all_transforms_slices_per_s"}
        got = r[layout]
        assert got["ratio"] == pytest.approx(
            got["pipeline_slices_per_s"] / got["plain_read_slices_per_s"])
        assert got["tf_read_file_ratio"] == pytest.approx(
            got["tf_read_file_slices_per_s"] / got["plain_read_slices_per_s"])


@pytest.mark.parametrize("model", ["2d", "3d"])
def test_inference_benchmark_json(model):
    r = bench("inference.py", f"--model={model}", "--size=16", "--depth=9", "--patch=16,16,8",
              "--feature_base=2", "--precision=fp32")
    assert {"seconds_per_volume", "gflop_per_volume", "achieved_tflops"} <= set(r)


def test_inference_benchmark_times_a_whole_scan():
    r = bench("inference.py", "--scan=20,18,5", "--size=16", "--feature_base=2",
              "--precision=fp32")
    assert r["scan"] == [20, 18, 5] and r["prepared_shape"] == [16, 16, 5]
    assert 0 < r["network_seconds_per_scan"] and 0 < r["seconds_per_scan"]


def test_bf16_and_fp32_losses_agree():
    from model_2d import DilatedResNet2D

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(4, 16, 16, 3)), tf.float32)
    y = rng.integers(0, 3, (4, 16, 16))
    totals = {}
    try:
        for policy in ("float32", "mixed_bfloat16"):
            keras.mixed_precision.set_dtype_policy(policy)
            model = DilatedResNet2D(n_class=3, feature_base=2, dropout=0.0, seed=1)
            logits = model(x, training=True)
            assert logits.dtype == (tf.float32 if policy == "float32" else tf.bfloat16)
            mr, ct = tf.split(logits, 2)
            total, terms = losses.total_loss({"mr": mr, "ct": ct}, {"mr": y[:2], "ct": y[2:]},
                                             conv_kernels(model), n_class=3)
            assert total.dtype == tf.float32
            totals[policy] = float(total)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert totals["mixed_bfloat16"] == pytest.approx(totals["float32"], rel=0.05, abs=0.02)


def test_train_loop_benchmark_json():
    r = bench("train_loop.py", "--steps=3", "--repeats=1", "--image_size=16",
              "--feature_base=2", "--batch_size=2", "--summary_step=2")
    rates = r["steps_per_s"]
    assert set(rates) == {"host_free", "read_every_step"} and min(rates.values()) > 0
    assert r["ratio_host_free"] == pytest.approx(
        rates["host_free"] / rates["read_every_step"], abs=2e-3)
    assert r["config"] == {"IMAGE_SIZE": 16, "FEATURE_BASE": 2, "BATCH_SIZE": 2,
                           "SUMMARY_STEP": 2}


def test_checkpoint_benchmark_json():
    r = bench("checkpoint.py", "--model=3d", "--feature_base=2", "--saves=1",
              "--step_ms=10", "--minutes=10")
    # weights and two Adam slots, float32: at least 3 x 4 bytes per parameter
    assert r["checkpoint_bytes"] >= 12 * r["parameters"] > 0
    s = r["save_s"]
    assert r["share_writing_every_space"] == pytest.approx(
        s / (s + r["checkpoint_space"] * 0.010), abs=1e-3)
    assert r["share_writing_every_minutes"] == pytest.approx(s / (s + 600), abs=1e-4)
