"""The language-model runtime (edgekit.runtime.llm): generation, chat, a conversation's KV cache, benchmark,
the golden check, and the CLIs (edgekit run / bench / chat, python -m edgekit.runtime), on the tiny Llama of
tests/tinylm.py converted by edgekit (convert.llm: INT4 for x86-avx2, golden.json computed on this machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT
from tinylm import tiny_lm  # noqa: F401  (the session fixture)

import onnxruntime_genai  # noqa: E402,F401  (edgekit[llm], in dev: missing must fail, not skip)

from edgekit.errors import BundleError, DataError  # noqa: E402
from edgekit.runtime import load  # noqa: E402
from edgekit.runtime.llm import Conversation, LanguageModel  # noqa: E402

QUESTION = [{"role": "user", "content": "What colour is the lamp?"}]


@pytest.fixture(scope="module")
def build(tiny_lm, tmp_path_factory):  # noqa: F811
    """The tiny LM converted by edgekit (convert.llm: ONNX Runtime GenAI's builder, INT4 for x86-avx2, fidelity
    against the float model, golden.json computed on this, the converting, machine)."""
    from edgekit.convert.llm import LLMRecipe, convert_llm

    out = tmp_path_factory.mktemp("build")
    res = convert_llm(LLMRecipe(str(tiny_lm), ("x86-avx2",), precision="int4", name="tinychat", val_tokens=256),
                      str(out))
    assert [r.ok for r in res.bundles] == [True]
    return out


@pytest.fixture(scope="module")
def bundle(build):
    return build / "tinychat-x86-avx2-int4"


@pytest.fixture(scope="module")
def og_dir(bundle):
    """The bundle's model folder: what onnxruntime_genai.Model loads, a bare GenAI folder without a manifest."""
    return bundle / "model"


@pytest.fixture(scope="module")
def lm(bundle) -> LanguageModel:
    return load(bundle)


def test_load_returns_a_language_model_for_a_bundle_and_a_bare_folder(lm, og_dir, bundle, tmp_path, monkeypatch):
    from edgekit.runtime.threads import usable_cpus

    from edgekit.runtime.threadprobe import candidates, machine

    assert isinstance(lm, LanguageModel) and lm.manifest["kind"] == "llm"
    # measured (runtime.llmthreads) among 1, 2, 4 ... up to the profile's count clamped to the usable CPUs
    ceiling = min(lm.manifest["target"]["runtime"]["threads"], usable_cpus())
    assert lm.threads in candidates(ceiling)
    assert lm.threads_chosen_by in (("profile",) if ceiling == 1 else ("probe", "cache"))  # cache: a same build
    assert lm.context == lm.manifest["llm"]["context_default"] == 512 and lm.eos_token_ids == [2] and lm.load_ms > 0
    bare = load(og_dir, threads=2)
    assert isinstance(bare, LanguageModel) and bare.manifest is None
    assert bare.threads == 2 and bare.threads_chosen_by == "argument"
    assert bare.generate("Count: one", max_new_tokens=8) == lm.generate("Count: one", max_new_tokens=8)
    with pytest.raises(BundleError, match="golden check needs a bundle"):
        bare.check()
    # a thread count measured fastest and recorded in the manifest (runtime.threads_choice) comes first
    chosen = tmp_path / "chosen"
    shutil.copytree(bundle, chosen)
    m = json.loads((chosen / "manifest.json").read_text())
    rec = {"threads": 1, "tried": [1, 2], **machine()}   # measured on a machine of this kind (its CPU and cores)
    m["runtime"] = {"threads_choice": rec}
    (chosen / "manifest.json").write_text(json.dumps(m))
    got = load(chosen)
    assert (got.threads, got.threads_chosen_by) == (1, "manifest")
    assert got.threads_choice == rec
    # timed on another kind of machine (a 2-vCPU build host for an 8-core device): not applied, as if unrecorded
    m["runtime"] = {"threads_choice": dict(rec, usable_cpus=rec["usable_cpus"] + 6)}
    (chosen / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setenv("EDGEKIT_CACHE_DIR", str(tmp_path / "cache"))   # no cached probe either: the ceiling
    monkeypatch.setenv("EDGEKIT_THREAD_PROBE", "0")
    assert load(chosen).threads_chosen_by == "profile"


def test_threads_probed_once_cached_and_overridden(bundle, tmp_path, monkeypatch):
    """Threads as for other bundles: a probe of decode speed at the first load, cached (and the cache, not a new
    probe, decides the next load); threads= wins; EDGEKIT_THREAD_PROBE=0 keeps the ceiling; a manifest's measured
    choice is taken without a probe."""
    import edgekit.runtime.threads as rthreads
    from edgekit.runtime.threadprobe import candidates

    if rthreads.usable_cpus() < 2:   # a one-CPU runner: the ceiling 2 is still measurable (functional coverage)
        monkeypatch.setattr(rthreads, "usable_cpus", lambda cpu_max=None: 2)
    ceiling = min(json.loads((bundle / "manifest.json").read_text())["target"]["runtime"]["threads"],
                  rthreads.usable_cpus())
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEKIT_CACHE_DIR", str(cache))
    monkeypatch.delenv("EDGEKIT_THREAD_PROBE", raising=False)

    def cached():
        return sorted((cache / "threads").glob("*.json")) if (cache / "threads").is_dir() else []

    a = load(bundle, threads=1)                       # the argument wins: nothing measured, nothing cached
    assert (a.threads, a.threads_chosen_by, a.threads_choice) == (1, "argument", None) and not cached()
    monkeypatch.setenv("EDGEKIT_THREAD_PROBE", "0")   # probe off: the ceiling
    off = load(bundle)
    assert (off.threads, off.threads_chosen_by) == (ceiling, "profile") and "not probed" in off.threads_choice["why"]
    assert not cached()
    monkeypatch.delenv("EDGEKIT_THREAD_PROBE")
    first = load(bundle)
    rec = first.threads_choice
    assert first.threads_chosen_by == "probe" and rec["tried"] == candidates(ceiling) == [int(t) for t in
                                                                                        rec["ms_per_token"]]
    assert first.threads == rec["threads"] and all(v > 0 for v in rec["decode_tok_s"].values())
    assert set(rec["prefill_ms"]) == set(rec["ms_per_token"]) and all(v > 0 for v in rec["prefill_ms"].values())
    assert rec["probe_ms"] > 0 and rec["prompt_tokens"] == 16 and "fewest threads" in rec["why"]
    (path,) = cached()
    assert rec["cache"] == str(path) and json.loads(path.read_text())["threads"] == first.threads
    again = load(bundle)
    assert (again.threads, again.threads_chosen_by) == (first.threads, "cache")
    # the cache decides: another count written there is what the next load uses
    other = next(t for t in rec["tried"] if t != first.threads)
    path.write_text(json.dumps(dict(json.loads(path.read_text()), threads=other)))
    forced = load(bundle)
    assert (forced.threads, forced.threads_chosen_by) == (other, "cache")
    assert forced.generate("Count: one", max_new_tokens=8) == first.generate("Count: one", max_new_tokens=8)
    # a measured choice in the manifest comes before the cache and the probe
    chosen = tmp_path / "chosen"
    shutil.copytree(bundle, chosen)
    m = json.loads((chosen / "manifest.json").read_text())
    from edgekit.runtime.threadprobe import machine

    m["runtime"] = {"threads": 1, "threads_choice": {"threads": 1, "tried": candidates(ceiling), "where": "test",
                                                     **machine()}}
    (chosen / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(cache)
    got = load(chosen)
    assert (got.threads, got.threads_chosen_by) == (1, "manifest") and not cached()


def test_no_probe_where_a_second_copy_of_the_model_does_not_fit(bundle, tmp_path, monkeypatch):
    """The load-time probes time a second copy of the model against the first: where the memory available would
    not hold it (a device whose memory holds one copy), neither the thread count nor the spinning is probed,
    nothing is cached, the model loads at the profile's count and says why; with room, the probe runs."""
    import edgekit.runtime.llmopts as opts
    import edgekit.runtime.threads as rthreads
    from edgekit.runtime.llmthreads import TWIN_FACTOR, no_room_for_a_twin

    if rthreads.usable_cpus() < 2:
        monkeypatch.setattr(rthreads, "usable_cpus", lambda cpu_max=None: 2)
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEKIT_CACHE_DIR", str(cache))
    monkeypatch.delenv("EDGEKIT_THREAD_PROBE", raising=False)
    man = json.loads((bundle / "manifest.json").read_text())
    one_copy = TWIN_FACTOR * man["model"]["bytes"] / 2 ** 20
    monkeypatch.setattr(opts, "mem_available_mb", lambda: one_copy)          # room for the copy already open
    assert "second copy of the model" in no_room_for_a_twin(man)
    lm = load(bundle)
    assert lm.threads_chosen_by == "profile" and "second copy of the model" in lm.threads_choice["why"]
    given = load(bundle, threads=2)
    assert given.spinning is None and "second copy of the model" in given.threads_choice["why"]
    assert not (cache / "threads").is_dir() or not list((cache / "threads").glob("*.json"))
    assert lm.generate("Count: one", max_new_tokens=4)
    monkeypatch.setattr(opts, "mem_available_mb", lambda: 100 * one_copy + 1024)
    assert no_room_for_a_twin(man) is None and load(bundle).threads_chosen_by == "probe"
    # a cached choice that needs another open than the first (another count): without room for two copies it is
    # opened after the first is let go, and used
    (path,) = sorted((cache / "threads").glob("*.json"))
    rec = json.loads(path.read_text())
    other = next(t for t in rec["tried"] if t != lm.threads)
    path.write_text(json.dumps(dict(rec, threads=other)))
    monkeypatch.setattr(opts, "mem_available_mb", lambda: one_copy)
    low = load(bundle)
    assert (low.threads, low.threads_chosen_by) == (other, "cache") and "reopen" not in low.threads_choice
    assert low.generate("Count: one", max_new_tokens=4)
    # the same for a given count's cached spinning
    monkeypatch.setattr(opts, "mem_available_mb", lambda: 100 * one_copy + 1024)
    spun = load(bundle, threads=2)
    (spath,) = [q for q in sorted((cache / "threads").glob("*.json")) if q != path]
    srec = json.loads(spath.read_text())
    spath.write_text(json.dumps(dict(srec, spinning_chosen=not spun.spinning)))
    monkeypatch.setattr(opts, "mem_available_mb", lambda: one_copy)
    flipped = load(bundle, threads=2)
    assert flipped.spinning is (not spun.spinning) and "reopen" not in flipped.threads_choice
    assert flipped.generate("Count: one", max_new_tokens=4)


def test_the_probe_times_intra_op_spinning_both_ways_and_the_choice_reaches_every_session(bundle, tmp_path,
                                                                                          monkeypatch):
    """With more than one thread chosen, the probe times the chosen count with ORT's intra-op threads spinning as
    genai_config says and the other way round, keeps the faster (beyond the tolerance), records both figures; a
    cached choice is what the next load opens (lm.spinning), what benchmark() reports, and what the serving
    engine's session gets."""
    import onnxruntime_genai as og

    from edgekit.runtime import llm_batch, llmthreads
    from edgekit.runtime.llm import _og_model
    from edgekit.runtime.llmopts import spinning_of

    mdir = bundle / "model"
    cfg = json.loads((mdir / "genai_config.json").read_text())
    configured = spinning_of(cfg)
    opened = {}

    def open_at(t, spin=None):
        m = _og_model(og, mdir, t, spin)
        opened[id(m)] = (t, spin)
        return m

    base = open_at(2)
    rec = {}
    ids = llmthreads.probe_ids(bundle, 512)
    got = llmthreads._spinning(og, open_at, base, 2, configured, ids, 0, rec)
    assert isinstance(rec["spinning_chosen"], bool) and set(rec["spinning_ms_per_token"]) == {"on", "off"}
    assert all(v > 0 for v in rec["spinning_ms_per_token"].values()) and "2 threads" in rec["spinning_why"]
    ms = rec["spinning_ms_per_token"]
    faster_other = ms["on" if not configured else "off"] < ms["on" if configured else "off"] * 0.98
    assert rec["spinning_chosen"] == (configured ^ faster_other)
    assert opened[id(got)] == ((2, None) if rec["spinning_chosen"] == configured else (2, not configured))

    # a cached choice of the other way round: opened so, reported, and handed to the batching engine
    import edgekit.runtime.threads as rthreads

    monkeypatch.setattr(rthreads, "usable_cpus", lambda cpu_max=None: 2)
    monkeypatch.setenv("EDGEKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGEKIT_THREAD_PROBE", raising=False)
    first = load(bundle)
    (path,) = sorted((tmp_path / "cache" / "threads").glob("*.json"))
    path.write_text(json.dumps(dict(json.loads(path.read_text()), threads=2, spinning_chosen=not configured)))
    lm2 = load(bundle)
    assert (lm2.threads, lm2.threads_chosen_by, lm2.spinning) == (2, "cache", not configured)
    assert lm2.benchmark(prompt_tokens=8, new_tokens=4, runs=1)["intra_op_spinning"] is (not configured)
    assert lm2.generate("Count: one", max_new_tokens=8) == first.generate("Count: one", max_new_tokens=8)
    from edgekit.runtime.llm import load_llm

    asked = load_llm(bundle, threads=2, spinning=configured)   # the argument wins over the cache
    assert asked.spinning is configured and asked.benchmark(prompt_tokens=8, new_tokens=4,
                                                            runs=1)["intra_op_spinning"] is configured
    seen = []
    real = llm_batch.BatchedDecoder.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get("spinning"))
        return real(self, *a, **kw)

    monkeypatch.setattr(llm_batch.BatchedDecoder, "__init__", spy)
    rel = llm_batch.load_llm_release("t", "0" * 64, bundle, threads=None, check=False, max_sequences=2,
                                     max_queue=2, kv_cache_mb=None)
    try:
        assert seen == [not configured]
    finally:
        rel.engine.retire()
        rel.engine.join(10)


def test_a_given_thread_count_still_gets_its_spinning_measured_and_cached(bundle, tmp_path, monkeypatch):
    """load_llm(threads=2) keeps the caller's count but times ORT's intra-op spinning both ways at it (the
    probe's own comparison), caches the choice for these files and this CPU, and opens the model that way; the
    next load reads the cache; spinning= and EDGEKIT_THREAD_PROBE=0 skip the measurement."""
    import edgekit.runtime.threads as rthreads
    from edgekit.runtime.llm import load_llm
    from edgekit.runtime.llmopts import spinning_of

    configured = spinning_of(json.loads((bundle / "model" / "genai_config.json").read_text()))
    monkeypatch.setattr(rthreads, "usable_cpus", lambda cpu_max=None: 2)
    monkeypatch.setenv("EDGEKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGEKIT_THREAD_PROBE", raising=False)
    lm = load_llm(bundle, threads=2)
    rec = lm.threads_choice
    assert (lm.threads, lm.threads_chosen_by) == (2, "argument")
    assert isinstance(rec["spinning_chosen"], bool) and set(rec["spinning_ms_per_token"]) == {"on", "off"}
    assert all(v > 0 for v in rec["spinning_ms_per_token"].values()) and "2 threads" in rec["spinning_why"]
    assert lm.spinning is rec["spinning_chosen"]
    assert lm.benchmark(prompt_tokens=8, new_tokens=4, runs=1)["intra_op_spinning"] is lm.spinning
    (path,) = sorted((tmp_path / "cache" / "threads").glob("*.json"))
    assert json.loads(path.read_text())["spinning_chosen"] is rec["spinning_chosen"]

    path.write_text(json.dumps(dict(json.loads(path.read_text()), spinning_chosen=not configured)))
    again = load_llm(bundle, threads=2)
    assert again.threads_choice["cache"] == str(path) and again.spinning is (not configured)
    assert again.generate("Count: one", max_new_tokens=8) == lm.generate("Count: one", max_new_tokens=8)

    assert load_llm(bundle, threads=2, spinning=configured).spinning is configured   # the argument wins
    monkeypatch.setenv("EDGEKIT_CACHE_DIR", str(tmp_path / "cache2"))
    monkeypatch.setenv("EDGEKIT_THREAD_PROBE", "0")
    off = load_llm(bundle, threads=2)
    assert off.spinning is None and "EDGEKIT_THREAD_PROBE=0" in off.threads_choice["why"]
    assert not (tmp_path / "cache2" / "threads").exists()
    assert load_llm(bundle, threads=1).threads_choice is None   # one thread: nothing spins, nothing timed

    # a model too slow to probe is said so, cached, and not timed again at the next load
    from edgekit.runtime import llmthreads

    monkeypatch.setenv("EDGEKIT_CACHE_DIR", str(tmp_path / "cache3"))
    monkeypatch.delenv("EDGEKIT_THREAD_PROBE", raising=False)
    monkeypatch.setattr(llmthreads, "PROBE_MAX_TOKEN_MS", 0.0)
    slow = load_llm(bundle, threads=2)
    assert slow.threads_choice["skipped"] and "spinning not probed" in slow.threads_choice["why"]
    assert slow.spinning is None and "cache" in slow.threads_choice
    timed = []
    monkeypatch.setattr(llmthreads, "decode_token_ms", lambda *a, **k: timed.append(1) or [1.0])
    again = load_llm(bundle, threads=2)
    assert again.threads_choice["cache"] == slow.threads_choice["cache"] and not timed


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(lm):
    a = lm.generate("The red train", max_new_tokens=24)
    assert a and a == lm.generate("The red train", max_new_tokens=24)
    assert lm.last["new_tokens"] == 24 and lm.last["finish_reason"] == "length"
    assert lm.last["prompt_tokens"] == len(lm.encode("The red train")) == lm.last["prefill_tokens"]
    s1 = [lm.generate("Count: one", max_new_tokens=24, temperature=1.0, seed=s) for s in (1, 1, 2, 3)]
    assert s1[0] == s1[1]                        # the same seed, the same text
    assert len(set(s1[1:])) > 1                   # other seeds, other text
    # top_k=1 samples the argmax: greedy's text whatever the seed
    assert lm.generate("The red train", max_new_tokens=24, temperature=1.0, top_k=1, seed=5) == a


def test_prompt_is_prefilled_in_chunks_with_the_same_result(lm, monkeypatch):
    import edgekit.runtime.llm as rl

    prompt = "The red train goes to the lamp and the blue cat sits by the door. " * 2
    n = len(lm.encode(prompt))
    orig, calls = lm._generator, []

    class Spy:
        def __init__(self, gen):
            self.gen = gen

        def append_tokens(self, ids):
            calls.append(len(ids))
            self.gen.append_tokens(ids)

        def __getattr__(self, name):
            return getattr(self.gen, name)

    monkeypatch.setattr(lm, "_generator", lambda *a, **k: Spy(orig(*a, **k)))
    monkeypatch.setattr(rl, "PREFILL_CHUNK", 10_000)
    whole = lm.generate(prompt, max_new_tokens=16)
    assert calls == [n] and whole
    ids_whole = lm.last["token_ids"]
    calls.clear()
    monkeypatch.setattr(rl, "PREFILL_CHUNK", 7)
    assert lm.generate(prompt, max_new_tokens=16) == whole
    assert calls == [7] * (n // 7) + ([n % 7] if n % 7 else []) and n > 14
    assert lm.last["prompt_tokens"] == n and lm.last["token_ids"] == ids_whole


def test_genai_config_carries_the_profiles_spinning_choice(og_dir, tmp_path):
    from edgekit.convert.llm import _tune_genai_config
    from edgekit.targets import load_target

    so = json.loads((og_dir / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert load_target("x86-avx2").llm.intra_op_spinning is False
    assert so["session.intra_op.allow_spinning"] == "0"          # the x86-avx2 bundle of the fixture
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {}}, "search": {}}))
    t = load_target("rpi5")
    _tune_genai_config(tmp_path, t, 512)
    so = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert so["session.intra_op.allow_spinning"] == ("1" if t.llm.intra_op_spinning else "0")
    assert so["intra_op_num_threads"] == t.runtime.threads


def test_stop_strings_and_streaming(lm):
    full = lm.generate("The red train", max_new_tokens=40)
    pieces = list(lm.generate("The red train", max_new_tokens=40, stream=True))
    assert len(pieces) > 5 and "".join(pieces) == full
    # a stop string in the middle of the text: the text ends before it, streamed or not, and is not returned
    word = full.split()[3]
    cut = full[:full.index(word)]
    assert lm.generate("The red train", max_new_tokens=40, stop=word) == cut
    assert lm.last["finish_reason"] == "stop"
    assert "".join(lm.generate("The red train", max_new_tokens=40, stop=[word, "zzz"], stream=True)) == cut
    assert lm.generate("The red train", max_new_tokens=40, stop="never appears") == full
    with pytest.raises(DataError, match="top_p"):
        lm.generate("x", top_p=0.0)
    with pytest.raises(DataError, match="context"):
        lm.generate("one " * 600)


def test_chat_applies_the_bundles_template(lm):
    rendered = lm.apply_chat_template(QUESTION)
    assert rendered == "<|im_start|>user\nWhat colour is the lamp?<|im_end|>\n<|im_start|>assistant\n"
    reply = lm.chat(QUESTION, max_new_tokens=30)
    assert lm.last["prompt_tokens"] == len(lm.prompt_ids(QUESTION))
    assert lm.last["finish_reason"] == "stop"           # the tiny model learned to end its answer (<|im_end|>)
    assert reply == lm.generate(rendered, max_new_tokens=30)   # the same tokens (no BOS in this tokenizer)
    assert reply != lm.generate("What colour is the lamp?", max_new_tokens=30)


def test_threads_share_one_tokenizer_per_variant(og_dir, monkeypatch):
    """The templated (and the decoding) tokenizer is a second copy of the vocabulary, made on first use: threads
    asking for it at once get one copy (four chats on a fresh load made four: +180 MiB each on Gemma 3)."""
    import threading
    import time

    from edgekit.runtime.llm import Tokenizer

    tok = Tokenizer(onnxruntime_genai, str(og_dir), onnxruntime_genai.Tokenizer(str(og_dir)))
    made, make = [], tok._make

    def slow():
        made.append(threading.current_thread().name)
        time.sleep(0.2)                      # the others arrive while the first is still parsing tokenizer.json
        return make()

    monkeypatch.setattr(tok, "_make", slow)
    barrier, got = threading.Barrier(4), []

    def ask():
        barrier.wait()
        got.append((tok._variant("add_special_tokens"), tok.encode_templated("<|im_start|>user\nhi<|im_end|>")))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 4 and len(made) == 1
    assert all(v is got[0][0] for v, _ in got) and all(ids == got[0][1] for _, ids in got)
    assert tok._variant("add_special_tokens") is got[0][0] and len(made) == 1


def test_conversation_carries_the_kv_cache(lm):
    conv = lm.conversation()
    r1 = conv.say("What colour is the lamp?", max_new_tokens=30)
    first = conv.last["prefill_tokens"]
    assert first == len(lm.prompt_ids(QUESTION)) and conv.last["reprefill"] is False
    in_cache = conv.token_count
    r2 = conv.say("What colour is the box?", max_new_tokens=30)
    history = conv.messages[:-1]
    full = lm.prompt_ids(history)
    # turn 2 ran only its own tokens: the end of reply 1 and the new message, not the history again
    assert conv.last["prefill_tokens"] == len(full) - in_cache
    assert conv.last["prefill_tokens"] < len(full) - first
    assert conv.last["rewound_to"] is None
    # the same reply as a fresh chat over the whole history (greedy)
    assert r2 == lm.chat(history, max_new_tokens=30)
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[1]["content"] == r1
    # a template that renders history differently: the cache is rewound to the common prefix, not rebuilt
    conv._text = "something else"
    r3 = conv.say("What colour is the clock?", max_new_tokens=30)
    assert 0 < conv.last["rewound_to"] <= conv.token_count
    assert r3 == lm.chat(conv.messages[:-1], max_new_tokens=30)
    # other sampling options start a new cache
    conv.say("And the door?", max_new_tokens=8, temperature=0.7, seed=1)
    assert conv.last["reprefill"] == "sampling options changed"
    conv.reset()
    assert conv.messages == [] and conv.token_count == 0


def test_conversation_drops_old_turns_when_the_context_is_full(lm):
    conv = lm.conversation(system="You answer colours.", max_new_tokens=8)
    long = "Count: " + " ".join(["one two three four five six seven eight nine ten"] * 8)
    why = []
    for _ in range(6):
        conv.say(long)
        why.append(conv.last["reprefill"])
        assert conv.token_count <= lm.context
    assert conv.turns == 6 and conv.messages[0]["role"] == "system"
    assert len(conv.messages) < 1 + 2 * 6              # the oldest turns went
    assert why[0] is False and "context full: the oldest turns were dropped" in why
    # a message that cannot fit: an error, and the conversation goes on from its history
    before = list(conv.messages)
    with pytest.raises(DataError, match="does not fit"):
        conv.say("one " * 600)
    assert conv.messages == before
    conv.say("What colour is the lamp?")
    assert conv.last["reprefill"]                                   # the whole history, prefilled again
    assert conv.messages[:-2] == before or conv.last["reprefill"].startswith("context full")
    assert conv.messages[-2] == {"role": "user", "content": "What colour is the lamp?"}
    assert [m["role"] for m in conv.messages] == ["system"] + ["user", "assistant"] * ((len(conv.messages) - 1) // 2)


def test_benchmark_reports_sane_figures(lm):
    r = lm.benchmark(prompt_tokens=48, new_tokens=16, runs=2, warmup=1)
    assert r["kind"] == "llm" and r["prompt_tokens"] == 48 and r["new_tokens"] == 16 and len(r["per_run"]) == 2
    for run in r["per_run"]:
        assert 0 < run["prefill_ms"] < run["ttft_ms"]
        assert run["decode_tok_s"] > 0 and run["prefill_tok_s"] > 0
    assert r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
    assert r["decode_token_ms"]["count"] == 2 * 15
    assert r["peak_rss_mb"] >= r["rss_mb"] > 0 and r["load_ms"] == lm.load_ms
    # the load's parts: the files hashed (a bundle with a manifest), the thread count chosen; within the load
    assert r["load_verify_ms"] == lm.verify_ms > 0 and r["load_probe_ms"] == lm.probe_ms >= 0
    assert lm.verify_ms + lm.probe_ms < lm.load_ms
    assert load(lm.model_dir, threads=1).verify_ms == 0.0   # a bare ONNX Runtime GenAI folder: no manifest
    assert r["model_bytes"] == sum(f["bytes"] for rel, f in lm.manifest["model"]["files"].items()
                                   if rel.startswith("model.onnx")) < lm.manifest["model"]["bytes"]
    assert r["kv_bytes"] == lm.kv_bytes_per_token() * 64 and r["kv_bytes_per_token"] == 2 * 4 * 2 * 32 * 4
    c = r["conditions"]
    assert c["threads"] == lm.threads and c["onnxruntime_genai"] == lm.backend_version and "loadavg" in c
    with pytest.raises(DataError, match="context"):
        lm.benchmark(prompt_tokens=500, new_tokens=100)


def test_check_passes_on_the_bundle_and_fails_when_tampered(lm, bundle, tmp_path):
    res = lm.check()
    assert res["ok"] and res["top1_agreement"] == 1.0 and res["snr_db"] > 60
    assert res["text"] and res["text_matches_golden"] is True and res["positions"] > 40
    # the deploy health check goes through runtime.check.golden_check
    from edgekit.runtime.check import golden_check
    assert golden_check(lm)["ok"]
    bad = tmp_path / "tampered"
    shutil.copytree(bundle, bad)
    data = bad / "model" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    rng = np.random.default_rng(0)
    raw[:] = rng.integers(0, 256, size=len(raw), dtype=np.uint8).tobytes()   # same size, other weights
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256"):
        load(bad)
    res = load(bad, verify=False).check()
    assert not res["ok"] and res["top1_agreement"] < 0.5 and res["snr_db"] < 20


def test_device_side_imports_no_torch_and_checks(bundle):
    """`import edgekit.runtime`, a load, a generation and the check load no torch / transformers / tensorflow;
    the threads reach ONNX Runtime (its intra-op pool grows by threads - 1)."""
    code = f"""
import json, os, sys
from edgekit.runtime import load
def n(): return len(os.listdir('/proc/self/task'))
lm = load({str(bundle)!r}, threads=1); lm.generate('Count: one', max_new_tokens=4)
before = n()
lm4 = load({str(bundle)!r}, threads=4); lm4.generate('Count: one', max_new_tokens=4)
res = lm.check()
heavy = [m for m in ('torch', 'transformers', 'tensorflow', 'onnxruntime') if m in sys.modules]
print(json.dumps({{"heavy": heavy, "ok": res["ok"], "grew": n() - before}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [] and got["ok"] is True
    assert got["grew"] >= 3
    out = subprocess.run([sys.executable, "-m", "edgekit.runtime", "check", str(bundle), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ok"] is True
    # the device's chat, driven through a pipe: each line a message, /reset, /exit (what follows is not read)
    out = subprocess.run([sys.executable, "-m", "edgekit.runtime", "chat", str(bundle), "--verbose"],
                         input="What colour is the lamp?\n/reset\nWhat colour is the lamp?\n/exit\nCount: one\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == second and first                      # after /reset, the same question, the same answer
    assert "(conversation reset)" in out.stderr and out.stderr.count("tokens prefilled") == 2


def test_cli_run_and_bench(bundle):
    from edgekit.cli import cli

    r = CliRunner().invoke(cli, ["run", str(bundle), "--prompt", "What colour is the lamp?", "--json"])
    assert r.exit_code == 0, r.output
    text, figures = r.output.rstrip("\n").rsplit("\n", 1)
    stats = json.loads(figures)
    assert text == stats["text"] and stats["finish_reason"] == "stop" and stats["prompt_tokens"] == 14
    r = CliRunner().invoke(cli, ["run", str(bundle), "--prompt", "Count: one", "--no-template",
                                 "--max-new-tokens", "6"])
    assert r.exit_code == 0 and r.output.strip()
    r = CliRunner().invoke(cli, ["run", str(bundle)])
    assert r.exit_code == 2 and "--prompt" in r.output
    r = CliRunner().invoke(cli, ["bench", str(bundle), "--prompt-tokens", "32", "--new-tokens", "8", "--runs", "2",
                                 "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["kind"] == "llm" and rep["runs"] == 2 and rep["decode_tok_s"] > 0
    r = CliRunner().invoke(cli, ["bench", str(bundle), "--prompt-tokens", "32", "--new-tokens", "8", "--runs", "1"])
    assert r.exit_code == 0 and "decode tok/s" in r.output and "TTFT ms" in r.output


def test_cli_chat_through_stdin_with_reset_exit_and_ctrl_c(bundle, monkeypatch):
    from edgekit.cli import cli

    seen, after_ctrl_c = [], []
    orig = Conversation.say

    def say(self, text, stream=False, **kw):
        seen.append(self)
        it = orig(self, text, stream=stream, **kw)
        if text != "Count: one two":
            return it

        def interrupted():
            # Ctrl-C while the reply streams: a real SIGINT to this process as its second token is detokenized
            # (by token, not by piece: how many pieces a reply streams in is the tiny model's to say, and text a
            # stop string might begin is held back)
            cls = type(self.lm.tokenizer)
            real = cls.stream

            def stream(tok_self):
                detok, count = real(tok_self), [0]

                class Interrupting:
                    def decode(self_, tok):
                        count[0] += 1
                        if count[0] == 2:
                            os.kill(os.getpid(), signal.SIGINT)
                        return detok.decode(tok)
                return Interrupting()

            monkeypatch.setattr(cls, "stream", stream)
            try:
                yield from it
            finally:
                monkeypatch.setattr(cls, "stream", real)
                it.close()
                after_ctrl_c.append((list(self.messages), dict(self.last)))
        return interrupted()

    monkeypatch.setattr(Conversation, "say", say)
    stdin = "What colour is the lamp?\nCount: one two\n/stats\n/reset\nWhat colour is the box?\n/exit\nnever\n"
    # SIGINT as a terminal's `edgekit chat` gets it: Python's KeyboardInterrupt handler. A pytest started as an
    # asynchronous command (`cmd &`) of a non-interactive shell, as a CI run beside other work may be, inherits
    # SIGINT ignored (POSIX); Python then installs no handler and the kernel drops the kill (the reply ran to its
    # 40 tokens in two such whole-suite runs, while this file's foreground runs passed)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        r = CliRunner().invoke(cli, ["chat", str(bundle), "--max-new-tokens", "40"], input=stdin)
    finally:
        if before is not None:   # None: a handler not installed from Python, which cannot be put back from here
            signal.signal(signal.SIGINT, before)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "(reply stopped)" in out and "(conversation reset)" in out
    assert "tokens prefilled" in out                               # /stats
    conv = seen[0]
    assert all(c is conv for c in seen)                             # one conversation throughout
    # the stopped reply stays in the history as far as it went
    (history, last), = after_ctrl_c
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert last["finish_reason"] == "interrupted" and 2 <= last["new_tokens"] < 40
    assert history[-1]["content"] == last["text"] and history[-1]["content"] in out
    # after the reset only the last exchange is left; the answer is the model's to that question alone
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[1]["content"] in out
    assert conv.messages[1]["content"] == load(bundle).chat([{"role": "user", "content": "What colour is the box?"}],
                                                            max_new_tokens=40)
    assert "never" not in [m["content"] for m in conv.messages]


def test_report_shows_the_language_model(build, bundle, lm):
    from edgekit.report import build_report
    from edgekit.report.collect import collect

    rep = lm.benchmark(prompt_tokens=32, new_tokens=8, runs=1, warmup=0)
    (build / "bench").mkdir()
    (build / "bench" / "here.json").write_text(json.dumps(rep))
    data = collect(build)
    (m,) = data.models
    (b,) = m.bundles
    fid = lm.manifest["fidelity"]
    assert m.is_llm and b.agreement == fid["top1_agreement"] and b.llm["bytes_per_token"] > 0
    assert [r["decode_tok_s"] for r in b.llm_runs] == [rep["decode_tok_s"]] and not data.skipped
    html = build_report(build)
    assert "(language model)" in html and "decode tok/s" in html and "Rescue ladder" in html
    assert f"{fid['ppl']:.4g}" in html and f"{rep['ttft_ms']:.4g}" in html


def test_cli_samples_as_the_model_says_unless_told(og_dir, tmp_path):
    """edgekit run / chat take the checkpoint's own sampling settings (genai_config's search section, from its
    generation_config.json) where no option is given; the API's default stays greedy."""
    from edgekit.cli import cli

    folder = tmp_path / "sampling"
    shutil.copytree(og_dir, folder)
    cfg = json.loads((folder / "genai_config.json").read_text())
    cfg["search"].update(do_sample=True, temperature=1.5, top_p=1.0, top_k=0, repetition_penalty=1.0)
    (folder / "genai_config.json").write_text(json.dumps(cfg))
    m = load(folder)
    assert m.generation_defaults == {"temperature": 1.5, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    greedy = m.generate("Count: one", max_new_tokens=24)

    def run(*extra):
        r = CliRunner().invoke(cli, ["run", str(folder), "--prompt", "Count: one", "--no-template",
                                     "--max-new-tokens", "24", *extra])
        assert r.exit_code == 0, r.output
        return r.stdout.rstrip("\n")   # the answer (a reply cut at 24 tokens says so on stderr)

    assert len({run("--seed", str(s)) for s in range(4)}) > 1        # sampled, as the model's settings say
    assert run("--temperature", "0") == greedy


class _Gen:
    """An onnxruntime_genai.Generator with a hook after generate_next_token (a Python object, so weakrefs work)."""

    def __init__(self, gen, after=None):
        self._g, self._after, self.steps = gen, after, 0

    def generate_next_token(self):
        self._g.generate_next_token()
        self.steps += 1
        if self._after is not None:
            self._after(self)

    def __getattr__(self, name):
        return getattr(self._g, name)


def test_ctrl_c_as_a_token_is_made_leaves_the_cache_as_the_history_says(lm, monkeypatch):
    """Ctrl-C lands when generate_next_token returns, before the loop records the token: the generator holds a
    token the reply does not. The cache must be rewound to the reply, so the next turn sees what the history says."""
    orig = lm._generator
    armed = {"at": 3}

    def interrupt(g):
        if g.steps == armed["at"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(lm, "_generator", lambda *a, **k: _Gen(orig(*a, **k), interrupt))
    conv = lm.conversation(max_new_tokens=30)
    with pytest.raises(KeyboardInterrupt):
        for _ in conv.say("What colour is the lamp?", stream=True):
            pass
    s = conv.last
    assert s["finish_reason"] == "interrupted" and len(s["token_ids"]) == 2
    seq = [int(t) for t in conv._gen.get_sequence(0)]
    assert len(seq) == s["prompt_tokens"] + len(s["token_ids"])          # not one token more
    assert seq[s["prompt_tokens"]:] == s["token_ids"]
    assert conv.messages[-1] == {"role": "assistant", "content": s["text"]}
    armed["at"] = None
    r2 = conv.say("What colour is the box?", max_new_tokens=30)
    assert conv.last["reprefill"] is False and conv.last["rewound_to"] is None
    assert conv.last["carry_ms"] is None     # the reply's last token ran when the rewound one was sampled
    assert r2 == lm.chat(conv.messages[:-1], max_new_tokens=30)   # as a fresh chat over the history says


class _Timed(_Gen):
    """A generator whose model runs advance a fake clock (runtime.llm's time.perf_counter_ns): get_logits 7 ms,
    append_tokens 100 ms, generate_next_token 1 ms; the calls recorded, and after each append the sequence and the
    logits it gave."""

    def __init__(self, gen, clock, calls):
        super().__init__(gen)
        self._clock, self.calls, self.appended = clock, calls, []

    def _run(self, name, ms, *args):
        self.calls.append(name)
        self._clock[0] += int(ms * 1e6)
        return getattr(self._g, name)(*args)

    def get_logits(self):
        return self._run("get_logits", 7)

    def append_tokens(self, ids):
        self._run("append_tokens", 100, ids)
        self.appended.append(([int(t) for t in self._g.get_sequence(0)], np.asarray(self._g.get_logits()).ravel()))

    def generate_next_token(self):
        self._run("generate_next_token", 1)


def test_a_turn_after_a_cut_reply_runs_its_last_token_apart(lm, monkeypatch):
    """A reply cut by max_new_tokens (a stop string, its consumer) ends with a token ONNX Runtime GenAI sampled and
    has not run; 0.18's append_tokens does not run it either, so the next turn's cache had an unwritten slot there
    (on the tiny LM the next logits were 0.1 to 1.9 off teacher forcing of the same tokens). It runs first, timed
    apart as carry_ms;
    prefill_ms times the prefill_tokens alone (ttft_ms both). A reply ended by the model's end of sequence leaves
    none. Timed by a fake clock that only the model's runs advance: no figure depends on the machine."""
    from types import SimpleNamespace

    from edgekit.runtime import llm as llm_mod

    clock, calls, gens = [0], [], []
    monkeypatch.setattr(llm_mod, "time", SimpleNamespace(perf_counter_ns=lambda: clock[0]))
    orig = lm._generator
    monkeypatch.setattr(lm, "_generator", lambda *a, **k: gens.append(_Timed(orig(*a, **k), clock, calls)) or gens[-1])

    def chunks(n):
        return -(-n // llm_mod.PREFILL_CHUNK)

    conv = lm.conversation(max_new_tokens=30)
    conv.say("What colour is the lamp?", max_new_tokens=3)
    s1 = conv.last
    assert s1["finish_reason"] == "length" and s1["carry_ms"] is None and "get_logits" not in calls
    assert s1["prefill_ms"] == 100.0 * chunks(s1["prefill_tokens"])
    del calls[:]
    conv.say("What colour is the box?")
    s2 = conv.last
    assert len(gens) == 1 and s2["reprefill"] is False and s2["rewound_to"] is None
    assert calls[:2] == ["get_logits", "append_tokens"] and calls.count("get_logits") == 1
    assert s2["carry_ms"] == 7.0 and s2["prefill_ms"] == 100.0 * chunks(s2["prefill_tokens"])
    assert s2["ttft_ms"] == s2["carry_ms"] + s2["prefill_ms"] + 1.0
    # the cache after the turn's prefill is the one teacher forcing of its tokens gives (the cut reply's last too)
    seq, got = conv._gen.appended[-1]
    assert np.abs(got - lm.logits(seq)[-1]).max() < 1e-3
    # the model ended that reply itself (its end of sequence is out of the cache): nothing left to run
    assert s2["finish_reason"] == "stop"
    del calls[:]
    conv.say("What colour is the clock?")
    assert "get_logits" not in calls and conv.last["carry_ms"] is None
    # a reply its consumer stopped reading also ends with a sampled token; a fresh cache has none
    for _ in conv.say("What colour is the cup?", stream=True):
        break
    del calls[:]
    conv.say("And the pen?")
    assert calls.count("get_logits") == 1 and conv.last["carry_ms"] == 7.0
    seq, got = conv._gen.appended[-1]
    assert np.abs(got - lm.logits(seq)[-1]).max() < 1e-3
    conv.reset()
    conv.say("What colour is the lamp?")
    assert conv.last["carry_ms"] is None


def test_a_streamed_turn_never_started_leaves_the_conversation_whole(lm):
    conv = lm.conversation(max_new_tokens=30)
    conv.say("What colour is the lamp?")
    before = list(conv.messages)
    it = conv.say("What colour is the box?", stream=True)
    del it                                  # never iterated: its reply never ran, nor its bookkeeping
    assert conv.messages == before and conv.turns == 1
    r = conv.say("What colour is the clock?")
    assert conv.last["reprefill"]           # the history prefilled again, not a cache holding a phantom turn
    assert r == lm.chat(conv.messages[:-1], max_new_tokens=30)


def test_a_stream_left_open_is_cut_by_the_next_turn_and_stopped_by_reset(lm):
    """A streamed reply enters the history when its stream ends, closed or let go. A say() while it is still open
    ends it there (kept as cut, as closing it would) and then runs its own turn; a stream's bookkeeping never runs
    after reset() or a later turn (it brought a forgotten turn back into messages and the KV cache)."""
    import gc

    lamp, box, door = "What colour is the lamp?", "What colour is the box?", "What colour is the door?"
    conv = lm.conversation(max_new_tokens=30)
    it = conv.say(lamp, stream=True)
    first = next(it)
    rb = conv.say(box)
    assert [m["content"] for m in conv.messages] == [lamp, first, box, rb] and conv.turns == 2
    assert rb == lm.chat(conv.messages[:-1], max_new_tokens=30)     # the box turn followed the cut lamp reply
    assert list(it) == []                      # the old stream is over: nothing more, no bookkeeping
    del it
    gc.collect()
    assert [m["content"] for m in conv.messages] == [lamp, first, box, rb] and conv.turns == 2
    rd = conv.say(door)
    assert conv.last["reprefill"] is False                           # the cache went on from the history ...
    assert rd == lm.chat(conv.messages[:-1], max_new_tokens=30)      # ... and holds what it says
    # a stream never started, then another turn: the first is closed unsaid and never runs later
    before = list(conv.messages)
    it = conv.say(lamp, stream=True)
    rb = conv.say(box)
    assert list(it) == []
    assert conv.messages == before + [{"role": "user", "content": box}, {"role": "assistant", "content": rb}]
    assert conv.turns == 4
    # reset() while a reply streams: the reply stops, and closing or letting go of its stream brings nothing back
    it = conv.say(door, stream=True)
    next(it)
    conv.reset()
    assert conv.messages == [] and conv.token_count == 0 and conv.turns == 0
    it.close()
    del it
    gc.collect()
    assert conv.messages == [] and conv.token_count == 0 and conv.turns == 0 and conv._kv == []
    r = conv.say(door)
    assert conv.last["reprefill"] is False and conv.turns == 1
    assert r == lm.chat([{"role": "user", "content": door}], max_new_tokens=30)


def test_a_say_while_another_thread_reads_the_reply_is_one_line(lm, monkeypatch):
    """A conversation takes one turn at a time: a say() (or reset()) while another thread is inside the previous
    reply's stream is refused (closing it there would raise "generator already executing"), and that reply ends
    as usual."""
    import threading

    inside, go, main = threading.Event(), threading.Event(), threading.current_thread()

    def hold(g):
        if g.steps == 2 and threading.current_thread() is not main:   # the reader, inside the reply's stream
            inside.set()
            assert go.wait(30)

    orig = lm._generator
    monkeypatch.setattr(lm, "_generator", lambda *a, **k: _Gen(orig(*a, **k), hold))
    conv = lm.conversation(max_new_tokens=30)
    it = conv.say("What colour is the lamp?", stream=True)
    next(it)
    reader = threading.Thread(target=lambda: list(it))
    reader.start()
    try:
        assert inside.wait(30)
        with pytest.raises(DataError, match="still being streamed"):
            conv.say("What colour is the box?")
        with pytest.raises(DataError, match="still being streamed"):
            conv.reset()
    finally:
        go.set()
        reader.join(30)
    assert conv.turns == 1 and conv.messages[-1]["content"] == conv.last["text"]
    assert conv.messages[0]["content"] == "What colour is the lamp?"


def test_a_turn_keeps_room_for_its_reply_or_drops_old_turns(lm):
    conv = lm.conversation(max_new_tokens=40)
    long = "Count: " + " ".join(["one two three four five six seven eight nine ten"] * 3)
    room = min(40, lm.context // 4)
    why = []
    for _ in range(8):
        conv.say(long)
        why.append(conv.last["reprefill"])
        assert lm.context - conv.last["prompt_tokens"] >= room, conv.last
    assert any("context full" in (w or "") for w in why), why     # the room came from dropping old turns


def test_generation_options_refuse_nan_infinity_and_seeds_beyond_32_bits(lm):
    for bad in ({"temperature": float("nan")}, {"temperature": float("inf")}, {"repetition_penalty": float("nan")},
                {"top_p": float("nan")}, {"seed": 2 ** 31}, {"seed": True}, {"temperature": "hot"}):
        with pytest.raises(DataError):
            lm.generate("Count: one", max_new_tokens=2, **bad)
    assert lm.generate("Count: one", max_new_tokens=2, temperature=0.5, seed=2 ** 31 - 1)


def test_a_bundle_without_a_chat_template_says_so_once(og_dir, tmp_path):
    from edgekit.cli import cli

    bare = tmp_path / "base"
    shutil.copytree(og_dir, bare)
    (bare / "chat_template.jinja").unlink()
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    base = load(bare)
    assert not base.has_chat_template
    with pytest.raises(DataError, match="no chat template"):
        base.conversation()
    with pytest.raises(DataError, match="no chat template"):
        base.chat(QUESTION)
    assert base.generate("Count: one", max_new_tokens=4)        # plain text still runs
    r = CliRunner().invoke(cli, ["chat", str(bare)], input="hello\n")
    assert r.exit_code == 2 and "no chat template" in r.output and "Traceback" not in r.output
    assert r.output.count("no chat template") == 1


def test_spinning_measured_on_the_device_is_what_the_load_applies(bundle, tmp_path, monkeypatch):
    """convert --select fastest --device records the device's threads and spinning; a load takes both."""
    import edgekit.runtime.llm as rl

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    man = json.loads((copy / "manifest.json").read_text())
    from edgekit.runtime.threadprobe import machine

    man.setdefault("runtime", {})["threads_choice"] = {"threads": 2, "tried": [1, 2, 64], "spinning_chosen": True,
                                                       **machine()}   # the device's own load measured it
    (copy / "manifest.json").write_text(json.dumps(man))
    seen = []
    orig = rl._og_model
    monkeypatch.setattr(rl, "_og_model", lambda og, d, t, spin=None: seen.append((t, spin)) or orig(og, d, t, spin))
    lm2 = load(copy, verify=False)
    assert lm2.threads_chosen_by == "manifest"
    if lm2.threads > 1:                      # (a 1-CPU machine runs one thread: nothing spins)
        assert seen == [(2, True)] and lm2.spinning is True


def test_benchmark_frees_each_runs_cache_and_counts_a_windows_cache(lm, monkeypatch):
    import weakref

    orig = lm._generator
    made = []

    def make(*a, **k):
        assert all(r() is None for r in made), "a run's generator outlived it (two KV caches at once)"
        g = _Gen(orig(*a, **k))
        made.append(weakref.ref(g))
        return g

    monkeypatch.setattr(lm, "_generator", make)
    r = lm.benchmark(prompt_tokens=16, new_tokens=4, runs=2, warmup=1)
    assert len(made) == 3 and r["kv_positions"] == 20
    # a sliding-window model's generator holds at least its window: the memory bound counts what it holds
    monkeypatch.setitem(lm.genai_config["model"]["decoder"], "sliding_window", {"window_size": 100})
    made.clear()
    r = lm.benchmark(prompt_tokens=16, new_tokens=4, runs=1, warmup=0)
    assert r["kv_positions"] == 100 and r["kv_bytes"] == 100 * r["kv_bytes_per_token"]


def test_cli_bench_frees_one_model_before_loading_the_next(bundle, monkeypatch):
    import weakref

    import edgekit.runtime as rt
    from edgekit.cli import cli

    orig, loaded = rt.load, []

    def spy(*a, **k):
        assert all(r() is None for r in loaded), "the previous model is still alive at the next load"
        m = orig(*a, **k)
        loaded.append(weakref.ref(m))
        return m

    monkeypatch.setattr(rt, "load", spy)
    r = CliRunner().invoke(cli, ["bench", str(bundle), str(bundle), "--prompt-tokens", "16", "--new-tokens", "4",
                                 "--runs", "1", "--warmup", "0", "--json"])
    assert r.exit_code == 0, r.output
    reps = json.loads(r.output.strip().splitlines()[-1])
    assert len(loaded) == 2 and len(reps) == 2


def test_device_cli_ctrl_c_while_loading_is_one_line(bundle, monkeypatch, capsys):
    import edgekit.runtime.__main__ as dev

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dev, "_dispatch", interrupted)
    assert dev.main(["bench", str(bundle)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted" and "Traceback" not in err


def test_a_prompt_over_the_context_in_use_says_how_to_raise_it(bundle):
    """The context a bundle opens with is the profile's default, below its longest: a prompt (or a benchmark) that
    does not fit says the context in use, the model's longest and --context, not 'the model's context'."""
    lm = load(bundle)
    lm.context = 8   # below the model's longest, as a profile's default context is (rpi5: 2048 of 8192)
    with pytest.raises(DataError) as e:
        lm.generate("the lamp is on the table by the door and the cat sleeps", max_new_tokens=4)
    assert f"the context in use is 8 tokens (this model takes up to {lm.max_context})" in str(e.value)
    assert f"raise it with --context N (lm.context = N) up to {lm.max_context}" in e.value.hint
    with pytest.raises(DataError) as e:
        lm.benchmark(prompt_tokens=8, new_tokens=4, runs=1)
    assert "do not fit: the context in use is 8 tokens (this model takes up to" in str(e.value) \
        and "--context N" in e.value.hint
    with pytest.raises(DataError) as e:   # a chat turn that does not fit says the same
        lm.conversation().say("the lamp is on the table by the door and the cat sleeps", max_new_tokens=2)
    assert "does not fit: the context in use is 8 tokens" in str(e.value) and "--context N" in e.value.hint
    lm.context = lm.max_context
    with pytest.raises(DataError) as e:
        lm.benchmark(prompt_tokens=lm.max_context, new_tokens=4, runs=1)
    assert "this model takes up to" not in str(e.value) and "--context" not in (e.value.hint or "")


def test_a_prompt_longer_than_the_models_longest_context_is_not_offered_more(bundle):
    """--context is offered only where the prompt and one new token fit the model's longest context; a longer prompt
    (or chat message) says it must be shortened, from the API and from `edgekit run --context`."""
    from edgekit.cli import cli

    lm = load(bundle, threads=1)
    lm.context = 8
    longest = lm.max_context
    with pytest.raises(DataError) as e:          # the prompt and one new token fill the longest context: offered
        lm._fit(longest - 1, 4)
    assert f"raise it with --context N (lm.context = N) up to {longest}" in e.value.hint
    with pytest.raises(DataError) as e:          # no room for one new token even there: not offered
        lm._fit(longest, 4)
    assert str(e.value).startswith(f"the prompt is {longest} tokens, longer than this model's longest context "
                                   f"({longest} tokens") and "--context N" not in e.value.hint \
        and "must be shortened" in e.value.hint
    long = " ".join(["one two three four five six seven eight nine ten"] * (longest // 10 + 2))
    assert len(lm.encode(long)) > longest
    with pytest.raises(DataError) as e:
        lm.generate(long, max_new_tokens=4)
    assert "longer than this model's longest context" in str(e.value) and "--context N" not in e.value.hint
    with pytest.raises(DataError) as e:
        lm.conversation().say(long, max_new_tokens=2)
    assert "does not fit" in str(e.value) and "longer than this model's longest context" in str(e.value) \
        and "--context N" not in e.value.hint
    r = CliRunner().invoke(cli, ["run", str(bundle), "--prompt", long, "--no-template", "--context", "8"])
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert "must be shortened" in r.output and "--context N" not in r.output


@pytest.mark.parametrize("edit, key, said", [
    (lambda m: m.update(target="x86-avx2"), "target", "'x86-avx2', not an object"),
    (lambda m: m["llm"].update(context_default="big"), "llm.context_default", "'big', not a positive integer"),
    (lambda m: m["llm"].update(context_max=True), "llm.context_max", "True, not a positive integer"),
    (lambda m: m["target"]["runtime"].update(threads="4"), "target.runtime.threads", "'4', not a positive integer"),
    (lambda m: m["llm"].update(kv_bytes_per_token=2048.5), "llm.kv_bytes_per_token", "2048.5, not a positive"),
    (lambda m: m["model"]["files"].update({"tokenizer.json": "x"}), "model.files['tokenizer.json']", "'x', not an"),
    (lambda m: m.update(model=["model"]), "model", "['model'], not an object"),
], ids=["target", "context_default", "context_max", "threads", "kv_bytes_per_token", "files", "model"])
def test_a_manifest_with_a_wrong_type_is_one_line_naming_the_file_and_the_key(bundle, tmp_path, edit, key, said):
    """A hand-edited manifest whose sections or counts have the wrong type: load() raises one BundleError naming
    manifest.json and the key (not an AttributeError / ValueError from deep in the load), `edgekit run` exits 2."""
    from edgekit.cli import cli

    copy = tmp_path / "edited"
    shutil.copytree(bundle, copy)
    man = json.loads((copy / "manifest.json").read_text())
    edit(man)
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError) as e:
        load(copy, threads=1)
    assert f"manifest.json: {key} is {said}" in str(e.value) and "convert" in e.value.hint, str(e.value)
    r = CliRunner().invoke(cli, ["run", str(copy), "--prompt", "Count: one", "--no-template"])
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert f"manifest.json: {key} is {said}" in r.output


def test_a_manifest_key_left_null_or_out_takes_the_default(bundle, tmp_path):
    copy = tmp_path / "nulls"
    shutil.copytree(bundle, copy)
    man = json.loads((copy / "manifest.json").read_text())
    man["llm"].update(context_default=None, prompt_bos=None)
    man["target"].pop("runtime")
    (copy / "manifest.json").write_text(json.dumps(man))
    lm = load(copy, threads=1)
    assert lm.context == lm.max_context


def test_a_template_that_takes_no_system_message_says_so_up_front(og_dir, tmp_path):
    """Gemma 2's template raises on a system message: a conversation with one is refused when it is made, in one
    line that names the system message (not at every turn with a hint saying a system role is fine); without one
    it chats; lm.chat with one says the same."""
    folder = tmp_path / "nosystem"
    shutil.copytree(og_dir, folder)
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}", encoding="utf-8")
    lm = load(folder)
    with pytest.raises(DataError) as e:
        lm.conversation(system="Be short.")
    assert "this model's chat template takes no system message" in str(e.value) \
        and "System role not supported" in str(e.value) and "leave out the system message" in e.value.hint, str(e.value)
    with pytest.raises(DataError) as e:
        lm.chat([{"role": "system", "content": "Be short."}] + QUESTION, max_new_tokens=2)
    assert "takes no system message" in str(e.value)
    assert isinstance(lm.conversation().say("hi", max_new_tokens=2), str)
    # a template that takes a system message only first (Mistral's, Llama 2's): two of them fail its alternation
    # check, which is not "takes no system message"
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{% set rest = messages[1:] %}{% else %}{% set rest = messages %}"
        "{% endif %}{% for m in rest %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}\n{% endfor %}", encoding="utf-8")
    lm = load(folder)
    assert isinstance(lm.conversation(system="Be short.").say("hi", max_new_tokens=2), str)
    with pytest.raises(DataError) as e:
        lm.chat([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}] + QUESTION,
                max_new_tokens=2)
    assert "takes no system message" not in str(e.value) and "roles must alternate" in str(e.value), str(e.value)
