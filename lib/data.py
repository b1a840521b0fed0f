"""Data I/O shared by the 2D and 3D networks.

* The released slice format (carrenD/Medical-Cross-Modality-Domain-Adaptation): one
  ``tf.train.Example`` per slice with int64 features ``dsize_dim0..2``, ``lsize_dim0..2`` and
  bytes features ``data_vol`` (float32 [H, W, 3], row-major: three adjacent slices) and
  ``label_vol`` (float32; [H, W, 3] in the released files, whose channel 1 is the label of the
  middle slice, or [H, W, 1] as the published description says). The reader decides the label
  layout from the byte length, so both work.
* List files: one entry per line, relative paths resolved against the list file's folder,
  blank lines ignored. Slice lists hold one TFRecord path per line; volume lists hold
  ``image_path,label_path`` (NIfTI) or one ``.npz`` path (the original test format, arr_0 =
  image, arr_1 = label).
* A tf.data pipeline of [B, H, W, 3] float32 images and [B, H, W] int32 labels.
* Labels outside 0..N_CLASS-1 (the released MM-WHS slices carry a 5, a structure outside
  the four classes) follow OUT_OF_RANGE_LABELS: "error" stops with a DataError naming the
  file; "ignore" maps them to ``n_class``, which belongs to no class (tf.one_hot gives it
  an all-zero vector, as the original ``_label_decomp`` did).

Volumes are numpy arrays [H, W, D]: in-plane axes first, slices along the last axis.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from lib.files import atomic_path, write_text

RELEASED_LABEL_CHANNELS = 3  # the released files store the label as [H, W, 3]


class DataError(ValueError):
    """Bad input data: the message names the file and what is wrong."""


@dataclass
class LabelCount:
    """Labelled pixels read so far, and those outside 0..n_class-1: {value: pixels}, and
    the files holding any."""
    n_class: int
    pixels: int = 0
    outside: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    def add(self, label: np.ndarray, path: str) -> np.ndarray:
        """Count one label array [...] of ``path``; returns a mask of its outside pixels."""
        label = np.asarray(label)
        self.pixels += label.size
        mask = (label < 0) | (label >= self.n_class)
        if mask.any():
            values, counts = np.unique(label[mask], return_counts=True)
            for v, c in zip(values.tolist(), counts.tolist()):
                self.outside[int(v)] = self.outside.get(int(v), 0) + int(c)
            if not self.files or self.files[-1] != path:
                self.files.append(path)
        return mask

    def describe(self) -> str:
        """"value 5 on 2.31% of the pixels" (the values outside, largest share first)."""
        shares = sorted(self.outside.items(), key=lambda vc: -vc[1])
        parts = [f"{v} on {100.0 * c / max(self.pixels, 1):.2f}%" for v, c in shares[:5]]
        more = f" and {len(shares) - 5} more values" if len(shares) > 5 else ""
        return f"value{'s' if len(shares) > 1 else ''} {', '.join(parts)}{more} of the pixels"

    def apply(self, rule: str, where: str, log=None) -> None:
        """Nothing if every label was in range; else the OUT_OF_RANGE_LABELS rule: "error"
        raises one DataError naming the files, "ignore" logs one line."""
        if not self.outside:
            return
        span = f"0..{self.n_class - 1}"
        if rule == "error":
            shown = ", ".join(self.files[:5]) + (
                f" (+{len(self.files) - 5} more)" if len(self.files) > 5 else "")
            raise DataError(f"{shown}: label values outside {span} ({self.describe()} of "
                            f"{where}); OUT_OF_RANGE_LABELS=ignore counts them as no class, as "
                            f"the original code did")
        (log or _log)(f"{where}: labels outside {span}: {self.describe()}, in "
                      f"{len(self.files)} file(s); OUT_OF_RANGE_LABELS=ignore: they belong to "
                      f"no class (outside every Dice numerator, class count and KD class mean)")


def _log(message: str) -> None:
    import logging
    logging.getLogger("ummkd").info(message)


def no_class_labels(label: np.ndarray, n_class: int) -> np.ndarray:
    """``label`` with every value outside 0..n_class-1 set to n_class (no class)."""
    label = np.asarray(label)
    return np.where((label >= 0) & (label < n_class), label, n_class).astype(label.dtype)


# ----------------------------------------------------------------------------- list files
def read_list(list_path: str) -> list[str]:
    """Entries of a list file; relative paths are resolved against the list's folder.

    A line with commas (``image,label``) has each part resolved and is returned joined by a
    comma. Raises DataError if the file is missing or holds no entry.
    """
    if not os.path.isfile(list_path):
        raise DataError(f"{list_path}: list file does not exist")
    base = os.path.dirname(os.path.abspath(list_path))
    entries = []
    with open(list_path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split(",")]
            parts = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
                     for p in parts]
            entries.append(",".join(parts))
    if not entries:
        raise DataError(f"{list_path}: list file is empty")
    return entries


def write_list(list_path: str, entries: list[str]) -> None:
    """Write a list file with paths relative to its own folder where possible."""
    base = os.path.dirname(os.path.abspath(list_path))
    lines = []
    for entry in entries:
        parts = [os.path.relpath(os.path.abspath(p), base) for p in entry.split(",")]
        lines.append(",".join(parts))
    write_text(list_path, "\n".join(lines) + "\n")


def check_list_files(list_path: str) -> list[str]:
    """Entries of a list file, raising one DataError that names every missing file."""
    entries = read_list(list_path)
    missing = [p for e in entries for p in e.split(",") if not os.path.exists(p)]
    if missing:
        shown = ", ".join(missing[:20]) + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else "")
        raise DataError(f"{list_path}: {len(missing)} listed file(s) do not exist: {shown}")
    return entries


# ----------------------------------------------------------------------------- TFRecords
def _int64(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def encode_slice(image: np.ndarray, label: np.ndarray, label_layout: str = "released") -> bytes:
    """Serialise one training slice in the released format.

    image: [H, W, 3] (three adjacent slices); label: [H, W] class ids of the middle slice.
    label_layout "released" stores the label as float32 [H, W, 3] with the middle-slice label
    in every channel (the reader takes channel 1), "single" as float32 [H, W, 1].
    """
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got {image.shape}")
    if label.shape != image.shape[:2]:
        raise ValueError(f"label must be [H, W] = {image.shape[:2]}, got {label.shape}")
    if label_layout == "released":
        lab = np.repeat(label[:, :, None], RELEASED_LABEL_CHANNELS, axis=2)
    elif label_layout == "single":
        lab = label[:, :, None]
    else:
        raise ValueError(f"label_layout must be 'released' or 'single', got {label_layout!r}")
    lab = np.ascontiguousarray(lab, dtype=np.float32)
    image = np.ascontiguousarray(image)
    feature = {
        "dsize_dim0": _int64(image.shape[0]), "dsize_dim1": _int64(image.shape[1]),
        "dsize_dim2": _int64(image.shape[2]),
        "lsize_dim0": _int64(lab.shape[0]), "lsize_dim1": _int64(lab.shape[1]),
        "lsize_dim2": _int64(lab.shape[2]),
        "data_vol": _bytes(image.tobytes()), "label_vol": _bytes(lab.tobytes()),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_slices(path: str, slices, label_layout: str = "released") -> None:
    """Write (image, label) pairs into one TFRecord file (the released data has one per file).

    Writes to a temporary name first so that an interrupted write never leaves a file that
    looks complete.
    """
    with atomic_path(path) as tmp:
        with tf.io.TFRecordWriter(tmp) as writer:
            for image, label in slices:
                writer.write(encode_slice(image, label, label_layout))


_FEATURES = {
    **{f"dsize_dim{i}": tf.io.FixedLenFeature([], tf.int64) for i in range(3)},
    **{f"lsize_dim{i}": tf.io.FixedLenFeature([], tf.int64) for i in range(3)},
    "data_vol": tf.io.FixedLenFeature([], tf.string),
    "label_vol": tf.io.FixedLenFeature([], tf.string),
}


def parse_slice(serialized: tf.Tensor, image_size: int | None = None, filename=None,
                n_class: int | None = None, out_of_range: str = "error"):
    """Graph-side parser: serialized Example -> (image [S, S, 3] float32, label [S, S] int32).

    The label layout ([H, W, 3] released or [H, W, 1]) follows from the byte length; its
    middle channel is the label. With image_size set, slices of another size are resized
    (bilinear for the image, nearest for the label). With ``filename`` given, byte lengths
    that do not match the declared size and NaN or Inf in the image stop the pipeline with
    an error that names the file. With n_class, labels outside 0..n_class-1 do too
    (``out_of_range="error"``), or become n_class, no class (``"ignore"``).
    """
    ex = tf.io.parse_single_example(serialized, _FEATURES)
    h = tf.cast(ex["dsize_dim0"], tf.int32)
    w = tf.cast(ex["dsize_dim1"], tf.int32)
    data = tf.io.decode_raw(ex["data_vol"], tf.float32)
    lab = tf.io.decode_raw(ex["label_vol"], tf.float32)
    checks = []
    if filename is not None:
        checks.append(tf.debugging.Assert(
            tf.equal(tf.size(data), h * w * 3) & tf.reduce_any(
                tf.equal(tf.size(lab), [h * w, h * w * 3])),
            ["BADRECORD", filename, "data_vol or label_vol byte length does not match its "
             "declared size"]))
    with tf.control_dependencies(checks):
        image = tf.reshape(data, [h, w, 3])
        channels = tf.size(lab) // (h * w)
        lab = tf.reshape(lab, [h, w, channels])
    label = tf.cast(tf.round(lab[:, :, (channels - 1) // 2]), tf.int32)
    if filename is not None:
        checks = [tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(image)),
                                      ["BADRECORD", filename, "NaN or Inf in the image"])]
        if n_class is not None and out_of_range == "error":
            checks.append(tf.debugging.Assert(
                (tf.reduce_min(label) >= 0) & (tf.reduce_max(label) < n_class),
                ["BADRECORD", filename, f"label values outside 0..{n_class - 1}"]))
        with tf.control_dependencies(checks):
            image, label = tf.identity(image), tf.identity(label)
    if n_class is not None and out_of_range == "ignore":
        label = tf.where((label >= 0) & (label < n_class), label, n_class)
    if image_size is not None:
        size = tf.constant([image_size, image_size])

        def resized():
            img = tf.image.resize(image, size, method="bilinear")
            lbl = tf.image.resize(label[:, :, None], size, method="nearest")[:, :, 0]
            return img, lbl

        image, label = tf.cond(tf.reduce_all(tf.stack([h, w]) == size),
                               lambda: (image, label), resized)
        image = tf.ensure_shape(image, [image_size, image_size, 3])
        label = tf.ensure_shape(label, [image_size, image_size])
    return image, label


def count_records(path: str) -> int:
    """Number of records in one TFRecord file, from its length headers alone.

    A header or record that runs past the end of the file is a DataError naming the file.
    """
    size, offset, count = os.path.getsize(path), 0, 0
    with open(path, "rb") as handle:
        while offset < size:
            handle.seek(offset)
            header = handle.read(8)
            offset += 16 + (int.from_bytes(header, "little") if len(header) == 8 else size)
            if offset > size:
                raise DataError(f"{path}: truncated or corrupt: a record runs past the end "
                                f"of the file")
            count += 1
    return count


def sample_records(files: list[str], seed: int, start: int = 0, foreground=None,
                   share: float = 0.0) -> tf.data.Dataset:
    """Endless stream of (k, file name, record index) drawn over all records.

    Element k is a pure function of (seed, k), so a run resumed at step s continues with
    exactly the slices an uninterrupted run would have read (start = s * batch size).
    Record k is uniform over all records; with ``share`` > 0 and ``foreground`` ([N] bool
    over the records in file order, foreground_records), it is instead, with probability
    ``share``, uniform over the records with foreground (nnU-Net's forced foreground
    samples), so a stream over whole volumes still sees the organs often. With one record
    per file (the released layout) record k is file u_k.
    """
    counts = np.array([count_records(f) for f in files], np.int64)
    total = int(counts.sum())
    if total == 0:
        raise DataError(f"{files[0]}{' and the other files' if len(files) > 1 else ''}: "
                        f"no records")
    names, ends = tf.constant(list(files)), tf.constant(np.cumsum(counts))
    sizes = tf.constant(counts)
    forced = None
    if share > 0 and foreground is not None and np.any(foreground):
        forced = tf.constant(np.flatnonzero(foreground).astype(np.int64))

    def pick(k):
        key = tf.stack([tf.constant(seed, tf.int64), k])
        u = tf.random.stateless_uniform([], seed=key, maxval=total, dtype=tf.int64)
        if forced is not None:
            sub = tf.random.experimental.stateless_fold_in(key, 7)
            coin = tf.random.stateless_uniform([], seed=sub)
            i = tf.random.stateless_uniform([], seed=tf.random.experimental.stateless_fold_in(
                sub, 1), maxval=tf.size(forced, tf.int64), dtype=tf.int64)
            u = tf.where(coin < share, forced[i], u)
        j = tf.searchsorted(ends, u[None], side="right")[0]
        return k, names[j], u - (ends[j] - sizes[j])

    return tf.data.Dataset.counter(start=start, dtype=tf.int64).map(pick)


def foreground_records(files: list[str], n_class: int | None = None) -> np.ndarray:
    """[N] bool over every record of ``files`` in file order: its label (the middle slice)
    holds a class other than background (1..n_class-1 when ``n_class`` is given)."""
    names = tf.data.Dataset.from_tensor_slices(list(files))

    def has_foreground(f, r):
        label = parse_slice(r)[1]
        fg = label > 0
        if n_class is not None:
            fg &= label < n_class
        return tf.reduce_any(fg)

    ds = _records_with_names(files, names).map(has_foreground,
                                               num_parallel_calls=tf.data.AUTOTUNE)
    return np.array([bool(v) for v in ds.as_numpy_iterator()], bool)


# Files up to this size are read whole, with one read op each (the released data has one
# small record per file); larger shard files are streamed by tf.data.TFRecordDataset.
WHOLE_FILE_MAX_BYTES = 64 << 20


def read_records(path, index=None) -> tf.Tensor:
    """All records of one TFRecord file from a single read: [N] strings; with ``index``,
    record ``index`` alone (a scalar string; past the last record is an error).

    TFRecord framing, little endian: per record a uint64 length, a uint32 CRC of it, the
    data and a uint32 CRC of the data. The CRCs are not checked here (validate_tfrecords
    checks every file before training with CHECK_DATA); a length that runs past the end of
    the file stops the pipeline with an error that names the file (parse_slice's format).
    """
    content = tf.io.read_file(path)
    size = tf.cast(tf.strings.length(content), tf.int64)

    def check(ok):
        return tf.debugging.Assert(ok, ["BADRECORD", path, "truncated or corrupt: a record "
                                        "runs past the end of the file"])

    def body(offset, records):
        with tf.control_dependencies([check(offset + 16 <= size)]):
            header = tf.strings.substr(content, tf.cast(offset, tf.int32), 8)
        length = tf.io.decode_raw(header, tf.int64)[0]
        with tf.control_dependencies([check((length >= 0) & (offset + 16 + length <= size))]):
            record = tf.strings.substr(content, tf.cast(offset + 12, tf.int32),
                                       tf.cast(length, tf.int32))
        return offset + 16 + length, records.write(records.size(), record)

    def every_record():
        _, records = tf.while_loop(
            lambda offset, records: offset < size, body,
            (tf.constant(0, tf.int64),
             tf.TensorArray(tf.string, size=0, dynamic_size=True, element_shape=[])))
        return records.stack()

    # One record filling the file (the released layout): no loop.
    first = tf.cond(size >= 16,
                    lambda: tf.io.decode_raw(tf.strings.substr(content, 0, 8), tf.int64)[0],
                    lambda: tf.constant(-1, tf.int64))
    one = tf.equal(first, size - 16)
    if index is None:
        return tf.cond(one, lambda: tf.strings.substr(content, 12, tf.cast(first, tf.int32))[None],
                       every_record)
    # the record itself, not a slice of a one-element vector: no copy of it
    return tf.cond(one & tf.equal(index, 0),
                   lambda: tf.strings.substr(content, 12, tf.cast(first, tf.int32)),
                   lambda: every_record()[index])


def _drawn_records(files: list[str], draws: tf.data.Dataset) -> tf.data.Dataset:
    """(k, file name, serialized record) of each (k, file, record index) drawn.

    A file holding several records is read up to the drawn one for every draw: one slice
    per file (the released layout) is the layout to train from.
    """
    if max(os.path.getsize(f) for f in files) <= WHOLE_FILE_MAX_BYTES:
        return draws.map(lambda k, f, i: (k, f, read_records(f, i)),
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return draws.interleave(
        lambda k, f, i: tf.data.TFRecordDataset(f).skip(i).take(1).map(lambda r: (k, f, r)),
        cycle_length=8, block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)


def _records_with_names(files: list[str], names: tf.data.Dataset) -> tf.data.Dataset:
    """(file name, serialized record) of every record of the named files, in order."""
    if max(os.path.getsize(f) for f in files) <= WHOLE_FILE_MAX_BYTES:
        ds = names.map(lambda f: (f, read_records(f)), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)
        return ds.map(lambda f, r: (tf.fill(tf.shape(r), f), r)).unbatch()
    return names.interleave(lambda f: tf.data.TFRecordDataset(f).map(lambda r: (f, r)),
                            cycle_length=8, block_length=1,
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def slice_dataset(files: list[str], image_size: int, batch_size: int, *, seed: int = 0,
                  start_step: int = 0, augment=None, n_class: int | None = None,
                  out_of_range: str = "error", repeat: bool = True,
                  foreground_share: float = 0.0) -> tf.data.Dataset:
    """Batches (image [B, S, S, 3] float32, label [B, S, S] int32) from TFRecord files.

    Training (``repeat``): slices drawn at random, uniformly over all records, by
    sample_records, resumable at any step; files are read in parallel, in a deterministic
    order. ``repeat=False``: every record of every file once, in order. Bad records stop the
    pipeline naming their file; labels outside 0..n_class-1 follow ``out_of_range``
    (parse_slice). ``foreground_share``: the share of training draws forced onto slices
    with foreground (sample_records). ``augment``: an optional graph function
    ``(image, label, seed) -> (image, label)``, called with a stateless seed (int32 [2])
    derived from (seed, k) for the k-th slice, so a resumed run repeats the augmentation of
    an uninterrupted one.
    """
    if not files:
        raise DataError("no TFRecord files given")
    if repeat:
        foreground = foreground_records(files, n_class) if foreground_share > 0 else None
        ds = _drawn_records(files, sample_records(files, seed, start_step * batch_size,
                                                  foreground, foreground_share))
    else:
        ds = _records_with_names(files, tf.data.Dataset.from_tensor_slices(list(files)))
        ds = ds.enumerate().map(lambda k, fr: (k, fr[0], fr[1]))
    ds = ds.map(lambda k, f, r: (k, *parse_slice(r, image_size, f, n_class, out_of_range)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if augment is not None:
        key = tf.constant(seed, tf.int64)

        def augment_slice(k, image, label):
            # a key of its own: the sampler draws from (seed, k) itself
            aug_seed = tf.random.experimental.stateless_fold_in(tf.stack([key, k]), 1)
            return augment(image, label, seed=aug_seed)

        ds = ds.map(augment_slice, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(lambda k, image, label: (image, label))
    ds = ds.batch(batch_size, drop_remainder=repeat)
    return ds.prefetch(tf.data.AUTOTUNE)


def validate_tfrecords(files: list[str], list_path: str = "",
                       labels: LabelCount | None = None) -> int:
    """Read every record of every file; one DataError naming every bad file. Returns count.

    Catches truncated or corrupt files, records that are not released-format Examples and
    data_vol / label_vol byte lengths that do not match the declared sizes. With ``labels``,
    counts the middle-slice labels of every record into it (the values outside the classes).
    """
    count = _count_if_all_good(files, labels)
    if count is not None:
        return count
    bad, count = [], 0  # something is wrong: file by file, to name every bad one
    for path in files:
        try:
            for raw in tf.data.TFRecordDataset(path):
                count += 1
                problem, _ = _read_record(raw.numpy())
                if problem:
                    bad.append(f"{path} ({problem})")
                    break
        except (tf.errors.DataLossError, tf.errors.OpError) as err:
            bad.append(f"{path} (truncated or corrupt: {err.message.splitlines()[0]})")
    if bad:
        where = f"{list_path}: " if list_path else ""
        shown = "; ".join(bad[:10]) + (f"; +{len(bad) - 10} more" if len(bad) > 10 else "")
        raise DataError(f"{where}{len(bad)} bad TFRecord file(s): {shown}")
    return count


def _count_if_all_good(files: list[str], labels: LabelCount | None = None) -> int | None:
    """The number of records when every record of every file reads and checks out, else
    None; one stream over all the files, since an eager iterator per file costs far more
    than reading a one-slice file (docs/performance.md)."""
    names = tf.data.Dataset.from_tensor_slices(list(files))
    records = names.interleave(lambda f: tf.data.TFRecordDataset(f).map(lambda r: (f, r)),
                               cycle_length=1)
    count = 0
    try:
        for name, raw in records.as_numpy_iterator():
            problem, label = _read_record(raw)
            if problem:
                return None
            if labels is not None:
                labels.add(label, name.decode())
            count += 1
    except (tf.errors.DataLossError, tf.errors.OpError):
        return None
    return count


def _read_record(raw: bytes) -> tuple[str | None, np.ndarray | None]:
    """(None, middle-slice label [H, W] int) of a good record, or (what is wrong, None)."""
    try:
        feature = tf.train.Example.FromString(raw).features.feature
        d = [feature[f"dsize_dim{i}"].int64_list.value[0] for i in range(3)]
        data = feature["data_vol"].bytes_list.value[0]
        label = feature["label_vol"].bytes_list.value[0]
    except Exception:  # protobuf raises several types for malformed records
        return "not a released-format slice record", None
    if len(data) != 4 * d[0] * d[1] * d[2]:
        return f"data_vol has {len(data)} bytes, declared {d[0]}x{d[1]}x{d[2]} float32", None
    if len(label) not in (4 * d[0] * d[1], 12 * d[0] * d[1]):
        return (f"label_vol has {len(label)} bytes, expected {d[0]}x{d[1]}x1 or x3 float32",
                None)
    lab = np.frombuffer(label, np.float32).reshape(d[0], d[1], -1)
    return None, np.rint(lab[:, :, (lab.shape[2] - 1) // 2]).astype(np.int64)


def bad_record_message(err: tf.errors.OpError) -> str | None:
    """"<file>: <problem>" of a failed parse_slice check, from the pipeline's error."""
    found = re.search(r"\[BADRECORD\] \[(.*?)\] \[(.*?)\]", err.message or "")
    return f"{found.group(1)}: {found.group(2)}" if found else None


# ----------------------------------------------------------------------------- volumes
@dataclass
class Volume:
    """A test volume: image [H, W, D] float32, label [H, W, D] int32, voxel spacing (mm).

    ``spacing`` is None when the file carries no voxel size (.npz): distances are then in
    voxels unless the caller knows the spacing from elsewhere (lib.evaluate's dataset.json).
    ``image`` and ``label`` are in the training slices' layout; ``flipped`` says whether that
    took a flip of axes 0 and 1 from the file's layout.
    """
    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple | None = None
    affine: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    flipped: bool = False  # axes 0 and 1 flipped on loading (load_volume), not in the file


def case_name(path: str) -> str:
    """File name without folder and without .nii.gz / .nii / .npz and an _image suffix."""
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii", ".npz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    for suffix in ("_image", "_img"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def load_volume(entry: str, flip: bool | None = None, label_resample: str = "none") -> Volume:
    """Load one volume-list entry: ``image.nii.gz,label.nii.gz`` or ``case.npz``.

    A NIfTI label meets its image through lib.prep.label_onto_image: re-indexed exactly when
    it holds the same voxels in another axis order or direction, resampled by nearest
    neighbour onto another grid only with ``label_resample="nearest"`` (LABEL_RESAMPLE),
    else a DataError naming the label file. ``meta["note"]`` says what was done.

    ``flip`` flips axes 0 and 1 of image and label (``Volume.flipped`` records it). None:
    the format's own layout: the original .npz test files store arr_0 = image and arr_1 =
    label flipped on axes 0 and 1 relative to the training slices, so they are flipped
    back; NIfTI files are taken as they are.
    """
    import nibabel as nib  # imported here so that training-only runs do not need it loaded

    from lib.prep import label_onto_image  # lib.prep imports this module

    flip = entry.endswith(".npz") if flip is None else bool(flip)

    def oriented(volume):
        if not flip:
            return volume
        return dataclasses.replace(
            volume, image=np.ascontiguousarray(np.flip(volume.image, (0, 1))),
            label=np.ascontiguousarray(np.flip(volume.label, (0, 1))), flipped=True)

    if entry.endswith(".npz"):
        try:
            with np.load(entry, allow_pickle=False) as npz:
                image, label = npz["arr_0"], npz["arr_1"]
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{entry}: cannot read test volume ({err})") from None
        return oriented(Volume(case_name(entry), np.asarray(image, np.float32),
                               np.asarray(label).astype(np.int32), meta={"label_file": entry}))
    parts = entry.split(",")
    if len(parts) != 2:
        raise DataError(f"{entry}: a volume entry must be 'image,label' or one .npz file")

    def read(path, what):
        try:
            nii = nib.load(path)
            return nii, np.asarray(nii.dataobj)
        except Exception as err:  # nibabel raises several types for bad files
            raise DataError(f"{path}: cannot read the {what} NIfTI file ({err})") from None

    img, image = read(parts[0], "image")
    lab, label = read(parts[1], "label")
    image = image.astype(np.float32, copy=False)
    label = np.rint(label).astype(np.int32)
    meta = {"label_file": parts[1]}
    label, notes = label_onto_image(label, lab.affine, parts[1], image.shape, img.affine,
                                    parts[0], resample=label_resample)
    if notes:
        meta["note"] = "; ".join(notes)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    return oriented(Volume(case_name(parts[0]), image, label, spacing, img.affine, meta=meta))


def zip_modalities(datasets: dict) -> tf.data.Dataset:
    """{modality: Dataset of (x, y)} -> Dataset of ({m: x}, {m: y}): one batch per modality.

    The modalities keep their own (independent) shuffles: the data are unpaired.
    """
    names = list(datasets)
    zipped = tf.data.Dataset.zip(tuple(datasets[m] for m in names))
    return zipped.map(lambda *pairs: ({m: p[0] for m, p in zip(names, pairs)},
                                      {m: p[1] for m, p in zip(names, pairs)}))


def compact_batches(dataset: tf.data.Dataset, image_dtype, n_class: int) -> tf.data.Dataset:
    """Batches ({m: x}, {m: y}) as they travel to the device, at a third of the bytes.

    Labels become uint8 when every value they can hold (0..n_class, n_class being the
    no-class value of OUT_OF_RANGE_LABELS="ignore") fits in a byte; the training step casts
    them back to int32. Images become ``image_dtype``, the compute dtype of the dtype
    policy: the network casts its input to it first thing, so its numbers are the same.
    """
    image_dtype = tf.as_dtype(image_dtype)
    label_dtype = tf.uint8 if n_class <= 255 else tf.int32
    return dataset.map(lambda x, y: ({m: tf.cast(x[m], image_dtype) for m in x},
                                     {m: tf.cast(y[m], label_dtype) for m in y}))


def validation_start(config: dict, start_step: int) -> int:
    """Validation batches a run has used before ``start_step``: one every DISPLAY_STEP steps
    (lib.train), so a resumed run validates on the batches an uninterrupted one would."""
    return start_step // config["DISPLAY_STEP"]


def modality_streams(config: dict, train_lists: dict, val_lists: dict, start_step: int,
                     stream):
    """(train, val): zipped batches of every modality, the same rule for 2D and 3D.

    ``stream(modality, list_path, seed, start, part)`` -> that modality's Dataset of
    batches; ``start`` is the number of batches already used (training: the start step;
    validation: ``validation_start``), ``part`` "training" or "validation". Modality i gets
    seed SEED + i (validation: + 100), so the streams are independent (the data are
    unpaired). val is None unless every modality has a validation list.
    """
    seed = config["SEED"] or 0

    def build(lists, offset, start, part):
        return zip_modalities({m: stream(m, path, seed + i + offset, start, part)
                               for i, (m, path) in enumerate(lists.items())})

    train = build(train_lists, 0, start_step, "training")
    val = (build(val_lists, 100, validation_start(config, start_step), "validation")
           if val_lists and len(val_lists) == len(train_lists) else None)
    return train, val


def slice_training_data(config: dict, train_lists: dict, val_lists: dict, augment=None,
                        start_step: int = 0):
    """2D training and validation batches for every modality from their TFRecord lists
    (modality_streams). With CHECK_DATA every record of every file is read once first
    (fail fast), and labels outside the classes are reported (or refused) before
    training, per OUT_OF_RANGE_LABELS. ``augment`` applies to the training batches only.
    """
    rule, n_class = config["OUT_OF_RANGE_LABELS"], config["N_CLASS"]

    def stream(m, list_path, seed, start, part):
        files = check_list_files(list_path)
        if config["CHECK_DATA"]:
            labels = LabelCount(n_class)
            validate_tfrecords(files, list_path, labels)
            labels.apply(rule, f"{m} {part} slices")
        elif rule == "ignore":
            _log(f"{m} {part} slices: labels outside 0..{n_class - 1} not counted "
                 f"(CHECK_DATA=False); OUT_OF_RANGE_LABELS=ignore: no class")
        return slice_dataset(files, config["IMAGE_SIZE"], config["BATCH_SIZE"], seed=seed,
                             start_step=start, augment=augment if part == "training" else None,
                             n_class=n_class, out_of_range=rule,
                             foreground_share=config["FOREGROUND_SHARE"] if part == "training"
                             else 0.0)

    return modality_streams(config, train_lists, val_lists, start_step, stream)


# ----------------------------------------------------------------------------- 3D slabs
@dataclass
class VolumeBank:
    """Training volumes of one modality held in memory, stacked along depth.

    Every volume is padded to at least the patch size (edge values for the image, 0 for the
    label) and to the common in-plane size, then all are concatenated along depth, so one
    slab is one slice of two arrays. ``sizes`` [N, 3] are the padded volume sizes the slabs
    must stay inside (the common in-plane padding is never sampled), ``offsets`` [N] the
    depth offsets and ``labelled`` [N, 2] the [first, last + 1) depth range with foreground
    (the whole depth when a volume has none).
    """
    image: np.ndarray
    label: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    labelled: np.ndarray


def volume_bank(volumes, patch, n_class: int | None = None) -> VolumeBank:
    """Stack [(image [H, W, D], label [H, W, D])] for slab sampling (see VolumeBank).

    Foreground is a label in 1..n_class-1 (any label > 0 without n_class): labels outside
    the classes (no_class_labels) never make a slice count as labelled.
    """
    if not volumes:
        raise DataError("no training volume given")
    padded = []
    for image, label in volumes:
        pad = [(0, max(0, p - s)) for s, p in zip(image.shape, patch)]
        padded.append((np.pad(np.asarray(image, np.float32), pad, mode="edge"),
                       np.pad(np.asarray(label), pad, mode="constant").astype(np.uint8)))
    h = max(im.shape[0] for im, _ in padded)
    w = max(im.shape[1] for im, _ in padded)
    sizes, labelled, images, labels = [], [], [], []
    for image, label in padded:
        sizes.append(image.shape)
        fg = label > 0 if n_class is None else (label > 0) & (label < n_class)
        fg = np.flatnonzero(fg.any(axis=(0, 1)))
        labelled.append((fg[0], fg[-1] + 1) if fg.size else (0, image.shape[2]))
        common = [(0, h - image.shape[0]), (0, w - image.shape[1]), (0, 0)]
        images.append(np.pad(image, common, mode="edge"))
        labels.append(np.pad(label, common, mode="constant"))
    depths = [s[2] for s in sizes]
    offsets = np.concatenate([[0], np.cumsum(depths)[:-1]])
    return VolumeBank(np.concatenate(images, axis=2), np.concatenate(labels, axis=2),
                      np.asarray(sizes, np.int32), offsets.astype(np.int32),
                      np.asarray(labelled, np.int32))


def slab_starts(size, labelled, patch, u):
    """Start [i, j, k] of one training slab inside a volume of ``size`` [H, W, D] >= patch.

    u: 4 uniform numbers in [0, 1). u[0] < 0.5 draws the depth uniformly; otherwise the
    slab is centred on a uniformly drawn slice of the labelled range [lo, hi) and shifted
    back inside the volume near its ends. u[2], u[3] draw the in-plane crop. Works on
    numpy values and inside tf.data (graph) alike.
    """
    size = tf.cast(size, tf.int32)
    labelled = tf.cast(labelled, tf.int32)
    patch = tf.constant(list(patch), tf.int32)
    u = tf.cast(u, tf.float32)
    room = size - patch + 1  # number of valid starts per axis (>= 1)

    def draw(x, n):
        return tf.minimum(tf.cast(tf.floor(x * tf.cast(n, tf.float32)), tf.int32), n - 1)

    centre = labelled[0] + draw(u[1], labelled[1] - labelled[0])
    k_centred = tf.clip_by_value(centre - patch[2] // 2, 0, room[2] - 1)
    k = tf.where(u[0] < 0.5, draw(u[1], room[2]), k_centred)
    return tf.stack([draw(u[2], room[0]), draw(u[3], room[1]), k])


def slab_dataset(bank: VolumeBank, patch, batch_size: int, seed: int = 0,
                 start_step: int = 0) -> tf.data.Dataset:
    """Endless batches (x [B, h, w, d, 1] float32, y [B, h, w, d] int32) of random slabs.

    The volumes stay in memory as tensors (captured by the map function, not embedded in a
    graph) and every draw uses stateless random ops keyed by (seed, element index), so the
    stream is the same on every run whatever the parallelism.
    """
    with tf.device("/cpu:0"):
        image = tf.constant(bank.image)
        label = tf.constant(bank.label)
    sizes = tf.constant(bank.sizes)
    offsets = tf.constant(bank.offsets)
    labelled = tf.constant(bank.labelled)
    n = len(bank.sizes)
    ph, pw, pd = (int(p) for p in patch)

    def sample(index):
        u = tf.random.stateless_uniform([5], seed=tf.stack([tf.cast(seed, tf.int64), index]))
        v = tf.minimum(tf.cast(u[0] * n, tf.int32), n - 1)
        i, j, k = tf.unstack(slab_starts(sizes[v], labelled[v], patch, u[1:]))
        begin = tf.stack([i, j, offsets[v] + k])
        x = tf.slice(image, begin, [ph, pw, pd])[..., None]
        y = tf.cast(tf.slice(label, begin, [ph, pw, pd]), tf.int32)
        return tf.ensure_shape(x, [ph, pw, pd, 1]), tf.ensure_shape(y, [ph, pw, pd])

    # Element k depends only on (seed, k): a run resumed at step s starts at k = s * B.
    ds = tf.data.Dataset.counter(start=start_step * batch_size, dtype=tf.int64)
    ds = ds.map(sample, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def load_training_volumes(list_path: str, n_class: int | None = None,
                          out_of_range: str = "error", what: str = "",
                          label_resample: str = "none"
                          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, label) arrays of every ``image,label`` entry of a volume list (``load_volume``
    with ``label_resample``).

    Labels outside 0..n_class-1 follow ``out_of_range`` (LabelCount.apply): an error naming
    the files, or one line reporting them, mapped to n_class (no class).
    """
    entries = check_list_files(list_path)
    bad = [e for e in entries if e.endswith(".npz") or len(e.split(",")) != 2]
    if bad:
        raise DataError(f"{list_path}: 3D training needs 'image,label' NIfTI pairs, got "
                        f"{bad[0]!r}")
    out = []
    labels = LabelCount(n_class) if n_class is not None else None
    for entry in entries:
        v = load_volume(entry, label_resample=label_resample)
        check_volume(v, entry.split(",")[0])
        label = v.label
        if labels is not None and labels.add(label, entry.split(",")[1]).any():
            label = no_class_labels(label, n_class)
        out.append((v.image, label))
    if labels is not None:
        labels.apply(out_of_range, what or list_path)
    return out


def check_volume(volume: Volume, path: str) -> None:
    """DataError naming ``path`` for NaN or Inf in the image."""
    if not np.all(np.isfinite(volume.image)):
        raise DataError(f"{path}: NaN or Inf in the image")


def volume_training_data(config: dict, train_lists: dict, val_lists: dict,
                         start_step: int = 0):
    """3D training and validation slab batches for every modality from their volume lists
    (modality_streams), labels outside the classes per OUT_OF_RANGE_LABELS."""
    patch = [int(p) for p in config["PATCH_SIZE"]]

    def stream(m, list_path, seed, start, part):
        volumes = load_training_volumes(list_path, config["N_CLASS"],
                                        config["OUT_OF_RANGE_LABELS"], f"{m} {part} volumes",
                                        config["LABEL_RESAMPLE"])
        return slab_dataset(volume_bank(volumes, patch, config["N_CLASS"]), patch,
                            config["BATCH_SIZE"], seed, start)

    return modality_streams(config, train_lists, val_lists, start_step, stream)
