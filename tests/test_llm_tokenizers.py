"""Tokenizers other than the tiny LM's byte-level BPE, through the LLM path: tiny Llama models (3 layers, hidden 64,
40 AdamW steps) whose tokenizers are built offline with the `tokenizers` library in the form of the checkpoints
they stand for, converted to INT8 and run by edgekit.runtime, with what edgekit feeds the model compared to what
transformers' tokenizer gives:
- "spm": Llama 2 / TinyLlama's (SentencePiece converted: BPE with byte_fallback and <0xXX> byte tokens, a
  Prepend("▁") + Replace(" ", "▁") normalizer, no pre-tokenizer, <s> added by a TemplateProcessing
  post-processor, tokenizer_class LlamaTokenizer, TinyLlama's Zephyr chat template that writes no <s>);
- "llama3": Llama 3.2 Instruct's (byte-level BPE with its split regex, <|begin_of_text|> added by a
  TemplateProcessing post-processor, a chat template that writes <|begin_of_text|> itself, eos ids
  [<|end_of_text|>, <|eot_id|>] in generation_config.json)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

import onnxruntime_genai  # noqa: F401  (edgekit[llm-convert], in dev: missing must fail, not skip)
import torch

from tinylm import corpus_text, train_steps

ZEPHYR_TEMPLATE = (   # TinyLlama-1.1B-Chat-v1.0's, as its tokenizer_config.json has it
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
LLAMA3_TEMPLATE = (   # Llama 3's, without the tool-calling and date parts of 3.2's
    "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
UNICODE = ["Le café est prêt à midi.", "The naïve robot says olé 🙂 to the café.", "Über die Brücke, señor."]
_CHAT = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>\n<\|im_start\|>assistant\n(.*?)<\|im_end\|>\n")


def _corpus(family: str, n: int, seed: int) -> str:
    """The tiny LM's text with its chat exchanges in the family's format, and some accented text and emoji."""
    text = corpus_text(n, seed)
    if family == "spm":
        text = _CHAT.sub(lambda m: f"<|user|>\n{m[1]}</s>\n<|assistant|>\n{m[2]}</s>\n", text)
    else:
        text = _CHAT.sub(lambda m: f"<|start_header_id|>user<|end_header_id|>\n\n{m[1]}<|eot_id|>"
                                   f"<|start_header_id|>assistant<|end_header_id|>\n\n{m[2]}<|eot_id|>\n", text)
    return text + "\n".join(UNICODE * 20) + "\n"


def _template_processing(bos: str, bos_id: int) -> dict:
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _added(specials, first: int = 0) -> list:
    return [{"id": first + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for i, s in enumerate(specials)]


def _spm_tokenizer(text: str, folder: Path) -> dict:
    """Llama 2 / TinyLlama's tokenizer files: <unk> <s> </s>, the 256 <0xXX> byte tokens, then merges trained here
    (no newline or emoji among the pieces: they fall back to bytes, as in Llama 2)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # pieces start with ▁ and never join letters or digits to punctuation (SentencePiece's split by Unicode script:
    # Gemma 3's 262,144 pieces have none such; ONNX Runtime GenAI's tokenizer would not merge them)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("▁", behavior="merged_with_next"),
        pre_tokenizers.Split(Regex("[^\\p{L}\\p{N}▁\\s]+"), behavior="isolated")])
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False)
    pieces = re.sub("[^\u0000-\uffff]", "", text)   # characters beyond the BMP (emoji) left to the byte tokens
    tok.train_from_iterator([ln for ln in pieces.splitlines() if ln], trainer=trainer)
    trained = json.loads(tok.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added(specials),
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": {"String": " "},
                                                            "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": _template_processing("<s>", 1),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": trained["merges"]}}
    (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": False,
           "model_max_length": 2048, "padding_side": "right", "sp_model_kwargs": {},
           "tokenizer_class": "LlamaTokenizer", "chat_template": ZEPHYR_TEMPLATE,
           "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                    for a in _added(specials)}}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}), encoding="utf-8")
    return {"bos": 1, "eos": [2], "vocab": len(vocab)}


def _llama3_tokenizer(text: str, folder: Path) -> dict:
    """Llama 3's tokenizer files: a byte-level BPE (its split regex) then its special tokens after the vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    body = re.sub(r"<\|[a-z_]+\|>", " ", text)
    tok.train_from_iterator(body.splitlines(), trainer=trainer)
    doc = json.loads(tok.to_str())
    vocab = doc["model"]["vocab"]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    first = len(vocab)
    for i, s in enumerate(specials):
        vocab[s] = first + i
    doc["added_tokens"] = _added(specials, first)
    doc["normalizer"] = None
    doc["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        _template_processing("<|begin_of_text|>", first)]}
    doc["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    doc["model"]["ignore_merges"] = True
    (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
           "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
           "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": LLAMA3_TEMPLATE,
           "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                    for a in _added(specials, first)}}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}), encoding="utf-8")
    return {"bos": first, "eos": [first + 1, first + 4], "vocab": len(vocab)}


def make_family(family: str, folder: Path, seed: int = 0, steps: int = 40) -> Path:
    """A 3-layer Llama with the family's tokenizer, trained for `steps` on text in the family's chat format."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    text = _corpus(family, 500, seed)
    info = (_spm_tokenizer if family == "spm" else _llama3_tokenizer)(text, folder)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    torch.manual_seed(seed)
    eos = info["eos"] if len(info["eos"]) > 1 else info["eos"][0]
    cfg = LlamaConfig(vocab_size=info["vocab"], hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                      bos_token_id=info["bos"], eos_token_id=eos, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor(fast(text, add_special_tokens=False).input_ids, dtype=torch.long)
    train_steps(model, ids, steps, seed)
    model.config.architectures = ["LlamaForCausalLM"]
    model.generation_config = GenerationConfig(bos_token_id=info["bos"], eos_token_id=eos, do_sample=False,
                                               max_length=256)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_chat_template_layout_is_transformers():
    """hf_layout: jinja2 without trim_blocks / lstrip_blocks renders the laid-out template as transformers renders
    the original (with them)."""
    import jinja2

    from edgekit.runtime.llmtemplate import hf_layout

    tricky = ("  {% if x %}\n   a\n  {%+ if y %}b{% endif +%}\n{%- endif %}\n{# c #}\n  \t{% for m in messages %}"
              "{{ m.content }}\n{% endfor %}\r\nend\n")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    ctx = dict(messages=msgs, add_generation_prompt=True, eos_token="</s>", bos_token="<s>", x=1, y=1)
    hf = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    plain = jinja2.Environment()
    for tpl in (ZEPHYR_TEMPLATE, LLAMA3_TEMPLATE, tricky):
        assert plain.from_string(hf_layout(tpl)).render(**ctx) == hf.from_string(tpl).render(**ctx)
    assert hf_layout(LLAMA3_TEMPLATE) == LLAMA3_TEMPLATE                   # written with {%- -%}: unchanged
    assert plain.from_string(hf_layout(ZEPHYR_TEMPLATE)).render(**ctx).startswith("<|system|>\nS</s>\n<|user|>")


def test_decode_rules_from_the_head_of_tokenizer_json(tmp_path, monkeypatch):
    """llmdecode reads added_tokens and decoder without the vocabulary (read in growing pieces: here from 5
    characters, so every value crosses a read), the strip of a Fuse-then-Strip decoder only, and a stream skips
    special ids and strips the leading space across its first pieces."""
    from edgekit.runtime import llmdecode

    monkeypatch.setattr(llmdecode, "_FIRST_READ", 5)
    strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    fuse_strip = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}, strip]}
    doc = {"version": "1.0", "truncation": None, "padding": 12345, "added_tokens": _added(["<s>", "</s>"], 7)
           + [dict(_added(["<x>"], 9)[0], special=False)], "normalizer": {"a": [1, 2.5]}, "decoder": fuse_strip,
           "model": {"vocab": {"é\"{": 1}}}
    f = tmp_path / "tokenizer.json"
    for indent in (None, 2):
        f.write_text(json.dumps(doc, indent=indent, ensure_ascii=False), encoding="utf-8")
        assert llmdecode.read_head(f, ("padding", "decoder")) == {"padding": 12345, "decoder": fuse_strip}
        assert llmdecode.read_head(f, ("model", "absent")) == {"model": doc["model"]}
        r = llmdecode.decode_rules(tmp_path)
        assert (r.special, r.strip_start, r.strip_char) == ({7, 8}, 1, " ")
    for decoder in (strip, {"type": "Sequence", "decoders": [strip, {"type": "Fuse"}]}, None):   # per token: not
        f.write_text(json.dumps(dict(doc, decoder=decoder)), encoding="utf-8")
        assert llmdecode.decode_rules(tmp_path).strip_start == 0
    f.write_text("[1]", encoding="utf-8")
    assert llmdecode.decode_rules(tmp_path) == llmdecode.DecodeRules()      # unreadable: ORT GenAI says so
    r = llmdecode.DecodeRules(special=frozenset({7}), strip_start=1)
    pieces = {1: "", 2: " ", 3: " a", 4: " b", 7: "  "}

    class Fake:
        def decode(self, t):
            return pieces[t]

    for seq, want in (([1, 7, 2, 3], ["", "", "", " a"]), ([1, 3, 4], ["", "a", " b"]), ([4, 7, 2], ["b", "", " "])):
        s = r.stream(Fake())
        assert [s.decode(t) for t in seq] == want
        assert r.strip("".join(pieces[t] for t in r.keep(seq))) == "".join(want)


@pytest.mark.parametrize("family", ["spm", "llama3"])
def test_tokenizer_family_converts_and_feeds_the_model_what_transformers_does(family, tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import AutoTokenizer

    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.runtime import load

    # Llama 3's form trained until its replies end with <|eot_id|> (the second of its eos ids)
    folder = make_family(family, tmp_path / family, steps=40 if family == "spm" else 120)
    res = convert_llm(LLMRecipe(str(folder), ("x86-avx512-vnni",), precision="int8"), str(tmp_path / "out"))
    row = res.bundles[0]
    assert row.ok, row.reason
    m = json.loads((row.path / "manifest.json").read_text())
    hf = AutoTokenizer.from_pretrained(str(folder))
    raw = RawTokenizer.from_file(str(folder / "tokenizer.json"))     # the file's own pipeline
    gen_cfg = json.loads((folder / "generation_config.json").read_text())
    eos = gen_cfg["eos_token_id"] if isinstance(gen_cfg["eos_token_id"], list) else [gen_cfg["eos_token_id"]]
    bos = hf.bos_token_id
    lm = load(row.path)
    # every eos id of generation_config.json ends a generation
    assert sorted(lm.eos_token_ids) == sorted(eos) == sorted(m["llm"]["eos_token_id"] if isinstance(
        m["llm"]["eos_token_id"], list) else [m["llm"]["eos_token_id"]])
    # a plain prompt: the post-processor's BOS once (ORT GenAI's tokenizer leaves it out; convert records it)
    assert m["llm"]["prompt_bos"] == bos
    for text in ["The cat", "Hi there\nthe box"] + UNICODE:
        ids = lm.encode(text)
        assert ids == raw.encode(text).ids and ids[0] == bos and ids[1] != bos, text
        if family == "llama3":
            assert ids == hf(text).input_ids, text
        # byte-fallback pieces and emoji through decode and the streaming detokenizer: transformers' text (Llama 2's
        # decoder strips the dummy prefix's space, Strip start 1, which ORT GenAI 0.18 does not: runtime.llmdecode)
        body = ids[1:]
        stream = lm.tokenizer.stream()
        streamed = "".join(stream.decode(t) for t in body)
        assert streamed == lm.decode(body) == hf.decode(body, skip_special_tokens=True) == text, text
        if family == "spm":
            assert lm.og_tokenizer.decode(np.asarray(body, dtype=np.int32)) == " " + text   # what is fixed
    # streamed and whole decode equal transformers' on every sequence of up to 3 plain, byte-fallback and special
    # tokens (ORT GenAI streams spaces for a skipped special, drops the space after one, decodes specials as U+FFFD)
    plain = list(dict.fromkeys(hf(" y the\n é", add_special_tokens=False).input_ids))   # whole characters each
    specials = sorted({bos, *eos} | set(hf.convert_tokens_to_ids(["<unk>", "<|start_header_id|>"])) - {None})
    assert lm.tokenizer.rules.special >= set(specials) and len(plain) == 5
    seqs = [list(s) for n in (1, 2, 3) for s in itertools.product(plain + specials[:3], repeat=n)]
    for seq in seqs:
        stream = lm.tokenizer.stream()
        got = ("".join(stream.decode(t) for t in seq), lm.decode(seq))
        assert got == (hf.decode(seq, skip_special_tokens=True),) * 2, (seq, got)
    # the chat template renders as transformers renders it; one BOS where the template writes it, none otherwise
    msgs = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "What colour is the box?"}]
    rendered = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert lm.apply_chat_template(msgs) == rendered
    ids = lm.prompt_ids(msgs)
    assert ids == raw.encode(rendered, add_special_tokens=False).ids
    if family == "llama3":
        assert ids == hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert ids[0] == bos and ids[1] != bos
    else:   # TinyLlama's template writes no <s>, and transformers' apply_chat_template adds none
        assert bos not in ids
    out = lm.chat(msgs, max_new_tokens=16)
    assert isinstance(out, str) and lm.last["new_tokens"] > 0
    assert out == hf.decode(lm.last["token_ids"], skip_special_tokens=True)
    assert "".join(lm.chat(msgs, max_new_tokens=16, stream=True)) == out
    # a plain continuation: its first token carries "▁" (Llama 2: the reply started with " " before; transformers
    # strips it) or "Ġ" (Llama 3: kept by both)
    cont = lm.generate("The cat", max_new_tokens=8)
    assert cont == hf.decode(lm.last["token_ids"], skip_special_tokens=True), cont
    assert "".join(lm.generate("The cat", max_new_tokens=8, stream=True)) == cont
    raw_cont = lm.og_tokenizer.decode(np.asarray(lm.last["token_ids"], dtype=np.int32))
    assert raw_cont == (" " + cont if family == "spm" else cont) and raw_cont.startswith(" "), raw_cont
    if family == "llama3":   # "The box is red." then <|eot_id|>, which is not eos_token_ids[0] (<|end_of_text|>)
        out = lm.chat(msgs[1:], max_new_tokens=24)
        assert lm.eos_token_ids[0] == hf.convert_tokens_to_ids("<|end_of_text|>")
        assert lm.last["finish_reason"] == "stop" and lm.last["new_tokens"] < 24 and out.endswith("."), out
    conv = lm.conversation(system="Be short.")
    conv.say("What colour is the box?", max_new_tokens=12)
    conv.say("What colour is the lamp?", max_new_tokens=12)
    cache = [int(t) for t in conv._gen.get_sequence(0)]
    assert cache[:len(ids)] == ids and cache.count(bos) == (1 if family == "llama3" else 0), cache
    assert conv.messages[-1]["content"] == hf.decode(conv.last["token_ids"], skip_special_tokens=True)
    assert lm.check()["ok"]

    # the server's engine (its streamed and whole responses join these pieces): the same text
    import threading

    from edgekit.runtime.llm_batch import GenSequence, SamplingParams, load_llm_release

    rel = load_llm_release("t", "0" * 64, row.path, threads=1, check=False, max_sequences=2, max_queue=2,
                           kv_cache_mb=None)
    try:
        got = {0: [], 1: []}
        done = threading.Semaphore(0)

        def on(i):
            def on_events(evs):
                for kind, v in evs:
                    (got[i].append(v) if kind == "text" else done.release())
            return on_events

        rel.engine.submit(GenSequence(rel.tokenizer.chat_ids(msgs), SamplingParams(max_tokens=16), on(0)))
        rel.engine.submit(GenSequence(rel.tokenizer.encode("The cat"), SamplingParams(max_tokens=8), on(1)))
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
        assert ["".join(got[0]), "".join(got[1])] == [out, cont]
    finally:
        rel.engine.retire()
        rel.engine.join(10)

    # a bare ONNX Runtime GenAI folder (or a bundle converted before convert laid the template out) with the
    # checkpoint's own template: the runtime and the server's tokenizer lay it out when they render
    import shutil

    from edgekit.runtime.llm import Tokenizer

    bare = tmp_path / "bare"
    shutil.copytree(row.path / "model", bare)
    (bare / "chat_template.jinja").write_text(json.loads((folder / "tokenizer_config.json").read_text())[
        "chat_template"], encoding="utf-8")
    assert load(bare).apply_chat_template(msgs) == rendered
    assert Tokenizer.of_folder(bare).chat_ids(msgs) == ids


def _mistral_v03_tokenizer(folder: Path, decoder=None) -> dict:
    """Mistral 7B v0.3's tokenizer.json form as transformers 5 writes a LlamaTokenizer (save_pretrained, every field
    the library writes): BPE with byte_fallback over the spm family's vocabulary, no normalizer, pre_tokenizer
    Metaspace("▁", prepend_scheme "first", split false), <s> by the post-processor, decoder Sequence [Replace "▁",
    ByteFallback, Fuse, Strip " " start 1]; `decoder` replaces the decoder (a Metaspace decoder: the form an
    earlier session tried)."""
    from transformers import LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    _spm_tokenizer(_corpus("spm", 200, 0), folder)
    doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in doc["model"]["merges"]]
    LlamaTokenizer(vocab=doc["model"]["vocab"], merges=merges, bos_token="<s>", eos_token="</s>",
                   unk_token="<unk>").save_pretrained(str(folder))
    doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    doc["model"]["unk_token"] = "<unk>"                         # as Mistral's file (transformers 5 leaves None)
    doc["post_processor"] = _template_processing("<s>", 1)
    if decoder is not None:
        doc["decoder"] = decoder
    (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False, indent=2), encoding="utf-8")
    return doc


def test_metaspace_tokenizers_ort_genai_misreads_are_refused(cli, tmp_path):
    """Mistral 7B v0.3's form (Metaspace pre_tokenizer, prepend_scheme "first"): ONNX Runtime GenAI 0.18 loads it
    and decodes it as transformers does (with runtime.llmdecode's rules, whole and streamed), but runs no
    pre_tokenizer: it puts "▁" before every piece of text between special tokens, also before a leading space, so
    a leading space or any text after a special token (every chat template's) gets other ids than the file's and
    transformers'. With a Metaspace decoder it reads the vocabulary as byte-level BPE: ids -1 and 'map::at' on
    decoding. No tokenizer.json form it reads tokenizes as "first" does, so convert refuses both (exit 2, one
    line), and passes a Metaspace form it does tokenize as the file ("never", no Strip)."""
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import AutoTokenizer

    from edgekit.convert.llm_tokenizer import check_tokenizer, og_tokenizer
    from edgekit.errors import SourceModelError
    from edgekit.runtime.llmdecode import decode_rules

    folder = tmp_path / "mistral-v03"
    doc = _mistral_v03_tokenizer(folder)
    assert doc["normalizer"] is None and doc["model"]["byte_fallback"] is True
    assert doc["pre_tokenizer"] == {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                                    "split": False}
    assert [d["type"] for d in doc["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"]
    hf = AutoTokenizer.from_pretrained(str(folder))
    raw = RawTokenizer.from_file(str(folder / "tokenizer.json"))
    work = tmp_path / "og"
    work.mkdir()
    tok = og_tokenizer(folder, work)

    def og_pieces(text):
        return [raw.id_to_token(int(i)) for i in tok.encode(text)]

    for text in ["The cat", "Hi there\nthe box"] + UNICODE:          # plain text: the file's ids
        assert [int(i) for i in tok.encode(text)] == raw.encode(text, add_special_tokens=False).ids \
            == hf(text, add_special_tokens=False).input_ids, text
    assert raw.encode(" The", add_special_tokens=False).tokens == ["▁The"]
    assert og_pieces(" The") == ["▁", "▁The"]                         # a second "▁" before a leading space
    assert raw.encode("<s>the", add_special_tokens=False).tokens == ["<s>", "t", "he"]
    assert og_pieces("<s>the") == ["<s>", "▁the"]                     # after a special token: "first" puts none
    assert hf("</s> the", add_special_tokens=False).input_ids == raw.encode("</s> the", add_special_tokens=False).ids
    assert og_pieces("</s> the") == ["</s>", "▁", "▁the"]
    # decoding is transformers': every sequence of up to 3 plain, "▁", newline, é and special tokens
    rules = decode_rules(folder)
    assert rules.strip_start == 1 and rules.special == {0, 1, 2}
    plain = list(dict.fromkeys(hf(" y the\n é", add_special_tokens=False).input_ids))
    for seq in [list(s) for n in (1, 2, 3) for s in itertools.product(plain + [0, 1, 2], repeat=n)]:
        stream = rules.stream(tok.create_stream())
        kept = rules.keep(seq)
        whole = rules.strip(tok.decode(np.asarray(kept, dtype=np.int32))) if kept else ""
        assert "".join(stream.decode(t) for t in seq) == whole == hf.decode(seq, skip_special_tokens=True), seq
    # convert: one line naming the form, exit 2, before any build
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(SourceModelError, match=r"Metaspace \(prepend_scheme 'first'\).*' Hello' as \['▁', '▁', "):
        check_tokenizer(folder)
    r = cli("convert", folder, "-t", "x86-avx512-vnni", "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert "Metaspace (prepend_scheme 'first')" in line and "every piece of text between special tokens" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    # a Metaspace decoder: read as byte-level BPE
    meta = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    bad = tmp_path / "metaspace-decoder"
    _mistral_v03_tokenizer(bad, decoder=meta)
    (bad / "og").mkdir()
    btok = og_tokenizer(bad, bad / "og")
    assert -1 in [int(i) for i in btok.encode("Hello world")]
    with pytest.raises(RuntimeError, match="map::at"):
        btok.decode(np.asarray(raw.encode("The cat", add_special_tokens=False).ids, dtype=np.int32))
    with pytest.raises(SourceModelError, match=r"decoder Metaspace .*byte-level BPE"):
        check_tokenizer(bad)

    # a Metaspace form ONNX Runtime GenAI does tokenize as the file: passed
    never = tmp_path / "metaspace-never"
    doc = _mistral_v03_tokenizer(never, decoder={"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]})
    doc["pre_tokenizer"]["prepend_scheme"] = "never"
    (never / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    assert check_tokenizer(never) == {"form": "pre_tokenizer Metaspace (prepend_scheme 'never'), decoder Sequence "
                                              "[Replace, ByteFallback, Fuse]", "texts": 22}


def test_a_metaspace_file_the_tokenizers_library_cannot_read_is_one_line(tmp_path):
    """A tokenizer.json that names a Metaspace form but that the tokenizers library cannot parse: one clear error
    (SourceModelError, the CLI's exit 2), not the library's bare Exception as a traceback."""
    from edgekit.convert.llm_tokenizer import check_tokenizer
    from edgekit.errors import SourceModelError

    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                                            "split": False},
        "decoder": None, "model": {"type": "BPE"}}), encoding="utf-8")
    with pytest.raises(SourceModelError, match="the tokenizers library cannot read it"):
        check_tokenizer(tmp_path)


def _qwen_form_tokenizer(folder: Path, normalizer) -> dict:
    """Qwen2.5 / DeepSeek-R1-Distill-Qwen's tokenizer.json form: byte-level BPE with `normalizer` (theirs: NFC),
    special tokens after the vocabulary (one of DeepSeek's, which NFKC would change), and two added tokens that strip
    the whitespace beside them (lstrip, rstrip; no Qwen token does: the form other checkpoints use)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(UNICODE * 5 + ["hello world ok a b"] * 5, trainer=trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    doc = json.loads(tok.to_str())
    vocab = doc["model"]["vocab"]
    first = len(vocab)
    added = _added(["<|im_start|>", "<｜User｜>", "<|x|>", "<|y|>"], first)
    added[2]["lstrip"] = added[3]["rstrip"] = True
    for a in added:
        vocab[a["content"]] = a["id"]
    doc.update(added_tokens=added, normalizer=normalizer)
    (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "<|im_start|>"}), encoding="utf-8")
    return doc


NFD_TEXTS = ["cafe\u0301 ok", "Cafe\u0301\nna\u0308ive", "<|im_start|>cafe\u0301<｜User｜>"]
STRIP_TEXTS = ["a  <|x|>b", "a \n<|x|>b", "a<|y|>  b", "<|x|> b", "a \u3000<|x|><|y|>\nb"]


def test_unicode_normalizer_and_lstrip_tokens_are_applied_before_ort_genai_encodes(tmp_path):
    """ONNX Runtime GenAI 0.18 runs no NFC normalizer (Qwen's and DeepSeek-R1-Distill-Qwen's files have one): NFD
    text, as macOS and PDF text comes, got other ids than the file gives; nor does it strip the whitespace before an
    lstrip added token. The runtime's Tokenizer applies both (runtime.llmtemplate.EncodeRules, read from the head
    of tokenizer.json) and then gives the file's ids; convert's check probes that, and refuses a normalizer step
    it does not apply (Lowercase)."""
    from tokenizers import Tokenizer as RawTokenizer

    import onnxruntime_genai as og
    from edgekit.convert.llm_tokenizer import check_tokenizer, compare_ids, og_tokenizer, probe_texts
    from edgekit.errors import SourceModelError
    from edgekit.runtime.llm import Tokenizer
    from edgekit.runtime.llmtemplate import EncodeRules, encode_rules, normalizer_form

    # which Unicode form a normalizer applies; other steps are reported, not guessed
    nfc = {"type": "NFC"}
    assert normalizer_form(nfc) == ("NFC", []) and normalizer_form(None) == (None, [])
    assert normalizer_form({"type": "Sequence", "normalizers": [{"type": "Sequence", "normalizers": [
        {"type": "NFKC"}]}, {"type": "Lowercase"}]}) == ("NFKC", ["Lowercase"])
    assert normalizer_form({"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "StripAccents"},
                                                                {"type": "NFC"}]}) == (None, ["NFD", "StripAccents",
                                                                                              "NFC"])
    assert normalizer_form({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                                {"type": "Replace"}]}) == (None, ["Prepend", "Replace"])
    # NFKC leaves added tokens as written ('<｜User｜>' would become '<|User|>') and normalizes the text between
    nfkc = EncodeRules(form="NFKC", protect=frozenset({"<｜User｜>"}))
    assert nfkc.apply("<｜User｜>ﬁ｜") == "<｜User｜>fi|" and not EncodeRules()
    # ... but never makes one of the user's text: fullwidth '＜|im_start|＞' stays as written (NFKC would give the
    # special token, which ONNX Runtime GenAI matches and the tokenizers library does not in normalized text)
    ascii_tok = EncodeRules(form="NFKC", protect=frozenset({"<|im_start|>"}))
    assert ascii_tok.apply("hi ＜|im_start|＞sys") == "hi ＜|im_start|＞sys"
    assert ascii_tok.apply("<|im_start|>ﬁ") == "<|im_start|>fi"

    for name, normalizer in (("nfc", nfc), ("nfc-seq", {"type": "Sequence", "normalizers": [nfc]})):
        folder = tmp_path / name
        _qwen_form_tokenizer(folder, normalizer)
        raw = RawTokenizer.from_file(str(folder / "tokenizer.json"))
        work = tmp_path / f"og-{name}"
        work.mkdir()
        tok = og_tokenizer(folder, work)
        rules = encode_rules(folder)
        assert rules.form == "NFC" and rules.lstrip == {"<|x|>"}
        # the bug: ORT GenAI's ids of the text as given differ from the file's on every one of these
        for text in NFD_TEXTS + STRIP_TEXTS[:2]:
            assert [int(i) for i in tok.encode(text)] != raw.encode(text, add_special_tokens=False).ids, text
        assert [int(i) for i in tok.encode("a<|y|>  b")] == raw.encode("a<|y|>  b", add_special_tokens=False).ids
        # the runtime's Tokenizer (an ORT GenAI tokenizer of the folder as its model's): the file's ids
        lm_tok = Tokenizer(og, str(work), tok, prep=rules)
        for text in NFD_TEXTS + STRIP_TEXTS + UNICODE:
            want = raw.encode(text, add_special_tokens=False).ids
            assert lm_tok.encode(text) == lm_tok.encode_templated(text) == want, text
        # the server's tokenizer (runtime.llm_batch, rules read from the folder as a bare release's): the same ids
        srv = Tokenizer.of_folder(work)
        for text in NFD_TEXTS + STRIP_TEXTS + UNICODE:
            assert srv.encode(text) == raw.encode(text, add_special_tokens=False).ids, text
        # convert's check: probes NFD text and text around each lstrip / rstrip token, as the runtime prepares it
        texts = probe_texts(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")))
        assert "cafe\u0301 ok" in texts and "a \n<|x|>b" in texts and "a<|y|>\n b" in texts
        differ = {t for t, _, _ in compare_ids(folder, texts)}      # without the runtime's preparation
        assert {"cafe\u0301 ok", "a  <|x|>b", "a \n<|x|>b"} <= differ, differ
        assert all("<|x|>" in t or "\u0301" in t or "\u0308" in t for t in differ), differ
        assert compare_ids(folder, texts, rules) == []
        assert check_tokenizer(folder) == {"form": "normalizer NFC, 1 added token(s) lstrip ('<|x|>'), 1 added "
                                                   "token(s) rstrip ('<|y|>')", "texts": len(texts)}

    lower = tmp_path / "lowercase"
    _qwen_form_tokenizer(lower, {"type": "Sequence", "normalizers": [nfc, {"type": "Lowercase"}]})
    with pytest.raises(SourceModelError, match=r"normalizer NFC \+ Lowercase.*'Hello world' as \['H', "):
        check_tokenizer(lower)
    plain = tmp_path / "no-normalizer"     # SmolLM2 / Llama 3's form: nothing to probe (the head only is read)
    doc = _qwen_form_tokenizer(plain, None)
    for a in doc["added_tokens"]:
        a["lstrip"] = a["rstrip"] = False
    (plain / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    assert check_tokenizer(plain) is None and not encode_rules(plain)
