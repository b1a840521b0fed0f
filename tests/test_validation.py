"""Validation on whole volumes (lib/validation.py) and the best checkpoint the Trainer keeps:
a tiny run whose validation scores are known, resumed, and the checkpoint each phase uses."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from lib import settings, validation
from lib.config import defaults
from lib.data import Volume
from test_train_loop import _batches  # the same random batches as the loop tests


def _config(**over):
    return {**defaults(vars(settings)), **dict(
        N_CLASS=3, CLASS_NAMES=["a", "b"], FEATURE_BASE=2, DROPOUT=0.0, PRECISION="fp32",
        LEARNING_RATE=1e-3, NUM_STEPS=8, DISPLAY_STEP=100, CHECKPOINT_SPACE=100,
        SUMMARY_STEP=100, VALIDATE_EVERY=2, PROGRESS=False, IMAGE_SIZE=16,
        NETWORK="dilated_resnet_2d"), **over}


class ScriptedValidator:
    """Returns the next score of ``scores`` (as the Dice of both classes of "mr") and keeps a
    copy of the model's weights at each call."""

    def __init__(self, model, scores):
        self.model, self.scores, self.weights = model, list(scores), []

    def __call__(self):
        value = self.scores.pop(0)
        self.weights.append([v.numpy().copy() for v in self.model.variables])
        return {"dice": {"mr": np.array([value, value])}, "score": value,
                "predictions": {}}


def _train(path, scores, num_steps):
    from lib.train import Trainer
    from model_2d import build_model

    config = _config(NUM_STEPS=num_steps)
    model = build_model(config)
    validator = ScriptedValidator(model, scores)
    trainer = Trainer(config, model, path, validator=validator)
    start = trainer.restore()
    trainer.fit(_batches(start))
    return trainer, validator, start


def test_the_best_checkpoint_is_kept_resumed_and_chosen(tmp_path):
    from lib.pipeline import checkpoint_to_test

    path = str(tmp_path / "run")
    # validations at steps 2, 4, 6, 8: the best is step 4 (0.7)
    _, validator, _ = _train(path, [0.3, 0.7, 0.5, 0.6], 8)
    checkpoints = os.path.join(path, "checkpoints")
    best = validation.read_best(checkpoints)
    assert best["step"] == 4 and best["score"] == pytest.approx(0.7)
    assert best["dice"] == {"mr": {"a": pytest.approx(0.7), "b": pytest.approx(0.7)}}
    prefix = validation.best_checkpoint(checkpoints)
    assert prefix == os.path.join(checkpoints, "best", "model-4")
    # the best checkpoint holds the weights of step 4, not those of the end
    reader = tf.train.load_checkpoint(prefix)
    saved = [reader.get_tensor(f"model/{i:04d}/.ATTRIBUTES/VARIABLE_VALUE")
             for i in range(len(validator.weights[1]))]  # lib.train.model_variables' keys
    for got, want in zip(saved, validator.weights[1]):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(saved, validator.weights[3]))
    # the test and predict phases: best by default, latest by setting
    assert checkpoint_to_test(_config(), None, path) == prefix
    assert checkpoint_to_test(_config(TEST_CHECKPOINT="latest"), None, path) == \
        os.path.join(checkpoints, "model-8")
    # the log has one volumes line per validation
    lines = [json.loads(l) for l in open(os.path.join(path, "log.jsonl"))]
    scores = [(l["step"], l["volumes/score"]) for l in lines if "volumes/score" in l]
    assert scores == [(2, 0.3), (4, 0.7), (6, 0.5), (8, 0.6)]

    # resumed to step 12: 0.65 and 0.69 do not beat the kept 0.7 of step 4
    _, _, start = _train(path, [0.65, 0.69], 12)
    assert start == 8
    assert validation.read_best(checkpoints)["step"] == 4
    assert validation.best_checkpoint(checkpoints) == prefix
    # resumed to step 14: 0.71 does
    _train(path, [0.71], 14)
    assert validation.read_best(checkpoints)["step"] == 14
    assert validation.best_checkpoint(checkpoints) == os.path.join(checkpoints, "best",
                                                                   "model-14")
    assert sorted(os.listdir(os.path.join(checkpoints, "best"))) == [
        "best.json", "checkpoint", "model-14.data-00000-of-00001", "model-14.index"]


def test_a_run_without_validation_tests_its_latest(tmp_path):
    from lib.pipeline import checkpoint_to_test
    from lib.train import Trainer
    from model_2d import build_model

    path = str(tmp_path / "run")
    config = _config(NUM_STEPS=3)
    Trainer(config, build_model(config), path).fit(_batches())
    assert validation.read_best(os.path.join(path, "checkpoints")) is None
    assert checkpoint_to_test(_config(), None, path).endswith(os.path.join("checkpoints",
                                                                           "model-3"))


def test_the_validator_scores_every_volume_as_the_test_phase_would():
    """Two MR volumes (Dice of class 1: 1 and 0.5, class 2: 1 and 1), one CT (0 and 1): the
    score is the mean over modalities of the mean over classes: (0.875 + 0.5) / 2."""
    truth = np.zeros((2, 2, 1), np.int32)
    truth[0, 0] = 1
    truth[1, 1] = 2
    half = truth.copy()  # class 1 on 3 voxels, 1 of them true: 2 * 1 / (3 + 1) = 0.5
    half[0, 1] = 1
    half[1, 0] = 1
    volumes = {"mr": [Volume("a", truth.astype(np.float32), truth),
                      Volume("b", half.astype(np.float32), truth)],
               "ct": [Volume("c", truth.astype(np.float32), truth)]}
    answers = {("mr", 0): truth, ("mr", 1): half, ("ct", 0): np.where(truth == 1, 0, truth)}
    seen = []

    def predict(m, image):
        k = sum(1 for s in seen if s == m)
        seen.append(m)
        return answers[(m, k)]

    result = validation.VolumeValidator(predict, volumes, 3)()
    np.testing.assert_allclose(result["dice"]["mr"], [0.75, 1.0])
    np.testing.assert_allclose(result["dice"]["ct"], [0.0, 1.0])
    assert result["score"] == pytest.approx((0.875 + 0.5) / 2)
