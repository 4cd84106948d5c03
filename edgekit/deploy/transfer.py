"""Uploads into a device's content-addressed store: resumable, deduplicated, verified by hash.

Every bundle travels this way, a 170 KB CNN as well as a 300 MB language model:

One device process (device_store.py `session`, started over SSH) does all of it:

    plan    which objects (files by sha256) the device has, which are partly there (an upload that
            stopped: a killed controller, a dropped link), free disk and memory
    send    each missing object down the process's standard input, from where it stopped, into
            objects/.part-<sha>; the device hashes it as it arrives and names it objects/<sha> when the
            digest matches; a dropped connection is reopened (a few times), a new process started and
            the object resumed (what reached the device is hashed from its disk first)
    commit  the release assembled in .incoming-<sha12>-<tag>/ from hard links to the objects, then
            `release activate` (or store) checks it against the release id, computed from the
            verified objects' digests (nothing is read twice), and switches `current`

So each byte crosses the link once and is hashed once on the device, a release that shares files
with one already there sends only what differs, and an interrupted upload costs only its remainder.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import paramiko

from edgekit.deploy import protocol
from edgekit.deploy.artifact import Artifact
from edgekit.errors import BundleError, DeviceError

CHUNK = 1 << 20
RECONNECTS = 3                 # a dropped link is reopened this many times per upload
_SOURCE: Optional[str] = None


def device_source() -> str:
    """The device side's program (device_store.py), run with `python -c`."""
    global _SOURCE
    if _SOURCE is None:
        _SOURCE = (Path(__file__).with_name("device_store.py")).read_text(encoding="utf-8")
    return _SOURCE


def human(n: float) -> str:
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n:.0f} B"


class Meter:
    """Rate (over the last few seconds) and time left of a transfer, for the progress line."""

    def __init__(self, total: int, window: float = 3.0):
        self.total, self.window = total, window
        self.t0 = time.monotonic()
        self.points: List[Tuple[float, int]] = [(self.t0, 0)]

    def update(self, done: int) -> str:
        now = time.monotonic()
        self.points.append((now, done))
        while len(self.points) > 2 and now - self.points[0][0] > self.window:
            self.points.pop(0)
        t, d = self.points[0]
        rate = (done - d) / (now - t) if now > t else 0.0
        if done >= self.total:
            el = now - self.t0
            return f"{human(self.total / el if el > 0 else 0)}/s, {el:.1f} s"
        if rate <= 0:
            return "-- MB/s, ETA --"
        left = (self.total - done) / rate
        return f"{human(rate)}/s, ETA {int(left) // 60}:{int(left) % 60:02d}"


def progress_callback(ticker_for: Callable[[str], Callable[..., None]], total: int) -> Callable[[int], None]:
    """done bytes -> a progress line 'done/total MB rate, ETA' (kB under 10 MB). `ticker_for(unit)`
    gives the line's ticker (Progress.ticker with a label), called once the total is known."""
    meter = Meter(total)
    k, unit = (1_000_000, "MB") if total >= 10_000_000 else (1_000, "kB")
    ticker = ticker_for(f" {unit}")

    def tick(done: int) -> None:
        done = min(done, total)     # a tail re-sent after a dropped link does not push past 100%
        ticker(done // k, total // k, meter.update(done))

    return tick


@dataclass
class Item:
    """One object to send: a local file and where its upload stands on the device."""

    local: Path
    rel: str
    sha: str
    size: int
    offset: int = 0


@dataclass
class StorePlan:
    have: Set[str]
    partial: Dict[str, int]
    items: List[Item]
    free_bytes: int
    mem_available: Optional[int]
    mem_total: Optional[int]
    genai: Optional[Dict[str, Any]] = None
    damaged: List[str] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def send_bytes(self) -> int:
        return sum(i.size - i.offset for i in self.items)

    @property
    def resumed_bytes(self) -> int:
        return sum(i.offset for i in self.items)


_LOST = (OSError, EOFError, socket.timeout, paramiko.SSHException)


class _Process:
    """The device's store process (device_store.py `session`): JSON lines both ways, objects as raw
    bytes after their request."""

    def __init__(self, store: "Store", payload: str):
        s = store.s
        self.s = s
        self.chan = s.conn.start([s.device.python, "-c", device_source(), "session", payload],
                                 env=protocol.env(s.root), cwd="/", timeout=s.timeout)
        self.out = self.chan.makefile("rb", -1)

    def answer(self) -> Dict[str, Any]:
        line = self.out.readline()
        if not line:                 # the process ended: its exit status and error line say why
            rc = self.chan.recv_exit_status()
            if rc == -1:             # no exit status: the link went down
                raise EOFError("the connection was lost")
            err = self.chan.makefile_stderr("rb", -1).read().decode("utf-8", "replace")
            self.close()
            if rc not in (0, 1):
                self.s._answer(rc, "", err)      # raises: python missing, the device's error line
            raise self.s.err("the device's store process ended without an answer"
                             + (f": {err.strip().splitlines()[-1]}" if err.strip() else ""))
        r = json.loads(line)
        if "error" in r:
            raise self.s.err(r["error"])
        return r

    def ask(self, op: str, args: Dict[str, Any]) -> Dict[str, Any]:
        self.chan.sendall(json.dumps(dict(args, op=op), separators=(",", ":")).encode() + b"\n")
        return self.answer()

    def close(self) -> None:
        try:
            self.chan.shutdown_write()
        except _LOST:
            pass
        self.chan.close()


class Store:
    """One model's object store on one connected device (session: a DeviceSession)."""

    def __init__(self, session, name: str):
        self.s = session
        self.name = name
        self.mdir = f"{session.root}/models/{name}"
        self.objdir = f"{self.mdir}/objects"
        self._proc: Optional[_Process] = None
        self._plan_args: Dict[str, Any] = {}

    def _payload(self, args: Dict[str, Any]) -> str:
        payload = json.dumps(args, separators=(",", ":"))
        if len(payload) > 60_000:   # beyond what one argv word may hold on every system: a file
            path = f"{self.mdir}/.store-args-{uuid.uuid4().hex[:8]}.json"
            self.s.makedirs(self.mdir)
            with self.s.conn.sftp.open(path, "w") as f:
                f.write(payload)
            payload = "@" + path
        return payload

    def run(self, action: str, args: Dict[str, Any], timeout: float = 3600.0) -> Dict[str, Any]:
        """One action in a device process of its own (gc)."""
        return self.s.run_python(device_source(), action, self._payload(args), timeout=timeout)

    def _start(self) -> Dict[str, Any]:
        """Start the device's store process; its first answer is the plan."""
        self.close()
        self._proc = _Process(self, self._payload(self._plan_args))
        return self._proc.answer()

    def close(self) -> None:
        """End the device's store process (it exits at the end of its input)."""
        if self._proc is not None:
            self._proc.close()
            self._proc = None

    def plan(self, art: Artifact, genai: bool = False) -> StorePlan:
        want: Dict[str, int] = {}
        for (_, _, n), sha in zip(art.files, art.digests):
            want[sha] = n
        self._plan_args = {"mdir": self.mdir, "want": want, "genai": genai}
        r = self._start()
        have, partial = set(r["have"]), {k: int(v) for k, v in r["partial"].items()}
        items, seen = [], set()
        for (p, rel, n), sha in zip(art.files, art.digests):
            if sha in have or sha in seen:
                continue
            seen.add(sha)
            items.append(Item(p, rel, sha, n, partial.get(sha, 0)))
        return StorePlan(have, partial, items, int(r["free_bytes"]), r.get("mem_available"), r.get("mem_total"),
                         r.get("genai"), list(r.get("damaged", [])), r)

    # -- sending ---------------------------------------------------------------------------------
    def _send_one(self, it: Item, tick: Callable[[int], None], counter: List[int]) -> None:
        """Send it.local[it.offset:] down the store process's input, adding what is written to
        counter[0] as it goes (so bytes sent before a dropped link count). Raises what the link raises."""
        chan = self._proc.chan
        head = json.dumps({"op": "put", "sha": it.sha, "size": it.size, "offset": it.offset})
        chan.sendall(head.encode() + b"\n")
        buf = memoryview(bytearray(CHUNK))
        with open(it.local, "rb") as fl:
            fl.seek(it.offset)
            left = it.size - it.offset
            while left:
                n = fl.readinto(buf[:min(CHUNK, left)])
                if not n:
                    raise BundleError(f"{it.local} changed while it was uploaded (shorter than {it.size} bytes)",
                                      hint="build the bundle again, then deploy")
                # a memoryview: paramiko's sendall slices what is left after each packet (bytes would be
                # copied each time: the rest of the chunk, ~30 times per MiB)
                chan.sendall(buf[:n])
                left -= n
                counter[0] += n
                tick(counter[0])

    def send(self, plan: StorePlan, tick: Optional[Callable[[int], None]] = None,
             on_error: Optional[Callable[[Exception, Item], DeviceError]] = None) -> int:
        """Upload the plan's objects, resuming each where it stopped; a dropped connection is
        reopened up to RECONNECTS times, the store process started again and the object resumed
        from what reached the device. Returns the bytes written to the link (a resumed object's
        re-sent tail included). The device's answers (one per object) are read at the end."""
        tick = tick or (lambda done: None)
        counter = [0]
        reconnects = 0
        tick(0)
        pending = 0
        i = 0
        while i < len(plan.items):
            it = plan.items[i]
            try:
                if self._proc is None:
                    raise EOFError("no store process")
                self._send_one(it, tick, counter)
                pending += 1
                i += 1
                if i < len(plan.items):
                    continue
                for _ in range(pending):       # every object's answer: ok, or its digest when it differs
                    r = self._proc.answer()
                    if "bad" in r:
                        plan.raw.setdefault("bad", {})[r["sha"]] = r["bad"]
                pending = 0
            except _LOST as e:
                if reconnects >= RECONNECTS or not self._reconnect(reconnects):
                    raise (on_error(e, it) if on_error else e) from None
                reconnects += 1
                try:
                    r = self._start()        # what reached the device: objects done, and where each part stands
                except (DeviceError,) + _LOST as e2:
                    raise (on_error(e2, it) if on_error else e2) from None
                done, partial = set(r["have"]), {k: int(v) for k, v in r["partial"].items()}
                rest = [x for x in plan.items if x.sha not in done]
                for x in rest:
                    x.offset = min(partial.get(x.sha, 0), x.size)
                plan.items[:] = [x for x in plan.items[:i] if x.sha in done] + rest
                i = len(plan.items) - len(rest)
                pending = 0
        return counter[0]

    def _reconnect(self, attempt: int) -> bool:
        """Reopen the connection (a few tries, backing off); False when the device stays away."""
        conn = self.s.conn
        conn.close()
        for k in range(3):
            time.sleep(min(4.0, 0.5 * 2 ** (attempt + k)))
            try:
                conn.open()
                return True
            except DeviceError:
                continue
        return False

    # -- committing ------------------------------------------------------------------------------
    def commit(self, art: Artifact, plan: StorePlan, then: str = "none", keep: int = 3,
               check: bool = True) -> Dict[str, Any]:
        """Verify the uploads, name them, assemble the release and `then` activate / store it."""
        incoming = f".incoming-{art.sha256[:12]}-{uuid.uuid4().hex[:8]}"
        args = {"mdir": self.mdir, "root": self.s.root, "name": self.name, "sha": art.sha256,
                "files": art.file_digests(), "uploaded": [i.sha for i in plan.items], "incoming": incoming,
                "then": then, "keep": keep, "check": check}
        if plan.raw.get("bad"):
            self.close()
            r = {"bad": plan.raw.pop("bad")}
        else:
            if self._proc is None:
                self._start()
            try:
                r = self._proc.ask("commit", args)
            except _LOST as e:
                raise self.s.err(f"connection lost while the device assembled the release: {type(e).__name__} {e}",
                                 hint="deploy again: what was uploaded stays on the device") from None
            finally:
                self.close()
        if r["bad"]:
            rel_of = {sha: rel for rel, sha in art.file_digests().items()}
            which = ", ".join(f"{rel_of.get(s, s[:12])} (sha256 {g[:12]}… on the device)" if g != "missing"
                              else f"{rel_of.get(s, s[:12])} (missing)" for s, g in r["bad"].items())
            raise BundleError(f"upload verification failed on the device: {which}",
                              hint="the transfer was corrupted; deploy again (the bad files are sent again)")
        return r

    def gc(self, keep: Optional[int], keep_objects: Tuple[str, ...] = ()) -> Dict[str, Any]:
        return self.run("gc", {"mdir": self.mdir, "keep": keep, "keep_objects": list(keep_objects)})


__all__ = ["Store", "StorePlan", "Item", "Meter", "progress_callback", "human", "device_source"]
