"""The OpenAI-compatible API (the one llama.cpp's server, vLLM, Ollama and MLC speak) and Triton's generate
extension, for the language models a server holds, beside Open Inference Protocol v2 on the same port.

    POST /v1/chat/completions     messages -> the assistant's reply (the bundle's chat template); stream=true:
                                  Server-Sent Events of chat.completion.chunk (role first, content deltas, the
                                  finish_reason, a usage chunk with stream_options.include_usage, data: [DONE])
    POST /v1/completions          prompt -> its continuation (no template); stream as text_completion chunks
    GET  /v1/models[/{id}]        the language models served
    POST /v2/models/{m}[/versions/{v}]/generate          {"text_input", "parameters"?} -> {"text_output"}
    POST /v2/models/{m}[/versions/{v}]/generate_stream   the same as Server-Sent Events, one piece per event
    GET  /v2/models/{m}[/ready]   a language model's metadata and readiness (Open Inference Protocol)

Errors on /v1 are {"error": {"message", "type", "code"}} (OpenAI's shape): 400 a bad body or a prompt that
does not fit the context (code context_length_exceeded), 401 no or a wrong bearer token, 404 an unknown model,
413 a body over the limit, 429 every sequence slot and the wait queue taken (clients retry), 503 a model not
ready. On /v2 they are {"error": "..."} like the rest of /v2.

A client that disconnects (mid-stream or while waiting for a whole reply) cancels its sequence: the engine
drops it before its next decode step and frees its KV-cache slot. No prompt or generated text is logged
unless --log-prompts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from edgekit.bundle import check_name
from edgekit.errors import BundleError, DataError
from edgekit.runtime.llm_batch import Busy, EngineFailed, GenSequence, Retiring, SamplingParams, TooLong
from edgekit.runtime.threads import usable_cpus
from edgekit.serve.llm_entry import LLMEntry
from edgekit.serve.protocol import ProtocolError

log = logging.getLogger("edgekit.serve")

_GENERATE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/(generate|generate_stream)/?$")
_V2_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready)?/?$")
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
MAX_STOP = 16
# a prompt text longer than the context x this many characters is refused before it is tokenized (on the event
# loop, where megabytes of text would stall every stream): such a text cannot fit the context anyway where no
# token is longer. The longest tokens of the vocabularies served: SmolLM2's and Qwen2.5's 81 characters ("\n" and
# 80 spaces; 80 '#' is another), Gemma 3's 31; twice that leaves room for others. Measuring the served
# tokenizer's own at load would read its tokenizer.json (Gemma 3's 33 MB: ~0.9 s and a transient ~200 MB)
MAX_CHARS_PER_TOKEN = 128
_PIECE = "\u0001edgekit-piece\u0001"   # where a streamed chunk's text goes in its pre-encoded JSON

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _dump(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _openai_error(e: ApiError) -> bytes:
    return _dump({"error": {"message": e.message, "type": _TYPES.get(e.status, "server_error"),
                            "param": e.param, "code": e.code}})


# -- request bodies --------------------------------------------------------------------------------------

def _num(doc: Dict[str, Any], key: str, default, lo: float, hi: float, *, integer: bool = False):
    v = doc.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'} (got {v!r})"[:200],
                       "invalid_type", key)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi} (got {v})", "invalid_value", key)
    return v


def _stops(v: Any) -> List[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them",
                       "invalid_value", "stop")
    return list(stops)


def sampling_from(doc: Dict[str, Any], default_max: Optional[int]) -> SamplingParams:
    """OpenAI's sampling fields (max_completion_tokens before max_tokens) -> SamplingParams."""
    mt = doc.get("max_completion_tokens")
    key = "max_completion_tokens" if mt is not None else "max_tokens"
    max_tokens = _num(doc, key, None, 1, 1 << 30, integer=True)
    if max_tokens is None:
        max_tokens = default_max if default_max is not None else 1 << 30  # the context left
    seed = _num(doc, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
    top_k = _num(doc, "top_k", 0, -1, 1 << 30, integer=True)  # llama.cpp / vLLM extension; -1: none
    return SamplingParams(max_tokens=int(max_tokens), temperature=float(_num(doc, "temperature", 1.0, 0.0, 2.0)),
                          top_p=float(_num(doc, "top_p", 1.0, 0.0, 1.0)) or 1e-9, top_k=max(int(top_k), 0),
                          seed=None if seed is None else seed % (1 << 64), stop=_stops(doc.get("stop")),
                          ignore_eos=_flag(doc, "ignore_eos"))


def _flag(doc: Dict[str, Any], key: str) -> bool:
    v = doc.get(key, False)
    if not isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be true or false", "invalid_type", key)
    return v


def _unsupported(doc: Dict[str, Any], chat: bool) -> None:
    n = doc.get("n")
    if n not in (None, 1):
        raise ApiError(400, "only n=1 is served (one choice per request)", "unsupported_value", "n")
    if doc.get("logprobs") not in (None, False, 0) or doc.get("top_logprobs") not in (None, 0):
        raise ApiError(400, "logprobs are not served", "unsupported_value", "logprobs")
    if chat and doc.get("tools"):
        raise ApiError(400, "tools (function calling) are not served", "unsupported_value", "tools")
    if doc.get("best_of") not in (None, 1) or doc.get("echo") or doc.get("suffix"):
        raise ApiError(400, "best_of, echo and suffix are not served", "unsupported_value")
    rf = doc.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type", "text") != "text"):
        raise ApiError(400, "only response_format {'type': 'text'} is served", "unsupported_value",
                       "response_format")
    so = doc.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(400, "'stream_options' must be an object", "invalid_type", "stream_options")
    if not isinstance(doc.get("stream", False), bool):
        raise ApiError(400, "'stream' must be true or false", "invalid_type", "stream")


def chat_messages(doc: Dict[str, Any]) -> List[Dict[str, str]]:
    msgs = doc.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "invalid_value", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, developer, user or assistant",
                           "invalid_value", "messages")
        c = m.get("content")
        if isinstance(c, list):  # content parts: text ones are joined, others are not served
            texts = []
            for part in c:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}]: only text content parts are served", "invalid_value",
                                   "messages")
                texts.append(part["text"])
            c = "".join(texts)
        if not isinstance(c, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           "invalid_value", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": c})
    return out


# -- from the engine thread to a request's event loop ------------------------------------------------------

STREAM_INTERVAL_MS: Optional[float] = None  # the default --stream-interval-ms: auto (auto_stream_interval_ms)
AUTO_STREAM_INTERVAL_MS = 20.0


def auto_stream_interval_ms(threads: Optional[int], cpus: Optional[int] = None) -> float:
    """--stream-interval-ms auto (the default): 20 ms when the model's intra-op threads take every CPU this server
    may use, else 0 (a write per token). Each write wakes the event loop (and a client on the same machine): where
    ONNX Runtime's threads hold every core that wake-up takes one of them off its core mid-step (measured on 2
    cores, 2 threads: ~3-4 involuntary switches of the decode threads per token against ~0.3-0.5 in-process;
    gathered every 20 ms ~0.4-1.2, and the loop's and the client's CPU per token halved). Over fresh process pairs
    on an Intel Xeon (docs/serve.md) the API's 1-stream deficit against in-process decoding went from 10.8% to
    6.4% on a 48 MB model and from 2.8% to 2.3% on SmolLM2-135M INT4. A reader sees no difference: the first
    piece and the last event go at once, and 20 ms is under a frame of a terminal or a chat window. With a core
    to spare a write per token costs the decode nothing, so there nothing is gathered."""
    cpus = cpus or usable_cpus()
    return AUTO_STREAM_INTERVAL_MS if (threads or cpus) >= cpus else 0.0


class _Outbox:
    """One request's events, from the engine thread (put) to its event loop (batches).

    Waking an event loop from another thread, and writing a chunk to a socket, costs CPU that the decode
    threads on a small device then miss (the engine steps every few milliseconds on a small model). So a
    stream is written at most once per `interval` seconds while its pieces come faster than that: the first
    piece, the last event and every piece of a slower stream go at once (no added latency), faster ones are
    gathered and sent together (each still its own SSE event). interval 0: a write per engine step;
    None (a reply sent whole): the loop wakes only for the last event."""

    __slots__ = ("_loop", "_interval", "_lock", "_buf", "_waiting", "_woken", "_ready", "_first")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: Optional[float]):
        self._loop = loop
        self._interval = interval
        self._lock = threading.Lock()
        self._buf: list = []
        self._waiting = False     # the loop waits for events with nothing buffered
        self._woken = False       # a wake-up is on its way to the loop
        self._ready = asyncio.Event()
        self._first = True

    def put(self, evs: list) -> None:
        """From the engine thread: one step's events."""
        if not evs:
            return
        last = evs[-1][0] != "text"
        with self._lock:
            self._buf.extend(evs)
            if self._woken:
                return
            if last or (self._interval is not None and (self._waiting or self._first)):
                self._woken = True
                self._first = False
            else:
                return
        self._loop.call_soon_threadsafe(self._ready.set)

    def gone(self) -> None:
        """On the loop: the client disconnected."""
        with self._lock:
            self._buf.append(("gone", None))
        self._ready.set()

    async def batches(self):
        while True:
            with self._lock:
                # a reply sent whole takes its events only once the last is there
                if self._buf and (self._interval is not None or self._buf[-1][0] != "text"):
                    evs, self._buf = self._buf, []
                else:
                    evs = []
                self._waiting = not evs
            if not evs:
                await self._ready.wait()
                self._ready.clear()
                with self._lock:
                    self._woken = self._waiting = False
                continue
            yield evs
            if evs[-1][0] != "text":
                return
            if self._interval:
                # pieces coming faster than the interval wait for the next write; the last event does not
                with self._lock:
                    self._woken = False
                try:
                    await asyncio.wait_for(self._ready.wait(), self._interval)
                except asyncio.TimeoutError:
                    pass
                self._ready.clear()
                with self._lock:
                    self._woken = False


# -- the API ---------------------------------------------------------------------------------------------

class LLMApi:
    """Serves the language-model endpoints for App (which checks the token and reads bodies)."""

    def __init__(self, entries: List[LLMEntry], metrics, *, read_body, authorized, log_prompts: bool = False,
                 stream_interval_ms: Optional[float] = STREAM_INTERVAL_MS):
        self.entries = {e.name: e for e in entries}
        # seconds, or None: auto, per release (auto_stream_interval_ms of its engine's threads)
        self.stream_interval = None if stream_interval_ms is None else max(0.0, float(stream_interval_ms)) / 1000.0
        self._cpus: Optional[int] = None    # usable CPUs (for auto), read once
        self.metrics = metrics
        self._read_body = read_body
        self._authorized = authorized
        self.log_prompts = log_prompts

    def interval_for(self, rel) -> float:
        """A stream's write interval in seconds for a release (--stream-interval-ms, or auto)."""
        if self.stream_interval is not None:
            return self.stream_interval
        if self._cpus is None:
            self._cpus = usable_cpus()
        return auto_stream_interval_ms(rel.threads, self._cpus) / 1000.0

    def handles(self, path: str) -> bool:
        if path == "/v1" or path.startswith("/v1/"):
            return True
        if _GENERATE.match(path):
            return True
        return path.startswith("/v2/models/") and path[len("/v2/models/"):].split("/", 1)[0] in self.entries

    def not_ready(self) -> List[str]:
        return [n for n, e in self.entries.items() if not e.ready]

    # -- dispatch ---------------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        path, method = scope["path"], scope["method"]
        v1 = path.startswith("/v1")
        model = None
        started = []

        async def send_(msg, _send=send):
            if msg["type"] == "http.response.start":
                started.append(msg["status"])
            await _send(msg)

        send = send_
        if not self._authorized(scope):
            e = ApiError(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                         "invalid_api_key")
            return await _reply(send, 401, _openai_error(e) if v1 else _dump({"error": e.message}),
                                _JSON + [(b"www-authenticate", b'Bearer realm="edgekit"')])
        try:
            if path.rstrip("/") == "/v1/models":
                _method(method, "GET")
                return await _reply(send, 200, _dump({"object": "list",
                                                      "data": [self._model_card(e) for e in self.entries.values()]}))
            if path.startswith("/v1/models/"):
                _method(method, "GET")
                e = self._entry(path[len("/v1/models/"):].rstrip("/"), need_ready=False)
                return await _reply(send, 200, _dump(self._model_card(e)))
            if path.rstrip("/") in ("/v1/chat/completions", "/v1/completions"):
                _method(method, "POST")
                chat = path.rstrip("/").endswith("chat/completions")
                doc = _json_body(await self._read_body(scope, receive))
                name = doc.get("model")
                if name is None and len(self.entries) == 1:
                    name = next(iter(self.entries))
                if not isinstance(name, str) or not name:
                    raise ApiError(400, "'model' is required (GET /v1/models lists them)", "invalid_value", "model")
                entry = self._entry(name)
                model = entry.name
                self.metrics.requests.inc(model=model)
                return await self._openai(scope, receive, send, entry, doc, chat)
            m = _GENERATE.match(path)
            if m:
                _method(method, "POST")
                entry = self._entry(m.group(1))
                model = entry.name
                self.metrics.requests.inc(model=model)
                return await self._generate(scope, receive, send, entry, m.group(2), m.group(3) == "generate_stream")
            m = _V2_MODEL.match(path)
            if m:
                _method(method, "GET")
                return await self._v2_model(send, m.group(1), m.group(2), m.group(3))
            if path.startswith("/v2/models/") and path.rstrip("/").endswith("/infer"):
                name = path[len("/v2/models/"):].split("/", 1)[0]
                raise ApiError(400, f"model '{name}' is a language model: POST /v2/models/{name}/generate "
                                    "(Triton's generate extension) or /v1/chat/completions")
            raise ApiError(404, f"no such endpoint: {method} {path}", "not_found")
        except ProtocolError as e:  # from reading the body (413, a bad Content-Length, a client gone)
            err = ApiError(e.status, e.message, "request_too_large" if e.status == 413 else None)
        except Busy as e:
            err = ApiError(429, str(e), "server_busy")
        except EngineFailed as e:
            err = ApiError(503, str(e), "model_not_ready")
        except TooLong as e:
            err = ApiError(400, str(e), "context_length_exceeded",   # the field holding the text, per endpoint
                           "messages" if path.rstrip("/").endswith("/chat/completions") else "prompt")
        except DataError as e:
            err = ApiError(400, str(e), "invalid_value")
        except ApiError as e:
            err = e
        except Exception as e:  # a failure of ours: logged with its traceback, 500 with what it said
            log.exception("model %s: %s %s failed", model, method, path)
            if started:
                raise
            err = ApiError(500, f"{type(e).__name__}: {e}", "internal_error")
        if model is not None:
            self.metrics.failures.inc(model=model, code=str(err.status))
        body = _openai_error(err) if v1 else _dump({"error": err.message})
        await _reply(send, err.status, body)

    def _entry(self, name: str, need_ready: bool = True) -> LLMEntry:
        try:
            check_name(name)
        except BundleError:
            raise ApiError(404 if name else 400, f"invalid model name {name[:64]!r}", "model_not_found",
                           "model") from None
        e = self.entries.get(name)
        if e is None:
            served = ", ".join(sorted(self.entries)) or "none"
            raise ApiError(404, f"the model '{name}' does not exist here (language models served: {served})",
                           "model_not_found", "model")
        if need_ready and not e.ready:
            why = e.state().get("error") or (e.failure or {}).get("error", "loading")
            raise ApiError(503, f"model '{name}' is not ready: {why}", "model_not_ready")
        return e

    def _model_card(self, e: LLMEntry) -> Dict[str, Any]:
        a = e.active
        return {"id": e.name, "object": "model", "created": int(a.loaded_at) if a else 0, "owned_by": "edgekit",
                "version": a.version if a else None, "context_length": a.context if a else None,
                "ready": a is not None}

    async def _v2_model(self, send, name: str, version: Optional[str], ready: Optional[str]) -> None:
        e = self.entries[name]
        a = e.active
        if version is not None and (a is None or not a.matches(version)):
            raise ApiError(404, f"model '{name}' has no version '{version[:64]}' being served")
        if ready:
            if a is None:
                return await _reply(send, 503, _dump({"name": name, "ready": False,
                                                      "error": (e.failure or {}).get("error", "not loaded")}))
            return await _reply(send, 200, _dump({"name": name, "ready": True}))
        await _reply(send, 200, _dump({
            "name": name, "versions": [a.version] if a else [], "platform": "onnx-genai_llm",
            "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}],
            "edgekit": e.state()}))

    # -- running a sequence -----------------------------------------------------------------------------
    def _start(self, entry: LLMEntry, prompt, params: SamplingParams, rid: str, *, stream: bool, rel=None,
               chars: int = 0, pinned: bool = False):
        """Submit to `rel`, the release the request chose (None: the active one), the prompt's ids (`prompt`: a
        list, or a function giving them for a release: its tokenizer's encoding; a text of `chars` characters is
        refused before it is encoded when it cannot fit the context): (release, sequence, outbox). A release
        swapped between the request's choice and submitting (its engine retired: Retiring) is not the client's
        failure: the prompt goes to the release active now (encoded by its tokenizer), unless the request pinned
        the version (404: that version is no longer served)."""
        encode: Callable[[Any], List[int]] = prompt if callable(prompt) else (lambda r: prompt)
        if rel is None:
            rel = entry.active
        while True:
            if rel is None:
                raise ApiError(503, f"model '{entry.name}' is not ready", "model_not_ready")
            if chars and chars > rel.context * MAX_CHARS_PER_TOKEN:
                raise TooLong(f"the prompt is {chars} characters; the model's context is {rel.context} tokens "
                              f"(at most {rel.context * MAX_CHARS_PER_TOKEN} characters, {MAX_CHARS_PER_TOKEN} "
                              f"a token)")
            box = _Outbox(asyncio.get_running_loop(), self.interval_for(rel) if stream else None)
            seq = GenSequence(encode(rel), params, box.put, request_id=rid)
            try:
                rel.engine.submit(seq)
            except Retiring:
                now = entry.active
                if now is rel:     # retired with no successor (the server closing): 429
                    raise
                if pinned:
                    raise ApiError(404, f"model '{entry.name}' has no version '{rel.version}' being served "
                                        f"(serving {now.version if now else 'none'})") from None
                rel = now
                continue
            return rel, seq, box

    async def _events(self, receive, rel, seq, box):
        """Yield ("text", piece) ... then ("done", reason) or ("error", msg). A client that disconnects
        cancels its sequence (seq.client_gone) and the iteration ends at once."""
        async for batch in self._batches(receive, rel, seq, box):
            for ev in batch:
                yield ev

    async def _batches(self, receive, rel, seq, box):
        """The same events, as lists: everything the engine delivered since the last one (several steps'
        pieces when they came faster than the stream interval, or this loop was behind), so a stream writes
        them to its socket at once."""
        async def watch():
            await _wait_disconnect(receive)
            seq.client_gone = True
            seq.cancel()
            rel.engine.wake()
            box.gone()

        gone = asyncio.get_running_loop().create_task(watch())
        try:
            async for evs in box.batches():
                out = []
                for ev in evs:
                    if ev[0] == "gone":
                        log.info("model %s: request %s: the client went away after %d tokens; its sequence is "
                                 "cancelled", rel.name, seq.request_id, seq.completion_tokens)
                        return
                    out.append(ev)
                    if ev[0] != "text":
                        yield out
                        return
                yield out
        finally:
            gone.cancel()
            if seq.finish is None:
                seq.cancel()
                rel.engine.wake()

    def _log(self, rel, rid: str, what: str, prompt_text: str, seq, text: Optional[str]) -> None:
        if self.log_prompts:
            log.info("model %s: %s %s: prompt %r -> %r (%s)", rel.name, what, rid, prompt_text, text, seq.finish)
        else:
            log.debug("model %s: %s %s: %d prompt tokens, %d generated (%s)", rel.name, what, rid,
                      seq.prompt_tokens, seq.completion_tokens, seq.finish)

    async def _openai(self, scope, receive, send, entry: LLMEntry, doc: Dict[str, Any], chat: bool) -> None:
        _unsupported(doc, chat)
        rel = entry.active
        if rel is None:
            raise ApiError(503, f"model '{entry.name}' is not ready", "model_not_ready")
        params = sampling_from(doc, None if chat else 16)
        chars = 0
        if chat:
            msgs = chat_messages(doc)
            prompt_text = json.dumps(msgs, ensure_ascii=False)
            chars = sum(len(m["content"]) for m in msgs)

            def encode(r):
                return r.tokenizer.chat_ids(msgs)
        else:
            prompt = doc.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in prompt):
                ids, prompt_text = [int(t) for t in prompt], str(prompt)
                if any(t < 0 for t in ids):   # and below the vocabulary's size: the engine's submit
                    raise ApiError(400, "token ids must be >= 0", "invalid_value", "prompt")

                def encode(r):
                    return ids
            elif isinstance(prompt, str):
                prompt_text, chars = prompt, len(prompt)

                def encode(r):
                    return r.tokenizer.encode(prompt)
            else:
                raise ApiError(400, "'prompt' must be a string (or one list of token ids)", "invalid_value",
                               "prompt")
        stream = bool(doc.get("stream", False))
        usage_chunk = bool((doc.get("stream_options") or {}).get("include_usage"))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        rel, seq, q = self._start(entry, encode, params, rid, stream=stream, rel=rel, chars=chars)
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": entry.name, "system_fingerprint": rel.version}
        if not stream:
            pieces: List[str] = []
            error = None
            async for kind, v in self._events(receive, rel, seq, q):
                if kind == "text":
                    pieces.append(v)
                elif kind == "error":
                    error = v
            self._log(rel, rid, "chat" if chat else "completion", prompt_text, seq, "".join(pieces))
            if error is not None:
                raise ApiError(500, error, "generation_failed")
            if seq.client_gone:
                return  # nobody to answer
            text = "".join(pieces)
            usage = _usage(seq)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": seq.finish} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": seq.finish})
            body = dict(base, object="chat.completion" if chat else "text_completion", choices=[choice], usage=usage)
            return await _reply(send, 200, _dump(body))
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})

        async def event(doc) -> None:
            await send({"type": "http.response.body", "body": b"data: " + _dump(doc) + b"\n\n", "more_body": True})

        extra = {"usage": None} if usage_chunk else {}
        if chat:
            await event(dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], **extra))
        # every content chunk is the same JSON but for the piece: encoded once, the piece put in between
        ch = ({"index": 0, "delta": {"content": _PIECE}, "logprobs": None, "finish_reason": None} if chat else
              {"index": 0, "text": _PIECE, "logprobs": None, "finish_reason": None})
        head, tail = (b"data: " + _dump(dict(base, choices=[ch], **extra)) + b"\n\n").split(_dump(_PIECE))
        pieces = []
        error = None
        async for batch in self._batches(receive, rel, seq, q):
            out = []
            for kind, v in batch:
                if kind == "text":
                    pieces.append(v)
                    out.append(head + _dump(v) + tail)
                elif kind == "error":
                    error = v
            if out:
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
        self._log(rel, rid, "chat" if chat else "completion", prompt_text, seq, "".join(pieces))
        if seq.client_gone:
            return await send({"type": "http.response.body", "body": b"", "more_body": False})
        if error is not None:  # the status is sent: the error travels as an event, as OpenAI's API does
            self.metrics.failures.inc(model=entry.name, code="500")
            await event({"error": {"message": error, "type": "server_error", "param": None,
                                   "code": "generation_failed"}})
        else:
            ch = ({"index": 0, "delta": {}, "logprobs": None, "finish_reason": seq.finish} if chat else
                  {"index": 0, "text": "", "logprobs": None, "finish_reason": seq.finish})
            await event(dict(base, choices=[ch], **extra))
            if usage_chunk:
                await event(dict(base, choices=[], usage=_usage(seq)))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _generate(self, scope, receive, send, entry: LLMEntry, version: Optional[str], stream: bool) -> None:
        """Triton's generate extension: {"text_input", "parameters": {...}} (or the fields at the top level).
        The release is chosen once the body is in (a swap during its read is seen), and that one release answers
        the version pin, encodes the text and generates."""
        doc = _json_body(await self._read_body(scope, receive))
        rel = entry.active
        if rel is None:
            raise ApiError(503, f"model '{entry.name}' is not ready", "model_not_ready")
        if version is not None and not rel.matches(version):
            raise ApiError(404, f"model '{entry.name}' has no version '{version[:64]}' being served "
                                f"(serving {rel.version})")
        text = doc.get("text_input")
        if not isinstance(text, str):
            raise ApiError(400, "'text_input' (a string) is required")
        params_doc = dict(doc)
        extra = doc.get("parameters")
        if extra is not None:
            if not isinstance(extra, dict):
                raise ApiError(400, "'parameters' must be an object")
            params_doc.update(extra)
        if "stop" not in params_doc and "stop_words" in params_doc:
            params_doc["stop"] = params_doc["stop_words"]
        params = sampling_from(dict(params_doc, temperature=params_doc.get("temperature", 0.0)), 16)
        rid = "gen-" + uuid.uuid4().hex[:24]
        rel, seq, q = self._start(entry, lambda r: r.tokenizer.encode(text), params, rid, stream=stream, rel=rel,
                                  chars=len(text), pinned=version not in (None, "", "current"))
        head = {"model_name": entry.name, "model_version": rel.version}
        if doc.get("id") is not None:
            head["id"] = str(doc["id"])
        if not stream:
            pieces, error = [], None
            async for kind, v in self._events(receive, rel, seq, q):
                if kind == "text":
                    pieces.append(v)
                elif kind == "error":
                    error = v
            self._log(rel, rid, "generate", text, seq, "".join(pieces))
            if error is not None:
                raise ApiError(500, error)
            if seq.client_gone:
                return
            return await _reply(send, 200, _dump(dict(head, text_output="".join(pieces), finish_reason=seq.finish,
                                                      usage=_usage(seq))))
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        pieces = []
        async for kind, v in self._events(receive, rel, seq, q):
            if kind == "text":
                pieces.append(v)
                body = dict(head, text_output=v)
            elif kind == "error":
                body = {"error": v}
            else:
                body = dict(head, text_output="", finish_reason=seq.finish, usage=_usage(seq))
            if seq.client_gone:
                break
            await send({"type": "http.response.body", "body": b"data: " + _dump(body) + b"\n\n", "more_body": True})
        self._log(rel, rid, "generate_stream", text, seq, "".join(pieces))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _usage(seq) -> Dict[str, int]:
    return {"prompt_tokens": seq.prompt_tokens, "completion_tokens": seq.completion_tokens,
            "total_tokens": seq.prompt_tokens + seq.completion_tokens}


def _method(got: str, want: str) -> None:
    if got != want:
        raise ApiError(405, f"method {got} is not allowed here (use {want})", "method_not_allowed")


def _json_body(raw: bytes) -> Dict[str, Any]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
    except RecursionError:   # [[[[... a thousand deep: the parser's recursion limit, not a 500
        raise ApiError(400, "the request body is not valid JSON (nested too deeply)", "invalid_json") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    return doc


async def _reply(send, status: int, body: bytes, headers: Optional[List[Tuple[bytes, bytes]]] = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": (headers or _JSON) + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _wait_disconnect(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
