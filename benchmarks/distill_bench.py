"""Issue 23's distillation goal, measured: a causal LM student distilled from its teacher against the same
student trained on the same tokens without the teacher (held-out perplexity, mean of 3 seeds).

    python benchmarks/distill_bench.py [--steps 60] [--seeds 0,1,2] [--int4-target x86-avx2]

The teacher is tests/tinylm.py's tiny Llama (4 layers, hidden 128, trained here); the text is more of its
language (another seed), the held-out text a third. Two students of half the teacher's layers: fresh
weights (init random) and the teacher's layers 0 and 3 (init teacher). Each is trained `--steps` steps of
8 blocks x 32 tokens, T=1, alpha=0.5, forward KL; its baseline has the same initial weights, steps, blocks
and order, with cross-entropy alone. Results: benchmarks/results/distill_bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--inits", default="random,teacher")
    ap.add_argument("--int4-target", default=None, help="also convert teacher and student to INT4 (decode tok/s)")
    ap.add_argument("--variants", action="store_true",
                    help="instead: fresh-weight students with reverse KL, JSD, 25%% on-policy steps (GKD) and "
                         "teacher answers to 24 prompts, each against the same baseline, added to the results")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill_bench.json"))
    a = ap.parse_args()

    import torch
    from tinylm import corpus_text, make_tiny_lm

    from edgekit.optimize.distill_lm import LMDistillConfig, distill_lm

    seeds = [int(s) for s in a.seeds.split(",")]
    if a.variants:
        return variants(a, seeds)
    res = {"what": "held-out perplexity of a half-depth student distilled from the tiny Llama teacher vs the same "
                   "student trained without the teacher on the same tokens",
           "host": {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
           "settings": {"steps": a.steps, "batch_size": 8, "seq_len": 32, "lr": 3e-3, "temperature": 1.0,
                        "alpha": 0.5, "divergence": "forward", "student_layers": 2, "teacher_layers": 4},
           "runs": [], "summary": {}}
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as d:
        d = Path(d)
        t0 = time.monotonic()
        teacher = make_tiny_lm(d / "teacher", steps=150)
        res["teacher_training_s"] = time.monotonic() - t0
        (d / "train.txt").write_text(corpus_text(800, 11))
        (d / "val.txt").write_text(corpus_text(150, 12))
        for init in a.inits.split(","):
            for seed in seeds:
                t0 = time.monotonic()
                cfg = LMDistillConfig(teacher=str(teacher), data=str(d / "train.txt"), val=str(d / "val.txt"),
                                      layers=2, init=init, seq_len=32, batch_size=8, max_steps=a.steps, lr=3e-3,
                                      temperature=1.0, alpha=0.5, seed=seed, baseline=True)
                r = distill_lm(cfg, str(d / f"student-{init}-{seed}"), say=lambda t: None,
                               int4_target=a.int4_target if seed == seeds[0] and init == "random" else None)
                row = {"init": init, "seed": seed, "teacher_ppl": r["teacher"]["heldout"]["ppl"],
                       "student_ppl": r["student"]["heldout"]["ppl"], "baseline_ppl": r["baseline"]["heldout"]["ppl"],
                       "student_kl": r["student"]["heldout"]["kl"], "baseline_kl": r["baseline"]["heldout"]["kl"],
                       "student_top1": r["student"]["heldout"]["top1_agreement"],
                       "baseline_top1": r["baseline"]["heldout"]["top1_agreement"],
                       "reduction": r["ppl_reduction_vs_baseline"], "tokens": r["student"]["tokens"],
                       "baseline_tokens": r["baseline"]["tokens"], "student_params": r["student"]["params"],
                       "teacher_params": r["teacher"]["params"], "heldout_tokens": r["heldout_tokens"],
                       "seconds": time.monotonic() - t0}
                if r["int4"].get("measured"):
                    row["int4"] = {w: {k: r["int4"][w].get(k) for k in ("decode_tok_s", "bytes", "fidelity")}
                                   for w in ("teacher", "student")}
                res["runs"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "int4"}), flush=True)
        for init in a.inits.split(","):
            rows = [x for x in res["runs"] if x["init"] == init]
            res["summary"][init] = {
                "student_ppl_mean": statistics.mean(x["student_ppl"] for x in rows),
                "baseline_ppl_mean": statistics.mean(x["baseline_ppl"] for x in rows),
                "reduction_mean": statistics.mean(x["reduction"] for x in rows),
                "reduction_min": min(x["reduction"] for x in rows),
                "goal_10pct_met": statistics.mean(x["reduction"] for x in rows) >= 0.10, "seeds": seeds}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["summary"], indent=2))


def variants(a, seeds) -> None:
    import statistics

    import torch
    from tinylm import corpus_text, make_tiny_lm

    from edgekit.optimize.distill_lm import LMDistillConfig, distill_lm

    torch.set_num_threads(1)
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    kinds = {"forward KL": {}, "reverse KL": {"divergence": "reverse"}, "JSD": {"divergence": "jsd"},
             "forward KL + 25% on-policy": {"on_policy": 0.25}, "forward KL + teacher answers": {"prompts": True}}
    table = {}
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as d:
        d = Path(d)
        teacher = make_tiny_lm(d / "teacher", steps=150)
        (d / "train.txt").write_text(corpus_text(800, 11))
        (d / "val.txt").write_text(corpus_text(150, 12))
        objs = ["box", "door", "lamp", "bicycle", "window", "table", "basket", "clock", "radio", "garden"]
        (d / "prompts.txt").write_text("".join(f"What colour is the {o}?\n" for o in objs)
                                       + "".join(f"The {o} in the\n" for o in objs[:7])
                                       + "".join(f"Count: {n}\n" for n in ("one", "two", "three", "four", "five",
                                                                             "six", "seven")))
        for name, kw in kinds.items():
            rows = []
            for seed in seeds:
                kw2 = dict(kw)
                if kw2.pop("prompts", False):
                    kw2["prompts"] = str(d / "prompts.txt")
                    kw2["max_new_tokens"] = 24
                cfg = LMDistillConfig(teacher=str(teacher), data=str(d / "train.txt"), val=str(d / "val.txt"),
                                      layers=2, init="random", seq_len=32, batch_size=8, max_steps=a.steps,
                                      lr=3e-3, temperature=1.0, alpha=0.5, seed=seed, baseline=True, **kw2)
                r = distill_lm(cfg, str(d / f"s-{len(table)}-{seed}"), say=lambda t: None)
                rows.append({"seed": seed, "student_ppl": r["student"]["heldout"]["ppl"],
                             "baseline_ppl": r["baseline"]["heldout"]["ppl"],
                             "reduction": r["ppl_reduction_vs_baseline"], "tokens": r["student"]["tokens"],
                             "student_kl": r["student"]["heldout"]["kl"]})
                print(name, json.dumps(rows[-1]), flush=True)
            table[name] = {"runs": rows, "reduction_mean": statistics.mean(x["reduction"] for x in rows),
                           "student_ppl_mean": statistics.mean(x["student_ppl"] for x in rows)}
    res["variants"] = {"settings": {"steps": a.steps, "init": "random", "seeds": seeds, "threads": 1,
                                    "note": "on-policy steps and teacher-answer blocks count the tokens they train "
                                            "on; the baseline trains on the text blocks only"}, "table": table}
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v["reduction_mean"] for k, v in table.items()}, indent=2))


if __name__ == "__main__":
    main()
