"""INT8 builds: where the int8 activations cost, measured per MatMul in torch, and the INT8 rescue ladder's rungs.

At accuracy_level 4 ONNX Runtime's MatMulNBits (MLAS CompInt8) quantizes each row of its input to int8 on the fly,
symmetric, one fp32 scale per block of `block_size` values along K (the weights' block), and multiplies in integers.
On SmolLM2-135M that, not the INT8 weights, is most of INT8's error (benchmark text: +1.48% perplexity / KL 0.0042 at
level 4 against +0.49% / 0.0011 at level 1, the same weights), and it is not spread evenly: alone, the last layer's
up_proj and down_proj and a few qkv_proj cost several times the median MatMul (docs/llm.md).

The INT8 ladder (edgekit.convert.llm, when an INT8 build misses the INT8 floor) keeps the MatMuls that cost most per
weight out of quantization: a plain fp32 MatMul (4 bytes a weight instead of ~1.16), which is exact for that node
and about 2x an INT8 node's time at one token, where an 8-bit node at accuracy_level 1 takes 40x (MLAS has no 8-bit
fp32-compute kernel on x86: it dequantizes the whole matrix at every call). Then block 16 (finer activation blocks).

Each decoder MatMul is measured alone: its weights rounded as the build rounds them (INT8, the build's block and
algorithm) and its input quantized as MLAS does, everything else float; mean KL(float || that) on calibration text
(llm_sensitivity.calibration_text: never the text the build is judged on). The lm_head is not a candidate: fp32 it
would add 3 bytes per vocabulary entry and hidden unit (SmolLM2: +85 MB, and 4x its time per token).

Only the converting machine imports this (torch, through llm_fidelity's FloatModel).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from edgekit.convert.llm_fidelity import EvalText, FloatModel, _decoder_layers, _log_softmax
from edgekit.convert.llm_sensitivity import matmul_modules, pick_int8, rounded, scored_kl

# INT8 rungs after the profile's build, in order: (block size or None for the profile's, fraction of the decoder's
# MatMul weights kept fp32). SmolLM2-135M, benchmark text (755 tokens), ORT: block 32 +1.48% / KL 0.0042 (161.5 MB);
# 4 MatMuls fp32 (2.7% of the decoder weights) +0.48% / 0.0034 (169.7 MB); 8: +0.73% / 0.0031 (176.0 MB); block 16:
# +0.66% / 0.0025 (182.5 MB); block 16 + 4 fp32: +0.59% / 0.0020 (190.3 MB)
INT8_RUNGS = ((None, 1 / 32), (None, 1 / 16), (16, 1 / 32), (16, 1 / 16))


def act_quant(x, block: int):
    """MLAS CompInt8's input quantization, back in float: symmetric int8 per block of `block` along the last
    dimension (scale = max |x| / 127 of the block, round to nearest)."""
    import torch

    shape, k = x.shape, x.shape[-1]
    y = torch.nn.functional.pad(x, (0, (-k) % block)).reshape(*shape[:-1], -1, block)
    scale = y.abs().amax(-1, keepdim=True) / 127.0
    q = torch.round(y / torch.where(scale > 0, scale, torch.ones_like(scale))) * scale
    return q.reshape(*shape[:-1], -1)[..., :k]


class _Tail:
    """The calibration windows in one batch (padded on the right, which a causal model's earlier positions never
    see), and the float model from decoder layer i on: a MatMul of layer i changes nothing before it, so its
    measurement starts from the hidden state the float pass had there (the layers' own inputs, recorded), about
    half the work of a whole pass. Checked against the whole pass at layers 0 and L/2 first; where the model does
    not reproduce its own logits that way (another layer signature, logit soft-capping...), whole passes."""

    def __init__(self, fm: FloatModel, windows: Sequence[np.ndarray]):
        torch = fm.torch
        self.fm, self.windows = fm, windows
        n = max(len(w) for w in windows)
        batch = np.zeros((len(windows), n), dtype=np.int64)
        for i, w in enumerate(windows):
            batch[i, :len(w)] = w
        self.batch = torch.from_numpy(batch)
        self.layers = _decoder_layers(fm.model)
        self.calls: Dict[int, Any] = {}

        def grab(i):
            def hook(mod, args, kwargs):
                self.calls[i] = (args, dict(kwargs))
            return hook

        handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            with torch.no_grad():
                self.full = fm.model(self.batch, use_cache=False).logits.float()
        finally:
            for h in handles:
                h.remove()
        self.ok = False
        body = getattr(fm.model, "model", None)
        if len(self.calls) == len(self.layers) and hasattr(body, "norm") and hasattr(fm.model, "lm_head"):
            try:
                self.ok = all(torch.allclose(self._from(i), self.full, rtol=1e-4, atol=1e-3)
                              for i in (0, len(self.layers) // 2))
            except (TypeError, ValueError, RuntimeError, KeyError, IndexError, AttributeError):
                self.ok = False

    def _from(self, start: int):
        torch = self.fm.torch
        args, kwargs = self.calls[start]
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with torch.no_grad():
            for j in range(start, len(self.layers)):
                a, k = self.calls[j]
                out = (self.layers[j](*a, **dict(k, hidden_states=h)) if "hidden_states" in k
                       else self.layers[j](h, *a[1:], **k))
                h = out[0] if isinstance(out, tuple) else out
            return self.fm.model.lm_head(self.fm.model.model.norm(h)).float()

    def logprobs(self, start: Optional[int] = None) -> List[np.ndarray]:
        """log-softmax per window: the float pass (start None), else the model run from layer `start`."""
        torch = self.fm.torch
        if start is None:
            logits = self.full
        elif self.ok:
            logits = self._from(start)
        else:
            with torch.no_grad():
                logits = self.fm.model(self.batch, use_cache=False).logits.float()
        return [_log_softmax(logits[i, :len(w)].numpy()) for i, w in enumerate(self.windows)]


def activation_sensitivity(fm: FloatModel, text: EvalText, matmuls: Dict[int, List[str]], block: int,
                           algo: str = "k_quant", activations: bool = True, progress=None) -> List[Dict[str, Any]]:
    """Each decoder MatMul alone as an INT8 MatMulNBits computes it (weights rounded to INT8 at `block`; with
    `activations`, accuracy_level 4, its input int8 per block of `block`), the rest float: mean KL(float || that)
    on `text`. Sorted by KL per weight, worst first: {"name", "layer", "params", "kl_mean"}."""
    torch = fm.torch
    tail = _Tail(fm, text.windows)
    ref = tail.logprobs()
    mods = matmul_modules(fm.model, matmuls)
    on: set = set()

    def hook(mod, args):
        return (act_quant(args[0], block),) if id(mod) in on else None

    handles = [m.register_forward_pre_hook(hook) for ms in mods.values() for m in ms]
    out = []
    try:
        for layer in sorted(matmuls):
            for node in matmuls[layer]:
                if node not in mods:
                    continue
                with rounded(mods[node], block, 8, algo):
                    if activations:
                        on.update(id(m) for m in mods[node])
                    try:
                        q = tail.logprobs(layer)
                    finally:
                        on.clear()
                out.append({"name": node, "layer": layer, "params": int(sum(m.weight.numel() for m in mods[node])),
                            "kl_mean": scored_kl(ref, q, text)})
                if progress is not None:
                    progress(len(out))
    finally:
        for h in handles:
            h.remove()
    del torch
    return sorted(out, key=lambda d: -d["kl_mean"] / d["params"])


def pick_fp32(ranking: Sequence[Dict[str, Any]], fraction: float, total: int) -> List[str]:
    """The MatMuls kept fp32: greedy by KL per weight within `fraction` of the decoder's MatMul weights (as the INT4
    ladder picks its INT8 MatMuls)."""
    return pick_int8(ranking, fraction, total)
