"""The architecture sweep on tiny models: each architecture's config in the form of the checkpoint it stands for,
trained here, converted INT8 and INT4 through edgekit convert, checked against its float model and run.

    flock /tmp/edgekit-bench.lock python benchmarks/llm_arch_sweep.py [--arch qwen3,phi2,...] [--list]

Each architecture: a 3-layer model (tests/test_llm_archs.py make_tiny: a byte-level BPE of 512 tokens trained on
the tiny LM's text, 60 AdamW steps, Granite 200) converted INT8 for x86-avx512-vnni and INT4 for its target
(x86-avx512-vnni, rpi5 for Qwen3, Phi-4-mini's form and phi-2), its fidelity measured by convert against torch on
held-out text of the same kind (`corpus_text(40, seed=7)`, 689 tokens), then a short greedy generation through
edgekit.runtime. Rows go into benchmarks/results/llm_arch_sweep.json keyed by architecture, so the sweep can be
run in parts (on the 2-core Xeon the whole sweep took about a minute, 1-7 s an architecture). What edgekit's
builder fixes did (llm_compat) is copied from each convert log; host, versions and load averages are recorded.
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
STEPS = {"granite": 200}                      # its multipliers need more steps for non-tied next-token choices


def _configs() -> Dict[str, Callable[[Dict[str, Any]], Tuple[Any, Any]]]:
    """name -> (common keywords -> (model class, configuration))."""
    import transformers as T

    hd = dict(head_dim=32)
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 500000.0}

    def longrope(n: int) -> Dict[str, Any]:   # n = rotary dimension / 2
        return {"rope_type": "longrope", "short_factor": [1.0] * n, "long_factor": [4.0] * n, "rope_theta": 1e4,
                "original_max_position_embeddings": 256}

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
    }


def _convert(folder: Path, val: Path, target: str, precision: str, out: Path) -> Dict[str, Any]:
    """One convert: its fidelity, size, seconds, builder fixes and a greedy generation; or its one-line error."""
    from tinylm import corpus_text

    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.errors import EdgekitError
    from edgekit.runtime import load

    t0 = time.monotonic()
    row: Dict[str, Any] = {"target": target, "precision": precision}
    try:
        res = convert_llm(LLMRecipe(str(folder), (target,), precision=precision, val=str(val)), str(out))
    except EdgekitError as e:   # BudgetMissed (below the floor on every rung), a refused source, ...
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
    bad = [n for n in names if not all(r["ok"] for r in doc["rows"][n]["builds"])]
    print(f"{len(names) - len(bad)} of {len(names)} architecture(s) converted at both precisions"
          + (f"; not: {', '.join(bad)}" if bad else "") + f" -> {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
