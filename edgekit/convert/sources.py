"""Source models: Keras 3 .keras, Keras 2 .h5 (tf_keras fallback), SavedModel, ONNX, PyTorch.

TF sources become a SavedModel (Keras through `model.export()`, the path that
survives Keras 3), and the float reference is that SavedModel converted to a
float32 TFLite model without optimizations: the same graph the INT8 artifacts
come from, runnable where `tf.saved_model.load` is not (MLPerf Tiny's KWS).

ONNX and PyTorch sources carry their float ONNX graph (`onnx_bytes`, what the ONNX artifacts
are quantized from) and, for TFLite, a SavedModel made from it by edgekit.convert.onnx_tflite
that keeps the source's interface (NCHW inputs, names, output order). PyTorch sources
(edgekit.convert.torch_source, `edgekit[torch]`) are measured against torch itself
(`reference_outputs`); the ONNX export serves for the interface specs only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

from edgekit.bundle import sha256_file, sha256_tree
from edgekit.convert import shapes as shaping
from edgekit.convert.hf_config import HF_CONFIG_HINT, hf_config_problem, hub_snapshot  # noqa: F401  (the rule)
from edgekit.convert.native import captured_stderr, quiet_tensorflow
from edgekit.convert.shapes import DataShapes
from edgekit.convert.source import Source
from edgekit.errors import EdgekitError, SourceModelError

KERAS_SUFFIXES = (".keras",)
H5_SUFFIXES = (".h5", ".hdf5")
TORCH_EXPORT_SUFFIXES = (".pt2",)                     # torch.export.save
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ptl", ".jit")  # torch.jit.save


def check_hf_config(folder: Path) -> None:
    """A folder (not a SavedModel) whose config.json keeps it from being a language model: SourceModelError saying
    what is wrong with config.json (not what to run: the user ran it)."""
    problem = hf_config_problem(folder)
    if problem:
        raise SourceModelError(f"{problem}, so edgekit cannot take the folder as a Hugging Face language model",
                               path=str(folder), hint=HF_CONFIG_HINT)


ADAPTER_CONFIG = "adapter_config.json"


def check_adapter(folder: Path) -> None:
    """A PEFT adapter folder (adapter_config.json beside adapter_model.safetensors: LoRA's low-rank updates of a
    base model the folder does not hold; transformers would fetch that base by the name the file gives):
    SourceModelError saying to merge it into its base model and convert the merged folder."""
    import json

    cfg = Path(folder) / ADAPTER_CONFIG
    if not cfg.is_file():
        return
    try:
        base = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    of = f" of {base}" if isinstance(base, str) and base else ""
    raise SourceModelError(f"a PEFT adapter{of} ({ADAPTER_CONFIG}), not a model: edgekit converts a whole model",
                           path=str(folder),
                           hint="merge it into its base model (peft: PeftModel.from_pretrained(base, FOLDER)"
                                ".merge_and_unload(), then save_pretrained(MERGED) with the base's tokenizer) and "
                                "convert the merged folder")


def detect_kind(path: Path) -> str:
    path = Path(hub_snapshot(str(path)))   # a hub cache repository folder: its refs/main snapshot, whatever it holds
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "savedmodel"
        check_adapter(path)
        check_hf_config(path)
        if (path / "config.json").is_file():
            raise SourceModelError("a Hugging Face model folder: language models convert through "
                                   "edgekit.convert.llm (convert_llm(LLMRecipe(folder, targets)) or `edgekit convert "
                                   "FOLDER --target ...`)", path=str(path), hint="docs/llm.md")
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
    if suffix in TORCH_EXPORT_SUFFIXES:
        return "torch-export"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    if suffix == ".gguf":
        raise SourceModelError("a GGUF file, llama.cpp's format: edgekit converts a language model from its Hugging "
                               "Face folder", path=str(path), hint="convert the folder it came from (docs/llm.md)")
    if suffix == ".tflite":
        raise SourceModelError("a .tflite model is already converted; edgekit converts from Keras, "
                               "SavedModel, ONNX or PyTorch", path=str(path),
                               hint="run it as it is with `edgekit run` / `edgekit bench`")
    raise SourceModelError(f"unknown model format '{suffix or '(no suffix)'}'", path=str(path),
                           hint="edgekit converts .keras, .h5, .onnx, .pt2 (torch.export), .pt (TorchScript) "
                                "files and SavedModel directories")


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


def load_source(path: str, workdir: Path, input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
                needs_tflite: bool = True, data: Optional[DataShapes] = None) -> Source:
    """needs_tflite=False skips making the SavedModel of an ONNX / PyTorch source (onnx2tf).
    `input_shapes` (--input-shape) fix the dimensions a source leaves unknown; where it does not
    say, `data` (the calibration data's shapes, convert.shapes) does: one sample, batch 1."""
    p = Path(hub_snapshot(str(path)))   # a hub cache repository folder: its refs/main snapshot (as detect_kind)
    kind = detect_kind(p)
    if kind == "onnx":
        return _load_onnx(p, workdir, dict(input_shapes or {}), needs_tflite, data)
    if kind in ("torch-export", "torchscript"):
        from edgekit.convert import torch_source

        quiet_tensorflow()
        with captured_stderr():
            return torch_source.load(p, workdir, input_shapes, needs_tflite, data)
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
                    model.export(str(sm), verbose=False,
                                 input_signature=_keras_signature(model, dict(input_shapes or {}), data, src))
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


def _keras_signature(model, given: Dict[str, Tuple[int, ...]], data: Optional[DataShapes], src: Source):
    """The export signature of a Keras 3 model whose inputs leave dimensions beyond the batch
    None: --input-shape, else the calibration data, fixes them (the batch stays dynamic, as
    Keras exports it); None (Keras's own signature) where every input is static."""
    import keras

    ins = [(t.name, tuple(-1 if d is None else int(d) for d in t.shape)) for t in model.inputs]
    if not any(shaping.needs_data(s) for _, s in ins):
        return None
    where = str(src.path)
    unknown = [k for k in given if k not in {n for n, _ in ins}]
    if unknown:
        raise SourceModelError(f"--input-shape names '{unknown[0]}', which is not an input of the model "
                               f"(inputs: {', '.join(n for n, _ in ins)})", path=where)
    shapes, taken = {}, {}
    for name, shape in ins:
        if name in given:
            g = tuple(given[name])
            if len(g) != len(shape) or any(d not in (-1, x) for d, x in zip(shape[1:], g[1:])):
                raise SourceModelError(f"--input-shape {name}={shaping.dims(g)} does not fit the model's "
                                       f"{shaping.dims(shape)}", path=where)
            shapes[name] = g
        elif not shaping.needs_data(shape):
            shapes[name] = shape
        else:
            d = data.complete(name, shape, len(ins)) if data is not None else None
            if d is None:
                raise SourceModelError(f"input '{name}' has dynamic dimensions {shaping.dims(shape)}", path=where,
                                       hint=f"give them: --input-shape {name}=1x"
                                            + "x".join("<size>" if x == -1 else str(x) for x in shape[1:])
                                            + ", or calibration data (--calib) whose samples fix them")
            shapes[name] = taken[name] = d
    if taken:
        src.shapes_from_data = shaping.record(taken, data)
        src.notes.append(src.shapes_from_data["note"])
    try:
        from keras.src.export.export_utils import get_input_signature
    except ImportError:
        raise SourceModelError(f"this Keras ({keras.__version__}) cannot be told the input shapes to export",
                               path=where, hint="save the model with static input shapes") from None
    return keras.tree.map_structure(
        lambda spec: keras.InputSpec(shape=(None,) + tuple(shapes[spec.name][1:]), dtype=spec.dtype, name=spec.name),
        get_input_signature(model))


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
    src.notes.append("quantization-aware trained: its learned ranges are the INT8 ranges; the artifacts are "
                     "measured against the model as trained, fake quantization on (in float: TFLite's "
                     "FAKE_QUANT), the function training optimised; sizes against it without fake quantization")
    src.reference_path = workdir / "reference_fakequant.tflite"
    src.reference_path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(src.saved_model)).convert())
    return src


def float_tflite(model) -> bytes:
    """A Keras 3 model as float32 TFLite (the pruning and distillation reports time it)."""
    import tempfile

    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="edgekit-float-") as d, captured_stderr():
        model.export(str(Path(d) / "sm"), verbose=False)
        return tf.lite.TFLiteConverter.from_saved_model(str(Path(d) / "sm")).convert()


def _load_onnx(p: Path, workdir: Optional[Path] = None, input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
               needs_tflite: bool = False, calib: Optional[DataShapes] = None) -> Source:
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
    src = Source(p, "onnx", sha256_file(p), len(data), onnx_bytes=data, reference_path=p,
                 no_tflite_reason="TFLite from this ONNX source was not made")
    src.reference_note = "the source ONNX model in ONNX Runtime, float32"
    src.input_shapes = dict(input_shapes or {})
    if workdir is None:
        return src
    from edgekit.convert import onnx_tflite as ot

    ins, outs = ot.io_of(data)
    src.interface = {"inputs": {i.name: list(i.shape) for i in ins}, "outputs": [o.name for o in outs]}
    if src.input_shapes:   # the user fixed dims the model leaves dynamic: every artifact and the reference use them
        shapes = ot.resolve_shapes(ins, src.input_shapes, str(p))
        src.onnx_bytes = ot.fix_shapes(data, shapes, keep_dynamic_batch=True)
        src.reference_path = workdir / "reference_float.onnx"
        src.reference_path.write_bytes(src.onnx_bytes)
        src.interface["inputs"] = {k: list(v) for k, v in shapes.items()}
    if needs_tflite:
        quiet_tensorflow()
        # TFLite needs static shapes: where the user did not fix a dynamic dimension, the calibration data
        # does (the ONNX artifacts keep it dynamic, as the source has it)
        taken = {}
        for i in ins:
            if calib is not None and i.name not in src.input_shapes and shaping.needs_data(i.shape):
                d = calib.complete(i.name, i.shape, len(ins))
                if d is not None:
                    taken[i.name] = d
        try:
            shapes = ot.resolve_shapes(ins, {**taken, **src.input_shapes}, str(p))
            with captured_stderr():
                src.attach_tflite(ot.to_saved_model(src.onnx_bytes, workdir, shapes, str(p)))
        except EdgekitError as e:  # the ONNX rows can still be built; the TFLite rows fail with this reason
            src.no_tflite_reason = f"no TFLite path for this ONNX model: {e}"
            if not taken and any(shaping.needs_data(i.shape) for i in ins if i.name not in src.input_shapes):
                src.no_tflite_reason += " (or calibrate on data whose samples fix them: --calib)"
        else:
            if taken:
                src.shapes_from_data = shaping.record(
                    taken, calib, "the TFLite artifacts; the ONNX artifacts keep those dimensions dynamic",
                    scope="for the TFLite artifacts (the ONNX artifacts keep those dimensions dynamic)")
                src.notes.append(src.shapes_from_data["note"])
    return src
