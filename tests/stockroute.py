"""The stock ONNX route that tests and benchmarks compare edgekit with: ONNX Runtime's
quantize_static fed one calibration sample at a time (its defaults unless told otherwise)."""

from pathlib import Path
from typing import Any, Iterable

import numpy as np


def samples(name: str, xs: Iterable[np.ndarray]):
    """A CalibrationDataReader giving each sample of `xs` (no batch axis) as a batch of one."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(xs)

        def get_next(self):
            a = next(self.it, None)
            return None if a is None else {name: a[None]}

    return Reader()


def quantize_static(src: Path, dst: Path, name: str, xs: Iterable[np.ndarray], **kw: Any) -> Path:
    from onnxruntime.quantization import quantize_static as stock

    stock(str(src), str(dst), samples(name, xs), **kw)
    return Path(dst)
