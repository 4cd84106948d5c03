"""edgekit.convert.llm_sensitivity: the torch simulation of the build's INT4 rounding, the MatMul-to-module map
and the greedy INT8 choice the ladder's `matmuls` rung builds."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: E402  (edgekit[llm-convert], in dev)

from tinylm import tiny_lm  # noqa: E402,F401  (a session fixture)

from edgekit.convert import llm_sensitivity as ls  # noqa: E402


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 16), (8, 32)])
def test_kquant_fake_is_the_builders_k_quant(bits, block):
    """The simulation dequantizes to what ONNX Runtime's k-quant (the builder's algo_config=k_quant) stores."""
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    rng = np.random.default_rng(bits * 100 + block)
    w = (rng.standard_normal((48, 96)) * rng.uniform(0.01, 0.2, (48, 1))).astype(np.float32)
    w[3, 5] = 1.5                                   # an outlier in one block
    q, scale, zp = quant_tensor_k_quant_cpu(w.copy(), bits, block)
    ref = ((q - zp) * scale).reshape(w.shape)
    got = ls.kquant_fake(torch.from_numpy(w), block, bits).numpy()
    r = np.abs(got - ref) / np.repeat(scale.reshape(48, -1), block, axis=1)   # in quantization steps
    # float32 arithmetic may pick a neighbouring candidate grid in a few blocks: a weight a level apart is rare,
    # the typical weight identical, the rounding error the same
    assert (r > 0.5).mean() < 0.02 and np.median(r) < 1e-3 and r.max() < 1.5
    assert abs(np.abs(got - w).mean() / np.abs(ref - w).mean() - 1) < 0.02
    assert np.abs(got - w).mean() < np.abs(ls.fake_quant(torch.from_numpy(w), block, bits - 1, "rtn").numpy()
                                           - w).mean()


def test_pick_int8_is_greedy_within_the_budget():
    ranking = [{"name": "a", "params": 10, "kl_mean": 0.5}, {"name": "b", "params": 40, "kl_mean": 1.0},
               {"name": "c", "params": 20, "kl_mean": 0.2}, {"name": "d", "params": 30, "kl_mean": 0.0}]
    assert ls.pick_int8(ranking, 0.1) == ["a"]
    assert ls.pick_int8(ranking, 0.35) == ["a", "c"]        # b does not fit in what is left, c does
    assert ls.pick_int8(ranking, 0.5) == ["a", "b"]
    assert ls.pick_int8(ranking, 1.0) == ["a", "b", "c"]    # a MatMul that costs nothing stays INT4
    assert ls.short_name("/model/layers.11/mlp/down_proj/MatMul") == "11.down_proj"


def test_matmul_sensitivity_on_a_tiny_llama(tiny_lm):
    """The builder's node names map to the Linear modules they hold (packed qkv = q, k, v); each MatMul alone at
    INT4 costs something; the calibration text is the float model's own text, not the fidelity prompts."""
    from edgekit.convert.llm_fidelity import BUILTIN_PROMPTS, FloatModel

    fm = FloatModel(tiny_lm, threads=1)
    names = {i: [f"/model/layers.{i}/attn/qkv_proj/MatMul", f"/model/layers.{i}/attn/o_proj/MatMul",
                 f"/model/layers.{i}/mlp/gate_proj/MatMul", f"/model/layers.{i}/mlp/up_proj/MatMul",
                 f"/model/layers.{i}/mlp/down_proj/MatMul", f"/model/layers.{i}/mlp/nothing/MatMul"]
             for i in range(4)}
    mods = ls.matmul_modules(fm.model, names)
    assert len(mods) == 20 and len(mods["/model/layers.0/attn/qkv_proj/MatMul"]) == 3
    assert mods["/model/layers.2/mlp/down_proj/MatMul"] == [fm.model.model.layers[2].mlp.down_proj]
    cal = ls.calibration_text(fm, tokens=64)
    assert cal.tokens >= 32 and not set(cal.prompts) & set(BUILTIN_PROMPTS)
    before = {k: [m.weight.detach().clone() for m in v] for k, v in mods.items()}
    ranking = ls.matmul_sensitivity(fm, cal, names, block=32)
    assert len(ranking) == 20 and all(d["kl_mean"] > 0 for d in ranking)
    per_weight = [d["kl_mean"] / d["params"] for d in ranking]
    assert per_weight == sorted(per_weight, reverse=True)
    assert ranking[0]["params"] in {m.weight.numel() for v in mods.values() for m in v} | {
        sum(m.weight.numel() for m in mods[ranking[0]["name"]])}
    for k, v in mods.items():                      # the float weights are put back
        assert all(torch.equal(m.weight, b) for m, b in zip(v, before[k]))


def test_int8_matmuls_are_builder_overrides(tmp_path):
    """The matmuls rung's choice reaches the builder as per-node INT8 overrides, and the recipe says so."""
    from edgekit.convert.llm import LLMBuildOptions, LMSource

    src = LMSource(tmp_path, {"tie_word_embeddings": True, "num_hidden_layers": 12, "hidden_size": 64,
                              "num_attention_heads": 2, "intermediate_size": 128}, "LlamaForCausalLM", "0" * 64, 0)
    names = ("/model/layers.11/mlp/down_proj/MatMul", "/model/layers.2/attn/qkv_proj/MatMul")
    o = LLMBuildOptions("int4", int8_matmuls=names)
    extra, target = o.builder_args(src, {})
    over = target["quant_config"]["weights"]["overrides"]
    assert {"match": {"preset": "last_matmul"}, "type": "int8"} in over
    assert [d["match"]["name"] for d in over if "name" in d["match"]] == list(names)
    assert all(d["type"] == "int8" for d in over)
    assert "2 measured MatMuls int8" in o.describe()
    assert {"11.down_proj (int8)", "2.qkv_proj (int8)"} <= set(o.wide_layers(tied=True))
    assert LLMBuildOptions("int8", int8_matmuls=names).builder_args(src, {})[1]["quant_config"]["weights"][
        "overrides"] == []


def test_lfm2_matmuls_reach_its_linears(tmp_path):
    """Every decoder MatMul the builder writes for LFM2 (benchmarks/llm_arch_sweep.py's tiny lfm2: conv, attention,
    conv layers) maps to the Linears it holds: the MLP's gate / up / down_proj nodes are feed_forward.w1 / w3 / w2
    and the attention's o_proj is self_attn.out_proj (the builder's aliases), which were never measured, chosen or
    calibrated and stayed asymmetric INT8; a conv layer's in_proj / out_proj are its conv's."""
    from test_llm_archs import _sweep_config, make_tiny

    from edgekit.convert.llm import LLMBuildOptions, decoder_matmuls, read_source, run_builder
    from edgekit.convert.llm_fidelity import FloatModel

    folder = make_tiny("lfm2", tmp_path / "tiny-lfm2", steps=0, config=_sweep_config("lfm2"))
    run_builder(read_source(str(folder)), LLMBuildOptions("fp32"), tmp_path / "build", tmp_path / "cache", {})
    matmuls = decoder_matmuls(tmp_path / "build" / "model.onnx")
    model = FloatModel(folder, threads=1).model
    mods = ls.matmul_modules(model, matmuls)
    names = [n for v in matmuls.values() for n in v]
    assert len(names) == 15 and [n for n in names if n not in mods] == []
    layers = model.model.layers
    for i in range(3):
        ff = layers[i].feed_forward
        assert [mods[f"/model/layers.{i}/mlp/{p}/MatMul"] for p in ("gate_proj", "up_proj", "down_proj")] == [
            [ff.w1], [ff.w3], [ff.w2]]
    attn = layers[1].self_attn
    assert mods["/model/layers.1/attn/o_proj/MatMul"] == [attn.out_proj]
    assert mods["/model/layers.1/attn/qkv_proj/MatMul"] == [attn.q_proj, attn.k_proj, attn.v_proj]
    assert mods["/model/layers.0/conv/out_proj/MatMul"] == [layers[0].conv.out_proj]
