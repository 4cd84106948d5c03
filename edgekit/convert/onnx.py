"""SavedModel -> float ONNX (tf2onnx, in process) -> INT8 ONNX (ONNX Runtime static quantization)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

from edgekit.convert.data import Dataset
from edgekit.errors import ConversionError
from edgekit.targets import OnnxBuild

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_SHAPE_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Gather",
              "Concat", "Slice", "Identity", "Cast", "Constant", "ConstantOfShape", "Split",
              "Resize", "MaxPool", "Pad", "Expand"}


def saved_model_to_onnx(saved_model: Path, opset: int) -> bytes:
    import tensorflow as tf
    from tf2onnx import convert as t2o
    from tf2onnx import tf_loader

    graph_def, inputs, outputs, renames = tf_loader.from_saved_model(
        str(saved_model), None, None, return_tensors_to_rename=True)
    with tf.device("/cpu:0"):
        proto, _ = t2o._convert_common(graph_def, name="saved_model", opset=opset,
                                       input_names=inputs, output_names=outputs,
                                       tensors_to_rename=renames)
    proto.graph.doc_string = "converted by tf2onnx from the source's SavedModel"   # not the temp path
    return _stable_names(standard_ops(proto)).SerializeToString()


def _stable_names(model):
    """tf2onnx names what it inserts NAME__<counter>, from a counter (and a constant de-duplication)
    that depend on what ran before in the process; rename those in order of appearance (inserted
    constants as const__eK, initializers in order of first use; shape symbols unk__K), so that a
    SavedModel always gives the same bytes (and a recipe rebuilds the same sha256). Names from the
    source (layer names, which mixed precision maps back) are kept."""
    import re

    pat = re.compile(r"^(.*?)__\d+((?::\d+)?)$")
    g = model.graph
    inits = {i.name for i in g.initializer}
    order: list = [t.name for t in g.input]
    for n in g.node:
        order.extend([n.name, *n.input, *n.output])
    order.extend(o.name for o in g.output)
    order.extend(i.name for i in g.initializer)
    mapping, used, count = {}, set(order), {}
    for name in order:
        m = pat.match(name)
        if not m or name in mapping:
            continue
        base = "const" if name in inits else m.group(1)
        count[base] = count.get(base, 0) + 1
        new = f"{base}__e{count[base]}{m.group(2)}"
        while new in used:
            count[base] += 1
            new = f"{base}__e{count[base]}{m.group(2)}"
        used.add(new)
        mapping[name] = new
    _rename(g, mapping)
    first_use = {}
    for k, name in enumerate(x for n in g.node for x in n.input):
        first_use.setdefault(name, k)
    ordered = sorted(g.initializer, key=lambda i: (first_use.get(i.name, 1 << 30), i.name))
    copies = [type(i)() for i in ordered]
    for c, i in zip(copies, ordered):
        c.CopyFrom(i)
    del g.initializer[:]
    g.initializer.extend(copies)
    symbols: dict = {}
    for t in list(g.input) + list(g.output) + list(g.value_info):
        for d in t.type.tensor_type.shape.dim:
            if d.dim_param and re.match(r"^unk__\d+$", d.dim_param):
                d.dim_param = symbols.setdefault(d.dim_param, f"unk__e{len(symbols) + 1}")
    return model


def standard_ops(model):
    """Ops tf2onnx emits that ONNX has no kernel for, rewritten in standard ops:
    Erfc(x) (exact GELU in Keras) -> 1 - Erf(x)."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    if not any(n.op_type == "Erfc" and n.domain in ("", "ai.onnx") for n in g.node):
        return model
    nodes = []
    for n in g.node:
        if n.op_type != "Erfc":
            nodes.append(n)
            continue
        one, erf = f"{n.name}__one", f"{n.name}__erf"
        g.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
        nodes.append(helper.make_node("Erf", [n.input[0]], [erf], name=f"{n.name}__Erf"))
        nodes.append(helper.make_node("Sub", [one, erf], [n.output[0]], name=n.name))
    del g.node[:]
    g.node.extend(nodes)
    return model


def _used_ops(m) -> Dict[str, set]:
    """Domain -> op types used anywhere in the model: nodes, subgraphs (If/Loop/Scan bodies), functions."""
    import onnx

    used: Dict[str, set] = {}

    def walk(nodes):
        for n in nodes:
            used.setdefault(n.domain or "", set()).add(n.op_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g.node)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        walk(sub.node)

    walk(m.graph.node)
    for f in m.functions:
        walk(f.node)
    return used


def tidy_opsets(model_bytes: bytes) -> bytes:
    """Only the opset imports the graph uses, each at the oldest version that defines every op it uses
    from that domain as the declared version does. The default domain keeps the profile's opset (chosen for
    the target's runtime). ONNX Runtime's optimizer and onnx >= 1.20 stamp domains nobody uses at their
    newest version (ai.onnx.ml 5 from onnx 1.23), which an older runtime refuses to load (ONNX Runtime
    1.16: 'Current official support for domain ai.onnx.ml is till opset 3')."""
    import onnx
    from onnx import defs

    m = onnx.load_from_string(model_bytes)
    used = _used_ops(m)
    keep = []
    for o in m.opset_import:
        dom = "" if o.domain == "ai.onnx" else (o.domain or "")
        if dom == "":
            keep.append(o)
            continue
        ops = used.get(dom) or used.get(o.domain)
        if not ops:
            continue                                          # declared, never used: dropped
        version = o.version
        if dom == "ai.onnx.ml":                               # schemas known to onnx: the oldest equivalent
            since = []
            for op in ops:
                try:
                    since.append(defs.get_schema(op, o.version, dom).since_version)
                except defs.SchemaError:                  # an op onnx has no schema for: the declared version
                    since = []
                    break
            version = max(since) if since else o.version
        keep.append(onnx.helper.make_opsetid(o.domain, version))
    # the IR version those opsets need: not an exporter's newest (ONNX Runtime 1.16 reads IR <= 9), not below
    need = onnx.helper.find_min_ir_version_for(keep, ignore_unknown=True)
    if [(o.domain, o.version) for o in keep] == [(o.domain, o.version) for o in m.opset_import] \
            and m.ir_version == need:
        return model_bytes
    del m.opset_import[:]
    m.opset_import.extend(keep)
    m.ir_version = need
    return m.SerializeToString()


def opset_imports(model_bytes: bytes) -> Dict[str, int]:
    """The model's opset imports, domain -> version ('' for the default domain)."""
    import onnx

    m = onnx.load_from_string(model_bytes)
    return {("" if o.domain == "ai.onnx" else o.domain): int(o.version) for o in m.opset_import}


def ops_needing(model_bytes: bytes, domain: str, version: int) -> List[str]:
    """Ops of `domain` the model uses that an opset `version` of that domain does not define as the model's
    declared version does: what truly needs the newer opset (named in a compatibility failure)."""
    import onnx
    from onnx import defs

    m = onnx.load_from_string(model_bytes)
    declared = opset_imports(model_bytes).get(domain)
    out = []
    for op in sorted(_used_ops(m).get(domain, ())):
        try:
            since = defs.get_schema(op, declared or version, domain).since_version
        except defs.SchemaError:                          # no schema known to onnx for this op
            continue
        if since > version:
            out.append(f"{op} ({domain or 'ai.onnx'} {since})")
    return out


def adapt_opset(model_bytes: bytes, opset: int) -> bytes:
    """An ONNX source at another opset than the target's: convert, or say why not."""
    import onnx

    m = onnx.load_from_string(model_bytes)
    current = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    if current == opset:
        return model_bytes
    try:
        from onnx import version_converter

        return version_converter.convert_version(m, opset).SerializeToString()
    except Exception as e:
        raise ConversionError(f"the model uses opset {current} and the target needs {opset}; "
                              f"onnx's version converter failed: {str(e).splitlines()[0][:200]}",
                              stage="onnx opset", hint="export the model at the target's opset") from None


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol (get_next), with progress."""

    def __init__(self, calib: Dataset, tick):
        self._calib, self._i, self._tick = calib, 0, tick

    def get_next(self):
        if self._i >= len(self._calib):
            return None
        self._i += 1
        if self._tick:
            self._tick(self._i, len(self._calib))
        return self._calib.sample(self._i - 1)

    def rewind(self):
        self._i = 0

    def __iter__(self):  # ONNX Runtime's debugging helpers iterate readers
        self.rewind()
        return iter(self.get_next, None)


_PRE_CACHE: Dict[str, bytes] = {}
_PRE_NOTES: Dict[str, str] = {}


def preprocess(float_bytes: bytes) -> bytes:
    """ONNX Runtime's quantization pre-processing (shape inference, fusions). Node names
    change here, so anything naming nodes to exclude must name them in this graph. Where symbolic
    shape inference fails (some exporters' dynamic shapes), it runs without it; where the
    optimizer fails too, the graph is quantized as it is, and `preprocess_note()` says why."""
    import hashlib

    from onnxruntime.quantization.shape_inference import quant_pre_process

    key = hashlib.sha256(float_bytes).hexdigest()
    if key in _PRE_CACHE:
        return _PRE_CACHE[key]
    errors = []
    with tempfile.TemporaryDirectory(prefix="edgekit-pre-") as d:
        src, pre = Path(d, "float.onnx"), Path(d, "pre.onnx")
        src.write_bytes(float_bytes)
        for skip_symbolic in (False, True):
            try:
                # in d: where symbolic shape inference gives up, it leaves sym_shape_infer_temp.onnx
                # in the working directory (the user's, otherwise)
                with contextlib.chdir(d):
                    quant_pre_process(str(src), str(pre), skip_symbolic_shape=skip_symbolic)
                _PRE_CACHE[key] = pre.read_bytes()
                if errors:
                    _PRE_NOTES[key] = f"pre-processing ran without symbolic shape inference ({errors[0]})"
                return _PRE_CACHE[key]
            except ImportError as e:  # an install problem: say so, never fall back in silence
                raise ConversionError(f"ONNX Runtime's quantization pre-processing cannot run: {e}",
                                      stage="onnx pre-processing",
                                      hint="pip install 'edgekit[convert]' (it installs sympy, which "
                                           "symbolic shape inference needs)") from None
            except Exception as e:  # recorded below and in the artifact's notes
                errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    _PRE_NOTES[key] = ("quantized without ONNX Runtime's pre-processing (no fusions; slower): "
                       + "; ".join(errors))
    _PRE_CACHE[key] = float_bytes
    return float_bytes


def preprocess_note(float_bytes: bytes) -> Optional[str]:
    import hashlib

    return _PRE_NOTES.get(hashlib.sha256(float_bytes).hexdigest())


def quantize(float_bytes: bytes, calib: Dataset, build: OnnxBuild,
             tick: Optional[Callable[[int, int], None]] = None,
             nodes_to_exclude=None, range_overrides: Optional[Dict[str, tuple]] = None) -> bytes:
    """range_overrides: tensor name -> (min, max) to use instead of calibrating it (a
    quantization-aware trained model's learned input ranges, or ranges the rescue ladder chose)."""
    import numpy as np

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8, "int16": QuantType.QInt16}
    with tempfile.TemporaryDirectory(prefix="edgekit-onnx-") as d:
        pre, out = Path(d, "pre.onnx"), Path(d, "int8.onnx")
        pre.write_bytes(preprocess(float_bytes))
        quantize_static(
            str(pre), str(out), _Reader(calib, tick),
            quant_format=QuantFormat.QDQ if build.quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=build.per_channel,
            reduce_range=build.reduce_range,
            activation_type=qtype[build.activation_type],
            weight_type=qtype[build.weight_type],
            calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[build.calibration],
            nodes_to_exclude=list(nodes_to_exclude or []),
            extra_options={"TensorQuantOverrides": {k: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                                for k, (lo, hi) in (range_overrides or {}).items()},
                           "ActivationSymmetric": build.symmetric_activations,
                           "WeightSymmetric": build.symmetric_weights,
                           # 16-bit Q/DQ before opset 21 exists as ONNX Runtime's contrib ops
                           "UseQDQContribOps": build.activation_type == "int16" and build.opset < 21,
                           # percentile: the range that holds 99.999% of the calibration values
                           "CalibPercentile": 99.999},
        )
        return tidy_opsets(compact(out.read_bytes(), pre.read_bytes()))


def _rename(g, mapping: Dict[str, str]) -> None:
    """Every name in graph `g` that `mapping` has, renamed: its inputs, outputs, shape annotations,
    initializers, and each node's name, inputs and outputs."""
    for t in [*g.input, *g.output, *g.value_info, *g.initializer]:
        t.name = mapping.get(t.name, t.name)
    for n in g.node:
        n.name = mapping.get(n.name, n.name)
        n.input[:] = [mapping.get(x, x) for x in n.input]
        n.output[:] = [mapping.get(x, x) for x in n.output]


def compact(q_bytes: bytes, float_bytes: bytes) -> bytes:
    """The quantized graph without what only its size carries: ONNX Runtime's quantizer names every
    scale, zero point, quantized weight, Q/DQ node and Q output after the tensor it quantizes plus a
    suffix (TF's tensor names are ~80 characters), and pre-processing left shape annotations
    (value_info) that ONNX Runtime infers again at load. On a 10k-parameter transformer those names
    made the INT8 ONNX 1.97x the float one. Names the quantizer added are shortened to q<k> in order
    of appearance; kept: every name of the float graph (range overrides and mixed precision name
    its tensors and nodes), graph inputs and outputs, and the DQ outputs / Q inputs of activations
    (`<tensor>_DequantizeLinear_Output`, `<tensor>_QuantizeLinear_Input`: ONNX Runtime's
    qdq_loss_debug matches a QDQ model's activations to the float model's by them)."""
    import onnx

    m = onnx.load_from_string(q_bytes)
    g = m.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return q_bytes          # a subgraph may name the outer graph's tensors: left as the quantizer wrote it
    f = onnx.load_from_string(float_bytes).graph
    keep = {t.name for t in list(f.input) + list(f.output) + list(f.initializer)}
    keep |= {x for n in f.node for x in (n.name, *n.input, *n.output)}
    keep |= {t.name for t in list(g.input) + list(g.output)}
    inits = {i.name for i in g.initializer}
    for n in g.node:   # activation Q/DQ pairs keep the names ONNX Runtime's debugging matches by
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits:
            keep.update(o for o in n.output if o.endswith("_DequantizeLinear_Output"))
        if n.op_type == "QuantizeLinear":
            keep.update(i for i in n.input[:1] if i.endswith("_QuantizeLinear_Input"))
    order = [i.name for i in g.initializer]
    for n in g.node:
        order.extend([n.name, *n.input, *n.output])
    used = set(order) | keep
    mapping: Dict[str, str] = {}
    k = 0
    for name in order:
        if not name or name in keep or name in mapping:
            continue
        k += 1
        while f"q{k}" in used:
            k += 1
        mapping[name] = f"q{k}"
    _rename(g, mapping)
    del g.value_info[:]
    return m.SerializeToString()


def quantize_dynamic(float_bytes: bytes, build: OnnxBuild) -> bytes:
    """Weights INT8 ahead of time, activations quantized at run time (MatMul: transformers' dense
    layers and attention projections), with the profile's reduce_range (7-bit weights on AVX2)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgekit-onnx-") as d:
        pre, out = Path(d, "pre.onnx"), Path(d, "dyn.onnx")
        pre.write_bytes(preprocess(float_bytes))
        ort_quantize_dynamic(str(pre), str(out), per_channel=build.per_channel, reduce_range=build.reduce_range,
                             weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        return tidy_opsets(out.read_bytes())


def exact_integer_ops(model_bytes: bytes) -> bytes:
    """MatMulInteger rewritten as int32 MatMul of zero-point-shifted operands: the exact product
    a target with exact integer dot products computes, on a host whose u8 x s8 kernels saturate
    (reference numerics for dynamically quantized graphs; see convert.numerics)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load_from_string(model_bytes)
    g = m.graph
    if not any(n.op_type == "MatMulInteger" for n in g.node):
        return model_bytes
    nodes = []
    for n in g.node:
        if n.op_type != "MatMulInteger":
            nodes.append(n)
            continue
        p = n.name or n.output[0]
        ops = []
        for i, side in ((0, "a"), (1, "b")):
            c = f"{p}__{side}32"
            nodes.append(helper.make_node("Cast", [n.input[i]], [c], to=TensorProto.INT32))
            if len(n.input) > 2 + i and n.input[2 + i]:
                z = f"{p}__{side}zp32"
                nodes.append(helper.make_node("Cast", [n.input[2 + i]], [z], to=TensorProto.INT32))
                s = f"{p}__{side}s"
                nodes.append(helper.make_node("Sub", [c, z], [s]))
                c = s
            ops.append(c)
        nodes.append(helper.make_node("MatMul", ops, [n.output[0]], name=p))
    del g.node[:]
    g.node.extend(nodes)
    return m.SerializeToString()


def float_ops(model_bytes: bytes) -> Dict[str, int]:
    """Compute nodes whose activation inputs do not all come from DequantizeLinear (QDQ), or
    that are not integer ops (QOperator): the ops that stayed float."""
    import onnx

    m = onnx.load_from_string(model_bytes)
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    out: Dict[str, int] = {}
    for n in g.node:
        if n.op_type in _QDQ or n.op_type in _SHAPE_OPS or n.domain == "com.microsoft" \
                or n.op_type.startswith("QLinear") or n.op_type.endswith("Integer"):
            continue
        acts = [i for i in n.input if i and i not in inits
                and not (i in producer and producer[i].op_type == "Constant")]
        if not acts:
            continue
        if all(i in producer and producer[i].op_type == "DequantizeLinear" for i in acts):
            continue
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def to_fp16(float_bytes: bytes) -> bytes:
    """FP16 weights and compute, float32 inputs/outputs (for GPU execution providers)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = convert_float_to_float16(onnx.load_from_string(float_bytes), keep_io_types=True)
    return tidy_opsets(m.SerializeToString())
