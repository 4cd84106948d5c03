"""Uploads into a device's content-addressed store: resumable, deduplicated, verified by hash.

Every bundle travels this way, a 170 KB CNN as well as a 300 MB language model:

    plan    one device command: which objects (files by sha256) the device has, which are partly
            there (an upload that stopped: a killed controller, a dropped link), free disk and memory
    send    SFTP, pipelined, each missing object into objects/.part-<sha> from where it stopped;
            a dropped connection is reopened (a few times) and the object resumed
    commit  one device command: each upload hashed and named objects/<sha>, the release assembled
            in .incoming-<sha12>-<tag>/ from hard links, then `release activate` (or store) verifies
            the whole tree and switches `current`, all in the same device process

So a release that shares files with one already on the device sends only what differs, and an
interrupted upload costs only its remainder. The device side is device_store.py.
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

from edgekit.deploy.artifact import Artifact
from edgekit.errors import BundleError, DeviceError

CHUNK = 1 << 20
RECONNECTS = 3                 # a dropped link is reopened this many times per upload
# SFTP write requests: OpenSSH's sftp-server takes messages up to 256 KiB, so 255 KiB of data per request
# (an eighth of the requests and acks paramiko handles in Python at its 32 KiB default: +8% on a 200 MB
# upload in the lab); other servers get the 32 KiB every SFTP server must take
OPENSSH_REQUEST = 255 * 1024
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


class Store:
    """One model's object store on one connected device (session: a DeviceSession)."""

    def __init__(self, session, name: str):
        self.s = session
        self.name = name
        self.mdir = f"{session.root}/models/{name}"
        self.objdir = f"{self.mdir}/objects"

    def run(self, action: str, args: Dict[str, Any], timeout: float = 3600.0) -> Dict[str, Any]:
        payload = json.dumps(args, separators=(",", ":"))
        if len(payload) > 60_000:   # beyond what one argv word may hold on every system: a file
            path = f"{self.mdir}/.store-args-{uuid.uuid4().hex[:8]}.json"
            self.s.makedirs(self.mdir)
            with self.s.conn.sftp.open(path, "w") as f:
                f.write(payload)
            payload = "@" + path
        return self.s.run_python(device_source(), action, payload, timeout=timeout)

    def plan(self, art: Artifact, genai: bool = False) -> StorePlan:
        want: Dict[str, int] = {}
        for (_, _, n), sha in zip(art.files, art.digests):
            want[sha] = n
        r = self.run("plan", {"mdir": self.mdir, "want": want, "genai": genai})
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
    def _remote_size(self, sha: str) -> int:
        try:
            return int(self.s.conn.sftp.stat(f"{self.objdir}/.part-{sha}").st_size)
        except FileNotFoundError:
            return 0

    def _send_one(self, it: Item, tick: Callable[[int], None], counter: List[int]) -> None:
        """Send it.local[it.offset:] to .part-<sha>, adding what is written to counter[0] as it
        goes (so bytes sent before a dropped link count). Raises what the link raises."""
        sftp = self.s.conn.sftp
        if self.s.timeout is not None:   # a device that stops answering fails the upload after this long
            sftp.get_channel().settimeout(self.s.timeout)
        remote = f"{self.objdir}/.part-{it.sha}"
        with open(it.local, "rb") as fl, sftp.open(remote, "r+b" if it.offset else "wb", bufsize=0) as fr:
            fr.set_pipelined(True)
            if "OpenSSH" in (self.s.conn.server_version or ""):
                fr.MAX_REQUEST_SIZE = OPENSSH_REQUEST
            if it.offset:
                fr.seek(it.offset)
                fl.seek(it.offset)
            while True:
                chunk = fl.read(CHUNK)
                if not chunk:
                    break
                fr.write(chunk)
                counter[0] += len(chunk)
                tick(counter[0])

    def send(self, plan: StorePlan, tick: Optional[Callable[[int], None]] = None,
             on_error: Optional[Callable[[Exception, Item], DeviceError]] = None) -> int:
        """Upload the plan's objects, resuming each where it stopped; a dropped connection is
        reopened up to RECONNECTS times and the object resumed from what reached the device.
        Returns the bytes written to the link (a resumed object's re-sent tail included)."""
        tick = tick or (lambda done: None)
        counter = [0]
        reconnects = 0
        self.s.makedirs(self.objdir)
        tick(0)
        for it in plan.items:
            while True:
                try:
                    self._send_one(it, tick, counter)
                    break
                except _LOST as e:
                    if reconnects >= RECONNECTS or not self._reconnect(reconnects):
                        raise (on_error(e, it) if on_error else e) from None
                    reconnects += 1
                    try:
                        it.offset = min(self._remote_size(it.sha), it.size)
                    except _LOST as e2:
                        raise (on_error(e2, it) if on_error else e2) from None
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
        r = self.run("commit", args)
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
