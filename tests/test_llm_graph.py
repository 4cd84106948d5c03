"""edgekit.convert.llm_graph: the tied embedding's GatherBlockQuantized reads the lm_head's bytes of model.onnx.data
through its own initializer instead of a Reshape ONNX Runtime folds into a private copy at load. The rewrite
changes model.onnx only, computes the same logits bit for bit, is a no-op the second time and where the pattern is
absent; the converter applies it and records it in the manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

import onnxruntime_genai  # noqa: F401  (edgekit[llm-convert], in dev: missing must fail, not skip)

from tinylm import corpus_text, tied_lm, tiny_lm  # noqa: F401  (session fixtures)

from edgekit.convert import llm as llm_mod
from edgekit.convert.llm_graph import NOTE, alias_tied_embedding, embedding_summary, initializer_bytes


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _gbq_inputs(model_dir: Path):
    import onnx

    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    producer = {o: n for n in m.graph.node for o in n.output}
    g = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")
    return m, g, producer.get(g.input[0])


def _logits(model_dir: Path, prompts):
    from edgekit.convert.llm_fidelity import OnnxDecoder
    from edgekit.runtime.llm import load_llm

    lm = load_llm(model_dir, threads=1, verify=False)
    og = [lm.logits(lm.encode(p)) for p in prompts]
    text = lm.generate(prompts[0], max_new_tokens=12)
    del lm
    dec = OnnxDecoder(model_dir, 2, 32, threads=1)
    ort = [dec.logits(np.asarray(ids, dtype=np.int64)) for ids in ([5, 17, 40, 99, 300, 7, 8], list(range(3, 60)))]
    return og, ort, text


def test_alias_tied_embedding_on_a_tied_build(tied_lm, tmp_path, monkeypatch):
    from edgekit.convert.llm import LLMBuildOptions, read_source, run_builder, weight_bytes

    # the builder's own graph, as run_builder would leave it without the rewrite
    monkeypatch.setattr(llm_mod, "alias_tied_embedding", lambda d: {"aliased": []})
    d = tmp_path / "b"
    run_builder(read_source(str(tied_lm)), LLMBuildOptions("int4"), d, tmp_path / "cache", {})
    m, g, reshape = _gbq_inputs(d)
    assert reshape is not None and reshape.op_type == "Reshape"          # the pattern ORT folds into a copy
    head = next(n for n in m.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    assert reshape.input[0] == head.input[1]
    before = embedding_summary(d)
    assert before["load_copy_bytes"] > 0 and before["shares"] == head.input[1]
    data_sha, wb = _sha(d / "model.onnx.data"), weight_bytes(d)
    prompts = ["the robot moves the red box", "Count: one two three", corpus_text(3, seed=5)]
    og0, ort0, text0 = _logits(d, prompts)

    r = alias_tied_embedding(d)
    assert [a["of"] for a in r["aliased"]] == [head.input[1]] and r["note"] == NOTE and r["bytes"] > 0
    assert _sha(d / "model.onnx.data") == data_sha                       # the data file is not touched
    m, g, prod = _gbq_inputs(d)
    assert prod is None and not any(n.op_type == "Reshape" and n.input[0] == head.input[1] for n in m.graph.node)
    inits = {t.name: t for t in m.graph.initializer}
    ext = lambda t: {e.key: e.value for e in t.external_data}             # noqa: E731
    alias, orig = inits[g.input[0]], inits[head.input[1]]
    assert ext(alias) == ext(orig) and alias.data_type == orig.data_type
    assert list(alias.dims) == [int(v) for v in r["aliased"][0]["dims"]] and len(alias.dims) == 2
    assert initializer_bytes(m)[alias.name] == 0 and weight_bytes(d) == wb   # one weight, counted once
    after = embedding_summary(d)
    assert after["load_copy_bytes"] == 0 and after["shares"] == head.input[1] and after["note"] == NOTE

    og1, ort1, text1 = _logits(d, prompts)
    for a, b in zip(og0 + ort0, og1 + ort1):
        assert a.shape == b.shape and np.array_equal(a, b)                # bit-identical, both engines
    assert text1 == text0 and text1.strip()

    graph = (d / "model.onnx").read_bytes()
    again = alias_tied_embedding(d)                                       # a second call: nothing to do
    assert again["aliased"] == [] and again["note"] is None and (d / "model.onnx").read_bytes() == graph


def test_absent_or_inline_pattern_is_left_alone(tmp_path):
    """No Reshape -> GatherBlockQuantized: model.onnx untouched; a table held inside model.onnx is skipped with
    its reason (aliasing inline bytes would copy them)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(4 * 2 * 4, dtype=np.uint8).reshape(4, 2, 4), "head_w")
    shape = numpy_helper.from_array(np.array([4, 8], dtype=np.int64), "shape")
    scales = numpy_helper.from_array(np.ones((4, 2), dtype=np.float32), "scales")
    nodes = [helper.make_node("Reshape", ["head_w", "shape"], ["table"], name="/model/embed_tokens/Reshape"),
             helper.make_node("GatherBlockQuantized", ["table", "ids", "scales"], ["emb"], domain="com.microsoft",
                              name="/model/embed_tokens/GatherBlockQuantized", bits=8, block_size=4, gather_axis=0,
                              quantize_axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 2])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 2, 8])],
                              [w, shape, scales])
    d = tmp_path / "inline"
    d.mkdir()
    onnx.save(helper.make_model(graph), str(d / "model.onnx"))
    raw = (d / "model.onnx").read_bytes()
    r = alias_tied_embedding(d)
    assert r["aliased"] == [] and "held inside model.onnx" in r["skipped"][0]
    assert (d / "model.onnx").read_bytes() == raw
    summ = embedding_summary(d)                                           # the copy ORT makes, named
    assert summ["table"] == "Reshape(head_w)" and summ["load_copy_bytes"] == 32


def test_convert_records_the_alias(tied_lm, tmp_path):
    """The converter ships the rewritten graph of a tied INT4 model (fidelity and golden measured on it) and the
    manifest records it."""
    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.runtime.llm import load_llm

    val = tmp_path / "val.txt"
    val.write_text(corpus_text(80, seed=11))
    res = convert_llm(LLMRecipe(str(tied_lm), ("x86-avx2",), precision="int4", name="tied", val=str(val),
                                val_tokens=256), str(tmp_path / "out"))
    row = res.bundles[0]
    assert row.ok, row.reason
    man = json.loads((row.path / "manifest.json").read_text())
    emb = man["llm"]["embedding"]
    assert emb["note"] == NOTE and emb["load_copy_bytes"] == 0 and emb["op"] == "GatherBlockQuantized"
    _, _, prod = _gbq_inputs(row.path / "model")
    assert prod is None
    assert man["model"]["tied_embeddings"] and man["llm"]["bytes_per_token"] < man["model"]["bytes"]
    lm = load_llm(row.path)                                               # sha256 of every file checked
    assert lm.check()["ok"]


def test_prune_lm_head_keeps_every_answer(tiny_lm, tmp_path):
    """The lm_head on the last position only (llm_graph.prune_lm_head): the last position's logits are the same
    (ONNX Runtime; to MLAS's summation order: the tiny model's hidden 128 puts its 8-bit lm_head at block 128,
    LLMBuildOptions.int8_head_blocks) and ORT GenAI's tokens the same; the converter's OnnxDecoder teacher-forces a
    pruned bundle through its graph with the pruning taken out (bit-identical, the same external data), the runtime
    one token at a time (agreeing with the one-pass logits), and the batched server's prefill of prompts of different lengths
    returns each prompt's own logits."""
    import shutil

    import onnxruntime as ort

    from edgekit.convert.llm import LLMBuildOptions, read_source, run_builder
    from edgekit.convert.llm_fidelity import OnnxDecoder
    from edgekit.convert.llm_graph import lm_head_pruned, prune_lm_head
    from edgekit.runtime.llm import load_llm
    from edgekit.runtime.llm_batch import BatchedDecoder

    base, pruned = tmp_path / "base", tmp_path / "pruned"
    run_builder(read_source(str(tiny_lm)), LLMBuildOptions("int4"), base, tmp_path / "cache", {})
    assert not lm_head_pruned(base)
    shutil.copytree(base, pruned)
    data_sha = _sha(pruned / "model.onnx.data")
    r = prune_lm_head(pruned)
    assert r["pruned"] and "lm_head" in r["node"] and "why" not in r
    assert lm_head_pruned(pruned) and _sha(pruned / "model.onnx.data") == data_sha   # model.onnx only
    graph = (pruned / "model.onnx").read_bytes()
    again = prune_lm_head(pruned)
    assert again["pruned"] and "already pruned" in again["why"] and (pruned / "model.onnx").read_bytes() == graph

    window = np.asarray([5, 17, 40, 99, 300, 7, 8] + list(range(3, 40)), dtype=np.int64)
    dec = OnnxDecoder(base, 2, 32, threads=1)
    full = dec.logits(window)
    viewed = OnnxDecoder(pruned, 2, 32, threads=1)
    assert viewed.unpruned and not dec.unpruned and np.array_equal(viewed.logits(window), full)
    del viewed
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(pruned / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feed = {"input_ids": window[None], "attention_mask": np.ones((1, len(window)), dtype=np.int64)}
    if dec.has_positions:
        feed["position_ids"] = np.arange(len(window), dtype=np.int64)[None]
    for name, heads, dim, dt in dec.past:
        feed[name] = np.zeros((1, heads, 0, dim), dt)
    last = sess.run(["logits"], feed)[0]
    assert last.shape == (1, 1, full.shape[-1])
    np.testing.assert_allclose(last[0, 0], full[-1], rtol=0, atol=2e-5)   # M = 1 sums a 128-block in another order
    assert not np.array_equal(last[0, 0], full[-2])
    del sess, dec

    prompts = ["the robot moves the red box", "Count: one two three", corpus_text(3, seed=5)]
    outs = []
    for d in (base, pruned):
        lm = load_llm(d, threads=1, verify=False)
        outs.append(([lm.generate(p, max_new_tokens=12) for p in prompts],
                     [lm.logits(lm.encode(p)) for p in prompts]))
        del lm
    assert outs[0][0] == outs[1][0] and all(t.strip() for t in outs[1][0])   # the same tokens
    for a, b in zip(outs[0][1], outs[1][1]):          # one pass (unpruned) vs one token at a time (pruned)
        assert a.shape == b.shape and a[-1].argmax() == b[-1].argmax()
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
        assert np.abs(a - b).max() < 1e-2 * max(1.0, float(np.abs(a).max()))

    cfg = json.loads((base / "genai_config.json").read_text())
    batch = [[5, 17, 40], [9, 8, 7, 6, 5, 4], [11, 12, 13]]
    rows = []
    for d in (base, pruned):
        bd = BatchedDecoder(d, cfg, threads=1, slots=3, capacity=64)
        assert bd.last_logits_only == (d == pruned)
        rows.append(bd.prefill(0, batch))
        rows.append([bd.prefill(0, [p])[0] for p in batch])          # each alone
        del bd
    for got in rows[1:]:
        for a, b in zip(rows[0], got):
            assert a.shape == b.shape and np.allclose(a, b, atol=1e-4)


def _scale_inits(model_dir: Path):
    """{scale initializer name: (offset, length, dtype)} of the MatMulNBits / GatherBlockQuantized scales, following
    a Cast to what the file holds."""
    import onnx

    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    cast = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Cast"}
    out = {}
    for n in m.graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            t = inits[cast.get(n.input[2], n.input[2])]
            e = {x.key: x.value for x in t.external_data}
            out[t.name] = (int(e.get("offset", 0)), int(e["length"]), t.data_type)
    return m, out


def test_half_scales_on_a_tied_build(tied_lm, tmp_path):
    """The scales stored fp16 behind a Cast (llm_graph.half_scales): the file loses half of their bytes, both
    engines compute bit for bit what the same build with the scales rounded to fp16 but stored fp32 computes (the
    Cast is folded before the kernels see the scales), the tied embedding still reads the lm_head's bytes, the
    logits stay within the fp16 rounding of the fp32 build's, and a second call does nothing."""
    import shutil

    from onnx import TensorProto

    from edgekit.convert.llm import LLMBuildOptions, read_source, run_builder, weight_bytes
    from edgekit.convert.llm_graph import HALF_NOTE, half_scales, scales_summary

    d = tmp_path / "fp32"
    run_builder(read_source(str(tied_lm)), LLMBuildOptions("int4", half_scales=False), d, tmp_path / "cache", {})
    _, sc = _scale_inits(d)
    assert sc and all(dt == TensorProto.FLOAT for _, _, dt in sc.values())
    assert scales_summary(d)["fp16_cast"] == 0 and scales_summary(d)["fp32"] == len(sc)
    # the reference: the same files with every scale rounded to fp16 but written back as fp32, in place
    ref = tmp_path / "rounded"
    shutil.copytree(d, ref)
    with open(ref / "model.onnx.data", "r+b") as f:
        for off, n, _ in sc.values():
            f.seek(off)
            a = np.frombuffer(f.read(n), dtype="<f4")
            f.seek(off)
            f.write(a.astype(np.float16).astype("<f4").tobytes())
    half = tmp_path / "fp16"
    shutil.copytree(d, half)
    size0 = (half / "model.onnx.data").stat().st_size
    r = half_scales(half)
    assert r["initializers"] == len(sc) and r["kept"] == [] and r["note"] == HALF_NOTE
    assert r["saved_bytes"] == sum(n for _, n, _ in sc.values()) // 2
    assert size0 - (half / "model.onnx.data").stat().st_size >= r["saved_bytes"] - 64 * len(sc)
    m, sc16 = _scale_inits(half)
    assert len(sc16) == len(sc) and all(dt == TensorProto.FLOAT16 for _, _, dt in sc16.values())
    assert sorted(n.output[0] for n in m.graph.node if n.op_type == "Cast" and n.output[0] in sc) == sorted(sc)
    summ = scales_summary(half)
    assert summ["fp16_cast"] == len(sc) and summ["fp32"] == 0 and summ["note"] == HALF_NOTE
    assert weight_bytes(half)["weights"] == weight_bytes(d)["weights"] - r["saved_bytes"]
    # a token reads the fp32 scales ORT folds the Casts into: the same bytes as with the scales stored fp32
    assert weight_bytes(half)["per_token"] == weight_bytes(d)["per_token"]
    emb = embedding_summary(half)                                         # the alias survives the new data file
    assert emb["note"] == NOTE and emb["load_copy_bytes"] == 0

    prompts = ["the robot moves the red box", "Count: one two three", corpus_text(3, seed=5)]
    og_ref, ort_ref, text_ref = _logits(ref, prompts)
    og16, ort16, text16 = _logits(half, prompts)
    for a, b in zip(og_ref + ort_ref, og16 + ort16):
        assert a.shape == b.shape and np.array_equal(a, b)                # the folded Cast: the same kernels' input
    assert text16 == text_ref and text16.strip()
    og32, ort32, _ = _logits(d, prompts)
    for a, b in zip(og32 + ort32, og16 + ort16):                          # and close to the fp32 scales' logits
        assert np.abs(a - b).max() < 0.05 * max(1.0, float(np.abs(a).max()))

    graph, data = (half / "model.onnx").read_bytes(), _sha(half / "model.onnx.data")
    again = half_scales(half)
    assert again["initializers"] == 0 and again["note"] is None
    assert (half / "model.onnx").read_bytes() == graph and _sha(half / "model.onnx.data") == data


def test_bytes_per_token_reads_fp16_scales_as_fp32(tiny_lm, tmp_path):
    """An untied build with its scales stored fp16 behind Casts (a --max-mb build, LLMBuildOptions.fp16_scales):
    the file holds 2 bytes a scale, but ONNX Runtime folds each Cast into an fp32 initializer and the kernels read
    that, so the bytes read per token count 4 (llm_graph.read_bytes), as for the same build with its scales stored
    fp32; the embedding table's own scales (one row read per token) stay out of it either way."""
    import shutil

    import onnx

    from edgekit.convert.llm import LLMBuildOptions, read_source, run_builder, weight_bytes
    from edgekit.convert.llm_graph import half_scales, read_bytes, stored_bytes

    d = tmp_path / "fp32"
    run_builder(read_source(str(tiny_lm)), LLMBuildOptions("int4", half_scales=False), d, tmp_path / "cache", {})
    half = tmp_path / "fp16"
    shutil.copytree(d, half)
    r = half_scales(half)
    assert r["initializers"] > 0 and r["saved_bytes"] > 0
    m = onnx.load(str(half / "model.onnx"), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    casts = [n for n in m.graph.node if n.op_type == "Cast" and n.input[0] in inits]   # half_scales' own
    assert len(casts) == r["initializers"]
    gbq = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")   # the untied table, 8-bit
    assert gbq.input[2] in {c.output[0] for c in casts}                          # its scales through a Cast too
    stored, read = stored_bytes(m), read_bytes(m)
    for c in casts:
        assert read[c.output[0]] == 2 * stored[c.output[0]] > 0 and read[c.input[0]] == 0
    fp32, fp16 = weight_bytes(d), weight_bytes(half)
    assert fp16["weights"] == fp32["weights"] - r["saved_bytes"]                 # the file: the stored bytes
    assert fp16["per_token"] == fp32["per_token"]                                # a token: the fp32 scales
    assert fp16["per_token"] < fp16["weights"]                                   # the table's row, not the table


def test_half_scales_keeps_what_fp16_cannot_hold(tmp_path):
    """A scale below fp16's normal range keeps its node's initializer fp32 (named, with why); the other node's
    scales go fp16 and the graph computes the same as with them rounded in fp32."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.convert.llm_graph import half_scales

    rng = np.random.default_rng(3)
    K, N, block = 64, 16, 32
    arrays = {}
    for i, lo in enumerate((1e-3, 1e-6)):
        arrays[f"w{i}"] = rng.integers(0, 256, (N, K // block, block // 2), dtype=np.uint8)
        arrays[f"s{i}"] = (rng.random((N, K // block)) * lo + lo).astype(np.float32)

    def model(arrs):
        nodes = [helper.make_node("MatMulNBits", ["x", f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                  K=K, N=N, bits=4, block_size=block, accuracy_level=0) for i in range(2)]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                                  [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, N]) for i in range(2)],
                                  [numpy_helper.from_array(a, n) for n, a in arrs.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                       helper.make_opsetid("com.microsoft", 1)])

    d = tmp_path / "m"
    d.mkdir()
    onnx.save(model(arrays), str(d / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    r = half_scales(d)
    assert r["initializers"] == 1 and r["kept"] == [("s1", "a scale outside fp16's normal range")]
    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    types = {t.name: t.data_type for t in m.graph.initializer}
    assert types["s0_fp16"] == TensorProto.FLOAT16 and types["s1"] == TensorProto.FLOAT
    x = rng.standard_normal((1, K)).astype(np.float32)
    got = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    rounded = dict(arrays, s0=arrays["s0"].astype(np.float16).astype(np.float32))
    want = ort.InferenceSession(model(rounded).SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


def test_half_scales_leaves_what_it_cannot_own(tmp_path):
    """Only initializers that are nothing but scales: one also listed as a graph input, one whose external bytes a
    non-scale initializer also names, stay fp32; two scale initializers naming the same bytes are halved once and
    still share them; exactly representable subnormal scales (fp16_grid's) go fp16. The graph computes as before
    with the halved values."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.convert.llm_gptq import fp16_grid
    from edgekit.convert.llm_graph import half_scales

    rng = np.random.default_rng(4)
    K, N, block = 64, 8, 32
    tiny = fp16_grid(torch.tensor([[1e-9, 3e-7], [5e-6, 2e-5]] * (N // 2))).numpy()
    scales = {"s_in": 0.01 + rng.random((N, 2)).astype(np.float32) * 0.01,
              "s_shared": np.full((N, 2), 0.02, np.float32), "s_tiny": tiny, "s_a": np.full((N, 2), 0.03125, np.float32)}
    nodes, inits = [], []
    for i, sname in enumerate(["s_in", "s_shared", "s_tiny", "s_a", "s_b"]):
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (N, 2, block // 2), dtype=np.uint8), f"w{i}"))
        nodes.append(helper.make_node("MatMulNBits", ["x", f"w{i}", sname], [f"y{i}"], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=block, accuracy_level=0))
    inits += [numpy_helper.from_array(v, k) for k, v in scales.items() if k != "s_in"]
    inits.append(numpy_helper.from_array(scales["s_a"], "s_b"))
    inits.append(numpy_helper.from_array(np.full((N, 2), 0.02, np.float32), "other"))   # not a scale
    nodes.append(helper.make_node("Add", ["other", "other"], ["z"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K]),
                                           helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [N, 2])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, N]) for i in range(5)]
                              + [helper.make_tensor_value_info("z", TensorProto.FLOAT, [N, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    d = tmp_path / "m"
    d.mkdir()
    onnx.save(model, str(d / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    # make s_shared name other's bytes and s_b name s_a's (what alias_tied_embedding does for a tied table)
    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    by = {t.name: t for t in m.graph.initializer}
    for a, b in (("s_shared", "other"), ("s_b", "s_a")):
        del by[a].external_data[:]
        by[a].external_data.extend(by[b].external_data)
    onnx.save(m, str(d / "model.onnx"))
    x = rng.standard_normal((1, K)).astype(np.float32)
    feeds = {"x": x, "s_in": scales["s_in"]}
    before = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)

    r = half_scales(d)
    assert sorted(r["kept"]) == [("s_shared", "its bytes are also another initializer's")], r
    assert r["initializers"] == 3 and r["saved_bytes"] == 2 * (N * 2 * 2)   # s_tiny and s_a (s_b shares s_a's)
    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    types = {t.name: t.data_type for t in m.graph.initializer}
    assert types["s_tiny_fp16"] == types["s_a_fp16"] == types["s_b_fp16"] == TensorProto.FLOAT16
    assert types["s_shared"] == types["other"] == TensorProto.FLOAT and "s_in" not in types
    loc = {t.name: {e.key: e.value for e in t.external_data} for t in m.graph.initializer}
    assert loc["s_a_fp16"] == loc["s_b_fp16"] and loc["s_shared"] == loc["other"]
    after = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(before, after):                                       # all these scales were on fp16's grid
        assert np.array_equal(a, b)


def test_fp16_grid():
    """Scales on fp16's grid: the nearest fp16 value in its normal range, the next one up below it (never a finer
    step than asked), a value beyond fp16 left as it is; each exactly representable in fp16."""
    import torch

    from edgekit.convert.llm_gptq import fp16_grid, quantize_rtn

    s = torch.tensor([0.0123456, 1e-4, 6.0e-5, 3e-7, 1e-12, 7e4])
    g = fp16_grid(s).numpy()
    assert np.all(g[:5].astype(np.float16).astype(np.float32) == g[:5]) and g[5] == np.float32(7e4)
    assert abs(g[0] / 0.0123456 - 1) <= 2 ** -11 and abs(g[1] / 1e-4 - 1) <= 2 ** -11
    assert np.all(g[2:5] >= s[2:5].numpy()) and g[4] == np.float32(np.float16(2 ** -24))
    w = torch.randn(6, 64) * torch.tensor([1.0, 1e-2, 1e-4, 1e-6, 1e-9, 0.0])[:, None]
    q, sc, _ = quantize_rtn(w, 32, 8, "symmetric", half=True)
    assert q.min() >= 1 and q.max() <= 255                                   # never past +-127 around 128
    assert torch.all(sc.half().float() == sc)
    deq = (q.reshape(6, 2, 32) - 128) * sc[..., None]
    assert torch.all((deq.reshape(6, 64) - w).abs() <= 0.5 * sc.repeat_interleave(32, 1) * (1 + 1e-3))


def _two_nodes(d: Path, seed: int):
    """A folder holding a two-MatMulNBits graph with its scales (not on fp16's grid) and weights in
    model.onnx.data; returns (its input, the outputs ONNX Runtime computes from it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    K, N, block = 256, 64, 32   # every initializer over save_with_data's 1024 B held inline
    inits, nodes = [], []
    for i in range(2):
        inits += [numpy_helper.from_array(rng.integers(0, 256, (N, K // block, block // 2), dtype=np.uint8), f"w{i}"),
                  numpy_helper.from_array((rng.random((N, K // block)) * 1e-2 + 1e-2).astype(np.float32), f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=block, accuracy_level=0))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, N]) for i in range(2)],
                              inits)
    d.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]),
              str(d / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    x = rng.standard_normal((1, K)).astype(np.float32)
    return x, _run(d, x)


def _run(d: Path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _reweigh(d: Path) -> None:
    """save_with_data's rewrite: every weight byte inverted (other outputs), all tensors written anew."""
    import onnx
    from onnx import numpy_helper

    from edgekit.convert.llm_graph import save_with_data

    m = onnx.load(str(d / "model.onnx"))
    for t in m.graph.initializer:
        if t.name.startswith("w"):
            t.CopyFrom(numpy_helper.from_array(255 - numpy_helper.to_array(t), t.name))
    save_with_data(m, d)


def test_model_and_data_replaced_as_one(tmp_path, monkeypatch):
    """half_scales and save_with_data replace model.onnx and model.onnx.data so that a reader of the folder always
    finds a pair that matches: stopped at any of their renames (os.replace raising there, as a crash would stop
    them), the folder loads in ONNX Runtime and computes the old outputs (stopped at the first: the graph's rename
    is the switch) or the new ones, holding nothing but the pair and the new data file the graph names; a whole
    run leaves only model.onnx and model.onnx.data, and the next rewrite of a folder a stopped one left removes
    that file."""
    import os

    import onnx

    from edgekit.convert.llm_graph import half_scales

    real_replace = os.replace
    for rewrite in (half_scales, _reweigh):
        x, old = _two_nodes(tmp_path / f"{rewrite.__name__}-ref", 5)
        rewrite(tmp_path / f"{rewrite.__name__}-ref")
        new = _run(tmp_path / f"{rewrite.__name__}-ref", x)
        assert sorted(p.name for p in (tmp_path / f"{rewrite.__name__}-ref").iterdir()) == ["model.onnx",
                                                                                          "model.onnx.data"]
        assert not all(np.array_equal(a, b) for a, b in zip(old, new))
        for stop in (1, 2, 3):
            d = tmp_path / f"{rewrite.__name__}-{stop}"
            _two_nodes(d, 5)
            calls = []

            def replace(src, dst, stop=stop, calls=calls):
                calls.append(dst)
                if len(calls) == stop:
                    raise OSError(f"stopped at rename {stop}")
                return real_replace(src, dst)

            monkeypatch.setattr(os, "replace", replace)
            try:
                rewrite(d)
                raise AssertionError("not stopped")
            except OSError as e:
                assert f"stopped at rename {stop}" in str(e)
            finally:
                monkeypatch.setattr(os, "replace", real_replace)
            got = _run(d, x)
            for a, b in zip(got, old if stop == 1 else new):
                assert np.array_equal(a, b), (rewrite.__name__, stop)
            named = {e.value for t in onnx.load(str(d / "model.onnx"), load_external_data=False).graph.initializer
                     for e in t.external_data if e.key == "location"}
            assert len(named) == 1 and {p.name for p in d.iterdir()} == {"model.onnx", "model.onnx.data"} | named
            if stop > 1:   # a later rewrite finishes in the usual pair, the stopped one's file removed
                _reweigh(d)
                assert sorted(p.name for p in d.iterdir()) == ["model.onnx", "model.onnx.data"]


def _rope_graph(d: Path, P: int = 4096, half: int = 8, heads: int = 2):
    """A folder whose graph reads two RoPE cos / sin pairs as the model builder writes them: one pair of
    initializers in model.onnx.data (RotaryEmbedding, com.microsoft), one chosen by an If between two pairs of
    Constants held in model.onnx (Phi-3 LongRoPE's layout: P rows, or 64), each [rows, half]; beside them a weight
    in the data file and a third cache a Shape also reads (neither cut). Returns the inputs' feed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)

    def pair(rows, scale):
        f = np.outer(np.arange(rows), 1.0 / scale ** (np.arange(half) / half))
        return np.cos(f).astype(np.float32), np.sin(f).astype(np.float32)

    cos_a, sin_a = pair(P, 1e4)
    cos_c, sin_c = pair(P, 5e3)
    w = rng.standard_normal((heads * 2 * half,)).astype(np.float32)
    consts = lambda tag, rows, scale: [helper.make_node(   # noqa: E731
        "Constant", [], [f"{k}_{tag}"], value=numpy_helper.from_array(a, f"{k}_{tag}"))
        for k, a in zip(("cos", "sin"), pair(rows, scale))]
    out = lambda n, rows: helper.make_tensor_value_info(n, TensorProto.FLOAT, [rows, half])   # noqa: E731
    then = helper.make_graph(consts("large", P, 2e4), "large", [], [out("cos_large", P), out("sin_large", P)])
    other = helper.make_graph(consts("small", 64, 1e4), "small", [], [out("cos_small", 64), out("sin_small", 64)])
    hidden = heads * 2 * half
    nodes = [helper.make_node("If", ["long"], ["cos_b", "sin_b"], name="/model/rope_caches_subgraph/If",
                              then_branch=then, else_branch=other),
             helper.make_node("RotaryEmbedding", ["x", "pos", "cos_a", "sin_a"], ["ya"], domain="com.microsoft",
                              num_heads=heads),
             helper.make_node("RotaryEmbedding", ["x", "pos", "cos_b", "sin_b"], ["yb"], domain="com.microsoft",
                              num_heads=heads),
             helper.make_node("RotaryEmbedding", ["x", "pos", "cos_c", "sin_c"], ["yc0"], domain="com.microsoft",
                              num_heads=heads),
             helper.make_node("Add", ["yc0", "w"], ["yc"]),
             helper.make_node("Shape", ["cos_c"], ["shape_c"])]
    graph = helper.make_graph(
        nodes, "rope",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", hidden]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, [1, "S"]),
         helper.make_tensor_value_info("long", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "S", hidden]) for n in ("ya", "yb", "yc")]
        + [helper.make_tensor_value_info("shape_c", TensorProto.INT64, [2])],
        [numpy_helper.from_array(a, n) for a, n in ((cos_a, "cos_a"), (sin_a, "sin_a"), (cos_c, "cos_c"),
                                                    (sin_c, "sin_c"), (w, "w"))])
    d.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]),
              str(d / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=1024,
              convert_attribute=False)
    S = 40
    return [{"x": rng.standard_normal((1, S, hidden)).astype(np.float32),
             "pos": (np.arange(S)[None] + 20).astype(np.int64), "long": np.array(flag)} for flag in (True, False)]


def test_cut_rope_caches_two_pairs_one_behind_an_if(tmp_path):
    """cut_rope_caches on a graph with two RoPE pairs, one in model.onnx.data and one chosen by an If between two
    pairs held in the graph (Phi-3 LongRoPE), and a cache something else reads too: the caches longer than the
    context keep their first rows (the same bits: every output at positions below the cut unchanged), a shorter
    one (the If's short pair) and the shared one are left, the data file loses the cut rows' bytes (and keeps the
    weight beside them), the If branch's declared shapes follow, and a second call does nothing."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from edgekit.convert.llm_graph import ROPE_NOTE, cut_rope_caches, rope_caches

    d = tmp_path / "rope"
    feeds = _rope_graph(d)
    run = lambda: [ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"]).run(   # noqa: E731
        None, f) for f in feeds]
    before, data0, graph0 = run(), (d / "model.onnx.data").stat().st_size, (d / "model.onnx").stat().st_size
    found = {name for _, name, _, _ in rope_caches(onnx.load(str(d / "model.onnx"), load_external_data=False))}
    assert found == {"cos_a", "sin_a", "cos_large", "sin_large", "cos_small", "sin_small"}   # not cos_c (a Shape)
    # nor its pair: a reader takes the same rows of both
    r = cut_rope_caches(d, 100)
    assert sorted(c["name"] for c in r["caches"]) == ["cos_a", "cos_large", "sin_a", "sin_large"]
    assert all(c["rows_before"] == 4096 for c in r["caches"]) and r["note"] == ROPE_NOTE
    assert r["saved_bytes"] == 4 * (4096 - 100) * 8 * 4
    assert (d / "model.onnx.data").stat().st_size <= data0 - 2 * (4096 - 100) * 8 * 4 + 3 * 64   # alignment
    assert (d / "model.onnx").stat().st_size <= graph0 - 2 * (4096 - 100) * 8 * 4
    assert sorted(p.name for p in d.iterdir()) == ["model.onnx", "model.onnx.data"]
    m = onnx.load(str(d / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert inits["cos_a"].shape == (100, 8) and inits["cos_c"].shape == (4096, 8) and inits["w"].shape == (32,)
    ifn = next(n for n in m.graph.node if n.op_type == "If")
    branches = {a.name: a.g for a in ifn.attribute}
    for b, rows in (("then_branch", 100), ("else_branch", 64)):
        assert [numpy_helper.to_array(n.attribute[0].t).shape for n in branches[b].node] == [(rows, 8)] * 2
        assert [o.type.tensor_type.shape.dim[0].dim_value for o in branches[b].output] == [rows] * 2
    for a, b in zip(before, run()):
        for x, y in zip(a, b):
            assert np.array_equal(x, y)
    again = cut_rope_caches(d, 100)
    assert again["caches"] == [] and again["saved_bytes"] == 0


def test_cut_rope_caches_leaves_a_graph_with_external_attribute_tensors(tmp_path):
    """A Constant whose value is in the data file (onnx's convert_attribute): _swap_in points only initializers
    back at model.onnx.data, so the cut leaves such a graph as it is (said in `kept`) and it still loads."""
    import onnx

    from edgekit.convert.llm_graph import cut_rope_caches

    d = tmp_path / "rope"
    _rope_graph(d)
    m = onnx.load(str(d / "model.onnx"))
    (d / "model.onnx.data").unlink()
    onnx.save_model(m, str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0, convert_attribute=True)
    r = cut_rope_caches(d, 100)
    assert r["caches"] == [] and "node attribute" in r["kept"][0][1], r
    onnx.checker.check_model(onnx.load(str(d / "model.onnx")))
    assert sorted(p.name for p in d.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_cut_rope_caches_of_builder_graphs(tmp_path):
    """The model builder's own graphs: Gemma 3 (a local and a global pair, initializers in model.onnx.data) and
    Phi-3 LongRoPE (the short and the long pair behind an If, held in model.onnx), each with 8192 positions, cut to
    300 rows with genai_config's context_length: the same greedy tokens from ONNX Runtime GenAI over 290 positions
    (Phi-3: past its 256 original positions, the long pair), smaller files, and a longer max_length refused."""
    import shutil

    import onnx
    import onnxruntime_genai as og
    import pytest
    import torch
    import transformers
    from transformers import GenerationConfig

    from tinylm import _tokenizer

    from edgekit.convert.llm import LLMBuildOptions, read_source, run_builder
    from edgekit.convert.llm_graph import cut_rope_caches, rope_caches

    def tokens(d, ids, new=20, max_length=None):
        model = og.Model(og.Config(str(d)))
        p = og.GeneratorParams(model)
        p.set_search_options(max_length=max_length or len(ids) + new, do_sample=False)
        g = og.Generator(model, p)
        g.append_tokens(np.asarray(ids, dtype=np.int32))
        out = []
        while not g.is_done() and len(out) < new:
            g.generate_next_token()
            out.append(int(g.get_next_tokens()[0]))
        return out

    for arch in ("gemma3", "phi3"):
        src = tmp_path / arch
        src.mkdir()
        tok = _tokenizer(corpus_text(200, 0), src)
        common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192, bos_token_id=0,
                      eos_token_id=2, pad_token_id=0)
        if arch == "gemma3":
            cls, cfg = transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
                head_dim=32, query_pre_attn_scalar=32, sliding_window=16, tie_word_embeddings=True,
                layer_types=["sliding_attention", "full_attention"], **common)
        else:
            cls, cfg = transformers.Phi3ForCausalLM, transformers.Phi3Config(
                tie_word_embeddings=True, partial_rotary_factor=0.75, original_max_position_embeddings=256,
                rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 256,
                                 "short_factor": [1.0] * 24, "long_factor": [4.0] * 24},
                **dict(common, hidden_size=128))
        torch.manual_seed(0)
        model = cls(cfg)
        model.config.architectures = [cls.__name__]
        model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=2, pad_token_id=0)
        model.save_pretrained(str(src))
        d = tmp_path / f"{arch}-build"
        run_builder(read_source(str(src)), LLMBuildOptions("int4"), d, tmp_path / "cache", {})
        cut = tmp_path / f"{arch}-cut"
        shutil.copytree(d, cut)
        names = sorted(n for _, n, _, _ in rope_caches(onnx.load(str(d / "model.onnx"), load_external_data=False)))
        if arch == "gemma3":
            assert names == ["cos_cache_global", "cos_cache_local", "sin_cache_global", "sin_cache_local"]
        else:
            assert names == ["cos_cache_large", "cos_cache_small", "sin_cache_large", "sin_cache_small"]
        size = lambda x: sum(f.stat().st_size for f in x.glob("model.onnx*"))   # noqa: E731
        r = cut_rope_caches(cut, 300)
        assert len(r["caches"]) == (4 if arch == "gemma3" else 2)        # Phi-3's short pair: 256 rows, kept
        assert size(cut) < size(d) - r["saved_bytes"] + 4096 and r["saved_bytes"] >= 2 * (8192 - 300) * 16 * 4
        for x in (d, cut):
            p = x / "genai_config.json"
            c = json.loads(p.read_text())
            c["model"]["context_length"] = 300
            p.write_text(json.dumps(c))
        ids = [int(i) for i in np.random.default_rng(1).integers(3, len(tok), 270)]
        assert tokens(cut, ids) == tokens(d, ids)
        with pytest.raises(Exception, match="context_length"):
            tokens(cut, ids, max_length=310)
