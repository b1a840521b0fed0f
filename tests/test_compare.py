"""experiments/compare.py: parameter counts of the schemes, KD only for UMMKD, end to end."""
import csv
import importlib.util
import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, tiny_overrides, write_tiny_dataset
from lib.schemes import SCHEMES, STAGES, get_scheme

_spec = importlib.util.spec_from_file_location(
    "compare", os.path.join(ROOT, "experiments", "compare.py"))
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


# ---------------------------------------------------------------- hand counts
def _stages_2d(f, k):
    """{stage: (conv weights incl. biases, BN channels)} from model_2d.py's docstring."""
    counts = {s: [0, 0] for s in STAGES}

    def unit(stage, cin, cout):  # pre-activation unit: BN over cin, conv 3x3 cin->cout
        counts[stage][0] += 9 * cin * cout
        counts[stage][1] += cin

    def res(stage, cin, cout):
        unit(stage, cin, cout)
        unit(stage, cout, cout)

    counts["first"][0] += 9 * 3 * f  # stem conv 3x3 3->f
    res("first", f, f)
    for cin, cout in [(f, 2 * f), (2 * f, 4 * f), (4 * f, 4 * f), (4 * f, 8 * f),
                      (8 * f, 8 * f), (8 * f, 16 * f), (16 * f, 16 * f), (16 * f, 16 * f),
                      (16 * f, 16 * f), (16 * f, 32 * f), (32 * f, 32 * f)]:
        res("encoder", cin, cout)
    res("decoder", 32 * f, 32 * f)
    res("decoder", 32 * f, 32 * f)
    unit("decoder", 32 * f, 32 * f)
    unit("decoder", 32 * f, 32 * f)
    counts["last"][0] += 9 * 32 * f * 512 * k  # G10 conv to 8*8*8*k channels
    counts["last"][1] += 512 * k               # its BN
    counts["last"][0] += 25 * 8 * k * k + k    # 5x5 output conv with bias
    return counts


def _stages_3d(f, k):
    """{stage: (conv weights incl. biases, BN channels)} from model_3d.py's docstring."""
    counts = {s: [0, 0] for s in STAGES}

    def unit(stage, cin, cout, taps):  # conv (or transposed conv) -> BN over cout
        counts[stage][0] += taps * cin * cout
        counts[stage][1] += cout

    for stage, cin, cout, taps in [
            ("first", 1, f, 27), ("first", f, 2 * f, 27),
            ("encoder", 2 * f, 2 * f, 27), ("encoder", 2 * f, 4 * f, 27),
            ("encoder", 4 * f, 4 * f, 9), ("encoder", 4 * f, 8 * f, 9),
            ("encoder", 8 * f, 8 * f, 9), ("encoder", 8 * f, 16 * f, 9),
            ("decoder", 16 * f, 8 * f, 9), ("decoder", 16 * f, 8 * f, 9),  # up3 + concat 8f
            ("decoder", 8 * f, 8 * f, 9),
            ("decoder", 8 * f, 8 * f, 9), ("decoder", 12 * f, 4 * f, 27),  # up2 + concat 4f
            ("decoder", 4 * f, 4 * f, 27),
            ("last", 4 * f, 4 * f, 27), ("last", 6 * f, 2 * f, 27),        # up1 + concat 2f
            ("last", 2 * f, 2 * f, 27)]:
        unit(stage, cin, cout, taps)
    counts["last"][0] += 2 * f * k + k  # 1x1x1 logits with bias
    return counts


def _expected(stage_counts, scheme):
    """Trainable parameters: a modality-specific conv/BN exists twice; BN = gamma + beta."""
    sch = get_scheme(scheme)
    total = 0
    for stage, (conv, bn) in stage_counts.items():
        total += conv * (1 if sch.conv_shared(stage) else 2)
        total += 2 * bn * (1 if sch.bn_shared(stage) else 2)
    return total


def _check_relations(stage_counts, counts):
    conv = sum(c for c, _ in stage_counts.values())
    bn = 2 * sum(b for _, b in stage_counts.values())  # gamma + beta per channel
    assert counts["joint"] == conv + bn
    assert counts["separate_bn"] == counts["joint"] + bn       # one more BN set
    assert counts["ummkd"] == counts["separate_bn"]            # KD adds no parameters
    assert counts["individual"] == 2 * conv + 2 * bn           # twice the kernels and BN
    assert counts["individual"] - counts["separate_bn"] == conv
    for s in ("y_shape", "x_shape"):
        assert counts["joint"] < counts[s] < counts["individual"]
    for s in SCHEMES:
        assert counts[s] == _expected(stage_counts, s), s


def test_parameter_counts_2d_match_a_hand_count():
    counts = compare.parameter_counts("2d", preset="custom", feature_base=2, n_class=3)
    assert set(counts) == set(SCHEMES)
    _check_relations(_stages_2d(2, 3), counts)


def test_parameter_counts_3d_match_a_hand_count():
    counts = compare.parameter_counts("3d", preset="custom", feature_base=2, n_class=3)
    _check_relations(_stages_3d(2, 3), counts)


# ---------------------------------------------------------------- KD only for ummkd
def test_only_ummkd_uses_distillation():
    from lib.settings import kd_weight

    for s in SCHEMES:
        config = {"SCHEME": s, "MIU_KD": 0.5}
        assert kd_weight(config) == (0.5 if s == "ummkd" else 0.0)
    assert kd_weight({"SCHEME": "ummkd", "MIU_KD": 0.0}) == 0.0


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_each_scheme_trains_two_steps(scheme, tmp_path):
    import main_combine
    from lib.config import resolve
    from lib.train import Trainer
    from model_2d import build_model

    config = resolve(vars(main_combine), [
        "--preset=custom", "--feature_base=2", "--n_class=3", "--image_size=16",
        "--class_names=a,b", "--precision=fp32", "--progress=false", f"--scheme={scheme}"],
        main_combine.PRESETS)
    tf.keras.utils.set_random_seed(0)
    model = build_model(config)
    trainer = Trainer(config, model, str(tmp_path / scheme))
    assert trainer.loss_kwargs["miu_kd"] == (0.5 if scheme == "ummkd" else 0.0)
    rng = np.random.default_rng(0)
    images = {m: tf.constant(rng.normal(size=(2, 16, 16, 3)), tf.float32) for m in ("mr", "ct")}
    labels = {m: tf.constant(rng.integers(0, 3, (2, 16, 16)), tf.int32) for m in ("mr", "ct")}
    before = [v.numpy().copy() for v in model.trainable_variables]
    for _ in range(2):
        terms = trainer.train_step(images, labels)
    assert trainer.step == 2
    assert np.isfinite(float(terms["total"]))
    # The KD term is computed (and weighted) only for ummkd.
    assert (float(terms["kd"]) > 0) == (scheme == "ummkd")
    changed = sum(not np.array_equal(b, v.numpy())
                  for b, v in zip(before, model.trainable_variables))
    assert changed > 0


# ---------------------------------------------------------------- end to end
def test_compare_end_to_end_and_resumes(tmp_path):
    lists = write_tiny_dataset(str(tmp_path / "data"))
    out = str(tmp_path / "cmp")
    settings = [a for a in tiny_overrides(lists, "unused", num_steps=2)
                if not a.startswith(("--preset=", "--output_path="))]
    argv = ["--preset=custom", "--seeds=1", "--schemes=ummkd,joint", f"--out={out}",
            *settings]
    messages = []
    assert compare.main(argv, log=messages.append) == 0
    for name in ("comparison.md", "comparison.csv", "comparison.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    metrics = {s: os.path.join(out, s, "seed0", "results", "metrics.json")
               for s in ("ummkd", "joint")}
    mtimes = {s: os.path.getmtime(p) for s, p in metrics.items()}
    # ummkd trained with the KD term, joint without it.
    assert json.load(open(os.path.join(out, "ummkd", "seed0", "config.json"), encoding="utf-8"))["SCHEME"] == "ummkd"
    rows = list(csv.DictReader(open(os.path.join(out, "comparison.csv"), encoding="utf-8")))
    assert {r["scheme"] for r in rows} == {"ummkd", "joint"}
    assert {r["class"] for r in rows} == {"a", "b", "average"}
    counts = compare.parameter_counts("2d", preset="custom", feature_base=2, n_class=3,
                                      schemes=["ummkd", "joint"])
    for r in rows:
        assert int(r["parameters"]) == counts[r["scheme"]]
        assert 0.0 <= float(r["dice_mean"]) <= 1.0
    report = json.load(open(metrics["joint"], encoding="utf-8"))
    dice_a = [c["dice"]["a"] for c in report["mr"]["cases"]]
    row = next(r for r in rows if r["scheme"] == "joint" and r["modality"] == "mr"
               and r["class"] == "a")
    assert float(row["dice_mean"]) == pytest.approx(np.mean(dice_a), abs=1e-5)
    md = open(os.path.join(out, "comparison.md"), encoding="utf-8").read()
    assert "| ummkd |" in md and "MR average" in md and f"{counts['joint']:,}" in md

    # Second invocation: nothing is trained again.
    messages = []
    t0 = time.time()
    assert compare.main(argv, log=messages.append) == 0
    assert sum("skipping" in m for m in messages) == 2
    assert not any("training and testing" in m for m in messages)
    assert {s: os.path.getmtime(p) for s, p in metrics.items()} == mtimes
    assert time.time() - t0 < 30


def test_bad_arguments_are_refused(capsys, tmp_path):
    out = f"--out={tmp_path / 'cmp'}"
    # --scheme is the entry script's setting (set per run), not an abbreviation of --schemes.
    with pytest.raises(SystemExit):
        compare.main(["--scheme=joint", out])
    assert "use --schemes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--schemes=foo", out])
    assert "--schemes: unknown foo" in capsys.readouterr().err
    assert compare.main(["--preset=custom", "--learning_rat=1", out]) == 2
    assert "unknown setting" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "cmp")


@pytest.mark.parametrize("argv, schemes", [
    ([], list(SCHEMES)),
    (["--preset=heldout"], ["ummkd", "separate_bn", "joint", "individual"]),
    (["--preset=heldout", "--schemes=y_shape,ummkd"], ["y_shape", "ummkd"]),
])
def test_default_schemes(argv, schemes):
    # the held-out comparison's default is the paper's four, the measured README command
    args, _ = compare.parse_args(argv)
    assert args.schemes == schemes


def test_a_run_trained_past_num_steps_is_started_over(tmp_path):
    import tensorflow as tf

    ckpts = tmp_path / "run" / "checkpoints"
    tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), str(ckpts), 2,
                               checkpoint_name="model").save(checkpoint_number=10)
    config = {"OUTPUT_PATH": str(tmp_path / "run"), "NUM_STEPS": 4}
    assert compare.trained_beyond(config) == 10
    assert compare.trained_beyond({**config, "NUM_STEPS": 10}) is None
    assert compare.trained_beyond({**config, "OUTPUT_PATH": str(tmp_path / "new")}) is None


def test_reused_results_need_the_same_test_settings_and_retraining_the_same_training(tmp_path):
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    (run / "results" / "metrics.json").write_text("{}")
    saved = {"OUTPUT_PATH": str(run), "NUM_STEPS": 4, "LEARNING_RATE": 1e-3,
             "TARGET_TEST_LIST": "a.txt", "NPZ_FLIP": True, "PROGRESS": False}
    (run / "config.json").write_text(json.dumps(saved))
    assert compare.is_done(dict(saved)) == (True, "results exist")
    assert compare.is_done({**saved, "PROGRESS": True})[0]  # bookkeeping only
    for change in ({"TARGET_TEST_LIST": "b.txt"}, {"NPZ_FLIP": False}, {"NUM_STEPS": 5},
                   {"LEARNING_RATE": 1e-2}):
        done, why = compare.is_done({**saved, **change})
        assert not done and next(iter(change)) in why
    # other test settings: tested again on the trained run; other training: started over
    assert compare.trained_otherwise({**saved, "TARGET_TEST_LIST": "b.txt"}) is None
    assert "LEARNING_RATE=0.001 there, 0.01 now" in compare.trained_otherwise(
        {**saved, "LEARNING_RATE": 1e-2})
