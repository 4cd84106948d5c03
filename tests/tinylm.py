"""A tiny decoder-only causal LM trained here in seconds: a real Hugging Face folder for the LLM tests.

`make_tiny_lm(folder)` writes what a user downloads from a hub, built offline:

- a byte-level BPE tokenizer trained with the `tokenizers` library on text generated here (a small English
  grammar about objects, colours and places; counting; a chat exchange with facts the model can learn),
  saved through transformers as tokenizer.json + tokenizer_config.json (with a ChatML chat template) +
  special_tokens_map.json;
- a Llama-architecture model (transformers LlamaForCausalLM: 4 layers, hidden 128, 4 query heads over
  2 key/value heads (GQA), SwiGLU 256, untied lm_head), trained for `steps` AdamW steps on that text so its
  next-token predictions are far from uniform (its loss falls from ln(vocab) ~ 6.2 nats to ~1);
- config.json, model.safetensors, generation_config.json.

`corpus_text(n, seed)` gives more text of the same kind (held-out text for --val with another seed).
The `tiny_lm` fixture (session-scoped; import it into a test module: `from tinylm import tiny_lm`) builds
one folder per test session.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List

import pytest

VOCAB = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SUBJECTS = ["the robot", "a small cat", "the old engineer", "my neighbour", "the red train", "a tall teacher",
             "the quiet child", "our driver", "the busy baker", "a young pilot", "the farmer", "the doctor"]
_VERBS = ["moves", "carries", "paints", "repairs", "finds", "opens", "cleans", "builds", "sells", "watches"]
_OBJECTS = ["box", "door", "lamp", "bicycle", "window", "table", "basket", "clock", "radio", "garden"]
_PLACES = ["kitchen", "station", "market", "school", "harbour", "library", "factory", "bridge"]
_TIMES = ["in the morning", "at noon", "every evening", "on monday", "after the rain", "before dinner"]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
# facts the chat exchanges teach: each object has one colour
_COLOURS = dict(zip(_OBJECTS, ["red", "blue", "green", "yellow", "black", "white", "brown", "orange",
                               "grey", "purple"]))


def _sentence(r: random.Random) -> str:
    obj = r.choice(_OBJECTS)
    kind = r.random()
    if kind < 0.45:
        return (f"{r.choice(_SUBJECTS)} {r.choice(_VERBS)} the {_COLOURS[obj]} {obj} "
                f"to the {r.choice(_PLACES)} {r.choice(_TIMES)}.").capitalize()
    if kind < 0.65:
        start = r.randrange(0, len(_NUMBERS) - 4)
        return "Count: " + " ".join(_NUMBERS[start:start + r.randint(3, 6)]) + "."
    if kind < 0.85:
        return f"The {obj} in the {r.choice(_PLACES)} is {_COLOURS[obj]}, and {r.choice(_SUBJECTS)} likes it."
    return (f"<|im_start|>user\nWhat colour is the {obj}?<|im_end|>\n"
            f"<|im_start|>assistant\nThe {obj} is {_COLOURS[obj]}.<|im_end|>\n")


def corpus_text(n: int = 400, seed: int = 0) -> str:
    """`n` sentences of the tiny LM's language (another seed: held-out text of the same kind)."""
    r = random.Random(seed)
    return "\n".join(_sentence(r) for _ in range(n)) + "\n"


def _tokenizer(text: str, folder: Path):
    """A byte-level BPE trained on `text`, saved through transformers (the files a hub folder has)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None, model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    # a GPT-2-style byte-level BPE: the class name runtimes (ORT GenAI's tokenizer) recognise
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return fast


def train_steps(model, ids, steps: int, seed: int = 0) -> None:
    """`steps` of AdamW (lr 3e-3) on 8 random 64-token windows of `ids` (a 1-D LongTensor), on one torch thread;
    the model is left in eval mode. The tiny architecture and tokenizer models' training (test_llm_archs,
    test_llm_tokenizers, benchmarks/llm_arch_sweep.py)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
            x = torch.stack([ids[s:s + 64] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def make_tiny_lm(folder, seed: int = 0, steps: int = 150, layers: int = 4, hidden: int = 128) -> Path:
    """Build, train and save a tiny Llama causal LM as a Hugging Face folder; returns the folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = corpus_text(1200, seed)
    tok = _tokenizer(text, folder)
    bos, eos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=bos, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tok.backend_tokenizer.encode(text).ids, dtype=torch.long)
    seq, batch = 64, 16
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses: List[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # small matrices: one thread is ~10x cheaper in CPU time than two on a busy host
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
            x = torch.stack([ids[s:s + seq] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=bos,
                                               do_sample=False, max_length=256)
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "training.json").write_text(json.dumps(
        {"steps": steps, "seed": seed, "loss_first": losses[0], "loss_last": sum(losses[-10:]) / 10,
         "tokens": int(len(ids))}, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny Llama causal LM (HF folder) trained for this test session."""
    return make_tiny_lm(tmp_path_factory.mktemp("tinylm") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_int4_avx2(tiny_lm, tmp_path_factory) -> Path:
    """The tiny Llama converted INT4 for x86-avx2 (4-bit MatMulNBits, an 8-bit lm_head, int8 activations), shared
    read-only by the tests that only load it."""
    from edgekit.convert.llm import LLMRecipe, convert_llm

    out = tmp_path_factory.mktemp("int4build")
    res = convert_llm(LLMRecipe(str(tiny_lm), ("x86-avx2",), precision="int4", name="tinyint4", val_tokens=128),
                      str(out))
    assert [r.ok for r in res.bundles] == [True]
    return out / "tinyint4-x86-avx2-int4"


@pytest.fixture(scope="session")
def tied_lm(tiny_lm, tmp_path_factory) -> Path:
    """The tiny Llama with tied embeddings: its trained lm_head is the table both ends read."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("tied") / "tiny-tied"
    shutil.copytree(tiny_lm, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    w = load_file(str(d / "model.safetensors"))
    w["model.embed_tokens.weight"] = w.pop("lm_head.weight").contiguous()
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d
