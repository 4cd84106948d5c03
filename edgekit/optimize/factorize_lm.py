"""Low-rank factorization of a causal LM's linear layers (Hugging Face folder -> Hugging Face folder).

The decoder layers' MLP projections (`scope="mlp"`; "attention" or "all" adds the attention
projections; the embeddings and lm_head are never touched) are replaced by their truncated SVD,
optionally fine-tuned by distillation from the original on text (`epochs`). The saved folder holds both
forms of each factorized layer:

- the Hugging Face weights, each pair multiplied back into one matrix of the original shape (rank r):
  Llama-family configurations cannot say "two thinner matrices", so transformers (and any tool that reads
  the architecture) loads the folder as the original; this is the float reference edgekit convert's
  fidelity measures against;
- the factors themselves, `edgekit_lowrank.safetensors` (A: rank x in, B: out x rank, W = B @ A), named per
  layer in edgekit_factorize.json's "lowrank" section: `edgekit convert` of the folder replaces each such
  layer of the builder's model.onnx by two MatMuls (edgekit.convert.llm_lowrank), so the bundle reads
  rank * (in + out) weights instead of in * out per token.

Parameters and FLOPs per token are reported as factorized; `int4_target` converts the original and the
factorized folder to INT4 and times both here.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from edgekit.convert.llm_lowrank import FACTORS, RECORD
from edgekit.errors import DataError
from edgekit.optimize import lm
from edgekit.optimize.factorize import RankRule, layer_row, plan_ranks, replace_torch, torch_layers, totals, \
    torch_output_errors

SCOPES = {"mlp": (".mlp.", ".feed_forward."), "attention": (".self_attn.", ".attention."),
          "all": (".mlp.", ".feed_forward.", ".self_attn.", ".attention.")}


def _in_scope(scope: str):
    parts = SCOPES[scope]

    def ok(name: str) -> bool:
        return (".layers." in f".{name}" or ".h." in f".{name}") and any(p in f".{name}." for p in parts)
    return ok


def merge(factorized, original):
    """A copy of `original` whose factorized Linear layers hold the products B @ A of their pairs."""
    import torch

    merged = copy.deepcopy(original)
    for name, m in factorized.named_modules():
        if isinstance(m, torch.nn.Sequential) and len(m) == 2 and all(isinstance(x, torch.nn.Linear) for x in m):
            target = merged.get_submodule(name)
            with torch.no_grad():
                target.weight.copy_((m[1].weight.double() @ m[0].weight.double()).to(target.weight.dtype))
                if m[1].bias is not None:
                    target.bias.copy_(m[1].bias)
    return merged


def factorize_lm(model_path: str, rule: RankRule, data: str, *, val: Optional[str] = None, scope: str = "mlp",
                 epochs: int = 0, max_steps: Optional[int] = None, lr: float = 1e-4, seq_len: int = 128,
                 batch_size: int = 8, seed: int = 0, device: Optional[str] = None, out: Optional[str] = None,
                 int4_target: Optional[str] = None, say: Callable[[str], None] = print, progress=None
                 ) -> Dict[str, Any]:
    from edgekit.optimize.distill_lm import LMDistillConfig, _Trainer, text_items
    from edgekit.progress import Progress

    torch, _ = lm.import_torch_transformers(model_path)
    if scope not in SCOPES:
        raise DataError(f"--scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if epochs < 0:
        raise DataError(f"--epochs must be >= 0, not {epochs}")
    dev = lm.pick_device(device)
    original, tok = lm.load_lm(model_path, dev, what="model", train=False)
    train_b, held, held_desc = lm.text_blocks(tok, data, seq_len, val)
    layers, skipped = torch_layers(original, only=_in_scope(scope), per_token=True)
    if not layers:
        raise DataError(f"no linear layer of the decoder's {scope} found to factorize", path=model_path)
    n_params = lm.params(original)
    # FLOPs per token: every matmul weight once (embedding lookups are not multiplications)
    dense_flops = 2 * lm.params(original, non_embedding=True) + 2 * _lm_head_weights(original)
    plan = plan_ranks(layers, rule, other_params=n_params - sum(ly.weights(None) for ly in layers),
                      other_flops=dense_flops - sum(ly.flops(None) for ly in layers))
    factors = {ly.name: ly.factors(plan[ly.name]["rank"]) for ly in layers if plan[ly.name]["rank"]}
    if not factors:
        raise DataError(f"with {rule.describe()} no layer gets cheaper", hint="give a lower rank")
    probe = (held[: min(4, len(held))].to(dev),)
    errs = torch_output_errors(original, layers, factors, probe)
    student = replace_torch(copy.deepcopy(original).float(), factors)
    say(f"factorized {len(factors)} of {len(layers)} {scope} layers ({rule.describe()}); held out: {held_desc}")
    before = lm.evaluate(original, held, batch_size=batch_size)
    cut = lm.evaluate(student, held, teacher=original, batch_size=batch_size)
    say(f"held-out perplexity {before['ppl']:.4g} -> {cut['ppl']:.4g} right after the cut")
    trained = None
    if epochs:
        for q in student.parameters():
            q.requires_grad_(True)
        cfg = LMDistillConfig(teacher=model_path, data=data, student=model_path, val=val, epochs=epochs,
                              max_steps=max_steps, lr=lr, seq_len=seq_len, batch_size=batch_size, seed=seed,
                              temperature=1.0, alpha=0.5)
        with tempfile.TemporaryDirectory(prefix="edgekit-factorize-") as ck:
            tr = _Trainer(cfg, student, original, tok, text_items(train_b), held, Path(ck), "student", say,
                          progress or Progress(enabled=False), dev)
            say(f"fine-tuning against the original (KL + cross-entropy), {tr.total} steps")
            tr.run()
            trained = {"steps": tr.step, "tokens": tr.tokens, "seconds": tr.seconds, "history": tr.history}
    merged = merge(student, original).float()
    after = lm.evaluate(merged, held, teacher=original, batch_size=batch_size)
    rows = [layer_row(ly, plan[ly.name], errs.get(ly.name)) for ly in layers]
    rows += [{"layer": n, "factorized": False, "note": why} for n, why in skipped.items()]
    t = totals([r for r in rows if "params_before" in r])
    params_fact = n_params - t["layer_params_before"] + t["layer_params_after"]
    flops_fact = dense_flops - t["layer_flops_before"] + t["layer_flops_after"]
    t.update(params_ratio=params_fact / n_params, flops_ratio=flops_fact / dense_flops)
    ranks = {r["layer"]: r["rank"] for r in rows if r.get("factorized")}
    res: Dict[str, Any] = {
        "kind": "causal-lm", "rule": rule.describe(), "scope": scope, "epochs": epochs, "fine_tune": trained,
        "heldout_text": held_desc, "layers": rows, "totals": t,
        "before": {"params": n_params, "flops_per_token": dense_flops, **before},
        "after_cut": cut,
        "after": {"params": params_fact, "params_saved": n_params, "flops_per_token": flops_fact, **after},
        "ppl_increase": after["ppl"] / before["ppl"] - 1.0,
        "note": ("saved with the original architecture (each factorized projection holds its rank-r product: "
                 "transformers loads it as the original, the float reference) and the factors beside it "
                 f"({FACTORS}); edgekit convert replaces each factorized layer by its two thinner MatMuls")}
    if out:
        record = {"source": str(model_path), "rule": rule.describe(), "ranks": ranks}
        lm.save_lm(merged, tok, out, extra={RECORD: record})
        res["lowrank"] = save_factors(student, out, record)
        say(f"saved {out} (the original architecture with rank-r products, and the {len(ranks)} factor pairs in "
            f"{FACTORS}: edgekit convert builds them as two MatMuls each)")
    res["saved"] = str(out) if out else None
    if int4_target:
        res["int4"] = _int4(model_path, out, int4_target, val, say) if out else \
            {"measured": False, "why": "give -o to convert the result"}
    return res


def save_factors(student, out: str, record: Dict[str, Any]) -> Dict[str, Any]:
    """The factor pairs of `student` (its factorized Linears are Sequential(Linear(in, r), Linear(r, out))) into
    out/edgekit_lowrank.safetensors: A (r x in) = the first's weight, B (out x r) = the second's, float32; then
    `record` (edgekit_factorize.json) rewritten with its "lowrank" section naming them. The factors are written
    before the record names them, so an interrupted save leaves a folder that converts as its weights."""
    import torch
    from safetensors.torch import save_file

    tensors, layers = {}, {}
    for name, m in student.named_modules():
        if isinstance(m, torch.nn.Sequential) and len(m) == 2 and all(isinstance(x, torch.nn.Linear) for x in m):
            a, b = m[0].weight.detach().float().cpu().contiguous(), m[1].weight.detach().float().cpu().contiguous()
            tensors[f"{name}.A"], tensors[f"{name}.B"] = a, b
            layers[name] = {"rank": int(a.shape[0]), "in": int(a.shape[1]), "out": int(b.shape[0]),
                            "A": f"{name}.A", "B": f"{name}.B", "bias": m[1].bias is not None}
    out_p = Path(out)
    tmp = out_p / f".{FACTORS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "edgekit low-rank factors: W = B @ A"})
    os.replace(tmp, out_p / FACTORS)
    low = {"file": FACTORS, "layout": "A: rank x in, B: out x rank, W = B @ A (y = x A^T B^T + bias)",
           "layers": layers}
    rec_tmp = out_p / f".{RECORD}.tmp"
    rec_tmp.write_text(json.dumps(dict(record, lowrank=low), indent=2) + "\n")
    os.replace(rec_tmp, out_p / RECORD)
    return {"file": str(out_p / FACTORS), "layers": len(layers), "bytes": (out_p / FACTORS).stat().st_size}


def _lm_head_weights(model) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.numel()) if head is not None else 0


def _int4(source: str, factorized: str, target: str, val: Optional[str], say) -> Dict[str, Any]:
    """The original and the factorized folder converted to INT4 for `target`: each bundle's perplexity
    against its own float model (the converter's fidelity), and decode speed here."""
    out = Path(factorized).with_name(Path(factorized).name + ".int4")
    res: Dict[str, Any] = {"measured": True, "target": target, "bundles": str(out)}
    for who, src in (("original", source), ("factorized", factorized)):
        res[who] = lm.int4_bundle(src, target, out, name=f"{who}-{Path(src).name}", val=val, say=say)
    return res


__all__ = ["factorize_lm", "merge", "save_factors", "SCOPES"]
