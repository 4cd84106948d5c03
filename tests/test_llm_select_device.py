"""convert --select fastest --device NAME for a language model: each candidate build that meets the floor is
written as a bundle, uploaded to the device's store (not activated) and its decode speed measured there (the
device's `edgekit.runtime bench`, whose load() probes its own thread count), in alternating rounds; the fastest
ships with the device's measured thread choice in its manifest.

The lab device is a real sshd in a network namespace running this machine's Python (onnxruntime-genai
installed): x86 like this host, so this is functional coverage of the path (upload, remote bench, choice,
manifest), not a measurement of another CPU.
"""

from __future__ import annotations

import json
import os

import pytest

from edgekit.runtime import load


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """A tiny Llama (2 layers, hidden 64, a few training steps): the builds and the device runs stay short."""
    from tinylm import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tinylm-seldev") / "tiny-chat", steps=40, layers=2, hidden=64)


@pytest.fixture(scope="module")
def llm_lab(tmp_path_factory):
    """Two x86-avx2 devices: 'box' runs this Python (onnxruntime-genai installed), 'bare' a venv with numpy only."""
    from conftest import full_and_bare_lab

    with full_and_bare_lab(tmp_path_factory.mktemp("llmsellab"), f"S{os.getpid() % 10000}", "box", "bare") as lab:
        yield lab


def _convert_timed_on(cli, lab, src, device: str, out):
    """`convert --select fastest --device DEVICE` of the tiny LM for x86-avx2: (its row, its bundle's manifest)."""
    r = cli("convert", src, "-t", "x86-avx2", "--select", "fastest", "--device", device,
            "--inventory", lab.inventory, "--val-tokens", 64, "--name", "tinychat", "-o", out, "--json", "-q")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)["bundles"]
    return row, json.loads((out / row["path"].rsplit("/", 1)[-1] / "manifest.json").read_text())


def test_llm_candidates_timed_on_the_device(cli, llm_lab, tiny_src, tmp_path):
    from edgekit.convert.llm import DEVICE_ROUNDS
    from edgekit.runtime.threadprobe import candidates
    from edgekit.runtime.threads import usable_cpus

    out = tmp_path / "out"
    row, m = _convert_timed_on(cli, llm_lab, tiny_src, "box", out)
    cands = m["candidates"]
    assert len(cands) >= 5 and all("on device box" in c["timed"] for c in cands), cands
    timed = [c for c in cands if c.get("decode_tok_s")]
    assert len(timed) >= 2 and all(c["meets"] for c in timed), [(c["what"], c.get("error")) for c in cands]
    assert all(len(c["device_rounds"]) == DEVICE_ROUNDS and c["threads"] >= 1 for c in timed)
    (winner,) = [c for c in cands if c.get("chosen")]
    assert winner["decode_tok_s"] == max(c["decode_tok_s"] for c in timed)
    assert m["recipe"]["block_size"] == winner["options"]["block_size"]
    assert m["recipe"]["precision"] == winner["options"]["precision"]
    # the candidates were uploaded to the device's store and benchmarked there; none was activated
    store = llm_lab.devices["box"].root / "models" / "tinychat"
    assert len(list((store / "releases").iterdir())) >= len(timed)
    assert not (store / "current").exists()
    # the device's load() measured the winner's thread count: recorded, and a load here takes it
    rt = m.get("runtime") or {}
    ceiling = min(m["target"]["runtime"]["threads"], usable_cpus())   # the device is this machine
    lm = load(out / row["path"].rsplit("/", 1)[-1])
    if ceiling > 1:
        tc = rt["threads_choice"]
        assert "on device box" in tc["where"] and tc["threads"] == rt["threads"] == winner["threads"]
        assert tc["tried"] == candidates(ceiling) and "cache" not in tc
        assert (lm.threads, lm.threads_chosen_by) == (rt["threads"], "manifest")
    else:   # one usable CPU: nothing to measure, nothing recorded
        assert rt == {} and winner["threads"] == 1
    assert lm.check()["ok"]


def test_device_needs_select_fastest_and_its_target(cli, llm_lab, tiny_src, tmp_path):
    inv = ("--inventory", llm_lab.inventory)
    r = cli("convert", tiny_src, "-t", "x86-avx2", "--device", "box", *inv, "-o", tmp_path / "a")
    assert r.exit_code == 2 and "--select fastest" in r.output, r.output
    r = cli("convert", tiny_src, "-t", "rpi5", "--select", "fastest", "--device", "box", *inv, "-o", tmp_path / "b")
    assert r.exit_code == 2 and "box is a x86-avx2" in r.output, r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_llm_device_that_cannot_run_them_keeps_the_profiles_build(cli, llm_lab, tiny_src, tmp_path):
    """A device without onnxruntime-genai: every candidate is recorded with the device's error, none is timed
    (nothing from this host stands in for the device), and the profile's build ships."""
    out = tmp_path / "out"
    row, m = _convert_timed_on(cli, llm_lab, tiny_src, "bare", out)
    meets = [c for c in m["candidates"] if c["meets"]]
    assert len(meets) >= 2 and not any(c.get("decode_tok_s") for c in m["candidates"])
    assert all(c["error"].startswith("timing on bare: ") and "onnxruntime-genai" in c["error"] for c in meets), meets
    assert m["candidates"][0]["chosen"] and "runtime" not in m
    assert not (llm_lab.devices["bare"].root / "models" / "tinychat" / "current").exists()


def _x86_target_like_this_host() -> str:
    from edgekit.convert.numerics import this_host

    return "x86-avx512-vnni" if this_host().exact_int8 else "x86-avx2"


def _x86_target_unlike_this_host() -> str:
    return "x86-avx2" if _x86_target_like_this_host() == "x86-avx512-vnni" else "x86-avx512-vnni"


def test_llm_select_fastest_here_records_the_measured_threads(tiny_src, tmp_path, monkeypatch):
    """Without --device (this host stands for the x86 target of its kind): the candidates are timed in rounds
    alternating between them, each with the intra-op spinning its bundle ships (the x86 profiles: off), the median
    of the rounds recorded with them; the winner is also timed at 1, 2, 4 ... threads up to the ceiling
    (runtime.llmthreads, decode steps, the same spinning) and the choice written to the manifest, which load takes
    instead of probing."""
    import statistics

    from edgekit.convert.llm import HOST_ROUNDS, LLMRecipe, convert_llm
    from edgekit.runtime import llm as rt_llm
    from edgekit.runtime.threadprobe import candidates, pick
    from edgekit.runtime.threads import usable_cpus

    opened, real = [], rt_llm._og_model

    def spy(og, model_dir, threads, spinning=None):
        opened.append(spinning)
        return real(og, model_dir, threads, spinning)

    monkeypatch.setattr(rt_llm, "_og_model", spy)
    target = _x86_target_like_this_host()
    res = convert_llm(LLMRecipe(str(tiny_src), (target,), select="fastest", val_tokens=64, name="tinychat"),
                      str(tmp_path))
    monkeypatch.setattr(rt_llm, "_og_model", real)
    (row,) = res.bundles
    m = json.loads((row.path / "manifest.json").read_text())
    assert m["target"]["llm"]["intra_op_spinning"] is False
    cfg = json.loads((row.path / "model" / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"]["session.intra_op.allow_spinning"] == "0"
    assert opened and set(opened) == {False}, opened   # every model timed here: the bundle's spinning
    timed = [c for c in m["candidates"] if c.get("decode_tok_s")]
    assert len(timed) >= 2 and any(c.get("chosen") for c in timed)
    kind = "with VNNI" if target == "x86-avx512-vnni" else "AVX2 without VNNI"
    for c in timed:
        assert len(c["host_rounds"]) == HOST_ROUNDS and c["spinning"] is False and kind in c["timed"], c
        assert c["decode_tok_s"] == statistics.median(c["host_rounds"])   # odd rounds: the middle one
    ceiling = min(m["target"]["runtime"]["threads"], usable_cpus())
    lm = load(row.path)
    if ceiling == 1:
        assert "runtime" not in m and lm.threads == 1
        return
    tc = m["runtime"]["threads_choice"]
    assert tc["tried"] == candidates(ceiling) and "timed on this" in tc["where"]
    ms = {int(t): v for t, v in tc["ms_per_token"].items()}
    assert m["runtime"]["threads"] == tc["threads"] == pick(ms) and tc["rounds"] >= 2
    assert (lm.threads, lm.threads_chosen_by, lm.threads_choice["why"]) == (tc["threads"], "manifest", tc["why"])


def test_llm_host_runs_needs_the_targets_kind(monkeypatch):
    """Decode speed here stands for a CPU target of this host's kind only (convert.select.host_matches, as the CNN
    path judges it): the architecture, and on x86 VNNI on both or on neither (accuracy level 4's int8 kernels)."""
    from edgekit.convert import numerics
    from edgekit.convert.llm import _host_runs
    from edgekit.targets import load_target

    vnni = numerics.Host("x86_64", frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}))
    avx2 = numerics.Host("x86_64", frozenset({"avx2", "fma"}))
    for host, same, other in ((vnni, "x86-avx512-vnni", "x86-avx2"), (avx2, "x86-avx2", "x86-avx512-vnni")):
        monkeypatch.setattr(numerics, "this_host", lambda h=host: h)
        ok, where = _host_runs(load_target(same))
        assert ok and where.startswith(f"decode tok/s on this {host.describe()} host"), where
        ok, where = _host_runs(load_target(other))
        assert not ok and where.startswith("not timed: ") and "differ in VNNI" in where, where
        ok, where = _host_runs(load_target("rpi5"))
        assert not ok and "not rpi5's ISA" in where, where
    ok, where = _host_runs(load_target("jetson-orin"))
    assert not ok and "runs on its GPU" in where


def test_llm_time_here_alternates_rounds(monkeypatch):
    """The candidates timed here: HOST_ROUNDS rounds, each timing every candidate once in turn (drift and other work
    hit them alike), at the bundle's spinning; the median of each one's rounds is its figure, its rounds beside it;
    one ONNX Runtime GenAI refuses is recorded with the error, never chosen."""
    import io
    from pathlib import Path
    from types import SimpleNamespace

    from edgekit.convert import llm as llm_mod
    from edgekit.progress import Progress
    from edgekit.targets import load_target

    calls, speeds = [], {"a": iter([50.0, 90.0, 60.0]), "b": iter([70.0, 40.0, 65.0])}

    def fake(model_dir, threads, prompt_tokens=64, new_tokens=32, runs=1, spinning=None):
        calls.append((Path(model_dir).name, threads, spinning))
        if Path(model_dir).name == "bad":
            raise RuntimeError("no kernel for this build\nmore")
        return next(speeds[Path(model_dir).name])

    monkeypatch.setattr(llm_mod, "decode_speed", fake)
    t = load_target("x86-avx512-vnni")
    out = io.StringIO()
    s = SimpleNamespace(progress=Progress(stream=out))
    opts = llm_mod.LLMBuildOptions("int4")
    timed = [(opts, {"dir": f"/x/{n}"}, {"what": n}) for n in ("a", "bad", "b")]
    llm_mod._time_here(s, t, timed)
    assert [c[0] for c in calls] == ["a", "bad", "b", "a", "b", "a", "b"]   # HOST_ROUNDS = 3, "bad" once
    assert {(c[1], c[2]) for c in calls} == {(llm_mod._ceiling(t), False)}
    a, bad, b = (c for _, _, c in timed)
    assert a["host_rounds"] == [50.0, 90.0, 60.0] and a["decode_tok_s"] == 60.0
    assert b["host_rounds"] == [70.0, 40.0, 65.0] and b["decode_tok_s"] == 65.0
    assert bad["error"] == "timing: no kernel for this build" and "decode_tok_s" not in bad
    assert "60.0 tok/s (median of 50.0, 90.0, 60.0)" in out.getvalue()


def test_llm_select_fastest_not_timed_on_another_kind_of_host(tiny_src, tmp_path):
    """--select fastest for an x86 target of the other kind (VNNI or not) than this host: nothing is timed here,
    no other candidate is built, the profile's build ships, and the output says why."""
    import io

    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.progress import Progress

    target = _x86_target_unlike_this_host()
    out = io.StringIO()
    res = convert_llm(LLMRecipe(str(tiny_src), (target,), select="fastest", val_tokens=64, name="tinychat"),
                      str(tmp_path), progress=Progress(stream=out))
    (row,) = res.bundles
    assert row.ok and row.runtime == {}
    (c,) = row.candidates
    assert c["chosen"] and c["rung"] == "select" and "decode_tok_s" not in c
    assert c["timed"].startswith("not timed: ") and "differ in VNNI" in c["timed"]
    assert f"[{target}] --select fastest: not timed: " in out.getvalue()
    assert "the profile's build ships" in out.getvalue() and "building" in out.getvalue()
    assert out.getvalue().count("  building ") == 1   # the profile's build only
    m = json.loads((row.path / "manifest.json").read_text())
    assert m["candidates"] == json.loads(json.dumps(row.candidates)) and "runtime" not in m
