"""ONNX Runtime GenAI's chat-template engine against transformers' (jinja2), offline: a tiny byte-level tokenizer
built here with the `tokenizers` library and the chat templates of DeepSeek-R1-Distill-Qwen and Qwen3 (their
reasoning parts), rendered by both engines (runtime.llmtemplate)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

import onnxruntime_genai as og  # noqa: F401  (edgekit[llm-convert], in dev: missing must fail, not skip)

from edgekit.runtime.llmtemplate import hf_layout, hf_render, ort_in_tests, ort_template

DEEPSEEK_QWEN = (   # DeepSeek-R1-Distill-Qwen's, as its tokenizer_config.json has it
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true, "
    "is_last_user=false) %}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}"
    "{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}"
    "{% set content = message['content'] %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{%- set ns.is_first = false -%}{%- set ns.is_last_user = true -%}{{'<｜User｜>' + content + '<｜Assistant｜>'}}"
    "{%- endif %}{%- if message['role'] == 'assistant' %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}{% endif %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and "
    "message['tool_calls'] is not none %}"
    "{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{%- endif %}"
    "{%- set ns.is_first = false %}{%- set ns.is_tool = false -%}{%- set ns.is_output_first = true %}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if content is none %}"
    "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' "
    "+ '```json' + '\\n' + (tool['function']['arguments'] if tool['function']['arguments'] is string else "
    "tool['function']['arguments'] | tojson) + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}"
    "{{content + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] "
    "+ '\\n' + '```json' + '\\n' + (tool['function']['arguments'] if tool['function']['arguments'] is string else "
    "tool['function']['arguments'] | tojson) + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}"
    "{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + (tool['function']['arguments'] if "
    "tool['function']['arguments'] is string else tool['function']['arguments'] | tojson) + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or "
    "message['tool_calls'] is none)%}"
    "{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + content + "
    "'<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{{content + '<｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + content + "
    "'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + content + "
    "'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_last_user and not ns.is_tool %}{{'<｜Assistant｜>'}}"
    "{% endif %}")
QWEN3 = (   # Qwen3's reasoning part (its tools branch and tool turns left out)
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and "
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n    {%- endif %}\n"
    "{%- endfor %}\n{%- for message in messages %}\n    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n    {%- else %}\n        {%- set content = '' %}\n    {%- endif %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') %}\n                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n        {%- endif %}\n        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n"
    "        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}")

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<|im_start|>",
            "<|im_end|>"]
THINK_CHAT = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
              {"role": "user", "content": "times 3?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json with DeepSeek's and Qwen's special tokens, and an ONNX Runtime GenAI config
    that opens no model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgekit.convert.llm_tokenizer import _TOKENIZER_ONLY_CONFIG

    d = tmp_path_factory.mktemp("chat-template")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world"], trainer=trainers.BpeTrainer(
        vocab_size=280, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": SPECIALS[0], "eos_token": SPECIALS[1],
                                                          "tokenizer_class": "PreTrainedTokenizerFast"}))
    (d / "genai_config.json").write_text(json.dumps(_TOKENIZER_ONLY_CONFIG))
    return d


def _ort(folder: Path, template: str, messages, add_generation_prompt: bool = False) -> str:
    return og.Tokenizer(str(folder)).apply_chat_template(json.dumps(messages), template_str=template,
                                                         add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("name", ["deepseek-r1-distill-qwen", "qwen3"])
def test_reasoning_templates_render_as_transformers_after_adaptation(folder, name):
    """An earlier assistant turn's <think> block: transformers drops it ('<｜Assistant｜>\\n\\n4'), ONNX Runtime
    GenAI 0.18 kept it with the template as written ('<｜Assistant｜><think>\\nadd them\\n</think>\\n\\n4': its
    `'</think>' in content` is false); with ort_template both render the same string."""
    from transformers import PreTrainedTokenizerFast

    template = DEEPSEEK_QWEN if name.startswith("deepseek") else QWEN3
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token=SPECIALS[0],
                                 eos_token=SPECIALS[1])
    hf.chat_template = template
    for msgs in (THINK_CHAT, THINK_CHAT[1:], THINK_CHAT[:3], [dict(m, content=m["content"].replace("<think>", ""))
                                                           for m in THINK_CHAT]):
        for gen in (True, False):
            want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert _ort(folder, ort_template(template), msgs, gen) == want, (msgs, gen)
    want = hf.apply_chat_template(THINK_CHAT, tokenize=False, add_generation_prompt=True)
    assert "add them" not in want and want.count("4") == 1
    before = _ort(folder, hf_layout(template), THINK_CHAT, True)      # what the bundles rendered before
    assert before != want and "<think>\nadd them\n</think>" in before


def test_ort_substring_test_on_a_string_is_wrong(folder):
    """The bug the rewrite works around (if a later ONNX Runtime GenAI fixes it, this fails: the rewrite is then
    unneeded but still right): `'x' in 'xyz'` false, `'x' not in 'xyz'` true; lists and dicts right."""
    msgs = [{"role": "user", "content": "xyz"}]

    def r(expr):
        return _ort(folder, "{% if " + expr + " %}T{% else %}F{% endif %}", msgs)

    assert [r("'x' in 'xyz'"), r("'x' not in 'xyz'"), r("'x' in messages[0].content")] == ["F", "T", "F"]
    assert [r("'x' in ['x', 'y']"), r("'x' in {'x': 1}"), r("'q' in ['x']")] == ["T", "T", "F"]
    assert [r(ort_in_tests("{% if " + e + " %}")[6:-3]) for e in ("'x' in 'xyz'", "'x' not in 'xyz'")] == ["T", "F"]


LITERALS = ["'x'", '"x"', "'a b'", "'%}'", "'}}'", "\"it's\"", "'it\\'s'", "'\\n'", "'|'", "'<｜end｜>'", "'{%'",
            "'x in y'", "'(]'"]
FORMS = ["{% if LIT OP messages[0].content %}T{% else %}F{% endif %}",
         "{{ 'T' if LIT OP messages[0]['content'] else 'F' }}",
         "{% set c = messages[0].content %}{% if true and LIT OP c %}T{% else %}F{% endif %}",
         "{% for m in messages %}{{ (LIT OP m.content)|string }}{% endfor %}",
         "{%- if LIT OP (messages[0].content|lower) -%}T{%- else -%}F{%- endif -%}"]


def test_rewritten_tests_evaluate_as_jinja2(folder):
    """Each literal (both quote styles, spaces, escapes, tag delimiters inside) in each form, `in` and `not in`, with
    X a string with and without it, a list with and without it as an item, a dict with and without it as a key:
    ONNX Runtime GenAI renders the rewritten template as jinja2 renders the original (the bug: every string case
    that contains the literal was wrong)."""
    env = jinja2.Environment()
    wrong_before = 0
    for lit in LITERALS:
        value = env.from_string("{{ " + lit + " }}").render()
        for neg in (False, True):
            for form in FORMS:
                tpl = form.replace("LIT", lit).replace("OP", "not in" if neg else "in")
                new = ort_in_tests(tpl)
                assert new != tpl and ort_in_tests(new) == new, tpl     # a rewritten test is kept as it is
                for content in (f"pre {value} post", "nothing here", [value, "q"], ["q", f"pre {value} post"],
                                {value: 1}, {"q": value}):
                    if "|lower" in form and not isinstance(content, str):    # ORT GenAI's lower takes a string only
                        continue
                    msgs = [{"role": "user", "content": content}]
                    want = env.from_string(tpl).render(messages=msgs)
                    assert _ort(folder, new, msgs) == want, (tpl, content)
                    wrong_before += _ort(folder, tpl, msgs) != want
    assert wrong_before == len(LITERALS) * 2 * len(FORMS)             # the string that contains it, each form


def test_templates_without_a_literal_in_test_are_unchanged():
    """Byte-identical where there is nothing to rewrite, and left as written where the literal or X is not the
    test's whole side (precedence), the literal is empty, or X calls a mutating method."""
    from test_llm_tokenizers import LLAMA3_TEMPLATE, ZEPHYR_TEMPLATE

    for tpl in (LLAMA3_TEMPLATE, ZEPHYR_TEMPLATE, hf_layout(ZEPHYR_TEMPLATE),
                "{% for x in 'abc' %}{{ x }}{% endfor %}{# 'a' in b #}{% if a in b %}{% endif %}",
                "{% if x ~ 'a' in y %}{% endif %}{% if 'a' in x == y %}{% endif %}{% if 'a' in x ~ y %}{% endif %}",
                "{% if '' in x %}{% endif %}{% if 'a' in x.pop() %}{% endif %}{{ 'a' in }}",
                "{% raw %}{% if 'a' in x %}{% endraw %}", "{{ 'a' in x"):
        assert ort_in_tests(tpl) == tpl, tpl
    assert ort_template(LLAMA3_TEMPLATE) == LLAMA3_TEMPLATE
    assert ort_template(ZEPHYR_TEMPLATE) == hf_layout(ZEPHYR_TEMPLATE)
    # jinja2's lexer: no tag end inside brackets; whitespace control kept; nested and parenthesised operands
    assert ort_in_tests("{{- {'k': {'j': 'c' in d}} -}}") == (
        "{{- {'k': {'j': ('c' in d or (d is string and (d.split('c')|length > 1)))}} -}}")
    assert ort_in_tests("{%- if not 'a'in x and 'b' not in(y or z) +%}") == (
        "{%- if not ('a' in x or (x is string and (x.split('a')|length > 1))) and not ('b' in (y or z) or "
        "((y or z) is string and ((y or z).split('b')|length > 1))) +%}")


BLANK_LINES = ("{% for m in messages %}\n\n  {{ m.content }}\n\n{% endfor %}\r\n\r\n{# c #}\n\n"
               "{% if '</think>' in messages[0].content %}\n\nT{% endif %}\n")


def test_adaptation_applied_twice_is_applied_once(folder, tmp_path):
    """The runtime adapts the template of a bundle whose template convert adapted already (laid_out_template after
    relayout_folder): ort_template, ort_in_tests and hf_layout leave their own output byte for byte (a rewritten
    `'lit' in X` grew by its own rewrite; a blank line after a block tag lost its newline to a second trim_blocks),
    so laid_out_template finds nothing to change in a converted bundle, and ONNX Runtime GenAI renders the template
    adapted twice as transformers renders the original."""
    from edgekit.runtime.llmtemplate import laid_out_template, relayout_folder
    from test_llm_tokenizers import LLAMA3_TEMPLATE, ZEPHYR_TEMPLATE

    tpls = [DEEPSEEK_QWEN, QWEN3, ZEPHYR_TEMPLATE, LLAMA3_TEMPLATE, BLANK_LINES,
            "{{- {'k': {'j': 'c' in d}} -}}", "{%- if not 'a'in x and 'b' not in(y or z) +%}"]
    tpls += [f.replace("LIT", lit).replace("OP", op) for lit in LITERALS for op in ("in", "not in") for f in FORMS]
    for tpl in tpls:
        for adapt in (ort_template, ort_in_tests, hf_layout):
            once = adapt(tpl)
            assert adapt(once) == once, (adapt.__name__, tpl)
    assert hf_layout(BLANK_LINES) != BLANK_LINES and ort_in_tests(BLANK_LINES) != BLANK_LINES
    msgs = [{"role": "user", "content": "a </think> b"}, {"role": "assistant", "content": "c"}]
    want = hf_render(BLANK_LINES, msgs, False)
    assert want == "\n  a </think> b\n\n\n  c\n\n\n\n\nT"
    assert _ort(folder, ort_template(ort_template(BLANK_LINES)), msgs) == want
    for tpl in (DEEPSEEK_QWEN, QWEN3, BLANK_LINES):      # a converted bundle: the runtime renders it as written
        d = tmp_path / str(len(tpl))
        d.mkdir()
        (d / "chat_template.jinja").write_text(tpl, encoding="utf-8")
        assert relayout_folder(d) and not relayout_folder(d) and laid_out_template(d) is None


# Llama 3.1 / 3.2's head: a blank line after a block, then a comment that strips the whitespace before it
LLAMA3_HEAD = ("{{- bos_token }}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
               "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
               "{%- if messages[0]['role'] == 'system' %}\n"
               "    {%- set system_message = messages[0]['content']|trim %}\n"
               "{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n{#- System message #}\n"
               "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}{{- system_message }}\n"
               "{% if true %}{% endif %}\n\n{{- 'Z' }}\n\n\n{%- for m in messages %}{{ m.content }}{% endfor %}")


def test_blank_line_before_a_stripping_tag(folder):
    """A blank line after a block tag, then a tag that strips the whitespace before it (Llama 3.x's `{#- ... #}`,
    `{{-`, `{%-`): laid out it is gone, as jinja2 strips it (written as an expression it was text the tag could not
    strip: every Llama 3.2 prompt began with two extra newlines after the BOS token); idempotent."""
    msgs = [{"role": "system", "content": " Be short. "}, {"role": "user", "content": "hi"}]
    want = hf_render(LLAMA3_HEAD, msgs, False, bos_token=SPECIALS[0])
    assert want == SPECIALS[0] + "<|start_header_id|>system<|end_header_id|>\n\nBe short.\nZ Be short. hi", want
    for tpl in (LLAMA3_HEAD, "X{% if true %}{% endif %}\n\n{#- c #}Y"):
        once = ort_template(tpl)
        assert ort_template(once) == once
    assert _ort(folder, ort_template(LLAMA3_HEAD), msgs) == want
    assert ort_template("X{% if true %}{% endif %}\n\n{#- c #}Y") == "X{% if true %}{% endif %}{#- c #}Y"


def test_template_mismatches_of_a_folder(folder, tmp_path, monkeypatch):
    """template_mismatches: the conversations (a system message, multi-turn, a <think> turn) ONNX Runtime GenAI
    renders otherwise than transformers. None for a folder whose template relayout_folder adapted; the <think>
    conversation where the template is only laid out (the bundles before); hf_render is transformers' rendering."""
    import shutil

    from transformers import PreTrainedTokenizerFast

    from edgekit.runtime import llmtemplate
    from edgekit.runtime.llmtemplate import TEMPLATE_PROBES, relayout_folder, template_mismatches
    from test_llm_tokenizers import ZEPHYR_TEMPLATE

    for template in (DEEPSEEK_QWEN, QWEN3, ZEPHYR_TEMPLATE):
        src = tmp_path / "src"
        shutil.copytree(folder, src, dirs_exist_ok=True)
        cfg = json.loads((src / "tokenizer_config.json").read_text())
        (src / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=template), ensure_ascii=False))
        hf = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), bos_token=SPECIALS[0],
                                     eos_token=SPECIALS[1])
        hf.chat_template = template
        for _, msgs in TEMPLATE_PROBES:
            assert hf_render(template, msgs, True, bos_token=SPECIALS[0], eos_token=SPECIALS[1]) == \
                hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        built = tmp_path / "built"
        shutil.copytree(src, built, dirs_exist_ok=True)
        assert relayout_folder(built) == (template != hf_layout(template) or "'</think>' in" in template)
        assert template_mismatches(built, source=src) == []
        assert template_mismatches(built, source=src, reference=lambda m: hf.apply_chat_template(
            m, tokenize=False, add_generation_prompt=True)) == []
        with monkeypatch.context() as mp:      # the template as bundles had it before: laid out only
            mp.setattr(llmtemplate, "laid_out_template", lambda d: hf_layout(template))
            bad = template_mismatches(src)
        if template is ZEPHYR_TEMPLATE:
            assert bad == []
        else:
            assert [b["conversation"] for b in bad] == ["think"] and "add them" in bad[0]["onnxruntime_genai"]
            assert "add them" not in bad[0]["transformers"]


def test_raw_blocks_are_not_laid_out():
    """{% raw %} ... {% endraw %} is text jinja2 leaves as written (even the newline right after {% raw %}):
    hf_layout lays out around it as around a tag and leaves its inside alone (a blank line inside it became the
    text "{{ '\\n' }}") but for lstrip_blocks before {% endraw %}; idempotent."""
    import jinja2

    hf, plain = jinja2.Environment(trim_blocks=True, lstrip_blocks=True), jinja2.Environment()
    for tpl in ("{% raw %}\n\n{{ x }}{% endraw %}\nA", "B\n  {% raw %}\nC{% endraw %}\n\nD",
                "{%- raw -%}\n X \n{%- endraw %}\nE", "{% if 1 %}\n\n{% raw %}{% if %}{% endraw %}\n{% endif %}",
                "{% raw %}A\n    {% endraw %}\nb", "{% raw %}A\n  x {% endraw %}\nb", "{% raw %}  {% endraw %}b"):
        once = hf_layout(tpl)
        assert plain.from_string(once).render() == hf.from_string(tpl).render(), tpl
        assert hf_layout(once) == once
