"""Prometheus metrics in the text exposition format (written here: no client library needed).

Counters, gauges and histograms with labels; thread-safe (inference threads and the event loop
both record). Exposed at GET /metrics.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Dict, List, Sequence, Tuple

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

Labels = Tuple[Tuple[str, str], ...]


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_esc(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    v = float(v)
    if v == float("inf"):
        return "+Inf"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, lock: threading.Lock):
        self.name, self.help, self._lock = name, help_, lock

    def header(self) -> List[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a):
        super().__init__(*a)
        self.values: Dict[Labels, float] = {}

    def inc(self, v: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + v

    def lines(self) -> List[str]:
        return [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, v: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = float(v)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_: str, lock: threading.Lock, buckets: Sequence[float]):
        super().__init__(name, help_, lock)
        self.buckets = tuple(buckets)
        # per key: count in each bucket alone (the last one: above every bound)..., sum, count;
        # made cumulative when rendered, so an observation is one bisect and three additions
        self.values: Dict[Labels, List[float]] = {}

    def observe(self, v: float, **labels: str) -> None:
        key = tuple(sorted(labels.items())) if len(labels) > 1 else tuple(labels.items())
        i = bisect_left(self.buckets, v)  # the first bound >= v
        with self._lock:
            h = self.values.get(key)
            if h is None:
                h = self.values[key] = [0.0] * (len(self.buckets) + 3)
            h[i] += 1
            h[-2] += v
            h[-1] += 1

    def lines(self) -> List[str]:
        out = []
        for k, h in sorted(self.values.items()):
            cum = 0.0
            for i, b in enumerate(self.buckets):
                cum += h[i]
                le = 'le="%s"' % _num(b)
                out.append(f"{self.name}_bucket{_labels(k, le)} {_num(cum)}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(k, inf)} {_num(h[-1])}")
            out.append(f"{self.name}_sum{_labels(k)} {_num(h[-2])}")
            out.append(f"{self.name}_count{_labels(k)} {_num(h[-1])}")
        return out


class Metrics:
    """The server's metrics; `render()` gives the /metrics body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        lk = self._lock
        p = "edgekit_serve_"
        self.requests = Counter(p + "requests_total", "Inference requests received, per model.", lk)
        self.failures = Counter(p + "request_failures_total",
                                "Inference requests that failed, per model and HTTP status.", lk)
        self.request_latency = Histogram(p + "request_duration_seconds",
                                         "Inference request latency in the server (body read to response), "
                                         "per model.", lk, LATENCY_BUCKETS)
        self.inference_latency = Histogram(p + "inference_duration_seconds",
                                           "Model execution time per batch, per model.", lk, LATENCY_BUCKETS)
        self.queue_length = Gauge(p + "queue_length", "Requests admitted and waiting for an inference slot.", lk)
        self.in_flight = Gauge(p + "in_flight", "Inferences running now.", lk)
        self.batch_size = Histogram(p + "batch_size", "Samples per model execution, per model.", lk,
                                    BATCH_BUCKETS)
        self.load_seconds = Gauge(p + "model_load_seconds",
                                  "Load and golden-check time of the served release, per model.", lk)
        self.swaps = Counter(p + "model_swaps_total", "Releases swapped in, per model.", lk)
        self.swap_failures = Counter(p + "model_swap_failures_total",
                                     "New releases that failed to load or failed their golden check, "
                                     "per model (the old release kept serving).", lk)
        self.ready = Gauge(p + "model_ready", "1 when the model serves, per model.", lk)
        # language models (labels: model, version): the OpenAI-compatible API and Triton's generate
        self.llm_prompt_tokens = Counter(p + "llm_prompt_tokens_total", "Prompt tokens prefilled.", lk)
        self.llm_completion_tokens = Counter(p + "llm_completion_tokens_total", "Tokens generated.", lk)
        self.llm_ttft = Histogram(p + "llm_time_to_first_token_seconds",
                                  "Request arrival (queued) to its first generated token.", lk, TTFT_BUCKETS)
        self.llm_inter_token = Histogram(p + "llm_inter_token_seconds",
                                         "Time between two tokens of a sequence.", lk, TOKEN_BUCKETS)
        self.llm_active = Gauge(p + "llm_active_sequences", "Sequences generating (holding a KV-cache slot).", lk)
        self.llm_queued = Gauge(p + "llm_queued_sequences", "Sequences waiting for a slot or KV-cache room.", lk)
        self.llm_kv_bytes = Gauge(p + "llm_kv_cache_bytes", "KV-cache bytes holding the active sequences' tokens.",
                                  lk)
        self.llm_kv_capacity = Gauge(p + "llm_kv_cache_capacity_bytes",
                                     "KV-cache bytes the server may fill (--kv-cache-mb, or slots x context).", lk)
        self.llm_finished = Counter(p + "llm_sequences_finished_total",
                                    "Sequences ended, by reason (stop, length, cancelled: the client left, error: its "
                                    "sampling or detokenizing failed).", lk)
        self.llm_batch = Histogram(p + "llm_decode_batch_size", "Sequences decoded together per step.", lk,
                                   BATCH_BUCKETS)
        self._all = [self.requests, self.failures, self.request_latency, self.inference_latency,
                     self.queue_length, self.in_flight, self.batch_size, self.load_seconds,
                     self.swaps, self.swap_failures, self.ready,
                     self.llm_prompt_tokens, self.llm_completion_tokens, self.llm_ttft, self.llm_inter_token,
                     self.llm_active, self.llm_queued, self.llm_kv_bytes, self.llm_kv_capacity, self.llm_finished,
                     self.llm_batch]

    def render(self) -> bytes:
        lines: List[str] = []
        with self._lock:
            for m in self._all:
                lines.extend(m.header())
                lines.extend(m.lines())
        return ("\n".join(lines) + "\n").encode()
