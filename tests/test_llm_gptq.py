"""edgekit.convert.llm_gptq: calibrated INT4 rounding (AWQ scales, GPTQ error feedback) written into the builder's
MatMulNBits nodes. The packing is ONNX Runtime's own (checked by running the node), GPTQ lowers a layer's output
error below block-by-block rounding, AWQ's folding is exact in float, and a calibrated build of the tiny decoder
is closer to float than the builder's k_quant on held-out text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import onnxruntime_genai  # noqa: F401  (edgekit[llm-convert], in dev: missing must fail, not skip)

from tinylm import corpus_text, tied_lm, tiny_lm  # noqa: F401  (session fixtures)

from edgekit.convert import llm_gptq as g


def _run_node(node, inits, x):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    K = x.shape[1]
    N = [a.i for a in node.attribute if a.name == "N"][0]
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.shape[0], K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], N])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("K,N,block,bits", [(96, 5, 32, 4), (576, 7, 64, 4), (200, 3, 64, 4), (128, 4, 128, 4),
                                            (96, 5, 32, 8), (576, 6, 128, 8)])
def test_packing_is_onnxruntimes(K, N, block, bits):
    """Per-row zero points, odd numbers of blocks per row (576 = 9 x 64), a padded last block (200 = 3 x 64 + 8):
    ONNX Runtime's MatMulNBits (fp32 compute) gives x @ dequant(W)^T, and unpacking gives the same weights."""
    import torch
    from onnx import numpy_helper

    rng = np.random.default_rng(K + N + block)
    w = torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32))
    q, s, z = g.quantize_rtn(w, block, bits, "kquant")
    assert int(q.max()) <= 2 ** bits - 1 and int(q.min()) >= 0
    node, inits = g.nbits_node("mm", "x", "y", "w", q.numpy(), s.numpy(), z.numpy(), K, N, bits, block, 0)
    # the layout's bytes (LLMBuildOptions.int8_bytes, the byte budget's costs): with zero points and without
    assert sum(numpy_helper.to_array(t).nbytes for t in inits) == g.nbits_bytes(K, N, bits, block, 4, True)
    assert sum(numpy_helper.to_array(t).nbytes for t in inits[:2]) == g.nbits_bytes(K, N, bits, block, 4, False)
    x = rng.standard_normal((3, K)).astype(np.float32)
    wd = g.dequant(q, s, z, K, block).numpy()
    np.testing.assert_allclose(_run_node(node, inits, x), x @ wd.T, rtol=1e-4, atol=1e-4)
    arrs = [numpy_helper.to_array(t) for t in inits]
    np.testing.assert_array_equal(g.unpack_nbits(*arrs, K, N, bits, block), wd)
    # the rounding is k-quant's (llm_sensitivity.kquant_fake simulates the builder's)
    from edgekit.convert.llm_sensitivity import kquant_fake

    np.testing.assert_allclose(wd, kquant_fake(w, block, bits).numpy(), rtol=0, atol=1e-5)
    # the symmetric grid: no zero points in the node (ONNX Runtime's default 2^(bits-1)), absmax on the grid's edge
    q, s, z = g.quantize_rtn(w, block, bits, "symmetric")
    half = 2 ** (bits - 1)
    assert (z == half).all() and int((q - half).abs().max()) == half - 1
    node, inits = g.nbits_node("mm", "x", "y", "w", q.numpy(), s.numpy(), None, K, N, bits, block, 0)
    assert len(node.input) == 3 and len(inits) == 2
    wd = g.dequant(q, s, z, K, block).numpy()
    np.testing.assert_allclose(_run_node(node, inits, x), x @ wd.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(g.unpack_nbits(*[numpy_helper.to_array(t) for t in inits], None, K, N, bits, block),
                                  wd)


def test_gptq_lowers_the_output_error():
    """On correlated inputs, GPTQ's rounding of a weight matrix leaves less output error than rounding each block
    on its own, with either grid, and act-order keeps it below too."""
    import torch

    torch.manual_seed(0)
    K, N, T = 128, 48, 2048
    mix = torch.randn(K, K) / K ** 0.5 + torch.eye(K)
    X = torch.randn(T, K) @ mix * (torch.rand(K) * 3 + 0.2)
    W = torch.randn(N, K) * 0.05
    H = 2 * X.T @ X / T
    ref = X @ W.T

    def err(q, s, z):
        return float(((X @ g.dequant(q, s, z, K, 32).T - ref) ** 2).mean())

    for grid in ("kquant", "minmax"):
        rtn = err(*g.quantize_rtn(W, 32, 4, grid))
        gq = err(*g.gptq_quantize(W, H, 32, 4, grid))
        ao = err(*g.gptq_quantize(W, H, 32, 4, grid, act_order=True))
        assert gq < 0.8 * rtn and ao < 0.9 * rtn, (grid, rtn, gq, ao)


def test_symmetric_int8_rewrite():
    """symmetric_int8 on a graph as the builder writes it: an 8-bit k-quant lm_head (K 576) whose table a
    Reshape -> GatherBlockQuantized also reads, an 8-bit down_proj (K 1536), a 4-bit node and an 8-bit node without
    a float weight. The 8-bit nodes with weights come out symmetric at 64 (576 = 9 x 64) and 128, without zero
    points, the embedding reads the new table without zero points at the new block, and ONNX Runtime's MatMul
    and Gather give numpy's dequantization of the new integers (the op's default zero point 128); the rest is
    as it was."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    shapes = {"lm_head": (576, 40, 8), "down": (1536, 8, 8), "four": (576, 8, 4), "other": (576, 8, 8)}
    w = {k: torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32)) for k, (K, N, _) in shapes.items()}
    nodes, inits = [], []
    for k, (K, N, bits) in shapes.items():
        q, s, z = g.quantize_rtn(w[k], 32, bits, "kquant")
        name = "/lm_head/MatMul_Q8" if k == "lm_head" else f"/model/layers.0/{k}/MatMul_Q{bits}"
        n, t = g.nbits_node(name, "x" if K == 576 else "h", f"y_{k}", k, q.numpy(), s.numpy(), z.numpy(), K, N,
                            bits, 32, 0)
        nodes.append(n)
        inits += t
    inits.append(numpy_helper.from_array(np.array([40, 576], np.int64), "shape"))
    nodes += [helper.make_node("Reshape", ["lm_head.weight_Q8G32", "shape"], ["table"], name="/embed/Reshape"),
              helper.make_node("GatherBlockQuantized", ["table", "ids", "lm_head.weight_scale", "lm_head.weight_zp"],
                               ["rows"], name="/embed/GatherBlockQuantized", domain="com.microsoft", bits=8,
                               block_size=32, gather_axis=0, quantize_axis=1)]
    f = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "t", [f("x", TensorProto.FLOAT, [2, 576]), f("h", TensorProto.FLOAT, [2, 1536]),
                                           f("ids", TensorProto.INT64, [3])],
                              [f(f"y_{k}", TensorProto.FLOAT, [2, shapes[k][1]]) for k in shapes]
                              + [f("rows", TensorProto.FLOAT, [3, 576])], inits)
    full = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])
    before = {t.name: t.raw_data for t in full.graph.initializer}
    drop, add = set(), []
    def weight_of(n):   # the node's float weight; none for "other"
        return None if "other" in n.name else w["lm_head" if "lm_head" in n.name else n.name.split("/")[3]]

    rec = g.symmetric_int8(full, weight_of, (128, 64), drop, add)
    assert rec == {"nodes": 2, "blocks": {"64": 1, "128": 1}, "kept": ["/model/layers.0/other/MatMul_Q8"]}
    keep = [t for t in full.graph.initializer if t.name not in drop]
    del full.graph.initializer[:]
    full.graph.initializer.extend(keep + add)
    after = {t.name: t for t in full.graph.initializer}
    by = {n.name: n for n in full.graph.node}
    head, down = by["/lm_head/MatMul_Q8"], by["/model/layers.0/down/MatMul_Q8"]
    gbq = by["/embed/GatherBlockQuantized"]
    assert [len(n.input) for n in (head, down, gbq)] == [3, 3, 3]
    assert [g._attr(n, "block_size") for n in (head, down, gbq)] == [64, 128, 64]
    assert by["/embed/Reshape"].input[0] == head.input[1] == "lm_head.weight_Q8G64" and gbq.input[2] == head.input[2]
    for k in ("four", "other"):   # untouched
        n = by[f"/model/layers.0/{k}/MatMul_Q{shapes[k][2]}"]
        assert len(n.input) == 4 and all(after[x].raw_data == before[x] for x in n.input[1:])
    W = {}
    for k, n in (("lm_head", head), ("down", down)):
        K, N, _ = shapes[k]
        b = g._attr(n, "block_size")
        W[k] = g.unpack_nbits(*[numpy_helper.to_array(after[x]) for x in n.input[1:]], None, K, N, 8, b)
        scale = numpy_helper.to_array(after[n.input[2]]).reshape(N, K // b)
        np.testing.assert_allclose(scale, np.abs(w[k].numpy()).reshape(N, K // b, b).max(-1) / 127, rtol=1e-6)
        assert (np.abs(W[k] - w[k].numpy()) / np.repeat(scale, b, 1)).max() <= 0.5 + 1e-4
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(full.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x, h, ids = (rng.standard_normal((2, 576)).astype(np.float32), rng.standard_normal((2, 1536)).astype(np.float32),
                 np.array([0, 7, 39], np.int64))
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x, "h": h, "ids": ids})))
    np.testing.assert_allclose(out["y_lm_head"], x @ W["lm_head"].T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["y_down"], h @ W["down"].T, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["rows"], W["lm_head"][ids])


def _kl_of(model_dir: Path, fm, text) -> dict:
    from edgekit.convert.llm_fidelity import OnnxDecoder, compare

    dec = OnnxDecoder(model_dir, 2, 32, threads=1)
    return compare(fm.logprobs(text.windows), text, [dec.logits(w) for w in text.windows])


def _sub_model_run(full, node, feeds: dict):
    """One node of a built graph (external data loaded) run alone on `feeds`, MatMulNBits at accuracy level 0 (fp32
    compute: the weights' arithmetic alone)."""
    import onnxruntime as ort
    from onnx import helper

    inits = {t.name: t for t in full.graph.initializer}
    n = helper.make_node(node.op_type, list(node.input), ["out"], domain=node.domain,
                         **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    if n.op_type == "MatMulNBits":
        n.attribute[[a.name for a in n.attribute].index("accuracy_level")].i = 0
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
           for k, v in feeds.items()]
    graph = helper.make_graph([n], "t", ins, [helper.make_tensor_value_info("out", 1, None)],
                              [inits[x] for x in node.input if x in inits])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_int8_nodes_symmetric_in_builds(tied_lm, tmp_path):
    """The builder's 8-bit MatMulNBits rewritten symmetric (LLMBuildOptions.int8_symmetric, the default) in an
    INT4 build of the tied tiny Llama (the lm_head at INT8, block 128 as its hidden 128 allows:
    LLMBuildOptions.int8_head_blocks; one measured decoder MatMul at INT8: block 64) and in
    its INT8 build (every MatMul, at the build's block 32): no zero points; the tied embedding's
    GatherBlockQuantized reads the lm_head's new table (aliased, no Reshape); the lm_head and the embedding
    compute numpy's dequantization of the float weight's absmax rounding; the bytes shrink as the layout says;
    KL stays near the asymmetric build's; ORT GenAI generates. With the scales stored fp16 (half_scales, the
    default), the weights are rounded on the fp16 scales themselves: the file holds exactly what was rounded."""
    import onnx
    from onnx import numpy_helper

    from edgekit.convert.llm import LLMBuildOptions, decoder_matmuls, read_source, run_builder, weight_bytes
    from edgekit.convert.llm_fidelity import FloatModel
    from edgekit.runtime.llm import load_llm

    src = read_source(str(tied_lm))
    fm = FloatModel(tied_lm, threads=1)
    text = fm.text_windows(corpus_text(200, seed=13), "held-out", 384, 128)
    w_head = fm.model.lm_head.weight.detach().numpy()
    V, K = w_head.shape
    matmuls = {}
    figs, sizes, summary = {}, {}, {}
    for prec in ("int4", "int8"):
        for sym, half in ((False, False), (True, False), (True, True)):
            out = tmp_path / f"{prec}-{sym}-{half}"
            if prec == "int4":
                opts = LLMBuildOptions("int4", int8_matmuls=("/model/layers.1/attn/o_proj/MatMul",),
                                       int8_symmetric=sym, half_scales=half)
            else:
                opts = LLMBuildOptions("int8", int8_symmetric=sym, half_scales=half)
            log = run_builder(src, opts, out, tmp_path / "cache", matmuls)
            matmuls = matmuls or decoder_matmuls(out / "model.onnx")
            if half:
                figs[prec, "half"], sizes[prec, "half"] = _kl_of(out, fm, text), weight_bytes(out)["weights"]
                summary[prec, "half"] = g.int8_summary(out)
                _check_half(out, prec, K, V, w_head, log)
                continue
            figs[prec, sym], sizes[prec, sym] = _kl_of(out, fm, text), weight_bytes(out)["weights"]
            summary[prec, sym] = g.int8_summary(out)
            full = onnx.load(str(out / "model.onnx"))
            n8 = [n for n in full.graph.node if n.op_type == "MatMulNBits" and g._attr(n, "bits") == 8]
            gbq = next(n for n in full.graph.node if n.op_type == "GatherBlockQuantized")
            assert len(n8) == (2 if prec == "int4" else 1 + 4 * 5)
            assert not any(n.op_type == "Reshape" and "embed_tokens" in n.name for n in full.graph.node)
            if not sym:
                assert all(len(n.input) == 4 for n in n8 + [gbq]) and "8-bit MatMulNBits symmetric" not in log
                continue
            block = 128 if prec == "int4" else 32     # the lm_head's (and the tied embedding's)
            assert "8-bit MatMulNBits symmetric" in log
            head = next(n for n in n8 if n.name.startswith("/lm_head/"))
            assert all(len(n.input) == 3 and g._attr(n, "block_size") == (block if n in (head, gbq) else 64 if
                                                                          prec == "int4" else 32) for n in n8 + [gbq])
            assert summary[prec, sym]["symmetric"] == len(n8) and summary[prec, sym]["blocks"] == (
                {"128": 1, "64": 1} if prec == "int4" else {"32": len(n8)})
            inits = {t.name: t for t in full.graph.initializer}
            W = g.unpack_nbits(*[numpy_helper.to_array(inits[x]) for x in head.input[1:]], None, K, V, 8, block)
            scale = numpy_helper.to_array(inits[head.input[2]]).reshape(V, K // block)
            np.testing.assert_allclose(scale, np.abs(w_head).reshape(V, K // block, block).max(-1) / 127, rtol=1e-6)
            assert (np.abs(W - w_head) / np.repeat(scale, block, 1)).max() <= 0.5 + 1e-4
            x = np.random.default_rng(0).standard_normal((2, K)).astype(np.float32)
            np.testing.assert_allclose(_sub_model_run(full, head, {head.input[0]: x}), x @ W.T, rtol=1e-4, atol=1e-4)
            ids = np.array([0, 5, V - 1], np.int64)
            np.testing.assert_array_equal(_sub_model_run(full, gbq, {gbq.input[1]: ids}), W[ids])
            lm = load_llm(out, threads=1, verify=False)
            assert lm.generate("the robot", max_new_tokens=8).strip()
    # the lm_head (V x K) and o_proj (K x K): a zero point per block of 32 and three of four scales (lm_head,
    # block 128) or every other one (o_proj, 64) gone (INT4 build), a zero point per block of 32 everywhere (INT8)
    assert sizes["int4", False] - sizes["int4", True] == (V * (K // 32 * 5 - K // 128 * 4)
                                                          + K * (K // 32 * 5 - K // 64 * 4))
    assert summary["int4", False]["bits_per_weight"] == 9.25
    assert summary["int4", True]["bits_per_weight"] == round(8 * (1 + (V * K / 32 + K * K / 16) / (V * K + K * K)), 3)
    assert summary["int8", True]["bits_per_weight"] == 9.0
    assert sizes["int8", False] - sizes["int8", True] == sum(
        g._attr(n, "N") * g._attr(n, "K") // 32 for n in onnx.load(
            str(tmp_path / "int8-True-False" / "model.onnx"), load_external_data=False).graph.node
        if n.op_type == "MatMulNBits")
    # fp16 scales: 2 bytes of every scale gone (the 8-bit nodes: 8.125 bits a weight at 128, 8.25 at 64, 8.5 at 32)
    assert summary["int4", "half"]["bits_per_weight"] == round(8 * (1 + (V * K / 64 + K * K / 32) / (V * K + K * K)), 3)
    assert summary["int8", "half"]["bits_per_weight"] == 8.5
    assert sizes["int8", True] - sizes["int8", "half"] == sum(
        g._attr(n, "N") * ((g._attr(n, "K") + 31) // 32) * 2 for n in onnx.load(
            str(tmp_path / "int8-True-True" / "model.onnx"), load_external_data=False).graph.node
        if n.op_type == "MatMulNBits")
    # measured (18:24 UTC): KL INT4 0.00270 -> 0.00264, INT8 0.000027 -> 0.000040 (INT8's KL is near the int8
    # activations' own noise: a wider relative margin, a small absolute one)
    assert figs["int4", True]["kl_mean"] < 1.3 * figs["int4", False]["kl_mean"] + 1e-5, figs
    assert figs["int8", True]["kl_mean"] < 2.0 * figs["int8", False]["kl_mean"] + 1e-5, figs
    for prec in ("int4", "int8"):   # the fp16 grid: the same rounding a few units of fp16's last bit apart
        assert figs[prec, "half"]["kl_mean"] < 1.1 * figs[prec, True]["kl_mean"] + 1e-5, figs


def _check_half(out, prec, K, V, w_head, log):
    """A build with fp16 scales: every MatMulNBits / GatherBlockQuantized scale an fp16 initializer behind a Cast;
    the lm_head's 8-bit weights rounded on those fp16 scales (absmax / 127 rounded to fp16)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    full = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in full.graph.initializer}
    cast = {n.output[0]: n.input[0] for n in full.graph.node if n.op_type == "Cast"}
    users = [n for n in full.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert users and all(inits[cast[n.input[2]]].data_type == TensorProto.FLOAT16 for n in users)
    assert "scales fp16 in the file" in log
    block = 128 if prec == "int4" else 32     # LLMBuildOptions.int8_head_blocks: K = 128
    head = next(n for n in users if n.name.startswith("/lm_head/"))
    s16 = numpy_helper.to_array(inits[cast[head.input[2]]]).reshape(V, K // block)
    want = (np.abs(w_head).reshape(V, K // block, block).max(-1) / 127).astype(np.float16)
    np.testing.assert_array_equal(s16, want)
    W = g.unpack_nbits(numpy_helper.to_array(inits[head.input[1]]), s16.astype(np.float32), None, K, V, 8, block)
    step = np.repeat(s16.astype(np.float32), block, 1)
    assert (np.abs(W - w_head) / step).max() <= 0.5 + 1e-3


def test_symmetric_int8_keeps_a_rows_own_block_and_leaves_nodes_it_cannot_write():
    """K not a multiple of any block asked for: the node's own block (96 = 3 x 32); a node with fp16 scales (a CUDA
    build's) rewritten with fp16 scales on fp16's grid (the type its activations bind); a node with an input beyond
    zero points (bias) is left as the builder wrote it, and said so."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    K, N = 96, 16
    w = torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32))
    nodes, inits = [], []
    for k in ("own", "half", "bias"):
        q, s, z = g.quantize_rtn(w, 32, 8, "kquant")
        n, t = g.nbits_node(f"/model/layers.0/{k}/MatMul_Q8", "x", f"y_{k}", k, q.numpy(), s.numpy(), z.numpy(), K,
                            N, 8, 32, 0)
        if k == "half":
            t = [numpy_helper.from_array(numpy_helper.to_array(x).astype(np.float16), x.name)
                 if x.name == n.input[2] else x for x in t]
        if k == "bias":
            t.append(numpy_helper.from_array(np.zeros(N, np.float32), "bias"))
            n.input.extend(["", "", "bias"])
        nodes.append(n)
        inits += t
    f = helper.make_tensor_value_info
    outs = [f(f"y_{k}", TensorProto.FLOAT, [1, N]) for k in ("own", "half", "bias")]
    full = helper.make_model(helper.make_graph(nodes, "t", [f("x", TensorProto.FLOAT, [1, K])], outs, inits))
    drop, add = set(), []
    rec = g.symmetric_int8(full, lambda n: w, (64,), drop, add)
    assert rec == {"nodes": 2, "blocks": {"32": 2}, "kept": ["/model/layers.0/bias/MatMul_Q8"]}
    own = next(n for n in full.graph.node if n.name == "/model/layers.0/own/MatMul_Q8")
    assert g._attr(own, "block_size") == 32 and len(own.input) == 3
    new = {t.name: t for t in add}
    half = next(n for n in full.graph.node if n.name == "/model/layers.0/half/MatMul_Q8")
    s16 = numpy_helper.to_array(new[half.input[2]])
    assert s16.dtype == np.float16 and len(half.input) == 3
    # on fp16's grid: the scales the own node's fp32 ones would be with half (fp16_grid), exactly
    q, s, _ = g.quantize_rtn(w, 32, 8, "symmetric", half=True)
    np.testing.assert_array_equal(s16.astype(np.float32), s.numpy())


def test_calibrated_build_of_the_tiny_decoder(tiny_lm, tmp_path):
    """The tiny Llama built with k_quant and with awq_gptq at block 32, and awq_gptq at block 128 (one block per
    128-wide row: an odd count, which ORT's own quantizer cannot pack): the calibrated builds are closer to float
    on held-out text, the graph holds the rewritten nodes, the record says what was done, and ORT GenAI loads and
    generates from it."""
    import onnx

    from edgekit.convert.llm import LLMBuildOptions, read_source, run_builder
    from edgekit.convert.llm_fidelity import FloatModel

    src = read_source(str(tiny_lm))
    fm = FloatModel(tiny_lm, threads=1)
    text = fm.text_windows(corpus_text(300, seed=7), "held-out", 512, 128)
    out = {}
    one8 = ("/model/layers.2/mlp/down_proj/MatMul",)
    for algo, block in (("k_quant", 32), ("awq_gptq", 32), ("awq_gptq", 128)):
        d = tmp_path / f"{algo}-{block}"
        # at block 128 one decoder MatMul INT8 too (symmetric, from the AWQ-scaled weight)
        opts = LLMBuildOptions("int4", block_size=block, algo=algo, int8_matmuls=one8 if block == 128 else ())
        log = run_builder(src, opts, d, tmp_path / "cache", {})
        out[(algo, block)] = _kl_of(d, fm, text)
        m = onnx.load(str(d / "model.onnx"), load_external_data=False)
        dec = [n for n in m.graph.node if n.op_type == "MatMulNBits" and "/layers." in n.name]
        assert len(dec) == 4 * 5
        if algo == "k_quant":
            assert not (d / g.RECORD).exists()
            continue
        assert "calibrated rounding" in log
        rec = json.loads((d / g.RECORD).read_text())
        assert rec["algo"] == algo and rec["block_size"] == block and rec["nodes"] == 20 and not rec["skipped"]
        assert rec["awq"]["groups"] == 4 * 3 and rec["calibration_tokens"] >= 1024
        assert {g._attr(n, "block_size") for n in dec if g._attr(n, "bits") == 4} == {block}
        # the 8-bit nodes (the lm_head; at 128 one down_proj) symmetric, no zero points: the down_proj at block 64,
        # the lm_head at 128 (its K, the hidden 128, allows it: LLMBuildOptions.int8_head_blocks)
        n8 = [n for n in m.graph.node if n.op_type == "MatMulNBits" and g._attr(n, "bits") == 8]
        assert [n.name.split("/")[1] for n in n8] == (["model", "lm_head"] if block == 128 else ["lm_head"])
        assert all(len(n.input) == 3 and g._attr(n, "block_size") == (128 if n.name.startswith("/lm_head/") else 64)
                   for n in n8)
        assert rec["int8"] == {"nodes": len(n8), "blocks": {"64": 1, "128": 1} if block == 128 else {"128": 1},
                               "kept": []}
        if block == 32:
            from edgekit.runtime.llm import load_llm

            lm = load_llm(d, threads=1, verify=False)
            assert lm.generate("the robot", max_new_tokens=8).strip()
    kq, cal, cal128 = out[("k_quant", 32)], out[("awq_gptq", 32)], out[("awq_gptq", 128)]
    # measured (13:25 UTC): KL k_quant 0.00043, awq_gptq 0.00016 at block 32, 0.00025 at block 128
    assert cal["kl_mean"] < 0.6 * kq["kl_mean"], (kq, cal)
    assert cal128["kl_mean"] < 1.2 * kq["kl_mean"], (kq, cal128)


def test_awq_folding_is_exact_in_float(tiny_lm):
    """The AWQ scales move between the norms / up_proj and the Linears after them without changing what the float
    model computes."""
    import torch

    from edgekit.convert.llm_fidelity import FloatModel

    fm = FloatModel(tiny_lm, threads=1)
    ids = fm.tokenizer(corpus_text(40, seed=3), add_special_tokens=False)["input_ids"][:96]
    w = np.asarray(ids, dtype=np.int64)
    before = fm.logits(w)
    rec = g.awq_model(fm.model, [w], 32, 4, "kquant", n_grid=5, vo=True)
    # 4 layers x (input_layernorm, v_proj under GQA, post_attention_layernorm, up_proj); none taken back
    assert len(rec) == 4 * 4 and {r["from"] for r in rec} == {"input_layernorm", "v_proj",
                                                             "post_attention_layernorm", "up_proj"}
    assert any(float((r["scales"] - 1).abs().max()) > 1e-3 for r in rec)
    after = fm.logits(w)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    # a Linear whose graph node is not rewritten (e.g. a low-rank pair) is in no group
    rec = g.awq_model(fm.model, [w], 32, 4, "kquant", n_grid=3, skip={"model.layers.0.mlp.down_proj"})
    assert not [r for r in rec if r["layer"] == 0 and r["from"] == "up_proj"] and len(rec) == 4 * 3 - 1
    np.testing.assert_allclose(fm.logits(w), before, rtol=1e-4, atol=1e-4)
    del torch


def test_tied_lm_head_reblocked(tied_lm, tmp_path):
    """A tied model's INT8 lm_head re-rounded at block 64 (head_block): the embedding's GatherBlockQuantized reads
    the new table (block_size 64, aliased to the lm_head's bytes by llm_graph after the rewrite), the build is
    smaller than the builder's block-32 head, and ORT GenAI generates from it."""
    import onnx

    from edgekit.convert.llm import LLMBuildOptions, read_source, run_builder, weight_bytes
    from edgekit.convert.llm_fidelity import FloatModel
    from edgekit.runtime.llm import load_llm

    src = read_source(str(tied_lm))
    fm = FloatModel(tied_lm, threads=1)
    text = fm.text_windows(corpus_text(200, seed=11), "held-out", 384, 128)
    figs, sizes, decoder = {}, {}, {}
    for hb in (0, 64):
        out = tmp_path / f"b{hb}"
        # head_block names the lm_head's rounding (k-quant), over the symmetric 8-bit default; without it, the
        # builder's (int8_symmetric off)
        run_builder(src, LLMBuildOptions("int4", algo="awq", head_block=hb, int8_symmetric=bool(hb)), out,
                    tmp_path / "cache", {})
        figs[hb], sizes[hb] = _kl_of(out, fm, text), weight_bytes(out)["weights"]
        m = onnx.load(str(out / "model.onnx"), load_external_data=False)
        gbq = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")
        head = next(n for n in m.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
        blocks = {[a.i for a in n.attribute if a.name == "block_size"][0] for n in (gbq, head)}
        assert blocks == {hb or 32}
        assert not any(n.op_type == "Reshape" and "embed_tokens" in n.name for n in m.graph.node)   # aliased
        rec = json.loads((out / g.RECORD).read_text())
        # the second build (a ladder's next rung) reuses the calibration text and AWQ scales of the first
        assert rec["awq_cached"] is bool(hb)
        qkv = next(t for t in onnx.load(str(out / "model.onnx")).graph.initializer
                   if t.name.startswith("model.layers.1.attn.qkv_proj") and "_Q4G" in t.name)
        decoder[hb] = qkv.raw_data
        if hb:
            assert decoder[hb] == decoder[0]
            assert rec["lm_head"]["block_size"] == 64 and rec["lm_head"]["readers"]
            lm = load_llm(out, threads=1, verify=False)
            assert lm.generate("the robot", max_new_tokens=8).strip()
    # vocab x hidden; per row K/32 - K/64 fewer blocks, each a 2-byte scale (fp16 in the file) and a 1-byte zero point
    v, k = 512, 128
    assert sizes[0] - sizes[64] == v * (k // 32 - k // 64) * 3
    assert figs[64]["kl_mean"] < figs[0]["kl_mean"] * 1.5 + 1e-4, figs


def test_convert_with_a_calibrated_algo(tiny_lm, tmp_path):
    """LLMRecipe(algo="awq") through the whole converter: the bundle's recipe and manifest say how it was
    rounded, and its own graph reproduces its golden top-1 (the rewritten nodes are what shipped)."""
    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.convert.llm_fidelity import OnnxDecoder

    val = tmp_path / "val.txt"
    val.write_text(corpus_text(300, seed=5))
    res = convert_llm(LLMRecipe(str(tiny_lm), ("x86-avx2",), precision="int4", val=str(val), algo="awq"),
                      str(tmp_path / "out"))
    (b,) = res.bundles
    assert b.ok
    m = json.loads((b.path / "manifest.json").read_text())
    assert m["recipe"]["algo"] == "awq" and m["calibration"]["algo"] == "awq"
    assert m["calibration"]["nodes"] == 20 and m["calibration"]["awq"]["groups"] == 12
    assert g.RECORD in m["model"]["files"]
    gold = json.loads((b.path / "golden.json").read_text())
    dec = OnnxDecoder(b.path / "model", 2, 32, threads=1)
    assert dec.logits(np.array(gold["prompts"][0], dtype=np.int64)).argmax(-1).tolist() == gold["top1"][0]


def _scale_arrays(model_dir: Path) -> dict:
    """Each MatMulNBits / GatherBlockQuantized node's scales as the file holds them (an fp16 initializer behind
    half_scales' Cast followed back to it), by node name."""
    import onnx
    from onnx import numpy_helper

    from edgekit.convert.llm_graph import node_constants

    m = onnx.load(str(model_dir / "model.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            casts, _ = node_constants(m.graph, n)
            src = next((c.input[0] for c in casts if c.output[0] == n.input[2]), n.input[2])
            out[n.name] = numpy_helper.to_array(inits[src])
    return out


def test_calibrated_cuda_build_keeps_the_graphs_fp16(tiny_lm, tmp_path):
    """A CUDA target's calibrated INT4 build: the model builder writes its graph in fp16 (activations, norms,
    MatMulNBits scales), and llm_gptq's rewrite writes each tensor in the type of the one it replaces
    (llm_graph.constant_dtypes). Was: fp32 scales and norms in the fp16 graph, which ONNX Runtime refused ('Type
    parameter (T1) of MatMulNBits bound to different types (tensor(float16) and tensor(float))'), and AWQ's norm
    groups dropped (the fp16 norms differ from the float model's by more than the check's 1e-5). Checked on the
    CPU provider, as the converter measures CUDA builds (ORT 1.32: MatMulNBits, (Skip)SimplifiedLayerNormalization
    and GroupQueryAttention run fp16 CPU kernels; Sigmoid and Mul, the SwiGLU, have none and ORT computes them in
    fp32 between Casts it inserts at load, which a GPU does not): it loads, its scales and norms are fp16, AWQ
    finds the CPU build's 12 groups and writes the CPU build's fp16 scales bit for bit, and its logits are the CPU
    build's within fp16 arithmetic; the converter's jetson-orin row at INT4 with awq is written, its fidelity
    measured."""
    import onnx

    from edgekit.convert.llm import LLMBuildOptions, LLMRecipe, convert_llm, read_source, run_builder
    from edgekit.convert.llm_fidelity import FloatModel, OnnxDecoder
    from edgekit.convert.llm_graph import scales_summary

    src = read_source(str(tiny_lm))
    fm = FloatModel(tiny_lm, threads=1)
    text = fm.text_windows(corpus_text(300, seed=7), "held-out", 512, 128)
    for algo in ("awq", "gptq"):
        logits, scales = {}, {}
        for ep in ("cpu", "cuda"):
            d = tmp_path / f"{algo}-{ep}"
            # the same build but for the provider: the jetson profiles' accuracy level 0 (dequantized weights, no
            # int8 activations) and the builder's 8-bit lm_head in both (a CPU build's default rewrites it
            # symmetric at block 64: another rounding, not what this compares)
            run_builder(src, LLMBuildOptions("int4", execution_provider=ep, accuracy_level=0, algo=algo,
                                             int8_symmetric=False), d, tmp_path / "cache", {})
            rec = json.loads((d / g.RECORD).read_text())
            assert rec["nodes"] == 20 and not rec["skipped"]
            if algo == "awq":
                assert rec["awq"]["groups"] == 12, (ep, rec["awq"])
            logits[ep] = np.concatenate([OnnxDecoder(d, 2, 32, threads=1).logits(w) for w in text.windows])
            scales[ep] = _scale_arrays(d)
        m = onnx.load(str(tmp_path / f"{algo}-cuda" / "model.onnx"), load_external_data=False)
        norms = [t for t in m.graph.initializer if "layernorm" in t.name]
        assert norms and {t.data_type for t in norms} == {onnx.TensorProto.FLOAT16}
        assert scales_summary(tmp_path / f"{algo}-cuda")["fp32"] == 0
        assert {a.dtype for a in scales["cuda"].values()} == {np.dtype(np.float16)}
        # the 4-bit decoder nodes: the numbers the CPU build stores fp16 in its file (half_scales), in the node
        dec = [n for n in scales["cuda"] if n.startswith("/model/layers.")]
        assert len(dec) == 20
        for n in dec:
            np.testing.assert_array_equal(scales["cuda"][n], scales["cpu"][n], err_msg=n)
        # the CUDA graph computes in fp16 (activations, norms, residual stream, logits: at |logit| in [8, 16)
        # fp16's step is 0.0078) where the CPU build computes in fp32. Measured (tiny Llama, 4 windows): max
        # |diff| 0.0126 (awq) / 0.0145 (gptq), mean 0.0013, top-1 agreement 0.998 / 0.990; the rounding itself
        # moves a logit from float by up to 0.41 / 0.32. Bound: 0.05 (~6 fp16 steps at the largest logits)
        diff = np.abs(logits["cuda"] - logits["cpu"])
        assert diff.max() < 0.05 and diff.mean() < 0.005, (algo, diff.max(), diff.mean())
        assert (logits["cuda"].argmax(-1) == logits["cpu"].argmax(-1)).mean() >= 0.97
    # through the converter: the row's build measured, not an error
    val = tmp_path / "val.txt"
    val.write_text(corpus_text(300, seed=5))
    res = convert_llm(LLMRecipe(str(tiny_lm), ("jetson-orin",), precision="int4", val=str(val), algo="awq",
                                compat_check="off"), str(tmp_path / "out"))
    (b,) = res.bundles
    assert b.ok, b.reason
    assert not [st for st in b.rescue if st.get("error")], b.rescue
    man = json.loads((b.path / "manifest.json").read_text())
    assert man["recipe"]["execution_provider"] == "cuda" and man["calibration"]["awq"]["groups"] == 12
    assert man["llm"]["scales"]["fp32"] == 0 and man["llm"]["scales"]["fp16"] > 0
    assert man["fidelity"]["kl_mean"] < 0.01
