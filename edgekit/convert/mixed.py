"""Accuracy-aware mixed precision: keep the most sensitive layers in float until the budget is met.

1. Sensitivity, per quantized layer, against the float model on calibration data:
   TFLite: the quantization debugger's per-layer mean squared error; ONNX: ONNX Runtime's
   QDQ activation comparison (SQNR of each node's output, float vs QDQ model).
   Layer names map back to the source's (Keras layer names appear in the graph's op names).
2. Candidates, most sensitive first: the top-k layers in float for k = 1, 2, ... (an int8
   tensor between two sensitive layers needs both), then single layers.
3. Each candidate is converted, validated like any artifact (same data, same metric as
   --max-accuracy-drop), sized and timed here. The search stops at its time budget, or at the
   first candidate that meets the budget when asked (first=True). Otherwise it then puts
   layers of the smallest passing set back to INT8 one at a time (least sensitive first)
   while the budget holds, and keeps the smallest, then fastest, candidate that meets it.
"""

from __future__ import annotations

import csv
import io
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edgekit.convert.data import Dataset

SINGLETONS = 3


@dataclass
class Layer:
    nodes: List[str]          # the graph's nodes for this layer (TFLite: one fused op; ONNX: several)
    op: str
    source: str               # the source layer it came from (best effort)
    sensitivity: float        # larger: more damage when quantized

    @property
    def node(self) -> str:
        return self.nodes[0]


@dataclass
class Candidate:
    float_layers: List[Layer]
    data: bytes = b""
    metrics: Dict[str, Any] = field(default_factory=dict)
    drop: Optional[float] = None
    p50_ms: Optional[float] = None
    meets: bool = False
    error: Optional[str] = None

    def summary(self) -> Dict[str, Any]:
        return {"float_layers": [lay.source for lay in self.float_layers],
                "float_nodes": [n for lay in self.float_layers for n in lay.nodes], "bytes": len(self.data),
                "drop": self.drop, "top1_agreement": self.metrics.get("top1_agreement"),
                "accuracy_quant": self.metrics.get("accuracy_quant"), "p50_ms": self.p50_ms,
                "meets_budget": self.meets, "error": self.error}


def source_name(node: str, layer_names: Sequence[str]) -> str:
    """'digits_cnn_1/fc1_1/MatMul;...' -> 'fc1' when the source had a layer 'fc1'."""
    names = set(layer_names)
    for part in re.split(r"[;/:]", node):
        base = re.sub(r"_\d+$", "", part)
        for cand in (part, base):
            if cand in names:
                return cand
    return node.split(";")[0]


# --- TFLite -----------------------------------------------------------------------

def _tflite_converter(saved_model: Path, calib: Dataset):
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    n = len(calib)
    conv.representative_dataset = lambda: (calib.sample(i) for i in range(n))
    return conv


def _debug_dataset(calib: Dataset, n: int):
    names = list(calib.inputs)
    return lambda: ([calib.inputs[k][i:i + 1] for k in names] for i in range(min(n, len(calib))))


class _BuiltinKernelsOnly:
    """While open, the tf.lite Interpreters TensorFlow's quantization debugger makes for itself run on
    the built-in kernels, without the default XNNPACK delegate (which refuses some graphs when it
    prepares them: 'failed to create XNNPACK runtime'); the debugger takes no interpreter options."""

    def __enter__(self):
        from tensorflow.lite.python import interpreter as tfl

        self.module, self.cls = tfl, tfl.Interpreter
        base = self.cls

        class Interpreter(base):
            def __init__(self, *args, **kwargs):
                kwargs.setdefault("experimental_op_resolver_type", tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
                super().__init__(*args, **kwargs)

        tfl.Interpreter = Interpreter
        return self

    def __exit__(self, *exc):
        self.module.Interpreter = self.cls
        return False


def tflite_sensitivity(saved_model: Path, calib: Dataset, layer_names: Sequence[str]) -> List[Layer]:
    import tensorflow as tf

    from edgekit.runtime.tflite import delegate_refused

    def run():
        dbg = tf.lite.experimental.QuantizationDebugger(converter=_tflite_converter(saved_model, calib),
                                                        debug_dataset=_debug_dataset(calib, 64))
        dbg.run()
        return dbg

    try:
        dbg = run()
    except RuntimeError as e:   # the delegate refused the debug model: its layer errors on the built-in kernels
        if not delegate_refused(" ".join(str(e).split())):
            raise
        with _BuiltinKernelsOnly():
            dbg = run()
    buf = io.StringIO()
    dbg.layer_statistics_dump(buf)
    layers = []
    for row in csv.DictReader(io.StringIO(buf.getvalue())):
        mse = float(row.get("mean_squared_error") or 0.0)
        layers.append(Layer([row["tensor_name"]], row["op_name"], source_name(row["tensor_name"], layer_names), mse))
    # the model's last op is named after the output tensor: it is the source's last layer
    named = {lay.source for lay in layers}
    if layers and layer_names and layers[-1].source == layers[-1].node.split(";")[0] \
            and layer_names[-1] not in named:
        layers[-1].source = layer_names[-1]
    return sorted(layers, key=lambda lay: lay.sensitivity, reverse=True)


def tflite_with_float(saved_model: Path, calib: Dataset, nodes: Sequence[str]) -> bytes:
    import tensorflow as tf

    opts = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(nodes))
    dbg = tf.lite.experimental.QuantizationDebugger(converter=_tflite_converter(saved_model, calib),
                                                    debug_dataset=_debug_dataset(calib, 8), debug_options=opts)
    from edgekit.convert.onnx_tflite import keep_io_order  # the source's input/output order

    return keep_io_order(saved_model, dbg.get_nondebug_quantized_model())


# --- ONNX ---------------------------------------------------------------------------

def onnx_sensitivity(float_bytes: bytes, qdq_bytes: bytes, calib: Dataset,
                     layer_names: Sequence[str]) -> List[Layer]:
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    from edgekit.convert.onnx import _Reader, preprocess

    float_bytes = preprocess(float_bytes)  # the graph whose node names quantization sees
    with tempfile.TemporaryDirectory(prefix="edgekit-mp-") as d:
        fp, qp = Path(d, "f.onnx"), Path(d, "q.onnx")
        fp.write_bytes(float_bytes)
        qp.write_bytes(qdq_bytes)
        fa, qa = Path(d, "fa.onnx"), Path(d, "qa.onnx")
        modify_model_output_intermediate_tensors(str(fp), str(fa))
        modify_model_output_intermediate_tensors(str(qp), str(qa))
        small = calib.take(slice(0, min(64, len(calib))))
        f_acts = collect_activations(str(fa), _Reader(small, None))
        q_acts = collect_activations(str(qa), _Reader(small, None))
        errs = compute_activation_error(create_activation_matching(q_acts, f_acts))
    graph = onnx.load_from_string(float_bytes).graph
    producer = {o: n for n in graph.node for o in n.output}
    by_source: Dict[str, Layer] = {}
    for n in graph.node:  # every node of a source layer is excluded together (MatMul, Add, Relu...)
        src = source_name(n.name, layer_names)
        lay = by_source.setdefault(src, Layer([], n.op_type, src, float("-inf")))
        lay.nodes.append(n.name)
        if n.op_type in ("Conv", "MatMul", "Gemm"):
            lay.op = n.op_type
    for tensor, e in errs.items():
        node = producer.get(tensor)
        if node is None or "xmodel_err" not in e:
            continue
        sqnr = float(e["xmodel_err"])
        lay = by_source[source_name(node.name, layer_names)]
        lay.sensitivity = max(lay.sensitivity, -sqnr if np.isfinite(sqnr) else 0.0)
    layers = [lay for lay in by_source.values() if lay.sensitivity > float("-inf")
              and lay.op in ("Conv", "MatMul", "Gemm")]
    return sorted(layers, key=lambda lay: lay.sensitivity, reverse=True)


# --- the search -------------------------------------------------------------------------

def candidates(layers: List[Layer]) -> List[List[Layer]]:
    compute = [lay for lay in layers if lay.op not in ("RESHAPE", "MAX_POOL_2D", "Reshape", "MaxPool",
                                                       "Transpose", "TRANSPOSE", "Flatten", "Squeeze")]
    out = [compute[:k] for k in range(1, len(compute) + 1)]
    out += [[lay] for lay in compute[1:1 + SINGLETONS - 1]]
    return out


Judge = Callable[[Dict[str, Any]], Tuple[bool, Optional[float]]]


def search(layers: List[Layer], make: Callable[[List[str]], bytes], evaluate: Callable[[bytes], Dict[str, Any]],
           judge: Judge, seconds: float, first: bool, say: Callable[[str], None]) -> Dict[str, Any]:
    """Try candidates; returns {'chosen': Candidate or None, 'tried': [...], 'stopped': why}.
    `judge(metrics)` -> (meets the floor, drop in points to show)."""
    deadline = time.monotonic() + seconds
    tried: List[Candidate] = []
    stopped = "every candidate tried"
    for cand_layers in candidates(layers):
        if time.monotonic() > deadline:
            stopped = f"search budget of {seconds:.0f} s spent"
            break
        c = _try(cand_layers, make, evaluate, judge, say)
        tried.append(c)
        if c.meets and first:
            stopped = "first candidate that meets the budget (--search-first)"
            break
    ok = [c for c in tried if c.meets]
    if ok and not first:
        # backward elimination from the smallest set that met the budget: a layer that can go
        # back to INT8 without breaking the budget goes back (least sensitive first)
        current = min(ok, key=lambda c: len(c.float_layers)).float_layers
        done = {tuple(lay.source for lay in c.float_layers) for c in tried}
        for lay in sorted(current, key=lambda x: x.sensitivity):
            trial = [x for x in current if x is not lay]
            if not trial or tuple(x.source for x in trial) in done:
                continue
            if time.monotonic() > deadline:
                stopped = f"search budget of {seconds:.0f} s spent"
                break
            c = _try(trial, make, evaluate, judge, say)
            tried.append(c)
            done.add(tuple(x.source for x in trial))
            if c.meets:
                current = trial
        ok = [c for c in tried if c.meets]
    chosen = min(ok, key=lambda c: (len(c.data), c.p50_ms or 0.0)) if ok else None
    return {"chosen": chosen, "tried": tried, "stopped": stopped}


def _try(cand_layers, make, evaluate, judge: Judge, say) -> Candidate:
    c = Candidate(cand_layers)
    try:
        c.data = make([n for lay in cand_layers for n in lay.nodes])
        ev = evaluate(c.data)
        c.metrics, c.p50_ms = ev["metrics"], ev["p50_ms"]
        c.meets, c.drop = judge(c.metrics)
    except Exception as e:  # a candidate the converter cannot build is recorded as failed, and said
        c.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    say(f"  float: {', '.join(lay.source for lay in cand_layers)} -> "
        + (f"drop {c.drop if c.drop is not None else float('nan'):.2f}, {len(c.data) / 1024:.1f} KiB, "
           f"p50 {c.p50_ms:.4f} ms" + (" (meets the floor)" if c.meets else "") if c.error is None
           else f"failed: {c.error}"))
    return c
