"""ONNX -> TensorFlow SavedModel with the ONNX model's own interface, for the TFLite path.

Every ONNX source (exported from PyTorch by edgekit, or made by Paddle, ...) reaches TFLite
here: onnx2tf translates the graph to TensorFlow (NHWC inside, the layout TFLite's kernels
want), then a thin wrapper restores the source's interface: the inputs keep their ONNX names
and NCHW layout (onnx2tf's keep-NCHW option: one TRANSPOSE inside the graph), the outputs
their ONNX names, shapes and order (a transposed output is transposed back; which output is
which, and any permutation, is decided by running both graphs on the same probe input, never
by guessing from shapes). The wrapped SavedModel then takes the same road as a Keras model's:
TensorFlow's TFLiteConverter with the calibration data (in the source's layout), so INT8,
16x8, FP16, mixed precision and the compatibility check work unchanged.

Why onnx2tf and the TFLiteConverter (measured in November 2026 on the digits CNN with
BatchNorm, depthwise conv and a residual add, 397 validation samples, reference: the model's
own float outputs):

  route                                                top-1 agree   SNR dB
  torch -> ONNX -> onnx2tf -> TFLiteConverter INT8       97.7 %       33.0
  torch -> litert-torch -> ai-edge-quantizer static      97.5 %       12.4
  torch -> ONNX -> ORT quantize_static (stock ONNX)      98.0 %       33.3

- fidelity: the TFLiteConverter's calibration kept the SNR of the stock ONNX route; the
  ai-edge-quantizer's static_wi8_ai8 recipe lost 20 dB on the same model and data;
- coverage: onnx2tf reads any ONNX model (the Paddle-made PP-OCR classifier in the tests
  included); litert-torch reads only PyTorch programs, so ONNX sources would still need
  another route;
- interface: litert-torch renames inputs to args_0 (the ONNX names survive onnx2tf);
- installation: litert-torch 0.10 pulls jax, transformers, torchao and pins older
  typing_extensions and pydantic; onnx2tf 1.29+ pins tensorflow==2.19 and numpy==1.26 exactly,
  which would downgrade the converter's TensorFlow, so `edgekit[torch]` pins onnx2tf 1.28.8
  (which declares no dependencies) and lists what it imports.

Nothing is trusted blindly: `to_saved_model` checks the float TFLite model made from the
wrapper against ONNX Runtime on a probe input and refuses (ConversionError, naming the
output) when they differ.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from edgekit.errors import ConversionError, SourceModelError

IO_ORDER_FILE = "assets.extra/edgekit_io_order.json"   # in a SavedModel: the source's I/O order
MIN_FLOAT_SNR_DB = 40.0   # float TFLite vs ONNX Runtime on the probe: below this, refuse
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")
_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16,
                11: np.float64}


@dataclass
class OnnxIO:
    name: str
    shape: Tuple[int, ...]   # -1 where dynamic
    dtype: type


@dataclass
class TFModel:
    """What the TFLite path needs from an ONNX model."""

    saved_model: Path
    float_tflite: bytes
    inputs: List[OnnxIO]
    outputs: List[OnnxIO]
    layout: Dict[str, str] = field(default_factory=dict)     # input/output name -> what was done
    checks: List[Dict[str, object]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def io_of(model_bytes: bytes) -> Tuple[List[OnnxIO], List[OnnxIO]]:
    import onnx

    m = onnx.load_from_string(model_bytes)
    inits = {i.name for i in m.graph.initializer}

    def one(v) -> OnnxIO:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim)
        return OnnxIO(v.name, dims, _ONNX_DTYPES.get(t.elem_type, np.float32))

    return [one(v) for v in m.graph.input if v.name not in inits], [one(v) for v in m.graph.output]


def resolve_shapes(inputs: Sequence[OnnxIO], given: Optional[Dict[str, Sequence[int]]], where: str
                   ) -> Dict[str, Tuple[int, ...]]:
    """Static shapes for every input: --input-shape where given, batch 1 where only the batch
    dimension is dynamic; any other dynamic dimension is the user's to say."""
    given = dict(given or {})
    unknown = [k for k in given if k not in {i.name for i in inputs}]
    if unknown:
        raise SourceModelError(f"--input-shape names '{unknown[0]}', which is not an input of the model "
                               f"(inputs: {', '.join(i.name for i in inputs)})", path=where)
    out: Dict[str, Tuple[int, ...]] = {}
    for i in inputs:
        if i.name in given:
            shape = tuple(int(d) for d in given[i.name])
            if len(shape) != len(i.shape) or any(d != -1 and d != g for d, g in zip(i.shape, shape)):
                raise SourceModelError(f"--input-shape {i.name}={'x'.join(map(str, shape))} does not fit the "
                                       f"model's {_fmt(i.shape)}", path=where)
            out[i.name] = shape
            continue
        shape = tuple(1 if (k == 0 and d == -1) else d for k, d in enumerate(i.shape))
        if any(d == -1 for d in shape):
            raise SourceModelError(f"input '{i.name}' has dynamic dimensions {_fmt(i.shape)}", path=where,
                                   hint=f"give them: --input-shape {i.name}="
                                        + "x".join("1" if d == -1 and k == 0 else ("N" if d == -1 else str(d))
                                                   for k, d in enumerate(i.shape)).replace("N", "<size>"))
        out[i.name] = shape
    return out


def _fmt(shape) -> str:
    return "x".join("?" if d == -1 else str(d) for d in shape)


def fix_shapes(model_bytes: bytes, shapes: Dict[str, Tuple[int, ...]], keep_dynamic_batch: bool = False) -> bytes:
    """The ONNX model with static input shapes (what the artifacts are built for); with
    keep_dynamic_batch, a dynamic first dimension stays dynamic (batched calibration and
    validation keep working on the ONNX side)."""
    import onnx

    m = onnx.load_from_string(model_bytes)
    changed = False
    for v in m.graph.input:
        if v.name not in shapes:
            continue
        for k, (d, n) in enumerate(zip(v.type.tensor_type.shape.dim, shapes[v.name])):
            if keep_dynamic_batch and k == 0 and not (d.HasField("dim_value") and d.dim_value > 0):
                continue
            if not (d.HasField("dim_value") and d.dim_value == n):
                d.Clear()
                d.dim_value = int(n)
                changed = True
    if not changed:
        return model_bytes
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - shape inference is an aid; ORT re-infers at load
        pass
    return m.SerializeToString()


def _same_pads(size: int, k: int, s: int) -> Tuple[int, int]:
    """TensorFlow's SAME padding (begin, end) for one spatial axis of a pooling."""
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def explicit_pool_pads(model_bytes: bytes) -> Tuple[bytes, List[str]]:
    """MaxPool nodes whose padding onnx2tf would make with a PadV2 of float32's minimum, rewritten
    to the same function without that constant.

    Why: onnx2tf writes a ceil-mode or explicitly padded MaxPool (PyTorch's MaxPool2d(ceil_mode=True),
    as in MTCNN's nets) as PADV2 with the dtype's minimum (-3.4e38) then a VALID max pool. The
    TFLite converter calibrates that constant into the activation's range, which the pad shares
    with its input and output: MTCNN's O-Net got an int8 scale of 1.3e36 there, every activation
    of that block quantized to one value, and the next CONV_2D a requantization scale XNNPACK
    refuses ('failed to create XNNPACK runtime ... failed to prepare').

    What instead, both exactly the pooling ONNX defines (padded cells never win):
    - ceil_mode becomes explicit end padding (ceil_mode=0, the same output size); where that
      padding is TensorFlow's SAME padding, onnx2tf writes a SAME max pool and no pad at all;
    - otherwise the padding becomes an edge-mode Pad before a VALID MaxPool: every window holds at
      least one cell of the input, and an edge-padded cell repeats the input cell nearest it,
      which lies in the same window, so the maximum is unchanged; the range stays the input's.
    Needs static shapes (shape inference); nodes without them are left as they are.
    Returns (model bytes, one note per node rewritten)."""
    import onnx
    from onnx import helper

    m = onnx.load_from_string(model_bytes)
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - without shapes nothing is rewritten (onnx2tf's own route)
        return model_bytes, []
    dims: Dict[str, List[int]] = {}
    for v in itertools.chain(inferred.graph.input, inferred.graph.value_info, inferred.graph.output):
        d = v.type.tensor_type.shape.dim
        if d and all(x.HasField("dim_value") for x in d):
            dims[v.name] = [x.dim_value for x in d]
    nodes, notes, changed = [], [], False
    for n in m.graph.node:
        nodes.append(n)
        if n.op_type != "MaxPool" or len(n.output) != 1 or n.input[0] not in dims:
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        k = list(a.get("kernel_shape", []))
        shape, sp = dims[n.input[0]], len(k)
        s = list(a.get("strides", [1] * sp))
        pads = list(a.get("pads", [0] * 2 * sp))
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or a.get("storage_order", 0) \
                or list(a.get("dilations", [1] * sp)) != [1] * sp or len(shape) != sp + 2:
            continue
        ceil = bool(a.get("ceil_mode", 0))
        if not ceil and pads == [0] * 2 * sp:
            continue
        sizes = shape[2:]
        begin, end = pads[:sp], pads[sp:]
        out = [(h + b + e - kk) // ss + 1 for h, b, e, kk, ss in zip(sizes, begin, end, k, s)]
        if ceil:
            out = [-(-(h + b + e - kk) // ss) + 1 for h, b, e, kk, ss in zip(sizes, begin, end, k, s)]
            out = [o - 1 if (o - 1) * ss >= h + b else o for o, h, b, ss in zip(out, sizes, begin, s)]
        end = [max(e, (o - 1) * ss + kk - h - b) for o, ss, kk, h, b, e in zip(out, s, k, sizes, begin, end)]
        # every window must hold a cell of the input (else -inf padding and edge padding differ)
        if any(b >= kk or (o - 1) * ss - b > h - 1 for b, kk, o, ss, h in zip(begin, k, out, s, sizes)):
            continue
        if not any(begin) and not any(end):    # ceil and floor give the same size: onnx2tf pads nothing
            continue
        if [_same_pads(h, kk, ss) for h, kk, ss in zip(sizes, k, s)] == list(zip(begin, end)):
            how = f"ceil_mode as explicit padding {begin + end}, TensorFlow's SAME (no pad op)"
        else:
            how = f"padding (begin {begin}, end {end}{', ceil_mode' if ceil else ''}) as an edge-mode Pad"
            padded = f"{n.output[0]}__edgekit_edge_pad"
            pads_t = f"{n.output[0]}__edgekit_edge_pads"
            m.graph.initializer.append(onnx.numpy_helper.from_array(
                np.array([0, 0] + begin + [0, 0] + end, np.int64), pads_t))
            nodes.insert(len(nodes) - 1, helper.make_node("Pad", [n.input[0], pads_t], [padded], mode="edge",
                                                          name=f"{n.name or n.output[0]}__edgekit_edge_pad"))
            n.input[0] = padded
            begin, end = [0] * sp, [0] * sp
        for key in ("ceil_mode", "pads"):
            for i, x in enumerate(n.attribute):
                if x.name == key:
                    del n.attribute[i]
                    break
        if any(begin) or any(end):
            n.attribute.append(helper.make_attribute("pads", begin + end))
        changed = True
        notes.append(f"MaxPool '{n.name or n.output[0]}': {how}, so the TFLite graph pads with no float32-minimum "
                     "constant (it would take the int8 range)")
    if not changed:
        return model_bytes, []
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m.SerializeToString(), notes


def probe_inputs(inputs: Sequence[OnnxIO], shapes: Dict[str, Tuple[int, ...]], seed: int = 0
                 ) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in inputs:
        if np.issubdtype(i.dtype, np.floating):
            out[i.name] = rng.uniform(0.0, 1.0, shapes[i.name]).astype(i.dtype)
        else:
            out[i.name] = np.zeros(shapes[i.name], i.dtype)
    return out


def ort_run(model_bytes: bytes, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = float(((ref - got.astype(np.float64)) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def to_saved_model(model_bytes: bytes, workdir: Path, shapes: Dict[str, Tuple[int, ...]],
                   where: str = "") -> TFModel:
    """onnx2tf, then the interface-restoring wrapper, then the float TFLite check."""
    import tensorflow as tf

    inputs, outputs = io_of(model_bytes)
    model_bytes = fix_shapes(model_bytes, shapes)
    to_tf, pool_notes = explicit_pool_pads(model_bytes)
    raw = workdir / "onnx2tf"
    _run_onnx2tf(to_tf, raw, inputs, shapes, where)
    inner = tf.saved_model.load(str(raw))
    sig = inner.signatures["serving_default"]
    tf_in = list(sig.structured_input_signature[1].keys())
    result = TFModel(workdir / "saved_model_from_onnx", b"", inputs, outputs)
    result.notes.extend(pool_notes)

    # inputs: onnx2tf keeps the names (sanitized) and, asked to, the NCHW layout
    in_map: Dict[str, str] = {}
    for i in inputs:
        cand = [k for k in tf_in if k == i.name or k == _SAFE.sub("_", i.name)]
        if len(tf_in) == 1 and len(inputs) == 1:
            cand = tf_in
        if not cand:
            raise ConversionError(f"onnx2tf's graph has no input for '{i.name}' (it has {tf_in})",
                                  stage="onnx -> tensorflow")
        want = shapes[i.name]
        got = tuple(sig.structured_input_signature[1][cand[0]].shape.as_list())
        if got != want:
            raise ConversionError(f"onnx2tf changed input '{i.name}' to {got}, the source takes {want}",
                                  stage="onnx -> tensorflow")
        in_map[i.name] = cand[0]
        if len(want) >= 4:
            result.layout[i.name] = "source layout kept (NCHW at the interface, transposed inside the graph)"

    probe = probe_inputs(inputs, shapes)
    ref = ort_run(model_bytes, probe)
    tf_out = {k: v.numpy() for k, v in sig(**{in_map[n]: tf.constant(a) for n, a in probe.items()}).items()}
    out_map = _match_outputs(outputs, ref, tf_out)
    for o, (key, perm) in zip(outputs, out_map):
        if perm is not None:
            result.layout[o.name] = f"transposed back to the source layout (onnx2tf gave axes {list(perm)})"

    safe_in = {i.name: _SAFE.sub("_", i.name) for i in inputs}
    specs = [tf.TensorSpec(shapes[i.name], tf.as_dtype(i.dtype), name=safe_in[i.name]) for i in inputs]
    names_in = [i.name for i in inputs]

    def serve(*args):
        res = inner.signatures["serving_default"](**{in_map[n]: a for n, a in zip(names_in, args)})
        outs = {}
        for o, (key, perm) in zip(outputs, out_map):
            t = res[key]
            outs[o.name] = tf.transpose(t, _inverse(perm)) if perm is not None else t
        return outs

    fn = tf.function(serve, input_signature=specs)
    holder = tf.Module()
    holder.inner = inner
    holder.serve = fn
    tf.saved_model.save(holder, str(result.saved_model), signatures={"serving_default": fn.get_concrete_function()})
    order = result.saved_model / IO_ORDER_FILE
    order.parent.mkdir(parents=True, exist_ok=True)
    order.write_text(json.dumps({"inputs": [safe_in[i.name] for i in inputs], "outputs": [o.name for o in outputs]}))
    renamed = [f"{n} -> {s}" for n, s in safe_in.items() if n != s]
    if renamed:
        result.notes.append("TFLite input names made valid for TensorFlow: " + ", ".join(renamed))

    conv = tf.lite.TFLiteConverter.from_saved_model(str(result.saved_model))
    result.float_tflite = keep_io_order(result.saved_model, conv.convert())
    result.checks.append(_check_float(result.float_tflite, probe, ref, inputs, outputs, safe_in))
    return result


def keep_io_order(saved_model, data: bytes) -> bytes:
    """TFLite lists a SavedModel signature's inputs and outputs sorted by name; a SavedModel made
    here records the source's order (IO_ORDER_FILE) and the model's lists are put back in it
    (scores before boxes, as the detector returns them). Other SavedModels pass unchanged."""
    f = Path(saved_model) / IO_ORDER_FILE
    if not f.is_file():
        return data
    order = json.loads(f.read_text())
    return order_io(data, order["inputs"], order["outputs"])


def order_io(data: bytes, inputs: Sequence[str], outputs: Sequence[str]) -> bytes:
    from tensorflow.lite.tools import flatbuffer_utils as fu

    model = fu.read_model_from_bytearray(bytearray(data))
    if len(model.signatureDefs or []) != 1:
        return data
    sig = model.signatureDefs[0]
    sub = model.subgraphs[sig.subgraphIndex]
    changed = False
    for maps, names, attr in ((sig.inputs, inputs, "inputs"), (sig.outputs, outputs, "outputs")):
        by_name = {m.name.decode() if isinstance(m.name, bytes) else m.name: m for m in maps}
        if sorted(by_name) != sorted(names):
            raise ConversionError(f"the TFLite model's {attr} {sorted(by_name)} are not the source's {list(names)}",
                                  stage="tflite interface")
        want = [by_name[n].tensorIndex for n in names]
        if list(getattr(sub, attr)) != want:
            setattr(sub, attr, want)
            changed = True
        maps[:] = [by_name[n] for n in names]
    return bytes(fu.convert_object_to_bytearray(model)) if changed else data


def _inverse(perm: Tuple[int, ...]) -> List[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _match_outputs(outputs: Sequence[OnnxIO], ref: List[np.ndarray], tf_out: Dict[str, np.ndarray]):
    """For each ONNX output: (onnx2tf's output key, permutation that maps ONNX axes to its axes or
    None), chosen by the smallest error on the probe."""
    free = dict(tf_out)
    found = []
    for o, r in zip(outputs, ref):
        best = None
        for key, t in free.items():
            if t.size != r.size or t.ndim != r.ndim:
                continue
            for perm in itertools.permutations(range(r.ndim)):
                if tuple(r.shape[p] for p in perm) != t.shape:
                    continue
                err = float(np.abs(np.transpose(r, perm) - t).max()) if r.size else 0.0
                cand = (err, perm != tuple(range(r.ndim)), key, perm)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is None:
            raise ConversionError(f"onnx2tf's graph has no output shaped like '{o.name}' {r.shape} "
                                  f"(it has {[v.shape for v in free.values()]})", stage="onnx -> tensorflow")
        err, _, key, perm = best
        scale = float(np.abs(r).max()) or 1.0
        if err > 1e-3 * scale + 1e-5:
            raise ConversionError(f"onnx2tf's graph computes output '{o.name}' differently from ONNX Runtime "
                                  f"(max |err| {err:.3g} on a probe input)", stage="onnx -> tensorflow",
                                  hint="report the model's ops; convert to ONNX format only with --format onnx")
        del free[key]
        found.append((key, None if perm == tuple(range(r.ndim)) else perm))
    return found


def _check_float(float_tflite: bytes, probe, ref, inputs, outputs, safe_in) -> Dict[str, object]:
    from edgekit.runtime.tflite import find_interpreter

    _, interp_cls, _ = find_interpreter()
    it = interp_cls(model_content=float_tflite)
    runner = it.get_signature_runner()
    res = runner(**{safe_in[i.name]: probe[i.name] for i in inputs})
    per = {}
    for o, r in zip(outputs, ref):
        if o.name not in res:
            raise ConversionError(f"the float TFLite model lost output '{o.name}' (has {sorted(res)})",
                                  stage="onnx -> tflite")
        got = res[o.name]
        if got.shape != r.shape:
            raise ConversionError(f"the float TFLite model gives '{o.name}' as {got.shape}, ONNX as {r.shape}",
                                  stage="onnx -> tflite")
        per[o.name] = round(snr_db(r, got), 1)
    worst = min(per, key=per.get)
    if per[worst] < MIN_FLOAT_SNR_DB:
        raise ConversionError(f"float TFLite from onnx2tf differs from ONNX Runtime on output '{worst}': "
                              f"SNR {per[worst]:.1f} dB < {MIN_FLOAT_SNR_DB} on a probe input",
                              stage="onnx -> tflite", hint="convert to ONNX format only with --format onnx")
    return {"check": "float TFLite (from onnx2tf) vs ONNX Runtime float, probe input",
            "snr_db": per, "passed": True}


_TF_SCOPE = re.compile(r"[^A-Za-z0-9_.\-/>]")


def _tf_valid_node_names(model_bytes: bytes) -> bytes:
    """Node names become TensorFlow name scopes, which allow [A-Za-z0-9_.-/>] only (Paddle2ONNX
    names nodes 'Softmax@0'): other characters become '_' (names stay unique)."""
    import onnx

    m = onnx.load_from_string(model_bytes)
    seen = {n.name for n in m.graph.node}
    changed = False
    for n in m.graph.node:
        if n.name and _TF_SCOPE.search(n.name):
            new = base = _TF_SCOPE.sub("_", n.name)
            k = 1
            while new in seen:
                new, k = f"{base}_{k}", k + 1
            seen.add(new)
            n.name = new
            changed = True
    return m.SerializeToString() if changed else model_bytes


def _run_onnx2tf(model_bytes: bytes, out: Path, inputs: Sequence[OnnxIO], shapes, where: str) -> None:
    try:
        import onnx2tf
    except ImportError:
        raise SourceModelError("TFLite from an ONNX or PyTorch model needs onnx2tf", path=where or None,
                               hint="pip install 'edgekit[torch]' (or ask for --format onnx)") from None
    with tempfile.TemporaryDirectory(prefix="edgekit-onnx2tf-") as d:
        src = Path(d) / "model.onnx"
        src.write_bytes(_tf_valid_node_names(model_bytes))
        # images (rank 4-5) keep NCHW at the interface, with a TRANSPOSE inside; a rank-3 input is kept as
        # it is (a transformer's [N, tokens, features] read as NCW came out wrong: max |err| 0.18)
        keep = [i.name for i in inputs if 4 <= len(shapes[i.name]) <= 5]
        keep_abs = [i.name for i in inputs if len(shapes[i.name]) == 3]
        sink = io.StringIO()
        try:
            # onnx2tf prints its progress and may write beside the model: keep both out of the user's way
            with contextlib.chdir(d), contextlib.redirect_stdout(sink):
                onnx2tf.convert(input_onnx_file_path=str(src), output_folder_path=str(out),
                                keep_ncw_or_nchw_or_ncdhw_input_names=keep or None,
                                keep_shape_absolutely_input_names=keep_abs or None,
                                overwrite_input_shape=[f"{n}:{','.join(map(str, s))}" for n, s in shapes.items()],
                                output_signaturedefs=True, not_use_onnxsim=True, non_verbose=True,
                                verbosity="error")
        except SystemExit as e:  # onnx2tf ends the process on an op it cannot translate
            tail = [ln for ln in sink.getvalue().splitlines() if ln.strip()][-2:]
            raise ConversionError(f"onnx2tf cannot translate the model (exit {e.code}): " + " | ".join(tail)[:300],
                                  stage="onnx -> tensorflow", hint="use --format onnx for this model") from None
        except Exception as e:  # noqa: BLE001 - recorded with its type and message, never hidden
            raise ConversionError(f"onnx2tf failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                                  stage="onnx -> tensorflow", hint="use --format onnx for this model") from None
    if not (out / "saved_model.pb").is_file():
        raise ConversionError("onnx2tf wrote no SavedModel", stage="onnx -> tensorflow")
