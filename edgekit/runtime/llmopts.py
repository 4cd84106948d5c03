"""Generation options, stop-string hold-back, memory readings and golden-check thresholds of language models.

A leaf of edgekit.runtime (stdlib + numpy only): edgekit.runtime.llm, its benchmark and health check, and the
continuous-batching engine all take them from here, so none of those modules imports another in a circle.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from edgekit.errors import DataError

MIN_TOP1 = 0.90      # teacher-forced top-1 agreement with the converting machine (INT4 rounds differently per ISA)
MIN_SNR_DB = 20.0    # logit SNR on the golden top-k logits


class GenOptions:
    """Validated generation options (one place checks them)."""

    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty")

    def __init__(self, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: Optional[int] = None, stop: Union[None, str, Sequence[str]] = None,
                 repetition_penalty: float = 1.0):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DataError(f"max_new_tokens must be an integer >= 1 (got {max_new_tokens!r})")
        if temperature is None or temperature < 0:
            raise DataError(f"temperature must be >= 0 (got {temperature!r}; 0 is greedy)")
        if top_p is None or not 0.0 < top_p <= 1.0:
            raise DataError(f"top_p must be in (0, 1] (got {top_p!r})")
        if top_k is None or top_k < 0:
            raise DataError(f"top_k must be >= 0 (got {top_k!r}; 0 is no limit)")
        if repetition_penalty is None or repetition_penalty <= 0:
            raise DataError(f"repetition_penalty must be > 0 (got {repetition_penalty!r})")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise DataError(f"seed must be an integer >= 0 (got {seed!r})")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise DataError(f"stop strings must be non-empty strings (got {stop!r})")
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, float(temperature), \
            float(top_p), int(top_k)
        self.seed, self.stop, self.repetition_penalty = seed, stops, float(repetition_penalty)

    def search(self) -> Dict[str, Any]:
        """The sampling part as ONNX Runtime GenAI search options (max_length is added by the caller)."""
        o: Dict[str, Any] = {"num_beams": 1, "repetition_penalty": self.repetition_penalty}
        if self.temperature == 0.0:
            o.update(do_sample=False)
        else:
            o.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
            if self.seed is not None:
                o["random_seed"] = self.seed
        return o


def hold_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may begin a stop string (kept until the next piece decides)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep


def rss_mb() -> Dict[str, Optional[float]]:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), MiB; None where not exposed."""
    out: Dict[str, Optional[float]] = {"rss_mb": None, "peak_rss_mb": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_mb"] = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    out["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        import resource

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def kv_floor(genai_config: Mapping[str, Any]) -> int:
    """The fewest positions a generator's KV cache may hold for this model: its sliding window where it has one
    (genai_config decoder.sliding_window.window_size, e.g. Gemma 3's 512), else 0. ONNX Runtime GenAI sizes the
    cache it shares between past and present by max_length, and GroupQueryAttention refuses a sliding-window
    layer whose cache is smaller than the window ("KV cache capacity (23) must be at least local_window_size
    (512)"), so a short generation gets the window's capacity and is stopped by its own token count."""
    window = (((genai_config.get("model") or {}).get("decoder") or {}).get("sliding_window") or {})
    return int(window.get("window_size") or 0)


def kv_capacity(genai_config: Mapping[str, Any], max_length: int) -> int:
    """max_length for a generator that must hold `max_length` positions (see kv_floor)."""
    return max(int(max_length), kv_floor(genai_config))


def prompt_bos(manifest: Optional[Mapping[str, Any]]) -> Optional[int]:
    """The BOS id a plain prompt must start with where ONNX Runtime GenAI's tokenizer leaves it out (it ignores
    tokenizer.json's post-processor, which is where Gemma's tokenizer adds <bos>); convert records it as
    manifest llm.prompt_bos after comparing both tokenizers. None: nothing to add (or a bare folder)."""
    bos = ((manifest or {}).get("llm") or {}).get("prompt_bos")
    return int(bos) if bos is not None else None


def with_bos(ids: List[int], bos: Optional[int]) -> List[int]:
    """`ids` led by `bos` (once) where one is due."""
    return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids
