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


def test_llm_select_fastest_here_records_the_measured_threads(tiny_src, tmp_path):
    """Without --device (this x86 host stands for an x86 target): the winner is also timed at 1, 2, 4 ... threads
    up to the ceiling (runtime.llmthreads, decode steps) and the choice written to the manifest, which load takes
    instead of probing."""
    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.runtime.threadprobe import candidates, pick
    from edgekit.runtime.threads import usable_cpus

    res = convert_llm(LLMRecipe(str(tiny_src), ("x86-avx2",), select="fastest", val_tokens=64, name="tinychat"),
                      str(tmp_path))
    (row,) = res.bundles
    m = json.loads((row.path / "manifest.json").read_text())
    assert any(c.get("chosen") and c.get("decode_tok_s") for c in m["candidates"])
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
