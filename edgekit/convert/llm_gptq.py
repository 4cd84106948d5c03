"""Calibrated INT4 rounding of a language model's decoder weights: GPTQ and AWQ, in torch.

The builder's k_quant rounds every block of weights on its own, to the grid closest to those weights (llama.cpp's
make_qkx2 search). The field's calibrated methods use what the weights are multiplied with:

- GPTQ (Frantar et al. 2022): per Linear, the Hessian of the layer's output error H = 2 X^T X over calibration
  activations X; columns are rounded one at a time and the rounding error of each is pushed onto the columns not
  yet rounded (the optimal brain surgeon update with H^-1's Cholesky factor), layer by layer, each layer's inputs
  computed by the layers before it already rounded. The grid of a block (scale, 4-bit zero point: MatMulNBits'
  asymmetric layout) is chosen when the block's first column is reached, on the weights as the error feedback
  left them (k-quant's search or min/max).
- AWQ (Lin et al. 2023): per input channel scales s (mean |activation| ** alpha, alpha searched per group of
  Linears on their calibration output error) multiply the Linears' weight columns and divide what feeds them: the
  preceding RMSNorm's weight (q/k/v, gate/up) or up_proj's rows (down_proj). Exact in float; the salient channels
  get finer steps once rounded.

Only the converting machine imports this (torch). The result per Linear is MatMulNBits' integers: q [out, in_pad]
(0..15), scales and zero points [out, n_blocks] (`apply` packs them into the build's MatMulNBits nodes).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edgekit.convert.llm_graph import EMBED_NOTE, FP16_MIN_NORMAL, constant_dtypes, readers, save_with_data

GRIDS = ("kquant", "minmax", "symmetric")


# --- grids: per block of `block` weights (rows = output channels), an asymmetric scale and integer zero point ---

def _pad(x, block: int):
    import torch

    pad = (-x.shape[1]) % block
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def minmax_params(x, bits: int = 4):
    """x [rows, block] -> (scale [rows, 1], zero point [rows, 1] integer-valued): min/max asymmetric."""
    import torch

    maxq = 2 ** bits - 1
    lo = x.min(1, keepdim=True).values.clamp(max=0)
    hi = x.max(1, keepdim=True).values.clamp(min=0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zp


def kquant_params(x, bits: int = 4):
    """x [rows, block] -> (scale, zero point) by llama.cpp's k-quant search (llm_sensitivity.kquant_search; a zero
    scale becomes 1): within a few % of ONNX Runtime's k_quant scales, not equal to them (ort_kquant)."""
    import torch

    from edgekit.convert.llm_sensitivity import kquant_search

    maxq = 2 ** bits - 1
    scale, rmin = kquant_search(x, bits)
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-rmin / scale), 0, maxq)
    return scale, zp


def fp16_grid(scale):
    """Positive scales on fp16's grid, so llm_graph.half_scales stores them fp16 exactly: the nearest fp16 value in
    its normal range (relative change <= 2^-11), the next fp16 value up below it (a subnormal or the smallest one:
    never a finer step than asked, so no weight leaves the integer range); above fp16's range, left as they are
    (that initializer then stays fp32)."""
    import torch

    a = scale.detach().float().cpu().numpy()
    h = a.astype(np.float16)
    low = h.astype(np.float32) < a
    tiny = (np.abs(a) < FP16_MIN_NORMAL) & low
    h[tiny] = np.nextafter(h[tiny], np.float16(np.inf))
    ok = np.isfinite(h) & (a > 0)
    return torch.from_numpy(np.where(ok, h.astype(np.float32), a)).to(scale.dtype)


def symmetric_params(x, bits: int = 8, half: bool = False):
    """x [rows, block] -> (scale [rows, 1], zero point 2^(bits-1) [rows, 1]): absmax / (2^(bits-1) - 1), as
    llama.cpp's Q8_0 rounds; the zero point is MatMulNBits' (and GatherBlockQuantized's) default, so a node of
    this grid carries no zero points (nbits_node with zp None). half: the scale put on fp16's grid first
    (fp16_grid) and the weights rounded on it (the largest lands within 2^-11 of 2^(bits-1) - 1 steps)."""
    import torch

    mid = 2 ** (bits - 1)
    scale = x.abs().max(1, keepdim=True).values / (mid - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (fp16_grid(scale) if half else scale), torch.full_like(scale, mid)


def grid_params(x, bits: int, grid: str, half: bool = False):
    if grid == "kquant":
        return kquant_params(x, bits)
    if grid == "minmax":
        return minmax_params(x, bits)
    if grid == "symmetric":
        return symmetric_params(x, bits, half)
    raise ValueError(f"unknown grid {grid!r} (one of {GRIDS})")


def dequant(q, scale, zp, in_features: int, block: int):
    """MatMulNBits' dequantized weight [out, in_features] from q [out, in_pad], scale/zp [out, n_blocks]."""
    out = q.shape[0]
    x = (q.reshape(out, -1, block) - zp[..., None]) * scale[..., None]
    return x.reshape(out, -1)[:, :in_features]


KQUANT_ROWS = 32768   # blocks per slice of kquant_rows (4 MiB of float32 per array at block 32)


def kquant_rows(kquant, data, num_bits: int = 4, group_size: int = 32, threads: int = 1):
    """ORT's k-quant (`kquant`: its quant_tensor_k_quant_cpu) over slices of blocks, on `threads` threads.
    Every block's grid search reads only that block (axis-1 reductions), so the slices' results are the whole
    call's, element for element; the slices keep its dozen temporaries a few MiB each instead of the matrix's
    size, and numpy's ufuncs release the GIL. Measured here (Xeon VM, one thread, the other core busy): a 2048 x
    5632 matrix 6.0 -> 3.1 s, 2.9M weights 0.82 -> 0.55 s, identical arrays."""
    from concurrent.futures import ThreadPoolExecutor

    d = np.reshape(data, (-1, group_size))
    parts = [d[i:i + KQUANT_ROWS] for i in range(0, d.shape[0], KQUANT_ROWS)]
    if threads > 1 and len(parts) > 1:
        with ThreadPoolExecutor(threads) as ex:
            outs = list(ex.map(lambda x: kquant(x, num_bits, group_size), parts))
    else:
        outs = [kquant(x, num_bits, group_size) for x in parts]
    return tuple(np.concatenate([o[i] for o in outs]) for i in range(3))


def ort_kquant(x, bits: int = 4):
    """x [rows, block] -> (q, scale, zp) as ONNX Runtime's k_quant quantizer (the model builder's algo_config=k_quant)
    rounds them, by calling it: its search differs from llama.cpp's make_qkx2 (kquant_search) in moving the
    minimum it searches around to each better candidate's, so k-quant rounded here for a block ORT cannot pack
    (OWN_KQUANT) is bit for bit what ORT writes at a block it can."""
    import torch

    try:
        from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu
    except ImportError as e:   # the builder's quantizer itself: without it no k_quant build was possible either
        raise RuntimeError(f"ONNX Runtime's k_quant quantizer is not importable: {e}") from None
    from edgekit.convert.llm_fidelity import free_cores

    q, scale, zp = kquant_rows(quant_tensor_k_quant_cpu, x.detach().float().cpu().numpy(), bits, x.shape[1],
                               free_cores())
    return tuple(torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in (q, scale, zp))


def quantize_rtn(w, block: int, bits: int = 4, grid: str = "kquant", half: bool = False):
    """Every block on its own: (q, scale, zp). grid "kquant_ort": ONNX Runtime's k_quant quantizer's own (ort_kquant),
    "kquant": llama.cpp's search (kquant_search). half: the symmetric grid's scales fp16 (symmetric_params)."""
    import torch

    out_f = w.shape[0]
    x = _pad(w.float(), block).reshape(-1, block)
    if grid == "kquant_ort":
        q, scale, zp = ort_kquant(x, bits)
    else:
        scale, zp = grid_params(x, bits, grid, half)
        q = torch.clamp(torch.round(x / scale + zp), 0, 2 ** bits - 1)
    return q.reshape(out_f, -1), scale.reshape(out_f, -1), zp.reshape(out_f, -1)


def gptq_quantize(w, H, block: int, bits: int = 4, grid: str = "kquant", damp: float = 0.01,
                  act_order: bool = False, chunk: int = 128):
    """GPTQ of one weight matrix w [out, in] with the Hessian H [in, in] (2 X^T X / n of its calibration
    inputs): (q, scale, zp) in MatMulNBits' layout (blocks of `block` consecutive input channels).

    With act_order the columns are rounded in order of decreasing H diagonal, and each block's grid is chosen on
    the weights before any feedback (static groups: the layout keeps blocks of consecutive channels)."""
    import torch

    W = w.detach().clone().float()
    out_f, in_f = W.shape
    maxq = 2 ** bits - 1
    H = H.detach().clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    nb = -(-in_f // block)
    scales = torch.zeros(out_f, nb)
    zps = torch.zeros(out_f, nb)
    if act_order:
        for b in range(nb):
            xb = _pad(W[:, b * block:(b + 1) * block], block)
            scales[:, b:b + 1], zps[:, b:b + 1] = grid_params(xb, bits, grid)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(in_f)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    Q = torch.zeros(out_f, in_f)
    for i1 in range(0, in_f, chunk):
        i2 = min(i1 + chunk, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            b = col // block
            if not act_order and col % block == 0:
                # the block's columns not yet rounded, as the feedback left them (all inside this chunk when
                # block divides chunk; else the rest comes from W, updated up to the chunk before)
                end = min((b + 1) * block, in_f)
                seg = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :end - col]
                scales[:, b:b + 1], zps[:, b:b + 1] = grid_params(_pad(seg, block), bits, grid)
            s, z = scales[:, b], zps[:, b]
            x = W1[:, i]
            q = torch.clamp(torch.round(x / s + z), 0, maxq)
            Q[:, i1 + i] = q
            d = Hinv1[i, i]
            err = (x - (q - z) * s) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    Q = Q[:, inv]
    qpad = torch.zeros(out_f, nb * block)
    qpad[:, :in_f] = Q
    # padded positions: the integer of a zero weight (what a zero-padded block stores; never multiplied)
    pad_cols = torch.arange(in_f, nb * block)
    if len(pad_cols):
        qpad[:, pad_cols] = zps[:, -1:].expand(-1, len(pad_cols))
    return qpad, scales, zps


# --- calibration text -------------------------------------------------------------------------------------------

def calibration_windows(fm, tokens: int = 2048, sample: bool = True, seed: int = 0) -> List[np.ndarray]:
    """Token windows to calibrate on: the float model's own continuations of llm_sensitivity.CALIBRATION_PROMPTS
    (never the text a build is judged on), about `tokens` in all, generated as one batch (prompts left-padded).
    Sampled (temperature 1, top-p 0.95, seeded) unless sample=False: greedy continuations of a small model fall
    into loops that repeat a few sentences. Plain sampling / greedy: the checkpoint's generation_config processors
    (repetition_penalty, no_repeat_ngram_size, min_p...) left out (llm_fidelity.plain_generate)."""
    import torch

    from edgekit.convert.llm_fidelity import plain_generate
    from edgekit.convert.llm_sensitivity import CALIBRATION_PROMPTS

    t = fm.tokenizer
    bos = fm._bos()
    new = max(16, tokens // len(CALIBRATION_PROMPTS))
    pad = t.pad_token_id if t.pad_token_id is not None else t.eos_token_id
    prompts = [bos + t(p, add_special_tokens=False)["input_ids"] for p in CALIBRATION_PROMPTS]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = plain_generate(fm.model, ids, mask, max_new_tokens=new, min_new_tokens=new, do_sample=sample,
                             temperature=1.0 if sample else None, top_p=0.95 if sample else None,
                             top_k=0 if sample else None, pad_token_id=pad)
    return [out[k, width - len(p):].numpy().astype(np.int64) for k, p in enumerate(prompts)]


# --- the model: calibration activations layer by layer ---------------------------------------------------------

class LayerInputs:
    """The hidden states entering decoder layer i for every calibration window, and the keyword arguments the
    model passes its layers (rotary position embeddings, mask): captured once at layer 0, then advanced by
    running each layer (as rounded so far) on them."""

    def __init__(self, model, windows: Sequence[np.ndarray]):
        import torch

        from edgekit.convert.llm_fidelity import _decoder_layers

        self.layers = _decoder_layers(model)
        self.hidden: List[Any] = []
        self.kwargs: List[Dict[str, Any]] = []

        class _Stop(Exception):
            pass

        def grab(mod, args, kwargs):
            hs = args[0] if args else kwargs.pop("hidden_states")
            self.hidden.append(hs.detach())
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            kw["use_cache"] = False
            kw.pop("cache", None)
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            self.kwargs.append(kw)
            raise _Stop

        h = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for w in windows:
                    try:
                        model(torch.from_numpy(np.asarray(w, dtype=np.int64)[None]), use_cache=False)
                    except _Stop:
                        pass
        finally:
            h.remove()

    def run(self, i: int, hooks: Optional[Dict[Any, Callable]] = None) -> List[Any]:
        """Layer i on every window's input (outputs returned, inputs kept); hooks: module -> fn(module, input)."""
        import torch

        handles = [m.register_forward_pre_hook(lambda mod, args, f=f: f(mod, args[0])) for m, f in
                   (hooks or {}).items()]
        try:
            with torch.no_grad():
                outs = []
                for hs, kw in zip(self.hidden, self.kwargs):
                    o = self.layers[i](hs, **kw)
                    outs.append(o[0] if isinstance(o, tuple) else o)
                return outs
        finally:
            for hd in handles:
                hd.remove()

    def advance(self, i: int) -> None:
        self.hidden = self.run(i)


def _linears(layer) -> Dict[str, Any]:
    import torch

    return {n.rsplit(".", 1)[-1]: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


# sub-steps of a Llama-style layer: each group's inputs depend on the groups before it being rounded
_SEQUENCE = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def _hessians(li: LayerInputs, i: int, mods: Dict[str, Any]) -> Dict[str, Any]:
    acc: Dict[str, List[Any]] = {}

    def make(name):
        def f(mod, x):
            x = x.reshape(-1, x.shape[-1]).double()
            H, n = acc.get(name, (0, 0))
            acc[name] = (H + x.T @ x, n + x.shape[0])
        return f

    # one Hessian per distinct input: q/k/v share theirs, gate/up theirs
    li.run(i, {m: make(n) for n, m in mods.items()})
    return {n: (2 * H / cnt).float() for n, (H, cnt) in acc.items()}


def gptq_model(model, windows: Sequence[np.ndarray], block: int, bits: int = 4, grid: str = "kquant",
               damp: float = 0.01, act_order: bool = False, progress=None,
               bits_of: Optional[Dict[str, Optional[int]]] = None) -> Dict[str, Tuple[Any, Any, Any]]:
    """GPTQ of every decoder Linear, layer by layer and, inside a layer, q/k/v -> o -> gate/up -> down, each
    step's inputs computed with the steps before it rounded. The model's weights are replaced by their rounded
    values; returned: {module path: (q, scale, zp)}. bits_of: module path -> other bits (8: rounded block by
    block, k-quant, as the builder's INT8 nodes; None: left float), the rest `bits`."""
    import torch

    li = LayerInputs(model, windows)
    names = {id(m): n for n, m in model.named_modules()}
    out: Dict[str, Tuple[Any, Any, Any]] = {}
    for i, layer in enumerate(li.layers):
        lins = _linears(layer)
        seq = [[n for n in group if n in lins] for group in _SEQUENCE]
        rest = [n for n in lins if not any(n in g for g in _SEQUENCE)]
        for group in [g for g in seq if g] + ([rest] if rest else []):
            want = {n: (bits_of or {}).get(names[id(lins[n])], bits) for n in group}
            Hs = _hessians(li, i, {n: lins[n] for n in group if want[n] == bits})
            for n in group:
                m = lins[n]
                if want[n] is None:
                    continue
                if want[n] != bits:
                    q, s, z = quantize_rtn(m.weight.data, block, want[n], grid)
                else:
                    q, s, z = gptq_quantize(m.weight.data, Hs[n], block, bits, grid, damp, act_order)
                with torch.no_grad():
                    m.weight.data = dequant(q, s, z, m.in_features, block).to(m.weight.dtype).contiguous()
                out[names[id(m)]] = (q, s, z)
        li.advance(i)
        if progress is not None:
            progress(i + 1, len(li.layers))
    return out


def rtn_model(model, block: int, bits: int = 4, grid: str = "kquant",
              bits_of: Optional[Dict[str, Optional[int]]] = None) -> Dict[str, Tuple[Any, Any, Any]]:
    """Every decoder Linear rounded block by block (no calibration); weights replaced, integers returned.
    bits_of as for gptq_model."""
    from edgekit.convert.llm_fidelity import _decoder_layers

    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for layer in _decoder_layers(model):
        for m in _linears(layer).values():
            b = (bits_of or {}).get(names[id(m)], bits)
            if b is None:
                continue
            q, s, z = quantize_rtn(m.weight.data, block, b, grid)
            m.weight.data = dequant(q, s, z, m.in_features, block).to(m.weight.dtype).contiguous()
            out[names[id(m)]] = (q, s, z)
    return out


# --- AWQ ------------------------------------------------------------------------------------------------------

def _fake(w, block, bits, grid):
    q, s, z = quantize_rtn(w, block, bits, grid)
    return dequant(q, s, z, w.shape[1], block)


def _search_scale(xs: List[Any], mods: List[Any], block: int, bits: int, grid: str, n_grid: int = 20,
                  share: int = 1, head_dim: int = 0):
    """AWQ's search: s = mean|x| ** alpha (normalized), alpha on a grid, the one whose rounded Linears' outputs
    are closest to float on the calibration inputs xs [tokens, in]. Returns (s, alpha, error ratio to alpha 0).
    share > 1 (v_proj -> o_proj under grouped-query attention): the input channels are heads x head_dim and
    `share` consecutive heads read one key/value head, so they get one scale (returned s is o_proj's, in full)."""
    import torch

    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).float()
    if X.shape[0] > 4096:
        X = X[torch.linspace(0, X.shape[0] - 1, 4096).long()]
    x_mean = X.abs().mean(0)
    if share > 1:
        c = x_mean.numel()
        x_mean = x_mean.reshape(-1, share, head_dim).mean(1)[:, None, :].expand(-1, share, -1).reshape(c)
    W = [m.weight.data.float() for m in mods]
    ref = [X @ w.T for w in W]
    best, best_s, best_a, base = None, None, 0.0, None
    for k in range(n_grid):
        a = k / n_grid
        s = x_mean.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, r in zip(W, ref):
            wq = _fake(w * s[None, :], block, bits, grid) / s[None, :]
            err += float(((X @ wq.T - r) ** 2).mean())
        if base is None:
            base = err
        if best is None or err < best:
            best, best_s, best_a = err, s, a
    return best_s, best_a, (best / base if base else 1.0)


def _fold(model, entry: Dict[str, Any]) -> None:
    """One AWQ group's scales into the model: what feeds the Linears (a norm's weight, or the rows of the Linear
    before) divided by them, the Linears' input columns multiplied."""
    import torch

    mods = dict(model.named_modules())
    sc, share, hd = entry["scales"], entry["share"], entry["head_dim"]
    prev = mods[entry["prev"]]
    with torch.no_grad():
        if not isinstance(prev, torch.nn.Linear):
            prev.weight.data = prev.weight.data / sc
        elif share > 1:
            prev.weight.data = prev.weight.data / sc.reshape(-1, share, hd)[:, 0, :].reshape(-1)[:, None]
        else:
            prev.weight.data = prev.weight.data / sc[:, None]
        for name in entry["mods"]:
            mods[name].weight.data = mods[name].weight.data * sc[None, :]


def awq_model(model, windows: Sequence[np.ndarray], block: int, bits: int = 4, grid: str = "kquant",
              progress=None, norm_ok: Optional[Callable[[int, str], bool]] = None,
              n_grid: int = 20, vo: bool = False, skip: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """AWQ scales folded into the float model: per layer, input_layernorm -> q/k/v, post_attention_layernorm ->
    gate/up, up_proj -> down_proj, and with vo v_proj -> o_proj (one scale per key/value head channel under
    grouped-query attention; off by default: on SmolLM2-135M block 32 it changed nothing measurable, KL 0.1019 ->
    0.1015, perplexity +9.2% -> +9.9% on the benchmark text, for a third more search time).
    norm_ok(layer, norm name): whether that norm's weight may take the scales (the caller's graph holds it as a
    plain multiplier); skip: module paths of Linears no group may touch (their graph node is not rewritten).
    Each layer's outputs are checked unchanged in float (relative 1e-3) after the folding, else
    the layer's scales are taken back. Returns per group applied: {"layer", "from", "alpha", "error_ratio",
    "scales" (tensor), "prev", "mods" (module paths), "share", "head_dim"} (_fold applies one again)."""
    li = LayerInputs(model, windows)
    paths = {id(m): n for n, m in model.named_modules()}
    record: List[Dict[str, Any]] = []
    for i, layer in enumerate(li.layers):
        lins = _linears(layer)
        groups = []
        for nname, targets in (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                               ("post_attention_layernorm", ("gate_proj", "up_proj"))):
            norm = getattr(layer, nname, None)
            if (norm is not None and getattr(norm, "weight", None) is not None and all(n in lins for n in targets)
                    and (norm_ok is None or norm_ok(i, nname))):
                groups.append((nname, norm, None, [lins[n] for n in targets]))
        if vo and all(n in lins for n in ("v_proj", "o_proj")) and lins["v_proj"].bias is None:
            groups.append(("v_proj", None, lins["v_proj"], [lins["o_proj"]]))
        if all(n in lins for n in ("up_proj", "down_proj")) and lins["up_proj"].bias is None:
            groups.append(("up_proj", None, lins["up_proj"], [lins["down_proj"]]))
        groups = [g for g in groups
                  if not any(paths[id(m)] in skip for m in g[3] + ([g[2]] if g[2] is not None else []))]
        caught: Dict[int, List[Any]] = {id(g[3][0]): [] for g in groups}
        before = li.run(i, {g[3][0]: (lambda mod, x: caught[id(mod)].append(x.detach())) for g in groups})
        saved = [(t, t.weight.data.clone()) for g in groups for t in ([g[1] or g[2]] + g[3])]
        applied = []
        for name, norm, prev, mods in groups:
            share = mods[0].in_features // prev.out_features if prev is not None else 1
            hd = int(getattr(getattr(layer, "self_attn", None), "head_dim", 0) or 0) if share > 1 else 0
            if share > 1 and (not hd or prev.out_features % hd or mods[0].in_features != share * prev.out_features):
                continue
            sc, a, ratio = _search_scale(caught[id(mods[0])], mods, block, bits, grid, n_grid, share, hd)
            entry = {"layer": i, "from": name, "alpha": a, "error_ratio": ratio, "scales": sc, "share": share,
                     "head_dim": hd, "prev": paths[id(norm if norm is not None else prev)],
                     "mods": [paths[id(m)] for m in mods]}
            _fold(model, entry)
            applied.append(entry)
        caught.clear()
        after = li.run(i)
        diff = max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(after, before))
        if diff > 1e-3:    # the norm is not a plain multiplier in torch (e.g. Gemma's 1 + w): take them back
            for t, w in saved:
                t.weight.data = w
            applied = []
            after = before
        record += applied
        li.hidden = after
        if progress is not None:
            progress(i + 1, len(li.layers))
    return record


# --- MatMulNBits: the integers in ONNX Runtime's layout -----------------------------------------------------------

def pack_nbits(q: np.ndarray, scale: np.ndarray, zp: Optional[np.ndarray], bits: int, block: int
               ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """q [N, n_blocks * block] integers 0..2^bits-1, scale/zp [N, n_blocks] -> MatMulNBits' B uint8
    [N, n_blocks, block * bits / 8] (4 bits: low nibble first), scales float32 [N, n_blocks], zero points uint8
    (4 bits: two per byte, low nibble first, packed per row: [N, ceil(n_blocks / 2)]; 8 bits: [N, n_blocks]);
    zp None (the symmetric grid: the op's default 2^(bits-1)): no zero points."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    n, k_pad = q.shape
    nb = k_pad // block
    if nb * block != k_pad or scale.shape != (n, nb) or (zp is not None and zp.shape != (n, nb)):
        raise ValueError(f"shapes: q {q.shape}, scale {scale.shape}, zp {None if zp is None else zp.shape}, "
                         f"block {block}")
    qi = np.asarray(q).astype(np.uint8).reshape(n, nb, block)
    if zp is None:
        if bits == 4:
            qi = (qi[..., 0::2] & 0x0F) | ((qi[..., 1::2] & 0x0F) << 4)
        return qi.astype(np.uint8), np.asarray(scale, np.float32), None
    zi = np.asarray(zp).astype(np.uint8)
    if bits == 8:
        return qi, np.asarray(scale, np.float32), zi
    b = (qi[..., 0::2] & 0x0F) | ((qi[..., 1::2] & 0x0F) << 4)
    if nb % 2:
        zi = np.concatenate([zi, np.zeros((n, 1), np.uint8)], 1)
    z = (zi[:, 0::2] & 0x0F) | ((zi[:, 1::2] & 0x0F) << 4)
    return b.astype(np.uint8), np.asarray(scale, np.float32), z.astype(np.uint8)


def nbits_bytes(K: int, N: int, bits: int, block: int, scale_bytes: int, zero_points: bool) -> int:
    """Bytes of a MatMulNBits node's initializers as pack_nbits (and the model builder) lays them out: B
    [N, ceil(K / block), block * bits / 8], a scale of scale_bytes per block, and with zero_points a byte per block
    (8 bits) or half one (4 bits, per row: ceil(n_blocks / 2))."""
    nb = -(-K // block)
    zp = 0 if not zero_points else nb if bits == 8 else -(-nb // 2)
    return N * (nb * (block * bits // 8 + scale_bytes) + zp)


def unpack_nbits(B: np.ndarray, scales: np.ndarray, zps: Optional[np.ndarray], K: int, N: int, bits: int,
                 block: int) -> np.ndarray:
    """MatMulNBits' initializers -> the dequantized weight [N, K] (float32), as ONNX Runtime computes it
    (zero point 2^(bits-1) where the node has none)."""
    nb = -(-K // block)
    B = np.asarray(B, np.uint8).reshape(N, nb, -1)
    if bits == 4:
        q = np.empty((N, nb, block), np.uint8)
        q[..., 0::2], q[..., 1::2] = B & 0x0F, B >> 4
    else:
        q = B.reshape(N, nb, block)
    s = np.asarray(scales, np.float32).reshape(N, nb)
    if zps is None:
        z = np.full((N, nb), 2 ** (bits - 1), np.float32)
    elif bits == 4:
        zb = np.asarray(zps, np.uint8).reshape(N, -1)
        z = np.empty((N, zb.shape[1] * 2), np.uint8)
        z[:, 0::2], z[:, 1::2] = zb & 0x0F, zb >> 4
        z = z[:, :nb].astype(np.float32)
    else:
        z = np.asarray(zps, np.uint8).reshape(N, nb).astype(np.float32)
    w = (q.astype(np.float32) - z[..., None]) * s[..., None]
    return w.reshape(N, nb * block)[:, :K]


def nbits_node(name: str, x: str, y: str, prefix: str, q, scale, zp, K: int, N: int, bits: int, block: int,
               accuracy_level: int, scale_dtype=np.float32):
    """A MatMulNBits node and its initializers (ONNX protos) for y = x @ W^T: B, scales in scale_dtype (the
    node's activations' type, T1: what the node it replaces read, llm_graph.constant_dtypes) and, unless zp is
    None (symmetric: the op's default zero point), zero points."""
    import onnx
    from onnx import helper, numpy_helper

    B, s, z = pack_nbits(np.asarray(q), np.asarray(scale), None if zp is None else np.asarray(zp), bits, block)
    inits = [numpy_helper.from_array(B, f"{prefix}.weight_Q{bits}G{block}"),
             numpy_helper.from_array(s.astype(scale_dtype), f"{prefix}.weight_scale")]
    if z is not None:
        inits.append(numpy_helper.from_array(z, f"{prefix}.weight_zp"))
    node = helper.make_node("MatMulNBits", [x] + [t.name for t in inits], [y], name=name, domain="com.microsoft",
                            K=K, N=N, bits=bits, block_size=block, accuracy_level=accuracy_level)
    del onnx
    return node, inits


# --- a build's model.onnx rewritten with the calibrated rounding -------------------------------------------------

ALGOS = ("awq", "gptq", "awq_gptq")   # LLMBuildOptions.algo values this module serves (the builder runs k_quant)
# apply's uncalibrated rounding: the builder's own k_quant, rounded and packed here (ORT 1.32's quantizer packs 4-bit
# zero points two a byte across a matrix's rows, so a width of an odd number of blocks fails there;
# convert.llm.kquant_odd_blocks); rounded by the quantizer's own function (ort_kquant: the builder's bits exactly)
OWN_KQUANT = "k_quant"
# GPTQ's dampening (fraction of the Hessian's mean diagonal added to it): with ~2k calibration tokens, 0.01 (the
# paper's) fits the calibration activations and does worse on held-out text (SmolLM2-135M, AWQ then GPTQ at block
# 32, benchmark text: damp 0.01 +20.2% / KL 0.159, damp 0.1 +9.5% / KL 0.086 against AWQ alone +9.9% / 0.101)
GPTQ_DAMP = 0.1
RECORD = "edgekit_calibration.json"  # in the built model folder: what was done (the manifest's recipe.calibration)
CAL_TOKENS = 2048

_NORMS = ("input_layernorm", "post_attention_layernorm")
_CACHE: Dict[Tuple[str, int, int], Tuple[List[np.ndarray], List[Dict[str, Any]]]] = {}
_NODE = re.compile(r"^/model/layers\.(\d+)/(?:[^/]+/)*[^/]+/MatMul(?:_Q\d+)?$")
_NORM = re.compile(r"^/model/layers\.(\d+)/(input_layernorm|post_attention_layernorm)/")


def calibrated(algo: str) -> bool:
    return algo in ALGOS


def builder_algo(algo: str) -> str:
    """What the model builder is asked for: k_quant for a calibrated algo (its nodes are then rewritten)."""
    return "k_quant" if calibrated(algo) else algo


def _init_map(model) -> Dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def _decoder_nodes(model) -> List[Any]:
    return [n for n in model.graph.node if n.op_type in ("MatMulNBits", "MatMul") and _NODE.match(n.name)]


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _norm_weights(model) -> Dict[Tuple[int, str], str]:
    """(layer, input_layernorm | post_attention_layernorm) -> the initializer holding the norm's multiplier."""
    inits = _init_map(model)
    out = {}
    for n in model.graph.node:
        m = _NORM.match(n.name)
        idx = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}.get(n.op_type)
        if m and idx is not None and len(n.input) > idx and n.input[idx] in inits:
            out[(int(m.group(1)), m.group(2))] = n.input[idx]
    return out


def apply(src_path, model_dir, algo: str, block: int, cal_tokens: int = CAL_TOKENS, threads: Optional[int] = None,
          progress=None, head_block: int = 0, int8_blocks: Sequence[int] = (), half: bool = False,
          head_blocks: Sequence[int] = ()) -> Dict[str, Any]:
    """Rewrite the builder's decoder MatMuls in model_dir/model.onnx (+ .data) with `algo`'s rounding at `block`:
    4-bit nodes calibrated (AWQ scales and/or GPTQ; algo OWN_KQUANT: no calibration, k-quant's own rounding at a
    block ORT's quantizer cannot pack), 8-bit nodes rounded by k-quant from the same (scaled)
    weights, float MatMuls given the scaled weights, the norms the AWQ scales came out of divided by them. The
    lm_head and the embedding are left as the builder wrote them, unless head_block: an 8-bit lm_head (and the
    tied embedding reading its bytes) re-rounded by k-quant at that block size (fewer scales: SmolLM2's 49152 x
    576 table is 2.2 MB smaller at 64 than at 32). int8_blocks: the 8-bit nodes (and an 8-bit lm_head that
    head_block does not name, at the first of head_blocks dividing K where given) rounded symmetric instead
    (symmetric_int8; from the scaled weights; the layers after them were calibrated on their k-quant rounding, an
    8-bit difference), on fp16 scales with half.
    Returns the record (also written to RECORD)."""
    import json
    import time

    import onnx
    import torch
    from onnx import numpy_helper

    from edgekit.convert.llm_fidelity import FloatModel, _decoder_layers
    from edgekit.convert.llm_sensitivity import matmul_modules

    if not calibrated(algo) and algo != OWN_KQUANT:
        raise ValueError(f"algo {algo!r} is not one of {ALGOS + (OWN_KQUANT,)}")
    t0 = time.monotonic()
    model_dir = Path(model_dir)
    head = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    nodes = _decoder_nodes(head)
    fm = FloatModel(Path(src_path), threads)
    model = fm.model
    by_layer: Dict[int, List[str]] = {}
    for n in nodes:
        by_layer.setdefault(int(_NODE.match(n.name).group(1)), []).append(re.sub(r"_Q\d+$", "", n.name))
    mods = matmul_modules(model, by_layer)
    path_of = {id(m): name for name, m in model.named_modules()}
    plan, skipped = [], []
    for n in nodes:
        base = re.sub(r"_Q\d+$", "", n.name)
        ms = mods.get(base)
        K = _attr(n, "K") if n.op_type == "MatMulNBits" else None
        N = _attr(n, "N") if n.op_type == "MatMulNBits" else None
        if ms and n.op_type == "MatMul":
            w = next((t for t in head.graph.initializer if t.name == n.input[1]), None)
            K, N = (list(w.dims) + [None, None])[:2] if w is not None else (None, None)
        if not ms or K != ms[0].in_features or N != sum(m.out_features for m in ms):
            skipped.append(n.name)   # e.g. a low-rank pair's node, or a layout this module does not know
            continue
        bits = _attr(n, "bits") if n.op_type == "MatMulNBits" else None
        plan.append((n, ms, bits))
    bits_of = {path_of[id(m)]: bits for _, ms, bits in plan for m in ms}
    norms = _norm_weights(head)
    norm_vals = {}
    key = (str(Path(src_path).resolve()), block, cal_tokens)
    if algo == OWN_KQUANT:   # k-quant's rounding, block by block: nothing to calibrate
        cal, cached = [], None
    elif key in _CACHE:   # a ladder's next rung: same calibration text, same AWQ scales (GPTQ reruns: other INT8 set)
        cal, cached = _CACHE[key]
    else:
        cal, cached = calibration_windows(fm, cal_tokens), None
    cal_n = int(sum(len(w) for w in cal))
    record: Dict[str, Any] = {"algo": algo, "block_size": block, "grid": "k-quant (4-bit zero point)",
                              "calibration": f"the float model's sampled continuations of "
                                             f"{len(cal)} calibration prompts ({cal_n} tokens), not the fidelity "
                                             "text", "calibration_tokens": cal_n}
    if algo == OWN_KQUANT:
        record["calibration"] = ("none: k-quant's rounding block by block, packed by edgekit (ONNX Runtime's "
                                 "quantizer cannot pack this block size for this model)")
    layers_of = _layers_norms(model)
    if algo in ("awq", "awq_gptq"):
        ninits = _init_map(onnx.load(str(model_dir / "model.onnx")))   # the norms' values (external data loaded)

        def norm_ok(i, name):
            key = (i, name)
            if key not in norms or key not in layers_of:
                return False
            v = numpy_helper.to_array(ninits[norms[key]])
            # the float weight as the graph holds it (a CUDA build's fp16)
            ref = layers_of[key].weight.detach().numpy().astype(v.dtype).astype(np.float32)
            v = v.astype(np.float32)
            ok = v.shape == ref.shape and np.allclose(v, ref, rtol=1e-5, atol=1e-6)
            if ok:
                norm_vals[key] = v
            return ok

        unplanned = ({path_of[id(m)] for layer in _decoder_layers(model) for m in _linears(layer).values()}
                     - set(bits_of))
        if cached is not None and all(norm_ok(e["layer"], e["from"]) for e in cached if e["from"] in _NORMS) and \
                not any(x in unplanned for e in cached for x in [e["prev"]] + e["mods"]):
            aw = cached
            for e in aw:
                _fold(model, e)
        else:
            aw = awq_model(model, cal, block, 4, "kquant", progress=progress, norm_ok=norm_ok, skip=unplanned)
        record["awq_cached"] = aw is cached
        record["awq"] = {"groups": len(aw), "alpha_mean": float(np.mean([a["alpha"] for a in aw])) if aw else None,
                         "error_ratio_mean": float(np.mean([a["error_ratio"] for a in aw])) if aw else None}
        del ninits
    else:
        aw = []
    if algo != OWN_KQUANT:
        _CACHE.clear()   # one model's at a time
        _CACHE[key] = (cal, aw if aw else cached)
    # the 8-bit nodes' weights as AWQ left them (gptq_model / rtn_model replace them by their k-quant rounding)
    w8 = {path_of[id(m)]: m.weight.data.clone() for _, ms, bits in plan if bits == 8 for m in ms} \
        if int8_blocks else {}
    if algo in ("gptq", "awq_gptq"):
        ints = gptq_model(model, cal, block, 4, "kquant", damp=GPTQ_DAMP, progress=progress, bits_of=bits_of)
        record["gptq"] = {"damp": GPTQ_DAMP, "act_order": False, "order": "layer by layer, q/k/v -> o -> gate/up -> "
                                                                     "down, inputs from the rounded layers before"}
    else:
        ints = rtn_model(model, block, 4, "kquant_ort" if algo == OWN_KQUANT else "kquant", bits_of=bits_of)
    # the new graph: every tensor written in the type of the one it replaces (a CUDA build's fp16)
    full = onnx.load(str(model_dir / "model.onnx"))
    dtypes = constant_dtypes(full.graph)
    drop, add = set(), []
    for n, ms, bits in plan:
        node = next(x for x in full.graph.node if x.name == n.name)
        if bits is None:
            w = torch.cat([m.weight.data for m in ms]).T.contiguous().numpy()
            t = numpy_helper.from_array(w.astype(dtypes.get(node.input[1], np.float32)), node.input[1])
            drop.add(node.input[1])
            add.append(t)
            continue
        if bits == 8 and int8_blocks:
            continue   # symmetric_int8 below
        qs = [ints[path_of[id(m)]] for m in ms]
        q = torch.cat([x[0] for x in qs]).numpy()
        sc = torch.cat([x[1] for x in qs]).numpy()
        zp = torch.cat([x[2] for x in qs]).numpy()
        prefix = re.sub(r"\.weight_Q\d+G\d+$", "", node.input[1])
        new, tens = nbits_node(node.name, node.input[0], node.output[0], prefix, q, sc, zp, _attr(node, "K"),
                               _attr(node, "N"), bits, block, _attr(node, "accuracy_level", 0),
                               dtypes.get(node.input[2], np.float32))
        drop.update(node.input[1:])
        add += tens
        node.CopyFrom(new)
    for a in aw:
        key = (a["layer"], a["from"])
        if key in norms:
            v = norm_vals[key] / a["scales"].numpy().astype(np.float32)
            drop.add(norms[key])
            add.append(numpy_helper.from_array(v.astype(dtypes.get(norms[key], np.float32)), norms[key]))
    if head_block:
        record["lm_head"] = _reblock_head(full, model, head_block, drop, add)
    if int8_blocks:
        mods8 = {n.name: ms for n, ms, bits in plan if bits == 8}
        head_w = None if head_block else getattr(getattr(model, "lm_head", None), "weight", None)

        def weight_of(node):
            if node.name in mods8:
                return torch.cat([w8[path_of[id(m)]] for m in mods8[node.name]])
            return head_w.data if head_w is not None and node.name.startswith("/lm_head/") else None

        record["int8"] = symmetric_int8(full, weight_of, int8_blocks, drop, add, half, head_blocks)
        left = sorted(set(mods8) & set(record["int8"]["kept"]))
        if left:   # their builder bytes were rounded from the weights before AWQ's scaling: wrong, not just wider
            raise RuntimeError(f"calibrated build: 8-bit MatMuls not re-rounded after scaling: {left}")
    _save(full, model_dir, drop, add)
    record.update({"nodes": len(plan), "bits": {str(b): sum(1 for _, _, x in plan if x == b) for b in
                                                sorted({x for _, _, x in plan}, key=str)},
                   "skipped": skipped, "seconds": round(time.monotonic() - t0, 1)})
    (model_dir / RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


def replace_nbits(full, node, q, scale, zp, block: int, drop: set, add: list) -> List[str]:
    """A MatMulNBits node of `full` rewritten in place with the integers q / scale / zp at `block` (zp None: the
    symmetric grid, no zero points; bits, K, N and accuracy level kept), its old initializers put in `drop`, the
    new ones in `add`, and every other node that read the old ones (a tied embedding's Reshape ->
    GatherBlockQuantized, before llm_graph aliases it) pointed at the new ones: a GatherBlockQuantized gets the
    block size and the zero points (or none). Returns the names of those readers."""
    from onnx import helper

    old = list(node.input)
    readers = [n for n in full.graph.node if n is not node and set(n.input) & set(old[1:])]
    prefix = re.sub(r"\.weight_Q\d+G\d+$", "", old[1])
    # the scales in the type the old ones were read in (the node's and its readers' activations' type)
    new, tens = nbits_node(node.name, old[0], node.output[0], prefix, np.asarray(q), np.asarray(scale),
                           None if zp is None else np.asarray(zp), _attr(node, "K"), _attr(node, "N"),
                           _attr(node, "bits"), block, _attr(node, "accuracy_level", 0),
                           constant_dtypes(full.graph).get(old[2], np.float32))
    names = [t.name for t in tens]
    rename = dict(zip(old[1:3], names[:2]))   # B and scales; zero points below
    drop.update(old[1:])
    add += tens
    node.CopyFrom(new)
    for n in readers:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
        if n.op_type == "GatherBlockQuantized":
            # inputs: data, indices, scales[, zero_points]
            del n.input[3:]
            if zp is not None:
                n.input.append(names[2])
            for a in n.attribute:
                if a.name == "block_size":
                    a.CopyFrom(helper.make_attribute("block_size", block))
    return [n.name for n in readers]


def _reblock_head(full, model, block: int, drop: set, add: list) -> Dict[str, Any]:
    """The 8-bit lm_head MatMulNBits re-rounded (k-quant) at `block` from the float model's weight, and every node
    reading its initializers (the tied embedding's Reshape -> GatherBlockQuantized) pointed at the new ones."""
    head = next((n for n in full.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")), None)
    w = getattr(getattr(model, "lm_head", None), "weight", None)
    if head is None or w is None or _attr(head, "bits") != 8:
        return {"block_size": None, "why": "no 8-bit lm_head MatMulNBits"}
    K, N, old = _attr(head, "K"), _attr(head, "N"), _attr(head, "block_size")
    reads = any(n is not head and set(n.input) & set(head.input[1:]) for n in full.graph.node)
    if tuple(w.shape) != (N, K) or (reads and K % block):
        return {"block_size": old, "why": f"kept at {old}: a {K}-wide table the embedding reads needs K % block == 0"}
    q, sc, zp = quantize_rtn(w.data, block, 8, "kquant")
    readers = replace_nbits(full, head, q.numpy(), sc.numpy(), zp.numpy(), block, drop, add)
    return {"block_size": block, "was": old, "readers": readers}


# --- the 8-bit nodes symmetric ----------------------------------------------------------------------------------
#
# The builder writes an 8-bit MatMulNBits as it writes a 4-bit one: k-quant, asymmetric, at the build's block, a
# fp32 scale and a uint8 zero point per block (block 32: 9.25 bits a weight). 8 bits need no zero point:
# symmetric_int8 rounds absmax / 127 per block (llama.cpp Q8_0's grid) and writes no zero points, ONNX Runtime's
# default 128 (MatMulNBits and GatherBlockQuantized alike: checked against numpy in ORT 1.32 at blocks 32-256,
# accuracy levels 0/1/4, bit-identical to an explicit zero point of 128), at the first block of `blocks` that
# divides K. At accuracy level 4 the block is also the one the int8 activations are quantized in, so it costs
# fidelity where the 8-bit nodes are most of the error (an INT8 build) and bytes and time where they are not.
INT8_NOTE = "8-bit MatMulNBits symmetric (absmax / 127 per block, no zero points: ONNX Runtime's default 128)"


def symmetric_block(K: int, blocks: Sequence[int], own: int) -> int:
    """The block symmetric_int8 writes a K-wide 8-bit node at: the first of `blocks` dividing K, else `own`, the
    block the node had (the model builder's: LLMBuildOptions.builder_block)."""
    return next((b for b in blocks if K % b == 0), own)


def symmetric_int8(full, weight_of: Callable[[Any], Any], blocks: Sequence[int], drop: set, add: list,
                   half: bool = False, head_blocks: Sequence[int] = ()) -> Dict[str, Any]:
    """Every 8-bit MatMulNBits of `full` whose float weight weight_of(node) gives ([N, K], torch) re-rounded
    symmetric at the first of `blocks` dividing K (else at its own block; the lm_head at the first of
    `head_blocks` dividing K where given), its readers pointed at the new initializers (replace_nbits); half: on
    fp16 scales (the file will hold them fp16: llm_graph.half_scales), as a node whose scales are fp16 already (a
    CUDA build's) is. Returns {"nodes", "blocks": {block: count}, "kept": names left as they were}."""
    from onnx import TensorProto

    done: Dict[str, int] = {}
    kept = []
    scale_type = {t.name: t.data_type for t in full.graph.initializer}
    for n in list(full.graph.node):
        if n.op_type != "MatMulNBits" or _attr(n, "bits") != 8:
            continue
        K, N = _attr(n, "K"), _attr(n, "N")
        # what nbits_node writes: scales an initializer (in the activations' type), no g_idx / bias, no
        # attributes beyond K, N, bits, block, level
        st = scale_type.get(n.input[2])
        plain = (st in (TensorProto.FLOAT, TensorProto.FLOAT16) and not any(n.input[4:])
                 and {a.name for a in n.attribute} <= {"K", "N", "bits", "block_size", "accuracy_level"})
        w = weight_of(n) if plain else None
        if w is None or tuple(w.shape) != (N, K):
            kept.append(n.name)
            continue
        b = symmetric_block(K, head_blocks if head_blocks and n.name.startswith("/lm_head/") else (),
                            symmetric_block(K, blocks, _attr(n, "block_size")))
        q, sc, _ = quantize_rtn(w, b, 8, "symmetric", half or st == TensorProto.FLOAT16)
        replace_nbits(full, n, q.numpy(), sc.numpy(), None, b, drop, add)
        done[str(b)] = done.get(str(b), 0) + 1
    return {"nodes": sum(done.values()), "blocks": done, "kept": kept}


def rewrite_int8(src_path, model_dir, blocks: Sequence[int], threads: Optional[int] = None,
                 model=None, half: bool = False, model_fn: Optional[Callable[[], Any]] = None,
                 head_blocks: Sequence[int] = ()) -> Dict[str, Any]:
    """A built model_dir's 8-bit MatMulNBits (lm_head, decoder nodes) re-rounded symmetric from the float model's
    weights (symmetric_int8); model.onnx + model.onnx.data rewritten when any was. A node whose weight the float
    model does not hold as one Linear or a packed q/k/v or gate/up (llm_sensitivity.matmul_modules; Phi-3's
    gate_proj / up_proj are the Linears llm_fidelity.split_gate_up makes of its gate_up_proj) is left as it is.
    model: the float torch model already loaded, or model_fn() giving it (the converter's FloatModel, which may
    read it again), called only when there is an 8-bit node; else loaded from src_path. half: on fp16 scales,
    head_blocks: the lm_head's blocks (symmetric_int8)."""
    import onnx
    import torch

    from edgekit.convert.llm_fidelity import FloatModel
    from edgekit.convert.llm_sensitivity import matmul_modules

    model_dir = Path(model_dir)
    full = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    if not any(n.op_type == "MatMulNBits" and _attr(n, "bits") == 8 for n in full.graph.node):
        return {"nodes": 0, "blocks": {}, "kept": []}
    if model is None and model_fn is not None:
        model = model_fn()
    if model is None:
        model = FloatModel(Path(src_path), threads).model
    by_layer: Dict[int, List[str]] = {}
    for n in _decoder_nodes(full):
        by_layer.setdefault(int(_NODE.match(n.name).group(1)), []).append(re.sub(r"_Q\d+$", "", n.name))
    mods = matmul_modules(model, by_layer)
    head = getattr(getattr(model, "lm_head", None), "weight", None)

    def weight_of(node):
        if node.name.startswith("/lm_head/"):
            return None if head is None else head.data
        ms = mods.get(re.sub(r"_Q\d+$", "", node.name))
        return torch.cat([m.weight.data for m in ms]) if ms else None

    full = onnx.load(str(model_dir / "model.onnx"))
    drop: set = set()
    add: list = []
    with torch.no_grad():
        rec = symmetric_int8(full, weight_of, blocks, drop, add, half, head_blocks)
    if rec["nodes"]:
        _save(full, model_dir, drop, add)
    return rec


EMBED_ROWS = 8192   # rows of the table rounded at a time (a 151,936 x 1,536 float table is 0.9 GB)


def quantize_embedding(model_dir, blocks: Sequence[int], half: bool = False) -> Dict[str, Any]:
    """The float embedding table of an untied model (the builder's Gather of a [vocab, hidden] float initializer:
    its GatherBlockQuantized form only shares a tied lm_head's table) stored 8-bit: symmetric per block of the
    first of `blocks` dividing hidden (absmax / 127, as the 8-bit MatMulNBits edgekit writes; half: scales on
    fp16's grid, for llm_graph.half_scales), read by a GatherBlockQuantized (bits 8, quantize_axis 1, no zero
    points: 128) in the table's own type. Rewrites model.onnx + model.onnx.data when such a table is found.
    Returns {"node", "rows", "hidden", "block", "bytes_before", "bytes_after", "note"}, or {"skipped": why} (None
    when there was no such table: a tied or float build, a second call)."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    model_dir = Path(model_dir)
    head = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    g = head.graph
    inits = {t.name: t for t in g.initializer}
    reads = readers(g)
    node = next((n for n in g.node if n.op_type == "Gather" and n.name.endswith("embed_tokens/Gather")
                 and n.input[0] in inits), None)
    if node is None:
        return {"skipped": None}
    t = inits[node.input[0]]
    if t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or len(t.dims) != 2:
        return {"skipped": f"{t.name}: a {TensorProto.DataType.Name(t.data_type)} table of rank {len(t.dims)}"}
    if _attr(node, "axis", 0) != 0 or len(reads.get(t.name, ())) != 1 or t.name in {i.name for i in g.input}:
        return {"skipped": f"{t.name}: read by more than the embedding's Gather along axis 0"}
    rows, hidden = int(t.dims[0]), int(t.dims[1])
    block = next((b for b in blocks if hidden % b == 0), None)
    if block is None:
        return {"skipped": f"hidden size {hidden} is a multiple of none of the blocks {list(blocks)}"}
    full = onnx.load(str(model_dir / "model.onnx"))
    inits = {x.name: x for x in full.graph.initializer}
    table = numpy_helper.to_array(inits[t.name])
    dtype = table.dtype
    q = np.empty((rows, hidden), dtype=np.uint8)
    scales = np.empty((rows, hidden // block), dtype=dtype)
    with torch.no_grad():
        for i in range(0, rows, EMBED_ROWS):
            w = torch.from_numpy(np.array(table[i:i + EMBED_ROWS], dtype=np.float32))   # a writable copy
            qi, si, _ = quantize_rtn(w, block, bits=8, grid="symmetric", half=half)
            q[i:i + EMBED_ROWS] = qi.numpy().astype(np.uint8)
            scales[i:i + EMBED_ROWS] = si.numpy().astype(dtype)
    del table
    taken = set(inits) | {o for n in full.graph.node for o in n.output} | {i.name for i in full.graph.input}
    qname, sname = f"{t.name}_Q8G{block}", f"{t.name}_scale"
    while qname in taken:
        qname += "_"
    while sname in taken:
        sname += "_"
    gbq = helper.make_node("GatherBlockQuantized", [qname, node.input[1], sname], list(node.output),
                           name=node.name[:-len("Gather")] + "GatherBlockQuantized", domain="com.microsoft",
                           bits=8, block_size=block, gather_axis=0, quantize_axis=1)
    nodes = [gbq if n.name == node.name else n for n in full.graph.node]
    del full.graph.node[:]
    full.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in full.opset_import):
        full.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    before = int(np.prod(t.dims)) * np.dtype(dtype).itemsize
    _save(full, model_dir, {t.name}, [numpy_helper.from_array(q, qname), numpy_helper.from_array(scales, sname)])
    return {"node": gbq.name, "rows": rows, "hidden": hidden, "block": block, "bytes_before": before,
            "bytes_after": int(q.nbytes + scales.nbytes), "note": EMBED_NOTE}


def _save(full, model_dir, drop: set, add: list) -> None:
    """`full` with the initializers named in `drop` replaced by `add`, written over model_dir's model.onnx and
    model.onnx.data (llm_graph.save_with_data)."""
    keep = [t for t in full.graph.initializer if t.name not in drop]
    del full.graph.initializer[:]
    full.graph.initializer.extend(keep + add)
    save_with_data(full, Path(model_dir))


def int8_summary(model_dir) -> Optional[Dict[str, Any]]:
    """The shipped graph's 8-bit MatMulNBits, for the manifest: {"nodes", "symmetric" (no zero points), "blocks":
    {block: count}, "weights", "bytes" (B, scales, zero points), "bits_per_weight", "note"}; None without any."""
    import onnx

    from edgekit.convert.llm_graph import stored_bytes

    m = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    sizes = stored_bytes(m)   # scales stored fp16 behind a Cast (llm_graph.half_scales) counted as the file holds them
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits" and _attr(n, "bits") == 8]
    if not nodes:
        return None
    blocks: Dict[str, int] = {}
    for n in nodes:
        blocks[str(_attr(n, "block_size"))] = blocks.get(str(_attr(n, "block_size")), 0) + 1
    weights = sum(_attr(n, "K") * _attr(n, "N") for n in nodes)
    nbytes = sum(sizes.get(x, 0) for n in nodes for x in n.input[1:4] if x)
    sym = sum(1 for n in nodes if len(n.input) < 4 or not n.input[3])
    return {"nodes": len(nodes), "symmetric": sym, "blocks": blocks, "weights": weights, "bytes": nbytes,
            "bits_per_weight": round(8 * nbytes / weights, 3), "note": INT8_NOTE if sym == len(nodes) else None}


def _layers_norms(model) -> Dict[Tuple[int, str], Any]:
    from edgekit.convert.llm_fidelity import _decoder_layers

    out = {}
    for i, layer in enumerate(_decoder_layers(model)):
        for name in ("input_layernorm", "post_attention_layernorm"):
            if getattr(layer, name, None) is not None:
                out[(i, name)] = getattr(layer, name)
    return out
