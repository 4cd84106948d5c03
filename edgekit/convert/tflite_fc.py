"""FULLY_CONNECTED ops that see more than one row, rewritten so tflite-runtime 2.14 on aarch64 runs them.

What fails: tflite-runtime 2.14's optimized aarch64 kernels (measured under qemu-user-static;
whether a Cortex-A72 board does the same is not settled) crash with SIGSEGV on an int8
FULLY_CONNECTED whose input has more than one row: a Dense on a (tokens, features) activation,
every projection of a transformer, or any Dense at batch > 1. Its reference kernels, newer
runtimes (ai-edge-litert 2.x on the same emulated CPU) and x86 2.14 run the same files.

What this does: each such op becomes RESHAPE [1, 1, rows, C] -> CONV_2D 1x1 -> RESHAPE to the
op's own output shape, on the same int8 weights, bias and quantization. A 1x1 convolution over
`rows` pixels is the same integer arithmetic as a fully connected layer over `rows` rows (int32
accumulation of the same products, the same per-channel requantization); on the host its
outputs are bit-identical to the original's. The form the issue first suggested, RESHAPE ->
2-D FULLY_CONNECTED -> RESHAPE, does not help: it is still a FULLY_CONNECTED with `rows` rows,
and a Keras Dense on a rank-3 input already converts to exactly that graph and crashes.

Why the flatbuffer, not the Keras/SavedModel graph: the converter fuses a Reshape -> MatMul ->
Reshape (or a Conv2D on a 1 x rows image whose weights came from a Dense) back into whatever
FULLY_CONNECTED form it prefers, so a source-level rewrite is not guaranteed to survive
conversion; the flatbuffer is what the device runs. Rewriting after conversion also keeps the
calibration as it was (the quantization parameters are copied, nothing is recalibrated), works
for every source kind (Keras, .h5, SavedModel) and every layer that lowers to FULLY_CONNECTED
(Dense, EinsumDense in MultiHeadAttention), and needs no custom layer in the user's model.

Only int8 x int8 FULLY_CONNECTED with constant weights in the default layout is rewritten; the
rows are those the op sees at batch 1 (the host interpreter runs the model once on zeros to
learn them, since a converted Dense on a rank-3 input computes its 2-D shape at run time). One
row (Flatten -> Dense at batch 1) is left alone. What was rewritten is recorded in the model's
metadata (`edgekit_rewrites`, JSON), which the compatibility check copies into the manifest.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

import numpy as np

METADATA = "edgekit_rewrites"
FORM = "RESHAPE -> CONV_2D 1x1 -> RESHAPE"


def _schema():
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def fc_input_shapes(model_bytes: bytes) -> Dict[int, Tuple[int, ...]]:
    """Operator index -> the input shape each FULLY_CONNECTED sees at batch 1 (run once on zeros here)."""
    from edgekit.runtime.tflite import find_interpreter

    _, interp_cls, _ = find_interpreter()
    interp = interp_cls(model_content=model_bytes)
    interp.allocate_tensors()
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    interp.invoke()
    shapes = {t["index"]: tuple(int(v) for v in t["shape"]) for t in interp.get_tensor_details()}
    return {k: shapes[op["inputs"][0]] for k, op in enumerate(interp._get_ops_details())
            if op["op_name"] == "FULLY_CONNECTED"}


class _Graph:
    """Appends tensors, buffers and operator codes to an unpacked model (object API)."""

    def __init__(self, model):
        self.S = _schema()
        self.m = model
        self.sg = model.subgraphs[0]

    def opcode(self, code: int, version: int) -> int:
        for i, c in enumerate(self.m.operatorCodes):
            if max(c.builtinCode, c.deprecatedBuiltinCode) == code:
                c.version = max(c.version, version)
                return i
        c = self.S.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), version
        self.m.operatorCodes.append(c)
        return len(self.m.operatorCodes) - 1

    def buffer(self, data=None) -> int:
        b = self.S.BufferT()
        if data is not None:
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        self.m.buffers.append(b)
        return len(self.m.buffers) - 1

    def tensor(self, name: str, shape, signature, ttype: int, quant=None, data=None, buffer=None) -> int:
        t = self.S.TensorT()
        t.name = name.encode()
        t.shape = np.array(shape, np.int32)
        t.shapeSignature = None if signature is None else np.array(signature, np.int32)
        t.type = ttype
        t.buffer = self.buffer(data) if buffer is None else buffer
        t.quantization = quant
        self.sg.tensors.append(t)
        return len(self.sg.tensors) - 1

    def quant(self, q, scale=None):
        n = self.S.QuantizationParametersT()
        if scale is not None:
            n.scale, n.zeroPoint = scale, np.zeros(len(scale), np.int64)
        elif q is not None:
            n.scale, n.zeroPoint, n.quantizedDimension = q.scale, q.zeroPoint, q.quantizedDimension
        return n

    def reshape(self, x: int, y: int, new_shape: List[int], name: str):
        S = self.S
        shape = self.tensor(name + "/shape", [len(new_shape)], None, S.TensorType.INT32,
                            data=np.array(new_shape, np.int32))
        op = S.OperatorT()
        op.opcodeIndex = self.opcode(S.BuiltinOperator.RESHAPE, 1)
        op.inputs, op.outputs = np.array([x, shape], np.int32), np.array([y], np.int32)
        op.builtinOptionsType = S.BuiltinOptions.ReshapeOptions
        op.builtinOptions = S.ReshapeOptionsT()
        op.builtinOptions.newShape = list(new_shape)
        return op


def _why_not(g: _Graph, op, rows: int) -> str:
    """'' when the op can be rewritten, else the reason it is left as it is."""
    S, sg = g.S, g.sg
    if rows <= 1:
        return "one row"
    x, w = (sg.tensors[int(i)] for i in op.inputs[:2])
    if x.type != S.TensorType.INT8 or w.type != S.TensorType.INT8:
        return "not int8 x int8"
    if not len(g.m.buffers[w.buffer].data if g.m.buffers[w.buffer].data is not None else []):
        return "weights are not constant"
    o = op.builtinOptions
    if o is not None and o.weightsFormat != S.FullyConnectedOptionsWeightsFormat.DEFAULT:
        return "shuffled weights"
    if w.sparsity is not None:
        return "sparse weights"
    y = sg.tensors[int(op.outputs[0])]
    sig = [int(v) for v in (y.shapeSignature if y.shapeSignature is not None else y.shape)]
    if sum(1 for v in sig if v < 0) > 1:
        return f"output shape {sig} has more than one dynamic dimension"
    if len(op.outputs) != 1:
        return "more than one output"
    return ""


def rewrite(model_bytes: bytes) -> Tuple[bytes, List[Dict[str, Any]]]:
    """(new model bytes, one record per FULLY_CONNECTED looked at). Unchanged bytes when nothing
    needs rewriting."""
    import flatbuffers

    S = _schema()
    try:
        shapes = fc_input_shapes(model_bytes)
    except (ValueError, RuntimeError) as e:  # the model as converted is what ships; the check will tell
        return model_bytes, [{"op": "FULLY_CONNECTED", "rewritten": False,
                              "kept_because": f"the host interpreter could not run the model once: {e}"}]
    if not any(int(np.prod(s[:-1])) > 1 for s in shapes.values()):
        return model_bytes, []
    m = S.ModelT.InitFromPackedBuf(model_bytes, 0)
    g = _Graph(m)
    sg = g.sg
    ops, records = [], []
    for k, op in enumerate(sg.operators):
        if k not in shapes:
            ops.append(op)
            continue
        rows = int(np.prod(shapes[k][:-1]))
        y = int(op.outputs[0])
        out_name = (sg.tensors[y].name or b"").decode(errors="replace")
        name = f"edgekit_fc{k}"  # new tensors' names (the converter's can be hundreds of characters)
        reason = _why_not(g, op, rows)
        rec = {"op": "FULLY_CONNECTED", "index": k, "output": out_name, "input_shape": list(shapes[k]),
               "rows": rows, "rewritten": not reason}
        if reason:
            rec["kept_because"] = reason
            records.append(rec)
            ops.append(op)
            continue
        x, w = int(op.inputs[0]), int(op.inputs[1])
        b = int(op.inputs[2]) if len(op.inputs) > 2 else -1
        X, W, Y = sg.tensors[x], sg.tensors[w], sg.tensors[y]
        out_c, in_c = int(W.shape[0]), int(W.shape[1])
        sig = [int(v) for v in (Y.shapeSignature if Y.shapeSignature is not None else Y.shape)]
        image = g.tensor(name + "/rows_as_pixels", [1, 1, rows, in_c], [1, 1, -1, in_c], X.type,
                         g.quant(X.quantization))
        filt = g.tensor(name + "/filter_1x1", [out_c, 1, 1, in_c], None, W.type, g.quant(W.quantization),
                        buffer=W.buffer)  # [O, C] and [O, 1, 1, C] are the same bytes
        if b < 0:  # CONV_2D wants a bias: zeros, at the scale the accumulator has
            scale = (np.float32(X.quantization.scale[0])
                     * np.broadcast_to(np.asarray(W.quantization.scale, np.float32), (out_c,))).astype(np.float32)
            b = g.tensor(name + "/bias_zero", [out_c], None, S.TensorType.INT32, g.quant(None, scale),
                         data=np.zeros(out_c, np.int32))
        conv_out = g.tensor(name + "/conv_1x1", [1, 1, rows, out_c], [1, 1, -1, out_c], Y.type,
                            g.quant(Y.quantization))
        ops.append(g.reshape(x, image, [1, 1, -1, in_c], name + "/to_pixels"))
        conv = S.OperatorT()
        conv.opcodeIndex = g.opcode(S.BuiltinOperator.CONV_2D, 3)
        conv.inputs, conv.outputs = np.array([image, filt, b], np.int32), np.array([conv_out], np.int32)
        conv.builtinOptionsType = S.BuiltinOptions.Conv2DOptions
        opts = S.Conv2DOptionsT()
        opts.padding, opts.strideW, opts.strideH = S.Padding.VALID, 1, 1
        opts.fusedActivationFunction = op.builtinOptions.fusedActivationFunction if op.builtinOptions else 0
        conv.builtinOptions = opts
        ops.append(conv)
        ops.append(g.reshape(conv_out, y, sig, name + "/to_rows"))
        rec["as"] = FORM
        records.append(rec)
    if not any(r["rewritten"] for r in records):
        return model_bytes, records
    sg.operators = ops
    meta = S.MetadataT()
    meta.name = METADATA.encode()
    meta.buffer = g.buffer(np.frombuffer(json.dumps(records).encode(), np.uint8))
    m.metadata = [md for md in (m.metadata or []) if md.name != METADATA.encode()] + [meta]
    builder = flatbuffers.Builder(len(model_bytes) + 4096)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), records


def rewrites_of(model_bytes: bytes) -> List[Dict[str, Any]]:
    """The records rewrite() left in a model's metadata ([] when it rewrote nothing)."""
    S = _schema()
    m = S.Model.GetRootAs(model_bytes, 0)
    for i in range(m.MetadataLength()):
        md = m.Metadata(i)
        if md.Name() == METADATA.encode():
            return json.loads(m.Buffers(md.Buffer()).DataAsNumpy().tobytes().decode())
    return []
