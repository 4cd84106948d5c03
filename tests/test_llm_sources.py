"""Hugging Face folders as users have them, read before any work (convert.llm.read_source): Git LFS pointers of
files the conversion never opens, the files the source's digest covers, tokenizers given as vocab.json + merges.txt
or as a SentencePiece tokenizer.model only, a hub cache snapshot's name, a PEFT adapter folder. Tiny synthetic
folders: nothing is downloaded, nothing converted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import onnxruntime_genai  # noqa: F401  (edgekit[llm-convert], in dev: missing must fail, not skip)

from test_llm_convert import _one_error_line  # noqa: E402  (the refusal's shape, as every LLM refusal test checks it)
from edgekit.errors import SourceModelError

POINTER = ("version https://git-lfs.github.com/spec/v1\n"
           "oid sha256:4f2a0c7c1c5c3f0e8a1e6b1f7f9e4d1a2b3c4d5e6f708192a3b4c5d6e7f80912\nsize 269060552\n")


def _folder(d: Path, arch: str = "LlamaForCausalLM", model_type: str = "llama", tokenizer: bool = True,
            **config) -> Path:
    """config.json, a stand-in model.safetensors (read_source opens no weights) and a tokenizer.json."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(dict({"architectures": [arch], "model_type": model_type}, **config)))
    (d / "model.safetensors").write_bytes(b"\1" * 4096)
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
        (d / "tokenizer_config.json").write_text("{}")
    (d / "generation_config.json").write_text("{}")
    return d


def test_lfs_pointers_of_files_never_read_are_not_refused(tmp_path):
    """A checkout with `git lfs pull --include "*.safetensors"` (or a hub repo's other formats left as pointers): a
    .gguf, pytorch_model.bin, tf_model.h5, flax_model.msgpack, tokenizer.model pointer beside the real files is
    no reason to refuse, and none of them counts in the source's digest or bytes; a pointer of a file that is read
    (the weights, tokenizer.json, a shard an index names) still is."""
    from edgekit.convert.llm import read_source

    d = _folder(tmp_path / "partial")
    plain = read_source(str(d))
    for name in ("model-q4_k_m.gguf", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "tokenizer.model",
                 "model.onnx"):
        (d / name).write_text(POINTER)
    src = read_source(str(d))
    assert (src.sha256, src.bytes) == (plain.sha256, plain.bytes)
    (d / "tokenizer.json").write_text(POINTER)
    with pytest.raises(SourceModelError, match=r"tokenizer\.json: a Git LFS pointer.*git lfs pull"):
        read_source(str(d))
    sharded = _folder(tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}))
    (sharded / "model-00001-of-00002.safetensors").write_bytes(b"\1" * 64)
    (sharded / "model-00002-of-00002.safetensors").write_text(POINTER)
    with pytest.raises(SourceModelError, match=r"model-00002-of-00002\.safetensors: a Git LFS pointer"):
        read_source(str(sharded))


def test_source_digest_covers_the_files_read_only(tmp_path):
    """The source's sha256 and bytes are the files the conversion reads: transformers' weight set (an index and its
    shards; model.safetensors before pytorch_model.bin), not Mistral's consolidated.safetensors beside the shards,
    a pytorch_model.bin beside model.safetensors, a .gguf or TF / Flax weights; the same digest as before for a
    folder of those files only (sha256_tree), so builds keyed by it stay valid. A quantized checkpoint's every
    *.safetensors counts (the model builder's loaders read them all), and so do `edgekit factorize`'s factors."""
    from edgekit.bundle import sha256_tree
    from edgekit.convert.llm import read_source, source_files

    d = _folder(tmp_path / "shards")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}))
    for i in (1, 2):
        (d / f"model-0000{i}-of-00002.safetensors").write_bytes(bytes([i]) * 1000)
    plain = read_source(str(d))
    assert plain.sha256 == sha256_tree(d) and plain.bytes == sum(f.stat().st_size for f in d.iterdir())
    (d / "consolidated.safetensors").write_bytes(b"\2" * 5000)
    (d / "pytorch_model.bin").write_bytes(b"\3" * 3000)
    (d / "model-f16.gguf").write_bytes(b"\4" * 3000)
    (d / "tf_model.h5").write_bytes(b"\5" * 100)
    (d / "flax_model.msgpack").write_bytes(b"\6" * 100)
    assert (read_source(str(d)).sha256, read_source(str(d)).bytes) == (plain.sha256, plain.bytes)
    (d / "model-00002-of-00002.safetensors").write_bytes(b"\7" * 1000)      # a shard that is read still counts
    assert read_source(str(d)).sha256 != plain.sha256
    # model.safetensors is read before pytorch_model.bin: the .bin beside it does not count, alone it does
    single = _folder(tmp_path / "single")
    base = source_files(single)
    (single / "pytorch_model.bin").write_bytes(b"\3" * 3000)
    assert source_files(single) == base
    (single / "model.safetensors").unlink()
    assert single / "pytorch_model.bin" in source_files(single)
    # a quantization_config: every *.safetensors (the builder's QuantModel loaders list the folder)
    quant = _folder(tmp_path / "quant", quantization_config={"quant_method": "awq"})
    (quant / "extra.safetensors").write_bytes(b"\1" * 10)
    assert quant / "extra.safetensors" in source_files(quant)
    factored = _folder(tmp_path / "factored")
    (factored / "edgekit_factorize.json").write_text(json.dumps({"lowrank": {"file": "edgekit_lowrank.safetensors",
                                                                             "layers": {}}}))
    (factored / "edgekit_lowrank.safetensors").write_bytes(b"\1" * 10)
    assert factored / "edgekit_lowrank.safetensors" in source_files(factored)


def test_weights_transformers_does_not_read_refused_in_one_line(cli, tmp_path):
    """Only weights transformers does not pick (Mistral's consolidated.safetensors alone), or an index whose shards
    are not all there: exit 2 before any work, one line naming them."""
    from edgekit.convert.llm import read_source

    d = _folder(tmp_path / "consolidated")
    (d / "model.safetensors").rename(d / "consolidated.safetensors")
    out = tmp_path / "out"
    line = _one_error_line(cli("convert", d, "-t", "x86-avx512-vnni", "--precision", "int8", "--out", out,
                               "--quiet"), out)
    assert "no weights transformers reads" in line and "consolidated.safetensors" in line, line
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}))
    (d / "model-00001-of-00002.safetensors").write_bytes(b"\1" * 64)
    with pytest.raises(SourceModelError, match=r"model-00002-of-00002\.safetensors, named by "
                                               r"model\.safetensors\.index\.json, not in the folder"):
        read_source(str(d))


def test_sentencepiece_only_tokenizer_without_the_package_refused_in_one_line(cli, tmp_path, monkeypatch):
    """A folder whose only tokenizer is tokenizer.model (SentencePiece): without the sentencepiece package
    transformers cannot read it (it falls back to tiktoken and fails after the float model's setup); refused up
    front in one line saying what to do. A tokenizer.model beside tokenizer.json needs no sentencepiece."""
    import importlib.util

    from edgekit.convert.llm import read_source

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "sentencepiece" else real(name, *a, **k))
    d = _folder(tmp_path / "spm-only", tokenizer=False)
    (d / "tokenizer.model").write_bytes(b"\x0a\x0b" + b"\1" * 2000)
    out = tmp_path / "out"
    line = _one_error_line(cli("convert", d, "-t", "x86-avx512-vnni", "--precision", "int8", "--out", out,
                               "--quiet"), out)
    assert str(d) in line and "tokenizer.model" in line and "sentencepiece" in line, line
    assert "tokenizer.json" in line and "pip install sentencepiece" in line and "tiktoken" not in line, line
    (d / "tokenizer.json").write_text("{}")
    assert read_source(str(d)).architecture == "LlamaForCausalLM"
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.model").write_text(POINTER)                   # the tokenizer read: its pointer is refused
    with pytest.raises(SourceModelError, match=r"tokenizer\.model: a Git LFS pointer"):
        read_source(str(d))


def _bpe_pair(d: Path):
    """A byte-level BPE tokenizer (tests/tinylm) written as vocab.json + merges.txt only, as Qwen2's hub folders
    and GPT-2's hold it; returns the tokenizer the files were written from."""
    from tinylm import _tokenizer, corpus_text

    full = d.parent / (d.name + "-full")
    full.mkdir()
    tok = _tokenizer(corpus_text(200), full)
    tok.backend_tokenizer.model.save(str(d))
    cfg = json.loads((full / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return tok


def test_vocab_json_and_merges_txt_tokenizer_accepted_and_checked(tmp_path, monkeypatch):
    """vocab.json + merges.txt without tokenizer.json (Qwen2's slow-tokenizer files): transformers 5 makes the
    same tokenizer of them and the model builder's save_pretrained writes its tokenizer.json into the bundle.
    read_source accepts the folder and runs the converter's tokenizer check on that tokenizer.json; ONNX Runtime
    GenAI reads it and gives the source's ids. A SentencePiece-form pair whose tokenizer.json ONNX Runtime GenAI
    would misread is refused by that check, in one line naming where the file came from."""
    import edgekit.convert.llm as llm
    from edgekit.convert.llm import read_source
    from edgekit.convert.llm_tokenizer import og_tokenizer
    from transformers import AutoTokenizer

    d = _folder(tmp_path / "qwen-pair", "Qwen2ForCausalLM", "qwen2", tokenizer=False)
    ref = _bpe_pair(d)
    checked = []
    real_check = llm.check_tokenizer
    monkeypatch.setattr(llm, "check_tokenizer", lambda folder: checked.append(sorted(
        f.name for f in Path(folder).iterdir())) or real_check(folder))
    assert read_source(str(d)).architecture == "Qwen2ForCausalLM"
    assert checked and "tokenizer.json" in checked[0]
    built = tmp_path / "bundle-tokenizer"                       # what the builder's save_processing writes
    AutoTokenizer.from_pretrained(str(d)).save_pretrained(str(built))
    work = tmp_path / "og"
    work.mkdir()
    og = og_tokenizer(built, work)
    for text in ("Hello world, the cat sat.", " two  spaces\nnew line", "café 😀 x"):
        assert [int(i) for i in og.encode(text)] == ref(text, add_special_tokens=False)["input_ids"], text
    # a Llama (SentencePiece BPE) vocabulary as a pair: transformers 5 writes it Metaspace "first" -> refused
    from test_llm_tokenizers import _corpus, _spm_tokenizer

    spm = tmp_path / "spm-src"
    spm.mkdir()
    _spm_tokenizer(_corpus("spm", 200, 0), spm)
    doc = json.loads((spm / "tokenizer.json").read_text(encoding="utf-8"))
    lp = _folder(tmp_path / "llama-pair", tokenizer=False)
    (lp / "vocab.json").write_text(json.dumps(doc["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    (lp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(
        m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]) + "\n", encoding="utf-8")
    (lp / "tokenizer_config.json").write_text((spm / "tokenizer_config.json").read_text(encoding="utf-8"),
                                              encoding="utf-8")
    with pytest.raises(SourceModelError) as e:
        read_source(str(lp))
    msg = str(e.value)
    assert msg.startswith(f"{lp}: tokenizer.json (pre_tokenizer Metaspace") and "\n" not in msg, msg
    assert "from vocab.json + merges.txt" in msg and "edgekit-tok-" not in msg, msg


def test_no_tokenizer_refused(tmp_path):
    from edgekit.convert.llm import read_source

    d = _folder(tmp_path / "none", tokenizer=False)
    (d / "vocab.json").write_text("{}")                            # half a pair is none
    with pytest.raises(SourceModelError, match=r"no tokenizer \(tokenizer\.json, vocab\.json \+ merges\.txt, or "
                                               r"tokenizer\.model\)"):
        read_source(str(d))


def test_hub_cache_snapshot_names_the_bundle_by_its_repository(tmp_path):
    """A Hugging Face cache snapshot (models--ORG--NAME/snapshots/REVISION) names the bundle NAME, not the
    revision's hash; any other folder its own name; --name wins."""
    from edgekit.convert.llm import LLMRecipe

    snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / ("7ae557604adf" + "0" * 28)
    snap.mkdir(parents=True)
    assert LLMRecipe(str(snap), ("rpi5",)).bundle_name == "Qwen2.5-0.5B-Instruct"
    bare = tmp_path / "hub" / "models--gpt2" / "snapshots" / "abc"
    bare.mkdir(parents=True)
    assert LLMRecipe(str(bare), ("rpi5",)).bundle_name == "gpt2"
    other = tmp_path / "x" / "snapshots" / "abc"
    other.mkdir(parents=True)
    assert LLMRecipe(str(other), ("rpi5",)).bundle_name == "abc"
    assert LLMRecipe(str(tmp_path / "SmolLM2-135M"), ("rpi5",)).bundle_name == "SmolLM2-135M"
    assert LLMRecipe(str(snap), ("rpi5",), name="mine").bundle_name == "mine"


def test_peft_adapter_folder_refused_in_one_line(cli, tmp_path):
    """A PEFT / LoRA adapter folder (adapter_config.json + adapter_model.safetensors) is said to be an adapter, to
    merge into its base model and convert that: exit 2, one line, whichever path the folder would take (no
    config.json: the image-model path, also with a language-model --precision; with one: the LLM path)."""
    from edgekit.convert.llm import read_source
    from edgekit.convert.sources import detect_kind

    d = tmp_path / "lora"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                       "base_model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}))
    (d / "adapter_model.safetensors").write_bytes(b"\1" * 256)
    out = tmp_path / "out"
    for extra in ((), ("--precision", "int4")):
        line = _one_error_line(cli("convert", d, "-t", "x86-avx512-vnni", "--out", out, "--quiet", *extra), out)
        assert "PEFT adapter of Qwen/Qwen2.5-0.5B-Instruct" in line and "merge_and_unload()" in line, line
        assert "SavedModel" not in line and "language-model precision" not in line, line
    with pytest.raises(SourceModelError, match="PEFT adapter"):
        detect_kind(d)
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    line = _one_error_line(cli("convert", d, "-t", "x86-avx512-vnni", "--out", out, "--quiet"), out)
    assert "PEFT adapter" in line and "merge" in line, line
    with pytest.raises(SourceModelError, match="PEFT adapter"):
        read_source(str(d))


def test_sizes_config_json_omits_are_transformers_defaults_and_none_refused(tmp_path):
    """LMSource.dims (the manifest's sizes, the KV cache, the fidelity decoder's heads) reads a size config.json's
    text settings omit as transformers does: its configuration class's default (gemma-3-4b-it's text_config names no
    num_attention_heads: 8, not 0). Where neither gives num_hidden_layers / hidden_size / num_attention_heads, one
    line naming the key, not a TypeError at the bundle (dims()["layers"] None)."""
    from edgekit.convert.llm import LMSource, read_source

    text = {"model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128}
    d = _folder(tmp_path / "gemma3mm", arch="Gemma3ForConditionalGeneration", model_type="gemma3",
                text_config=text)
    dims = read_source(str(d)).dims()
    assert dims["layers"] == 2 and dims["hidden"] == 64 and dims["heads"] == 8, dims   # Gemma3TextConfig's
    assert dims["kv_heads"] == 4 and dims["head_dim"] == 256, dims
    bare = LMSource(d, {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2}, "LlamaForCausalLM",
                    "0" * 64, 0)   # transformers could not read it: no defaults
    with pytest.raises(SourceModelError, match="config.json has no num_hidden_layers"):
        bare.dims()
    bare.config["num_hidden_layers"] = 0
    with pytest.raises(SourceModelError, match="num_hidden_layers is 0, not a whole number above 0"):
        bare.dims()
