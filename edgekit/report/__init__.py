"""`edgekit report`: one self-contained HTML page with inline SVG charts from what edgekit wrote.

    from edgekit.report import write_report
    path = write_report("build/", profiles=["profiles/"], out="build/report.html")

Reads a convert output directory (`<name>.convert.json`, each bundle's manifest.json) and any
latency reports with raw samples under it or under `profiles` (`edgekit bench --out`,
`edgekit profile`), `*.qat.json` / `*.prune.json` / `*.distill.json`, and staged rollouts'
records (from `rollouts`, or by default this build's models' ones from `edgekit deploy`'s
rollouts directory). Standard library only: no plotting library, no script, no network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from edgekit.report.collect import ReportData, ReportError

DEFAULT_NAME = "report.html"


def build_report(build_dir: os.PathLike, profiles: Sequence[os.PathLike] = (),
                 rollouts: Optional[Sequence[os.PathLike]] = None) -> str:
    """The HTML text of the report (nothing written)."""
    from edgekit.report.collect import collect
    from edgekit.report.render import render

    return render(collect(build_dir, profiles, rollouts))


def write_report(build_dir: os.PathLike, profiles: Sequence[os.PathLike] = (), out: Optional[os.PathLike] = None,
                 rollouts: Optional[Sequence[os.PathLike]] = None) -> Path:
    """Write the report (default BUILD_DIR/report.html; for a single bundle directory,
    <bundle>.report.html beside it) atomically; returns its path."""
    html = build_report(build_dir, profiles, rollouts)
    build = Path(build_dir)
    if out is not None:
        dest = Path(out)
    elif (build / "manifest.json").is_file():  # one bundle: never write inside it (its digest would change)
        dest = build.parent / f"{build.name}.{DEFAULT_NAME}"
    else:
        dest = build / DEFAULT_NAME
    if dest.is_dir():
        raise ReportError("is a directory", path=str(dest), hint="give a file name ending in .html with -o")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


__all__ = ["build_report", "write_report", "ReportData", "ReportError"]
