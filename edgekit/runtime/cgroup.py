"""This process's cgroup folders, where a controller's limits are read (standard library only): llmopts reads
the memory a container or a systemd slice still allows there, threads the CPU quota.

Tests point CGROUP_FILE and CGROUP_ROOT at files of their own.
"""

from __future__ import annotations

import os
from typing import Iterator, List, Tuple

CGROUP_FILE, CGROUP_ROOT = "/proc/self/cgroup", "/sys/fs/cgroup"


def _v1_mount(controllers: str, controller: str) -> str:
    """The folder of a v1 hierarchy under CGROUP_ROOT: the controller's name (`memory`, `cpu`: often a link to
    the joint mount), else the controllers its /proc/self/cgroup line names, comma-joined in any order
    (`cpu,cpuacct` or `cpuacct,cpu`); "" where there is none."""
    own = os.path.join(CGROUP_ROOT, controller)
    if os.path.isdir(own):
        return own
    joint = set(controllers.split(","))
    try:
        names = sorted(os.listdir(CGROUP_ROOT))
    except OSError:
        return ""
    return next((os.path.join(CGROUP_ROOT, n) for n in names
                 if set(n.split(",")) == joint and os.path.isdir(os.path.join(CGROUP_ROOT, n))), "")


def cgroup_folders(controller: str) -> Iterator[Tuple[int, str]]:
    """(version, folder) for each cgroup folder whose files limit `controller` ("memory", "cpu") for this
    process: for the unified v2 line of /proc/self/cgroup ("0::PATH", under CGROUP_ROOT) and for the v1 line that
    names the controller (under its mount, _v1_mount), the process's own folder first, then each one above it
    up to the mount's root. Where the process's folder is not under the mount (a container sees its own cgroup
    at the root), the root alone. A path with ".." (the process sits outside its cgroup namespace's root, which
    is then no folder above it: its limits are not this process's) gives nothing. Nothing where
    /proc/self/cgroup cannot be read; a name that is not UTF-8 is kept as its bytes (surrogateescape)."""
    try:
        with open(CGROUP_FILE, encoding="utf-8", errors="surrogateescape") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return
    for hid, controllers, rel in (x for x in lines if len(x) == 3):
        if hid == "0" and controllers == "":
            version, root = 2, CGROUP_ROOT
        elif controller in controllers.split(","):
            version, root = 1, _v1_mount(controllers, controller)
            if not root:
                continue
        else:
            continue
        parts: List[str] = [p for p in rel.split("/") if p]
        if ".." in parts:
            continue
        if not os.path.isdir(os.path.join(root, *parts)):
            parts = []
        for depth in range(len(parts), -1, -1):   # the process's folder, then each one above it
            yield version, os.path.join(root, *parts[:depth])
