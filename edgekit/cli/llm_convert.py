"""`edgekit convert FOLDER` where FOLDER is a Hugging Face causal LM: the LLM bundle path (edgekit.convert.llm).

Called from edgekit.cli.convert once the model argument is seen to be a language-model folder; the options it
shares with the CNN path (--target, --val, --out, --name, --precision, --min-agreement, --no-rescue, --json,
--quiet, --select, --device) mean the same thing here; --val is held-out text, the floor is perplexity / KL /
agreement, and --select fastest --device NAME times the candidates' decode speed on the device.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from edgekit.convert.hf_config import hub_snapshot  # noqa: F401  (cli.convert's: a hub cache repository folder)

# options of the CNN path that mean nothing for a language model (named if given)
_CNN_ONLY = ("calib", "calib_random", "preprocess", "input_shapes", "formats", "min_snr", "max_accuracy_drop",
             "no_mixed_precision", "search_budget", "search_first", "recipe_path")
LLM_PRECISIONS = ("int4", "int8", "fp16", "fp32")


def _flag(ctx, name) -> str:
    """The command-line spelling of the convert option whose parameter is `name` (recipe_path -> --recipe)."""
    for param in ctx.command.params:
        if param.name == name:
            return next((o for o in param.opts if o.startswith("--")), param.opts[0])
    return "--" + name.replace("_", "-")


def is_language_model(model) -> bool:
    from edgekit.convert.llm import is_hf_causal_lm

    return bool(model) and is_hf_causal_lm(model)


# options that only a language model takes (named if given for another model)
_LLM_ONLY = ("max_ppl_increase", "max_kl", "max_mb", "algo", "block_size", "val_tokens")


def refuse_llm_options(ctx, model) -> None:
    from click.core import ParameterSource

    given = [k for k in _LLM_ONLY if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"{_flag(ctx, given[0])} is for language models (a Hugging Face model "
                               f"folder); {model or 'this model'} is not one")


# files of a Hugging Face model folder: one of them without a config.json is a language model missing its config
_HF_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
             "model.safetensors.index.json", "pytorch_model.bin")


def refuse_broken_hf_folder(model) -> None:
    """A folder with a config.json that is not a language model's (unreadable, not JSON, naming neither
    architectures nor model_type), a PEFT adapter's, a Hugging Face model's files without their config.json, or a
    .gguf file: said as such, before the image-model path reads it as something else."""
    from edgekit.errors import SourceModelError

    if model and Path(model).suffix.lower() == ".gguf":
        raise SourceModelError("a GGUF file, llama.cpp's format: convert the Hugging Face folder it came from "
                               "(config.json, tokenizer and safetensors)", path=str(model))
    if not model or not Path(model).is_dir() or (Path(model) / "saved_model.pb").is_file() \
            or (Path(model) / "saved_model.pbtxt").is_file():
        return
    from edgekit.convert.sources import HF_CONFIG_HINT, check_adapter, check_hf_config

    check_adapter(Path(model))   # a PEFT adapter folder: said so, not "not a SavedModel" nor an option's complaint
    check_hf_config(Path(model))
    folder = Path(model)
    if not (folder / "config.json").exists():
        found = sorted(f.name for f in folder.iterdir() if f.name in _HF_FILES or f.suffix == ".safetensors")
        if found:
            raise SourceModelError(f"config.json is missing: a Hugging Face model's files ({', '.join(found[:3])}) "
                                   "without the config that names its architecture", path=str(model),
                                   hint=HF_CONFIG_HINT)


def refuse_llm_recipe(recipe_path) -> None:
    """--recipe rebuilds an image or tensor model from its recipe; a language-model bundle (its directory or
    manifest.json) or convert report (NAME.convert.json) given there: one line saying how a language model is
    rebuilt, not the image recipe's "unknown recipe field"."""
    from edgekit.errors import RecipeError

    if not recipe_path:
        return
    path = Path(recipe_path) / "manifest.json" if Path(recipe_path).is_dir() else Path(recipe_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return   # ConvertRecipe.load says what is wrong with it
    if not isinstance(data, dict) or data.get("kind") != "llm":
        return
    recipe = data.get("recipe") if isinstance(data.get("recipe"), dict) else {}
    source = (data.get("source") or {}).get("path") if isinstance(data.get("source"), dict) else None
    target = data.get("target")
    target = target.get("name") if isinstance(target, dict) else None
    targets = [target] if target else [t for t in recipe.get("targets") or () if isinstance(t, str)]
    command = f"edgekit convert {source or recipe.get('model') or 'HF_FOLDER'}" + \
        "".join(f" --target {t}" for t in targets or ["TARGET"])
    for key, flag in (("precision", "--precision"), ("block_size", "--block-size"), ("algo", "--algo")):
        if recipe.get(key) is not None:
            command += f" {flag} {recipe[key]}"
    raise RecipeError("a language model's bundle or convert report: --recipe rebuilds image and tensor models",
                      path=str(recipe_path), hint=f"rebuild a language model from its Hugging Face folder: {command}")


def refuse_llm_precision(model, precision) -> None:
    """int4 / fp32 are language-model precisions: said in one line for any other model."""
    if precision in ("int4", "fp32"):
        raise click.BadParameter(f"{precision} is a language-model precision (a Hugging Face model folder); "
                                 f"{model or 'this model'} takes int8, int16x8, fp16 or dynamic",
                                 param_hint="--precision")


def convert_language_model(ctx, p) -> None:
    """p: the convert command's parameters."""
    from click.core import ParameterSource

    from edgekit.cli.common import _html_report
    from edgekit.convert.llm import INT8_FLOOR, LLMRecipe, convert_llm
    from edgekit.convert.llm_fidelity import LLMFloor
    from edgekit.errors import BudgetMissed
    from edgekit.progress import Progress

    given = {k for k in p if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    wrong = [k for k in _CNN_ONLY if k in given]
    if wrong:
        raise click.UsageError(f"{p['model']} is a language model: {_flag(ctx, wrong[0])} is for image and "
                               "tensor models (a language model takes --val TEXT.txt, --precision int4|int8|fp16|fp32 "
                               "and the floor --max-ppl-increase / --max-kl / --min-agreement)")
    if not p["target_names"]:
        raise click.UsageError("give at least one --target")
    precision = p["precision"] if "precision" in given else None
    if precision is not None and precision not in LLM_PRECISIONS:
        raise click.BadParameter(f"{precision!r}: a language model builds at " + ", ".join(LLM_PRECISIONS),
                                 param_hint="--precision")
    default = LLMFloor()
    try:
        floor = LLMFloor(
            max_ppl_increase=p["max_ppl_increase"] if p["max_ppl_increase"] is not None else default.max_ppl_increase,
            max_kl=p["max_kl"] if p["max_kl"] is not None else default.max_kl,
            min_agreement=p["min_agreement"] if "min_agreement" in given else default.min_agreement)
        # an INT8 row's floor: INT8_FLOOR where no flag says otherwise
        int8_floor = LLMFloor(
            max_ppl_increase=p["max_ppl_increase"] if p["max_ppl_increase"] is not None
            else INT8_FLOOR.max_ppl_increase,
            max_kl=p["max_kl"] if p["max_kl"] is not None else INT8_FLOOR.max_kl,
            min_agreement=p["min_agreement"] if "min_agreement" in given else INT8_FLOOR.min_agreement)
    except ValueError as e:
        raise click.UsageError(f"fidelity floor: {e}") from None
    if p["compat_check"] == "accept-crash":
        raise click.BadParameter("accept-crash is for TFLite artifacts; a language model takes auto, emulated, "
                                 "venv or off", param_hint="--compat-check")
    if p.get("block_size") is not None and precision in ("fp16", "fp32"):
        raise click.BadParameter(f"{p['block_size']}: an {precision} build has no quantization block",
                                 param_hint="--block-size")
    if p["max_mb"] is not None and not (math.isfinite(p["max_mb"]) and p["max_mb"] > 0):
        raise click.BadParameter(f"{p['max_mb']}: a size in MB above 0", param_hint="--max-mb")
    recipe = LLMRecipe(model=p["model"], targets=tuple(p["target_names"]), precision=precision, name=p["name"],
                       val=p["val"], val_tokens=p["val_tokens"], floor=floor, int8_floor=int8_floor,
                       rescue=not p["no_rescue"], select=p["select"], algo=p["algo"],
                       block_size=None if p.get("block_size") is None else int(p["block_size"]),
                       max_bytes=None if p["max_mb"] is None else int(p["max_mb"] * 1e6),
                       compat_check=p["compat_check"])
    timer = None
    if p.get("device_name"):   # checked before any work: --select fastest, and a device of one of the targets
        from edgekit.cli.common import _device_timer

        timer = _device_timer(recipe, p["device_name"], p["inventory"], p["trust_new_host"], p["quiet"])
    progress = Progress(enabled=not p["quiet"])
    html_report = p.get("html_report")
    try:
        result = convert_llm(recipe, p["out"], progress=progress, device=timer)
    except BudgetMissed as e:
        if e.result is not None:
            click.echo(json.dumps(e.result.to_dict(), indent=2, default=str) if p["as_json"] else e.result.table())
            if not p["as_json"] and p["max_mb"] is not None:
                click.echo(max_mb_note(p["max_mb"]))
        if html_report and e.result is not None:   # a missed floor still writes its report (DESIGN: Errors)
            _html_report(p["out"], err=True)
        raise
    except KeyboardInterrupt as e:   # convert_llm removed the unfinished step; exit as a Ctrl-C'd `edgekit run` does
        kept = getattr(e, "kept", [])
        click.echo("interrupted: " + (f"{len(kept)} bundle(s) finished before it stay, with this run's log and no "
                                      f"report: {', '.join(kept)}" if kept else "nothing of this run was kept"),
                   err=True)
        raise click.exceptions.Exit(130)
    if p["as_json"]:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(result.table())
        if p["max_mb"] is not None:
            click.echo(max_mb_note(p["max_mb"]))
        click.echo(f"report: {result.report_path}  log: {result.log_path}")
    if html_report:
        _html_report(p["out"], err=p["as_json"])


def max_mb_note(max_mb: float) -> str:
    """--max-mb (MB, 10^6 bytes) in the table's MiB (2^20 bytes), so that a row's size reads against it."""
    return f"size limit: --max-mb {max_mb:g} MB = {max_mb * 1e6 / 2 ** 20:.4g} MiB (the tables' MiB are 2^20 bytes)"
