"""Serving a language model: in-process generation vs the OpenAI-compatible API at 1, 4 and 8 concurrent
streams: aggregate decode tok/s, TTFT p50/p99, inter-token p50/p99.

    python benchmarks/llm_serve_bench.py [--model DIR] [--synth 1024x8] [--tokens 96] [--rounds 3]
                                         [--threads 2] [--streams 1,4,8] [--out llm_serve_bench.json]
    python benchmarks/llm_serve_bench.py --model DIR --long-prompt 1024 [--chunks 0,100000]
        (instead: a running stream's inter-token gaps while a 1024-token prompt arrives, with the engine's
        chunking (0) and in one piece; --out llm_serve_bench_long_prompt.json)

Model: --model (an LLM bundle or a bare ONNX Runtime GenAI folder); by default tests/tinylm.py's tiny Llama
(hidden 128, 4 layers: ~1 MB of INT4 weights, which sit in the CPU's caches: its decode is NOT memory-bound);
--synth HIDDENxLAYERS builds a wider Llama of the same kind (one training step: throughput only, its text is
noise) with ORT GenAI's builder, INT4 for the CPU, cached under benchmarks/.cache.

Rows, each with `c` streams started together, every stream generating exactly --tokens tokens (greedy; the
end-of-sequence token is suppressed so every row does the same work):
- "in-process, generator per stream": c threads, each an onnxruntime_genai Generator (what
  edgekit.runtime's lm.generate runs); each reads the weights once per token of its own;
- "in-process, batched engine": edgekit.runtime.llm_batch without HTTP: the continuous-batching engine the
  server runs (the c sequences decode as one batch, one read of the weights per step);
- "API (stream=true)": `python -m edgekit.serve` in its own process, c client threads streaming
  /v1/completions over loopback (raw http.client, SSE parsed); the clients run on the same machine. The
  server writes every token (--stream-interval-ms 0: a wake-up of its event loop, and of the client, per
  token);
- "API (stream=true, --stream-interval-ms auto)": the same with a second server at --second-interval (auto, the
  server's default: where the model's threads take every CPU, as --threads 2 on this project's 2-core machine,
  pieces that come faster than 20 ms are sent together, each still its own SSE event; else a write per token).
tok/s (the aggregate figure compared): every generated token of the round over its wall time (start to the last
stream's last token: prefill and TTFT included). "decode": tokens after each stream's first over the time
from the first stream's first token to the last one's last (for the API as the client receives them: pieces
that arrive together shorten that span, so it reads high there). TTFT: request (or call) to the first piece of text (what a client sees; a token that decodes to no text yet,
a special token or part of a character, counts as arriving with the next piece, on every path alike). Inter-token: gaps between
consecutive pieces of text of a stream, over all streams (for the API, as the client receives them). The paths take turns round by round (the server runs
beside the in-process models), so a change in the machine's load lands on all of them. CPU ms/token:
the CPU time (all threads) of the process that generates (this one in-process, the server's for the API) per
generated token: unlike wall-clock figures it hardly moves with the machine's load. Preempted/token: involuntary
context switches of that process's threads per token (a decode thread taken off its core mid-step by the event
loop, the client or other work: what the API's wake-ups cost where ONNX Runtime holds every core). p50 over
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
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
CONCURRENCY = "1,4,8"
GATHERED = "API (stream=true, --stream-interval-ms auto)"
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
    r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
                        "-p", "int4", "-e", "cpu", "-c", str(cache / "builder-cache")], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"ORT GenAI's builder failed:\n{r.stderr[-3000:]}")
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
    wall = max(lasts) - min(s["t0"] for s in streams)
    return {"decode_tok_s": decode / span if span > 0 else float("nan"),
            "throughput_tok_s": sum(len(s["times"]) for s in streams) / wall,
            "ttft": [s["times"][0] - s["t0"] for s in streams], "gaps": gaps,
            "tokens": sum(len(s["times"]) for s in streams)}


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process so far."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _preempted(pid: int) -> int:
    """Involuntary context switches of a process's threads so far (a thread preempted while it wanted to run)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            n += next(int(ln.split()[1]) for ln in open(f"/proc/{pid}/task/{tid}/status")
                      if ln.startswith("nonvoluntary_ctxt_switches"))
        except OSError:  # a thread that ended meanwhile
            pass
    return n


def _measure(one_round, c: int, pid: int) -> Dict:
    """One round of `c` streams, with the generating process's CPU time and involuntary switches."""
    cpu0, ncs0 = _proc_cpu(pid), _preempted(pid)
    r = one_round(c)
    r["cpu_ms_per_token"] = (_proc_cpu(pid) - cpu0) / r["tokens"] * 1e3
    r["preempted_per_token"] = (_preempted(pid) - ncs0) / r["tokens"]
    r["load_1min"] = os.getloadavg()[0]
    return r


def _aggregate(res: List[Dict], c: int) -> Dict:
    ttft = [t for r in res for t in r["ttft"]]
    gaps = [g for r in res for g in r["gaps"]]
    return {"streams": c, "rounds": len(res),
            "throughput_tok_s": float(np.median([r["throughput_tok_s"] for r in res])),
            "throughput_tok_s_rounds": [round(r["throughput_tok_s"], 1) for r in res],
            "decode_tok_s": float(np.median([r["decode_tok_s"] for r in res])),
            "decode_tok_s_rounds": [round(r["decode_tok_s"], 1) for r in res],
            "ttft_ms_p50": _pct(ttft, 50) * 1e3, "ttft_ms_p99": _pct(ttft, 99) * 1e3,
            "inter_token_ms_p50": _pct(gaps, 50) * 1e3, "inter_token_ms_p99": _pct(gaps, 99) * 1e3,
            "tokens_per_stream": res[0]["tokens"] // c,
            "cpu_ms_per_token": float(np.median([r["cpu_ms_per_token"] for r in res])),
            "preempted_per_token": float(np.median([r["preempted_per_token"] for r in res])),
            "load_1min_rounds": [round(r["load_1min"], 2) for r in res]}


# -- in-process: a Generator per stream (the runtime's path) -------------------------------------------------

def generator_path(model_dir: Path, threads: int, tokens: int):
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
        n = 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
            if detok.decode(int(gen.get_next_tokens()[0])):  # a piece of text (as a client would see it)
                rec["times"].append(time.perf_counter())
        rec["times"] += [rec["times"][-1]] * (n - len(rec["times"]))
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

    return one_round, (lambda: None)


# -- in-process: the server's batching engine without HTTP -----------------------------------------------------

def engine_path(model_dir: Path, threads: int, tokens: int):
    from edgekit.runtime.llm_batch import GenSequence, SamplingParams, load_llm_release

    rel = load_llm_release("bench", "0" * 64, model_dir, threads=threads, check=False, max_sequences=8,
                           max_queue=8, kv_cache_mb=None)
    ids = [rel.tokenizer.encode(p) for p in PROMPTS]

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

    def close():
        rel.engine.retire()
        rel.engine.join(10)

    return one_round, close


# -- the API ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _served_name(port: int) -> str:
    """The id the server gives its one language model (a bundle is served under its manifest's name, a bare
    folder under the link's, "bench")."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/v1/models")
    r = conn.getresponse()
    assert r.status == 200, r.read()
    return json.loads(r.read())["data"][0]["id"]


def api_path(port: int, tokens: int, client_tids: Optional[set] = None):
    """client_tids: when given, each stream's thread id goes into it and its CPU time is measured
    (client_cpu_ms_per_token in each round's summary)."""
    name = _served_name(port)

    def stream(i, out, start):
        if client_tids is not None:
            client_tids.add(threading.get_native_id())
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        body = json.dumps({"model": name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
                           "temperature": 0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        start.wait()
        cpu0 = time.thread_time()
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
            ch = doc["choices"][0] if doc["choices"] else {"finish_reason": "usage"}
            if ch["finish_reason"] is None:
                rec["times"].append(now)
            if doc.get("usage"):
                usage_tokens = doc["usage"]["completion_tokens"]
        conn.close()
        if usage_tokens:  # tokens that decoded to no text still count (as arriving with the last piece)
            rec["times"] += [rec["times"][-1]] * (usage_tokens - len(rec["times"]))
        rec["cpu"] = time.thread_time() - cpu0
        out[i] = rec

    def one_round(c):
        out = [None] * c
        start = threading.Barrier(c)
        ts = [threading.Thread(target=stream, args=(i, out, start)) for i in range(c)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        r = _summary(out)
        if client_tids is not None:
            r["client_cpu_ms_per_token"] = sum(o["cpu"] for o in out) / r["tokens"] * 1e3
        return r

    return one_round, (lambda: None)


def start_server(model_dir: Path, threads: int, log: Path, interval_ms=None, name: str = "bench",
                 timeout_s: float = 120) -> (subprocess.Popen, int):
    port = _free_port()
    link = log.parent / name   # a bare folder is served under the link's name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(model_dir.resolve(), target_is_directory=True)
    interval = [] if interval_ms is None else ["--stream-interval-ms", str(interval_ms)]   # None: the default
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.serve", str(link), "--port", str(port), "--threads",
                             str(threads), "--max-sequences", "8", "--no-check", *interval],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=str(ROOT),
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not listen within {timeout_s:g} s")


# -- a long prompt arriving while a stream decodes ----------------------------------------------------------

def long_prompt_bench(model_dir: Path, threads: int, prompt_tokens: int, chunks: List[int], rounds: int) -> Dict:
    """Inter-token gaps of a running stream (the batched engine in-process) while a prompt of `prompt_tokens`
    arrives, for each long-prompt chunk size (llm_batch.PREFILL_CHUNK; 0: the engine's own, sized by time;
    one bigger than the prompt: read in one piece, no decode step in between), the settings taking turns
    round by round."""
    from edgekit.runtime import llm_batch
    from edgekit.runtime.llm_batch import GenSequence, SamplingParams, load_llm_release
    from tinylm import corpus_text

    rel = load_llm_release("bench", "0" * 64, model_dir, threads=threads, check=False, max_sequences=4,
                           max_queue=4, kv_cache_mb=None)
    text = ""
    while len(rel.tokenizer.encode(text)) < prompt_tokens:
        text += corpus_text(200, seed=len(text)) + " "
    long_ids = rel.tokenizer.encode(text)[:prompt_tokens]
    short = rel.tokenizer.encode(PROMPTS[0])
    res: Dict[int, Dict[str, List[float]]] = {c: {"gap_during_ms": [], "gap_max_ms": [], "gap_before_ms": [],
                                                  "long_ttft_ms": []} for c in chunks}
    try:
        for r in range(rounds):
            for c in chunks:
                llm_batch.PREFILL_CHUNK = c or None
                times, long_first, done = [], [], threading.Semaphore(0)

                def on_a(evs):
                    now = time.perf_counter()
                    times.extend(now for k, _ in evs if k == "text")
                    if any(k != "text" for k, _ in evs):
                        done.release()

                def on_b(evs):
                    if not long_first:
                        long_first.append(time.perf_counter())
                    if any(k != "text" for k, _ in evs):
                        done.release()

                a = GenSequence(short, SamplingParams(max_tokens=100000, ignore_eos=True), on_a)
                rel.engine.submit(a)
                while len(times) < 30:
                    time.sleep(0.002)
                t0 = time.perf_counter()
                rel.engine.submit(GenSequence(long_ids, SamplingParams(max_tokens=4, ignore_eos=True), on_b))
                while not long_first:
                    time.sleep(0.002)
                n_first = len(times)
                while len(times) < n_first + 20:
                    time.sleep(0.002)
                a.cancel()
                rel.engine.wake()
                done.acquire()
                done.acquire()
                gaps = [(a, b) for a, b in zip(times, times[1:])]
                during = [(b - a) * 1e3 for a, b in gaps if b > t0 and a < long_first[0]]   # overlapping the prefill
                before = [(b - a) * 1e3 for a, b in gaps if b <= t0]
                res[c]["gap_during_ms"] += during
                res[c]["gap_max_ms"].append(max(during) if during else float("nan"))
                res[c]["gap_before_ms"] += before[5:]
                res[c]["long_ttft_ms"].append((long_first[0] - t0) * 1e3)
                print(f"round {r + 1} chunk {c}: long TTFT {(long_first[0] - t0) * 1e3:.0f} ms, "
                      f"{len(during)} gaps meanwhile, max {res[c]['gap_max_ms'][-1]:.0f} ms", flush=True)
    finally:
        rel.engine.retire()
        rel.engine.join(10)
    rows = []
    for c in chunks:
        d = res[c]
        rows.append({"prefill_chunk": c or "by time", "interleaved": c < prompt_tokens, "rounds": rounds,
                     "inter_token_ms_p50_before_arrival": _pct(d["gap_before_ms"], 50),
                     "inter_token_ms_p99_before_arrival": _pct(d["gap_before_ms"], 99),
                     "inter_token_ms_p50_while_prefilling": _pct(d["gap_during_ms"], 50),
                     "inter_token_ms_p99_while_prefilling": _pct(d["gap_during_ms"], 99),
                     "inter_token_ms_max_while_prefilling": d["gap_max_ms"],
                     "long_prompt_ttft_ms": d["long_ttft_ms"],
                     "long_prompt_ttft_ms_p50": _pct(d["long_ttft_ms"], 50)})
    return {"prompt_tokens": prompt_tokens, "threads": threads, "rows": rows}


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
    ap.add_argument("--second-interval", default="auto",
                    help="the second API server's --stream-interval-ms (default auto, the server's default; the first "
                         "server writes every token, 0)")
    ap.add_argument("--streams", default=CONCURRENCY, help="concurrent streams per row (comma-separated)")
    ap.add_argument("--long-prompt", type=int, default=0,
                    help="instead: a running stream's inter-token gaps while a prompt of this many tokens arrives")
    ap.add_argument("--chunks", default="0,100000",
                    help="with --long-prompt: chunk sizes compared (0: sized by time, the default)")
    args = ap.parse_args()
    cache = ROOT / "benchmarks" / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_model(cache, args.synth)
    if args.long_prompt:
        before = conditions(args.threads)
        res = long_prompt_bench(model, args.threads, args.long_prompt, [int(c) for c in args.chunks.split(",")],
                                args.rounds)
        res.update(model=str(model), conditions_before=before, conditions_after=conditions(args.threads))
        for r in res["rows"]:
            print(f"chunk {r['prefill_chunk']!s:>7}: ITL p50/p99 before {r['inter_token_ms_p50_before_arrival']:.1f}/"
                  f"{r['inter_token_ms_p99_before_arrival']:.1f} ms, while a {args.long_prompt}-token prompt is read "
                  f"{r['inter_token_ms_p50_while_prefilling']:.1f}/{r['inter_token_ms_p99_while_prefilling']:.1f} ms "
                  f"(max {max(r['inter_token_ms_max_while_prefilling']):.0f}), its TTFT p50 "
                  f"{r['long_prompt_ttft_ms_p50']:.0f} ms")
        out = Path(args.out) if "/" in args.out else ROOT / "benchmarks" / "results" / args.out
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {out}")
        return
    from edgekit.runtime.llm import load_llm

    lm = load_llm(model, threads=args.threads)
    weights = lm.model_bytes()
    del lm
    result = {"model": str(model if args.model else f"tinylm {args.synth or 'hidden128x4'}"),
              "weights_bytes": weights, "tokens_per_stream": args.tokens, "conditions_before": conditions(args.threads),
              "rows": []}
    log = cache / "llm_serve_bench.server.log"
    proc, port = start_server(model, args.threads, log, 0)
    # the same server gathering the pieces that come faster than --second-interval (auto: its default)
    proc0, port0 = start_server(model, args.threads, cache / "llm_serve_bench.server0.log", args.second_interval)
    from edgekit.serve.openai_api import auto_stream_interval_ms

    result["second_server_stream_interval_ms"] = (auto_stream_interval_ms(args.threads)
                                                  if args.second_interval == "auto" else float(args.second_interval))
    paths = [("in-process, generator per stream", generator_path(model, args.threads, args.tokens), os.getpid()),
             ("in-process, batched engine", engine_path(model, args.threads, args.tokens), os.getpid()),
             ("API (stream=true)", api_path(port, args.tokens), proc.pid),
             (GATHERED, api_path(port0, args.tokens), proc0.pid)]
    try:
        for _, (one_round, _), _ in paths:
            one_round(1)  # warm-up
        for c in [int(x) for x in args.streams.split(",")]:
            res: Dict[str, List[Dict]] = {name: [] for name, _, _ in paths}
            for r in range(args.rounds):  # the paths take turns, so a change in the machine's load hits all;
                # every other round in reverse order, so none always runs right after another
                for name, (one_round, _), pid in (paths if r % 2 == 0 else paths[::-1]):
                    print(f"streams {c}, round {r + 1}: {name}", flush=True)
                    res[name].append(_measure(one_round, c, pid))
            for name, _, _ in paths:
                result["rows"].append(dict(_aggregate(res[name], c), path=name))
    finally:
        for _, (_, close), _ in paths:
            close()
        for pr in (proc, proc0):
            pr.terminate()
            pr.wait(30)
    result["conditions_after"] = conditions(args.threads)
    by = {(r["path"], r["streams"]): r for r in result["rows"]}
    key = "throughput_tok_s"
    one = by[("in-process, generator per stream", 1)][key]
    result["api_overhead_1_stream"] = 1 - by[("API (stream=true)", 1)][key] / one
    result["api_overhead_1_stream_vs_engine"] = 1 - by[("API (stream=true)", 1)][key] / \
        by[("in-process, batched engine", 1)][key]
    result["api_overhead_1_stream_gathered"] = 1 - by[(GATHERED, 1)][key] / one
    # paired: the API's tok/s over the in-process path's in the same round (each round's two runs are seconds
    # apart, so a change of the machine's load between rounds cancels out), the median over the rounds
    for api, tag in (("API (stream=true)", ""), (GATHERED, "gathered_")):
        for name, ref in (("generator", "in-process, generator per stream"),
                          ("engine", "in-process, batched engine")):
            ratios = [a / b for a, b in zip(by[(api, 1)]["throughput_tok_s_rounds"],
                                            by[(ref, 1)]["throughput_tok_s_rounds"])]
            result[f"api_{tag}overhead_1_stream_paired_vs_{name}"] = 1 - float(np.median(ratios))
            result[f"api_{tag}over_{name}_1_stream_rounds"] = [round(x, 3) for x in ratios]
    for c in (4, 8):
        if ("API (stream=true)", c) in by:
            result[f"api_{c}_over_1"] = by[("API (stream=true)", c)][key] / by[("API (stream=true)", 1)][key]
    print(f"{'path':38} {'streams':>7} {'tok/s':>8} {'decode':>8} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} "
          f"{'p99':>7} {'CPU ms/tok':>10} {'preempt/tok':>11}")
    for r in sorted(result["rows"], key=lambda r: (r["streams"], r["path"])):
        print(f"{r['path']:38} {r['streams']:>7} {r[key]:>8.1f} {r['decode_tok_s']:>8.1f} {r['ttft_ms_p50']:>8.1f}m "
              f"{r['ttft_ms_p99']:>6.1f}m {r['inter_token_ms_p50']:>7.2f}m {r['inter_token_ms_p99']:>6.2f}m "
              f"{r['cpu_ms_per_token']:>10.2f} {r['preempted_per_token']:>11.2f}")
    print(f"API at 1 stream costs {result['api_overhead_1_stream'] * 100:+.1f}% of the runtime's generator's tok/s "
          f"({result['api_overhead_1_stream_vs_engine'] * 100:+.1f}% of the batched engine's) (goal <= 3%); "
          f"paired by round: {result['api_overhead_1_stream_paired_vs_generator'] * 100:+.1f}% of the generator's, "
          f"{result['api_overhead_1_stream_paired_vs_engine'] * 100:+.1f}% of the engine's; --stream-interval-ms "
          f"{args.second_interval}: {result['api_gathered_overhead_1_stream_paired_vs_engine'] * 100:+.1f}% of the engine's"
          + "".join(f"; API {c} streams / 1 stream: {result[f'api_{c}_over_1']:.2f}x" for c in (4, 8)
                    if f"api_{c}_over_1" in result) + " (goal >= 2x at 4, on a memory-bound model)")
    out = Path(args.out) if "/" in args.out else ROOT / "benchmarks" / "results" / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
