"""Whether ONNX Runtime GenAI tokenizes a checkpoint's tokenizer.json as the file says (the `tokenizers` library,
which transformers runs), for the SentencePiece forms it reads by a rule of its own.

ONNX Runtime GenAI 0.18 does not run tokenizer.json's normalizer or pre_tokenizer for a BPE vocabulary of "▁"
pieces: it takes the form from the decoder alone (measured with tokenizers built offline,
tests/test_llm_tokenizers.py):
- a decoder Sequence (Replace "▁" -> " ", ByteFallback, Fuse, ...) is read as SentencePiece BPE, and one with a
  Strip(" ") step gets a "▁" put before every piece of text between special tokens, also one that starts with a
  space: what a Prepend("▁") normalizer does (Llama 2 / TinyLlama's file: the same ids). A Metaspace
  pre_tokenizer with prepend_scheme "first" (transformers 5 writes every LlamaTokenizer so, Mistral 7B v0.3's
  form) puts it on the text's first piece only and not before a space: ' Hello' is ['▁', '▁H', ...] where the
  file gives ['▁H', ...], '<s>the' is ['<s>', '▁the'] where the file gives ['<s>', 't', 'he'], and so on after
  every special token of a chat template.
- any other decoder (a Metaspace decoder, none) is read as byte-level BPE: each "▁" and byte piece encodes as
  id -1, and decode / TokenizerStream raise RuntimeError 'map::at'.

No tokenizer.json form that ONNX Runtime GenAI 0.18 reads puts the "▁" as "first" does (its only choice is every
piece or none), so convert refuses such a file (`check_tokenizer`) rather than ship a bundle that feeds the model
other ids than the checkpoint's tokenizer: the source's and ONNX Runtime GenAI's ids are compared on short texts
(spaces, a newline, byte-fallback characters, text before and after the special tokens)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from edgekit.errors import SourceModelError
from edgekit.runtime.llmdecode import read_head
from edgekit.runtime.llmtemplate import EncodeRules, encode_rules_of, normalizer_form

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# an ONNX Runtime GenAI config that loads a tokenizer and nothing else (no model file is opened)
_TOKENIZER_ONLY_CONFIG = {"model": {"type": "llama", "context_length": 64, "vocab_size": 1,
                                    "decoder": {"filename": "model.onnx", "head_size": 1, "hidden_size": 1,
                                                "num_attention_heads": 1, "num_hidden_layers": 1,
                                                "num_key_value_heads": 1}}}
PLAIN_PROBES = ("Hello world", " Hello", "  two spaces", "a\nb", "\nx", "café 🙂", "x  y", "end ")
SPECIAL_PROBES = ("{s}the", "{s} the", "the{s}\nHi", "the {s} x")
MAX_SPECIALS = 4
# decomposed text (NFD, as macOS and PDF text comes): ORT GenAI runs no NFC / NFKC normalizer (runtime.llmtemplate)
NFD_PROBES = ("cafe\u0301 ok", "Cafe\u0301\nna\u0308ive")
# whitespace around an added token marked lstrip / rstrip: ORT GenAI strips none before an lstrip one
STRIP_PROBES = ("a  {s}b", "a \n{s}b", "a{s}  b", "a{s}\n b")


def _types(node: Any, key: str) -> List[Dict[str, Any]]:
    """The steps of a tokenizer.json pipeline node (a Sequence's under `key`, else the node itself)."""
    if not isinstance(node, dict):
        return []
    steps = node.get(key) if node.get("type") == "Sequence" else [node]
    return [s for s in steps or [] if isinstance(s, dict)]


def metaspace_form(doc: Dict[str, Any]) -> Optional[str]:
    """A description of tokenizer.json's SentencePiece form where it uses a Metaspace (pre_tokenizer or decoder)
    over a BPE model, the forms ONNX Runtime GenAI reads by its own rule; None for any other."""
    if not isinstance(doc.get("model"), dict) or doc["model"].get("type") != "BPE":
        return None
    pre = [s for s in _types(doc.get("pre_tokenizer"), "pretokenizers") if s.get("type") == "Metaspace"]
    dec = doc.get("decoder")
    dec_steps = _types(dec, "decoders")
    if not pre and not any(s.get("type") == "Metaspace" for s in dec_steps):
        return None

    def scheme(s: Dict[str, Any]) -> str:
        return str(s.get("prepend_scheme", "always" if s.get("add_prefix_space", True) else "never"))

    parts = [f"pre_tokenizer Metaspace (prepend_scheme '{scheme(pre[0])}')" if pre else "no Metaspace pre_tokenizer"]
    if isinstance(dec, dict) and dec.get("type") == "Sequence":
        parts.append("decoder Sequence [" + ", ".join(str(s.get("type")) for s in dec_steps) + "]")
    elif isinstance(dec, dict):
        parts.append(f"decoder {dec.get('type')}" + (f" (prepend_scheme '{scheme(dec)}')"
                                                     if dec.get("type") == "Metaspace" else ""))
    else:
        parts.append("no decoder")
    return ", ".join(parts)


def _why(doc: Dict[str, Any]) -> str:
    dec = doc.get("decoder")
    if not (isinstance(dec, dict) and dec.get("type") == "Sequence"):
        return ("ONNX Runtime GenAI reads a tokenizer whose decoder is not a Sequence as byte-level BPE ('▁' "
                "pieces encode as -1, decoding fails with 'map::at')")
    if any(s.get("type") == "Strip" and s.get("content") == " " for s in _types(dec, "decoders")):
        return ("ONNX Runtime GenAI runs no pre_tokenizer: it puts '▁' before every piece of text between special "
                "tokens, also before a space")
    return "ONNX Runtime GenAI runs no pre_tokenizer: with no Strip in the decoder it puts no '▁' before the text"


def probe_texts(doc: Dict[str, Any]) -> List[str]:
    added = [a for a in doc.get("added_tokens") or [] if isinstance(a, dict) and isinstance(a.get("content"), str)]
    specials = [a["content"] for a in added if a.get("special")][:MAX_SPECIALS]
    stripped = [a["content"] for a in added if a.get("lstrip") or a.get("rstrip")][:MAX_SPECIALS]
    return (list(PLAIN_PROBES) + [p.format(s=s) for s in specials for p in SPECIAL_PROBES] + list(NFD_PROBES)
            + [p.format(s=s) for s in stripped for p in STRIP_PROBES])


def text_form(head: Dict[str, Any]) -> Optional[str]:
    """A description of what tokenizer.json does to text before its model that ONNX Runtime GenAI may not (a
    normalizer; added tokens that strip the whitespace beside them); None where it does nothing such."""
    form, other = normalizer_form(head.get("normalizer"))
    parts = []
    if form or other:
        parts.append("normalizer " + " + ".join(([form] if form else []) + other))
    for key in ("lstrip", "rstrip"):
        toks = [a["content"] for a in head.get("added_tokens") or []
                if isinstance(a, dict) and a.get(key) and isinstance(a.get("content"), str)]
        if toks:
            parts.append(f"{len(toks)} added token(s) {key} ({', '.join(map(repr, toks[:3]))}"
                         + (", ..." if len(toks) > 3 else "") + ")")
    return ", ".join(parts) or None


def og_tokenizer(folder: Path, work: Path):
    """ONNX Runtime GenAI's tokenizer of `folder`'s tokenizer files (linked into `work` with a config that opens no
    model), adding no special tokens."""
    import onnxruntime_genai as og

    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            try:
                os.symlink((folder / name).resolve(), work / name)
            except OSError:
                shutil.copyfile(folder / name, work / name)
    (work / "genai_config.json").write_text(json.dumps(_TOKENIZER_ONLY_CONFIG), encoding="utf-8")
    tok = og.Tokenizer(str(work))
    tok.update_options(add_special_tokens="false")
    return tok


def compare_ids(folder: Path, texts: List[str],
                prep: Optional[EncodeRules] = None) -> List[Tuple[str, List[str], List[str]]]:
    """(text, ONNX Runtime GenAI's pieces, the file's pieces) for each of `texts` where the ids differ; `prep`: what
    the runtime does to text before ONNX Runtime GenAI encodes it (runtime.llmtemplate.EncodeRules)."""
    from tokenizers import Tokenizer

    try:
        raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a file it cannot read
        if type(e) is not Exception:   # anything more specific is not that
            raise
        raise SourceModelError(f"tokenizer.json: the tokenizers library cannot read it "
                               f"({(str(e).splitlines() or ['no message'])[0]})",
                               path=str(folder), hint="the checkpoint's own tokenizer.json, as transformers saved "
                                                      "it") from None
    with tempfile.TemporaryDirectory(prefix="edgekit-tok-") as work:
        tok = og_tokenizer(folder, Path(work))
        out = []
        for text in texts:
            got = [int(i) for i in tok.encode(prep.apply(text) if prep else text)]
            want = raw.encode(text, add_special_tokens=False)
            if got != want.ids:
                out.append((text, [raw.id_to_token(i) if i >= 0 else str(i) for i in got], list(want.tokens)))
        return out


def check_tokenizer(folder: Path) -> Optional[Dict[str, Any]]:
    """Refuse (SourceModelError) a tokenizer.json that ONNX Runtime GenAI tokenizes otherwise than the file: a
    Metaspace form, or a normalizer / lstrip or rstrip added tokens (probed with the text as the runtime prepares it,
    runtime.llmtemplate.EncodeRules: a Unicode form and lstrip applied, so Qwen's NFC passes); returns {"form",
    "texts"} where one was checked and agrees, None where the file has neither (byte-level BPE with no normalizer:
    SmolLM2, Llama 3; only the head of the file is read)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:   # the head first (all of these come before the vocabulary); the whole file where it is Metaspace
        head = read_head(path, ("added_tokens", "normalizer", "pre_tokenizer", "decoder"))
        meta = "Metaspace" in json.dumps([head.get("pre_tokenizer"), head.get("decoder")])
        doc = json.loads(path.read_text(encoding="utf-8-sig")) if meta else head
    except (OSError, ValueError, UnicodeDecodeError):
        return None   # the builder and transformers report an unreadable file
    if not isinstance(doc, dict):
        return None
    form = metaspace_form(doc) if meta else None
    prepared = text_form(head)
    if form is None and prepared is None:
        return None
    form = ", ".join(f for f in (form, prepared) if f)
    texts = probe_texts(doc)
    try:
        differ = compare_ids(folder, texts, encode_rules_of(head))
    except RuntimeError as e:   # ORT GenAI reports a tokenizer it cannot load as RuntimeError
        raise SourceModelError(f"tokenizer.json ({form}): ONNX Runtime GenAI cannot load it "
                               f"({(str(e).splitlines() or [type(e).__name__])[0]})", path=str(folder)) from None
    if not differ:
        return {"form": form, "texts": len(texts)}
    text, got, want = differ[0]
    if meta:
        why = _why(doc)
        hint = ("ONNX Runtime GenAI 0.18 reads no tokenizer.json form that tokenizes as this one; a tokenizer.json "
                "in Llama 2's legacy form (normalizer Prepend '▁' + Replace ' ' -> '▁', no pre_tokenizer; what "
                "transformers 4 saved with legacy=True) converts, if a '▁' after each special token is acceptable "
                "for this model: replace the folder's file with one (no bundle is written that would feed the "
                "model other ids than its tokenizer gives)")
    else:
        why = ("ONNX Runtime GenAI runs none of tokenizer.json's normalizer and strips no whitespace before an "
               "lstrip token; edgekit applies a Unicode form (NFC, NFKC, NFD, NFKD) and lstrip itself, not other "
               "normalizer steps" if normalizer_form(doc.get("normalizer"))[1]
               else "edgekit knows no step of this file that explains it")
        hint = ("a tokenizer.json whose normalizer is a Unicode form, or none, converts (no bundle is written that "
                "would feed the model other ids than its tokenizer gives)")
    raise SourceModelError(f"tokenizer.json ({form}) is tokenized otherwise by ONNX Runtime GenAI: {text!r} as {got}, "
                           f"the file gives {want} ({len(differ)} of {len(texts)} probe texts differ; {why})",
                           path=str(folder), hint=hint)
