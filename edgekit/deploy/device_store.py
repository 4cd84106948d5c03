"""The device side of the content-addressed upload (standard library only).

Deploy runs this file's source on the device as `python -c SOURCE ACTION ARGS` (ARGS: JSON, or
@FILE holding it) with the pushed runtime on PYTHONPATH; it prints one JSON answer. Layout, per model:

    models/<name>/objects/<sha256>          one file per distinct content, verified when it was named
    models/<name>/objects/.part-<sha256>    an upload in progress (resumed where it stopped)
    models/<name>/objects/.stamps.json      sha256 -> [size, mtime_ns] when last verified
    models/<name>/.incoming-<sha12>-<tag>/  a release being assembled: hard links to objects

A release directory holds hard links to the objects, so a new release that shares files with an
older one costs no upload and no disk for them. An object is trusted by its stamp (size and
mtime in nanoseconds as when it was hashed: a file changed in place through a release's link has
another mtime) and hashed again otherwise. An object no release links to any more (link count 1)
is removed by the next plan or gc, unless the upload being planned needs it.

Actions:
    plan    {mdir, want: {sha: bytes}, root, genai}  -> have, partial offsets, free disk and memory
    commit  {mdir, root, name, sha, files: {rel: sha}, uploaded: [sha], incoming, then: activate|store|none,
             keep, check}  -> verify and name the uploads, link the release, then activate or store it
    gc      {mdir, keep} -> prune old releases (keep), remove objects nothing links to
"""

import hashlib
import json
import os
import shutil
import sys

PART = ".part-"
STAMPS = ".stamps.json"


def _sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _is_sha(s):
    return isinstance(s, str) and len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def _load_stamps(objdir):
    try:
        with open(os.path.join(objdir, STAMPS)) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_stamps(objdir, stamps):
    tmp = os.path.join(objdir, ".stamps-%d.tmp" % os.getpid())
    with open(tmp, "w") as f:
        json.dump(stamps, f)
    os.replace(tmp, os.path.join(objdir, STAMPS))


def _stamp(path):
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _free_bytes(path):
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free


def _memory():
    """(available, total) bytes: MemAvailable / MemTotal, or the page counts where /proc lacks them."""
    avail = total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k == "MemAvailable":
                    avail = int(v.split()[0]) * 1024
                elif k == "MemTotal":
                    total = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        if avail is None:
            avail = os.sysconf("SC_AVPHYS_PAGES") * page
        if total is None:
            total = os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        pass
    return avail, total


def _genai():
    """Whether onnxruntime-genai is importable here (without importing it), and its version."""
    from importlib.util import find_spec

    try:
        spec = find_spec("onnxruntime_genai")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return {"available": False, "python": sys.executable}
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:   # Python 3.7: no importlib.metadata
        return {"available": True, "version": None, "python": sys.executable}
    try:
        v = version("onnxruntime-genai")
    except PackageNotFoundError:   # importable without metadata (a source tree on the path)
        v = None
    return {"available": True, "version": v, "python": sys.executable}


def _collect(objdir, keep_shas, stamps):
    """Remove uploads in progress and objects nothing links to, except those in keep_shas."""
    freed = 0
    if not os.path.isdir(objdir):
        return freed
    for n in os.listdir(objdir):
        p = os.path.join(objdir, n)
        sha = n[len(PART):] if n.startswith(PART) else n
        if not _is_sha(sha) or sha in keep_shas:
            continue
        try:
            st = os.lstat(p)
            if n.startswith(PART) or st.st_nlink <= 1:
                os.unlink(p)
                freed += st.st_size
                stamps.pop(sha, None)
        except OSError:
            pass
    return freed


def plan(a):
    mdir, want = a["mdir"], a["want"]
    objdir = os.path.join(mdir, "objects")
    os.makedirs(objdir, exist_ok=True)
    stamps = _load_stamps(objdir)
    before = dict(stamps)
    freed = _collect(objdir, set(want), stamps)
    have, partial, rehashed, bad = [], {}, 0, []
    for sha, size in want.items():
        if not _is_sha(sha):
            raise ValueError("not a sha256: %r" % (sha,))
        obj = os.path.join(objdir, sha)
        part = os.path.join(objdir, PART + sha)
        if os.path.isfile(obj):
            st = _stamp(obj)
            if st[0] == size and stamps.get(sha) == st:
                have.append(sha)
                continue
            if st[0] == size and _sha256(obj) == sha:   # not stamped (or touched): hashed again
                rehashed += size
                stamps[sha] = _stamp(obj)
                have.append(sha)
                continue
            os.unlink(obj)   # damaged: its releases keep their (damaged) link; the object is uploaded again
            stamps.pop(sha, None)
            bad.append(sha)
        if os.path.isfile(part):
            n = os.path.getsize(part)
            if n <= size:
                partial[sha] = n
            else:
                os.unlink(part)
    if stamps != before:
        _save_stamps(objdir, stamps)
    avail, total = _memory()
    out = {"have": have, "partial": partial, "damaged": bad, "rehashed_bytes": rehashed, "freed_bytes": freed,
           "free_bytes": _free_bytes(mdir), "mem_available": avail, "mem_total": total}
    if a.get("genai"):
        out["genai"] = _genai()
    return out


def _link(src, dst):
    """Hard link, or a copy where the filesystem has none. True when linked."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copyfile(src, dst)
        return False


def commit(a):
    """Name the uploads, assemble the release from links, then activate / store it. With `then`,
    releases.activate (or store) hashes the whole release against its sha256 anyway, so the uploads
    are verified by that one pass; only when it fails is each object hashed, to find and remove the
    bad ones (reused ones too: the next upload sends them again). Without `then` each upload is hashed
    here before it is named."""
    mdir, files, incoming = a["mdir"], a["files"], a["incoming"]
    then = a.get("then") or "none"
    if then not in ("none", "activate", "store"):
        raise ValueError("then: %r" % (then,))
    if not incoming.startswith(".incoming-") or "/" in incoming:
        raise ValueError("not an upload directory name: %r" % (incoming,))
    objdir = os.path.join(mdir, "objects")
    stamps = _load_stamps(objdir)
    bad, named = {}, []
    for sha in a.get("uploaded", []):
        part = os.path.join(objdir, PART + sha)
        if not os.path.isfile(part):
            bad[sha] = "missing"
            continue
        if then == "none":
            got = _sha256(part)
            if got != sha:
                os.unlink(part)
                bad[sha] = got
                continue
        os.replace(part, os.path.join(objdir, sha))
        named.append(sha)
        if then == "none":
            stamps[sha] = _stamp(os.path.join(objdir, sha))
    out = {"bad": bad, "incoming": incoming, "linked": 0, "copied": 0}
    if bad:
        _save_stamps(objdir, stamps)
        return out
    inc = os.path.join(mdir, incoming)
    shutil.rmtree(inc, ignore_errors=True)
    os.makedirs(inc)
    try:
        for rel, sha in sorted(files.items()):
            parts = rel.split("/")
            if rel.startswith("/") or ".." in parts or not _is_sha(sha):
                raise ValueError("bad release entry %r" % (rel,))
            dst = os.path.join(inc, *parts)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if _link(os.path.join(objdir, sha), dst):
                out["linked"] += 1
            else:
                out["copied"] += 1
    except BaseException:
        shutil.rmtree(inc, ignore_errors=True)
        raise
    if then == "none":
        _save_stamps(objdir, stamps)
        return out
    from edgekit.errors import EdgekitError
    from edgekit.runtime import releases

    try:
        if then == "activate":
            out["result"] = releases.activate(a["root"], a["name"], a["sha"], incoming=incoming,
                                              keep=int(a.get("keep", 3)), check=bool(a.get("check", True)))
        else:
            out["result"] = releases.store(a["root"], a["name"], a["sha"], incoming)
    except EdgekitError:
        for sha in sorted(set(files.values())):    # which objects are bad: removed, so they are sent again
            obj = os.path.join(objdir, sha)
            got = _sha256(obj) if os.path.isfile(obj) else "missing"
            if got != sha:
                if os.path.isfile(obj):
                    os.unlink(obj)
                stamps.pop(sha, None)
                bad[sha] = got
            else:
                stamps[sha] = _stamp(obj)
        _save_stamps(objdir, stamps)
        if bad:
            out["bad"] = bad
            return out
        raise
    for sha in named:    # verified just now as part of the release's sha256
        stamps[sha] = _stamp(os.path.join(objdir, sha))
    _save_stamps(objdir, stamps)
    return out


def gc(a):
    mdir = a["mdir"]
    pruned = []
    if a.get("keep") and os.path.isdir(os.path.join(mdir, "releases")):
        from pathlib import Path

        from edgekit.runtime import releases

        pruned = releases.prune(Path(mdir), int(a["keep"]))
    objdir = os.path.join(mdir, "objects")
    stamps = _load_stamps(objdir)
    before = dict(stamps)
    freed = _collect(objdir, set(a.get("keep_objects") or ()), stamps)
    if os.path.isdir(objdir) and stamps != before:
        _save_stamps(objdir, stamps)
    return {"pruned": pruned, "freed_bytes": freed, "free_bytes": _free_bytes(mdir)}


ACTIONS = {"plan": plan, "commit": commit, "gc": gc}


def main(argv):
    action, arg = argv[0], argv[1]
    if arg.startswith("@"):
        with open(arg[1:]) as f:
            args = json.load(f)
        os.unlink(arg[1:])
    else:
        args = json.loads(arg)
    try:
        from edgekit.errors import EdgekitError   # the pushed runtime's (releases raise it)
    except ImportError:
        EdgekitError = ValueError
    try:
        out = ACTIONS[action](args)
    except EdgekitError as e:
        print("error: %s" % (e,), file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as e:
        print("error: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
