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


_LOG: List[str] = []   # the log file native output goes to while a conversion runs (innermost last)


@contextlib.contextmanager
def logged_output(path) -> Iterator[None]:
    """Send everything written to fd 1 and fd 2 (TensorFlow's `model.export()` listing, the
    converters' and MLIR's lines, Python warnings) to `path` for the duration; edgekit's own
    progress writes to a duplicate of the terminal taken before (edgekit.progress)."""
    if os.environ.get("EDGEKIT_DEBUG"):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with open(path, "ab") as log, open(path, "a", encoding="utf-8", buffering=1) as text, \
            contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        # fds for native code, the Python streams for print() and warnings (they may not be fds 1/2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        _LOG.append(str(path))
        try:
            yield
        finally:
            _LOG.pop()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


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
            if _LOG and cap.text:
                with open(_LOG[-1], "a", encoding="utf-8") as log:
                    log.write(cap.text)


def import_keras_quietly():
    """Import TensorFlow and Keras with their C++ start-up lines (which ignore
    TF_CPP_MIN_LOG_LEVEL: they come before absl's logging starts) kept from the terminal."""
    quiet_tensorflow()
    with captured_stderr():
        import keras
        import tensorflow  # noqa: F401
    return keras

