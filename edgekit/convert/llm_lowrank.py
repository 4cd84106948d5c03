"""Low-rank layers in an LLM bundle: a factorized folder's pairs become two MatMuls in the builder's model.onnx.

`edgekit factorize` on a causal LM writes a Hugging Face folder whose weights are the rank-r products B @ A (so
transformers, and every tool that reads the architecture, loads it as the original: that is the float reference
the converter's fidelity compares against) and, beside them, the factors themselves:

    edgekit_factorize.json     {"lowrank": {"file": "edgekit_lowrank.safetensors",
                                "layers": {"model.layers.0.mlp.down_proj": {"rank": r, "in": i, "out": o,
                                                                           "A": "<key>", "B": "<key>"}, ...}}}
    edgekit_lowrank.safetensors  A (rank x in) and B (out x rank) per layer, float32; W = B @ A

After ONNX Runtime GenAI's model builder wrote model.onnx (convert.llm.run_builder calls `apply`), each factorized
layer's node (`/model/layers.{i}/{mlp|attn}/{proj}/MatMul`, `_Q4` / `_Q8` once quantized) is replaced by two:
x @ A^T (`.../{proj}/lowrank_A`) and then @ B^T (the replaced node's own name and output, so the builder's later
nodes, its override names and convert.llm.decoder_matmuls still find it). A quantized build's pair is quantized
as the node it replaces was: MatMulNBits with that node's bits, block size and accuracy level, by
onnxruntime.quantization's MatMulNBitsQuantizer with the build's algorithm (k_quant / rtn / default, symmetric,
the builder's defaults), run on a small graph of the new MatMuls only. Each pair is then checked numerically:
ONNX Runtime on random activations against the float product x A^T B^T (relative error recorded). A float build's
pair is two float MatMuls.

Layers the builder packs with others (0.18 writes q, k and v as one `attn/qkv_proj` MatMul; some architectures
pack gate and up) cannot be split into a pair without losing what the packing saves: they stay one node holding
the rank-r product, and the record says so. A pair that would not be cheaper (rank * (in + out) >= in * out) is
left as it is too.

The record (`edgekit_lowrank.json` in the model folder, and the manifest's `lowrank`): per layer the node
replaced, rank, shapes, bits, the bytes of the node's weights before and after, and the pair's numeric error.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from edgekit.convert.llm_graph import constant_dtypes, save_with_data
from edgekit.errors import SourceModelError

RECORD = "edgekit_factorize.json"      # in the factorized Hugging Face folder
FACTORS = "edgekit_lowrank.safetensors"
BUNDLE_RECORD = "edgekit_lowrank.json"  # in the built model folder

_BLOCKS = {"mlp": "mlp", "feed_forward": "mlp", "self_attn": "attn", "attention": "attn"}
_PACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
           "up_proj": "gate_up_proj"}


def factorized(src_dir: os.PathLike) -> Optional[Dict[str, Any]]:
    """The `lowrank` section of a factorized folder's record (None: not a folder with factors)."""
    p = Path(src_dir) / RECORD
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise SourceModelError(f"{RECORD} is not JSON", path=str(p),
                               hint="factorize the model again (edgekit factorize ... -o FOLDER)") from None
    low = rec.get("lowrank") if isinstance(rec, dict) else None
    if not low:
        return None
    if not isinstance(low.get("layers"), dict) or not (Path(src_dir) / low.get("file", FACTORS)).is_file():
        raise SourceModelError(f"{RECORD} names low-rank factors that are not in the folder "
                               f"({low.get('file', FACTORS)})", path=str(src_dir),
                               hint="factorize the model again, or delete the 'lowrank' section to convert the "
                                    "folder's weights as they are")
    return low


def onnx_base(layer: str) -> Optional[Tuple[str, str, str]]:
    """(layer index, builder block, projection) of a Hugging Face Linear name, or None when not in a decoder layer.
    model.layers.3.mlp.down_proj -> ("3", "mlp", "down_proj")."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.(\w+)\.(\w+)$", layer)
    if not m or m.group(2) not in _BLOCKS:
        return None
    return m.group(1), _BLOCKS[m.group(2)], m.group(3)


def _load_factors(src_dir: Path, low: Dict[str, Any]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(src_dir / low.get("file", FACTORS)), framework="np") as f:
        keys = set(f.keys())
        for name, ly in low["layers"].items():
            ka, kb = ly.get("A", f"{name}.A"), ly.get("B", f"{name}.B")
            if ka not in keys or kb not in keys:
                raise SourceModelError(f"{low.get('file', FACTORS)} lacks the factors of {name} ({ka}, {kb})",
                                       path=str(src_dir), hint="factorize the model again")
            a, b = f.get_tensor(ka).astype(np.float32), f.get_tensor(kb).astype(np.float32)
            r = int(ly["rank"])
            if a.shape != (r, int(ly["in"])) or b.shape != (int(ly["out"]), r):
                raise SourceModelError(f"factors of {name} have shapes {a.shape} / {b.shape}, the record says rank "
                                       f"{r}, in {ly['in']}, out {ly['out']}", path=str(src_dir))
            out[name] = (a, b)
    return out


def _folder_weight(src_dir: Path, name: str) -> Optional[np.ndarray]:
    """The folder's own weight of `name` (safetensors, single file or sharded), None when not stored so."""
    from safetensors import safe_open

    key = f"{name}.weight"
    index = src_dir / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).get(key)
        files = [src_dir / shard] if shard else []
    else:
        files = [src_dir / "model.safetensors"] if (src_dir / "model.safetensors").is_file() else []
    for fp in files:
        with safe_open(str(fp), framework="pt") as f:   # pt: bfloat16 checkpoints too
            if key in f.keys():
                return f.get_tensor(key).float().numpy()
    return None


def _check_consistent(src_dir: Path, factors: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> None:
    """The folder's weights must still be the products of its factors (a folder fine-tuned or edited after
    factorizing no longer is: converting the factors would ship another model than the one measured)."""
    for name, (a, b) in factors.items():
        w = _folder_weight(src_dir, name)
        if w is None:
            continue
        prod = b.astype(np.float64) @ a.astype(np.float64)
        err = float(np.linalg.norm(w - prod) / max(1e-30, np.linalg.norm(w)))
        if err > 1e-3:
            raise SourceModelError(f"{name}'s weight is not the product of its low-rank factors (relative "
                                   f"difference {err:.3g}): the folder was changed after factorizing",
                                   path=str(src_dir), hint=f"factorize again, or remove 'lowrank' from {RECORD} "
                                                           "to convert the weights as they are")


def _tensor_bytes(t) -> int:
    ext = {e.key: e.value for e in t.external_data}
    if "length" in ext:
        return int(ext["length"])
    if t.raw_data:
        return len(t.raw_data)
    from onnx import numpy_helper

    return int(numpy_helper.to_array(t).nbytes)


def _quantize_pairs(pairs: List[Dict[str, Any]], bits: int, block: int, level: int, algo: str, np_dtype):
    """A graph of the new MatMuls only (x_i -> A_i^T -> B_i^T), quantized as the builder quantizes; returns
    its nodes and initializers by the float node names, and each pair's relative error on random inputs."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer,
                                                                 RTNWeightOnlyQuantConfig)

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    elem = TensorProto.FLOAT16 if np_dtype == np.float16 else TensorProto.FLOAT
    nodes, inits, ins, outs = [], [], [], []
    for i, p in enumerate(pairs):
        a, b = p["A"], p["B"]
        x, h, y = f"x{i}", f"h{i}", f"y{i}"
        inits += [numpy_helper.from_array(np.ascontiguousarray(a.T).astype(np_dtype), p["wa"]),
                  numpy_helper.from_array(np.ascontiguousarray(b.T).astype(np_dtype), p["wb"])]
        nodes += [helper.make_node("MatMul", [x, p["wa"]], [h], name=p["na"]),
                  helper.make_node("MatMul", [h, p["wb"]], [y], name=p["nb"])]
        ins.append(helper.make_tensor_value_info(x, elem, ["n", a.shape[1]]))
        outs.append(helper.make_tensor_value_info(y, elem, ["n", b.shape[0]]))
    graph = helper.make_graph(nodes, "lowrank", ins, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    quantizer: Dict[str, str] = {}
    if bits:
        # ORT's k_quant / rtn pack a 4-bit node's zero points two to a byte across rows and fail when its
        # block count is odd (K = a rank of 144 is 4.5 blocks of 32); such nodes get the MLAS default quantizer
        # (symmetric round-to-nearest, same bits / block / accuracy level), in a second pass
        odd = {p[n]: p[k] for p in pairs for n, k in (("na", "in"), ("nb", "rank"))
               if bits == 4 and -(-p[k] // block) % 2}
        names = [p[n] for p in pairs for n in ("na", "nb") if p[n] not in odd]
        if algo in ("k_quant", "rtn") and names:
            custom = {n: {"bits": bits} for n in names}
            cfg = (KQuantWeightOnlyQuantConfig if algo == "k_quant" else RTNWeightOnlyQuantConfig)(
                customized_weight_config=custom)
            q = MatMulNBitsQuantizer(model=model, bits=bits, block_size=block, is_symmetric=True,
                                     accuracy_level=level, nodes_to_exclude=list(odd), op_types_to_quantize=("MatMul",),
                                     algo_config=cfg)
            q.process()
            model = q.model.model
            quantizer.update({n: algo for n in names})
        if any(n.op_type == "MatMul" for n in model.graph.node):
            q = MatMulNBitsQuantizer(model=model, bits=bits, block_size=block, is_symmetric=True,
                                     accuracy_level=level, op_types_to_quantize=("MatMul",), algo_config=None)
            q.process()
            model = q.model.model
            quantizer.update({n: "default (MLAS round-to-nearest)" for p in pairs for n in (p["na"], p["nb"])
                              if n not in quantizer})
    errors = _pair_errors(model, pairs, np_dtype)
    by_out = {o: n for n in model.graph.node for o in n.output}
    init = {t.name: t for t in model.graph.initializer}
    res = []
    for i, p in enumerate(pairs):
        second = by_out[f"y{i}"]
        first = by_out[second.input[0]]
        if bits and not (first.op_type == second.op_type == "MatMulNBits"):
            raise RuntimeError(f"the quantizer left {p['layer']}'s pair as {first.op_type}/{second.op_type}")
        res.append({"nodes": (first, second), "inits": [init[n] for nd in (first, second) for n in nd.input
                                                      if n in init], "rel_err": errors[i],
                    "quantizer": sorted({quantizer[p["na"]], quantizer[p["nb"]]}) if bits else None})
    return res


def _pair_errors(model, pairs, np_dtype) -> List[Optional[float]]:
    """Each pair's output against the float product x A^T B^T (float64), on 16 random activation rows."""
    if np_dtype != np.float32:
        return [None] * len(pairs)   # a GPU (fp16) build: its kernels are not this host's
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {f"x{i}": rng.standard_normal((16, p["A"].shape[1])).astype(np.float32) for i, p in enumerate(pairs)}
    got = sess.run([f"y{i}" for i in range(len(pairs))], feeds)
    out = []
    for i, p in enumerate(pairs):
        ref = feeds[f"x{i}"].astype(np.float64) @ p["A"].T.astype(np.float64) @ p["B"].T.astype(np.float64)
        out.append(float(np.linalg.norm(got[i] - ref) / max(1e-30, np.linalg.norm(ref))))
    return out


def apply(src_dir: os.PathLike, model_dir: os.PathLike, algo: str = "k_quant") -> Optional[Dict[str, Any]]:
    """Replace the factorized layers of `src_dir` (a folder `edgekit factorize` wrote) in the builder's output
    `model_dir` by their pairs; rewrites model.onnx + model.onnx.data and writes edgekit_lowrank.json there.
    Returns the record, or None when the folder has no factors (nothing done)."""
    import onnx

    src_dir, model_dir = Path(src_dir), Path(model_dir)
    low = factorized(src_dir)
    if low is None:
        return None
    factors = _load_factors(src_dir, low)
    _check_consistent(src_dir, factors)
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=True)
    g = model.graph
    nodes = {n.name: n for n in g.node}
    init = {t.name: t for t in g.initializer}
    dtypes = constant_dtypes(g)   # the pair in the type the node it replaces reads (a CUDA build's fp16)
    left: Dict[str, str] = {}
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for name in sorted(factors, key=_layer_order):
        a, b = factors[name]
        rank, n_in, n_out = a.shape[0], a.shape[1], b.shape[0]
        where = onnx_base(name)
        if where is None:
            left[name] = "not a decoder layer's projection: the builder's node is not known"
            continue
        i, block, proj = where
        base = f"/model/layers.{i}/{block}/{proj}"
        node = next((nodes[n] for n in (f"{base}/MatMul", f"{base}/MatMul_Q4", f"{base}/MatMul_Q8") if n in nodes),
                    None)
        if node is None:
            packed = _PACKED.get(proj)
            if packed and any(n.startswith(f"/model/layers.{i}/{block}/{packed}/") for n in nodes):
                left[name] = (f"the builder packs it into {packed}: left as one node holding the rank-{rank} "
                              "product")
            else:
                left[name] = f"no node {base}/MatMul in the build: left as the builder wrote it"
            continue
        if rank * (n_in + n_out) >= n_in * n_out:
            left[name] = (f"rank {rank} pair would hold {rank * (n_in + n_out):,} weights, not fewer than "
                          f"{n_in * n_out:,}")
            continue
        attrs = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
        if node.op_type == "MatMulNBits":
            if (int(attrs["K"]), int(attrs["N"])) != (n_in, n_out):
                left[name] = f"node {node.name} is {attrs['K']} x {attrs['N']}, the factors {n_in} x {n_out}"
                continue
            dt = np.float16 if dtypes.get(node.input[2]) == np.float16 else np.float32
            key = (int(attrs["bits"]), int(attrs["block_size"]), int(attrs.get("accuracy_level", 0)), dt)
        elif node.op_type == "MatMul" and node.input[1] in init:
            w = init[node.input[1]]
            if tuple(w.dims) != (n_in, n_out):
                left[name] = f"node {node.name} weight is {list(w.dims)}, the factors {n_in} x {n_out}"
                continue
            dt = np.float16 if dtypes.get(node.input[1]) == np.float16 else np.float32
            key = (0, 0, 0, dt)
        else:
            left[name] = f"node {node.name} is {node.op_type} without a constant weight: left as it is"
            continue
        stem = name  # initializer names: <hf name>.lowrank_A.weight (no clash with the builder's)
        float_name = re.sub(r"_Q\d+$", "", node.name)
        groups.setdefault(key, []).append({
            "layer": name, "node": node, "A": a, "B": b, "rank": rank, "in": n_in, "out": n_out,
            "wa": f"{stem}.lowrank_A.weight", "wb": f"{stem}.lowrank_B.weight",
            "na": f"{base}/lowrank_A", "nb": float_name,
            "bytes_before": sum(_tensor_bytes(init[x]) for x in node.input[1:] if x in init)})
    layers: Dict[str, Any] = {}
    replace: Dict[str, Tuple] = {}
    new_inits = []
    for (bits, block, level, dt), pairs in groups.items():
        for p, q in zip(pairs, _quantize_pairs(pairs, bits, block, level, algo, dt)):
            first, second = q["nodes"]
            old = p["node"]
            first.input[0] = old.input[0]
            mid = f"{p['na']}/output_0"
            first.output[0] = mid
            second.input[0] = mid
            second.output[0] = old.output[0]
            replace[old.name] = (first, second)
            new_inits += q["inits"]
            layers[p["layer"]] = {
                "node": old.name, "nodes": [first.name, second.name], "op_type": second.op_type, "rank": p["rank"],
                "in": p["in"], "out": p["out"], "bits": bits or None, "block_size": block or None,
                "accuracy_level": level if bits else None, "quantizer": q["quantizer"],
                "weights_before": p["in"] * p["out"], "weights_after": p["rank"] * (p["in"] + p["out"]),
                "bytes_before": p["bytes_before"], "bytes_after": sum(_tensor_bytes(t) for t in q["inits"]),
                "rel_err": None if q["rel_err"] is None else round(q["rel_err"], 6)}
    if replace:
        kept = []
        for n in g.node:
            kept.extend(replace[n.name] if n.name in replace else (n,))
        kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in kept]
        del g.node[:]
        g.node.extend(kept)
        used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
        gone = {x for name in replace for x in nodes[name].input[1:]} - used
        fresh = [t for t in g.initializer if t.name not in gone] + new_inits
        del g.initializer[:]
        g.initializer.extend(fresh)
        save_with_data(model, model_dir)
    rec = {"source": str(src_dir), "algo": algo, "layers": layers, "left": left,
           "factorized": len(layers), "left_alone": len(left),
           "bytes_before": sum(v["bytes_before"] for v in layers.values()),
           "bytes_after": sum(v["bytes_after"] for v in layers.values()),
           "max_rel_err": max((v["rel_err"] for v in layers.values() if v["rel_err"] is not None), default=None)}
    (model_dir / BUNDLE_RECORD).write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
    return rec


def _layer_order(name: str):
    m = re.search(r"layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def summary(model_dir: os.PathLike) -> Optional[Dict[str, Any]]:
    """The manifest's `lowrank` entry of a built model folder (None when it has no low-rank layers)."""
    p = Path(model_dir) / BUNDLE_RECORD
    if not p.is_file():
        return None
    rec = json.loads(p.read_text(encoding="utf-8"))
    return {"record": BUNDLE_RECORD, "factorized": rec["factorized"], "left_alone": rec["left_alone"],
            "bytes_before": rec["bytes_before"], "bytes_after": rec["bytes_after"], "max_rel_err": rec["max_rel_err"],
            "layers": {k: {"rank": v["rank"], "bits": v["bits"], "rel_err": v["rel_err"]}
                       for k, v in rec["layers"].items()},
            "left": rec["left"]}


__all__ = ["apply", "factorized", "summary", "onnx_base", "RECORD", "FACTORS", "BUNDLE_RECORD"]
