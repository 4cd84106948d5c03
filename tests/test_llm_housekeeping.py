"""The language-model converter's housekeeping: one rule for a Hugging Face config.json (convert.hf_config, read by
convert.llm and convert.sources alike); transformers' reading of a config trusted except where it cannot read it;
a bundle whose writing fails (ONNX Runtime GenAI, the disk) fails its row in one line and leaves nothing at its
path; the ladder's rejected builds removed from the run's temporary directory as soon as nothing reads them."""

from __future__ import annotations

import ast
import json
import types
from pathlib import Path

import pytest

import onnxruntime_genai  # noqa: F401  (edgekit[llm-convert], in dev: missing must fail, not skip)

from edgekit.errors import BudgetMissed


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """A tiny Llama (2 layers, hidden 64, a few training steps): each conversion takes seconds."""
    from tinylm import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tinylm-house") / "tiny-house", steps=40, layers=2, hidden=64)


# --- one config.json rule -----------------------------------------------------------------------------------------

CONFIGS = {
    "llama": '{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}',
    "type-only": '{"model_type": "llama"}',
    "arch-only": '{"architectures": ["LlamaForCausalLM"]}',
    "bare": '{"hidden_size": 64}',
    "empty-arch": '{"architectures": [], "model_type": ""}',
    "array": "[]",
    "string": '"llama"',
    "number": "3",
    "null": "null",
    "not-json": '{"architectures": ["LlamaForCausalLM"],',
}


def test_one_config_rule_for_llm_and_sources(tmp_path):
    """convert.llm.is_hf_causal_lm (yes or no) and convert.sources.hf_config_problem (what is wrong) are one rule,
    convert.hf_config's: they agree on every config.json, and that module imports the standard library only (so
    llm reads it without sources' TensorFlow helpers)."""
    from edgekit.convert import hf_config, llm, sources

    assert sources.hf_config_problem is hf_config.hf_config_problem
    assert sources.HF_CONFIG_HINT is hf_config.HF_CONFIG_HINT
    for name, text in CONFIGS.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(text)
        problem = sources.hf_config_problem(d)
        assert llm.is_hf_causal_lm(d) == (problem is None), (name, problem)
        assert (problem is None) == (name in ("llama", "type-only", "arch-only")), (name, problem)
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "config.json").write_bytes(b"\xff\xfe{")
    assert sources.hf_config_problem(binary) == "config.json is not UTF-8 text" and not llm.is_hf_causal_lm(binary)
    none = tmp_path / "none"
    none.mkdir()
    assert sources.hf_config_problem(none) is None and not llm.is_hf_causal_lm(none)   # no config.json: not one
    assert not llm.is_hf_causal_lm(tmp_path / "llama" / "config.json")                   # a file, not a folder

    tree = ast.parse(Path(hf_config.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module if n.module.startswith("edgekit") else n.module.split(".")[0]
                 for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    # the standard library, and edgekit's own errors (hub_snapshot's refusal)
    assert imported <= {"__future__", "json", "os", "pathlib", "typing", "edgekit.errors"}, imported


# --- effective_tie ------------------------------------------------------------------------------------------------

def _folder(root: Path, name: str, config) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_effective_tie_falls_back_only_where_transformers_cannot_read(tmp_path, monkeypatch):
    """effective_tie takes the config dict's word (config_tie) where transformers cannot read the config: a
    model_type it does not know, one that needs remote code, a value its configuration class rejects; anything
    else transformers raises is not taken for that, and surfaces. Remote code is never trusted."""
    import transformers

    from edgekit.convert.llm import config_tie, effective_tie

    unknown = {"architectures": ["FooForCausalLM"], "model_type": "foo-unknown", "tie_word_embeddings": True}
    remote = dict(unknown, auto_map={"AutoConfig": "configuration_foo.FooConfig"})
    bad = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_attention_heads": "four",
           "tie_word_embeddings": True}
    for name, cfg in (("unknown", unknown), ("remote", remote), ("bad", bad)):
        assert effective_tie(_folder(tmp_path, name, cfg), cfg) is True is config_tie(cfg), name
    # gemma3's config.json without the key: transformers' class default (tied), not the dict's absence
    gemma = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
    assert effective_tie(_folder(tmp_path, "gemma", gemma), gemma) is True
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False}
    d = _folder(tmp_path, "llama", llama)

    seen = {}

    def failing(exc):
        def from_pretrained(path, **kw):
            seen.update(kw)
            raise exc
        return from_pretrained

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", failing(ValueError("unrecognized")))
    assert effective_tie(d, dict(llama, tie_word_embeddings=True)) is True   # cannot read: the dict's word
    assert seen.get("trust_remote_code") is False
    # a value the configuration class trips over: the config's error in one line (it was a traceback)
    from edgekit.errors import SourceModelError

    for exc in (RuntimeError("a bug in a configuration class"), KeyError("rope_type"), TypeError("x"),
                ZeroDivisionError("division by zero")):
        monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", failing(exc))
        with pytest.raises(SourceModelError) as e:
            effective_tie(d, llama)
        assert "transformers cannot load the config.json" in str(e.value) and type(exc).__name__ in str(e.value)

    class Unforeseen(Exception):
        pass

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", failing(Unforeseen("?")))
    with pytest.raises(Unforeseen):   # anything else is not caught
        effective_tie(d, llama)
    monkeypatch.undo()
    zero = dict(llama, num_attention_heads=0, hidden_size=64)   # the real class on a real bad value
    with pytest.raises(SourceModelError) as e:
        effective_tie(_folder(tmp_path, "zero", zero), zero)
    assert "config.json" in str(e.value) and "fix config.json" in e.value.hint, str(e.value)


# --- a bundle whose writing fails ---------------------------------------------------------------------------------

def test_bundle_write_failure_one_line_nothing_left(cli, tiny_src, tmp_path, monkeypatch):
    """ONNX Runtime GenAI failing in the generation check (a RuntimeError, not an EdgekitError) while a build that
    met the floor is written: the row fails with one line naming the bundle and the step (exit 1 with its
    report, as a build that fails does: not the user's mistake, so not 2), its traceback in the log, and nothing
    at the bundle's path: not a half-written bundle, not the staging folder; a bundle already there is kept."""
    from edgekit.convert import llm as llm_mod
    from edgekit.convert.llm import LLMRecipe, convert_llm

    def broken(*a, **k):
        raise RuntimeError("generator failed: could not allocate the KV cache")

    monkeypatch.setattr(llm_mod, "_generation", broken)
    out = tmp_path / "out"
    r = cli("convert", tiny_src, "-t", "x86-avx2", "--precision", "int4", "--no-rescue", "--val-tokens", "64",
            "-o", out, "-q")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    bundle = "tiny-house-x86-avx2-int4"
    assert bundle in lines[0] and "the generation check" in lines[0], lines[0]
    assert "RuntimeError: generator failed" in lines[0] and "Traceback" not in r.output
    assert sorted(p.name for p in out.iterdir()) == ["tiny-house.convert.json", "tiny-house.convert.log"]
    report = json.loads((out / "tiny-house.convert.json").read_text())
    failure = report["bundles"][0]["failure"]
    assert failure["stage"] == "bundle" and "the generation check" in failure["reason"]
    log = (out / "tiny-house.convert.log").read_text()
    assert "Traceback" in log and "could not allocate the KV cache" in log

    # an OSError writing a file (the disk full), through the API: the bundle already at the path stays as it was
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.undo()
    monkeypatch.setattr(llm_mod, "embedding_summary", full)   # read for the manifest, after golden.json is written
    dest = tmp_path / "api" / bundle
    dest.mkdir(parents=True)
    (dest / "manifest.json").write_text("{}")
    with pytest.raises(BudgetMissed) as e:
        convert_llm(LLMRecipe(str(tiny_src), ("x86-avx2",), precision="int4", rescue=False, val_tokens=64),
                    str(tmp_path / "api"))
    (row,) = e.value.result.bundles
    assert row.stage == "bundle" and "writing golden.json and manifest.json" in row.reason
    assert "OSError" in row.reason and "No space left" in row.reason
    assert [p.name for p in dest.iterdir()] == ["manifest.json"]
    assert not [p for p in (tmp_path / "api").iterdir() if p.name.startswith(".")]


# --- builds removed as soon as nothing reads them -----------------------------------------------------------------

def test_ladder_leaves_only_the_builds_in_use(tiny_src, tmp_path, monkeypatch):
    """A floor no build meets walks the whole INT4 ladder (profile, wide, matmuls, int8): each rung's build is
    removed from the run's temporary directory once it is judged, so when the builder makes the next one no
    earlier build is left there (their records, which the ladder and the report read, stay)."""
    from edgekit.convert import llm as llm_mod
    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.convert.llm_fidelity import LLMFloor

    real = llm_mod.run_builder
    left: list = []

    def counting(src, opts, out_dir, *a, **k):
        out_dir = Path(out_dir)
        if out_dir.name.startswith("build-"):
            left.append(sorted(p.name for p in out_dir.parent.glob("build-*")))
        return real(src, opts, out_dir, *a, **k)

    monkeypatch.setattr(llm_mod, "run_builder", counting)
    floor = LLMFloor(max_ppl_increase=None, max_kl=0.0, min_agreement=None)
    with pytest.raises(BudgetMissed) as e:
        convert_llm(LLMRecipe(str(tiny_src), ("x86-avx2",), precision="int4", val_tokens=64, floor=floor),
                    str(tmp_path))
    (row,) = e.value.result.bundles
    rungs = [s["rung"] for s in row.rescue]
    assert len(left) == len(row.rescue) >= 3 and "matmuls" in rungs and rungs[-1] == "int8", rungs
    assert left == [[]] * len(left), left
    assert all(s.get("kl_mean") is not None for s in row.rescue)   # every rung measured before its files went


def test_sweep_keeps_what_a_row_still_to_finish_can_take(tmp_path):
    """_Session.sweep: a build's files stay while it meets the floor (and budget) of a row under way or still to
    come (keep_for): shipped or timed, it is read; one that meets none of them, or failed, goes; its record stays.
    keep_for None (no conversion under way): nothing is removed."""
    from edgekit.convert.llm import LLMBuildOptions, _Session
    from edgekit.convert.llm_fidelity import LLMFloor

    strict, loose = LLMFloor(0.1, 0.1, 0.8), LLMFloor(0.5, 1.0, 0.5)
    good = {"ppl_increase": 0.05, "kl_mean": 0.05, "top1_agreement": 0.9}
    fair = {"ppl_increase": 0.3, "kl_mean": 0.5, "top1_agreement": 0.6}
    s = object.__new__(_Session)
    s.recipe = types.SimpleNamespace(max_bytes=None)
    s.builds = {}
    for i, (metrics, extra) in enumerate([(good, {}), (fair, {}), (None, {"error": "RuntimeError: x"}),
                                          (good, {"bytes": 10 ** 9})]):
        d = tmp_path / f"build-{i}"
        d.mkdir()
        (d / "model.onnx").write_bytes(b"x")
        s.builds[LLMBuildOptions("int4", block_size=16 * (i + 1))] = dict(
            {"dir": d, **({"metrics": metrics} if metrics else {})}, **extra)

    def there():
        return [r["dir"].is_dir() for r in s.builds.values()]

    s.keep_for = None
    s.sweep()
    assert there() == [True] * 4
    s.keep_for = [strict, loose]   # a strict row under way, a loose one to come: the fair build may ship later
    s.sweep()
    assert there() == [True, True, False, True]
    s.recipe.max_bytes = 10 ** 6   # under a byte budget the big one can ship for no row
    s.sweep()
    assert there() == [True, True, False, False]
    s.keep_for = [strict]
    s.sweep()
    assert there() == [True, False, False, False]
    s.keep_for = []                # no row left
    s.sweep()
    assert there() == [False] * 4 and all(r.get("removed") for r in s.builds.values())
    assert [("metrics" in r) for r in s.builds.values()] == [True, True, False, True]
