"""Quiet the native libraries: TensorFlow's C++ logging and the converters' chatter.

TF and MLIR write to file descriptor 2 directly; `captured_stderr()` sends it to
a temporary file and gives the tail back when a stage fails, so the user sees one
clear line, with the native detail only where it helps (or with --debug).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator, List


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for name in ("tensorflow", "absl", "tf2onnx", "h5py", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Captured:
    def __init__(self) -> None:
        self.text = ""

    def tail(self, n: int = 8) -> List[str]:
        lines = [ln for ln in self.text.splitlines() if ln.strip()]
        return lines[-n:]


@contextlib.contextmanager
def captured_stderr(enabled: bool = True) -> Iterator[Captured]:
    cap = Captured()
    if not enabled or os.environ.get("EDGEKIT_DEBUG"):
        yield cap
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield cap
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            cap.text = tmp.read().decode("utf-8", "replace")


def import_keras_quietly():
    """Import TensorFlow and Keras with their C++ start-up lines (which ignore
    TF_CPP_MIN_LOG_LEVEL: they come before absl's logging starts) kept from the terminal."""
    quiet_tensorflow()
    with captured_stderr():
        import keras
        import tensorflow  # noqa: F401
    return keras

