"""KServe Open Inference Protocol v2 (REST) with Triton's binary tensor extension: parsing and
building inference bodies. Standard library and numpy only; no I/O.

Request body: JSON, or (binary extension) JSON of `Inference-Header-Content-Length` bytes followed
by the raw bytes of each input whose `parameters.binary_data_size` is set, in input order.
Response: JSON, with outputs asked for as binary (`parameters.binary_data` per output, or
`parameters.binary_data_output` for the request) appended after it the same way.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

# Open Inference Protocol datatype <-> numpy dtype name (BYTES is not served: models take numbers)
DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
DTYPE_TO_DATATYPE = {v: k for k, v in DATATYPES.items()}
_NP = {k: np.dtype(v) for k, v in DATATYPES.items()}                   # datatype -> dtype (native order)
_WIRE = {k: d.newbyteorder("<") for k, d in _NP.items()}               # on the wire: little-endian
_LITTLE = sys.byteorder == "little"
_OF: Dict[Any, str] = {}                                               # dtype -> datatype (cache)


class ProtocolError(Exception):
    """A request the server rejects: HTTP status and the message for {"error": ...}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def datatype_of(dtype) -> str:
    """The protocol's datatype of a numpy dtype (or its name); cached: it runs per tensor."""
    dt = _OF.get(dtype)
    if dt is None:
        dt = _OF[dtype] = DTYPE_TO_DATATYPE.get(np.dtype(dtype).name, "FP32")
    return dt


@dataclass
class InferRequest:
    id: Optional[str]
    inputs: Dict[str, np.ndarray]            # name -> array, in the request's order
    datatypes: Dict[str, str]                # name -> the request's datatype
    outputs: Optional[List[Tuple[str, bool]]]  # requested (name, binary); None: all
    binary_default: bool = False             # parameters.binary_data_output
    parameters: Dict[str, Any] = field(default_factory=dict)


def _load_json(raw: bytes) -> Dict[str, Any]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:   # [[[[... a thousand deep: the parser's recursion limit, not a 500
        raise ProtocolError(400, "the request body is not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise ProtocolError(400, "the request body must be a JSON object")
    return doc


def _shape(name: str, shape: Any) -> Tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ProtocolError(400, f"input '{name}': shape must be a list of non-negative integers")
    return tuple(shape)


def _flatten(data: Any) -> List[Any]:
    if not isinstance(data, list):
        return [data]
    if data and isinstance(data[0], list):
        out: List[Any] = []
        for d in data:
            out.extend(_flatten(d))
        return out
    return data


def parse_infer(body: bytes, header_length: Optional[str], max_elements: int) -> InferRequest:
    """Parse an inference request body (JSON, or JSON + binary tensors)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(400, "Inference-Header-Content-Length is not an integer") from None
        if n < 0 or n > len(body):
            raise ProtocolError(400, f"Inference-Header-Content-Length {n} does not fit the "
                                     f"{len(body)}-byte body")
        doc, binary = _load_json(body[:n]), memoryview(body)[n:]
    else:
        doc, binary = _load_json(body), memoryview(b"")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError(400, "the request has no 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(400, "'parameters' must be an object")
    inputs: Dict[str, np.ndarray] = {}
    datatypes: Dict[str, str] = {}
    offset = 0
    for t in raw_inputs:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ProtocolError(400, "each input needs a 'name'")
        name = t["name"]
        if name in inputs:
            raise ProtocolError(400, f"input '{name}' is given twice")
        shape = _shape(name, t.get("shape"))
        dt = t.get("datatype")
        if dt not in DATATYPES:
            raise ProtocolError(400, f"input '{name}': datatype {dt!r} is not supported "
                                     f"(use one of {', '.join(DATATYPES)})")
        dtype = _NP[dt]
        count = math.prod(shape)
        if count > max_elements:
            raise ProtocolError(413, f"input '{name}' has {count} elements, more than the "
                                     f"server's limit of {max_elements}")
        tparams = t.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise ProtocolError(400, f"input '{name}': 'parameters' must be an object")
        size = tparams.get("binary_data_size")
        if size is not None:
            if "data" in t:
                raise ProtocolError(400, f"input '{name}' has both 'data' and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(400, f"input '{name}': binary_data_size must be a non-negative integer")
            if size != count * dtype.itemsize:
                raise ProtocolError(400, f"input '{name}': binary_data_size {size} does not match "
                                         f"shape {list(shape)} of {dt} ({count * dtype.itemsize} bytes)")
            if offset + size > len(binary):
                raise ProtocolError(400, f"input '{name}': the body ends before its {size} binary bytes")
            # a view of the body, no copy (read-only: the runtime copies into the backend's tensor)
            arr = np.frombuffer(binary[offset:offset + size], dtype=_WIRE[dt]).reshape(shape)
            if not _LITTLE:
                arr = arr.astype(dtype)
            offset += size
        else:
            if "data" not in t:
                raise ProtocolError(400, f"input '{name}' has no 'data' and no binary_data_size")
            flat = _flatten(t["data"])
            if len(flat) != count:
                raise ProtocolError(400, f"input '{name}': {len(flat)} values do not fill shape "
                                         f"{list(shape)} ({count} values)")
            try:
                arr = np.asarray(flat, dtype=dtype).reshape(shape)
            except (TypeError, ValueError, OverflowError) as e:
                raise ProtocolError(400, f"input '{name}': data is not {dt} ({e})") from None
        inputs[name] = arr
        datatypes[name] = dt
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes after the last binary input are "
                                 "not claimed by any input's binary_data_size")
    outputs = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise ProtocolError(400, "'outputs' must be a list")
        outputs = []
        for o in raw_outputs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ProtocolError(400, "each requested output needs a 'name'")
            op = o.get("parameters") or {}
            if not isinstance(op, dict):
                raise ProtocolError(400, f"output '{o['name']}': 'parameters' must be an object")
            if op.get("classification"):
                raise ProtocolError(400, "the classification extension is not supported")
            outputs.append((o["name"], bool(op.get("binary_data", params.get("binary_data_output", False)))))
    rid = doc.get("id")
    return InferRequest(id=str(rid) if rid is not None else None, inputs=inputs, datatypes=datatypes,
                        outputs=outputs, binary_default=bool(params.get("binary_data_output", False)),
                        parameters=params)


def build_response(model_name: str, version: str, request_id: Optional[str],
                   outputs: List[Tuple[str, np.ndarray, bool]]) -> Tuple[bytes, Optional[int]]:
    """(body, json header length or None). outputs: (name, array, as binary)."""
    tensors = []
    blobs = []
    for name, arr, binary in outputs:
        arr = np.asarray(arr)
        t: Dict[str, Any] = {"name": name, "datatype": datatype_of(arr.dtype),
                             "shape": list(arr.shape)}
        if binary:
            if _LITTLE:  # the array's own bytes, joined into the body once below (no extra copy)
                blob = np.ascontiguousarray(arr).data.cast("B")
            else:
                blob = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            t["parameters"] = {"binary_data_size": blob.nbytes if _LITTLE else len(blob)}
            blobs.append(blob)
        else:
            t["data"] = arr.reshape(-1).tolist()
        tensors.append(t)
    doc: Dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": tensors}
    if request_id is not None:
        doc["id"] = request_id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head] + blobs), len(head)
