"""Continuous batching of independent sequences of a language model over one ONNX Runtime session.

edgekit.serve's OpenAI API runs on it. It runs the bundle's graph with a backend, so it lives in the runtime
(DESIGN.md: backends are imported by the runtime alone, inside functions).

Why not ONNX Runtime GenAI's own batching: its `Engine` batches dynamically only for models built with
PagedAttention, which its model builder supports for the CUDA execution provider alone; on a CPU it keeps
a static batch (a new request waits until every request of the running batch has finished), and a
`Generator` per request reads all the weights once per request per token. Decoding is memory-bound, so
here the decoder graph the bundle carries (GroupQueryAttention, past/present KV sharing one buffer, as
ORT GenAI's builder writes it for CPU) is run directly:

- the KV cache is one buffer per layer and K/V, [max_sequences, kv_heads, capacity, head_dim]; a sequence
  owns one row (a slot) for its life, and its past and present are bound to the same memory (in place);
- each decode step runs every active sequence as one batch of rows 0..n-1 (one read of the weights serves
  them all); the attention mask gives each row its own length, so sequences of any lengths decode
  together; new sequences are prefilled into free slots between two steps (several prompts that arrive
  together as one right-padded batch) and join the next one;
- a sequence that ends or whose client went away leaves between two steps: the last row moves into its
  slot (so the active rows stay 0..n-1) and the vacated row's pages go back to the OS (madvise), so the
  KV memory a server holds follows the tokens it holds.

Greedy decoding under batching gives the same tokens as ONNX Runtime GenAI's single-stream generator
(the same graph; each row's arithmetic does not depend on the others: tested with 8 concurrent streams).
Admission is bounded by `max_sequences`, by the KV-cache budget (each sequence reserves prompt + max
tokens, capped at the slot capacity) and by a bounded wait queue; beyond them a request is refused at once.
Prefill runs between decode steps: prompts admitted together as one right-padded batch (up to 256 padded
tokens). A longer prompt is prefilled in chunks into a row of its own (the last slot, outside the decoding
rows), one chunk between two decode steps, so the running streams keep decoding while it is read (their
inter-token time grows by one chunk's time, not by the whole prompt's). A chunk is sized to take about
LONG_PREFILL_STEPS decode steps (each chunk's size follows the ratio of that time to the last chunk's,
64 to 256 tokens: smaller chunks cost much more per token), so the prompt gets ~4/5 of the time while
others decode; 256 tokens a chunk when none does; when its
last chunk is in, its cache moves to the next decoding row and it joins the batch. One long prompt is
prefilled at a time; shorter ones arriving meanwhile are admitted as usual.

Standard library and numpy at import; onnxruntime and onnxruntime_genai inside functions.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import numpy as np

from edgekit.errors import BundleError, DataError, EdgekitError
from edgekit.runtime.llm import Tokenizer   # the runtime's: encode, chat_ids, stream (Tokenizer.of_folder)
from edgekit.runtime.llmopts import SPIN_KEY, after_load, trim_heap
from edgekit.runtime.llmopts import hold_back as _hold_back  # stop strings held back as the generator does (one rule)

log = logging.getLogger("edgekit.serve")

VERSION_CHARS = 12
PREFILL_TOKENS = 256   # padded prompt tokens prefilled in one call when several prompts arrive together
PREFILL_CHUNK: Optional[int] = None   # a longer prompt's tokens per chunk; None: sized by time (below)
LONG_PREFILL_STEPS = 4                 # a chunk takes about this many decode steps' time
PREFILL_CHUNK_MIN = 64                 # smaller chunks cost much more per token (measured: 16 tokens ~2x, 64 ~1.2x)
_EMA = 0.3
# what choosing one sequence's token (numpy's sampling: NaN probabilities are a ValueError) or decoding its text
# (ONNX Runtime GenAI's TokenizerStream: RuntimeError; UnicodeDecodeError is a ValueError) raises for that
# sequence's input: it ends that request; anything else raised in the engine's loop fails the engine
SEQUENCE_ERRORS = (ValueError, ArithmeticError, RuntimeError)
_PAGE = mmap.PAGESIZE
# mmap.mmap(-1, n) is a shared anonymous mapping (shmem): MADV_DONTNEED only unmaps its pages (they stay in
# memory, with their data); MADV_REMOVE frees them (the row then reads zeros). Not MAP_PRIVATE: the huge-page
# advice given to private anonymous mappings after the load (llmopts.huge_pages) would then cover the KV cache.
_MADV_FREE_ROW = getattr(mmap, "MADV_REMOVE", mmap.MADV_DONTNEED)


class Busy(EdgekitError):
    """Every sequence slot and the wait queue are taken (HTTP 429)."""


class Retiring(Busy):
    """The engine was retired (its release replaced, or the server closing): a request that took the release just
    before a swap submits again to the release now active (serve), else HTTP 429."""


class EngineFailed(EdgekitError):
    """The generation thread ended with an error: the model does not generate (HTTP 503)."""


class TooLong(DataError):
    """The prompt does not fit the model's context (HTTP 400, code context_length_exceeded)."""


# -- sampling ---------------------------------------------------------------------------------------------

@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    ignore_eos: bool = False    # vLLM's extension: generate max_tokens whatever the model says

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    """One token from a row of logits: temperature, then top-k, then nucleus (top-p). The maximum is subtracted
    before the division: a tiny temperature (1e-310) makes the others -inf (the argmax), never inf / NaN."""
    x = logits.astype(np.float64)
    with np.errstate(over="ignore"):   # -inf where a tiny temperature overflows: probability 0, as it should be
        x = (x - x.max()) / p.temperature
    if 0 < p.top_k < x.size:
        cut = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x >= cut, x, -np.inf)
    x = np.exp(x - x.max())
    probs = x / x.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]
        sub = probs[keep] / probs[keep].sum()
        return int(keep[rng.choice(keep.size, p=sub)])
    return int(rng.choice(probs.size, p=probs))


def _ema(avg: Optional[float], x: float) -> float:
    return x if avg is None else avg + _EMA * (x - avg)


# -- one sequence -----------------------------------------------------------------------------------------

class GenSequence:
    """A request's generation: its prompt, sampling, the tokens made, and the events for its client.

    Events (delivered on the client's event loop, through `on_events`): ("text", piece), then
    ("done", finish_reason) with finish_reason "stop" | "length" | "cancelled", or ("error", message)."""

    def __init__(self, prompt_ids: List[int], params: SamplingParams, on_events: Callable[[list], None],
                 *, request_id: str = ""):
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_events = on_events          # called from the engine thread with a list of events
        self.request_id = request_id
        self.rng = np.random.default_rng(params.seed)
        self.tokens: List[int] = []
        self.length = 0                     # tokens in the KV cache
        self.reserve = 0                    # KV tokens reserved at admission
        self.cancelled = False
        self.client_gone = False            # set by the HTTP side when the client disconnected
        self.finish: Optional[str] = None
        self.t_arrival = time.perf_counter()
        self.t_first: Optional[float] = None
        self.t_last: Optional[float] = None
        self._detok = None
        self._pending = ""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def cancel(self) -> None:
        """From any thread: the engine drops the sequence (and frees its slot) before its next step."""
        self.cancelled = True


# -- the decoder graph, batched ---------------------------------------------------------------------------

class _KVBuffer:
    """[rows, kv_heads, capacity, head_dim] in anonymous memory, so a row's pages can be given back."""

    def __init__(self, rows: int, kv_heads: int, capacity: int, head_dim: int, dtype):
        self.row_bytes = kv_heads * capacity * head_dim * np.dtype(dtype).itemsize
        self._mm = mmap.mmap(-1, max(rows * self.row_bytes, 1))
        self.array = np.frombuffer(self._mm, dtype=dtype).reshape(rows, kv_heads, capacity, head_dim)

    def release_row(self, row: int) -> None:
        start = -(-row * self.row_bytes // _PAGE) * _PAGE
        end = ((row + 1) * self.row_bytes // _PAGE) * _PAGE
        if end > start:
            self._mm.madvise(_MADV_FREE_ROW, start, end - start)

    def close(self) -> None:
        self.array = None
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere: the memory goes with it
            pass


class BatchedDecoder:
    """The bundle's decoder graph run for many sequences at once (see the module docstring)."""

    def __init__(self, model_dir: Path, genai_config: Dict[str, Any], *, threads: Optional[int],
                 slots: int, capacity: int, spinning: Optional[bool] = None):
        import onnxruntime as ort

        self._ort = ort
        m = genai_config.get("model") or {}
        d = m.get("decoder") or {}
        search = genai_config.get("search") or {}
        providers = [po for po in (d.get("session_options") or {}).get("provider_options") or [] if po]
        if providers:
            raise BundleError(f"the batching server runs the CPU execution provider; this model is built for "
                              f"{', '.join(sorted(k for po in providers for k in po))}", path=str(model_dir),
                              hint="convert for a CPU target to serve it with edgekit serve")
        if not search.get("past_present_share_buffer", False):
            raise BundleError("the decoder does not share its past and present KV buffers "
                              "(search.past_present_share_buffer is false in genai_config.json)",
                              path=str(model_dir), hint="convert it with ORT GenAI's builder for the CPU")
        names_in, names_out = d.get("inputs") or {}, d.get("outputs") or {}
        self.n_layers = int(d["num_hidden_layers"])
        self.kv_heads = int(d["num_key_value_heads"])
        self.head_dim = int(d["head_size"])
        self.vocab = int(m.get("vocab_size") or 0)
        self.slots = int(slots)
        self.capacity = int(capacity)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        # the bundle's ORT config entries (genai_config session_options "session.*": e.g. the profile's
        # session.intra_op.allow_spinning), as onnxruntime_genai applies them to the runtime's generator
        for k, v in sorted((d.get("session_options") or {}).items()):
            if k.startswith("session."):
                so.add_session_config_entry(k, str(v))
        if spinning is not None:   # the runtime's thread probe measured it on this machine (runtime.llmthreads)
            so.add_session_config_entry(SPIN_KEY, "1" if spinning else "0")
        self.session = ort.InferenceSession(str(model_dir / d.get("filename", "model.onnx")), so,
                                            providers=["CPUExecutionProvider"])
        have = {i.name: i for i in self.session.get_inputs()}
        self.in_ids = names_in.get("input_ids", "input_ids")
        self.in_mask = names_in.get("attention_mask", "attention_mask")
        self.in_pos = names_in.get("position_ids") if names_in.get("position_ids") in have else None
        self.out_logits = names_out.get("logits", "logits")
        # a graph whose lm_head computes the last position only (convert.llm_graph.prune_lm_head): logits [n, 1, V]
        shape = next((o.shape for o in self.session.get_outputs() if o.name == self.out_logits), [])
        self.last_logits_only = len(shape) == 3 and shape[1] == 1
        self.past = [(names_in.get("past_key_names", "past_key_values.%d.key") % i,
                      names_in.get("past_value_names", "past_key_values.%d.value") % i) for i in range(self.n_layers)]
        self.present = [(names_out.get("present_key_names", "present.%d.key") % i,
                         names_out.get("present_value_names", "present.%d.value") % i)
                        for i in range(self.n_layers)]
        wanted = {self.in_ids, self.in_mask} | {n for kv in self.past for n in kv}
        if self.in_pos:
            wanted.add(self.in_pos)
        missing = sorted(wanted - set(have))
        extra = sorted(set(have) - wanted)
        conv = [n for n in extra if n.startswith("past.") and n.endswith(".conv")]
        if conv:   # LFM2: short-convolution layers carry a state of their own, which this server's rows do not hold
            raise BundleError(f"the batching server does not hold the convolution states this model's layers carry "
                              f"({', '.join(conv[:3])}{', ...' if len(conv) > 3 else ''}: LFM2's form)",
                              path=str(model_dir),
                              hint="edgekit run / chat (and LanguageModel.generate / chat) run it; edgekit serve "
                                   "does not yet")
        if missing or extra:
            raise BundleError(f"the decoder graph's inputs do not fit the batching server (missing {missing}, "
                              f"unexpected {extra})", path=str(model_dir))
        odd = sorted({(i, int(have[k].shape[1]), int(have[k].shape[3])) for i, (k, _) in enumerate(self.past)
                      if isinstance(have[k].shape[1], int) and isinstance(have[k].shape[3], int)
                      and (have[k].shape[1], have[k].shape[3]) != (self.kv_heads, self.head_dim)})
        if odd:   # Gemma 4: full-attention layers with another head size / KV head count than the sliding ones
            i, heads, dim = odd[0]
            raise BundleError(f"layer {i}'s KV cache is {heads} heads x {dim} where genai_config says "
                              f"{self.kv_heads} x {self.head_dim} ({len(odd)} such layer(s)): the batching server "
                              "sizes every layer alike", path=str(model_dir),
                              hint="edgekit run / chat (and LanguageModel.generate / chat) run it; edgekit serve "
                                   "does not yet")
        kv_type = have[self.past[0][0]].type
        self.kv_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(kv_type)
        if self.kv_dtype is None:
            raise BundleError(f"KV cache of type {kv_type} is not served (float32 or float16)", path=str(model_dir))
        self.logits_dtype = np.float32 if self.session.get_outputs()[0].type == "tensor(float)" else np.float16
        if not self.vocab:
            self.vocab = int(self.session.get_outputs()[0].shape[-1])
        self.kv_bytes_per_token = 2 * self.n_layers * self.kv_heads * self.head_dim * np.dtype(self.kv_dtype).itemsize
        self.buffers = [(_KVBuffer(self.slots, self.kv_heads, self.capacity, self.head_dim, self.kv_dtype),
                         _KVBuffer(self.slots, self.kv_heads, self.capacity, self.head_dim, self.kv_dtype))
                        for _ in range(self.n_layers)]
        self._binding_key = None
        self._binding = None

    # one binding per (rows, mask width): the KV views of rows 0..n-1 bound as past and present
    def _bind_kv(self, b, rows: slice) -> None:
        ortv = self._ort.OrtValue.ortvalue_from_numpy
        for (pk, pv), (ok, ov), (bk, bv) in zip(self.past, self.present, self.buffers):
            k, v = ortv(bk.array[rows]), ortv(bv.array[rows])
            b.bind_ortvalue_input(pk, k)
            b.bind_ortvalue_output(ok, k)
            b.bind_ortvalue_input(pv, v)
            b.bind_ortvalue_output(ov, v)

    def prefill(self, slot: int, prompts: Sequence[Sequence[int]]) -> List[np.ndarray]:
        """Run prompts into the (empty) caches of slots slot, slot+1, ... as one batch, right-padded (each row
        attends to its own length; the same logits as one prompt at a time, bit for bit). Returns the
        logits after each prompt's last token (float32 [vocab] each). A prompt longer than PREFILL_TOKENS runs
        alone in chunks of that many (a graph computing logits at every position: this bounds their memory; the
        result is the same bit for bit). A graph computing the last position only (convert.llm_graph.prune_lm_head)
        batches prompts of one length; different lengths run one at a time."""
        if len(prompts) == 1 and len(prompts[0]) > PREFILL_TOKENS:
            return [self._prefill_chunked(slot, prompts[0])]
        if self.last_logits_only and len({len(p) for p in prompts}) > 1:
            # the graph's one row of logits is the padded batch's last position, a pad of the shorter prompts:
            # prompts of different lengths one at a time (same logits, bit for bit)
            return [self._prefill_rows(slot + i, [p])[0] for i, p in enumerate(prompts)]
        return self._prefill_rows(slot, prompts)

    def _prefill_rows(self, slot: int, prompts: Sequence[Sequence[int]]) -> List[np.ndarray]:
        """prompts into the (empty) caches of slots slot, slot+1, ... as one right-padded batch."""
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
            mask[i, :len(p)] = 1
        b = self.session.io_binding()
        b.bind_cpu_input(self.in_ids, ids)
        b.bind_cpu_input(self.in_mask, mask)
        if self.in_pos:
            b.bind_cpu_input(self.in_pos, np.repeat(np.arange(width, dtype=np.int64)[None], n, axis=0))
        b.bind_output(self.out_logits)
        self._bind_kv(b, slice(slot, slot + n))
        self.session.run_with_iobinding(b)
        out = b.get_outputs()[0].numpy()
        return [np.asarray(out[i, -1 if self.last_logits_only else len(p) - 1], dtype=np.float32)
                for i, p in enumerate(prompts)]

    def _prefill_chunked(self, slot: int, prompt: Sequence[int]) -> np.ndarray:
        out = None
        for start in range(0, len(prompt), PREFILL_TOKENS):
            out = self.prefill_part(slot, prompt, start, start + PREFILL_TOKENS)
        return out

    def prefill_part(self, slot: int, prompt: Sequence[int], start: int, end: int) -> np.ndarray:
        """Tokens prompt[start:end] into slot's cache, which holds prompt[:start]. Returns the logits
        after the part's last token (float32 [vocab])."""
        part = prompt[start:end]
        total = start + len(part)
        b = self.session.io_binding()
        b.bind_cpu_input(self.in_ids, np.asarray([part], dtype=np.int64))
        b.bind_cpu_input(self.in_mask, np.ones((1, total), dtype=np.int64))
        if self.in_pos:
            b.bind_cpu_input(self.in_pos, np.arange(start, total, dtype=np.int64)[None])
        b.bind_output(self.out_logits)
        self._bind_kv(b, slice(slot, slot + 1))
        self.session.run_with_iobinding(b)
        return np.asarray(b.get_outputs()[0].numpy()[0, -1], dtype=np.float32)

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One step for rows 0..n-1: tokens [n] (the last token of each, not yet in its cache), lengths [n]
        (tokens in each cache). Returns logits [n, vocab] (a view, valid until the next call)."""
        n = int(tokens.shape[0])
        need = int(lengths.max()) + 1
        width = min(self.capacity, -(-need // 64) * 64)
        if self._binding_key != (n, width):
            ortv = self._ort.OrtValue.ortvalue_from_numpy
            b = self.session.io_binding()
            self._ids = np.zeros((n, 1), dtype=np.int64)
            self._mask = np.zeros((n, width), dtype=np.int64)
            self._pos = np.zeros((n, 1), dtype=np.int64)
            self._logits = np.zeros((n, 1, self.vocab), dtype=self.logits_dtype)
            self._cols = np.arange(width, dtype=np.int64)[None]
            b.bind_ortvalue_input(self.in_ids, ortv(self._ids))
            b.bind_ortvalue_input(self.in_mask, ortv(self._mask))
            if self.in_pos:
                b.bind_ortvalue_input(self.in_pos, ortv(self._pos))
            b.bind_ortvalue_output(self.out_logits, ortv(self._logits))
            self._bind_kv(b, slice(0, n))
            self._binding, self._binding_key = b, (n, width)
        self._ids[:, 0] = tokens
        np.less(self._cols, (lengths + 1)[:, None], out=self._mask, casting="unsafe")
        if self.in_pos:
            self._pos[:, 0] = lengths
        self.session.run_with_iobinding(self._binding)
        return self._logits[:, 0]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's cache (its first `length` positions) from row `src` to row `dst`."""
        for bk, bv in self.buffers:
            bk.array[dst, :, :length] = bk.array[src, :, :length]
            bv.array[dst, :, :length] = bv.array[src, :, :length]

    def release(self, row: int) -> None:
        for bk, bv in self.buffers:
            bk.release_row(row)
            bv.release_row(row)

    def close(self) -> None:
        """Free the KV buffers and the session (its weights: a retired release's go now, not with the last
        reference to the release), then hand the freed heap back to the OS (llmopts.trim_heap)."""
        self._binding = None
        self._binding_key = None
        for bk, bv in self.buffers:
            bk.close()
            bv.close()
        self.buffers = []
        self.session = None
        self._ids = self._mask = self._pos = self._logits = None
        trim_heap()


# -- the scheduler ----------------------------------------------------------------------------------------

class LLMEngine:
    """One thread that admits sequences, prefills them and decodes all active ones together.

    submit() (any thread) queues a sequence or refuses it (Busy / TooLong); the engine thread delivers its
    events through the sequence's `on_events`. retire() lets the sequences already admitted or queued
    finish, then ends the thread and frees the KV buffers (a hot swap retires the old release's engine)."""

    def __init__(self, decoder: BatchedDecoder, tokenizer, *, name: str, max_sequences: int, max_queue: int,
                 kv_budget_tokens: int, eos_token_ids: Sequence[int], metrics=None,
                 labels: Optional[Dict[str, str]] = None):
        self.decoder = decoder
        self.labels = dict(labels or {"model": name})
        self.tokenizer = tokenizer
        self.name = name
        self.max_sequences = min(int(max_sequences), decoder.slots)
        self.max_queue = int(max_queue)
        self.capacity = decoder.capacity
        self.kv_budget_tokens = int(kv_budget_tokens)
        self.eos = set(int(e) for e in eos_token_ids)
        self.metrics = metrics
        self.waiting: Deque[GenSequence] = deque()
        self.active: List[GenSequence] = []
        self.long: Optional[GenSequence] = None   # a long prompt being prefilled, chunk by chunk (its row: the last)
        self.long_row = decoder.slots - 1
        self.step_s: Optional[float] = None           # decode step time (moving average)
        self.chunk = PREFILL_CHUNK_MIN                # the next long-prompt chunk's tokens (while others decode)
        self.steps = 0
        self.prefills = 0                    # prefill calls (a batch of prompts counts once)
        self.failed: Optional[str] = None    # why the generation thread ended with an error
        self._cv = threading.Condition()
        self._retiring = False
        self._closed = threading.Event()
        self._on_closed: List[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name=f"edgekit-llm-{name}", daemon=True)
        self._thread.start()

    # -- from request handlers --------------------------------------------------------------------------
    def submit(self, seq: GenSequence) -> None:
        n = seq.prompt_tokens
        if n < 1:
            raise DataError("the prompt is empty (no tokens)")
        if n >= self.capacity:
            raise TooLong(f"the prompt is {n} tokens; the model's context is {self.capacity} tokens "
                          f"(the prompt and at least one new token must fit)")
        vocab = self.decoder.vocab
        lo, hi = min(seq.prompt_ids), max(seq.prompt_ids)
        if lo < 0 or hi >= vocab:
            raise DataError(f"token id {lo if lo < 0 else hi} is not in the model's vocabulary "
                            f"(ids 0 to {vocab - 1})")
        seq.params.max_tokens = min(seq.params.max_tokens, self.capacity - n)
        seq.reserve = n + seq.params.max_tokens
        if seq.reserve > self.kv_budget_tokens:
            seq.params.max_tokens = self.kv_budget_tokens - n
            seq.reserve = self.kv_budget_tokens
            if seq.params.max_tokens < 1:
                raise TooLong(f"the prompt is {n} tokens; the server's KV cache holds {self.kv_budget_tokens} "
                              f"tokens per sequence at most (--kv-cache-mb)")
        with self._cv:
            if self.failed:
                raise EngineFailed(f"model '{self.name}' cannot generate: {self.failed}")
            if self._retiring:
                raise Retiring(f"model '{self.name}' is being replaced; retry")
            if len(self.active) + len(self.waiting) >= self.max_sequences + self.max_queue:
                raise Busy(f"model '{self.name}' is busy: {len(self.active)} sequences generating and "
                           f"{len(self.waiting)} waiting (--max-sequences {self.max_sequences}, "
                           f"--max-queue {self.max_queue}); retry later")
            self.waiting.append(seq)
            self._gauges()
            self._cv.notify()

    def wake(self) -> None:
        """A sequence was cancelled: let the thread drop it now even when it is idle-waiting."""
        with self._cv:
            self._cv.notify()

    def retire(self) -> None:
        with self._cv:
            self._retiring = True
            self._cv.notify()

    def join(self, timeout: Optional[float] = None) -> bool:
        return self._closed.wait(timeout)

    def when_closed(self, fn: Callable[[], None]) -> None:
        """Call fn() (on the engine thread) once the thread has ended and freed its memory; at once if it has."""
        with self._cv:
            if not self._closed.is_set():
                self._on_closed.append(fn)
                return
        fn()

    @property
    def kv_tokens(self) -> int:
        return sum(s.length for s in self.active) + (self.long.length if self.long is not None else 0)

    @property
    def sequences(self) -> List[GenSequence]:
        """Every sequence the engine holds: decoding, being prefilled, waiting."""
        return list(self.active) + ([self.long] if self.long is not None else []) + list(self.waiting)

    # -- the thread -------------------------------------------------------------------------------------
    def _gauges(self) -> None:
        m = self.metrics
        if m is not None:
            m.llm_active.set(len(self.active) + (self.long is not None), **self.labels)
            m.llm_queued.set(len(self.waiting), **self.labels)
            m.llm_kv_bytes.set(self.kv_tokens * self.decoder.kv_bytes_per_token, **self.labels)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self.waiting and not self.active and self.long is None and not self._retiring:
                        self._cv.wait()
                    if self._retiring and not self.waiting and not self.active and self.long is None:
                        return
                    admit = self._admit()
                events: Dict[GenSequence, list] = {}
                for group in self._prefill_groups(admit):
                    self._prefill(group, events)
                if self.long is not None:
                    self._prefill_long(events)
                self._drop_finished(events)
                if events:     # first tokens go out now, not after the next decode step (TTFT)
                    self._deliver(events)
                    events = {}
                if self.active:
                    self._step(events)
                    self._drop_finished(events)
                with self._cv:
                    self._gauges()
                self._deliver(events)
        except BaseException as e:  # the engine thread failing: every sequence hears it, the model is not ready
            log.exception("model %s: the generation thread failed", self.name)
            with self._cv:
                self.failed = f"{type(e).__name__}: {e}"
                self._retiring = True
                left = self.sequences
                self.active.clear()
                self.waiting.clear()
                self.long = None
            for seq in left:
                seq.on_events([("error", f"generation failed: {type(e).__name__}: {e}")])
        finally:
            self.decoder.close()
            with self._cv:
                self._gauges()
                self._closed.set()
                calls, self._on_closed = self._on_closed, []
            for fn in calls:
                fn()

    @staticmethod
    def _deliver(events: Dict[GenSequence, list]) -> None:
        for seq, evs in events.items():
            seq.on_events(evs)

    def _admit(self) -> List[GenSequence]:
        """Waiting sequences that fit now (slots and KV budget), in arrival order; cancelled ones leave.
        A prompt longer than PREFILL_TOKENS becomes `self.long` (prefilled chunk by chunk) when no other
        is; until then it and those behind it wait."""
        out: List[GenSequence] = []
        held = self.active + ([self.long] if self.long is not None else [])
        reserved = sum(s.reserve for s in held)
        while self.waiting and len(held) + len(out) < self.max_sequences:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                self._finish_event(seq, "cancelled", None)
                continue
            if reserved + seq.reserve > self.kv_budget_tokens:
                break
            if seq.prompt_tokens > PREFILL_TOKENS:
                if self.long is not None:
                    break
                self.waiting.popleft()
                reserved += seq.reserve
                seq.length = 0
                self.long = seq
                held = held + [seq]
                continue
            self.waiting.popleft()
            reserved += seq.reserve
            out.append(seq)
        return out

    def _chunk_tokens(self) -> int:
        if PREFILL_CHUNK:
            return PREFILL_CHUNK
        if not self.active:
            return PREFILL_TOKENS      # nobody is waiting for a decode step
        return self.chunk

    def _prefill_long(self, events) -> None:
        """The next chunk of the long prompt, in its own row; on its last one it joins the decoding rows."""
        seq, row = self.long, self.long_row
        if seq.cancelled:
            return     # _drop_finished lets it go
        start = seq.length
        end = min(start + self._chunk_tokens(), seq.prompt_tokens)
        t0 = time.perf_counter()
        try:
            logits = self.decoder.prefill_part(row, seq.prompt_ids, start, end)
            took = time.perf_counter() - t0
            if self.active and self.step_s and end - start == self.chunk:   # toward LONG_PREFILL_STEPS steps' time
                ratio = min(2.0, max(0.5, LONG_PREFILL_STEPS * self.step_s / max(took, 1e-6)))
                self.chunk = int(min(PREFILL_TOKENS, max(PREFILL_CHUNK_MIN, round(self.chunk * ratio))))
        except Exception as e:  # this prompt fails (e.g. out of memory): the others go on
            log.error("model %s: prefill of a %d-token prompt failed: %s", self.name, seq.prompt_tokens, e)
            self.long = None
            self.decoder.release(row)
            seq.finish = "error"
            events.setdefault(seq, []).append(("error", f"prefill failed: {type(e).__name__}: {e}"))
            return
        seq.length = end
        if end < seq.prompt_tokens:
            return
        self.prefills += 1
        self.long = None
        dst = len(self.active)
        if dst != row:
            self.decoder.move(row, dst, seq.length)
            self.decoder.release(row)
        self.active.append(seq)
        self._started(seq, logits, events)

    def _finish_event(self, seq: GenSequence, reason: str, events: Optional[Dict[GenSequence, list]]) -> None:
        seq.finish = reason
        if self.metrics is not None:
            self.metrics.llm_finished.inc(reason=reason, **self.labels)
        if events is None:
            seq.on_events([("done", reason)])
        else:
            events.setdefault(seq, []).append(("done", reason))

    @staticmethod
    def _prefill_groups(admit: List[GenSequence]) -> List[List[GenSequence]]:
        """Prompts prefilled together, right-padded, while the padded batch stays within PREFILL_TOKENS
        (the graph's logits cover every position: this bounds that memory as one such prompt would)."""
        groups: List[List[GenSequence]] = []
        for seq in admit:
            g = groups[-1] if groups else None
            if g and max(seq.prompt_tokens, *(s.prompt_tokens for s in g)) * (len(g) + 1) <= PREFILL_TOKENS:
                g.append(seq)
            else:
                groups.append([seq])
        return groups

    def _prefill(self, seqs: List[GenSequence], events) -> None:
        first = len(self.active)
        self.active.extend(seqs)
        try:
            logits = self.decoder.prefill(first, [s.prompt_ids for s in seqs])
            self.prefills += 1
        except Exception as e:  # these prompts fail (e.g. out of memory): the others go on
            log.error("model %s: prefill of %d prompt(s) failed: %s", self.name, len(seqs), e)
            del self.active[first:]
            for k in range(len(seqs)):
                self.decoder.release(first + k)
            for seq in seqs:
                seq.finish = "error"
                events.setdefault(seq, []).append(("error", f"prefill failed: {type(e).__name__}: {e}"))
            return
        for seq, row in zip(seqs, logits):
            seq.length = seq.prompt_tokens
            self._started(seq, row, events)

    def _started(self, seq: GenSequence, logits: np.ndarray, events) -> None:
        """A sequence's prompt is in its cache: its first token."""
        seq._detok = self.tokenizer.stream()
        if self.metrics is not None:
            self.metrics.llm_prompt_tokens.inc(seq.prompt_tokens, **self.labels)
        self._next(seq, None, logits, events)

    def _choose(self, seq: GenSequence, row: np.ndarray) -> int:
        if seq.params.greedy:
            return int(row.argmax())
        return _sample(row, seq.params, seq.rng)

    def _next(self, seq: GenSequence, tok: Optional[int], row: Optional[np.ndarray], events) -> None:
        """Choose (when `tok` is None) and accept seq's next token. A failure choosing it (sampling its row) or
        decoding its text (_accept) ends this sequence with an error; the engine and the other sequences go on
        (_drop_finished frees its row). Any other failure (the engine's own bookkeeping) fails the engine."""
        if tok is None:
            try:
                tok = self._choose(seq, row)
            except SEQUENCE_ERRORS as e:
                self._sequence_failed(seq, "choosing", e, events)
                return
        self._accept(seq, tok, events)

    def _sequence_failed(self, seq: GenSequence, what: str, e: BaseException, events) -> None:
        """One sequence's token could not be chosen or decoded (called in the except clause: the traceback is
        logged): it ends with an error for its client, counted as finished with reason "error"."""
        log.exception("model %s: request %s: %s its next token failed", self.name, seq.request_id, what)
        seq.finish = "error"
        if self.metrics is not None:
            self.metrics.llm_finished.inc(reason="error", **self.labels)
        events.setdefault(seq, []).append(("error", f"generation failed: {type(e).__name__}: {e}"))

    def _step(self, events) -> None:
        act = self.active
        tokens = np.fromiter((s.tokens[-1] for s in act), dtype=np.int64, count=len(act))
        lengths = np.fromiter((s.length for s in act), dtype=np.int64, count=len(act))
        t0 = time.perf_counter()
        logits = self.decoder.decode(tokens, lengths)
        self.step_s = _ema(self.step_s, time.perf_counter() - t0)
        self.steps += 1
        if self.metrics is not None:
            self.metrics.llm_batch.observe(len(act), **self.labels)
        if all(s.params.greedy for s in act):  # one argmax over the batch (no copy of the logits)
            picks = logits.argmax(-1).tolist()
        else:
            picks = [None] * len(act)   # chosen per sequence in _next
        for i, (s, tok) in enumerate(zip(list(act), picks)):
            s.length += 1
            self._next(s, tok, logits[i] if tok is None else None, events)

    def _accept(self, seq: GenSequence, tok: int, events) -> None:
        """A new token for `seq`: timing, end of sequence, text (with stop strings), length."""
        now = time.perf_counter()
        m = self.metrics
        if seq.t_first is None:
            seq.t_first = now
            if m is not None:
                m.llm_ttft.observe(now - seq.t_arrival, **self.labels)
        elif m is not None:
            m.llm_inter_token.observe(now - seq.t_last, **self.labels)
        seq.t_last = now
        seq.tokens.append(tok)
        if m is not None:
            m.llm_completion_tokens.inc(**self.labels)
        evs = events.setdefault(seq, [])
        if tok in self.eos and not seq.params.ignore_eos:
            self._flush(seq, evs)
            self._finish_event(seq, "stop", events)
            return
        try:
            piece = seq._detok.decode(tok)
        except SEQUENCE_ERRORS as e:
            self._sequence_failed(seq, "decoding", e, events)
            return
        stops = seq.params.stop
        if stops:
            seq._pending += piece
            hit = min((i for i in (seq._pending.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                if hit:
                    evs.append(("text", seq._pending[:hit]))
                seq._pending = ""
                self._finish_event(seq, "stop", events)
                return
            keep = _hold_back(seq._pending, stops)
            out = seq._pending[:len(seq._pending) - keep]
            seq._pending = seq._pending[len(seq._pending) - keep:]
            if out:
                evs.append(("text", out))
        elif piece:
            evs.append(("text", piece))
        if len(seq.tokens) >= seq.params.max_tokens or seq.length + 1 >= self.capacity:
            self._flush(seq, evs)
            self._finish_event(seq, "length", events)

    @staticmethod
    def _flush(seq: GenSequence, evs: list) -> None:
        if seq._pending:
            evs.append(("text", seq._pending))
            seq._pending = ""

    def _drop_finished(self, events) -> None:
        """Sequences that finished or were cancelled leave; the last row fills each hole."""
        i = 0
        act = self.active
        while i < len(act):
            s = act[i]
            if s.finish is None and s.cancelled:
                self._finish_event(s, "cancelled", events)
            if s.finish is None:
                i += 1
                continue
            last = len(act) - 1
            if i != last:
                self.decoder.move(last, i, act[last].length)
                act[i] = act[last]
            act.pop()
            self.decoder.release(last)
        s = self.long
        if s is not None and s.cancelled:       # cancelled while its prompt was being read
            self.long = None
            self.decoder.release(self.long_row)
            self._finish_event(s, "cancelled", events)
        # cancelled while waiting: leave the queue now, not when their turn comes
        if any(s.cancelled for s in self.waiting):
            with self._cv:
                keep = deque()
                for s in self.waiting:
                    if s.cancelled:
                        self._finish_event(s, "cancelled", events)
                    else:
                        keep.append(s)
                self.waiting = keep


# -- a loaded release -------------------------------------------------------------------------------------

@dataclass
class LLMRelease:
    """One loaded release of a language model, with its engine."""

    name: str
    sha256: str
    path: Path
    tokenizer: Tokenizer
    engine: LLMEngine
    context: int
    kv_bytes_per_token: int
    threads: Optional[int]
    backend_version: str
    load_seconds: float
    check: Optional[Dict[str, Any]]
    has_chat_template: bool
    spinning: Optional[bool] = None    # whether ORT's intra-op threads spin, as measured at load (None: the bundle's)
    loaded_at: float = field(default_factory=time.time)

    kind = "llm"
    format = "onnx-genai"
    backend = "onnxruntime-genai"

    @property
    def version(self) -> str:
        return self.sha256[:VERSION_CHARS]

    def matches(self, v: Optional[str]) -> bool:
        return v in (None, "", "current", self.version) or (len(v) >= 7 and self.sha256.startswith(v))


def load_llm_release(name: str, sha: str, path: Path, *, threads: Optional[int], check: bool,
                     max_sequences: int, max_queue: int, kv_cache_mb: Optional[float], metrics=None,
                     spinning: Optional[bool] = None) -> LLMRelease:
    """Load (and golden-check) a language model and start its engine. Raises EdgekitError. threads and
    spinning given (a hot swap passes the active release's): no thread probe runs (runtime.llm.load_llm)."""
    from edgekit.runtime.llm import load_llm

    t0 = time.perf_counter()
    lm = load_llm(path, threads=threads, spinning=spinning)
    result = None
    if check and lm.manifest is not None and lm.manifest.get("golden"):
        result = lm.check()
        if not result["ok"]:
            raise BundleError(f"the golden check failed: top-1 agreement {result['top1_agreement']:.3f} "
                              f"(min {result['min_top1_agreement']}), SNR {result['snr_db']} dB, "
                              f"generation {'ok' if result['generation_ok'] else 'empty'}", path=str(path))
    model_dir, genai_config, context = lm.model_dir, lm.genai_config, int(lm.context)
    eos, used_threads, version, chat = list(lm.eos_token_ids), lm.threads, lm.backend_version, lm.has_chat_template
    bos, spinning = lm.tokenizer.bos, lm.spinning
    template, rules, prep = lm.tokenizer.template, lm.tokenizer.rules, lm.tokenizer.prep   # read at load, not again
    del lm  # ONNX Runtime GenAI's copy of the weights goes before the batched session loads its own
    decoder = BatchedDecoder(model_dir, genai_config, threads=used_threads, slots=max_sequences, capacity=context,
                             spinning=spinning)
    per_seq = context
    if kv_cache_mb is not None:
        budget = int(kv_cache_mb * (1 << 20)) // decoder.kv_bytes_per_token
        if budget < 2:
            decoder.close()
            raise BundleError(f"--kv-cache-mb {kv_cache_mb} holds {budget} tokens of this model's KV cache "
                              f"({decoder.kv_bytes_per_token} bytes per token)", path=str(path))
    else:
        budget = per_seq * decoder.slots
    tokenizer = Tokenizer.of_folder(model_dir, bos, template=template, rules=rules, prep=prep)
    after_load(model_dir)   # as load_llm ends (llmopts.after_load): malloc, the file's pages, the heap, huge pages
    engine = LLMEngine(decoder, tokenizer, name=name, max_sequences=max_sequences,
                       max_queue=max_queue, kv_budget_tokens=budget, eos_token_ids=eos,
                       labels={"model": name, "version": sha[:VERSION_CHARS]})
    rel = LLMRelease(name=name, sha256=sha, path=path, tokenizer=engine.tokenizer, engine=engine, context=context,
                     kv_bytes_per_token=decoder.kv_bytes_per_token, threads=used_threads, backend_version=version,
                     load_seconds=time.perf_counter() - t0, check=result, has_chat_template=chat,
                     spinning=spinning)
    try:
        _warm_up(rel)
    except BaseException:
        engine.retire()
        raise
    engine.metrics = metrics  # after the warm-up: its tokens are not a client's
    if metrics is not None:
        metrics.llm_kv_capacity.set(budget * decoder.kv_bytes_per_token, **engine.labels)
        with engine._cv:
            engine._gauges()
    return rel


def _warm_up(rel: LLMRelease) -> None:
    """One short generation through the engine, so a client's first request does not pay ORT's first run."""
    done = threading.Event()
    got: List[Any] = []

    def on_events(evs):
        got.extend(evs)
        if any(k in ("done", "error") for k, _ in evs):
            done.set()

    seq = GenSequence(rel.tokenizer.encode("Hello") or [0], SamplingParams(max_tokens=2), on_events,
                    request_id="warm-up")
    rel.engine.submit(seq)
    done.wait(120)
    errors = [v for k, v in got if k == "error"]
    if errors:
        raise BundleError(f"the model does not generate: {errors[0]}", path=str(rel.path))
