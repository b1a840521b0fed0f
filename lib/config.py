"""Configuration: UPPER_CASE constants of an entry script, presets and ``--name=value``.

An entry script keeps its settings as module-level constants (one comment each); the settings
it shares with the other network are lib/settings.py's, the schema. Resolution: the shared
constants, then the entry script's (which win), then the values of the chosen PRESET, then
command-line overrides ``--name=value`` (names case-insensitive). Each override is type-checked against the
constant's type; an unknown name or a bad value raises ConfigError with a one-line message.
The resolved configuration is saved as JSON beside the checkpoints (never pickled).
"""
from __future__ import annotations

import json
import math
import re
import sys

from lib import settings
from lib.settings import CHOICES, POSITIVE_KEYS, TYPES


class ConfigError(ValueError):
    """A bad setting: the message names the setting and what is wrong."""


def constants(namespace: dict) -> dict:
    """The UPPER_CASE settings of a module namespace (``globals()`` of an entry script)."""
    return {k: v for k, v in namespace.items()
            if k.isupper() and not k.startswith("_")
            and k not in ("PRESETS",) + settings.SCHEMA_TABLES
            and isinstance(v, (bool, int, float, str, list, tuple, type(None)))}


def defaults(namespace: dict) -> dict:
    """Every setting of an entry script as written: lib/settings.py's shared constants, then
    the script's own (a shared one written again in the script wins). No PRESET applied."""
    return {**constants(vars(settings)), **constants(namespace)}


def _parse_bool(name, text):
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"--{name.lower()}: expected true or false, got {text!r}")


def _parse_number(name, text, kind):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is int and isinstance(value, float) and value.is_integer() and "e" in text.lower():
        return int(value)  # allow 1e5 for step counts
    if (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)):
        return float(value)
    wanted = "an integer" if kind is int else "a finite number"
    raise ConfigError(f"--{name.lower()}: expected {wanted}, got {text!r}")


def parse_value(name: str, text: str, default, kind=None):
    """Convert the text of ``--name=text`` to the type of ``default`` (or ``kind``)."""
    kind = kind or type(default)
    if text.strip().lower() in ("none", "null") and (default is None or kind is type(None)):
        return None
    if kind is bool:
        return _parse_bool(name, text)
    if kind in (int, float):
        return _parse_number(name, text, kind)
    if kind in (list, tuple):
        try:  # the JSON form --help prints: ["a", "b"]
            loaded = json.loads(text)
        except json.JSONDecodeError:
            loaded = None
        if isinstance(loaded, list):
            items = [i if isinstance(i, str) else json.dumps(i) for i in loaded]
        else:
            items = [i.strip() for i in text.strip().strip("[]()").split(",") if i.strip()]
        elem = type(default[0]) if default else str
        parsed = [parse_value(name, i, default[0] if default else "", elem) for i in items]
        if default and elem is not str and len(parsed) != len(default):
            raise ConfigError(f"--{name.lower()}: expected {len(default)} values, "
                              f"got {len(parsed)} in {text!r}")
        return parsed
    if kind is type(None):
        return text
    return text


def resolve(namespace: dict, argv=None, presets: dict | None = None) -> dict:
    """Resolved settings: ``defaults(namespace)``, then PRESET's values, then ``--name=value``
    overrides (typed by lib.settings.TYPES where a default is None).

    Raises ConfigError for an unknown name, a malformed argument or a bad value.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    config = defaults(namespace)
    overrides = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            raise SystemExit(help_text(config))
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"{arg}: arguments must look like --name=value")
        name, text = arg[2:].split("=", 1)
        key = name.upper().replace("-", "_")
        if key not in config:
            close = [k.lower() for k in config if k.startswith(key[:3])][:3]
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise ConfigError(f"--{name}: unknown setting{hint}")
        overrides[key] = parse_value(key, text, config[key], TYPES.get(key))
    preset_name = overrides.get("PRESET", config.get("PRESET"))
    if presets is not None and preset_name is not None:
        if preset_name not in presets:
            raise ConfigError(f"PRESET: unknown preset {preset_name!r}; expected one of "
                              f"{', '.join(presets)}")
        for key, value in presets[preset_name].items():
            if key not in config:
                raise ConfigError(f"preset {preset_name}: sets unknown setting {key}")
            config[key] = value
    config.update(overrides)
    for key, kind in TYPES.items():
        value = config.get(key)
        if value is not None and not isinstance(value, kind):
            raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return config


def validate(config: dict) -> None:
    """Every check of a resolved configuration, against lib/settings.py's tables: a value
    that parses but cannot work raises one ConfigError naming the setting. Needs no TensorFlow. Called before
    TensorFlow is imported (lib/cli.py) and again by lib.pipeline.train_and_evaluate."""
    from lib.distribute import tf_config
    from lib.schemes import SCHEMES

    def bad(key, wanted):
        raise ConfigError(f"{key}: expected {wanted}, got {config[key]!r}")

    for key, allowed in CHOICES.items():
        if key in config and config[key] not in allowed:
            shown = ["none" if a is None else a for a in allowed]
            bad(key, f"{', '.join(shown[:-1])} or {shown[-1]}"
                if key in ("PHASE", "DISTRIBUTE", "PREDICT_MODALITY")
                else f"one of {', '.join(shown)}")
    if "SCHEME" in config and config["SCHEME"] not in SCHEMES:
        raise ConfigError(f"SCHEME: unknown scheme {config['SCHEME']!r}; expected one of "
                          f"{', '.join(SCHEMES)}")
    for key in sorted(POSITIVE_KEYS):
        if config.get(key) is not None and config[key] < 1:
            bad(key, "an integer >= 1")
    if config["NUM_STEPS"] < 0:
        bad("NUM_STEPS", "an integer >= 0")
    if config["DISTRIBUTE"] is not None and config["XLA"]:
        raise ConfigError("XLA: TensorFlow cannot compile a step that synchronises replicas "
                          "(the losses' global-batch sums and the BN statistics all-reduce "
                          "inside it); use XLA with DISTRIBUTE=None, or --xla=false")
    if not config["CHECKPOINT_MINUTES"] >= 0:
        bad("CHECKPOINT_MINUTES", "a number >= 0")
    if "LEARNING_RATE" in config and not config["LEARNING_RATE"] > 0:
        bad("LEARNING_RATE", "a number > 0")
    if "N_CLASS" in config and len(config["CLASS_NAMES"]) != config["N_CLASS"] - 1:
        raise ConfigError(f"CLASS_NAMES: {len(config['CLASS_NAMES'])} names for N_CLASS="
                          f"{config['N_CLASS']} (expected N_CLASS - 1 names, background "
                          f"excluded)")
    if not 0.0 <= config.get("FOREGROUND_SHARE", 0.0) <= 1.0:
        bad("FOREGROUND_SHARE", "a share in [0, 1]")
    for key in sorted(k for k in config if k.startswith("AUG_")):
        _check_augmentation(key, config[key])
    if "LATERAL_PAIRS" in config and "N_CLASS" in config:
        lateral_permutation(config["LATERAL_PAIRS"], config["N_CLASS"])
    devices = config["CPU_DEVICES"]
    if not isinstance(devices, int) or devices < 0:
        raise ConfigError(f"CPU_DEVICES: expected an integer >= 0, got {devices!r}")
    if config["DISTRIBUTE"] == "multi_worker":
        tf_config(required=True)


_PAIR = re.compile(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*")


def lateral_permutation(pairs, n_class: int) -> list[int] | None:
    """LATERAL_PAIRS ("a:b" strings: classes a and b are each other's mirror image under a
    left-right flip, e.g. "2:3" right and left kidney) -> the channel permutation [n_class]
    that swaps each pair (output channel c takes input channel perm[c]); None when there
    are no pairs.

    Raises ConfigError with a one-line message naming LATERAL_PAIRS for a value that is not
    a list of "a:b" strings, a class id outside 1..n_class-1, a pair a:a, or a class in two
    pairs.
    """
    if isinstance(pairs, str) or not isinstance(pairs, (list, tuple)):
        raise ConfigError(f'LATERAL_PAIRS: expected a list of "a:b" strings, got {pairs!r}')
    perm = list(range(n_class))
    seen: dict[int, str] = {}
    for pair in pairs:
        match = _PAIR.fullmatch(pair) if isinstance(pair, str) else None
        if match is None:
            raise ConfigError(f'LATERAL_PAIRS: {pair!r} is not "a:b" with class ids a and b')
        a, b = int(match.group(1)), int(match.group(2))
        for c in (a, b):
            if not 1 <= c <= n_class - 1:
                raise ConfigError(f"LATERAL_PAIRS: class {c} in {pair!r} is not in "
                                  f"1..{n_class - 1} (N_CLASS={n_class}, background 0 "
                                  f"excluded)")
        if a == b:
            raise ConfigError(f"LATERAL_PAIRS: {pair!r} pairs class {a} with itself")
        for c in (a, b):
            if c in seen:
                raise ConfigError(f"LATERAL_PAIRS: class {c} is in {seen[c]!r} and {pair!r}; "
                                  "a class has one counterpart")
            seen[c] = pair
        perm[a], perm[b] = b, a
    return perm if seen else None


# augmentation values that must be > 0 (factors) or >= 0 (sizes); the others are signed
_AUG_POSITIVE = ("AUG_SCALE", "AUG_BRIGHTNESS", "AUG_GAMMA")
_AUG_NON_NEGATIVE = ("AUG_ELASTIC", "AUG_BIAS_FIELD", "AUG_NOISE", "AUG_BLUR", "AUG_CONTRAST")


def _check_augmentation(key: str, value) -> None:
    """An AUG_* setting is [probability in 0..1, low, high] with low <= high in its domain
    (lib/augment.py)."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"{key}: expected [probability, low, high], got {value!r}")
    p, lo, hi = value
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{key}: probability {p} is not in [0, 1]")
    if not lo <= hi:
        raise ConfigError(f"{key}: low {lo} is above high {hi}")
    if (key in _AUG_POSITIVE and lo <= 0) or (key in _AUG_NON_NEGATIVE and lo < 0):
        raise ConfigError(f"{key}: low {lo} must be {'> 0' if key in _AUG_POSITIVE else '>= 0'}")


def help_text(config: dict) -> str:
    lines = ["Settings (override as --name=value):"]
    lines += [f"  --{k.lower()}={json.dumps(v)}" for k, v in config.items()]
    return "\n".join(lines)


def save_config(config: dict, path: str) -> None:
    """Write the resolved configuration as JSON, atomically."""
    from lib.files import write_json

    write_json(path, config, sort_keys=True)


def load_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read configuration ({err})") from None
