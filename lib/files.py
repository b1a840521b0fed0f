"""Atomic file writes: a file is either absent, its old content or its complete new content.

Every file the project writes goes through ``atomic_path``: the writer writes a temporary
file in the destination folder (so the final rename stays on one file system), named
``.partial-<pid>-<name>`` so that it keeps the real extension (nibabel, numpy and
matplotlib choose the format from it), and only a writer that finished is renamed over
the destination. An interrupted write leaves no file that looks complete, and nothing
already on disk is lost. No TensorFlow here.
"""
from __future__ import annotations

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path to write ``path`` to; renamed over ``path`` on success,
    removed on any error (the error propagates). Creates the destination folder."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".partial-{os.getpid()}-{name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)


def write_json(path: str, obj, **dump_kwargs) -> None:
    """Write ``obj`` as JSON (``json.dump`` keyword arguments; indent 2 by default) and a
    final newline to ``path`` atomically."""
    dump_kwargs.setdefault("indent", 2)
    write_text(path, json.dumps(obj, **dump_kwargs) + "\n")
