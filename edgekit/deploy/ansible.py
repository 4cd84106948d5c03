"""`edgekit export ansible`: the same deploy, handed to Ansible for fleets past a few hundred devices.

The export is a directory a user runs with `ansible-playbook deploy.yml` (from inside it):

    ansible.cfg                 inventory, roles path, forks, pipelining
    inventory.yml               the group (in edgekit's order: canary first) and one child group per
                                target profile; host vars from devices.toml
    deploy.yml                  serial (canary + batches from the rollout plan), max_fail_percentage
    roles/edgekit_release/      upload with checksum into a temporary release dir, verify sha256 on
                                the device, atomic `current` switch, golden health check, rollback
                                in `rescue`
    runtime.tar                 the device runtime edgekit pushes (the same files and VERSION)
    bundles/<bundle>.tar        the bundles, as built (one archive each: one checksummed copy per host)

Every step on a device is `python -m edgekit.runtime release ...` with argv from
edgekit.deploy.protocol: the device-side release code is the one edgekit itself calls, not a
second implementation. `ansible-playbook --check` only reads (status), like `deploy --dry-run`.
Files are YAML written as JSON (a subset of YAML), so no YAML library is needed here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Dict, List, Sequence

from edgekit.deploy import protocol
from edgekit.deploy.artifact import Artifact
from edgekit.deploy.inventory import Device, Inventory
from edgekit.deploy.ops import choose_bundle
from edgekit.deploy.rollout import Plan
from edgekit.errors import EdgekitError
from edgekit.runtime.files import PKG, runtime_digest, runtime_files

ROLE = "edgekit_release"

# The role's tasks. `_cmd` is a device command: the pushed runtime first on PYTHONPATH, JSON answer
# on the last line of stdout (what DeviceSession.call reads too).
_TASKS = """\
# edgekit release role: what `edgekit deploy` does on one device, step for step.
- name: device root (~ expanded on the device) and the runtime version there
  ansible.builtin.command:
    argv: ["{{ edgekit_python }}", "-c", "PROBE", "{{ edgekit_root }}"]
  register: _ek_probe
  changed_when: false
  check_mode: false

- name: facts from the device
  ansible.builtin.set_fact:
    _ek_root: "{{ (_ek_probe.stdout_lines[-1] | from_json).root }}"
    _ek_runtime_ok: "{{ (_ek_probe.stdout_lines[-1] | from_json).version == edgekit_runtime_version }}"

- name: the model's directory under the device root
  ansible.builtin.file:
    path: "{{ _ek_root }}/models/{{ edgekit_model }}"
    state: directory
  when: not ansible_check_mode

- name: edgekit runtime, when missing or another version (the files edgekit pushes, one checksummed archive)
  when: not _ek_runtime_ok and not ansible_check_mode
  block:
    - name: upload runtime.tar
      ansible.builtin.copy:
        src: "{{ playbook_dir }}/runtime.tar"
        dest: "{{ _ek_root }}/.runtime-{{ edgekit_runtime_version[:12] }}.tar"
    - name: unpack it beside the old runtime and swap the directories
      ansible.builtin.command:
        argv: ["{{ edgekit_python }}", "-c", "UNPACK", "{{ _ek_root }}/.runtime-{{ edgekit_runtime_version[:12] }}.tar", "{{ _ek_root }}/runtime", "swap"]

- name: release status (read-only in check mode; else also clears unfinished uploads)
  ansible.builtin.command:
    argv: "{{ [edgekit_python, '-m', 'edgekit.runtime'] + STATUS_ARGS + ([] if ansible_check_mode else ['--clean-incoming']) }}"
  environment: ENV
  register: _ek_status
  changed_when: false
  check_mode: false
  when: _ek_runtime_ok or not ansible_check_mode

- name: previous release and whether this one is there
  ansible.builtin.set_fact:
    _ek_previous: "{{ _ek_model.current | default(none) }}"
    _ek_have: "{{ edgekit_sha256 in (_ek_model.releases | default([]) | map(attribute='sha256') | list) }}"
  vars:
    _ek_model: "{{ (_ek_status.stdout_lines[-1] | from_json).models.get(edgekit_model, {}) if _ek_status.stdout_lines is defined else {} }}"

- name: plan (check mode)
  ansible.builtin.debug:
    msg: "{{ 'unchanged' if (_ek_have and _ek_previous == edgekit_sha256) else ('would-switch' if _ek_have else 'would-upload') }} {{ edgekit_bundle }} ({{ edgekit_sha256[:12] }}), current {{ (_ek_previous or 'none')[:12] }}"
  when: ansible_check_mode

- name: deploy
  when: not ansible_check_mode and not (_ek_have and _ek_previous == edgekit_sha256)
  block:
    - name: upload the bundle (one archive, checksummed by copy)
      ansible.builtin.copy:
        src: "{{ playbook_dir }}/bundles/{{ edgekit_bundle }}.tar"
        dest: "{{ _ek_root }}/models/{{ edgekit_model }}/{{ INCOMING }}.tar"
      when: not _ek_have

    - name: unpack it into a temporary release directory
      ansible.builtin.command:
        argv: ["{{ edgekit_python }}", "-c", "UNPACK", "{{ _ek_root }}/models/{{ edgekit_model }}/{{ INCOMING }}.tar", "{{ _ek_root }}/models/{{ edgekit_model }}/{{ INCOMING }}", "into"]
      when: not _ek_have

    - name: verify sha256 on the device, switch current atomically, golden health check
      ansible.builtin.command:
        argv: "{{ [edgekit_python, '-m', 'edgekit.runtime'] + ACTIVATE_ARGS + ([] if _ek_have else ['--incoming', INCOMING]) + (['--no-check'] if edgekit_llm | default(false) else []) }}"
      environment: ENV
      register: _ek_activate
      changed_when: (_ek_activate.stdout_lines[-1] | from_json).status == 'deployed'
      failed_when: _ek_activate.rc != 0 or (_ek_activate.stdout_lines[-1] | from_json).status == 'rolled-back'

    - name: golden check of a language model (LanguageModel.check() on the device; a failure rolls back)
      ansible.builtin.command:
        argv: "{{ [edgekit_python, '-m', 'edgekit.runtime'] + CHECK_ARGS }}"
      environment: ENV
      register: _ek_check
      changed_when: false
      failed_when: _ek_check.rc != 0 or not (_ek_check.stdout_lines[-1] | from_json).ok
      when: edgekit_llm | default(false)

    - name: p50 gate (the latency method of edgekit profile)
      ansible.builtin.command:
        argv: "{{ [edgekit_python, '-m', 'edgekit.runtime'] + BENCH_ARGS }}"
      environment: ENV
      register: _ek_bench
      changed_when: false
      failed_when: _ek_bench.rc != 0 or (_ek_bench.stdout_lines[-1] | from_json).latency.p50_ms > edgekit_max_p50_ms
      when: edgekit_max_p50_ms is not none and not (edgekit_llm | default(false))

  rescue:
    - name: roll back (current back where it was, if it still points at this release)
      ansible.builtin.command:
        argv: "{{ [edgekit_python, '-m', 'edgekit.runtime'] + REVERT_ARGS + ['--to', _ek_previous or 'none'] }}"
      environment: ENV

    - name: this device failed
      ansible.builtin.fail:
        msg: "edgekit: {{ inventory_hostname }} failed and was rolled back to {{ (_ek_previous or 'none')[:12] }} (the failed task above has the device's answer)"
"""

# On the device, by its Python: the expanded root and the pushed runtime's VERSION (JSON).
_PROBE = ("import json, os, sys; r = os.path.expanduser(sys.argv[1]); v = os.path.join(r, 'runtime', 'VERSION'); "
          "print(json.dumps({'root': r, 'version': open(v).read().strip() if os.path.exists(v) else ''}))")
# Unpack an uploaded archive: `into` a fresh directory (an upload), or `swap` it with the directory
# (the runtime: the old one renamed away, the new one into place, the old one removed).
_UNPACK = ("import os, shutil, sys, tarfile; tar, dest, mode = sys.argv[1:4]; "
           "tmp = dest + '.new-%d' % os.getpid() if mode == 'swap' else dest; shutil.rmtree(tmp, ignore_errors=True); "
           "t = tarfile.open(tar); "
           "t.extractall(tmp, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {})); t.close(); "
           "os.unlink(tar); old = dest + '.old-%d' % os.getpid(); "
           "mode == 'swap' and os.path.exists(dest) and os.rename(dest, old); "
           "mode == 'swap' and os.rename(tmp, dest); shutil.rmtree(old, ignore_errors=True)")


def _tasks(root_var: str = "_ek_root") -> str:
    r = "{{ " + root_var + " }}"
    status = protocol.release_args("status", r, name="{{ edgekit_model }}")
    activate = protocol.release_args("activate", r, name="{{ edgekit_model }}", sha="{{ edgekit_sha256 }}",
                                     keep="{{ edgekit_keep }}")
    revert = protocol.release_args("revert", r, name="{{ edgekit_model }}", sha="{{ edgekit_sha256 }}")
    bench = protocol.bench_args(r + "/models/{{ edgekit_model }}/releases/{{ edgekit_sha256 }}",
                                "{{ edgekit_gate_runs }}", "{{ edgekit_gate_warmup }}")
    check = protocol.check_args(r + "/models/{{ edgekit_model }}/releases/{{ edgekit_sha256 }}")
    env = protocol.env(r)
    t = _TASKS
    for key, words in (("STATUS_ARGS", status), ("ACTIVATE_ARGS", activate), ("REVERT_ARGS", revert),
                       ("BENCH_ARGS", bench), ("CHECK_ARGS", check)):
        # inside a Jinja expression: the words as a list of Jinja strings
        t = t.replace(key, "[" + ", ".join(_jinja_word(w) for w in words) + "]")
    t = t.replace("ENV", json.dumps(env))
    t = t.replace('"PROBE"', json.dumps(_PROBE)).replace('"UNPACK"', json.dumps(_UNPACK))
    t = t.replace("'--incoming', INCOMING", "'--incoming', '.incoming-' ~ edgekit_sha256[:12] ~ '-' ~ edgekit_upload_tag")
    t = t.replace("{{ INCOMING }}", ".incoming-{{ edgekit_sha256[:12] }}-{{ edgekit_upload_tag }}")
    return t


def _jinja_word(w: str) -> str:
    """A protocol word inside a Jinja list: literal text quoted, {{ var }} parts joined with ~."""
    out, rest = [], w
    while "{{" in rest:
        pre, _, tail = rest.partition("{{")
        var, _, rest = tail.partition("}}")
        if pre:
            out.append(repr(pre))
        out.append(f"({var.strip()} | string)")
    if rest or not out:
        out.append(repr(rest))
    return " ~ ".join(out)


def _tar(path: Path, members) -> None:
    """An uncompressed tar of (file, name inside) pairs, with fixed owner and times (reproducible)."""
    import tarfile

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for src, name in members:
            info = t.gettarinfo(str(src), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(src, "rb") as f:
                t.addfile(info, f)


def _serial(plan: Plan, names: Sequence[str]) -> List[int]:
    return [len(b) for b in plan.batches(names)]


def export(inv: Inventory, devices: Sequence[Device], artifacts: Sequence[Artifact], plan: Plan, out: Path,
           group: str, keep: int = 3, gate_warmup: int = 10, force: bool = False) -> Dict[str, object]:
    """Write the export directory (to a temporary one beside it, renamed into place)."""
    out = Path(out)
    if out.exists() and not force and any(out.iterdir()):
        raise EdgekitError(f"{out} exists and is not empty", hint="give a new directory, or --force to replace it")
    chosen = {d.name: choose_bundle(d, artifacts, None) for d in devices}
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (work / "bundles").mkdir()
        for a in {a.sha256: a for a in chosen.values()}.values():
            _tar(work / "bundles" / f"{a.path.name}.tar", [(p, rel) for p, rel, _ in a.files])
        version = runtime_digest()
        (work / "VERSION").write_text(version + "\n")
        _tar(work / "runtime.tar", [(PKG / rel, f"edgekit/{rel}") for rel in runtime_files()]
             + [(work / "VERSION", "VERSION")])
        (work / "VERSION").unlink()
        gname = f"edgekit_{group}".replace("-", "_").replace(".", "_")
        hosts: Dict[str, Dict[str, object]] = {}
        by_target: Dict[str, List[str]] = {}
        for d in devices:
            a = chosen[d.name]
            hv: Dict[str, object] = {"ansible_host": d.host, "ansible_python_interpreter": d.python,
                                     "edgekit_python": d.python, "edgekit_root": d.root,
                                     "edgekit_bundle": a.path.name, "edgekit_sha256": a.sha256,
                                     "edgekit_target": d.target or a.target, "edgekit_llm": a.is_llm}
            if d.port:
                hv["ansible_port"] = d.port
            if d.user:
                hv["ansible_user"] = d.user
            if d.key_file:
                hv["ansible_ssh_private_key_file"] = str(Path(os.path.expanduser(d.key_file)))
            hosts[d.name] = hv
            by_target.setdefault(f"target_{(d.target or a.target).replace('-', '_')}", []).append(d.name)
        known = os.path.expanduser(inv.known_hosts)
        ssh_args = f"-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes"
        cfg = os.path.expanduser(inv.ssh_config)
        if Path(cfg).is_file():
            ssh_args += f" -F {cfg}"
        inventory = {"all": {
            "vars": {"ansible_ssh_common_args": ssh_args},
            "children": {gname: {"hosts": hosts,
                                 "children": {t: {"hosts": {n: {} for n in ns}} for t, ns in by_target.items()}}}}}
        (work / "inventory.yml").write_text("# edgekit export: YAML (written as JSON)\n"
                                            + json.dumps(inventory, indent=2) + "\n")
        serial = _serial(plan, [d.name for d in devices])
        play = [{
            "name": f"edgekit deploy {artifacts[0].name} to {group} (canary, batches, rollback on failure)",
            "hosts": gname, "gather_facts": False, "serial": serial,
            "max_fail_percentage": round(plan.max_fail * 100, 6),
            "vars": {"edgekit_model": artifacts[0].name, "edgekit_keep": keep,
                     "edgekit_max_p50_ms": plan.max_p50_ms, "edgekit_gate_runs": plan.gate_runs,
                     "edgekit_gate_warmup": gate_warmup, "edgekit_upload_tag": uuid.uuid4().hex[:8],
                     "edgekit_runtime_version": version},
            "roles": [ROLE]}]
        (work / "deploy.yml").write_text("# edgekit export: run `ansible-playbook deploy.yml` here "
                                         "(--check: a dry run)\n" + json.dumps(play, indent=2) + "\n")
        (work / "roles" / ROLE / "tasks").mkdir(parents=True)
        (work / "roles" / ROLE / "tasks" / "main.yml").write_text(_tasks())
        forks = max(1, min(plan.parallel, 50))
        (work / "ansible.cfg").write_text(
            "[defaults]\ninventory = inventory.yml\nroles_path = roles\nforks = %d\nhost_key_checking = True\n"
            "interpreter_python = auto_silent\nretry_files_enabled = False\n\n"
            "[ssh_connection]\npipelining = True\n" % forks)
        os.chmod(work, 0o755)  # ansible ignores an ansible.cfg in a world-writable dir; mkdtemp's 0700 is fine too
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:6]}")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {"dir": str(out), "group": gname, "hosts": len(hosts), "serial": serial,
            "max_fail_percentage": round(plan.max_fail * 100, 6),
            "targets": {t: len(ns) for t, ns in by_target.items()},
            "bundles": sorted({a.path.name for a in chosen.values()})}


def run_hint(out: Path, check: bool = False) -> str:
    return f"cd {out} && ansible-playbook deploy.yml" + (" --check" if check else "")


__all__ = ["export", "run_hint"]
