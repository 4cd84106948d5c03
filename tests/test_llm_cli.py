"""The language-model CLI as a user meets it: what `edgekit convert` says for the common ways of pointing at a Hugging
Face model that are not a model folder, --recipe with a language model's bundle, the options it names; `edgekit
run / chat / bench` and `python -m edgekit.runtime` with --context, --json and a reply cut by --max-new-tokens; the
units of the bench table. The runtime tests load the session's tiny INT4 bundle (tests/tinylm.py); nothing here
converts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinylm import tiny_int4_avx2, tiny_lm  # noqa: F401  (session fixtures)


def _one_error_line(r) -> str:
    """A refusal: exit 2, one line on stderr, no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "Traceback" not in r.output
    return lines[0]


def _foreign_config(folder: Path, arch: str) -> Path:
    """A model folder whose config.json names an architecture no builder exports: convert refuses it at once,
    naming `arch`, so a test sees which folder the LLM path read without converting anything."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "foo"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


# --- convert: where the model is ----------------------------------------------------------------------------------

def test_hub_cache_repository_folder_converts_its_refs_main_snapshot(cli, tmp_path):
    repo = tmp_path / "hub" / "models--Org--Tiny"
    _foreign_config(repo / "snapshots" / "old0", "OldMambaForCausalLM")
    _foreign_config(repo / "snapshots" / "new1", "NewMambaForCausalLM")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("new1")
    r = cli("convert", repo, "-t", "rpi5", "--precision", "int4", "-o", tmp_path / "out")
    note, line = r.stderr.splitlines()
    snap = repo / "snapshots" / "new1"
    assert r.exit_code == 2 and note == f"{repo}: a Hugging Face cache repository; converting its snapshot {snap}"
    # the LLM path read refs/main's snapshot (its architecture named), not "no calibration data" nor "int4 is a
    # language-model precision"
    assert "NewMambaForCausalLM" in line and "calibration" not in line and "language-model precision" not in line
    from edgekit.cli.llm_convert import hub_snapshot
    from edgekit.convert.llm import read_source
    from edgekit.convert.sources import detect_kind
    from edgekit.errors import SourceModelError

    assert hub_snapshot(str(repo)) == str(repo / "snapshots" / "new1")
    # the Python API reads it the same way: convert.llm.read_source at refs/main's snapshot, detect_kind (the
    # image-model path) names it a Hugging Face model
    with pytest.raises(SourceModelError) as e:
        read_source(str(repo))
    assert "NewMambaForCausalLM" in str(e.value)
    with pytest.raises(SourceModelError) as e:
        detect_kind(repo)
    assert "language models convert through edgekit.convert.llm" in str(e.value)
    from edgekit.convert.llm import LLMRecipe

    assert LLMRecipe(str(repo), ("rpi5",)).bundle_name == LLMRecipe(str(snap), ("rpi5",)).bundle_name == "Tiny"
    cnn = tmp_path / "models--keras-io--cnn"   # a hub download of an image model: its snapshot's kind
    (cnn / "snapshots" / "r1").mkdir(parents=True)
    (cnn / "snapshots" / "r1" / "saved_model.pb").write_bytes(b"\0")
    (cnn / "refs").mkdir()
    (cnn / "refs" / "main").write_text("r1")
    assert detect_kind(cnn) == "savedmodel"
    from edgekit.convert.recipe import ConvertRecipe

    assert ConvertRecipe(str(cnn), ("rpi5",)).bundle_name == ConvertRecipe(hub_snapshot(str(cnn)),
                                                                           ("rpi5",)).bundle_name == "cnn"
    # no refs/main and two snapshots: which to give, in one line
    (repo / "refs" / "main").unlink()
    line = _one_error_line(cli("convert", repo, "-t", "rpi5"))
    assert "no refs/main" in line and f"give {repo / 'snapshots'}/REV" in line and "new1, old0" in line
    # one snapshot and no refs/main: unambiguous, taken
    single = tmp_path / "models--Org--One"
    _foreign_config(single / "snapshots" / "abc", "OneMambaForCausalLM")
    assert "OneMambaForCausalLM" in _one_error_line(cli("convert", single, "-t", "rpi5", "-q"))


def test_model_files_without_config_json_and_a_gguf_are_named(cli, tmp_path):
    d = tmp_path / "noconf"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (d / f).write_text("{}")
    for extra in ((), ("--precision", "int4")):
        line = _one_error_line(cli("convert", d, "-t", "rpi5", *extra))
        assert "config.json is missing" in line and "calibration" not in line, line
    g = tmp_path / "tiny-Q4_K_M.gguf"
    g.write_bytes(b"GGUF")
    for extra in ((), ("--precision", "int4")):
        line = _one_error_line(cli("convert", g, "-t", "rpi5", *extra))
        assert "llama.cpp's format: convert the Hugging Face folder it came from" in line, line
    from edgekit.convert.llm import read_source   # the Python API says the same of a .gguf
    from edgekit.convert.sources import detect_kind
    from edgekit.errors import SourceModelError

    for read in (read_source, detect_kind):
        with pytest.raises(SourceModelError) as e:
            read(g if read is detect_kind else str(g))
        assert "GGUF file, llama.cpp's format" in str(e.value), str(e.value)


def test_llm_bundle_in_recipe_says_how_to_rebuild_and_options_are_spelled_as_the_cli_has_them(  # noqa: F811
        cli, tiny_lm, tiny_int4_avx2):  # noqa: F811
    for given in (tiny_int4_avx2, tiny_int4_avx2 / "manifest.json"):
        line = _one_error_line(cli("convert", "--recipe", given, "-t", "x86-avx2"))
        assert "unknown recipe field" not in line and "language model" in line
        assert f"edgekit convert {tiny_lm} --target x86-avx2 --precision int4 --block-size 32" in line, line
    for flag, value in (("--recipe", tiny_int4_avx2), ("--format", "onnx"), ("--input-shape", "x=1x8")):
        r = cli("convert", tiny_lm, "-t", "x86-avx2", flag, value)
        assert r.exit_code == 2 and f"{flag} is for image and tensor models" in r.stderr, r.output


def test_convert_help_says_what_select_fastest_does_for_a_language_model(cli):
    text = " ".join(cli("convert", "--help").stdout.split())
    assert "only the fastest, as OUT/<name>-<target>-<precision>" in text and "INT8 even where int4" in text


# --- run / chat / bench ------------------------------------------------------------------------------------------

def test_run_json_is_only_json_and_a_cut_reply_says_so(cli, tiny_int4_avx2):  # noqa: F811
    r = cli("run", tiny_int4_avx2, "-p", "Count: one", "--no-template", "--max-new-tokens", "2", "--json")
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)                        # stdout is the JSON alone (| jq)
    assert stats["finish_reason"] == "length" and stats["new_tokens"] == 2
    assert stats["text"] in r.stderr and "(reply cut at 2 tokens: --max-new-tokens)" in r.stderr
    r = cli("run", tiny_int4_avx2, "-p", "Count: one", "--no-template", "--max-new-tokens", "2")
    assert r.exit_code == 0 and r.stdout.strip() == stats["text"].strip()
    assert r.stderr.strip() == "(reply cut at 2 tokens: --max-new-tokens)"
    # a reply that ends on its own says nothing
    r = cli("run", tiny_int4_avx2, "-p", "What colour is the lamp?", "--max-new-tokens", "64", "--json")
    assert json.loads(r.stdout)["finish_reason"] == "stop" and "reply cut" not in r.stderr


def test_context_option(cli, tiny_int4_avx2):  # noqa: F811
    # the reply stops where the context is full (not at --max-new-tokens): said so
    r = cli("run", tiny_int4_avx2, "-p", "Count: one", "--no-template", "--context", "12", "--json")
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)
    assert stats["finish_reason"] == "length" and stats["prompt_tokens"] + stats["new_tokens"] <= 12
    assert "the context of 12 tokens is full" in r.stderr
    for cmd in (("run", tiny_int4_avx2, "-p", "hi"), ("chat", tiny_int4_avx2),
                ("bench", tiny_int4_avx2, "--runs", "1")):
        line = _one_error_line(cli(*cmd, "--context", "100000"))
        assert "context 100000" in line and "tokens from 2 to" in line, line
    # bench of several models with --context: one that is not a language model is refused before any runs
    r = cli("bench", tiny_int4_avx2, tiny_int4_avx2 / "golden.json", "--runs", "1", "--context", "64")
    assert r.exit_code == 2 and "--context is for language models" in r.stderr and "benchmarking" not in r.stderr, \
        r.output
    line = _one_error_line(cli("bench", tiny_int4_avx2.parent / "no-such-bundle", "--context", "64"))
    assert "no-such-bundle" in line and "--context is for" not in line, line   # the load names the missing path
    from click.testing import CliRunner

    from edgekit.cli import cli as root

    r = CliRunner().invoke(root, ["chat", str(tiny_int4_avx2), "--context", "64", "--max-new-tokens", "2"],
                           input="Count: one\n")
    assert r.exit_code == 0 and "context 64 tokens" in r.stderr
    assert "(reply cut at 2 tokens: --max-new-tokens)" in r.stderr


def test_bench_checks_every_bundle_and_its_counts_before_benchmarking_any(cli, tiny_int4_avx2, tmp_path):  # noqa: F811
    """`bench GOOD TRUNCATED --out F` benchmarked GOOD, then failed on the truncated copy and wrote nothing: the
    damage is said first, nothing measured, nothing written. Counts are said in the CLI's names before the load."""
    import shutil

    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_int4_avx2, trunc)
    data = trunc / "model" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    r = cli("bench", tiny_int4_avx2, trunc, "--runs", 1, "--prompt-tokens", 4, "--new-tokens", 2,
            "--out", tmp_path / "b.json")
    line = _one_error_line(r)
    assert str(trunc) in line and "model.onnx.data is 1000 bytes" in line and "damaged" in line, line
    assert "benchmarking" not in r.stderr and not (tmp_path / "b.json").exists()
    line = _one_error_line(cli("bench", tiny_int4_avx2, "--runs", 0))
    assert line == "error: --runs must be at least 1 (got 0)" and "prompt_tokens" not in line


def test_chat_with_stdin_closed_ends_as_at_end_of_input(tiny_int4_avx2):  # noqa: F811
    """`edgekit chat B <&-`: Python's sys.stdin is None; that is the end of input (exit 0), not an AttributeError."""
    for prog in (["-m", "edgekit.cli", "chat"], ["-m", "edgekit.runtime", "chat"]):
        out = subprocess.run(["sh", "-c", 'exec "$@" <&-', "sh", sys.executable, *prog, str(tiny_int4_avx2)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    from edgekit.runtime.llmchat import chat_loop

    class LM:   # what chat_loop reads of a model before the first line
        name, backend, backend_version, threads, context = "m", "b", "1", 1, 64

        def conversation(self, **kw):
            return None

    import io

    err = io.StringIO()
    saved, sys.stdin = sys.stdin, None
    try:
        assert chat_loop(LM(), stdout=io.StringIO(), stderr=err) == 0
    finally:
        sys.stdin = saved
    assert "/exit or Ctrl-D to leave" in err.getvalue()


def test_device_runtime_context_json_and_cut_reply(tiny_int4_avx2):  # noqa: F811
    def runtime(*args):
        return subprocess.run([sys.executable, "-m", "edgekit.runtime", *map(str, args)], capture_output=True,
                              text=True, timeout=120)

    out = runtime("run", tiny_int4_avx2, "--prompt", "Count: one", "--no-template", "--max-new-tokens", "2",
                  "--context", "64", "--json")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["new_tokens"] == 2 and "(reply cut at 2 tokens: --max-new-tokens)" in out.stderr
    out = runtime("run", tiny_int4_avx2, "--prompt", "hi", "--context", "100000")
    assert out.returncode == 2 and out.stderr.strip().startswith("error: context 100000")
    assert len(out.stderr.strip().splitlines()) == 1


def test_bench_table_units_are_mib():
    from edgekit.runtime.llmbench import llm_bench_table

    r = {"model": "m", "precision": "int4", "backend": "onnxruntime-genai", "backend_version": "0.18.0",
         "threads": 2, "load_ms": 100.0, "prompt_tokens": 8, "new_tokens": 8, "ttft_ms": 5.0, "prefill_tok_s": 1e3,
         "decode_tok_s": 100.0, "decode_token_ms": {"p99_ms": 11.0}, "peak_rss_mb": 300.0,
         "model_bytes": 3 * 2 ** 20, "noisy": False, "noise_reasons": [], "peak_rss_ratio": 1.5,
         "memory_bound_mb": 200.0, "rss_libraries_mb": 50.0, "runs": 3, "warmup": 1,
         "conditions": {"cpu_model": "cpu", "machine": "x86_64", "cpu_count": 2, "governor": None, "loadavg": [0.1]}}
    table = llm_bench_table([r])
    head = table.splitlines()[0]
    assert "peak RSS MiB" in head and "model MiB" in head and " MB" not in table
    from edgekit.cli.llm_convert import max_mb_note

    assert max_mb_note(2) == "size limit: --max-mb 2 MB = 1.907 MiB (the tables' MiB are 2^20 bytes)"



def test_cut_note_names_what_cut_the_reply():
    """A reply that ended on length names max_new_tokens where it reached it (the generation's default 128 when the
    caller gave none: chat_loop(lm) from Python), the context otherwise; a reply that ended itself, nothing."""
    from edgekit.runtime.llmchat import cut_note

    cut = {"finish_reason": "length", "new_tokens": 128}
    assert cut_note(cut, None, 4096) == cut_note(cut, 128, 4096) == "(reply cut at 128 tokens: --max-new-tokens)"
    assert cut_note(dict(cut, new_tokens=40), None, 100) == \
        "(reply cut at 40 tokens: the context of 100 tokens is full; --context)"
    assert cut_note({"finish_reason": "stop", "new_tokens": 128}, None, 4096) is None
