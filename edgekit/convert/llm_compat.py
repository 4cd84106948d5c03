"""What ONNX Runtime GenAI's model builder (0.18) misreads in a Hugging Face configuration, set right for the
duration of one build.

transformers 5 writes the RoPE settings of models with two kinds of attention layers (Gemma 3: sliding-window
layers at theta 10,000, full-attention layers at 1,000,000) as one dict per layer type,
`rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`. The builder reads that nested form
only for Gemma 4; for Gemma 3 it looks up `rope_parameters["rope_type"]` (KeyError) and then the attributes the
transformers 4 configuration had, `rope_theta` and `rope_local_base_freq`. The fix gives the configuration object
the builder loads those attributes from the nested dict (nothing is written to the user's folder), so both
thetas reach the graph as the model defines them; the fidelity check against the float model in torch then
measures the result as for any build.

Mistral (v0.1: `sliding_window` 4096) and Phi-3 (Phi-3-mini-4k: 2047) apply their `sliding_window` to every layer
in transformers, and their configurations have no `layer_types`; the builder takes a layer as windowed only where
`layer_types` says "sliding_attention", so it built them with full attention everywhere (a tiny Mistral with a
16-token window: INT8 perplexity +32%, KL 0.22 against torch on 100-token windows) while its genai_config still
named the window. The fix gives such a configuration the layer types transformers applies.

LongRoPE (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini): the builder's Phi-3 LongRoPE model looks up
`rope_parameters["type"]` for its magnitude-scaling policy. A hub config.json's `rope_scaling = {"type": "longrope",
...}` keeps that key when transformers 5 reads it; a folder saved by transformers 5 has only `rope_type`
(KeyError 'type'). The fix adds that key.

YaRN (Qwen2.5's and Qwen3's long-context setting, `{"rope_type": "yarn", "factor": 4.0,
"original_max_position_embeddings": 32768}`, GPT-OSS, Ministral 3): the builder's NTK-by-parts ramp neither rounds
the correction range (transformers floors / ceils it unless `truncate` is false) nor uses the partial-rotary
dimension, and takes 0 for a missing beta_fast / beta_slow (ZeroDivisionError). Its cos cache left transformers'
by 0.008 at position 100, 0.14 by 1000, 0.60 by 4096 and 1.20 by 8192 (head 128, theta 1e6, factor 4, original
32768). The fix gives the builder transformers' own inv_freq and attention factor (`ROPE_INIT_FUNCTIONS["yarn"]`
for the build's configuration), so its caches are transformers' to the last bit; a builder class that does not
reach the base builder's RoPE setup with a YaRN configuration fails the build instead of building it unscaled.

Llama-family builders (Llama, SmolLM3, Nemotron) replace the base builder's RoPE setup with one that knows only
`llama3`: a `linear` or `yarn` scaling was dropped without a word (a tiny Llama with linear factor 2: INT8 KL 0.079
against torch). The fix hands every type but `llama3` and `dynamic` to the base builder's setup (which builds
linear and YaRN, and refuses what it does not know). `dynamic` (NTK) is built unscaled, which is what transformers
5 computes up to `max_position_embeddings` (it rescales only past it), the context the builder's caches cover; the
convert log says so.

Gemma 4 (Gemma4UnifiedForConditionalGeneration: gemma4-12b-it's form): transformers 5.25 holds the full-attention
layers' wider head (and their key / value heads) in `per_layer_config` only, and reading `config.head_dim` of such
a heterogeneous configuration raises AmbiguousGlobalPerLayerAttributeError; the builder's Gemma 4 class reads
`head_dim` (the sliding layers'), `global_head_dim` and `num_global_key_value_heads`, the keys the configuration
had before. The fix gives the builder's configuration those keys from the per-layer geometry (and lets it read the
top-level values, the sliding layers' own); geometry the builder cannot express (full layers differing among
themselves, a per-layer override of anything else) fails the build instead.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

NESTED_ROPE_MODELS = ("gemma3_text", "gemma3")   # model_type values whose nested rope_parameters need flattening
# model_type values of the builder's Gemma 4 class (it reads global_head_dim / num_global_key_value_heads)
GEMMA4_MODELS = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
# model_type values whose transformers model windows every layer's attention by config.sliding_window (no layer_types)
UNIFORM_WINDOW_MODELS = ("mistral", "phi3")


def flatten_rope(config: Any) -> List[str]:
    """Give `config` the flat RoPE attributes the builder reads; returns what was set (empty: nothing to do)."""
    rope = getattr(config, "rope_parameters", None)
    if getattr(config, "model_type", None) not in NESTED_ROPE_MODELS or not isinstance(rope, dict) \
            or "rope_type" in rope or not isinstance(rope.get("full_attention"), dict):
        return []
    full: Dict[str, Any] = dict(rope["full_attention"])
    local: Dict[str, Any] = dict(rope.get("sliding_attention") or full)
    if full.get("rope_type", "default") != "default" or local.get("rope_type", "default") != "default":
        # scaled RoPE per layer type (e.g. Gemma 3 4B's linear factor 8 on global layers): the builder has one
        # scaling for all layers; building it would silently change the model
        raise NotImplementedError(
            f"{config.model_type}: RoPE scaling per layer type ({full.get('rope_type')} / {local.get('rope_type')}) "
            "is not supported by onnxruntime-genai's builder")
    config.rope_parameters = full
    config.rope_theta = full["rope_theta"]
    config.rope_local_base_freq = local["rope_theta"]
    return [f"rope_parameters <- full_attention {full}", f"rope_theta = {full['rope_theta']}",
            f"rope_local_base_freq = {local['rope_theta']}"]


def window_every_layer(config: Any) -> List[str]:
    """Give a uniformly windowed `config` (Mistral, Phi-3) the layer types the builder reads its window from;
    returns what was set (empty: nothing to do: no window, a window no shorter than the context, or layer types
    already given)."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "model_type", None) not in UNIFORM_WINDOW_MODELS or getattr(config, "layer_types", None) \
            or not isinstance(window, int) or window <= 0 or window >= int(config.max_position_embeddings):
        return []
    config.layer_types = ["sliding_attention"] * int(config.num_hidden_layers)
    return [f"layer_types = sliding_attention x {config.num_hidden_layers} (sliding_window {window} on every layer, "
            "as transformers applies it)"]


def gemma4_geometry(config: Any) -> List[str]:
    """Give a Gemma 4 `config` whose text configuration keeps the full-attention layers' head_dim / key-value heads
    per layer (transformers 5.25: `per_layer_config`) the keys the builder reads (`global_head_dim`,
    `num_global_key_value_heads`), and let it read the top-level (sliding-layer) values; returns what was set
    (empty: nothing to do). NotImplementedError where the per-layer geometry is not the builder's two kinds."""
    text = getattr(config, "text_config", None) or config
    if {getattr(config, "model_type", None), getattr(text, "model_type", None)}.isdisjoint(GEMMA4_MODELS) \
            or not getattr(text, "is_heterogeneous", False) or hasattr(text, "global_head_dim"):
        return []
    top = text.to_dict()
    keys = ("head_dim", "num_key_value_heads")
    other = sorted({k for o in (top.get("per_layer_config") or {}).values() for k in o} - set(keys))
    kinds: Dict[str, set] = {}
    for i, kind in enumerate(text.layer_types):
        layer = text.per_layer_config[i]
        kinds.setdefault(kind, set()).add(tuple(getattr(layer, k) for k in keys))
    full, sliding = kinds.get("full_attention", set()), kinds.get("sliding_attention", set())
    if other or len(full) != 1 or not sliding <= {tuple(top[k] for k in keys)}:
        raise NotImplementedError(
            f"{text.model_type}: per-layer geometry the builder's Gemma 4 class cannot build (one head_dim / "
            f"key-value heads for the sliding layers, one for the full ones; per-layer overrides of "
            f"{other or list(keys)}): full {sorted(full)}, sliding {sorted(sliding)}")
    (head_dim, kv_heads), = full
    for c in {id(config): config, id(text): text}.values():   # the builder copies text_config's keys to the top
        c.allow_global_per_layer_attribute_access = True
        c.global_head_dim, c.num_global_key_value_heads = head_dim, kv_heads
    return [f"Gemma 4 per-layer geometry: global_head_dim {head_dim}, num_global_key_value_heads {kv_heads} (the "
            f"full-attention layers'; head_dim {top['head_dim']}, key-value heads {top['num_key_value_heads']} the "
            "sliding ones')"]


def longrope_type(config: Any) -> List[str]:
    """Give a LongRoPE `rope_parameters` the key "type" the builder's Phi-3 LongRoPE model reads (transformers 5
    names it "rope_type"); returns what was set (empty: nothing to do)."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or rope.get("rope_type") not in ("longrope", "su") or "type" in rope:
        return []
    config.rope_parameters = dict(rope, type=rope["rope_type"])
    return [f"rope_parameters['type'] = {rope['rope_type']!r}"]


def yarn_defaults(config: Any) -> List[str]:
    """Give a YaRN `rope_parameters` transformers' beta_fast / beta_slow defaults where it names none or 0
    (transformers reads `get(k) or 32`; the builder reads 0); returns what was set (empty: nothing to do)."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or rope.get("rope_type") != "yarn":
        return []
    add = {k: v for k, v in (("beta_fast", 32.0), ("beta_slow", 1.0)) if not rope.get(k)}
    if not add:
        return []
    config.rope_parameters = dict(rope, **add)
    return [f"rope_parameters {add} (transformers' YaRN defaults)"]


def rope_type(config: Any) -> Optional[str]:
    """The RoPE type a (flat) `rope_parameters` names; None where there is none."""
    rope = getattr(config, "rope_parameters", None)
    return rope.get("rope_type") if isinstance(rope, dict) else None


def transformers_yarn(config: Any) -> Tuple[Any, float]:
    """transformers' YaRN inv_freq (rotary dimension / 2, float32) and attention factor for `config` (a copy is
    read: transformers standardizes the RoPE parameters in place)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](copy.deepcopy(config), None)
    return inv_freq, float(attention_factor)


# the fixes patch class attributes of the builder: one build at a time in this process (re-entrant: a nested use
# in the same thread wraps again and unwinds in order instead of waiting on itself)
_LOCK = threading.RLock()


def _own(cls: Any, name: str) -> Optional[Callable]:
    """`cls.name` where `cls` defines it itself (None: another builder layout)."""
    return getattr(cls, "__dict__", {}).get(name) if cls is not None else None


@contextlib.contextmanager
def builder_config_fixes(log: List[str]) -> Iterator[None]:
    """Within: the builder's configuration loader and classes apply the fixes above (each noted in `log`; a fix
    whose target the installed builder lacks is named there as not applied)."""
    from onnxruntime_genai.models import builder

    with _LOCK:
        patches: List[Tuple[Any, str, Any, bool]] = []  # (owner, attribute, original, own), restored on exit
        missing: List[str] = []
        state: Dict[str, Any] = {"yarn": None, "yarn_built": [], "scaled": [], "dynamic": [], "nope": []}

        def patch(what: str, owner: Any, name: str, make: Callable[[Any], Any], original: Any = None) -> bool:
            original = original if original is not None else (getattr(owner, name, None) if owner else None)
            if not callable(original):
                missing.append(what)
                return False
            patches.append((owner, name, original, name in vars(owner)))
            setattr(owner, name, make(original))
            return True

        Model = getattr(builder, "Model", None)
        base_rope = _own(Model, "make_rope_init")
        yarn_ok = base_rope is not None and _own(Model, "make_inv_freq_rescaled") is not None

        def config_fixed(original):
            def fixed(*args, **kwargs):
                details = original(*args, **kwargs)
                cfg = details["hf_config"]
                done = gemma4_geometry(cfg) + flatten_rope(cfg) + window_every_layer(cfg) + longrope_type(cfg) \
                    + yarn_defaults(cfg)
                log.extend(f"builder config fix: {d}" for d in done)
                if rope_type(cfg) == "yarn":
                    if not yarn_ok:
                        raise NotImplementedError(
                            "YaRN RoPE: this onnxruntime-genai builder has no base Model.make_rope_init / "
                            "make_inv_freq_rescaled to give transformers' frequencies to; its own differ from "
                            "transformers' (not built)")
                    state["yarn"] = cfg
                return details
            return fixed

        patch("configuration fixes (get_hf_details)", builder, "get_hf_details", config_fixed)

        if yarn_ok:
            def base_rope_fixed(original):
                def fixed(self, config):
                    original(self, config)
                    if rope_type(config) != "yarn":
                        return
                    inv_freq, attention_factor = transformers_yarn(config)
                    dim = int(self.rope_attrs["partial_rotary_factor"] * self.head_size)
                    if tuple(inv_freq.shape) != (dim // 2,):
                        raise NotImplementedError(
                            f"YaRN RoPE: transformers gives {inv_freq.shape[0]} frequencies, the builder's rotary "
                            f"dimension {dim} needs {dim // 2} (not built)")
                    self.rope_attrs["mscale"] = attention_factor
                    self.rope_attrs["rescale_inv_freq"] = {"transformers_inv_freq": inv_freq}
                    state["yarn_built"].append(f"rotary dimension {dim}, attention factor {attention_factor:.6g}")
                return fixed

            def rescaled_fixed(original):
                def fixed(self, inv_freq):
                    exact = self.rope_attrs.get("rescale_inv_freq", {}).get("transformers_inv_freq")
                    return original(self, inv_freq) if exact is None else exact.to(inv_freq.dtype)
                return fixed

            patch("YaRN as transformers computes it (Model.make_rope_init)", Model, "make_rope_init",
                  base_rope_fixed, base_rope)
            patch("YaRN as transformers computes it (Model.make_inv_freq_rescaled)", Model,
                  "make_inv_freq_rescaled", rescaled_fixed)
        else:
            missing.append("YaRN as transformers computes it (Model.make_rope_init / make_inv_freq_rescaled)")

        LlamaModel = getattr(builder, "LlamaModel", None)
        llama_rope = _own(LlamaModel, "make_rope_init")

        def llama_rope_fixed(original):
            def fixed(self, config):
                kind = rope_type(config)
                if kind in ("llama3", "dynamic", None):
                    original(self, config)
                    if kind == "dynamic":
                        if self.context_length > int(config.max_position_embeddings):
                            raise NotImplementedError(
                                f"dynamic (NTK) RoPE: the builder's context {self.context_length} is past "
                                f"max_position_embeddings {config.max_position_embeddings}, where transformers "
                                "rescales it (not built)")
                        state["dynamic"].append(int(config.max_position_embeddings))
                else:   # default, linear, yarn, ... : the base builder's (it refuses what it does not know)
                    Model.make_rope_init(self, config)
                    if kind != "default":
                        state["scaled"].append(kind)
            return fixed

        if base_rope is not None:
            patch("Llama-family linear / YaRN RoPE (LlamaModel.make_rope_init)", LlamaModel, "make_rope_init",
                  llama_rope_fixed, llama_rope)
        else:
            missing.append("Llama-family linear / YaRN RoPE (no base Model.make_rope_init)")

        # the class the builder's dispatch uses (it imports its builders as a top-level package, `builders`, so
        # onnxruntime_genai.models.builders.smollm holds another copy of the class)
        SmolLM3Model = getattr(builder, "SmolLM3Model", None)

        def smol_fixed(original):
            def fixed(self, layer_id, attention, root_input, **kwargs):
                flags, attrs = getattr(self, "no_rope_layers", None), getattr(self, "attention_attrs", None)
                if flags is None or not isinstance(attrs, dict) or "rope" not in attrs or flags[layer_id]:
                    return original(self, layer_id, attention, root_input, **kwargs)
                rope = attrs["rope"]
                attrs["rope"] = False            # a NoPE layer: no rotary embedding, fused or separate
                state["nope"].append(layer_id)
                try:
                    return original(self, layer_id, attention, root_input, **kwargs)
                finally:
                    attrs["rope"] = rope
            return fixed

        patch("SmolLM3 NoPE layers (SmolLM3Model.make_attention)", SmolLM3Model, "make_attention", smol_fixed)
        if missing:
            log.append("builder fixes not applicable to this onnxruntime-genai builder: " + "; ".join(missing))
        built = False
        try:
            yield
            built = True
        finally:
            for owner, name, original, own in reversed(patches):
                if own:
                    setattr(owner, name, original)
                else:                            # inherited: the class's own attribute goes again
                    delattr(owner, name)
            if state["scaled"]:
                log.append(f"builder fix: {state['scaled'][0]} RoPE scaling built by the base builder (its Llama "
                           "builder knows only llama3)")
            if state["yarn_built"]:
                log.append(f"builder fix: YaRN RoPE with transformers' inv_freq and attention factor "
                           f"({state['yarn_built'][0]})")
            if state["dynamic"]:
                log.append(f"builder note: dynamic (NTK) RoPE built unscaled, as transformers computes it up to "
                           f"max_position_embeddings ({state['dynamic'][0]}), the context built")
            if state["nope"]:
                log.append(f"builder fix: SmolLM3 NoPE layers {state['nope']} built without RoPE")
        if built and state["yarn"] is not None and not state["yarn_built"]:
            raise NotImplementedError(
                f"YaRN RoPE: the builder's class for {(getattr(state['yarn'], 'architectures', None) or ['?'])[0]} "
                "does not reach the base builder's RoPE setup, so it built no YaRN scaling (not used)")
