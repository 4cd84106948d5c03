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
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List

NESTED_ROPE_MODELS = ("gemma3_text", "gemma3")   # model_type values whose nested rope_parameters need flattening


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


@contextlib.contextmanager
def builder_config_fixes(log: List[str]) -> Iterator[None]:
    """Within: the builder's configuration loader applies the fixes above (each noted in `log`)."""
    from onnxruntime_genai.models import builder

    original = builder.get_hf_details

    def fixed(*args, **kwargs):
        details = original(*args, **kwargs)
        done = flatten_rope(details["hf_config"])
        log.extend(f"builder config fix: {d}" for d in done)
        return details

    builder.get_hf_details = fixed
    try:
        yield
    finally:
        builder.get_hf_details = original
