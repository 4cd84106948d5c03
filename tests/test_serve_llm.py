"""edgekit serve for a language model: the OpenAI-compatible API spoken by the official `openai` client, raw
HTTP for each error, continuous batching (8 concurrent streams decode together and give the single-stream
greedy text), a client that disconnects frees its sequence, a full queue answers 429, and a hot swap of the
deployed release under a running chat load fails no request. The model: tests/tinylm.py's tiny Llama,
converted by edgekit (INT4 for x86-avx2, with its golden check)."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tinylm import tiny_lm  # noqa: F401  (the session fixture)
from test_serve import Server, _install, _wait_for

import onnxruntime_genai  # noqa: E402,F401  (edgekit[llm], in dev: missing must fail, not skip)
import openai  # noqa: E402  (the dev extra installs it: a missing client fails, never skips)

TOKEN = "llm-test-token-0123456789"
M = "tinychat"   # the model's name (its manifest's: the recipe's name, as for other bundles), not the directory's
QUESTIONS = ["What colour is the lamp?", "What colour is the box?", "What colour is the door?",
             "What colour is the clock?", "What colour is the radio?", "What colour is the garden?",
             "Count: one two three", "The farmer"]


@pytest.fixture(scope="module")
def bundle(tiny_lm, tmp_path_factory):  # noqa: F811
    from edgekit.convert.llm import LLMRecipe, convert_llm

    out = tmp_path_factory.mktemp("llmserve")
    res = convert_llm(LLMRecipe(str(tiny_lm), ("x86-avx2",), precision="int4", name="tinychat", val_tokens=64,
                                rescue=False), str(out))
    assert [r.ok for r in res.bundles] == [True]
    return out / "tinychat-x86-avx2-int4"


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    with Server(bundle, args=["--token", TOKEN, "--max-sequences", "8", "--max-body-mb", "0.05",
                              "--threads", "1"], tmp=tmp) as srv:
        yield srv


def _client(srv, token=TOKEN):
    return openai.OpenAI(base_url=f"http://{srv.url}/v1", api_key=token, max_retries=0, timeout=60)


def _auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def _metric(srv, name, **labels):
    """The sum of a metric's samples whose labels include `labels`."""
    text = srv.request("GET", "/metrics", headers=_auth())[2].decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def _chat(c, q, model=M, **kw):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                     temperature=0, max_tokens=40, **kw)


def _stream_text(c, q, **kw):
    chunks = list(_chat(c, q, stream=True, **kw))
    return chunks, "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


# -- the official client -------------------------------------------------------------------------------

def test_openai_client_chat_stream_completions_and_models(server, bundle):
    from edgekit.runtime import load

    c = _client(server)
    models = c.models.list()
    assert [m.id for m in models.data] == [M] and models.data[0].owned_by == "edgekit"
    r = _chat(c, QUESTIONS[0])
    lm = load(bundle)
    want = lm.chat([{"role": "user", "content": QUESTIONS[0]}], max_new_tokens=40)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason == lm.last["finish_reason"] == "stop"
    assert r.usage.prompt_tokens == lm.last["prompt_tokens"] and r.usage.completion_tokens == lm.last["new_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == M and r.id.startswith("chatcmpl-")

    chunks, text = _stream_text(c, QUESTIONS[0], stream_options={"include_usage": True})
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant" and all(ch.object == "chat.completion.chunk"
                                                                  for ch in chunks)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])

    comp = c.completions.create(model=M, prompt="Count: one two", max_tokens=12, temperature=0)
    assert comp.choices[0].text == lm.generate("Count: one two", max_new_tokens=12)
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 12
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=M, prompt="Count: one two", max_tokens=12, temperature=0, stream=True))
    assert streamed == comp.choices[0].text
    # the stop string ends the text before it (not returned), finish_reason stop
    word = comp.choices[0].text.split()[2]
    cut = c.completions.create(model=M, prompt="Count: one two", max_tokens=12, temperature=0, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == comp.choices[0].text.split(word)[0]
    # seeded sampling is reproducible
    a, b = (c.completions.create(model=M, prompt="The", max_tokens=16, temperature=1.0, seed=7).choices[0].text
            for _ in range(2))
    assert a == b


def test_triton_generate_alias(server):
    st, body = server.json("POST", "/v2/models/" + M + "/generate",
                           {"text_input": "Count: one two", "parameters": {"max_tokens": 12}}, headers=_auth())
    assert st == 200 and body["model_name"] == M and body["finish_reason"] == "length"
    comp = _client(server).completions.create(model=M, prompt="Count: one two", max_tokens=12, temperature=0)
    assert body["text_output"] == comp.choices[0].text
    st, h, raw = server.request("POST", "/v2/models/" + M + "/generate_stream",
                                json.dumps({"text_input": "Count: one two", "max_tokens": 12}).encode(), _auth())
    events = [json.loads(e[len("data: "):]) for e in raw.decode().split("\n\n") if e]
    assert st == 200 and h["content-type"] == "text/event-stream"
    assert "".join(e["text_output"] for e in events) == body["text_output"]
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 12
    st, meta = server.json("GET", "/v2/models/" + M, headers=_auth())
    assert st == 200 and meta["edgekit"]["kind"] == "llm" and meta["edgekit"]["golden_check"]["ok"]
    assert server.json("GET", "/v2/models/" + M + "/ready", headers=_auth())[0] == 200
    assert server.json("GET", "/v2/health/ready", headers=_auth())[0] == 200


def test_each_error_status_over_raw_http(server):
    def post(path, doc, headers=None):
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        st, h, b = server.request("POST", path, body, headers if headers is not None else _auth())
        return st, json.loads(b)

    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    deep = b"[" * 20000 + b"]" * 20000   # past the JSON parser's recursion limit: a 400, not a 500
    cases = [
        (post(chat, b"{nope"), 400, "invalid_request_error", "invalid_json"),
        (post(chat, b'{"messages": ' + deep + b"}"), 400, "invalid_request_error", "invalid_json"),
        (post(chat, {"model": M}), 400, "invalid_request_error", "invalid_value"),
        (post(chat, {"model": M, "messages": msgs, "max_tokens": 0}), 400, "invalid_request_error",
         "invalid_value"),
        (post(chat, {"model": M, "messages": msgs, "temperature": "hot"}), 400, "invalid_request_error",
         "invalid_type"),
        (post(chat, {"model": M, "messages": msgs, "n": 2}), 400, "invalid_request_error",
         "unsupported_value"),
        (post(chat, {"model": M, "messages": [{"role": "user", "content": "lamp " * 2000}]}), 400,
         "invalid_request_error", "context_length_exceeded"),
        (post(chat, {"model": M, "messages": msgs}, {"Authorization": "Bearer wrong-token-1234567890"}),
         401, "authentication_error", "invalid_api_key"),
        (post(chat, {"model": "nope", "messages": msgs}), 404, "invalid_request_error", "model_not_found"),
        (post(chat, {"model": M, "messages": [{"role": "user", "content": "x" * 60000}]}), 413,
         "invalid_request_error", "request_too_large"),
    ]
    for (st, body), want_st, want_type, want_code in cases:
        assert st == want_st and body["error"]["type"] == want_type and body["error"]["code"] == want_code, body
        assert body["error"]["message"]
    for path, doc, param in ((chat, {"model": M, "messages": [{"role": "user", "content": "lamp " * 2000}]},
                              "messages"),
                             ("/v1/completions", {"model": M, "prompt": "lamp " * 2000}, "prompt")):
        st, body = post(path, doc)   # the param names the field that holds the text
        assert st == 400 and body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == param
    st, body = post("/v2/models/" + M + "/generate", b'{"text_input": ' + deep + b"}")
    assert st == 400 and "nested too deeply" in body["error"]
    st, body = post("/v2/models/nope/generate", {"text_input": "x"})
    assert st == 404 and "does not exist" in body["error"]
    st, body = post("/v2/models/" + M + "/infer", {"inputs": []})
    assert st == 400 and "/generate" in body["error"]
    # the official client raises its typed errors for them
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong-token-1234567890").models.list()
    with pytest.raises(openai.NotFoundError):
        _client(server).chat.completions.create(model="nope", messages=msgs)
    with pytest.raises(openai.BadRequestError, match="context"):
        _client(server).chat.completions.create(model=M, messages=[{"role": "user", "content": "lamp " * 2000}])


def test_out_of_vocabulary_ids_and_a_tiny_temperature_fail_no_other_request(server, bundle):
    """Token ids outside the vocabulary (>= its size, or beyond int64) are one 400 for their request, not a
    failed prefill batch or an accepted garbage prompt; a temperature of 1e-310 samples the argmax instead of
    ending the engine (every later request 503)."""
    vocab = json.loads((bundle / "model" / "genai_config.json").read_text())["model"]["vocab_size"]
    c = _client(server)
    for bad in (vocab, 2 ** 63, 2 ** 70):
        with pytest.raises(openai.BadRequestError, match="vocabulary") as e:
            c.completions.create(model=M, prompt=[1, 2, bad], max_tokens=4)
        assert e.value.status_code == 400 and e.value.code == "invalid_value"
    ok = c.completions.create(model=M, prompt=[1, 2, vocab - 1], max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2
    greedy = c.completions.create(model=M, prompt="Count: one two", max_tokens=8, temperature=0)
    tiny = c.completions.create(model=M, prompt="Count: one two", max_tokens=8, temperature=1e-310, seed=3)
    assert tiny.choices[0].text == greedy.choices[0].text
    assert _chat(c, QUESTIONS[0]).choices[0].finish_reason == "stop"   # the engine still generates


def test_sample_subtracts_the_max_before_the_temperature():
    import numpy as np

    from edgekit.runtime.llm_batch import SamplingParams, _sample

    x = np.random.default_rng(0).standard_normal(257).astype(np.float32) * 4
    for t, k, p in ((1e-310, 0, 1.0), (1e-300, 5, 0.9), (5e-324, 0, 0.5)):
        got = {_sample(x, SamplingParams(max_tokens=1, temperature=t, top_k=k, top_p=p), np.random.default_rng(s))
               for s in range(5)}
        assert got == {int(x.argmax())}


def test_released_kv_row_reads_zeros():
    """The KV buffers are shared anonymous memory: a released row's pages are freed (MADV_REMOVE), so the row
    reads zeros; MADV_DONTNEED would leave the pages, and their data, in memory."""
    import numpy as np

    from edgekit.runtime.llm_batch import _KVBuffer

    b = _KVBuffer(3, 2, 512, 8, np.float32)    # rows of 32 KiB: whole pages
    try:
        b.array[:] = 1.0
        b.release_row(1)
        assert not b.array[1].any() and b.array[0].all() and b.array[2].all()
    finally:
        b.close()


# -- batching ------------------------------------------------------------------------------------------

def test_eight_concurrent_streams_batch_and_equal_single_stream_greedy(server):
    c = _client(server)
    single = [_stream_text(c, q)[1] for q in QUESTIONS]   # one at a time: batches of one
    steps0 = _metric(server, "edgekit_serve_llm_decode_batch_size_count")
    ones0 = _metric(server, "edgekit_serve_llm_decode_batch_size_bucket", le="1")
    start = threading.Barrier(len(QUESTIONS))

    def one(q):
        start.wait()
        return _stream_text(c, q)[1]

    with ThreadPoolExecutor(len(QUESTIONS)) as ex:
        together = list(ex.map(one, QUESTIONS))
    assert together == single and all(together)
    steps = _metric(server, "edgekit_serve_llm_decode_batch_size_count") - steps0
    ones = _metric(server, "edgekit_serve_llm_decode_batch_size_bucket", le="1") - ones0
    assert steps > 0 and ones < steps  # steps decoded several sequences at once
    assert _metric(server, "edgekit_serve_llm_active_sequences") == 0
    assert _metric(server, "edgekit_serve_llm_kv_cache_bytes") == 0


def test_disconnect_mid_stream_frees_the_sequence(server):
    cancelled0 = _metric(server, "edgekit_serve_llm_sequences_finished_total", reason="cancelled")
    out0 = _metric(server, "edgekit_serve_llm_completion_tokens_total")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": M, "prompt": "Count: one", "max_tokens": 480, "ignore_eos": True, "stream": True,
         "temperature": 0}).encode(), _auth())
    r = conn.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")  # the first piece arrived: the sequence is generating
    conn.sock.close()
    conn.close()
    _wait_for(lambda: _metric(server, "edgekit_serve_llm_sequences_finished_total", reason="cancelled")
              == cancelled0 + 1, timeout=20)
    assert _metric(server, "edgekit_serve_llm_active_sequences") == 0
    assert _metric(server, "edgekit_serve_llm_kv_cache_bytes") == 0
    assert _metric(server, "edgekit_serve_llm_completion_tokens_total") - out0 < 480
    # a client waiting for a whole reply (no stream) that leaves: its sequence is cancelled too
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": M, "prompt": "Count: two", "max_tokens": 480, "ignore_eos": True, "temperature": 0}).encode(),
        _auth())
    _wait_for(lambda: _metric(server, "edgekit_serve_llm_active_sequences") == 1, timeout=20)
    conn.sock.close()
    conn.close()
    _wait_for(lambda: _metric(server, "edgekit_serve_llm_sequences_finished_total", reason="cancelled")
              == cancelled0 + 2, timeout=20)
    assert _metric(server, "edgekit_serve_llm_kv_cache_bytes") == 0
    assert _metric(server, "edgekit_serve_llm_completion_tokens_total") - out0 < 960


def test_queue_full_is_429_and_prompts_stay_out_of_the_log(bundle, tmp_path):
    marker = "zebra-marker-7731"
    with Server(bundle, args=["--max-sequences", "1", "--max-queue", "1", "--no-check", "--threads", "1"],
                tmp=tmp_path) as srv:
        def call(_):
            st, h, b = srv.request("POST", "/v1/completions", json.dumps(
                {"model": M, "prompt": f"Count: one {marker}", "max_tokens": 300, "ignore_eos": True,
                 "temperature": 0}).encode(), {"Content-Type": "application/json"})
            return st, json.loads(b)

        with ThreadPoolExecutor(6) as ex:
            results = list(ex.map(call, range(6)))
        statuses = sorted(st for st, _ in results)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
        for st, body in results:
            if st == 429:
                assert body["error"]["type"] == "rate_limit_error" and "busy" in body["error"]["message"]
            else:
                assert body["usage"]["completion_tokens"] == 300
        with pytest.raises(openai.RateLimitError):  # what the official client makes of it
            with ThreadPoolExecutor(4) as ex:
                list(ex.map(lambda _: _client(srv, "none").completions.create(
                    model=M, prompt="Count: one", max_tokens=300, extra_body={"ignore_eos": True}),
                    range(4)))
        log = srv.stop()
    assert marker not in log and "Count: one" not in log
    with Server(bundle, args=["--log-prompts", "--no-check", "--threads", "1"], tmp=tmp_path) as srv:
        assert srv.json("POST", "/v1/completions", {"model": M, "prompt": marker, "max_tokens": 2})[0] == 200
        log = srv.stop()
    assert marker in log


# -- a new release under load --------------------------------------------------------------------------

def test_hot_swap_under_chat_load_fails_no_request(bundle, tmp_path):
    from edgekit.runtime import releases

    v2 = tmp_path / "v2"
    shutil.copytree(bundle, v2)
    man = json.loads((v2 / "manifest.json").read_text())
    man["note"] = "release 2: the same weights, another release"
    (v2 / "manifest.json").write_text(json.dumps(man))
    root = tmp_path / "root"
    sha1, sha2 = _install(root, "tinychat", bundle), _install(root, "tinychat", v2)
    releases.switch(releases.model_dir(str(root), "tinychat"), sha1)
    bad = tmp_path / "bad"   # a release whose golden check fails: that model is not ready
    shutil.copytree(bundle, bad)
    golden = json.loads((bad / "golden.json").read_text())
    golden["top1"] = [[(t + 1) % 64 for t in row] for row in golden["top1"]]
    (bad / "golden.json").write_text(json.dumps(golden))
    releases.switch(releases.model_dir(str(root), "broken"), _install(root, "broken", bad))
    sha_later = _install(root, "later", bundle)   # deployed, `current` not switched yet: served once it is
    seen, failures = [], []
    stop = threading.Event()
    with Server(root, args=["--poll-interval", "0.1", "--threads", "1"], tmp=tmp_path) as srv:
        c = _client(srv, "none")

        def load(i):
            n = 0
            while not stop.is_set() and n < 2000:
                n += 1
                try:
                    if n % 2:
                        r = _chat(c, QUESTIONS[(i + n) % len(QUESTIONS)], "tinychat")
                        seen.append(r.system_fingerprint)
                        assert r.choices[0].message.content
                    else:
                        chunks, text = _stream_text(c, QUESTIONS[(i + n) % len(QUESTIONS)], model="tinychat")
                        seen.append(chunks[0].system_fingerprint)
                        assert text
                except Exception as e:  # any failed request is the test's failure, reported below
                    failures.append(repr(e))

        with ThreadPoolExecutor(3) as ex:
            futs = [ex.submit(load, i) for i in range(3)]
            _wait_for(lambda: len(seen) >= 6, timeout=60)
            releases.switch(releases.model_dir(str(root), "tinychat"), sha2)
            _wait_for(lambda: seen and seen[-1] == sha2[:12], timeout=60)
            n_after = len(seen)
            _wait_for(lambda: len(seen) >= n_after + 6, timeout=60)
            stop.set()
            for f in futs:
                f.result()
        assert failures == [] and seen[0] == sha1[:12] and seen[-1] == sha2[:12], (failures, seen[:3], seen[-3:])
        assert _metric(srv, "edgekit_serve_model_swaps_total", model="tinychat") == 1
        # the old release's engine finished what it held and let go of its slots
        _wait_for(lambda: _metric(srv, "edgekit_serve_llm_active_sequences", version=sha1[:12]) == 0, timeout=20)
        st, body = srv.json("POST", "/v1/chat/completions", {"model": "broken", "messages": [
            {"role": "user", "content": "hi"}]})
        assert st == 503 and body["error"]["code"] == "model_not_ready" and "golden check" in body["error"]["message"]
        assert srv.json("GET", "/v2/health/ready")[0] == 503
        assert [(m.id, m.ready) for m in c.models.list().data] == [("broken", False), ("later", False),
                                                                    ("tinychat", True)]
        st, body = srv.json("POST", "/v1/completions", {"model": "later", "prompt": "Count: one", "max_tokens": 4})
        assert st == 503 and body["error"]["code"] == "model_not_ready"
        releases.switch(releases.model_dir(str(root), "later"), sha_later)
        _wait_for(lambda: srv.json("GET", "/v2/models/later/ready")[0] == 200, timeout=60)
        st, body = srv.json("POST", "/v1/completions", {"model": "later", "prompt": "Count: one", "max_tokens": 4})
        assert st == 200 and body["usage"]["completion_tokens"] == 4 and body["system_fingerprint"] == sha_later[:12]


@pytest.fixture(scope="module")
def swapped(bundle, tmp_path_factory):
    """An LLMEntry that served `bundle` (1 thread) and swapped in a second release loaded without --threads while
    the thread probe fails if it runs: (entry, old release, new release, try_load's result)."""
    from edgekit.runtime import llmthreads
    from edgekit.serve.llm_entry import LLMEntry
    from edgekit.serve.models import Source

    v2 = tmp_path_factory.mktemp("swapped") / "v2"
    shutil.copytree(bundle, v2)
    man = json.loads((v2 / "manifest.json").read_text())
    man["note"] = "release 2: the same weights, another release"
    (v2 / "manifest.json").write_text(json.dumps(man))
    kw = {"check": False, "max_sequences": 4, "max_queue": 4, "kv_cache_mb": None}
    entry = LLMEntry(Source(M, "bundle", bundle))
    assert entry.try_load(bundle, threads=1, **kw), entry.failure
    old = entry.active

    def no_probe(*a, **k):
        raise AssertionError("the thread probe ran during a hot swap")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llmthreads, "choose", no_probe)
        mp.setattr(llmthreads, "choose_spinning", no_probe)
        ok = entry.try_load(v2, threads=None, **kw)
    try:
        yield entry, old, entry.active, ok
    finally:
        entry.close()


def test_hot_swap_without_threads_takes_the_active_count_and_runs_no_probe(swapped):
    entry, old, new, ok = swapped
    assert ok and entry.failure is None, entry.failure
    assert new is not old and new.threads == old.threads == 1


def test_hot_swap_at_two_threads_with_no_spinning_recorded_runs_no_probe(bundle, tmp_path):
    """A hot swap (no --threads) while the active release runs 2 threads with its spinning unknown (None: a
    manifest from before the spinning was measured): the new release gets a spinning (genai_config.json's), so
    load_llm's choose_spinning does not time it beside the decoding engine; a new release whose manifest has
    its own measured count for this machine loads at that count (and its measured spinning), not the active's."""
    from edgekit.runtime import llmthreads, threadprobe
    from edgekit.runtime.llmopts import spinning_of
    from edgekit.serve.llm_entry import LLMEntry
    from edgekit.serve.models import Source

    kw = {"check": False, "max_sequences": 2, "max_queue": 2, "kv_cache_mb": None}
    entry = LLMEntry(Source(M, "bundle", bundle))
    assert entry.try_load(bundle, threads=1, **kw), entry.failure
    entry.active.threads, entry.active.spinning = 2, None     # as a release at 2 threads, spinning unmeasured
    genai = json.loads((bundle / "model" / "genai_config.json").read_text())
    releases = []
    for name, choice in (("v2", None), ("v3", dict(threadprobe.machine(), tried=[1, 2], threads=1,
                                                    spinning_chosen=not spinning_of(genai)))):
        rel = tmp_path / name
        shutil.copytree(bundle, rel)
        man = json.loads((rel / "manifest.json").read_text())
        man.setdefault("runtime", {}).pop("threads_choice", None)
        if choice is not None:
            man["runtime"]["threads_choice"] = choice
        (rel / "manifest.json").write_text(json.dumps(man))
        releases.append(rel)

    def no_probe(*a, **k):
        raise AssertionError("the thread probe ran during a hot swap")

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(llmthreads, "choose", no_probe)
            mp.setattr(llmthreads, "choose_spinning", no_probe)
            assert entry.try_load(releases[0], threads=None, **kw), entry.failure
            assert entry.active.threads == 2 and entry.active.spinning is spinning_of(genai)
            assert entry.try_load(releases[1], threads=None, **kw), entry.failure
            assert entry.active.threads == 1 and entry.active.spinning is (not spinning_of(genai))
    finally:
        entry.close()


def test_hot_swap_frees_the_old_session_and_drops_the_old_release(swapped):
    entry, old, new, ok = swapped
    assert ok and old.engine.join(20)
    _wait_for(lambda: entry.retiring == [], timeout=10)   # no reference kept once it drained
    assert old.engine.decoder.session is None and old.engine.decoder.buffers == []
    assert new.engine.decoder.session is not None and entry.ready


def _asgi(entry, path, doc, on_read=None):
    """One POST through the LLM API in-process: (status, JSON body). on_read() runs while the body is read."""
    import asyncio

    from edgekit.serve.metrics import Metrics
    from edgekit.serve.openai_api import LLMApi

    raw = json.dumps(doc).encode()

    async def read_body(scope, receive):
        if on_read is not None:
            on_read()
        return raw

    async def receive():   # the client stays
        await asyncio.sleep(3600)

    out = []

    async def send(msg):
        out.append(msg)

    api = LLMApi([entry], Metrics(), read_body=read_body, authorized=lambda scope: True)
    asyncio.run(api({"type": "http", "path": path, "method": "POST", "headers": []}, receive, send))
    return out[0]["status"], json.loads(b"".join(m.get("body", b"") for m in out[1:]))


def test_generate_pins_and_encodes_with_the_release_active_after_the_body(swapped):
    """/v2 .../versions/V/generate chooses the release once the body is in: a swap during the body's read is
    seen by the version pin (404 for the release swapped out, 200 from the one swapped in)."""
    entry, old, new, ok = swapped
    assert ok

    def swap():
        entry.active = new

    try:
        entry.active = old
        st, body = _asgi(entry, f"/v2/models/{M}/versions/{old.version}/generate",
                         {"text_input": "Count: one two", "max_tokens": 4}, on_read=swap)
        assert st == 404 and new.version in body["error"], body
        entry.active = old
        st, body = _asgi(entry, f"/v2/models/{M}/versions/{new.version}/generate",
                         {"text_input": "Count: one two", "max_tokens": 4}, on_read=swap)
        assert st == 200 and body["model_version"] == new.version and body["usage"]["completion_tokens"] == 4
    finally:
        entry.active = new


def test_prompt_of_megabytes_is_refused_before_it_is_tokenized(swapped, monkeypatch):
    """A text longer than the context x 64 characters cannot fit: context_length_exceeded at once, without
    tokenizing megabytes on the event loop."""
    entry, old, new, ok = swapped

    def no_encode(*a, **k):
        raise AssertionError("the huge prompt was tokenized")

    monkeypatch.setattr(new.tokenizer, "encode", no_encode)
    monkeypatch.setattr(new.tokenizer, "chat_ids", no_encode)
    huge = "lamp " * 600_000   # 3 MB
    st, body = _asgi(entry, "/v1/completions", {"model": M, "prompt": huge, "max_tokens": 2})
    assert st == 400 and body["error"]["code"] == "context_length_exceeded", body
    st, body = _asgi(entry, "/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": huge}]})
    assert st == 400 and body["error"]["code"] == "context_length_exceeded", body
    st, body = _asgi(entry, f"/v2/models/{M}/generate", {"text_input": huge})
    assert st == 400 and "context" in body["error"], body


def test_prompt_of_81_character_tokens_that_fits_is_not_refused(swapped, monkeypatch):
    """SmolLM2's and Qwen2.5's vocabularies have tokens of 81 characters ("\n" + 80 spaces): a prompt of such
    tokens that fits the context is served, not refused by the characters-per-token bound taken for a prompt
    too long to tokenize (here the tokenizer stands in for theirs: one token per 81 characters)."""
    entry, old, new, ok = swapped
    piece = "\n" + " " * 80
    monkeypatch.setattr(new.tokenizer, "encode", lambda text: [5] * (len(text) // len(piece)))
    n = new.context - 4
    st, body = _asgi(entry, "/v1/completions", {"model": M, "prompt": piece * n, "max_tokens": 2,
                                                "temperature": 0})
    assert st == 200 and body["usage"]["prompt_tokens"] == n, body


def test_a_failing_sample_ends_its_sequence_not_the_engine(swapped, monkeypatch):
    """An exception while choosing one sequence's token (here: sampling) ends that sequence with an error; the
    engine and the greedy sequence beside it go on."""
    from edgekit.runtime import llm_batch
    from edgekit.runtime.llm_batch import GenSequence, SamplingParams

    entry, old, new, ok = swapped
    eng = new.engine

    def broken(*a, **k):
        raise ValueError("probabilities contain NaN")

    monkeypatch.setattr(llm_batch, "_sample", broken)
    got = {"sampled": [], "greedy": []}
    done = threading.Semaphore(0)

    def on(key):
        def on_events(evs):
            got[key].extend(evs)
            if any(k != "text" for k, _ in evs):
                done.release()
        return on_events

    ids = new.tokenizer.encode("Count: one two")
    with eng._cv:   # admitted together: one prefill, then the sampled one fails at its first token
        eng.submit(GenSequence(ids, SamplingParams(max_tokens=8, temperature=0.8, seed=1), on("sampled")))
        eng.submit(GenSequence(ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), on("greedy")))
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    assert got["sampled"][-1][0] == "error" and "probabilities contain NaN" in got["sampled"][-1][1]
    assert got["greedy"][-1] == ("done", "length") and eng.failed is None
    monkeypatch.undo()
    st, body = _asgi(entry, "/v1/completions", {"model": M, "prompt": "Count: one", "max_tokens": 3,
                                                "temperature": 0.9, "seed": 2})
    assert st == 200 and body["usage"]["completion_tokens"] == 3 and eng.kv_tokens == 0


def test_a_sequence_failure_is_logged_counted_and_only_its_own(caplog):
    """_next: a failure sampling one sequence's token or decoding its text ends that sequence (an error event,
    finished with reason "error" in the metrics, logged with its traceback); a failure in the engine's own
    bookkeeping (here: a metric) is not taken for the sequence's: it goes up, to fail the engine."""
    import logging

    import numpy as np

    from edgekit.runtime import llm_batch
    from edgekit.runtime.llm_batch import GenSequence, LLMEngine, SamplingParams
    from edgekit.serve.metrics import Metrics

    eng = object.__new__(LLMEngine)   # the token path alone: no decoder, no thread
    eng.name, eng.labels, eng.eos, eng.capacity = "m", {"model": "m", "version": "v"}, {0}, 64
    eng.metrics = Metrics()

    class Detok:
        def __init__(self, fail):
            self.fail = fail

        def decode(self, tok):
            if self.fail:
                raise RuntimeError("TokenizerStream: invalid token")
            return "x"

    def seq(temperature, fail_decode=False):
        s = GenSequence([1, 2], SamplingParams(max_tokens=4, temperature=temperature, seed=1), lambda evs: None)
        s._detok = Detok(fail_decode)
        return s

    def errors():
        return eng.metrics.llm_finished.values.get(tuple(sorted(dict(eng.labels, reason="error").items())), 0)

    row = np.arange(8, dtype=np.float32)
    events = {}
    sampled, decoded, fine = seq(0.8), seq(0.0, fail_decode=True), seq(0.0)
    with caplog.at_level(logging.ERROR, logger="edgekit.serve"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(llm_batch, "_sample", lambda *a: (_ for _ in ()).throw(ValueError("probabilities contain NaN")))
        eng._next(sampled, None, row, events)
        eng._next(decoded, None, row, events)
        eng._next(fine, None, row, events)
    assert events[sampled] == [("error", "generation failed: ValueError: probabilities contain NaN")]
    assert events[decoded] == [("error", "generation failed: RuntimeError: TokenizerStream: invalid token")]
    assert events[fine] == [("text", "x")] and fine.tokens == [7] and fine.finish is None
    assert sampled.finish == decoded.finish == "error" and errors() == 2
    logged = [r for r in caplog.records if "its next token failed" in r.getMessage()]
    assert len(logged) == 2 and all(r.exc_info for r in logged)

    def broken(*a, **k):
        raise RuntimeError("the metric failed")

    eng.metrics.llm_ttft.observe = broken     # the engine's own: not this sequence's input
    with pytest.raises(RuntimeError, match="the metric failed"):
        eng._next(seq(0.0), 3, None, {})
    assert errors() == 2


def test_kv_cache_budget_bounds_the_sequences_admitted(bundle):
    """--kv-cache-mb: a sequence is admitted only when its KV reservation (prompt + max tokens) fits; the
    others wait (not refused) and all complete; the budget is what the engine holds at most."""
    from edgekit.runtime.llm_batch import GenSequence, SamplingParams, load_llm_release
    from edgekit.errors import BundleError

    rel = load_llm_release(M, "0" * 64, bundle, threads=1, check=False, max_sequences=8, max_queue=8,
                           kv_cache_mb=1.4)   # 700 tokens of 2 KiB: room for one 480-token reservation
    try:
        eng = rel.engine
        per_token = rel.kv_bytes_per_token
        assert eng.kv_budget_tokens == int(1.4 * (1 << 20)) // per_token
        most, done = [0], threading.Semaphore(0)

        def on_events(evs):
            most[0] = max(most[0], len(eng.active))
            if any(k != "text" for k, _ in evs):
                done.release()

        seqs = [GenSequence(rel.tokenizer.encode(f"Count: {w}"), SamplingParams(max_tokens=470, ignore_eos=True),
                            on_events) for w in ("one", "two", "three")]
        for s in seqs:
            eng.submit(s)
        for _ in seqs:
            assert done.acquire(timeout=120)
        assert most[0] == 1 and [s.finish for s in seqs] == ["length"] * 3
        assert all(s.completion_tokens == 470 for s in seqs) and eng.kv_tokens == 0
    finally:
        rel.engine.retire()
        rel.engine.join(10)
    with pytest.raises(BundleError, match="holds 0 tokens"):
        load_llm_release(M, "0" * 64, bundle, threads=1, check=False, max_sequences=1, max_queue=1,
                         kv_cache_mb=0.001)


def test_prompts_arriving_together_prefill_as_one_batch_with_single_stream_text(bundle):
    """Prompts of different lengths admitted together are prefilled as one right-padded batch, a long one in
    chunks, and every greedy continuation equals ONNX Runtime GenAI's single-stream generation
    (edgekit.runtime)."""
    from edgekit.runtime import load
    from edgekit.runtime.llm_batch import GenSequence, SamplingParams, load_llm_release

    prompts = ["The robot moves the", "Count: one two", "a", "The old engineer repairs the red lamp to the",
               "My neighbour", "Count: five six seven", "The busy baker sells the", "The quiet"]
    lm = load(bundle)
    want = [lm.generate(p, max_new_tokens=24) for p in prompts]
    rel = load_llm_release(M, "0" * 64, bundle, threads=1, check=False, max_sequences=8, max_queue=8,
                           kv_cache_mb=None)
    try:
        eng = rel.engine
        texts = {i: [] for i in range(len(prompts))}
        done = threading.Semaphore(0)

        def on(i):
            def on_events(evs):
                for kind, v in evs:
                    if kind == "text":
                        texts[i].append(v)
                    else:
                        done.release()
            return on_events

        prefills = eng.prefills
        with eng._cv:  # the engine thread cannot admit until every prompt is queued: one admission
            for i, p in enumerate(prompts):
                eng.submit(GenSequence(rel.tokenizer.encode(p), SamplingParams(max_tokens=24, temperature=0.0),
                                       on(i)))
        for _ in prompts:
            assert done.acquire(timeout=60)
        assert eng.prefills == prefills + 1
        assert ["".join(texts[i]) for i in range(len(prompts))] == want
        # a prompt longer than one prefill batch (256 tokens) runs in chunks: the same text as in one piece
        from tinylm import corpus_text

        long_prompt = lm.decode(lm.encode(corpus_text(60, seed=5))[:400])
        ids = rel.tokenizer.encode(long_prompt)
        assert 300 < len(ids) < 480
        texts[99] = []
        eng.submit(GenSequence(ids, SamplingParams(max_tokens=24, temperature=0.0), on(99)))
        assert done.acquire(timeout=60)
        assert "".join(texts[99]) == lm.generate(long_prompt, max_new_tokens=24)
    finally:
        rel.engine.retire()
        rel.engine.join(10)


def test_long_prompt_is_prefilled_between_decode_steps_of_a_running_stream(bundle):
    """A prompt longer than one prefill batch is read in chunks (sized by time) between decode steps: a stream
    already generating gets a token after each chunk instead of waiting for the whole prompt, and the long
    prompt's greedy continuation still equals ONNX Runtime GenAI's single-stream generation."""
    import time

    from edgekit.runtime import load
    from edgekit.runtime.llm_batch import PREFILL_CHUNK_MIN, GenSequence, SamplingParams, load_llm_release
    from tinylm import corpus_text

    lm = load(bundle)
    long_prompt = lm.decode(lm.encode(corpus_text(60, seed=7))[:440])
    want = lm.generate(long_prompt, max_new_tokens=16)
    rel = load_llm_release(M, "0" * 64, bundle, threads=1, check=False, max_sequences=4, max_queue=4,
                           kv_cache_mb=None)
    try:
        eng = rel.engine
        ids = rel.tokenizer.encode(long_prompt)
        assert len(ids) > 400
        chunks = []
        part = eng.decoder.prefill_part

        def counted(slot, prompt, start, end):
            chunks.append(end - start)
            return part(slot, prompt, start, end)

        eng.decoder.prefill_part = counted
        times, text, done = {"a": [], "b": []}, [], threading.Semaphore(0)

        def on(key):
            def on_events(evs):
                now = time.perf_counter()
                for kind, v in evs:
                    if kind == "text":
                        times[key].append(now)
                        if key == "b":
                            text.append(v)
                    else:
                        done.release()
            return on_events

        a = GenSequence(rel.tokenizer.encode("Count: one two"), SamplingParams(max_tokens=300, ignore_eos=True),
                        on("a"))
        eng.submit(a)
        deadline = time.monotonic() + 60
        while len(times["a"]) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        t_submit = time.perf_counter()
        b = GenSequence(ids, SamplingParams(max_tokens=16, temperature=0.0), on("b"))
        eng.submit(b)
        assert done.acquire(timeout=120) and done.acquire(timeout=120)
        assert "".join(text) == want
        during = [t for t in times["a"] if t_submit < t < times["b"][0]]
        assert len(chunks) >= 2 and min(chunks[:-1]) >= PREFILL_CHUNK_MIN, chunks
        assert len(during) >= len(chunks) - 1, (len(during), chunks)   # a decode step between every two chunks
        assert a.completion_tokens == 300 and eng.kv_tokens == 0 and eng.long is None
    finally:
        rel.engine.retire()
        rel.engine.join(10)
