"""A served language model: serve/models' entry (active release, failures, the hot swap of a deployed
release) over the runtime's batching engine (edgekit.runtime.llm_batch, which keeps the engine only).

A new release loads (golden check, warm-up) beside the old one; new requests go to it once it is up, while
the old release's engine finishes the sequences it holds and then frees its memory."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from edgekit.bundle import sha256_tree
from edgekit.errors import BundleError
from edgekit.runtime.llm_batch import VERSION_CHARS, LLMRelease, load_llm_release
from edgekit.serve.models import ModelEntry

log = logging.getLogger("edgekit.serve")


def is_llm_path(path: Optional[Path]) -> bool:
    """An LLM bundle (manifest kind "llm") or a bare ONNX Runtime GenAI folder."""
    if path is None:
        return False
    from edgekit.runtime.llm import is_llm

    return is_llm(path)


def swap_threads(path: Path, threads: int, spinning: Optional[bool]) -> Tuple[int, bool]:
    """The thread count and spinning a release hot-swapped in loads with, given the active release's: the new
    bundle's own measured choice where its manifest has one for this machine (as load_llm's auto path reads it:
    threadprobe.from_manifest), else the active count; its spinning as measured with that count, else the
    active release's (at the same count), else what the new bundle's genai_config.json says. Never None: with
    more than one thread and spinning None, load_llm would time spinning both ways beside the decoding engine
    (llmthreads.choose_spinning). A manifest that cannot be read is load_llm's BundleError, as it would be."""
    from edgekit.runtime.llm import GENAI_CONFIG, MANIFEST, _read_json, check_manifest, profile_threads
    from edgekit.runtime.llmopts import spinning_of
    from edgekit.runtime.threadprobe import from_manifest
    from edgekit.runtime.threads import choose_threads

    model_dir, spin = path, None
    if (path / MANIFEST).is_file():
        manifest = _read_json(path / MANIFEST, MANIFEST)
        check_manifest(manifest, path / MANIFEST)
        got = from_manifest(manifest.get("runtime") or {}, choose_threads(None, profile_threads(manifest)))
        if got is not None:
            count, choice = got
            if isinstance(choice.get("spinning_chosen"), bool):
                spin = choice["spinning_chosen"]   # measured with that count
            if count != threads:
                spinning = None                    # the active release's was measured at another count
            threads = count
        model_dir = path / (manifest.get("model") or {}).get("dir", "model")
    if spin is None:
        spin = spinning
    if spin is None:
        try:
            spin = spinning_of(_read_json(model_dir / GENAI_CONFIG, GENAI_CONFIG))
        except BundleError:   # load_llm says what is wrong with the folder; the probe never runs before that
            spin = True       # ONNX Runtime's default
    return threads, spin


class LLMEntry(ModelEntry):
    """A served language model; its releases are runtime.llm_batch.LLMRelease (an engine each)."""

    kind = "llm"

    def __init__(self, src):
        super().__init__(src)
        self.active: Optional[LLMRelease] = None
        self.retiring: List[LLMRelease] = []     # replaced releases finishing their sequences (until drained)
        self._retiring_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        a = self.active
        return a is not None and a.engine.failed is None

    def state(self) -> Dict[str, Any]:
        a = self.active
        d: Dict[str, Any] = {"ready": self.ready, "kind": "llm", "source": self.source.kind,
                             "version": a.version if a else None, "sha256": a.sha256 if a else None,
                             "backend": f"onnxruntime (batched decoder; onnxruntime-genai {a.backend_version} "
                                        f"tokenizer)" if a else None,
                             "context": a.context if a else None, "threads": a.threads if a else None,
                             "load_seconds": round(a.load_seconds, 4) if a else None,
                             "golden_check": (None if a is None or a.check is None else
                                              {"ok": a.check["ok"], "top1_agreement": a.check["top1_agreement"],
                                               "snr_db": a.check["snr_db"]}),
                             "swaps": self.swaps}
        if a is not None:
            e = a.engine
            d["batching"] = {"max_sequences": e.max_sequences, "max_queue": e.max_queue,
                             "kv_cache_tokens": e.kv_budget_tokens, "kv_bytes_per_token": a.kv_bytes_per_token,
                             "active": len(e.active) + (e.long is not None), "waiting": len(e.waiting),
                             "steps": e.steps, "prefills": e.prefills}
        if self.loading:
            d["loading"] = self.loading[:VERSION_CHARS]
        if self.failure:
            d["failed_release"] = self.failure
        if a is not None and a.engine.failed:
            d["error"] = f"the generation thread failed: {a.engine.failed}"
        return d

    def _load(self, path: Path, **kw) -> LLMRelease:
        sha = path.name if self.source.kind == "deployed" else sha256_tree(path)
        a = self.active
        if a is not None and kw.get("threads") is None:
            # a hot swap (no --threads): no thread probe timing decode steps while the old engine decodes on the
            # same cores (a skewed choice, and slower streams meanwhile)
            threads, spinning = swap_threads(path, a.threads, a.spinning)
            kw = dict(kw, threads=threads, spinning=spinning)
        return load_llm_release(self.name, sha, path, **kw)

    def _drained(self, old: LLMRelease) -> None:
        """A replaced release's engine ended (its session and KV buffers freed): no reference to it is kept."""
        with self._retiring_lock:
            self.retiring = [r for r in self.retiring if r is not old]

    def _swapped(self, old: Optional[LLMRelease], rel: LLMRelease) -> None:
        if old is not None:
            old.engine.retire()
            with self._retiring_lock:
                self.retiring.append(old)
            old.engine.when_closed(lambda: self._drained(old))
            log.info("model %s: swapped %s -> %s (loaded, checked and warmed up in %.2f s); %s finishes its "
                     "%d sequence(s)", self.name, old.version, rel.version, rel.load_seconds, old.version,
                     len(old.engine.sequences))
        else:
            log.info("model %s: serving %s (language model, context %d, %d sequences, loaded in %.2f s)",
                     self.name, rel.version, rel.context, rel.engine.max_sequences, rel.load_seconds)

    def close(self, timeout: float = 10.0) -> None:
        """Server shutdown: every sequence is cancelled, each engine ends and frees its memory."""
        rels = ([self.active] if self.active else []) + list(self.retiring)
        for rel in rels:
            for seq in rel.engine.sequences:
                seq.cancel()
            rel.engine.retire()
        for rel in rels:
            rel.engine.join(timeout)
