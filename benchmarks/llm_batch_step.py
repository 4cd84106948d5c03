"""The batched decoder graph's step time against the batch and the context length, without the engine or HTTP:
what one decode step of runtime.llm_batch.BatchedDecoder costs at batch 1 and 4 with every row at 16 / 128 / 256
/ 384 tokens of context (the same length repeated: the cost at that length), 3 repetitions, medians; and the
lm_head alone (its MatMul node cut out of the graph with its weights, run in a session of the same options on
[n, 1, hidden] inputs): its share of the step, which does not grow with the context.

    flock /tmp/edgekit-bench.lock python benchmarks/llm_batch_step.py MODEL_DIR THREADS [OUT.json] [LENGTHS]

MODEL_DIR: an ORT GenAI folder (e.g. benchmarks/.cache/llm-1024x8-int4 from llm_serve_bench.py --synth 1024x8,
or a bundle's model folder). LENGTHS: comma-separated context lengths up to 500 (default 16,128,256,384).
Prints one JSON line (and writes it to OUT.json, under benchmarks/results/ when a bare name): per length ms_b1,
ms_b4 and x4 (batch 4's tokens a second over batch 1's); the lm_head's ms_b1 / ms_b4.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgekit.runtime.llm_batch import BatchedDecoder  # noqa: E402
from edgekit.runtime.llmopts import after_load  # noqa: E402

LENGTHS = (16, 128, 256, 384)


def lm_head_step(d: Path, config: dict, threads: int) -> dict:
    """The lm_head's time at batch 1 and 4: its node and initializers in a graph of their own, a session with the
    decoder's thread count and ORT config entries, the same [n, 1, hidden] float32 input shape as a decode step."""
    import onnx
    import onnxruntime as ort
    from onnx import helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    from edgekit.convert.llm_graph import _lm_head, node_constants

    m = onnx.load(str(d / config["model"]["decoder"].get("filename", "model.onnx")), load_external_data=False)
    node, _ = _lm_head(m.graph)
    if node is None:
        return {"why": "no lm_head MatMul found before the logits"}
    casts, used = node_constants(m.graph, node)   # the scales fp16 behind a Cast (llm_graph.half_scales)
    for t in used:
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(d))
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    hidden = int(node.attribute[[a.name for a in node.attribute].index("K")].i) if node.op_type == "MatMulNBits" \
        else int(used[0].dims[0])
    x = helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, ["n", 1, hidden])
    y = helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)
    g = helper.make_graph(casts + [node], "lm_head", [x], [y], used)
    one = helper.make_model(g, opset_imports=list(m.opset_import), ir_version=m.ir_version)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    for k, v in sorted((config["model"]["decoder"].get("session_options") or {}).items()):
        if k.startswith("session."):
            so.add_session_config_entry(k, str(v))
    sess = ort.InferenceSession(one.SerializeToString(), so, providers=["CPUExecutionProvider"])
    res = {}
    for _ in range(3):
        for n in (1, 4):
            feed = {node.input[0]: np.random.default_rng(0).standard_normal((n, 1, hidden)).astype(np.float32)}
            for _ in range(3):
                sess.run(None, feed)
            t, k = time.perf_counter(), 40
            for _ in range(k):
                sess.run(None, feed)
            res.setdefault(n, []).append((time.perf_counter() - t) / k * 1e3)
    bits = next((a.i for a in node.attribute if a.name == "bits"), None)
    return {"node": node.name, "op": node.op_type, "bits": bits,
            "weight_bytes": sum(len(t.raw_data) for t in used),
            "ms_b1": round(float(np.median(res[1])), 3), "ms_b4": round(float(np.median(res[4])), 3)}


def main() -> None:
    d, threads = Path(sys.argv[1]), int(sys.argv[2])
    before = os.getloadavg()
    config = json.loads((d / "genai_config.json").read_text())
    lengths_all = tuple(int(x) for x in sys.argv[4].split(",")) if len(sys.argv) > 4 else LENGTHS
    dec = BatchedDecoder(d, config, threads=threads, slots=8, capacity=512)
    after_load(d)   # as the server's load ends (llmopts.after_load: huge pages for the weights among others)
    res = {}
    for _ in range(3):
        for L in lengths_all:
            prompt = list(range(5, 5 + L))
            for n in (1, 4):
                for i in range(n):
                    dec.prefill(i, [prompt])
                lengths = np.full(n, L, dtype=np.int64)
                toks = np.full(n, 7, dtype=np.int64)
                for _ in range(3):
                    dec.decode(toks, lengths)
                t, k = time.perf_counter(), 40
                for _ in range(k):
                    dec.decode(toks, lengths)
                res.setdefault((L, n), []).append((time.perf_counter() - t) / k * 1e3)
    out = {f"L{L}": {"ms_b1": round(float(np.median(res[(L, 1)])), 3), "ms_b4": round(float(np.median(res[(L, 4)])), 3),
                     "x4": round(float(4 * np.median(res[(L, 1)]) / np.median(res[(L, 4)])), 2)} for L in lengths_all}
    head = lm_head_step(d, config, threads)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    line = json.dumps({"model": str(d), "threads": threads, "cpu": cpu,
                       "session_options": config["model"]["decoder"].get("session_options") or {},
                       "kv_bytes_per_token": dec.kv_bytes_per_token, "steps": out, "lm_head": head,
                       "load_avg_before": before, "load_avg": os.getloadavg()})
    print(line)
    if len(sys.argv) > 3:
        path = Path(sys.argv[3]) if "/" in sys.argv[3] else Path(__file__).resolve().parent / "results" / sys.argv[3]
        path.write_text(line + "\n")


if __name__ == "__main__":
    main()
