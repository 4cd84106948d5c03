"""SavedModel -> full-integer TFLite (int8, or int16 activations x int8 weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from edgekit.convert.data import Dataset
from edgekit.convert.onnx_tflite import keep_io_order  # the source's input/output order
from edgekit.targets import TFLiteBuild

_IO_TYPES = {"int8": "int8", "uint8": "uint8", "float32": "float32"}


def to_tflite(saved_model: Path, calib: Dataset, build: TFLiteBuild,
              tick: Optional[Callable[[int, int], None]] = None) -> bytes:
    conv = converter(saved_model, calib, build, tick)
    if build.activations in ("int8", "int16"):
        from edgekit.convert.tflite_fc import rewrite  # multi-row int8 FULLY_CONNECTED -> 1x1 CONV_2D

        return rewrite(keep_io_order(saved_model, conv.convert()))[0]
    return keep_io_order(saved_model, conv.convert())


def converter(saved_model: Path, calib: Dataset, build: TFLiteBuild,
              tick: Optional[Callable[[int, int], None]] = None):
    """The TFLiteConverter configured for `build` (convert.tflite_ranges calibrates with the same one)."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    n = len(calib)

    def representative():
        for i in range(n):
            if tick:
                tick(i + 1, n)
            yield {k: v for k, v in calib.sample(i).items()}

    if build.activations == "float16":  # FP16 weights, float compute: a GPU delegate's format
        conv.target_spec.supported_types = [tf.float16]
        return conv
    if build.activations == "dynamic":  # dynamic range: INT8 weights, activations quantized at run time
        if not build.per_channel:
            conv._experimental_disable_per_channel = True
        return conv
    conv.representative_dataset = representative
    if build.activations == "int16":
        conv.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS]
        io = tf.int16 if build.io_type != "float32" else tf.float32
    else:
        # INT8 kernels first; an op without one stays float and is reported, never silently.
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                          tf.lite.OpsSet.TFLITE_BUILTINS]
        io = getattr(tf, _IO_TYPES[build.io_type])
    conv.inference_input_type = io
    conv.inference_output_type = io
    if not build.per_channel:
        conv._experimental_disable_per_channel = True
    return conv


def float_ops(model_path: Path) -> dict:
    """Op name -> count of ops that compute in float (QUANTIZE/DEQUANTIZE at the edges excluded)."""
    from edgekit.runtime.tflite import find_interpreter

    _, interp_cls, _ = find_interpreter()
    interp = interp_cls(model_path=str(model_path))
    ops = interp._get_ops_details()   # LiteRT / TensorFlow's interpreter (the converting side has one)
    dtypes = {t["index"]: t["dtype"] for t in interp.get_tensor_details()}
    import numpy as np

    out: dict = {}
    for op in ops:
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        outs = [i for i in op["outputs"] if i >= 0]
        if any(np.dtype(dtypes.get(i, np.int8)) == np.float32 for i in outs):
            out[op["op_name"]] = out.get(op["op_name"], 0) + 1
    return out

