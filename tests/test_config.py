"""Command-line overrides of the entry-script constants."""
import pytest

from lib.config import ConfigError, resolve

NS = {"NUM_STEPS": 100, "LEARNING_RATE": 1e-3, "SCHEME": "ummkd", "AUGMENT": False,
      "PATCH_SIZE": [256, 256, 8], "CLASS_NAMES": ["a", "b"], "TENSORBOARD_PORT": None,
      "PRESET": "demo", "lower_case": 1}
PRESETS = {"demo": {"NUM_STEPS": 10}, "custom": {}}


@pytest.mark.parametrize("args, key, value", [
    ([], "NUM_STEPS", 10),                                   # preset applied
    (["--preset=custom"], "NUM_STEPS", 100),                 # constants as written
    (["--num_steps=5"], "NUM_STEPS", 5),                     # override beats preset
    (["--NUM_STEPS=7"], "NUM_STEPS", 7),                     # names are case-insensitive
    (["--num_steps=1e3"], "NUM_STEPS", 1000),
    (["--learning_rate=1e-4"], "LEARNING_RATE", 1e-4),
    (["--learning_rate=2"], "LEARNING_RATE", 2.0),
    (["--augment=true"], "AUGMENT", True),
    (["--augment=0"], "AUGMENT", False),
    (["--patch_size=128,128,8"], "PATCH_SIZE", [128, 128, 8]),
    (["--class_names=x,y,z"], "CLASS_NAMES", ["x", "y", "z"]),
    (['--class_names=["liver", "spleen"]'], "CLASS_NAMES", ["liver", "spleen"]),  # --help's form
    (["--patch_size=[64, 64, 8]"], "PATCH_SIZE", [64, 64, 8]),
    (["--tensorboard_port=6006"], "TENSORBOARD_PORT", 6006),
    (["--tensorboard_port=none"], "TENSORBOARD_PORT", None),
    (["--scheme=joint"], "SCHEME", "joint"),
])
def test_overrides(args, key, value):
    config = resolve(NS, args, PRESETS, {"TENSORBOARD_PORT": int})
    assert config[key] == value and type(config[key]) is type(value)
    assert "lower_case" not in config


@pytest.mark.parametrize("args, message", [
    (["--num_step=5"], "--num_step: unknown setting.*--num_steps"),
    (["--num_steps=abc"], "--num_steps: expected an integer"),
    (["--num_steps=1.5"], "--num_steps: expected an integer"),
    (["--augment=maybe"], "--augment: expected true or false"),
    (["--patch_size=1,2"], "--patch_size: expected 3 values"),
    (["--tensorboard_port=x"], "--tensorboard_port: expected an integer"),
    (["--learning_rate=NaN"], "--learning_rate: expected a finite number"),
    (["--learning_rate=Infinity"], "--learning_rate: expected a finite number"),
    (["num_steps=5"], "must look like --name=value"),
    (["--preset=nope"], "unknown preset 'nope'"),
])
def test_bad_overrides_are_one_line_errors(args, message):
    with pytest.raises(ConfigError, match=message) as err:
        resolve(NS, args, PRESETS, {"TENSORBOARD_PORT": int})
    assert "\n" not in str(err.value)
