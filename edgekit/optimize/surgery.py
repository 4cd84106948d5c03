"""Keras 3 model surgery: which layers' output channels can be removed, and a rebuilt model
with fewer channels and the kept weights copied over.

Why not tensorflow-model-optimization: it supports Keras 2 (tf_keras) only, and its
pruning zeroes weights in place (no smaller model, no speed-up). This is the small logic
structured pruning needs, for Keras 3 functional and Sequential models.

A Conv2D/Dense layer's output channels are prunable when every path from it reaches a
Conv2D/Dense input through channel-preserving layers only (activations, BatchNorm,
pooling, dropout, Flatten, global pooling). A path into Add/Concatenate/Multiply, a
depthwise convolution or the model output keeps its channels (residual blocks keep
their block outputs, their inner convolutions are pruned).
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List

import numpy as np

PASS_THROUGH = {"Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "BatchNormalization",
                "MaxPooling2D", "AveragePooling2D", "MaxPooling1D", "AveragePooling1D", "Dropout",
                "SpatialDropout2D", "GaussianNoise", "ZeroPadding2D", "Cropping2D", "UpSampling2D"}
REDUCERS = {"GlobalAveragePooling2D", "GlobalMaxPooling2D", "GlobalAveragePooling1D", "GlobalMaxPooling1D"}
PRUNABLE = {"Conv2D", "Conv1D", "Dense"}


def _cls(layer) -> str:
    return type(layer).__name__


def _consumers(model) -> Dict[str, List]:
    """layer name -> layers that take its output."""
    out: Dict[str, List] = {layer.name: [] for layer in model.layers}
    for layer in model.layers:
        for node in getattr(layer, "_inbound_nodes", []):
            for t in node.input_tensors if hasattr(node, "input_tensors") else []:
                src = t._keras_history.operation
                if src.name in out and layer not in out[src.name]:
                    out[src.name].append(layer)
    return out


def plan(model) -> Dict[str, Dict]:
    """For each prunable layer: the downstream layers whose inputs follow its channels."""
    consumers = _consumers(model)
    outputs = {t._keras_history.operation.name for t in model.outputs}
    result: Dict[str, Dict] = {}
    for layer in model.layers:
        if _cls(layer) not in PRUNABLE or layer.name in outputs:
            continue
        follow, targets, ok = [], [], True
        stack = list(consumers[layer.name])
        if not stack:
            ok = False
        flatten = None
        while stack and ok:
            c = stack.pop()
            k = _cls(c)
            if c.name in outputs and k not in PRUNABLE:
                ok = False
            elif k in PRUNABLE:
                targets.append((c, flatten))
            elif k in PASS_THROUGH or k in REDUCERS:
                follow.append(c)
                stack.extend(consumers[c.name])
            elif k == "Flatten":
                flatten = c
                follow.append(c)
                stack.extend(consumers[c.name])
            else:
                ok = False
        if ok and targets:
            result[layer.name] = {"follow": follow, "targets": targets}
    return result


def l1_keep(layer, fraction: float) -> np.ndarray:
    """Indices of the output channels to keep: largest L1 norm of their filters."""
    kernel = layer.get_weights()[0]
    norms = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(0)
    n_keep = max(1, int(math.ceil(kernel.shape[-1] * (1.0 - fraction))))
    return np.sort(np.argsort(-norms)[:n_keep])


def _channels(layer) -> int:
    return int(layer.get_weights()[0].shape[-1])


def rebuild(model, keep: Dict[str, np.ndarray], init_only: bool = False):
    """A new model with layer `name` reduced to channels keep[name]; weights copied (sliced)
    unless init_only (fresh initialisation: a thinner student for distillation)."""
    import keras

    cfg = copy.deepcopy(model.get_config())
    layer_cfgs = cfg["layers"]
    for lc in layer_cfgs:
        lc.pop("build_config", None)  # the old input shapes; the new ones follow from the graph
        name = lc["config"]["name"]
        if name in keep:
            key = "filters" if "filters" in lc["config"] else "units"
            lc["config"][key] = int(len(keep[name]))
    cls = type(model)
    if isinstance(model, keras.Sequential):
        new = keras.Sequential.from_config(cfg)
    else:
        new = keras.Model.from_config(cfg) if cls.__name__ in ("Functional", "Model") else cls.from_config(cfg)
    if init_only:
        return new
    p = plan(model)
    # which input channels each layer keeps (from its producer's kept output channels)
    in_keep: Dict[str, np.ndarray] = {}
    flat_of: Dict[str, object] = {}
    for name, info in p.items():
        if name not in keep:
            continue
        for f in info["follow"]:
            in_keep[f.name] = keep[name]
        for t, flatten in info["targets"]:
            in_keep[t.name] = keep[name]
            if flatten is not None:
                flat_of[t.name] = flatten
    for old, nl in zip(model.layers, new.layers):
        w = old.get_weights()
        if not w:
            continue
        k_out = keep.get(old.name)
        k_in = in_keep.get(old.name)
        kind = _cls(old)
        if kind in PRUNABLE:
            kernel = w[0]
            if k_in is not None:
                if old.name in flat_of:  # Flatten of (..., C): rows are position-major, channel-minor
                    producer_c = kernel.shape[0] // max(1, _spatial(flat_of[old.name]))
                    rows = (np.arange(kernel.shape[0] // producer_c)[:, None] * producer_c + k_in[None, :]).ravel()
                    kernel = kernel[rows]
                else:
                    kernel = np.take(kernel, k_in, axis=-2)
            if k_out is not None:
                kernel = kernel[..., k_out]
            w = [kernel] + ([w[1][k_out] if k_out is not None else w[1]] if len(w) > 1 else [])
        elif kind == "BatchNormalization" and k_in is not None:
            w = [a[k_in] for a in w]
        elif kind == "PReLU" and k_in is not None:
            w = [np.take(a, k_in, axis=-1) for a in w]
        nl.set_weights(w)
    return new


def _spatial(flatten_layer) -> int:
    shape = flatten_layer.input.shape
    return int(np.prod([d for d in shape[1:-1]])) if len(shape) > 2 else 1


def count(model) -> Dict[str, float]:
    """Parameters and FLOPs (2 x multiply-accumulates) of Conv/Dense layers, per sample."""
    params = int(model.count_params())
    macs = 0
    for layer in model.layers:
        k = _cls(layer)
        if k in ("Conv2D", "DepthwiseConv2D", "Conv1D"):
            out = layer.output.shape
            kernel = layer.get_weights()[0]
            per_out = np.prod(kernel.shape[:-1]) if k != "DepthwiseConv2D" else np.prod(kernel.shape[:2])
            macs += int(np.prod([d for d in out[1:]]) * per_out)
        elif k == "Dense":
            kernel = layer.get_weights()[0]
            lead = int(np.prod([d for d in layer.output.shape[1:-1]])) if len(layer.output.shape) > 2 else 1
            macs += int(np.prod(kernel.shape)) * lead
    return {"params": params, "flops": 2 * macs}


def prunable_layers(model) -> List[str]:
    return list(plan(model))


def widths(model, width: float) -> Dict[str, np.ndarray]:
    """Keep-sets that make every prunable layer `width` times as wide (for a student)."""
    return {name: np.arange(max(1, int(round(_channels(model.get_layer(name)) * width))))
            for name in plan(model)}


__all__ = ["plan", "l1_keep", "rebuild", "count", "prunable_layers", "widths"]
