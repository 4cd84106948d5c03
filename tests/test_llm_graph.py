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
    """The lm_head on the last position only (llm_graph.prune_lm_head): the last position's logits are bit-identical
    (ONNX Runtime) and ORT GenAI's tokens the same; the converter's OnnxDecoder teacher-forces a pruned bundle
    through its graph with the pruning taken out (bit-identical, the same external data), the runtime one token at a
    time (agreeing with the one-pass logits), and the batched server's prefill of prompts of different lengths
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
    assert last.shape == (1, 1, full.shape[-1]) and np.array_equal(last[0, 0], full[-1])   # bit-identical
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
