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
        for xx in (x, x.astype(np.float64)):   # the steady-state path's specialised forms
            np.testing.assert_array_equal(c.quantizer(xx.dtype)(xx), s.quantize(xx))
    every = np.arange(256, dtype=np.uint8).view(dtype)   # the dequantize table: every level
    np.testing.assert_array_equal(c.dequantize(every), s.dequantize(every))
    np.testing.assert_array_equal(c.dequantizer()(every.reshape(16, 16)), s.dequantize(every.reshape(16, 16)))
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


@pytest.mark.parametrize("target,fmt", [("rpi4", "tflite"), ("x86-avx2", "onnx")])
def test_steady_state_path(digits_build, target, fmt):
    """model(x) again with the same shape and dtype goes straight to the backend's run1: the same
    numbers as the checked path; another shape, dtype or batch takes the checked path again."""
    from edgekit.runtime import load

    m = load(bundle_of(digits_build, target, fmt).path, threads=1)
    si, so = m.inputs[0], m.outputs[0]
    x = m.bundle.golden()[f"input:{si.name}"].astype(np.float32)
    want = [so.dequantize(m.run(si.quantize(x[i:i + 1]), raw=True)[so.name]) for i in range(5)]
    assert m._fast[2] is None
    first = m(x[:1])
    assert m._fast[:2] == (x[:1].shape, np.float32)
    fast = m._fast[2]
    for _ in range(3):
        got = m(x[:1])
        assert got.dtype == np.float32 and got is not first
        np.testing.assert_array_equal(got, want[0])
    import pickle   # an equal dtype that is another object: still the steady state, not made again
    np.testing.assert_array_equal(m(pickle.loads(pickle.dumps(x[:1]))), want[0])
    assert m._fast[2] is fast
    np.testing.assert_array_equal(m(x[:5]), np.concatenate(want))   # a batch: the checked path
    np.testing.assert_array_equal(m(x[1:2]), want[1])
    np.testing.assert_array_equal(m(np.asfortranarray(x[2:3])), want[2])
    np.testing.assert_array_equal(m(x[3:4].astype(np.float64)), want[3])
    m.run(si.quantize(x[:2]), raw=True)   # another shape in between (a resize where the batch is dynamic)
    np.testing.assert_array_equal(m(x[4:5]), want[4])
