"""PyTorch sources: torch.export programs (.pt2), TorchScript (.pt), and nn.Modules from Python.

torch is imported here only, and only when a torch source is read (`edgekit[torch]`).

What comes from the program itself: input names (the forward's argument names, as
torch.export and TorchScript record them), input shapes (a torch.export program's; a traced
TorchScript module records none), output names (a dict's keys, a namedtuple's fields, else
`output` / `output_0, output_1, ...` in the order returned). A dynamic batch dimension becomes 1
(the runtime loops over a larger batch); a shape the program does not record, or any other
dynamic dimension, comes from `--input-shape name=1x3x224x224`, else from the calibration data
(one sample's shape, batch 1: convert.shapes), and is refused where neither says.

The ONNX model both formats start from comes from torch's exporter: the dynamo exporter
(torch.export -> ONNX, opset 18+, converted down to 17) first, the TorchScript exporter (opset 17)
when the dynamo one fails or its graph does not match torch; which one made it is recorded in the source notes.
Every export is run in ONNX Runtime on a probe input and compared with torch's own outputs
(SNR >= 40 dB on every output) before it is used. The TFLite path then goes through
edgekit.convert.onnx_tflite (onnx2tf + the TFLiteConverter; why: that module's docstring).

The float reference that validation and the golden data are measured against is the torch
model itself: `Source.reference_outputs` runs it (eager, float32) on the validation data.
The float ONNX export only provides the interface specs (names, shapes) the data is checked
against.
"""

from __future__ import annotations

import atexit
import copy
import inspect
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edgekit.bundle import sha256_file
from edgekit.errors import ConversionError, EdgekitError, SourceModelError

TORCH_EXPORT_SUFFIXES = (".pt2",)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ptl", ".jit")
MIN_EXPORT_SNR_DB = 40.0
SOURCE_OPSET = 17          # the opset most profiles build at; the pipeline adapts it per target
_TORCH_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
                 "int32": np.int32, "uint8": np.uint8, "int8": np.int8, "bool": np.bool_}


def import_torch(where: str = ""):
    try:
        import torch
    except ImportError:
        raise SourceModelError("reading a PyTorch model needs torch", path=where or None,
                               hint="pip install 'edgekit[torch]'") from None
    return torch


@dataclass
class _Program:
    """A torch model reduced to what conversion needs."""

    kind: str                          # torch-export | torchscript | torch-module
    call: Callable[..., Any]           # positional tensors -> outputs
    export_target: Any                 # what torch.onnx.export takes (module or ExportedProgram)
    fallback_target: Any               # what the TorchScript exporter takes
    input_names: List[str]
    input_shapes: List[Tuple[int, ...]]   # -1: dynamic / unknown
    input_dtypes: List[type]
    notes: List[str]


# --- reading ------------------------------------------------------------------------------------------

def read_program(path: Path) -> _Program:
    torch = import_torch(str(path))
    suffix = path.suffix.lower()
    if suffix in TORCH_EXPORT_SUFFIXES:
        try:
            ep = torch.export.load(str(path))
        except Exception as e:  # noqa: BLE001 - any loader failure is the user's file: one line
            raise SourceModelError(f"torch.export.load cannot read it: {str(e).splitlines()[0][:300]}",
                                   path=str(path), hint="write it with torch.export.save(exported_program, path)")
        return _from_exported(ep, "torch-export", [])
    try:
        sm = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise SourceModelError(f"not a TorchScript file ({str(e).splitlines()[0][:200]})", path=str(path),
                               hint="a state_dict or a pickled nn.Module carries no program: save it with "
                                    "torch.jit.save(torch.jit.trace(model, example)) or torch.export.save, or "
                                    "pass the nn.Module to edgekit.convert.convert_module()") from None
    sm.eval()
    args = sm.forward.schema.arguments[1:]
    names = [a.name for a in args]
    shapes, dtypes = [], []
    for v in list(sm.graph.inputs())[1:]:
        sizes = None
        try:
            sizes = v.type().sizes()
        except (RuntimeError, AttributeError):
            sizes = None
        shapes.append(tuple(int(d) if d is not None else -1 for d in sizes) if sizes else ())
        st = None
        try:
            st = v.type().scalarType()
        except (RuntimeError, AttributeError):
            st = None
        dtypes.append({"Float": np.float32, "Long": np.int64, "Int": np.int32, "Half": np.float16,
                       "Double": np.float64, "Bool": np.bool_}.get(st or "Float", np.float32))
    notes = [] if all(shapes) else ["TorchScript records no input shapes: taken from --input-shape or the "
                                    "calibration data"]
    return _Program("torchscript", sm, sm, sm, names, shapes, dtypes, notes)


def _from_exported(ep, kind: str, notes: List[str]) -> _Program:
    from torch.export.graph_signature import InputKind

    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    shapes, dtypes = [], []
    for name in user:
        val = nodes[name].meta.get("val")
        if val is None or not hasattr(val, "shape"):
            raise SourceModelError(f"input '{name}' is not a tensor; edgekit converts tensor inputs only")
        shapes.append(tuple(d if isinstance(d, int) else -1 for d in val.shape))
        dtypes.append(_TORCH_DTYPES.get(str(val.dtype).replace("torch.", ""), np.float32))
    mod = ep.module()
    return _Program(kind, mod, ep, mod, user, shapes, dtypes, notes)


def program_from_module(module, example_inputs: Sequence[Any]) -> _Program:
    torch = import_torch()
    if not isinstance(module, torch.nn.Module):
        raise SourceModelError(f"expected a torch.nn.Module, got {type(module).__name__}")
    module.eval()
    ex = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) < len(ex):
        raise SourceModelError(f"{len(ex)} example inputs for a forward() that takes {len(params)}")
    names = [p.name for p in params[:len(ex)]]
    shapes = [tuple(int(d) for d in t.shape) for t in ex]
    dtypes = [_TORCH_DTYPES.get(str(t.dtype).replace("torch.", ""), np.float32) for t in ex]
    return _Program("torch-module", module, module, module, names, shapes, dtypes, [])


# --- shapes, outputs ------------------------------------------------------------------------------------

def resolve_shapes(prog: _Program, given: Optional[Dict[str, Sequence[int]]], where: str, data=None
                   ) -> Dict[str, Tuple[int, ...]]:
    """Static shapes for every input: --input-shape where given; else the program's, its unknown
    dimensions from the calibration data (`data`, a convert.shapes.DataShapes: one sample, batch 1)
    and a dynamic batch as 1; refused where neither the user nor the data says."""
    given = dict(given or {})
    unknown = [k for k in given if k not in prog.input_names]
    if unknown:
        raise SourceModelError(f"--input-shape names '{unknown[0]}', which is not an input of the model "
                               f"(inputs: {', '.join(prog.input_names)})", path=where)
    out = {}
    for name, shape in zip(prog.input_names, prog.input_shapes):
        if name in given:
            g = tuple(int(d) for d in given[name])
            if shape and (len(g) != len(shape) or any(d != -1 and d != x for d, x in zip(shape, g))):
                raise SourceModelError(f"--input-shape {name}={'x'.join(map(str, g))} does not fit the program's "
                                       + "x".join("?" if d == -1 else str(d) for d in shape), path=where)
            out[name] = g
            continue
        from_data = data.complete(name, shape, len(prog.input_names)) if data is not None else None
        if from_data is not None and (not shape or any(d == -1 for d in shape[1:])):
            out[name] = from_data
            continue
        if not shape:
            raise SourceModelError(f"the program records no shape for input '{name}'", path=where,
                                   hint=f"give it: --input-shape {name}=1x3x224x224 (your model's), or "
                                        "calibration data (--calib) whose samples have that shape")
        s = tuple(1 if (i == 0 and d == -1) else d for i, d in enumerate(shape))
        if any(d == -1 for d in s):
            raise SourceModelError(f"input '{name}' has dynamic dimensions "
                                   + "x".join("?" if d == -1 else str(d) for d in shape), path=where,
                                   hint=f"give them: --input-shape {name}=" + "x".join(
                                       "1" if (i == 0 and d == -1) else ("<size>" if d == -1 else str(d))
                                       for i, d in enumerate(shape)) + ", or calibration data (--calib) "
                                       "whose samples fix them")
        out[name] = s
    return out


def flatten_outputs(out) -> List[Tuple[str, Any]]:
    """(name, tensor) in the order the model returns them."""
    torch = import_torch()
    if isinstance(out, torch.Tensor):
        return [("output", out)]
    if isinstance(out, dict):
        return [(str(k), v) for k, v in out.items()]
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return [(f, getattr(out, f)) for f in out._fields]
    if isinstance(out, (tuple, list)):
        flat = []
        for i, v in enumerate(out):
            if not isinstance(v, torch.Tensor):
                raise SourceModelError(f"output {i} is a {type(v).__name__}; edgekit converts models that return "
                                       "tensors, a tuple/list of tensors, a dict or a namedtuple of them")
            flat.append((f"output_{i}", v))
        return flat
    raise SourceModelError(f"the model returns a {type(out).__name__}, not tensors")


def probe(prog: _Program, shapes: Dict[str, Tuple[int, ...]], seed: int = 0) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for name, dt in zip(prog.input_names, prog.input_dtypes):
        if np.issubdtype(dt, np.floating):
            out.append(rng.uniform(0.0, 1.0, shapes[name]).astype(dt))
        else:
            out.append(np.zeros(shapes[name], dt))
    return out


def run_torch(call, arrays: Sequence[np.ndarray]) -> List[Tuple[str, np.ndarray]]:
    torch = import_torch()
    with torch.no_grad():
        res = call(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
    return [(n, t.detach().cpu().numpy()) for n, t in flatten_outputs(res)]


# --- export ------------------------------------------------------------------------------------------------

def _export(prog: _Program, exporter: str, args, out_names: List[str]) -> bytes:
    torch = import_torch()
    with tempfile.TemporaryDirectory(prefix="edgekit-torch-onnx-") as d:
        f = os.path.join(d, "model.onnx")
        if exporter == "dynamo":
            prog_ = torch.onnx.export(prog.export_target, args, input_names=list(prog.input_names),
                                      output_names=list(out_names), dynamo=True, external_data=False,
                                      optimize=True, verbose=False)
            prog_.save(f, external_data=False)
        else:
            torch.onnx.export(prog.fallback_target, args, f, input_names=list(prog.input_names),
                              output_names=list(out_names), dynamo=False, opset_version=17,
                              do_constant_folding=True)
        return Path(f).read_bytes()


def export_onnx(prog: _Program, shapes: Dict[str, Tuple[int, ...]], where: str):
    """(ONNX bytes, output names, record) from the first exporter whose graph matches torch."""
    import contextlib
    import io
    import warnings

    from edgekit.convert import onnx_tflite as ot

    torch = import_torch()
    arrays = probe(prog, shapes)
    expected = run_torch(prog.call, arrays)
    out_names = [n for n, _ in expected]
    args = tuple(torch.from_numpy(a) for a in arrays)
    tried = []
    for exporter in ("dynamo", "torchscript"):
        sink = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
                warnings.simplefilter("ignore")
                data = _export(prog, exporter, args, out_names)
        except Exception as e:  # noqa: BLE001 - recorded, then the next exporter is tried
            first = (str(e).strip().splitlines() or [""])[0][:200]
            tried.append(f"{exporter}: {type(e).__name__}: {first}")
            continue
        try:
            data = down_convert(data, SOURCE_OPSET)
        except Exception as e:  # noqa: BLE001 - recorded, then the next exporter is tried
            tried.append(f"{exporter}: opset {_opset(data)} -> {SOURCE_OPSET} failed: {str(e).strip()[:160]}")
            continue
        ins, outs = ot.io_of(data)
        data = ot.fix_shapes(data, shapes)
        got = ot.ort_run(data, {i.name: a for i, a in zip(ins, arrays)})
        snr = {n: round(ot.snr_db(r, g), 1) if r.shape == g.shape else float("-inf")
               for (n, r), g in zip(expected, got)}
        worst = min(snr.values())
        if [o.name for o in outs] != out_names or worst < MIN_EXPORT_SNR_DB:
            tried.append(f"{exporter}: the ONNX graph does not match torch (outputs {[o.name for o in outs]}, "
                         f"SNR {snr})")
            continue
        opset = _opset(data)
        record = {"check": f"ONNX export ({exporter} exporter, opset {opset}) in ONNX Runtime vs torch, "
                           "probe input", "snr_db": snr, "passed": True, "exporter": exporter,
                  "tried_first": tried}
        return data, out_names, record
    raise ConversionError("no torch ONNX exporter produced a graph that matches the model: " + "; ".join(tried),
                          stage="torch -> onnx", hint="export the model to ONNX yourself and convert the .onnx")


def down_convert(data: bytes, opset: int) -> bytes:
    """The dynamo exporter writes opset 18 or newer, IR version 10 and an ai.onnx.ml import; the
    profiles build at opset 17 (13 for JetPack 4) and their oldest ONNX Runtime (1.16) reads IR 9
    and ai.onnx.ml 3 at most (declared at 3: an undeclared domain gets ONNX Runtime's newest when
    the quantization pre-processing saves the optimized graph). onnx's version
    converter leaves attributes the older op does not have (ReduceMean's noop_with_empty_axes):
    those are dropped, and the result is checked against torch by the caller."""
    import onnx
    from onnx import defs, version_converter

    m = onnx.load_from_string(data)
    if _opset(data) > opset:
        m = version_converter.convert_version(m, opset)
        for node in m.graph.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            known = defs.get_schema(node.op_type, opset, "").attributes
            for a in [a for a in node.attribute if a.name not in known]:
                node.attribute.remove(a)
    # domains no node uses go (the dynamo exporter declares ai.onnx.ml 5, which ONNX Runtime 1.16 refuses)
    used = {n.domain or "" for n in m.graph.node} | {"", "ai.onnx"}
    for f in m.functions:
        used |= {n.domain or "" for n in f.node} | {f.domain}
    keep = [o for o in m.opset_import if (o.domain or "") in used]
    del m.opset_import[:]
    m.opset_import.extend(keep)
    if "ai.onnx.ml" not in used:   # declared at 1.16's version, or ONNX Runtime's optimizer stamps its newest (5)
        m.opset_import.append(onnx.helper.make_opsetid("ai.onnx.ml", 3))
    # the IR version the opset needs, not the exporter's newest (ONNX Runtime 1.16 reads IR <= 9)
    m.ir_version = min(m.ir_version, onnx.helper.find_min_ir_version_for(list(m.opset_import)))
    onnx.checker.check_model(m)
    return m.SerializeToString()


def _opset(data: bytes) -> int:
    import onnx

    m = onnx.load_from_string(data)
    return max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)


# --- the float reference -----------------------------------------------------------------------------------------

class TorchReference:
    """The torch model as the reference validation measures against: dataset -> outputs by name."""

    def __init__(self, call, input_names: List[str], batch: Dict[str, int]):
        self.call, self.input_names, self.batch = call, input_names, batch
        self.torch_version = import_torch().__version__

    def __call__(self, ds) -> Dict[str, np.ndarray]:
        n = len(ds)
        step = max(1, min(self.batch.values()) if self.batch else 1)
        parts: List[List[Tuple[str, np.ndarray]]] = []
        for i in range(0, n, step):
            parts.append(run_torch(self.call, [ds.inputs[k][i:i + step] for k in self.input_names]))
        names = [k for k, _ in parts[0]]
        return {k: np.concatenate([p[j][1] for p in parts]) for j, k in enumerate(names)}


# --- the Python API: an nn.Module ------------------------------------------------------------------------------

def save_module(module, example_inputs: Sequence[Any], path: Path) -> Path:
    """An nn.Module as a torch.export program file (written atomically): the source file the
    recipe names, so a bundle's recipe can rebuild it."""
    torch = import_torch()
    program_from_module(module, example_inputs)      # checks the module and its example inputs
    ex = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        ep = torch.export.export(module, ex)
    except Exception as e:  # noqa: BLE001 - the user's module: one line, with torch's reason
        raise SourceModelError(f"torch.export cannot capture the module: {str(e).strip().splitlines()[0][:300]}",
                               hint="make forward() exportable (torch.export), or save TorchScript and convert "
                                    "the .pt") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.export.save(ep, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --- load -------------------------------------------------------------------------------------------------------

_EXPORTED: Dict[tuple, tuple] = {}      # (file sha256, shapes) -> export_onnx's (bytes, output names, record)
_SAVED: Dict[tuple, tuple] = {}         # (ONNX sha256, shapes) -> (kept SavedModel directory, its TFModel)


def _saved_model(data: bytes, workdir: Path, shapes, where: str):
    """onnx_tflite.to_saved_model, once per process for the same graph and shapes (a recipe's second run,
    a mixed-precision and a 16x8 build of one program): later calls get a copy of the checked SavedModel."""
    import dataclasses
    import hashlib

    from edgekit.convert import onnx_tflite as ot

    key = (hashlib.sha256(data).hexdigest(), tuple(sorted((k, tuple(v)) for k, v in shapes.items())))
    if key not in _SAVED:
        tfm = ot.to_saved_model(data, workdir, shapes, where)
        kept = tempfile.mkdtemp(prefix="edgekit-savedmodel-")
        atexit.register(shutil.rmtree, kept, True)
        keep = Path(kept) / "saved_model"
        shutil.copytree(tfm.saved_model, keep)
        _SAVED[key] = (keep, copy.deepcopy(dataclasses.replace(tfm, saved_model=keep)))
        return tfm
    keep, tfm = _SAVED[key]
    dest = workdir / "saved_model_from_onnx"
    shutil.copytree(keep, dest)
    return copy.deepcopy(dataclasses.replace(tfm, saved_model=dest))


def load(path: Path, workdir: Path, input_shapes: Optional[Dict[str, Sequence[int]]] = None,
         needs_tflite: bool = True, calib=None):
    """A .pt2 / .pt file as a Source: verified float ONNX, the torch reference, and (when asked)
    the SavedModel the TFLite path converts. `calib`: the calibration data's shapes
    (convert.shapes.DataShapes), for the dimensions the program leaves unknown."""
    from edgekit.convert import shapes as shaping
    from edgekit.convert.source import Source

    where = str(path)
    prog = read_program(path)
    shapes = resolve_shapes(prog, input_shapes, where, calib)
    taken = {n: shapes[n] for n, s in zip(prog.input_names, prog.input_shapes)
             if n not in (input_shapes or {}) and shaping.needs_data(s)}
    digest = sha256_file(path)
    key = (digest, tuple(sorted((k, tuple(v)) for k, v in shapes.items())))
    if key not in _EXPORTED:        # the same program exported again gives the same graph: once per process
        _EXPORTED[key] = export_onnx(prog, shapes, where)
    data, out_names, record = _EXPORTED[key]
    record = copy.deepcopy(record)
    ref_path = workdir / "reference_float.onnx"
    ref_path.write_bytes(data)
    torch = import_torch()
    src = Source(path, prog.kind, digest, path.stat().st_size, onnx_bytes=data, reference_path=ref_path)
    src.input_shapes = dict(shapes)
    src.notes += prog.notes + [f"ONNX from torch {torch.__version__}'s {record['exporter']} exporter "
                               f"(opset {_opset(data)})"
                               + (f" after: {'; '.join(record['tried_first'])}" if record["tried_first"] else "")]
    if taken:
        src.shapes_from_data = shaping.record(taken, calib)
        src.notes.append(src.shapes_from_data["note"])
    src.checks.append(record)
    src.reference_outputs = TorchReference(prog.call, prog.input_names, {k: v[0] for k, v in shapes.items() if v})
    src.reference_note = f"the PyTorch model itself (torch {torch.__version__}, eager, float32)"
    src.interface = {"inputs": {n: list(shapes[n]) for n in prog.input_names}, "outputs": list(out_names)}
    if needs_tflite:
        try:
            src.attach_tflite(_saved_model(data, workdir, shapes, where))
        except EdgekitError as e:   # the ONNX rows can still be built; the TFLite rows fail with this reason
            src.no_tflite_reason = f"no TFLite path for this model: {e}"
    return src
