"""Serving a language model: in-process generation vs the OpenAI-compatible API at 1, 4 and 8 concurrent
streams: aggregate decode tok/s, TTFT p50/p99, inter-token p50/p99.

    python benchmarks/llm_serve_bench.py [--model DIR] [--synth 1024x8] [--tokens 96] [--rounds 3]
                                         [--threads 2] [--out llm_serve_bench.json]

Model: --model (an LLM bundle or a bare ONNX Runtime GenAI folder); by default tests/tinylm.py's tiny Llama
(hidden 128, 4 layers: ~1 MB of INT4 weights, which sit in the CPU's caches: its decode is NOT memory-bound);
--synth HIDDENxLAYERS builds a wider Llama of the same kind (one training step: throughput only, its text is
noise) with ORT GenAI's builder, INT4 for the CPU, cached under benchmarks/.cache.

Rows, each with `c` streams started together, every stream generating exactly --tokens tokens (greedy; the
end-of-sequence token is suppressed so every row does the same work):
- "in-process, generator per stream": c threads, each an onnxruntime_genai Generator (what
  edgekit.runtime's lm.generate runs); each reads the weights once per token of its own;
- "in-process, batched engine": edgekit.serve.llm_engine without HTTP: the continuous-batching engine the
  server runs (the c sequences decode as one batch, one read of the weights per step);
- "API (stream=true)": `python -m edgekit.serve` in its own process, c client threads streaming
  /v1/completions over loopback (raw http.client, SSE parsed); the clients run on the same machine.
Aggregate decode tok/s: tokens after each stream's first, over the wall time from the first stream's first
token to the last stream's last token. TTFT: request (or call) to first token. Inter-token: gaps between
consecutive tokens of a stream, over all streams (for the API, as the client receives them). p50 over
--rounds rounds of the aggregate figures, the percentiles over all rounds' samples. The machine's load and
CPU are recorded: on a shared machine the figures move with its load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
CONCURRENCY = (1, 4, 8)
PROMPTS = ["The robot moves the", "Count: one two", "The busy baker", "A small cat", "The old engineer repairs",
           "Count: five six", "My neighbour likes the", "The quiet child"]


def build_model(cache: Path, synth: str) -> Path:
    """The tiny Llama (or a wider one: HIDDENxLAYERS) as an INT4 CPU ONNX Runtime GenAI folder, cached."""
    tag = synth or "tiny"
    out = cache / f"llm-{tag}-int4"
    if (out / "genai_config.json").is_file():
        return out
    from tinylm import make_tiny_lm

    hf = cache / f"hf-{tag}"
    if not (hf / "config.json").is_file():
        if synth:
            hidden, layers = (int(v) for v in synth.lower().split("x"))
            make_tiny_lm(hf, steps=1, hidden=hidden, layers=layers)
        else:
            make_tiny_lm(hf)
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
                    "-p", "int4", "-e", "cpu", "-c", str(cache / "builder-cache")], check=True,
                   stdout=subprocess.DEVNULL)
    os.replace(tmp, out)
    return out


def _pct(xs: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _summary(streams: List[Dict]) -> Dict:
    """streams: {"t0", "times": [token arrival times]} -> aggregate figures of one round."""
    firsts = [s["times"][0] for s in streams]
    lasts = [s["times"][-1] for s in streams]
    decode = sum(len(s["times"]) - 1 for s in streams)
    span = max(lasts) - min(firsts)
    gaps = [b - a for s in streams for a, b in zip(s["times"], s["times"][1:])]
    return {"decode_tok_s": decode / span if span > 0 else float("nan"),
            "ttft": [s["times"][0] - s["t0"] for s in streams], "gaps": gaps,
            "tokens": sum(len(s["times"]) for s in streams)}


def _run_rounds(one_round, c: int, rounds: int) -> Dict:
    res = [one_round(c) for _ in range(rounds)]
    ttft = [t for r in res for t in r["ttft"]]
    gaps = [g for r in res for g in r["gaps"]]
    return {"streams": c, "rounds": rounds, "decode_tok_s": float(np.median([r["decode_tok_s"] for r in res])),
            "decode_tok_s_rounds": [round(r["decode_tok_s"], 1) for r in res],
            "ttft_ms_p50": _pct(ttft, 50) * 1e3, "ttft_ms_p99": _pct(ttft, 99) * 1e3,
            "inter_token_ms_p50": _pct(gaps, 50) * 1e3, "inter_token_ms_p99": _pct(gaps, 99) * 1e3,
            "tokens_per_stream": res[0]["tokens"] // c}


# -- in-process: a Generator per stream (the runtime's path) -------------------------------------------------

def generator_rounds(model_dir: Path, threads: int, tokens: int, rounds: int, c: int) -> Dict:
    from edgekit.runtime.llm import load_llm

    lm = load_llm(model_dir, threads=threads)
    ids = [lm.encode(p) for p in PROMPTS]

    def stream(i, out, start):
        p = ids[i % len(ids)]
        start.wait()
        rec = {"t0": time.perf_counter(), "times": []}
        gen = lm.new_generator(len(p) + tokens, min_length=len(p) + tokens)
        gen.append_tokens(np.asarray(p, dtype=np.int32))
        detok = lm.tokenizer.stream()
        while not gen.is_done():
            gen.generate_next_token()
            detok.decode(int(gen.get_next_tokens()[0]))
            rec["times"].append(time.perf_counter())
        out[i] = rec

    def one_round(c):
        out = [None] * c
        start = threading.Barrier(c)
        ts = [threading.Thread(target=stream, args=(i, out, start)) for i in range(c)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return _summary(out)

    one_round(1)  # warm-up
    return _run_rounds(one_round, c, rounds)


# -- in-process: the server's batching engine without HTTP -----------------------------------------------------

def engine_rounds(model_dir: Path, threads: int, tokens: int, rounds: int, c: int) -> Dict:
    from edgekit.serve.llm_engine import GenSequence, SamplingParams, load_llm_release

    rel = load_llm_release("bench", "0" * 64, model_dir, threads=threads, check=False, max_sequences=8,
                           max_queue=8, kv_cache_mb=None)
    ids = [rel.tokenizer.encode(p) for p in PROMPTS]
    try:
        def one_round(c):
            done = threading.Semaphore(0)
            recs = []
            for i in range(c):
                rec = {"t0": time.perf_counter(), "times": []}
                recs.append(rec)

                def on_events(evs, rec=rec):
                    now = time.perf_counter()
                    for kind, _ in evs:
                        if kind == "text":
                            rec["times"].append(now)
                        else:
                            done.release()

                seq = GenSequence(ids[i % len(ids)], SamplingParams(max_tokens=tokens, temperature=0.0,
                                                                      ignore_eos=True), on_events)
                rec["seq"] = seq
                rel.engine.submit(seq)
            for _ in range(c):
                done.acquire()
            for rec in recs:  # a token that decodes to no text (mid-character) still counts
                rec["times"] = rec["times"] + [rec["times"][-1]] * (rec.pop("seq").completion_tokens - len(rec["times"]))
            return _summary(recs)

        one_round(1)
        return _run_rounds(one_round, c, rounds)
    finally:
        rel.engine.retire()
        rel.engine.join(10)


# -- the API ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_rounds(port: int, tokens: int, rounds: int, c: int) -> Dict:
    def stream(i, out, start):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        body = json.dumps({"model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
                           "temperature": 0, "ignore_eos": True, "stream": True}).encode()
        start.wait()
        rec = {"t0": time.perf_counter(), "times": []}
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        usage_tokens = None
        while True:
            line = r.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                break
            now = time.perf_counter()
            doc = json.loads(line[6:])
            ch = doc["choices"][0]
            if ch["finish_reason"] is None:
                rec["times"].append(now)
            if doc.get("usage"):
                usage_tokens = doc["usage"]["completion_tokens"]
        conn.close()
        if usage_tokens:  # tokens that decoded to no text still count (as arriving with the last piece)
            rec["times"] += [rec["times"][-1]] * (usage_tokens - len(rec["times"]))
        out[i] = rec

    def one_round(c):
        out = [None] * c
        start = threading.Barrier(c)
        ts = [threading.Thread(target=stream, args=(i, out, start)) for i in range(c)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return _summary(out)

    one_round(1)
    return _run_rounds(one_round, c, rounds)


def start_server(model_dir: Path, threads: int, log: Path) -> (subprocess.Popen, int):
    port = _free_port()
    link = log.parent / "bench"   # the model is served under the name "bench"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(model_dir.resolve(), target_is_directory=True)
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.serve", str(link), "--port", str(port), "--threads",
                             str(threads), "--max-sequences", "8", "--no-check"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=str(ROOT),
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not listen within 120 s")


def conditions(threads: int) -> Dict:
    import onnxruntime
    import onnxruntime_genai

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"cpu": cpu, "cpus": os.cpu_count(), "threads": threads, "load_avg": os.getloadavg(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "onnxruntime_genai": onnxruntime_genai.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an LLM bundle or ORT GenAI folder (default: the tiny Llama, built here)")
    ap.add_argument("--synth", default="", help="HIDDENxLAYERS: a wider Llama built here (throughput only)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="llm_serve_bench.json")
    args = ap.parse_args()
    cache = ROOT / "benchmarks" / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_model(cache, args.synth)
    from edgekit.runtime.llm import load_llm

    lm = load_llm(model, threads=args.threads)
    weights = lm.model_bytes()
    del lm
    result = {"model": str(model if args.model else f"tinylm {args.synth or 'hidden128x4'}"),
              "weights_bytes": weights, "tokens_per_stream": args.tokens, "conditions_before": conditions(args.threads),
              "rows": []}
    for c in CONCURRENCY:
        print(f"streams {c}: generator per stream ...", flush=True)
        result["rows"].append(dict(generator_rounds(model, args.threads, args.tokens, args.rounds, c),
                                   path="in-process, generator per stream"))
        print(f"streams {c}: batched engine ...", flush=True)
        result["rows"].append(dict(engine_rounds(model, args.threads, args.tokens, args.rounds, c),
                                   path="in-process, batched engine"))
    log = cache / "llm_serve_bench.server.log"
    proc, port = start_server(model, args.threads, log)
    try:
        for c in CONCURRENCY:
            print(f"streams {c}: API ...", flush=True)
            result["rows"].append(dict(api_rounds(port, args.tokens, args.rounds, c), path="API (stream=true)"))
    finally:
        proc.terminate()
        proc.wait(30)
    result["conditions_after"] = conditions(args.threads)
    by = {(r["path"], r["streams"]): r for r in result["rows"]}
    one = by[("in-process, generator per stream", 1)]["decode_tok_s"]
    result["api_overhead_1_stream"] = 1 - by[("API (stream=true)", 1)]["decode_tok_s"] / one
    result["api_4_over_1"] = by[("API (stream=true)", 4)]["decode_tok_s"] / by[("API (stream=true)", 1)]["decode_tok_s"]
    print(f"{'path':36} {'streams':>7} {'decode tok/s':>12} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7}")
    for r in sorted(result["rows"], key=lambda r: (r["streams"], r["path"])):
        print(f"{r['path']:36} {r['streams']:>7} {r['decode_tok_s']:>12.1f} {r['ttft_ms_p50']:>8.1f}m "
              f"{r['ttft_ms_p99']:>6.1f}m {r['inter_token_ms_p50']:>7.2f}m {r['inter_token_ms_p99']:>6.2f}m")
    print(f"API overhead at 1 stream vs the runtime's generator: {result['api_overhead_1_stream'] * 100:+.1f}% "
          f"(goal <= 3%); API 4 streams / 1 stream: {result['api_4_over_1']:.2f}x (goal >= 2x, memory-bound model)")
    out = ROOT / "benchmarks" / "results" / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
