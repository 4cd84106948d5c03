"""How each command's result reads for a person: its table(s) and summary lines, in one place.

Elsewhere: a conversion's table is ConvertResult.table() (convert/result.py), latency reports'
runtime.report.bench_table; JSON is each result's own dict. The command modules only echo these.
"""

from __future__ import annotations


# --- targets ---------------------------------------------------------------------

def targets_table(profiles) -> str:
    from edgekit.table import render

    return render(["target", "arch", "cpu", "cores", "accelerator", "formats", "onnx scheme"],
                  [[p.name, p.device.arch, p.device.cpu, p.device.cores, p.device.accelerator,
                    ",".join(p.formats), _scheme(p)] for p in profiles])


def _scheme(p) -> str:
    if "onnx" not in p.formats:
        return "-"
    o = p.onnx
    s = f"{o.quant_format.upper()} {'S' if o.activation_type == 'int8' else 'U'}8" \
        f"{'S' if o.weight_type == 'int8' else 'U'}8"
    if o.per_channel:
        s += " per-channel"
    if o.reduce_range:
        s += " reduce_range"
    if o.symmetric_activations:
        s += " symmetric"
    return s


def profile_text(p) -> str:
    """A profile, section by section, each hardware-driven choice with its reason."""
    import dataclasses

    lines = [f"{p.name}: {p.description}", f"  (from {p.source})"]
    sections = [("device", p.device), ("build", {"formats": p.formats}), ("tflite", p.tflite),
                ("onnx", p.onnx), ("runtime", p.runtime), ("llm", p.llm)]
    for sec, obj in sections:
        lines.append(f"\n[{sec}]")
        items = obj.items() if isinstance(obj, dict) else dataclasses.asdict(obj).items()
        for k, v in items:
            if isinstance(v, (list, tuple)):
                v = ", ".join(map(str, v)) if k != "limitations" else ""
            why = p.reason(f"{sec}.{k}")
            lines.append(f"  {k:<22} {v}")
            if k == "limitations":
                for lim in getattr(obj, "limitations", ()):
                    lines.append(f"      - {lim}")
            if why:
                lines.append(f"      why: {why}")
    return "\n".join(lines)


# --- prune, distill, qat ---------------------------------------------------------

def before_after(rows, title) -> str:
    from edgekit.table import render

    return render(["", "params", "MFLOPs", "float KiB", "gzip KiB", "zeros", "accuracy %", "p50 ms here"],
                  [[label, f["params"], f["flops"] / 1e6, f["tflite_bytes"] / 1024, f["gzip_bytes"] / 1024,
                    f["zero_weights"], f["accuracy"], f["p50_ms"]] for label, f in rows], title=title)


def prune_text(res, method, sparsity, epochs) -> str:
    r = res["ratios"]
    return "\n".join([
        before_after([("before", res["before"]), ("after", res["after"])],
                     f"{method} pruning, sparsity {sparsity}, {epochs} epoch(s) of fine-tuning"),
        f"params x{r['params']:.3f}, FLOPs x{r['flops']:.3f}, p50 x{r['p50']:.3f}, gzip x{r['gzip']:.3f}; "
        f"accuracy drop {res['accuracy_drop']:.2f} points; saved {res['saved']}"])


def distill_text(res, temperature, alpha, epochs, baseline) -> str:
    lines = [before_after([("teacher", res["teacher"]), ("student", res["student"])],
                          f"distillation, T={temperature}, alpha={alpha}, {epochs} epoch(s)")]
    if baseline:
        lines.append(f"same student without the teacher: {res['student_without_teacher']['accuracy']:.2f}% "
                     f"(gain from the teacher {res['gain_from_teacher']:+.2f} points)")
    lines.append(f"saved {res['saved']}; convert it like any model: edgekit convert {res['saved']} -t ...")
    return "\n".join(lines)


def distill_lm_text(res) -> str:
    """A causal LM's distillation: teacher / student / baseline on the held-out text."""
    from edgekit.table import render

    rows = []
    for who in ("teacher", "student", "baseline"):
        r = res.get(who)
        if not isinstance(r, dict):
            continue
        h = r["heldout"]
        i4 = (res.get("int4") or {}).get(who) or {}
        rows.append([who, r["params"] / 1e6, h["ppl"], h.get("kl"), h.get("top1_agreement"), r.get("steps"),
                     r.get("tokens"), i4.get("decode_tok_s")])
    s = res["settings"]
    text = render(["", "M params", "held-out ppl", "KL to teacher", "top-1 agree", "steps", "tokens",
                   "INT4 decode tok/s"], rows,
                  title=f"LM distillation, T={s['temperature']}, alpha={s['alpha']}, {s['divergence']} KL, "
                        f"on-policy {s['on_policy']:g}; held out: {res['heldout_text']}")
    lines = [text]
    if "ppl_reduction_vs_baseline" in res:
        lines.append(f"perplexity {res['ppl_reduction_vs_baseline']:+.1%} lower than the same student trained "
                     "without the teacher")
    if not (res.get("int4") or {}).get("measured"):
        lines.append(f"INT4 decode speed not measured: {(res.get('int4') or {}).get('why', '')}")
    lines.append(f"saved {res['saved']}; convert it like any model: edgekit convert {res['saved']} -t ...")
    return "\n".join(lines)


def factorize_text(res) -> str:
    """Low-rank factorization: per layer, then the whole model before/after."""
    from edgekit.table import render

    rows = [[r["layer"], r.get("kind", "-"), "x".join(map(str, r["shape"])) if r.get("shape") else "-",
             f"{r['rank']}/{r['full_rank']}" if r.get("rank") else "-", r.get("params_before"), r.get("params_after"),
             (r.get("flops_after") or 0) / max(1, r.get("flops_before") or 1) if r.get("flops_before") else None,
             r.get("output_rel_err"), r.get("note") or ""] for r in res["layers"]]
    lines = [render(["layer", "kind", "matrix", "rank", "params", "params after", "FLOPs x", "output err", "note"],
                    rows, title=f"low-rank factorization ({res['rule']})")]
    b, a = res["before"], res["after"]
    metric = "perplexity" if "ppl" in b else "accuracy %"
    key = "ppl" if "ppl" in b else "accuracy"
    lines.append(f"model: params {b['params']:,} -> {a['params']:,} (x{a['params'] / b['params']:.3f}), FLOPs "
                 f"x{res['totals']['flops_ratio']:.3f}"
                 + (f"; {metric} {b[key]:.4g} -> {a[key]:.4g}" if key in b and key in a else "")
                 + (f" ({res['after_cut'][key]:.4g} right after the cut)" if res.get("after_cut") else ""))
    if res.get("outputs"):   # a torch.export program: its outputs before/after on the data
        o = res["outputs"]
        lines.append(f"outputs on {res.get('data')}: relative error {o['output_rel_err']:.3g}"
                     + (f", top-1 agreement {100 * o['top1_agreement']:.1f}%" if "top1_agreement" in o else ""))
    for t in res.get("bundles") or []:
        lines.append(f"{t['target']} {t.get('format', '')}: " + ", ".join(
            f"{k} {t[k]}" for k in ("before", "after", "speedup", "note") if t.get(k) is not None))
    if res.get("note"):
        lines.append(res["note"])
    lines.append(f"saved {res['saved']}")
    return "\n".join(lines)


def qat_table(res) -> str:
    from pathlib import Path

    from edgekit.table import render

    rows = [[Path(b["bundle"]).name, b["format"], b["bytes"] / 1024,
             ", ".join(f"{k}×{v}" for k, v in sorted(b["float_ops"].items())) or "none",
             b["ptq_accuracy"], b["qat_accuracy"], b["ptq_drop"], b["qat_drop"],
             {None: "-", True: "ok", False: "MISSED"}[b["within_budget"]]] for b in res["bundles"]]
    text = render(["bundle", "format", "KiB", "float ops", "PTQ acc %", "QAT acc %", "PTQ drop", "QAT drop",
                   "budget"], rows,
                  title=f"QAT vs post-training INT8, against the float model's {res['float_accuracy']:.2f}% "
                        f"on {res['validation_samples']} validation samples")
    return text + (f"\nfake-quantized: {res['calibrated_accuracy']:.2f}% calibrated, {res['trained_accuracy']:.2f}% "
                   f"after {res['epochs']} epoch(s) ({res['seconds']:.1f} s); model {res['qat_model']}; "
                   f"report {res['report']}")


# --- devices ---------------------------------------------------------------------

def devices_table(devices) -> str:
    from edgekit.table import render

    return render(["device", "address", "target", "groups", "root", "python"],
                  [[d.name, d.address, d.target, ",".join(d.groups), d.root, d.python] for d in devices])


def local_devices_table(listing) -> str:
    from edgekit.table import render

    return render(["name", "address", "running", "python", "root"],
                  [[d["name"], d["address"], d["running"], d["python"], d["root"]] for d in listing])


def emulated_status_text(st) -> str:
    from edgekit.table import kv

    dev = st["device"] or {}
    return kv([("root built", st["root_built"]), ("root", st["root"]), ("recipe key", st["recipe_key"]),
               ("build seconds", st["build_seconds"]), ("device", dev.get("name")),
               ("address", dev.get("address")), ("running", dev.get("running"))])


INFO_HEADERS = ["device", "arch", "cpu", "cores", "MB", "os", "python", "backends", "board", "suggested", "result"]


def info_row(r):
    f = r.data.get("facts", {})
    b = ", ".join(f"{k} {v.get('version')}" for k, v in f.get("backends", {}).items() if v.get("available"))
    return [r.device, f.get("arch"), f.get("cpu_model"), f.get("cores"), f.get("memory_mb"),
            f.get("os"), f.get("python"), b or "none", f.get("board") or f.get("l4t"),
            f.get("suggested_target"), r.status if not r.ok else "ok"]


SETUP_HEADERS = ["device", "runtime", "python", "backends", "result"]


def setup_row(r):
    return [r.device, r.data.get("runtime"), r.data.get("python"),
            ", ".join(f"{k} {v}" for k, v in (r.data.get("backends") or {}).items()), r.status]


# --- deploy, rollouts, status, rollback ------------------------------------------

DEPLOY_HEADERS = ["device", "result", "bundle", "release", "previous", "sent KiB", "backend", "seconds"]


def deploy_row(r):
    return [r.device, r.status, r.data.get("bundle", "-"), (r.data.get("sha256") or "")[:12],
            (r.data.get("previous") or "-")[:12], r.data.get("bytes_sent", 0) / 1024, r.data.get("backend"),
            r.seconds]


def plan_table(plan, groups, labels) -> str:
    from edgekit.table import render

    return render(["batch", "devices", "names"], [[lab, len(g), ", ".join(g)] for lab, g in zip(labels, groups)],
                  title=f"rollout plan: max-fail {plan.max_fail * 100:g}% per batch, offline {plan.offline}, "
                        f"abort rolls back {plan.abort_rollback}"
                        + (f", p50 gate {plan.max_p50_ms:g} ms" if plan.max_p50_ms else ""))


ROLLOUT_HEADERS = ["device", "batch", "result", "bundle", "release", "previous", "current", "p50 ms", "seconds"]


def rollout_rows(rec):
    return [[n, rec["batches"][d["batch"]]["label"], d["state"], d.get("bundle") or "-", (d.get("sha256") or "")[:12],
             (d.get("previous") or "-")[:12], (d.get("current") or "-")[:12],
             "-" if d.get("p50_ms") is None else f"{d['p50_ms']:.2f}", d.get("seconds")]
            for n, d in rec["devices"].items()]


def rollout_tables(rec) -> str:
    """A rollout record: its batches, then its devices."""
    from edgekit.table import render

    return "\n".join([
        render(["batch", "devices", "failed", "state", "started", "finished"],
               [[b["label"], len(b["devices"]), b["failed"], b["state"], b["started"] or "-",
                 b["finished"] or "-"] for b in rec["batches"]], title=f"rollout {rec['id']}"),
        render(ROLLOUT_HEADERS, rollout_rows(rec))])


def status_table(results) -> str:
    """Per device and model: current release, older ones, health."""
    from edgekit.table import render

    rows = []
    for r in results:
        if not r.data.get("models"):
            rows.append([r.device, "-", "-", "-", "-", r.reason or r.status])
        for name, m in (r.data.get("models") or {}).items():
            h = m.get("health") or {}
            older = [x["sha256"][:12] for x in m["releases"] if x["sha256"] != m.get("current")]
            rows.append([r.device, name, (m.get("current") or "-")[:12], ", ".join(older) or "-",
                         "ok" if h.get("ok") else ("-" if not h else "FAILED"),
                         h.get("backend", "")])
    return render(["device", "model", "current", "older releases", "health", "backend"], rows)


ROLLBACK_HEADERS = ["device", "model", "was", "now", "health", "result"]


def rollback_row(r, model):
    return [r.device, model, (r.data.get("previous") or "-")[:12], (r.data.get("current") or "-")[:12],
            "ok" if (r.data.get("health") or {}).get("ok") else "FAILED",
            r.status if r.ok else r.reason or r.status]


def serving_table(results) -> str:
    from edgekit.table import render

    return render(["device", "serving", "address", "version", "pid", "reason"],
                  [[r.device, r.data.get("serving", r.status), r.data.get("url") or "-",
                    r.data.get("version") or "-", r.data.get("pid") or "-", r.reason or ""]
                   for r in results], title="edgekit serve")


def ansible_text(res) -> str:
    """What `export ansible` wrote, and how to run it."""
    from edgekit.deploy import ansible
    from edgekit.table import kv

    return kv([("directory", res["dir"]), ("hosts", res["hosts"]), ("serial", res["serial"]),
               ("max_fail_percentage", res["max_fail_percentage"]),
               ("targets", ", ".join(f"{k} ({v})" for k, v in res["targets"].items())),
               ("bundles", ", ".join(res["bundles"])), ("run", ansible.run_hint(res["dir"])),
               ("dry run", ansible.run_hint(res["dir"], check=True))])
