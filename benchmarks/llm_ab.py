"""Decode and prefill of a few builds side by side: edgekit bundles and llama.cpp GGUF files, each run in a fresh
process (llm_bench's workers: LanguageModel.benchmark for edgekit, llama.cpp's eval loop in the benchmark's venv),
rounds alternating (the order reversed every other round), medians and ranges per build, thread count and prompt.

For a question llm_bench.py's fixed set of builds does not ask (a block size, a rounding): e.g.

    python benchmarks/llm_ab.py --folder .cache/llm/SmolLM2-135M-Instruct \\
        --row int4=ek:.cache/llm_bench/edgekit/bench-smollm2-135m-instruct-x86-avx512-vnni-int4 \\
        --row Q4_0=ll:.cache/llm_bench/gguf/bench-smollm2-135m-instruct-Q4_0.gguf \\
        --row awq128=ek:build/awq128-x86-avx512-vnni-int4 --threads 1,2 --rounds 3 --out results/x.json

llama.cpp rows need llm_bench.py's venv (.cache/llm_bench/venv: made by a first llm_bench.py run). Timing only:
fidelity comes from each bundle's manifest (the converter's check) and is copied into the report.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_bench as B  # noqa: E402  (the workers and the Runner)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", required=True, help="the Hugging Face folder (its tokenizer makes the prompt)")
    ap.add_argument("--row", action="append", required=True, metavar="LABEL=ek|ll:PATH",
                    help="a build: ek (an edgekit bundle folder) or ll (a llama.cpp GGUF file)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-tokens", default="128")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = []
    for r in args.row:
        label, _, rest = r.partition("=")
        eng, _, path = rest.partition(":")
        if not label or eng not in ("ek", "ll") or not Path(path).exists():
            ap.error(f"--row {r}: LABEL=ek:BUNDLE_DIR or LABEL=ll:FILE.gguf, an existing path")
        rows.append((label, eng, str(Path(path).resolve())))
    threads = [int(x) for x in args.threads.split(",")]
    prompts = [int(x) for x in args.prompt_tokens.split(",")]
    from transformers import AutoTokenizer

    from edgekit.runtime.llmbench import PROMPT_TEXT

    base = AutoTokenizer.from_pretrained(args.folder)(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    pids = {p: (base * (-(-p // len(base))))[:p] for p in prompts}
    tmp = tempfile.TemporaryDirectory(prefix="llm-ab-")
    run = B.Runner(B.WORK / "venv" / "bin" / "python", Path(tmp.name))
    bw_before = B.bandwidth()
    samples: dict = {}
    for rnd in range(args.rounds):
        seq = [(t, r) for t in threads for r in rows]
        if rnd % 2:
            seq.reverse()
        for t, (label, eng, path) in seq:
            spec = {"path": path, "threads": t, "prompts": prompts, "new_tokens": args.new_tokens, "runs": 1,
                    "warmup": 1}
            load = os.getloadavg()[0]
            out = (run("ek_speed", dict(spec, spinning=None)) if eng == "ek" else
                   run("ll_speed", dict(spec, prompt_ids=[pids[p] for p in prompts], flash_attn=False)))
            for pr in out["prompts"]:
                key = f"{label} {t}t p{pr['prompt_tokens']}"
                samples.setdefault(key, []).append({"decode_tok_s": pr["decode_tok_s"],
                                                    "prefill_tok_s": pr["prefill_tok_s"],
                                                    "peak_rss_generation_mb": pr["peak_rss_generation_mb"],
                                                    "intra_op_spinning": out.get("intra_op_spinning"),
                                                    "threads_used": out.get("threads"), "loadavg_before": load})
                B.say(f"round {rnd + 1}: {key}: decode {pr['decode_tok_s']:.1f} tok/s, prefill "
                      f"{pr['prefill_tok_s']:.0f} (load {load:.2f})")
    bw_after = B.bandwidth()
    tmp.cleanup()
    summary = {}
    for key, v in samples.items():
        dec = [x["decode_tok_s"] for x in v]
        summary[key] = {"decode_tok_s": statistics.median(dec), "decode_range": [min(dec), max(dec)],
                        "prefill_tok_s": statistics.median(x["prefill_tok_s"] for x in v),
                        "peak_rss_generation_mb": max((x["peak_rss_generation_mb"] or 0) for x in v)}
    builds = {}
    for label, eng, path in rows:
        m = Path(path) / "manifest.json"
        if eng == "ek" and m.is_file():
            man = json.loads(m.read_text())
            builds[label] = {"path": path, "bytes": man["model"]["bytes"], "recipe": man["recipe"],
                             "rescued_by": man.get("rescued_by"),
                             "fidelity": {k: man["fidelity"].get(k) for k in ("ppl_float", "ppl", "ppl_increase",
                                                                              "kl_mean", "top1_agreement")}}
        else:
            builds[label] = {"path": path, "bytes": Path(path).stat().st_size}
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": B.cpu_flags(),
              "threads": threads, "prompts": prompts, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "bandwidth_before": bw_before, "bandwidth_after": bw_after, "builds": builds, "summary": summary,
              "samples": samples}
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    for key in sorted(summary):
        s = summary[key]
        print(f"{key}: decode {s['decode_tok_s']:.1f} ({s['decode_range'][0]:.1f}-{s['decode_range'][1]:.1f}) "
              f"tok/s, prefill {s['prefill_tok_s']:.0f}, generation peak {s['peak_rss_generation_mb']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
