"""transformers-only use of a shared reweighter: `base.generate(..., custom_generate=repo, trust_remote_code=True)`
runs the `custom_generate/` that `save_pretrained(with_code=True)` and pushes write. Nothing here reaches the
network; the transformers-only side runs in a process where hf-plugin cannot be imported."""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

from hf_plugin import PluginLogitsProcessor, PluginModel
from hf_plugin.custom_generate import generate as custom_generate
from hf_plugin.hub import CUSTOM_GENERATE_REQUIREMENTS, push_folder

from conftest import PAD, make_base, make_tokenizer, prompts
from test_hub import bound_plugin, front_matter, intercepted_hub, snapshot  # noqa: F401 (a fixture)


ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["w1 w2 w3 w4", "w5"]  # left-padded as a batch
MODES = {  # sampling first: loading the reweighter must not move the random stream the sampling sees
    "sampling": dict(do_sample=True, num_return_sequences=2, top_k=0),
    "greedy": dict(do_sample=False),
    "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "alpha": dict(do_sample=False, alpha=0.4),
}

# Runs in a fresh interpreter where `import hf_plugin` raises: each case is `base.generate(**kwargs)` with
# `custom_generate`, its tokens or its error message saved for the test to compare.
SUBPROCESS = r"""
import sys, torch
sys.modules["hf_plugin"] = None  # as if hf-plugin were not installed: importing it raises
from transformers import AutoModelForCausalLM, AutoTokenizer
cases_file, results_file = sys.argv[1:]
results = {}
for name, case in torch.load(cases_file).items():
    base = AutoModelForCausalLM.from_pretrained(case.pop("base"))
    kwargs = case.pop("kwargs")
    if "tokenizer" in case:
        kwargs["tokenizer"] = AutoTokenizer.from_pretrained(case.pop("tokenizer"))
    if case.get("seed") is not None:
        torch.manual_seed(case["seed"])
    try:
        results[name] = base.generate(**kwargs, trust_remote_code=True, max_new_tokens=5)
    except Exception as error:
        results[name] = f"{type(error).__name__}: {error}"
torch.save(results, results_file)
"""


def reference(base, plugin, input_ids, attention_mask, mode: dict, seed: int | None) -> torch.Tensor:
    """What hf-plugin gives in-process: the base's generate() with a `PluginLogitsProcessor`."""
    options = dict(mode)
    processor = PluginLogitsProcessor(plugin, attention_mask=attention_mask, pad_token_id=PAD,
                                      alpha=options.pop("alpha", None))
    if seed is not None:
        torch.manual_seed(seed)
    return base.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[processor],
                         max_new_tokens=5, **options)


def test_custom_generate_gives_the_processors_tokens_without_hf_plugin(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    make_tokenizer([f"x{i}" for i in range(len(tokenizer) - 4)]).save_pretrained(tmp_path / "other-tokenizer")
    make_base("llama", vocab_size=80).save_pretrained(tmp_path / "narrow-base")
    input_ids, attention_mask = prompts(tokenizer, PROMPTS)
    cases, expected = {}, {}
    for arch in ("llama", "gpt2"):
        base, plugin = make_base(arch), bound_plugin(tokenizer, arch)
        base.save_pretrained(tmp_path / f"base-{arch}")
        plugin.save_pretrained(tmp_path / f"r-{arch}", tokenizer=tokenizer, with_code=True)
        for mode, options in MODES.items():
            seed = 7 if options.get("do_sample") else None
            expected[f"{arch} {mode}"] = reference(base, plugin, input_ids, attention_mask, options, seed)
            cases[f"{arch} {mode}"] = dict(
                base=str(tmp_path / f"base-{arch}"), seed=seed, tokenizer=str(tmp_path / "tokenizer"),
                kwargs=dict(input_ids=input_ids, attention_mask=attention_mask, custom_generate=str(tmp_path / f"r-{arch}"),
                            **options),
            )
    greedy = dict(input_ids=input_ids, attention_mask=attention_mask, do_sample=False)
    # From the Hub (a local snapshot): the code and the weights of the revision asked for.
    newer = bound_plugin(tokenizer, seed=5)
    newer.save_pretrained(tmp_path / "r-newer", tokenizer=tokenizer, with_code=True)
    files = lambda folder: {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    snapshot(tmp_path / "cache", "someone/r", files(tmp_path / "r-llama"), "a" * 40, ["v1"])
    snapshot(tmp_path / "cache", "someone/r", files(tmp_path / "r-newer"), "b" * 40, ["main"])
    hub = dict(custom_generate="someone/r", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    for name, revision in (("hub v1", "v1"), ("hub main", None)):
        cases[name] = dict(base=str(tmp_path / "base-llama"), kwargs={**greedy, **hub, "revision": revision})
    expected["hub v1"] = expected["llama greedy"]
    expected["hub main"] = reference(make_base("llama"), newer, input_ids, attention_mask, MODES["greedy"], None)
    # A binding that does not hold is refused with one line naming both sides.
    local = dict(custom_generate=str(tmp_path / "r-llama"))
    cases["narrow base"] = dict(base=str(tmp_path / "narrow-base"), kwargs={**greedy, **local})
    cases["other tokenizer"] = dict(base=str(tmp_path / "base-llama"), tokenizer=str(tmp_path / "other-tokenizer"),
                                    kwargs={**greedy, **local})
    torch.save(cases, tmp_path / "cases.pt")

    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ""}  # hf-plugin's checkout off the path as well
    result = subprocess.run([sys.executable, "-c", SUBPROCESS, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    for name, tokens in expected.items():
        assert isinstance(results[name], torch.Tensor), f"{name}: {results[name]}"
        assert torch.equal(results[name], tokens), name
    assert not torch.equal(expected["hub main"], expected["hub v1"])  # the revision did matter
    narrow, other = results["narrow base"], results["other tokenizer"]
    assert narrow.startswith("ValueError: Vocabulary mismatch: the base model's scores have 80 entries but the "
                             "reweighter has 96") and "\n" not in narrow
    assert other.startswith("ValueError: Tokenizer mismatch") and "\n" not in other


def test_the_copy_is_complete_for_every_supported_transformers(tokenizer, tmp_path):
    bound_plugin(tokenizer).save_pretrained(tmp_path, with_code=True)
    folder = tmp_path / "custom_generate"
    # transformers 5.3 copies only the relative imports written in generate.py itself: each copied module must be one.
    direct = set(re.findall(r"^from \.(\w+) import", (folder / "generate.py").read_text(), re.MULTILINE))
    assert {p.stem for p in folder.glob("*.py")} - {"generate"} == direct
    assert not (folder / "custom_generate.py").exists()
    # requirements.txt is checked by transformers: the same floors as the package's own
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    floors = {line.split(",")[0] for line in setup["options"]["install_requires"].split()}
    assert set(CUSTOM_GENERATE_REQUIREMENTS) <= floors
    assert (folder / "requirements.txt").read_text().split() == list(CUSTOM_GENERATE_REQUIREMENTS)
    meta = front_matter((tmp_path / "README.md").read_text())
    assert "custom_generate" in meta["tags"] and meta["hf_plugin"]["custom_generate"] is True
    readme = (tmp_path / "README.md").read_text()
    assert 'custom_generate="path/to/this/reweighter", trust_remote_code=True' in readme

    PluginModel.from_pretrained(tmp_path).save_pretrained(tmp_path / "plain")  # without code: no such section
    readme = (tmp_path / "plain" / "README.md").read_text()
    assert "custom_generate" not in readme and not (tmp_path / "plain" / "custom_generate").exists()


def test_push_with_code_uploads_custom_generate_for_reweighters_only(tokenizer, tmp_path, intercepted_hub):
    plugin = bound_plugin(tokenizer)
    plugin.save_pretrained(tmp_path / "r")
    push_folder(tmp_path / "r", "someone/r", with_code=True)
    push_folder(tmp_path / "r", "someone/r")
    bound_plugin(tokenizer).save_pretrained(tmp_path / "assistant", model_card={"kind": "uld_assistant"}, with_code=True)
    push_folder(tmp_path / "assistant", "someone/a", with_code=True)
    coded, plain, assistant = (commit["files"] for commit in intercepted_hub)
    assert {"custom_generate/generate.py", "custom_generate/requirements.txt", "custom_generate/engine.py",
            "custom_generate/logits_process.py", "modeling_plugin.py"} <= set(coded)
    card = coded["README.md"].decode()
    assert "custom_generate" in front_matter(card)["tags"]
    assert 'custom_generate="someone/r", trust_remote_code=True' in card and "### With hf-plugin" in card
    assert not any(name.startswith("custom_generate/") for name in plain)
    assert "custom_generate" not in plain["README.md"].decode()
    # ULD's assistant is applied by another processor: its code is shipped, but not a reweighter's generate()
    assert "modeling_plugin.py" in assistant and not any(name.startswith("custom_generate/") for name in assistant)
    assert not (tmp_path / "assistant" / "custom_generate").exists()


def test_a_direct_call_without_a_repository_asks_for_one():
    with pytest.raises(ValueError, match="pass reweighter="):
        custom_generate(make_base("llama"), input_ids=torch.tensor([[4, 5]]), max_new_tokens=2)
