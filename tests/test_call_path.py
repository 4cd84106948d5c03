"""The runtime's lean call path (model(x)): the per-tensor constants made once give exactly
TensorSpec.quantize / dequantize's numbers, and the checks it skips for a well-formed input
still run for any other."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import bundle_of
from edgekit.runtime.model import _Converter
from edgekit.runtime.spec import TensorSpec


@pytest.mark.parametrize("scale,zp,dtype", [(1.0, -128, "int8"), (0.0078125, 0, "int8"), (0.0173, 3, "uint8"),
                                            (0.3, -5, "int8"), (1.0, 7, "uint8")])
def test_converter_matches_spec(scale, zp, dtype):
    s = TensorSpec("a", (1, 8), dtype, (scale,), (zp,))
    c = _Converter(s)
    rng = np.random.default_rng(0)
    for _ in range(10):
        x = (rng.standard_normal((500, 8)) * 200 * scale).astype(np.float32)
        x[:45, 1] = (rng.integers(-300, 300, 45) + 0.5) * scale  # ties: round half to even
        x[:4, 0] = [np.inf, -np.inf, 1e30, -1e30]
        for xx in (x, x.astype(np.float64), x * np.float32(1.0000001)):
            got, want = c.quantize(xx), s.quantize(xx)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        q = s.quantize(x)
        np.testing.assert_array_equal(c.dequantize(q), s.dequantize(q))
    per_axis = TensorSpec("w", (1, 3), dtype, (0.1, 0.2, 0.3), (0, 1, 2), axis=1)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(_Converter(per_axis).quantize(x), per_axis.quantize(x))


def test_call_path_matches_spec_arithmetic(digits_build):
    """The per-tensor constants made once give exactly TensorSpec.quantize/dequantize's numbers,
    for float32 and float64 input, one sample and a batch; shape errors still name the tensor."""
    from edgekit.errors import DataError
    from edgekit.runtime import load

    m = load(bundle_of(digits_build, "rpi4", "tflite").path, threads=1)
    si, so = m.inputs[0], m.outputs[0]
    assert si.quantized and so.quantized
    x = m.bundle.golden()[f"input:{si.name}"]
    for xx in (x[:1], x[:5], x[:5].astype(np.float64)):
        want = so.dequantize(m.run(si.quantize(xx), raw=True)[so.name])
        got = m(xx)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(m.run(xx)[so.name], want)
        np.testing.assert_array_equal(m(**{si.name: xx}), want)
    with pytest.raises(DataError, match=si.name):
        m(np.zeros((1, 3, 3, 1), np.float32))
    with pytest.raises(DataError, match="input"):
        m(x[:1], x[:1])
