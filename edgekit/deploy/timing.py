"""Times `convert --select fastest`'s candidates on a real device, the way `edgekit profile` does.

convert never imports deploy: the CLI hands convert an object with this shape (covers, describe,
p50), and select.py calls it with a bundle directory per candidate. Each call uploads the bundle
to the device's store (not activated), runs the latency method there and returns its p50.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from edgekit.bundle import read_bundle
from edgekit.deploy import ops
from edgekit.deploy.artifact import prepare
from edgekit.deploy.inventory import Device
from edgekit.errors import DeviceError


class DeviceTimer:
    def __init__(self, device: Device, opts: "ops.Options", runs: int = 40, warmup: int = 10):
        self.device, self.opts, self.runs, self.warmup = device, opts, runs, warmup

    def covers(self, target: str) -> bool:
        """Whether the device is one of `target`'s: the inventory names its profile."""
        return self.device.target == target

    def describe(self) -> str:
        return f"timed on device {self.device.name} ({self.device.target}) over SSH, as edgekit profile"

    def p50(self, bundle_dir: Path, backend: Optional[str]) -> Tuple[float, int]:
        """(p50 ms, threads used) of the bundle on the device. Raises DeviceError when the device
        cannot run it, or runs it on another backend than the one the candidate names."""
        b = prepare(read_bundle(bundle_dir, verify=False))
        res = ops.profile(self.device, b, self.opts, runs=self.runs, warmup=self.warmup)
        rep = res.data["report"]
        if backend and rep.get("backend") != backend:
            raise DeviceError(f"the device ran it on {rep.get('backend')}, not {backend}"
                              + (f" ({rep['backend_note']})" if rep.get("backend_note") else ""),
                              device=self.device.name)
        return float(rep["latency"]["p50_ms"]), int(rep["threads"])
