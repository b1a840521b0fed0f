"""Smoke runs of main_combine.py on tiny data: train, checkpoint, resume, test."""
import glob
import json
import os

import pytest
import tensorflow as tf

import main_combine
from conftest import tiny_overrides
from lib.cli import main


def run(args):
    return main(vars(main_combine), main_combine.network, args, main_combine.PRESETS,
                main_combine._ROOT)


def event_tags(folder):
    tags = set()
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add((value.tag, value.metadata.plugin_data.plugin_name))
    return tags


def test_train_resume_and_test(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    assert run(tiny_overrides(tiny_data, out, phase="train")) == 0
    ckpts = os.path.join(out, "checkpoints")
    assert tf.train.latest_checkpoint(ckpts).endswith("model-4")
    assert os.path.exists(os.path.join(ckpts, "model-2.index"))
    saved = json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))
    assert saved["NUM_STEPS"] == 4 and saved["FEATURE_BASE"] == 2
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    assert "traces of the step function: 1" in log  # the step never retraces
    tags = event_tags(os.path.join(out, "logs", "train"))
    names = {t for t, _ in tags}
    assert {"loss/mr_dice", "loss/ct_ce", "loss/kd", "learning_rate", "dice/mr/a"} <= names
    assert ("mr/prediction", "images") in tags
    assert "dice/ct/b" in {t for t, _ in event_tags(os.path.join(out, "logs", "val"))}

    # A second run with more steps resumes at step 4, continues to 6 and tests the model
    # in memory.
    assert run(tiny_overrides(tiny_data, out, phase="train_test", num_steps=6)) == 0
    in_memory = json.load(open(os.path.join(out, "results", "metrics.json"), encoding="utf-8"))
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    assert "model-4 at step 4" in log and "training steps 4..6" in log
    assert tf.train.latest_checkpoint(ckpts).endswith("model-6")

    # Test a named checkpoint: metrics.json in the documented layout.
    prefix = os.path.join(ckpts, "model-6")
    assert run(tiny_overrides(tiny_data, out, phase="test", test_model=prefix)) == 0
    report = json.load(open(os.path.join(out, "results", "metrics.json"), encoding="utf-8"))
    assert report["checkpoint"] == prefix and report["classes"] == ["a", "b"]
    # The restored checkpoint (weights and BN statistics) gives exactly the same results.
    for m in ("mr", "ct"):
        assert report[m]["cases"] == in_memory[m]["cases"]
    for m in ("mr", "ct"):
        assert set(report[m]["dice_mean"]) == {"a", "b"}
        assert 0.0 <= report[m]["dice_avg"] <= 1.0
        assert report[m]["cases"][0]["case"] == f"{m}_3"
    assert os.path.exists(os.path.join(out, "results", "predictions", "ct_3_pred.nii.gz"))


def test_refuses_a_different_run_in_the_output_folder(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run(tiny_overrides(tiny_data, out, phase="train", num_steps=2)) == 0
    assert run(tiny_overrides(tiny_data, out, phase="train", feature_base=4)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "FEATURE_BASE=2 there, 4 now" in err
    assert "\n" not in err


def test_unknown_setting_exits_2(capsys):
    assert run(["--learning_rat=0.1"]) == 2
    assert "--learning_rat: unknown setting" in capsys.readouterr().err


@pytest.mark.parametrize("arg, message", [
    ("--precision=fp8", "PRECISION: expected one of auto, fp32, bf16, fp16, got 'fp8'"),
    ("--scheme=Ummkd", "SCHEME: unknown scheme 'Ummkd'; expected one of ummkd"),
    ("--checkpoint_space=0", "CHECKPOINT_SPACE: expected an integer >= 1, got 0"),
    ("--display_step=0", "DISPLAY_STEP: expected an integer >= 1, got 0"),
    ("--summary_step=-1", "SUMMARY_STEP: expected an integer >= 1, got -1"),
    ("--learning_rate=0", "LEARNING_RATE: expected a number > 0, got 0.0"),
])
def test_settings_that_cannot_work_exit_2_before_writing(tiny_data, tmp_path, capsys, arg,
                                                         message):
    out = str(tmp_path / "run")
    assert run(tiny_overrides(tiny_data, out) + [arg]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not os.path.exists(out)


def test_fp16_steps_skipped_by_the_loss_scaler_are_not_logged_or_saved(tmp_path):
    """An overflowing loss scale makes the optimizer skip updates (the step does not
    advance): those batches are neither logged nor checkpointed, and training goes on."""
    import keras
    import numpy as np

    from lib.train import Trainer
    from model_2d import build_model

    from lib import settings
    from lib.config import constants

    cfg = dict(constants(vars(settings)), N_CLASS=3, CLASS_NAMES=["a", "b"], FEATURE_BASE=2,
               DROPOUT=0.0, PRECISION="fp16", LEARNING_RATE=1e-3,
               LR_SCHEDULE="step", LR_DECAY_STEPS=100,
               NUM_STEPS=3, DISPLAY_STEP=100, CHECKPOINT_SPACE=1, SUMMARY_STEP=1,
               PROGRESS=False)
    rng = np.random.default_rng(0)

    def batches():
        while True:
            yield ({m: tf.constant(rng.normal(size=[2, 16, 16, 3]), tf.float32)
                    for m in ("mr", "ct")},
                   {m: tf.constant(rng.integers(0, 3, [2, 16, 16]), tf.int32)
                    for m in ("mr", "ct")})

    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        out = str(tmp_path / "run")
        trainer = Trainer(cfg, build_model(cfg), out)
        trainer.optimizer.dynamic_scale.assign(1e36)  # the first updates overflow
        trainer.fit(batches())
        assert trainer.step == 3
        assert float(trainer.optimizer.dynamic_scale.numpy()) < 1e36  # updates were skipped
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]
    assert steps == [1, 2, 3]
    saved = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "checkpoints",
                                                                      "model-*.index")))
    assert saved == ["model-1.index", "model-2.index", "model-3.index"]


def test_the_recipe_validates_keeps_the_best_and_chooses_post_processing(tiny_data, tmp_path):
    """Augmentation, forced foreground draws and the poly schedule train; the validation
    volumes are segmented every 2 steps, the best checkpoint is tested, and the
    post-processing is chosen on the validation volumes for it and recorded."""
    out = str(tmp_path / "run")
    val = {m: tiny_data[m]["test"] for m in ("mr", "ct")}  # image,label lines, as a test list
    args = tiny_overrides(tiny_data, out, phase="train_test", num_steps=6, validate_every=2,
                          augment=True, foreground_share=0.5, lr_schedule="poly",
                          source_val_volume_list=val["mr"], target_val_volume_list=val["ct"])
    assert run(args) == 0
    best = json.load(open(os.path.join(out, "checkpoints", "best", "best.json")))
    assert best["step"] in (2, 4, 6) and set(best["dice"]) == {"mr", "ct"}
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in lines if "volumes/score" in r] == [2, 4, 6]
    report = json.load(open(os.path.join(out, "results", "metrics.json")))
    assert report["checkpoint"] == os.path.join(out, "checkpoints", "best", best["checkpoint"])
    for m in ("mr", "ct"):
        choice = json.load(open(os.path.join(out, f"postprocessing_{m}.json")))
        assert choice["checkpoint"] == os.path.join("best", best["checkpoint"])
        assert choice["cases"] == 1
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    assert "post-processing mr (best/" in log and "validation volumes score" in log
