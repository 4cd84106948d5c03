"""The device side of the content-addressed upload (standard library only).

Deploy runs this file's source on the device as `python -c SOURCE ACTION ARGS` (ARGS: JSON, or
@FILE holding it) with the pushed runtime on PYTHONPATH. Layout, per model:

    models/<name>/objects/<sha256>          one file per distinct content, verified when it was named
    models/<name>/objects/.part-<sha256>    an upload in progress (resumed where it stopped)
    models/<name>/objects/.stamps.json      sha256 -> [size, mtime_ns, ctime_ns, inode] when last verified
    models/<name>/.incoming-<sha12>-<tag>/  a release being assembled: hard links to objects

A release directory holds hard links to the objects, so a new release that shares files with an
older one costs no upload and no disk for them. Each byte is hashed once on the device: an object
is hashed as it arrives (on the device's standard input: `session`) and named by its sha256 only
when that matches; afterwards it is trusted by its stamp (size, mtime, ctime and inode as when it
was verified: a write through a release's link changes mtime and ctime, and ctime cannot be set
back) and hashed again otherwise. A release's sha256 is then computed from the verified objects'
digests (bundle.sha256_tree's formula), not by reading the files again. An object no release links
to any more (link count 1) is removed by the next plan or gc, unless the upload being planned needs it.

Actions (one JSON answer each):
    plan    {mdir, want: {sha: bytes}, root, genai}  -> have, partial offsets, free disk and memory
    commit  {mdir, root, name, sha, files: {rel: sha}, uploaded: [sha], incoming, then: activate|store|none,
             keep, check}  -> verify and name the uploads, link the release, then activate or store it
    gc      {mdir, keep} -> prune old releases (keep), remove objects nothing links to
    session {plan's args} -> the whole upload in one device process: plan's answer as a line, then
            requests on standard input, one JSON line each, answered by one JSON line:
              {"op": "put", "sha", "size", "offset"} + size - offset raw bytes: appended to .part-<sha>
                  (its first offset bytes hashed from the disk), hashed as they arrive, named when the
                  sha256 matches (answered only when the digest differs, or the stream ended early: EOF)
              {"op": "commit" | "plan" | "gc", ...that action's args} -> its answer
            an error answers {"error": message}; end of input ends the process.
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
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _restamp(objdir, stamps, shas, trusted):
    """Record the new ctime of objects whose link count this process changed (a link or unlink
    changes ctime). Only objects in `trusted` (verified or stamp-checked by this process, with the
    stamps taken then) and with the same size, mtime and inode as then."""
    for sha in shas:
        old = trusted.get(sha)
        if old is None:
            continue
        try:
            st = _stamp(os.path.join(objdir, sha))
        except OSError:
            continue
        if st[0] == old[0] and st[1] == old[1] and st[3] == old[3]:
            stamps[sha] = st


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
    for where in spec.submodule_search_locations or ():   # its dist-info beside it: no scan of every package
        parent = os.path.dirname(where)
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for n in names:
            if n.startswith("onnxruntime_genai-") and n.endswith(".dist-info"):
                return {"available": True, "version": n[len("onnxruntime_genai-"):-len(".dist-info")],
                        "python": sys.executable}
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


def _hashing_copy(src, dst, sha):
    """Copy an object into a release where the filesystem has no hard links; verified as copied."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            b = fi.read(1 << 20)
            if not b:
                break
            h.update(b)
            fo.write(b)
    if h.hexdigest() != sha:
        raise ValueError("object %s changed while it was copied into the release" % (sha[:12],))


def _check_objects(objdir, shas, stamps, verified):
    """Each object's stamp against the store's record (hashed again where it differs). Returns
    ({sha: stamp} trusted now, {sha: what was found} bad ones, bytes hashed)."""
    trusted, bad, rehashed = {}, {}, 0
    for sha in shas:
        obj = os.path.join(objdir, sha)
        try:
            st = _stamp(obj)
        except OSError:
            bad[sha] = "missing"
            continue
        if sha in verified and verified[sha] == st:
            trusted[sha] = st
            continue
        if stamps.get(sha) == st:
            trusted[sha] = st
            continue
        got = _sha256(obj)
        rehashed += st[0]
        if got == sha:
            trusted[sha] = stamps[sha] = _stamp(obj)
        else:
            os.unlink(obj)
            stamps.pop(sha, None)
            bad[sha] = got
    return trusted, bad, rehashed


def commit(a, verified=None):
    """Name the uploads (those not verified as they arrived are hashed now), check every object
    the release needs against the store's record, assemble the release from links, then activate /
    store it, its sha256 computed from the objects' verified digests. `verified`: {sha: stamp} of
    the objects this process hashed as they arrived (session)."""
    mdir, files, incoming = a["mdir"], a["files"], a["incoming"]
    verified = dict(verified or {})
    then = a.get("then") or "none"
    if then not in ("none", "activate", "store"):
        raise ValueError("then: %r" % (then,))
    if not incoming.startswith(".incoming-") or "/" in incoming:
        raise ValueError("not an upload directory name: %r" % (incoming,))
    objdir = os.path.join(mdir, "objects")
    stamps = _load_stamps(objdir)
    bad = {}
    for sha in a.get("uploaded", []):
        if sha in verified:
            continue
        part = os.path.join(objdir, PART + sha)
        if not os.path.isfile(part):
            if not os.path.isfile(os.path.join(objdir, sha)):
                bad[sha] = "missing"
            continue
        got = _sha256(part)
        if got != sha:
            os.unlink(part)
            bad[sha] = got
            continue
        os.replace(part, os.path.join(objdir, sha))
        verified[sha] = stamps[sha] = _stamp(os.path.join(objdir, sha))
    out = {"bad": bad, "incoming": incoming, "linked": 0, "copied": 0}
    if bad:
        _save_stamps(objdir, stamps)
        return out
    need = sorted(set(files.values()))
    trusted, bad, out["rehashed_bytes"] = _check_objects(objdir, need, stamps, verified)
    if bad:
        out["bad"] = bad
        _save_stamps(objdir, stamps)
        return out
    inc = os.path.join(mdir, incoming)
    shutil.rmtree(inc, ignore_errors=True)
    os.makedirs(inc)
    digests = {}
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
                _hashing_copy(os.path.join(objdir, sha), dst, sha)
                out["copied"] += 1
            digests[rel] = [sha, trusted[sha][0]]
    except BaseException:
        shutil.rmtree(inc, ignore_errors=True)
        raise
    _restamp(objdir, stamps, need, trusted)
    _save_stamps(objdir, stamps)
    if then == "none":
        return out
    from edgekit.runtime import releases

    if then == "activate":
        out["result"] = releases.activate(a["root"], a["name"], a["sha"], incoming=incoming,
                                          keep=int(a.get("keep", 3)), check=bool(a.get("check", True)),
                                          verified=digests)
    else:
        out["result"] = releases.store(a["root"], a["name"], a["sha"], incoming, verified=digests)
    stamps = _load_stamps(objdir)
    _restamp(objdir, stamps, need, {sha: stamps[sha] for sha in need if sha in stamps})   # pruned releases' unlinks
    _save_stamps(objdir, stamps)
    return out


def gc(a):
    mdir = a["mdir"]
    pruned = []
    objdir = os.path.join(mdir, "objects")
    stamps = _load_stamps(objdir)
    if a.get("keep") and os.path.isdir(os.path.join(mdir, "releases")):
        from pathlib import Path

        from edgekit.runtime import releases

        trusted = {}
        for sha, rec in stamps.items():       # checked now: the prune's unlinks change their ctime
            try:
                if _stamp(os.path.join(objdir, sha)) == rec:
                    trusted[sha] = rec
            except OSError:
                pass
        pruned = releases.prune(Path(mdir), int(a["keep"]))
        _restamp(objdir, stamps, list(trusted), trusted)
    before = _load_stamps(objdir)
    freed = _collect(objdir, set(a.get("keep_objects") or ()), stamps)
    if os.path.isdir(objdir) and stamps != before:
        _save_stamps(objdir, stamps)
    return {"pruned": pruned, "freed_bytes": freed, "free_bytes": _free_bytes(mdir)}


def _put(objdir, req, inp, stamps):
    """Receive one object from `inp` (see `session`); verified, named and stamped when its sha256
    matches. Returns the answer; None when the input ended before the object did (what arrived is
    kept in .part-<sha>, where the next upload resumes)."""
    sha, size, offset = req["sha"], int(req["size"]), int(req.get("offset") or 0)
    if not _is_sha(sha) or not 0 <= offset <= size:
        raise ValueError("bad put request %r" % (req,))
    part = os.path.join(objdir, PART + sha)
    h = hashlib.sha256()
    short = False
    fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if offset:                  # a resumed upload: what is there already is hashed first
            with open(part, "rb") as f:
                left = offset
                while left:
                    b = f.read(min(left, 1 << 20))
                    if not b:
                        short = True
                        break
                    h.update(b)
                    left -= len(b)
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        left = size - offset
        while left:
            b = inp.read1(min(left, 1 << 20))
            if not b:
                return None
            view = memoryview(b)
            while view:
                view = view[os.write(fd, view):]
            h.update(b)
            left -= len(b)
    finally:
        os.close(fd)
    got = h.hexdigest()
    if short or got != sha:
        os.unlink(part)
        return {"sha": sha, "bad": "short" if short else got}
    obj = os.path.join(objdir, sha)
    os.replace(part, obj)
    stamps[sha] = _stamp(obj)
    _save_stamps(objdir, stamps)
    return {"sha": sha, "ok": True}


def session(a):
    """The whole upload in one process (see the module's docstring). Returns the exit status."""
    def answer(d):
        sys.stdout.write(json.dumps(d) + "\n")
        sys.stdout.flush()

    try:
        answer(plan(a))
    except (OSError, ValueError, KeyError) as e:
        print("error: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 2
    objdir = os.path.join(a["mdir"], "objects")
    inp = sys.stdin.buffer
    try:                            # a bigger pipe from sshd: fewer, larger reads (Linux)
        import fcntl

        fcntl.fcntl(inp.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError, ValueError):
        pass
    EdgekitError = _edgekit_error()
    verified = {}
    while True:
        line = inp.readline()
        if not line:
            return 0
        req = op = None
        try:
            req = json.loads(line)
            op = req.pop("op")
            if op == "put":
                stamps = _load_stamps(objdir)
                r = _put(objdir, req, inp, stamps)
                if r is None:
                    return 0        # the controller went away mid-object
                if r.get("ok"):
                    verified[r["sha"]] = stamps[r["sha"]]
                answer(r)
            elif op == "commit":
                answer(commit(req, verified))
            elif op in ("plan", "gc"):
                answer(ACTIONS[op](req))
            else:
                raise ValueError("unknown request %r" % (op,))
        except EdgekitError as e:
            answer({"error": str(e)})
        except (OSError, ValueError, KeyError, TypeError) as e:
            answer({"error": "%s: %s" % (type(e).__name__, e)})
            if op == "put":
                return 2            # the stream is out of step with the requests now


def _edgekit_error():
    try:
        from edgekit.errors import EdgekitError   # the pushed runtime's (releases raise it)
        return EdgekitError
    except ImportError:
        return ValueError


ACTIONS = {"plan": plan, "commit": commit, "gc": gc}


def main(argv):
    action, arg = argv[0], argv[1]
    if arg.startswith("@"):
        with open(arg[1:]) as f:
            args = json.load(f)
        os.unlink(arg[1:])
    else:
        args = json.loads(arg)
    if action == "session":
        return session(args)
    EdgekitError = _edgekit_error()
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
