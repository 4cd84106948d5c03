"""Per-MatMul INT4 sensitivity of a language model, measured in torch, and the INT8 set a byte budget buys.

The rescue ladder's `matmuls` rung (edgekit.convert.llm): each decoder MatMul of the build (the builder's node:
a layer's packed qkv_proj, o_proj, gate_proj, up_proj, down_proj...) is simulated alone at INT4 on the float
model (its Linear weights rounded as the build's algorithm does: k-quant's asymmetric search or symmetric
round-to-nearest, at the build's block size; everything else float), and the mean KL(float || that) of the
next-token distributions is measured on calibration text: the float model's own greedy continuations of
prompts kept apart from the ones the fidelity text uses (never the held-out text the build is judged on).
The MatMuls that cost most per weight go to INT8 first, up to a fraction of the decoder's weights.

Measured on SmolLM2-135M (docs/llm.md): one MatMul alone at INT4 costs from 0.00014 to 0.048 nats (layer 11's
down_proj), a 300-fold spread that whole-layer choices waste bytes on.

Only the converting machine imports this (torch, through llm_fidelity's FloatModel).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from edgekit.convert.llm_fidelity import (EvalText, FloatModel, _decoder_layers, _fake_quant, _kl, _log_softmax,
                                          split_gate_up)

# Calibration prompts: other topics and styles than llm_fidelity.BUILTIN_PROMPTS (which a convert without --val
# scores the build on), so what is measured to choose the INT8 set is never what the build is judged on.
CALIBRATION_PROMPTS = (
    "The city council met on Tuesday to discuss",
    "Here is a simple recipe for bread that anyone can bake at home:",
    "Dear team, thank you for your patience while we",
    "The main difference between a virus and a bacterium is",
    "import numpy as np\n\ndef normalize(x):\n",
    "Once upon a time, in a forest far from any road,",
    "Q: How do I reset my password?\nA:",
    "The first step in solving a quadratic equation is",
)

# builder node segment -> the Hugging Face Linear names it packs
_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# builder node segment -> the Hugging Face Linears it may name otherwise, each alternative a tuple (phi-2's attention
# output is `dense`, LFM2's `out_proj`; LFM2's feed_forward is w1 / w3 / w2 for gate / up / down, which its builder
# aliases): without these their nodes were never measured, chosen or calibrated, and stayed asymmetric INT8
_RENAMED = {"o_proj": (("dense",), ("out_proj",)), "gate_proj": (("w1",),), "up_proj": (("w3",),),
            "down_proj": (("w2",),)}


def kquant_search(x, bits: int):
    """x [rows, block] -> (scale, minimum) per row as llama.cpp's make_qkx2 chooses them (without its clamping of
    the minimum to <= 0): among 20 candidate grids around the block's min / max, the least squared error weighted
    by sqrt(mean x^2) + |x|. The builder's algo_config=k_quant (ONNX Runtime's quant_tensor_k_quant_cpu) moves the
    minimum the later candidates are built around to each better one's, so its scales differ by up to ~10% on some
    blocks (a 64-wide random Llama); the sensitivity ranking here simulates it with this search, and
    llm_gptq.ort_kquant calls ORT's own where the bits must be the builder's."""
    import torch

    block = x.shape[1]
    maxq = 2 ** bits - 1
    wt = torch.sqrt((x * x).sum(1, keepdim=True) / block) + x.abs()
    rmin, rmax = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    sum_w, sum_x = wt.sum(1, keepdim=True), (wt * x).sum(1, keepdim=True)
    rng = rmax - rmin
    ok = rng != 0
    safe = torch.where(ok, rng, torch.ones_like(rng))
    scale = torch.where(ok, safe / maxq, torch.ones_like(rng))
    q = torch.clamp(torch.round((x - rmin) / scale), 0, maxq)
    best = (wt * (scale * q + rmin - x) ** 2).sum(1, keepdim=True)
    for i in range(20):
        iscale = torch.where(ok, (-1 + 0.1 * i + maxq) / safe, torch.ones_like(rng))
        qn = torch.clamp(torch.round(iscale * (x - rmin)), 0, maxq)
        wq = wt * qn
        sl, sl2, sxl = wq.sum(1, keepdim=True), (wq * qn).sum(1, keepdim=True), (wq * x).sum(1, keepdim=True)
        d = sum_w * sl2 - sl * sl
        ts, tm = (sum_w * sxl - sum_x * sl) / d, (sl2 * sum_x - sl * sxl) / d
        mad = (wt * (ts * qn + tm - x) ** 2).sum(1, keepdim=True)
        rep = (mad < best) & torch.isfinite(mad)
        best, scale, rmin = torch.where(rep, mad, best), torch.where(rep, ts, scale), torch.where(rep, tm, rmin)
    return scale, rmin


def kquant_fake(w, block: int, bits: int):
    """k-quant (kquant_search) per block of `block` weights along the input dimension, an asymmetric scale and
    minimum per block; returned dequantized (float)."""
    import torch

    out_f, in_f = w.shape
    pad = (-in_f) % block
    x = torch.nn.functional.pad(w.float(), (0, pad)).reshape(-1, block)
    maxq = 2 ** bits - 1
    scale, rmin = kquant_search(x, bits)
    zp = torch.clamp(torch.round(-rmin / scale), 0, maxq)
    deq = (torch.clamp(torch.round(x / scale + zp), 0, maxq) - zp) * scale
    return deq.reshape(out_f, -1)[:, :in_f].contiguous()


def fake_quant(w, block: int, bits: int, algo: str):
    """The build's rounding of one weight matrix, back in float."""
    return kquant_fake(w, block, bits) if algo.startswith("k_quant") else _fake_quant(w, block, bits)


def matmul_modules(model, matmuls: Dict[int, List[str]]) -> Dict[str, List[Any]]:
    """The builder's decoder MatMul node names -> the torch Linear modules whose weights each one holds (a packed
    qkv_proj holds q/k/v; phi-2's o_proj is its `dense`, LFM2's its `out_proj`, LFM2's gate / up / down_proj its
    feed_forward's w1 / w3 / w2; Phi-3's gate_proj / up_proj, which the builder splits from
    its fused gate_up_proj, are the two Linears llm_fidelity.split_gate_up makes of it: the model is split first
    if it was not, as FloatModel loads it). Nodes without a match are left out (never measured, never chosen,
    never calibrated)."""
    import torch

    split_gate_up(model)
    layers = _decoder_layers(model)
    out: Dict[str, List[Any]] = {}
    for i, names in matmuls.items():
        if i >= len(layers):
            continue
        linears = {n.rsplit(".", 1)[-1]: m for n, m in layers[i].named_modules() if isinstance(m, torch.nn.Linear)}
        for node in names:
            seg = node.rstrip("/").split("/")[-2] if "/" in node else node
            for want in ((seg,),) if seg in linears else (_PACKED.get(seg, (seg,)), *_RENAMED.get(seg, ())):
                mods = [linears[w] for w in want if w in linears]
                if mods and len(mods) == len(want):
                    out[node] = mods
                    break
    return out


def calibration_text(fm: FloatModel, tokens: int = 256) -> EvalText:
    """The float model's own greedy continuations of CALIBRATION_PROMPTS (about `tokens` scored)."""
    text = fm.own_continuations(tokens, max(16, tokens // len(CALIBRATION_PROMPTS)), prompts=CALIBRATION_PROMPTS)
    text.source = (f"calibration: the float model's own greedy continuations of {len(text.windows)} prompts "
                   f"({text.tokens} tokens), not the fidelity text")
    return text


@contextlib.contextmanager
def rounded(modules: Sequence[Any], block: int, bits: int, algo: str):
    """Inside the block, `modules`' weights are rounded to `bits` as the build rounds them; restored after."""
    saved = [m.weight.data for m in modules]
    try:
        for m in modules:
            m.weight.data = fake_quant(m.weight.data, block, bits, algo)
        yield
    finally:
        for m, wd in zip(modules, saved):
            m.weight.data = wd


def scored_kl(ref: Sequence[np.ndarray], q: Iterable[np.ndarray], text: EvalText) -> float:
    """Mean KL(ref || q) over `text`'s scored positions of every window (log-probabilities per position)."""
    kls = []
    for r, lq, w, s in zip(ref, q, text.windows, text.starts):
        pos = np.arange(max(s, 1) - 1, len(w) - 1)
        kls.append(_kl(r[pos], lq[pos]))
    return float(max(np.mean(np.concatenate(kls)), 0.0))


def matmul_sensitivity(fm: FloatModel, text: EvalText, matmuls: Dict[int, List[str]], block: int,
                       algo: str = "k_quant", bits: int = 4, progress=None) -> List[Dict[str, Any]]:
    """Each decoder MatMul alone at `bits` (the build's rounding), the rest float: mean KL(float || that) on
    `text`'s scored positions. Sorted by KL per weight, worst first: {"name", "layer", "params", "kl_mean"}."""
    torch = fm.torch
    ref = fm.logprobs(text.windows)
    mods = matmul_modules(fm.model, matmuls)
    out = []
    for layer in sorted(matmuls):
        for node in matmuls[layer]:
            if node not in mods:
                continue
            with rounded(mods[node], block, bits, algo):   # a window's logits at a time
                kl = scored_kl(ref, (_log_softmax(fm.logits(w)) for w in text.windows), text)
            out.append({"name": node, "layer": layer, "params": int(sum(m.weight.numel() for m in mods[node])),
                        "kl_mean": kl})
            if progress is not None:
                progress(len(out))
    del torch
    return sorted(out, key=lambda d: -d["kl_mean"] / d["params"])


def pick_int8(ranking: Sequence[Dict[str, Any]], fraction: float, total: Optional[int] = None) -> List[str]:
    """Greedy by KL per weight: the MatMuls whose INT8 weights stay within `fraction` of the decoder's weights
    (`total`: all decoder MatMul weights, default the ranking's own sum). A matrix too big for what is left is
    skipped for smaller ones after it."""
    total = int(total if total is not None else sum(d["params"] for d in ranking))
    left, out = fraction * total, []
    for d in ranking:
        if d["params"] <= left and d["kl_mean"] > 0:
            out.append(d["name"])
            left -= d["params"]
    return out


def short_name(node: str) -> str:
    """'/model/layers.11/mlp/down_proj/MatMul' -> '11.down_proj' (for the recipe and the report)."""
    m = re.match(r"^/model/layers\.(\d+)/(?:.*/)?([^/]+)/MatMul", node)
    return f"{m.group(1)}.{m.group(2)}" if m else node
