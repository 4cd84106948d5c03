"""Graph rewrites of the ORT GenAI model builder's model.onnx that change what a device holds in memory and what
it computes to no use, never the numbers it returns.

The tied embedding. For a model whose embedding table is the lm_head's weight (tie_word_embeddings: SmolLM2,
Qwen2.5-0.5B, Gemma...), ORT GenAI 0.18's builder shares the quantized table of an INT4/INT8 build
(shared_embeddings=true) by writing

    lm_head.MatMul.weight_Q8G32 [V, K/block, block] ──▶ MatMulNBits (lm_head)
                               └──▶ Reshape [V, K'] ──▶ GatherBlockQuantized (embedding)

ONNX Runtime constant-folds that Reshape when the session is created, into a private heap copy of the whole
table (SmolLM2-135M: 27 MiB; Qwen2.5-0.5B: 151936 x 896 int8 = 130 MiB), while MatMulNBits prepacks its own copy
and the file mapping of the original is released. `alias_tied_embedding` gives the GatherBlockQuantized its own
initializer that names the SAME bytes of model.onnx.data (same location, offset and length; the dims the Reshape
produced) and drops the Reshape: the Gather then reads the memory-mapped file, only the pages of the rows it looks
up become resident, and the arithmetic is unchanged (same bytes, same op: logits bit-identical). Only model.onnx
is rewritten (temporary file, then a rename); model.onnx.data is not touched.

Where the pattern is absent nothing happens: untied models, float builds (fp32/fp16: the tied table is a
Transpose of the lm_head's [K, V] weight, a layout the file does not hold, so ORT's folded copy stays; recorded by
`embedding_summary`), or a table held inline in model.onnx.

Two initializers that name the same external bytes are one weight: `initializer_bytes` counts them once (the
manifest's weight and bytes-per-token figures).

Imports: stdlib at module top; onnx inside the functions (convert-side only).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

EMBED_NOTE = ("untied embedding table 8-bit symmetric per block (GatherBlockQuantized, absmax / 127, no zero "
              "points): a quarter of the float32 table's bytes; a Gather reads one row per token")
ALIAS_SUFFIX = "_gather"   # name of the Gather's initializer: the lm_head's initializer's name + this
NOTE = "embedding aliased to the lm_head's bytes in model.onnx.data (no load-time copy)"


def _ext(t) -> Dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _nbytes(t) -> int:
    ext = _ext(t)
    return int(ext["length"]) if "length" in ext else len(t.raw_data)


def _location(t) -> Optional[Tuple[str, int, int]]:
    """(file, offset, length) of an initializer held in external data; None for one held inline."""
    ext = _ext(t)
    if not ext or "location" not in ext or "length" not in ext:
        return None
    return ext["location"], int(ext.get("offset", 0)), int(ext["length"])


def initializer_bytes(model) -> Dict[str, int]:
    """Bytes of each initializer of a ModelProto, an initializer that names the same external bytes as an earlier
    one (an alias, see alias_tied_embedding) counted 0."""
    seen = set()
    out: Dict[str, int] = {}
    for t in model.graph.initializer:
        loc = _location(t)
        out[t.name] = 0 if loc is not None and loc in seen else _nbytes(t)
        if loc is not None:
            seen.add(loc)
    return out


def stored_bytes(model) -> Dict[str, int]:
    """initializer_bytes, and each Cast of an initializer (half_scales' fp16 scales) under its output's name: the
    bytes in the file behind what a node reads."""
    sizes = initializer_bytes(model)
    sizes.update({c.output[0]: sizes[c.input[0]] for c in model.graph.node
                  if c.op_type == "Cast" and c.input and c.input[0] in sizes})
    return sizes


def read_bytes(model) -> Dict[str, int]:
    """The bytes a run reads of each constant a node reads, for the bytes read per token: initializer_bytes, with
    each Cast of an initializer (half_scales' fp16 scales) under its output's name at the Cast's output type (ONNX
    Runtime folds the Cast at load into an initializer of that type, which the kernels read: an fp16 scale is read
    as 4 bytes), and an initializer that only Casts read counted 0 (read once, at load). stored_bytes is what the
    file holds."""
    from onnx import helper

    sizes = initializer_bytes(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    out = dict(sizes)
    casts = [c for c in model.graph.node if c.op_type == "Cast" and c.input and c.input[0] in sizes]
    for c in casts:
        to = next((a.i for a in c.attribute if a.name == "to"), None)
        try:
            src = helper.tensor_dtype_to_np_dtype(types[c.input[0]]).itemsize
            dst = helper.tensor_dtype_to_np_dtype(to).itemsize
        except (KeyError, TypeError, ValueError):   # a type numpy has no itemsize for: the stored bytes
            src = dst = 1
        out[c.output[0]] = sizes[c.input[0]] * dst // src
    reads = readers(model.graph)
    for name in {c.input[0] for c in casts}:
        if all(n.op_type == "Cast" for n, _ in reads.get(name, ())):
            out[name] = 0
    return out


def readers(graph) -> Dict[str, List[Tuple[Any, int]]]:
    """name -> [(node, input index)] for every input of every node of `graph`, in the graph's order (a node that
    reads a name twice is there twice; len() is how many reads). The graph's own nodes only: a subgraph's reads
    and the graph's outputs are not counted (a caller that must keep an output checks g.output itself)."""
    out: Dict[str, List[Tuple[Any, int]]] = {}
    for n in graph.node:
        for i, x in enumerate(n.input):
            out.setdefault(x, []).append((n, i))
    return out


def _const_ints(model, name: str) -> Optional[List[int]]:
    """The int64 values of an initializer or a Constant node's output `name` (None when it is neither)."""
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == name:
            return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
    for n in model.graph.node:
        if n.op_type == "Constant" and list(n.output) == [name]:
            for a in n.attribute:
                if a.name == "value":
                    return [int(v) for v in numpy_helper.to_array(a.t).reshape(-1)]
    return None


def _write_atomic(model, path: Path) -> None:
    """model.onnx only (its external data stays where its initializers say): a temporary file beside, then a
    rename, so a reader never sees half a graph."""
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".onnx.tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


DATA = "model.onnx.data"
_STAGED = (".model-", ".onnx.data")   # a data file written under a new name before it takes DATA's (_swap_in)


def _staged_data(model_dir: Path) -> str:
    """A new, empty data file's name in model_dir, for a rewrite's bytes (_swap_in)."""
    fd, p = tempfile.mkstemp(prefix=_STAGED[0], suffix=_STAGED[1], dir=str(model_dir))
    os.close(fd)
    os.chmod(p, 0o644)
    return os.path.basename(p)


def _subgraphs(g):
    """g and every graph under it (If / Loop / Scan bodies), each once."""
    out, todo = [], [g]
    while todo:
        x = todo.pop()
        out.append(x)
        for n in x.node:
            for a in n.attribute:
                todo += ([a.g] if a.HasField("g") else []) + list(a.graphs)
    return out


def _locations(model):
    """The location entries of a ModelProto's external tensors (its graphs' initializers, subgraphs too)."""
    for g in _subgraphs(model.graph):
        for t in g.initializer:
            yield from (e for e in t.external_data if e.key == "location")


def _sync_dir(d: Path) -> None:
    """fsync a folder (the renames in it), where the platform and file system allow it."""
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:   # no folder descriptors (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:   # a file system that does not sync folders
        pass
    finally:
        os.close(fd)


def _swap_in(model, model_dir: Path, staged: str) -> None:
    """Make `model`, whose external tensors are all in model_dir/staged (_staged_data; written), the folder's
    model.onnx + model.onnx.data, so that a reader of the folder finds at every moment a model.onnx whose data
    file holds its bytes. Two files cannot be replaced in one rename; the graph names its data file, so the
    graph's rename is the switch:

    1. model.onnx replaced by the graph naming `staged`: the old pair becomes the new one;
    2. model.onnx.data replaced by a copy of `staged` (not a hard link: onnx refuses to load a data file with
       two; the copy is the kernel's, SmolLM2-135M's 105 MB in 0.13 s with its fsync);
    3. model.onnx replaced by the graph naming model.onnx.data; 4. `staged` removed.

    Stopped before 1 (a crash, an error): the old pair (an error removes `staged`); after 1: the new pair, its
    graph naming `staged` until 3. The next swap in the folder removes the staged files the graph it replaces
    names."""
    import shutil

    import onnx

    path = model_dir / "model.onnx"
    before = {e.value for e in _locations(onnx.load(str(path), load_external_data=False))} if path.is_file() \
        else set()
    try:
        _write_atomic(model, path)
    except BaseException:
        (model_dir / staged).unlink(missing_ok=True)
        raise
    _sync_dir(model_dir)
    copy = model_dir / (staged + ".tmp")
    try:
        shutil.copyfile(model_dir / staged, copy)
        with open(copy, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(copy, model_dir / DATA)
    except BaseException:
        copy.unlink(missing_ok=True)
        raise
    for e in _locations(model):
        if e.value == staged:
            e.value = DATA
    _write_atomic(model, path)
    _sync_dir(model_dir)
    for name in before | {staged}:   # this swap's, and any an earlier one stopped after 1 left named
        if name.startswith(_STAGED[0]) and name.endswith(_STAGED[1]) and os.path.basename(name) == name:
            (model_dir / name).unlink(missing_ok=True)


def save_with_data(model, model_dir: Path) -> None:
    """`model` (its tensors in memory) written as model_dir's model.onnx with a whole new model.onnx.data (for
    rewrites that change initializers): the data into a new file beside (onnx appends to an existing one), then
    switched in with the graph (_swap_in: a reader never finds a graph and a data file that do not match)."""
    import onnx

    model_dir = Path(model_dir)
    staged = _staged_data(model_dir)
    graph = model_dir / (staged + ".onnx.tmp")
    try:
        onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=staged, size_threshold=1024)
        with open(model_dir / staged, "rb+") as f:
            os.fsync(f.fileno())
        written = onnx.load(str(graph), load_external_data=False)
    except BaseException:
        (model_dir / staged).unlink(missing_ok=True)
        raise
    finally:
        graph.unlink(missing_ok=True)
    _swap_in(written, model_dir, staged)


def alias_tied_embedding(model_dir: os.PathLike) -> Dict[str, Any]:
    """Replace the builder's Reshape(initializer) -> GatherBlockQuantized of a tied embedding by an initializer
    aliasing the same external bytes (see the module's docstring). Rewrites model_dir/model.onnx when the pattern
    is present; returns {"aliased": [{"node", "initializer", "of", "dims", "bytes"}], "bytes": total aliased,
    "skipped": [reasons], "note"}; "aliased" is empty when there was nothing to do (a second call: a no-op)."""
    import onnx

    path = Path(model_dir) / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    reads = readers(g)
    graph_outputs = {o.name for o in g.output}
    done: List[Dict[str, Any]] = []
    skipped: List[str] = []
    for n in list(g.node):
        if n.op_type != "Reshape" or len(n.input) < 2 or n.input[0] not in inits:
            continue
        users = [u for u, _ in reads.get(n.output[0], [])]
        if not users or n.output[0] in graph_outputs or any(
                u.op_type != "GatherBlockQuantized" or u.input[0] != n.output[0] or
                any(i == n.output[0] for i in list(u.input)[1:]) for u in users):
            continue
        w = inits[n.input[0]]
        if _location(w) is None:
            skipped.append(f"{n.name}: {w.name} is held inside model.onnx, not in external data")
            continue
        shape = _const_ints(model, n.input[1])
        count = 1
        for d in w.dims:
            count *= int(d)
        new = 1
        for d in shape or []:
            new *= d
        if not shape or any(d <= 0 for d in shape) or new != count:
            skipped.append(f"{n.name}: shape {shape} is not an explicit reshape of {list(w.dims)}")
            continue
        name = w.name + ALIAS_SUFFIX
        while name in inits:
            name += "_"
        e = onnx.TensorProto()
        e.CopyFrom(w)                 # same data_type, same external_data: location, offset, length
        e.name = name
        del e.dims[:]
        e.dims.extend(shape)
        g.initializer.append(e)
        inits[name] = e
        for u in users:
            u.input[0] = name
        g.node.remove(n)
        # the shape constant, when nothing else reads it
        if not any(n.input[1] in m.input for m in g.node) and n.input[1] not in graph_outputs:
            for t in list(g.initializer):
                if t.name == n.input[1]:
                    g.initializer.remove(t)
            for c in list(g.node):
                if c.op_type == "Constant" and list(c.output) == [n.input[1]]:
                    g.node.remove(c)
        done.append({"node": users[0].name, "initializer": name, "of": w.name, "dims": shape,
                     "bytes": _nbytes(w)})
    if done:
        _write_atomic(model, path)
    return {"aliased": done, "bytes": sum(d["bytes"] for d in done), "skipped": skipped,
            "note": NOTE if done else None}


def embedding_summary(model_dir: os.PathLike) -> Optional[Dict[str, Any]]:
    """How the shipped graph's embedding reads its table, for the manifest: {"op", "table", "shares" (the lm_head
    initializer whose bytes it reads, tied builds), "load_copy_bytes" (a copy ONNX Runtime makes at session creation
    by folding a Reshape/Transpose of a weight), "note"}; None when no embedding Gather is found."""
    import onnx

    model = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    gathers = [n for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")
               and "embed_tokens" in n.name]
    if not gathers:
        return None
    n = gathers[0]
    table = n.input[0]
    out: Dict[str, Any] = {"op": n.op_type, "node": n.name}
    if table in inits:
        t = inits[table]
        loc = _location(t)
        shares = [o.name for o in model.graph.initializer
                  if o.name != table and loc is not None and _location(o) == loc]
        out.update(table=table, bytes=_nbytes(t), load_copy_bytes=0)
        if n.op_type == "GatherBlockQuantized":
            attrs = {a.name: a.i for a in n.attribute if a.name in ("bits", "block_size")}
            out.update(bits=attrs.get("bits", 4), block_size=attrs.get("block_size", 128))
        if shares:
            out.update(shares=shares[0], note=NOTE)
        elif n.op_type == "GatherBlockQuantized" and out["bits"] == 8:
            out.update(note=EMBED_NOTE)
        return out
    p = producer.get(table)
    if p is not None and p.op_type in ("Reshape", "Transpose") and p.input[0] in inits:
        t = inits[p.input[0]]
        out.update(table=f"{p.op_type}({t.name})", shares=t.name, bytes=_nbytes(t), load_copy_bytes=_nbytes(t),
                   note=f"a {p.op_type} of the lm_head's weight: ONNX Runtime folds it into a private copy at load")
        return out
    out.update(table=table, note="computed in the graph")
    return out


# -- the lm_head on the last position only --------------------------------------------------------------------
#
# The builder's graph computes the lm_head at every position it is given: a prompt of S tokens costs S x vocab x
# hidden multiply-adds and S x vocab x 4 bytes of logits, of which generation reads the last row only (SmolLM2-135M:
# 49,152 x 576, about a fifth of a 128-token prefill's arithmetic and 12.6 MB of logits per 64-token chunk; Gemma 3
# 270M's 262,144-token vocabulary: 67 MB). llama.cpp computes the last row only by default; the builder has the
# same rewrite behind prune_lm_head=true. `prune_lm_head` inserts it into a built graph:
#
#     final norm ──▶ Gather(axis=1, indices=[-1]) ──▶ lm_head MatMul(NBits) ──▶ ... ──▶ logits [batch, 1, vocab]
#
# The logits output declares [batch, 1, vocab], which ONNX Runtime GenAI allocates (as for the builder's own pruned
# graphs). Each row's arithmetic is unchanged (the same MatMul on the same row): the last position's logits are
# bit-identical where MLAS sums a row the same way at M = 1 as in a batch (8-bit blocks up to 64, 4-bit at 32),
# else a few 1e-6 apart (an INT4 build's 8-bit lm_head at block 128: LLMBuildOptions.int8_head_blocks); the tokens
# the same but at a near tie. What needs every position (teacher-forced fidelity, the golden logits) is measured on
# the graph before this rewrite, which the converter applies last, to the bundle it writes; a device
# teacher-forces a pruned bundle one token at a time (runtime.llm LanguageModel.logits).
PRUNE_NOTE = "the lm_head computes the last position's logits only (prefill: one row, not one per prompt token)"
_LAST = "/lm_head/last_position"
_AFTER_LM_HEAD = ("Add", "Mul", "Div", "Tanh", "Cast", "Softcap")
_PRUNING = ("Gather", "Slice", "Unsqueeze")   # what picks the last position before a pruned lm_head


def _lm_head(g):
    """(the lm_head MatMul node, the node producing its input) of a graph with a logits output, else (None, None)."""
    producer = {o: n for n in g.node for o in n.output}
    n = producer.get("logits")
    while n is not None and n.op_type in _AFTER_LM_HEAD:
        n = producer.get(n.input[0])
    if n is None or n.op_type not in ("MatMul", "MatMulNBits"):
        return None, None
    return n, producer.get(n.input[0])


def prune_lm_head(model_dir: os.PathLike) -> Dict[str, Any]:
    """Insert the last-position Gather before the lm_head (see above). Rewrites model_dir/model.onnx; returns
    {"pruned": bool, "node": the lm_head node, "why"?: why nothing was done}; a graph already pruned (by this or
    by the builder) is left as it is."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    path = Path(model_dir) / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    n, src = _lm_head(g)
    if n is None:
        return {"pruned": False, "node": None, "why": "no MatMul found before a logits output"}
    if src is not None and src.op_type in _PRUNING:
        return {"pruned": True, "node": n.name, "why": f"already pruned (the lm_head reads a {src.op_type})"}
    picked = n.input[0] + "/last_position"
    gather = helper.make_node("Gather", [n.input[0], _LAST], [picked], name="/lm_head/last_position/Gather", axis=1)
    nodes = list(g.node)
    nodes.insert(nodes.index(n), gather)
    n.input[0] = picked
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), _LAST))
    for o in g.output:
        dims = o.type.tensor_type.shape.dim
        if o.name == "logits" and len(dims) == 3:   # [batch, 1, vocab]: what ONNX Runtime GenAI allocates
            dims[1].Clear()
            dims[1].dim_value = 1
    _write_atomic(model, path)
    return {"pruned": True, "node": n.name}


def lm_head_pruned(model_dir: os.PathLike) -> bool:
    """Whether model_dir/model.onnx computes the last position's logits only (prune_lm_head, or the builder's)."""
    import onnx

    _, src = _lm_head(onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False).graph)
    return src is not None and src.op_type in _PRUNING


def unpruned(model_dir: os.PathLike):
    """model_dir's graph with its lm_head computing every position again (the pruning Gather, and the builder's
    Unsqueeze, taken out; logits [batch, sequence_length, vocab]), for teacher forcing a pruned bundle (the
    converter's OnnxDecoder, benchmarks): an onnx ModelProto whose initializers still name model_dir's external
    data (load it from bytes with session.model_external_initializers_file_folder_path = model_dir). None when
    the graph is not pruned."""
    import onnx

    model = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    g = model.graph
    n, prev = _lm_head(g)
    if n is None or prev is None or prev.op_type not in _PRUNING:
        return None
    producer = {o: m for m in g.node for o in m.output}
    while prev is not None and prev.op_type in _PRUNING:
        n.input[0] = prev.input[0]
        prev = producer.get(prev.input[0])
    for o in g.output:
        dims = o.type.tensor_type.shape.dim
        if o.name == "logits" and len(dims) == 3:
            dims[1].Clear()
            dims[1].dim_param = "sequence_length"
    return model   # the pruning nodes stay, unused: ONNX Runtime drops them at load



# -- fp16 scales in the file ----------------------------------------------------------------------------------
#
# MatMulNBits takes its scales in its activations' type (T1): a CPU build's fp32 scale per block of 32 is a whole
# bit of every INT4 weight (4 + 32/32 + 4/32 zero point = 5.125 bits), a fifth of the file. Stored as fp16 and
# read through a Cast, they cost half:
#
#     weight_scale (fp16, in model.onnx.data) ──▶ Cast(to float) ──▶ MatMulNBits / GatherBlockQuantized scales
#
# ONNX Runtime constant-folds the Cast when the session is created (graph optimizations on, its default and ORT
# GenAI's), before MatMulNBits prepacks its weights and scales, so the kernels run on the same fp32 values as a file
# holding them in fp32: decode speed is unchanged (checked on a 30-node chain, 576 x 1536 at block 32, outputs
# bit-identical to the fp32 file holding the same values) and only the file and what it maps are smaller (the bytes
# a decoded token reads are the folded fp32 scales': read_bytes counts them at 4 bytes, stored_bytes at 2). Scales
# already on fp16's grid (llm_gptq.fp16_grid: the symmetric 8-bit nodes edgekit rounds) are stored exactly; others
# are rounded to fp16 (relative error <= 2^-11: a weight moves by at most |q - zero point| x 2^-11 of its step,
# 0.7% of a 4-bit one), and the converter measures fidelity and the golden logits on the rewritten graph. An
# initializer with a scale fp16 holds neither exactly nor within that (below its normal range, 6.1e-5, or above
# 65504) stays fp32 (that node's scales, all of them). Only initializers read solely as MatMulNBits' /
# GatherBlockQuantized's scales, named once, not graph inputs or outputs, whose external bytes no other
# initializer shares (aliases among the scales themselves stay aliases), are touched; an fp16 build's scales are
# fp16 already. A graph with an external tensor this module cannot place (no length) is left as it is.
HALF_NOTE = "MatMulNBits scales stored fp16 in the file, read through a Cast ONNX Runtime folds at load"
_SCALE_INPUT = {"MatMulNBits": 2, "GatherBlockQuantized": 2}
FP16_MIN_NORMAL = 6.103515625e-05   # the smallest normal fp16 value, 2^-14
_ALIGN = 64


def _read_external(model_dir: Path, t) -> bytes:
    loc, off, n = _location(t)
    with open(model_dir / loc, "rb") as f:
        f.seek(off)
        b = f.read(n)
    if len(b) != n:
        raise ValueError(f"{loc}: {t.name} needs {n} bytes at offset {off}, the file has {len(b)}")
    return b


class _StagedData:
    """A rewrite's new data file beside model.onnx (_staged_data; _swap_in makes it model.onnx.data): bytes appended
    _ALIGN-aligned (put), tensors pointed at them (point), synced (close); discard() removes it (an error midway)."""

    def __init__(self, model_dir: Path):
        self.name = _staged_data(model_dir)
        self.path = model_dir / self.name
        self.f = open(self.path, "wb")
        self.pos = 0

    def put(self, b: bytes) -> Tuple[int, int]:
        pad = (-self.pos) % _ALIGN
        self.f.write(b"\0" * pad)
        start = self.pos + pad
        self.f.write(b)
        self.pos = start + len(b)
        return start, len(b)

    def point(self, t, start: int, n: int) -> None:
        from onnx import TensorProto

        del t.external_data[:]
        for k, v in (("location", self.name), ("offset", str(start)), ("length", str(n))):
            e = t.external_data.add()
            e.key, e.value = k, v
        t.data_location = TensorProto.EXTERNAL

    def close(self) -> None:
        if not self.f.closed:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()

    def discard(self) -> None:
        self.f.close()
        self.path.unlink(missing_ok=True)


def node_constants(graph, node) -> Tuple[List[Any], List[Any]]:
    """What a node reads that is constant, to run it alone: (the Cast nodes between an initializer and the node,
    the initializers), following half_scales' Cast back to the fp16 initializer."""
    inits = {t.name: t for t in graph.initializer}
    cast = {n.output[0]: n for n in graph.node if n.op_type == "Cast" and n.input and n.input[0] in inits}
    nodes, tensors = [], []
    for x in node.input:
        if x in inits:
            tensors.append(inits[x])
        elif x in cast:
            nodes.append(cast[x])
            tensors.append(inits[cast[x].input[0]])
    return nodes, tensors


def constant_dtypes(graph) -> Dict[str, Any]:
    """name -> the numpy dtype a node reading it sees, for every initializer (its own type) and every Cast of one
    (the Cast's `to`: half_scales' fp16 scales are read as fp32). What an edgekit rewrite writes a replacement in:
    a MatMulNBits / GatherBlockQuantized node's scales share its activations' type (T1: fp16 in a CUDA build, whose
    graph the model builder writes in fp16, fp32 in a CPU build), a float MatMul's weight and a norm's multiplier
    their input's, so a node rewritten in the type of the tensor it replaces stays bound as the graph binds it."""
    from onnx import helper

    out = {t.name: helper.tensor_dtype_to_np_dtype(t.data_type) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Cast" and n.input and n.input[0] in out:
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            if to is not None:
                out[n.output[0]] = helper.tensor_dtype_to_np_dtype(to)
    return out


def half_scales(model_dir: os.PathLike) -> Dict[str, Any]:
    """Store the fp32 scales of model_dir's MatMulNBits / GatherBlockQuantized nodes as fp16 behind a Cast (see
    above). Rewrites model.onnx and model.onnx.data (a new data file beside, switched in with the graph:
    _swap_in; initializers that name the same external bytes, alias_tied_embedding's, still do); returns
    {"initializers": n halved, "saved_bytes", "kept": [(name, why)], "note"}. A second call finds nothing to do."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    model_dir = Path(model_dir)
    path = model_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    nothing = {"initializers": 0, "saved_bytes": 0, "kept": [], "note": None}
    if any(t.data_location == TensorProto.EXTERNAL and _location(t) is None for t in g.initializer):
        return dict(nothing, kept=[(None, "an external initializer without a length: the graph is left as it is")])
    inits = {t.name: t for t in g.initializer}
    count: Dict[str, int] = {}
    for t in g.initializer:
        count[t.name] = count.get(t.name, 0) + 1
    reads = readers(g)
    interface = {o.name for o in g.output} | {i.name for i in g.input}
    sharers: Dict[Tuple[str, int, int], List[str]] = {}
    for t in g.initializer:
        if _location(t) is not None:
            sharers.setdefault(_location(t), []).append(t.name)
    targets: List[str] = []
    for name, uses in reads.items():
        t = inits.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or name in interface or count[name] > 1:
            continue
        if all(_SCALE_INPUT.get(n.op_type) == i for n, i in uses):
            targets.append(name)
    is_target = set(targets)
    kept: List[Tuple[str, str]] = []
    new_data: Dict[str, bytes] = {}
    for name in targets:
        t = inits[name]
        loc = _location(t)
        if loc is not None and not all(x in is_target for x in sharers[loc]):
            kept.append((name, "its bytes are also another initializer's"))
            continue
        raw = _read_external(model_dir, t) if loc else None
        a = (np.frombuffer(raw, dtype="<f4") if raw is not None else onnx.numpy_helper.to_array(t)).reshape(-1)
        h = a.astype("<f2")
        mag = np.abs(a)
        exact = h.astype(np.float32) == a
        if not np.all(exact | (np.isfinite(a) & ((mag == 0) | (mag >= FP16_MIN_NORMAL)) & (mag <= 65504))):
            kept.append((name, "a scale outside fp16's normal range"))
            continue
        new_data[name] = h.tobytes()
    is_target = set(new_data)
    for loc, names in sharers.items():   # aliases among the scales: all of them halved, or none
        if any(x in is_target for x in names) and not all(x in is_target for x in names):
            for x in names:
                if new_data.pop(x, None) is not None:
                    kept.append((x, "its bytes are also another initializer's"))
    if not new_data:
        return dict(nothing, kept=kept)
    taken = set(inits) | set(reads) | interface | {v.name for v in g.value_info} | {
        o for n in g.node for o in n.output}

    # every initializer's bytes into a new data file: the halved ones converted, aliases kept as aliases
    out = _StagedData(model_dir)
    try:
        moved: Dict[Tuple[str, int, int], Tuple[int, int]] = {}
        saved = 0
        for t in g.initializer:
            loc = _location(t)
            if t.name in new_data:
                if loc and loc in moved:   # an alias of a scale halved just before: the same new bytes
                    start, n = moved[loc]
                else:
                    before = _nbytes(t) if loc else 4 * int(np.prod(list(t.dims), dtype=np.int64))
                    start, n = out.put(new_data[t.name])
                    if loc:
                        moved[loc] = (start, n)
                    saved += before - n
                t.data_type = TensorProto.FLOAT16
                t.ClearField("raw_data")
                t.ClearField("float_data")
            elif loc:
                if loc not in moved:
                    moved[loc] = out.put(_read_external(model_dir, t))
                start, n = moved[loc]
            else:
                continue
            out.point(t, start, n)
        out.close()
        casts = []
        for name in new_data:
            half = name + "_fp16"
            while half in taken:
                half += "_"
            taken.add(half)
            inits[name].name = half
            casts.append(helper.make_node("Cast", [half], [name], name=f"{name}/Cast", to=TensorProto.FLOAT))
        nodes = casts + list(g.node)
        del g.node[:]
        g.node.extend(nodes)
        # a value_info the builder wrote for an initializer's name (ignored while it was one) would now describe
        # the Cast's output, with the shape of before any re-rounding at another block: ONNX Runtime would merge it
        stale = [v for v in g.value_info if v.name in new_data]
        for v in stale:
            g.value_info.remove(v)
    except BaseException:
        out.discard()
        raise
    _swap_in(model, model_dir, out.name)
    return {"initializers": len(new_data), "saved_bytes": saved, "kept": kept, "note": HALF_NOTE}


def scales_summary(model_dir: os.PathLike) -> Optional[Dict[str, Any]]:
    """How the shipped graph's MatMulNBits / GatherBlockQuantized scales are stored, for the manifest: {"fp16_cast"
    (initializers stored fp16, read through a Cast), "fp32", "fp16" (an fp16 graph's own), "bytes" (of the
    scales in the file), "note"}; None for a graph without such nodes."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    sizes = initializer_bytes(model)
    cast = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Cast" and n.input[0] in inits}
    names = {n.input[_SCALE_INPUT[n.op_type]] for n in g.node
             if n.op_type in _SCALE_INPUT and len(n.input) > _SCALE_INPUT[n.op_type]}
    if not names:
        return None
    out: Dict[str, Any] = {"fp16_cast": 0, "fp32": 0, "fp16": 0, "bytes": 0}
    for x in sorted(names):
        src = cast.get(x, x)
        t = inits.get(src)
        if t is None:
            continue
        out["bytes"] += sizes.get(src, 0)
        if x in cast and t.data_type == TensorProto.FLOAT16:
            out["fp16_cast"] += 1
        elif t.data_type == TensorProto.FLOAT16:
            out["fp16"] += 1
        else:
            out["fp32"] += 1
    out["note"] = HALF_NOTE if out["fp16_cast"] else None
    return out


ROPE_NOTE = ("RoPE cos / sin caches cut to the bundle's context (the builder writes max_position_embeddings rows; "
             "positions past the context are never read: ONNX Runtime GenAI refuses a max_length above "
             "genai_config's context_length)")
# the nodes that read RoPE cos / sin caches, their rows indexed by position: (domain, op) -> the cache inputs.
# ONNX Runtime's contrib ops as the model builder writes them, and ONNX's own RotaryEmbedding (opset 23)
_ROPE_READERS = {("com.microsoft", "GroupQueryAttention"): (7, 8), ("com.microsoft", "PagedAttention"): (8, 9),
                 ("com.microsoft", "RotaryEmbedding"): (2, 3), ("com.microsoft", "MRotaryEmbedding"): (2, 3),
                 ("", "RotaryEmbedding"): (1, 2), ("ai.onnx", "RotaryEmbedding"): (1, 2)}


def _all_tensors(model):
    """Every TensorProto of a ModelProto: initializers and node attributes (Constant values), subgraphs too."""
    for g in _subgraphs(model.graph):
        yield from g.initializer
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors


def _rope_reads(g, reads, name: str) -> bool:
    """Whether every read of `name` in g is a RoPE reader's cache input (and something reads it)."""
    uses = reads.get(name, [])
    return bool(uses) and all(i in _ROPE_READERS.get((n.domain, n.op_type), ()) for n, i in uses)


def _rope_sources(g, name: str, found: list, kept: list, depth: int = 0) -> None:
    """The tensors behind cache `name` of graph g: an initializer, a Constant node's value, or (Phi-3 LongRoPE: an
    If choosing the short or the long pair by the sequence length) what each branch's output is; appended to
    found as (graph, name, tensor, holder) with holder "initializer" or "constant"; anything else to kept."""
    for t in g.initializer:
        if t.name == name:
            found.append((g, name, t, "initializer"))
            return
    for n in g.node:
        if name not in n.output:
            continue
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            found.append((g, name, n.attribute[0].t, "constant"))
        elif n.op_type == "If" and depth < 4:
            k = list(n.output).index(name)
            for a in n.attribute:
                if a.HasField("g") and k < len(a.g.output):
                    _rope_sources(a.g, a.g.output[k].name, found, kept, depth + 1)
        else:
            kept.append((name, f"made by a {n.op_type} node"))
        return
    kept.append((name, "not an initializer or a node's output (a graph input)"))


def rope_pairs(model) -> List[Tuple[Tuple[Any, str, Any, str], Tuple[Any, str, Any, str]]]:
    """The RoPE cos / sin cache pairs of a ModelProto that only RoPE readers read (GroupQueryAttention's cos_cache /
    sin_cache, RotaryEmbedding's; Gemma 3's local and global pairs; Phi-3 LongRoPE's short and long pairs behind
    an If): [(cos, sin)], each (graph, name, tensor, "initializer" | "constant"), each pair once. A pair one of
    whose caches something else reads too (a Shape, a graph output) or is made by another node is not in it: a
    reader takes a cos and a sin of the same rows, so the two are cut together or not at all."""
    g = model.graph
    reads = readers(g)
    outputs = {o.name for o in g.output}
    pairs: List[Tuple[str, str]] = []
    for n in g.node:
        idx = _ROPE_READERS.get((n.domain, n.op_type), ())
        if len(idx) == 2 and idx[1] < len(n.input) and n.input[idx[0]] and n.input[idx[1]]:
            pair = (n.input[idx[0]], n.input[idx[1]])
            if pair not in pairs:
                pairs.append(pair)
    out, seen = [], set()
    for names in pairs:
        found: List[list] = [[], []]
        kept: list = []
        for k, name in enumerate(names):
            if name in outputs or not _rope_reads(g, reads, name):
                kept.append(name)
            else:
                _rope_sources(g, name, found[k], kept)
        if kept or len(found[0]) != len(found[1]):
            continue
        for a, b in zip(*found):
            if (id(a[2]), id(b[2])) not in seen and a[2] is not b[2]:
                seen.add((id(a[2]), id(b[2])))
                out.append((a, b))
    return out


def rope_caches(model) -> List[Tuple[Any, str, Any, str]]:
    """The caches of rope_pairs, each tensor once: [(graph, name, tensor, "initializer" | "constant")]."""
    out, seen = [], set()
    for pair in rope_pairs(model):
        for f in pair:
            if id(f[2]) not in seen:
                seen.add(id(f[2]))
                out.append(f)
    return out


def cut_rope_caches(model_dir: os.PathLike, rows: int) -> Dict[str, Any]:
    """Cut model_dir's RoPE cos / sin caches (rope_caches) to their first `rows` rows, positions 0..rows-1: the
    model builder writes max_position_embeddings rows ([positions, rotary_dim / 2], fp32 on CPU), 131,072 for
    Llama 3.2 / Phi-3.5 / DeepSeek-R1-Distill, 33.5 MB of Llama-3.2-1B's model.onnx.data and 50 MB of
    Phi-3.5-mini's model.onnx (its LongRoPE pair is held inside the graph) that a bundle whose context is `rows`
    never reads. A cache of `rows` rows or fewer is left as it is (Phi-3's short pair: original_max_position_
    embeddings rows); the values kept are the same bits, so every logit at a position below `rows` is unchanged.
    Caches in model.onnx.data: the data file rewritten (a new one beside, switched in with the graph: _swap_in;
    initializers naming the same bytes still do); caches inside the graph: model.onnx only. Returns {"rows",
    "caches": [{"name", "rows_before"}], "saved_bytes", "kept": [(name, why)], "note"}; a second call finds
    nothing to do. The caller sets genai_config's context_length to at most `rows` (ONNX Runtime GenAI then refuses
    a longer generation, which would read past the cut)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model_dir = Path(model_dir)
    path = model_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    nothing = {"rows": int(rows), "caches": [], "saved_bytes": 0, "kept": [], "note": None}
    if rows < 1:
        return dict(nothing, kept=[(None, f"{rows} rows: nothing cut")])
    tensors = list(_all_tensors(model))
    if any(t.data_location == TensorProto.EXTERNAL and _location(t) is None for t in tensors):
        return dict(nothing, kept=[(None, "an external tensor without a length: the graph is left as it is")])
    inits = {id(t) for g in _subgraphs(model.graph) for t in g.initializer}
    if any(t.data_location == TensorProto.EXTERNAL and id(t) not in inits for t in tensors):
        # _swap_in points initializers back at model.onnx.data, not a node attribute's tensor (a Constant saved
        # with its value external): it would name the staged file, gone after the swap
        return dict(nothing, kept=[(None, "a node attribute's tensor in the data file: the graph is left as it is")])
    kept: List[Tuple[str, str]] = []
    cut: Dict[int, Tuple[Any, str, Any]] = {}   # id(tensor) -> (graph, name, tensor)
    pairs = rope_pairs(model)   # the same tensor objects throughout: `tensors` above holds them
    caches = {id(f[2]): f for pair in pairs for f in pair}
    for g, name, t, _ in caches.values():
        if len(t.dims) != 2 or int(t.dims[0]) <= rows:
            continue
        if t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
            kept.append((name, f"of type {helper.tensor_dtype_to_np_dtype(t.data_type)}, not a float cache"))
            continue
        if _location(t) is not None and _location(t)[2] % int(t.dims[0]):
            kept.append((name, f"{_location(t)[2]} bytes are not {int(t.dims[0])} rows"))
            continue
        cut[id(t)] = (g, name, t)
    # an external cache whose bytes another tensor also names (an alias) is cut only with all of them
    sharers: Dict[Tuple[str, int, int], List[Any]] = {}
    for t in tensors:
        if _location(t) is not None:
            sharers.setdefault(_location(t), []).append(t)
    for group in sharers.values():
        if any(id(t) in cut for t in group) and not all(id(t) in cut for t in group):
            for t in group:
                if id(t) in cut:
                    kept.append((cut.pop(id(t))[1], "its bytes are also another tensor's"))
    for a, b in pairs:   # a cos and its sin: both cut, or neither (a reader wants the same rows of each)
        if (id(a[2]) in cut) != (id(b[2]) in cut):
            for x in (a, b):
                if id(x[2]) in cut:
                    kept.append((cut.pop(id(x[2]))[1], f"its pair {b[1] if x is a else a[1]} is not cut"))
    if not cut:
        return dict(nothing, kept=kept)
    done, saved, fixed = [], 0, set()
    new_data: Dict[int, bytes] = {}
    for g, name, t in cut.values():
        before, width = int(t.dims[0]), int(t.dims[1])
        loc = _location(t)
        if loc is not None:
            keep = loc[2] // before * rows   # row-major: the first rows are the first bytes
            new_data[id(t)] = _read_external(model_dir, t)[:keep]
            saved += loc[2] - keep
        else:
            a = numpy_helper.to_array(t)
            saved += (before - rows) * a[0].nbytes
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a[:rows]), t.name))
        del t.dims[:]
        t.dims.extend([rows, width])
        done.append({"name": name, "rows_before": before})
        fixed.add(name)
    # a shape the builder wrote for a cache (an If branch's outputs: [max_position_embeddings, rotary_dim / 2])
    # would now contradict the tensor
    for g in _subgraphs(model.graph):
        for v in list(g.value_info) + list(g.output) + list(g.input):
            dims = v.type.tensor_type.shape.dim
            if v.name in fixed and dims and dims[0].HasField("dim_value") and dims[0].dim_value > rows:
                dims[0].dim_value = rows
    if not new_data:   # the caches were inside the graph: model.onnx only
        _write_atomic(model, path)
        return {"rows": int(rows), "caches": done, "saved_bytes": saved, "kept": kept, "note": ROPE_NOTE}
    out = _StagedData(model_dir)
    try:
        moved: Dict[Tuple[str, int, int], Tuple[int, int]] = {}
        for t in tensors:
            loc = _location(t)
            if loc is None:
                continue
            if loc not in moved:
                moved[loc] = out.put(new_data[id(t)] if id(t) in new_data else _read_external(model_dir, t))
            out.point(t, *moved[loc])
        out.close()
    except BaseException:
        out.discard()
        raise
    _swap_in(model, model_dir, out.name)
    return {"rows": int(rows), "caches": done, "saved_bytes": saved, "kept": kept, "note": ROPE_NOTE}

__all__ = ["alias_tied_embedding", "constant_dtypes", "embedding_summary", "half_scales", "initializer_bytes",
           "lm_head_pruned", "node_constants", "prune_lm_head", "read_bytes", "save_with_data", "scales_summary",
           "stored_bytes", "unpruned", "cut_rope_caches", "rope_caches", "rope_pairs", "FP16_MIN_NORMAL",
           "HALF_NOTE", "NOTE", "PRUNE_NOTE", "ROPE_NOTE"]
