"""The on-device runtime: numpy and one backend (LiteRT, tflite-runtime, TensorFlow Lite, ONNX Runtime).

    from edgekit.runtime import load
    model = load("build/model-rpi4")     # a bundle, or any .tflite / .onnx file
    y = model(x)                          # float in, float out
    report = model.benchmark(runs=200, warmup=20)

No backend is imported until a model of its format is loaded.
"""

from edgekit.runtime.model import BACKENDS, Model, load
from edgekit.runtime.spec import TensorSpec

__all__ = ["load", "Model", "TensorSpec", "BACKENDS"]
