"""Released TFRecord format (both label layouts), list files, test volumes."""
import os

import numpy as np
import pytest
import tensorflow as tf

from lib import data
from lib.evaluate import predict_volume_2d, stack_context


def read_back(path, image_size=None):
    raw = next(iter(tf.data.TFRecordDataset(path)))
    image, label = data.parse_slice(raw, image_size)
    return image.numpy(), label.numpy()


@pytest.mark.parametrize("layout", ["released", "single"])
def test_tfrecord_round_trip_is_bit_exact(tmp_path, layout):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(8, 12, 3)).astype(np.float32)
    label = rng.integers(0, 5, (8, 12))
    path = str(tmp_path / "s.tfrecords")
    data.write_slices(path, [(image, label)], layout)
    got_image, got_label = read_back(path)
    assert got_image.tobytes() == image.tobytes()
    np.testing.assert_array_equal(got_label, label)
    ex = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(path))).numpy())
    f = ex.features.feature
    assert f["lsize_dim2"].int64_list.value[0] == (3 if layout == "released" else 1)
    assert len(f["label_vol"].bytes_list.value[0]) == 8 * 12 * (3 if layout == "released" else 1) * 4


def test_released_layout_takes_channel_1(tmp_path):
    """In the released files the label is [H, W, 3] and the middle slice is channel 1."""
    lab = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 2.0), np.full((4, 4), 3.0)], -1)
    feat = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
    byt = lambda b: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))
    ex = tf.train.Example(features=tf.train.Features(feature={
        "dsize_dim0": feat(4), "dsize_dim1": feat(4), "dsize_dim2": feat(3),
        "lsize_dim0": feat(4), "lsize_dim1": feat(4), "lsize_dim2": feat(1),  # as published
        "data_vol": byt(np.zeros((4, 4, 3), np.float32).tobytes()),
        "label_vol": byt(lab.astype(np.float32).tobytes())}))
    path = str(tmp_path / "r.tfrecords")
    with tf.io.TFRecordWriter(path) as w:
        w.write(ex.SerializeToString())
    assert np.all(read_back(path)[1] == 2)


def test_parse_resizes_to_image_size(tmp_path):
    label = np.zeros((8, 8), np.int64)
    label[:4] = 3
    path = str(tmp_path / "s.tfrecords")
    data.write_slices(path, [(np.ones((8, 8, 3), np.float32), label)])
    image, lab = read_back(path, image_size=4)
    assert image.shape == (4, 4, 3) and lab.shape == (4, 4)
    np.testing.assert_array_equal(lab[:2], 3)
    np.testing.assert_array_equal(lab[2:], 0)


def test_list_files_resolve_relative_paths_and_skip_blank_lines(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.tfrecords").write_bytes(b"")
    lst = tmp_path / "lists" / "train_list"
    lst.parent.mkdir()
    lst.write_text("../sub/a.tfrecords\n\n  \n")
    assert data.read_list(str(lst)) == [str(tmp_path / "sub" / "a.tfrecords")]
    out = tmp_path / "lists" / "copy_list"
    data.write_list(str(out), [str(tmp_path / "sub" / "a.tfrecords")])
    assert out.read_text() == "../sub/a.tfrecords\n"


def test_missing_and_empty_lists_name_every_file(tmp_path):
    lst = tmp_path / "l.txt"
    with pytest.raises(data.DataError, match="does not exist"):
        data.read_list(str(lst))
    lst.write_text("\n")
    with pytest.raises(data.DataError, match="empty"):
        data.read_list(str(lst))
    lst.write_text("x1.tfrecords\nx2.tfrecords\n")
    with pytest.raises(data.DataError, match="2 listed file.*x1.tfrecords.*x2.tfrecords"):
        data.check_list_files(str(lst))


def test_slice_dataset_batches_and_zips_modalities(tiny_data):
    files = data.read_list(tiny_data["mr"]["train"])
    ds = data.slice_dataset(files, 16, 3, seed=0)
    x, y = next(iter(ds))
    assert x.shape == (3, 16, 16, 3) and y.shape == (3, 16, 16) and y.dtype == tf.int32
    both = data.zip_modalities({"mr": ds, "ct": data.slice_dataset(files, 16, 3, seed=1)})
    images, labels = next(iter(both))
    assert set(images) == {"mr", "ct"} and labels["ct"].shape == (3, 16, 16)


def _write_records(path, records):
    with tf.io.TFRecordWriter(path) as writer:
        for r in records:
            writer.write(r)


@pytest.mark.parametrize("records", [[b"one record"], [b"a", b"hello", b""], []])
def test_read_records_splits_the_tfrecord_framing(tmp_path, records):
    path = str(tmp_path / "r.tfrecords")
    _write_records(path, records)
    # framing: 8-byte length + 4-byte CRC + data + 4-byte CRC per record
    assert os.path.getsize(path) == sum(16 + len(r) for r in records)
    assert list(data.read_records(path).numpy()) == records


def test_read_records_names_a_truncated_file(tmp_path):
    path = str(tmp_path / "t.tfrecords")
    _write_records(path, [b"first", b"second record"])
    raw = open(path, "rb").read()
    read = tf.function(data.read_records)  # as in the pipeline: a graph
    for cut in (len(raw) - 3, 21 + 5):  # inside the second record's data; inside its header
        open(path, "wb").write(raw[:cut])
        with pytest.raises(tf.errors.InvalidArgumentError) as err:
            read(path)
        assert data.bad_record_message(err.value) == (
            f"{path}: truncated or corrupt: a record runs past the end of the file")


def test_slice_dataset_reads_shards_and_single_records_alike(tmp_path, monkeypatch):
    """Whole-file reads (small files) and streamed shards give the same slices in order."""
    rng = np.random.default_rng(3)
    slices = [(rng.normal(size=(8, 8, 3)).astype(np.float32), rng.integers(0, 5, (8, 8)))
              for _ in range(5)]
    shard = str(tmp_path / "shard.tfrecords")
    data.write_slices(shard, slices)
    whole = list(data.slice_dataset([shard], 8, 5, repeat=False))
    monkeypatch.setattr(data, "WHOLE_FILE_MAX_BYTES", 0)
    streamed = list(data.slice_dataset([shard], 8, 5, repeat=False))
    for got in (whole, streamed):
        assert len(got) == 1
        np.testing.assert_array_equal(got[0][0], np.stack([s[0] for s in slices]))
        np.testing.assert_array_equal(got[0][1], np.stack([s[1] for s in slices]))


def _numbered_files(tmp_path, records_per_file):
    """Files whose slices hold the value 10 * file + record everywhere."""
    files = []
    for f, n in enumerate(records_per_file):
        path = str(tmp_path / f"numbered_{f}.tfrecords")
        data.write_slices(path, [(np.full((8, 8, 3), 10 * f + r, np.float32),
                                  np.zeros((8, 8), np.int64)) for r in range(n)])
        files.append(path)
    return files


def _values(ds, batches):
    return [[int(v) for v in x[:, 0, 0, 0].numpy()] for x, _ in
            (batch for _, batch in zip(range(batches), ds))]


@pytest.mark.parametrize("whole_file", [True, False])
def test_training_draws_single_records_and_resumes_exactly(tmp_path, monkeypatch, whole_file):
    """Element k is record u_k of all 12, u_k uniform from the stateless key (seed, k):
    batches mix files, and a run resumed at step 2 reads what an uninterrupted one did."""
    if not whole_file:
        monkeypatch.setattr(data, "WHOLE_FILE_MAX_BYTES", 0)  # streamed shards
    files = _numbered_files(tmp_path, [4, 4, 4])
    full = _values(data.slice_dataset(files, 8, 4, seed=5), 5)
    expected = []
    for k in range(20):
        u = int(tf.random.stateless_uniform([], seed=[5, k], maxval=12, dtype=tf.int64))
        expected.append(10 * (u // 4) + u % 4)
    assert sum(full, []) == expected
    assert _values(data.slice_dataset(files, 8, 4, seed=5, start_step=2), 3) == full[2:]


def test_training_draws_are_uniform_over_records_not_files(tmp_path):
    files = _numbered_files(tmp_path, [1, 3])
    values = sum(_values(data.slice_dataset(files, 8, 8, seed=0), 50), [])
    share_of_first = sum(v < 10 for v in values) / len(values)
    # uniform over the 4 records: 1/4 (per file it would be 1/2); 400 draws, sd 0.022
    assert 0.17 < share_of_first < 0.33
    assert set(values) == {0, 10, 11, 12}


def test_one_record_per_file_draws_file_u_k(tmp_path):
    """The released layout keeps the stream runs saved before records were indexed drew."""
    files = _numbered_files(tmp_path, [1] * 5)
    got = sum(_values(data.slice_dataset(files, 8, 5, seed=3), 2), [])
    assert got == [10 * int(tf.random.stateless_uniform([], seed=[3, k], maxval=5,
                                                        dtype=tf.int64)) for k in range(10)]


def test_augmentation_is_keyed_by_slice_and_repeats_on_resume(tmp_path):
    from lib.augment import IDENTITY, make_augment

    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, 16, 3)).astype(np.float32)
    path = str(tmp_path / "one.tfrecords")
    data.write_slices(path, [(image, rng.integers(0, 3, (16, 16)))])

    def batches(start_step, n):
        ds = data.slice_dataset([path], 16, 2, seed=1, start_step=start_step,
                                augment=make_augment({**{k: (0.0, v, v) for k, v in IDENTITY.items()},
                                                      "rotate": (1.0, -15.0, 15.0),
                                                      "noise": (1.0, 0.1, 0.1)}))
        return [x.numpy() for x, _ in (b for _, b in zip(range(n), ds))]

    full, resumed = batches(0, 4), batches(2, 2)
    for a, b in zip(full[2:], resumed):
        np.testing.assert_array_equal(a, b)
    # the same slice drawn twice is augmented differently
    assert not np.allclose(full[0][0], full[0][1])


def test_count_records_names_a_truncated_file(tmp_path):
    files = _numbered_files(tmp_path, [3])
    assert data.count_records(files[0]) == 3
    raw = open(files[0], "rb").read()
    open(files[0], "wb").write(raw[:-5])
    with pytest.raises(data.DataError, match="numbered_0.tfrecords: truncated or corrupt"):
        data.count_records(files[0])


def test_npz_volume_with_flip(tmp_path):
    img = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    lab = (img > 10).astype(np.int32)
    path = str(tmp_path / "case_1.npz")
    np.savez(path, np.flip(img, (0, 1)), np.flip(lab, (0, 1)))
    vol = data.load_volume(path, flip=True)
    np.testing.assert_array_equal(vol.image, img)
    np.testing.assert_array_equal(vol.label, lab)
    assert vol.name == "case_1"
    assert vol.spacing is None  # an .npz file carries no voxel size


def test_stack_context_replicates_edges():
    vol = np.arange(4, dtype=np.float32)[None, None, :] * np.ones((2, 2, 1))
    stacks = stack_context(vol)  # [D, H, W, 3]
    assert stacks.shape == (4, 2, 2, 3)
    assert [list(s[0, 0]) for s in stacks] == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]


def test_prediction_covers_every_slice():
    """A fake network whose argmax is the middle input channel: every slice must come back."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (8, 8, 7))

    def predict_fn(modality):
        return lambda x: tf.one_hot(tf.cast(x[..., 1], tf.int32), 3)

    for batch in (1, 3, 16):
        out = predict_volume_2d(predict_fn, "ct", labels.astype(np.float32), 8, batch)
        np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize("broken", ["image", "label"])
def test_broken_nifti_pair_names_the_broken_file(tmp_path, broken):
    import nibabel as nib

    paths = {}
    for part in ("image", "label"):
        paths[part] = str(tmp_path / f"case_{part}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), paths[part])
    with open(paths[broken], "rb") as handle:
        head = handle.read(60)
    with open(paths[broken], "wb") as handle:  # a gzip stream cut short
        handle.write(head)
    with pytest.raises(data.DataError) as err:
        data.load_volume(f"{paths['image']},{paths['label']}")
    message = str(err.value)
    assert message.startswith(paths[broken] + ": cannot read the " + broken)
    assert "\n" not in message


def test_resumed_validation_stream_continues_where_it_stopped(tiny_data):
    """Training validates one batch every DISPLAY_STEP steps: resumed at step 10 with
    DISPLAY_STEP 5, the validation stream starts at its third batch (2 used before)."""
    config = dict(SEED=0, IMAGE_SIZE=16, BATCH_SIZE=2, N_CLASS=3, CHECK_DATA=False,
                  DISPLAY_STEP=5, OUT_OF_RANGE_LABELS="error", FOREGROUND_SHARE=0.0)
    assert [data.validation_start(config, s) for s in (0, 4, 5, 10, 14)] == [0, 0, 1, 2, 2]
    train = {m: tiny_data[m]["train"] for m in ("mr", "ct")}
    val = {m: tiny_data[m]["val"] for m in ("mr", "ct")}
    _, fresh = data.slice_training_data(config, train, val, start_step=0)
    _, resumed = data.slice_training_data(config, train, val, start_step=10)
    expected = [b for _, b in zip(range(4), fresh)][2:]
    for (images, labels), (want_images, want_labels) in zip(resumed, expected):
        for m in ("mr", "ct"):
            np.testing.assert_array_equal(images[m], want_images[m])
            np.testing.assert_array_equal(labels[m], want_labels[m])


def test_validate_tfrecords_counts_good_files_and_names_every_bad_one(tmp_path):
    """All good: the number of records (one stream over all files). Two bad files among
    good ones: both named, the good ones not."""
    good = data.encode_slice(np.zeros((4, 4, 3)), np.zeros((4, 4)))
    paths = []
    for k, n in enumerate((1, 3, 2)):
        paths.append(str(tmp_path / f"good_{k}.tfrecords"))
        with tf.io.TFRecordWriter(paths[-1]) as writer:
            for _ in range(n):
                writer.write(good)
    assert data.validate_tfrecords(paths) == 6
    truncated = str(tmp_path / "truncated.tfrecords")
    open(truncated, "wb").write(open(paths[1], "rb").read()[:-7])
    not_an_example = str(tmp_path / "not_an_example.tfrecords")
    _write_records(not_an_example, [b"\x01\x02"])
    with pytest.raises(data.DataError) as err:
        data.validate_tfrecords([paths[0], truncated, paths[2], not_an_example], "list.txt")
    message = str(err.value)
    assert message.startswith("list.txt: 2 bad TFRecord file(s): ")
    assert truncated in message and not_an_example in message
    assert paths[0] not in message and paths[2] not in message


@pytest.mark.parametrize("ct, mr, expected", [
    (["a", "b"], ["c"], {"ct": ["a", "b"], "mr": ["c"]}),
    (["a", "b"], ["b"], {"ct": ["a", "ct_b"], "mr": ["mr_b"]}),
    (["x/a", "y/a"], ["b"], {"ct": ["ct_a_1", "ct_a_2"], "mr": ["b"]}),
])
def test_prediction_stems_never_share_a_file(tmp_path, ct, mr, expected):
    from lib.evaluate import prediction_stems

    lists = {}
    for modality, names in (("ct", ct), ("mr", mr)):
        lists[modality] = str(tmp_path / f"{modality}.txt")
        with open(lists[modality], "w", encoding="utf-8") as handle:
            handle.writelines(f"{n}_image.nii.gz,{n}_label.nii.gz\n" for n in names)
    assert prediction_stems(lists) == expected
