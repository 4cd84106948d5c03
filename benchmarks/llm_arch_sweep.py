"""The architecture sweep on tiny models: each architecture's config in the form of the checkpoint it stands for,
trained here, converted INT8 and INT4 through edgekit convert, checked against its float model and run.

    flock /tmp/edgekit-bench.lock python benchmarks/llm_arch_sweep.py [--arch qwen3,phi2,...] [--list]

Each architecture: a 3-layer model (tests/test_llm_archs.py make_tiny: a byte-level BPE of 512 tokens trained on
the tiny LM's text, 60 AdamW steps, Granite 200) converted INT8 for x86-avx512-vnni and INT4 for its target
(x86-avx512-vnni, rpi5 for Qwen3, Phi-4-mini's form and phi-2), its fidelity measured by convert against torch on
held-out text of the same kind (`corpus_text(40, seed=7)`, 689 tokens), then a short greedy generation through
edgekit.runtime. A checkpoint published in a quantized form is saved so after training (POST: gpt-oss's MXFP4
experts). Rows go into benchmarks/results/llm_arch_sweep.json keyed by architecture, so the sweep can be
run in parts (on the 2-core Xeon the whole sweep took about a minute, 1-7 s an architecture). What edgekit's
builder fixes did (llm_compat) is copied from each convert log; host, versions and load averages are recorded. A
checkpoint edgekit refuses before any work (convert.llm.builder_refusal: what the builder cannot build right) is
recorded as refused with its line and hint, and does not fail the sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

RESULTS = HERE / "results" / "llm_arch_sweep.json"
RPI5 = ("qwen3", "phi4mini", "phi2")          # INT4 for rpi5 (the others: x86-avx512-vnni)
# Granite's multipliers need more steps for non-tied next-token choices
STEPS = {"granite": 200, "granite4": 200, "granite4_h": 200}


def _configs() -> Dict[str, Callable[[Dict[str, Any]], Tuple[Any, Any]]]:
    """name -> (common keywords -> (model class, configuration))."""
    import transformers as T

    hd = dict(head_dim=32)
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 500000.0}

    def longrope(n: int) -> Dict[str, Any]:   # n = rotary dimension / 2
        return {"rope_type": "longrope", "short_factor": [1.0] * n, "long_factor": [4.0] * n, "rope_theta": 1e4,
                "original_max_position_embeddings": 256}

    def gptoss(c):
        return T.GptOssForCausalLM, T.GptOssConfig(
            tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], attention_bias=True,
            rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 150000.0},
            **hd, **dict(c, intermediate_size=64))

    def softcap(c, head_dim):
        return dict(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=16,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **c)
    return {
        "qwen2_tied": lambda c: (T.Qwen2ForCausalLM, T.Qwen2Config(tie_word_embeddings=True, **c)),
        "qwen3": lambda c: (T.Qwen3ForCausalLM, T.Qwen3Config(tie_word_embeddings=True, **hd, **c)),
        "qwen3_hd": lambda c: (T.Qwen3ForCausalLM, T.Qwen3Config(
            tie_word_embeddings=True, **hd, **dict(c, num_attention_heads=4, num_key_value_heads=2))),
        # Qwen3's documented long context (YaRN x4, no betas) from 128 positions: the windows reach past it
        "qwen3_yarn": lambda c: (T.Qwen3ForCausalLM, T.Qwen3Config(tie_word_embeddings=True, **hd, **dict(
            c, max_position_embeddings=1024), rope_parameters={
                "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 1e6})),
        "llama32": lambda c: (T.LlamaForCausalLM, T.LlamaConfig(tie_word_embeddings=True, rope_parameters=llama3,
                                                                **hd, **c)),
        "tinyllama": lambda c: (T.LlamaForCausalLM, T.LlamaConfig(tie_word_embeddings=False, **c)),
        "mistral": lambda c: (T.MistralForCausalLM, T.MistralConfig(tie_word_embeddings=False, sliding_window=None,
                                                                    **hd, **c)),
        "mistral_sw": lambda c: (T.MistralForCausalLM, T.MistralConfig(tie_word_embeddings=False, sliding_window=16,
                                                                       **hd, **c)),
        "phi3": lambda c: (T.Phi3ForCausalLM, T.Phi3Config(tie_word_embeddings=False, sliding_window=32,
                                                           original_max_position_embeddings=512, **c)),
        "phi3_long": lambda c: (T.Phi3ForCausalLM, T.Phi3Config(
            tie_word_embeddings=False, sliding_window=4096, original_max_position_embeddings=256,
            rope_parameters=longrope(16), **dict(c, max_position_embeddings=2048))),
        "phi4mini": lambda c: (T.Phi3ForCausalLM, T.Phi3Config(
            tie_word_embeddings=True, partial_rotary_factor=0.75, sliding_window=4096,
            original_max_position_embeddings=256, rope_parameters=longrope(24),
            **dict(c, max_position_embeddings=2048, hidden_size=128))),
        "smollm3": lambda c: (T.SmolLM3ForCausalLM, T.SmolLM3Config(tie_word_embeddings=True,
                                                                    no_rope_layers=[1, 1, 0], **c)),
        "granite": lambda c: (T.GraniteForCausalLM, T.GraniteConfig(
            tie_word_embeddings=True, embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
            attention_multiplier=0.03125, **c)),
        "olmo": lambda c: (T.OlmoForCausalLM, T.OlmoConfig(tie_word_embeddings=True, **c)),
        "olmo_clip": lambda c: (T.OlmoForCausalLM, T.OlmoConfig(tie_word_embeddings=False, clip_qkv=8.0, **c)),
        "gemma": lambda c: (T.GemmaForCausalLM, T.GemmaConfig(tie_word_embeddings=True, **hd, **c)),
        "gemma2": lambda c: (T.Gemma2ForCausalLM, T.Gemma2Config(tie_word_embeddings=True, **softcap(c, 32))),
        "gemma2_hd": lambda c: (T.Gemma2ForCausalLM, T.Gemma2Config(tie_word_embeddings=True, **softcap(c, 64))),
        "phi2": lambda c: (T.PhiForCausalLM, T.PhiConfig(tie_word_embeddings=False, partial_rotary_factor=0.4, **dict(
            c, num_attention_heads=4, num_key_value_heads=4, hidden_size=320))),
        # ERNIE-4.5-0.3B's form: tied, no biases, interleaved RoPE (theta 5e5), head_dim beside hidden/heads
        "ernie45": lambda c: (T.Ernie4_5ForCausalLM, T.Ernie4_5Config(
            tie_word_embeddings=True, use_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
            **hd, **c)),
        # Hunyuan-0.5B's form: tied, q/k norms after RoPE, "dynamic" RoPE with a fixed NTK alpha (static frequencies)
        "hunyuan": lambda c: (T.HunYuanDenseV1ForCausalLM, T.HunYuanDenseV1Config(
            tie_word_embeddings=True, rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                                                       "rope_theta": 1e4}, **hd, **c)),
        # Minitron / Nemotron-Mini's form: LayerNorm1P, squared-ReLU MLP without a gate, partial rotary 0.5
        "nemotron": lambda c: (T.NemotronForCausalLM, T.NemotronConfig(
            tie_word_embeddings=False, hidden_act="relu2",
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, **hd, **c)),
        # LFM2-350M's form: short-convolution layers between full-attention layers (q/k norms), tied, SwiGLU
        # sized by block_auto_adjust_ff_dim
        "lfm2": lambda c: (T.Lfm2ForCausalLM, T.Lfm2Config(
            tie_word_embeddings=True, layer_types=["conv", "full_attention", "conv"], conv_L_cache=3,
            block_multiple_of=64, block_auto_adjust_ff_dim=True, **c)),
        # LFM2-8B-A1B's form: LFM2's layers, the first num_dense_layers dense, then top-k MoE with an expert bias
        "lfm2moe": lambda c: (T.Lfm2MoeForCausalLM, T.Lfm2MoeConfig(
            tie_word_embeddings=True, layer_types=["conv", "full_attention", "conv"], num_dense_layers=1,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, use_expert_bias=True,
            norm_topk_prob=True, **c)),
        # gpt-oss-20b's form: MoE (clamped SwiGLU), attention sinks, biases, sliding / full layers alternating,
        # YaRN x32 (from 4096 there, from 16 here: the context is 512), untied; its experts stored MXFP4 as the hub
        # has them (POST: *_blocks / *_scales and quantization_config; transformers dequantizes them on a CPU)
        "gptoss": gptoss,
        # the same saved in float (a dequantized "BF16" re-upload's form)
        "gptoss_bf16": gptoss,
        # granite-4.0-micro / granite-4.0-350m's form: GraniteMoeHybrid with attention layers only and no experts
        # (the shared MLP), Granite's multipliers
        "granite4": lambda c: (T.GraniteMoeHybridForCausalLM, T.GraniteMoeHybridConfig(
            tie_word_embeddings=True, layer_types=["attention"] * 3, num_local_experts=0,
            shared_intermediate_size=128, position_embedding_type="rope", embedding_multiplier=12.0,
            logits_scaling=8.0, residual_multiplier=0.22, attention_multiplier=0.03125, **c)),
        # granite-4.0-h-350m / h-1b's form: Mamba-2 layers around an attention layer, no positional embedding
        "granite4_h": lambda c: (T.GraniteMoeHybridForCausalLM, T.GraniteMoeHybridConfig(
            tie_word_embeddings=True, layer_types=["mamba", "attention", "mamba"], num_local_experts=0,
            shared_intermediate_size=128, position_embedding_type="nope", mamba_n_heads=4, mamba_d_head=32,
            mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=32, embedding_multiplier=12.0,
            logits_scaling=8.0, residual_multiplier=0.22, attention_multiplier=0.03125, **c)),
        # gemma-4-E2B's text decoder (Gemma4ForConditionalGeneration without its vision / audio towers): per-layer
        # embeddings, sliding layers then a full one with a wider head and proportional partial RoPE, softcap
        "gemma4": lambda c: (T.Gemma4ForConditionalGeneration, T.Gemma4Config(
            tie_word_embeddings=True, text_config=T.Gemma4TextConfig(
                tie_word_embeddings=True, sliding_window=16, global_head_dim=64, hidden_size_per_layer_input=16,
                vocab_size_per_layer_input=c["vocab_size"], final_logit_softcapping=30.0,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"], **hd, **c))),
        # gemma-4-26B-A4B's text decoder: a dense MLP beside top-k experts in every layer, no per-layer embeddings
        "gemma4_moe": lambda c: (T.Gemma4ForConditionalGeneration, T.Gemma4Config(
            tie_word_embeddings=True, text_config=T.Gemma4TextConfig(
                tie_word_embeddings=True, sliding_window=16, global_head_dim=64, hidden_size_per_layer_input=0,
                final_logit_softcapping=30.0, enable_moe_block=True, num_experts=4, top_k_experts=2,
                moe_intermediate_size=32, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                **hd, **c))),
        # gemma4-12b-it's form (Gemma4Unified): Gemma 4's attention without per-layer embeddings or experts
        "gemma4_unified": lambda c: (T.Gemma4UnifiedForConditionalGeneration, T.Gemma4UnifiedConfig(
            tie_word_embeddings=True, text_config=T.Gemma4UnifiedTextConfig(
                tie_word_embeddings=True, sliding_window=16, global_head_dim=64, final_logit_softcapping=30.0,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"], **hd, **c))),
    }


def _mxfp4(folder: Path) -> None:
    """A GPT-OSS folder saved in float rewritten as the hub's MXFP4 checkpoint: each expert projection as
    `*_blocks` (FP4 e2m1 codes, two a byte, low nibble first, [experts, out, in / 32, 16]) and `*_scales` (e8m0
    exponents + 127 per 32 inputs), and a quantization_config (quant_method mxfp4)."""
    import torch
    from safetensors.torch import load_file, save_file

    fp4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    sd = load_file(str(folder / "model.safetensors"))
    for k in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = sd.pop(k).float().transpose(1, 2)                  # transformers' [E, in, out] -> [E, out, in]
        g = w.reshape(*w.shape[:2], w.shape[2] // 32, 32)
        e = torch.ceil(torch.log2(g.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -126) / 6.0)).clamp(-127, 127)
        x = g / torch.exp2(e)
        mag = (x.abs().unsqueeze(-1) - fp4).abs().argmin(-1)
        code = (mag | (((x < 0) & (mag > 0)).long() << 3)).to(torch.uint8)
        sd[k + "_blocks"] = (code[..., 0::2] | (code[..., 1::2] << 4)).contiguous()
        sd[k + "_scales"] = (e.squeeze(-1) + 127).to(torch.uint8).contiguous()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


POST: Dict[str, Callable[[Path], None]] = {"gptoss": _mxfp4}   # the trained folder rewritten in its hub form


def _convert(folder: Path, val: Path, target: str, precision: str, out: Path) -> Dict[str, Any]:
    """One convert: its fidelity, size, seconds, builder fixes and a greedy generation; or its one-line error."""
    from tinylm import corpus_text

    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.errors import EdgekitError, SourceModelError
    from edgekit.runtime import load

    t0 = time.monotonic()
    row: Dict[str, Any] = {"target": target, "precision": precision}
    try:
        res = convert_llm(LLMRecipe(str(folder), (target,), precision=precision, val=str(val)), str(out))
    except SourceModelError as e:   # refused before any work (read_source): its line, the folder's path left out
        return dict(row, ok=False, refused=True, error=e.message.replace(f"{folder}: ", "", 1)[:600],
                    hint=(e.hint or "").split("; supported: ")[0][:300], seconds=round(time.monotonic() - t0, 1))
    except EdgekitError as e:   # BudgetMissed (below the floor on every rung), ...
        return dict(row, ok=False, error=str(e).splitlines()[0][:400], seconds=round(time.monotonic() - t0, 1))
    b = res.bundles[0]
    row["seconds"] = round(time.monotonic() - t0, 1)
    log = Path(res.log_path).read_text()
    row["builder_fixes"] = sorted({ln.strip() for ln in log.splitlines() if ln.startswith("builder ")})
    m = json.loads((b.path / "manifest.json").read_text())
    fid = m["fidelity"]
    row.update(ok=True, rescued_by=m.get("rescued_by") or m.get("llm", {}).get("rescued_by"),
               bytes=sum(f.stat().st_size for f in (b.path / "model").iterdir() if f.is_file()),
               **{k: fid[k] for k in ("tokens", "ppl_float", "ppl", "ppl_increase", "kl_mean", "top1_agreement")})
    lm = load(b.path)
    text = lm.generate(corpus_text(3, seed=11), max_new_tokens=16)
    row.update(generated_tokens=lm.last["new_tokens"], generated=text[:120], check_ok=bool(lm.check()["ok"]))
    return row


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", help="comma-separated names (default: all; --list names them)")
    ap.add_argument("--list", action="store_true", help="print the architecture names and exit")
    ap.add_argument("--json", default=str(RESULTS), help="results file (rows merged by architecture)")
    ap.add_argument("--work", help="where the models and bundles go (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    configs = _configs()
    if args.list:
        print("\n".join(configs))
        return 0
    names = [a.strip() for a in args.arch.split(",")] if args.arch else list(configs)
    unknown = [a for a in names if a not in configs]
    if unknown:
        print(f"error: unknown architecture(s) {', '.join(unknown)} (known: {', '.join(configs)})", file=sys.stderr)
        return 2

    import onnxruntime_genai
    import torch
    import transformers
    from test_llm_archs import make_tiny
    from tinylm import corpus_text

    path = Path(args.json)
    doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="llm-arch-sweep-")
    work = Path(args.work or tmp.name)
    try:
        for name in names:
            t0, load0 = time.monotonic(), os.getloadavg()[0]
            folder = make_tiny(name, work / name / "hf", steps=STEPS.get(name, 60), config=configs[name])
            if name in POST:
                POST[name](folder)
            val = work / name / "val.txt"
            val.write_text(corpus_text(40, seed=7))
            rows: List[Dict[str, Any]] = [
                _convert(folder, val, "x86-avx512-vnni", "int8", work / name / "int8"),
                _convert(folder, val, "rpi5" if name in RPI5 else "x86-avx512-vnni", "int4", work / name / "int4")]
            arch = json.loads((folder / "config.json").read_text())["architectures"][0]
            doc["rows"][name] = {"architecture": arch, "steps": STEPS.get(name, 60), "builds": rows,
                                 "seconds": round(time.monotonic() - t0, 1),
                                 "load_avg": [load0, os.getloadavg()[0]],
                                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if all(r.get("refused") for r in rows) and rows[0]["error"] == rows[1]["error"]:
                print(f"{name}: refused: {rows[0]['error']} ({rows[0]['hint']})", flush=True)
            else:
                print(f"{name}: " + "; ".join(
                    f"{r['precision']} {r['target']}: " + (f"{100 * r['ppl_increase']:+.2f}%, KL {r['kl_mean']:.1e}, "
                                                           f"top-1 {100 * r['top1_agreement']:.1f}%"
                                                           if r["ok"] else r["error"]) for r in rows), flush=True)
            doc["host"] = {"machine": platform.machine(), "cpu": _cpu_name(),
                           "cores": os.cpu_count(), "onnxruntime_genai": onnxruntime_genai.__version__,
                           "transformers": transformers.__version__, "torch": torch.__version__}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1) + "\n")   # after each architecture: a part run keeps its rows
    finally:
        if tmp is not None:
            tmp.cleanup()
    # refused in one line before any work (convert.llm.builder_refusal: what the builder cannot build right): not a
    # failure of the sweep
    refused = [n for n in names if all(r.get("refused") for r in doc["rows"][n]["builds"])]
    bad = [n for n in names if n not in refused and not all(r["ok"] for r in doc["rows"][n]["builds"])]
    print(f"{len(names) - len(bad) - len(refused)} of {len(names)} architecture(s) converted at both precisions"
          + (f"; refused in one line: {', '.join(refused)}" if refused else "")
          + (f"; not: {', '.join(bad)}" if bad else "") + f" -> {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
