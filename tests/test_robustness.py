"""Bad input, crashes and misuse: one-line errors, exit status 2, nothing on disk changed,
and runs that survive SIGKILL, SIGINT and NaN losses."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import main_combine
from conftest import ROOT, tiny_overrides, write_tiny_dataset
from lib.data import encode_slice, read_list, write_slices
from lib.cli import main
from lib.run_dir import trim_log


def run(args):
    return main(vars(main_combine), main_combine.network, args, main_combine.PRESETS,
                main_combine._ROOT)


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture
def data(tmp_path):
    return write_tiny_dataset(str(tmp_path / "data"))


def test_truncated_tfrecord(data, tmp_path, capsys):
    bad = read_list(data["ct"]["train"])[3]
    raw = open(bad, "rb").read()
    open(bad, "wb").write(raw[: len(raw) // 2])
    out = str(tmp_path / "run")
    assert run(tiny_overrides(data, out, phase="train")) == 2
    err = error_line(capsys)
    assert bad in err and "truncated or corrupt" in err
    assert not os.path.exists(out)  # nothing written


def test_record_with_wrong_byte_length(data, tmp_path, capsys):
    bad = read_list(data["mr"]["val"])[0]
    ex = tf.train.Example.FromString(encode_slice(np.zeros((16, 16, 3)), np.zeros((16, 16))))
    ex.features.feature["data_vol"].bytes_list.value[0] = b"\0" * (16 * 16 * 2 * 4)
    with tf.io.TFRecordWriter(bad) as w:
        w.write(ex.SerializeToString())
    out = str(tmp_path / "run")
    assert run(tiny_overrides(data, out, phase="train")) == 2
    err = error_line(capsys)
    assert bad in err and "data_vol has 2048 bytes" in err
    assert not os.path.exists(out)


def test_bad_record_met_in_training_when_the_start_check_is_off(data, tmp_path, capsys):
    files = read_list(data["mr"]["train"])
    ex = tf.train.Example.FromString(encode_slice(np.zeros((16, 16, 3)), np.zeros((16, 16))))
    ex.features.feature["label_vol"].bytes_list.value[0] = b"\0" * 100
    for path in files:
        with tf.io.TFRecordWriter(path) as w:
            w.write(ex.SerializeToString())
    out = str(tmp_path / "run")
    assert run(tiny_overrides(data, out, phase="train", check_data=False)) == 2
    err = error_line(capsys)
    assert any(f in err for f in files) and "byte length does not match" in err


@pytest.mark.parametrize("kind", ["label", "nan"])
def test_bad_values_met_in_a_batch_name_the_file(data, tmp_path, capsys, kind):
    files = read_list(data["mr"]["train"])
    for path in files:  # every MR slice bad, so the first batch meets one
        image = np.zeros((16, 16, 3), np.float32)
        label = np.zeros((16, 16))
        if kind == "label":
            label[0, 0] = 3  # N_CLASS = 3: valid labels are 0..2
        else:
            image[1, 1, 1] = np.nan
        write_slices(path, [(image, label)])
    out = str(tmp_path / "run")
    assert run(tiny_overrides(data, out, phase="train")) == 2
    err = error_line(capsys)
    assert any(f in err for f in files)
    assert ("label values outside 0..2" if kind == "label" else "NaN or Inf") in err
    assert not os.path.exists(out)


def test_list_naming_missing_files_names_them_all(data, tmp_path, capsys):
    with open(data["ct"]["train"], "a", encoding="utf-8") as handle:
        handle.write("gone_1.tfrecords\ngone_2.tfrecords\n")
    out = str(tmp_path / "run")
    assert run(tiny_overrides(data, out, phase="train")) == 2
    err = error_line(capsys)
    assert "2 listed file(s) do not exist" in err and "gone_1" in err and "gone_2" in err
    assert not os.path.exists(out)


def test_missing_and_mismatched_test_checkpoints(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run(tiny_overrides(data, out, phase="train", num_steps=2)) == 0
    prefix = os.path.join(out, "checkpoints", "model-2")
    assert run(tiny_overrides(data, out, phase="test", test_model=prefix + "x")) == 2
    assert "does not exist" in error_line(capsys)
    assert run(tiny_overrides(data, out, phase="test", test_model=prefix, feature_base=4,
                              scheme="joint")) == 2
    err = error_line(capsys)
    assert "FEATURE_BASE=2 there, 4 now" in err and "SCHEME='ummkd' there, 'joint' now" in err
    # dropout off changes the variables (no seed generators): refused in one line; another
    # rate is the same network, and tests
    assert run(tiny_overrides(data, out, phase="test", test_model=prefix, dropout=0.0)) == 2
    assert "DROPOUT=0.25 there, 0.0 now" in error_line(capsys)
    assert run(tiny_overrides(data, out, phase="test", test_model=prefix, dropout=0.5)) == 0



def test_kd_classes_checked_and_old_runs_without_it_resume(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run(tiny_overrides(data, out, phase="train", num_steps=2, kd_classes="some")) == 2
    assert "KD_CLASSES: expected one of all, present, got 'some'" in error_line(capsys)
    assert not os.path.exists(out)
    assert run(tiny_overrides(data, out, phase="train", num_steps=2)) == 0
    # A run saved before KD_CLASSES existed trained with "all": it resumes as it is ...
    path = os.path.join(out, "config.json")
    saved = json.load(open(path, encoding="utf-8"))
    del saved["KD_CLASSES"]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(saved, handle)
    assert run(tiny_overrides(data, out, phase="train", num_steps=3)) == 0
    assert os.path.exists(os.path.join(out, "checkpoints", "model-3.index"))
    # ... and is refused with the other choice.
    assert run(tiny_overrides(data, out, phase="train", num_steps=4,
                              kd_classes="present")) == 2
    assert "KD_CLASSES='all' there, 'present' now" in error_line(capsys)


def test_start_over_moves_the_old_run_aside(data, tmp_path):
    out = str(tmp_path / "run")
    assert run(tiny_overrides(data, out, phase="train", num_steps=2)) == 0
    assert run(tiny_overrides(data, out, phase="train", num_steps=2, feature_base=4,
                              start_over=True)) == 0
    old = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
    assert len(old) == 1
    assert os.path.exists(tmp_path / old[0] / "checkpoints" / "model-2.index")
    assert json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))["FEATURE_BASE"] == 4


def test_nan_loss_stops_and_keeps_earlier_checkpoints(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run(tiny_overrides(data, out, phase="train", num_steps=2)) == 0
    capsys.readouterr()
    # An L2 weight of 1e38 makes the loss infinite at the first step after the resume.
    assert run(tiny_overrides(data, out, phase="train", num_steps=6, resume=True,
                              miu_seg_l2_norm=1e38)) == 2
    err = error_line(capsys)
    assert "step 3: the loss is inf" in err
    assert tf.train.latest_checkpoint(os.path.join(out, "checkpoints")).endswith("model-2")


def _cmd(data, out, **extra):
    args = tiny_overrides(data, out, phase="train", deterministic=True, **extra)
    return [sys.executable, os.path.join(ROOT, "main_combine.py")] + args


def _losses(out):
    """Logged total loss of every step; a step logged twice is an error."""
    losses = {}
    for line in open(os.path.join(out, "log.jsonl"), encoding="utf-8"):
        record = json.loads(line)
        assert record["step"] not in losses, f"step {record['step']} logged twice"
        losses[record["step"]] = record["loss/total"]
    return losses


def _logged_steps(out):
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return []
    lines = open(path, encoding="utf-8").read().splitlines()
    return [json.loads(line)["step"] for line in lines[:-1]]  # the last may be half written


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def test_sigkill_resume_matches_an_uninterrupted_run(data, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    steps = dict(num_steps=30, checkpoint_space=5, display_step=1000)
    ref = str(tmp_path / "ref")
    subprocess.run(_cmd(data, ref, **steps), check=True, capture_output=True, env=env)
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(_cmd(data, out, **steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    _wait_for(os.path.join(out, "checkpoints", "model-10.index"), proc)
    # kill between checkpoints, after steps that the resumed run trains (and logs) again
    t0 = time.time()
    while _logged_steps(out)[-1:] < [12] and proc.poll() is None and time.time() - t0 < 60:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_at = int(tf.train.latest_checkpoint(os.path.join(out, "checkpoints")).split("-")[-1])
    assert 10 <= resumed_at < 30
    subprocess.run(_cmd(data, out, **steps), check=True, capture_output=True, env=env)
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    assert f"model-{resumed_at} at step {resumed_at}" in log
    a, b = _losses(out), _losses(ref)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert [a[s] for s in range(1, 31)] == [b[s] for s in range(1, 31)]  # bit for bit


# A shell's background job starts with SIGINT ignored, and its children inherit that:
# there, no Ctrl-C can reach a training run.
needs_sigint = pytest.mark.skipif(signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
                                  reason="SIGINT is ignored in this process (a background job)")


@needs_sigint
def test_sigint_writes_a_checkpoint_and_exits(data, tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen(_cmd(data, out, num_steps=100000, checkpoint_space=5),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        _wait_for(os.path.join(out, "checkpoints", "model-5.index"), proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # never leave a 100,000-step run behind
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    step = int(tf.train.latest_checkpoint(os.path.join(out, "checkpoints")).split("-")[-1])
    assert step >= 5  # the checkpoint written on the interrupt (or a later regular one)
    assert f"interrupted at step {step}" in open(os.path.join(out, "train.log"), encoding="utf-8").read()


@needs_sigint
def test_ctrl_c_waits_for_the_step_inside_the_training_loop():
    """lib.interrupt in a bare process: inside deferred() a first SIGINT only sets the flag
    (check() raises), a second one interrupts at once; outside it SIGINT interrupts."""
    script = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from lib import interrupt
assert interrupt.install()
seen = []
with interrupt.deferred():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)  # a step: not interrupted
    seen.append("step finished")
    try:
        interrupt.check()
    except KeyboardInterrupt:
        seen.append("check raised")
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
        time.sleep(2)
    except KeyboardInterrupt:
        seen.append("second interrupted")
interrupt.check()  # the flag does not outlive the loop
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(2)
except KeyboardInterrupt:
    seen.append("outside interrupted")
print(",".join(seen))
"""
    out = subprocess.run([sys.executable, "-c", script, ROOT], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("step finished,check raised,second interrupted,"
                                  "outside interrupted")


def test_trim_log_drops_steps_after_the_restored_one(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = ['{"step": 1, "x": 1}\n', '{"step": 2}\n', 'not json\n', '{"step": 3}\n',
             '{"step": 4}\n', '{"step": 5}\n', '{"step": 6, "x"']  # cut off by a kill
    path.write_text("".join(lines), encoding="utf-8")
    assert trim_log(str(path), 3) == 3  # steps 4 and 5, and the cut-off line
    assert path.read_text(encoding="utf-8") == "".join(lines[:4])
    assert os.listdir(tmp_path) == ["log.jsonl"]  # no temporary file left
    before = os.stat(path).st_mtime_ns
    assert trim_log(str(path), 3) == 0 and os.stat(path).st_mtime_ns == before
    assert trim_log(str(tmp_path / "missing.jsonl"), 3) == 0
