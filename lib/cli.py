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
from lib.config import ConfigError, resolve
from lib.distribute import check_settings


def main(namespace: dict, network_factory: Callable, argv=None, presets=None, types=None,
         root: str | None = None) -> int:
    if argv is None:  # a real command line, not a call from another program
        interrupt.install()  # before TensorFlow starts its threads
    try:
        config = resolve(namespace, argv, presets, types)
        check_settings(config)
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
