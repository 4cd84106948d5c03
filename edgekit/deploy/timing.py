"""Times `convert --select fastest`'s candidates on a real device, the way `edgekit profile` does.

convert never imports deploy: the CLI hands convert an object with this shape (covers, describe,
p50, decode), and select.py calls it with a bundle directory per candidate (convert.llm calls
decode() with a language-model bundle). Each call uploads the bundle to the device's store (not
activated), runs the latency method there and returns its p50 (a language model: decode tok/s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from edgekit.bundle import read_bundle
from edgekit.deploy import ops
from edgekit.deploy.artifact import prepare, read_one
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

    def decode(self, bundle_dir: Path, prompt_tokens: int = 32, new_tokens: int = 32, runs: int = 2,
               warmup: int = 1) -> Dict[str, Any]:
        """A language-model bundle's decode speed on the device (convert.llm's --select fastest): uploaded to the
        store (not activated) and benchmarked there (LanguageModel.benchmark through `edgekit.runtime bench`, in
        a fresh process whose load() picks its thread count). Returns the report's decode_tok_s (p50 over runs),
        ttft_ms, prefill_tok_s, threads, threads_chosen_by, threads_choice. Raises DeviceError when the device
        cannot run it (no onnxruntime-genai there, a build its version refuses)."""
        res = ops.profile(self.device, read_one(bundle_dir), self.opts, runs=runs, warmup=warmup,
                          prompt_tokens=prompt_tokens, new_tokens=new_tokens)
        rep = res.data["report"]
        if not rep.get("decode_tok_s"):
            raise DeviceError(f"the device reported no decode speed ({rep.get('error') or 'no decode_tok_s'})",
                              device=self.device.name)
        return {k: rep.get(k) for k in ("decode_tok_s", "ttft_ms", "prefill_tok_s", "threads", "threads_chosen_by",
                                        "threads_choice", "backend_version")}
