"""The lm_head on the last position only (convert.llm_graph.prune_lm_head) against every position, side by side.

    flock /tmp/edgekit-bench.lock python benchmarks/llm_prune_bench.py MODEL_DIR [--threads 1,2] [--rounds 2]

MODEL_DIR: an ORT GenAI model folder (a bundle's model/, or a builder's output). Two copies are made in a temporary
folder, one of them pruned (only model.onnx differs); each round runs both (and the pruned one with the prompt in
one piece as well as in the runtime's PREFILL_CHUNK pieces), each in a fresh process, the order alternating by
round: TTFT, prefill tok/s and the generation's peak RSS (edgekit.runtime LanguageModel.benchmark, 3 runs after a
warm-up, 16 new tokens) at prompts of 128 and 512 tokens. JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

_WORKER = r"""
import json, sys
import edgekit.runtime.llm as L
folder, threads, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
L.PREFILL_CHUNK = chunk
lm = L.load_llm(folder, threads=threads, spinning=True)
out = {}
for pt in (128, 512):
    d = lm.benchmark(runs=3, warmup=1, prompt_tokens=pt, new_tokens=16)
    out[pt] = {k: d.get(k) for k in ("ttft_ms", "prefill_tok_s", "peak_rss_generation_mb")}
print(json.dumps(out))
"""


def _run(folder: Path, threads: int, chunk: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    p = subprocess.run([sys.executable, "-c", _WORKER, str(folder), str(threads), str(chunk)], capture_output=True,
                       text=True, env=env, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"worker failed on {folder}: {p.stderr.strip().splitlines()[-1:]}")
    return {int(k): v for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "llm_prune_bench.json"))
    args = ap.parse_args(argv)
    from edgekit.convert.llm_graph import lm_head_pruned, prune_lm_head, unpruned
    from edgekit.runtime.llm import PREFILL_CHUNK

    src = Path(args.model_dir)
    with tempfile.TemporaryDirectory(prefix="edgekit-prune-bench-") as tmp:
        every, last = Path(tmp) / "every", Path(tmp) / "last"
        shutil.copytree(src, every)
        if lm_head_pruned(every):   # a pruned bundle: its graph with the pruning taken out
            import onnx

            onnx.save(unpruned(every), str(every / "model.onnx"))
        shutil.copytree(every, last)
        prune_lm_head(last)
        configs = [("every position", every, PREFILL_CHUNK), ("last position", last, PREFILL_CHUNK),
                   ("last position, prompt in one piece", last, 100000)]
        rows = []
        for threads in [int(t) for t in args.threads.split(",")]:
            for r in range(args.rounds):
                order = configs if r % 2 == 0 else configs[::-1]
                for name, folder, chunk in order:
                    load = os.getloadavg()[0]
                    got = _run(folder, threads, chunk)
                    for pt, m in got.items():
                        rows.append(dict(m, lm_head=name, threads=threads, round=r, prompt_tokens=pt,
                                         prefill_chunk=chunk, load_before=round(load, 2)))
                        print(f"{threads} thread(s) round {r} {name:36s} prompt {pt:4d}: TTFT {m['ttft_ms']:7.1f} ms, "
                              f"prefill {m['prefill_tok_s']:6.1f} tok/s, peak {m['peak_rss_generation_mb']:.1f} MiB",
                              flush=True)
    Path(args.out).write_text(json.dumps({"model_dir": str(src), "rows": rows, "cpu": _cpu(),
                                          "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                         indent=1))
    return 0


def _cpu() -> str:
    from edgekit.runtime.cpuid import cpu_flags

    flags = cpu_flags()
    return "x86-64 AVX-512 VNNI" if "avx512_vnni" in flags else ("x86-64 AVX2" if "avx2" in flags else "other")


if __name__ == "__main__":
    sys.exit(main())
