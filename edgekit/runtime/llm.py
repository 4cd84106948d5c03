"""Language models on the device: an LLM bundle (or a bare ONNX Runtime GenAI folder) run with
onnxruntime-genai. Standard library and numpy at import; onnxruntime_genai only when a model loads.

    from edgekit.runtime import load
    lm = load("build/qwen-rpi5-int4")     # an LLM bundle (manifest kind "llm"), or a folder with genai_config.json
    lm.generate("The capital of France is", max_new_tokens=32)             # -> str (greedy)
    for piece in lm.generate(prompt, stream=True, temperature=0.7, seed=1):  # -> iterator of text pieces
        print(piece, end="", flush=True)
    lm.chat([{"role": "user", "content": "hi"}])                           # the bundle's chat template
    conv = lm.conversation(system="You are terse.")                       # the KV cache carries over
    conv.say("What is 2+2?"); conv.say("And times 3?")                    # turn 2 prefills only its tokens
    lm.benchmark(prompt_tokens=128, new_tokens=128, runs=3)               # TTFT, prefill/decode tok/s, RSS
    lm.check()                                                            # the golden health check

Generation options, the same for generate / chat / Conversation.say / search_options:
    max_new_tokens=128, temperature=0.0 (0: greedy; > 0: sampling), top_p=1.0, top_k=0 (0: no limit),
    seed=None (sampling: the same seed gives the same text), stop=None (a string or a list: the text ends
    before the first one, which is not returned), repetition_penalty=1.0, stream=False.
A prompt that does not fit the context is a DataError; max_new_tokens is clamped to the context left.

After each generation (after the stream is exhausted or closed), `lm.last` holds its figures:
    {"prompt_tokens", "prefill_tokens" (tokens run through the model before the first new one: all of
     the prompt for generate/chat, only the new ones in a conversation's later turns), "new_tokens",
     "ttft_ms" (call to first token), "prefill_ms" (the prefill_tokens' run alone), "carry_ms" (a
     conversation's later turn after a reply cut by max_new_tokens, a stop string or its consumer: the run of
     that reply's last token, sampled but not yet run through the model, one decode step; None elsewhere;
     ttft_ms includes it), "decode_ms", "decode_tok_s", "finish_reason"
     ("stop": end of sequence or a stop string, "length": max_new_tokens or the context, "interrupted":
     the consumer stopped early or Ctrl-C)}.

For batching servers (edgekit.serve) the ONNX Runtime GenAI handles are attributes:
    lm.og_model (onnxruntime_genai.Model, threads applied), lm.og_tokenizer (onnxruntime_genai.Tokenizer),
    lm.search_options(**generation options) -> the dict for GeneratorParams.set_search_options
    (max_length still to be added: prompt + new tokens), lm.encode(text) / lm.decode(ids),
    lm.prompt_ids(messages) (the chat template applied and tokenized as templated text), lm.eos_token_ids,
    lm.context (the sequence length used: the bundle's llm.context_default, at most the model's own
    lm.max_context; settable), lm.tokenizer (encode / decode / apply_chat_template),
    lm.new_generator(max_length, **generation options) -> onnxruntime_genai.Generator.
Teacher forcing: lm.logits(ids) -> float32 [len(ids), vocab], one pass (the golden check and fidelity use it; a
bundle whose lm_head computes the last position only: one token at a time).
Concurrency: generate / chat may run from several threads at once (each call has its own generator over the one
model); lm.last is whichever finished last. A Conversation is for one thread, one turn at a time: a say() ends
the previous turn's stream if it is still open (its reply kept as cut), reset() stops it, and either is refused
(DataError) while another thread is reading it.
Loading verifies each file the manifest lists (size and sha256; verify=False: sizes only).
Facts: lm.manifest (None for a bare folder), lm.path, lm.model_dir, lm.threads, lm.threads_requested,
lm.threads_chosen_by, lm.load_ms (of which lm.verify_ms hashing the files, lm.probe_ms choosing the threads),
lm.backend ("onnxruntime-genai"), lm.backend_version, lm.kind == "llm",
lm.generation_defaults (the checkpoint's own sampling settings: what the CLIs use unless told otherwise).

Threads (as for other bundles): `threads=` as given (1 to 4 per usable CPU); otherwise, for a bundle, the count
measured fastest among 1, 2, 4 ... up to the ceiling: the manifest's measured choice (runtime.threads_choice,
written by `convert --select fastest`), a probe cached for these model files, or a probe of decode speed run at
this first load and cached (runtime.llmthreads; EDGEKIT_THREAD_PROBE=0: none). The ceiling is the target profile's
`runtime.threads` (its `llm.threads` where the profile has one), clamped to the CPUs this process may use
(runtime.threads); a bare folder uses those usable CPUs. lm.threads_chosen_by (argument, manifest, cache, probe,
profile, usable CPUs) and lm.threads_choice (the figures) say how. Whether ORT's intra-op threads spin
between ops is timed both ways at the chosen count, by the probe or, for a bundle loaded with `threads=` above
1, on its own (llmthreads.choose_spinning, cached the same way); `spinning=` fixes it, lm.spinning says what ran.
They reach ONNX Runtime as the decoder session's intra_op_num_threads (an overlay on genai_config.json: the
files on disk are never changed).
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from edgekit.errors import BackendUnavailable, BundleError, DataError
from edgekit.runtime.llmopts import MIN_SNR_DB, MIN_TOP1  # noqa: F401  (re-exported: runtime.llm.MIN_TOP1)
from edgekit.runtime.llmopts import GenOptions as _Options
from edgekit.runtime.llmopts import hold_back as _hold_back
from edgekit.runtime.llmopts import kv_capacity, prompt_bos, with_bos
from edgekit.runtime.llmopts import rss_mb as _rss_mb
from edgekit.runtime.llmopts import SPIN_KEY, after_load, trim_heap
from edgekit.runtime.llmdecode import DecodeRules, TextStream, decode_rules_of, tokenizer_head
from edgekit.runtime.llmtemplate import EncodeRules, encode_rules_of, laid_out_template

KIND = "llm"
GENAI_CONFIG = "genai_config.json"
MANIFEST = "manifest.json"
BACKEND = "onnxruntime-genai"
# A prompt goes into the KV cache PREFILL_CHUNK tokens at a time. A bundle whose lm_head is not pruned to the last
# position (converted before convert.llm_graph.prune_lm_head, or a bare folder) computes logits at every position
# it is given (tokens x vocab x 4 bytes: a 512-token prompt of a 49,152-token vocabulary is 100 MB, of Qwen2.5's
# 151,936 311 MB), so chunks bound that memory; in a pruned one they bound the activations. Same logits and tokens
# as one pass (the cache is the same). Measured on SmolLM2-135M INT4 before the pruning (2-vCPU EPYC, load ~9, 1
# thread): prompt 512 prefill 225 -> 244-271 tok/s, peak RSS 381 -> 276 MB. On pruned bundles the chunk's size
# moves prefill by a few percent at most (docs/llm.md, "Prefill in chunks"): kept at 64.
PREFILL_CHUNK = 64

Message = Mapping[str, str]


# -- finding and loading ---------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"cannot read {what} ({e})", path=str(path)) from None
    if not isinstance(data, dict):
        raise BundleError(f"{what} is not a JSON object", path=str(path))
    return data


def llm_manifest(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The manifest of an LLM bundle directory, or None when `path` is not one (standard library only)."""
    m = Path(path) / MANIFEST
    if not m.is_file():
        return None
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == KIND else None


def is_llm(path: Union[str, Path]) -> bool:
    """An LLM bundle (manifest kind "llm") or a bare ONNX Runtime GenAI folder (genai_config.json, no manifest)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / MANIFEST).is_file():
        return llm_manifest(p) is not None
    return (p / GENAI_CONFIG).is_file()


def verify_files(bundle_dir: Path, manifest: Mapping[str, Any], hash_files: bool = True) -> None:
    """Each file the manifest lists under model.files is there with its size (and sha256 when `hash_files`)."""
    from edgekit.bundle import sha256_file

    model = manifest.get("model") or {}
    files = model.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError("the manifest lists no model files (model.files)", path=str(bundle_dir))
    root = (bundle_dir / model.get("dir", "model")).resolve()
    for rel, entry in sorted(files.items()):
        f = (root / rel).resolve()
        if root not in f.parents:
            raise BundleError(f"model file {rel!r} is outside the bundle", path=str(bundle_dir))
        if not f.is_file():
            raise BundleError(f"model file {rel} is missing", path=str(bundle_dir),
                              hint="copy the whole bundle directory again")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise BundleError(f"{rel} is {size} bytes, the manifest says {entry.get('bytes')}: the bundle is "
                              "damaged", path=str(bundle_dir))
        if hash_files:
            digest = sha256_file(f)
            if digest != entry.get("sha256"):
                raise BundleError(f"{rel} sha256 {digest[:12]}... does not match the manifest's "
                                  f"{str(entry.get('sha256'))[:12]}...: the bundle is damaged or was modified",
                                  path=str(bundle_dir))


def _import_og():
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise BackendUnavailable(f"onnxruntime-genai is not installed ({e})", fmt="onnx-genai",
                                 hint="pip install 'edgekit[llm]' (numpy and onnxruntime-genai)") from None
    return og


def og_version() -> str:
    from edgekit.runtime.facts import dist_version

    v = dist_version("onnxruntime-genai")
    if v == "unknown":
        og = _import_og()
        v = getattr(og, "__version__", "unknown")
    return v


def profile_threads(manifest: Optional[Mapping[str, Any]]) -> Optional[int]:
    """The thread count a bundle's target profile asks for (its llm section first, then runtime)."""
    if not manifest:
        return None
    target = manifest.get("target") or {}
    for section in ("llm", "runtime"):
        t = (target.get(section) or {}).get("threads")
        if isinstance(t, int) and t > 0:
            return t
    return None


# What the runtime reads from an LLM manifest, by type (a key absent or null is left to the defaults): a hand-edited
# manifest with a wrong type is one BundleError naming the file and the key, not an AttributeError or ValueError
# deep in the load (DESIGN, Errors). Integers: (key, the least value taken).
_MANIFEST_OBJECTS = ("target", "target.llm", "target.runtime", "llm", "model", "model.files", "runtime", "recipe")
_MANIFEST_INTS = (("target.llm.threads", 1), ("target.runtime.threads", 1), ("llm.context_default", 1),
                  ("llm.context_max", 1), ("llm.kv_bytes_per_token", 1), ("llm.prompt_bos", 0),
                  ("model.context", 1), ("model.bytes", 0), ("model.vocab", 1))
_MANIFEST_STRINGS = ("name", "model.dir")


def check_manifest(manifest: Mapping[str, Any], path: Path) -> None:
    """BundleError (naming `path` and the key) where a key the runtime reads has the wrong type: the sections it
    reads are objects, the counts integers (not true/false) at least their least value, names strings."""
    def at(key: str) -> Any:
        v: Any = manifest
        for part in key.split("."):
            v = v.get(part) if isinstance(v, Mapping) else None
        return v

    def bad(key: str, v: Any, what: str) -> BundleError:
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        return BundleError(f"{key} is {shown}, not {what}", path=str(path),
                           hint="set it back to what edgekit convert wrote, remove it, or convert the model again")

    for key in _MANIFEST_OBJECTS:
        v = at(key)
        if v is not None and not isinstance(v, Mapping):
            raise bad(key, v, "an object")
    for rel, entry in (at("model.files") or {}).items():
        if not isinstance(entry, Mapping):
            raise bad(f"model.files[{rel!r}]", entry, "an object (bytes, sha256)")
        n = entry.get("bytes")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise bad(f"model.files[{rel!r}].bytes", n, "an integer of 0 or more (the file's size)")
    for key, least in _MANIFEST_INTS:
        v = at(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise bad(key, v, "a positive integer" if least >= 1 else "an integer of 0 or more")
    for key in _MANIFEST_STRINGS:
        v = at(key)
        if v is not None and not isinstance(v, str):
            raise bad(key, v, "a string")


def load_llm(path: Union[str, Path], *, threads: Optional[int] = None, verify: bool = True,
             backend: Optional[str] = None, spinning: Optional[bool] = None) -> "LanguageModel":
    """Load an LLM bundle or a bare ONNX Runtime GenAI folder (see the module docstring). spinning: whether
    ONNX Runtime's intra-op threads busy-wait between ops (None: the thread probe's choice where it ran, else
    genai_config.json's)."""
    from edgekit.runtime.threads import choose_threads

    t0 = time.perf_counter_ns()
    mem_before = _rss_mb()
    rss_before = mem_before["rss_mb"]
    p = Path(path)
    if backend not in (None, BACKEND, "onnxruntime"):
        raise BackendUnavailable(f"a language model runs on {BACKEND}, not {backend}", fmt="onnx-genai",
                                 hint="leave out --backend")
    if not p.is_dir():
        raise BundleError("no such bundle directory", path=str(p))
    manifest: Optional[Dict[str, Any]] = None
    verify_ms = 0.0
    if (p / MANIFEST).is_file():
        manifest = _read_json(p / MANIFEST, MANIFEST)
        if manifest.get("kind") != KIND:
            raise BundleError(f"not a language-model bundle (manifest kind {manifest.get('kind')!r})",
                              path=str(p), hint="load it with edgekit.runtime.load")
        check_manifest(manifest, p / MANIFEST)
        if manifest.get("name"):
            from edgekit.bundle import check_name

            check_name(str(manifest["name"]))
        model_dir = p / (manifest.get("model") or {}).get("dir", "model")
        tv = time.perf_counter_ns()
        verify_files(p, manifest, hash_files=verify)
        verify_ms = (time.perf_counter_ns() - tv) / 1e6
    elif (p / GENAI_CONFIG).is_file():
        model_dir = p
    else:
        raise BundleError("neither an LLM bundle (manifest.json) nor an ONNX Runtime GenAI folder "
                          "(genai_config.json)", path=str(p),
                          hint="give the directory `edgekit convert` wrote for a language model")
    if not (model_dir / GENAI_CONFIG).is_file():
        raise BundleError(f"{GENAI_CONFIG} is missing", path=str(model_dir))
    genai_config = _read_json(model_dir / GENAI_CONFIG, GENAI_CONFIG)
    og = _import_og()
    probe_ms = 0.0
    asked = profile_threads(manifest)
    used = choose_threads(threads, asked)
    chosen_by = "argument" if threads is not None else ("profile" if asked is not None else "usable CPUs")
    choice: Optional[Dict[str, Any]] = None
    auto = threads is None and manifest is not None   # a bundle: the count measured fastest (runtime.threadprobe)
    if auto:
        from edgekit.runtime.threadprobe import from_manifest

        got = from_manifest(manifest.get("runtime") or {}, used)
        if got is not None:
            (used, choice), chosen_by, auto = got, "manifest", False
            if spinning is None and used > 1 and isinstance(choice.get("spinning_chosen"), bool):
                spinning = choice["spinning_chosen"]    # measured with the count (convert --select --device)
    try:
        og_model = _og_model(og, model_dir, used, spinning)
        tp = time.perf_counter_ns()
        if auto and used > 1 and spinning is None:
            from edgekit.runtime.llmthreads import choose

            og_model, used, chosen_by, choice = choose(og, og_model,
                                                       lambda t, spin=None: _og_model(og, model_dir, t, spin), p,
                                                       manifest, genai_config, used, chosen_by, og_version())
        elif threads is not None and used > 1 and spinning is None and manifest is not None:
            # the count is the caller's; whether its threads spin is measured (cached) as the probe does
            from edgekit.runtime.llmthreads import choose_spinning

            og_model, choice = choose_spinning(og, og_model, lambda t, spin=None: _og_model(og, model_dir, t, spin),
                                               p, manifest, genai_config, used, og_version())
        if og_model is None:   # a cached choice with no room for two copies: the first is gone, this one opens now
            used, spin = (choice or {}).pop("reopen")
            og_model = _og_model(og, model_dir, used, spin)
        probe_ms = (time.perf_counter_ns() - tp) / 1e6
        og_tokenizer = og.Tokenizer(og_model)
    except RuntimeError as e:   # ORT GenAI reports a bad folder, graph or tokenizer as RuntimeError
        raise BundleError(f"onnxruntime-genai cannot load the model ({str(e).splitlines()[0]})",
                          path=str(model_dir)) from None
    lm = LanguageModel(og, og_model, og_tokenizer, path=p, model_dir=model_dir, manifest=manifest,
                       genai_config=genai_config)
    lm.threads = used
    lm.threads_requested = threads if threads is not None else asked
    lm.threads_chosen_by = chosen_by
    lm.threads_choice = choice
    # where the probe measured it: whether ORT's threads spin (None: as genai_config.json says)
    lm.spinning = spinning if spinning is not None else (choice or {}).get("spinning_chosen")
    lm.load_ms = (time.perf_counter_ns() - t0) / 1e6
    # of which: hashing the bundle's files against the manifest, and choosing the thread count (a probe at first
    # load, a cached choice after: the model opened again at the count chosen)
    lm.verify_ms, lm.probe_ms = verify_ms, probe_ms
    lm.rss_before_load_mb = rss_before
    # malloc's thresholds, the model file's pages, the freed heap, huge pages for the weights (llmopts.after_load)
    done = after_load(model_dir)
    lm.model_pages, lm.heap_trim, lm.huge_pages = done["model_pages"], done["heap_trim"], done["huge_pages"]
    mem = _rss_mb()
    lm.rss_after_load_mb = mem["rss_mb"]
    # the load's own peak is the process's high-water mark only where the load raised it
    hwm0, hwm1 = mem_before["peak_rss_mb"], mem["peak_rss_mb"]
    lm.peak_rss_load_mb = hwm1 if hwm1 is not None and (hwm0 is None or hwm1 > hwm0) else None
    return lm


def _og_model(og, model_dir: Path, threads: int, spinning: Optional[bool] = None):
    """onnxruntime_genai.Model of `model_dir` with the decoder session's intra_op_num_threads set, and whether
    ORT's intra-op threads spin between ops where `spinning` is not None (an overlay: the files on disk are
    never changed; onnxruntime_genai passes a "session.*" key on to ONNX Runtime as a config entry)."""
    config = og.Config(str(model_dir))
    so: Dict[str, Any] = {"intra_op_num_threads": int(threads)}
    if spinning is not None:
        so[SPIN_KEY] = "1" if spinning else "0"
    config.overlay(json.dumps({"model": {"decoder": {"session_options": so}}}))
    return og.Model(config)


# -- the tokenizer -----------------------------------------------------------------------------------------

_FROM_FOLDER = object()


class Tokenizer:
    """The bundle's tokenizer (ONNX Runtime GenAI's, from tokenizer.json): token ids are Python ints. The runtime's
    LanguageModel and edgekit.serve's batched engine (runtime.llm_batch, through Tokenizer.of_folder) use it alike.

    encode(text) adds the tokenizer's special tokens (a BOS where the model has one), as a plain prompt
    needs; encode_templated(text) adds none, for text a chat template made (it writes its own); chat_ids(messages)
    is the chat template's text (with the assistant's generation prompt) so encoded. `og_model`: the
    onnxruntime_genai.Model, or the model folder's path (a second tokenizer is opened from it)."""

    def __init__(self, og, og_model, og_tokenizer, bos: Optional[int] = None, template: Optional[str] = None,
                 rules: Optional[DecodeRules] = None, prep: Optional[EncodeRules] = None):
        self.og = og_tokenizer
        self._make = lambda: og.Tokenizer(og_model)
        self._variants: Dict[str, Any] = {}
        self._variants_lock = threading.Lock()   # one tokenizer made per variant, however many threads ask at once
        self.bos = bos          # a BOS ONNX Runtime GenAI's tokenizer leaves out (llmopts.prompt_bos)
        self.template = template   # the chat template as transformers lays it out, where the folder's differs
        # special ids and the decoder's leading strip, which ORT GenAI's decoding gets wrong (runtime.llmdecode)
        self.rules = rules if rules is not None else DecodeRules()
        # tokenizer.json's Unicode normalizer and lstrip tokens, which ORT GenAI's encoding skips (runtime.llmtemplate)
        self.prep = prep if prep is not None else EncodeRules()

    @classmethod
    def of_folder(cls, model_dir: Union[str, Path], bos: Optional[int] = None, *, template: Any = _FROM_FOLDER,
                  rules: Any = _FROM_FOLDER, prep: Any = _FROM_FOLDER) -> "Tokenizer":
        """The tokenizer of an ONNX Runtime GenAI folder opened without its model (edgekit.serve's batched engine,
        whose own session holds the weights). template / rules / prep: those a loaded LanguageModel read
        (lm.tokenizer's), else read from the folder here. The templated tokenizer is made now, not in a request."""
        og = _import_og()
        head = tokenizer_head(model_dir) if rules is _FROM_FOLDER or prep is _FROM_FOLDER else {}
        tok = cls(og, str(model_dir), og.Tokenizer(str(model_dir)), bos,
                  template=laid_out_template(model_dir) if template is _FROM_FOLDER else template,
                  rules=decode_rules_of(head) if rules is _FROM_FOLDER else rules,
                  prep=encode_rules_of(head) if prep is _FROM_FOLDER else prep)
        tok._variant("add_special_tokens")
        return tok

    def _variant(self, option: str):
        """A second tokenizer with one option off (made on first use: a large vocabulary costs memory):
        add_special_tokens (for templated text) or skip_special_tokens (decoding specials too). Threads asking for
        one not made yet wait for the first to make it (each copy costs ~180 MiB on Gemma 3's vocabulary)."""
        tok = self._variants.get(option)
        if tok is not None:
            return tok
        with self._variants_lock:
            tok = self._variants.get(option)
            if tok is None:
                tok = self._make()
                tok.update_options(**{option: "false"})
                self._variants[option] = tok
                trim_heap()   # what parsing tokenizer.json again freed (llmopts.trim_heap)
        return tok

    def encode(self, text: str) -> List[int]:
        return with_bos([int(t) for t in self.og.encode(self.prep.apply(text))], self.bos)

    def encode_templated(self, text: str) -> List[int]:
        return [int(t) for t in self._variant("add_special_tokens").encode(self.prep.apply(text))]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids` as transformers' decode(ids, skip_special_tokens=True) gives it (runtime.llmdecode:
        special tokens left out, the decoder's leading strip applied); skip_special_tokens=False: ORT GenAI's
        text of every token, specials written out and nothing stripped (the text a KV cache holds)."""
        if not skip_special_tokens:
            return self._variant("skip_special_tokens").decode(np.asarray(list(ids), dtype=np.int32))
        kept = self.rules.keep(ids)
        return self.rules.strip(self.og.decode(np.asarray(kept, dtype=np.int32))) if kept else ""

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        msgs = _check_messages(messages)
        try:
            return self.og.apply_chat_template(json.dumps(msgs), template_str=self.template,
                                               add_generation_prompt=add_generation_prompt)
        except RuntimeError as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
        system = next((m for m in msgs if m["role"] == "system"), None)
        if system is not None and not self._renders([system, _HELLO]) and self._renders([_HELLO]):
            # a template that refuses any system message (Gemma 2's raise_exception), not one that takes it only
            # first (Mistral's, Llama 2's: a second or a later one fails their alternation check)
            raise DataError(f"this model's chat template takes no system message ({why})",
                            hint="leave out the system message, or put its instructions in the first user message")
        raise DataError(f"the chat template cannot render these messages ({why})",
                        hint="messages are [{'role': 'system'|'user'|'assistant', 'content': '...'}]")

    def _renders(self, messages: List[Dict[str, str]]) -> bool:
        try:
            self.og.apply_chat_template(json.dumps(messages), template_str=self.template, add_generation_prompt=True)
        except RuntimeError:
            return False
        return True

    def chat_ids(self, messages: Sequence[Message]) -> List[int]:
        """The chat template applied to `messages` (with the assistant's generation prompt) and tokenized."""
        return self.encode_templated(self.apply_chat_template(messages, True))

    def stream(self) -> TextStream:
        """A streaming detokenizer: .decode(token_id) -> the text that token completes ('' mid-character, and for
        a special token); the pieces of a sequence join to decode(sequence)."""
        return self.rules.stream(self.og.create_stream())


_HELLO = {"role": "user", "content": "hello"}   # a first user turn every chat template takes


def _check_messages(messages: Sequence[Message]) -> List[Dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError("messages must be a list of {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} is not {{'role': str, 'content': str}}: {m!r}"[:200])
        out.append({"role": m["role"], "content": m["content"]})
    return out


# -- the model ----------------------------------------------------------------------------------------------

class LanguageModel:
    """A loaded decoder-only language model (see the module docstring for the API)."""

    kind = KIND
    backend = BACKEND
    backend_preferred = None     # the same attributes as runtime.Model, for reports and the deploy health check
    backend_chosen_by = "default"
    backend_note: Optional[str] = None
    format = "onnx-genai"

    def __init__(self, og, og_model, og_tokenizer, *, path: Path, model_dir: Path,
                 manifest: Optional[Dict[str, Any]], genai_config: Dict[str, Any]):
        self._og = og
        self.og_model = og_model
        self.og_tokenizer = og_tokenizer
        self.path = path
        self.model_dir = model_dir
        self.manifest = manifest
        self.genai_config = genai_config
        # bundles converted before convert laid the template out, and bare folders: laid out here (llmtemplate);
        # the decoding and encoding rules from one read of tokenizer.json's head
        head = tokenizer_head(model_dir)
        self.tokenizer = Tokenizer(og, og_model, og_tokenizer, bos=prompt_bos(manifest),
                                   template=laid_out_template(model_dir), rules=decode_rules_of(head),
                                   prep=encode_rules_of(head))
        m = genai_config.get("model") or {}
        # the longest sequence the model takes, and the one used here: the bundle's default context (its profile's
        # llm.context_default) where it is shorter; a conversation allocates its KV cache for `context` tokens
        self.max_context: int = int(m.get("context_length") or (manifest or {}).get("model", {}).get("context")
                                    or 2048)
        default = ((manifest or {}).get("llm") or {}).get("context_default")
        self.context: int = min(self.max_context, int(default)) if default else self.max_context
        eos = m.get("eos_token_id")
        self.eos_token_ids: List[int] = [int(e) for e in (eos if isinstance(eos, list) else [eos])
                                         if e is not None]
        self.vocab: Optional[int] = m.get("vocab_size")
        self.threads: Optional[int] = None
        self.threads_requested: Optional[int] = None
        self.threads_chosen_by: str = "usable CPUs"
        self.spinning: Optional[bool] = None   # intra-op spinning chosen by the thread probe (None: genai_config's)
        self.threads_choice: Optional[Dict[str, Any]] = None   # the measured choice and its figures, where one was
        self.load_ms: float = 0.0
        self.verify_ms: float = 0.0   # of load_ms: the files hashed against the manifest
        self.probe_ms: float = 0.0    # of load_ms: the thread count chosen (a first load's probe)
        self.last: Dict[str, Any] = {}
        self.rss_before_load_mb: Optional[float] = None
        self.rss_after_load_mb: Optional[float] = None
        self.peak_rss_load_mb: Optional[float] = None   # VmHWM after load where the load raised it, else None
        self.model_pages: Optional[Dict[str, Any]] = None   # what release_model_pages did after the load
        self.heap_trim: Optional[Dict[str, Any]] = None     # what trim_heap gave back after the load
        self.huge_pages: Optional[Dict[str, Any]] = None    # what huge_pages advised after the load
        self._last_logits_only = False   # the graph's lm_head computes the last position only (seen by logits())
        self.backend_version = og_version()

    # -- facts -------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str((self.manifest or {}).get("name") or self.path.name)

    @property
    def has_chat_template(self) -> bool:
        """The folder carries a chat template (chat_template.jinja, or tokenizer_config.json's chat_template)."""
        if (self.model_dir / "chat_template.jinja").is_file():
            return True
        cfg = self.model_dir / "tokenizer_config.json"
        if cfg.is_file():
            try:
                return bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))
            except (OSError, ValueError):
                return False
        return False

    @property
    def generation_defaults(self) -> Dict[str, Any]:
        """The model's own sampling settings (genai_config.json's search section, which the builder fills from the
        checkpoint's generation_config.json): what `edgekit chat` and `edgekit run` use where not told otherwise.
        The API's own default stays greedy (temperature 0)."""
        s = self.genai_config.get("search") or {}
        d: Dict[str, Any] = {"repetition_penalty": float(s.get("repetition_penalty") or 1.0)}
        if s.get("do_sample") and float(s.get("temperature") or 0) > 0:
            d.update(temperature=float(s["temperature"]), top_p=float(s.get("top_p") or 1.0),
                     top_k=int(s.get("top_k") or 0))
        else:
            d["temperature"] = 0.0
        return d

    @property
    def context(self) -> int:
        """The sequence length used (a conversation's KV cache, the prompt's room): settable up to max_context, the
        model's longest (genai_config's context_length: convert cuts the RoPE caches to it, so a longer sequence
        would read past them; ONNX Runtime GenAI refuses it only when a generator is made)."""
        return self._context

    @context.setter
    def context(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= self.max_context:
            raise DataError(f"context {value!r}: a whole number of tokens from 2 to this model's "
                            f"{self.max_context}")
        self._context = value

    def context_words(self) -> str:
        """The context in use, said so that it is not taken for the model's longest (errors, the chat's notes)."""
        more = f" (this model takes up to {self.max_context})" if self.context < self.max_context else ""
        return f"the context in use is {self.context} tokens{more}"

    def context_room(self, lead: str, need: Optional[int] = None) -> str:
        """How to raise the context, after `lead`, or "" where that cannot help: the context in use is the model's
        longest already, or the `need` tokens (a prompt and at least one new token) do not fit even that."""
        if self.context >= self.max_context or (need is not None and need > self.max_context):
            return ""
        return f"{lead}raise it with --context N (lm.context = N) up to {self.max_context}"

    def over_longest(self, lead: str, n: int) -> DataError:
        """`n` tokens (after `lead`) leave no room for one new token even in the model's longest context: shortening
        is the only way (no --context hint, which could not help)."""
        return DataError(f"{lead} {n} tokens, longer than this model's longest context ({self.max_context} "
                         "tokens, with at least one new token)",
                         hint="it must be shortened: no --context holds it")

    def model_bytes(self) -> int:
        """The weights' bytes: the ONNX graph files and their external data (not the tokenizer and configs)."""
        files = ((self.manifest or {}).get("model") or {}).get("files")
        if isinstance(files, dict):
            return int(sum(int(f.get("bytes", 0)) for rel, f in files.items()
                           if Path(rel).suffix in (".onnx", ".data")))
        return int(sum(f.stat().st_size for f in self.model_dir.iterdir() if f.suffix in (".onnx", ".data")))

    def kv_bytes_per_token(self) -> Optional[int]:
        """KV cache bytes per token: the manifest's, else from genai_config (float32 keys and values on CPU,
        float16 on a GPU provider)."""
        llm = (self.manifest or {}).get("llm") or {}
        if llm.get("kv_bytes_per_token"):
            return int(llm["kv_bytes_per_token"])
        d = (self.genai_config.get("model") or {}).get("decoder") or {}
        layers, kv, head = d.get("num_hidden_layers"), d.get("num_key_value_heads"), d.get("head_size")
        if not (layers and kv and head):
            return None
        gpu = any(po for po in (d.get("session_options") or {}).get("provider_options") or [])
        return int(2 * layers * kv * head * (2 if gpu else 4))

    # -- tokens --------------------------------------------------------------------------------------------
    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        self.require_chat_template()
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)

    def require_chat_template(self) -> None:
        """DataError where the bundle has no chat template (ONNX Runtime GenAI would fail each message with
        "Empty chat template.")."""
        if not self.has_chat_template:
            raise DataError(f"{self.name} has no chat template (chat_template.jinja or tokenizer_config.json's "
                            "chat_template): a base model, not a chat one",
                            hint="send plain text (edgekit run BUNDLE --no-template --prompt ...), or convert the "
                                 "checkpoint's instruct/chat variant")

    def prompt_ids(self, messages: Sequence[Message]) -> List[int]:
        """The chat template applied (with the assistant's generation prompt) and tokenized."""
        self.require_chat_template()
        return self.tokenizer.chat_ids(messages)

    def search_options(self, **options) -> Dict[str, Any]:
        """Generation options (module docstring) as ONNX Runtime GenAI search options, without max_length."""
        return _Options(**{k: v for k, v in options.items() if k != "stream"}).search()

    def new_generator(self, max_length: int, min_length: int = 0, **options):
        """An onnxruntime_genai.Generator with these generation options and max_length (prompt + new)."""
        return self._generator(max_length, self.search_options(**options), min_length)

    def _generator(self, max_length: int, search: Mapping[str, Any], min_length: int = 0):
        params = self._og.GeneratorParams(self.og_model)
        # a sliding-window model's cache holds at least its window; callers stop by their own token count
        params.set_search_options(max_length=kv_capacity(self.genai_config, max_length), min_length=int(min_length),
                                  **search)
        return self._og.Generator(self.og_model, params)

    def _prefill(self, gen, ids: Sequence[int]) -> None:
        """Append `ids` to the generator's cache, PREFILL_CHUNK tokens at a time (see PREFILL_CHUNK)."""
        arr = np.asarray(ids, dtype=np.int32)
        for start in range(0, len(arr), PREFILL_CHUNK):
            gen.append_tokens(arr[start:start + PREFILL_CHUNK])

    # -- generation ----------------------------------------------------------------------------------------
    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: Optional[int] = None, stop: Union[None, str, Sequence[str]] = None,
                 stream: bool = False, repetition_penalty: float = 1.0) -> Union[str, Iterator[str]]:
        """Continue `prompt` (plain text, no chat template): the text, or an iterator of pieces (stream=True)."""
        if not isinstance(prompt, str):
            raise DataError(f"the prompt must be a string (got {type(prompt).__name__})")
        opts = _Options(max_new_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty)
        return self._run(time.perf_counter_ns(), lambda: self.encode(prompt), opts, stream)

    def chat(self, messages: Sequence[Message], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
             stop: Union[None, str, Sequence[str]] = None, stream: bool = False,
             repetition_penalty: float = 1.0) -> Union[str, Iterator[str]]:
        """The assistant's reply to `messages` (the bundle's chat template applied)."""
        opts = _Options(max_new_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty)
        msgs = _check_messages(messages)
        return self._run(time.perf_counter_ns(), lambda: self.prompt_ids(msgs), opts, stream)

    def conversation(self, system: Optional[str] = None, **options) -> "Conversation":
        """A chat whose KV cache carries over between turns (see Conversation)."""
        return Conversation(self, system=system, **options)

    def _fit(self, n_prompt: int, max_new: int) -> int:
        if n_prompt < 1:
            raise DataError("the prompt is empty (no tokens)")
        if n_prompt >= self.max_context:
            raise self.over_longest("the prompt is", n_prompt)
        if n_prompt >= self.context:
            raise DataError(f"the prompt is {n_prompt} tokens; {self.context_words()}",
                            hint="shorten the prompt" + self.context_room(", or ", need=n_prompt + 1))
        return min(max_new, self.context - n_prompt)

    def _run(self, t0: int, make_ids, opts: _Options, stream: bool):
        ids = make_ids()
        max_new = self._fit(len(ids), opts.max_new_tokens)
        gen = self._generator(len(ids) + max_new, opts.search())
        it = self._stream(gen, ids, max_new, opts.stop, t0, {})
        return it if stream else "".join(it)

    def _stream(self, gen, new_ids: List[int], max_new: int, stops: Sequence[str], t0: int,
                stats: Dict[str, Any], on_end=None, carry: bool = False) -> Iterator[str]:
        """Prefill `new_ids` into `gen`, then decode up to `max_new` tokens, yielding text pieces.
        `stats` is filled and published as self.last when the iteration ends (however it ends). carry: `gen` ends
        with a token it sampled and has not run (a conversation's previous reply): run first, timed as carry_ms."""
        clock = time.perf_counter_ns
        stats.update(prompt_tokens=None, prefill_tokens=len(new_ids), new_tokens=0, ttft_ms=None,
                     prefill_ms=None, carry_ms=None, decode_ms=None, decode_tok_s=None, finish_reason="interrupted")
        pieces: List[str] = []
        tokens: List[int] = []
        try:
            # ONNX Runtime GenAI 0.18's append_tokens does not run it: its KV slot was never written (zeros), and
            # every later position of the conversation attended to it; get_logits runs it (ComputeLogits) in place
            if carry:
                tc = clock()
                gen.get_logits()
                stats["carry_ms"] = (clock() - tc) / 1e6
            tp = clock()
            self._prefill(gen, new_ids)
            t_first = t_last = clock()
            stats["prefill_ms"] = (t_first - tp) / 1e6
            stats["prompt_tokens"] = int(gen.token_count())
            detok = self.tokenizer.stream()
            pending = ""
            n = 0
            last_tok = None
            while n < max_new and not gen.is_done():
                gen.generate_next_token()
                tok = last_tok = int(gen.get_next_tokens()[0])
                n += 1
                t_last = clock()
                if n == 1:
                    t_first = t_last
                    stats["ttft_ms"] = (t_first - t0) / 1e6
                stats["new_tokens"] = n
                if tok in self.eos_token_ids:
                    continue                   # is_done() says so on the next turn of the loop
                tokens.append(tok)
                piece = detok.decode(tok)
                if not stops:
                    if piece:
                        pieces.append(piece)
                        yield piece
                    continue
                pending += piece
                hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    pending = pending[:hit]
                    last_tok = "stop"
                    break
                keep = _hold_back(pending, stops)
                out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
                if out:
                    pieces.append(out)
                    yield out
            stats["finish_reason"] = "stop" if last_tok == "stop" or last_tok in self.eos_token_ids else "length"
            if pending:
                pieces.append(pending)
                yield pending
        finally:
            if stats.get("ttft_ms") is not None and stats["new_tokens"] > 1:
                stats["decode_ms"] = (t_last - t_first) / 1e6
                stats["decode_tok_s"] = (stats["new_tokens"] - 1) / max((t_last - t_first) / 1e9, 1e-9)
            stats["text"] = "".join(pieces)
            stats["token_ids"] = tokens
            self.last = stats
            if on_end is not None:
                on_end(stats)

    # -- teacher forcing ---------------------------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced next-token logits at every position of `ids`: float32 [len(ids), vocab]."""
        ids = [int(t) for t in ids]
        self._fit(len(ids), 1)
        gen = self._generator(len(ids) + 1, _Options().search())
        if not self._last_logits_only:
            gen.append_tokens(np.asarray(ids, dtype=np.int32))
            out = np.asarray(gen.get_output("logits"))
            rows = out.reshape(-1, out.shape[-1])
            if len(ids) == 1 or rows.shape[0] > 1:
                return rows[-len(ids):].astype(np.float32, copy=False)
            # a graph whose lm_head computes the last position only (convert.llm_graph.prune_lm_head; ORT GenAI
            # allocates one row): the same positions one token at a time through the KV cache
            self._last_logits_only = True
            gen = self._generator(len(ids) + 1, _Options().search())
        rows = None
        for i, t in enumerate(ids):
            gen.append_tokens(np.asarray([t], dtype=np.int32))
            row = np.asarray(gen.get_output("logits"))
            if rows is None:
                rows = np.empty((len(ids), row.shape[-1]), dtype=np.float32)
            rows[i] = row.reshape(-1, row.shape[-1])[-1]
        return rows

    # -- measuring ---------------------------------------------------------------------------------------
    def benchmark(self, prompt_tokens: int = 128, new_tokens: int = 128, runs: int = 3,
                  warmup: int = 1) -> Dict[str, Any]:
        """Load time, TTFT, prefill and decode tok/s (p50 over `runs`), peak RSS and the conditions."""
        from edgekit.runtime.llmbench import benchmark

        return benchmark(self, prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs, warmup=warmup)

    def check(self) -> Dict[str, Any]:
        """The golden health check (runtime.llmcheck): teacher-forced top-1 agreement and logit SNR on the
        golden prompts against the converting machine, and a short generation that must produce text."""
        from edgekit.runtime.llmcheck import golden_check

        return golden_check(self)

    def __repr__(self) -> str:
        return (f"LanguageModel({str(self.path)!r}, {BACKEND} {self.backend_version}, context={self.context}, "
                f"threads={self.threads})")


# -- a conversation ----------------------------------------------------------------------------------------

class Conversation:
    """A chat with one KV cache for all its turns: each turn appends only its new tokens (the end of the
    previous reply as the template writes it, the user's message, the assistant prompt) to the same
    generator; the history is not run through the model again.

        conv = lm.conversation(system="...", temperature=0.7, seed=1)   # generation options for every turn
        conv.say("hi")                          # the reply (or stream=True: an iterator of pieces)
        conv.say("more", max_new_tokens=64, stop=["\\n\\n"])
        conv.messages                           # the history: system, user, assistant, ...
        conv.last                               # the last turn's figures (lm.last); prefill_tokens: new ones,
                                                # carry_ms: the previous reply's last token run before them
        conv.reset()                            # forget the history (keeps the system message)

    Sampling options given to say() that differ from the conversation's start a new KV cache (the history is
    prefilled again, and `last["reprefill"]` says so). When the template renders earlier turns differently once
    a new one is added (some templates drop a reasoning model's thoughts), the cache is rewound to the longest
    common prefix of tokens and only the rest is run. A conversation that outgrows the context drops its
    oldest turns (the system message stays) and is prefilled again. A reply cut by a stop string or Ctrl-C is
    kept as returned in `messages`; the cache keeps the tokens the model generated.

    A turn enters the history when its reply ends (read to its end, or its stream closed or let go). A say()
    while the previous turn's stream is still open ends that reply where its reader left it (kept as cut, as
    closing the stream would) before the new turn; reset() stops it and forgets it. A stream never started says
    nothing and is left out of the history."""

    def __init__(self, lm: LanguageModel, system: Optional[str] = None, **options):
        lm.require_chat_template()
        self.lm = lm
        self.system = system
        self._defaults = dict(options)
        _Options(**{k: v for k, v in options.items() if k != "stream"})    # check them now
        if system:   # a template that takes no system message says so now, not at every turn
            lm.tokenizer.apply_chat_template([{"role": "system", "content": system}, _HELLO])
        self._turn = 0     # advanced by reset() and each say(): a reply's bookkeeping applies only in its own turn
        self._open: Optional[weakref.ref] = None    # the stream of the turn in progress (say(stream=True))
        self.reset()

    def reset(self) -> None:
        """Forget the history (the system message stays). A reply still streaming is stopped; its turn is not kept."""
        self._close_open(forget=True)
        self.messages: List[Dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self._kv: List[Dict[str, str]] = list(self.messages)   # messages as the cache holds them
        self._gen = None
        self._search: Optional[Dict[str, Any]] = None
        self._text = ""           # the rendered text the cache holds (template + raw replies)
        self._eos_in_cache: Optional[int] = None    # the end-of-sequence id the cache ends with, if it does
        # the cache's length where its last token is one the reply sampled and the model has not run (None: none)
        self._sampled: Optional[int] = None
        self.last: Dict[str, Any] = {}
        self.turns = 0

    @property
    def token_count(self) -> int:
        """Tokens in the KV cache."""
        return int(self._gen.token_count()) if self._gen is not None else 0

    def say(self, text: str, stream: bool = False, **options) -> Union[str, Iterator[str]]:
        if not isinstance(text, str):
            raise DataError(f"a message must be a string (got {type(text).__name__})")
        merged = dict(self._defaults, **options)
        merged.pop("stream", None)
        opts = _Options(**merged)
        self._close_open(forget=False)   # the previous turn's reply, if its stream is still open: kept as cut
        self._turn += 1
        turn = self._turn
        t0 = time.perf_counter_ns()
        lm = self.lm
        user = {"role": "user", "content": text}
        new_kv = self._kv + [user]
        rendered = lm.apply_chat_template(new_kv, True)
        stats: Dict[str, Any] = {"reprefill": False, "rewound_to": None}
        search = opts.search()
        if self._gen is not None and search != self._search:
            stats["reprefill"] = "sampling options changed"
            self._gen = None
        # room kept for the reply: a turn that would leave less drops the oldest turns instead of being cut short
        reserve = max(1, min(opts.max_new_tokens, lm.context // 4))
        # the generator is the turn's until its reply ends (on_end): a stream abandoned before its first piece
        # (never started, so on_end never runs) leaves the conversation without a cache, not with one that
        # was rewound or extended for a turn that is not in the history
        gen, self._gen = self._gen, None
        new_ids: Optional[List[int]] = None
        dropped = 0
        carry = False   # the previous reply's last token still to run (the cache not rewound past it): run apart
        if gen is not None:
            new_ids = self._continue(gen, rendered, new_kv, stats)
            carry = self._sampled == int(gen.token_count())
            if new_ids is not None and int(gen.token_count()) + len(new_ids) + reserve > lm.context:
                stats["reprefill"] = "context full: the oldest turns were dropped"
                new_ids = None
                gen = None
        if gen is None:
            if len(new_kv) > 1 + bool(self.system) and not stats["reprefill"]:
                stats["reprefill"] = "the cache was dropped (a message that did not fit, or a stop before prefill)"
            new_kv, rendered, new_ids, dropped = self._fresh(new_kv, user, stats, reserve)
            gen = lm._generator(lm.context, search)
            carry = False
            self._search = search
        max_new = min(opts.max_new_tokens, lm.context - int(gen.token_count()) - len(new_ids))
        if max_new < 1:   # (the generator may have been rewound for this turn: the next one starts afresh)
            held = int(gen.token_count()) + len(new_ids)   # the cache and the message templated (old turns dropped)
            if held >= lm.max_context:
                raise lm.over_longest("the message does not fit: templated (with any system message) it is", held)
            raise DataError(f"the message does not fit: {lm.context_words()}",
                            hint="shorten it" + lm.context_room(", or ", need=held + 1))

        def on_end(s: Dict[str, Any]) -> None:    # the turn enters the history when its reply ends, however
            if self._turn != turn:   # a stream closed or collected after reset() or a later turn: not the history's
                return
            self._open = None
            kept = gen if s.get("prompt_tokens") is not None else None   # else stopped before the prefill ran
            rewound = kept is not None and self._trim_to_reply(kept, s)
            self._gen = kept
            self._sampled = self._unrun(kept) if kept is not None and s["new_tokens"] and not rewound else None
            reply_raw = lm.tokenizer.decode(s["token_ids"], skip_special_tokens=False)
            if dropped:   # the oldest turns that no longer fit the context (the system message stays)
                head = [m for m in self.messages[:1] if m["role"] == "system"]
                self.messages = head + self.messages[len(head) + dropped:]
            self.messages += [user, {"role": "assistant", "content": s["text"]}]
            self._kv = new_kv + [{"role": "assistant", "content": reply_raw}]
            self._text = rendered + reply_raw
            self._eos_in_cache = self._last_eos(kept) if kept is not None else None
            self.turns += 1
            self.last = s

        it = lm._stream(gen, new_ids, max_new, opts.stop, t0, stats, on_end=on_end, carry=carry)
        self._open = weakref.ref(it)   # weak: a stream its reader lets go still ends (and is recorded) at once
        return it if stream else "".join(it)

    def _close_open(self, forget: bool) -> None:
        """End the stream of the turn in progress, if one is open: a started reply runs its bookkeeping (the turn
        enters the history as cut); one never started is closed unsaid. forget (reset()): the turn counter moves
        on first, so the reply's bookkeeping does nothing."""
        it = self._open() if self._open is not None else None
        if forget:
            self._turn += 1
        if it is not None:
            try:   # close() raises ValueError while another thread is inside the generator (gi_running)
                it.close()
            except ValueError:
                if forget:
                    self._turn -= 1   # nothing was done: the reply in progress keeps its turn
                raise DataError("this conversation's previous reply is still being streamed (in another thread)",
                                hint="a conversation takes one turn at a time: read that reply to its end, or "
                                     "close its stream, before the next say() or reset()") from None
        self._open = None

    @staticmethod
    def _unrun(gen) -> Optional[int]:
        """The cache's length where its last token is the last one the reply sampled: ONNX Runtime GenAI runs a
        sampled token through the model only at the next generate_next_token. None where the reply ended with an
        end of sequence ONNX Runtime GenAI left out of the sequence (the token before it ran when it was sampled)."""
        seq = gen.get_sequence(0)
        return len(seq) if len(seq) and int(seq[-1]) == int(gen.get_next_tokens()[0]) else None

    def _trim_to_reply(self, gen, s: Dict[str, Any]) -> bool:
        """The cache holds the prompt and the reply's tokens (and the end-of-sequence token where the model
        gave one). A Ctrl-C lands when generate_next_token returns, before the loop records the token: the
        generator holds one token the reply does not; it is rewound off, so cache and history agree. True where
        it rewound (no sampled token left unrun)."""
        want = int(s["prompt_tokens"]) + len(s["token_ids"])
        seq = gen.get_sequence(0)
        extra = [int(t) for t in seq[want:]]
        if extra and not (len(extra) == 1 and extra[0] in self.lm.eos_token_ids):
            gen.rewind_to(want)
            return True
        return False

    # the cache's tokens are `self._text`; the next turn's text is `rendered`: append the difference
    def _continue(self, gen, rendered: str, new_kv: List[Dict[str, str]],
                  stats: Dict[str, Any]) -> Optional[List[int]]:
        lm = self.lm
        tok = lm.tokenizer
        if rendered.startswith(self._text):
            tail = rendered[len(self._text):]
            if self._eos_in_cache is not None:   # the generator kept the end-of-sequence token the model gave
                eos_text = tok.decode([self._eos_in_cache], skip_special_tokens=False)
                if tail.startswith(eos_text):
                    tail = tail[len(eos_text):]
                else:
                    tail = None
            if tail is not None:
                return tok.encode_templated(tail)
        # the template rewrote earlier turns: keep the longest common prefix of tokens, run the rest
        target = tok.encode_templated(rendered)
        have = [int(t) for t in gen.get_sequence(0)]
        k = 0
        for a, b in zip(have, target):
            if a != b:
                break
            k += 1
        k = min(k, len(target) - 1)
        gen.rewind_to(k)
        stats["rewound_to"] = k
        return target[k:]

    def _last_eos(self, gen) -> Optional[int]:
        seq = gen.get_sequence(0)
        last = int(seq[-1]) if len(seq) > 0 else None
        return last if last in self.lm.eos_token_ids else None

    def _fresh(self, new_kv: List[Dict[str, str]], user: Dict[str, str], stats: Dict[str, Any], reserve: int = 1):
        """What to prefill from nothing: the history (the oldest turns dropped until it leaves `reserve` tokens
        for the reply) and the new message.
        Returns (messages as the cache will hold them, their rendered text, its tokens, messages dropped)."""
        lm = self.lm
        head = [m for m in new_kv[:1] if m["role"] == "system"]
        body = new_kv[len(head):-1]
        while True:
            kv = head + body + [user]
            rendered = lm.apply_chat_template(kv, True)
            ids = lm.tokenizer.encode_templated(rendered)
            if len(ids) + reserve <= lm.context or not body:
                break
            body = body[2:] if len(body) >= 2 else []
            stats["reprefill"] = stats.get("reprefill") or "context full: the oldest turns were dropped"
        return kv, rendered, ids, len(new_kv) - len(kv)
