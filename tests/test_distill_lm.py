"""Distillation of causal LMs (edgekit distill with a Hugging Face teacher): the gain over the same student
trained without the teacher, measured over seeds; checkpoints that resume to the same weights; teacher
answers and on-policy samples; the student as a folder transformers loads; the user's mistakes."""

import json

import pytest
import torch
from tinylm import corpus_text, tiny_lm  # noqa: F401  (the session's tiny Llama teacher)
from transformers import AutoModelForCausalLM

from edgekit.errors import DataError
from edgekit.optimize.distill_lm import LMDistillConfig, _Trainer, derive_student, distill_lm, divergence, pick_layers
from edgekit.optimize.lm import load_lm, text_blocks

QUIET = dict(say=lambda t: None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one torch thread does it as fast, and does not spin against the rest of the suite."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmtext")
    (d / "train.txt").write_text(corpus_text(500, 11))   # not the teacher's own training text
    (d / "val.txt").write_text(corpus_text(60, 12))
    return d


def _cfg(tiny_lm, text, **kw):  # noqa: F811
    base = dict(teacher=str(tiny_lm), data=str(text / "train.txt"), val=str(text / "val.txt"), layers=2,
                seq_len=32, batch_size=8, lr=3e-3, temperature=1.0, alpha=0.5)
    base.update(kw)
    return LMDistillConfig(**base)


def test_distilled_student_beats_its_baseline_over_seeds(tiny_lm, text, tmp_path):  # noqa: F811
    """Half the teacher's layers, fresh weights, 30 steps: with the teacher's distributions the student's
    held-out perplexity is lower than the same student's (same initial weights, same blocks in the same
    order) trained on the text alone, on every seed and by >= 5% on average."""
    gains = []
    for seed in (0, 1, 2):
        r = distill_lm(_cfg(tiny_lm, text, init="random", max_steps=30, seed=seed, baseline=True),
                       str(tmp_path / f"s{seed}"), **QUIET)
        s, b = r["student"], r["baseline"]
        assert s["steps"] == b["steps"] == 30 and s["tokens"] == b["tokens"] == 30 * 8 * 32
        assert s["params"] == b["params"] < 0.7 * r["teacher"]["params"]
        assert s["heldout"]["kl"] < b["heldout"]["kl"]
        gains.append(r["ppl_reduction_vs_baseline"])
    assert min(gains) > 0.0, gains
    assert sum(gains) / len(gains) >= 0.05, gains


def test_cli_student_folder_record_and_convertible(cli, tiny_lm, text, tmp_path):  # noqa: F811
    out = tmp_path / "student"
    r = cli("distill", "--teacher", tiny_lm, "--layers", "2", "--width", "0.5", "--data", text / "train.txt",
            "--val", text / "val.txt", "--seq-len", "32", "--batch-size", "4", "--max-steps", "6", "--lr", "1e-3",
            "-o", out, "-q", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    rec = json.loads((tmp_path / "student.distill.json").read_text())
    assert rec["student"]["heldout"]["ppl"] == res["student"]["heldout"]["ppl"]
    assert res["student_made"]["layers_kept"] == [0, 3] and res["student_made"]["intermediate_size"] == 128
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.num_hidden_layers == 2 and m.config.intermediate_size == 128
    assert sum(p.numel() for p in m.parameters()) == res["student"]["params"]
    # the teacher-initialised student starts close to the teacher: the KL says so
    assert res["student"]["heldout"]["kl"] < 1.0 and res["student"]["heldout"]["ppl"] < 3 * \
        res["teacher"]["heldout"]["ppl"]
    assert not (tmp_path / "student.ckpt").exists()
    assert res["int4"]["measured"] is False and "--int4-target" in res["int4"]["why"]
    # edgekit report shows the record beside the student's bundles
    from edgekit.report import collect, render

    (tmp_path / "student.convert.json").write_text(json.dumps({"name": "student", "bundles": []}))
    html = render.render(collect.collect(tmp_path))
    assert "language model distillation" in html and f"{res['student']['heldout']['ppl']:.4g}" in html


def test_resume_reaches_the_weights_of_an_uninterrupted_run(tiny_lm, text, tmp_path):  # noqa: F811
    cfg = _cfg(tiny_lm, text, max_steps=8, batch_size=4, save_every=3)
    whole = distill_lm(cfg, str(tmp_path / "whole"), **QUIET)

    class Stop(Exception):
        pass

    class Breaks:  # a progress bar that is interrupted at step 5 (Ctrl-C as far as the run can tell)
        def ticker(self, label, unit=""):
            def tick(done, total, extra=""):
                if done == 5:
                    raise Stop()
            return tick

    with pytest.raises(Stop):
        distill_lm(cfg, str(tmp_path / "part"), progress=Breaks(), **QUIET)
    st = torch.load(tmp_path / "part.ckpt" / "state.pt", weights_only=False)
    assert st["step"] == 3
    with pytest.raises(DataError, match="--resume"):
        distill_lm(cfg, str(tmp_path / "part"), **QUIET)
    with pytest.raises(DataError, match="other settings"):
        distill_lm(_cfg(tiny_lm, text, max_steps=9, batch_size=4, save_every=3), str(tmp_path / "part"),
                   resume=True, **QUIET)
    resumed = distill_lm(cfg, str(tmp_path / "part"), resume=True, **QUIET)
    assert resumed["student"]["steps"] == 8 and resumed["student"]["tokens"] == whole["student"]["tokens"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "part").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_teacher_answers_and_on_policy_samples(tiny_lm, text, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What colour is the {o}?"}) + "\n"
                               for o in ("box", "door", "lamp", "clock")))
    r = distill_lm(_cfg(tiny_lm, text, prompts=str(prompts), on_policy=0.5, divergence="reverse", max_steps=4,
                        batch_size=4, max_new_tokens=12), str(tmp_path / "s"), **QUIET)
    assert r["teacher_answers"] == 4 and r["student"]["steps"] == 4


def test_student_made_from_the_teacher_keeps_its_layers(tiny_lm, text):  # noqa: F811
    teacher, tok = load_lm(tiny_lm)
    train, _, _ = text_blocks(tok, text / "train.txt", 32)
    assert pick_layers(4, 2, "spread") == [0, 3] and pick_layers(4, 3, "first") == [0, 1, 2]
    student, info = derive_student(teacher, 2, None, "spread", "teacher", train, 0)
    ids = train[:2]
    # a 2-layer copy of layers 0 and 3 computes exactly what the teacher does without layers 1 and 2
    del teacher.model.layers[1:3]
    teacher.config.num_hidden_layers = 2
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids, use_cache=False).logits,
                              teacher(input_ids=ids, use_cache=False).logits, atol=1e-4)
    t = torch.randn(3, 7, 11)
    assert float(divergence(t, t, "forward", 1.0).abs().max()) < 1e-5
    assert float(divergence(t, t + torch.randn_like(t), "jsd", 2.0).min()) > 0


@pytest.mark.parametrize("args, words", [
    (["--layers", "9"], "teacher has only 4 decoder layers"),
    (["--layers", "2", "--student", "x"], "one way, not both"),
    (["--layers", "2", "--resume"], "no checkpoint to continue"),
    (["--layers", "2", "--data", "nope.txt"], "training text not found"),
    (["--layers", "2", "--divergence", "forward", "--alpha", "1"], "teacher would play no part"),
])
def test_mistakes_are_one_line(cli, tiny_lm, text, tmp_path, args, words):  # noqa: F811
    r = cli("distill", "--teacher", tiny_lm, "--data", text / "train.txt", "--seq-len", "32", "-o", tmp_path / "s",
            *args)
    assert r.exit_code == 2, r.stdout + r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s.ckpt").exists() and not (tmp_path / "s").exists()


def test_keras_only_options_are_refused_for_keras(cli, tmp_path):
    (tmp_path / "t.keras").write_text("x")
    r = cli("distill", "--teacher", tmp_path / "t.keras", "--layers", "2", "--data", tmp_path / "d.npz")
    assert r.exit_code == 2 and "Hugging Face folder" in r.stderr


def test_trainer_counts_steps_per_epoch(tiny_lm, text):  # noqa: F811
    cfg = _cfg(tiny_lm, text, epochs=2, batch_size=8)
    teacher, tok = load_lm(tiny_lm)
    train, held, _ = text_blocks(tok, text / "train.txt", 32)
    from edgekit.optimize.distill_lm import text_items

    tr = _Trainer(cfg, teacher, None, tok, text_items(train), held, None, "baseline", print, None, "cpu")
    assert tr.per_epoch == len(train) // 8 and tr.total == 2 * tr.per_epoch
