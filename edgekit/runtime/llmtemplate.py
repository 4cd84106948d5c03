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

Convert writes the laid-out template into the bundle (relayout_folder); the runtime renders with it too
(laid_out_template), so bundles converted before that and bare ONNX Runtime GenAI folders render the same.
Standard library only (the device side).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

_TAG = re.compile(r"\{%.*?%\}|\{#.*?#\}|\{\{.*?\}\}", re.S)


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
        if before is not None and not before.startswith("{{") and not before.endswith(("+%}", "-%}", "-#}")):
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
        out.append(text)
        if after is not None:
            out.append(after)
    return "".join(out)


def laid_out_template(model_dir) -> Optional[str]:
    """The folder's chat template (chat_template.jinja, else tokenizer_config.json's chat_template string) laid out
    by hf_layout where that changes it; None where it does not, or where there is none to read."""
    jinja = Path(model_dir) / "chat_template.jinja"
    try:
        if jinja.is_file():
            src = jinja.read_text(encoding="utf-8")
        else:
            src = json.loads((Path(model_dir) / "tokenizer_config.json").read_text(encoding="utf-8")).get(
                "chat_template")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    if not isinstance(src, str):
        return None
    new = hf_layout(src)
    return new if new != src else None


def relayout_folder(model_dir) -> bool:
    """Apply hf_layout to the chat template(s) an ONNX Runtime GenAI folder carries (chat_template.jinja, and
    tokenizer_config.json's chat_template: a string or a list of {"name", "template"}). True where one changed."""
    changed = False
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        src = jinja.read_text(encoding="utf-8")
        new = hf_layout(src)
        if new != src:
            jinja.write_text(new, encoding="utf-8")
            changed = True
    cfg_path = Path(model_dir) / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        tpl = cfg.get("chat_template")
        if isinstance(tpl, str):
            new_tpl = hf_layout(tpl)
        elif isinstance(tpl, list):
            new_tpl = [dict(t, template=hf_layout(t["template"])) if isinstance(t, dict) and
                       isinstance(t.get("template"), str) else t for t in tpl]
        else:
            new_tpl = tpl
        if new_tpl != tpl:
            cfg["chat_template"] = new_tpl
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
            changed = True
    return changed
