"""The golden health check of a language-model bundle (standard library and numpy).

golden.json holds what the converting machine computed with the quantized bundle: token-id prompts, the
top-1 next token at every position (teacher-forced: each position sees the golden prefix, so one early
difference does not spoil the rest), the logits at its top-K ids, and a short greedy generation. A device
computes INT4 and int8-activation matmuls with its own kernels (NEON/sdot on ARM, AVX2/VNNI on x86), which
round differently, so health is judged by agreement, not equality: teacher-forced top-1 agreement and the
SNR of the logits at the golden top-K ids, plus a short generation that must produce text. Its equality
with the golden text is reported, not required (greedy decoding diverges after the first near-tie).
"""

from __future__ import annotations

import platform
from typing import Any, Dict, List

import numpy as np

from edgekit.errors import BundleError
from edgekit.runtime.snr import snr_db

GOLDEN = "golden.json"


def read_golden(lm) -> Dict[str, Any]:
    import json

    if lm.manifest is None:
        raise BundleError("the golden check needs a bundle (a bare ONNX Runtime GenAI folder has no golden data)",
                          path=str(lm.path))
    name = lm.manifest.get("golden") or GOLDEN
    if not isinstance(name, str):
        name = GOLDEN
    path = lm.path / name
    try:
        g = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {name} ({e})", path=str(lm.path)) from None
    prompts, top1 = g.get("prompts"), g.get("top1")
    if not isinstance(prompts, list) or not prompts or not isinstance(top1, list) or len(top1) != len(prompts):
        raise BundleError(f"{name} needs 'prompts' and 'top1' (one list of ids per prompt)", path=str(lm.path))
    for i, (p, t) in enumerate(zip(prompts, top1)):
        if not p or len(p) != len(t):
            raise BundleError(f"{name}: prompt {i} has {len(p)} ids but {len(t)} top-1 ids", path=str(lm.path))
    return g


def golden_check(lm) -> Dict[str, Any]:
    """{'ok', 'top1_agreement', 'snr_db', 'positions', 'text', 'text_matches_golden', 'generation_ok',
    'min_top1_agreement', 'min_snr_db', 'prompts': [{'top1_agreement', 'snr_db', 'first_difference'}]}."""
    from edgekit.runtime.llmopts import MIN_SNR_DB, MIN_TOP1

    g = read_golden(lm)
    min_top1 = float(g.get("min_top1_agreement", MIN_TOP1))
    min_snr = float(g.get("min_snr_db", MIN_SNR_DB))
    topk = g.get("logits_topk") or {}
    k_ids, k_vals = topk.get("ids"), topk.get("values")
    agree = total = 0
    exp_all: List[np.ndarray] = []
    got_all: List[np.ndarray] = []
    per_prompt = []
    for i, (ids, want) in enumerate(zip(g["prompts"], g["top1"])):
        logits = lm.logits(ids)
        top = logits.argmax(-1)
        want_a = np.asarray(want, dtype=np.int64)
        same = top == want_a
        agree += int(same.sum())
        total += int(same.size)
        entry: Dict[str, Any] = {"tokens": len(ids), "top1_agreement": float(same.mean()),
                                 "first_difference": int(np.argmin(same)) if not same.all() else None,
                                 "snr_db": None}
        if k_ids is not None and k_vals is not None:
            kid = np.asarray(k_ids[i], dtype=np.int64)
            exp = np.asarray(k_vals[i], dtype=np.float64)
            if kid.shape != exp.shape or kid.shape[0] != logits.shape[0]:
                raise BundleError(f"golden logits_topk of prompt {i} has shape {kid.shape}/{exp.shape}, "
                                  f"the prompt {logits.shape[0]} positions", path=str(lm.path))
            got = np.take_along_axis(logits.astype(np.float64), kid, axis=1)
            entry["snr_db"] = _finite(snr_db(exp, got))
            exp_all.append(exp.ravel())
            got_all.append(got.ravel())
        per_prompt.append(entry)
    top1 = agree / total if total else 0.0
    snr = _finite(snr_db(np.concatenate(exp_all), np.concatenate(got_all))) if exp_all else None
    gen = g.get("generation") or {}
    text, gen_ok, matches = None, True, None
    if gen.get("prompt"):
        text = lm.generate(str(gen["prompt"]), max_new_tokens=int(gen.get("max_new_tokens", 16)))
        gen_ok = bool(text.strip())
        matches = text == gen.get("text") if "text" in gen else None
    ok = top1 >= min_top1 and (snr is None or snr >= min_snr) and gen_ok
    return {"ok": bool(ok), "kind": "llm", "top1_agreement": top1, "snr_db": snr, "positions": total,
            "min_top1_agreement": min_top1, "min_snr_db": min_snr, "text": text, "generation_ok": gen_ok,
            "text_matches_golden": matches, "golden_text": gen.get("text"), "prompts": per_prompt,
            "backend": lm.backend, "backend_version": lm.backend_version, "threads": lm.threads,
            "machine": platform.machine()}


def _finite(v: float) -> float:
    return v if np.isfinite(v) else (999.0 if v > 0 else -999.0)


def describe(res: Dict[str, Any]) -> str:
    """One line per figure, for the CLIs."""
    snr = "n/a" if res.get("snr_db") is None else f"{res['snr_db']:.1f} dB (min {res['min_snr_db']})"
    lines = [f"teacher-forced top-1 agreement {res['top1_agreement']:.3f} (min {res['min_top1_agreement']}) over "
             f"{res['positions']} positions; logit SNR {snr}"]
    if res.get("text") is not None:
        same = {True: "same as", False: "differs from", None: "no"}[res.get("text_matches_golden")]
        lines.append(f"generation: {res['text']!r} ({same} the converting machine's)")
    lines.append("ok" if res["ok"] else "FAILED")
    return "\n".join(lines)
