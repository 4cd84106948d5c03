"""The converter: Keras / .h5 / SavedModel / ONNX -> INT8 TFLite and INT8 ONNX bundles per target.

The only package that imports tensorflow, tf2onnx and onnxruntime.quantization
(always inside functions, so `import edgekit.convert` stays cheap).
"""

from edgekit.convert.pipeline import ConvertResult, convert

__all__ = ["convert", "ConvertResult"]
