"""Source models: Keras 3 .keras, Keras 2 .h5 (tf_keras fallback), SavedModel, ONNX.

TF sources become a SavedModel (Keras through `model.export()`, the path that
survives Keras 3), and the float reference is that SavedModel converted to a
float32 TFLite model without optimizations: the same graph the INT8 artifacts
come from, runnable where `tf.saved_model.load` is not (MLPerf Tiny's KWS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from edgekit.bundle import sha256_file, sha256_tree
from edgekit.convert.native import captured_stderr, quiet_tensorflow
from edgekit.errors import SourceModelError

KERAS_SUFFIXES = (".keras",)
H5_SUFFIXES = (".h5", ".hdf5")


@dataclass
class Source:
    path: Path
    kind: str                       # keras | keras-h5 | tf_keras-h5 | savedmodel | onnx
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

    @property
    def is_tf(self) -> bool:
        return self.kind != "onnx"


def detect_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "savedmodel"
        raise SourceModelError("a directory, but not a TF SavedModel (no saved_model.pb)", path=str(path),
                               hint="give a .keras, .h5, .onnx file or a SavedModel directory")
    if not path.is_file():
        raise SourceModelError("model file not found", path=str(path))
    suffix = path.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix in H5_SUFFIXES:
        return "keras-h5"
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".tflite":
        raise SourceModelError("a .tflite model is already converted; edgekit converts from Keras, "
                               "SavedModel or ONNX", path=str(path),
                               hint="run it as it is with `edgekit run` / `edgekit bench`")
    raise SourceModelError(f"unknown model format '{suffix or '(no suffix)'}'", path=str(path),
                           hint="edgekit converts .keras, .h5, .onnx files and SavedModel directories")


def _load_keras(path: Path, kind: str, src: Source):
    """Keras 3 first; a Keras 2 .h5 that Keras 3 rejects goes to tf_keras."""
    import keras

    from edgekit.convert import fakequant  # noqa: F401  (registers the QAT layers for loading)

    try:
        return keras.models.load_model(str(path), compile=False), kind
    except Exception as e3:
        if kind != "keras-h5":
            raise SourceModelError(f"Keras 3 cannot load it: {str(e3).splitlines()[0][:300]}",
                                   path=str(path)) from None
        try:
            import tf_keras
        except ImportError:
            raise SourceModelError("Keras 3 rejects this Keras 2 .h5 and tf_keras is not installed",
                                   path=str(path), hint="pip install tf-keras") from None
        try:
            model = tf_keras.models.load_model(str(path), compile=False)
        except Exception as e2:
            raise SourceModelError(f"neither Keras 3 nor tf_keras can load it: "
                                   f"{str(e2).splitlines()[0][:300]}", path=str(path)) from None
        src.notes.append("loaded with tf_keras (Keras 3 rejected it: "
                         f"{str(e3).splitlines()[0][:120]})")
        return model, "tf_keras-h5"


def load_source(path: str, workdir: Path) -> Source:
    p = Path(path)
    kind = detect_kind(p)
    if kind == "onnx":
        return _load_onnx(p)
    quiet_tensorflow()
    digest = sha256_tree(p) if p.is_dir() else sha256_file(p)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    src = Source(p, kind, digest, size)
    with captured_stderr() as cap:
        try:
            import tensorflow as tf

            if kind == "savedmodel":
                src.saved_model = p
            else:
                model, src.kind = _load_keras(p, kind, src)
                src.layer_names = [layer.name for layer in model.layers]
                sm = workdir / "saved_model"
                if src.kind == "tf_keras-h5":
                    model.export(str(sm))
                else:
                    from edgekit.convert import fakequant

                    src.qat = fakequant.is_qat(model)
                    if src.qat:
                        return _qat_source(src, model, workdir)
                    model.export(str(sm), verbose=False)
                src.saved_model = sm
            conv = tf.lite.TFLiteConverter.from_saved_model(str(src.saved_model))
            src.float_tflite = conv.convert()
        except SourceModelError:
            raise
        except Exception as e:
            detail = "; ".join(cap.tail(2))
            raise SourceModelError(f"cannot read the model as {kind}: {str(e).splitlines()[0][:300]}"
                                   + (f" [{detail}]" if detail else ""), path=str(p)) from None
    src.reference_path = workdir / "reference_float.tflite"
    src.reference_path.write_bytes(src.float_tflite)
    return src


def _qat_source(src: Source, model, workdir: Path) -> Source:
    """A QAT model, three ways: FakeQuant graph (TFLite), Clip graph (ONNX), float reference."""
    import tensorflow as tf

    from edgekit.convert import fakequant

    for mode, attr in (("fakequant", "saved_model"), ("clip", "onnx_saved_model"), ("float", None)):
        sm = workdir / f"saved_model_{mode}"
        with fakequant.mode(mode):
            model.export(str(sm), verbose=False)
        if attr:
            setattr(src, attr, sm)
        else:
            src.float_tflite = tf.lite.TFLiteConverter.from_saved_model(str(sm)).convert()
    src.input_ranges = fakequant.input_ranges(model)
    src.notes.append("quantization-aware trained: its learned ranges are the INT8 ranges; the float "
                     "reference is the same model with fake quantization off")
    src.reference_path = workdir / "reference_float.tflite"
    src.reference_path.write_bytes(src.float_tflite)
    return src


def float_tflite(model) -> bytes:
    """A Keras 3 model as float32 TFLite (the pruning and distillation reports time it)."""
    import tempfile

    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="edgekit-float-") as d, captured_stderr():
        model.export(str(Path(d) / "sm"), verbose=False)
        return tf.lite.TFLiteConverter.from_saved_model(str(Path(d) / "sm")).convert()


def _load_onnx(p: Path) -> Source:
    try:
        import onnx
    except ImportError:
        raise SourceModelError("reading ONNX needs the onnx package", path=str(p),
                               hint="pip install 'edgekit[convert]'") from None
    data = p.read_bytes()
    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as e:
        raise SourceModelError(f"not a valid ONNX model: {str(e).splitlines()[0][:300]}",
                               path=str(p)) from None
    src = Source(p, "onnx", sha256_file(p), len(data), onnx_bytes=data, reference_path=p)
    return src
