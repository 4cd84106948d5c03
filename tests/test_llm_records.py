"""What a language-model conversion records is what happened: the rounding a build applied (calibrated AWQ / GPTQ
rounding is INT4's: an INT8, fp16 or fp32 build is the model builder's, and says so; asked for explicitly with such a
precision it is refused before any work), and the stage a row failed at (the build, the floor, the budget, or the
writing of its bundle: its generation, its size, ARM's kernels), with a hint that fits it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import onnxruntime_genai  # noqa: F401  (edgekit[llm-convert], in dev: missing must fail, not skip)

from edgekit.errors import BudgetMissed, EdgekitError


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """A tiny Llama (2 layers, hidden 64, a few training steps): each conversion takes seconds."""
    from tinylm import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tinylm-records") / "tiny-rec", steps=40, layers=2, hidden=64)


def test_calibrated_algo_recorded_only_on_int4_builds():
    """LLMBuildOptions: a calibrated algo on a build other than INT4 is recorded as what the builder applies
    (builder_algo: k_quant): the profile's options, the INT4 ladder's int8 rung and --select fastest's INT8
    candidate are all made through it."""
    from edgekit.convert.llm import LLMBuildOptions, LLMRecipe, profile_options
    from edgekit.targets import load_target

    for algo in ("awq", "gptq", "awq_gptq"):
        assert LLMBuildOptions("int4", algo=algo).algo == algo
        for p in ("int8", "fp32"):
            assert LLMBuildOptions(p, algo=algo).algo == "k_quant"
        assert dataclasses.replace(LLMBuildOptions("int4", algo=algo), precision="int8").algo == "k_quant"
    assert LLMBuildOptions("int8", algo="rtn").algo == "rtn"    # the builder's own roundings stay as asked
    # no --precision: each profile's; awq applies where that is int4, and the GPU profile's fp16 says k_quant
    assert profile_options(load_target("x86-avx2"), LLMRecipe("m", ("x86-avx2",), algo="awq")).algo == "awq"
    opts = profile_options(load_target("jetson-orin"), LLMRecipe("m", ("jetson-orin",), algo="gptq"))
    assert (opts.precision, opts.algo) == ("fp16", "k_quant")


def test_calibrated_algo_with_another_precision_is_refused(cli, tmp_path):
    """--algo awq|gptq|awq_gptq with --precision int8|fp16|fp32: exit 2 before any work, in one line that says
    what to do (the API refuses the same recipe)."""
    from edgekit.convert.llm import LLMRecipe

    for p in ("int8", "fp16", "fp32"):
        with pytest.raises(EdgekitError, match="calibrated INT4 rounding"):
            LLMRecipe("m", ("x86-avx2",), precision=p, algo="awq")
    LLMRecipe("m", ("x86-avx2",), precision="int4", algo="awq")
    LLMRecipe("m", ("x86-avx2",), algo="gptq")
    d = tmp_path / "folder"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    for p, algo in (("int8", "gptq"), ("fp32", "awq_gptq")):
        r = cli("convert", d, "-t", "x86-avx2", "--precision", p, "--algo", algo, "-o", tmp_path / "out")
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and f"algo '{algo}'" in lines[0] and "--precision int4" in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_algo_not_applied_to_a_profiles_precision_is_said(tiny_src, tmp_path, monkeypatch):
    """No --precision, a profile whose precision is not INT4 (the GPU's fp16): its row says in one line that the
    calibrated algo is not applied, and what it is built with."""
    import io

    from edgekit.convert import llm as llm_mod
    from edgekit.progress import Progress

    def no_work(recipe, src, plans, out_dir, name, log_path, progress, device=None, written=None):
        return llm_mod.LLMConvertResult(name, recipe.to_dict(), {}, "", recipe.floor, log_path=log_path)

    monkeypatch.setattr(llm_mod, "_convert", no_work)
    out = io.StringIO()
    llm_mod.convert_llm(llm_mod.LLMRecipe(str(tiny_src), ("jetson-orin", "x86-avx2"), algo="awq"), str(tmp_path),
                        progress=Progress(stream=out))
    said = out.getvalue()
    assert "[jetson-orin] fp16: algo awq is calibrated INT4 rounding, not applied (built k_quant)" in said, said
    assert "[x86-avx2]" not in said


def test_failure_stage_and_hint():
    from edgekit.convert.llm import LLMRow, _failure_hint

    def row(stage="", fidelity=None, reason="x"):
        return LLMRow("rpi5", "int4", Path("b"), fidelity=fidelity or {}, reason=reason, stage=stage)

    assert row().to_dict()["failure"]["stage"] == "build"                           # as before, without a stage
    assert row(fidelity={"kl_mean": 1}).to_dict()["failure"]["stage"] == "fidelity"
    for stage in ("generation", "budget", "compatibility", "bundle"):
        assert row(stage, {"kl_mean": 0.01}).to_dict()["failure"]["stage"] == stage   # measured, then failed
    assert "builder's traceback" in _failure_hint(row("build"))
    assert "--max-mb" in _failure_hint(row("budget"))
    assert "--max-mb" in _failure_hint(row("fidelity", reason="below the floor: ... > the budget's 1.000 MB"))
    assert "loosen the floor" in _failure_hint(row("fidelity", reason="below the floor: KL 0.2 > 0.1"))
    gen = _failure_hint(row("generation"))
    assert "no text" in gen and "token ids" in gen and "traceback" not in gen
    assert _failure_hint(row("compatibility")) == _failure_hint(row("bundle")) == ""


def test_a_row_failing_while_its_bundle_is_written_says_where(tiny_src, tmp_path, monkeypatch):
    """A build that met the floor and then fails while its bundle is written is labelled with that stage, not
    "fidelity" (which its measured figures would suggest): a generation that decodes to no text ("generation",
    and a hint about the generation, not the builder's traceback); a bundle over the byte budget ("budget")."""
    from edgekit.convert import llm as llm_mod
    from edgekit.convert.llm import LLMRecipe, convert_llm

    def silent(model_dir, prompt, tokens=16, cpu=False, hf_tokenizer=None):
        return {"prompt": prompt, "max_new_tokens": tokens, "tokens": [2, 2], "text": " \n", "prompt_bos": None,
                "engine": "test"}

    with monkeypatch.context() as mp:
        mp.setattr(llm_mod, "_generation", silent)
        with pytest.raises(BudgetMissed) as e:
            convert_llm(LLMRecipe(str(tiny_src), ("x86-avx2",), precision="int4", rescue=False, val_tokens=64,
                                  max_bytes=10 ** 9), str(tmp_path / "a"))   # a budget's build: fp16 scales
    (row,) = e.value.result.bundles
    assert row.fidelity and row.stage == "generation" and "generates no text" in row.reason
    report = json.loads(e.value.result.report_path.read_text())
    assert report["bundles"][0]["failure"] == {"stage": "generation", "reason": row.reason}
    assert "decoded to no text" in e.value.hint and "builder's traceback" not in e.value.hint
    assert not (tmp_path / "a" / "tiny-rec-x86-avx2-int4").exists()

    # over the budget only once the bundle's own files are added (the margin kept for them made 0 here)
    size = row.rescue[0]["bytes"]
    monkeypatch.setattr(llm_mod, "BUNDLE_MARGIN", 0)
    with pytest.raises(BudgetMissed) as e:
        convert_llm(LLMRecipe(str(tiny_src), ("x86-avx2",), precision="int4", rescue=False, val_tokens=64,
                              max_bytes=size), str(tmp_path / "b"))
    (row,) = e.value.result.bundles
    assert row.stage == "budget" and row.reason.startswith("over the byte budget: the bundle would be")
    assert row.to_dict()["failure"]["stage"] == "budget" and "--max-mb" in e.value.hint
