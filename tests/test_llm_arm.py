"""A language model for an arm64 target, checked on ARM's kernels when it is converted: onnxruntime-genai's
aarch64 wheels, at the versions installed here, in the emulated Debian 12 arm64 root under qemu-user
(edgekit.lab.emulated.build_llm), running the bundle's golden check (convert.compat.check_llm): teacher-forced
top-1 agreement with the converting machine, the logits' SNR at the golden top-K ids, a greedy generation."""

from __future__ import annotations

import json
import shutil

import pytest

import onnxruntime as ort
import onnxruntime_genai as og

from tinylm import corpus_text, tiny_lm  # noqa: F401  (the session's tiny Llama)


@pytest.fixture(scope="module")
def arm_llm():
    """The emulated root's LLM venv (built once and cached; about a minute of pip under emulation)."""
    from edgekit.lab import emulated as emu

    return emu.build_llm(say=lambda t: print(t, flush=True))


@pytest.fixture(scope="module")
def arm_build(tiny_lm, arm_llm, tmp_path_factory):  # noqa: F811
    from edgekit.convert.llm import LLMRecipe, convert_llm

    d = tmp_path_factory.mktemp("armllm")
    val = d / "heldout.txt"
    val.write_text(corpus_text(60, seed=101))
    res = convert_llm(LLMRecipe(str(tiny_lm), ("rpi5",), precision="int4", val=str(val), compat_check="emulated"),
                      str(d / "out"))
    assert [(r.ok, r.reason) for r in res.bundles] == [(True, "")]
    return d / "out", res.bundles[0].path


def test_int4_for_rpi5_passes_its_golden_check_on_arm_kernels(arm_build, cli):
    out, path = arm_build
    m = json.loads((path / "manifest.json").read_text())
    g = json.loads((path / "golden.json").read_text())
    [r] = m["compatibility"]
    assert r["checked"] and r["ok"] and r["where"] == "emulated aarch64 (qemu)" and r["machine"] == "aarch64"
    # the same engine versions as measured the bundle here: only the kernels (ARM's) differ
    assert r["requirements"] == [f"onnxruntime-genai=={og.__version__}", f"onnxruntime=={ort.__version__}"]
    assert (r["backend"], r["backend_version"]) == ("onnxruntime-genai", og.__version__)
    assert r["positions"] == sum(len(p) for p in g["prompts"]) > 0
    assert r["top1_agreement"] >= r["min_top1_agreement"] and r["snr_db"] >= r["min_snr_db"]
    # qemu's emulation is exact: the tiny model's greedy text on ARM's kernels is the converting machine's
    assert r["generation_ok"] and r["text"].strip() and r["text_matches_golden"] is True
    print(f"tiny Llama INT4 for rpi5 on aarch64 (qemu): top-1 {r['top1_agreement']:.3f}, "
          f"SNR {r['snr_db']:.1f} dB, generation same as golden: {r['text_matches_golden']}, {r['seconds']} s")
    res = cli("report", str(out))
    assert res.exit_code == 0, res.output
    html = (out / "report.html").read_text()
    assert "On the target&#39;s kernels" in html or "On the target's kernels" in html
    assert "emulated aarch64 (qemu)" in html and f"onnxruntime-genai=={og.__version__}" in html


def test_a_bundle_that_disagrees_on_arm_fails_the_check(arm_build, tmp_path):
    """The check compares: golden top-1 ids the ARM kernels cannot produce fail it, with the figures named."""
    from edgekit.convert.compat import check_llm
    from edgekit.errors import ConversionError
    from edgekit.targets import load_target

    _, path = arm_build
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    g = json.loads((bad / "golden.json").read_text())
    vocab = json.loads((bad / "manifest.json").read_text())["model"]["vocab"]
    g["top1"] = [[(t + 1) % vocab for t in row] for row in g["top1"]]
    (bad / "golden.json").write_text(json.dumps(g))
    cache, lines = {}, []
    with pytest.raises(ConversionError) as e:
        check_llm(bad, load_target("rpi5"), "emulated", cache=cache, say=lines.append)
    msg = str(e.value)
    assert "fails its golden check on ARM's kernels" in msg and "top-1 agreement 0.000" in msg, msg
    assert "--precision int8" in msg and "target rpi5" in msg
    # the same model for another Pi profile: the same failure, named for that profile, not run again
    with pytest.raises(ConversionError) as again:
        check_llm(bad, load_target("rpi4"), "emulated", cache=cache, say=lines.append)
    assert "target rpi4" in str(again.value) and "top-1 agreement 0.000" in str(again.value) and len(lines) == 1


def test_check_off_is_recorded_and_x86_targets_need_none(tiny_lm, tmp_path):  # noqa: F811
    from edgekit.convert.llm import LLMRecipe, convert_llm

    res = convert_llm(LLMRecipe(str(tiny_lm), ("rpi5", "x86-avx2"), precision="int8", val_tokens=128,
                                compat_check="off"), str(tmp_path / "out"))
    assert [r.ok for r in res.bundles] == [True, True]
    by = {r.target: json.loads((r.path / "manifest.json").read_text()) for r in res.bundles}
    [rec] = by["rpi5"]["compatibility"]
    assert rec["checked"] is False and rec["reason"] == "--compat-check off"
    assert "compatibility" not in by["x86-avx2"]   # this machine's kernels are the target's kind


def test_cli_takes_the_check_modes_a_language_model_has(tiny_lm, cli, tmp_path):  # noqa: F811
    r = cli("convert", tiny_lm, "-t", "rpi5", "--compat-check", "accept-crash", "-o", tmp_path / "b")
    assert r.exit_code == 2 and "accept-crash is for TFLite artifacts" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "b").exists()


def test_a_check_past_its_time_is_not_checked_under_auto_and_fails_when_required(arm_build, monkeypatch):
    """qemu runs ARM code tens of times slower: auto gives a long check up (recorded, the bundle written),
    emulated fails the row. A 1-second limit: the engine alone takes longer to import under emulation."""
    from edgekit.convert import compat
    from edgekit.errors import ConversionError
    from edgekit.targets import load_target

    _, path = arm_build
    monkeypatch.setitem(compat.LLM_EMULATED_LIMIT_S, False, 1.0)
    monkeypatch.setitem(compat.LLM_EMULATED_LIMIT_S, True, 1.0)
    [rec] = compat.check_llm(path, load_target("rpi5"), "auto")
    assert rec["checked"] is False and "ran past 1 s under emulation" in rec["reason"], rec
    with pytest.raises(ConversionError, match="ran past 1 s under emulation"):
        compat.check_llm(path, load_target("rpi5"), "emulated")


def test_the_same_model_is_checked_once(arm_build):
    """Bundles of one build for several arm64 profiles (same model files, same golden) share one check."""
    from edgekit.convert.compat import check_llm
    from edgekit.targets import load_target

    _, path = arm_build
    cache, lines = {}, []
    first = check_llm(path, load_target("rpi5"), "emulated", cache=cache, say=lines.append)
    again = check_llm(path, load_target("rpi5"), "emulated", cache=cache, say=lines.append)
    assert again == [dict(first[0], reused=True)] and first[0]["ok"] and len(lines) == 1
    assert "golden check on ARM's kernels" in lines[0]


def test_a_cuda_build_for_a_jetson_is_not_checked_on_arm_cpu_kernels(tiny_lm, arm_llm, tmp_path):  # noqa: F811
    """jetson-orin is aarch64 but its LLM build runs on the CUDA execution provider: the aarch64 CPU wheel cannot
    load it, and its kernels are not the device's. Recorded unchecked; the bundle is written."""
    from edgekit.convert.llm import LLMRecipe, convert_llm

    res = convert_llm(LLMRecipe(str(tiny_lm), ("jetson-orin",), val_tokens=128), str(tmp_path / "out"))
    [row] = res.bundles
    assert row.ok, row.reason
    [rec] = json.loads((row.path / "manifest.json").read_text())["compatibility"]
    assert rec["checked"] is False and rec["reason"].startswith("built for the cuda execution provider"), rec


def test_why_not_checked_names_the_cause(arm_llm, monkeypatch):
    from edgekit.lab import emulated as emu

    assert emu.llm_unavailable() is None
    other = dict(emu.llm_recipe(), pip=["onnxruntime-genai==0.0.1"])
    assert "built for other engine versions than onnxruntime-genai==0.0.1" in emu.llm_unavailable(other)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert emu.llm_unavailable() == "the emulated arm64 root needs Linux and root"


def test_emulated_required_where_it_cannot_run_stops_before_any_work(tiny_lm, cli, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    r = cli("convert", tiny_lm, "-t", "rpi5", "--compat-check", "emulated", "-o", tmp_path / "b")
    assert r.exit_code == 2 and "--compat-check emulated: the emulated arm64 root needs Linux and root" in r.output
    assert "Traceback" not in r.output and not any((tmp_path / "b").glob("*-rpi5-*"))


def test_a_killed_checks_bundle_copy_is_swept(arm_build):
    """A converter killed mid-check leaves its bundle copy in the root's /tmp: the next check removes copies older
    than any check can run, and leaves a recent one (another converter's, running) alone."""
    import os
    import time

    from edgekit.convert import compat
    from edgekit.lab import emulated as emu
    from edgekit.targets import load_target

    _, path = arm_build
    tmp = emu.root_path() / "tmp"
    old, recent = tmp / "edgekit-compat-test-old", tmp / "edgekit-compat-test-recent"
    for d in (old, recent):
        (d / "bundle").mkdir(parents=True, exist_ok=True)
    ago = time.time() - 2 * max(compat.LLM_EMULATED_LIMIT_S.values()) - 60
    os.utime(old, (ago, ago))
    try:
        [rec] = compat.check_llm(path, load_target("rpi5"), "emulated")
        assert rec["ok"] and not old.exists() and recent.is_dir()
    finally:
        import shutil

        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(recent, ignore_errors=True)
