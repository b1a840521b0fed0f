"""UMMKD's library. Importing it, before TensorFlow, turns oneDNN on where it is off.

TensorFlow enables its oneDNN CPU kernels by default only on x86-64 CPUs with AVX-512 or
AMX-class features. On the others (AVX2-only x86-64), float32 training ran faster with
oneDNN than with TensorFlow's own kernels (docs/performance.md), so the first import of
``lib`` sets TF_ENABLE_ONEDNN_OPTS=1 there: only on x86-64, only while TensorFlow is not
yet imported (it reads the variable once), and never over a value the user set
(TF_ENABLE_ONEDNN_OPTS=0 keeps TensorFlow's own kernels). lib.fast_ops then picks the
ops for whatever kernels the process has.
"""
import os
import platform
import sys


def prefer_onednn(environ=os.environ, machine=None, tensorflow_imported=None) -> bool:
    """Set TF_ENABLE_ONEDNN_OPTS=1 in ``environ`` on x86-64 unless it is already set or
    TensorFlow is already imported; returns True when it set it."""
    machine = (machine or platform.machine()).lower()
    if tensorflow_imported is None:
        tensorflow_imported = "tensorflow" in sys.modules
    if (tensorflow_imported or "TF_ENABLE_ONEDNN_OPTS" in environ
            or machine not in ("x86_64", "amd64")):
        return False
    environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
    return True


prefer_onednn()
