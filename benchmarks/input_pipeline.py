"""Slices per second of the TFRecord training pipeline against a plain read of the same bytes.

    python benchmarks/input_pipeline.py --slices=512 --image_size=256 --batch_size=8

Writes released-format slices to a temporary folder twice: one record per file (as
released) and sharded (--shard_size records per file). For each layout it times the
project's training pipeline (lib.data.slice_dataset: sampling single slices uniformly,
parallel reads, parsing, checks, batching; a draw from a shard reads the shard up to the
drawn slice) for --batches batches, and a plain Python loop that reads the same files'
bytes in the same process, and (as the ceiling for any pipeline built from TensorFlow's
ops) a tf.data loop that only reads the same files whole with tf.io.read_file and batches
them. With --augment it also times the pipeline with the 2D entry script's augmentation
(lib/augment.py, the AUG_* defaults of main_combine.py) and with every transform applied to
every slice (``..._all_transforms``): compare with the slices a training step consumes
(2 x batch per step). Prints ONE JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: python benchmarks/input_pipeline.py
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import lib  # noqa: E402,F401  first: it sets the oneDNN default before TensorFlow loads
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from lib.data import slice_dataset, write_slices  # noqa: E402


def write(folder, n, size, shard_size):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(size, size, 3)).astype(np.float32)
    label = rng.integers(0, 5, (size, size))
    single, sharded = [], []
    for k in range(n):
        path = os.path.join(folder, f"slice_{k:05d}.tfrecords")
        write_slices(path, [(image, label)])
        single.append(path)
    for k in range(0, n, shard_size):
        path = os.path.join(folder, f"shard_{k // shard_size:04d}.tfrecords")
        write_slices(path, [(image, label)] * min(shard_size, n - k))
        sharded.append(path)
    return single, sharded


def augmentations() -> dict:
    """{name: lib.augment params}: main_combine.py's defaults, and all transforms always."""
    import main_combine
    from lib.augment import settings_of

    defaults = settings_of(vars(main_combine))
    return {"augmented": defaults,
            "augmented_all_transforms": {k: (1.0, lo, hi) for k, (_, lo, hi) in
                                         defaults.items()}}


def pipeline_rate(files, size, batch, batches, augment=None):
    ds = slice_dataset(files, size, batch, seed=0, n_class=5, augment=augment)
    it = iter(ds)
    next(it)  # warm-up: graph construction and the first reads
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t)


def tf_read_rate(files, records_per_file, batch, batches):
    """Slices/s of tf.data reading whole files (read_file, parallel) and batching them."""
    ds = tf.data.Dataset.from_tensor_slices(list(files)).repeat()
    ds = ds.map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE).batch(batch)
    it = iter(ds.prefetch(tf.data.AUTOTUNE))
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch * records_per_file / (time.perf_counter() - t)


def plain_rate(files, records_per_file):
    t = time.perf_counter()
    for path in files:
        with open(path, "rb") as handle:
            handle.read()
    return len(files) * records_per_file / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=512)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--shard_size", type=int, default=64)
    p.add_argument("--augment", action="store_true", help="also time the augmented pipeline")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        single, sharded = write(folder, args.slices, args.image_size, args.shard_size)
        out = {"slices": args.slices, "image_size": args.image_size,
               "batch_size": args.batch_size, "batches": args.batches,
               "bytes_per_slice": os.path.getsize(single[0])}
        for name, files, per in (("one_per_file", single, 1),
                                 ("sharded", sharded, args.shard_size)):
            plain_rate(files, per)  # warm the page cache: both read from memory
            pipe = pipeline_rate(files, args.image_size, args.batch_size, args.batches)
            plain = plain_rate(files, per)
            # Shards hold many slices each: read as many files as the pipeline read slices.
            tf_read = tf_read_rate(files, per, args.batch_size,
                                   max(1, args.batches // per))
            out[name] = {"pipeline_slices_per_s": pipe, "plain_read_slices_per_s": plain,
                         "ratio": pipe / plain, "tf_read_file_slices_per_s": tf_read,
                         "tf_read_file_ratio": tf_read / plain}
            if args.augment:
                from lib.augment import make_augment

                for key, params in augmentations().items():
                    out[name][f"{key}_slices_per_s"] = pipeline_rate(
                        files, args.image_size, args.batch_size, args.batches,
                        make_augment(params))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
