"""Tensor specifications shared by the backends (standard library and numpy only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape (-1 for a dynamic dim), dtype, affine quantization."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    scale: Optional[Tuple[float, ...]] = None  # None: a float tensor
    zero_point: Optional[Tuple[int, ...]] = None
    axis: int = 0

    @property
    def quantized(self) -> bool:
        return self.scale is not None and np.issubdtype(np.dtype(self.dtype), np.integer)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float -> this tensor's integer type (round half to even, clip, like TFLite)."""
        dt = np.dtype(self.dtype)
        x = np.asarray(x)
        if not self.quantized:
            return x.astype(dt, copy=False)
        if np.issubdtype(x.dtype, np.integer) and x.dtype == dt:
            return x
        scale, zp = self._broadcast(x.ndim)
        info = np.iinfo(dt)
        q = np.round(x.astype(np.float32) / scale) + zp
        return np.clip(q, info.min, info.max).astype(dt)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return np.asarray(q)
        scale, zp = self._broadcast(q.ndim)
        return ((q.astype(np.float32) - zp) * scale).astype(np.float32)

    def _broadcast(self, ndim: int):
        scale = np.asarray(self.scale, dtype=np.float32)
        zp = np.asarray(self.zero_point, dtype=np.float32)
        if scale.size > 1 and ndim:
            shape = [1] * ndim
            shape[self.axis] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        elif scale.size == 1:
            scale, zp = scale.reshape(()), zp.reshape(())
        return scale, zp

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.scale is not None:
            d["quantization"] = {"scale": list(self.scale), "zero_point": list(self.zero_point),
                                 "axis": self.axis}
        else:
            d["quantization"] = None
        return d
