"""Copy modes: exact wherever a reweighter is used (forward, training positions, the processor, the loss),
saved and loaded like every config field, and off for reweighters that do not name one."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_plugin import PluginConfig, PluginLogitsProcessor, PluginModel
from hf_plugin.base_cache import CachedBaseLogits, write_base_cache
from hf_plugin.base_logits import LiveBaseModel
from hf_plugin.cli import main
from hf_plugin.completions import loss_positions
from hf_plugin.copying import (COPY_MODES, continuations, copy_set_columns, word_start_aliases,
                               word_start_spellings)
from hf_plugin.data import collate, encode_examples, read_examples
from hf_plugin.training import PluginTrainingArguments, train

from conftest import (BOS, EOS, PAD, Recorder, full_mask, make_base, make_plugin, make_tokenizer, prompts, task_folder,
                      write_csv)
from test_logits_process import MODES, assert_every_call_exact, generate_left_padded_and_check


ARCHS = ["llama", "gpt2"]
SOURCES = ["prompt", "context"]


def pointing(pointer) -> dict:
    """The pointer's config arguments: 0 (none), a width, "every" (width 2, every occurrence of an id read) or
    "written" (width 2, with coverage and continuation: the values that read what the output wrote)."""
    if pointer == "every":
        return {"copy_pointer": 2, "copy_pointer_occurrences": "every"}
    if pointer == "written":
        return {"copy_pointer": 2, "copy_coverage": True, "copy_continuation": True}
    return {"copy_pointer": pointer}


def copy_plugin(arch: str, mode: str, source: str = "context", **kwargs) -> PluginModel:
    """A tiny reweighter with a copy mode and a copy head that visibly matters (trained ones are not zero)."""
    plugin = make_plugin(arch, copy_mode=mode, copy_source=source, copy_ignore_ids=[BOS, EOS], **kwargs)
    torch.manual_seed(3)
    with torch.no_grad():
        plugin.copy_head.weight.normal_(std=2.0)
        plugin.copy_head.bias.fill_(1.5)
        if plugin.copy_query is not None:  # a pointer whose scores differ visibly between ids
            plugin.copy_query.weight.normal_(std=0.5)
            plugin.copy_keys.weight.normal_(std=2.0)
        if plugin.copy_written is not None:
            plugin.copy_written.weight.normal_(std=2.0)
            plugin.copy_written.bias.fill_(-1.0)
        if plugin.copy_continue is not None:
            plugin.copy_continue.weight.normal_(std=2.0)
            plugin.copy_continue.bias.fill_(1.0)
        if plugin.copy_forms is not None:
            plugin.copy_forms.weight.normal_(std=2.0)
            plugin.copy_forms.bias.normal_(std=1.0)
    return plugin


def test_config_refuses_bad_options_and_old_configs_load_without_a_copy_mode(tmp_path):
    with pytest.raises(ValueError, match="`copy_mode` must be None or one of gate, shared, floor, got 'copy'"):
        PluginConfig(vocab_size=10, copy_mode="copy")
    with pytest.raises(ValueError, match="`copy_source` must be one of prompt, context, with a `copy_mode`"):
        PluginConfig(vocab_size=10, copy_mode="gate", copy_source="generated")
    with pytest.raises(ValueError, match="with a `copy_mode`"):
        PluginConfig(vocab_size=10, copy_source="prompt")
    assert PluginConfig(vocab_size=10, copy_mode="gate").copy_source == "prompt"
    for bad in ([-1], ["3"], 5, [True]):
        with pytest.raises(ValueError, match="`copy_ignore_ids` must be a list of non-negative token ids"):
            PluginConfig(vocab_size=10, copy_mode="gate", copy_ignore_ids=bad)
    old = make_plugin("llama")
    old.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old/config.json").read_text())
    del config["copy_mode"], config["copy_ignore_ids"]  # as hf-plugin wrote it before copy modes existed
    (tmp_path / "old/config.json").write_text(json.dumps(config))
    loaded = PluginModel.from_pretrained(tmp_path / "old")
    assert loaded.config.copy_mode is None and loaded.copy_head is None and not loaded.reads_context
    assert loaded.config.copy_source is None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", COPY_MODES)
@pytest.mark.parametrize("pointer", [0, 2, "every", "written"])
def test_save_and_load_keep_the_mode_and_the_head(arch, mode, pointer, tmp_path):
    source = "prompt" if pointer else "context"
    plugin = copy_plugin(arch, mode, source, **pointing(pointer))
    plugin.save_pretrained(tmp_path / "r")
    loaded = PluginModel.from_pretrained(tmp_path / "r")
    assert (loaded.config.copy_mode, loaded.config.copy_ignore_ids) == (mode, [BOS, EOS])
    torch.testing.assert_close(loaded.copy_head.weight, plugin.copy_head.weight)
    card = (tmp_path / "r/README.md").read_text()
    assert f"Copy mode `{mode}` on the ids of the {'prompt' if pointer else 'whole sequence so far'}" in card
    assert ("a pointer reads each id's slot from the 2 tokens before its last occurrence" in card) == (
        pointer in (2, "written"))
    assert ("one more value for those the output has already written" in card) == (pointer == "written")
    assert ("one more for those that follow, in the prompt, the token the output wrote last" in card) == (
        pointer == "written")
    assert ("a pointer reads each id's slot from the 2 tokens before each of its occurrences" in card) == (
        pointer == "every")
    if pointer:
        assert {key: getattr(loaded.config, key) for key in pointing(pointer)} == pointing(pointer)
        torch.testing.assert_close(loaded.copy_keys.weight, plugin.copy_keys.weight)
    ids, lengths = torch.tensor([[5, 6, 7, 6, 9]]), torch.tensor([3])
    torch.testing.assert_close(loaded(ids, prompt_lengths=lengths).logits, plugin(ids, prompt_lengths=lengths).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_untrained_gate_changes_nothing(arch):
    plain = make_plugin(arch)
    gated = make_plugin(arch, copy_mode="gate")
    gated.backbone.load_state_dict(plain.backbone.state_dict())
    assert not gated.copy_head.weight.any() and not gated.copy_head.bias.any()
    ids = torch.tensor([[5, 6, 7, 6, 9]])
    torch.testing.assert_close(gated(ids, prompt_lengths=torch.tensor([3])).logits, plain(ids).logits)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", COPY_MODES)
@pytest.mark.parametrize("source, pointer", [("prompt", 0), ("context", 0), ("prompt", 2), ("prompt", "every"),
                                            ("prompt", "written")])
def test_forward_changes_exactly_the_ids_already_in_the_context(arch, mode, source, pointer):
    plugin = copy_plugin(arch, mode, source, **pointing(pointer))
    plain = make_plugin(arch)  # same seed: the same backbone without a copy head
    ids = torch.tensor([[PAD, PAD, BOS, 5, 6, 5, 7], [BOS, 8, 9, 10, 11, 12, 13]])
    mask = (torch.arange(7) >= 2).long().expand(2, 7).clone()
    mask[1] = 1
    prompt_lengths = torch.tensor([5, 3])  # columns, padding included: [PAD PAD BOS 5 6] and [BOS 8 9]
    with torch.no_grad():
        out = plugin(ids, attention_mask=mask, prompt_lengths=prompt_lengths).logits
        own = plain(ids, attention_mask=mask).logits
    changed = (out != own)
    for row in range(2):
        for t in range(7):
            if not mask[row, t]:
                continue
            end = t + 1 if source == "context" else min(t + 1, int(prompt_lengths[row]))
            seen = {int(v) for v, m in zip(ids[row, :end], mask[row, :end]) if m} - {BOS, EOS}
            where = set(changed[row, t].nonzero().flatten().tolist())
            # floor leaves a context id alone where its own logit is already above the gate
            assert where <= seen if mode == "floor" else where == seen, (row, t, where, seen)
    if mode == "shared" and not pointer:  # every context id at one value: the reweighter cannot rank them
        assert out[1, -1, 8] == out[1, -1, 9]
        assert (out[1, -1, 8] == out[1, -1, 13]) == (source == "context")  # 13 was generated, not prompted
    if mode == "shared" and pointer:  # the pointer ranks them by the tokens before their first occurrence
        assert out[1, -1, 8] != out[1, -1, 9]
    if source == "prompt":
        with pytest.raises(ValueError, match="needs `prompt_lengths` \\(or `labels`\\)"):
            plugin(ids)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", COPY_MODES)
@pytest.mark.parametrize("source, pointer", [("prompt", 0), ("context", 0), ("prompt", 3), ("prompt", "every"),
                                            ("prompt", "written")])
def test_completion_logits_equal_the_forward(arch, mode, source, pointer):
    plugin = copy_plugin(arch, mode, source, **pointing(pointer))
    ids = torch.tensor([[PAD, PAD, 5, 6, 5, 7, 8], [4, 8, 9, 10, 11, 12, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    selected = torch.zeros_like(ids, dtype=torch.bool)
    selected[0, 3:6] = True
    selected[1, [2, 5]] = True
    labels = torch.full_like(ids, -100)  # what training has: the completion starts after the first scored position
    labels[0, 4:] = ids[0, 4:]
    labels[1, 3:] = ids[1, 3:]
    with torch.no_grad():
        expected = plugin(ids, attention_mask=mask, labels=labels).logits[selected]
        torch.testing.assert_close(plugin(ids, attention_mask=mask, prompt_lengths=torch.tensor([4, 3])).logits[selected],
                                   expected)
        got = plugin.completion_logits(ids, mask, selected)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pointer", [0, 2, "every", "written"])
def test_a_cached_forward_needs_the_whole_sequence(pointer):
    plugin = copy_plugin("llama", "shared", "prompt" if pointer else "context", **pointing(pointer))
    ids, lengths = torch.tensor([[5, 6, 7, 8]]), {"prompt_lengths": torch.tensor([3])}
    with torch.no_grad():
        first = plugin(ids[:, :3], use_cache=True, **lengths)
        with pytest.raises(ValueError, match="needs `context_ids`: the whole sequences so far"):
            plugin(ids[:, 3:], past_key_values=first.past_key_values, **lengths)
        with pytest.raises(ValueError, match=r"3 cached \+ 1 new tokens per row"):
            plugin(ids[:, 3:], past_key_values=first.past_key_values, context_ids=ids[:, 1:], **lengths)
        step = plugin(ids[:, 3:], past_key_values=first.past_key_values, context_ids=ids, **lengths).logits[:, -1]
        whole = plugin(ids, **lengths).logits[:, -1]
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode, source, pointer", [("shared", "prompt", 0), ("shared", "context", 0),
                                                   ("gate", "context", 0), ("floor", "prompt", 0),
                                                   ("shared", "prompt", 2), ("gate", "prompt", 3),
                                                   ("shared", "prompt", "every"), ("floor", "prompt", "written")])
@pytest.mark.parametrize("decoding", ["greedy", "sampling_multiple_returns", "beam_multiple_returns"])
def test_processor_matches_offline_forward(arch, mode, source, pointer, decoding, tokenizer):
    plugin = copy_plugin(arch, mode, source, **pointing(pointer))
    generate_left_padded_and_check(make_base("llama"), plugin, tokenizer, decoding)


@pytest.mark.parametrize("source", SOURCES)
def test_two_generate_calls_in_a_row_each_read_their_own_context(source, tokenizer):
    base, plugin = make_base("llama"), copy_plugin("llama", "shared", source)
    processor = PluginLogitsProcessor(plugin, pad_token_id=PAD)
    recorder = Recorder(processor)
    outputs = []
    for texts in (["w1 w2 w3", "w4"], ["w9 w8", "w7 w6 w5 w4 w3"], ["w1 w2 w3", "w4"]):
        input_ids, mask = prompts(tokenizer, texts)
        recorder.calls.clear()
        outputs.append(base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=6,
                                     min_new_tokens=6, do_sample=False))
        assert_every_call_exact(plugin, recorder.calls, mask)
    assert torch.equal(outputs[0], outputs[2])
    # A call continuing an earlier output: its prompt includes that output once the processor is reset (without a
    # reset, the runner cannot tell it from assisted decoding rolling back, and keeps the earlier prompt).
    follow = outputs[0]
    follow_mask = full_mask(follow, prompts(tokenizer, ["w1 w2 w3", "w4"])[1])
    processor.reset()
    recorder.calls.clear()
    base.generate(follow, attention_mask=follow_mask, logits_processor=[recorder], max_new_tokens=3, do_sample=False)
    assert_every_call_exact(plugin, recorder.calls, follow_mask)


@pytest.mark.parametrize("mode, source, pointer", [(mode, source, 0) for mode in COPY_MODES for source in SOURCES]
                         + [("shared", "prompt", 2), ("floor", "prompt", 2), ("shared", "prompt", "every"),
                            ("shared", "prompt", "written")])
def test_loss_from_a_whole_vocabulary_cache_equals_the_live_loss_and_trains_the_head(mode, source, pointer, tokenizer,
                                                                                    tmp_path):
    rows = [(f"w{i} w{i + 1} w{i + 2}", f"w{i + 1} w40 w{i}") for i in range(4, 28)]
    examples, _ = read_examples(write_csv(tmp_path / "d.csv", rows), prompt_column="mr", completion_column="ref")
    encoded = encode_examples(tokenizer, examples, max_length=32)
    base, plugin = make_base("llama"), copy_plugin("llama", mode, source, **pointing(pointer))
    cache_dir = write_base_cache(base, encoded, tmp_path / "cache", k=96, pad_token_id=PAD, progress=False)
    batch = collate(encoded[:8], PAD)
    logits = plugin.completion_logits(batch["input_ids"], batch["attention_mask"], loss_positions(batch["labels"]))
    live = LiveBaseModel(base).nll(logits, batch, 1.0)
    torch.testing.assert_close(CachedBaseLogits(cache_dir, encoded).nll(logits, batch, 1.0), live, atol=5e-3, rtol=0)
    # A top-4 cache bounds the loss from above, prompt ids outside the known ones included.
    small = write_base_cache(base, encoded, tmp_path / "small", k=4, pad_token_id=PAD, task_vocab=[EOS], progress=False)
    assert (CachedBaseLogits(small, encoded).nll(logits, batch, 1.0) >= live - 5e-3).all()
    live.mean().backward()
    assert plugin.copy_head.weight.grad.abs().sum() > 0
    if pointer:
        assert plugin.copy_query.weight.grad.abs().sum() > 0 and plugin.copy_keys.weight.grad.abs().sum() > 0
    if pointer == "written":  # completions repeat prompt ids (`w{i}`), so the written ones train their heads
        assert plugin.copy_written.weight.grad.abs().sum() > 0 and plugin.copy_continue.weight.grad.abs().sum() > 0


def test_train_command_records_the_mode_and_the_special_tokens(tmp_path):
    setup = task_folder(tmp_path, 16, 4)
    out = tmp_path / "run"
    main(["train", "--base", str(setup / "base"), "--data", str(setup / "train.csv"), "--validation-data",
          str(setup / "validation.csv"), "--prompt-column", "mr", "--completion-column", "ref", "--output-dir", str(out),
          "--hidden-size", "32", "--intermediate-size", "64", "--num-heads", "2", "--max-length", "32", "--epochs", "1",
          "--cpu", "--copy-mode", "shared"])
    plugin = PluginModel.from_pretrained(out)
    assert plugin.config.copy_mode == "shared" and plugin.config.copy_ignore_ids == [0, 1, 2, 3]
    assert plugin.config.copy_source == "prompt"
    assert plugin.copy_head.bias.abs().item() > 0  # trained
    with pytest.raises(SystemExit):
        main(["train", "--base", str(setup / "base"), "--data", str(setup / "train.csv"), "--output-dir",
              str(tmp_path / "x"), "--copy-mode", "pointer"])


def marked_tokenizer():
    """Word-level, 96 ids: `w0`..`w45` and their word-start forms `Ġw0`..`Ġw45`, as byte-level BPE vocabularies have."""
    return make_tokenizer([f"w{i}" for i in range(46)] + [f"Ġw{i}" for i in range(46)])


def test_word_start_aliases_map_a_piece_to_its_marked_form():
    tokenizer = marked_tokenizer()
    aliases = word_start_aliases(tokenizer)
    vocab = tokenizer.get_vocab()
    assert aliases.shape == (96,)
    assert aliases[vocab["w7"]] == vocab["Ġw7"] and aliases[vocab["Ġw7"]] == -1
    assert (aliases[[PAD, BOS, EOS, 3]] == -1).all()
    assert (word_start_aliases(make_tokenizer()) == -1).all()  # no marker in the vocabulary: nothing to alias


@pytest.mark.parametrize("arch", ARCHS)
def test_word_starts_bring_the_marked_form_into_the_context(arch, tmp_path):
    tokenizer = marked_tokenizer()
    vocab = tokenizer.get_vocab()
    plugin = copy_plugin(arch, "shared", copy_word_starts=True)
    plugin.set_copy_aliases(tokenizer)
    ids = torch.tensor([[vocab["w3"], vocab["w9"], vocab["Ġw20"]]])
    with torch.no_grad():
        logits = plugin(ids).logits[0]
    gate = logits[0, vocab["w3"]]
    assert logits[0, vocab["Ġw3"]] == gate and logits[0, vocab["Ġw9"]] != gate  # w9 is not in the context yet
    assert logits[1, vocab["Ġw9"]] == logits[1, vocab["w9"]] and logits[2, vocab["w20"]] != logits[2, vocab["Ġw20"]]
    plugin.save_pretrained(tmp_path / "r")
    loaded = PluginModel.from_pretrained(tmp_path / "r")
    assert torch.equal(loaded.copy_aliases, plugin.copy_aliases)
    selected = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(loaded.completion_logits(ids, None, selected), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoding", ["greedy", "beam_multiple_returns"])
def test_processor_with_word_starts_matches_offline_forward(decoding):
    tokenizer = marked_tokenizer()
    base, plugin = make_base("llama"), copy_plugin("llama", "shared", copy_word_starts=True)
    plugin.set_copy_aliases(tokenizer)
    input_ids, mask = prompts(tokenizer, ["w1 w2 w3 w4 w5", "w6 Ġw7", "w8 w9 w10"])
    recorder = Recorder(PluginLogitsProcessor(plugin, pad_token_id=PAD))
    base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=6, min_new_tokens=6,
                  **MODES[decoding])
    assert_every_call_exact(plugin, recorder.calls, mask)


def test_word_starts_need_a_mode_and_a_filled_table(tmp_path):
    with pytest.raises(ValueError, match="`copy_word_starts` needs a `copy_mode`"):
        PluginConfig(vocab_size=10, copy_word_starts=True)
    with pytest.raises(ValueError, match="no word-start table"):
        make_plugin("llama", copy_mode="gate").set_copy_aliases(marked_tokenizer())
    setup = task_folder(tmp_path, 8, 4)
    with pytest.raises(ValueError, match=r"empty word-start table: call `reweighter.set_copy_aliases\(tokenizer\)`"):
        train(make_plugin("llama", copy_mode="gate", copy_word_starts=True), [object()], [object()], None,
              PluginTrainingArguments(output_dir=str(tmp_path / "o")))
    with pytest.raises(SystemExit, match="--copy-word-starts needs --copy-mode"):
        main(["train", "--base", str(setup / "base"), "--data", str(setup / "train.csv"), "--output-dir",
              str(tmp_path / "x"), "--copy-word-starts"])
    # a tokenizer without word-start forms (the tiny word-level one): refused before a cache pass or any training
    with pytest.raises(SystemExit, match="the base's tokenizer has no word-start forms"):
        main(["train", "--base", str(setup / "base"), "--data", str(setup / "train.csv"), "--prompt-column", "mr",
              "--completion-column", "ref", "--output-dir", str(tmp_path / "x"), "--cache", str(tmp_path / "cache"),
              "--copy-mode", "shared", "--copy-word-starts"])
    assert not (tmp_path / "cache").exists()


def byte_level_tokenizer():
    """Byte-level BPE built in-process, as GPT-2 and SmolLM tokenise: ` Dirt` and ` Go` are one marked token each,
    `Dirt` (glued to a bracket) is `D`, `ir`, `t` and `Go` is `G`, `o`."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"[PAD]": PAD, "[BOS]": BOS, "[EOS]": EOS, "[UNK]": 3}
    for token in alphabet + ["ir", "ĠD", "ĠDir", "ĠDirt", "ĠG", "ĠGo"]:
        vocab[token] = len(vocab)
    merges = [("i", "r"), ("Ġ", "D"), ("ĠD", "ir"), ("ĠDir", "t"), ("Ġ", "G"), ("ĠG", "o")]
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def test_word_start_spellings_spell_a_marked_word_as_it_is_glued_to_a_bracket():
    tokenizer = byte_level_tokenizer()
    vocab = tokenizer.get_vocab()
    assert tokenizer.tokenize("[Dirt]") == ["[", "D", "ir", "t", "]"] and tokenizer.tokenize(" Dirt") == ["ĠDirt"]
    two, three = word_start_spellings(tokenizer, 2), word_start_spellings(tokenizer, 3)
    assert two.shape == (len(tokenizer), 2) and three.shape == (len(tokenizer), 3)
    assert two[vocab["ĠGo"]].tolist() == [vocab["G"], vocab["o"]] and two[vocab["ĠDir"]].tolist() == [vocab["D"], vocab["ir"]]
    assert two[vocab["ĠDirt"]].tolist() == [-1, -1]  # three pieces
    assert three[vocab["ĠDirt"]].tolist() == [vocab["D"], vocab["ir"], vocab["t"]]
    assert three[vocab["ĠD"]].tolist() == [-1, -1, -1]  # one piece: word_start_aliases' case
    assert (word_start_spellings(make_tokenizer(), 3) == -1).all()  # no marker in the vocabulary

    plugin = PluginModel(PluginConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      copy_mode="shared", copy_word_starts=True, copy_word_pieces=3))
    plugin.set_copy_aliases(tokenizer)
    ids = tokenizer("x[Dirt] Go", return_tensors="pt")["input_ids"]  # x [ D ir t ] ĠGo
    first = plugin._first_occurrences(ids, len(tokenizer), None, torch.tensor([ids.shape[1]]))[0]
    assert first[vocab["ĠDirt"]] == 4 and first[vocab["ĠDir"]] == 3  # from the spelling's last piece on
    assert first[vocab["ĠGo"]] == 6 and first[vocab["ĠD"]] == 2  # in the text itself; the one-piece alias of D


def spelled_plugin(arch: str, source: str = "prompt", **kwargs) -> tuple[PluginModel, dict]:
    """A shared-mode reweighter over `marked_tokenizer` whose spelling table says `Ġw40` is spelled `w1 w2` and
    `Ġw41` is spelled `w3 w4 w5` (a word-level vocabulary has no multi-piece words of its own)."""
    tokenizer = marked_tokenizer()
    vocab = tokenizer.get_vocab()
    plugin = copy_plugin(arch, "shared", source, copy_word_starts=True, copy_word_pieces=3, **kwargs)
    plugin.set_copy_aliases(tokenizer)
    plugin.copy_word_spellings[vocab["Ġw40"], :2] = torch.tensor([vocab["w1"], vocab["w2"]])
    plugin.copy_word_spellings[vocab["Ġw41"]] = torch.tensor([vocab["w3"], vocab["w4"], vocab["w5"]])
    return plugin, vocab


@pytest.mark.parametrize("arch", ARCHS)
def test_spelled_words_join_the_context_exactly_and_survive_save_and_load(arch, tmp_path):
    plugin, vocab = spelled_plugin(arch)
    w = [vocab[f"w{i}"] for i in range(10)]
    ids = torch.tensor([[PAD, w[1], w[2], w[3], w[4], w[5], w[6]], [w[1], w[9], w[2], w[3], w[4], w[7], w[5]]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        out = plugin(ids, attention_mask=mask, prompt_lengths=torch.tensor([6, 5])).logits
    gate = out[:, :, w[1]]
    assert out[0, 2, vocab["Ġw40"]] == gate[0, 2] and out[0, 1, vocab["Ġw40"]] != gate[0, 1]  # w1 w2 ends at 2
    assert out[0, 5, vocab["Ġw41"]] == gate[0, 5] and out[0, 4, vocab["Ġw41"]] != gate[0, 4]
    assert (out[1, :, vocab["Ġw40"]] != gate[1]).all() and (out[1, :, vocab["Ġw41"]] != gate[1]).all()  # not in a row
    labels = torch.full_like(ids, -100)
    labels[0, 6:], labels[1, 5:] = ids[0, 6:], ids[1, 5:]
    plugin.save_pretrained(tmp_path / "r")
    loaded = PluginModel.from_pretrained(tmp_path / "r")
    assert torch.equal(loaded.copy_word_spellings, plugin.copy_word_spellings)
    assert "marked words spelled in up to 3 pieces" in (tmp_path / "r/README.md").read_text()
    with torch.no_grad():
        expected = plugin(ids, attention_mask=mask, labels=labels).logits
        torch.testing.assert_close(loaded(ids, attention_mask=mask, labels=labels).logits, expected)
        selected = loss_positions(labels)  # what training scores: the prompt ends where the labels begin
        torch.testing.assert_close(loaded.completion_logits(ids, mask, selected), expected[selected], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("decoding", ["greedy", "sampling_multiple_returns", "beam_multiple_returns"])
@pytest.mark.parametrize("pointer", [0, 2, "every", "written"])
def test_processor_with_spelled_words_and_frequent_ids_matches_offline_forward(arch, decoding, pointer):
    tokenizer = marked_tokenizer()
    forms = {"copy_word_forms": True} if pointer == "written" else {}  # every value that reads the words, here
    plugin, vocab = spelled_plugin(arch, **pointing(pointer), **forms)
    input_ids, mask = prompts(tokenizer, ["w1 w2 w3 w4 w5 w9", "w6 w1 w2", "w3 w4 w5 w9 w9 w9 w9"])
    plugin.ignore_uncopied_ids([(row[m.bool()].tolist(), []) for row, m in zip(input_ids, mask)], min_fraction=0.6)
    base = make_base("llama")
    recorder = Recorder(PluginLogitsProcessor(plugin, pad_token_id=PAD))
    base.generate(input_ids, attention_mask=mask, logits_processor=[recorder], max_new_tokens=6, min_new_tokens=6,
                  **MODES[decoding])
    assert_every_call_exact(plugin, recorder.calls, mask)


def test_uncopied_ids_leave_the_copy_set_after_aliases_and_spellings(tmp_path):
    plugin, vocab = spelled_plugin("llama")
    w = {i: vocab[f"w{i}"] for i in range(10)}
    pairs = [([w[1], w[2], w[7]], [w[7], EOS]), ([w[1], w[2], w[8]], [w[8], EOS]),
             ([w[3], w[4], w[5], w[1]], [vocab["Ġw3"], EOS]), ([w[9]], [w[9], EOS])]
    # written in at least half of the prompts: w1 (3 of 4) and w2 (2 of 4), which no completion repeats; their word
    # starts Ġw1, Ġw2 and Ġw40 (spelled w1 w2) are judged by nothing written and stay
    assert plugin.ignore_uncopied_ids(pairs, min_fraction=0.5) == [w[1], w[2]]
    assert plugin.config.copy_ignore_ids == sorted([BOS, EOS, w[1], w[2]])
    assert plugin.config.copy_ignore_uncopied == {"min_fraction": 0.5, "max_copy_rate": 0.05, "judge_word_starts": False}
    ids = torch.tensor([[w[1], w[2], w[3], w[4], w[5]]])
    first = plugin._first_occurrences(ids, 96, None, torch.tensor([5]))[0]
    assert first[w[1]] == 5 and first[w[2]] == 5  # ignored
    assert first[vocab["Ġw1"]] == 0 and first[vocab["Ġw40"]] == 1  # brought by the ignored ids, still counted
    assert first[w[3]] == 2 and first[vocab["Ġw41"]] == 4
    plugin.config.copy_ignore_ids.append(vocab["Ġw40"])  # an ignored id leaves the set after the spellings
    assert plugin._first_occurrences(ids, 96, None, torch.tensor([5]))[0, vocab["Ġw40"]] == 5
    plugin.save_pretrained(tmp_path / "r")
    assert "except the ids that at least 50.0% of the" in (tmp_path / "r/README.md").read_text()
    assert PluginModel.from_pretrained(tmp_path / "r").config.copy_ignore_ids == plugin.config.copy_ignore_ids

    # a frequent id that the completions repeat stays, however frequent: w1 copied in 2 of its 3 pairs
    copied = [(prompt, [w[1], EOS]) if w[1] in prompt[:3] and prompt[0] == w[1] else (prompt, completion)
              for prompt, completion in pairs]
    again, _ = spelled_plugin("llama")
    assert w[1] not in again.ignore_uncopied_ids(copied, min_fraction=0.5, max_copy_rate=0.5)
    assert w[2] in again.config.copy_ignore_ids
    # max_copy_rate=1: every id in min_fraction of the prompts, copied or not; with judge_word_starts, the word-start
    # forms of the copy sets too (the frequency rule the E2E and ViGGO "frequent ids kept" rows were trained with)
    anyway, _ = spelled_plugin("llama")
    assert w[1] in anyway.ignore_uncopied_ids(copied, min_fraction=0.5, max_copy_rate=1.0)
    assert vocab["Ġw40"] not in anyway.config.copy_ignore_ids
    starts, _ = spelled_plugin("llama")
    assert {w[1], w[2], vocab["Ġw1"], vocab["Ġw2"], vocab["Ġw40"]} <= set(
        starts.ignore_uncopied_ids(copied, min_fraction=0.5, max_copy_rate=1.0, judge_word_starts=True))
    for bad in (dict(min_fraction=0), dict(max_copy_rate=1.5)):
        with pytest.raises(ValueError, match=r"`min_fraction` must be in \(0, 1\] and `max_copy_rate` in \[0, 1\]"):
            plugin.ignore_uncopied_ids(pairs, **bad)
    with pytest.raises(ValueError, match="No training pairs"):
        plugin.ignore_uncopied_ids([])
    with pytest.raises(ValueError, match="Only a reweighter with a `copy_mode`"):
        make_plugin("llama").ignore_uncopied_ids(pairs)


def test_a_record_written_before_judge_word_starts_existed_still_loads(tmp_path):
    plugin, _ = spelled_plugin("llama")
    plugin.ignore_uncopied_ids([([5, 6], [6, EOS]), ([5, 7], [7, EOS])], min_fraction=0.5)
    plugin.save_pretrained(tmp_path / "r")
    config = json.loads((tmp_path / "r/config.json").read_text())
    del config["copy_ignore_uncopied"]["judge_word_starts"]  # as hf-plugin wrote it then
    (tmp_path / "r/config.json").write_text(json.dumps(config))
    loaded = PluginModel.from_pretrained(tmp_path / "r")
    assert loaded.config.copy_ignore_uncopied == {"min_fraction": 0.5, "max_copy_rate": 0.05, "judge_word_starts": False}
    assert loaded.config.copy_ignore_ids == plugin.config.copy_ignore_ids


def test_spelling_and_frequency_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="`copy_word_pieces` must be 1, 2 or 3, got 4"):
        PluginConfig(vocab_size=10, copy_mode="shared", copy_word_starts=True, copy_word_pieces=4)
    with pytest.raises(ValueError, match="`copy_word_pieces` above 1 needs `copy_word_starts`"):
        PluginConfig(vocab_size=10, copy_mode="shared", copy_word_pieces=2)
    for bad in (0.05, {"min_fraction": 0.01}, {"min_fraction": 0.01, "max_copy_rate": 2, "judge_word_starts": False},
                {"min_fraction": True, "max_copy_rate": 0, "judge_word_starts": False},
                {"min_fraction": 0.1, "max_copy_rate": 0, "judge_word_starts": 1}):
        with pytest.raises(ValueError, match="`copy_ignore_uncopied` must be"):
            PluginConfig(vocab_size=10, copy_mode="shared", copy_ignore_uncopied=bad)
    setup = task_folder(tmp_path, 16, 4)
    command = ["train", "--base", str(setup / "base"), "--data", str(setup / "train.csv"), "--output-dir",
               str(tmp_path / "x")]
    for extra, message in ((["--copy-ignore-uncopied", "0.05"], "--copy-ignore-uncopied needs --copy-mode"),
                           (["--copy-mode", "shared", "--copy-word-pieces", "2"], "--copy-word-pieces needs --copy-word-starts"),
                           (["--copy-mode", "shared", "--copy-ignore-uncopied", "1.5"], r"a rate in \[0, 1\], got 1.5"),
                           (["--copy-mode", "shared", "--copy-ignore-min-fraction", "0.5"],
                            "--copy-ignore-min-fraction needs --copy-ignore-uncopied")):
        with pytest.raises(SystemExit, match=message):
            main(command + extra)
    assert not (tmp_path / "x").exists()


def test_train_command_records_spellings_and_uncopied_ids(tmp_path, capsys):
    setup = task_folder(tmp_path, 16, 4)
    marked_tokenizer().save_pretrained(setup / "base")  # the same words, with word-start forms
    out = tmp_path / "run"
    main(["train", "--base", str(setup / "base"), "--data", str(setup / "train.csv"), "--validation-data",
          str(setup / "validation.csv"), "--prompt-column", "mr", "--completion-column", "ref", "--output-dir", str(out),
          "--hidden-size", "32", "--intermediate-size", "64", "--num-heads", "2", "--max-length", "32", "--epochs", "1",
          "--cpu", "--copy-mode", "shared", "--copy-word-starts", "--copy-word-pieces", "2",
          "--copy-ignore-uncopied", "0", "--copy-ignore-min-fraction", "0.1"])
    plugin = PluginModel.from_pretrained(out)
    assert plugin.config.copy_word_pieces == 2
    assert plugin.config.copy_ignore_uncopied == {"min_fraction": 0.1, "max_copy_rate": 0.0, "judge_word_starts": False}
    assert "left to the reweighter" in capsys.readouterr().out
    # task_rows: completions hold w20..w39 only, so every prompt word (w0..w18) is uncopied; w1 is in 2 of the 16
    # prompts (at least 10%), w0 in 1 (too rare to judge)
    vocab = marked_tokenizer().get_vocab()
    assert vocab["w1"] in plugin.config.copy_ignore_ids and vocab["w0"] not in plugin.config.copy_ignore_ids
    assert vocab["Ġw1"] not in plugin.config.copy_ignore_ids and vocab["w20"] not in plugin.config.copy_ignore_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_an_untrained_pointer_changes_nothing_and_a_trained_one_reads_the_slot(arch):
    shared = copy_plugin(arch, "shared", "prompt")
    pointed = make_plugin(arch, copy_mode="shared", copy_ignore_ids=[BOS, EOS], copy_pointer=2)
    pointed.load_state_dict(shared.state_dict(), strict=False)
    assert not pointed.copy_query.weight.any()
    ids = torch.tensor([[5, 6, 7, 6, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(pointed(ids, prompt_lengths=torch.tensor([5])).logits,
                                   shared(ids, prompt_lengths=torch.tensor([5])).logits)
        # Each prompt id's score is the query against the embeddings of the 2 tokens before it, nearest first.
        pointed.copy_query.weight.normal_(std=2.0)
        pointed.copy_keys.weight.normal_(std=2.0)
        ids = torch.tensor([[11, 12, 7, 13, 14, 8, 15]])
        logits = pointed(ids, prompt_lengths=torch.tensor([6])).logits[0, -1]
        hidden = pointed.backbone(ids, output_hidden_states=True).hidden_states[-1][0, -1]
        query, embed = pointed.copy_query(hidden), pointed.get_input_embeddings()
        key_7 = pointed.copy_keys(torch.cat([embed.weight[12], embed.weight[11]]))
        key_8 = pointed.copy_keys(torch.cat([embed.weight[14], embed.weight[13]]))
    torch.testing.assert_close(logits[7] - logits[8], query @ (key_7 - key_8), atol=1e-4, rtol=1e-4)
    assert abs(float(logits[7] - logits[8])) > 1e-2
    assert logits[15] == shared(ids, prompt_lengths=torch.tensor([6])).logits[0, -1, 15]  # not in the prompt
    # An id written twice is read at its last occurrence: under a few-shot prompt, the query's value.
    twice = torch.tensor([[11, 12, 7, 13, 14, 7, 15]])
    with torch.no_grad():
        logits = pointed(twice, prompt_lengths=torch.tensor([6])).logits[0, -1]
        hidden = pointed.backbone(twice, output_hidden_states=True).hidden_states[-1][0, -1]
        own = pointed.backbone(twice).logits[0, -1]
        gate = pointed.copy_head(hidden)
        key_7 = pointed.copy_keys(torch.cat([embed.weight[14], embed.weight[13]]))
    torch.testing.assert_close(logits[7], (gate + pointed.copy_query(hidden) @ key_7)[0], atol=1e-4, rtol=1e-4)
    assert logits[7] != own[7]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_pointer_on_every_occurrence_reads_each_one_and_keeps_the_best(arch):
    last = copy_plugin(arch, "shared", "prompt", copy_pointer=2)
    every = copy_plugin(arch, "shared", "prompt", copy_pointer=2, copy_pointer_occurrences="every")
    every.load_state_dict(last.state_dict())
    ids, lengths = torch.tensor([[11, 12, 7, 13, 14, 7, 15, 16]]), torch.tensor([7])
    with torch.no_grad():
        hidden = every.backbone(ids, output_hidden_states=True).hidden_states[-1][0, -1]
        query, gate, embed = every.copy_query(hidden), every.copy_head(hidden)[0], every.get_input_embeddings()
        key = lambda a, b: every.copy_keys(torch.cat([embed.weight[a], embed.weight[b]]))  # noqa: E731
        scores = {"first": query @ key(12, 11), "last": query @ key(14, 13)}  # 7 after 11 12, then after 13 14
        got = {name: model(ids, prompt_lengths=lengths).logits[0, -1] for name, model in (("last", last), ("every", every))}
    torch.testing.assert_close(got["last"][7], gate + scores["last"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["every"][7], gate + max(scores.values()), atol=1e-4, rtol=1e-4)
    assert abs(float(scores["first"] - scores["last"])) > 1e-2
    # ids written once score alike; 16 comes after the prompt and is not pointed at
    for token in (11, 12, 13, 14, 15, 16):
        assert got["every"][token] == got["last"][token]
    # A token that brings an ignored id brings nothing: BOS is in the prompt, but not in the copy set.
    with_bos = torch.tensor([[BOS, 12, 7, 13, 14, 7, 15, 16]])
    assert not every(with_bos, prompt_lengths=lengths).logits[0, -1, BOS].ne(
        every.backbone(with_bos).logits[0, -1, BOS]).any()


def assert_head_adds_its_value(plain, model, head: str, ids, lengths, receives) -> None:
    """`model` is `plain` with one more zero-initialised head: at first it changes nothing; trained (here: random),
    position `t` gives exactly the ids `receives(t)` the head's value on top of `plain`'s logits."""
    model.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, prompt_lengths=lengths).logits, plain(ids, prompt_lengths=lengths).logits)
        getattr(model, head).weight.normal_(std=2.0)
        out = model(ids, prompt_lengths=lengths).logits[0]
        before = plain(ids, prompt_lengths=lengths).logits[0]
        value = getattr(model, head)(model.backbone(ids, output_hidden_states=True).hidden_states[-1][0])[:, 0]
    for t in range(ids.shape[1]):
        for token in range(model.config.vocab_size):
            expected = before[t, token] + (value[t] if token in receives(t) else 0.0)
            torch.testing.assert_close(out[t, token], expected, atol=1e-4, rtol=1e-4)
    assert float(value.abs().min()) > 1e-3  # the value visibly matters


@pytest.mark.parametrize("arch", ARCHS)
def test_coverage_adds_its_value_to_the_prompt_ids_already_written_and_starts_at_zero(arch):
    covered = make_plugin(arch, copy_mode="shared", copy_ignore_ids=[BOS, EOS], copy_pointer=2, copy_coverage=True)
    ids, lengths = torch.tensor([[BOS, 5, 6, 7, 6, 9, 5, 10]]), torch.tensor([4])  # prompt BOS 5 6 7; wrote 6 9 5 10
    # the prompt ids written up to position t
    assert_head_adds_its_value(copy_plugin(arch, "shared", "prompt", copy_pointer=2), covered, "copy_written", ids,
                               lengths, lambda t: {int(v) for v in ids[0, 4 : t + 1]} & {5, 6, 7})


@pytest.mark.parametrize("arch", ARCHS)
def test_continuation_adds_its_value_to_the_prompt_ids_after_the_last_written_token_and_starts_at_zero(arch):
    following = make_plugin(arch, copy_mode="shared", copy_ignore_ids=[BOS, EOS], copy_pointer=2,
                            copy_continuation=True)
    # prompt BOS 5 6 7 5 8; wrote 5 9 6 7: 5 is followed by 6 and 8 in the prompt, 9 by nothing, 6 by 7, 7 by 5
    ids, lengths = torch.tensor([[BOS, 5, 6, 7, 5, 8, 5, 9, 6, 7]]), torch.tensor([6])
    expected_ids = {6: {6, 8}, 7: set(), 8: {7}, 9: {5}}  # by position; the prompt's own positions get none
    assert_head_adds_its_value(copy_plugin(arch, "shared", "prompt", copy_pointer=2), following, "copy_continue", ids,
                               lengths, lambda t: expected_ids.get(t, set()))


def test_continuation_follows_a_word_start_and_a_spelled_word_to_the_piece_after_them():
    plugin, vocab = spelled_plugin("llama", copy_continuation=True)  # Ġw40 is spelled w1 w2
    w = {i: vocab[f"w{i}"] for i in range(10)}
    # prompt w1 w2 w3 w5 w6; the output wrote Ġw40 (the spelled w1 w2), then Ġw5 (the word start of w5)
    ids = torch.tensor([[w[1], w[2], w[3], w[5], w[6], vocab["Ġw40"], vocab["Ġw5"]]])
    brought, following = copy_set_columns(plugin.config, ids, plugin.config.vocab_size, prompt_lengths=torch.tensor([5]),
                                          following=True, **plugin._copy_tables())
    got = continuations(brought, following, ids[:, 5:], plugin.config.vocab_size)[0]
    assert got[0].nonzero().flatten().tolist() == [w[3]]  # after the spelling's last piece, not after w1
    assert got[1].nonzero().flatten().tolist() == [w[6]]


@pytest.mark.parametrize("arch", ARCHS)
def test_word_forms_give_each_form_its_value_exactly_and_survive_save_and_load(arch, tmp_path):
    plain, vocab = spelled_plugin(arch)  # Ġw40 is spelled w1 w2, Ġw41 w3 w4 w5
    formed, _ = spelled_plugin(arch, copy_word_forms=True)
    untrained = PluginModel(formed.config)
    assert not untrained.copy_forms.weight.any() and not untrained.copy_forms.bias.any()
    formed.load_state_dict({**plain.state_dict(), **{k: v for k, v in formed.state_dict().items() if "forms" in k}})
    w = {i: vocab[f"w{i}"] for i in range(10)}
    ids = torch.tensor([[w[1], w[2], w[3], w[4], w[5], w[6], vocab["Ġw1"]]])
    mask, lengths = torch.ones_like(ids), torch.tensor([6])
    with torch.no_grad():
        out = formed(ids, attention_mask=mask, prompt_lengths=lengths).logits[0]
        before = plain(ids, attention_mask=mask, prompt_lengths=lengths).logits[0]
        hidden = formed.backbone(ids, output_hidden_states=True).hidden_states[-1][0]
        values = formed.copy_forms(hidden)  # word start, spelled in 2 pieces, in 3 pieces
    # each form's ids, from the column of the form's last piece on
    joins = {(vocab[f"Ġw{i}"], 0): i - 1 for i in range(1, 7)}
    joins.update({(vocab["Ġw40"], 1): 1, (vocab["Ġw41"], 2): 4})
    for t in range(7):
        for token in range(formed.config.vocab_size):
            bonus = sum(values[t, form] for (tok, form), column in joins.items() if tok == token and column <= t)
            torch.testing.assert_close(out[t, token], before[t, token] + bonus, atol=1e-4, rtol=1e-4)
    labels = torch.full_like(ids, -100)
    labels[0, 6:] = ids[0, 6:]
    formed.save_pretrained(tmp_path / "r")
    loaded = PluginModel.from_pretrained(tmp_path / "r")
    assert "the ids brought in as a word start or as a spelled word get one value per form" in (
        tmp_path / "r/README.md").read_text()
    with torch.no_grad():
        expected = formed(ids, attention_mask=mask, labels=labels).logits
        torch.testing.assert_close(loaded(ids, attention_mask=mask, labels=labels).logits, expected)
        selected = loss_positions(labels)
        torch.testing.assert_close(loaded.completion_logits(ids, mask, selected), expected[selected], atol=1e-5,
                                   rtol=1e-5)


def test_pointer_option_is_checked_and_trained_from_the_command_line(tmp_path):
    for bad in (-1, 17, 1.5, True):
        with pytest.raises(ValueError, match="`copy_pointer` must be an integer from 0 to 16"):
            PluginConfig(vocab_size=10, copy_mode="shared", copy_pointer=bad)
    for bad in ({}, {"copy_mode": "shared", "copy_source": "context"}):
        with pytest.raises(ValueError, match="`copy_pointer` needs a `copy_mode` with the prompt as its source"):
            PluginConfig(vocab_size=10, copy_pointer=2, **bad)
    with pytest.raises(ValueError, match="`copy_pointer_occurrences` must be one of last, every, got 'first'"):
        PluginConfig(vocab_size=10, copy_mode="shared", copy_pointer=2, copy_pointer_occurrences="first")
    with pytest.raises(ValueError, match="`copy_pointer_occurrences` needs a `copy_pointer`"):
        PluginConfig(vocab_size=10, copy_mode="shared", copy_pointer_occurrences="every")
    for bad in ({}, {"copy_mode": "shared", "copy_source": "context"}):
        with pytest.raises(ValueError, match="`copy_coverage` needs a `copy_mode` with the prompt as its source"):
            PluginConfig(vocab_size=10, copy_coverage=True, **bad)
    with pytest.raises(ValueError, match="`copy_coverage` must be True or False, got 1"):
        PluginConfig(vocab_size=10, copy_mode="shared", copy_coverage=1)
    for bad in ({}, {"copy_mode": "shared", "copy_source": "context"}):
        with pytest.raises(ValueError, match="`copy_continuation` needs a `copy_mode` with the prompt as its source"):
            PluginConfig(vocab_size=10, copy_continuation=True, **bad)
    with pytest.raises(ValueError, match="`copy_continuation` must be True or False, got 'yes'"):
        PluginConfig(vocab_size=10, copy_mode="shared", copy_continuation="yes")
    with pytest.raises(ValueError, match="`copy_word_forms` needs `copy_word_starts`"):
        PluginConfig(vocab_size=10, copy_mode="shared", copy_word_forms=True)
    with pytest.raises(ValueError, match="`copy_word_forms` must be True or False, got 0"):
        PluginConfig(vocab_size=10, copy_mode="shared", copy_word_starts=True, copy_word_forms=0)
    setup = task_folder(tmp_path, 16, 4)
    command = ["train", "--base", str(setup / "base"), "--data", str(setup / "train.csv"), "--prompt-column", "mr",
               "--completion-column", "ref", "--hidden-size", "32", "--intermediate-size", "64", "--num-heads", "2",
               "--max-length", "32", "--epochs", "1", "--cpu"]
    with pytest.raises(SystemExit, match="--copy-pointer needs --copy-mode"):
        main(command + ["--output-dir", str(tmp_path / "x"), "--copy-pointer", "2"])
    with pytest.raises(SystemExit, match="cannot be used with --copy-source context"):
        main(command + ["--output-dir", str(tmp_path / "x"), "--copy-mode", "shared", "--copy-source", "context",
                        "--copy-pointer", "2"])
    with pytest.raises(SystemExit, match="--copy-pointer must be 0 \\(none\\) to 16 tokens, got 17"):
        main(command + ["--output-dir", str(tmp_path / "x"), "--copy-mode", "shared", "--copy-pointer", "17"])
    with pytest.raises(SystemExit, match="--copy-coverage needs --copy-mode"):
        main(command + ["--output-dir", str(tmp_path / "x"), "--copy-coverage"])
    with pytest.raises(SystemExit, match="--copy-coverage tells the prompt's ids from the output's"):
        main(command + ["--output-dir", str(tmp_path / "x"), "--copy-mode", "shared", "--copy-source", "context",
                        "--copy-coverage"])
    with pytest.raises(SystemExit, match="--copy-word-forms needs --copy-word-starts"):
        main(command + ["--output-dir", str(tmp_path / "x"), "--copy-mode", "shared", "--copy-word-forms"])
    with pytest.raises(SystemExit, match="--copy-continuation needs --copy-mode"):
        main(command + ["--output-dir", str(tmp_path / "x"), "--copy-continuation"])
    with pytest.raises(SystemExit, match="--copy-continuation tells the prompt's ids from the output's"):
        main(command + ["--output-dir", str(tmp_path / "x"), "--copy-mode", "shared", "--copy-source", "context",
                        "--copy-continuation"])
    with pytest.raises(SystemExit, match="--copy-pointer-occurrences needs --copy-pointer"):
        main(command + ["--output-dir", str(tmp_path / "x"), "--copy-mode", "shared", "--copy-pointer-occurrences",
                        "every"])
    assert not (tmp_path / "x").exists()  # refused before any work
    main(command + ["--output-dir", str(tmp_path / "run"), "--copy-mode", "shared", "--copy-pointer", "2",
                    "--copy-pointer-occurrences", "every", "--copy-coverage", "--copy-continuation"])
    plugin = PluginModel.from_pretrained(tmp_path / "run")
    assert plugin.config.copy_pointer == 2 and plugin.copy_query.weight.abs().sum() > 0  # trained
    assert plugin.config.copy_pointer_occurrences == "every" and plugin.config.copy_coverage
    assert plugin.config.copy_continuation and plugin.copy_written is not None and plugin.copy_continue is not None
    # (saved and loaded; their training: the cached-loss test)
