"""Fan-out over devices: bounded parallelism, one result per device, a failure is data."""

from __future__ import annotations

import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from edgekit.deploy.connection import DeviceUnreachable
from edgekit.deploy.inventory import Device
from edgekit.errors import EdgekitError

OK_STATUSES = {"deployed", "unchanged", "stored", "ok", "rolled-back-by-request", "reverted", "not-current",
               "would-upload", "would-switch", "skipped-offline"}


@dataclass
class DeviceResult:
    device: str
    status: str                      # deployed | unchanged | rolled-back | failed | ...
    reason: Optional[str] = None
    data: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    seconds: float = 0.0
    offline: bool = False            # no SSH session could be opened


    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    def to_dict(self) -> Dict[str, Any]:
        return {"device": self.device, "status": self.status, "ok": self.ok, "reason": self.reason,
                "warnings": self.warnings, "seconds": self.seconds, "offline": self.offline, **self.data}


@dataclass
class GroupResult:
    results: List[DeviceResult]

    @property
    def succeeded(self) -> List[DeviceResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> List[DeviceResult]:
        return [r for r in self.results if not r.ok]


def fan_out(devices: Sequence[Device], fn: Callable[[Device], DeviceResult],
            parallel: int = 8, debug: bool = False) -> GroupResult:
    def one(d: Device) -> DeviceResult:
        t0 = time.monotonic()
        try:
            r = fn(d)
        except DeviceUnreachable as e:
            r = DeviceResult(d.name, "failed", reason=str(e), offline=True)
        except EdgekitError as e:
            r = DeviceResult(d.name, "failed", reason=str(e))
        except Exception as e:  # a bug or a library error on one device must not stop the others
            reason = f"internal error: {type(e).__name__}: {e}"
            if debug:  # --debug: where it happened here (a device's own traceback comes with its error)
                reason += "\n" + traceback.format_exc()
            r = DeviceResult(d.name, "failed", reason=reason)
        r.seconds = time.monotonic() - t0
        return r

    workers = max(1, min(parallel, len(devices)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgekit-dev") as pool:
        results = list(pool.map(one, devices))
    return GroupResult(results)
