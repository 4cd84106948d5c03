"""The model repository extension of Open Inference Protocol v2 / Triton, read-only.

    POST /v2/repository/index                          [{"name", "version", "state", "reason"}, ...]
    POST /v2/repository/models/{name}/load | /unload   refused: the served models are fixed at start

The index lists, per served model, the release it serves (READY), a release being loaded and
golden-checked beside it (LOADING), and the last release that failed to come up (UNAVAILABLE, with
its error as the reason). A model with nothing loaded is UNAVAILABLE without a version. The request
body may be empty or {"ready": true} (only READY rows), as Triton takes it.

Load and unload are not served: `edgekit serve` serves the models named at its start, and a
deployed model follows its `current` release, which `edgekit deploy` and `edgekit rollback` switch
(with the health check the API would otherwise skip). Standard library only.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, Iterable, List

from edgekit.serve.models import VERSION_CHARS, ModelEntry
from edgekit.serve.protocol import ProtocolError

INDEX_PATH = "/v2/repository/index"
CONTROL_PATH = re.compile(r"^/v2/repository/models/([^/]+)/(load|unload)/?$")
PREFIX = "/v2/repository/"

READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"


def parse_index_request(body: bytes) -> bool:
    """The request's `ready` flag (False when the body is empty, as tritonclient sends it)."""
    if not body.strip():
        return False
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(400, f"the repository index request is not valid JSON ({e})") from None
    except RecursionError:   # [[[[... a thousand deep: the parser's recursion limit, not a 500
        raise ProtocolError(400, "the repository index request is not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise ProtocolError(400, "the repository index request must be a JSON object, e.g. {\"ready\": true}")
    ready = doc.get("ready", False)
    if not isinstance(ready, bool):
        raise ProtocolError(400, f"'ready' must be true or false, not {json.dumps(ready)[:32]}")
    return ready


def index(entries: Iterable[ModelEntry], *, ready_only: bool = False) -> List[Dict[str, Any]]:
    """One row per (model, release) the server knows of, sorted by model name."""
    rows: List[Dict[str, Any]] = []
    for e in sorted(entries, key=lambda e: e.name):
        active = e.active
        shown = set()
        if active is not None:
            rows.append({"name": e.name, "version": active.version, "state": READY, "reason": ""})
            shown.add(active.version)
        if ready_only:
            continue
        loading = e.loading  # read once: a load may finish between two reads
        if loading:
            v = loading[:VERSION_CHARS]
            if v not in shown:
                rows.append({"name": e.name, "version": v, "state": LOADING,
                             "reason": "loading and golden-checking a new release"})
                shown.add(v)
        failure = e.failure
        if failure is not None:
            v = failure.get("version")
            if v and v not in shown:
                rows.append({"name": e.name, "version": v, "state": UNAVAILABLE,
                             "reason": str(failure.get("error", ""))})
                shown.add(v)
            elif not v and active is None:
                rows.append({"name": e.name, "state": UNAVAILABLE, "reason": str(failure.get("error", ""))})
                shown.add(None)
        if not shown:
            rows.append({"name": e.name, "state": UNAVAILABLE, "reason": "not loaded"})
    return rows


def refuse_control(name: str, action: str) -> ProtocolError:
    """The answer to a load/unload request for a served model."""
    return ProtocolError(400, f"cannot {action} model '{name}' over the API: edgekit serve serves the models "
                              "named at its start, and a deployed model follows its `current` release "
                              "(switch it with `edgekit deploy` or `edgekit rollback`; restart the server "
                              "to serve other models)")
