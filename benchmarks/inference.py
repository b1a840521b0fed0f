"""Seconds per test volume of the 2D and the 3D network, with the achieved TFLOP/s; or
seconds to segment one whole scan file as PHASE "predict" does.

    python benchmarks/inference.py --model=2d --size=256 --depth=120 --feature_base=16
    python benchmarks/inference.py --model=3d --size=256 --depth=120 --patch=256,256,8
    python benchmarks/inference.py --scan=512,512,100 --size=64 --feature_base=8

Predicts a random volume [size, size, depth] with the project's own test-phase code
(lib.evaluate: every slice in 2D, overlapping slabs in 3D) after one warm-up volume, and
counts the convolution FLOPs of the forward passes it makes. With ``--scan=X,Y,Z`` (2D): a
random CT NIfTI of that shape (0.7 x 0.7 x 2.5 mm) goes through lib.predict.predict_scans
(read, prepare to --size px over the whole plane, predict, probabilities back at the
scan's resolution, argmax, write), after one warm-up scan; the network's share is timed
apart. Prints ONE JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: python benchmarks/inference.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import lib  # noqa: E402,F401  first: it sets the oneDNN default before TensorFlow loads
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.train_step import conv_flops  # noqa: E402
from lib import evaluate  # noqa: E402
from lib.cli import entry_module  # noqa: E402
from lib.config import defaults  # noqa: E402
from lib.runtime import setup_runtime  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("2d", "3d"), default="2d")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--depth", type=int, default=120)
    p.add_argument("--patch", type=lambda s: [int(v) for v in s.split(",")], default=[256, 256, 8])
    p.add_argument("--feature_base", type=int, default=16)
    p.add_argument("--n_class", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=16, help="slices (2D) per forward pass")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="auto")
    p.add_argument("--scan", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="X,Y,Z: time one scan of this shape through PHASE predict (2D)")
    args = p.parse_args(argv)
    config = dict(defaults(vars(entry_module(args.model))), N_CLASS=args.n_class,
                  FEATURE_BASE=args.feature_base, SCHEME="ummkd", SEED=0,
                  PRECISION=args.precision)
    precision = setup_runtime(config)
    volume = np.random.default_rng(0).normal(size=(args.size, args.size, args.depth))
    model = entry_module(args.model).network().build_model(config)
    if args.scan:
        print(json.dumps({"precision": precision, **time_scan(model, args)}))
        return
    if args.model == "2d":
        fn = evaluate.make_predict_fn(model, [args.size, args.size, 3])
        predict = lambda: evaluate.predict_volume_2d(fn, "ct", volume, args.size, args.batch_size)
        flops = conv_flops(model, tf.zeros([1, args.size, args.size, 3]), ("ct",)) * args.depth
    else:
        fn = evaluate.make_predict_fn(model, [*args.patch, 1])
        predict = lambda: evaluate.predict_volume_3d(fn, "ct", volume, args.patch, args.n_class)
        ph, pw, pd = args.patch
        windows = (len(evaluate.window_starts(args.size, ph, ph // 2)) ** 2
                   * len(evaluate.window_starts(args.depth, pd, max(1, pd // 2))))
        flops = conv_flops(model, tf.zeros([1, ph, pw, pd, 1]), ("ct",)) * windows
    predict()  # warm-up: tracing and first-call costs
    t = time.perf_counter()
    predict()
    seconds = time.perf_counter() - t
    out = {"model": args.model, "volume": [args.size, args.size, args.depth],
           "feature_base": args.feature_base, "precision": precision,
           "seconds_per_volume": seconds, "gflop_per_volume": flops / 1e9,
           "achieved_tflops": flops / seconds / 1e12}
    if args.model == "3d":
        out["patch"] = args.patch
    print(json.dumps(out))


def time_scan(model, args) -> dict:
    """Seconds to segment one random CT scan of shape ``args.scan`` end to end, and the
    network's share, with the 2D network ``model`` at ``args.size`` px."""
    import tempfile

    import nibabel as nib

    from lib import predict

    if args.model != "2d":
        raise SystemExit("--scan: the 2D network only")
    fn = evaluate.make_predict_fn(model, [args.size, args.size, 3])
    net = lambda m, image, probabilities=False: evaluate.predict_volume_2d(
        fn, m, image, args.size, args.batch_size, probabilities=probabilities)
    preparation = {"image_size": args.size, "slice_axis": "axial", "clip_lower": 0.0,
                   "clip_upper": 98.0, "crop_size_mm": None, "training_crop": "center",
                   "source": "benchmark"}
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 300, args.scan).clip(-1024, 3000).astype(np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        scan = os.path.join(tmp, "ct.nii.gz")
        nib.save(nib.Nifti1Image(hu, np.diag([0.7, 0.7, 2.5, 1.0])), scan)
        times = []
        for run in range(2):  # the first is the warm-up
            t = time.perf_counter()
            predict.predict_scans(net, "ct", [scan], os.path.join(tmp, f"out{run}"),
                                  preparation, ["a"] * (args.n_class - 1), log=lambda m: None,
                                  progress=False)
            times.append(time.perf_counter() - t)
        image, _ = predict.prepare_scan(scan, preparation)
        t = time.perf_counter()
        net("ct", image, probabilities=True)
        network = time.perf_counter() - t
    return {"model": "2d", "scan": args.scan, "image_size": args.size,
            "feature_base": args.feature_base, "seconds_per_scan": times[1],
            "network_seconds_per_scan": network, "prepared_shape": list(image.shape)}


if __name__ == "__main__":
    main()
