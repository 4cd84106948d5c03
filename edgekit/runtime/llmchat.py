"""A terminal chat with a language model, like `ollama run` (standard library only; used by `edgekit chat`
and `python -m edgekit.runtime chat` on a device).

Each line is a message; the reply streams as it is generated; the conversation's KV cache carries over, so
a turn costs only its own tokens. Commands: /reset (forget the history), /exit (or /bye, Ctrl-D) to leave,
/stats (the last reply's figures), /help. Ctrl-C stops a reply (what was said so far stays in the history)
and, at the prompt, only reminds how to leave. With stdin not a terminal (a pipe, a file), lines are read
one by one and no prompt is printed, so a script can drive it.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, TextIO

from edgekit.errors import DataError

HELP = """commands:
  /reset   forget the conversation (the system message stays)
  /stats   figures of the last reply (tokens, time to first token, tok/s)
  /exit    leave (also /bye, /quit, Ctrl-D)
  /help    this text
Ctrl-C stops a reply; a line starting with '//' sends that line without its first '/'."""


def _stats_line(s: Dict[str, Any]) -> str:
    if not s:
        return "(no reply yet)"
    dec = s.get("decode_tok_s")
    parts = [f"{s.get('prefill_tokens')} tokens prefilled in {s.get('prefill_ms') or 0:.1f} ms",
             f"{s.get('new_tokens')} generated", f"TTFT {s.get('ttft_ms') or 0:.1f} ms",
             f"decode {dec:.1f} tok/s" if dec else "decode n/a", str(s.get("finish_reason"))]
    if s.get("carry_ms") is not None:   # the previous reply's last token, run before this turn's prefill
        parts.append(f"previous reply's last token run in {s['carry_ms']:.1f} ms")
    if s.get("reprefill"):
        parts.append(f"re-prefilled: {s['reprefill']}")
    return ", ".join(parts)


def cut_note(stats: Dict[str, Any], max_new_tokens: Optional[int], context: int) -> Optional[str]:
    """The line said after a reply that ended on length rather than at its end (finish_reason "length"): cut by
    max_new_tokens, or by the context filling up (max_new_tokens is clamped to the room left); None otherwise.
    max_new_tokens None: the generation's default (GenOptions'), which such a reply ran with."""
    if (stats or {}).get("finish_reason") != "length":
        return None
    if max_new_tokens is None:
        from edgekit.runtime.llmopts import GenOptions

        max_new_tokens = GenOptions().max_new_tokens
    n = stats.get("new_tokens")
    if max_new_tokens is not None and n is not None and n >= max_new_tokens:
        return f"(reply cut at {n} tokens: --max-new-tokens)"
    return f"(reply cut at {n} tokens: the context of {context} tokens is full; --context)"


def chat_loop(lm, *, system: Optional[str] = None, options: Optional[Dict[str, Any]] = None,
              stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None,
              verbose: bool = False, prompt: str = ">>> ") -> int:
    """Run the chat until /exit or end of input (a closed stdin, `<&-`, is one: sys.stdin is None); returns 0."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    conv = lm.conversation(system=system, **(options or {}))
    tty = stdin is not None and bool(getattr(stdin, "isatty", lambda: False)()) and stdin is sys.stdin
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print(f"{lm.name}: {lm.backend} {lm.backend_version}, {lm.threads} threads, context {lm.context} tokens. "
          "/help for commands, /exit or Ctrl-D to leave.", file=stderr, flush=True)
    while True:
        try:
            if tty:
                line = input(prompt)
            else:
                line = stdin.readline() if stdin is not None else ""
                if not line:
                    break
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to leave)", file=stderr, flush=True)
            continue
        except EOFError:
            stdout.write("\n")
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.startswith("/") and not text.startswith("//"):
            cmd = text.split()[0].lower()
            if cmd in ("/exit", "/bye", "/quit"):
                break
            if cmd in ("/reset", "/clear"):
                conv.reset()
                print("(conversation reset)", file=stderr, flush=True)
            elif cmd == "/stats":
                print(_stats_line(conv.last), file=stderr, flush=True)
            elif cmd in ("/help", "/?"):
                print(HELP, file=stderr, flush=True)
            else:
                print(f"unknown command {cmd} (/help lists them)", file=stderr, flush=True)
            continue
        if text.startswith("//"):
            text = text[1:]
        note = _reply(conv, text, stdout, stderr) and cut_note(conv.last, (options or {}).get("max_new_tokens"),
                                                               lm.context)
        if note:
            print(note, file=stderr, flush=True)
        if verbose:
            print(_stats_line(conv.last), file=stderr, flush=True)
    return 0


def _reply(conv, text: str, stdout: TextIO, stderr: TextIO) -> bool:
    """Stream one reply; Ctrl-C stops it (the partial reply stays in the conversation). True: it ran to its end
    (conv.last is its figures)."""
    it = None
    try:
        it = conv.say(text, stream=True)
        for piece in it:
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        return True
    except KeyboardInterrupt:
        if it is not None:
            it.close()    # the generator's own bookkeeping records the reply so far
        stdout.write("\n")
        print("(reply stopped)", file=stderr, flush=True)
    except DataError as e:
        print(f"error: {e}", file=stderr, flush=True)
    finally:
        stdout.flush()
    return False
