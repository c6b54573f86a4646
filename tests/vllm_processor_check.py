"""Checks of `hf_plugin.vllm.ReweighterLogitsProcessor` driven the way vLLM's engine drives it, without a server:
run by `tests/test_vllm.py` with the vLLM venv's Python (vLLM cannot be imported beside the main venv's
transformers). Exits non-zero with the failed assertion."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

sys.path.insert(0, str(Path(__file__).parent))
from conftest import EOS, PAD, VOCAB, make_base, make_plugin, make_tokenizer  # noqa: E402

from hf_plugin import PluginLogitsProcessor  # noqa: E402
from hf_plugin.vllm import ReweighterLogitsProcessor  # noqa: E402


def vllm_config(tokenizer_folder, reweighters, vocab_size=VOCAB):
    """What the processor reads of vLLM's config."""
    model_config = SimpleNamespace(tokenizer=str(tokenizer_folder), tokenizer_revision=None, trust_remote_code=False,
                                   model="tiny", get_vocab_size=lambda: vocab_size)
    return SimpleNamespace(model_config=model_config, additional_config={"hf_plugin": {"reweighters": reweighters}})


def alone(base, reweighter, prompt, steps, alpha=None):
    """In-process greedy generate() of one prompt, with the reweighter or without."""
    ids = torch.tensor([prompt])
    processors = [PluginLogitsProcessor(reweighter, alpha=alpha)] if reweighter is not None else []
    out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                        min_new_tokens=steps, pad_token_id=PAD, eos_token_id=EOS, logits_processor=processors)
    return out[0, len(prompt):].tolist()


def check_a_persistent_batch_equals_each_request_alone(folder, base, reweighter):
    """Requests added, finished, replaced at their index, swapped and moved, as vLLM's batch does, and output lists
    grown by two tokens between calls: every request that names the reweighter gets the tokens it gets alone
    in-process; the others get the base's."""
    config = vllm_config(folder / "tokenizer", {"rw": str(folder / "rw")})
    processor = ReweighterLogitsProcessor(config, "cpu", False)
    # A second processor sees every batch change but computes one step alone (step 5): the first then finds output
    # lists two tokens longer than at its last call, as with an engine that skips a processor for a step.
    stand_in = ReweighterLogitsProcessor(config, "cpu", False)
    prompts = {"a": [5, 6, 7], "b": [8, 9, 10, 11, 12], "c": [20, 21], "d": [30, 31, 32, 33], "e": [40]}
    xargs = {"a": {"reweighter": "rw"}, "b": {"reweighter": "rw", "alpha": 0.5}, "c": None,
             "d": {"reweighter": "rw"}, "e": {"reweighter": "rw", "alpha": 2.0}}
    outputs = {name: [] for name in prompts}
    slots: list[str | None] = []

    def add(name, index):
        while len(slots) <= index:
            slots.append(None)
        slots[index] = name
        return index, SamplingParams(extra_args=xargs[name]), prompts[name], outputs[name]

    # The schedule of batch changes before each step (removed, added, moved), as vLLM reports them.
    schedule = {
        0: ([], ["a", "b", "c"], []),
        3: ([1], ["d"], []),                         # b finishes; d takes its index
        5: ([], [], [(0, 2, MoveDirectionality.SWAP)]),
        7: ([2], ["e"], []),                         # a (now at 2) finishes; e takes index 2
        9: ([0], [], [(2, 0, MoveDirectionality.UNIDIRECTIONAL)]),  # c finishes; e condensed to index 0
        10: ([1], [], []),                           # d finishes: e alone continues its cache
    }
    fed = []  # tokens per row the reweighter is run on, per step
    processor.reweighters["rw"].register_forward_pre_hook(
        lambda module, args, kwargs: fed.append((args[0] if args else kwargs["input_ids"]).shape[1]), with_kwargs=True)
    finished = {}
    for step in range(12):
        removed, added, moved = schedule.get(step, ([], [], []))
        for index in removed:
            finished[slots[index]] = list(outputs[slots[index]])
            slots[index] = None
        additions = []
        for name in added:
            index = slots.index(None) if None in slots else len(slots)
            additions.append(add(name, index))
        for first, second, direction in moved:
            if direction == MoveDirectionality.SWAP:
                slots[first], slots[second] = slots[second], slots[first]
            else:
                slots[second], slots[first] = slots[first], None
        while slots and slots[-1] is None:
            slots.pop()
        processor.update_state(BatchUpdate(len(slots), removed, additions, moved))
        stand_in.update_state(BatchUpdate(len(slots), removed, additions, moved))
        rows = [name for name in slots]
        with torch.no_grad():
            logits = torch.stack([base(torch.tensor([prompts[name] + outputs[name]])).logits[0, -1]
                                  if name else torch.zeros(VOCAB) for name in rows])
        logits[:, EOS] = float("-inf")  # as min_new_tokens does in the reference: every request runs its steps
        logits = (stand_in if step == 5 else processor).apply(logits)
        for name, row in zip(rows, logits):
            if name:
                outputs[name].append(int(row.argmax()))
    for name in slots:
        if name:
            finished[name] = outputs[name]
    for name, tokens in finished.items():
        extra = xargs[name] or {}
        expected = alone(base, reweighter if extra else None, prompts[name], len(tokens), extra.get("alpha"))
        assert tokens == expected, (name, tokens, expected)
    assert finished["a"] != alone(base, None, prompts["a"], len(finished["a"]))  # the reweighter mattered
    assert fed[-2:] == [1, 1], fed  # after d finished, e's row still extended the cache by one token
    print("persistent batch: ok", {name: len(tokens) for name, tokens in finished.items()})


def check_start_up_refusals(folder):
    try:
        ReweighterLogitsProcessor(vllm_config(folder / "tokenizer", {"rw": str(folder / "rw")}, vocab_size=80), "cpu",
                                  False)
    except ValueError as error:
        assert "reweighter 'rw'" in str(error) and "80" in str(error) and str(VOCAB) in str(error), error
    else:
        raise AssertionError("a reweighter of another vocabulary was loaded")
    for bad in ({}, {"hf_plugin": {}}, {"hf_plugin": {"reweighters": {"rw": 5}}}, {"hf_plugin": {"reweighters": {}}}):
        config = vllm_config(folder / "tokenizer", {})
        config.additional_config = bad
        try:
            ReweighterLogitsProcessor(config, "cpu", False)
        except ValueError as error:
            assert '--additional-config \'{"hf_plugin": {"reweighters"' in str(error), error
        else:
            raise AssertionError(f"{bad} was taken for a configuration")
    print("start-up refusals: ok")


def check_validate_params():
    sys.argv = ["api_server", "--additional-config", '{"hf_plugin": {"reweighters": {"rw": "x"}}}']
    ReweighterLogitsProcessor.validate_params(SamplingParams(extra_args={"reweighter": "rw", "alpha": 0.5}))
    ReweighterLogitsProcessor.validate_params(SamplingParams())
    for extra, message in (({"reweighter": "nope"}, "Unknown reweighter 'nope'; this server has rw"),
                           ({"reweighter": "rw", "alpha": float("nan")}, "vllm_xargs.alpha"),
                           ({"reweighter": "rw", "alpha": True}, "vllm_xargs.alpha"),
                           ({"reweighter": 3}, "must be a name"), ({"alpha": 1.0}, "name the reweighter too")):
        try:
            ReweighterLogitsProcessor.validate_params(SamplingParams(extra_args=extra))
        except ValueError as error:
            assert message in str(error), (message, str(error))
        else:
            raise AssertionError(f"{extra} was accepted")
    print("validate_params: ok")


def main():
    torch.manual_seed(0)
    tokenizer, base, reweighter = make_tokenizer(), make_base("llama"), make_plugin("llama")
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        tokenizer.save_pretrained(folder / "tokenizer")
        reweighter.save_pretrained(folder / "rw")
        check_a_persistent_batch_equals_each_request_alone(folder, base, reweighter)
        check_start_up_refusals(folder)
    check_validate_params()


if __name__ == "__main__":
    main()
