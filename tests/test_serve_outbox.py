"""The serving API's outbox (edgekit.serve.openai_api._Outbox): events from the engine thread reach a request's
event loop complete and in order; a stream is written at most once per interval while pieces come faster, the
first piece and the last event at once; a reply sent whole wakes the loop once. Real asyncio and a real
producer thread (the engine's side), no mocks."""

import asyncio
import threading
import time

from edgekit.serve.openai_api import _Outbox


def _run(interval, n, gap_s, final=("done", "length")):
    """A producer thread puts n pieces, gap_s apart, then the final event; returns (batches, times, t_final)."""
    async def main():
        box = _Outbox(asyncio.get_running_loop(), interval)
        sent = {}

        def produce():
            for i in range(n):
                box.put([("text", f"p{i}")])
                time.sleep(gap_s)
            sent["final"] = time.perf_counter()
            box.put([final])

        batches, times = [], []
        t = threading.Thread(target=produce)
        t.start()
        async for evs in box.batches():
            batches.append(list(evs))
            times.append(time.perf_counter())
        t.join()
        return batches, times, sent["final"]

    return asyncio.run(main())


def _flat(batches):
    return [ev for b in batches for ev in b]


def test_fast_pieces_are_gathered_per_interval_and_none_is_lost():
    batches, times, t_final = _run(0.05, 120, 0.002)   # 500 pieces/s against 20 writes/s
    assert _flat(batches) == [("text", f"p{i}") for i in range(120)] + [("done", "length")]
    assert batches[0] == [("text", "p0")]               # the first piece is not held back
    # about 0.25 s of pieces: a handful of writes, nowhere near one per piece (a loaded machine only gathers more)
    assert len(batches) <= 120 // 4, [len(b) for b in batches]
    assert times[-1] - t_final < 0.04                   # the last event does not wait out the interval


def test_slow_pieces_go_at_once():
    batches, times, _ = _run(0.05, 6, 0.12)             # slower than the interval: one write per piece
    assert _flat(batches) == [("text", f"p{i}") for i in range(6)] + [("done", "length")]
    assert len(batches) >= 6


def test_a_whole_reply_wakes_the_loop_once_and_errors_end_it():
    batches, _, _ = _run(None, 40, 0.001)
    assert batches == [[("text", f"p{i}") for i in range(40)] + [("done", "length")]]
    batches, _, _ = _run(0.02, 3, 0.001, final=("error", "generation failed: boom"))
    assert _flat(batches)[-1] == ("error", "generation failed: boom") and len(_flat(batches)) == 4


def test_a_gone_client_ends_the_batches():
    async def main():
        box = _Outbox(asyncio.get_running_loop(), 0.02)
        box.put([("text", "a")])
        got = []
        async for evs in box.batches():
            got.append(list(evs))
            if len(got) == 1:
                box.gone()
        return got

    assert asyncio.run(main()) == [[("text", "a")], [("gone", None)]]


def test_auto_stream_interval_gathers_only_where_the_decode_threads_take_every_cpu():
    from types import SimpleNamespace

    import pytest

    from edgekit.serve.__main__ import stream_interval
    from edgekit.serve.openai_api import AUTO_STREAM_INTERVAL_MS, LLMApi, auto_stream_interval_ms

    assert auto_stream_interval_ms(2, cpus=2) == AUTO_STREAM_INTERVAL_MS > 0
    assert auto_stream_interval_ms(4, cpus=2) == AUTO_STREAM_INTERVAL_MS
    assert auto_stream_interval_ms(None, cpus=4) == AUTO_STREAM_INTERVAL_MS   # no count: ORT takes every CPU
    assert auto_stream_interval_ms(1, cpus=2) == 0.0 and auto_stream_interval_ms(3, cpus=4) == 0.0
    api = LLMApi([], None, read_body=None, authorized=None, stream_interval_ms=None)   # auto, per release
    api._cpus = 2
    assert api.interval_for(SimpleNamespace(threads=2)) == AUTO_STREAM_INTERVAL_MS / 1000
    assert api.interval_for(SimpleNamespace(threads=1)) == 0.0
    default = LLMApi([], None, read_body=None, authorized=None)       # the default: auto
    default._cpus = 2
    assert default.interval_for(SimpleNamespace(threads=2)) == AUTO_STREAM_INTERVAL_MS / 1000
    assert default.interval_for(SimpleNamespace(threads=1)) == 0.0
    per_token = LLMApi([], None, read_body=None, authorized=None, stream_interval_ms=0)
    assert per_token.interval_for(SimpleNamespace(threads=2)) == 0.0    # 0: a write per token, asked for
    fixed = LLMApi([], None, read_body=None, authorized=None, stream_interval_ms=7)
    assert fixed.interval_for(SimpleNamespace(threads=1)) == 0.007    # an explicit value wins
    assert stream_interval("auto") is None and stream_interval(None) is None and stream_interval("7.5") == 7.5
    with pytest.raises(ValueError, match="milliseconds or 'auto'"):
        stream_interval("soon")


def test_the_servers_interval_reaches_the_api():
    import argparse

    from edgekit.serve.__main__ import add_arguments, config_from
    from edgekit.serve.app import App
    from edgekit.serve.engine import Engine
    from edgekit.serve.metrics import Metrics

    p = argparse.ArgumentParser()
    add_arguments(p)
    m = Metrics()
    e = Engine(max_concurrency=1, max_queue=1, max_batch=1, max_delay_ms=2.0, metrics=m, inline_ms=2.0)
    for argv, want in (([], None), (["--stream-interval-ms", "auto"], None), (["--stream-interval-ms", "0"], 0.0),
                       (["--stream-interval-ms", "20"], 0.02)):
        cfg = config_from(p.parse_args(["x"] + argv))
        assert App([], e, m, stream_interval_ms=cfg.stream_interval_ms).llm.stream_interval == want, argv


def test_a_request_that_took_a_release_just_before_a_swap_goes_to_the_new_one():
    """The swap assigns the new release, then retires the old engine; a request that read the old release in
    between gets Retiring from its engine and is submitted to the release active now, not failed (429). With no
    successor (the server closing) Retiring stays the client's 429."""
    from types import SimpleNamespace

    import pytest

    from edgekit.runtime.llm_batch import Retiring, SamplingParams
    from edgekit.serve.openai_api import LLMApi

    got = []

    class Engine:
        def __init__(self, name, swap_to=None):
            self.name, self.swap_to = name, swap_to

        def submit(self, seq):
            if self.swap_to is not None:          # retired: the swap already made another release active
                if self.swap_to is not False:
                    entry.active = self.swap_to
                raise Retiring(f"model 'm' is being replaced; retry ({self.name})")
            got.append((self.name, seq))

    new = SimpleNamespace(engine=Engine("new"))
    entry = SimpleNamespace(name="m", active=None)
    entry.active = SimpleNamespace(engine=Engine("old", swap_to=new))
    api = SimpleNamespace(interval_for=lambda rel: 0.0)

    async def start():
        return LLMApi._start(api, entry, [1, 2, 3], SamplingParams(max_tokens=2), "r1", stream=True)

    rel, seq, _ = asyncio.run(start())
    assert rel is new and [n for n, _ in got] == ["new"] and got[0][1] is seq
    entry.active = SimpleNamespace(engine=Engine("closing", swap_to=False))
    with pytest.raises(Retiring):
        asyncio.run(start())
