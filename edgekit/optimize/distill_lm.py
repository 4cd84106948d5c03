"""Knowledge distillation for causal language models (Hugging Face folders), with torch + transformers.

The student is a folder, or is made from the teacher's own architecture: `layers` of its decoder layers
(evenly spread from the first to the last, or the first N) and MLPs `width` times as wide (the
intermediate units whose activations, measured on the training text, times their down-projection's
norm, are largest: a pruned teacher, as Minitron starts its students), with the teacher's weights
copied in (or a fresh initialisation with init="random"). Same tokenizer.

Losses per token (Hinton et al.; Agarwal et al.'s generalized knowledge distillation):

    loss = alpha * CE(text) + (1 - alpha) * T^2 * D(teacher_T || student_T)

D is the forward KL of the temperature-T softened next-token distributions (`divergence="forward"`),
the reverse KL (mode-seeking: KL(student || teacher)) or their generalized Jensen-Shannon (beta 0.5).
`on_policy` = lambda: that fraction of steps trains on sequences the student samples itself (prompted
with the first half of a training block), scored by the teacher's distribution on them, D only
(no text to compare with): the student learns from its own mistakes, not only from the teacher's
text. `prompts`: the teacher answers each prompt (greedy, chat template applied) and the student is
also trained on those answers (loss on the answer tokens only): sequence-level distillation, as the
DeepSeek-R1-Distill models were made.

`baseline`: the same student (the same initial weights) is trained for the same steps on the same
text blocks in the same order with CE alone (no teacher logits, no teacher answers), so the gain
from the teacher is measured on the held-out text, not assumed.

Training state is checkpointed beside the output (`<out>.ckpt/`: the initial student, the step, the
optimizer, the learning-rate schedule) every `save_every` steps and at the end of each epoch; `resume`
continues from it (with the same settings) and a finished run removes it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from edgekit.errors import DataError, SourceModelError
from edgekit.optimize import lm

DIVERGENCES = ("forward", "reverse", "jsd")
_DOWN_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")


@dataclass(frozen=True)
class LMDistillConfig:
    """Every setting of a run; an impossible combination is refused here, before any model is read."""

    teacher: str
    data: str
    student: Optional[str] = None
    layers: Optional[int] = None
    width: Optional[float] = None
    layer_pick: str = "spread"
    init: str = "teacher"
    val: Optional[str] = None
    prompts: Optional[str] = None
    temperature: float = 1.0
    alpha: float = 0.5
    divergence: str = "forward"
    on_policy: float = 0.0
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-4
    warmup: float = 0.05
    max_new_tokens: int = 128
    seed: int = 0
    baseline: bool = False
    device: Optional[str] = None
    save_every: int = 200

    def __post_init__(self):
        derived = self.layers is not None or self.width is not None
        if (self.student is None) == (not derived):
            raise DataError("give the student as --student FOLDER, or derive it from the teacher with --layers N "
                            "and/or --width F (one way, not both)")
        if self.layers is not None and self.layers < 1:
            raise DataError(f"--layers must be >= 1, not {self.layers}")
        if self.width is not None and not 0.0 < self.width <= 1.0:
            raise DataError(f"--width must be in (0, 1], not {self.width}")
        if self.layer_pick not in ("spread", "first"):
            raise DataError(f"--layer-pick must be spread or first, not {self.layer_pick!r}")
        if self.init not in ("teacher", "random"):
            raise DataError(f"--init must be teacher or random, not {self.init!r}")
        if self.temperature <= 0 or not 0.0 <= self.alpha <= 1.0:
            raise DataError("--temperature must be > 0 and --alpha in [0, 1]")
        if self.divergence not in DIVERGENCES:
            raise DataError(f"--divergence must be one of {', '.join(DIVERGENCES)}, not {self.divergence!r}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise DataError(f"--on-policy must be a fraction of steps in [0, 1], not {self.on_policy}")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise DataError("--epochs and --max-steps must be >= 1")
        if self.batch_size < 1 or self.lr <= 0 or self.save_every < 1 or self.max_new_tokens < 1:
            raise DataError("--batch-size, --lr, --save-every and --max-new-tokens must be positive")
        if self.alpha == 1.0 and self.on_policy == 0.0 and self.prompts is None:
            raise DataError("--alpha 1 trains on the text alone: the teacher would play no part",
                            hint="use --alpha < 1, --on-policy or --prompts")

    def key(self) -> str:
        """What a checkpoint must have been made with to be resumed (device and checkpointing aside)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("device", "save_every")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --- the student --------------------------------------------------------------------------------------

def decoder_layers(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise SourceModelError(f"{type(model).__name__}: cannot find its decoder layers (model.layers)",
                               hint="give the student as --student FOLDER")
    return layers


def _down(layer):
    mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
    for n in _DOWN_NAMES:
        m = getattr(mlp, n, None)
        if m is not None and hasattr(m, "weight"):
            return m
    return None


def pick_layers(n_teacher: int, n: int, how: str) -> List[int]:
    if n > n_teacher:
        raise DataError(f"--layers {n}: the teacher has only {n_teacher} decoder layers")
    if how == "first" or n == 1:
        return list(range(n))
    return sorted({round(i * (n_teacher - 1) / (n - 1)) for i in range(n)})


def mlp_importance(teacher, train_blocks, layer_ids: List[int], batches: int = 4, batch_size: int = 8):
    """Per kept layer: the mean |input| of each MLP intermediate unit into the down projection on the
    training text, times that unit's column norm in the down projection."""
    torch, _ = lm.import_torch_transformers()
    layers = decoder_layers(teacher)
    sums: Dict[int, Any] = {}
    hooks = []
    for i in layer_ids:
        down = _down(layers[i])
        if down is None:
            raise SourceModelError(f"{type(teacher).__name__}: its MLPs have no down projection named "
                                   f"{'/'.join(_DOWN_NAMES)}; --width cannot narrow them",
                                   hint="derive the student with --layers only, or give --student")

        def hook(mod, args, i=i):
            x = args[0].detach().float().abs().reshape(-1, args[0].shape[-1])
            sums[i] = sums.get(i, 0) + x.sum(0)
        hooks.append(down.register_forward_pre_hook(hook))
    dev = next(teacher.parameters()).device
    try:
        with torch.no_grad():
            for b in range(min(batches, max(1, len(train_blocks) // batch_size))):
                teacher(input_ids=train_blocks[b * batch_size:(b + 1) * batch_size].to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {i: (sums[i].cpu() * _down(layers[i]).weight.detach().float().norm(dim=0).cpu()) for i in layer_ids}


def derive_student(teacher, layers: Optional[int], width: Optional[float], how: str, init: str, train_blocks,
                   seed: int) -> Tuple[Any, Dict[str, Any]]:
    torch, transformers = lm.import_torch_transformers()
    cfg = copy.deepcopy(teacher.config)
    n_t = int(cfg.num_hidden_layers)
    ids = pick_layers(n_t, layers or n_t, how)
    cfg.num_hidden_layers = len(ids)
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n_t:
        cfg.layer_types = [cfg.layer_types[i] for i in ids]
    i_t = getattr(cfg, "intermediate_size", None)
    keep: Dict[int, Any] = {}
    if width is not None and width < 1.0:
        if not isinstance(i_t, int):
            raise SourceModelError(f"{type(teacher).__name__}: its config has no intermediate_size to narrow",
                                   hint="derive the student with --layers only, or give --student")
        cfg.intermediate_size = max(1, int(round(i_t * width)))
        if init == "teacher":
            imp = mlp_importance(teacher, train_blocks, ids)
            keep = {i: torch.sort(torch.argsort(imp[i], descending=True)[:cfg.intermediate_size]).values for i in ids}
    torch.manual_seed(seed)
    student = transformers.AutoModelForCausalLM.from_config(cfg).float()
    info = {"layers_kept": ids, "teacher_layers": n_t, "intermediate_size": getattr(cfg, "intermediate_size", None),
            "teacher_intermediate_size": i_t, "init": init}
    if init == "random":
        return student, info
    t_sd = teacher.state_dict()
    new_sd = {}
    pat = re.compile(r"(^|\.)(layers|h)\.(\d+)\.")
    for k, v in student.state_dict().items():
        m = pat.search(k)
        j = int(m.group(3)) if m else None
        src = pat.sub(lambda mm: f"{mm.group(1)}{mm.group(2)}.{ids[j]}.", k, count=1) if m else k
        if src not in t_sd:
            raise SourceModelError(f"the derived student's weight {k} has no counterpart {src} in the teacher")
        w = t_sd[src].detach().float().cpu()
        if w.shape != v.shape:
            w = _narrow(w, v.shape, i_t, keep.get(ids[j]) if j is not None else None, k)
        new_sd[k] = w.clone()
    student.load_state_dict(new_sd)
    return student, info


def _narrow(w, shape, i_t, keep, name):
    for d, (a, b) in enumerate(zip(w.shape, shape)):
        if a != b:
            if a != i_t or keep is None or len(keep) != b:
                raise SourceModelError(f"cannot narrow {name} from {tuple(w.shape)} to {tuple(shape)}",
                                       hint="give the student as --student FOLDER")
            w = w.index_select(d, keep)
    return w


# --- training items -----------------------------------------------------------------------------------

@dataclass
class Items:
    ids: Any      # [N, L] long
    attn: Any     # [N, L] long: 1 where a token is
    loss: Any     # [N, L] float: 1 where the token is a target (its prediction from the one before is scored)
    n_text: int   # the first n_text rows are text blocks; the rest teacher answers

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def text_items(blocks) -> Items:
    torch, _ = lm.import_torch_transformers()
    return Items(blocks, torch.ones_like(blocks), torch.ones(blocks.shape, dtype=torch.float32), len(blocks))


def teacher_answers(teacher, tok, prompts_path: str, max_new_tokens: int, cache: Path,
                    say: Callable[[str], None], batch_size: int = 8) -> List[Dict[str, str]]:
    """The teacher's greedy answer to each prompt (cached in the checkpoint directory)."""
    torch, _ = lm.import_torch_transformers()
    if cache.is_file():
        return [json.loads(x) for x in cache.read_text().splitlines() if x.strip()]
    docs = []
    for d in lm.read_docs(prompts_path, "prompts"):  # a .txt file: one prompt a line
        docs += [lm.Doc(prompt=x.strip(), where=d.where) for x in d.text.splitlines() if x.strip()] \
            if d.text is not None else [d]
    texts = [lm.prompt_text(tok, d) for d in docs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dev = next(teacher.parameters()).device
    out: List[Dict[str, str]] = []
    t0 = time.monotonic()
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        enc = [tok(t, add_special_tokens=False)["input_ids"] for t in chunk]
        width = max(len(e) for e in enc)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=dev)
        attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=dev)
        with torch.no_grad():
            gen = teacher.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        for t, g in zip(chunk, gen[:, width:].tolist()):
            if tok.eos_token_id in g:
                g = g[:g.index(tok.eos_token_id)]
            out.append({"prompt": t, "answer": tok.decode(g, skip_special_tokens=False)})
        say(f"  teacher answered {len(out)}/{len(texts)} prompts ({time.monotonic() - t0:.0f} s)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in out))
    os.replace(tmp, cache)
    return out


def answer_items(tok, answers: List[Dict[str, str]], seq_len: int) -> Tuple[Optional[Items], int]:
    """Prompt + answer sequences, right-padded to seq_len, scored on the answer tokens only
    (and the end of the answer); the number that did not fit is returned beside."""
    torch, _ = lm.import_torch_transformers()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows, attn, loss, dropped = [], [], [], 0
    for a in answers:
        p = tok(a["prompt"], add_special_tokens=False)["input_ids"]
        r = tok(a["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(p) + 1 >= seq_len or not a["answer"].strip():
            dropped += 1
            continue
        x = (p + r)[:seq_len]
        n = len(x)
        rows.append(x + [pad] * (seq_len - n))
        attn.append([1] * n + [0] * (seq_len - n))
        loss.append([0.0] * len(p) + [1.0] * (n - len(p)) + [0.0] * (seq_len - n))
    if not rows:
        return None, dropped
    return Items(torch.tensor(rows), torch.tensor(attn), torch.tensor(loss), 0), dropped


def join(a: Items, b: Optional[Items]) -> Items:
    torch, _ = lm.import_torch_transformers()
    if b is None:
        return a
    return Items(torch.cat([a.ids, b.ids]), torch.cat([a.attn, b.attn]), torch.cat([a.loss, b.loss]), a.n_text)


# --- losses -------------------------------------------------------------------------------------------

def divergence(t_logits, s_logits, kind: str, temperature: float):
    """Per-token divergence [..] of the temperature-softened next-token distributions."""
    torch, _ = lm.import_torch_transformers()
    lt = torch.log_softmax(t_logits.float() / temperature, -1)
    ls = torch.log_softmax(s_logits.float() / temperature, -1)
    if kind == "forward":
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "reverse":
        return (ls.exp() * (ls - lt)).sum(-1)
    lm_ = torch.logsumexp(torch.stack([lt, ls]), 0) - math.log(2.0)  # log of the mixture, beta 0.5
    return 0.5 * (lt.exp() * (lt - lm_)).sum(-1) + 0.5 * (ls.exp() * (ls - lm_)).sum(-1)


def _masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp_min(1.0)


# --- the training loop --------------------------------------------------------------------------------

class _Trainer:
    def __init__(self, cfg: LMDistillConfig, student, teacher, tok, items: Items, held, ckpt: Path, phase: str,
                 say: Callable[[str], None], progress, device: str):
        torch, _ = lm.import_torch_transformers()
        self.torch, self.cfg, self.student, self.teacher, self.tok = torch, cfg, student, teacher, tok
        self.items, self.held, self.ckpt, self.phase, self.say, self.device = items, held, ckpt, phase, say, device
        self.progress = progress
        n = len(items)
        self.bs = min(cfg.batch_size, n)
        self.per_epoch = max(1, n // self.bs)
        self.total = cfg.epochs * self.per_epoch if cfg.max_steps is None else min(cfg.max_steps,
                                                                                   cfg.epochs * self.per_epoch)
        self.opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        warm = max(1, int(cfg.warmup * self.total))

        def shape(step):
            if step < warm:
                return (step + 1) / warm
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, self.total - warm)))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, shape)
        self.step, self.tokens, self.history = 0, 0, []
        self.seconds = 0.0
        self.use_teacher = phase == "student"
        self.results: Dict[str, Any] = {}  # finished phases' results, kept in every checkpoint
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # state --------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        return {"phase": self.phase, "step": self.step, "tokens": self.tokens, "history": self.history,
                "seconds": self.seconds, "student": self.student.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "key": self.cfg.key(), "results": self.results}

    def load(self, st: Dict[str, Any]) -> None:
        self.student.load_state_dict(st["student"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.step, self.tokens, self.history = st["step"], st["tokens"], st["history"]
        self.seconds = st.get("seconds", 0.0)

    def save(self) -> None:
        tmp = self.ckpt / f".state.pt.tmp-{os.getpid()}"
        self.torch.save(self.state(), tmp)
        os.replace(tmp, self.ckpt / "state.pt")

    # steps ---------------------------------------------------------------------------
    def _autocast(self):
        import contextlib

        if self.device.startswith("cuda"):
            return self.torch.autocast("cuda", dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def _logits(self, model, ids, attn):
        with self._autocast():
            return model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()

    def _text_loss(self, ids, attn, lmask):
        torch, cfg = self.torch, self.cfg
        s = self._logits(self.student, ids, attn)[:, :-1]
        tgt = ids[:, 1:]
        m = lmask[:, 1:] * attn[:, 1:]
        ce = _masked_mean(torch.nn.functional.cross_entropy(s.transpose(1, 2), tgt, reduction="none"), m)
        if not self.use_teacher or cfg.alpha == 1.0:
            return ce, {"ce": float(ce.detach())}
        with torch.no_grad():
            t = self._logits(self.teacher, ids, attn)[:, :-1]
        kd = _masked_mean(divergence(t, s, cfg.divergence, cfg.temperature), m)
        loss = cfg.alpha * ce + (1.0 - cfg.alpha) * cfg.temperature ** 2 * kd
        return loss, {"ce": float(ce.detach()), "kd": float(kd.detach())}

    def _on_policy_loss(self, ids):
        """The student continues the first half of each block (sampling); D on the sampled tokens."""
        torch, cfg = self.torch, self.cfg
        half = ids.shape[1] // 2
        self.student.eval()
        with torch.no_grad():
            gen = self.student.generate(input_ids=ids[:, :half], attention_mask=torch.ones_like(ids[:, :half]),
                                        do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                        max_new_tokens=ids.shape[1] - half, min_new_tokens=1,
                                        pad_token_id=self.pad, eos_token_id=self.tok.eos_token_id)
        self.student.train()
        new = gen[:, half:]
        eos = (new == self.tok.eos_token_id).int()
        after = (eos.cumsum(1) - eos) > 0        # tokens after the first end-of-sequence are padding
        m = torch.zeros(gen.shape, dtype=torch.float32, device=gen.device)
        m[:, half:] = (~after).float()
        attn = torch.ones_like(gen)
        attn[:, half:] = (~after).long()
        s = self._logits(self.student, gen, attn)[:, :-1]
        with torch.no_grad():
            t = self._logits(self.teacher, gen, attn)[:, :-1]
        kd = _masked_mean(divergence(t, s, cfg.divergence, cfg.temperature), m[:, 1:])
        return cfg.temperature ** 2 * kd, {"kd_on_policy": float(kd.detach())}, int(m.sum())

    def run(self) -> None:
        torch, cfg = self.torch, self.cfg
        self.student.train()
        tick = self.progress.ticker(f"{self.phase}: training", " steps")
        t_last, tok_last = time.monotonic(), self.tokens
        while self.step < self.total:
            epoch, within = divmod(self.step, self.per_epoch)
            g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
            order = torch.randperm(len(self.items), generator=g)
            idx = order[within * self.bs:(within + 1) * self.bs]
            t0 = time.monotonic()
            on_policy = (self.use_teacher and cfg.on_policy > 0
                         and random.Random(cfg.seed * 1000003 + self.step).random() < cfg.on_policy)
            if on_policy:
                ids = self.items.ids[idx % max(1, self.items.n_text)].to(self.device)
                loss, parts, n_tok = self._on_policy_loss(ids)
            else:
                ids = self.items.ids[idx].to(self.device)
                attn = self.items.attn[idx].to(self.device)
                loss, parts = self._text_loss(ids, attn, self.items.loss[idx].to(self.device))
                n_tok = int(attn.sum())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            self.step += 1
            self.tokens += n_tok
            self.seconds += time.monotonic() - t0
            now = time.monotonic()
            rate = (self.tokens - tok_last) / max(1e-9, now - t_last)
            tick(self.step, self.total, f"loss {float(loss.detach()):.3f} {rate:,.0f} tok/s")
            if now - t_last > 5:
                t_last, tok_last = now, self.tokens
            end_of_epoch = self.step % self.per_epoch == 0 or self.step == self.total
            if end_of_epoch:
                ev = lm.evaluate(self.student, self.held, batch_size=cfg.batch_size)
                self.history.append({"step": self.step, "epoch": epoch + 1, "tokens": self.tokens,
                                     "heldout_ppl": ev["ppl"], "train_loss": float(loss.detach()), **parts})
                self.say(f"{self.phase}: epoch {epoch + 1} step {self.step}/{self.total}: held-out perplexity "
                         f"{ev['ppl']:.3f} ({self.tokens:,} tokens, {self.tokens / max(1e-9, self.seconds):,.0f} "
                         "tok/s)")
            if end_of_epoch or self.step % cfg.save_every == 0:
                self.save()
        self.student.eval()


# --- the run ------------------------------------------------------------------------------------------

def _ckpt_dir(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")


def distill_lm(cfg: LMDistillConfig, out: str, *, resume: bool = False, say: Callable[[str], None] = print,
               progress=None, int4_target: Optional[str] = None, bench_tokens: int = 64) -> Dict[str, Any]:
    """Distill cfg.teacher into a student written to `out` (a Hugging Face folder); returns the record."""
    from edgekit.progress import Progress

    torch, transformers = lm.import_torch_transformers(cfg.teacher)
    progress = progress or Progress(enabled=False)
    out_p = Path(out)
    ckpt = _ckpt_dir(out_p)
    state = None
    if (ckpt / "state.pt").is_file() or (ckpt / "init").is_dir():
        if not resume:
            raise DataError("a checkpoint of an earlier run is here", path=str(ckpt),
                            hint="add --resume to continue it, or remove that directory to start again")
        meta = json.loads((ckpt / "run.json").read_text()) if (ckpt / "run.json").is_file() else {}
        if meta.get("key") != cfg.key():
            raise DataError("the checkpoint was made with other settings", path=str(ckpt),
                            hint="resume with the options it was started with, or remove it to start again")
        if (ckpt / "state.pt").is_file():
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    elif resume:
        raise DataError("--resume: no checkpoint to continue", path=str(ckpt))
    device = lm.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    say(f"reading the teacher {cfg.teacher} ({device})")
    teacher, tok = lm.load_lm(cfg.teacher, device, what="teacher")
    train_b, held, held_desc = lm.text_blocks(tok, cfg.data, cfg.seq_len, cfg.val)
    say(f"text: {len(train_b)} training blocks of {cfg.seq_len} tokens; held out: {held_desc}")

    info: Dict[str, Any] = {}
    if (ckpt / "init").is_dir():
        student = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt / "init"), dtype=torch.float32)
        info = json.loads((ckpt / "init" / "edgekit_student.json").read_text())
    elif cfg.student:
        student, stok = lm.load_lm(cfg.student, "cpu", what="student", train=True)
        if stok.get_vocab() != tok.get_vocab():
            raise SourceModelError("the student's tokenizer is not the teacher's: logits cannot be compared token "
                                   "by token", path=cfg.student, hint="give a student with the teacher's vocabulary")
        info = {"from": cfg.student}
    else:
        student, info = derive_student(teacher, cfg.layers, cfg.width, cfg.layer_pick, cfg.init, train_b, cfg.seed)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "run.json").write_text(json.dumps({"key": cfg.key(), "settings": asdict(cfg)}, indent=2))
    if not (ckpt / "init").is_dir():
        lm.save_lm(student, tok, ckpt / "init", extra={"edgekit_student.json": info})
    student.to(device)

    items = text_items(train_b)
    sft_dropped, n_answers = 0, 0
    if cfg.prompts:
        say(f"the teacher answers the prompts in {cfg.prompts} (greedy, up to {cfg.max_new_tokens} tokens)")
        answers = teacher_answers(teacher, tok, cfg.prompts, cfg.max_new_tokens, ckpt / "answers.jsonl", say)
        sft, sft_dropped = answer_items(tok, answers, cfg.seq_len)
        n_answers = 0 if sft is None else len(sft)
        items = join(items, sft)

    results: Dict[str, Any] = dict(state.get("results", {})) if state else {}
    phases = ["student"] + (["baseline"] if cfg.baseline else [])
    for phase in phases:
        if phase in results:
            continue
        if phase == "baseline":
            student = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt / "init"), dtype=torch.float32)
            student.to(device)
            say("training the same student from the same weights on the same text without the teacher (baseline)")
        else:
            say(f"distilling: student {lm.fmt_count(lm.params(student))} parameters, teacher "
                f"{lm.fmt_count(lm.params(teacher))}; T={cfg.temperature}, alpha={cfg.alpha}, {cfg.divergence} KL"
                + (f", on-policy {cfg.on_policy:.0%} of steps" if cfg.on_policy else "")
                + (f", {n_answers} teacher answers" if n_answers else ""))
        tr = _Trainer(cfg, student, teacher, tok, items if phase == "student" else text_items(train_b), held, ckpt,
                      phase, say, progress, device)
        tr.results = results
        if state is not None and state.get("phase") == phase:
            tr.load(state)
            say(f"{phase}: resumed at step {tr.step}/{tr.total}")
        tr.run()
        ev = lm.evaluate(student, held, teacher=teacher, batch_size=cfg.batch_size)
        results[phase] = {"params": lm.params(student), "params_non_embedding": lm.params(student, non_embedding=True),
                          "heldout": ev, "steps": tr.step, "tokens": tr.tokens, "train_seconds": tr.seconds,
                          "tokens_per_s": tr.tokens / max(1e-9, tr.seconds), "history": tr.history}
        if phase == "student":
            lm.save_lm(student, tok, out_p, extra={"edgekit_distill.json": {"teacher": str(cfg.teacher), **info}})
            say(f"student saved: {out_p}")
        st = tr.state()
        st["phase"] = "done:" + phase
        tmp = ckpt / f".state.pt.tmp-{os.getpid()}"
        torch.save(st, tmp)
        os.replace(tmp, ckpt / "state.pt")
        state = None
        del tr

    t_ev = lm.evaluate(teacher, held, batch_size=cfg.batch_size)
    rec: Dict[str, Any] = {
        "kind": "causal-lm", "settings": asdict(cfg), "device": device, "student_made": info,
        "heldout_text": held_desc, "heldout_tokens": t_ev["tokens"], "train_blocks": len(train_b),
        "teacher_answers": n_answers, "teacher_answers_dropped": sft_dropped,
        "teacher": {"path": str(cfg.teacher), "params": lm.params(teacher),
                    "params_non_embedding": lm.params(teacher, non_embedding=True), "heldout": t_ev},
        "student": {"path": str(out_p), **results["student"]},
    }
    if "baseline" in results:
        b = results["baseline"]
        rec["baseline"] = {**b, "note": "the same student and initial weights, same steps on the same text blocks, "
                                        "cross-entropy only (no teacher logits, no teacher answers)"}
        rec["ppl_reduction_vs_baseline"] = 1.0 - rec["student"]["heldout"]["ppl"] / b["heldout"]["ppl"]
    rec["int4"] = int4_decode(rec, int4_target, out_p, bench_tokens, say) if int4_target else \
        {"measured": False, "why": "no INT4 target given (--int4-target NAME converts teacher and student and "
                                   "measures their decode speed)"}
    rec["saved"] = str(out_p)
    shutil.rmtree(ckpt, ignore_errors=True)
    return rec


def int4_decode(rec: Dict[str, Any], target: str, student_dir: Path, new_tokens: int,
                say: Callable[[str], None]) -> Dict[str, Any]:
    """Teacher and student (and the baseline, when saved) converted to INT4 LLM bundles for `target` and
    their decode speed measured here; the bundles go to <student>.int4/."""
    out = student_dir.with_name(student_dir.name + ".int4")
    res: Dict[str, Any] = {"measured": True, "target": target, "bundles": str(out)}
    for who in ("teacher", "student"):
        src = Path(rec[who]["path"])
        res[who] = lm.int4_bundle(src, target, out, name=f"{who}-{src.name}", val=rec["settings"].get("val"),
                                  bench_tokens=new_tokens, say=say)
    return res


__all__ = ["LMDistillConfig", "distill_lm", "derive_student", "divergence", "pick_layers"]
