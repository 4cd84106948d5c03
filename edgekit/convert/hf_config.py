"""The one rule for a Hugging Face causal LM's config.json (standard library only, so that both convert.llm and
convert.sources, which imports the TF helpers of convert.native, can read it without importing each other).

A folder is taken as a Hugging Face causal LM when it holds a config.json that is a JSON object naming
`architectures` or `model_type`: convert.llm.is_hf_causal_lm asks yes or no, convert.sources.check_hf_config says
what is wrong.
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
