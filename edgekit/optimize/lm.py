"""What distillation and factorization of causal language models share: reading a Hugging Face folder,
the user's text as token blocks, held-out perplexity / KL / top-1 agreement, and saving a folder.

torch and transformers are imported inside functions (the `llm-convert` extra), like edgekit.convert.
Perplexity is measured as llama.cpp's perplexity tool does: the text is cut into blocks of `seq_len`
tokens and every token after the first of a block is scored; KL(teacher || model) is the mean over the
same tokens of the divergence of the next-token distributions (temperature 1).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from edgekit.errors import DataError, SourceModelError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)


def import_torch_transformers(where: str = ""):
    try:
        import torch
        import transformers
    except ImportError:
        raise SourceModelError("language models need torch and transformers", path=where or None,
                               hint="pip install 'edgekit[llm-convert]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


def is_hf_folder(path: os.PathLike) -> bool:
    """A Hugging Face model folder: a directory with config.json."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def pick_device(device: Optional[str] = None) -> str:
    torch, _ = import_torch_transformers()
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DataError(f"--device {device}: CUDA is not available on this machine", hint="use --device cpu")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_lm(path: os.PathLike, device: str = "cpu", *, what: str = "model", train: bool = False):
    """(model, tokenizer) from a Hugging Face folder, float32 (bfloat16 for a frozen model on CUDA)."""
    torch, transformers = import_torch_transformers(str(path))
    p = Path(path)
    if not p.exists():
        raise SourceModelError(f"{what} not found", path=str(p))
    if not is_hf_folder(p):
        raise SourceModelError(f"the {what} is not a Hugging Face model folder (no config.json)", path=str(p),
                               hint="give the directory save_pretrained() wrote")
    dtype = torch.bfloat16 if (device.startswith("cuda") and not train) else torch.float32
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise SourceModelError(f"transformers cannot load it as a causal LM: {str(e).splitlines()[0][:200]}",
                               path=str(p)) from None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceModelError(f"no usable tokenizer in the folder: {str(e).splitlines()[0][:200]}", path=str(p),
                               hint="save the tokenizer beside the weights (tokenizer.save_pretrained)") from None
    model.to(device)
    model.train(train)
    if not train:
        for q in model.parameters():
            q.requires_grad_(False)
    return model, tok


def params(model, *, non_embedding: bool = False) -> int:
    n = sum(int(q.numel()) for q in model.parameters())
    if non_embedding:
        emb = model.get_input_embeddings()
        n -= int(emb.weight.numel())
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
            n -= int(out.weight.numel())
    return n


def save_lm(model, tokenizer, out: os.PathLike, extra: Optional[Dict[str, Any]] = None) -> Path:
    """save_pretrained into a temporary directory beside `out`, then renamed into place (a folder that
    was there is replaced only once the new one is complete). `extra`: {file name: JSON} written too."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        for name, data in (extra or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- text -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Doc:
    """One training document: free text, or a prompt and its answer (chat messages when given)."""

    text: Optional[str] = None
    prompt: Optional[str] = None
    answer: Optional[str] = None
    messages: Optional[Tuple[Tuple[str, str], ...]] = None
    where: str = ""


def _files(path: Path, what: str) -> List[Path]:
    if not path.exists():
        raise DataError(f"{what} not found", path=str(path), hint="give a .txt / .jsonl file or a directory of them")
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES + JSONL_SUFFIXES:
            raise DataError(f"{what} must be .txt or .jsonl, not {path.suffix or '(no suffix)'}", path=str(path))
        return [path]
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
    if not files:
        raise DataError(f"{what}: the directory holds no .txt or .jsonl file", path=str(path))
    return files


def read_docs(path: os.PathLike, what: str = "training text") -> List[Doc]:
    """.txt files (one document each) and .jsonl files (a JSON object per line with "text", or
    "prompt" + "completion"/"response"/"answer", or "messages": [{"role", "content"}...])."""
    docs: List[Doc] = []
    for f in _files(Path(path), what):
        if f.suffix.lower() in TEXT_SUFFIXES:
            t = f.read_text(encoding="utf-8", errors="replace")
            if t.strip():
                docs.append(Doc(text=t, where=str(f)))
            continue
        with f.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"line {i} is not JSON ({e.msg})", path=str(f)) from None
                docs.append(_doc(obj, f"{f}:{i}"))
    if not docs:
        raise DataError(f"{what} holds no text", path=str(path))
    return docs


def _doc(obj: Any, where: str) -> Doc:
    if isinstance(obj, str):
        return Doc(text=obj, where=where)
    if not isinstance(obj, dict):
        raise DataError("each .jsonl line must be a JSON object or string", path=where)
    if isinstance(obj.get("messages"), list):
        try:
            msgs = tuple((str(m["role"]), str(m["content"])) for m in obj["messages"])
        except (KeyError, TypeError):
            raise DataError("each message needs 'role' and 'content'", path=where) from None
        return Doc(messages=msgs, where=where)
    if isinstance(obj.get("text"), str):
        return Doc(text=obj["text"], where=where)
    if isinstance(obj.get("prompt"), str):
        ans = next((obj[k] for k in ("completion", "response", "answer", "output") if isinstance(obj.get(k), str)),
                   None)
        return Doc(prompt=obj["prompt"], answer=ans, where=where)
    raise DataError("a .jsonl line needs 'text', 'prompt' (+ 'completion'), or 'messages'", path=where)


def prompt_text(tokenizer, doc: Doc) -> str:
    """The text a model continues: the chat template with a generation prompt when the tokenizer has one."""
    msgs = [{"role": r, "content": c} for r, c in (doc.messages or ())]
    if doc.prompt is not None:
        msgs = [{"role": "user", "content": doc.prompt}]
    if not msgs:
        raise DataError("a prompt line needs 'prompt' or 'messages'", path=doc.where)
    if msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in msgs) + "\n"


def doc_text(tokenizer, doc: Doc) -> str:
    if doc.text is not None:
        return doc.text
    if doc.messages and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in doc.messages], tokenize=False)
    if doc.messages:
        return "\n".join(c for _, c in doc.messages)
    return doc.prompt + ("\n" + doc.answer if doc.answer else "")


def token_stream(tokenizer, docs: Sequence[Doc]) -> List[int]:
    eos = tokenizer.eos_token_id
    ids: List[int] = []
    for d in docs:
        ids += tokenizer(doc_text(tokenizer, d), add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(int(eos))
    return ids


def blocks(ids: Sequence[int], seq_len: int):
    """[n, seq_len] int64 tensor of consecutive, non-overlapping blocks (the tail shorter than a block dropped)."""
    torch, _ = import_torch_transformers()
    n = len(ids) // seq_len
    return torch.tensor(list(ids[: n * seq_len]), dtype=torch.long).view(n, seq_len)


def text_blocks(tokenizer, data: os.PathLike, seq_len: int, val: Optional[os.PathLike] = None,
                val_fraction: float = 0.1, min_val_blocks: int = 2):
    """(train blocks, held-out blocks, how the held-out text was chosen)."""
    if seq_len < 8:
        raise DataError(f"--seq-len must be at least 8, not {seq_len}")
    train_ids = token_stream(tokenizer, read_docs(data))
    if val is not None:
        val_ids = token_stream(tokenizer, read_docs(val, "held-out text"))
        tr, va = blocks(train_ids, seq_len), blocks(val_ids, seq_len)
        held = f"{val} ({len(va) * seq_len} tokens)"
    else:
        allb = blocks(train_ids, seq_len)
        n_val = max(min_val_blocks, int(round(len(allb) * val_fraction)))
        tr, va = allb[: len(allb) - n_val], allb[len(allb) - n_val:]
        held = f"the last {n_val} blocks of {data} ({n_val * seq_len} tokens, not trained on)"
    if len(tr) < 1:
        raise DataError(f"too little text: {len(train_ids)} tokens make no training block of {seq_len} after "
                        "holding some out", path=str(data), hint="give more text or a smaller --seq-len")
    if len(va) < 1:
        raise DataError(f"the held-out text makes no block of {seq_len} tokens", path=str(val or data),
                        hint="give more held-out text or a smaller --seq-len")
    return tr, va, held


# --- measuring ---------------------------------------------------------------------------------------

def _logits(model, ids, attn=None):
    out = model(input_ids=ids, attention_mask=attn, use_cache=False)
    return out.logits.float()


def evaluate(model, held, *, teacher=None, batch_size: int = 8) -> Dict[str, Any]:
    """Held-out perplexity of `model`; with a teacher: mean KL(teacher || model) per token and
    teacher-forced top-1 agreement."""
    torch, _ = import_torch_transformers()
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    nll, n, kl, agree = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held), batch_size):
            ids = held[i: i + batch_size].to(dev)
            s = _logits(model, ids)[:, :-1]
            tgt = ids[:, 1:]
            logp = torch.log_softmax(s, -1)
            nll += float(-logp.gather(-1, tgt.unsqueeze(-1)).sum())
            n += int(tgt.numel())
            if teacher is not None:
                t = _logits(teacher, ids)[:, :-1]
                logq = torch.log_softmax(t, -1)
                kl += float((logq.exp() * (logq - logp)).sum())
                agree += int((t.argmax(-1) == s.argmax(-1)).sum())
    model.train(was)
    res: Dict[str, Any] = {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}
    if teacher is not None:
        res.update(kl=kl / n, top1_agreement=agree / n)
    return res


def int4_bundle(source: os.PathLike, target: str, out: os.PathLike, *, name: str, val: Optional[str] = None,
                bench_tokens: int = 64, say=print) -> Dict[str, Any]:
    """`source` (a Hugging Face folder) converted to an INT4 LLM bundle for `target` by edgekit.convert.llm
    (floor off, no rescue: the figures of plain INT4 are the point), then loaded with edgekit.runtime and its
    decode speed measured here. Returns the bundle's path, bytes, fidelity (perplexity float -> INT4, KL,
    top-1 agreement on the converter's held-out text: `val` when it is a .txt file) and speed."""
    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.convert.llm_fidelity import LLMFloor
    from edgekit.runtime import load

    text = str(val) if val is not None and Path(val).is_file() and Path(val).suffix == ".txt" else None
    say(f"INT4: converting {source} for {target}")
    result = convert_llm(LLMRecipe(model=str(source), targets=(target,), precision="int4", name=name, val=text,
                                   floor=LLMFloor(None, None, None), rescue=False), str(out))
    row = result.bundles[0]
    model = load(row.path)
    b = model.benchmark(prompt_tokens=32, new_tokens=bench_tokens, runs=3)
    return {"bundle": str(row.path), "bytes": row.bytes, "bytes_per_token": row.bytes_per_token,
            "fidelity": row.fidelity, "text": result.text, "decode_tok_s": b.get("decode_tok_s"),
            "prefill_tok_s": b.get("prefill_tok_s"), "ttft_ms": b.get("ttft_ms"), "threads": model.threads}


def fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))
