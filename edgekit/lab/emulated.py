"""An emulated arm64 Raspberry-Pi-OS-like device, for users (and tests) without a board.

Debian 12 arm64 (the base of Raspberry Pi OS Bookworm) built by debootstrap, with
Python 3.11, numpy<2 and tflite-runtime 2.14 (what older Pi images run) in a venv, and
OpenSSH's sshd. Real aarch64 binaries run under qemu-user-static through binfmt_misc,
so the TFLite kernels exercised are the ARM ones. The root is built once and cached,
keyed by its recipe; a device is that root's aarch64 sshd, chrooted, in its own network
namespace (a LocalDevice), with its own host key and device root.

    python -m edgekit.lab.emulated build        # build (or find) the cached root
    python -m edgekit.lab.emulated build --llm  # ... and its venv with onnxruntime-genai (language models)
    edgekit device emulate up|down|status       # the same, as an inventory device

Needs Linux, root, debootstrap, qemu-user-static, openssh-client, iproute2, and the
Debian and PyPI registries for the build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from edgekit.errors import DeviceError
from edgekit.lab import keys, local
from edgekit.lab.local import LocalDevice, _sh, check_prerequisites, free_net, free_slot, sshd_config

RECIPE: Dict[str, object] = {
    "version": 1,
    "suite": "bookworm",
    "arch": "arm64",
    "variant": "minbase",
    "include": ["python3", "python3-venv", "python3-pip", "openssh-server", "ca-certificates"],
    "pip": ["numpy<2", "tflite-runtime==2.14.0"],
}
VENV = "/opt/edgekit-venv"
DEVICE_ROOT = "/var/lib/edgekit"          # the edgekit root, as the device sees it
QEMU = "/usr/bin/qemu-aarch64-static"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# The standard qemu-aarch64 registration (ELF64, little endian, e_machine 0xb7), F: the
# interpreter is opened now, so it works inside chroots.
_BINFMT_LINE = (r":qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
                r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
                f":{QEMU}:F")


def recipe_key(recipe: Dict[str, object] = RECIPE) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEKIT_EMULATE_CACHE", Path.home() / ".cache" / "edgekit" / "emulated"))


def root_path(recipe: Dict[str, object] = RECIPE) -> Path:
    return cache_dir() / recipe_key(recipe) / "root"


def is_built(recipe: Dict[str, object] = RECIPE) -> bool:
    return (cache_dir() / recipe_key(recipe) / ".complete").is_file()


def check_tools() -> None:
    missing = [p for p, t in (("debootstrap", "debootstrap"), ("qemu-user-static", QEMU)) if not shutil.which(t)]
    if missing:
        raise DeviceError("an emulated device needs " + " and ".join(missing),
                          hint="apt-get install qemu-user-static debootstrap")


def ensure_binfmt() -> None:
    """Mount binfmt_misc if needed and register qemu-aarch64 (with the F flag)."""
    if not (BINFMT / "register").exists():
        r = _sh("mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT), check=False)
        if r.returncode != 0:
            raise DeviceError(f"cannot mount binfmt_misc: {r.stderr.strip()}",
                              hint="run as root on a Linux host that allows it")
    entry = BINFMT / "qemu-aarch64"
    if entry.exists():
        text = entry.read_text()
        if "enabled" in text and "F" in (re.search(r"flags: (\w*)", text) or [None, ""])[1]:
            return
        entry.write_text("-1")  # a registration without F cannot run inside a chroot: replace it
    (BINFMT / "register").write_text(_BINFMT_LINE)


def debian_mirror() -> str:
    """The Debian mirror apt already uses here."""
    sources = Path("/etc/apt/sources.list.d")
    for f in [sources / "debian.sources"] + sorted(sources.glob("*.sources")):
        if f.is_file():
            for block in f.read_text().split("\n\n"):
                uris = re.search(r"^URIs:\s*(\S+)", block, re.M)
                suites = re.search(r"^Suites:\s*(.+)$", block, re.M)
                if uris and suites and "bookworm" in suites.group(1).split() and "security" not in uris.group(1):
                    return uris.group(1)
    sl = Path("/etc/apt/sources.list")
    if sl.is_file():
        m = re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", sl.read_text(), re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


# The one chroot script: /dev and /proc mounted into the root (in the caller's own mount
# namespace: `unshare -m` here, `ip netns exec` for a device's sshd), then argv inside it.
_CHROOT = ('mount --bind /dev "$1/dev" && mount -t proc proc "$1/proc" && '
           'root="$1" && shift && exec chroot "$root" "$@"')


def _chroot_argv(root: Path, argv: List[str]) -> List[str]:
    return ["sh", "-c", _CHROOT, "sh", str(root), *argv]


def in_root(root: Path, argv: List[str], env: Optional[Dict[str, str]] = None, log=None,
            timeout: float = 1800, capture: bool = False) -> subprocess.CompletedProcess:
    """Run argv chrooted into root, with /dev and /proc mounted in a private mount namespace.
    Output goes to `log` (stdout and stderr together), or is captured as text with `capture`."""
    e = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
         "LANG": "C.UTF-8"}
    e.update(env or {})
    cmd = ["unshare", "-m", "--propagation", "private", *_chroot_argv(root, argv)]
    if capture:
        return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout, check=False)
    return subprocess.run(cmd, env=e, stdout=log, stderr=subprocess.STDOUT if log else None,
                          timeout=timeout, check=False)


def popen_in_root(root: Path, argv: List[str], env: Optional[Dict[str, str]] = None, **popen) -> subprocess.Popen:
    """As in_root, but started and left running (a process the caller talks to over pipes)."""
    e = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
         "LANG": "C.UTF-8"}
    e.update(env or {})
    return subprocess.Popen(["unshare", "-m", "--propagation", "private", *_chroot_argv(root, argv)], env=e, **popen)


HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
ROOT_CA = "/etc/ssl/certs/edgekit-host-ca.crt"    # the host's CA bundle, as the root sees it


def refresh_ca(root: Path) -> Optional[str]:
    """Copy this host's current CA bundle into the root (temp + rename) and point the root's pip at
    it (/etc/pip.conf); returns its path inside the root, None when the host has none. Done at
    every use that may reach a registry (build, device up): a copy from the day the root was
    built goes stale when a registry's (or a proxy's) chain changes, and pip inside then fails
    with CERTIFICATE_VERIFY_FAILED while pip here works."""
    if not HOST_CA.is_file():
        return None
    for rel, data in ((ROOT_CA, HOST_CA.read_bytes()), ("/etc/pip.conf", f"[global]\ncert = {ROOT_CA}\n".encode())):
        dest = root / rel.lstrip("/")
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return ROOT_CA


def pip_failure(log_text: str) -> str:
    """The line that says why pip failed inside the root, with what to do for a certificate error."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    why = next((ln for ln in reversed(lines) if "CERTIFICATE_VERIFY_FAILED" in ln), None) or \
        next((ln for ln in reversed(lines) if ln.startswith("ERROR:")), lines[-1] if lines else "no output")
    if "CERTIFICATE_VERIFY_FAILED" in why:
        why += (f" (the root uses this host's {HOST_CA}, copied in just now: if pip works here, the registry "
                "is reached another way here, e.g. PIP_CERT, PIP_INDEX_URL or a proxy; export the same)")
    return why


def _venv_with(root: Path, venv: str, pip: List[str], probe: str, log, log_path: Path) -> None:
    """A venv at `venv` inside root with `pip` installed (binary wheels only, from the registry this host reaches,
    with its CA bundle), then `probe` run by its python; DeviceError naming the step and the log otherwise."""
    r = in_root(root, ["python3", "-m", "venv", venv], log=log)
    if r.returncode != 0:
        raise DeviceError(f"python3 -m venv {venv} failed in the arm64 root; log: {log_path}")
    env = {"PIP_DEFAULT_TIMEOUT": "180", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    ca = refresh_ca(root)  # the host's CA bundle: the same registry access as here
    if ca:
        env["PIP_CERT"] = ca
    for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    r = in_root(root, [f"{venv}/bin/pip", "install", "--no-cache-dir", "--only-binary=:all:", *pip], env=env, log=log)
    if r.returncode != 0:
        log.flush()
        raise DeviceError(f"pip install {' '.join(pip)} failed inside the emulated arm64 root: "
                          f"{pip_failure(log_path.read_text(errors='replace'))}; log: {log_path}")
    r = in_root(root, [f"{venv}/bin/python", "-c", probe], log=log)
    if r.returncode != 0:
        raise DeviceError(f"the arm64 venv {venv} fails `{probe}`; log: {log_path}")


@contextlib.contextmanager
def _build_lock():
    """One builder of the cache at a time (the root and its LLM venv): a second waits, then finds it built."""
    import fcntl

    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _timed_out(what: str, e: subprocess.TimeoutExpired) -> DeviceError:
    cmd = e.cmd if isinstance(e.cmd, str) else " ".join(str(c) for c in e.cmd[-4:])
    return DeviceError(f"{what} ran past {e.timeout:.0f} s ({cmd})",
                       hint="a slow registry or mirror: try again, or set PIP_INDEX_URL / the Debian mirror here")


def build(recipe: Dict[str, object] = RECIPE, say: Callable[[str], None] = print) -> Path:
    """Build the root once (cached under cache_dir()/<recipe key>); returns its path."""
    if is_built(recipe):
        return root_path(recipe)
    with _build_lock():
        try:
            return _build(recipe, say)
        except subprocess.TimeoutExpired as e:
            raise _timed_out("building the emulated arm64 root", e) from None


def _build(recipe: Dict[str, object], say: Callable[[str], None]) -> Path:
    key = recipe_key(recipe)
    final = cache_dir() / key
    if (final / ".complete").is_file():
        return final / "root"
    check_prerequisites()
    check_tools()
    ensure_binfmt()
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.parent / f".{key}.build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    root = work / "root"
    log_path = work / "build.log"
    t0 = time.monotonic()
    try:
        with open(log_path, "w") as log:
            mirror = debian_mirror()
            say(f"emulated device: debootstrap {recipe['suite']} {recipe['arch']} from {mirror} "
                "(a few minutes, once)")
            r = subprocess.run(["debootstrap", f"--arch={recipe['arch']}", f"--variant={recipe['variant']}",
                                "--include=" + ",".join(recipe["include"]), str(recipe["suite"]), str(root),
                                mirror], stdout=log, stderr=subprocess.STDOUT, timeout=3600)
            if r.returncode != 0:
                raise DeviceError(f"debootstrap failed (exit {r.returncode}); log: {log_path}")
            say(f"emulated device: venv with {' '.join(recipe['pip'])} (under emulation)")
            _venv_with(root, VENV, list(recipe["pip"]), "import platform, numpy, tflite_runtime.interpreter as t; "
                       "print(platform.machine(), numpy.__version__)", log, log_path)
            for d in ("run/sshd", DEVICE_ROOT.lstrip("/"), "etc/edgekit"):
                (root / d).mkdir(parents=True, exist_ok=True)
            for k in root.glob("etc/ssh/ssh_host_*"):  # each device gets its own host key
                k.unlink()
        (work / ".complete").write_text(json.dumps({"recipe": recipe, "seconds": time.monotonic() - t0}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
    except BaseException:
        keep = final.parent / f"failed-{key}.log"
        if log_path.exists():
            shutil.copy(log_path, keep)
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(f"emulated device root ready in {time.monotonic() - t0:.0f} s: {final / 'root'}")
    return final / "root"


# --- the language-model layer: a second venv in the same root, with edgekit[llm]'s engine -------------------
# The root's own venv stays tflite-runtime 2.14 on numpy<2 (what Pi images run for CNN bundles); a language-model
# bundle needs onnxruntime-genai, whose onnxruntime wants a newer numpy: its own venv beside it, built on demand
# (about a minute of pip under emulation) and cached, keyed by the root's recipe and its own. It pins the versions
# installed here, so a check compares the same engine on ARM's kernels with this machine's.

def llm_recipe() -> Dict[str, object]:
    """The LLM venv's recipe: onnxruntime-genai and onnxruntime at the versions installed here (else
    edgekit[llm]'s floor), on top of the root's recipe."""
    import importlib

    pins = []
    for pkg, module, floor in (("onnxruntime-genai", "onnxruntime_genai", ">=0.18"), ("onnxruntime", "onnxruntime", "")):
        try:   # the module's own version: a host with onnxruntime-gpu / -genai-cuda runs the same release
            version = str(importlib.import_module(module).__version__).split("+")[0]
        except ImportError:
            version = ""
        if version:
            pins.append(f"{pkg}=={version}")
        elif floor:
            pins.append(pkg + floor)
    return {"version": 1, "root": recipe_key(RECIPE), "pip": pins}


def llm_venv(recipe: Optional[Dict[str, object]] = None) -> str:
    """The LLM venv's path inside the root."""
    return f"/opt/edgekit-llm-{recipe_key(recipe or llm_recipe())}"


def _llm_marker(recipe: Dict[str, object]) -> Path:
    return cache_dir() / recipe_key(RECIPE) / f".llm-{recipe_key(recipe)}.complete"


def llm_is_built(recipe: Optional[Dict[str, object]] = None) -> bool:
    """The marker of a finished build and the venv it names (pyvenv.cfg: bin/python links to the host's)."""
    recipe = recipe or llm_recipe()
    return (is_built() and _llm_marker(recipe).is_file()
            and (root_path() / llm_venv(recipe).lstrip("/") / "pyvenv.cfg").is_file())


def host_unfit() -> Optional[str]:
    """Why this host cannot run the emulated root (chroot, mount namespaces, binfmt_misc: Linux and root), None
    where it can."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the emulated arm64 root needs Linux and root"
    return None


def llm_unavailable(recipe: Optional[Dict[str, object]] = None) -> Optional[str]:
    """Why a language model cannot be checked in the emulated root here now, None when it can."""
    unfit = host_unfit()
    if unfit:
        return unfit
    if not is_built():
        return "no emulated arm64 root here (python -m edgekit.lab.emulated build --llm)"
    recipe = recipe or llm_recipe()
    if llm_is_built(recipe):
        return None
    mine = _llm_marker(recipe)
    others = [m for m in mine.parent.glob(".llm-*.complete") if m.name != mine.name]
    why = ("the emulated root's LLM venv is missing its files" if mine.is_file() else
           "the emulated root's LLM venv was built for other engine versions than " + " ".join(recipe["pip"])
           if others else "the emulated root has no LLM venv")
    return why + " (python -m edgekit.lab.emulated build --llm)"


def build_llm(say: Callable[[str], None] = print, recipe: Optional[Dict[str, object]] = None) -> str:
    """Build (once) the root and its LLM venv; returns the venv's python as the root sees it."""
    recipe = recipe or llm_recipe()
    venv = llm_venv(recipe)
    if llm_is_built(recipe):
        return f"{venv}/bin/python"
    root = build(say=say)
    marker = _llm_marker(recipe)
    with _build_lock():
        if llm_is_built(recipe):
            return f"{venv}/bin/python"
        ensure_binfmt()
        here = root / venv.lstrip("/")
        shutil.rmtree(here, ignore_errors=True)   # a build cut off before its marker
        log_path = marker.parent / "build-llm.log"
        t0 = time.monotonic()
        say(f"emulated device: a venv with {' '.join(recipe['pip'])} (under emulation, once)")
        try:
            with open(log_path, "w") as log:
                _venv_with(root, venv, list(recipe["pip"]), "import platform, onnxruntime_genai as og, onnxruntime "
                           "as ort; print(platform.machine(), og.__version__, ort.__version__)", log, log_path)
        except subprocess.TimeoutExpired as e:
            shutil.rmtree(here, ignore_errors=True)
            raise _timed_out("building the emulated root's LLM venv", e) from None
        except BaseException:
            shutil.rmtree(here, ignore_errors=True)
            raise
        seconds = time.monotonic() - t0
        tmp = marker.with_name(marker.name + f".{os.getpid()}")
        tmp.write_text(json.dumps({"recipe": recipe, "venv": venv, "seconds": seconds}))
        os.replace(tmp, marker)
    say(f"emulated device: LLM venv ready in {seconds:.0f} s: {venv}")
    return f"{venv}/bin/python"


def build_seconds(recipe: Dict[str, object] = RECIPE) -> Optional[float]:
    try:
        return json.loads((cache_dir() / recipe_key(recipe) / ".complete").read_text())["seconds"]
    except (OSError, ValueError, KeyError):
        return None


class EmulatedDevice(LocalDevice):
    """A LocalDevice whose sshd is the arm64 root's, chrooted (so everything it runs is aarch64)."""

    def __init__(self, directory: Path, name: str, *, root: Path, tag: str, net: int, index: int,
                 authorized_keys: Path):
        super().__init__(directory, name, f"{VENV}/bin/python", tag=tag, net=net, index=index,
                         authorized_keys=authorized_keys)
        self.chroot = root
        self.etc = root / "etc" / "edgekit" / name           # host key, sshd config, keys
        self.root = root / DEVICE_ROOT.lstrip("/") / name     # the device root, seen from here
        self.device_root = f"{DEVICE_ROOT}/{name}"            # ... and from the device

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.etc.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        keys.keygen(self.etc / "host_ed25519")
        shutil.copy(self.authorized_keys, self.etc / "authorized_keys")
        inside = f"/etc/edgekit/{self.name}"
        (self.etc / "sshd_config").write_text(sshd_config(self.addr, f"{inside}/host_ed25519",
                                                          f"/run/sshd-{self.name}.pid", f"{inside}/authorized_keys"))
        self._netns()
        self.start()

    def host_key_line(self) -> str:
        return f"{self.addr} " + keys.public_line(self.etc / "host_ed25519")

    def destroy(self) -> None:
        """Also remove what this device keeps inside the shared arm64 root (the root stays)."""
        super().destroy()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.etc, ignore_errors=True)

    def sshd_argv(self) -> List[str]:
        ensure_binfmt()
        return _chroot_argv(self.chroot, ["/usr/sbin/sshd", "-D", "-e", "-f", f"/etc/edgekit/{self.name}/sshd_config"])

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout=timeout)


def _load(d: Path) -> EmulatedDevice:
    m = json.loads((d / "device.json").read_text())
    return EmulatedDevice(d, m["name"], root=Path(m["chroot"]), tag=m["tag"], net=m["net"], index=m["index"],
                          authorized_keys=Path(m["authorized_keys"]))


def up(name: str = "emulated-pi", say: Callable[[str], None] = print, base: Optional[Path] = None,
       authorized_keys: Optional[Path] = None) -> Dict[str, str]:
    """Build (or reuse) the root and start device `name`; what an inventory entry needs."""
    check_prerequisites()
    root = build(say=say)
    refresh_ca(root)  # pip on the device (over SSH) reaches the registry with today's CA bundle
    d = (local.state_dir(base) / name).resolve()
    if (d / "device.json").is_file():
        dev = _load(d)
        if not dev.running():
            dev.destroy()
            shutil.rmtree(d, ignore_errors=True)
            return up(name, say, base, authorized_keys)
    else:
        d.mkdir(parents=True, exist_ok=True)
        if authorized_keys is None:
            _, authorized_keys = keys.client_key(d, f"edgekit-emulated-{name}")
        index = free_slot("e", start=200)
        tag = f"e{index}"
        dev = EmulatedDevice(d, name, root=root, tag=tag, net=free_net(), index=index,
                             authorized_keys=authorized_keys)
        dev.launch({"name": name, "kind": "emulated-arm64", "chroot": str(root), "tag": tag,
                    "net": int(dev.addr.split(".")[1]), "index": index, "authorized_keys": str(authorized_keys)},
                   "emulated")
    return dev.connection()


def down(name: str = "emulated-pi", base: Optional[Path] = None) -> bool:
    return local.down(name, base, loader=_load)


def status(name: str = "emulated-pi", base: Optional[Path] = None) -> Dict[str, object]:
    d = local.state_dir(base) / name
    out: Dict[str, object] = {"root_built": is_built(), "root": str(root_path()), "recipe_key": recipe_key(),
                              "build_seconds": build_seconds(), "llm_venv": llm_venv() if llm_is_built() else None,
                              "device": None}
    if (d / "device.json").is_file():
        dev = _load(d)
        out["device"] = {"name": name, "address": dev.addr, "running": dev.running(),
                         "device_root": dev.device_root}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edgekit.lab.emulated")
    ap.add_argument("action", choices=["build", "status", "key"])
    ap.add_argument("--llm", action="store_true",
                    help="build: also the venv with onnxruntime-genai that language-model bundles are checked in")
    a = ap.parse_args(argv)
    try:
        if a.action == "build":
            print(build())
            if a.llm:
                print(build_llm())
        elif a.action == "key":
            print(recipe_key())
        else:
            print(json.dumps(status(), indent=2))
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
