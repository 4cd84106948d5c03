"""The one rule for a Hugging Face causal LM's config.json (the standard library and edgekit.errors only, so that
both convert.llm and convert.sources, which imports the TF helpers of convert.native, can read it without importing
each other).

A folder is taken as a Hugging Face causal LM when it holds a config.json that is a JSON object naming
`architectures` or `model_type`: convert.llm.is_hf_causal_lm asks yes or no, convert.sources.check_hf_config says
what is wrong. hub_snapshot reads a hub cache repository folder (models--ORG--NAME) at its refs/main snapshot, for
the CLI and convert.llm.read_source alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

CONFIG = "config.json"

HF_CONFIG_HINT = ("a Hugging Face causal LM's config.json is a JSON object naming its \"architectures\" (e.g. "
                  "[\"LlamaForCausalLM\"]) and \"model_type\"; put back the one the model was published with")

_KINDS = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


def hf_config_problem(folder: os.PathLike) -> Optional[str]:
    """What keeps a folder with a config.json from being taken as a Hugging Face causal LM (a JSON object naming
    `architectures` or `model_type`), in words; None when nothing does, or when there is no config.json."""
    cfg = Path(folder) / CONFIG
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return "config.json is not UTF-8 text"
    except ValueError as e:
        return f"config.json is not valid JSON ({e})"
    except OSError as e:
        return f"config.json cannot be read ({e.strerror or e})"
    if not isinstance(data, dict):
        return f"config.json holds {_KINDS.get(type(data), 'a number')}, not a JSON object"
    if not (data.get("architectures") or data.get("model_type")):
        return "config.json names neither \"architectures\" nor \"model_type\""
    return None


def is_hf_causal_lm(path: os.PathLike) -> bool:
    """A directory holding a config.json that hf_config_problem finds nothing wrong with."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file() and hf_config_problem(p) is None


def hub_snapshot(model):
    """A Hugging Face hub cache repository folder (models--ORG--NAME, holding snapshots/REV and refs/main, what
    huggingface_hub downloads into): the snapshot refs/main names, or its only snapshot when no refs/main says;
    any other path as given. One that names no snapshot to take: one line saying which to give."""
    from edgekit.errors import SourceModelError

    if not model:
        return model
    repo = Path(model)
    snaps = repo / "snapshots"
    if not (repo.is_dir() and snaps.is_dir() and not (repo / "config.json").exists()
            and (repo.name.startswith("models--") or (repo / "refs").is_dir())):
        return model
    revs = sorted(d.name for d in snaps.iterdir() if d.is_dir())
    try:
        main = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        main = ""
    if main in revs or (not main and len(revs) == 1):
        return str(snaps / (main or revs[0]))
    if not revs:
        raise SourceModelError("a Hugging Face cache repository with no snapshot downloaded", path=str(model),
                               hint="download the model again (huggingface-cli download ORG/NAME)")
    said = f"refs/main names {main}, which snapshots/ does not hold" if main else "no refs/main says which snapshot"
    raise SourceModelError(f"a Hugging Face cache repository: {said}", path=str(model),
                           hint=f"give {snaps}/REV, REV one of: " + ", ".join(revs))


def hub_name(model) -> str:
    """The name a bundle takes from its source folder: the folder's, or for a Hugging Face cache snapshot
    or repository folder its repository's (…/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/7ae5576… and
    …/models--Qwen--Qwen2.5-0.5B-Instruct -> Qwen2.5-0.5B-Instruct), not its revision."""
    p = Path(model).resolve()
    repo = p.parent.parent.name
    if p.parent.name == "snapshots" and repo.startswith("models--") and repo.split("--")[-1]:
        return repo.split("--")[-1]
    if p.name.startswith("models--") and p.name.split("--")[-1]:
        return p.name.split("--")[-1]
    return p.name
