"""DISTRIBUTE on the CPU: "mirrored" over 2 logical devices, "multi_worker" over 2 processes.

The reference is always one device with the same global batch: the distributed loss must
be the loss of the whole batch (Dice, class weights and class-wise KD logits are statistics
of the batch), and the replicas' gradients, summed as the optimizer sums them, its gradient.

Logical CPU devices must be configured before TensorFlow initialises its devices, which
the test process has long done, so the mirrored comparison runs in a fresh Python process
(this file run as a script) that prints its measurements as JSON; the assertions are here.
"""
import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TIMEOUT = 300  # seconds for any child process; a hung collective must not hang the suite

# Tiny networks with the distillation term on, synchronised BN, no dropout (per-replica BN
# statistics and dropout masks legitimately differ between 1 and 2 replicas), float32.
NETWORKS = {
    "2d": dict(NETWORK="dilated_resnet_2d", IMAGE_SIZE=16, FEATURE_BASE=2, DROPOUT=0.0),
    "3d": dict(NETWORK="unet3d", PATCH_SIZE=[16, 16, 8], FEATURE_BASE=2),
}
BATCH = 4  # global batch per modality: 2 per replica


# ---------------------------------------------------------------------- the child process
def _config(net: str) -> dict:
    from lib import settings
    from lib.config import constants

    config = constants(vars(settings))
    config.update(N_CLASS=3, CLASS_NAMES=["a", "b"], SCHEME="ummkd", MIU_KD=0.5,
                  SYNC_BN=True, PRECISION="fp32", BATCH_SIZE=BATCH, LEARNING_RATE=1e-3,
                  LR_SCHEDULE="step", LR_DECAY_STEPS=100, CPU_DEVICES=2, **NETWORKS[net])
    if net == "3d":  # the KD over the classes present in both batches (global counts)
        config["KD_CLASSES"] = "present"
    return config


def _batch(net: str, seed: int = 0):
    """A global batch ({m: x}, {m: y}) as numpy, every class present.

    The class frequencies differ between the first and the second half of the batch (the
    two replicas' shares), so per-replica statistics would give clearly different losses.
    In 3D the first CT replica has no class 2: with KD_CLASSES="present" a replica that
    decided from its own counts would drop class 2 from its KD term.
    """
    rng = np.random.default_rng(seed)
    shape = [BATCH, 16, 16, 3] if net == "2d" else [BATCH, 16, 16, 8, 1]
    images, labels = {}, {}
    for m in ("mr", "ct"):
        first = [0.8, 0.2, 0.0] if (net, m) == ("3d", "ct") else [0.8, 0.15, 0.05]
        y = np.stack([rng.choice(3, shape[1:-1], p=first if i < BATCH // 2
                                 else [0.3, 0.2, 0.5]) for i in range(BATCH)])
        labels[m] = y.astype(np.int32)
        images[m] = (rng.normal(0, 1, shape) + y[..., None]).astype(np.float32)
    return images, labels


def _one_step(net: str, kind, reference=None, sync_bn: bool = True) -> dict:
    """Loss terms of one training step under ``kind`` and the gradient it applied.

    The gradient is read back from the optimizer: after its first step from zero, Adam's
    first moment is exactly (1 - beta_1) times the gradient it was given, that is the
    replicas' gradients as the optimizer aggregated them (a MEAN instead of a SUM would
    halve it).
    """
    import tempfile

    import tensorflow as tf

    from lib import losses
    from lib.distribute import distribute_dataset, make_strategy
    from lib.layers import bn_layers
    from lib.runtime import get_logger, setup_runtime
    from lib.train import Trainer

    if net == "2d":
        from model_2d import build_model
    else:
        from model_3d import build_model
    config = dict(_config(net), DISTRIBUTE=kind, SYNC_BN=sync_bn)
    strategy = make_strategy(config)
    setup_runtime(config)
    with strategy.scope():
        model = build_model(config)
    if reference is not None:  # the very same starting weights
        for v, value in zip(model.variables, reference["weights0"]):
            v.assign(value)
    trainer = Trainer(config, model, tempfile.mkdtemp(), get_logger(None), strategy)
    batch = next(iter(distribute_dataset(strategy, tf.data.Dataset.from_tensors(_batch(net)))))
    out = {"weights0": [v.numpy() for v in model.variables],
           "replica_batch": [int(x.shape[0]) for x in
                             strategy.experimental_local_results(batch[0]["mr"])]}
    out["terms"] = {k: np.asarray(v) for k, v in trainer.train_step(*batch).items()}
    beta_1 = float(trainer.optimizer.beta_1)
    out["grads"] = [np.asarray(m.numpy()) / (1.0 - beta_1) for m in trainer.optimizer._momentums]
    # Every replica's copy of every variable (weights, BN statistics, optimizer slots) must
    # still be the same after the step: the largest difference from the first copy.
    copies = [strategy.experimental_local_results(getattr(v, "value", v))
              for v in [*model.variables, *trainer.optimizer.variables]]
    out["replica_spread"] = max(float(np.max(np.abs(c.numpy() - cs[0].numpy())))
                                for cs in copies for c in cs)
    out["first_moving_mean"] = bn_layers(model)[0].moving_mean.numpy()
    if kind is None:
        # What splitting the batch naively would give: the mean of the two halves' losses
        # (on the same logits, as synchronised BN gives), to show the comparison can fail.
        images, labels = _batch(net)
        for v, value in zip(model.variables, out["weights0"]):
            v.assign(value)
        x = tf.concat([images["mr"], images["ct"]], axis=0)
        logits = tf.split(model(x, modalities=("mr", "ct"), training=True), 2)
        halves = []
        for h in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
            total, _ = losses.total_loss(
                {"mr": logits[0][h], "ct": logits[1][h]},
                {"mr": labels["mr"][h], "ct": labels["ct"][h]}, trainer.kernels,
                **trainer.loss_kwargs)
            halves.append(float(total))
        out["naive_total"] = float(np.mean(halves))
    return out


def mirrored_child(net: str) -> dict:
    """One step of ``net`` on one device and on 2 logical CPU devices: the differences.

    The two round differently (1e-6); at LeakyReLU's kink that can flip one element's
    slope and move every gradient behind it by a few tenths of a per cent, so both run
    with a smooth LeakyReLU here (the distributed code under test is unchanged)."""
    import tensorflow as tf

    from lib.config import ConfigError
    from lib.distribute import cpu_devices, make_strategy

    tf.nn.leaky_relu = lambda x, alpha=0.2: (
        alpha * x + (1.0 - alpha) * tf.nn.softplus(4.0 * x) / 4.0)

    cpu_devices(2)
    report = {}
    try:  # 3 slices per modality cannot be split over 2 replicas
        make_strategy(dict(_config(net), DISTRIBUTE="mirrored", BATCH_SIZE=3))
        report["batch_error"] = None
    except ConfigError as err:
        report["batch_error"] = str(err)
    single = _one_step(net, None)
    mirrored = _one_step(net, "mirrored", single)
    pairs = list(zip(mirrored["grads"], single["grads"]))
    report[net] = {
        "replica_batch": mirrored["replica_batch"],
        "total_single": float(single["terms"]["total"]),
        "total_mirrored": float(mirrored["terms"]["total"]),
        "naive_total": single["naive_total"],
        "terms_abs": max(float(np.max(np.abs(mirrored["terms"][k] - single["terms"][k])))
                         for k in single["terms"]),
        "grads_abs": max(float(np.max(np.abs(a - b))) for a, b in pairs),
        "grad_scale": max(float(np.max(np.abs(b))) for _, b in pairs),
        "replica_spread": mirrored["replica_spread"],
    }
    if net == "3d":  # (cheap to build) per-replica BN statistics
        own = _one_step(net, "mirrored", single, sync_bn=False)
        report[net]["own_bn_spread"] = own["replica_spread"]
        # The first BN sees the same convolution output on every path; the mean of the two
        # replicas' batch means (equal halves) is the global batch mean.
        report[net]["own_bn_first_mean_abs"] = float(np.max(np.abs(
            own["first_moving_mean"] - single["first_moving_mean"])))
        report[net]["kd"] = _kd_replicas()
    else:
        report[net]["dropout_masks_equal"] = _replica_dropout_masks_equal()
    return report


def _replica_dropout_masks_equal() -> bool:
    """Whether the two replicas of one dropout unit, on the same input, drop alike."""
    import tensorflow as tf

    from conftest import show_dropout
    from lib.distribute import make_strategy
    from lib.layers import ConvUnit

    x = tf.ones([2, 8, 8, 4])
    strategy = make_strategy(dict(_config("2d"), DISTRIBUTE="mirrored"))
    with strategy.scope():
        unit = ConvUnit(4, 3, dropout=0.25, seed=11)
        unit.build(x.shape)
        show_dropout(unit)
    masks = strategy.experimental_local_results(
        strategy.run(tf.function(lambda: tf.cast(unit(x, training=True) != 0, tf.float32))))
    return bool(np.array_equal(masks[0].numpy(), masks[1].numpy()))


def _kd_replicas() -> dict:
    """KD of fixed, large logits on the 3D batch: the single-device value, each replica's.

    The network's logits at initialisation are too alike across modalities for the KD term
    to show in the loss comparison above; these are not. CT's first replica has no class 2.
    """
    import tensorflow as tf

    from lib import losses
    from lib.distribute import distribute_dataset, make_strategy

    _, labels = _batch("3d")
    rng = np.random.default_rng(1)
    scale = {"mr": 4.0, "ct": 1.0}  # class-mean logits about 4 e_c (MR) and e_c (CT)
    logits = {m: (scale[m] * np.eye(3)[labels[m]] + rng.normal(0, 1, labels[m].shape + (3,))
                  ).astype(np.float32) for m in labels}

    def kd(lg, lb, classes):
        return losses.kd_loss(tf.convert_to_tensor(lg["mr"]), tf.one_hot(lb["mr"], 3),
                              tf.convert_to_tensor(lg["ct"]), tf.one_hot(lb["ct"], 3), 2.0,
                              classes)

    strategy = make_strategy(dict(_config("3d"), DISTRIBUTE="mirrored"))
    batch = next(iter(distribute_dataset(
        strategy, tf.data.Dataset.from_tensors((logits, labels)))))
    out = {}
    for classes in losses.KD_CLASSES:
        values = strategy.run(tf.function(lambda lg, lb: kd(lg, lb, classes)), args=batch)
        out[classes] = {"single": float(kd(logits, labels, classes)),
                        "replicas": [float(v) for v in
                                     strategy.experimental_local_results(values)]}
    return out


def test_mirrored_two_cpu_devices_equal_one_device():
    # One process per network, side by side: building the two steps is mostly tracing,
    # one core each.
    procs = {net: subprocess.Popen([sys.executable, __file__, "mirrored", net], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                                            PYTHONPATH=os.pathsep.join(sys.path)))
             for net in NETWORKS}
    report = {}
    try:
        for net, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, err[-3000:]
            result = json.loads(out.strip().splitlines()[-1])
            assert result.pop("batch_error", "").startswith("BATCH_SIZE: 3 (global"), result
            report.update(result)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert set(report) == set(NETWORKS)
    for net, r in report.items():
        assert r["replica_batch"] == [BATCH // 2, BATCH // 2], net  # really split in two
        # The loss of the global batch, not a mean of per-replica losses.
        assert abs(r["total_mirrored"] - r["total_single"]) < 1e-5, (net, r)
        assert abs(r["naive_total"] - r["total_single"]) > 1e-3, (net, r)
        assert r["terms_abs"] < 1e-5, (net, r)
        # The gradient the optimizer applied (the replicas' gradients, aggregated) is the
        # single-device gradient, to 1e-5 of its scale.
        assert r["grads_abs"] < 1e-5 * max(1.0, r["grad_scale"]), (net, r)
        # ... and the replicas' copies of the variables stayed identical.
        assert r["replica_spread"] == 0.0, (net, r)
    # Per-replica BN statistics (no SYNC_BN): the moving statistics are averaged over the
    # replicas, so the copies still agree, and the first layer's moving mean is the
    # single device's (0.1 x the global batch mean after one step).
    # Each replica draws its own dropout mask (its batch is another share).
    assert report["2d"]["dropout_masks_equal"] is False, report["2d"]
    assert report["3d"]["own_bn_spread"] == 0.0, report["3d"]
    assert report["3d"]["own_bn_first_mean_abs"] < 1e-6, report["3d"]
    # The KD term from the global class counts and sums on every replica, for both
    # KD_CLASSES. Every class is in both global batches, so "present" equals "all"; a
    # replica deciding "present" from its own share would drop class 2 on the first one.
    kd = report["3d"]["kd"]
    for classes, r in kd.items():
        assert len(r["replicas"]) == 2, classes
        for value in r["replicas"]:
            assert value == pytest.approx(r["single"], rel=1e-5), (classes, r)
    assert kd["present"]["single"] == pytest.approx(kd["all"]["single"], rel=1e-6), kd
    assert kd["all"]["single"] > 0.05, kd


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if sys.argv[1] == "mirrored":
        print(json.dumps(mirrored_child(sys.argv[2])))


# ---------------------------------------------------------------------- multi_worker
def free_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 right now (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_workers(args: list[str], scratch: list[str]) -> list[subprocess.CompletedProcess]:
    """main_combine.py as worker 0 (chief) and worker 1 of a 2-worker cluster on loopback."""
    hosts = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), TMPDIR=scratch[index],
                   TF_CPP_MIN_LOG_LEVEL="2")
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "main_combine.py"),
                                       *args], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def log_records(output: str) -> list[dict]:
    with open(os.path.join(output, "log.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if '"loss/total"' in line]


def test_multi_worker_two_processes_equal_one_process(tiny_data, tmp_path):
    import main_combine
    from conftest import tiny_overrides
    from lib.cli import main

    # Synchronised BN and no dropout: the two workers' halves of each batch then give the
    # losses of the whole batch exactly (up to float rounding).
    # No validation stream: it would only add the tracing of another step function.
    # The staircase schedule: with "poly" the 2-step first run would decay to 0 at its end.
    common = dict(sync_bn="true", dropout=0.0, num_steps=2, checkpoint_space=2,
                  source_val_list="", target_val_list="", lr_schedule="step")
    single = str(tmp_path / "single")
    args = tiny_overrides(tiny_data, single, phase="train", **dict(common, num_steps=4))
    assert main(vars(main_combine), main_combine.network, args, main_combine.PRESETS,
                main_combine._ROOT) == 0

    out = str(tmp_path / "cluster")
    scratch = [str(tmp_path / f"tmp{i}") for i in range(2)]
    for folder in scratch:
        os.makedirs(folder)
    # Train 2 steps, then resume to 4 and test (the test phase runs on the chief only).
    for extra in (dict(phase="train"), dict(phase="train_test", num_steps=4)):
        args = tiny_overrides(tiny_data, out, distribute="multi_worker",
                              **dict(common, **extra))
        started = time.time()
        results = run_workers(args, scratch)
        for index, result in enumerate(results):
            assert result.returncode == 0, (index, result.stderr[-3000:])
        assert time.time() - started < TIMEOUT

    # The same losses as one process with the whole batch, step by step. The first step's
    # loss is computed from the same weights: equal to float rounding. Later steps drift
    # (measured: 1e-6 at step 2, up to 5e-4 by step 5): Adam's first updates are about
    # lr * sign(g), and some BN gradients are ~1e-8, where rounding decides the sign. A
    # wrong batch or a per-replica loss would differ by 1e-2 or more.
    reference, cluster = log_records(single), log_records(out)
    assert [r["step"] for r in cluster] == [1, 2, 3, 4]  # written once, by the chief
    assert [r["step"] for r in reference] == [1, 2, 3, 4]
    keys = ("loss/total", "loss/mr_dice", "loss/ct_dice", "loss/mr_ce", "loss/ct_ce", "loss/kd")
    for ref, got in zip(reference, cluster):
        tolerance = 1e-5 if ref["step"] == 1 else 2e-3
        for key in keys:
            assert abs(got[key] - ref[key]) < tolerance, (ref["step"], key, got[key], ref[key])
    # Only the chief wrote into OUTPUT_PATH: one event file per run and split, its
    # checkpoints; the other worker's temporary checkpoints are gone.
    ckpts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "checkpoints", "*.index")))
    assert ckpts == ["model-2.index", "model-4.index"]
    assert len(glob.glob(os.path.join(out, "logs", "train", "events.out.tfevents.*"))) == 2
    assert "resumed from" in open(os.path.join(out, "train.log"), encoding="utf-8").read()
    assert os.listdir(scratch[1]) == []
    report = json.load(open(os.path.join(out, "results", "metrics.json"), encoding="utf-8"))
    assert report["checkpoint"].endswith("model-4")


# ---------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("args, tf_config, message", [
    (["--distribute=foo"], None, "DISTRIBUTE: expected none, mirrored or multi_worker"),
    (["--distribute=multi_worker"], None, "DISTRIBUTE: multi_worker needs the TF_CONFIG"),
    (["--distribute=multi_worker"], '{"cluster": {}}', "DISTRIBUTE: TF_CONFIG is not"),
    (["--distribute=mirrored", "--xla=true"], None, "XLA: TensorFlow cannot compile a step "
                                                    "that synchronises replicas"),
    (["--cpu_devices=-1"], None, "CPU_DEVICES: expected an integer >= 0"),
])
def test_bad_distribute_settings_are_one_line_errors(args, tf_config, message, monkeypatch,
                                                     capsys):
    import main_combine
    from lib.cli import main

    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    assert main(vars(main_combine), main_combine.network, args, main_combine.PRESETS,
                main_combine._ROOT) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err, err
