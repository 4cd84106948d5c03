"""What a conversion produced: one row per (target, format), written or FAILED with its reason.

Units, everywhere in edgekit's JSON: agreement and accuracy are fractions 0..1, drops are
percentage points (`*_points`), SNR is dB, sizes are bytes, times are seconds or `*_ms`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from edgekit.convert.validate import primary_snr
from edgekit.table import render


@dataclass
class Artifact:
    """One converted model, measured against the float reference in the target's numerics."""

    fmt: str
    data: bytes
    float_bytes: int
    metrics: Dict[str, Any]
    float_ops: Dict[str, int]
    inputs: List[Dict[str, Any]]
    outputs: List[Dict[str, Any]]
    golden: Dict[str, np.ndarray]
    seconds: float
    build: Dict[str, Any]
    precision: str
    numerics: Dict[str, Any]
    golden_backend: str = ""
    rescue: List[Dict[str, Any]] = field(default_factory=list)   # the ladder's steps, in order
    rescued_by: Optional[str] = None                              # the rung that met the floor
    mixed: Optional[Dict[str, Any]] = None                        # mixed-precision record
    candidates: List[Dict[str, Any]] = field(default_factory=list)   # --select fastest: each measured
    alternatives: List[Any] = field(default_factory=list)   # --select fastest: (slug, Artifact) not chosen
    runtime: Optional[Dict[str, Any]] = None                # --select fastest: the backend it was timed on
    notes: List[str] = field(default_factory=list)          # what did not go as usual (said in the report)
    faithful: Optional[Dict[str, Any]] = None               # convert.faithful: the builds weighed against it


def _chosen(c: Dict[str, Any]) -> str:
    """A --select candidate's last column: chosen, or why it could not be (failed, under the floor)."""
    if c.get("chosen"):
        return "yes"
    if c.get("error"):
        return "failed: " + c["error"][:50]
    return "" if c.get("meets", True) else "below the floor"


@dataclass
class Failure:
    """Why an artifact was not written: the stage, the one-line reason, what to do."""

    stage: str
    reason: str
    hint: str = ""
    worst_layers: List[str] = field(default_factory=list)
    rescue: List[Dict[str, Any]] = field(default_factory=list)
    metrics: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"stage": self.stage, "reason": self.reason, "hint": self.hint,
                "worst_layers": self.worst_layers, "rescue": self.rescue, "validation": self.metrics}


@dataclass
class BundleResult:
    target: str
    fmt: str
    path: Path                      # where the bundle is (or would have been) written
    artifact: Optional[Artifact] = None
    failure: Optional[Failure] = None

    @property
    def ok(self) -> bool:
        return self.failure is None




def _pct(x: Optional[float]) -> Optional[float]:
    return None if x is None else 100.0 * x


@dataclass
class ConvertResult:
    name: str
    recipe: Dict[str, Any]
    source: Dict[str, Any]
    calibration: Dict[str, Any]
    bundles: List[BundleResult] = field(default_factory=list)
    report_path: Optional[Path] = None
    log_path: Optional[Path] = None

    @property
    def written(self) -> List[BundleResult]:
        return [b for b in self.bundles if b.ok]

    @property
    def failed(self) -> List[BundleResult]:
        return [b for b in self.bundles if not b.ok]

    def table(self) -> str:
        rows = []
        for b in self.bundles:
            if not b.ok:
                m = b.failure.metrics
                rows.append([b.path.name, b.fmt, "-", "-", "-", _pct(m and m.get("top1_agreement")), "-",
                             m and primary_snr(m), "-", "-",
                             f"FAILED ({b.failure.stage}): {b.failure.reason}"[:110]])
                continue
            a, m = b.artifact, b.artifact.metrics
            acc = (f"{100 * m['accuracy_float']:.1f}→{100 * m['accuracy_quant']:.1f}"
                   if m.get("accuracy_quant") is not None else "-")
            rows.append([b.path.name, b.fmt, a.precision, len(a.data) / 1024, len(a.data) / a.float_bytes,
                         _pct(m["top1_agreement"]), acc, primary_snr(m),
                         ", ".join(f"{k}×{v}" for k, v in sorted(a.float_ops.items())) or "none",
                         "ref" if a.numerics.get("mode") == "reference" else "host",
                         "ok" + (f" (rescued: {a.rescued_by})" if a.rescued_by else "")])
        fl = self.recipe["floor"]
        title = (f"{self.name}: float vs quantized on {self.calibration['validation_samples']} validation samples "
                 f"({self.calibration['validation_source']}); floor: SNR ≥ {fl['min_snr_db']} dB, agreement ≥ "
                 f"{100 * fl['min_agreement']:.0f}%"
                 + (f", accuracy drop ≤ {fl['max_accuracy_drop']} points" if fl.get("max_accuracy_drop") is not None
                    else ""))
        text = render(["bundle", "format", "precision", "KiB", "size×", "top-1 agree %", "acc % f→q", "SNR dB",
                       "float ops", "numerics", "result"], rows, title=title)
        for b in self.bundles:
            steps = (b.artifact.rescue if b.ok else b.failure.rescue)
            if steps:
                text += "\n\n" + render(
                    ["rung", "what", "top-1 agree %", "SNR dB", "KiB", "meets floor"],
                    [[s["rung"], s["what"], _pct(s.get("top1_agreement")), s.get("snr_db"),
                      None if s.get("bytes") is None else s["bytes"] / 1024,
                      "yes" if s.get("meets") else (s.get("error") or "no")[:60]] for s in steps],
                    title=f"rescue ladder for {b.path.name} ({b.fmt})")
            if b.ok and b.artifact.faithful:
                f = b.artifact.faithful
                text += "\n\n" + render(
                    ["build", "top-1 agree %", "SNR dB", "acc drop pts", "p50 vs shipped", "meets floor", "shipped"],
                    [[c["what"], _pct(c.get("top1_agreement")), c.get("snr_db"), c.get("accuracy_drop_points"),
                      None if c.get("speed_ratio") is None else f"{(c['speed_ratio'] - 1) * 100:+.1f}%",
                      "yes" if c.get("meets") else (c.get("error") or "no")[:60], "yes" if c.get("shipped") else ""]
                     for c in f["candidates"]],
                    title=f"more faithful at the same speed? {b.path.name}: {f['why']}")
            if not b.ok and b.failure.worst_layers:
                text += f"\n  worst layers: {', '.join(b.failure.worst_layers[:5])}"
            if b.ok and b.artifact.candidates:
                text += "\n\n" + render(
                    ["candidate", "backend", "p50 ms", "KiB", "top-1 agree %", "SNR dB", "chosen"],
                    [[c["what"], c.get("backend"), c.get("p50_ms"), c["bytes"] / 1024, _pct(c.get("top1_agreement")),
                      c.get("snr_db"), _chosen(c)] for c in b.artifact.candidates],
                    title=f"--select fastest for {b.path.name}: {b.artifact.candidates[0].get('timed_where', '')}")
        if self.source.get("shapes_from_data"):
            text += "\nnote: " + self.source["shapes_from_data"]["note"]
        if self.calibration.get("random"):
            text += "\nWARNING: random calibration data: the accuracy figures above mean nothing."
        warned = {b.artifact.numerics.get("warning") for b in self.written if b.artifact.numerics.get("warning")}
        warned |= {f"{b.path.name}: {n}" for b in self.written for n in b.artifact.notes}
        for w in sorted(warned):
            text += f"\nwarning: {w}"
        return text

    def to_dict(self) -> Dict[str, Any]:
        out = []
        for b in self.bundles:
            row: Dict[str, Any] = {"path": str(b.path), "target": b.target, "format": b.fmt,
                                   "status": "written" if b.ok else "failed"}
            if b.ok:
                a = b.artifact
                row.update(bytes=len(a.data), float_bytes=a.float_bytes, precision=a.precision,
                           validation=a.metrics, float_ops=a.float_ops, seconds=a.seconds,
                           numerics=a.numerics, rescue=a.rescue, rescued_by=a.rescued_by, notes=a.notes,
                           mixed_precision=a.mixed, candidates=a.candidates, runtime=a.runtime,
                           faithful=a.faithful)
            else:
                row["failure"] = b.failure.to_dict()
            out.append(row)
        return {"name": self.name, "recipe": self.recipe, "source": self.source, "calibration": self.calibration,
                "log": str(self.log_path) if self.log_path else None, "bundles": out}
