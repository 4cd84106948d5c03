"""Fake quantization layers for Keras 3 (quantization-aware training) and how they export.

Weights: symmetric, per output channel, 127 steps each side of zero: the grid TFLite and
ONNX Runtime use for per-channel INT8 weights, so a weight trained on it converts unchanged
(64 for ONNX Runtime's reduce_range builds: 7-bit weights).
Activations: per tensor, 256 levels over a learned [lo, hi] (TF's FakeQuantWithMinMaxVars,
which nudges the range so that zero is exact, as the converters do).

One model, four ways to run it (`mode()`):
- "train": fake quantization on (each activation point can be switched off: `on`, so
  ranges can be calibrated one point at a time);
- "fakequant": activations through FakeQuantWithMinMaxVars only; weights as stored (on the
  grid after training). The TFLite converter takes these ranges (its QAT path);
- "clip": each activation point clipped to its range. For ONNX: ONNX Runtime's quantizer
  folds a Clip into the quantization of its output, so the learned range becomes the range
  (a model input's range goes to the quantizer as an override instead: `input_ranges`);
- "float": no quantization at all (the float reference of a QAT model).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator, Optional, Tuple

from edgekit.convert.native import import_keras_quietly

keras = import_keras_quietly()
import tensorflow as tf  # noqa: E402  (imported quietly just above)

MODES = ("train", "fakequant", "clip", "float")
_MODE: contextvars.ContextVar = contextvars.ContextVar("edgekit_fakequant_mode", default="train")


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    """Trace (export, predict) the model's fake quantization as `name` inside this block."""
    if name not in MODES:
        raise ValueError(f"fake quantization mode must be one of {MODES}, not {name!r}")
    token = _MODE.set(name)
    try:
        yield
    finally:
        _MODE.reset(token)


def weight_grid(w, depthwise: bool = False, levels: int = 127):
    """w on a symmetric per-output-channel grid of `levels` steps each side of zero, scale
    max|w| / levels (straight-through gradient). 127: INT8 per channel in TFLite and ONNX
    Runtime; 64: ONNX Runtime's reduce_range (7-bit) weights."""
    shape = tf.shape(w)
    if depthwise:  # (kh, kw, cin, mult): the converters' channels are cin*mult
        w = tf.reshape(w, tf.concat([shape[:2], [-1]], 0))
    axes = list(range(len(w.shape) - 1))
    scale = tf.maximum(tf.stop_gradient(tf.reduce_max(tf.abs(w), axis=axes)), 1e-8) / float(levels)
    q = tf.clip_by_value(tf.round(w / scale), -float(levels), float(levels)) * scale
    q = w + tf.stop_gradient(q - w)
    return tf.reshape(q, shape) if depthwise else q


class _WeightGrid:
    """What the quantized layers share: their grid (`weight_levels`), used only in training
    (afterwards the weights are stored on it)."""

    def __init__(self, *args, weight_levels: int = 127, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_levels = int(weight_levels)

    def _grid(self, w, depthwise: bool = False):
        return weight_grid(w, depthwise, self.weight_levels) if _MODE.get() == "train" else w

    def get_config(self):
        return dict(super().get_config(), weight_levels=self.weight_levels)


@keras.saving.register_keras_serializable(package="edgekit")
class FakeQuant(keras.layers.Layer):
    """Per-tensor activation fake quantization over a learned range [lo, hi] (lo <= 0 <= hi)."""

    def __init__(self, lo: float = 0.0, hi: float = 1.0, at_input: bool = False, same_as: Optional[str] = None,
                 **kwargs):
        """same_as: another point's name whose range this one keeps (an average pooling's output
        is requantized onto its input's scale: the converters require the same scale there)."""
        super().__init__(**kwargs)
        self.lo_init, self.hi_init, self.at_input, self.same_as = float(lo), float(hi), bool(at_input), same_as

    def build(self, input_shape):
        self.lo = self.add_weight(shape=(), name="lo", initializer=keras.initializers.Constant(self.lo_init))
        self.hi = self.add_weight(shape=(), name="hi", initializer=keras.initializers.Constant(self.hi_init))
        self.on = self.add_weight(shape=(), name="on", initializer="ones", trainable=False)

    def call(self, x):
        m = _MODE.get()
        if m == "float" or (m == "clip" and self.at_input):
            return x
        if m == "clip":  # the ClipByValue op itself: tf2onnx makes it one Clip (tf.clip_by_value: Min+Max)
            return tf.raw_ops.ClipByValue(t=x, clip_value_min=self.lo, clip_value_max=self.hi)
        q = tf.quantization.fake_quant_with_min_max_vars(x, self.lo, self.hi, num_bits=8)
        if m == "fakequant":
            return q
        return x + self.on * (q - x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return dict(super().get_config(), lo=self.lo_init, hi=self.hi_init, at_input=self.at_input,
                    same_as=self.same_as)


@keras.saving.register_keras_serializable(package="edgekit")
class QConv2D(_WeightGrid, keras.layers.Conv2D):
    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, self._grid(kernel))


@keras.saving.register_keras_serializable(package="edgekit")
class QDepthwiseConv2D(_WeightGrid, keras.layers.DepthwiseConv2D):
    def call(self, inputs):
        x = keras.ops.depthwise_conv(inputs, self._grid(self.kernel, depthwise=True),
                                     strides=self.strides, padding=self.padding,
                                     dilation_rate=self.dilation_rate, data_format=self.data_format)
        if self.use_bias:
            shape = (1,) * (len(x.shape) - 1) + (-1,) if self.data_format == "channels_last" \
                else (1, -1) + (1,) * (len(x.shape) - 2)
            x = x + keras.ops.reshape(self.bias, shape)
        return self.activation(x) if self.activation is not None else x


@keras.saving.register_keras_serializable(package="edgekit")
class QDense(_WeightGrid, keras.layers.Dense):
    def call(self, inputs, training=None):
        x = keras.ops.matmul(inputs, self._grid(self.kernel))
        if self.use_bias:
            x = x + self.bias
        return self.activation(x) if self.activation is not None else x


QUANTIZED = {"Conv2D": QConv2D, "DepthwiseConv2D": QDepthwiseConv2D, "Dense": QDense}
CUSTOM_OBJECTS = {c.__name__: c for c in (FakeQuant, QConv2D, QDepthwiseConv2D, QDense)}


def is_qat(model) -> bool:
    return any(isinstance(layer, FakeQuant) for layer in getattr(model, "layers", []))


def input_ranges(model) -> Dict[str, Tuple[float, float]]:
    """Model input name -> its learned range (the fake quantization right after the input)."""
    out: Dict[str, Tuple[float, float]] = {}
    for layer in model.layers:
        if isinstance(layer, FakeQuant) and layer.at_input:
            name = layer.input._keras_history.operation.name
            out[name] = (float(layer.lo.numpy()), float(layer.hi.numpy()))
    return out


def bake(model) -> None:
    """Put every quantized layer's weights on the INT8 grid, and every range around zero:
    the converters then reproduce exactly what training saw."""
    for layer in model.layers:
        if isinstance(layer, tuple(QUANTIZED.values())):
            layer.kernel.assign(weight_grid(layer.kernel, isinstance(layer, QDepthwiseConv2D), layer.weight_levels))
        elif isinstance(layer, FakeQuant):
            lo, hi = float(layer.lo.numpy()), float(layer.hi.numpy())
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            if hi - lo < 1e-6:
                hi = lo + 1e-6
            layer.lo.assign(lo)
            layer.hi.assign(hi)
            layer.on.assign(1.0)
    for layer in model.layers:   # in graph order: a shared range's source is baked already
        if isinstance(layer, FakeQuant) and layer.same_as:
            src = model.get_layer(layer.same_as)
            layer.lo.assign(src.lo)
            layer.hi.assign(src.hi)
