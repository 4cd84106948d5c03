"""The device protocol: the argv of `python -m edgekit.runtime ...` and its JSON replies as dataclasses.

One builder for every device command (DeviceSession runs them over SSH; the Ansible export
writes the same words into its tasks) and one parser per reply, so no call site reads a
reply by key. The device side is edgekit/runtime/__main__.py and edgekit/runtime/releases.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

MODULE = "edgekit.runtime"


def env(root: str) -> Dict[str, str]:
    """The environment of every device command: the pushed runtime first on the path."""
    return {"PYTHONPATH": f"{root}/runtime", "PYTHONDONTWRITEBYTECODE": "1"}


def argv(python: str, *args: str) -> List[str]:
    return [python, "-m", MODULE, *args]


def release_args(action: str, root: str, *, name: Optional[str] = None, sha: Optional[str] = None,
                 incoming: Optional[str] = None, to: Optional[str] = None, keep: Optional[int] = None,
                 health: bool = False, clean_incoming: bool = False, check: bool = True) -> List[str]:
    """`release ACTION --root ROOT ...`: the device side of deploy (see runtime/releases.py).
    `check=False`: activate / rollback without the golden check (a language model's runs after)."""
    a = ["release", action, "--root", root]
    for flag, v in (("--name", name), ("--sha", sha), ("--incoming", incoming), ("--to", to)):
        if v is not None:
            a += [flag, v]
    if keep is not None:
        a += ["--keep", str(keep)]
    if health:
        a.append("--health")
    if clean_incoming:
        a.append("--clean-incoming")
    if not check:
        a.append("--no-check")
    return a


def bench_args(path: str, runs: int, warmup: int, threads: Optional[int] = None,
               prompt_tokens: Optional[int] = None, new_tokens: Optional[int] = None) -> List[str]:
    """`bench PATH --json`: the latency method of `profile` (and of the rollout's p50 gate); a language
    model's (LanguageModel.benchmark(): load, TTFT, prefill / decode tok/s, peak RSS) with the token counts."""
    a = ["bench", path, "--json", "--runs", str(runs), "--warmup", str(warmup)]
    if threads:
        a += ["--threads", str(threads)]
    if prompt_tokens is not None:
        a += ["--prompt-tokens", str(prompt_tokens)]
    if new_tokens is not None:
        a += ["--new-tokens", str(new_tokens)]
    return a


def check_args(path: str) -> List[str]:
    """`check PATH --json`: the golden health check of the bundle at PATH (for a language model the
    runtime's LanguageModel.check(): teacher-forced top-1 agreement, logit SNR, a short generation)."""
    return ["check", path, "--json"]


# --- replies -------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputCheck:
    snr_db: float
    top1_agreement: Optional[float]
    ok: bool


@dataclass(frozen=True)
class Health:
    """The golden health check of a release, run on the device."""

    ok: bool
    error: Optional[str] = None
    backend: Optional[str] = None
    backend_version: Optional[str] = None
    min_snr_db: Optional[float] = None
    outputs: Dict[str, OutputCheck] = field(default_factory=dict)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, d: Optional[Dict[str, Any]]) -> Optional["Health"]:
        if d is None:
            return None
        outs = {k: OutputCheck(v.get("snr_db"), v.get("top1_agreement"), bool(v.get("ok")))
                for k, v in (d.get("outputs") or {}).items()}
        return cls(bool(d.get("ok")), d.get("error"), d.get("backend"), d.get("backend_version"),
                   d.get("min_snr_db"), outs, d)

    def why(self) -> str:
        """Why it failed, in one line."""
        if self.error:
            return self.error
        if not self.outputs and "top1_agreement" in self.raw:   # a language model's check
            r = self.raw
            least = r.get("min_top1_agreement", r.get("min_top1"))
            parts = [f"top-1 agreement {r['top1_agreement']}" + (f" (min {least})" if least is not None else "")]
            if r.get("snr_db") is not None:
                parts.append(f"logit SNR {r['snr_db']} dB" + (f" (min {r['min_snr_db']})" if "min_snr_db" in r else ""))
            if "text" in r:
                parts.append(f"generation {str(r.get('text'))[:60]!r}")
            return ", ".join(parts)
        return ", ".join(f"{k}: SNR {o.snr_db:.1f} dB vs golden (min {self.min_snr_db}), top-1 agreement "
                         f"{o.top1_agreement}" for k, o in self.outputs.items() if not o.ok) or "failed"


@dataclass(frozen=True)
class Backend:
    available: bool
    version: Optional[str] = None
    error: Optional[str] = None


def _backends(d: Optional[Dict[str, Any]]) -> Dict[str, Backend]:
    return {k: Backend(bool(v.get("available")), v.get("version"), v.get("error")) for k, v in (d or {}).items()}


TFLITE_BACKENDS = ("litert", "tflite-runtime", "tensorflow")
ONNX_BACKENDS = ("onnxruntime", "openvino")       # the order a device prefers them in


def runnable_formats(backends: Dict[str, Backend]) -> List[str]:
    fmts = []
    if any(backends.get(n, Backend(False)).available for n in TFLITE_BACKENDS):
        fmts.append("tflite")
    if any(backends.get(n, Backend(False)).available for n in ONNX_BACKENDS):
        fmts.append("onnx")
    return fmts


@dataclass(frozen=True)
class ReleaseInfo:
    sha256: str
    target: Optional[str] = None
    format: Optional[str] = None
    created: Optional[str] = None
    error: Optional[str] = None


@dataclass(frozen=True)
class ModelState:
    current: Optional[str]
    releases: Tuple[ReleaseInfo, ...] = ()
    history: Tuple[str, ...] = ()
    incoming: Tuple[str, ...] = ()
    health: Optional[Health] = None

    def has(self, sha: str) -> bool:
        return any(r.sha256 == sha for r in self.releases)


@dataclass(frozen=True)
class DeviceStatus:
    root: str
    models: Dict[str, ModelState]
    free_bytes: int
    backends: Dict[str, Backend]
    removed_incoming: Tuple[str, ...] = ()

    @classmethod
    def parse(cls, d: Dict[str, Any]) -> "DeviceStatus":
        models = {}
        for n, m in d["models"].items():
            rels = tuple(ReleaseInfo(r["sha256"], r.get("target"), r.get("format"), r.get("created"), r.get("error"))
                         for r in m.get("releases", []))
            models[n] = ModelState(m.get("current"), rels, tuple(m.get("history", [])), tuple(m.get("incoming", [])),
                                   Health.parse(m.get("health")))
        return cls(d["root"], models, int(d["free_bytes"]), _backends(d.get("backends")),
                   tuple(d.get("removed_incoming", [])))

    def model(self, name: str) -> ModelState:
        return self.models.get(name) or ModelState(None)


@dataclass(frozen=True)
class Activation:
    """What `release activate` did: deployed | unchanged | rolled-back (health check failed)."""

    name: str
    sha256: str
    status: str
    previous: Optional[str]
    current: Optional[str]
    health: Optional[Health] = None
    pruned: Tuple[str, ...] = ()

    @classmethod
    def parse(cls, d: Dict[str, Any]) -> "Activation":
        return cls(d["name"], d["sha256"], d["status"], d.get("previous"), d.get("current"),
                   Health.parse(d.get("health")), tuple(d.get("pruned", [])))


@dataclass(frozen=True)
class Switch:
    """What `release rollback` / `release revert` did."""

    name: str
    status: str                       # rolled-back | reverted | not-current
    previous: Optional[str]
    current: Optional[str]
    health: Optional[Health] = None

    @classmethod
    def parse(cls, d: Dict[str, Any]) -> "Switch":
        return cls(d["name"], d["status"], d.get("previous"), d.get("current"), Health.parse(d.get("health")))


@dataclass(frozen=True)
class Stored:
    sha256: str
    path: str

    @classmethod
    def parse(cls, d: Dict[str, Any]) -> "Stored":
        return cls(d["sha256"], d["path"])


@dataclass(frozen=True)
class Facts:
    """What the device says about itself (`facts`): arch, CPU, memory, OS, Python, backends."""

    arch: str
    backends: Dict[str, Backend]
    python: Optional[str]
    raw: Dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def parse(cls, d: Dict[str, Any]) -> "Facts":
        return cls(d.get("arch", ""), _backends(d.get("backends")), d.get("python"), d)


def latency_p50_ms(report: Dict[str, Any]) -> float:
    """The p50 of a `bench --json` report (the same figure `profile` shows)."""
    return float(report["latency"]["p50_ms"])


__all__ = ["env", "argv", "release_args", "bench_args", "check_args", "Health", "DeviceStatus", "ModelState",
                          "Activation", "Switch", "Stored", "Facts", "Backend", "runnable_formats"]
