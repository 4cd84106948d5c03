"""Decoded text as transformers' `tokenizer.decode(ids, skip_special_tokens=True)` gives it, from ONNX Runtime
GenAI's detokenizer. Standard library only (the device side).

Two differences of ONNX Runtime GenAI 0.18's Tokenizer / TokenizerStream from tokenizer.json's own decoding (the
`tokenizers` library, which transformers runs), found with tokenizers in the form of Llama 2 / TinyLlama's and
Llama 3.2's (tests/test_llm_tokenizers.py):
- A decoder that ends in Fuse then Strip (Llama 2, TinyLlama, Mistral 7B v0.1, CodeLlama: Replace("▁", " "),
  ByteFallback, Fuse, Strip(" ", start 1, stop 0)) strips the dummy prefix's space from the start of the decoded
  text; ONNX Runtime GenAI does not apply the Strip step, so a reply came out as " The box is red." where transformers
  gives "The box is red.". `DecodeRules.strip_start` leading `strip_char`s are removed from the start of the text
  (the whole text, or the first pieces of a stream up to the first that is not all stripped). The Strip's `stop`
  (trailing) is not applied (no known checkpoint has one), nor a Strip before Fuse (per token).
- Special tokens (tokenizer.json's added_tokens marked special) are skipped by both, but not cleanly: the stream
  returns spaces for a skipped special token of a byte-level tokenizer (Llama 3's <|begin_of_text|> then "Ġy"
  streamed as "  " + " y" where the whole decode is " y"), a Llama 2 tokenizer drops the space of the token after
  one ("▁the", "</s>", "▁y" decodes as " they"; transformers "the y"), and a decode of special tokens only is
  "\\ufffd" (transformers: ""). Special ids are taken out before ONNX Runtime GenAI sees them: the text is then
  transformers' on every sequence of plain, byte-fallback and special tokens tried (the tests).

`decode_rules(model_dir)` reads what is needed from tokenizer.json (its added_tokens and decoder, which the
`tokenizers` library writes before the vocabulary: only that head of a tens-of-MB file is read and parsed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, List, Tuple, Union

TOKENIZER_JSON = "tokenizer.json"
_FIRST_READ = 1 << 16     # characters; each further read doubles what is held


@dataclass(frozen=True)
class DecodeRules:
    """What to do around ONNX Runtime GenAI's decoding (see the module docstring)."""

    special: FrozenSet[int] = field(default_factory=frozenset)   # ids transformers skips
    strip_start: int = 0      # leading strip_char's tokenizer.json's decoder strips from the decoded text
    strip_char: str = " "

    def keep(self, ids: Iterable[int]) -> List[int]:
        """`ids` without the special ones."""
        return [int(t) for t in ids if int(t) not in self.special]

    def strip(self, text: str) -> str:
        """The whole decoded text with the decoder's leading strip applied."""
        return strip_leading(text, self.strip_char, self.strip_start)[0]

    def stream(self, og_stream) -> "TextStream":
        return TextStream(og_stream, self)


def strip_leading(text: str, char: str, n: int) -> Tuple[str, int]:
    """`text` without up to `n` leading `char`s, and how many are still to strip from the text that follows
    (0 once a character other than `char` was met)."""
    k = 0
    while k < n and k < len(text) and text[k] == char:
        k += 1
    rest = text[k:]
    return rest, (n - k if not rest else 0)


class TextStream:
    """ONNX Runtime GenAI's TokenizerStream with the rules applied: .decode(token_id) -> the text that token
    completes ('' mid-character, and for a special token)."""

    def __init__(self, og_stream, rules: DecodeRules):
        self._s = og_stream
        self._special = rules.special
        self._char = rules.strip_char
        self._left = rules.strip_start     # leading characters still to strip

    def decode(self, token_id: int) -> str:
        if token_id in self._special:
            return ""
        piece = self._s.decode(token_id)
        if self._left and piece:
            piece, self._left = strip_leading(piece, self._char, self._left)
        return piece


def _decoder_strip(decoder: Any) -> Tuple[str, int]:
    """(char, count) of a decoder Sequence that ends in Fuse then Strip(start=count); (" ", 0) otherwise."""
    if not isinstance(decoder, dict) or decoder.get("type") != "Sequence":
        return " ", 0
    steps = [d for d in decoder.get("decoders") or [] if isinstance(d, dict)]
    if len(steps) < 2 or steps[-1].get("type") != "Strip" or "Fuse" not in [d.get("type") for d in steps[:-1]]:
        return " ", 0
    last = steps[-1]
    char, start = last.get("content", " "), last.get("start", 0)
    if not isinstance(char, str) or len(char) != 1 or not isinstance(start, int) or start < 0:
        return " ", 0
    return char, start


def read_head(path: Union[str, Path], keys: Tuple[str, ...]) -> Dict[str, Any]:
    """The top-level `keys` of a JSON object file, reading no further than the last of them (the file is read in
    growing pieces; a key that is absent costs reading the whole file). Raises OSError / ValueError."""
    dec = json.JSONDecoder()
    want = set(keys)
    found: Dict[str, Any] = {}
    with open(path, encoding="utf-8-sig") as f:
        buf = f.read(_FIRST_READ)
        eof = len(buf) < _FIRST_READ
        ws = " \t\r\n"

        def skip(i: int) -> int:
            while i < len(buf) and buf[i] in ws:
                i += 1
            return i

        pos = skip(0)
        if not buf[pos:pos + 1] == "{":
            raise ValueError("not a JSON object")
        pos += 1
        first = True
        while want - found.keys():
            start = pos
            try:
                i = skip(pos)
                if buf[i:i + 1] == "}" or (i >= len(buf) and eof):
                    break
                if not first:
                    if buf[i:i + 1] != ",":
                        raise ValueError(f"expected ',' at character {i}")
                    i = skip(i + 1)
                key, i = dec.raw_decode(buf, i)
                i = skip(i)
                if buf[i:i + 1] != ":":
                    raise ValueError(f"expected ':' at character {i}")
                value, i = dec.raw_decode(buf, skip(i + 1))
                if i >= len(buf) and not eof:     # a number may go on in what is not read yet
                    raise ValueError("truncated")
            except (ValueError, IndexError):
                if eof:
                    raise
                more = f.read(max(len(buf), _FIRST_READ))
                eof = not more
                buf += more
                pos = start
                continue
            if key in want:
                found[key] = value
            first = False
            pos = i
    return found


# the keys of tokenizer.json the runtime reads (decode_rules_of; llmtemplate.encode_rules_of): all before the
# vocabulary, so one read of the file's head serves both
HEAD_KEYS = ("added_tokens", "normalizer", "decoder")


def tokenizer_head(model_dir: Union[str, Path]) -> Dict[str, Any]:
    """HEAD_KEYS of the tokenizer.json in `model_dir`; {} where it is missing or unreadable (ONNX Runtime GenAI then
    reports the folder's tokenizer itself)."""
    try:
        head = read_head(Path(model_dir) / TOKENIZER_JSON, HEAD_KEYS)
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return head if isinstance(head, dict) else {}


def decode_rules(model_dir: Union[str, Path]) -> DecodeRules:
    """The rules for the tokenizer.json in `model_dir` (none where it is missing or unreadable)."""
    return decode_rules_of(tokenizer_head(model_dir))


def decode_rules_of(head: Dict[str, Any]) -> DecodeRules:
    """The rules of tokenizer.json's added_tokens and decoder (tokenizer_head)."""
    special = frozenset(int(a["id"]) for a in head.get("added_tokens") or []
                        if isinstance(a, dict) and a.get("special") and isinstance(a.get("id"), int))
    char, start = _decoder_strip(head.get("decoder"))
    return DecodeRules(special=special, strip_start=start, strip_char=char)
