"""Low-rank factorization: a Dense/Linear layer (or a convolution) becomes two thinner ones.

A layer's weight, as a matrix W of (k*k*in) x out (k*k the kernel area; 1 for Dense), is replaced by
its truncated SVD: W ~ U_r S_r V_r^T = A @ B with A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T (the best
rank-r approximation, Eckart-Young). The layer becomes the first: x -> x A (for a convolution: a k x k
convolution to r channels, same stride/padding/dilation, no bias) and the second: h -> h B + bias
(a 1x1 convolution), with the original activation. Parameters and FLOPs go from k*k*in*out to
r*(k*k*in + out) (per output position), which is a saving only when r < k*k*in*out / (k*k*in + out):
a layer where it is not is left alone, and the record says so.

The rank of each layer: `rank_ratio` r (rank = r x min(k*k*in, out)), `energy` e (the smallest rank whose
singular values keep e of the squared Frobenius norm: layers with a flat spectrum keep more), or a
budget of the whole model's parameters or FLOPs (`params_budget` / `flops_budget`, a fraction of the
original): one energy threshold for every layer, found by bisection, the largest whose model fits.

Kinds of model:
- Keras 3 (.keras / .h5): Dense, Conv1D, Conv2D (groups 1) rebuilt in the model's config; the second
  layer keeps the original name, so whatever consumed it still does. The output layer is left alone
  unless asked (a low rank there caps the rank of the logits).
- PyTorch nn.Module (Python: factorize_module): nn.Linear -> nn.Sequential(Linear(in, r, bias=False),
  Linear(r, out)), nn.Conv2d (groups 1) -> nn.Sequential(Conv2d(in, r, k, ...), Conv2d(r, out, 1)).
- a causal LM (Hugging Face folder): its decoder layers' MLP projections (attention's too on request),
  fine-tuned by distillation from the original on text; saved as a Hugging Face folder of the same
  architecture whose projection weights are the rank-r products (Llama-family configurations cannot
  say "two thinner matrices": transformers loads it as the original, the float reference) plus the
  factors themselves (edgekit_lowrank.safetensors, named in edgekit_factorize.json), which `edgekit
  convert` builds into the LLM bundle as two MatMuls per layer (edgekit.convert.llm_lowrank).

`figures`: per layer rank, parameters and FLOPs before/after and output error (relative L2 error of the
layer's output on the data, ||y - y_r|| / ||y||); whole model size, accuracy or perplexity, and with a
target the latency of the converted bundle before and after.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edgekit.errors import BudgetMissed, DataError


@dataclass(frozen=True)
class RankRule:
    """How each layer's rank is chosen: exactly one of the four."""

    rank_ratio: Optional[float] = None
    energy: Optional[float] = None
    params_budget: Optional[float] = None
    flops_budget: Optional[float] = None

    def __post_init__(self):
        given = [k for k, v in asdict(self).items() if v is not None]
        if len(given) != 1:
            raise DataError("give one of --rank-ratio, --energy, --params-budget, --flops-budget"
                            + (f" (not {' and '.join('--' + g.replace('_', '-') for g in given)})" if given else ""))
        v = getattr(self, given[0])
        if not 0.0 < v <= 1.0:
            raise DataError(f"--{given[0].replace('_', '-')} must be in (0, 1], not {v}")

    def describe(self) -> str:
        k, v = next((k, v) for k, v in asdict(self).items() if v is not None)
        return f"{k.replace('_', '-')} {v:g}"


@dataclass
class Layer:
    """One factorizable layer, as a matrix: rows = k*k*in (kernel area x input channels), cols = out."""

    name: str
    kind: str                # dense | conv
    matrix: np.ndarray       # [rows, out] float64
    positions: int           # output positions per sample (tokens, pixels) the layer computes
    kernel_area: int = 1
    in_channels: int = 0
    out_channels: int = 0
    spectrum: Optional[np.ndarray] = None   # singular values, descending
    u: Optional[np.ndarray] = None
    vt: Optional[np.ndarray] = None

    def __post_init__(self):
        self.in_channels = self.in_channels or self.matrix.shape[0] // self.kernel_area
        self.out_channels = self.out_channels or self.matrix.shape[1]

    @property
    def full_rank(self) -> int:
        return int(min(self.matrix.shape))

    def svd(self) -> None:
        if self.spectrum is None:
            self.u, self.spectrum, self.vt = np.linalg.svd(self.matrix, full_matrices=False)

    def weights(self, rank: Optional[int]) -> int:
        rows, cols = self.matrix.shape
        return rows * cols if rank is None else rank * (rows + cols)

    def flops(self, rank: Optional[int]) -> int:
        return 2 * self.positions * self.weights(rank)

    def pays(self, rank: int) -> bool:
        return self.weights(rank) < self.weights(None)

    def rank_for(self, rule: RankRule, energy: Optional[float] = None) -> int:
        if rule.rank_ratio is not None:
            return max(1, int(round(rule.rank_ratio * self.full_rank)))
        self.svd()
        e = energy if energy is not None else rule.energy
        cum = np.cumsum(self.spectrum ** 2) / max(1e-30, float((self.spectrum ** 2).sum()))
        return int(min(self.full_rank, max(1, int(np.searchsorted(cum, e - 1e-12) + 1))))

    def factors(self, rank: int) -> Tuple[np.ndarray, np.ndarray]:
        self.svd()
        s = np.sqrt(self.spectrum[:rank])
        return (self.u[:, :rank] * s).astype(np.float32), (s[:, None] * self.vt[:rank]).astype(np.float32)

    def energy_kept(self, rank: int) -> float:
        self.svd()
        return float((self.spectrum[:rank] ** 2).sum() / max(1e-30, (self.spectrum ** 2).sum()))


def plan_ranks(layers: Sequence[Layer], rule: RankRule, other_params: int = 0, other_flops: int = 0
               ) -> Dict[str, Dict[str, Any]]:
    """Per layer: the rank chosen, whether it pays (else the layer stays as it is, and why)."""

    def choose(energy=None):
        out = {}
        for ly in layers:
            r = ly.rank_for(rule, energy)
            if r >= ly.full_rank:
                out[ly.name] = {"rank": None, "why": f"rank {r} of {ly.full_rank}: nothing to cut"}
            elif not ly.pays(r):
                out[ly.name] = {"rank": None, "why": f"rank {r} would cost {ly.weights(r):,} weights, more than "
                                                     f"its {ly.weights(None):,}: left as it is"}
            else:
                out[ly.name] = {"rank": r, "why": ""}
        return out

    if rule.params_budget is None and rule.flops_budget is None:
        return choose()
    budget, what = (rule.params_budget, "weights") if rule.params_budget is not None else (rule.flops_budget, "flops")

    def total(plan):
        f = (lambda ly, r: ly.weights(r)) if what == "weights" else (lambda ly, r: ly.flops(r))
        return sum(f(ly, plan[ly.name]["rank"]) for ly in layers) + (other_params if what == "weights" else
                                                                      other_flops)

    full = sum((ly.weights(None) if what == "weights" else ly.flops(None)) for ly in layers) + \
        (other_params if what == "weights" else other_flops)
    goal = budget * full
    lo_plan = choose(1e-9)
    if total(lo_plan) > goal:
        raise DataError(f"a budget of {budget:g} of the model's {what} cannot be met by factorizing: rank 1 "
                        f"everywhere leaves {total(lo_plan) / full:.3f} of them",
                        hint="give a larger budget, or prune the rest")
    lo, hi, best = 0.0, 1.0, lo_plan
    for _ in range(40):
        mid = (lo + hi) / 2
        p = choose(mid)
        if total(p) <= goal:
            lo, best = mid, p
        else:
            hi = mid
    for v in best.values():
        v["energy_threshold"] = lo
    return best


def _rel_err(y: np.ndarray, y2: np.ndarray) -> float:
    return float(np.linalg.norm(y - y2) / max(1e-30, np.linalg.norm(y)))


def layer_row(ly: Layer, plan: Dict[str, Any], out_err: Optional[float]) -> Dict[str, Any]:
    r = plan["rank"]
    return {"layer": ly.name, "kind": ly.kind, "shape": [int(ly.matrix.shape[0]), int(ly.matrix.shape[1])],
            "kernel_area": ly.kernel_area, "full_rank": ly.full_rank, "rank": r, "factorized": r is not None,
            "params_before": ly.weights(None), "params_after": ly.weights(r),
            "flops_before": ly.flops(None), "flops_after": ly.flops(r),
            "energy_kept": ly.energy_kept(r) if r is not None else 1.0,
            "weight_rel_err": (_rel_err(ly.matrix, np.matmul(*ly.factors(r))) if r is not None else 0.0),
            "output_rel_err": out_err if r is not None else 0.0, "note": plan["why"]}


def totals(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    f = [r for r in rows if r["factorized"]]
    return {"layers": len(rows), "factorized": len(f), "left_alone": len(rows) - len(f),
            "layer_params_before": sum(r["params_before"] for r in rows),
            "layer_params_after": sum(r["params_after"] for r in rows),
            "layer_flops_before": sum(r["flops_before"] for r in rows),
            "layer_flops_after": sum(r["flops_after"] for r in rows)}


# --- Keras ----------------------------------------------------------------------------------------------

_KERAS_KINDS = {"Dense": "dense", "Conv2D": "conv", "Conv1D": "conv"}


def keras_layers(model, include_output: bool = False) -> Tuple[List[Layer], Dict[str, str]]:
    """Factorizable layers of a Keras model, and the others with the reason they are not."""
    outputs = {t._keras_history.operation.name for t in model.outputs}
    found, skipped = [], {}
    for layer in model.layers:
        k = type(layer).__name__
        if k not in _KERAS_KINDS and k not in ("DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose"):
            continue
        if k not in _KERAS_KINDS:
            skipped[layer.name] = f"{k}: not factorized (already a thin per-channel or transposed operation)"
            continue
        if layer.name in outputs and not include_output:
            skipped[layer.name] = "the model's output layer: left alone (--include-output factorizes it)"
            continue
        if getattr(layer, "groups", 1) != 1:
            skipped[layer.name] = f"grouped convolution (groups={layer.groups}): left alone"
            continue
        kernel = layer.get_weights()[0]
        area = int(np.prod(kernel.shape[:-2])) if kernel.ndim > 2 else 1
        positions = int(np.prod([d for d in layer.output.shape[1:-1]])) if len(layer.output.shape) > 2 else 1
        found.append(Layer(layer.name, _KERAS_KINDS[k], kernel.reshape(-1, kernel.shape[-1]).astype(np.float64),
                           positions, area, int(kernel.shape[-2]), int(kernel.shape[-1])))
    return found, skipped


def rebuild_keras(model, factors: Dict[str, Tuple[np.ndarray, np.ndarray]]):
    """The model with each named layer split in two: `<name>_lowrank` (A, no bias, no activation) then
    `<name>` (B, the original bias and activation); every other weight copied."""
    import keras

    cfg = copy.deepcopy(model.get_config())
    new_layers = []
    for lc in cfg["layers"]:
        lc.pop("build_config", None)  # the old input shapes; the new ones follow from the graph
        name = lc["config"]["name"]
        if name not in factors:
            new_layers.append(lc)
            continue
        a, _ = factors[name]
        first = copy.deepcopy(lc)
        first["config"]["name"] = f"{name}_lowrank"
        if "name" in first:
            first["name"] = f"{name}_lowrank"
        first["config"].update(use_bias=False, activation="linear", activity_regularizer=None,
                               bias_regularizer=None, bias_constraint=None)
        second = lc
        if lc["class_name"] == "Dense":
            first["config"]["units"] = int(a.shape[1])
        else:
            first["config"]["filters"] = int(a.shape[1])
            nd = 2 if lc["class_name"] == "Conv2D" else 1
            second["config"].update(kernel_size=[1] * nd, strides=[1] * nd, padding="valid",
                                    dilation_rate=[1] * nd)
        if "inbound_nodes" in lc:  # functional: the second layer takes the first's output, call by call
            shape = list(model.get_layer(name).output.shape)
            axis = 1 if lc["config"].get("data_format") == "channels_first" else len(shape) - 1
            shape[axis] = int(a.shape[1])
            second["inbound_nodes"] = [
                {"args": [{"class_name": "__keras_tensor__",
                           "config": {"shape": shape, "dtype": lc["config"].get("dtype") and "float32",
                                      "keras_history": [f"{name}_lowrank", i, 0]}}], "kwargs": {}}
                for i in range(len(first["inbound_nodes"]))]
        new_layers += [first, second]
    cfg["layers"] = new_layers
    if isinstance(model, keras.Sequential):
        new = keras.Sequential.from_config(cfg)
    else:
        new = keras.Model.from_config(cfg)
    for layer in new.layers:
        name = layer.name
        if name.endswith("_lowrank") and name[: -len("_lowrank")] in factors:
            a, _ = factors[name[: -len("_lowrank")]]
            shape = layer.get_weights()[0].shape
            layer.set_weights([a.reshape(shape)])
        elif name in factors:
            _, b = factors[name]
            old = model.get_layer(name).get_weights()
            shape = layer.get_weights()[0].shape
            layer.set_weights([b.reshape(shape)] + old[1:])
        elif layer.get_weights():
            layer.set_weights(model.get_layer(name).get_weights())
    return new


def keras_output_errors(model, layers: List[Layer], factors: Dict[str, Tuple[np.ndarray, np.ndarray]], x,
                        samples: int = 64) -> Dict[str, float]:
    """Each factorized layer's relative output error (pre-activation, bias included) on the layer's real
    inputs in the original model."""
    import keras

    names = [ly.name for ly in layers if ly.name in factors]
    if not names:
        return {}
    probe = keras.Model(model.inputs, [model.get_layer(n).input for n in names])
    xs = x[:samples] if not isinstance(x, list) else [a[:samples] for a in x]
    ins = probe.predict(xs, verbose=0)
    ins = ins if isinstance(ins, list) else [ins]
    out = {}
    for n, h in zip(names, ins):
        layer = model.get_layer(n)
        w = layer.get_weights()
        kernel = w[0]
        a, b = factors[n]
        if type(layer).__name__ == "Dense":
            y = h @ kernel
            y2 = (h @ a) @ b
        else:
            conv = keras.ops.conv
            kw = dict(strides=layer.strides, padding=layer.padding, dilation_rate=layer.dilation_rate,
                      data_format=layer.data_format)
            y = np.asarray(conv(h, kernel, **kw))
            mid = np.asarray(conv(h, a.reshape(kernel.shape[:-1] + (a.shape[1],)), **kw))
            y2 = np.asarray(conv(mid, b.reshape((1,) * (kernel.ndim - 2) + b.shape), strides=1, padding="valid",
                                 data_format=layer.data_format))
        out[n] = _rel_err(np.asarray(y, np.float64), np.asarray(y2, np.float64))
    return out


def factorize_keras(model_path: str, rule: RankRule, data: str, *, val: Optional[str] = None, epochs: int = 0,
                    lr: float = 1e-3, distill: bool = False, include_output: bool = False, skip: Sequence[str] = (),
                    out: Optional[str] = None, targets: Sequence[str] = (), say: Callable[[str], None] = print,
                    runs: int = 200) -> Dict[str, Any]:
    """Factorize a Keras model's Dense / Conv layers, fine-tune it (`epochs`, against the original's outputs
    with `distill`), and measure both: float figures here, and with `targets` the INT8 bundle of each."""
    from edgekit.optimize import common, surgery

    if epochs < 0:
        raise DataError(f"--epochs must be >= 0, not {epochs}")
    model = common.load_keras(model_path)
    train, val_ds = common.training_data(model, data, val)
    layers, skipped = keras_layers(model, include_output)
    for n in skip:
        if n not in {ly.name for ly in layers} | set(skipped):
            raise DataError(f"--skip {n}: the model has no factorizable layer of that name")
        skipped[n] = "left alone as asked"
    layers = [ly for ly in layers if ly.name not in skip]
    if not layers:
        raise DataError("the model has no Dense / Conv layer to factorize" + (
            f" ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""), path=model_path)
    c = surgery.count(model)
    plan = plan_ranks(layers, rule, other_params=c["params"] - sum(ly.weights(None) for ly in layers),
                      other_flops=c["flops"] - sum(ly.flops(None) for ly in layers))
    factors = {ly.name: ly.factors(plan[ly.name]["rank"]) for ly in layers if plan[ly.name]["rank"]}
    if not factors:
        raise DataError(f"with {rule.describe()} no layer gets cheaper: "
                        + "; ".join(f"{k}: {v['why']}" for k, v in plan.items()), hint="give a lower rank")
    say(f"measuring the original model ({len(val_ds)} validation samples)")
    before = common.figures(model, val_ds, runs)
    errs = keras_output_errors(model, layers, factors, common._x(model, val_ds))
    new = rebuild_keras(model, factors)
    say("factorized: " + ", ".join(f"{k} rank {plan[k]['rank']}/{ly.full_rank}" for ly in layers
                                   for k in [ly.name] if plan[k]["rank"]))
    after_cut = common.accuracy(new, val_ds)
    if epochs:
        import keras

        say(f"fine-tuning {epochs} epoch(s) on {len(train)} samples" + (" against the original" if distill else ""))
        if distill:
            from edgekit.optimize.distill import make_distiller

            trainer = make_distiller(new, model, temperature=4.0, alpha=0.5)
            trainer.compile(optimizer=keras.optimizers.Adam(lr))
        else:
            common.compile_for(new, lr)
            trainer = new
        trainer.fit(common._x(new, train), train.labels, epochs=epochs, batch_size=32, verbose=0)
    after = common.figures(new, val_ds, runs)
    rows = [layer_row(ly, plan[ly.name], errs.get(ly.name)) for ly in layers]
    rows += [{"layer": n, "factorized": False, "note": why} for n, why in skipped.items()]
    saved = common.save(new, out) if out else None
    res: Dict[str, Any] = {
        "kind": "keras", "rule": rule.describe(), "epochs": epochs, "distill": distill, "layers": rows,
        "totals": dict(totals([r for r in rows if "params_before" in r]),
                       params_ratio=after["params"] / before["params"], flops_ratio=after["flops"] / before["flops"]),
        "before": before, "after": after, "after_cut": {"accuracy": after_cut},
        "accuracy_drop": before["accuracy"] - after["accuracy"], "saved": str(saved) if saved else None}
    if targets:
        if saved is None:
            raise DataError("measuring bundles needs the factorized model saved: give -o")
        res["bundles"] = bundle_latency(model_path, str(saved), targets, data, val, Path(str(saved)).with_suffix(""),
                                        say, runs)
    return res


def bundle_latency(before_path: str, after_path: str, targets: Sequence[str], calib: str, val: Optional[str],
                   where: "Path", say: Callable[[str], None], runs: int = 200) -> List[Dict[str, Any]]:
    """Each model converted (INT8, each target's preferred format) into `where`.bundles/ and timed here
    with edgekit.runtime (the latency method of DESIGN.md)."""
    from edgekit.convert import Calibration, ConvertRecipe, convert
    from edgekit.runtime import load
    from edgekit.targets import load_target

    out_dir = where.with_name(where.name + ".bundles")
    rows: Dict[Tuple[str, str], Dict[str, Any]] = {}
    jobs = [(label, path, t) for t in targets for label, path in (("before", before_path), ("after", after_path))]
    for label, path, target in jobs:
        fmt = load_target(target).formats[0]
        say(f"converting the model {label} factorization for {target} ({fmt}, INT8)")
        recipe = ConvertRecipe(model=path, targets=(target,), formats=(fmt,), calibration=Calibration(path=calib),
                               validation=val, name=Path(path).stem, compat_check="off")
        try:
            result = convert(recipe, str(out_dir))
        except BudgetMissed as e:  # a row below the floor is still a measurement: its failure is recorded
            result = e.result
        for b in result.bundles:
            row = rows.setdefault((b.target, b.fmt), {"target": b.target, "format": b.fmt})
            if not b.ok:
                row[f"{label}_failure"] = f"{b.failure.stage}: {b.failure.reason}"
                continue
            m = load(b.path, threads=1)
            rep = m.benchmark(runs=runs, warmup=20, end_to_end=False)
            row[f"{label}_bundle"] = str(b.path)
            row[f"{label}_bytes"] = len(b.artifact.data)
            row[f"{label}_p50_ms"] = rep["latency"]["p50_ms"]
            row[f"{label}_noisy"] = rep["noisy"]
            row[f"{label}_metrics"] = {k: v for k, v in b.artifact.metrics.items()
                                       if isinstance(v, (int, float, str, bool)) or v is None}
    for row in rows.values():
        if row.get("before_p50_ms") and row.get("after_p50_ms"):
            row["speedup"] = round(row["before_p50_ms"] / row["after_p50_ms"], 3)
            row["before"] = f"{row['before_p50_ms']:.4g} ms"
            row["after"] = f"{row['after_p50_ms']:.4g} ms"
    return list(rows.values())


# --- PyTorch --------------------------------------------------------------------------------------------

def torch_layers(module, example_inputs: Optional[Tuple] = None, *, skip: Sequence[str] = (),
                 only: Optional[Callable[[str], bool]] = None, per_token: bool = False
                 ) -> Tuple[List[Layer], Dict[str, str]]:
    """nn.Linear / nn.Conv2d (groups 1) of a module; output positions from a forward pass on
    example_inputs (per_token: 1 per position, the FLOPs of one token of a language model)."""
    import torch

    shapes: Dict[str, Tuple[int, ...]] = {}
    hooks = []
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            def keep_shape(mod, i, o, name=name):  # a forward hook that returns nothing leaves the output alone
                shapes.setdefault(name, tuple(o.shape))
            hooks.append(m.register_forward_hook(keep_shape))
    if example_inputs is not None and not per_token:
        was = module.training
        module.eval()
        try:
            with torch.no_grad():
                module(*example_inputs)
        finally:
            module.train(was)
    for h in hooks:
        h.remove()
    found, skipped = [], {}
    for name, m in module.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or (only is not None and not only(name)):
            continue
        if name in skip:
            skipped[name] = "left alone as asked"
            continue
        w = m.weight.detach().double().cpu().numpy()
        if isinstance(m, torch.nn.Linear):
            shape = shapes.get(name, ())
            pos = 1 if per_token or len(shape) <= 2 else int(np.prod(shape[1:-1]))
            found.append(Layer(name, "dense", w.T.copy(), pos))
            continue
        if m.groups != 1 or m.padding_mode != "zeros":
            skipped[name] = f"grouped or {m.padding_mode}-padded convolution: left alone"
            continue
        if name not in shapes:
            skipped[name] = "not reached by the example input (no output size): left alone"
            continue
        area = int(np.prod(m.kernel_size))
        # [out, in, kh, kw] -> rows (kh, kw, in), cols out: the layout A is reshaped back from
        mat = w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
        found.append(Layer(name, "conv", mat, int(np.prod(shapes[name][2:])), area, int(w.shape[1]), int(w.shape[0])))
    return found, skipped


def _torch_pair(m, a: np.ndarray, b: np.ndarray):
    import torch

    r = a.shape[1]
    dev, dt = m.weight.device, m.weight.dtype
    if isinstance(m, torch.nn.Linear):
        first = torch.nn.Linear(m.in_features, r, bias=False)
        second = torch.nn.Linear(r, m.out_features, bias=m.bias is not None)
        first.weight.data = torch.from_numpy(a.T.copy())
        second.weight.data = torch.from_numpy(b.T.copy())
    else:
        kh, kw = m.kernel_size
        first = torch.nn.Conv2d(m.in_channels, r, m.kernel_size, stride=m.stride, padding=m.padding,
                                dilation=m.dilation, bias=False)
        second = torch.nn.Conv2d(r, m.out_channels, 1, bias=m.bias is not None)
        first.weight.data = torch.from_numpy(a.reshape(kh, kw, m.in_channels, r).transpose(3, 2, 0, 1).copy())
        second.weight.data = torch.from_numpy(b.T.copy()[:, :, None, None])
    if m.bias is not None:
        second.bias.data = m.bias.detach().clone()
    return torch.nn.Sequential(first, second).to(device=dev, dtype=dt)


def replace_torch(module, factors: Dict[str, Tuple[np.ndarray, np.ndarray]]):
    """Each named nn.Linear / nn.Conv2d of `module` (in place) replaced by its low-rank pair."""
    for name, (a, b) in factors.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, _torch_pair(getattr(parent, leaf), a, b))
    return module


def torch_output_errors(module, layers: List[Layer], factors, example_inputs) -> Dict[str, float]:
    """Each factorized layer's relative output error on its real inputs (one forward of the original)."""
    import torch

    names = {ly.name for ly in layers if ly.name in factors}
    got: Dict[str, Any] = {}
    def keep(mod, i, o, n):
        got.setdefault(n, (i[0].detach(), o.detach()))

    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: keep(mod, i, o, n))
             for n, m in module.named_modules() if n in names]
    try:
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, (x, y) in got.items():
        pair = _torch_pair(module.get_submodule(n), *factors[n])
        with torch.no_grad():
            out[n] = _rel_err(y.double().cpu().numpy(), pair(x).double().cpu().numpy())
    return out


def factorize_module(module, rule: RankRule, example_inputs: Optional[Tuple] = None, *, skip: Sequence[str] = ()
                     ) -> Tuple[Any, Dict[str, Any]]:
    """A copy of a torch nn.Module with its Linear / Conv2d layers factorized, and the per-layer record.
    Convert the result like any module: edgekit.convert.convert_module(result, example_inputs, ...)."""
    layers, skipped = torch_layers(module, example_inputs, skip=skip)
    other = sum(int(p.numel()) for p in module.parameters()) - sum(ly.weights(None) for ly in layers)
    plan = plan_ranks(layers, rule, other_params=other)
    factors = {ly.name: ly.factors(plan[ly.name]["rank"]) for ly in layers if plan[ly.name]["rank"]}
    errs = torch_output_errors(module, layers, factors, example_inputs) if example_inputs is not None else {}
    new = replace_torch(copy.deepcopy(module), factors)
    rows = [layer_row(ly, plan[ly.name], errs.get(ly.name)) for ly in layers]
    rows += [{"layer": n, "factorized": False, "note": why} for n, why in skipped.items()]
    return new, {"rule": rule.describe(), "layers": rows,
                 "totals": totals([r for r in rows if "params_before" in r]),
                 "params_before": sum(int(p.numel()) for p in module.parameters()),
                 "params_after": sum(int(p.numel()) for p in new.parameters())}


# --- torch.export programs (.pt2) --------------------------------------------------------------------------

def _program_data(path: str, names: List[str], where: str) -> Tuple[List[np.ndarray], Optional[np.ndarray]]:
    """Inputs (in the program's order) and labels from an .npz keyed by input name (or holding one array
    besides 'labels' for a one-input program), or a .npy for a one-input program."""
    p = Path(path)
    if not p.is_file() or p.suffix not in (".npz", ".npy"):
        raise DataError("a PyTorch program's data must be an .npz keyed by input name (+ 'labels') or a .npy",
                        path=path)
    if p.suffix == ".npy":
        if len(names) != 1:
            raise DataError(f"the program takes {len(names)} inputs ({', '.join(names)}): give an .npz", path=path)
        return [np.load(p)], None
    z = np.load(p)
    labels = z["labels"] if "labels" in z.files else None
    rest = [k for k in z.files if k != "labels"]
    if all(n in z.files for n in names):
        return [z[n] for n in names], labels
    if len(names) == 1 and len(rest) == 1:
        return [z[rest[0]]], labels
    raise DataError(f"the .npz holds {rest}, the program's inputs are {names}", path=path,
                    hint=f"key the arrays by input name ({where})")


def factorize_program(model_path: str, rule: RankRule, data: str, *, val: Optional[str] = None,
                      skip: Sequence[str] = (), include_output: bool = False, out: Optional[str] = None,
                      say: Callable[[str], None] = print) -> Dict[str, Any]:
    """A torch.export program (.pt2): each aten.linear whose weight is a parameter becomes two (x A^T, then
    B^T + bias), re-exported to `out` (.pt2, which edgekit convert takes). Convolutions and fine-tuning are
    for nn.Modules in Python (factorize_module). Figures on `val` (else `data`): per layer rank, parameters,
    FLOPs, output error; the program's outputs before/after (relative error, top-1 agreement, accuracy when
    the data has 'labels')."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    if not Path(model_path).is_file():
        raise DataError("model not found", path=model_path)
    try:
        ep = torch.export.load(model_path)
    except (RuntimeError, ValueError, OSError) as e:
        raise DataError(f"torch.export.load cannot read it: {str(e).splitlines()[0][:200]}", path=model_path,
                        hint="save the program with torch.export.save(torch.export.export(model, example), path)"
                        ) from None
    gm = ep.module()
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    xs, labels = _program_data(val or data, names, model_path)
    ex = ep.example_inputs[0] if ep.example_inputs else ()
    bs = int(ex[0].shape[0]) if ex and hasattr(ex[0], "shape") and len(ex[0].shape) else 1
    n_rows = min(len(x) for x in xs) // bs * bs
    if n_rows == 0:
        raise DataError(f"the data has fewer samples than the program's batch of {bs}", path=val or data)
    args = tuple(torch.from_numpy(np.ascontiguousarray(x[:n_rows])) for x in xs)
    chunks = [tuple(a[i: i + bs] for a in args) for i in range(0, n_rows, bs)]   # the program's static batch
    labels = labels[:n_rows] if labels is not None else None
    linear = torch.ops.aten.linear.default
    ShapeProp(gm).propagate(*chunks[0])
    layers, skipped, nodes = [], {}, {}
    lins = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is linear]
    for n in lins:
        w = n.args[1]
        if n is lins[-1] and not include_output:
            skipped[n.name if getattr(w, "op", None) != "get_attr" else w.target.rsplit(".", 1)[0]] = (
                "the output layer: left alone (a low rank there caps the rank of the outputs; --include-output)")
            continue
        if getattr(w, "op", None) != "get_attr":
            skipped[n.name] = "its weight is not a parameter of the program: left alone"
            continue
        if n.name in skip or w.target.rsplit(".", 1)[0] in skip:
            skipped[n.name] = "left alone as asked"
            continue
        mat = gm.get_parameter(w.target).detach().double().numpy().T.copy()
        shape = tuple(n.meta["tensor_meta"].shape)
        label = w.target.rsplit(".", 1)[0] or n.name
        layers.append(Layer(label, "dense", mat, int(np.prod(shape[1:-1])) if len(shape) > 2 else 1))
        nodes[label] = n
    for n in skip:
        if n not in nodes and n not in skipped:
            raise DataError(f"--skip {n}: the program has no linear layer of that name",
                            hint="names: " + ", ".join(list(nodes) + list(skipped)))
    if not layers:
        raise DataError("the program has no linear layer (aten.linear with a parameter weight) to factorize",
                        path=model_path, hint="convolutions: factorize the nn.Module in Python (factorize_module)")
    other = sum(int(q.numel()) for q in gm.parameters()) - sum(ly.weights(None) for ly in layers)
    plan = plan_ranks(layers, rule, other_params=other)
    factors = {ly.name: ly.factors(plan[ly.name]["rank"]) for ly in layers if plan[ly.name]["rank"]}
    if not factors:
        raise DataError(f"with {rule.describe()} no layer gets cheaper: "
                        + "; ".join(f"{k}: {v['why']}" for k, v in plan.items()), hint="give a lower rank")
    seen: Dict[str, Any] = {}

    class Record(torch.fx.Interpreter):
        def call_function(self, target, a, kw):
            if target is linear and self._node_name in want:
                seen.setdefault(self._node_name, a[0].detach())
            return super().call_function(target, a, kw)

        def run_node(self, n):
            self._node_name = n.name
            return super().run_node(n)

    want = {nodes[k].name: k for k in factors}
    flat = lambda o: o[0] if isinstance(o, (tuple, list)) else o  # noqa: E731
    with torch.no_grad():
        ref = torch.cat([flat(Record(gm).run(*c)) for c in chunks])
    errs = {}
    for node_name, x in seen.items():
        k = want[node_name]
        a, b = (torch.from_numpy(f).to(x.dtype) for f in factors[k])
        w = torch.from_numpy(next(ly for ly in layers if ly.name == k).matrix).to(x.dtype)
        errs[k] = _rel_err((x @ w).double().numpy(), (x @ a @ b).double().numpy())
    new = copy.deepcopy(gm)
    g = new.graph
    for k, (a, b) in factors.items():
        n = next(x for x in g.nodes if x.name == nodes[k].name)
        safe = k.replace(".", "_")
        new.register_parameter(f"{safe}_lowrank_A", torch.nn.Parameter(torch.from_numpy(a.T.copy()),
                                                                        requires_grad=False))
        new.register_parameter(f"{safe}_lowrank_B", torch.nn.Parameter(torch.from_numpy(b.T.copy()),
                                                                        requires_grad=False))
        with g.inserting_before(n):
            pa, pb = g.get_attr(f"{safe}_lowrank_A"), g.get_attr(f"{safe}_lowrank_B")
            h = g.call_function(linear, (n.args[0], pa))
            y = g.call_function(linear, (h, pb) + tuple(n.args[2:]))
        n.replace_all_uses_with(y)
        old_w = n.args[1]
        g.erase_node(n)
        if not old_w.users:
            g.erase_node(old_w)
            owner, _, attr = old_w.target.rpartition(".")
            delattr(new.get_submodule(owner) if owner else new, attr)
    g.lint()
    new.recompile()
    with torch.no_grad():
        got = torch.cat([flat(new(*c)) for c in chunks])
    r0, r1 = ref.double().numpy(), got.double().numpy()
    cmp: Dict[str, Any] = {"output_rel_err": _rel_err(r0, r1)}
    if r0.ndim == 2 and r0.shape[1] > 1:
        cmp["top1_agreement"] = float((r0.argmax(1) == r1.argmax(1)).mean())
        if labels is not None and len(labels) == len(r0):
            cmp["accuracy_before"] = 100.0 * float((r0.argmax(1) == labels).mean())   # percent, as Keras's
            cmp["accuracy_after"] = 100.0 * float((r1.argmax(1) == labels).mean())
    rows = [layer_row(ly, plan[ly.name], errs.get(ly.name)) for ly in layers]
    rows += [{"layer": n, "factorized": False, "note": why} for n, why in skipped.items()]
    params_before = sum(int(q.numel()) for q in gm.parameters())
    params_after = sum(int(q.numel()) for q in new.parameters())
    saved = None
    if out:
        exported = torch.export.export(new, chunks[0])
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(exported, out)
        saved = str(out)
        say(f"saved {out}: edgekit convert {out} -t TARGET --calib ... converts it")
    t = totals([r for r in rows if "params_before" in r])
    # FLOPs of the program's linear layers (other ops are not counted here)
    t.update(params_ratio=params_after / params_before,
             flops_ratio=t["layer_flops_after"] / max(1, t["layer_flops_before"]))
    return {"kind": "torch-export", "rule": rule.describe(), "epochs": 0, "layers": rows, "totals": t,
            "before": {"params": params_before, **({"accuracy": cmp["accuracy_before"]} if "accuracy_before" in cmp
                                                   else {})},
            "after": {"params": params_after, **({"accuracy": cmp["accuracy_after"]} if "accuracy_after" in cmp
                                                 else {})},
            "outputs": cmp, "data": str(val or data), "saved": saved}


__all__ = ["RankRule", "Layer", "plan_ranks", "keras_layers", "rebuild_keras", "torch_layers", "replace_torch",
           "factorize_module", "factorize_keras", "factorize_program", "bundle_latency"]
