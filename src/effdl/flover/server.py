"""An OpenAI-compatible HTTP server over ``AsyncEngine`` (FastAPI + uvicorn).

Routes: ``POST /v1/completions`` (prompt as text or token ids, as OpenAI's
legacy API and vLLM accept), ``POST /v1/chat/completions``, both streaming
(Server-Sent Events) or not and with ``n`` choices (one engine request each);
vLLM's ``POST /tokenize`` and ``/detokenize``; ``GET /v1/models``, ``/health``
and ``/metrics`` (Prometheus text). With an API key, /v1/* and (de)tokenize
need it as a bearer token. Errors are OpenAI-style JSON with a 4xx code (503
when the queue is full or the engine has stopped); a field the server does not
implement, or does not know, is a 400 naming it rather than silently ignored.
A client that disconnects has its request aborted.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import jinja2
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from effdl.core.config import PRESETS, ModelConfig
from effdl.core.hf import load_checkpoint
from effdl.core.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer, Tokenizer, load_tokenizer
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError
from effdl.flover.async_engine import AsyncEngine, EngineStopped
from effdl.flover.engine import Engine
from effdl.flover.request import RequestOutput, SamplingParams
from effdl.flover.scheduler import QueueFull

# Used when the checkpoint's tokenizer config has no chat template: one "role: content" line per message.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


MAX_N = 16  # most choices one request may ask for: each is its own engine request and KV slot
MAX_STOP = 4  # most stop strings, as OpenAI allows

# Fields the OpenAI API defines that this server does not implement. A request that sends one gets a 400
# naming it rather than an answer that silently ignores it; any other unknown field gets a 400 too.
UNSUPPORTED_FIELDS = frozenset({
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "tool_calls", "tool_call_id",
    "audio", "modalities", "prediction", "web_search_options", "reasoning_effort", "service_tier", "store",
    "metadata", "refusal"})


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class _Body(BaseModel):
    """A request body: a field outside the model is an error (400 naming it), never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class _Sampling(_Body):
    """The sampling fields common to both endpoints (OpenAI's names, plus vLLM's extras).

    OpenAI-defined numbers may be sent as null, which means their default.
    """

    model: str
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int = 0  # vLLM's extra; -1 also means no limit
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extra
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extra
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = 1
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float = 1.0  # vLLM's extra
    min_tokens: int = 0  # vLLM's extra
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None  # only {"type": "text"}, the default
    user: str | None = None  # OpenAI's end-user id for abuse monitoring: accepted, nothing here uses it

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    def sampling_params(self, logprobs: int | None, default_max_tokens: int) -> SamplingParams:
        """The engine's ``SamplingParams`` for one choice; raises ``APIError`` (400) naming a bad field."""
        if not 1 <= self.num_choices <= MAX_N:
            raise APIError(400, f"n must be between 1 and {MAX_N}, got {self.n}", param="n")
        if (self.response_format or {}).get("type", "text") != "text":
            raise APIError(400, f"response_format {self.response_format['type']!r} is not supported: only 'text'",
                           param="response_format")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > MAX_STOP or not all(stop):
            raise APIError(400, f"stop takes at most {MAX_STOP} non-empty strings, got {list(stop)}", param="stop")
        try:
            bias = {int(token): value for token, value in (self.logit_bias or {}).items()}
        except ValueError as error:
            raise APIError(400, f"logit_bias keys must be token ids as strings: {error}", param="logit_bias") from error
        try:
            return SamplingParams(
                max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
                temperature=_default(self.temperature, 1.0), top_p=_default(self.top_p, 1.0),
                top_k=max(self.top_k, 0), stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()),
                seed=self.seed, ignore_eos=self.ignore_eos, logprobs=logprobs,
                presence_penalty=_default(self.presence_penalty, 0.0),
                frequency_penalty=_default(self.frequency_penalty, 0.0),
                repetition_penalty=self.repetition_penalty, min_tokens=self.min_tokens, logit_bias=bias)
        except EffdlError as error:
            raise APIError(400, str(error)) from error

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


def prometheus_text(engine: AsyncEngine, model_name: str) -> str:
    """``/metrics``: vLLM's names (``vllm:...``, labelled ``model_name``) where they mean the same, so vLLM's
    dashboards read this server; ``flover_*`` for what vLLM has no name for. The prefix-cache counters count
    tokens, as vLLM's do (see ``Engine.stats``)."""
    m, label = engine.metrics(), f'model_name="{model_name}"'
    lines: list[str] = []

    def sample(name: str, kind: str, help_text: str, value: float, labels: str = label) -> None:
        braces = f"{{{labels}}}" if labels else ""
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{braces} {value}"])

    sample("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", m["live_slots"])
    sample("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", m["queue_length"])
    sample("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", m["kv_cache_usage"])
    sample("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", engine.prompt_tokens_total)
    sample("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", m["tokens_total"])
    sample("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried "
           "tokens.", m["prefix_cache_queries"])
    sample("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
           m["prefix_cache_hits"])
    lines += ["# HELP vllm:request_success_total Count of successfully processed requests.",
              "# TYPE vllm:request_success_total counter"]
    lines += [f'vllm:request_success_total{{{label},finished_reason="{reason}"}} {count}'
              for reason, count in sorted(engine.finished.items())]
    lines += engine.ttft.prometheus("vllm:time_to_first_token_seconds", "Histogram of time to first token in "
                                    "seconds.", label)
    lines += engine.tpot.prometheus("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_"
                                    "token_seconds per request.", label)
    lines += engine.latency.prometheus("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in "
                                       "seconds.", label)
    sample("flover_free_slots", "gauge", "free KV slots", m["free_slots"], "")
    sample("flover_tokens_per_s", "gauge", "output tokens per second over the last 10 s", m["tokens_per_s"], "")
    return "\n".join(lines) + "\n"


def _default(value: float | None, default: float) -> float:
    return default if value is None else value


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None  # only = n: no server-side ranking of extra candidates
    suffix: str | None = None  # only empty: no insertion (fill-in-the-middle)
    return_tokens_as_token_ids: bool = False  # vLLM's extra: logprobs name tokens "token_id:N"


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]]  # a string, or OpenAI's content parts (text ones only)
    name: str | None = None  # passed to the chat template, which may use it


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens


class TokenizeRequest(_Body):
    """vLLM's ``/tokenize``: a prompt, or chat messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True  # for messages: end with the assistant's turn, as /v1/chat/completions does


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def message_text(content: str | list[dict[str, Any]], where: str) -> str:
    """A message's text: the string, or its text parts joined by newlines in order (as vLLM joins them).

    Any other part (an image, audio, a file) raises ``APIError`` naming its type, as does a malformed part.
    """
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind != "text":
            raise APIError(400, f"{where}.content.{j} is a content part of type {kind!r}: only 'text' parts are "
                                f"supported", param=f"{where}.content")
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise APIError(400, f"{where}.content.{j}: a text part is {{'type': 'text', 'text': <string>}}, got "
                                f"{part}", param=f"{where}.content")
        texts.append(part["text"])
    return "\n".join(texts)


def _error_response(status: int, message: str, kind: str = "invalid_request_error",
                    param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class _RequireAPIKey:
    """ASGI middleware: /v1/*, /tokenize and /detokenize need ``Authorization: Bearer <key>``, else 401.

    Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which would wrap
    every streamed response and its disconnect handling. /health and /metrics stay open (as in vLLM).
    """

    def __init__(self, app: Any, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and _protected(scope["path"]):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = _error_response(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                           "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _protected(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


def create_app(engine: AsyncEngine, model_name: str, tokenizer: Tokenizer | None = None,
               max_model_len: int | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI app; it starts ``engine`` on startup and drains it on shutdown.

    With ``api_key``, every /v1/* and (de)tokenize request must carry it as a bearer token.
    """
    chat_template = jinja2.Environment(autoescape=False).from_string(
        getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE)
    max_model_len = max_model_len or engine.engine.max_len
    vocab_size = engine.engine.config.vocab_size
    default_max_tokens = 16

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown(drain=True, timeout_s=10.0)

    app = FastAPI(title="effdl flover", lifespan=lifespan)
    if api_key:
        app.add_middleware(_RequireAPIKey, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            if e["type"] == "json_invalid":
                return _error_response(400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error')}")
            where = ".".join(str(p) for p in e["loc"] if p != "body")
            if e["type"] == "extra_forbidden":  # one clean message naming the field
                known = str(e["loc"][-1]) in UNSUPPORTED_FIELDS
                return _error_response(400, f"`{where}` is not supported by this server" if known else
                                       f"`{where}` is not a field this endpoint accepts", param=where)
            problems.append(f"{where}: {e['msg']}" if where else e["msg"])
        return _error_response(400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404 route, 405 method
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # a bug: JSON, never a traceback
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "effdl",
                                            "max_model_len": max_model_len}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine, model_name), media_type="text/plain; version=0.0.4")

    def check_model_name(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_name}`",
                           "not_found_error", "model")

    def sampling_params(body: _Sampling, logprobs: int | None) -> SamplingParams:
        params = body.sampling_params(logprobs, default_max_tokens)
        if bad := [t for t, _ in params.logit_bias if t >= vocab_size]:  # the engine checks too, naming no param
            raise APIError(400, f"logit_bias names token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}",
                           param="logit_bias")
        return params

    def render_chat(messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        rendered = [{"role": m.role, "content": message_text(m.content, f"messages.{i}"),
                     **({"name": m.name} if m.name is not None else {})} for i, m in enumerate(messages)]
        try:
            return chat_template.render(messages=rendered, add_generation_prompt=add_generation_prompt,
                                        bos_token="", eos_token="")
        except jinja2.TemplateError as error:
            raise APIError(400, f"the chat template failed on these messages: {error}", param="messages") from error

    async def start_choices(prompt: str | list[int], params: SamplingParams, n: int, rid: str
                            ) -> tuple[list[str], AsyncIterator[tuple[int, RequestOutput]]]:
        """n engine requests for one prompt (choice i seeded ``seed + i``); their outputs merged, by index.

        All n are queued at once (gathered, not one after another's first token), so they prefill together.
        """
        ids = [f"{rid}-{i}" for i in range(n)]
        started = await asyncio.gather(*(
            _start(engine, prompt, params if params.seed is None else replace(params, seed=params.seed + i), request_id)
            for i, request_id in enumerate(ids)), return_exceptions=True)
        if failed := [e for e in started if isinstance(e, BaseException)]:
            for request_id in ids:  # e.g. the queue filled up part-way: the choices that got in must not run on
                engine.abort(request_id)
            raise failed[0]
        return ids, _merge(started)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        check_model_name(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request is supported, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        n = body.num_choices
        if body.best_of is not None and body.best_of != n:
            raise APIError(400, f"best_of must equal n ({n}) when given, got {body.best_of}: this server does not "
                                f"rank extra candidates", param="best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported (no fill-in-the-middle)", param="suffix")
        echo = ""
        if body.echo:
            if body.logprobs is not None:
                raise APIError(400, "echo together with logprobs is not supported: this server does not compute "
                                    "the prompt's logprobs", param="echo")
            if isinstance(prompt, str):
                echo = prompt
            elif tokenizer is None:
                raise APIError(400, "echo of a token-id prompt needs a tokenizer, and this model has none",
                               param="echo")
            else:
                echo = tokenizer.decode(list(prompt))
        params = sampling_params(body, body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        ids, outputs = await start_choices(prompt, params, n, rid)

        def logprobs(tokens: list[int], entries: list[dict[int, float]]) -> dict | None:
            if params.logprobs is None:
                return None
            return _completion_logprobs(None if body.return_tokens_as_token_ids else tokenizer, tokens, entries)

        def envelope(choices: list[dict]) -> dict:
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": choices}

        started: set[int] = set()

        def chunk(index: int, out: RequestOutput) -> dict:
            prefix = echo if index not in started else ""  # the echoed prompt leads each choice's first chunk
            started.add(index)
            return envelope([{"index": index, "text": prefix + out.new_text, "finish_reason": _finish(out),
                              "logprobs": logprobs(out.new_token_ids, out.new_logprobs)}])

        if body.stream:
            return _stream(http, outputs, chunk, envelope, body.include_usage)
        results = await _collect(http, outputs, ids, engine)
        return {**envelope([{"index": i, "text": echo + r.text, "finish_reason": _finish(r.last),
                             "logprobs": logprobs(r.tokens, r.logprobs)} for i, r in enumerate(results)]),
                "usage": _usage([r.last for r in results])}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        check_model_name(body.model)
        if body.max_completion_tokens is not None:
            if "max_tokens" in body.model_fields_set and body.max_tokens not in (None, body.max_completion_tokens):
                raise APIError(400, f"max_tokens ({body.max_tokens}) and max_completion_tokens "
                                    f"({body.max_completion_tokens}) differ: send one", param="max_completion_tokens")
            body.max_tokens = body.max_completion_tokens
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        prompt = render_chat(body.messages)
        top_n = body.top_logprobs or 0
        params = sampling_params(body, top_n if body.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        ids, outputs = await start_choices(prompt, params, body.num_choices, rid)

        def logprobs(tokens: list[int], entries: list[dict[int, float]]) -> dict | None:
            return _chat_logprobs(tokenizer, tokens, entries, top_n) if params.logprobs is not None else None

        def envelope(choices: list[dict]) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                    "choices": choices}

        started: set[int] = set()

        def chunk(index: int, out: RequestOutput) -> dict:
            delta = {"content": out.new_text} if index in started else {"role": "assistant", "content": out.new_text}
            started.add(index)
            choice = {"index": index, "delta": delta, "finish_reason": _finish(out)}
            if params.logprobs is not None:
                choice["logprobs"] = logprobs(out.new_token_ids, out.new_logprobs)
            return envelope([choice])

        if body.stream:
            return _stream(http, outputs, chunk, envelope, body.include_usage)
        results = await _collect(http, outputs, ids, engine)
        choices = []
        for i, r in enumerate(results):
            choices.append({"index": i, "message": {"role": "assistant", "content": r.text},
                            "finish_reason": _finish(r.last)})
            if params.logprobs is not None:
                choices[-1]["logprobs"] = logprobs(r.tokens, r.logprobs)
        return {**envelope(choices), "object": "chat.completion", "usage": _usage([r.last for r in results])}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", param="prompt")
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: prompts must be token ids", param="prompt")
        text = body.prompt if body.prompt is not None else render_chat(body.messages, body.add_generation_prompt)
        tokens = tokenizer.encode(text)  # what the engine encodes, so the count is the prompt's cost there
        return {"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model_name(body.model)
        if bad := [t for t in body.tokens if not 0 <= t < vocab_size]:
            raise APIError(400, f"token ids must be in [0, {vocab_size}); got {bad[:5]}", param="tokens")
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer to decode with", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    return app


async def _start(engine: AsyncEngine, prompt: str | list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
    """The request's output stream, started far enough that a bad request fails here as a 4xx."""
    stream = engine.generate(prompt, params, request_id)
    try:
        first = await stream.__anext__()
    except (QueueFull, EngineStopped) as error:
        raise APIError(503, str(error), "server_busy") from error
    except EffdlError as error:
        raise APIError(400, str(error), param="prompt") from error

    async def rest() -> AsyncIterator[RequestOutput]:
        try:
            yield first
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    return rest()


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Every stream's outputs as they arrive, tagged with the stream's index.

    Closing the merged iterator early (a client gone) closes every stream,
    which aborts the requests that have not finished.
    """
    if len(streams) == 1:  # the common case, without a task per stream
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    arrived: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                arrived.put_nowait((index, out))
        except Exception as error:  # a stream that failed ends the merge with its error
            arrived.put_nowait((index, error))
        finally:
            arrived.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await arrived.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()  # a cancelled stream aborts its request (AsyncEngine.generate's finally)
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


def _finish(out: RequestOutput) -> str | None:
    return out.finish_reason if out.finished else None


def _usage(lasts: list[RequestOutput]) -> dict:
    """OpenAI's usage: the prompt counted once, the completion tokens summed over the choices."""
    prompt, completion = lasts[0].num_prompt_tokens, sum(out.num_output_tokens for out in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_name(tokenizer: Tokenizer | None, token: int) -> str:
    text = tokenizer.decode([token]) if tokenizer is not None else "\ufffd"
    return f"token_id:{token}" if "\ufffd" in text else text  # as vLLM names tokens that are not text


def _completion_logprobs(tokenizer: Tokenizer | None, tokens: list[int], entries: list[dict[int, float]]) -> dict:
    """OpenAI's legacy ``logprobs`` object: sampled tokens, their logprobs and the top alternatives."""

    def show(token: int) -> str:
        return _token_name(tokenizer, token)

    return {"tokens": [show(t) for t in tokens], "token_logprobs": [e[t] for t, e in zip(tokens, entries, strict=True)],
            "top_logprobs": [{show(t): lp for t, lp in e.items()} for e in entries],
            "token_ids": tokens}


def _chat_logprobs(tokenizer: Tokenizer | None, tokens: list[int], entries: list[dict[int, float]],
                   top_n: int) -> dict:
    """OpenAI's chat ``logprobs`` object: per sampled token its logprob, bytes, and the ``top_n`` most likely."""

    def item(token: int, logprob: float) -> dict:
        name = _token_name(tokenizer, token)
        return {"token": name, "logprob": logprob, "bytes": list(name.encode())}

    # An entry holds the sampled token and the top_n; the sampled one is among the top_n or below them all.
    return {"content": [{**item(t, e[t]), "top_logprobs": [item(k, lp) for k, lp in sorted(
        e.items(), key=lambda kv: -kv[1])[:top_n]]} for t, e in zip(tokens, entries, strict=True)]}


@dataclass
class _Choice:
    """One choice of a finished non-streaming request."""

    text: str
    tokens: list[int]
    logprobs: list[dict[int, float]]
    last: RequestOutput


async def _collect(http: Request, outputs: AsyncIterator[tuple[int, RequestOutput]], request_ids: list[str],
                   engine: AsyncEngine) -> list[_Choice]:
    """Run a non-streaming request's choices to their end, aborting them if the client goes away meanwhile."""

    async def gather() -> list[_Choice]:
        choices = [_Choice("", [], [], None) for _ in request_ids]
        text: list[list[str]] = [[] for _ in request_ids]
        async for index, out in outputs:
            c = choices[index]
            text[index].append(out.new_text)
            c.tokens += out.new_token_ids
            c.logprobs += out.new_logprobs
            c.last = out
        for c, parts in zip(choices, text, strict=True):
            c.text = "".join(parts)
        return choices

    task = asyncio.ensure_future(gather())
    while not task.done():
        await asyncio.wait({task}, timeout=0.1)
        if not task.done() and await http.is_disconnected():
            task.cancel()
            for request_id in request_ids:
                engine.abort(request_id)
            raise APIError(499, "client disconnected")
    result = task.result()
    if failed := next((c.last.error for c in result if c.last.error), None):
        raise APIError(500, f"generation failed: {failed}", "server_error")
    return result


def _stream(http: Request, outputs: AsyncIterator[tuple[int, RequestOutput]],
            chunk: Callable[[int, RequestOutput], dict], envelope: Callable[[list[dict]], dict],
            include_usage: bool) -> StreamingResponse:
    """Server-Sent Events: one chunk per step and choice (choices interleaved, each chunk naming its index),
    then usage if asked, then ``[DONE]``.

    When the client disconnects Starlette cancels this generator; closing
    ``outputs`` then aborts the requests and frees their slots.
    """

    async def events() -> AsyncIterator[str]:
        lasts: dict[int, RequestOutput] = {}
        try:
            async for index, out in outputs:
                lasts[index] = out
                if out.error:
                    yield _sse({"error": {"message": f"generation failed: {out.error}", "type": "server_error",
                                          "code": 500}})
                    break
                yield _sse(chunk(index, out))
        finally:
            await outputs.aclose()
        if include_usage and lasts:
            yield _sse({**envelope([]), "usage": _usage(list(lasts.values()))})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


@contextmanager
def serve_in_thread(app: FastAPI, startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a daemon thread; yields its base URL.

    For tests, demos and in-process benchmarks; ``effdl flover serve`` runs uvicorn in the foreground.
    """
    import uvicorn

    from effdl.distributed.launch import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise EffdlError(f"the server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def load_model(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, seed: int = 0
               ) -> tuple[Transformer, Tokenizer | None, str]:
    """A checkpoint folder, or a preset name with seeded random weights; returns (model, tokenizer, served name).

    A model whose vocabulary has no tokenizer is served all the same: prompts
    must then be token ids.
    """
    path = Path(spec)
    if path.is_dir():
        model = load_checkpoint(path, device=device, dtype=dtype)
        try:
            tokenizer = load_tokenizer(path, model.config.vocab_size)
        except EffdlError:
            tokenizer = None
        return model.eval(), tokenizer, path.name
    if spec not in PRESETS:
        raise EffdlError(f"--model {spec!r} is neither a checkpoint folder nor a preset ({', '.join(PRESETS)})")
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset(spec), device=device, dtype=dtype).eval()
    tokenizer = ByteTokenizer() if model.config.vocab_size == BYTE_VOCAB_SIZE else None
    return model, tokenizer, spec


def serve(model_spec: str, host: str = "127.0.0.1", port: int = 8000, max_slots: int = 16,
          max_len: int | None = None, policy: str = "fused", shuffle: bool = True, prefill_chunk: int = 2048,
          max_queue: int = 1024, name: str | None = None, device: str = "auto", tp: int = 1,
          api_key: str | None = None, prefix_caching: bool = True) -> None:
    """Load the model and serve it until interrupted (what ``effdl flover serve`` runs).

    ``api_key`` (or, when it is None, the ``EFFDL_API_KEY`` environment
    variable) makes every /v1/* and (de)tokenize request need it as a bearer token.
    ``prefix_caching``: reuse the K/V of prompt prefixes already seen (``Engine``'s option).

    With ``tp > 1`` (under ``torchrun --nproc-per-node tp``) every rank holds a
    slice of the model; rank 0 schedules and serves HTTP, the others execute.
    """
    import uvicorn

    from effdl.core.device import resolve_device
    from effdl.distributed import process_group
    from effdl.flover.tp import tp_engine

    with process_group() if tp > 1 else nullcontext((0, 1, None)) as (_, world, dist_device):
        if world != tp:
            raise EffdlError(f"--tp {tp} needs {tp} processes: run `torchrun --nproc-per-node {tp} -m effdl.cli "
                             f"flover serve ...` (this is {world})")
        model, tokenizer, served = load_model(model_spec, dist_device or resolve_device(device))
        options = dict(max_slots=max_slots, max_len=max_len, policy=policy, shuffle=shuffle,
                       prefill_chunk=prefill_chunk, max_queue=max_queue, prefix_caching=prefix_caching)
        params = model.config.num_params()
        engine = tp_engine(model, tokenizer, **options) if tp > 1 else Engine(model, tokenizer, **options)
        if engine is None:
            return  # a follower rank: rank 0 has stopped
        app = create_app(AsyncEngine(engine), name or served, tokenizer,
                         api_key=api_key if api_key is not None else os.environ.get("EFFDL_API_KEY"))
        print(f"serving {name or served} ({params / 1e6:,.1f}M params, tp {tp}, {policy}, {max_slots} slots, "
              f"max_len {engine.max_len}) on http://{host}:{port}/v1")
        try:
            uvicorn.run(app, host=host, port=port, log_level="warning")
        finally:
            if tp > 1:
                engine.runner.stop()
