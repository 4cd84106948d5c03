"""Fidelity of a language-model build, as llama.cpp's `perplexity --kl-divergence` measures it.

Against the float model (torch, float32, on this machine) on the same token windows, teacher-forced (the
reference's tokens are fed whatever either model predicts, so one early divergence does not spoil the rest):

- perplexity of the float model and of the build on the text (`ppl_float`, `ppl`, `ppl_increase` = ratio - 1);
- mean KL divergence KL(float || build) of the next-token distributions (nats), and its 99th percentile;
- top-1 agreement: the fraction of positions where both predict the same next token.

The build runs in ONNX Runtime (its model.onnx, every position's logits at once from an empty KV cache), so its
figures are MLAS's MatMulNBits kernels at the build's accuracy_level: the same arithmetic as the target's CPU
kernels where the target's kernel family matches (int8-activation blocks on VNNI/AVX2/ARM sdot, or fp32
compute), which the manifest's `numerics` says.

Text: `--val FILE.txt` (held-out text, cut into windows), or, without it, the float model's own greedy
continuations of built-in prompts (said so in the manifest: that text is easy for the float model by
construction, so its perplexity is low and the increase is what matters).

Only this module and edgekit.convert.llm import torch / transformers (on the converting machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from edgekit.errors import DataError, EdgekitError, SourceModelError
from edgekit.runtime.llmopts import kv_floor

BUILTIN_PROMPTS = (
    "The history of the printing press begins",
    "To keep a small garden healthy through a dry summer, you should",
    "A customer writes: my order arrived damaged. A helpful reply is:",
    "Photosynthesis is the process by which plants",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three most important things to check before a long train journey are",
    "In a small town by the sea, an old clockmaker",
    "Water boils at a lower temperature on a mountain because",
)


@dataclass(frozen=True)
class LLMFloor:
    """What a language-model build must keep of the float model (docs/llm.md: how the defaults were chosen).

    max_ppl_increase: perplexity ratio - 1 (0.10 = +10%); max_kl: mean KL(float || build) in nats;
    min_agreement: teacher-forced top-1 agreement, a fraction 0..1. None: not checked."""

    max_ppl_increase: Optional[float] = 0.10
    max_kl: Optional[float] = 0.10
    min_agreement: Optional[float] = 0.80

    def __post_init__(self) -> None:
        for name in ("max_ppl_increase", "max_kl"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement is a fraction 0..1, got {self.min_agreement}")

    def misses(self, m: Dict[str, Any]) -> List[str]:
        """What a build's metrics miss, one phrase each (empty: it meets the floor)."""
        out = []
        if self.max_ppl_increase is not None and m["ppl_increase"] > self.max_ppl_increase:
            out.append(f"perplexity +{100 * m['ppl_increase']:.1f}% > +{100 * self.max_ppl_increase:.1f}%")
        if self.max_kl is not None and m["kl_mean"] > self.max_kl:
            out.append(f"KL {m['kl_mean']:.4f} > {self.max_kl:.4f}")
        if self.min_agreement is not None and m["top1_agreement"] < self.min_agreement:
            out.append(f"top-1 agreement {100 * m['top1_agreement']:.1f}% < {100 * self.min_agreement:.1f}%")
        return out

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class EvalText:
    """Token windows the float model and every build are compared on."""

    source: str                                   # what the text is (for the manifest and the report)
    windows: List[np.ndarray]                     # int64 token ids, one window per teacher-forced run
    prompts: List[str] = field(default_factory=list)   # the built-in prompts, when the text was generated
    starts: List[int] = field(default_factory=list)    # per window: the first token scored (0: all but BOS)

    def __post_init__(self) -> None:
        if not self.starts:
            self.starts = [1] * len(self.windows)

    @property
    def tokens(self) -> int:
        """Tokens scored (predicted from the ones before them)."""
        return int(sum(len(w) - s for w, s in zip(self.windows, self.starts)))


def load_error(folder: Path, what: str, e: BaseException, hint: Optional[str] = None) -> SourceModelError:
    """transformers failing to read a folder read_source took (weights cut short or corrupt, a quantization_config
    whose library is missing, a class it cannot build): one line naming the folder and the cause's first line."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return SourceModelError(f"transformers cannot load the {what}: {type(e).__name__}" + (f": {first[:300]}"
                                                                                         if first else ""),
                            path=str(folder),
                            hint=hint if hint else
                            "a machine with more memory, or close other programs" if isinstance(e, MemoryError)
                            else "check the files are complete (an interrupted download or a Git LFS pointer: "
                                 "fetch them again) and that any library its config.json's quantization_config "
                                 "names is installed; --debug shows the traceback")


@contextlib.contextmanager
def _captured_load_report():
    """transformers' warnings while it loads weights (its LOAD REPORT of missing / unexpected / mismatched keys) kept
    out of the terminal: the lines are collected into the list yielded (check_loading_info says what matters)."""
    import logging

    lines: List[str] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("transformers.modeling_utils")
    handler, propagate = _Keep(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _natural(name: str):
    """'model.layers.10.x' after 'model.layers.4.x' (numbers compared as numbers)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def check_loading_info(folder: Path, model, info: Dict[str, Any]) -> None:
    """Refuse a model transformers built otherwise than the checkpoint's weights (from_pretrained's
    output_loading_info): weights the model has that the checkpoint lacks (initialised at random: a config.json
    without num_hidden_layers builds transformers' default of 32 layers; every name with a prefix such as
    `base_model.`), weights the checkpoint has that the model does not take (config.json naming fewer layers than
    the weights hold: a truncated model, measured against itself), and weights of another shape. Names transformers
    itself lets go (a tied lm_head, its _keys_to_ignore_on_load_* patterns, old rotary buffers) are not in the info."""
    missing = sorted(info.get("missing_keys") or (), key=_natural)
    unexpected = sorted(info.get("unexpected_keys") or (), key=_natural)
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda t: _natural(str(t[0])))
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) missing (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
    if mismatched:
        name, ckpt, built = mismatched[0][:3]
        parts.append(f"{len(mismatched)} of another shape (first {name}: {list(ckpt)} in the checkpoint, "
                     f"{list(built)} from config.json)")
    try:
        layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    except (AttributeError, ValueError):
        layers = None
    raise SourceModelError("config.json does not match the weights: " + ", ".join(parts), path=str(folder),
                           hint="check config.json's num_hidden_layers" + (f" ({layers} layers built)" if layers
                                                                             else "")
                                + " and sizes against the weights, and the weight names' prefix (no 'base_model.' "
                                  "or 'model.model.'); or fetch the checkpoint again")


# generate()'s options that change which token a greedy or sampled step picks (logits processors), at the values
# that leave the logits alone. transformers 5 fills every option a call leaves unset (None) from the checkpoint's
# generation_config.json: Qwen2.5-Instruct's repetition_penalty 1.1, other checkpoints' no_repeat_ngram_size,
# suppress_tokens, forced_eos_token_id..., and the converter's text (the float model's own continuations, the
# calibration text) was then not the model's plain continuation
PLAIN_GENERATION = dict(num_beams=1, num_beam_groups=1, diversity_penalty=0.0, repetition_penalty=1.0,
                        encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
                        length_penalty=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                        renormalize_logits=False, remove_invalid_values=False)
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def plain_generate(model, ids, attention_mask, **options):
    """model.generate(ids) as plain greedy (do_sample=False) or plain sampling (do_sample=True, temperature /
    top_p / top_k as given): PLAIN_GENERATION over the checkpoint's generation_config, which for the call keeps
    only its special token ids (EOS: min_new_tokens holds it back), so no processor it names (a list-valued one:
    suppress_tokens, bad_words_ids, sequence_bias, whose unset value is None) fills in the options."""
    from transformers import GenerationConfig

    own = model.generation_config
    ids_only = {k: getattr(own, k, None) for k in _SPECIAL_IDS}
    model.generation_config = GenerationConfig(**{k: v for k, v in ids_only.items() if v is not None})
    try:
        return model.generate(ids, attention_mask=attention_mask,
                              generation_config=GenerationConfig(**dict(PLAIN_GENERATION, **options)))
    finally:
        model.generation_config = own


class FloatModel:
    """The source model in torch float32: the reference every build is measured against."""

    def __init__(self, folder: Path, threads: Optional[int] = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()   # its "Loading weights" bar is noise in edgekit's progress lines
        self.torch = torch
        self.folder = Path(folder)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except EdgekitError:
            raise
        except Exception as e:
            raise load_error(self.folder, "tokenizer", e) from e
        self._auto = AutoModelForCausalLM
        self._model = None   # read now (the parameter count) and by .model after a release() dropped it
        self.load_report = ""   # transformers' warnings while loading the weights (for the convert log)
        self.params = int(sum(p.numel() for p in self.model.parameters()))
        self._ref: Dict[int, np.ndarray] = {}
        torch.set_num_threads(threads or free_cores())

    @property
    def model(self):
        """The torch model, read from the folder again if release() dropped it."""
        if self._model is None:
            try:
                # shapes that differ are loaded (and refused by check_loading_info in one line), not raised on
                # after a report the terminal does not show
                with _captured_load_report() as report:
                    m, info = self._auto.from_pretrained(str(self.folder), dtype=self.torch.float32,
                                                         output_loading_info=True, ignore_mismatched_sizes=True)
            except EdgekitError:
                raise
            except Exception as e:
                raise load_error(self.folder, "float model", e) from e
            self.load_report = "\n".join(report)
            check_loading_info(self.folder, m, info)
            m.eval()
            split_gate_up(m)   # Phi-3's fused gate_up_proj as the builder writes it: two MatMuls, two Linears
            self._model = m
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def release(self) -> bool:
        """Drop the torch weights (float32: 4 bytes a parameter) until the next use of .model; True if held."""
        if self._model is None:
            return False
        import gc

        self._model = None
        gc.collect()
        from edgekit.runtime.llmopts import trim_heap

        trim_heap()   # glibc keeps freed blocks below its raised mmap threshold in the heap until trimmed
        return True

    # --- text -------------------------------------------------------------------------------------------------

    def _bos(self) -> List[int]:
        """The token the tokenizer puts first on its own (BOS), if it does."""
        t = self.tokenizer
        probe = t("a", add_special_tokens=True)["input_ids"]
        bare = t("a", add_special_tokens=False)["input_ids"]
        return list(probe[: len(probe) - len(bare)]) if probe[-len(bare):] == bare else []

    def text_windows(self, text: str, where: str, max_tokens: int, window: int) -> EvalText:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self._bos()
        step = window - len(bos)
        if len(ids) < 16:
            raise DataError(f"only {len(ids)} tokens of text: too short to measure perplexity on", path=where,
                            hint="give at least a paragraph of held-out text (a few hundred tokens)")
        ids = ids[:max_tokens]
        windows = [np.array(bos + ids[i:i + step], dtype=np.int64) for i in range(0, len(ids), step)]
        windows = [w for w in windows if len(w) >= 8]
        return EvalText(f"{where}: {len(ids)} tokens of held-out text in {len(windows)} window(s) of up to "
                        f"{window}", windows)

    def own_continuations(self, max_tokens: int, window: int, prompts=BUILTIN_PROMPTS, tick=None) -> EvalText:
        """Greedy continuations of the built-in prompts (or `prompts`) by the float model itself. tick(done,
        total): called after each prompt (total: the prompts it takes to reach max_tokens). Plain greedy: the
        checkpoint's generation_config processors (repetition_penalty...) left out (plain_generate)."""
        torch, t = self.torch, self.tokenizer
        new = max(16, min(window, max_tokens // len(prompts)))
        bos = self._bos()
        windows, starts = [], []
        total = min(len(prompts), -(-max_tokens // new))
        if tick is not None:
            tick(0, total)   # the clock starts with the first prompt
        for p in prompts:
            ids = torch.tensor([bos + t(p, add_special_tokens=False)["input_ids"]], dtype=torch.long)
            with torch.no_grad():
                out = plain_generate(self.model, ids, torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, pad_token_id=t.pad_token_id if t.pad_token_id is not None
                                     else t.eos_token_id)
            windows.append(out[0].numpy().astype(np.int64))
            starts.append(int(ids.shape[1]))     # the continuation is scored, not the prompt
            if tick is not None:
                tick(len(windows), max(total, len(windows)))
            if sum(len(w) - s for w, s in zip(windows, starts)) >= max_tokens:
                break
        text = EvalText("", windows, prompts=list(prompts[:len(windows)]), starts=starts)
        text.source = (f"no --val given: the float model's own greedy continuations of {len(windows)} built-in "
                       f"prompts ({text.tokens} tokens scored; easy text for the float model by construction)")
        return text

    # --- reference ----------------------------------------------------------------------------------------------

    def logprobs(self, windows: List[np.ndarray]) -> List[np.ndarray]:
        """log-softmax of the float model's logits at every position of each window (cached)."""
        out = []
        for w in windows:
            key = id(w)
            if key not in self._ref:
                self._ref[key] = _log_softmax(self.logits(w))
            out.append(self._ref[key])
        return out

    def logits(self, window: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            return self.model(torch.from_numpy(window[None])).logits[0].float().numpy()


def mem_available() -> Optional[int]:
    """Bytes of memory available now: Linux's MemAvailable, or less where this process's cgroup allows less (a
    container's limit; runtime.llmopts.mem_available_mb), None where /proc does not say."""
    from edgekit.runtime.llmopts import mem_available_mb

    mb = mem_available_mb()
    return None if mb is None else int(mb * 2 ** 20)


def free_cores() -> int:
    """Cores not busy with other work now (at least 1): torch's and MLAS's spinning threads cost several times
    their work on an oversubscribed CPU (measured here: one thread 10x cheaper than two at load 13 on 2 cores)."""
    n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return n
    return max(1, min(n, int(n - busy + 0.5)))


def _decoder_layers(model):
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers",
                 "model.language_model.layers"):   # the last: Gemma3ForConditionalGeneration's text decoder
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise SourceModelError(f"cannot find the decoder layers of {type(model).__name__} (looked at model.layers, "
                           "transformer.h, model.decoder.layers, gpt_neox.layers, model.language_model.layers)",
                           hint="the rescue ladder and --algo awq/gptq need them: --no-rescue with the builder's "
                                "own rounding converts without")


_SPLIT_CLASS: List[Any] = []


def _split_class():
    """The module a fused gate_up_proj Linear becomes (split_gate_up); defined on first use (torch imported late)."""
    if not _SPLIT_CLASS:
        import torch

        class GateUp(torch.nn.Module):
            """Two Linears, gate_proj (the fused weight's first half of rows) and up_proj (the second), whose
            outputs concatenated are the fused Linear's ([gate | up], as Phi3MLP chunks it)."""

            def __init__(self, fused):
                super().__init__()
                half = fused.out_features // 2
                for name, rows in (("gate_proj", slice(0, half)), ("up_proj", slice(half, 2 * half))):
                    lin = torch.nn.Linear(fused.in_features, half, bias=fused.bias is not None,
                                          device="meta", dtype=fused.weight.dtype)
                    lin.weight = torch.nn.Parameter(fused.weight.data[rows], requires_grad=False)
                    if fused.bias is not None:
                        lin.bias = torch.nn.Parameter(fused.bias.data[rows], requires_grad=False)
                    setattr(self, name, lin)

            def forward(self, x):
                return torch.cat([self.gate_proj(x), self.up_proj(x)], -1)

        _SPLIT_CLASS.append(GateUp)
    return _SPLIT_CLASS[0]


def split_gate_up(model) -> int:
    """Each decoder layer's fused `gate_up_proj` Linear (Phi-3, Phi-3.5-mini, Phi-4-mini) replaced in place by two
    Linears `gate_proj` / `up_proj` under it, as ONNX Runtime GenAI's model builder splits it into two MatMuls
    (make_mlp_unpacked_regular: rows [:intermediate_size] gate_proj, the rest up_proj; Phi3MLP chunks its output
    [gate | up] the same way). The model computes what it did (the same weights, the two products concatenated);
    the builder's gate_proj / up_proj nodes then each have a module of their own to measure, calibrate and round
    (llm_sensitivity.matmul_modules, llm_gptq). Idempotent; returns how many were split."""
    import torch

    cls, n = _split_class(), 0
    try:
        layers = _decoder_layers(model)
    except SourceModelError:   # a form whose layers are elsewhere: nothing fused to split there (it was loadable)
        return 0
    for layer in layers:
        for parent in list(layer.modules()):
            fused = getattr(parent, "gate_up_proj", None)
            if (isinstance(fused, torch.nn.Linear) and not fused.out_features % 2
                    and not hasattr(parent, "gate_proj") and not hasattr(parent, "up_proj")):
                parent.gate_up_proj = cls(fused)
                n += 1
    return n


def _fake_quant(w, block: int, bits: int):
    """Symmetric blockwise round-to-nearest along the input dimension (MatMulNBits' layout), back in float."""
    import torch

    out_f, in_f = w.shape
    pad = (-in_f) % block
    x = torch.nn.functional.pad(w, (0, pad)).reshape(out_f, -1, block)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    q = torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale
    return q.reshape(out_f, -1)[:, :in_f].contiguous()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)


def _kl(ref_lp: np.ndarray, q_lp: np.ndarray) -> np.ndarray:
    """KL(ref || q) per position, nats."""
    p = np.exp(ref_lp.astype(np.float64))
    return (p * (ref_lp.astype(np.float64) - q_lp.astype(np.float64))).sum(-1)


# --- the build in ONNX Runtime -----------------------------------------------------------------------------------

class OnnxDecoder:
    """A builder's model.onnx (or a bundle's: its lm_head pruning taken out, llm_graph.unpruned) run
    teacher-forced: all positions of a window at once, empty KV cache, every other recurrent state the graph
    carries (LFM2's short-convolution layers: `past.N.conv` [batch, hidden, L_cache - 1]) zero, as a generation
    starts it. Each window is one pass from that empty state, so no present state is carried between calls."""

    def __init__(self, model_dir: Path, kv_heads: int, head_dim: int, threads: Optional[int] = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or free_cores()
        so.log_severity_level = 3
        # a bundle whose lm_head computes the last position only (llm_graph.prune_lm_head): its graph with the
        # pruning taken out again, over the same external data, so every position's logits come in one pass
        from edgekit.convert.llm_graph import unpruned

        whole = unpruned(model_dir)
        self.unpruned = whole is not None
        if whole is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_dir))
        self.session = ort.InferenceSession(whole.SerializeToString() if whole is not None
                                            else str(Path(model_dir) / "model.onnx"), so,
                                            providers=["CPUExecutionProvider"])
        self.version = ort.__version__
        self.past = []
        for i in self.session.get_inputs():
            if i.name.startswith("past_key_values"):
                dt = np.float16 if "float16" in i.type else np.float32
                heads = i.shape[1] if isinstance(i.shape[1], int) else kv_heads
                dim = i.shape[3] if isinstance(i.shape[3], int) else head_dim
                self.past.append((i.name, heads, dim, dt))
        # the other past states (past.N.conv: ONNX Runtime GenAI starts them at zero): batch 1, the rest as declared
        self.states = []
        for i in self.session.get_inputs():
            if i.name.startswith("past") and not i.name.startswith("past_key_values"):
                rest = list(i.shape[1:])
                if not all(isinstance(d, int) for d in rest):
                    raise NotImplementedError(f"the graph's state input {i.name} has a dimension of no fixed size "
                                              f"({i.shape}): its empty state is unknown to edgekit")
                self.states.append((i.name, [1] + rest, np.float16 if "float16" in i.type else np.float32))
        names = {i.name for i in self.session.get_inputs()}
        self.has_positions = "position_ids" in names
        # the sliding window, as the runtime reads it (genai_config decoder.sliding_window; 0: none)
        self.local_window = kv_floor(json.loads((Path(model_dir) / "genai_config.json").read_text(encoding="utf-8")))

    def logits(self, window: np.ndarray) -> np.ndarray:
        ids = window[None].astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if self.has_positions:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        # an empty cache, as ONNX Runtime GenAI's first step passes it: the KV buffer it shares between past and
        # present (capacity >= the sliding window where the model has one, e.g. Gemma 3's 512) and an attention
        # mask covering the window alone, so no position of the buffer counts as past
        cap = max(ids.shape[1], self.local_window) if self.local_window > 0 else 0
        for name, heads, dim, dt in self.past:
            feed[name] = np.zeros((1, heads, cap, dim), dt)
        for name, shape, dt in self.states:
            feed[name] = np.zeros(shape, dt)
        return self.session.run(["logits"], feed)[0][0].astype(np.float32)


def compare(ref: List[np.ndarray], text: EvalText, quant_logits: List[np.ndarray]) -> Dict[str, Any]:
    """llama.cpp's figures of a build against the float model on the same windows: position i's distribution
    predicts token i+1; tokens from each window's start on are scored."""
    nll_f, nll_q, kls, agree = [], [], [], []
    for r, w, start, ql in zip(ref, text.windows, text.starts, quant_logits):
        q = _log_softmax(ql)
        pos = np.arange(max(start, 1) - 1, len(w) - 1)
        y = w[pos + 1]
        nll_f.append(-r[pos, y].astype(np.float64))
        nll_q.append(-q[pos, y].astype(np.float64))
        kls.append(_kl(r[pos], q[pos]))
        agree.append(r[pos].argmax(-1) == q[pos].argmax(-1))
    nf, nq, kl, ag = (np.concatenate(x) for x in (nll_f, nll_q, kls, agree))
    ppl_f, ppl_q = float(np.exp(nf.mean())), float(np.exp(nq.mean()))
    return {"tokens": int(len(nf)), "ppl_float": ppl_f, "ppl": ppl_q, "ppl_increase": ppl_q / ppl_f - 1.0,
            "kl_mean": float(max(kl.mean(), 0.0)), "kl_p99": float(np.percentile(kl, 99)),
            "top1_agreement": float(ag.mean())}


def golden(decoder: OnnxDecoder, windows: List[np.ndarray], prompts: int = 3, length: int = 32,
           k: int = 8) -> Dict[str, Any]:
    """Golden prompts (token ids) and what the build computes on them here: top-1 per position and the top-k
    logits (ids and values), for the device's teacher-forced agreement and logit SNR."""
    out: Dict[str, Any] = {"prompts": [], "top1": [], "logits_topk": {"k": k, "ids": [], "values": []}}
    pieces = [w[j:j + length] for w in windows for j in range(0, max(1, len(w) - length + 1), length)]
    for p in pieces[::max(1, len(pieces) // prompts)][:prompts]:
        lg = decoder.logits(p)
        top = np.argsort(-lg, axis=-1)[:, :k]
        out["prompts"].append([int(t) for t in p])
        out["top1"].append([int(t) for t in lg.argmax(-1)])
        out["logits_topk"]["ids"].append(top.tolist())
        out["logits_topk"]["values"].append(np.take_along_axis(lg, top, -1).round(5).tolist())
    return out
