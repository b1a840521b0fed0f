"""``main()`` of the entry scripts: settings first, then the run, errors as one line.

Settings are resolved and checked before TensorFlow is imported, so a mistyped override is
reported at once. Known errors (bad settings, bad data, a failed run) are printed as one
line starting with "error:" and exit with status 2; Ctrl-C exits with status 130 after the
training loop has written a checkpoint.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from lib import interrupt
from lib.config import ConfigError, resolve, validate

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"2d": os.path.join(_ROOT, "main_combine.py"),
           "3d": os.path.join(_ROOT, "3d_implementation", "main.py")}
_MODULES: dict = {}


def entry_module(network: str):
    """The entry script of a network ("2d" or "3d") as a module: its settings, PRESETS and
    network(), for programs that run the networks without a command line
    (experiments/, benchmarks/). Loaded once, by path (3d_implementation is no package)."""
    import importlib.util

    if network not in SCRIPTS:
        raise ConfigError(f"--network: expected 2d or 3d, got {network!r}")
    if network not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"_ummkd_entry_{network}",
                                                      SCRIPTS[network])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[network] = module
    return _MODULES[network]


def main(namespace: dict, network_factory: Callable, argv=None, presets=None,
         root: str | None = None) -> int:
    if argv is None:  # a real command line, not a call from another program
        interrupt.install()  # before TensorFlow starts its threads
    try:
        config = resolve(namespace, argv, presets)
        validate(config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from lib.data import DataError
    from lib.pipeline import resolve_paths, train_and_evaluate
    from lib.train import TrainingError

    try:
        config = resolve_paths(config, root or os.getcwd())
        train_and_evaluate(config, network_factory())
    except (ConfigError, DataError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: a checkpoint was written; run again to resume", file=sys.stderr)
        return 130
    return 0
