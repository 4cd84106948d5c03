"""The converter: Keras / .h5 / SavedModel / ONNX -> INT8 TFLite and INT8 ONNX bundles per target.

    from edgekit.convert import Calibration, ConvertRecipe, convert
    result = convert(ConvertRecipe("model.keras", ("rpi4",), calibration=Calibration("calib.npz")), "build")

The only package that imports tensorflow, tf2onnx and onnxruntime.quantization
(always inside functions, so `import edgekit.convert` stays cheap).
"""

from edgekit.convert.pipeline import InMemoryData, convert, convert_module
from edgekit.convert.recipe import Calibration, ConvertRecipe, Floor, Search
from edgekit.convert.result import ConvertResult

__all__ = ["convert", "convert_module", "ConvertRecipe", "Calibration", "Floor", "Search", "ConvertResult",
           "InMemoryData"]
