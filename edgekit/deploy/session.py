"""A device session: the edgekit runtime on the device, and calls into it (JSON back).

The device side is `python -m edgekit.runtime ...` from <root>/runtime, pushed by
`edgekit device setup` (and on demand by deploy/profile when missing or stale).
"""

from __future__ import annotations

import json
import posixpath
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from edgekit.deploy import protocol, transfer
from edgekit.deploy.artifact import Artifact
from edgekit.deploy.connection import Connection
from edgekit.errors import BundleError, DeviceError
from edgekit.runtime.files import PKG, runtime_digest, runtime_files

INSTALL_HINTS = {
    "tflite": "pip install ai-edge-litert  (or, on numpy<2 images: pip install tflite-runtime==2.14.0)",
    "onnx": "pip install onnxruntime  (onnxruntime-gpu on a Jetson, from NVIDIA's builds)",
}


class DeviceSession:
    """One connected device's edgekit: its runtime, and a method per device command with a typed result."""

    def __init__(self, conn: Connection, *, debug: bool = False, timeout: Optional[float] = None):
        self.conn = conn
        self.device = conn.device
        self.root = conn.path(self.device.root).rstrip("/")
        self.debug = debug
        self.timeout = timeout            # at most this long for any one device command
        self._facts: Optional[protocol.Facts] = None
        self._backends: Optional[Dict[str, protocol.Backend]] = None

    def err(self, message: str, hint: Optional[str] = None) -> DeviceError:
        return self.conn._err(message, hint)

    # -- files ---------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        sftp = self.conn.sftp
        parts, cur = path.strip("/").split("/"), ""
        for p in parts:
            cur += "/" + p
            try:
                st = sftp.stat(cur)
                if not stat.S_ISDIR(st.st_mode):
                    raise self.err(f"{cur} exists and is not a directory")
            except FileNotFoundError:
                try:
                    sftp.mkdir(cur)
                except OSError as e:
                    raise self.err(f"cannot create {cur}: {e}") from None

    def put_files(self, files: List[Tuple[Path, str]], tick: Optional[Callable[[int, int], None]] = None) -> int:
        """Upload (local path, remote path) pairs with pipelined SFTP writes; bytes sent."""
        total = sum(f.stat().st_size for f, _ in files)
        done = 0
        sftp = self.conn.sftp
        if self.timeout is not None:  # a device that stops answering fails the upload after this long
            sftp.get_channel().settimeout(self.timeout)
        for local, remote in files:
            self.makedirs(posixpath.dirname(remote))
            base = done

            def cb(sent, _size, base=base):
                if tick:
                    tick(base + sent, total)

            try:
                with open(local, "rb") as fl, sftp.open(remote, "wb", bufsize=0) as fr:
                    fr.set_pipelined(True)
                    sent = 0
                    while True:
                        chunk = fl.read(1 << 20)
                        if not chunk:
                            break
                        fr.write(chunk)
                        sent += len(chunk)
                        cb(sent, None)
                if sftp.stat(remote).st_size != local.stat().st_size:
                    raise OSError(f"size mismatch after upload of {remote}")
            except (OSError, EOFError) as e:
                raise self._upload_error(e, remote, total) from None
            done += local.stat().st_size
        if tick and not files:
            tick(0, 0)
        return total

    def _upload_error(self, e: Exception, remote: str, total: int) -> DeviceError:
        free = None
        try:
            free = self.status().free_bytes
        except DeviceError:
            pass
        if free is not None and free < total:
            return self.err(f"no space left under {self.root}: {free / 1e6:.1f} MB free, the upload "
                            f"needs {total / 1e6:.1f} MB", hint="free space on the device or set another root")
        return self.err(f"upload of {remote} failed: {type(e).__name__}: {e or 'connection lost'}",
                        hint="check the device and deploy again (nothing was switched)")

    # -- runtime ---------------------------------------------------------------
    def runtime_status(self) -> Optional[str]:
        try:
            with self.conn.sftp.open(f"{self.root}/runtime/VERSION") as f:
                return f.read().decode().strip()
        except (FileNotFoundError, OSError):
            return None

    def ensure_runtime(self, force: bool = False) -> bool:
        """Push the runtime if missing or different; True when it was pushed."""
        digest = runtime_digest()
        if not force and self.runtime_status() == digest:
            return False
        tag = uuid.uuid4().hex[:8]
        new = f"{self.root}/.runtime-{tag}"
        files = [(PKG / rel, f"{new}/edgekit/{rel}") for rel in runtime_files()]
        self.makedirs(self.root)
        self.put_files(files)
        with self.conn.sftp.open(f"{new}/VERSION", "w") as f:
            f.write(digest + "\n")
        # swap directories: rename the old away, the new into place, remove the old
        old = f"{self.root}/.runtime-old-{tag}"
        rc, _, err = self.conn.run(["sh", "-c", 'if [ -e "$1" ]; then mv "$1" "$2"; fi; mv "$3" "$1" && rm -rf "$2"',
                                    "sh", f"{self.root}/runtime", old, new])
        if rc != 0:
            raise self.err(f"cannot install the runtime under {self.root}: {err.strip()}")
        return True

    def call(self, *args: str, timeout: float = 600.0) -> Dict[str, Any]:
        """python -m edgekit.runtime ARGS on the device; its JSON answer, or a clear DeviceError
        (with `debug`, the device's traceback is part of it)."""
        py = self.device.python
        words = list(args)
        if self.debug:
            words.insert(0, "--debug")
        rc, out, err = self.conn.run(protocol.argv(py, *words), env=protocol.env(self.root), cwd="/",
                                     timeout=timeout if self.timeout is None else min(timeout, self.timeout))
        return self._answer(rc, out, err)

    def run_python(self, code: str, *args: str, timeout: float = 600.0) -> Dict[str, Any]:
        """python -c CODE ARGS on the device (the pushed runtime importable); its JSON answer."""
        rc, out, err = self.conn.run([self.device.python, "-c", code, *args], env=protocol.env(self.root), cwd="/",
                                     timeout=timeout if self.timeout is None else min(timeout, self.timeout))
        return self._answer(rc, out, err)

    def _answer(self, rc: int, out: str, err: str) -> Dict[str, Any]:
        py = self.device.python
        if rc == 127:
            raise self.err(f"'{py}' not found on the device",
                           hint="install python3 there, or set python = \"/path/to/python\" in the inventory")
        if "No module named 'numpy'" in err:
            raise self.err(f"numpy is not installed for {py} on the device", hint=f"{py} -m pip install numpy")
        if rc not in (0, 1) or (self.debug and rc != 0 and "Traceback (most recent call last)" in err):
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            msg = next((ln[len("error: "):] for ln in reversed(lines) if ln.startswith("error: ")),
                       lines[-1] if lines else f"exit status {rc}")
            if self.debug and "Traceback (most recent call last)" in err:   # --debug: the device's own traceback
                msg += "\ndevice traceback:\n" + err[err.index("Traceback (most recent call last)"):].strip()
            raise self.err(msg)
        try:
            return json.loads(out)
        except ValueError:
            pass
        try:  # anything a backend printed before the answer: the answer is the last line
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise self.err(f"unexpected answer from the device runtime: {out[-300:]!r} {err[-300:]!r}") from None

    # -- the typed calls (one per device command) ---------------------------------
    def facts(self) -> protocol.Facts:
        if self._facts is None:
            self._facts = protocol.Facts.parse(self.call("facts"))
            self._backends = self._facts.backends
        return self._facts

    def backends(self) -> Dict[str, protocol.Backend]:
        """Installed backends, from the last status call (cheap) or the full facts."""
        if self._backends is None:
            self._backends = self.facts().backends
        return self._backends

    def _release(self, action: str, **kw) -> Dict[str, Any]:
        return self.call(*protocol.release_args(action, self.root, **kw))

    def status(self, name: Optional[str] = None, *, clean_incoming: bool = False,
               health: bool = False) -> protocol.DeviceStatus:
        st = protocol.DeviceStatus.parse(self._release("status", name=name, health=health,
                                                       clean_incoming=clean_incoming and bool(name)))
        self._backends = st.backends
        return st

    def activate(self, name: str, sha: str, incoming: Optional[str], keep: int,
                 check: bool = True) -> protocol.Activation:
        return protocol.Activation.parse(self._release("activate", name=name, sha=sha, incoming=incoming, keep=keep,
                                                       check=check))

    def store(self, name: str, sha: str, incoming: str) -> protocol.Stored:
        return protocol.Stored.parse(self._release("store", name=name, sha=sha, incoming=incoming))

    def rollback(self, name: str, to: Optional[str] = None) -> protocol.Switch:
        return protocol.Switch.parse(self._release("rollback", name=name, to=to))

    def revert(self, name: str, sha: str, to: Optional[str]) -> protocol.Switch:
        """Put `current` back at `to` (None: no release) if it is still `sha`."""
        return protocol.Switch.parse(self._release("revert", name=name, sha=sha, to=to or "none"))

    def verify(self, name: str, sha: str) -> bool:
        """Read-only: the release directory on the device still has this sha256."""
        return bool(self._release("verify", name=name, sha=sha)["ok"])

    def bench(self, path: str, runs: int, warmup: int, threads: Optional[int] = None,
              prompt_tokens: Optional[int] = None, new_tokens: Optional[int] = None) -> Dict[str, Any]:
        """The latency report (DESIGN.md's method) of the bundle at `path` on the device; a language
        model's: TTFT, prefill and decode tok/s (`prompt_tokens` in, `new_tokens` out per run)."""
        return self.call(*protocol.bench_args(path, runs, warmup, threads, prompt_tokens, new_tokens), timeout=3600)

    def check(self, path: str) -> Dict[str, Any]:
        """`python -m edgekit.runtime check PATH --json` on the device: the golden health check (a
        language model's through LanguageModel.check()). Never raises for a failed check: a device
        error (no onnxruntime-genai, a model that does not load) is a failed result naming it."""
        try:
            return self.call(*protocol.check_args(path), timeout=1800)
        except DeviceError as e:
            if self.conn._client is None:
                raise
            return {"ok": False, "error": e.message.split(": ", 1)[-1] if e.device else str(e)}

    def release_path(self, name: str, sha: str) -> str:
        return f"{self.root}/models/{name}/releases/{sha}"

    def check_backend(self, fmt: str, preferred: Optional[str] = None) -> str:
        """The backend the device will use for `fmt` (the manifest's `preferred` one first, as
        runtime.load() does), or a clear error naming what to install."""
        b = self.backends()
        order = protocol.TFLITE_BACKENDS if fmt == "tflite" else protocol.ONNX_BACKENDS
        if preferred in order:
            order = (preferred,) + tuple(n for n in order if n != preferred)
        for name in order:
            if name in b and b[name].available:
                return f"{name} {b[name].version or ''}".strip()
        why = ", ".join(f"{n}: {b[n].error if n in b else 'absent'}" for n in order)
        raise self.err(f"no backend on the device can run a .{fmt} model ({why})",
                       hint=INSTALL_HINTS[fmt])

    def push(self, art: Artifact, ticker_for: Optional[Callable[[str], Callable[..., None]]] = None, *,
             then: str = "none",
             keep: int = 3, check: bool = True, force: bool = False,
             preflight: Optional[Callable[["transfer.StorePlan"], None]] = None) -> "Pushed":
        """Send what the device lacks of `art` into its object store (resuming an upload that
        stopped), verify and assemble the release, and `then` activate or store it there.

        `preflight(plan)` runs before any byte is sent (memory checks: raises to refuse); the disk
        check is here: refused unless `force`. `ticker_for(unit)`: the progress line's ticker
        (tick(done, total, extra)), asked for once the bytes to send are known."""
        store = transfer.Store(self, art.name)
        plan = store.plan(art, genai=art.is_llm)
        try:
            if preflight is not None:
                preflight(plan)
            need = plan.send_bytes
            if not force and need and plan.free_bytes < need * 1.05 + (1 << 16):
                raise self.err(f"no space left under {self.root}: {plan.free_bytes / 1e6:.1f} MB free, the upload "
                               f"needs {need / 1e6:.1f} MB",
                               hint="free space on the device, lower --keep, set another root, or --force to try")
            sent = self._send(store, plan, ticker_for)
            try:
                r = store.commit(art, plan, then=then, keep=keep, check=check)
            except BundleError:
                # an object did not hash right (a part damaged where the link dropped, a file changed on
                # the device): once more; commit removed the bad ones, so the new plan sends them whole
                plan = store.plan(art, genai=False)
                sent += self._send(store, plan, ticker_for)
                r = store.commit(art, plan, then=then, keep=keep, check=check)
        finally:
            store.close()      # the device's store process ends (at once when refused: nothing was sent)
        return Pushed(r["incoming"], sent, plan, r.get("result"), store, int(r.get("rehashed_bytes") or 0))

    def _send(self, store: "transfer.Store", plan: "transfer.StorePlan",
              ticker_for: Optional[Callable[[str], Callable[..., None]]]) -> int:
        tick = transfer.progress_callback(ticker_for, plan.send_bytes) if ticker_for else None
        return store.send(plan, tick, on_error=lambda e, it: self._store_error(e, it.rel, plan))

    def _store_error(self, e: Exception, rel: str, plan: "transfer.StorePlan") -> DeviceError:
        free = None
        if self.conn._client is not None:
            try:
                free = self.status().free_bytes
            except DeviceError:
                pass
        if free is not None and free < (4 << 20):
            return self.err(f"no space left under {self.root}: {free / 1e6:.1f} MB free, the upload "
                            f"needs {plan.send_bytes / 1e6:.1f} MB",
                            hint="free space on the device or set another root (the upload resumes where it stopped)")
        return self.err(f"upload of {rel} failed: {type(e).__name__}: {e or 'connection lost'}",
                        hint="check the device and deploy again: the upload resumes where it stopped, "
                             "nothing was switched")

    def upload(self, art: Artifact, free_bytes: Optional[int] = None,
               tick: Optional[Callable[..., None]] = None) -> Tuple[str, int]:
        """Upload into models/<name>/.incoming-<sha12>-<tag> (assembled from the object store);
        (incoming dir name, bytes sent). `free_bytes` is not needed any more (the plan measures it)."""
        p = self.push(art, (lambda unit: tick) if tick else None)
        return p.incoming, p.sent


@dataclass
class Pushed:
    """What push() did: the release directory it assembled, bytes sent, the plan, and the
    device's answer to `then` (activate / store), if any."""

    incoming: str
    sent: int
    plan: "transfer.StorePlan"
    result: Optional[Dict[str, Any]]
    store: "transfer.Store"
    rehashed_bytes: int = 0     # objects the device hashed again at the commit (stamp no longer matching)
