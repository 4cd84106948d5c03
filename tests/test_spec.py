import numpy as np

from edgekit.runtime.spec import TensorSpec


def test_int8_roundtrip_within_half_a_step():
    s = TensorSpec("x", (-1, 4), "int8", (0.05,), (3,))
    x = np.linspace(-8, 8, 40, dtype=np.float32).reshape(10, 4)
    q = s.quantize(x)
    assert q.dtype == np.int8
    inside = (x >= (-128 - 3) * 0.05) & (x <= (127 - 3) * 0.05)
    assert np.all(np.abs(s.dequantize(q) - x)[inside] <= 0.025 + 1e-6)
    assert q.min() == -128 and q.max() == 127  # saturates instead of wrapping


def test_per_channel_axis():
    s = TensorSpec("w", (2, 3), "int8", (0.1, 1.0, 10.0), (0, 0, 0), axis=1)
    q = s.quantize(np.array([[1.0, 1.0, 10.0], [0.2, 3.0, 50.0]], np.float32))
    assert q.tolist() == [[10, 1, 1], [2, 3, 5]]


def test_float_tensor_passes_through():
    s = TensorSpec("x", (1,), "float32")
    assert not s.quantized
    assert s.quantize(np.array([1.5])).dtype == np.float32
