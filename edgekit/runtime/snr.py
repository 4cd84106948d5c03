"""Signal-to-noise ratio of an output against its reference, in dB (a leaf: numpy only)."""

from __future__ import annotations

import numpy as np


def snr_db(expected: np.ndarray, got: np.ndarray) -> float:
    e = expected.astype(np.float64)
    noise = float(np.sum((e - got.astype(np.float64)) ** 2))
    signal = float(np.sum(e ** 2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))
