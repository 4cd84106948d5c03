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

YaRN without `beta_fast` / `beta_slow` (Qwen2.5's and Qwen3's documented long-context setting, `{"rope_type": "yarn",
"factor": 4.0, "original_max_position_embeddings": 32768}`): transformers takes its defaults (32, 1), the builder
takes 0 and divides by it (ZeroDivisionError). The fix writes transformers' defaults into the build's configuration.

Llama-family builders (Llama, SmolLM3, Nemotron) replace the base builder's RoPE setup with one that knows only
`llama3`: a `linear` or `yarn` scaling was dropped without a word (a tiny Llama with linear factor 2: INT8 KL 0.079
against torch). The fix hands those two to the base builder's setup, which builds them for Mistral, Qwen and Phi.

SmolLM3 leaves RoPE out of every fourth layer (`no_rope_layers[i] == 0`, NoPE). The builder's SmolLM3 model turns
off only RoPE *fused in attention* there, so the base builder asks for a separate RotaryEmbedding op on a
position_ids input the CPU graph does not have (KeyError 'position_ids'; with one, those layers would get RoPE
they must not have). The fix builds those layers with no RoPE at all (the builder's own switch for a model
without RoPE, `attention_attrs["rope"]`), as transformers computes them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List

NESTED_ROPE_MODELS = ("gemma3_text", "gemma3")   # model_type values whose nested rope_parameters need flattening
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


def longrope_type(config: Any) -> List[str]:
    """Give a LongRoPE `rope_parameters` the key "type" the builder's Phi-3 LongRoPE model reads (transformers 5
    names it "rope_type"); returns what was set (empty: nothing to do)."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or rope.get("rope_type") not in ("longrope", "su") or "type" in rope:
        return []
    config.rope_parameters = dict(rope, type=rope["rope_type"])
    return [f"rope_parameters['type'] = {rope['rope_type']!r}"]


def yarn_defaults(config: Any) -> List[str]:
    """Give a YaRN `rope_parameters` transformers' beta_fast / beta_slow defaults where it names none (the builder
    reads 0); returns what was set (empty: nothing to do)."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or rope.get("rope_type") != "yarn":
        return []
    add = {k: v for k, v in (("beta_fast", 32.0), ("beta_slow", 1.0)) if rope.get(k) is None}
    if not add:
        return []
    config.rope_parameters = dict(rope, **add)
    return [f"rope_parameters {add} (transformers' YaRN defaults)"]


@contextlib.contextmanager
def builder_config_fixes(log: List[str]) -> Iterator[None]:
    """Within: the builder's configuration loader applies the fixes above (each noted in `log`)."""
    from onnxruntime_genai.models import builder

    original = builder.get_hf_details

    def fixed(*args, **kwargs):
        details = original(*args, **kwargs)
        cfg = details["hf_config"]
        done = flatten_rope(cfg) + window_every_layer(cfg) + longrope_type(cfg) + yarn_defaults(cfg)
        log.extend(f"builder config fix: {d}" for d in done)
        return details

    # the class the builder's dispatch uses (it imports its builders as a top-level package, `builders`, so
    # onnxruntime_genai.models.builders.smollm holds another copy of the class)
    SmolLM3Model = builder.SmolLM3Model
    smol_attention = SmolLM3Model.make_attention
    nope: List[int] = []

    def smol_fixed(self, layer_id, attention, root_input, **kwargs):
        rope = self.attention_attrs["rope"]
        if not self.no_rope_layers[layer_id]:   # a NoPE layer: no rotary embedding, fused or separate
            self.attention_attrs["rope"] = False
            nope.append(layer_id)
        try:
            smol_attention(self, layer_id, attention, root_input, **kwargs)
        finally:
            self.attention_attrs["rope"] = rope

    LlamaModel = builder.LlamaModel
    llama_rope = LlamaModel.__dict__["make_rope_init"]
    base_rope = LlamaModel.__mro__[1].make_rope_init   # the base builder's (default, linear, yarn, ...)
    scaled: List[str] = []

    def llama_rope_fixed(self, config):
        kind = (getattr(config, "rope_parameters", None) or {}).get("rope_type")
        if kind in ("linear", "yarn"):
            base_rope(self, config)
            scaled.append(kind)
        else:
            llama_rope(self, config)

    builder.get_hf_details = fixed
    SmolLM3Model.make_attention = smol_fixed
    LlamaModel.make_rope_init = llama_rope_fixed
    try:
        yield
    finally:
        builder.get_hf_details = original
        SmolLM3Model.make_attention = smol_attention
        LlamaModel.make_rope_init = llama_rope
        if scaled:
            log.append(f"builder fix: {scaled[0]} RoPE scaling built by the base builder (its Llama builder "
                       "knows only llama3)")
        if nope:
            log.append(f"builder fix: SmolLM3 NoPE layers {nope} built without RoPE")
