"""Plain-text tables for the terminal (standard library only; used on devices too)."""

from __future__ import annotations

from typing import Any, List, Sequence


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if v != 0 and abs(v) < 1:
            return f"{v:.{digits + 1}g}"
        return f"{v:.{digits}f}"
    return str(v)


def render(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    cells: List[List[str]] = [[fmt(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    numeric = [all(_is_num(r[i]) for r in rows if r[i] is not None) and bool(rows)
               for i in range(len(headers))]

    def line(vals):
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w)
                         for i, (v, w) in enumerate(zip(vals, widths))).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(list(headers)))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def kv(pairs: Sequence[Sequence[Any]]) -> str:
    """Two-column 'key  value' listing."""
    w = max((len(str(k)) for k, _ in pairs), default=0)
    return "\n".join(f"{str(k).ljust(w)}  {fmt(v)}" for k, v in pairs)
