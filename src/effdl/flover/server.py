"""An OpenAI-compatible HTTP server over ``AsyncEngine`` (FastAPI + uvicorn).

Routes: ``POST /v1/completions`` (prompt as text or token ids, as OpenAI's
legacy API and vLLM accept), ``POST /v1/chat/completions``, both streaming
(Server-Sent Events) or not; ``GET /v1/models``, ``/health`` and ``/metrics``
(Prometheus text). Errors are OpenAI-style JSON with a 4xx code (503 when the
queue is full or the engine has stopped); a client that disconnects has its request aborted.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import jinja2
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

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


class _Sampling(BaseModel):
    """The sampling fields common to both endpoints (OpenAI's names, plus vLLM's extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's extra; -1 also means no limit
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1

    def sampling_params(self, logprobs: int | None, default_max_tokens: int) -> SamplingParams:
        if self.n != 1:
            raise EffdlError(f"n must be 1 (one completion per request), got {self.n}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
                              temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0), stop=stop,
                              stop_token_ids=tuple(self.stop_token_ids or ()), seed=self.seed,
                              ignore_eos=self.ignore_eos, logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's extra: logprobs name tokens "token_id:N"


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error_response(status: int, message: str, kind: str = "invalid_request_error",
                    param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(engine: AsyncEngine, model_name: str, tokenizer: Tokenizer | None = None,
               max_model_len: int | None = None) -> FastAPI:
    """The FastAPI app; it starts ``engine`` on startup and drains it on shutdown."""
    chat_template = jinja2.Environment(autoescape=False).from_string(
        getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE)
    max_model_len = max_model_len or engine.engine.max_len
    default_max_tokens = 16

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown(drain=True, timeout_s=10.0)

    app = FastAPI(title="effdl flover", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            if e["type"] == "json_invalid":
                return _error_response(400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error')}")
            where = ".".join(str(p) for p in e["loc"] if p != "body")
            problems.append(f"{where}: {e['msg']}" if where else e["msg"])
        return _error_response(400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.kind, exc.param)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "effdl",
                                            "max_model_len": max_model_len}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        m = engine.metrics()
        lines = []
        for key, kind, help_text in (("queue_length", "gauge", "requests waiting for a slot"),
                                     ("live_slots", "gauge", "requests holding a KV slot"),
                                     ("free_slots", "gauge", "free KV slots"),
                                     ("tokens_total", "counter", "output tokens generated"),
                                     ("tokens_per_s", "gauge", "output tokens per second, last 10 s")):
            lines += [f"# HELP flover_{key} {help_text}", f"# TYPE flover_{key} {kind}", f"flover_{key} {m[key]}"]
        lines += engine.ttft.prometheus("flover_time_to_first_token_seconds", "time to first token")
        lines += engine.latency.prometheus("flover_request_latency_seconds", "end-to-end request latency")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def check_model_name(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_name}`",
                           "not_found_error", "model")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        check_model_name(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request is supported, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        params = _params(body, body.logprobs, default_max_tokens)
        rid = f"cmpl-{uuid.uuid4().hex}"
        outputs = await _start(engine, prompt, params, rid)

        def logprobs(tokens: list[int], entries: list[dict[int, float]]) -> dict | None:
            if params.logprobs is None:
                return None
            return _completion_logprobs(None if body.return_tokens_as_token_ids else tokenizer, tokens, entries)

        def chunk(out: RequestOutput) -> dict:
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "text": out.new_text, "finish_reason": _finish(out),
                                 "logprobs": logprobs(out.new_token_ids, out.new_logprobs)}]}

        if body.stream:
            return _stream(http, outputs, chunk, rid, model_name, "text_completion", body.include_usage)
        text, tokens, entries, last = await _collect(http, outputs, rid, engine)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": _finish(last),
                             "logprobs": logprobs(tokens, entries)}],
                "usage": _usage(last)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        check_model_name(body.model)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        messages = [m.model_dump() for m in body.messages]
        try:
            prompt = chat_template.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
        except jinja2.TemplateError as error:
            raise APIError(400, f"the chat template failed on these messages: {error}", param="messages") from error
        params = _params(body, (body.top_logprobs or 0) if body.logprobs else None, default_max_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = await _start(engine, prompt, params, rid)
        first = True

        def chunk(out: RequestOutput) -> dict:
            nonlocal first
            delta = {"role": "assistant", "content": out.new_text} if first else {"content": out.new_text}
            first = False
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": _finish(out)}]}

        if body.stream:
            return _stream(http, outputs, chunk, rid, model_name, "chat.completion.chunk", body.include_usage)
        text, _, _, last = await _collect(http, outputs, rid, engine)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": _finish(last)}],
                "usage": _usage(last)}

    return app


def _params(body: _Sampling, logprobs: int | None, default_max_tokens: int) -> SamplingParams:
    try:
        return body.sampling_params(logprobs, default_max_tokens)
    except EffdlError as error:
        raise APIError(400, str(error)) from error


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


def _finish(out: RequestOutput) -> str | None:
    return out.finish_reason if out.finished else None


def _usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
            "total_tokens": out.num_prompt_tokens + out.num_output_tokens}


def _completion_logprobs(tokenizer: Tokenizer | None, tokens: list[int], entries: list[dict[int, float]]) -> dict:
    """OpenAI's legacy ``logprobs`` object: sampled tokens, their logprobs and the top alternatives."""

    def show(token: int) -> str:
        text = tokenizer.decode([token]) if tokenizer is not None else "\ufffd"
        return f"token_id:{token}" if "\ufffd" in text else text  # as vLLM names tokens that are not text

    return {"tokens": [show(t) for t in tokens], "token_logprobs": [e[t] for t, e in zip(tokens, entries, strict=True)],
            "top_logprobs": [{show(t): lp for t, lp in e.items()} for e in entries],
            "token_ids": tokens}


async def _collect(http: Request, outputs: AsyncIterator[RequestOutput], request_id: str, engine: AsyncEngine
                   ) -> tuple[str, list[int], list[dict[int, float]], RequestOutput]:
    """Run a non-streaming request to its end, aborting it if the client goes away meanwhile."""

    async def gather() -> tuple[str, list[int], list[dict[int, float]], RequestOutput]:
        text, tokens, logprobs = [], [], []
        async for out in outputs:
            text.append(out.new_text)
            tokens += out.new_token_ids
            logprobs += out.new_logprobs
            last = out
        return "".join(text), tokens, logprobs, last

    task = asyncio.ensure_future(gather())
    while not task.done():
        await asyncio.wait({task}, timeout=0.1)
        if not task.done() and await http.is_disconnected():
            task.cancel()
            engine.abort(request_id)
            raise APIError(499, "client disconnected")
    result = task.result()
    if result[3].error:
        raise APIError(500, f"generation failed: {result[3].error}", "server_error")
    return result


def _stream(http: Request, outputs: AsyncIterator[RequestOutput], chunk: Callable[[RequestOutput], dict],
            request_id: str, model_name: str, kind: str, include_usage: bool) -> StreamingResponse:
    """Server-Sent Events: one chunk per step, then usage if asked, then ``[DONE]``.

    When the client disconnects Starlette cancels this generator; closing
    ``outputs`` then aborts the request and frees its slot.
    """

    async def events() -> AsyncIterator[str]:
        last = None
        async for out in outputs:
            last = out
            if out.error:
                yield _sse({"error": {"message": f"generation failed: {out.error}", "type": "server_error",
                                      "code": 500}})
                break
            yield _sse(chunk(out))
        if include_usage and last is not None:
            yield _sse({"id": request_id, "object": kind, "created": int(time.time()), "model": model_name,
                        "choices": [], "usage": _usage(last)})
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
          max_queue: int = 1024, name: str | None = None, device: str = "auto", tp: int = 1) -> None:
    """Load the model and serve it until interrupted (what ``effdl flover serve`` runs).

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
                       prefill_chunk=prefill_chunk, max_queue=max_queue)
        params = model.config.num_params()
        engine = tp_engine(model, tokenizer, **options) if tp > 1 else Engine(model, tokenizer, **options)
        if engine is None:
            return  # a follower rank: rank 0 has stopped
        app = create_app(AsyncEngine(engine), name or served, tokenizer)
        print(f"serving {name or served} ({params / 1e6:,.1f}M params, tp {tp}, {policy}, {max_slots} slots, "
              f"max_len {engine.max_len}) on http://{host}:{port}/v1")
        try:
            uvicorn.run(app, host=host, port=port, log_level="warning")
        finally:
            if tp > 1:
                engine.runner.stop()
