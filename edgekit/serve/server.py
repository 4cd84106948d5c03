"""ServeConfig (validated) and serve(): load the models, then run the ASGI app under uvicorn.

uvicorn is imported here only (the `serve` extra); the rest of edgekit.serve is standard library
and numpy, like edgekit.runtime.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from edgekit.serve.engine import Engine
from edgekit.serve.metrics import Metrics
from edgekit.serve.models import ModelEntry, discover
from edgekit.serve.pidfile import ServeError, remove_pid, state, stop, write_pid  # noqa: F401 (re-exported)

log = logging.getLogger("edgekit.serve")

TOKEN_ENV = "EDGEKIT_SERVE_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    token: Optional[str] = None
    insecure: bool = False
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    max_concurrency: int = 1
    max_queue: int = 64
    max_batch: int = 1
    max_delay_ms: float = 2.0
    inline_ms: float = 2.0
    max_body_mb: float = 64.0
    threads: Optional[int] = None
    backend: Optional[str] = None
    poll_interval: float = 1.0
    check: bool = True
    pid_file: Optional[str] = None
    access_log: bool = False
    http: str = "auto"   # uvicorn's HTTP parser: auto (httptools when installed, else h11), h11, httptools
    # language models (the OpenAI-compatible API): sequences decoded together, their KV-cache budget, logging
    max_sequences: int = 8
    kv_cache_mb: Optional[float] = None   # None: every slot can hold the whole context
    log_prompts: bool = False
    # a stream's pieces written at most this often (faster ones gathered); None: auto (openai_api)
    stream_interval_ms: Optional[float] = None   # None: auto (openai_api.auto_stream_interval_ms)

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ServeError(f"--port {self.port} is not a TCP port (0-65535)")
        if not is_loopback(self.host) and not self.token and not self.insecure:
            raise ServeError(f"--host {self.host} opens the API beyond this machine without a token",
                             hint=f"pass --token (or set {TOKEN_ENV}) so clients must send "
                                  "'Authorization: Bearer <token>', or --insecure to allow anyone")
        if self.token is not None and len(self.token) < 16:
            raise ServeError("the token is shorter than 16 characters",
                             hint="use a long random one, e.g. python3 -c 'import secrets; "
                                  "print(secrets.token_urlsafe(32))'")
        if self.http not in ("auto", "h11", "httptools"):
            raise ServeError(f"--http {self.http!r} is not auto, h11 or httptools")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ServeError("--tls-cert and --tls-key go together")
        for f in (self.tls_cert, self.tls_key):
            if f and not Path(f).is_file():
                raise ServeError(f"TLS file not found: {f}")
        for opt, v, lo in (("--max-concurrency", self.max_concurrency, 1), ("--max-queue", self.max_queue, 0),
                           ("--max-batch", self.max_batch, 1), ("--max-sequences", self.max_sequences, 1)):
            if v < lo:
                raise ServeError(f"{opt} must be at least {lo} (got {v})")
        if self.stream_interval_ms is not None and not 0 <= self.stream_interval_ms <= 1000:
            raise ServeError(f"--stream-interval-ms must be between 0 and 1000 (got {self.stream_interval_ms})")
        if self.kv_cache_mb is not None and self.kv_cache_mb <= 0:
            raise ServeError(f"--kv-cache-mb must be > 0 (got {self.kv_cache_mb})")
        if min(self.max_delay_ms, self.inline_ms) < 0 or min(self.max_body_mb, self.poll_interval) <= 0:
            raise ServeError("--max-delay-ms and --inline-ms must be >= 0, --max-body-mb and the poll "
                             "interval > 0")

    @property
    def max_body(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    @property
    def load_kwargs(self):
        return {"instances": self.max_concurrency, "threads": self.threads, "backend": self.backend,
                "check": self.check}

    def llm_kwargs(self, metrics) -> dict:
        """For a language model's release (runtime.llm_batch.load_llm_release)."""
        return {"threads": self.threads, "check": self.check, "max_sequences": self.max_sequences,
                "max_queue": self.max_queue, "kv_cache_mb": self.kv_cache_mb, "metrics": metrics}


def http_parser(choice: str = "auto") -> str:
    """The HTTP/1.1 parser uvicorn will use: httptools when asked or installed (auto), else h11."""
    if choice != "auto":
        return choice
    import importlib.util

    return "httptools" if importlib.util.find_spec("httptools") else "h11"


def build(paths: List[str], config: ServeConfig) -> Tuple["object", List[ModelEntry]]:
    """Load every model (golden-checked) and make the ASGI app. A model whose release fails
    comes up not ready (a deployed model may get a good release later); a bundle or file given
    directly that fails is an error."""
    from edgekit.serve.app import App
    from edgekit.serve.llm_entry import LLMEntry, is_llm_path

    entries, llms = [], []
    metrics = Metrics()
    for src in discover(paths):
        here = src.resolve()
        llm = is_llm_path(here) if here is not None else src.kind == "deployed" and any(
            is_llm_path(r) for r in sorted((src.path / "releases").glob("*")) if r.is_dir())  # no current yet
        e = LLMEntry(src) if llm else ModelEntry(src)
        ok = e.try_load(src.resolve(), **(config.llm_kwargs(metrics) if llm else config.load_kwargs))
        if not ok and src.kind != "deployed":
            raise ServeError(f"cannot serve {src.path}: {e.failure['error']}")
        (llms if llm else entries).append(e)
    engine = Engine(max_concurrency=config.max_concurrency, max_queue=config.max_queue,
                    max_batch=config.max_batch, max_delay_ms=config.max_delay_ms, metrics=metrics,
                    inline_ms=config.inline_ms)
    app = App(entries, engine, metrics, token=config.token, max_body=config.max_body,
              poll_interval=config.poll_interval, load_kwargs=config.load_kwargs, llm_entries=llms,
              llm_kwargs=config.llm_kwargs(metrics), log_prompts=config.log_prompts,
              stream_interval_ms=config.stream_interval_ms)
    return app, entries + llms


def bind(host: str, port: int) -> List[socket.socket]:
    """Bind host:port as uvicorn would (asyncio's create_server): a socket for each address the host
    resolves to ('' or None: every interface), SO_REUSEADDR, an IPv6 socket for IPv6 only; an address whose
    family this machine cannot open a socket of (IPv6 disabled in the kernel) skipped; with port 0 one free
    port for them all. Bound, not yet listening (a client is refused until the server is up),
    yet a server already listening there is found now, before any model is loaded."""
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: cannot resolve it ({e.strerror})",
                         hint="give an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    seen, addrs = set(), []
    for af, _, proto, _, sa in infos:
        if (af, sa) not in seen:
            seen.add((af, sa))
            addrs.append((af, proto, sa))
    for attempt in range(8):  # port 0: the port the first address got may be taken on another one
        socks: List[socket.socket] = []
        want = port
        no_family: Optional[OSError] = None
        try:
            for af, proto, sa in addrs:
                try:
                    s = socket.socket(af, socket.SOCK_STREAM, proto)
                except OSError as e:   # a family this machine lacks (IPv6 disabled: EAFNOSUPPORT): skipped, as
                    no_family = e      # asyncio's create_server skips it; the host's other addresses are served
                    continue
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if af == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((sa[0], want) + tuple(sa[2:]))
                want = s.getsockname()[1]
            if not socks:      # not one of the host's addresses has a socket here
                raise no_family or OSError(errno.EADDRNOTAVAIL, "no address")
            return socks
        except OSError as e:
            for s in socks:
                s.close()
            if port == 0 and e.errno == errno.EADDRINUSE and attempt < 7:
                continue
            raise _listen_error(host, port, e) from None
    raise AssertionError("unreachable")


def _listen_error(host: str, port: int, e: OSError) -> ServeError:
    if e.errno == errno.EADDRINUSE:
        return ServeError(f"port {port} on {host} is in use by another program",
                          hint="choose another with --port, or stop the server there first: "
                               "edgekit serve --stop --pid-file FILE for one of ours")
    if e.errno == errno.EACCES:
        return ServeError(f"port {port} on {host} needs privileges this user does not have",
                          hint="choose a port of 1024 or more with --port")
    if e.errno == errno.EADDRNOTAVAIL:
        return ServeError(f"--host {host} is not an address of this machine",
                          hint="give one of its addresses, 127.0.0.1 or 0.0.0.0")
    if e.errno == errno.EAFNOSUPPORT:   # every address the host resolves to is of a family this machine lacks
        return ServeError(f"--host {host}: this machine cannot open a socket for its addresses ({e.strerror})",
                          hint="IPv6 may be disabled here: give an IPv4 address, 127.0.0.1 or 0.0.0.0")
    return ServeError(f"cannot listen on {host}:{port} ({e.strerror or e})")


def serve(paths: List[str], config: ServeConfig, say=print) -> None:
    """Run until SIGINT/SIGTERM."""
    try:
        import uvicorn
    except ImportError:
        raise ServeError("uvicorn is not installed", hint="pip install 'edgekit[serve]'") from None
    scheme = "https" if config.tls_cert else "http"
    socks = bind(config.host, config.port)  # first: a port in use is refused before a model is loaded
    port = socks[0].getsockname()[1]       # the port bound (--port 0: the one the system chose)
    try:
        if config.pid_file:  # then: a supervisor sees the server running while its models load
            write_pid(config.pid_file, {
                "host": config.host, "port": port, "url": f"{scheme}://{config.host}:{port}/v2",
                "auth": "bearer" if config.token else "none", "models": []})
        app, entries = build(paths, config)
        ucfg = uvicorn.Config(app, host=config.host, port=port, http=config.http, loop="auto",
                              lifespan="on", access_log=config.access_log, log_level="warning",
                              server_header=False, date_header=False, timeout_keep_alive=30,
                              # connections beyond what the queue can hold get uvicorn's plain 503
                              limit_concurrency=config.max_concurrency * config.max_batch + config.max_queue
                              + config.max_sequences + 64,
                              ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key)
        server = uvicorn.Server(ucfg)
        for s in socks:  # a server that bound beside ours while the models loaded may have listened first
            try:
                s.listen(ucfg.backlog)
            except OSError as e:
                raise _listen_error(config.host, port, e) from None
        for e in entries:
            a = e.active
            say(f"model {e.name}: " + (f"version {a.version} ({a.backend} {a.backend_version}, {a.format})"
                                       if a else f"NOT READY: {(e.failure or {}).get('error')}")
                + (f"; language model: /v1/chat/completions, /v1/completions, /v2/models/{e.name}/generate "
                   f"(context {a.context}, up to {a.engine.max_sequences} sequences decoded together)"
                   if a is not None and getattr(e, "kind", None) == "llm" else ""))
        say(f"serving on {scheme}://{config.host}:{port}/v2 "
            f"(auth: {'bearer token' if config.token else 'none'}; HTTP parser {http_parser(config.http)}; "
            f"max concurrency {config.max_concurrency}, "
            f"queue {config.max_queue}" + (f", batching up to {config.max_batch} within {config.max_delay_ms} ms"
                                           if config.max_batch > 1 else "") + ")")
        if config.pid_file:
            write_pid(config.pid_file, {
                "host": config.host, "port": port, "url": f"{scheme}://{config.host}:{port}/v2",
                "auth": "bearer" if config.token else "none", "models": [e.name for e in entries]})
        server.run(sockets=socks)  # uvicorn serves on the sockets bound above
    finally:
        if config.pid_file:  # only when it is still this server's
            remove_pid(Path(config.pid_file), os.getpid())
        for s in socks:
            s.close()
