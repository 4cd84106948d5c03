"""The Source record: a source model as read, whichever reader read it (convert.sources for Keras,
SavedModel and ONNX; convert.torch_source for PyTorch). Below both readers, so neither imports the other
for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple


@dataclass
class Source:
    path: Path
    kind: str                       # keras | keras-h5 | tf_keras-h5 | savedmodel | onnx | torch-export | torchscript
    sha256: str
    bytes: int
    saved_model: Optional[Path] = None
    onnx_bytes: Optional[bytes] = None
    float_tflite: Optional[bytes] = None
    reference_path: Optional[Path] = None
    notes: List[str] = field(default_factory=list)
    layer_names: List[str] = field(default_factory=list)   # the source's layer names, where known
    qat: bool = False               # trained with edgekit's fake quantization (edgekit qat)
    onnx_saved_model: Optional[Path] = None   # QAT: the graph ONNX is made from (ranges as Clip)
    input_ranges: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # QAT: learned input ranges
    input_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)      # dims fixed by the user
    shapes_from_data: Dict[str, Any] = field(default_factory=dict)   # input shapes the calibration data fixed
    no_tflite_reason: Optional[str] = None     # why this source has no TFLite path (saved_model is None)
    # ONNX / PyTorch sources:
    reference_outputs: Optional[Callable[[Any], Dict[str, Any]]] = None  # dataset -> float outputs (torch)
    reference_note: str = ""                   # what the float reference is
    checks: List[Dict[str, Any]] = field(default_factory=list)   # conversion checks made at load time
    layout: Dict[str, str] = field(default_factory=dict)         # tensor -> how its layout is kept
    interface: Dict[str, Any] = field(default_factory=dict)      # the source's inputs (shapes) and outputs

    @property
    def is_tf(self) -> bool:
        """ONNX artifacts come from the SavedModel (tf2onnx), unless the source carries its ONNX graph."""
        return self.onnx_bytes is None

    def attach_tflite(self, tfm) -> None:
        """The SavedModel (and float TFLite) that onnx_tflite made from this source's ONNX graph."""
        self.saved_model, self.float_tflite = tfm.saved_model, tfm.float_tflite
        self.layout.update(tfm.layout)
        self.checks += tfm.checks
        self.notes += ["TFLite path: onnx2tf -> SavedModel (source interface kept) -> TFLiteConverter"] + tfm.notes
        self.no_tflite_reason = None

    def describe(self) -> Dict[str, object]:
        """What the manifest and the report record about the source."""
        d = {"path": str(self.path), "kind": self.kind, "sha256": self.sha256, "bytes": self.bytes,
             "notes": list(self.notes), "qat": self.qat}
        for k in ("reference_note", "checks", "layout", "interface", "shapes_from_data"):
            if getattr(self, k):
                d[k.replace("reference_note", "reference")] = getattr(self, k)
        return d
