"""Where the OpenAI API's 1-stream overhead goes: the batched engine in-process vs the API, paired by round,
at several ORT intra-op thread counts and spinning settings, with every thread's CPU time and context switches.

    flock /tmp/edgekit-bench.lock python benchmarks/llm_serve_overhead.py [--synth 1024x8] [--configs 1s,1n,2s,2n]
        [--streams 1] [--tokens 256] [--rounds 6] [--pairs N] [--out llm_serve_bench_overhead.json]
    python benchmarks/llm_serve_overhead.py --merge A.json B.json ... --out C.json   (the pairs of A, B as one)

A config is THREADS followed by s (ORT's intra-op threads spin between parallel sections: ORT's default) or n
(they block). For each config the script starts one server (`python -m edgekit.serve --threads T`, the
model's genai_config carrying session.intra_op.allow_spinning) and loads the same engine in this process
(runtime.llm_batch, as llm_serve_bench's "in-process, batched engine"); every round runs each config's two
paths back to back (the order of the configs and of the two paths alternating round by round), so each API
figure has an in-process figure of the same round beside it. Per run: tok/s (every token over the wall time,
TTFT included, as llm_serve_bench), decode tok/s, the load average, the client's CPU (the streaming threads'
own thread_time: the parse of the SSE stream) and, per thread of the process that generates (the server or
this one), CPU seconds and voluntary / involuntary context switches per token (/proc/PID/task/*/stat,
status): an involuntary switch is a thread preempted while it wanted to run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from llm_serve_bench import api_path, build_model, conditions, engine_path, start_server  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
SPIN_KEY = "session.intra_op.allow_spinning"


def config_dir(model: Path, cache: Path, spin: bool, extra: Dict[str, str]) -> Path:
    """A folder beside the model whose genai_config sets ORT's intra-op spinning and `extra` session config
    entries (the other files linked)."""
    tag = "".join(f"-{k.split('.')[-1]}{v}" for k, v in sorted(extra.items()))
    out = cache / f"ovh-{model.name}-{'spin' if spin else 'nospin'}{tag}"
    out.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.name != "genai_config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((model / "genai_config.json").read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so[SPIN_KEY] = "1" if spin else "0"
    so.update(extra)
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def threads_of(pid: int) -> Dict[int, Dict]:
    """Per thread of a process: name, CPU seconds, voluntary / involuntary context switches."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
            status = open(f"/proc/{pid}/task/{tid}/status").read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        f = stat.rsplit(")", 1)[1].split()
        sw = {ln.split(":")[0]: int(ln.split()[1]) for ln in status.splitlines() if "ctxt_switches" in ln}
        out[int(tid)] = {"name": name, "cpu": (int(f[11]) + int(f[12])) / TICK,
                         "vcs": sw["voluntary_ctxt_switches"], "ncs": sw["nonvoluntary_ctxt_switches"]}
    return out


def thread_deltas(pid: int, before: Dict[int, Dict], tokens: int, skip=()) -> List[Dict]:
    """Threads that ran during a run: per token CPU ms and switches (skip: this process's client threads)."""
    after = threads_of(pid)
    rows = []
    for tid, a in after.items():
        b = before.get(tid, {"cpu": 0.0, "vcs": 0, "ncs": 0})
        d = {k: a[k] - b[k] for k in ("cpu", "vcs", "ncs")}
        if tid in skip or (d["cpu"] == 0 and d["vcs"] + d["ncs"] < 3):
            continue
        rows.append({"tid": tid, "name": "loop/main" if tid == pid else a["name"],
                     "cpu_ms_per_token": d["cpu"] / tokens * 1e3, "vcs_per_token": d["vcs"] / tokens,
                     "ncs_per_token": d["ncs"] / tokens})
    return sorted(rows, key=lambda r: -r["cpu_ms_per_token"])


def engine_runner(model_dir: Path, threads: int, tokens: int):
    """llm_serve_bench's in-process engine; no client threads, so no client CPU."""
    one_round, close = engine_path(model_dir, threads, tokens)

    def timed(c):
        r = one_round(c)
        r["client_cpu_ms_per_token"] = 0.0
        return r

    return timed, close


def _rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def parse_config(c: str):
    """THREADS then s|n (ORT's intra-op spinning on / off), then ":"-separated flags: gN (the server gathers
    pieces every N ms, --stream-interval-ms; g: 20), f (session.force_spinning_stop: the intra-op threads stop spinning at the end of each
    run), dN (session.intra_op.spin_duration_us N), bN (session.intra_op.spin_backoff_max N)."""
    head, *flags = c.split(":")
    t, spin = int(head[:-1]), head[-1] == "s"
    extra, gather = {}, 0.0
    for f in flags:
        if f[0] == "g":
            gather = float(f[1:] or 20)
        elif f == "f":
            extra["session.force_spinning_stop"] = "1"
        elif f[0] == "d":
            extra["session.intra_op.spin_duration_us"] = f[1:]
        elif f[0] == "b":
            extra["session.intra_op.spin_backoff_max"] = f[1:]
        else:
            raise SystemExit(f"unknown flag {f!r} in config {c!r}")
    return c, t, spin, extra, gather


def pairs(args) -> None:
    """--pairs N: N fresh runs of this script (in turn), then the median over the runs of each config's paired
    figure (API over in-process by round, median within a run)."""
    out = Path(args.out) if "/" in args.out else ROOT / "benchmarks" / "results" / args.out
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--pairs") if "--pairs" in argv else next(j for j, a in enumerate(argv) if a.startswith("--pairs="))
    del argv[i:i + (2 if argv[i] == "--pairs" else 1)]
    runs = []
    for n in range(args.pairs):
        part = out.with_name(f"{out.stem}.pair{n}.json")
        subprocess.run([sys.executable, __file__, *argv, "--out", str(part)], check=True)
        runs.append(json.loads(part.read_text()))
        part.unlink()
    write_pairs(runs, out)


def write_pairs(runs: List[Dict], out: Path, sources: List[str] = ()) -> None:
    """The median over process pairs (`runs`: one single run's result each) of each config's paired figure."""
    summary = []
    keys = list(dict.fromkeys((r["config"], r["streams"]) for run in runs for r in run["summary"]))
    for config, streams in keys:
        same = [r for run in runs for r in run["summary"] if r["config"] == config and r["streams"] == streams]
        ovh = [r["api_overhead_paired"] for r in same]
        summary.append({"config": config, "streams": streams, "pairs": len(same),
                        "api_overhead_paired_per_pair": [round(x, 4) for x in ovh],
                        "api_overhead_median_over_pairs": float(np.median(ovh)),
                        "engine_tok_s_per_pair": [round(r["engine_tok_s"], 1) for r in same],
                        "api_tok_s_per_pair": [round(r["api_tok_s"], 1) for r in same],
                        "api_ncs_per_token_per_pair": [round(r["api_ncs_per_token"], 3) for r in same],
                        "load": [min(r["load"][0] for r in same), max(r["load"][1] for r in same)]})
        x = summary[-1]
        print(f"c{x['streams']} {x['config']}: API under in-process, median over {len(same)} process pairs "
              f"{x['api_overhead_median_over_pairs'] * 100:+.1f}% (per pair "
              f"{', '.join(f'{v * 100:+.1f}%' for v in ovh)}); load {x['load'][0]:.2f}-{x['load'][1]:.2f}")
    doc = {"pairs": len(runs), "summary": summary, "runs": runs}
    if sources:
        doc["merged_from"] = list(sources)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


def merge(files: List[str], out: Path) -> None:
    """--merge: the process pairs of earlier runs' files (a --pairs run's, or a single run's) as one median;
    they must share the model and the tokens a stream."""
    def fail(msg):
        print(f"--merge: {msg}", file=sys.stderr)
        raise SystemExit(2)

    runs = []
    for f in files:
        try:
            doc = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            fail(f"cannot read {f}: {e}")
        if "pairs" in doc:
            runs.extend(doc["runs"])
        elif "summary" in doc:
            runs.append(doc)
        else:
            fail(f"{f} is not a result of this script (no summary)")
    kinds = {(Path(r["model"]).name, r["tokens_per_stream"]) for r in runs}
    if len(kinds) > 1:
        fail(f"the files measured different models or tokens a stream: {sorted(kinds)}")
    write_pairs(runs, out, [Path(f).name for f in files])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--synth", default="1024x8")
    ap.add_argument("--configs", default="1s,1n,2s,2n", help="comma-separated (see parse_config)")
    ap.add_argument("--streams", default="1")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="llm_serve_bench_overhead.json")
    ap.add_argument("--pairs", type=int, default=1,
                    help="run the whole measurement this many times, each in fresh processes (a server and this "
                         "script), and give the median of their paired figures: one pair of processes keeps an "
                         "offset of its own over all its rounds")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="measure nothing: the median over all the process pairs of these earlier results "
                         "(--pairs runs or single runs), written to --out")
    args = ap.parse_args()
    if args.merge:
        out = Path(args.out) if "/" in args.out else ROOT / "benchmarks" / "results" / args.out
        return merge(args.merge, out)
    if args.pairs > 1:
        return pairs(args)
    cache = ROOT / "benchmarks" / ".cache"
    model = Path(args.model) if args.model else build_model(cache, args.synth)
    configs = [parse_config(c) for c in args.configs.split(",")]
    streams = [int(s) for s in args.streams.split(",")]
    client_tids: set = set()
    runners, servers = {}, []
    result = {"model": str(model), "tokens_per_stream": args.tokens, "conditions_before": conditions(0),
              "runs": []}
    try:
        for key, t, spin, extra, gather in configs:
            d = config_dir(model, cache, spin, extra)
            name = "bench" + "".join(ch if ch.isalnum() else "-" for ch in key)
            proc, port = start_server(d, t, cache / f"ovh-server-{name}.log", gather, name=name,
                                      timeout_s=180)
            servers.append(proc)
            eng, close = engine_runner(d, t, args.tokens)
            runners[key] = {"threads": t, "spinning": spin, "close": close,
                            "paths": [("engine", eng, os.getpid()),
                                      ("api", api_path(port, args.tokens, client_tids)[0], proc.pid)]}
        for r in runners.values():          # warm-up
            for _, run, _ in r["paths"]:
                run(1)
        for c in streams:
            for rnd in range(args.rounds):
                keys = list(runners) if rnd % 2 == 0 else list(runners)[::-1]
                for key in keys:
                    paths = runners[key]["paths"]
                    for path, run, pid in (paths if (rnd // 2) % 2 == 0 else paths[::-1]):
                        before = threads_of(pid)
                        res = run(c)
                        rows = thread_deltas(pid, before, res["tokens"], skip=client_tids)
                        run_rec = {"config": key, "threads": runners[key]["threads"],
                                   "spinning": runners[key]["spinning"], "path": path, "streams": c, "round": rnd,
                                   "tok_s": res["throughput_tok_s"], "decode_tok_s": res["decode_tok_s"],
                                   "ttft_ms": float(np.median(res["ttft"])) * 1e3,
                                   "client_cpu_ms_per_token": res["client_cpu_ms_per_token"],
                                   "cpu_ms_per_token": sum(x["cpu_ms_per_token"] for x in rows),
                                   "ncs_per_token": sum(x["ncs_per_token"] for x in rows),
                                   "threads_detail": rows, "loadavg": os.getloadavg()}
                        result["runs"].append(run_rec)
                        print(f"c{c} r{rnd} {key} {path:6} {res['throughput_tok_s']:7.1f} tok/s cpu "
                              f"{run_rec['cpu_ms_per_token']:.2f} ms/tok client {res['client_cpu_ms_per_token']:.3f} "
                              f"ncs/tok {run_rec['ncs_per_token']:.3f} load {run_rec['loadavg'][0]:.2f}", flush=True)
    finally:
        for r in runners.values():
            r["close"]()
        for p in servers:
            p.terminate()
            p.wait(30)
    result["conditions_after"] = conditions(0)
    summary = []
    for c in streams:
        for key in runners:
            runs = [x for x in result["runs"] if x["config"] == key and x["streams"] == c]
            by = {p: [x for x in runs if x["path"] == p] for p in ("engine", "api")}
            ratios = [a["tok_s"] / e["tok_s"] for a, e in zip(by["api"], by["engine"])]
            row = {"config": key, "streams": c, "threads": runners[key]["threads"],
                   "spinning": runners[key]["spinning"],
                   "engine_tok_s": float(np.median([x["tok_s"] for x in by["engine"]])),
                   "api_tok_s": float(np.median([x["tok_s"] for x in by["api"]])),
                   "api_over_engine_rounds": [round(x, 3) for x in ratios],
                   "api_overhead_paired": 1 - float(np.median(ratios)),
                   "engine_cpu_ms_per_token": float(np.median([x["cpu_ms_per_token"] for x in by["engine"]])),
                   "api_server_cpu_ms_per_token": float(np.median([x["cpu_ms_per_token"] for x in by["api"]])),
                   "client_cpu_ms_per_token": float(np.median([x["client_cpu_ms_per_token"] for x in by["api"]])),
                   "engine_ncs_per_token": float(np.median([x["ncs_per_token"] for x in by["engine"]])),
                   "api_ncs_per_token": float(np.median([x["ncs_per_token"] for x in by["api"]])),
                   "load": [min(x["loadavg"][0] for x in runs), max(x["loadavg"][0] for x in runs)]}
            summary.append(row)
            print(f"c{c} {key}: engine {row['engine_tok_s']:.1f} API {row['api_tok_s']:.1f} tok/s, paired overhead "
                  f"{row['api_overhead_paired'] * 100:+.1f}% {row['api_over_engine_rounds']}; CPU ms/tok engine "
                  f"{row['engine_cpu_ms_per_token']:.2f} server {row['api_server_cpu_ms_per_token']:.2f} client "
                  f"{row['client_cpu_ms_per_token']:.3f}; involuntary switches/tok engine {row['engine_ncs_per_token']:.3f} "
                  f"server {row['api_ncs_per_token']:.3f}; load {row['load'][0]:.2f}-{row['load'][1]:.2f}")
    result["summary"] = summary
    out = Path(args.out) if "/" in args.out else ROOT / "benchmarks" / "results" / args.out
    # compact: a line per run (every thread of every run is recorded)
    out.write_text(json.dumps(_rounded(result), separators=(",", ":")).replace('},{"config"', '},\n{"config"') + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
