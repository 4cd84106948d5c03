"""The build steps the orchestrator (convert.pipeline), the rescue ladder (convert.rescue) and the
candidate search (convert.select) share: one artifact in a build's scheme, the float ONNX graph a
build starts from, the precision a build stands for, the one-line reason of a failed step.

Below all three: it imports the converters (inside functions) and never the modules above it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Dict, Tuple

from edgekit.errors import ConversionError, EdgekitError

if TYPE_CHECKING:
    from edgekit.convert.data import Dataset
    from edgekit.convert.source import Source


def convert_once(source: "Source", fmt: str, build, calib: "Dataset", float_onnx: Dict[int, bytes],
                 tick=None) -> Tuple[bytes, int]:
    """One artifact in the build's scheme: (model bytes, float model bytes). Converter errors
    propagate with their own type; the caller records them in the row."""
    from edgekit.convert import onnx as onnx_conv
    from edgekit.convert import tflite as tflite_conv

    if fmt == "tflite":
        if source.saved_model is None:
            raise ConversionError(source.no_tflite_reason or "this source has no TFLite path", stage="tflite")
        return tflite_conv.to_tflite(source.saved_model, calib, build, tick), len(source.float_tflite)
    f = float_onnx_for(source, build.opset, float_onnx)
    if build.fp16:
        return onnx_conv.to_fp16(f), len(f)
    if getattr(build, "dynamic", False):
        return onnx_conv.quantize_dynamic(f, build), len(f)
    return onnx_conv.quantize(f, calib, build, tick, range_overrides=source.input_ranges), len(f)


def float_onnx_for(source: "Source", opset: int, cache: Dict[int, bytes]) -> bytes:
    """The source's float ONNX graph at `opset` (tf2onnx for TF sources), made once per opset in `cache`."""
    from edgekit.convert import onnx as onnx_conv

    if opset not in cache:
        if source.is_tf:
            cache[opset] = onnx_conv.saved_model_to_onnx(source.onnx_saved_model or source.saved_model, opset)
        else:
            cache[opset] = onnx_conv.adapt_opset(source.onnx_bytes, opset)
        cache[opset] = onnx_conv.tidy_opsets(cache[opset])
    return cache[opset]


def error_line(e: BaseException, cap) -> str:
    """A failed step in one line: the error's first line, then the converter's last native output."""
    native = "; ".join(cap.tail(3)) if cap is not None else ""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    text = first if isinstance(e, EdgekitError) else f"{type(e).__name__}: {first}"
    return text + (f" [{native}]" if native and native not in text else "")


def precision_of(build) -> str:
    """fp16 | dynamic | int16x8 | int8: what a TFLite or ONNX build stands for."""
    b = dataclasses.asdict(build)
    if b.get("fp16") or b.get("activations") == "float16":
        return "fp16"
    if b.get("dynamic") or b.get("activations") == "dynamic":
        return "dynamic"
    if b.get("activations") == "int16" or b.get("activation_type") == "int16":
        return "int16x8"
    return "int8"
