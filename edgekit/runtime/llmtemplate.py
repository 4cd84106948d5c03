"""A chat template as transformers renders it, for ONNX Runtime GenAI's template engine.

transformers renders a checkpoint's chat template with jinja2's `trim_blocks` (the first newline after a
`{% ... %}` or `{# ... #}` tag is dropped) and `lstrip_blocks` (spaces and tabs from the start of a line up to such
a tag are dropped). ONNX Runtime GenAI 0.18's engine renders the template as written, so a template laid out over
lines, as TinyLlama-1.1B-Chat's and Zephyr's are, came out with the newlines of its block tags
('\\n\\n<|system|>\\nBe short.</s>\\n\\n\\n\\n\\n<|user|>...' for transformers' '<|system|>\\nBe short.</s>\\n<|user|>...'),
which the model never saw in training. `hf_layout(template)` removes those characters from the template's text the
way jinja2's lexer does, so both engines render the same string; a template written with `{%-` / `-%}` (Llama 3,
Qwen2.5, SmolLM2) is unchanged. Tags are found by their delimiters; a `%}` inside a string literal of a tag is not
understood (no known template has one).

ONNX Runtime GenAI 0.18's engine also evaluates a substring test on a string wrongly: `'x' in 'xyz'` is false and
`'x' not in 'xyz'` true (a list's items and a dict's keys are right). DeepSeek-R1-Distill's and Qwen3's templates
drop an earlier assistant turn's reasoning with `{% if '</think>' in content %}{% set content =
content.split('</think>')[-1] %}`, so every multi-turn prompt kept it
('<｜Assistant｜><think>\\nadd them\\n</think>\\n\\n4<｜end▁of▁sentence｜>' for transformers'
'<｜Assistant｜>\\n\\n4<｜end▁of▁sentence｜>'). `ort_in_tests(template)`
rewrites each `<string literal> in X` as `(<lit> in X or (X is string and (X.split(<lit>)|length > 1)))` and
`<lit> not in X` as `not (...)`, which ORT GenAI evaluates as jinja2 does for X a string, a list or a dict
(tests/test_llm_template_engine.py: 624 of 624 cases over 13 literals, 104 wrong before). Only where the literal
is the test's whole left side and X (a name, literal or bracket with .attr, [..], (..), |filter steps) its whole
right side; a test that chains or mixes operators (`x ~ 'a' in y`, `'a' in x == y`), an empty literal, or an X
that calls a mutating method is left as written. A template with no such test comes out byte-identical.
`ort_template(template)` applies both (hf_layout, then ort_in_tests). Each leaves its own output byte-identical (the
runtime re-applies ort_template to a bundle whose template convert adapted): a test in the rewritten form is kept as
it is, and the newline trim_blocks leaves after a block tag (a blank line after it) is written `{{ '\\n' }}`, which a
second pass does not trim.

Convert writes the template so adapted into the bundle (relayout_folder); the runtime renders with it too
(laid_out_template), so bundles converted before that and bare ONNX Runtime GenAI folders render the same.

The text ONNX Runtime GenAI encodes (EncodeRules): its tokenizer runs no Unicode normalizer of tokenizer.json.
Qwen2.5's, Qwen3's and DeepSeek-R1-Distill-Qwen's byte-level files carry `normalizer: {"type": "NFC"}`, so text in
decomposed form (NFD, as macOS and PDF text comes) got other ids than the checkpoint's tokenizer gives: 'cafe\\u0301 ok'
as [66, 268, 68, 136, 223, 220, 78, 74] where the `tokenizers` library gives [66, 268, 261, 220, 78, 74] (NFKC,
NFD, NFKD and a Lowercase step are ignored the same way). Nor does it strip the whitespace before an added token
marked `lstrip` ('a  <|x|>b' as a, Ġ, Ġ, <|x|>, b where the file gives a, <|x|>, b; `rstrip` it does apply).
EncodeRules applies both to the text before ONNX Runtime GenAI encodes it, as the `tokenizers` library does: the
form to the text between added tokens (not to the tokens themselves: NFKC would turn DeepSeek's '<｜User｜>' into
'<|User|>'), and whitespace before an lstrip token dropped. encode_rules(model_dir) reads tokenizer.json's
added_tokens and normalizer only (the head of the file, before the vocabulary: runtime.llmdecode.read_head);
convert probes that ONNX Runtime GenAI's ids of the text so prepared equal the file's (convert.llm_tokenizer).
Standard library only (the device side).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, FrozenSet, List, Optional, Tuple

# a tag, or a whole {% raw %} ... {% endraw %} block as one (its text is not laid out: jinja2 keeps even the newline
# after {% raw %}; lstrip_blocks before it and trim_blocks after {% endraw %} apply as to a tag)
_TAG = re.compile(r"\{%[-+]?\s*raw\s*[-+]?%\}.*?\{%[-+]?\s*endraw\s*[-+]?%\}|\{%.*?%\}|\{#.*?#\}|\{\{.*?\}\}", re.S)


def hf_layout(template: str) -> str:
    """`template` with trim_blocks and lstrip_blocks applied to its text (see the module docstring)."""
    parts = []     # alternating: literal text, tag, literal text, tag, ..., literal text
    pos = 0
    for m in _TAG.finditer(template):
        parts += [template[pos:m.start()], m.group(0)]
        pos = m.end()
    parts.append(template[pos:])
    out = []
    for i in range(0, len(parts), 2):
        text = parts[i]
        before = parts[i - 1] if i > 0 else None
        after = parts[i + 1] if i + 1 < len(parts) else None
        # trim_blocks: one newline right after a block or comment tag (not after `+%}`; `-%}` strips it anyway)
        trim = before is not None and not before.startswith("{{") and not before.endswith(("+%}", "-%}", "-#}"))
        if trim:
            if text.startswith("\r\n"):
                text = text[2:]
            elif text.startswith("\n"):
                text = text[1:]
        # lstrip_blocks: spaces and tabs from the start of the line up to a block or comment tag (not `{%+`)
        if after is not None and not after.startswith(("{{", "{%+", "{%-", "{#-")):
            raw = parts[i]
            line = raw[raw.rfind("\n") + 1:]
            at_line_start = "\n" in raw or i == 0
            if at_line_start and line and not line.strip(" \t"):
                # only what this literal still has of that line (trim_blocks may have taken the newline)
                text = text[:len(text) - len(line)] if text.endswith(line) else text
        # a tag that strips the whitespace before it (`{%-`, `{#-`, `{{-`) strips it here: an expression written
        # below would not be whitespace to it (Llama 3.x: a blank line, then `{#- ... #}`)
        if after is not None and after.startswith(("{%-", "{#-", "{{-")):
            text = text.rstrip()
        # a second newline after such a tag (a blank line): trim_blocks keeps it, but a second pass would take it,
        # so it is written as an expression (jinja2 renders a '\r\n' of the text as '\n'): hf_layout(hf_layout(t))
        # is hf_layout(t), as the runtime re-applies it to a bundle convert laid out
        if trim and text.startswith(("\n", "\r\n")):
            text = "{{ '\\n' }}" + text[text.index("\n") + 1:]
        out.append(text)
        if after is not None:
            out.append(_raw_lstrip(after))
    return "".join(out)


_RAW_END = re.compile(r"\{%[-+]?\s*endraw\s*[-+]?%\}$")


def _raw_lstrip(tag: str) -> str:
    """A {% raw %} block as jinja2's lstrip_blocks leaves it: the spaces and tabs between a line's start and its
    {% endraw %} go (not before `{%+` / `{%-`); any other tag as it is."""
    m = _RAW_END.search(tag)
    if not m or not _TAG.fullmatch(tag) or tag.startswith(("{{", "{#")) or m.group(0).startswith(("{%+", "{%-")):
        return tag
    body = tag[:m.start()]
    line = body[body.rfind("\n") + 1:]
    return body[:len(body) - len(line)] + m.group(0) if "\n" in body and line and not line.strip(" \t") else tag


_TOKEN = re.compile(r"""\s+|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[A-Za-z_][A-Za-z0-9_]*|\d[\w.]*"""
                    r"""|==|!=|<=|>=|\*\*|//|.""", re.S)
_BLOCK_END = re.compile(r"[-+]?%\}")
_VAR_END = re.compile(r"-?\}\}")
_OPENER = re.compile(r"\{#.*?#\}|\{%|\{\{", re.S)
_ENDRAW = re.compile(r"\{%[-+]?\s*endraw\s*[-+]?%\}")
# the literal is the test's whole left side after one of these (a tag's start: ""); x ~ 'a' in y is (x ~ 'a') in y
_BEFORE = {"(", "[", "{", ",", "=", ":", "if", "elif", "and", "or", "not", "else", ""}
# X is the test's whole right side before one of these; 'a' in x == y chains, 'a' in x ~ y is 'a' in (x ~ y)
_AFTER = {")", "]", "}", ",", "and", "or", "if", "else", "%}", "-%}", "+%}", "}}", "-}}"}
# X is evaluated three times in the rewrite: not where it calls one of these
_MUTATORS = {"pop", "append", "extend", "insert", "remove", "clear", "update", "setdefault", "popitem"}
# X written as it is in `X is string` / `X.split(..)`: a name with .attr / [key] steps; anything else in ()
_PLAIN = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[(?:'[^'\\]*'|\"[^\"\\]*\"|\d+|[A-Za-z_]\w*)\])*")


def _next(toks: List[str], j: int) -> int:
    while j < len(toks) and toks[j].isspace():
        j += 1
    return j


def _close(toks: List[str], j: int) -> int:
    """toks[j] opens a bracket: the index past the one that closes it (-1: none)."""
    depth = 0
    for k in range(j, len(toks)):
        if toks[k] in ("(", "[", "{"):
            depth += 1
        elif toks[k] in (")", "]", "}"):
            depth -= 1
            if depth == 0:
                return k + 1
    return -1


def _operand(toks: List[str], j: int) -> int:
    """The index past the postfix expression at toks[j] (a name, literal or bracket, then .attr, [..], (..) and
    |filter(..) steps): what jinja2 takes as the right side of `in` where a lower-precedence token follows; -1 if
    none starts there."""
    t = toks[j] if j < len(toks) else ""
    if t in ("(", "[", "{"):
        j = _close(toks, j)
    elif t[:1] in ("'", '"') or t[:1].isdigit() or (t[:1].isalpha() or t[:1] == "_") and t not in ("not", "in", "is"):
        j += 1
    else:
        return -1
    while j > 0:
        k = _next(toks, j)
        t = toks[k] if k < len(toks) else ""
        if t in (".", "|") and _next(toks, k + 1) < len(toks) and re.match(r"[A-Za-z_]", toks[_next(toks, k + 1)]):
            j = _next(toks, k + 1) + 1
            if t == "|" and _next(toks, j) < len(toks) and toks[_next(toks, j)] == "(":
                j = _close(toks, _next(toks, j))
        elif t in ("[", "("):
            j = _close(toks, k)
        else:
            break
    return j


def _rewrite_tag(toks: List[str]) -> Optional[str]:
    """The tag's tokens (after its opener, through its closer) with each `'lit' in X` / `'lit' not in X` rewritten;
    None where it has none."""
    out, i, changed, prev = [], 0, False, ""
    while i < len(toks):
        t = toks[i]
        if t[:1] in ("'", '"') and len(t) > 2 and prev in _BEFORE:
            k = _next(toks, i + 1)
            neg = k < len(toks) and toks[k] == "not"
            if neg:
                k = _next(toks, k + 1)
            if k < len(toks) and toks[k] == "in":
                xs = _next(toks, k + 1)
                xe = _operand(toks, xs)
                after = toks[_next(toks, xe)] if 0 < xe and _next(toks, xe) < len(toks) else None
                x = "".join(toks[xs:xe]).strip() if xe > 0 else ""
                if (after in _AFTER and x and not any(toks[m] in _MUTATORS and toks[_next(toks, m + 1):][:1] == ["("]
                                                       for m in range(xs, xe))):
                    xp = x if _PLAIN.fullmatch(x) or x[0] == "(" and _close(toks, xs) == xe else f"({x})"
                    test = f"({t} in {x} or ({xp} is string and ({xp}.split({t})|length > 1)))"
                    done = _close(toks, i - 1) if not neg and i > 0 and toks[i - 1] == "(" else -1
                    if done > 0 and "".join(toks[i - 1:done]) == test:   # rewritten already: kept as it is
                        out += toks[i:done]
                        i, prev = done, ")"
                        continue
                    out.append(f"not {test}" if neg else test)
                    i, prev, changed = xe, ")", True
                    continue
        out.append(t)
        if not t.isspace() and not (i == 0 and t in ("-", "+")):   # {%- / {%+: whitespace control
            prev = t
        i += 1
    return "".join(out) if changed else None


def ort_in_tests(template: str) -> str:
    """`template` with each `<string literal> in X` / `not in X` test rewritten as ONNX Runtime GenAI evaluates it as
    jinja2 does (the module docstring); byte-identical where it has none. Tags are tokenized as jinja2's lexer does
    (string literals with either quote and escapes, no tag end inside brackets, comments and {% raw %} skipped)."""
    out, pos, n = [], 0, len(template)
    while True:
        m = _OPENER.search(template, pos)
        if m is None:
            break
        if m.group(0).startswith("{#"):
            out.append(template[pos:m.end()])
            pos = m.end()
            continue
        end_re = _BLOCK_END if m.group(0) == "{%" else _VAR_END
        toks, depth, end, at = [], 0, None, m.end()
        while at < n:
            e = end_re.match(template, at) if depth == 0 else None   # as jinja2: no end inside brackets
            if e:
                toks.append(e.group(0))
                end = e.end()
                break
            t = _TOKEN.match(template, at).group(0)
            toks.append(t)
            at += len(t)
            depth += (t in ("(", "[", "{")) - (t in (")", "]", "}"))
        if end is None:      # unterminated: left to the engines to report
            break
        new = _rewrite_tag(toks)
        out.append(template[pos:m.end()] + (new if new is not None else template[m.end():end]))
        pos = end
        # {% raw %}: the text up to {% endraw %} is not parsed
        if m.group(0) == "{%" and [t for t in toks if not t.isspace() and t not in ("-", "+")][:1] == ["raw"]:
            r = _ENDRAW.search(template, pos)
            if r is None:
                break
            out.append(template[pos:r.end()])
            pos = r.end()
    out.append(template[pos:])
    return "".join(out)


def ort_template(template: str) -> str:
    """`template` as ONNX Runtime GenAI renders it as transformers does: hf_layout, then ort_in_tests."""
    return ort_in_tests(hf_layout(template))


def laid_out_template(model_dir) -> Optional[str]:
    """The folder's chat template (chat_template.jinja, else tokenizer_config.json's chat_template string) adapted
    by ort_template where that changes it; None where it does not, or where there is none to read."""
    src = source_template(model_dir)
    if src is None:
        return None
    new = ort_template(src)
    return new if new != src else None


def relayout_folder(model_dir) -> bool:
    """Apply ort_template to the chat template(s) an ONNX Runtime GenAI folder carries (chat_template.jinja, and
    tokenizer_config.json's chat_template: a string or a list of {"name", "template"}). True where one changed."""
    changed = False
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        src = jinja.read_text(encoding="utf-8")
        new = ort_template(src)
        if new != src:
            jinja.write_text(new, encoding="utf-8")
            changed = True
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        tpl = cfg.get("chat_template")
        if isinstance(tpl, str):
            new_tpl = ort_template(tpl)
        elif isinstance(tpl, list):
            new_tpl = [dict(t, template=ort_template(t["template"])) if isinstance(t, dict) and
                       isinstance(t.get("template"), str) else t for t in tpl]
        else:
            new_tpl = tpl
        if new_tpl != tpl:
            cfg["chat_template"] = new_tpl
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
            changed = True
    return changed


# -- checking a folder's template against transformers' rendering --------------------------------------------------

# conversations both engines render (the generation prompt added): a system message, a multi-turn one, and one whose
# earlier assistant turn has a <think> block (DeepSeek-R1-Distill's and Qwen3's templates drop it)
TEMPLATE_PROBES = (
    ("system", [{"role": "system", "content": "Be short."}, {"role": "user", "content": "What colour is the box?"}]),
    ("multi-turn", [{"role": "user", "content": "What colour is the box?"}, {"role": "assistant", "content": "Red."},
                    {"role": "user", "content": "And the lamp?"}]),
    ("think", [{"role": "system", "content": "Be short."}, {"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
               {"role": "user", "content": "times 3?"}]),
)


def source_template(model_dir) -> Optional[str]:
    """The folder's chat template as written (chat_template.jinja, else tokenizer_config.json's chat_template
    string); None where there is none to read."""
    jinja = Path(model_dir) / "chat_template.jinja"
    try:
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        src = json.loads((Path(model_dir) / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return src if isinstance(src, str) else None


def hf_render(template: str, messages, add_generation_prompt: bool = True, **tokens: Any) -> str:
    """`template` rendered as transformers renders a chat template: jinja2's sandbox with trim_blocks,
    lstrip_blocks and loopcontrols, its tojson (no HTML escapes), raise_exception and strftime_now; `tokens`: the
    special tokens it is given (bos_token, eos_token, ...). Needs jinja2 (the converting machine)."""
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)


def _special_tokens(model_dir) -> dict:
    """tokenizer_config.json's *_token strings (an AddedToken dict's content), as transformers passes them."""
    try:
        cfg = json.loads((Path(model_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    out = {}
    for k, v in (cfg.items() if isinstance(cfg, dict) else []):
        if k.endswith("_token") and isinstance(v, dict):
            v = v.get("content")
        if k.endswith("_token") and isinstance(v, str):
            out[k] = v
    return out


def template_mismatches(model_dir, source=None, og_tokenizer=None, reference=None,
                        skipped: Optional[List[str]] = None) -> List[dict]:
    """The conversations of TEMPLATE_PROBES that ONNX Runtime GenAI renders otherwise than transformers, as
    [{"conversation", "transformers", "onnxruntime_genai"}] (an engine's error as "error: ..."); [] where all agree
    or there is no template. ONNX Runtime GenAI renders as the runtime does (`model_dir`'s template as
    laid_out_template gives it, else the folder's as written); transformers renders the template of `source` (the
    checkpoint's folder; default `model_dir`) with `reference(messages) -> str` (e.g. the checkpoint's tokenizer's
    apply_chat_template(messages, tokenize=False, add_generation_prompt=True); default hf_render with the special
    tokens of its tokenizer_config.json). og_tokenizer: an onnxruntime_genai.Tokenizer of `model_dir` (default: one
    opened here). A conversation transformers cannot render (a template that refuses a system message) is skipped:
    its name appended to `skipped` where a list is given."""
    source = Path(source) if source is not None else Path(model_dir)
    template = source_template(source)
    if template is None:
        return []
    if reference is None:
        tokens = _special_tokens(source)
        reference = lambda messages: hf_render(template, messages, True, **tokens)  # noqa: E731
    if og_tokenizer is None:
        import onnxruntime_genai as og

        og_tokenizer = og.Tokenizer(str(model_dir))
    ort_tpl = laid_out_template(model_dir)
    from jinja2.exceptions import TemplateError   # the converting machine's (transformers needs it)

    out = []
    for name, messages in TEMPLATE_PROBES:
        try:
            want = reference(messages)
        except (TemplateError, ValueError, TypeError, LookupError):
            if skipped is not None:   # the template refuses this conversation (raise_exception: no system role...)
                skipped.append(name)
            continue
        try:
            got = og_tokenizer.apply_chat_template(json.dumps(messages), template_str=ort_tpl,
                                                   add_generation_prompt=True)
        except RuntimeError as e:
            got = f"error: {(str(e).splitlines() or [type(e).__name__])[0]}"
        if got != want:
            out.append({"conversation": name, "transformers": want, "onnxruntime_genai": got})
    return out

# -- the text ONNX Runtime GenAI encodes (the module docstring) ---------------------------------------------------

UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD")
# what the `tokenizers` library strips for an lstrip token: Rust's char::is_whitespace (Python's \\s adds \\x1c-\\x1f)
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _steps(node: Any) -> List[Any]:
    """A normalizer's steps, Sequences flattened."""
    if isinstance(node, dict) and node.get("type") == "Sequence":
        return [s for sub in node.get("normalizers") or [] for s in _steps(sub)]
    return [node] if node is not None else []


def normalizer_form(normalizer: Any) -> Tuple[Optional[str], List[str]]:
    """(the unicodedata form tokenizer.json's `normalizer` applies: "NFC", "NFKC", "NFD", "NFKD" or None; the other
    steps of it that change text, by type). A Sequence with one of the forms counts; two different forms give None
    (both are listed as other steps: which applies is not guessed)."""
    steps = _steps(normalizer)
    forms = {s.get("type") for s in steps if isinstance(s, dict) and s.get("type") in UNICODE_FORMS}
    form = forms.pop() if len(forms) == 1 else None
    other = [str(s.get("type")) if isinstance(s, dict) else repr(s)[:40] for s in steps
             if not (form and isinstance(s, dict) and s.get("type") == form)]
    return form, other


@dataclass(frozen=True)
class EncodeRules:
    """What to do to text before ONNX Runtime GenAI encodes it (the module docstring): the Unicode form of the text
    between added tokens (`protect`: those matched before normalization), and the added tokens whose whitespace
    before them is dropped (`lstrip`)."""
    form: Optional[str] = None
    protect: FrozenSet[str] = field(default_factory=frozenset)
    lstrip: FrozenSet[str] = field(default_factory=frozenset)

    def __post_init__(self):
        split = "|".join(re.escape(t) for t in sorted(self.protect, key=len, reverse=True))
        strip = "|".join(re.escape(t) for t in sorted(self.lstrip, key=len, reverse=True))
        object.__setattr__(self, "_split", re.compile(f"({split})") if self.form and split else None)
        object.__setattr__(self, "_strip", re.compile(f"[{_WS}]+(?=(?:{strip}))") if strip else None)

    def __bool__(self) -> bool:
        return bool(self.form or self.lstrip)

    def _normal(self, piece: str) -> str:
        """A piece of text between added tokens in the form; as written where the form would make an added token of
        it (NFKC: '＜｜im_start｜＞' -> '<|im_start|>', which ONNX Runtime GenAI would then encode as the special token
        the `tokenizers` library never matches in normalized text: a user's text must not become a control token)."""
        out = unicodedata.normalize(self.form, piece)
        return piece if self._split is not None and self._split.search(out) else out

    def apply(self, text: str) -> str:
        if self.form:
            if self._split is None:
                text = unicodedata.normalize(self.form, text)
            else:   # odd pieces are the added tokens, kept as written
                parts = self._split.split(text)
                text = "".join(p if i % 2 else self._normal(p) for i, p in enumerate(parts))
        if self._strip is not None:
            text = self._strip.sub("", text)
        return text


def encode_rules_of(head: Any) -> EncodeRules:
    """The EncodeRules of tokenizer.json's `added_tokens` and `normalizer` (a dict with those keys)."""
    form = normalizer_form(head.get("normalizer"))[0] if isinstance(head, dict) else None
    added = [a for a in (head.get("added_tokens") or [] if isinstance(head, dict) else [])
             if isinstance(a, dict) and isinstance(a.get("content"), str) and a["content"]]
    return EncodeRules(form=form, protect=frozenset(a["content"] for a in added if not a.get("normalized")),
                       lstrip=frozenset(a["content"] for a in added if a.get("lstrip")))


def encode_rules(model_dir) -> EncodeRules:
    """The folder's EncodeRules, from the head of its tokenizer.json (none where it is missing or unreadable: ONNX
    Runtime GenAI then reports the folder's tokenizer itself)."""
    from edgekit.runtime.llmdecode import tokenizer_head

    return encode_rules_of(tokenizer_head(model_dir))
