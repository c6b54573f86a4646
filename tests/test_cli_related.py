"""`hf-plugin generate` with the related methods (proxy-tuning/DExperts, ULD, Dynamic Logit Fusion): the same tokens as
the library's processors, and one-line errors before the base model is loaded."""

from __future__ import annotations

import json

import pytest
import torch

import hf_plugin.commands.common
from hf_plugin.cli import main
from hf_plugin.commands.related import load_causal_lm
from hf_plugin.loading import load_base_model
from hf_plugin.methods import (DynamicLogitFusionLogitsProcessor, LogitDifferenceLogitsProcessor,
                               ProxyTuningLogitsProcessor)

from conftest import make_base, make_plugin, make_tokenizer


PROMPTS = ["w1 w2", "w5", "w7 w8 w9"]
NEW_TOKENS = 5


def sharpened_base(seed: int):
    """A tiny random causal LM (no reweighter format) whose outputs are far from uniform."""
    model = make_base("llama", seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("related_cli")
    tokenizer = make_tokenizer()
    make_base("llama").save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for name, seed in (("plain_a", 3), ("plain_b", 4)):  # plain causal LMs, loaded like a base
        sharpened_base(seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    for name, seed in (("saved_a", 5), ("saved_b", 6)):  # saved like a reweighter (e.g. by hf-plugin unlearn)
        make_plugin("llama", seed=seed).save_pretrained(root / name)
    make_plugin("llama", vocab_size=80).save_pretrained(root / "other_vocab")
    # the same width, other tokens: only the tokenizer saved beside it tells
    sharpened_base(7).save_pretrained(root / "other_tokenizer")
    make_tokenizer([f"v{i}" for i in range(92)]).save_pretrained(root / "other_tokenizer")
    sharpened_base(8).save_pretrained(root / "no_tokenizer")
    for name, model in (("pickle_only", sharpened_base(9)), ("pickle_only_saved", make_plugin("llama", seed=9))):
        model.save_pretrained(root / name)  # then its weights as a pickle checkpoint only, as older tools wrote them
        torch.save(model.state_dict(), root / name / "pytorch_model.bin")
        (root / name / "model.safetensors").unlink()
    tokenizer.save_pretrained(root / "pickle_only")
    return root


def loaded(root, name):
    return load_causal_lm(str(root / name), name, make_tokenizer())


METHODS = {
    "proxy-tuning": (["--proxy-expert", "{plain_a}", "--anti-expert", "{saved_b}", "--alpha", "1.5"],
                     lambda m, t: ProxyTuningLogitsProcessor(m["plain_a"], m["saved_b"], alpha=1.5, tokenizer=t)),
    "DExperts": (["--proxy-expert", "{saved_a}", "--anti-expert", "{plain_b}", "--plausibility-top-p", "0.9"],
                 lambda m, t: ProxyTuningLogitsProcessor(m["saved_a"], m["plain_b"], plausibility_top_p=0.9,
                                                         tokenizer=t)),
    "ULD": (["--uld-assistant", "{saved_a}", "--uld-beta", "0.5", "--relative-top", "0.05"],
            lambda m, t: LogitDifferenceLogitsProcessor(m["saved_a"], beta=0.5, relative_top=0.05, tokenizer=t)),
    "Dynamic Logit Fusion": (["--fusion-expert", "{plain_a}", "--fusion-expert", "{plain_b}", "--small-base",
                              "{saved_a}", "--alpha-grid", "0,0.5,1,2"],
                             lambda m, t: DynamicLogitFusionLogitsProcessor([m["plain_a"], m["plain_b"]], m["saved_a"],
                                                                            alpha_grid=[0, 0.5, 1, 2], tokenizer=t)),
}


def cli_completions(root, capsys, *options: str) -> list[str]:
    argv = ["generate", "--base", str(root / "base"), "--max-new-tokens", str(NEW_TOKENS)]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    main(argv + [option.format(**{n: root / n for n in ("plain_a", "plain_b", "saved_a", "saved_b")})
                 for option in options])
    return [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("method", list(METHODS))
def test_generate_decodes_like_the_library_processor(folders, capsys, method):
    options, processor_of = METHODS[method]
    tokenizer = make_tokenizer()
    base = load_base_model(str(folders / "base"))[0]
    models = {name: loaded(folders, name) for name in ("plain_a", "plain_b", "saved_a", "saved_b")}
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = base.generate(**inputs, logits_processor=[processor_of(models, tokenizer)], max_new_tokens=NEW_TOKENS,
                        do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = [text.strip() for text in
                tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert cli_completions(folders, capsys, *options) == expected
    assert expected != cli_completions(folders, capsys, "--no-reweighter")  # the method changed the decoding


@pytest.fixture
def no_base(monkeypatch):
    """Fails the test if the base model (or any model through the base's loader) is loaded."""
    def load_base_model(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(hf_plugin.commands.common, "load_base_model", load_base_model)


@pytest.mark.parametrize("options, message", [
    ([], r"pass exactly one of --reweighter DIR, .*--fusion-expert DIR"),
    (["--no-reweighter", "--uld-assistant", "{saved_a}"], r"got --no-reweighter, --uld-assistant$"),
    (["--no-plugin", "--uld-assistant", "{saved_a}"], r"got --no-reweighter, --uld-assistant$"),  # its former name
    (["--no-reweighter", "--anti-expert", "{saved_a}"], "--anti-expert belongs to --proxy-expert"),
    (["--uld-assistant", "{saved_a}", "--alpha-grid", "0,1"], "--alpha-grid belongs to --fusion-expert"),
    (["--proxy-expert", "{saved_a}"], "--proxy-expert needs --anti-expert"),
    (["--fusion-expert", "{saved_a}"], "--fusion-expert needs --small-base"),
    (["--uld-assistant", "{saved_a}", "--alpha", "2"], "--alpha is the strength of --reweighter or --proxy-expert"),
    (["--fusion-expert", "{saved_a}", "--small-base", "{saved_b}", "--alpha-grid", "0,x"],
     r"--alpha-grid must be numbers separated by commas, got '0,x'"),
    (["--proxy-expert", "{saved_a}", "--anti-expert", "{saved_b}", "--plausibility-top-p", "1.5"],
     r"`plausibility_top_p` must be in \(0, 1\]"),
    (["--uld-assistant", "{saved_a}", "--relative-top", "0"], r"`relative_top` must be in \(0, 1\]"),
    (["--uld-assistant", "{tmp}/absent"], r"--uld-assistant .*absent: no such directory"),
    (["--proxy-expert", "{pickle_only}", "--anti-expert", "{saved_b}"],
     r"^error: --proxy-expert .*pickle_only holds no \*\.safetensors weights \(pickle checkpoints such as "
     r"pytorch_model\.bin are never loaded.*convert it"),
    (["--uld-assistant", "{pickle_only_saved}"], r"^error: --uld-assistant .*pickle_only_saved holds no \*\.safetensors"),
    (["--uld-assistant", "{saved_a}", "--prompt", " ".join(["w2"] * 125)],
     r"prompt 2 \('w2 w2 .*'\) has 125 tokens; with --max-new-tokens 5 that passes the --uld-assistant's 128"),
])
def test_related_errors_are_one_line_and_come_before_the_base(folders, tmp_path, no_base, options, message):
    names = {n: folders / n for n in ("saved_a", "saved_b", "other_vocab", "pickle_only", "pickle_only_saved")}
    argv = ["generate", "--base", str(folders / "base"), "--max-new-tokens", "5", "--prompt", "w1"]
    argv += [option.format(tmp=tmp_path, **names) for option in options]
    with pytest.raises(SystemExit, match=message) as caught:
        main(argv)
    assert str(caught.value).startswith("error: ") and "\n" not in str(caught.value)


@pytest.mark.parametrize("expert, message", [
    ("other_tokenizer", r"^error: --proxy-expert .*other_tokenizer uses another tokenizer than the base: sha256:\w+ "
                        r"\(96 tokens\) against the base's sha256:\w+ \(96 tokens\); pass --force"),
    ("no_tokenizer", r"^error: --proxy-expert .*no_tokenizer has no tokenizer beside it, so its vocabulary cannot be "
                     r"checked against the base's"),
])
def test_a_plain_expert_with_another_or_no_tokenizer_is_refused(folders, capsys, expert, message):
    argv = ["generate", "--base", str(folders / "base"), "--prompt", "w1", "--max-new-tokens", "2", "--proxy-expert",
            str(folders / expert), "--anti-expert", str(folders / "saved_b")]
    with pytest.raises(SystemExit, match=message) as caught:
        main(argv)
    assert "\n" not in str(caught.value)
    main(argv + ["--force"])  # the user's explicit override still runs
    assert json.loads(capsys.readouterr().out.splitlines()[0])["completion"] is not None


def test_an_expert_of_another_vocabulary_is_one_line(folders):
    """Its width is checked against the base's scores at the first step: the library's ValueError, on one line."""
    with pytest.raises(SystemExit, match=r"^error: .*80") as caught:
        main(["generate", "--base", str(folders / "base"), "--prompt", "w1", "--proxy-expert",
              str(folders / "other_vocab"), "--anti-expert", str(folders / "saved_b")])
    assert "\n" not in str(caught.value)
