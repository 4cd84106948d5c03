"""INT8 language-model builds: MLAS's int8 activations simulated in torch (edgekit.convert.llm_actquant), the INT8
floor, and the INT8 ladder that keeps the measured MatMuls fp32 (then block 16)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import torch  # noqa: E402  (edgekit[llm-convert], in dev)

from tinylm import corpus_text, tiny_lm  # noqa: E402,F401  (a session fixture)

from edgekit.convert import llm_actquant as aq  # noqa: E402


@pytest.mark.parametrize("block,k", [(32, 96), (16, 40)])
def test_act_quant_is_mlas_blockwise_int8(block, k):
    """Each row, per block of `block` along K (the last one shorter): symmetric int8 with scale max|x| / 127, round
    to nearest (MLAS QuantizeARow_CompInt8)."""
    rng = np.random.default_rng(block)
    x = rng.standard_normal((3, 5, k)).astype(np.float32)
    x[0, 1, 7] = 40.0                                    # an outlier spoils its own block only
    got = aq.act_quant(torch.from_numpy(x), block).numpy()
    want = np.empty_like(x)
    for j in range(0, k, block):
        b = x[..., j:j + block]
        s = np.abs(b).max(-1, keepdims=True) / 127.0
        want[..., j:j + block] = np.round(b / s) * s
    assert np.allclose(got, want, atol=1e-6)
    assert np.abs(got[0, 1, block:] - x[0, 1, block:]).max() < 0.05      # other blocks keep their resolution
    assert np.abs(got[0, 1, :block] - x[0, 1, :block]).max() > 0.05


def test_int8_floor_is_the_int8_rows(tmp_path):
    from edgekit.convert.llm import INT8_FLOOR, LLMRecipe
    from edgekit.convert.llm_fidelity import LLMFloor

    r = LLMRecipe(str(tmp_path), ("rpi5",), floor=LLMFloor(0.2, 0.3, 0.5))
    assert r.floor_for("int8") == INT8_FLOOR and INT8_FLOOR.max_ppl_increase == 0.01
    assert r.floor_for("int4") == r.floor_for("fp32") == LLMFloor(0.2, 0.3, 0.5)


def test_fp32_matmuls_reach_the_build(tiny_lm, tmp_path):
    """A MatMul the INT8 ladder keeps fp32 is a plain float MatMul in the built graph; every other one INT8."""
    import onnx

    from edgekit.convert.llm import LLMBuildOptions, read_source, run_builder

    keep = "/model/layers.1/mlp/down_proj/MatMul"
    o = LLMBuildOptions("int8", fp32_matmuls=(keep,))
    assert "1 measured MatMuls fp32" in o.describe() and "1.down_proj (fp32)" in o.wide_layers(tied=False)
    run_builder(read_source(str(tiny_lm)), o, tmp_path / "b", tmp_path / "cache", {})
    m = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False)
    nodes = {n.name: n for n in m.graph.node if n.name.startswith("/model/layers.")}
    assert nodes[keep].op_type == "MatMul"
    w = next(t for t in m.graph.initializer if t.name == nodes[keep].input[1])
    assert w.data_type == onnx.TensorProto.FLOAT and list(w.dims) == [256, 128]
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 5 - 1 + 1                   # the other decoder MatMuls and the lm_head
    assert all(a.i == 8 for n in nbits for a in n.attribute if a.name == "bits")


def test_int8_ladder_on_a_tiny_llama(tiny_lm, tmp_path):
    """An INT8 row below the INT8 floor walks the ladder: the MatMuls measured to cost most per weight as INT8 nodes
    kept fp32 (1/32, 1/16 of the decoder's weights), then at block 16; none meeting an impossible floor, the row
    fails with every rung recorded, each rung's fp32 set the head of its measured ranking."""
    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.convert.llm_fidelity import LLMFloor
    from edgekit.errors import BudgetMissed

    val = tmp_path / "val.txt"
    val.write_text(corpus_text(120, seed=7), encoding="utf-8")
    recipe = LLMRecipe(str(tiny_lm), ("x86-avx512-vnni",), precision="int8", val=str(val), val_tokens=256,
                       int8_floor=LLMFloor(None, 0.0, None))
    with pytest.raises(BudgetMissed):
        convert_llm(recipe, str(tmp_path / "out"))
    rep = json.loads(next((tmp_path / "out").glob("*.convert.json")).read_text())
    row = rep["bundles"][0]
    assert row["status"] == "failed" and row["failure"]["reason"].startswith("below the floor: KL")
    steps = row["rescue"]
    assert [s["rung"] for s in steps][0] == "profile" and {s["rung"] for s in steps[1:]} == {"fp32", "blocks"}
    prof = steps[0]
    assert prof["options"]["fp32_matmuls"] == [] and prof["kl_mean"] > 0 and not prof["meets"]
    for s in steps[1:]:
        o = s["options"]
        assert o["precision"] == "int8" and o["block_size"] == (16 if s["rung"] == "blocks" else 32)
        chosen = [d["name"] for d in s["sensitivity"]]
        assert len(o["fp32_matmuls"]) == len(chosen) > 0 and all(n.startswith("/model/layers.")
                                                                   for n in o["fp32_matmuls"])
        per_weight = [d["kl_mean"] / d["params"] for d in s["sensitivity"]]
        assert per_weight == sorted(per_weight, reverse=True) and all(k > 0 for k in per_weight)
        assert 0 < s["fp32_weights"] <= s["fraction"] and "calibration" in s["calibration"]
        assert s["bytes"] > prof["bytes"] and s["error"] is None      # fp32 weights: 4 bytes instead of ~1.2
    assert not list((tmp_path / "out").glob("*-int8"))                # a FAILED row is not written


def test_activation_sensitivity_from_each_layer_on(tiny_lm, monkeypatch):
    """The measurement runs the model from the MatMul's layer on (the float pass's hidden state there), which gives
    the whole pass's logits; each MatMul costs something as an INT8 node, more with its int8 activations, and the
    ranking is the one whole passes give."""
    from edgekit.convert.llm_fidelity import FloatModel
    from edgekit.convert.llm_sensitivity import calibration_text

    fm = FloatModel(tiny_lm, threads=1)
    cal = calibration_text(fm, tokens=64)
    tail = aq._Tail(fm, cal.windows)
    assert tail.ok and len(tail.calls) == 4
    for i in range(4):
        assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(tail.logprobs(i), tail.logprobs()))
    names = {i: [f"/model/layers.{i}/attn/qkv_proj/MatMul", f"/model/layers.{i}/mlp/down_proj/MatMul"]
             for i in range(4)}
    ranking = aq.activation_sensitivity(fm, cal, names, block=32)
    weights_only = {d["name"]: d["kl_mean"] for d in aq.activation_sensitivity(fm, cal, names, 32, activations=False)}
    assert len(ranking) == 8 and all(d["kl_mean"] > weights_only[d["name"]] > 0 for d in ranking)
    per_weight = [d["kl_mean"] / d["params"] for d in ranking]
    assert per_weight == sorted(per_weight, reverse=True)
    whole = aq._Tail.__init__

    def no_tail(self, *a):
        whole(self, *a)
        self.ok = False

    monkeypatch.setattr(aq._Tail, "__init__", no_tail)    # the same measurement with whole passes
    again = aq.activation_sensitivity(fm, cal, names, block=32)
    assert [d["name"] for d in again] == [d["name"] for d in ranking]
    assert np.allclose([d["kl_mean"] for d in again], [d["kl_mean"] for d in ranking], rtol=1e-3, atol=1e-7)
