"""Read what edgekit wrote to disk into one plain structure for the report.

The one place that knows the JSON files' keys: `OUT/<name>.convert.json` and each bundle's
`manifest.json` (convert), latency reports with raw samples (`edgekit bench --out`,
`edgekit profile` under profiles/<device>/, the runtime's `benchmark()`), `*.qat.json`,
`*.prune.json`, `*.distill.json`, `*.factorize.json` and staged rollouts' records. Files are taken
as they are on disk; keys that have been renamed across edgekit versions are looked up under every name they
have had (for example agreement as `top1_agreement` in percent or as a 0..1 fraction, or a
unit-suffixed name), and every figure leaves here in one unit: fractions 0..1, bytes,
milliseconds, dB. A file that cannot be read is not fatal: it is listed in `skipped`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from edgekit.errors import EdgekitError

HERE = "here"  # device label of a measurement taken on the converting machine
OPTIMIZE_RECORDS = (".qat.json", ".prune.json", ".distill.json", ".factorize.json")


class ReportError(EdgekitError):
    """Nothing to report on, or a path that is not what the report needs."""

    def __init__(self, message: str, *, path: Optional[str] = None, hint: Optional[str] = None):
        super().__init__(f"{path}: {message}" if path else message, hint=hint)
        self.path = path


@dataclass
class Run:
    """One latency measurement (raw samples kept) of one bundle on one machine."""

    file: str
    device: str                  # HERE, or the device's name from the inventory
    model: str                   # bundle's model name (manifest name)
    target: Optional[str]
    fmt: Optional[str]
    bundle_dir: Optional[str]    # basename of the bundle directory, when the report says
    samples_ms: List[float]
    stats: Dict[str, Any]        # count, mean_ms, p50_ms, ...
    end_to_end: Optional[Dict[str, Any]]
    backend: str
    threads: Optional[int]
    conditions: Dict[str, Any]
    noisy: bool
    noise_reasons: List[str]
    timestamp: Optional[str]
    load_ms: Optional[float] = None
    first_inference_ms: Optional[float] = None

    @property
    def p50_ms(self) -> Optional[float]:
        return self.stats.get("p50_ms")


@dataclass
class BundleInfo:
    key: str                       # bundle directory name: unique within a build
    model: str
    target: str
    fmt: str
    precision: str
    bytes: Optional[int]
    float_bytes: Optional[int]
    agreement: Optional[float]     # top-1 agreement with the float model, 0..1
    accuracy_float: Optional[float]  # 0..1
    accuracy_quant: Optional[float]  # 0..1
    snr_db: Optional[float]
    max_abs_err: Optional[float]
    float_ops: Dict[str, int]
    within_budget: Optional[bool]
    mixed: Optional[Dict[str, Any]]       # the mixed-precision record as written
    compatibility: Optional[List[Dict[str, Any]]]  # None: the manifest has no record
    convert_p50_ms: Optional[float]       # what convert measured here, if it did
    failure: Optional[str] = None         # convert wrote no bundle: the stage and reason
    status: Optional[str] = None          # convert's word for the row ("written", "failed"), if it says
    rescued_by: Optional[str] = None      # the rescue rung that met the floor, if one did
    numerics: Optional[str] = None        # where fidelity was measured ("host", "reference", ...)
    rescue: List[Dict[str, Any]] = field(default_factory=list)  # convert's rescue ladder, as written
    # --select fastest: every candidate as convert recorded it (a language model's: what, decode_tok_s, timed,
    # meets, chosen, options, fidelity and bytes)
    candidates: List[Dict[str, Any]] = field(default_factory=list)
    runs: List[Run] = field(default_factory=list)
    # a language model (format onnx-genai): {"bytes_per_token", "kv_bytes_per_token", "context_default",
    # "fidelity": {ppl_float, ppl, ppl_increase, kl_mean, top1_agreement, tokens, text}, "recipe": {...}}
    llm: Optional[Dict[str, Any]] = None
    llm_runs: List[Dict[str, Any]] = field(default_factory=list)   # LanguageModel.benchmark() reports, as written
    # a bundle an earlier run left at the path of a row this run's convert record says FAILED (a failed row writes
    # nothing and leaves what was there): shown apart, its figures its own, never the failed row's; why, in words
    stale: Optional[str] = None

    @property
    def label(self) -> str:
        """The bundle's name in the report: its directory, marked when it is a stale one."""
        return f"{self.key} (stale)" if self.stale else self.key

    def p50(self, device: str) -> Optional[float]:
        """The latest run's p50 on `device`; on HERE, convert's own figure when nothing was run."""
        mine = [r for r in self.runs if r.device == device and r.p50_ms is not None]
        if mine:
            return sorted(mine, key=lambda r: r.timestamp or "")[-1].p50_ms
        return self.convert_p50_ms if device == HERE else None


@dataclass
class ModelInfo:
    name: str
    source: Dict[str, Any]
    calibration: Dict[str, Any]
    max_accuracy_drop: Optional[float]
    bundles: List[BundleInfo]
    optimize: List[Dict[str, Any]] = field(default_factory=list)  # prune / distill / qat records

    @property
    def devices(self) -> List[str]:
        seen = {r.device for b in self.bundles for r in b.runs}
        rest = sorted(d for d in seen if d != HERE)
        return ([HERE] if HERE in seen or any(b.convert_p50_ms for b in self.bundles) else []) + rest

    @property
    def has_labels(self) -> bool:
        return any(b.accuracy_quant is not None for b in self.bundles)

    @property
    def is_llm(self) -> bool:
        return bool(self.bundles) and all(b.llm is not None for b in self.bundles)

    @property
    def llm_devices(self) -> List[str]:
        seen = {str(r.get("device") or HERE) for b in self.bundles for r in b.llm_runs}
        return ([HERE] if HERE in seen else []) + sorted(d for d in seen if d != HERE)


@dataclass
class ReportData:
    build_dir: str
    models: List[ModelInfo]
    rollouts: List[Dict[str, Any]]
    unmatched_runs: List[Run]
    skipped: List[Tuple[str, str]]   # (file, why it was not used)


# --- small readers -------------------------------------------------------------------

def _load_json(path: Path, skipped: List[Tuple[str, str]]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        skipped.append((str(path), f"{type(e).__name__}: {e}"))
        return None


def _first(d: Dict[str, Any], *names: str) -> Any:
    for n in names:
        if isinstance(d, dict) and d.get(n) is not None:
            return d[n]
    return None


def percent_units(v: Dict[str, Any], schema: Optional[int] = None) -> Optional[bool]:
    """Whether a validation record gives agreement and accuracy in percent (manifest schema 1,
    convert reports of that time: `accuracy_int8`, `accuracy_drop`) or as fractions 0..1
    (schema 2 on: `accuracy_quant`, `accuracy_drop_points`); None when it does not say."""
    if isinstance(schema, int):
        return schema < 2
    if any(k in v for k in ("accuracy_quant", "accuracy_drop_points", "quant_bytes")):
        return False
    if any(k in v for k in ("accuracy_int8", "accuracy_drop", "int8_bytes")):
        return True
    return None


def fraction(d: Dict[str, Any], base: str, percent: Optional[bool] = None) -> Optional[float]:
    """A figure in 0..1 from any of its spellings: `<base>_fraction`, `<base>_frac` (0..1),
    `<base>_pct`, `<base>_percent` (0..100), or `<base>` itself in the record's units
    (`percent`: see percent_units; when unknown, a value above 1 is taken as percent)."""
    if not isinstance(d, dict):
        return None
    for n in (f"{base}_fraction", f"{base}_frac"):
        if isinstance(d.get(n), (int, float)):
            return float(d[n])
    for n in (f"{base}_pct", f"{base}_percent"):
        if isinstance(d.get(n), (int, float)):
            return float(d[n]) / 100.0
    v = d.get(base)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if percent is None:
            percent = v > 1.0
        return float(v) / 100.0 if percent else float(v)
    return None


def _accuracy_quant(v: Dict[str, Any], percent: Optional[bool]) -> Optional[float]:
    for base in ("accuracy_quant", "accuracy_int8", "accuracy_quantized", "accuracy_artifact"):
        a = fraction(v, base, percent)
        if a is not None:
            return a
    return None


def _primary(v: Dict[str, Any]) -> Dict[str, Any]:
    outs = v.get("outputs") or {}
    if isinstance(outs, list):  # a list of per-output records with a name
        outs = {o.get("name", str(i)): o for i, o in enumerate(outs) if isinstance(o, dict)}
    p = v.get("primary_output")
    if p in outs:
        return outs[p]
    return next(iter(outs.values()), {}) if outs else {}


def _float_ops(*places: Dict[str, Any]) -> Dict[str, int]:
    for p in places:
        ops = (p or {}).get("float_ops")
        if isinstance(ops, dict):
            return {str(k): int(n) for k, n in ops.items()}
        if isinstance(ops, list):
            return {str(k): 1 for k in ops}
    return {}


def _precision(manifest: Dict[str, Any], record: Dict[str, Any]) -> str:
    m = (manifest.get("model") or {}) if isinstance(manifest.get("model"), dict) else {}
    p = _first(m, "precision") or _first(manifest, "precision") or _first(record, "precision")
    if not p and manifest.get("kind") == "llm" and isinstance(manifest.get("recipe"), dict):
        p = manifest["recipe"].get("precision")   # a language model's manifest keeps it in its recipe
    if p:
        return str(p)
    mixed = record.get("mixed_precision") or manifest.get("mixed_precision")
    return "int8+float" if isinstance(mixed, dict) and mixed.get("met") else "int8"


def _target_name(manifest: Dict[str, Any]) -> Optional[str]:
    t = manifest.get("target")
    if isinstance(t, dict):
        return t.get("name")
    return t if isinstance(t, str) else None


def _format(manifest: Dict[str, Any]) -> Optional[str]:
    m = manifest.get("model")
    if isinstance(m, dict) and m.get("format"):
        return m["format"]
    f = manifest.get("format")
    if f:
        return f
    if isinstance(m, dict) and isinstance(m.get("file"), str):
        return Path(m["file"]).suffix.lstrip(".") or None
    return None


def _model_bytes(manifest: Dict[str, Any]) -> Optional[int]:
    m = manifest.get("model")
    if isinstance(m, dict):
        for k in ("bytes", "size_bytes"):
            if isinstance(m.get(k), int):
                return m[k]
    return None


def _convert_p50(record: Dict[str, Any], manifest: Dict[str, Any]) -> Optional[float]:
    """What convert measured here for this bundle: a latency record of its own if it keeps one,
    else the mixed-precision search's timing of the artifact it kept."""
    for place in (record, record.get("validation") or {}, manifest, manifest.get("validation") or {}):
        lat = place.get("latency") if isinstance(place, dict) else None
        if isinstance(lat, dict) and isinstance(_first(lat, "p50_ms"), (int, float)):
            return float(lat["p50_ms"])
        if isinstance(place, dict) and isinstance(place.get("p50_ms"), (int, float)):
            return float(place["p50_ms"])
    for c in record.get("candidates") or manifest.get("candidates") or []:  # --select fastest: each timed
        if isinstance(c, dict) and c.get("chosen") and isinstance(c.get("p50_ms"), (int, float)):
            return float(c["p50_ms"])
    mp = record.get("mixed_precision") or manifest.get("mixed_precision")
    if isinstance(mp, dict):
        if mp.get("met"):
            kept = set(mp.get("float_layers") or [])
            for st in mp.get("steps") or []:
                if st.get("meets_budget") and set(st.get("float_layers") or []) == kept and st.get("p50_ms"):
                    return float(st["p50_ms"])
        full = mp.get("full_int8") or {}
        if not mp.get("met") and isinstance(full.get("p50_ms"), (int, float)):
            return float(full["p50_ms"])
    return None


def _compat(manifest: Dict[str, Any], record: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    for place in (manifest, record):
        c = place.get("compatibility")
        if isinstance(c, list):
            return [x for x in c if isinstance(x, dict)]
    return None


def _numerics(record: Dict[str, Any], v: Dict[str, Any]) -> Optional[str]:
    for n in (record.get("numerics"), v.get("numerics")):
        if isinstance(n, dict) and n.get("mode"):
            return str(n["mode"])
        if isinstance(n, str):
            return n
    return None


def _int(v: Any) -> Optional[int]:
    """A byte count as an int; None for one missing or not a number (a hand-edited "x")."""
    try:
        return None if v is None or isinstance(v, bool) else int(v)
    except (TypeError, ValueError, OverflowError):
        return None


def _bundle(key: str, model: str, record: Dict[str, Any], manifest: Dict[str, Any]) -> BundleInfo:
    v = dict(manifest.get("validation") or {})
    v.update({k: x for k, x in (record.get("validation") or {}).items() if x is not None})
    failure = record.get("failure") if record.get("status") == "failed" or record.get("failure") else None
    if isinstance(failure, dict):
        v.update({k: x for k, x in (failure.get("validation") or {}).items() if x is not None})
    pct = percent_units(v, manifest.get("schema") if manifest else None)
    prim = _primary(v)
    target = record.get("target") or _target_name(manifest) or "?"
    fmt = record.get("format") or _format(manifest) or "?"
    size = _first(record, "bytes", "artifact_bytes") or _first(v, "quant_bytes", "int8_bytes", "artifact_bytes") \
        or _model_bytes(manifest)
    fbytes = _first(record, "float_bytes") or _first(v, "float_bytes")
    wb = record.get("within_budget", v.get("within_budget"))
    mmodel = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    llm = _llm_info(record, manifest) if (fmt == "onnx-genai" or manifest.get("kind") == "llm"
                                          or record.get("kind") == "llm") else None
    if llm is not None:
        fid = llm["fidelity"]
        v.setdefault("top1_agreement_fraction", fid.get("top1_agreement"))
    return BundleInfo(llm=llm,
        key=key, model=model, target=str(target), fmt=str(fmt), precision=_precision(manifest, record),
        bytes=_int(size), float_bytes=_int(fbytes),
        agreement=fraction(v, "top1_agreement", pct), accuracy_float=fraction(v, "accuracy_float", pct),
        accuracy_quant=_accuracy_quant(v, pct),
        snr_db=_first(prim, "snr_db", "snr"), max_abs_err=_first(prim, "max_abs_err", "max_abs_error"),
        float_ops=_float_ops(record, v), within_budget=wb if isinstance(wb, bool) else None,
        mixed=record.get("mixed_precision") or manifest.get("mixed_precision"),
        compatibility=_compat(manifest, record),
        convert_p50_ms=_convert_p50(record, manifest),
        failure=(f"{failure.get('stage', '?')}: {failure.get('reason', '')}" if isinstance(failure, dict)
                 else str(failure) if failure else None),
        rescue=[x for x in (record.get("rescue") or manifest.get("rescue") or []) if isinstance(x, dict)],
        candidates=[x for x in (record.get("candidates") or manifest.get("candidates") or []) if isinstance(x, dict)],
        status=record.get("status"), rescued_by=record.get("rescued_by") or mmodel.get("rescued_by"),
        numerics=_numerics(record, v))


def _failed(record: Dict[str, Any]) -> bool:
    """A convert record's row that wrote no bundle."""
    return record.get("status") == "failed" or bool(record.get("failure"))


def _stale(key: str, model: str, manifest: Dict[str, Any]) -> BundleInfo:
    """The bundle left at a failed row's path: the manifest's own figures, marked as not this run's."""
    b = _bundle(key, model, {}, manifest)
    when = manifest.get("created")
    b.status = "stale"
    b.stale = ("not from this run: the conversion above failed and wrote nothing; this is the bundle an earlier "
               "run left at this path" + (f" (created {when})" if when else "")
               + "; its figures are that run's, not this one's")
    return b


def _llm_info(record: Dict[str, Any], manifest: Dict[str, Any]) -> Dict[str, Any]:
    """A language-model bundle's figures, from its convert record and/or its manifest."""
    def section(d: Dict[str, Any], name: str) -> Dict[str, Any]:   # a hand-edited "oops" or 5: none
        return d.get(name) if isinstance(d.get(name), dict) else {}

    ml = section(manifest, "llm")
    fid = dict(section(manifest, "fidelity"))
    fid.update({k: x for k, x in section(record, "fidelity").items() if x is not None})
    recipe = dict(section(manifest, "recipe"))
    recipe.update({k: x for k, x in section(record, "recipe").items() if x is not None})
    blocks = section(ml, "int8_nodes").get("blocks")
    return {"bytes_per_token": _first(record, "bytes_per_token") or ml.get("bytes_per_token"),
            "kv_bytes_per_token": ml.get("kv_bytes_per_token"), "context_default": ml.get("context_default"),
            "fidelity": fid, "recipe": recipe, "int8_blocks": blocks if isinstance(blocks, dict) else None}


def _is_llm_report(d: Any) -> bool:
    return isinstance(d, dict) and d.get("kind") == "llm" and isinstance(d.get("decode_tok_s"), (int, float))


def _llm_reports(d: Any) -> List[Dict[str, Any]]:
    """LanguageModel.benchmark() reports in one JSON document: one, a list (`edgekit bench --out` of several),
    or a fleet result list (`edgekit profile --json`: [{"device": ..., "data": {"report": ...}}])."""
    out: List[Dict[str, Any]] = []
    for x in (d if isinstance(d, list) else [d]):
        if _is_llm_report(x):
            out.append(dict(x))
        elif isinstance(x, dict) and _is_llm_report((x.get("data") or {}).get("report")):
            rep = dict(x["data"]["report"])
            rep.setdefault("device", x.get("device"))
            out.append(rep)
    return out


def _match_llm(models: Dict[str, "ModelInfo"], rep: Dict[str, Any]) -> Optional[BundleInfo]:
    every = [b for m in models.values() for b in m.bundles if b.llm is not None and b.status != "failed"]
    names = {Path(str(rep.get("model") or "")).name, str(rep.get("bundle") or "")}
    hit = [b for b in every if b.key in names]
    if len(hit) == 1:
        return hit[0]
    hit = [b for b in every if (b.model in names or b.key in names) and b.target == rep.get("target")
           and (rep.get("precision") in (None, b.precision))]
    return hit[0] if len(hit) == 1 else None


# --- latency reports ---------------------------------------------------------------

def _is_latency_report(d: Any) -> bool:
    return isinstance(d, dict) and isinstance(d.get("latency"), dict) and (
        "samples_ns" in d or "samples_ms" in d or "p50_ms" in d["latency"])


def _run(d: Dict[str, Any], file: str) -> Run:
    if "samples_ms" in d:
        samples = [float(x) for x in d["samples_ms"]]
    else:
        samples = [float(x) / 1e6 for x in d.get("samples_ns") or []]
    cond = dict(d.get("conditions") or {})
    device = d.get("device") or d.get("label") or HERE
    model_path = str(d.get("model") or "")
    bundle_dir = Path(model_path).name if model_path else None
    if bundle_dir and bundle_dir.endswith((".tflite", ".onnx")):
        bundle_dir = Path(model_path).parent.name
    backend = " ".join(str(x) for x in (d.get("backend"), d.get("backend_version")) if x)
    return Run(file=file, device=str(device), model=str(d.get("bundle") or d.get("name") or ""),
               target=d.get("target"), fmt=d.get("format"), bundle_dir=bundle_dir, samples_ms=samples,
               stats=dict(d["latency"]), end_to_end=d.get("end_to_end"), backend=backend,
               threads=d.get("threads"), conditions=cond, noisy=bool(d.get("noisy")),
               noise_reasons=list(d.get("noise_reasons") or []), timestamp=d.get("timestamp"),
               load_ms=d.get("load_ms"), first_inference_ms=d.get("first_inference_ms"))


def _latency_reports(d: Any, file: str) -> List[Run]:
    """Latency reports inside one JSON document: a report, a list of them (bench of several
    models), a fleet result list (`profile --json`: [{"data": {"report": ...}}]), or the main
    job's summary (bundles[].benchmark without samples is not a distribution: left out)."""
    out: List[Run] = []
    if _is_latency_report(d):
        out.append(_run(d, file))
    elif isinstance(d, list):
        for x in d:
            if _is_latency_report(x):
                out.append(_run(x, file))
            elif isinstance(x, dict) and _is_latency_report((x.get("data") or {}).get("report")):
                rep = dict(x["data"]["report"])
                rep.setdefault("device", x.get("device"))
                out.append(_run(rep, file))
    return out


# --- the walk ---------------------------------------------------------------------

def _json_files(roots: Iterable[Path], max_depth: int = 4) -> List[Path]:
    found: List[Path] = []
    for root in roots:
        if root.is_file() and root.suffix == ".json":
            found.append(root)
            continue
        base = len(root.parts)
        for dirpath, dirnames, filenames in os.walk(root):
            depth = len(Path(dirpath).parts) - base
            dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and depth < max_depth)
            found += [Path(dirpath) / f for f in sorted(filenames)
                      if f.endswith(".json") and not f.startswith(".")]
    return list(dict.fromkeys(found))


def _is_bundle_dir(p: Path) -> bool:
    return (p / "manifest.json").is_file()


def default_rollouts_dir() -> Path:
    """Where `edgekit deploy` keeps staged rollouts' records (the rule of edgekit.deploy.rollout,
    repeated here so that the report does not import the deploy side)."""
    if os.environ.get("EDGEKIT_ROLLOUTS"):
        return Path(os.environ["EDGEKIT_ROLLOUTS"])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "edgekit" / "rollouts"


def collect(build_dir: os.PathLike, profiles: Sequence[os.PathLike] = (),
            rollouts: Optional[Sequence[os.PathLike]] = None) -> ReportData:
    """Everything the report shows, from a convert output directory and optional directories of
    latency reports (profiles) and rollout records (None: the rollouts of this build's models in
    the default rollouts directory, if there is one)."""
    build = Path(build_dir)
    if not build.exists():
        raise ReportError("not found", path=str(build), hint="give the directory `edgekit convert --out` wrote")
    if not build.is_dir():
        raise ReportError("is not a directory", path=str(build),
                          hint="give the directory `edgekit convert --out` wrote")
    for p in list(profiles) + list(rollouts or []):
        if not Path(p).exists():
            raise ReportError("not found", path=str(p), hint="give a directory of profile / rollout JSON files")
    skipped: List[Tuple[str, str]] = []

    manifests: Dict[str, Dict[str, Any]] = {}
    for d in ([build] if _is_bundle_dir(build) else sorted(build.iterdir())):  # one bundle, or a build
        if d.is_dir() and _is_bundle_dir(d):
            m = _load_json(d / "manifest.json", skipped)
            if isinstance(m, dict):
                manifests[d.name] = m

    models: Dict[str, ModelInfo] = {}
    used_dirs = set()
    for f in sorted(build.glob("*.convert.json")):
        rep = _load_json(f, skipped)
        if not isinstance(rep, dict) or not isinstance(rep.get("bundles"), list):
            if rep is not None:
                skipped.append((str(f), "no bundles list"))
            continue
        name = str(rep.get("name") or f.name[: -len(".convert.json")])
        bundles = []
        for rec in rep["bundles"]:
            if not isinstance(rec, dict):
                continue
            key = Path(str(rec.get("path") or rec.get("bundle") or "")).name or f"{name}-{rec.get('target')}"
            used_dirs.add(key)
            if _failed(rec):
                # a failed row wrote nothing: a manifest at its path is another (earlier) run's, so none of its
                # figures (size, bytes per token, recipe, validation) go into this row; the old bundle, if there
                # is one, is its own entry, flagged
                bundles.append(_bundle(key, name, rec, {}))
                if key in manifests:
                    bundles.append(_stale(key, name, manifests[key]))
            else:
                bundles.append(_bundle(key, name, rec, manifests.get(key, {})))
        models[name] = ModelInfo(name, dict(rep.get("source") or {}), dict(rep.get("calibration") or {}),
                                 rep.get("max_accuracy_drop"), bundles)
    for key, m in manifests.items():  # bundles whose convert report is missing (or another tool's)
        if key in used_dirs:
            continue
        name = str(m.get("name") or key)
        info = models.setdefault(name, ModelInfo(name, dict(m.get("source") or {}),
                                                 dict(m.get("calibration") or {}),
                                                 (m.get("validation") or {}).get("max_accuracy_drop"), []))
        info.bundles.append(_bundle(key, name, {}, m))
    if not models:
        raise ReportError("holds no convert report (*.convert.json) and no bundle", path=str(build),
                          hint="run `edgekit convert ... --out DIR` first, then `edgekit report DIR`")

    # latency reports, optimize records and rollouts: anywhere under the build dir and the extra dirs
    runs: List[Run] = []
    llm_reports: List[Tuple[str, Dict[str, Any]]] = []
    rollout_recs: List[Dict[str, Any]] = []
    for f in _json_files([build, *map(Path, profiles), *map(Path, rollouts or [])]):
        if f.name == "manifest.json" or f.name.endswith(".convert.json"):
            continue
        d = _load_json(f, skipped)
        if d is None:
            continue
        if _is_rollout(f, d):
            rollout_recs.append(dict(d, _file=str(f)))
        elif f.name.endswith(OPTIMIZE_RECORDS) and isinstance(d, dict):
            kind = f.name.rsplit(".", 2)[-2]
            _attach_optimize(models, kind, d, str(f))
        else:
            runs += _latency_reports(d, str(f))
            llm_reports += [(str(f), r) for r in _llm_reports(d)]

    if rollouts is None and default_rollouts_dir().is_dir():
        for f in sorted(default_rollouts_dir().glob("*.json")):
            d = _load_json(f, skipped)
            if _is_rollout(f, d) and d.get("model") in models:
                rollout_recs.append(dict(d, _file=str(f)))

    unmatched = []
    for r in runs:
        b = _match(models, r)
        if b is None:
            unmatched.append(r)
        else:
            b.runs.append(r)
    for f, rep in llm_reports:
        b = _match_llm(models, rep)
        if b is None:
            skipped.append((f, f"a language-model benchmark of {rep.get('bundle') or rep.get('model')} "
                               f"({rep.get('target')}): no bundle of this build matches"))
        else:
            b.llm_runs.append(dict(rep, device=str(rep.get("device") or HERE), _file=f))
    return ReportData(str(build), list(models.values()), rollout_recs, unmatched, skipped)


def _is_rollout(f: Path, d: Any) -> bool:
    """A staged rollout's record (`edgekit deploy --canary/--batches`: <id>.json in its rollouts
    directory), or any *.rollout.json."""
    return isinstance(d, dict) and (f.name.endswith(".rollout.json") or (
        isinstance(d.get("batches"), list) and isinstance(d.get("devices"), (dict, list)) and "plan" in d))


def _match(models: Dict[str, ModelInfo], r: Run) -> Optional[BundleInfo]:
    every = [b for m in models.values() for b in m.bundles if b.status != "failed"]  # a failed row has no bundle
    if r.bundle_dir:
        hit = [b for b in every if b.key == r.bundle_dir]
        if len(hit) == 1:
            return hit[0]
    # on a device the bundle sits in a release directory named by its sha256: name, target and format decide
    hit = [b for b in every if b.model == r.model and b.target == r.target and b.fmt == r.fmt]
    return hit[0] if len(hit) == 1 else None


def _attach_optimize(models: Dict[str, ModelInfo], kind: str, d: Dict[str, Any], file: str) -> None:
    """A prune / distill / qat record goes with the model it produced bundles for (qat), or
    with the model whose name its file starts with; else with the first model."""
    rec = dict(d, _kind=kind, _file=file)
    stem = Path(file).name[: -len(f".{kind}.json")]
    for name in (stem, stem[: -len("-qat")] if stem.endswith("-qat") else stem):
        if name in models:
            models[name].optimize.append(rec)
            return
    next(iter(models.values())).optimize.append(rec)
