"""The FastAPI application: OpenAI-compatible routes over a `GenerationEngine`."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..compatibility import base_model_identity
from ..modeling_plugin import PluginModel
from .engine import ChoiceDelta, GenerationEngine, GenerationJob, ServedModel, TokenLogprob
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ServerLimits,
    TokenizeRequest,
    parse_request,
)


logger = logging.getLogger("hf_plugin.serving")


def served_models(base: PreTrainedModel, reweighters: dict[str, PluginModel], base_name: str | None = None,
                  tokenizer: PreTrainedTokenizerBase | None = None, strict: bool = True) -> dict[str, ServedModel]:
    """The model ids a server answers to: `BASE` alone and `BASE+NAME` for each reweighter, each checked first.

    Args:
        base (`PreTrainedModel`): the base model.
        reweighters (`dict[str, PluginModel]`): reweighters by name.
        base_name (`str`, *optional*): the base's model id; defaults to its portable identity (its Hub id, or the
            name of its folder or file).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the base tokenizer, checked against each reweighter.
        strict (`bool`, *optional*, defaults to `True`): refuse a reweighter whose vocabulary or tokenizer differs
            from the base's (a `ValueError` naming both sides); with `False` only warn.
    """
    base_name = base_name or base_model_identity(base.config.name_or_path)[0] or "base"
    base_positions = getattr(base.config, "max_position_embeddings", None)
    models = {base_name: ServedModel(base_name, None, base_positions)}
    for name, plugin in reweighters.items():
        try:
            plugin.check_compatible(base, tokenizer=tokenizer, strict=strict)
        except ValueError as error:
            raise ValueError(f"reweighter {name!r} does not fit base {base_name!r}: {error}") from error
        positions = [p for p in (base_positions, plugin.config.max_position_embeddings) if p]
        model_id = f"{base_name}+{name}"
        models[model_id] = ServedModel(model_id, plugin.eval(), min(positions, default=None))
    return models


def create_app(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reweighters: dict[str, PluginModel] | None = None,
    base_name: str | None = None,
    limits: ServerLimits | None = None,
    api_key: str | None = None,
    strict: bool = True,
    return_tokens_as_token_ids: bool = False,
) -> FastAPI:
    """An OpenAI-compatible app serving a base model alone and with each reweighter.

    Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent events
    with `stream=true`), and vLLM's tokenizer routes `GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`.
    Completions take several prompts, prompts as token ids, `echo` with `logprobs` (the prompt's log-probs under
    the served model: the combined distribution for `BASE+NAME`), `max_tokens=0` with `echo`, and `logit_bias`:
    what lm-evaluation-harness's `local-completions` and hf-plugin's own `RemoteBase` send. Reweighters are checked
    against the base (vocabulary and tokenizer) before the app exists.

    Args:
        base (`PreTrainedModel`): the base model, in eval mode.
        tokenizer (`PreTrainedTokenizerBase`): the base tokenizer; chat requests need its chat template.
        reweighters (`dict[str, PluginModel]`, *optional*): reweighters by name, served as `BASE+NAME`.
        base_name (`str`, *optional*): the model id of the base alone (see `served_models`).
        limits (`ServerLimits`, *optional*): request size and concurrency limits.
        api_key (`str`, *optional*): when set, every request needs `Authorization: Bearer <api_key>`.
        strict (`bool`, *optional*, defaults to `True`): refuse reweighters whose tokenizer differs from the base's.
        return_tokens_as_token_ids (`bool`, *optional*, defaults to `False`): name tokens in log-probs `token_id:N`
            rather than by their text (vLLM's option of the same name; a request may set it too). Exact token
            identity for clients such as `RemoteBase`, where texts can be shared by several tokens.

    Returns:
        `FastAPI`: run it with uvicorn; `app.state.engine` is its `GenerationEngine`.
    """
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("`api_key` must be a non-empty string, or None to serve without authentication.")
    limits = limits or ServerLimits()
    models = served_models(base, reweighters or {}, base_name, tokenizer, strict)
    engine = GenerationEngine(base, tokenizer, limits)
    base_positions = models[next(iter(models))].max_positions
    app = FastAPI(title="hf-plugin", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.models, app.state.api_key = engine, models, api_key
    app.router.on_shutdown.append(engine.shutdown)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return JSONResponse(APIError(error.status_code, str(error.detail), code=None).body(), status_code=error.status_code)

    app.add_middleware(_InternalErrors)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Missing or incorrect API key (send 'Authorization: Bearer <key>').",
                           code="invalid_api_key")

    async def read_json(request: Request):
        authorize(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"Request body over {limits.max_body_bytes} bytes.", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise APIError(413, f"Request body over {limits.max_body_bytes} bytes.", code="body_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise APIError(400, f"The request body is not valid JSON: {error}.", code="invalid_json") from None
        except RecursionError:  # JSON nested thousands deep
            raise APIError(400, "The request body is nested too deeply.", code="invalid_json") from None

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [_model_card(model_id, created) for model_id in models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        if model_id not in models:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return _model_card(model_id, created)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_request(CompletionRequest, await read_json(request))
        prompts = body.prompts()
        if len(prompts) > limits.max_prompts:
            raise APIError(400, f"The request has {len(prompts)} prompts; this server allows at most "
                                f"{limits.max_prompts}.", param="prompt")
        if len(prompts) > 1 and body.stream:
            raise APIError(400, "Streaming takes one prompt per request.", param="prompt")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 generates nothing; it is for scoring a prompt with echo=true.",
                           param="max_tokens")
        jobs = []
        for number, prompt in enumerate(prompts):
            ids = _token_ids(prompt, tokenizer) if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]
            job = _job(body, models, limits, ids, body.top_logprobs(), "prompt", default_max_tokens=16,
                       vocab_size=len(tokenizer))
            if body.echo:
                job.echo_text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
            ids_wanted = body.return_tokens_as_token_ids
            job.token_ids = return_tokens_as_token_ids if ids_wanted is None else ids_wanted
            job.index = number * body.n
            jobs.append(job)
        return await _respond(engine, body, jobs, "cmpl", _completion_choice, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_request(ChatCompletionRequest, await read_json(request))
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "The base tokenizer has no chat template; use /v1/completions.", param="messages")
        text = tokenizer.apply_chat_template([m.as_template_message() for m in body.messages], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        job = _job(body, models, limits, ids, body.top_logprobs_count(), "messages", default_max_tokens=limits.max_tokens,
                   vocab_size=len(tokenizer))
        return await _respond(engine, body, [job], "chatcmpl", _chat_choice, "chat.completion")

    def known_model(name: str | None) -> None:
        if name is not None and name not in models:
            raise APIError(404, f"The model '{name}' does not exist; see GET /v1/models.", param="model",
                           code="model_not_found")

    # The tokenizer routes of vLLM, at the root as there: lm-evaluation-harness's remote tokenizer uses them.
    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        authorize(request)
        special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return {"tokenizer_class": type(tokenizer).__name__, **{k: v for k, v in special.items() if v is not None},
                "chat_template": getattr(tokenizer, "chat_template", None), "vocab_size": len(tokenizer),
                "max_model_len": base_positions}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = parse_request(TokenizeRequest, await read_json(request))
        known_model(body.model)
        if body.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise APIError(400, "The base tokenizer has no chat template.", param="messages")
            text = tokenizer.apply_chat_template([m.as_template_message() for m in body.messages], tokenize=False,
                                                 add_generation_prompt=body.add_generation_prompt)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        return {"count": len(ids), "max_model_len": base_positions, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = parse_request(DetokenizeRequest, await read_json(request))
        known_model(body.model)
        return {"prompt": tokenizer.decode(_token_ids(body.tokens, tokenizer, "tokens"))}

    return app


class _InternalErrors:
    """Answers an unexpected exception with a JSON 500, as an ordinary response. Starlette's handler for `Exception`
    re-raises once it has answered, and uvicorn then closes the connection: every 500 would cost a keep-alive client
    its connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            if started:  # half an answer cannot be replaced by another: the connection has to go
                raise
            logger.exception("request failed")
            error = APIError(500, "Internal server error.", type="server_error")
            await JSONResponse(error.body(), status_code=500)(scope, receive, send)


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "hf-plugin"}


def _token_ids(ids: list[int], tokenizer, field: str = "prompt") -> list[int]:
    """Token ids from a request, each checked to be one of the tokenizer's."""
    bad = next((token for token in ids if not 0 <= token < len(tokenizer)), None)
    if bad is not None:
        raise APIError(400, f"Token id {bad} in '{field}' is outside the vocabulary of {len(tokenizer)} tokens.",
                       param=field)
    return list(ids)


def _job(body, models: dict[str, ServedModel], limits: ServerLimits, prompt_ids: list[int], top_logprobs,
         prompt_field: str, default_max_tokens: int, vocab_size: int) -> GenerationJob:
    """Checks a parsed request against the served models and the limits; everything here is a 4xx."""
    model = models.get(body.model)
    if model is None:
        raise APIError(404, f"The model '{body.model}' does not exist; see GET /v1/models.", param="model",
                       code="model_not_found")
    if body.alpha is not None and model.reweighter is None:
        raise APIError(400, f"'alpha' sets the reweighting strength; model '{body.model}' has no reweighter.",
                       param="alpha")
    if body.n > limits.max_n:
        raise APIError(400, f"n is {body.n}; this server allows at most {limits.max_n}.", param="n")
    if top_logprobs is not None and top_logprobs > limits.max_logprobs:
        field = "logprobs" if isinstance(body, CompletionRequest) else "top_logprobs"
        raise APIError(400, f"{field} is {top_logprobs}; this server allows at most {limits.max_logprobs}.",
                       param=field)
    bias = {int(key): value for key, value in (body.logit_bias or {}).items()}
    outside = [token for token in bias if token >= vocab_size]
    if outside:
        raise APIError(400, f"logit_bias names token {outside[0]}, outside the vocabulary of {vocab_size} tokens.",
                       param="logit_bias")
    if body.max_tokens is not None and body.max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens is {body.max_tokens}; this server allows at most {limits.max_tokens}.",
                       param="max_tokens")
    if not prompt_ids:
        raise APIError(400, "The prompt is empty.", param=prompt_field)
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise APIError(400, f"The prompt has {len(prompt_ids)} tokens; this server allows at most "
                            f"{limits.max_prompt_tokens}.", param=prompt_field, code="context_length_exceeded")
    room = (model.max_positions or len(prompt_ids) + limits.max_tokens) - len(prompt_ids)
    max_tokens = body.max_tokens if body.max_tokens is not None else min(default_max_tokens, room)
    if max_tokens > room:
        raise APIError(400, f"The prompt ({len(prompt_ids)} tokens) and max_tokens ({max_tokens}) pass the "
                            f"{model.max_positions} positions of model '{model.id}'.", param="max_tokens",
                       code="context_length_exceeded")
    if max_tokens < 1 and body.max_tokens != 0:
        raise APIError(400, f"The prompt ({len(prompt_ids)} tokens) leaves no room in the {model.max_positions} "
                            f"positions of model '{model.id}'.", param=prompt_field, code="context_length_exceeded")
    return GenerationJob(model, prompt_ids, max_tokens, n=body.n, temperature=body.temperature, top_p=body.top_p,
                         seed=body.seed, stops=body.stops(), top_logprobs=top_logprobs, alpha=body.alpha,
                         logit_bias=bias)


async def _respond(engine: GenerationEngine, body, jobs: list[GenerationJob], prefix: str, choice_of, kind: str):
    """Runs the jobs (one per prompt); answers one JSON object, or server-sent events with `stream=true` (one job)."""
    job = jobs[0]
    head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": job.model.id}
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    futures = []
    try:
        for each in jobs:
            futures.append(engine.submit(each, lambda deltas: loop.call_soon_threadsafe(queue.put_nowait, deltas),
                                         cancelled))
            futures[-1].add_done_callback(lambda _: queue.put_nowait(None))
    except APIError:  # the queue filled up part-way: the prompts already admitted are not run for nothing
        cancelled.set()
        raise
    future = futures[0]

    def usage(completion_tokens: int) -> dict:
        prompt_tokens = sum(len(each.prompt_ids) for each in jobs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    if not body.stream:
        merged = [ChoiceDelta(i, "", []) for i in range(len(jobs) * job.n)]
        try:
            done = 0
            while done < len(futures):
                deltas = await queue.get()
                if deltas is None:
                    done += 1
                    continue
                for delta in deltas:
                    choice = merged[delta.index]
                    choice.text += delta.text
                    choice.logprobs += delta.logprobs
                    choice.finish_reason = delta.finish_reason or choice.finish_reason
            results = [await each for each in futures]
        finally:
            cancelled.set()  # a failed prompt stops the others; finished ones are unaffected
        choices = [choice_of(choice, job, streamed=False) for choice in merged]
        return {**head, "choices": choices, "usage": usage(sum(r.completion_tokens for r in results))}

    chunk_kind = kind + ".chunk" if kind == "chat.completion" else kind
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events():
        chunk = {**head, "object": chunk_kind}
        try:
            if kind == "chat.completion":
                first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(job.n)]
                yield _sse({**chunk, "choices": first})
            finished = []
            while (deltas := await queue.get()) is not None:
                for delta in deltas:
                    if delta.finish_reason:
                        finished.append(delta)  # sent last, with the usage
                    else:
                        yield _sse({**chunk, "choices": [choice_of(delta, job, streamed=True)]})
            try:
                result = await future
            except Exception:
                logger.exception("generation failed")
                yield _sse(APIError(500, "Generation failed.", type="server_error").body())
                return
            # Usage rides on the last chunk (and, as OpenAI does, on a final chunk without choices when asked).
            for number, delta in enumerate(finished, start=1):
                last = {"usage": usage(result.completion_tokens)} if number == len(finished) else {}
                yield _sse({**chunk, "choices": [choice_of(delta, job, streamed=True)], **last})
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": usage(result.completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # a client that left stops its generation; a finished one is unaffected

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _completion_choice(choice: ChoiceDelta, job: GenerationJob, streamed: bool) -> dict:
    logprobs = None
    if job.top_logprobs is not None:
        logprobs = {"tokens": [t.token for t in choice.logprobs], "token_logprobs": [t.logprob for t in choice.logprobs],
                    "top_logprobs": [_top(t.top) for t in choice.logprobs], "text_offset": _offsets(choice.logprobs)}
    return {"index": choice.index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}


def _top(top: list[tuple[str, float]] | None) -> dict | None:
    """Alternatives by text; where several tokens read the same, the likeliest one's log-prob is kept."""
    if top is None:
        return None
    best = {}
    for text, value in top:
        best.setdefault(text, value)
    return best


def _offsets(tokens: list[TokenLogprob]) -> list[int]:
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token.token)
    return offsets


def _chat_choice(choice: ChoiceDelta, job: GenerationJob, streamed: bool) -> dict:
    logprobs = None
    if job.top_logprobs is not None:
        logprobs = {"content": [
            {**_token(t.token, t.logprob), "top_logprobs": [_token(text, value) for text, value in t.top]}
            for t in choice.logprobs]}
    message = {"role": "assistant", "content": choice.text}
    body = {"delta": {"content": choice.text}} if streamed else {"message": message}
    return {"index": choice.index, **body, "logprobs": logprobs, "finish_reason": choice.finish_reason}


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
