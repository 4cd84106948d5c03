"""The device side of a deploy: releases, the `current` switch, health check, rollback.

Runs on the device (standard library and numpy), called over SSH as
`python -m edgekit.runtime release ...`. Layout under the device root:

    models/<name>/releases/<sha256>/   one directory per bundle (sha256 of the whole bundle)
    models/<name>/current -> releases/<sha256>
    models/<name>/history              one activated sha256 per line (for rollback)
    models/<name>/.incoming-*          uploads in progress (never read as a release)

Every switch of `current` is a new symlink renamed over the old one (atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from edgekit.bundle import check_name, sha256_tree
from edgekit.errors import BundleError, EdgekitError

KEEP_DEFAULT = 3
_INCOMING = re.compile(r"^\.incoming-[0-9a-f]{12}-[0-9a-f]{8}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def _check_sha(sha: str) -> str:
    if not sha or not _SHA.match(sha):
        raise BundleError(f"{sha!r} is not a release id (64 hex digits)")
    return sha


def model_dir(root: str, name: str) -> Path:
    return Path(root) / "models" / check_name(name)


def _current(mdir: Path) -> Optional[str]:
    cur = mdir / "current"
    if not cur.is_symlink():
        return None
    return Path(os.readlink(cur)).name


def _history(mdir: Path) -> List[str]:
    try:
        return [ln.strip() for ln in (mdir / "history").read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return []


def _append_history(mdir: Path, sha: str) -> None:
    with open(mdir / "history", "a") as f:
        f.write(sha + "\n")
        f.flush()
        os.fsync(f.fileno())


def switch(mdir: Path, sha: Optional[str]) -> None:
    """Point `current` at releases/<sha> by renaming a new symlink over it (or remove it)."""
    cur = mdir / "current"
    if sha is None:
        if cur.is_symlink():
            cur.unlink()
        return
    tmp = mdir / f".current-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.join("releases", sha), tmp)
    os.replace(tmp, cur)


def status(root: str, name: Optional[str] = None, health: bool = False) -> Dict[str, Any]:
    base = Path(root) / "models"
    names = [name] if name else sorted(p.name for p in base.iterdir() if p.is_dir()) \
        if base.is_dir() else []
    out: Dict[str, Any] = {"root": str(root), "models": {}}
    for n in names:
        mdir = model_dir(root, n)
        rel = mdir / "releases"
        releases = []
        if rel.is_dir():
            for r in sorted(rel.iterdir(), key=lambda p: p.stat().st_mtime):
                if not r.is_dir() or r.name.startswith("."):
                    continue
                info: Dict[str, Any] = {"sha256": r.name, "mtime": r.stat().st_mtime}
                try:
                    m = json.loads((r / "manifest.json").read_text())
                    info.update(target=m["target"]["name"], format=m["model"]["format"],
                                created=m.get("created"))
                except (OSError, ValueError, KeyError):
                    info["error"] = "manifest unreadable"
                releases.append(info)
        entry: Dict[str, Any] = {"current": _current(mdir), "releases": releases,
                                 "history": _history(mdir)[-10:],
                                 "incoming": sorted(p.name for p in mdir.glob(".incoming-*"))}
        if health and entry["current"]:
            entry["health"] = health_check(mdir / "current")
        out["models"][n] = entry
    existing = Path(root)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    out["free_bytes"] = shutil.disk_usage(existing).free
    return out


def verify(path: Path, sha: str) -> bool:
    return path.is_dir() and sha256_tree(path) == sha


def health_check(bundle_dir: Path, verified: bool = False) -> Dict[str, Any]:
    """Load through the runtime and compare the golden outputs; never raises. `verified`: the
    release's sha256 was checked just now, so the model file is not hashed a second time."""
    try:
        from edgekit.runtime import load
        from edgekit.runtime.check import golden_check

        m = load(bundle_dir, verify=not verified)
        res = golden_check(m)
        res.update(backend=m.backend, backend_version=m.backend_version,
                   backend_preferred=m.backend_preferred, backend_note=m.backend_note)
        return res
    except EdgekitError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # a backend crash is a failed health check, not a crashed deploy
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def tree_digest(file_digests: Dict[str, str]) -> str:
    """bundle.sha256_tree's digest from per-file sha256s keyed by relative posix path (the
    controller's release id: deploy.artifact.tree_digest)."""
    h = hashlib.sha256()
    for rel in sorted(file_digests):
        h.update(rel.encode() + b"\0")
        h.update(file_digests[rel].encode() + b"\n")
    return h.hexdigest()


def _verified_digest(inc: Path, verified: Dict[str, Any]) -> str:
    """The release id of an upload directory whose files the device's object store verified
    (`verified`: relpath -> [sha256, bytes], each hashed when its object entered the store and
    trusted by its stamp since): the files present must be exactly those, with those sizes."""
    seen: Dict[str, int] = {}
    for d, _, names in os.walk(inc):
        for n in names:
            p = os.path.join(d, n)
            seen[Path(p).relative_to(inc).as_posix()] = os.stat(p).st_size
    want = {rel: int(v[1]) for rel, v in verified.items()}
    if seen != want:
        odd = sorted(set(seen) ^ set(want)) or sorted(r for r in seen if seen[r] != want[r])
        raise BundleError(f"upload verification failed: {', '.join(odd[:3])} not as verified on the device",
                          hint="the transfer was corrupted; deploy again")
    return tree_digest({rel: v[0] for rel, v in verified.items()})


def _take_upload(mdir: Path, incoming: str, sha: str, verified: Optional[Dict[str, Any]] = None) -> Path:
    """Verify an upload directory against the sha256 the controller sent; rename it into place.
    `verified` (from the device's object store, see deploy/device_store.py): the files' digests,
    each verified once as it arrived, so nothing is read again here; without it every file is hashed."""
    rel = mdir / "releases"
    rel.mkdir(parents=True, exist_ok=True)
    target = rel / _check_sha(sha)
    if not _INCOMING.match(incoming):
        raise BundleError(f"{incoming!r} is not an upload directory name")
    inc = mdir / incoming
    if not inc.is_dir():
        raise BundleError(f"upload directory {incoming} is missing on the device",
                          hint="the upload was interrupted; deploy again")
    try:
        got = _verified_digest(inc, verified) if verified is not None else sha256_tree(inc)
    except BundleError:
        shutil.rmtree(inc, ignore_errors=True)
        raise
    if got != sha:
        shutil.rmtree(inc, ignore_errors=True)
        raise BundleError(f"upload verification failed: sha256 {got[:12]}… on the device, "
                          f"{sha[:12]}… sent", hint="the transfer was corrupted; deploy again")
    if target.exists():
        stale = rel / f".replaced-{sha[:12]}-{os.getpid()}"
        os.replace(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(inc, target)
    return target


def store(root: str, name: str, sha: str, incoming: str,
          verified: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Keep an uploaded release without switching `current` (used by profile)."""
    target = _take_upload(model_dir(root, name), incoming, sha, verified)
    return {"name": name, "sha256": sha, "path": str(target), "status": "stored"}


def activate(root: str, name: str, sha: str, incoming: Optional[str] = None,
             keep: int = KEEP_DEFAULT, check: bool = True,
             verified: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Verify an upload (or an existing release), switch `current` to it, health-check,
    roll back on failure, prune old releases. Returns what happened. `verified`: see _take_upload."""
    mdir = model_dir(root, name)
    rel = mdir / "releases"
    rel.mkdir(parents=True, exist_ok=True)
    target = rel / _check_sha(sha)
    previous = _current(mdir)
    result: Dict[str, Any] = {"name": name, "sha256": sha, "previous": previous}
    if incoming is not None:
        _take_upload(mdir, incoming, sha, verified)   # the one sha256 of the bundle on the device
    elif not verify(target, sha):
        raise BundleError(f"release {sha[:12]}… is missing or modified on the device",
                          hint="deploy uploads it again")
    if previous == sha:
        result["status"] = "unchanged"
    else:
        switch(mdir, sha)
        os.utime(target)
        _append_history(mdir, sha)
        result["status"] = "deployed"
    if check:
        h = health_check(mdir / "current", verified=True)
        result["health"] = h
        if not h.get("ok"):
            switch(mdir, previous if previous and (rel / previous).is_dir() else None)
            if previous:
                _append_history(mdir, previous)
            result["status"] = "rolled-back"
            result["current"] = previous
            return result
    result["current"] = sha
    result["pruned"] = prune(mdir, keep)
    return result


def rollback(root: str, name: str, to: Optional[str] = None, check: bool = True) -> Dict[str, Any]:
    mdir = model_dir(root, name)
    cur = _current(mdir)
    rel = mdir / "releases"
    if to is None:
        hist = [h for h in _history(mdir) if h != cur and (rel / h).is_dir()]
        if not hist:
            raise EdgekitError(f"model '{name}' has no earlier release to roll back to")
        to = hist[-1]
    else:
        matches = [p.name for p in rel.iterdir() if p.name.startswith(to)] if rel.is_dir() else []
        if len(matches) != 1:
            raise EdgekitError(f"no single release of '{name}' starts with '{to}'"
                               + (f" (matches: {', '.join(m[:12] for m in matches)})" if matches else ""))
        to = matches[0]
    switch(mdir, to)
    os.utime(rel / to)
    _append_history(mdir, to)
    res: Dict[str, Any] = {"name": name, "previous": cur, "current": to, "status": "rolled-back"}
    if check:
        res["health"] = health_check(mdir / "current")
    return res


def revert(root: str, name: str, sha: str, to: Optional[str]) -> Dict[str, Any]:
    """Undo one activation: if `current` is still `sha`, point it back at `to` (None: no
    current release, as before a first deploy). Idempotent, so an aborted rollout can be
    reverted again after a crash of its controller."""
    mdir = model_dir(root, name)
    cur = _current(mdir)
    res: Dict[str, Any] = {"name": name, "previous": cur, "current": cur, "status": "not-current"}
    if cur != _check_sha(sha):
        return res
    if to is not None and not (mdir / "releases" / _check_sha(to)).is_dir():
        raise BundleError(f"release {to[:12]}… of '{name}' is gone from the device: cannot revert to it")
    switch(mdir, to)
    if to is not None:
        _append_history(mdir, to)
    res.update(current=to, status="reverted")
    return res


def prune(mdir: Path, keep: int) -> List[str]:
    """Keep the newest `keep` releases (current always kept); remove stale uploads."""
    rel = mdir / "releases"
    cur = _current(mdir)
    dirs = sorted((p for p in rel.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for p in dirs[max(keep, 1):]:
        if p.name != cur:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    for p in rel.glob(".replaced-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in mdir.glob(".incoming-*"):  # an interrupted upload older than a minute
        if time.time() - p.stat().st_mtime > 60:
            shutil.rmtree(p, ignore_errors=True)
    return removed


def clean_incoming(root: str, name: str) -> List[str]:
    """Remove every unfinished upload of a model (called before a new upload starts)."""
    mdir = model_dir(root, name)
    gone = []
    for p in mdir.glob(".incoming-*"):
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p.name)
    return gone
