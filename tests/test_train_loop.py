"""The training loop's named steps one at a time, and the decisions a GPU run takes, injected
on the CPU: precision per GPU class, device prefetch, compact batches, host reads, timed
checkpoints, complete-checkpoint discovery and the run lock."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from lib.config import ConfigError, defaults
from lib.runtime import Hardware, input_device, resolve_precision

GPU = {cc: Hardware(gpus=((f"GPU {cc}", cc),)) for cc in [(6, 1), (7, 0), (7, 5), (8, 0),
                                                            (8, 6), (9, 0)]}


# ---------------------------------------------------------------------- the decisions
@pytest.mark.parametrize("precision, hardware, expected", [
    ("auto", GPU[(9, 0)], "bf16"),                      # H100
    ("auto", GPU[(8, 0)], "bf16"),                      # A100
    ("auto", GPU[(8, 6)], "bf16"),                      # RTX 30xx / A40
    ("auto", GPU[(7, 5)], "fp16"),                      # T4: tensor cores without bf16
    ("auto", GPU[(7, 0)], "fp16"),                      # V100
    ("auto", GPU[(6, 1)], "fp32"),                      # P100 class: no tensor cores
    ("auto", Hardware(gpus=(("A100", (8, 0)), ("V100", (7, 0)))), "fp16"),  # the slowest
    ("auto", Hardware(cpu_bf16=True), "bf16"),          # Xeon with AMX / AVX-512 bf16
    ("auto", Hardware(cpu_bf16=False), "fp32"),         # AVX2 only
    ("fp32", GPU[(9, 0)], "fp32"),                      # asked for: as asked
    ("fp16", Hardware(), "fp16"),
])
def test_auto_precision_for_each_kind_of_device(precision, hardware, expected):
    assert resolve_precision(precision, hardware) == expected


@pytest.mark.parametrize("units, onednn, expected", [
    (True, True, True), (True, False, False), (False, True, False)])
def test_cpu_bf16_needs_the_units_and_onednn(units, onednn, expected, monkeypatch):
    """bf16 units count only under oneDNN: with TF_ENABLE_ONEDNN_OPTS=0 "auto" is fp32."""
    from lib import fast_ops, runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: units)
    monkeypatch.setattr(fast_ops, "onednn_enabled", lambda: onednn)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert runtime.Hardware.detect().cpu_bf16 is expected


class _Replicas:
    def __init__(self, n):
        self.num_replicas_in_sync = n


@pytest.mark.parametrize("hardware, strategy, expected", [
    (GPU[(8, 0)], None, "/device:GPU:0"),       # one GPU: batches prefetched onto it
    (GPU[(8, 0)], _Replicas(1), "/device:GPU:0"),
    (GPU[(8, 0)], _Replicas(4), None),          # the distributed dataset does it per replica
    (Hardware(), None, None),                   # a CPU: the batches are where they are made
])
def test_input_device(hardware, strategy, expected):
    assert input_device(hardware, strategy) == expected


def test_device_prefetch_gives_the_same_batches():
    from lib.distribute import distribute_dataset

    ds = tf.data.Dataset.range(5).map(lambda i: ({"mr": tf.fill([2], i)}, {"mr": i * 2}))
    plain = [b for b in distribute_dataset(tf.distribute.get_strategy(), ds)]
    fetched = [b for b in distribute_dataset(tf.distribute.get_strategy(), ds, "/cpu:0")]
    assert len(fetched) == 5
    for (x, y), (fx, fy) in zip(plain, fetched):
        assert np.array_equal(x["mr"], fx["mr"]) and int(y["mr"]) == int(fy["mr"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_compact_batches_carry_the_float32_parse(tiny_data, dtype):
    """The batches as they travel (labels uint8, images in the compute dtype) hold the
    float32 parse's values: the labels exactly (a label 3 outside the classes too, as the
    no-class value of "ignore"), the images as the network's first cast makes them."""
    from lib.data import check_list_files, compact_batches, slice_dataset

    files = check_list_files(tiny_data["mr"]["train"])
    ref = next(iter(slice_dataset(files, 16, 4, seed=0)))
    ds = tf.data.Dataset.from_tensors(({"mr": ref[0]}, {"mr": tf.where(
        ref[1] == 2, 3, ref[1])}))
    x, y = next(iter(compact_batches(ds, dtype, n_class=3)))
    assert y["mr"].dtype == tf.uint8 and x["mr"].dtype == tf.as_dtype(dtype)
    assert np.array_equal(y["mr"].numpy().astype(np.int32), np.where(ref[1] == 2, 3, ref[1]))
    assert set(np.unique(y["mr"].numpy())) == {0, 1, 3}
    assert np.array_equal(tf.cast(x["mr"], tf.float32).numpy(),
                          tf.cast(tf.cast(ref[0], dtype), tf.float32).numpy())
    if dtype == "float32":
        assert np.array_equal(x["mr"].numpy(), ref[0].numpy())
    _, wide = next(iter(compact_batches(ds, dtype, n_class=300)))  # no byte for 0..300
    assert wide["mr"].dtype == tf.int32


# ---------------------------------------------------------------------- the loop's steps
@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from lib import settings
    from lib.train import Trainer
    from model_2d import build_model

    cfg = dict(defaults(vars(settings)), N_CLASS=3, CLASS_NAMES=["a", "b"], FEATURE_BASE=2,
               DROPOUT=0.0, PRECISION="fp32", LEARNING_RATE=1e-3,
               LR_SCHEDULE="step", LR_DECAY_STEPS=100,
               NUM_STEPS=10, DISPLAY_STEP=6, CHECKPOINT_SPACE=5, SUMMARY_STEP=4,
               PROGRESS=False, IMAGE_SIZE=16, NETWORK="dilated_resnet_2d")
    return Trainer(cfg, build_model(cfg), str(tmp_path_factory.mktemp("run")))


def _batches(seed=0):
    rng = np.random.default_rng(seed)
    while True:
        yield ({m: tf.constant(rng.normal(size=[2, 16, 16, 3]), tf.float32)
                for m in ("mr", "ct")},
               {m: tf.constant(rng.integers(0, 3, [2, 16, 16]), tf.uint8)
                for m in ("mr", "ct")})


def test_reads_at_the_summaries_validation_checkpoints_and_the_end(trainer):
    reads = [s for s in range(1, 21) if trainer.reads_at(s, 10)]
    # SUMMARY_STEP 4, DISPLAY_STEP 6, CHECKPOINT_SPACE 5, the last step 10
    assert reads == [4, 5, 6, 8, 10, 12, 15, 16, 18, 20]


@pytest.mark.parametrize("step, minutes, since, distribute, due", [
    (5, 0.0, 0.0, None, True),            # every CHECKPOINT_SPACE steps
    (7, 0.0, 1e9, None, False),           # never between them
    (10, 1.0, 59.0, None, False),         # too soon after the last one
    (10, 1.0, 61.0, None, True),
    (10, 1.0, 1.0, "multi_worker", True),  # workers' clocks differ: by steps only
])
def test_checkpoint_due(trainer, monkeypatch, step, minutes, since, distribute, due):
    import lib.train

    monkeypatch.setitem(trainer.config, "CHECKPOINT_MINUTES", minutes)
    monkeypatch.setitem(trainer.config, "DISTRIBUTE", distribute)
    monkeypatch.setattr(trainer, "saved_at", 1000.0)
    monkeypatch.setattr(lib.train.time, "monotonic", lambda: 1000.0 + since)
    assert trainer.checkpoint_due(step) is due


def test_next_batch_names_a_data_error(trainer):
    from lib.train import TrainingError

    def broken():
        yield from ()
        raise tf.errors.DataLossError(None, None, "corrupted record at 12")

    first = ({"mr": 1}, {"mr": 2})
    assert trainer.next_batch(iter([]), first) is first  # the batch checked before training
    with pytest.raises(TrainingError, match="step 7: reading the training data failed "
                                            r"\(corrupted record at 12\)"):
        trainer.next_batch(broken(), None, 7)


@pytest.mark.parametrize("failure, loss, message", [
    ([3, 1], float("inf"), "step 3: the loss is inf; stopped. Checkpoints written before"),
    ([5, 1], float("nan"), "step 5: the loss is nan"),
    ([4, 2], 0.0, "step 4: the fp16 gradients stayed non-finite through 256 halvings"),
])
def test_check_health_reports_the_first_failed_step(trainer, failure, loss, message):
    from lib.train import TrainingError

    try:
        trainer.failure.assign(failure)
        trainer.failure_loss.assign(loss)
        with pytest.raises(TrainingError, match=message):
            trainer.check_health()
    finally:
        trainer.failure.assign([-1, 0])
    assert trainer.check_health({"total": tf.constant(1.5)}) == 1.5


def test_the_loop_reads_the_device_only_where_it_logs_or_saves(trainer, monkeypatch):
    """The loss terms and the failure flag reach the host only at the read steps; the
    optimizer's step counter only once, at the start. Every read is counted: as a float,
    as numpy, or converted to a tensor (summaries) outside the compiled step."""
    from lib.train import Trainer

    reads, calls = [], [0]

    class Counted:  # a loss term as the step returns it, its host reads counted
        def __init__(self, value):
            self.value = value

        def numpy(self):
            reads.append(("terms", calls[0]))
            return self.value.numpy()

        def __float__(self):
            return float(self.numpy())

        def __array__(self, dtype=None, copy=None):
            return np.asarray(self.numpy(), dtype)

    tf.register_tensor_conversion_function(
        Counted, lambda v, dtype=None, name=None, as_ref=False: (
            reads.append(("terms", calls[0])), tf.convert_to_tensor(v.value, dtype))[1])
    step_fn = trainer.train_step

    def counted_step(images, labels):
        calls[0] += 1
        return {k: Counted(v) for k, v in step_fn(images, labels).items()}

    health = Trainer.check_health
    monkeypatch.setattr(trainer, "train_step", counted_step)
    monkeypatch.setattr(Trainer, "step", property(
        lambda self: (reads.append(("step", calls[0])),
                      int(self.optimizer.iterations.numpy()))[1]))
    monkeypatch.setattr(Trainer, "check_health", lambda self, terms=None: (
        reads.append(("failure", calls[0])), health(self, terms))[1])
    trainer.fit(_batches(), _batches(1), num_steps=10)
    assert calls[0] == 10
    assert sorted({s for kind, s in reads if kind == "terms"}) == [4, 5, 6, 8, 10]
    assert sorted(s for kind, s in reads if kind == "failure") == [4, 5, 6, 8, 10]
    assert [s for kind, s in reads if kind == "step"] == [0]  # fit's start, before any step
    assert int(trainer.optimizer.iterations.numpy()) == 10
    steps = [json.loads(line)["step"] for line in
             open(os.path.join(trainer.output_path, "log.jsonl"), encoding="utf-8")]
    assert steps == [4, 6, 8, 10]  # summaries (4, 8), validation (6), the last step (10)
    saved = sorted(int(p.split("-")[1].split(".")[0]) for p in
                   os.listdir(trainer.checkpoint_dir) if p.endswith(".index"))
    assert saved == [5, 10]


# ---------------------------------------------------------------------- checkpoints
def test_latest_checkpoint_skips_half_written_ones(tmp_path):
    from lib.run_dir import latest_checkpoint

    folder = str(tmp_path / "checkpoints")
    variables = {"w": tf.Variable([1.0, 2.0])}
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(**variables), folder, 5,
                                         checkpoint_name="model")
    for step in (2, 4, 6):
        manager.save(checkpoint_number=step)
    assert latest_checkpoint(folder).endswith("model-6")
    os.remove(os.path.join(folder, "model-6.data-00000-of-00001"))  # killed mid-save
    with open(os.path.join(folder, "model-4.index"), "wb") as handle:
        handle.write(b"\0" * 10)  # an index cut short
    assert latest_checkpoint(folder).endswith("model-2")
    # the state file names model-6 still: TensorFlow's own lookup would take it
    assert tf.train.latest_checkpoint(folder).endswith("model-6")
    assert latest_checkpoint(str(tmp_path / "none")) is None


# ---------------------------------------------------------------------- the run lock
def test_one_run_per_output_folder(tmp_path):
    from lib.run_dir import RunLock

    out = str(tmp_path / "run")
    messages = []
    log = type("Log", (), {"info": lambda self, m: messages.append(m)})()
    first = RunLock(out)
    first.acquire(log)
    holder = json.load(open(out + ".lock", encoding="utf-8"))
    assert holder["pid"] == os.getpid()
    with pytest.raises(ConfigError, match=f"another run \\(pid {os.getpid()}\\) is training"):
        RunLock(out).acquire(log)
    first.release()
    assert not os.path.exists(out + ".lock")

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(gone.stdout)  # a process that has ended: its lock is stale
    with open(out + ".lock", "w", encoding="utf-8") as handle:
        json.dump({"pid": dead, "host": holder["host"]}, handle)
    second = RunLock(out)
    second.acquire(log)
    assert messages == [f"{out}.lock: took over the lock of pid {dead}, which is gone"]
    second.release()

    with open(out + ".lock", "w", encoding="utf-8") as handle:
        json.dump({"pid": 1, "host": "another-machine"}, handle)
    with pytest.raises(ConfigError, match="locked by pid 1 on host another-machine"):
        RunLock(out).acquire(log)
    assert os.path.exists(out + ".lock")  # never removed on another host's behalf
    RunLock(out).release()  # a lock not taken is not released
    assert os.path.exists(out + ".lock")


def test_paper_preset_on_a_cpu_warns_and_logs_the_devices(capsys, tmp_path):
    import main_combine
    from lib.cli import main

    code = main(vars(main_combine), main_combine.network,
                ["--preset=paper", "--phase=train", f"--output_path={tmp_path / 'run'}"],
                main_combine.PRESETS, main_combine._ROOT)
    out = capsys.readouterr()
    assert code == 2  # the released data are not there
    assert "warning: the paper preset is about to train on the CPU" in out.out
    assert "devices: CPU only, no GPU visible to TensorFlow" in out.out
    assert "fast paths: precision fp32, XLA off, training batches on the host" in out.out
    assert "list file does not exist" in out.err


def test_a_run_prefetches_its_batches_to_the_input_device(tiny_data, tmp_path, capsys,
                                                         monkeypatch):
    """The device prefetch a GPU run takes, injected as the CPU (the only device here)."""
    import lib.pipeline
    import main_combine
    from conftest import tiny_overrides
    from lib.cli import main

    chosen = []
    monkeypatch.setattr(lib.pipeline, "input_device",
                        lambda hardware, strategy: chosen.append(hardware) or "/cpu:0")
    args = tiny_overrides(tiny_data, str(tmp_path / "run"), phase="train", num_steps=2)
    assert main(vars(main_combine), main_combine.network, args, main_combine.PRESETS,
                main_combine._ROOT) == 0
    assert len(chosen) == 1 and isinstance(chosen[0], Hardware)
    out = capsys.readouterr().out
    assert "training batches prefetched to /cpu:0, labels uint8 in transit" in out
    assert "model-2" in out


# ---------------------------------------------------------------------- XLA
def test_xla_compiles_the_real_step_and_it_matches(tmp_path, net="2d"):
    """The training step with jit_compile=True (XLA=True) from the same weights on the same
    batch: the same loss terms, and the same gradient (read back from Adam's first moment,
    exactly (1 - beta_1) x the gradient after the first step). 2D only: XLA's CPU compile
    of it takes a minute (3D passes too, in another minute: net="3d")."""
    from lib.cli import entry_module
    from lib.train import Trainer

    shape = {"2d": [2, 16, 16, 3], "3d": [2, 16, 16, 8, 1]}[net]
    module = entry_module(net)
    cfg = dict(defaults(vars(module)), N_CLASS=3, CLASS_NAMES=["a", "b"], FEATURE_BASE=2,
               DROPOUT=0.0, PRECISION="fp32", IMAGE_SIZE=16, PATCH_SIZE=[16, 16, 8])
    rng = np.random.default_rng(0)
    labels = {m: tf.constant(rng.integers(0, 3, shape[:-1]), tf.uint8) for m in ("mr", "ct")}
    images = {m: tf.constant(rng.normal(size=shape) + labels[m].numpy()[..., None],
                             tf.float32) for m in ("mr", "ct")}
    out, weights = {}, None
    for xla in (False, True):
        model = module.network().build_model(dict(cfg, XLA=xla))
        if weights is None:
            weights = [v.numpy() for v in model.variables]
        for v, w in zip(model.variables, weights):
            v.assign(w)
        trainer = Trainer(dict(cfg, XLA=xla), model, str(tmp_path / f"xla{xla}"))
        terms = {k: v.numpy() for k, v in trainer.train_step(images, labels).items()}
        beta_1 = float(trainer.optimizer.beta_1)
        grads = [m.numpy() / (1.0 - beta_1) for m in trainer.optimizer._momentums]
        out[xla] = terms, grads, trainer.traces
    (t0, g0, _), (t1, g1, traces) = out[False], out[True]
    assert traces == 1
    for key in t0:
        assert np.allclose(t1[key], t0[key], rtol=1e-5, atol=1e-6), key
    # XLA fuses the float32 arithmetic in another order, and how depends on the CPU's vector
    # width: the gradients differed by under 1e-5 of their scale on AVX2 and AMX CPUs, by
    # 1.1e-5 on an AVX-512 AMD EPYC.
    scale = max(float(np.max(np.abs(g))) for g in g0)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(g1, g0)) < 1e-4 * max(1.0, scale)
