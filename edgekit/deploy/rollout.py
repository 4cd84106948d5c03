"""Staged rollouts: a canary, then growing batches; abort and roll back when a batch fails too much.

    plan = Plan(canary=Share.parse("1"), stages=Share.parse_list("10%,50%,100%"), max_fail=0.1)
    r = Rollout.create(plan, artifacts, devices, opts, inventory_path)
    r.run()                         # a record under rollouts_dir()/<id>.json after every step
    Rollout.resume(id, opts).run()  # after an abort (fix, then go on) or a crash of the controller

Each device runs ops.deploy (upload, verify, switch, golden check, optional p50 gate, rollback on
failure), so a rollout is idempotent per device: resuming re-runs whatever has not succeeded and
a device already at the release answers "unchanged". On abort, the devices of the failing batch
that switched are put back where they were (`release revert`, a compare-and-set on the device);
earlier batches stay unless abort_rollback="all".
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from edgekit.deploy import artifact as artifacts_mod
from edgekit.deploy import ops
from edgekit.deploy.artifact import Artifact
from edgekit.deploy.connection import DeviceUnreachable
from edgekit.deploy.fleet import DeviceResult, fan_out
from edgekit.deploy.inventory import Device, load_inventory
from edgekit.errors import EdgekitError

RECORD_VERSION = 1
SUCCESS = ("deployed", "unchanged")          # a device that needs nothing more
SWITCHED = "deployed"                         # ... and whose `current` this rollout moved


class RolloutError(EdgekitError):
    """A rollout that cannot start or resume (bad plan, unknown id, changed bundle, already running)."""

    exit_code = 2


@dataclass(frozen=True)
class Share:
    """A number of devices ("3") or a share of the fleet ("10%")."""

    count: Optional[int] = None
    percent: Optional[float] = None

    def __post_init__(self):
        if (self.count is None) == (self.percent is None):
            raise RolloutError("a share is a count or a percentage")
        if self.count is not None and self.count < 1:
            raise RolloutError(f"a device count must be at least 1 (got {self.count})")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise RolloutError(f"a percentage must be in (0, 100] (got {self.percent:g}%)")

    @classmethod
    def parse(cls, text: str, what: str = "share") -> "Share":
        t = str(text).strip()
        try:
            if t.endswith("%"):
                return cls(percent=float(t[:-1]))
            return cls(count=int(t))
        except ValueError:
            raise RolloutError(f"{what}: {text!r} is neither a count (3) nor a percentage (10%)") from None

    @classmethod
    def parse_list(cls, text: str, what: str = "--batches") -> Tuple["Share", ...]:
        return tuple(cls.parse(x, what) for x in str(text).split(",") if x.strip())

    def of(self, total: int) -> int:
        """How many of `total` devices (at least one)."""
        if self.count is not None:
            return min(self.count, total)
        return max(1, min(total, math.ceil(total * self.percent / 100 - 1e-9)))

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


@dataclass(frozen=True)
class Plan:
    """How a rollout proceeds; validated once here, saved whole in the record."""

    canary: Optional[Share] = None
    stages: Tuple[Share, ...] = ()            # cumulative shares of the fleet: 10%,50%,100%
    batch_size: Optional[Share] = None        # or fixed batches after the canary
    max_fail: float = 0.0                     # a batch aborts the rollout above this fraction failed
    offline: str = "fail"                     # an unreachable device: fail (counts) | skip (retried on resume)
    abort_rollback: str = "batch"             # on abort, revert the failing batch | all batches
    timeout: Optional[float] = None           # seconds for any one step on a device
    parallel: int = 8
    max_p50_ms: Optional[float] = None        # health gate: p50 measured on the device after the switch
    gate_runs: int = 50

    def __post_init__(self):
        if self.stages and self.batch_size:
            raise RolloutError("give --batches or --batch-size, not both")
        if self.stages:
            if any(s.percent is None for s in self.stages):
                raise RolloutError("--batches are percentages of the fleet, each larger than the last "
                                   "(10%,50%,100%); use --batch-size for a count")
            pcts = [s.percent for s in self.stages]
            if pcts != sorted(set(pcts)):
                raise RolloutError(f"--batches must grow: {','.join(map(str, self.stages))}")
            if pcts[-1] != 100:
                raise RolloutError(f"the last of --batches must be 100% (got {self.stages[-1]})")
        if not 0 <= self.max_fail <= 1:
            raise RolloutError(f"--max-fail must be between 0% and 100% (got {self.max_fail * 100:g}%)")
        if self.offline not in ("fail", "skip"):
            raise RolloutError(f"--offline must be fail or skip (got {self.offline!r})")
        if self.abort_rollback not in ("batch", "all"):
            raise RolloutError(f"--abort-rollback must be batch or all (got {self.abort_rollback!r})")
        if self.timeout is not None and not self.timeout > 0:
            raise RolloutError(f"--timeout must be above 0 seconds (got {self.timeout:g})")
        if self.parallel < 1:
            raise RolloutError(f"--parallel must be at least 1 (got {self.parallel})")
        if self.max_p50_ms is not None and not self.max_p50_ms > 0:
            raise RolloutError(f"--max-p50-ms must be above 0 (got {self.max_p50_ms:g})")

    @property
    def staged(self) -> bool:
        return bool(self.canary or self.stages or self.batch_size)

    def batches(self, names: Sequence[str]) -> List[List[str]]:
        """The devices of each batch, in inventory order: canary first, then the stages."""
        names, n, out, done = list(names), len(names), [], 0
        if self.canary and n:
            done = self.canary.of(n)
            out.append(names[:done])
        if self.batch_size:
            while done < n:
                k = self.batch_size.of(n)
                out.append(names[done:done + k])
                done += k
        for st in self.stages:
            upto = st.of(n)
            if upto > done:
                out.append(names[done:upto])
                done = upto
        if done < n:
            out.append(names[done:])
        return out

    def labels(self, count: int) -> List[str]:
        first = 1 if self.canary else 0
        return (["canary"] if self.canary else []) + [f"batch {i}" for i in range(1, count - first + 1)]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["canary"] = str(self.canary) if self.canary else None
        d["stages"] = [str(s) for s in self.stages]
        d["batch_size"] = str(self.batch_size) if self.batch_size else None
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Plan":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise RolloutError(f"rollout plan has unknown keys {sorted(unknown)}")
        kw = dict(d)
        kw["canary"] = Share.parse(d["canary"]) if d.get("canary") else None
        kw["stages"] = tuple(Share.parse(s) for s in d.get("stages") or ())
        kw["batch_size"] = Share.parse(d["batch_size"]) if d.get("batch_size") else None
        return cls(**kw)


def batch_failed(states: Sequence[str], offline: str) -> int:
    """How many devices of a batch count as failed."""
    return sum(1 for s in states if s not in SUCCESS and not (s == "skipped-offline" and offline == "skip"))


def exceeds(failed: int, size: int, max_fail: float) -> bool:
    """Ansible's max_fail_percentage rule: abort when failed/size is above the fraction."""
    return size > 0 and failed / size > max_fail + 1e-12


def rollouts_dir() -> Path:
    base = os.environ.get("EDGEKIT_ROLLOUTS")
    if base:
        return Path(base)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "edgekit" / "rollouts"


def record_path(rollout_id: str) -> Path:
    if not rollout_id or "/" in rollout_id or rollout_id.startswith("."):
        raise RolloutError(f"{rollout_id!r} is not a rollout id")
    return rollouts_dir() / f"{rollout_id}.json"


def read_record(rollout_id: str) -> Dict[str, Any]:
    p = record_path(rollout_id)
    try:
        rec = json.loads(p.read_text())
    except FileNotFoundError:
        have = sorted(q.stem for q in rollouts_dir().glob("*.json")) if rollouts_dir().is_dir() else []
        raise RolloutError(f"no rollout '{rollout_id}' in {rollouts_dir()}",
                           hint="known: " + (", ".join(have[-5:]) or "none")) from None
    except ValueError as e:
        raise RolloutError(f"rollout record {p} is not valid JSON ({e})") from None
    if rec.get("version") != RECORD_VERSION:
        raise RolloutError(f"rollout record {p} has version {rec.get('version')}, this edgekit reads "
                           f"{RECORD_VERSION}")
    return rec


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class Rollout:
    record: Dict[str, Any]
    artifacts: List[Artifact]
    devices: Dict[str, Device]
    opts: ops.Options
    on_event: Callable[[str, Dict[str, Any]], None] = field(default=lambda kind, info: None)
    persist: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _saved: float = 0.0
    _write_s: float = 0.0

    # -- creating and loading ---------------------------------------------------------------
    @classmethod
    def create(cls, plan: Plan, artifacts: Sequence[Artifact], devices: Sequence[Device], opts: ops.Options,
               inventory: os.PathLike, bundle_arg: str, persist: bool = True,
               rollout_id: Optional[str] = None) -> "Rollout":
        name = artifacts[0].name
        rid = rollout_id or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        record_path(rid)
        groups = plan.batches([d.name for d in devices])
        labels = plan.labels(len(groups))
        rec: Dict[str, Any] = {
            "version": RECORD_VERSION, "id": rid, "model": name, "state": "planned", "created": _now(),
            "updated": _now(), "bundle": str(Path(bundle_arg).resolve()), "inventory": str(Path(inventory).resolve()),
            "bundles": [{"path": str(a.path), "sha256": a.sha256, "target": a.target, "format": a.format}
                        for a in artifacts],
            "plan": plan.to_dict(), "keep": opts.keep, "abort": None, "runs": [],
            "batches": [{"index": i, "label": labels[i], "devices": g, "state": "pending", "started": None,
                         "finished": None, "failed": 0} for i, g in enumerate(groups)],
            "devices": {d.name: {"batch": i, "state": "pending", "sha256": None, "previous": None, "current": None,
                                 "reason": None, "seconds": None, "finished": None}
                        for i, g in enumerate(groups) for d in devices if d.name in g},
        }
        return cls(rec, list(artifacts), {d.name: d for d in devices}, opts, persist=persist)

    @classmethod
    def resume(cls, rollout_id: str, opts_for: Callable[..., ops.Options]) -> "Rollout":
        """The recorded rollout, with its bundles checked (same sha256) and devices from its inventory."""
        rec = read_record(rollout_id)
        if rec["state"] == "done":
            raise RolloutError(f"rollout {rollout_id} is already done", hint="start a new deploy")
        arts = artifacts_mod.load(rec["bundle"])
        want = {b["sha256"] for b in rec["bundles"]}
        have = {a.sha256 for a in arts}
        if want != have:
            raise RolloutError(f"the bundles under {rec['bundle']} changed since rollout {rollout_id} started",
                               hint="deploy them as a new rollout")
        inv = load_inventory(rec["inventory"])
        missing = [n for n in rec["devices"] if n not in inv.devices]
        if missing:
            raise RolloutError(f"devices of rollout {rollout_id} are no longer in {inv.path}: {', '.join(missing)}")
        plan = Plan.from_dict(rec["plan"])
        opts = opts_for(inv, plan, rec["keep"])
        return cls(rec, arts, {n: inv.devices[n] for n in rec["devices"]}, opts)

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def plan(self) -> Plan:
        return Plan.from_dict(self.record["plan"])

    # -- the record ---------------------------------------------------------------------------
    def save(self, force: bool = True) -> None:
        """Write the record atomically (compact JSON: the C encoder). Within a batch at most every
        max(0.5 s, 20 writes' time), so a large fleet's record costs at most ~5% of a core; a crash
        loses at most that much, and those devices answer `unchanged` on resume."""
        if not self.persist:
            return
        with self._lock:
            now = time.monotonic()
            if not force and now - self._saved < max(0.5, 20 * self._write_s):
                return
            self.record["updated"] = _now()
            path = record_path(self.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(self.record, f, separators=(",", ":"))
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            self._saved = time.monotonic()
            self._write_s = self._saved - now

    def _lock_file(self):
        """Held while this controller runs the rollout; the OS drops it when the process dies."""
        if not self.persist:
            return None
        p = record_path(self.id).with_suffix(".lock")
        p.parent.mkdir(parents=True, exist_ok=True)
        f = open(p, "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RolloutError(f"rollout {self.id} is running in another edgekit process",
                               hint="wait for it, or stop it first") from None
        return f

    # -- running -------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        lock = self._lock_file()
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.close()

    def _run(self) -> Dict[str, Any]:
        rec, plan = self.record, self.plan
        rec["state"] = "running"
        rec["abort"] = None
        rec["runs"].append({"started": _now(), "pid": os.getpid()})
        self.save()
        for b in rec["batches"]:
            todo = [n for n in b["devices"] if rec["devices"][n]["state"] not in SUCCESS]
            if not todo and b["state"] == "done":
                continue
            b.update(state="running", started=b["started"] or _now())
            self.save()
            self.on_event("batch", {"batch": b["label"], "devices": todo})
            fan_out([self.devices[n] for n in todo], self._deploy_one, plan.parallel, debug=self.opts.debug)
            states = [rec["devices"][n]["state"] for n in b["devices"]]
            b["failed"] = batch_failed(states, plan.offline)
            b["finished"] = _now()
            if exceeds(b["failed"], len(b["devices"]), plan.max_fail):
                b["state"] = "failed"
                self._abort(b)
                return rec
            b["state"] = "done"
            self.save()
        skipped = [n for n, d in rec["devices"].items() if d["state"] not in SUCCESS]
        rec["state"] = "done" if not skipped else "done-with-failures"
        rec["runs"][-1]["finished"] = _now()
        self.save()
        self.on_event("done", {"state": rec["state"]})
        return rec

    def _deploy_one(self, device: Device) -> DeviceResult:
        d = self.record["devices"][device.name]
        d.update(state="running", reason=None)
        t0 = time.monotonic()
        try:
            r = ops.deploy(device, self.artifacts, self.opts)
        except DeviceUnreachable as e:
            r = DeviceResult(device.name, "skipped-offline" if self.plan.offline == "skip" else "failed",
                             reason=str(e), offline=True)
        except EdgekitError as e:
            r = DeviceResult(device.name, "failed", reason=str(e))
        except Exception as e:  # a bug: recorded as this device's failure, then fan_out reports it
            d.update(state="failed", reason=f"internal error: {type(e).__name__}: {e}", finished=_now())
            self.save(force=False)
            raise
        d.update(state=r.status, reason=r.reason, seconds=round(time.monotonic() - t0, 3), finished=_now(),
                 sha256=r.data.get("sha256", d["sha256"]), current=r.data.get("current", r.data.get("previous")),
                 bundle=r.data.get("bundle"), warnings=r.warnings, p50_ms=r.data.get("p50_ms"))
        if "previous" in r.data and r.status == SWITCHED:
            d["previous"] = r.data["previous"]           # where `current` was before this rollout moved it
        if r.status == SWITCHED:
            d["switched"] = True
        self.save(force=False)
        self.on_event("device", {"device": device.name, **d})
        return r

    def _abort(self, failing: Dict[str, Any]) -> None:
        rec, plan = self.record, self.plan
        batches = rec["batches"] if plan.abort_rollback == "all" else [failing]
        names = [n for b in batches for n in b["devices"] if rec["devices"][n].get("switched")
                 and rec["devices"][n]["state"] in SUCCESS]
        self.on_event("abort", {"batch": failing["label"], "failed": failing["failed"], "reverting": names})

        def back(device: Device) -> DeviceResult:
            d = rec["devices"][device.name]
            r = ops.revert(device, rec["model"], d["sha256"], d["previous"], self.opts)
            d.update(state="reverted" if r.status == "reverted" else d["state"], current=r.data.get("current"),
                     switched=r.status != "reverted" and d.get("switched", False))
            return r

        res = fan_out([self.devices[n] for n in names], back, plan.parallel, debug=self.opts.debug)
        for r in res.failed:
            rec["devices"][r.device]["reason"] = f"revert failed: {r.reason}"
        rec["abort"] = {"batch": failing["label"], "failed": failing["failed"], "of": len(failing["devices"]),
                        "max_fail": plan.max_fail, "reverted": [r.device for r in res.succeeded],
                        "revert_failed": [r.device for r in res.failed], "at": _now()}
        rec["state"] = "aborted"
        rec["runs"][-1]["finished"] = _now()
        self.save()


def summary(rec: Dict[str, Any]) -> str:
    """One line on how a rollout stands."""
    states: Dict[str, int] = {}
    for d in rec["devices"].values():
        states[d["state"]] = states.get(d["state"], 0) + 1
    counts = ", ".join(f"{v} {k}" for k, v in sorted(states.items()))
    line = f"rollout {rec['id']}: {rec['state']} ({counts})"
    a = rec.get("abort")
    if a:
        line += (f"; aborted at {a['batch']}: {a['failed']} of {a['of']} failed (max {a['max_fail'] * 100:g}%)"
                 + (f"; reverted {', '.join(a['reverted'])}" if a["reverted"] else "")
                 + (f"; REVERT FAILED on {', '.join(a['revert_failed'])}" if a["revert_failed"] else "")
                 + f"; fix and continue with `edgekit deploy --resume {rec['id']}`")
    return line
