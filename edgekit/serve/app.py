"""The HTTP side: a plain ASGI application speaking Open Inference Protocol v2 (REST).

    GET  /v2                                          server metadata
    GET  /v2/health/live | /v2/health/ready           200, or 503 when a model is not ready
    GET  /v2/models/{name}[/versions/{v}]             model metadata (-1: dynamic dimension)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer       JSON or binary tensors
    POST /v2/repository/index                         the repository extension, read-only (repository.py)
    GET  /metrics                                     Prometheus text format

Errors are a non-200 status with {"error": "..."}. Nothing from a request reaches a shell or the
file system: a model name is validated and looked up among the models loaded at start.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from edgekit import __version__
from edgekit.bundle import check_name
from edgekit.errors import BundleError, DataError
from edgekit.serve.engine import Engine
from edgekit.serve.metrics import Metrics
from edgekit.serve.models import ModelEntry, Release
from edgekit.serve.protocol import ProtocolError, build_response, datatype_of, parse_infer
from edgekit.serve import repository

log = logging.getLogger("edgekit.serve")

_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?/?$")
_JSON = [(b"content-type", b"application/json")]


class App:
    def __init__(self, entries: List[ModelEntry], engine: Engine, metrics: Metrics, *,
                 token: Optional[str] = None, max_body: int = 64 << 20, poll_interval: float = 1.0,
                 load_kwargs: Optional[Dict[str, Any]] = None, llm_entries: Optional[list] = None,
                 llm_kwargs: Optional[Dict[str, Any]] = None, log_prompts: bool = False,
                 stream_interval_ms: Optional[float] = None):
        from edgekit.serve.openai_api import LLMApi

        llm_entries = list(llm_entries or [])
        self.entries = {e.name: e for e in list(entries) + llm_entries}
        # language models: the OpenAI-compatible API and Triton's generate (openai_api.py), same token and limits
        self.llm = LLMApi(llm_entries, metrics, read_body=self._read_body, authorized=self._authorized,
                          log_prompts=log_prompts, stream_interval_ms=stream_interval_ms)   # None: auto
        self.llm_kwargs = llm_kwargs or {}
        self.engine = engine
        self.metrics = metrics
        self._token = token.encode() if token else None
        self.max_body = max_body
        self.max_elements = max_body  # at least one byte per element arrives in any encoding
        self.poll_interval = poll_interval
        self.load_kwargs = load_kwargs or {}
        self._watch: Optional[asyncio.Task] = None
        for e in self.entries.values():
            self._record_state(e)

    # -- ASGI -----------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if self.llm.handles(scope["path"]):
            await self.llm(scope, receive, send)
            return
        status, headers, body = await self._handle(scope, receive)
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive, send):
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await self.engine.start()
                self._watch = asyncio.get_running_loop().create_task(self._follow_current())
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self._watch is not None:
                    self._watch.cancel()
                await self.engine.stop()
                for e in self.llm.entries.values():  # sequences cancelled, generation threads ended
                    await asyncio.get_running_loop().run_in_executor(None, e.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- hot swap -------------------------------------------------------------
    async def _follow_current(self) -> None:
        """Poll each deployed model's `current`; load, check and swap a new release off the loop."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll_interval)
            for e in self.entries.values():
                path = e.wants_reload()
                if path is None:
                    continue
                had = e.active is not None  # not the release itself: a retired one is freed once drained
                kw = self.llm_kwargs if getattr(e, "kind", None) == "llm" else self.load_kwargs
                ok = await loop.run_in_executor(None, lambda: e.try_load(path, **kw))
                if ok and had:
                    self.metrics.swaps.inc(model=e.name)
                elif not ok:
                    self.metrics.swap_failures.inc(model=e.name)
                self._record_state(e)

    def _record_state(self, e: ModelEntry) -> None:
        self.metrics.ready.set(1 if e.ready else 0, model=e.name)
        if e.active is not None:
            self.metrics.load_seconds.set(e.active.load_seconds, model=e.name)

    # -- requests -------------------------------------------------------------
    def _authorized(self, scope) -> bool:
        if self._token is None:
            return True
        got = b""
        for k, v in scope["headers"]:
            if k == b"authorization":
                got = v
                break
        scheme, _, cred = got.partition(b" ")
        # compare in constant time whatever was sent (a wrong scheme compares too)
        ok = hmac.compare_digest(cred.strip(), self._token)
        return ok and scheme.lower() == b"bearer"

    async def _read_body(self, scope, receive) -> bytes:
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    raise ProtocolError(400, "Content-Length is not an integer") from None
                if declared > self.max_body:
                    raise ProtocolError(413, f"request body of {declared} bytes is over the limit of "
                                             f"{self.max_body} bytes")
            elif k == b"content-encoding" and v.strip().lower() not in (b"identity", b""):
                raise ProtocolError(400, f"Content-Encoding {v.decode('latin-1')} is not supported; "
                                         "send the body uncompressed")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ProtocolError(400, "the client disconnected")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise ProtocolError(413, f"request body is over the limit of {self.max_body} bytes")
            chunks.append(chunk)
            if not msg.get("more_body"):
                return b"".join(chunks)

    async def _handle(self, scope, receive) -> Tuple[int, list, bytes]:
        path, method = scope["path"], scope["method"]
        if not self._authorized(scope):
            return 401, _JSON + [(b"www-authenticate", b'Bearer realm="edgekit"')], \
                _err("missing or wrong bearer token (send 'Authorization: Bearer <token>')")
        model = None
        t0 = time.perf_counter()
        try:
            if path == "/metrics":
                _method(method, "GET")
                return 200, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")], \
                    self.metrics.render()
            if path in ("/v2", "/v2/"):
                _method(method, "GET")
                return 200, _JSON, _dump({"name": "edgekit", "version": __version__,
                                          "extensions": ["binary_tensor_data", "model_repository"]})
            if path == "/v2/health/live":
                _method(method, "GET")
                return 200, _JSON, _dump({"live": True})
            if path == "/v2/health/ready":
                _method(method, "GET")
                bad = [n for n, e in self.entries.items() if not e.ready]
                if bad:
                    return 503, _JSON, _dump({"ready": False, "error": f"not ready: {', '.join(bad)}"})
                return 200, _JSON, _dump({"ready": True})
            if path.startswith(repository.PREFIX):
                return await self._repository(scope, receive, path, method)
            m = _MODEL_PATH.match(path)
            if not m:
                raise ProtocolError(404, f"no such endpoint: {method} {path}")
            name, version, action = m.group(1), m.group(2), m.group(3)
            entry = self._entry(name)
            if action == "/infer":
                model = name
                _method(method, "POST")
                self.metrics.requests.inc(model=name)
                return await self._infer(scope, receive, entry, version)
            _method(method, "GET")
            rel = entry.active
            if version is not None and (rel is None or not rel.matches(version)):
                raise ProtocolError(404, f"model '{name}' has no version '{version[:64]}' being served"
                                         + (f" (serving {rel.version})" if rel else ""))
            if action == "/ready":
                if rel is None:
                    return 503, _JSON, _dump({"name": name, "ready": False,
                                              "error": (entry.failure or {}).get("error", "not loaded")})
                return 200, _JSON, _dump({"name": name, "ready": True})
            return 200, _JSON, _dump(self._metadata(entry))
        except ProtocolError as e:
            if model is not None:
                self.metrics.failures.inc(model=model, code=str(e.status))
            return e.status, _JSON, _err(e.message)
        except DataError as e:
            if model is not None:
                self.metrics.failures.inc(model=model, code="400")
            return 400, _JSON, _err(str(e))
        except Exception as e:  # a backend failure while running: 500 with what it said, and logged
            log.exception("inference on model %s failed", model)
            if model is not None:
                self.metrics.failures.inc(model=model, code="500")
            return 500, _JSON, _err(f"inference failed: {type(e).__name__}: {e}")
        finally:
            if model is not None:
                self.metrics.request_latency.observe(time.perf_counter() - t0, model=model)

    async def _repository(self, scope, receive, path: str, method: str) -> Tuple[int, list, bytes]:
        if path.rstrip("/") == repository.INDEX_PATH:
            _method(method, "POST")
            ready_only = repository.parse_index_request(await self._read_body(scope, receive))
            return 200, _JSON, _dump(repository.index(self.entries.values(), ready_only=ready_only))
        m = repository.CONTROL_PATH.match(path)
        if not m:
            raise ProtocolError(404, f"no such endpoint: {method} {path}")
        _method(method, "POST")
        self._entry(m.group(1))
        raise repository.refuse_control(m.group(1), m.group(2))

    def _entry(self, name: str) -> ModelEntry:
        """The served model of a name from a request (400: not a valid name, 404: not served)."""
        try:
            check_name(name)
        except BundleError:
            raise ProtocolError(400, f"invalid model name {name[:64]!r}") from None
        entry = self.entries.get(name)
        if entry is None:
            raise ProtocolError(404, f"unknown model '{name}' (serving: {', '.join(sorted(self.entries))})")
        return entry

    def _metadata(self, entry: ModelEntry) -> Dict[str, Any]:
        rel = entry.active
        d: Dict[str, Any] = {"name": entry.name, "versions": [rel.version] if rel else [],
                             "platform": f"{rel.format}_{rel.backend}" if rel else None,
                             "inputs": [_tensor_meta(s) for s in rel.inputs] if rel else [],
                             "outputs": [_tensor_meta(s) for s in rel.outputs] if rel else [],
                             "edgekit": entry.state()}
        return d

    async def _infer(self, scope, receive, entry: ModelEntry, version: Optional[str]):
        rel = entry.active
        if rel is None:
            raise ProtocolError(503, f"model '{entry.name}' is not ready: "
                                     + (entry.failure or {}).get("error", "not loaded"))
        if version is not None and not rel.matches(version):
            raise ProtocolError(404, f"model '{entry.name}' has no version '{version[:64]}' being served "
                                     f"(serving {rel.version})")
        self.engine.check_capacity()
        body = await self._read_body(scope, receive)
        hlen = None
        for k, v in scope["headers"]:
            if k == b"inference-header-content-length":
                hlen = v.decode("latin-1")
        req = parse_infer(body, hlen, self.max_elements)
        arrays, raw = _feeds(rel, req.inputs, req.datatypes)
        outs = await self.engine.infer(entry, rel, arrays, raw)
        names = [s.name for s in rel.outputs]
        if req.outputs is None:
            wanted = [(n, req.binary_default) for n in names]
        else:
            unknown = [n for n, _ in req.outputs if n not in outs]
            if unknown:
                raise ProtocolError(400, f"unknown output '{unknown[0]}'; the model's outputs are {names}")
            wanted = req.outputs
        body, hlen_out = build_response(entry.name, rel.version, req.id,
                                        [(n, outs[n], b) for n, b in wanted])
        if hlen_out is None:
            return 200, _JSON, body
        return 200, [(b"content-type", b"application/octet-stream"),
                     (b"inference-header-content-length", str(hlen_out).encode())], body


def _method(got: str, want: str) -> None:
    if got != want:
        raise ProtocolError(405, f"method {got} is not allowed here (use {want})")


def _dump(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _err(msg: str) -> bytes:
    return _dump({"error": msg})


def _tensor_meta(s) -> Dict[str, Any]:
    d: Dict[str, Any] = {"name": s.name, "datatype": "FP32" if s.quantized else datatype_of(s.dtype),
                         "shape": [int(x) for x in s.shape]}
    if s.quantized:  # float by default; the integer tensors themselves when asked in this type
        d["parameters"] = {"raw_datatype": datatype_of(s.dtype), "scale": list(s.scale),
                           "zero_point": list(s.zero_point)}
    return d


def _feeds(rel: Release, inputs: Dict[str, np.ndarray], datatypes: Dict[str, str]
           ) -> Tuple[Dict[str, np.ndarray], bool]:
    """Check the request's tensors against the release; (arrays by input name, raw?)."""
    names = [s.name for s in rel.inputs]
    unknown = [n for n in inputs if n not in names]
    if unknown:
        raise ProtocolError(400, f"unknown input '{unknown[0]}'; the model's inputs are {names}")
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ProtocolError(400, f"missing input '{missing[0]}'; the model's inputs are {names}")
    modes = set()
    arrays: Dict[str, np.ndarray] = {}
    batch = None
    for s in rel.inputs:
        a, dt = inputs[s.name], datatypes[s.name]
        native = datatype_of(s.dtype)
        if s.quantized:
            if dt == native:
                modes.add("raw")
            elif dt == "FP32":
                modes.add("float")
            else:
                raise ProtocolError(400, f"input '{s.name}': datatype {dt} does not fit; send FP32 "
                                         f"(float) or {native} (the quantized integers)")
        elif dt != native:
            raise ProtocolError(400, f"input '{s.name}': datatype {dt} does not fit; the model takes {native}")
        if a.ndim != len(s.shape) or any(d not in (-1, g) for d, g in zip(s.shape[1:], a.shape[1:])):
            raise ProtocolError(400, f"input '{s.name}': shape {list(a.shape)} does not fit the model's "
                                     f"{list(s.shape)} (-1: any size)")
        if a.ndim == 0 or a.shape[0] == 0:
            raise ProtocolError(400, f"input '{s.name}': an empty batch")
        if batch is not None and a.shape[0] != batch:
            raise ProtocolError(400, f"input '{s.name}': batch {a.shape[0]} differs from the other inputs' {batch}")
        batch = a.shape[0]
        arrays[s.name] = a
    if len(modes) > 1:
        raise ProtocolError(400, "mixing float and raw integer tensors for the quantized inputs; send all "
                                 "as FP32, or all in their integer types")
    return arrays, modes == {"raw"}
