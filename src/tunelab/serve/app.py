"""`tunelab serve`: an OpenAI-compatible HTTP API over a base model and its LoRA adapters.

Endpoints (OpenAI's request and response shapes; vLLM's for adapter loading): GET /health,
GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream`), POST
/v1/load_lora_adapter and /v1/unload_lora_adapter (paths under --adapter-dir only), GET /metrics
(Prometheus text). Every error is OpenAI's error JSON with its status, never a traceback.

This increment generates one request at a time (a lock around the model; a request's `n`
completions share one batch): continuous batching across requests is the next step.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers import TextIteratorStreamer

from tunelab.errors import TunelabError
from tunelab.generation import cut_at_stop, prompt_text, sampling_options, stop_token_ids
from tunelab.serve.adapters import AdapterSet, read_lora_adapter, rows_using


class ServeError(Exception):
    """An API error: OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.param = status, message, error_type, param


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields tunelab does not use are accepted
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else (self.stop or [])


class CompletionRequest(Sampling):
    prompt: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


@dataclass
class ServerSettings:
    base_name: str
    api_key: str | None = None
    adapter_dir: Path | None = None
    max_queue: int = 64
    max_model_len: int | None = None


@dataclass
class Metrics:
    requests: Counter = field(default_factory=Counter)  # by status code
    prompt_tokens: int = 0
    completion_tokens: int = 0
    waiting: int = 0

    def prometheus(self) -> str:
        lines = ["# TYPE tunelab_requests_total counter"]
        lines += [f'tunelab_requests_total{{status="{status}"}} {count}' for status, count in sorted(self.requests.items())]
        lines += ["# TYPE tunelab_prompt_tokens_total counter", f"tunelab_prompt_tokens_total {self.prompt_tokens}"]
        lines += ["# TYPE tunelab_completion_tokens_total counter", f"tunelab_completion_tokens_total {self.completion_tokens}"]
        lines += ["# TYPE tunelab_queue_depth gauge", f"tunelab_queue_depth {self.waiting}"]
        return "\n".join(lines) + "\n"


@dataclass
class Generation:
    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": self.prompt_tokens + self.completion_tokens}


class Engine:
    """The model, its tokenizer and adapters, and generation on them one request at a time."""

    def __init__(self, model, tokenizer, adapters: AdapterSet, settings: ServerSettings):
        self.model, self.tokenizer, self.adapters, self.settings = model.eval(), tokenizer, adapters, settings
        self.context = settings.max_model_len or getattr(model.config, "max_position_embeddings", 2048)
        self.lock = threading.Lock()
        self.metrics = Metrics()

    def adapter_of(self, name: str) -> str | None:
        if name == self.settings.base_name:
            return None
        if name not in self.adapters.slots:
            raise ServeError(404, f"The model `{name}` does not exist (served: {', '.join(self.model_names())})", "not_found_error", "model")
        return name

    def model_names(self) -> list[str]:
        return [self.settings.base_name, *sorted(self.adapters.slots)]

    def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        text = prompt_text(prompt, self.tokenizer)
        return self.tokenizer(text, add_special_tokens=not isinstance(prompt, list))["input_ids"]

    def plan(self, request: Sampling, prompt_ids: list[int], max_tokens: int | None) -> int:
        """The number of new tokens to generate; a prompt that fills the context is an error."""
        room = self.context - len(prompt_ids)
        if room <= 0:
            raise ServeError(400, f"This model's maximum context length is {self.context} tokens; the prompt has {len(prompt_ids)} tokens", param="prompt")
        return min(max_tokens or 16, room)

    def generate(self, request: Sampling, prompt_ids: list[int], new_tokens: int, streamer=None) -> Generation:
        adapter = self.adapter_of(request.model)
        device = next(self.model.parameters()).device
        ids = torch.tensor([prompt_ids] * request.n, device=device)
        eos = stop_token_ids(self.model, self.tokenizer)
        with self.lock, torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(request.seed if request.seed is not None else int(time.time_ns() % 2**31))
            with rows_using(self.adapters.rows([adapter] * request.n)):
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    eos_token_id=eos,
                    pad_token_id=self.tokenizer.pad_token_id,
                    streamer=streamer,
                    **sampling_options(request.temperature, request.top_p, request.stops, self.tokenizer),
                )
        texts, reasons, generated = [], [], 0
        for row in out[:, len(prompt_ids) :].tolist():
            tokens = row
            ended = next((i for i, t in enumerate(row) if t in eos), None)
            if ended is not None:
                tokens = row[: ended + 1]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            kept = cut_at_stop(text, request.stops)
            texts.append(kept)
            reasons.append("stop" if ended is not None or len(kept) < len(text) else "length")
            generated += len(tokens)
        self.metrics.prompt_tokens += len(prompt_ids)
        self.metrics.completion_tokens += generated
        return Generation(texts, reasons, len(prompt_ids), generated)


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None)
    settings = engine.settings

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError):
        engine.metrics.requests[error.status] += 1
        body = {"error": {"message": error.message, "type": error.error_type, "param": error.param, "code": error.status}}
        return JSONResponse(body, status_code=error.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):  # never a traceback to the client
        engine.metrics.requests[500] += 1
        return JSONResponse({"error": {"message": f"internal error: {type(error).__name__}", "type": "server_error", "param": None, "code": 500}}, status_code=500)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                engine.metrics.requests[401] += 1
                body = {"error": {"message": "Incorrect or missing API key", "type": "authentication_error", "param": None, "code": 401}}
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    async def parse(request: Request, schema: type[BaseModel]):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ServeError(400, f"the request body is not valid JSON: {err}") from None
        try:
            return schema.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise ServeError(400, f"{where}: {first['msg']}", param=where) from None

    def admitted():
        if engine.metrics.waiting >= settings.max_queue:
            raise ServeError(429, f"the server's queue is full ({settings.max_queue} requests waiting); retry later", "rate_limit_error")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(engine.metrics.prometheus())

    @app.get("/v1/models")
    def models():
        created = int(time.time())
        data = [{"id": settings.base_name, "object": "model", "created": created, "owned_by": "tunelab", "root": settings.base_name, "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "tunelab", "root": name, "parent": settings.base_name} for name in sorted(engine.adapters.slots)]
        return {"object": "list", "data": data}

    def respond(request: Sampling, prompt, max_tokens: int | None, chat: bool):
        admitted()
        engine.adapter_of(request.model)
        if request.stream and request.n > 1:
            raise ServeError(400, "stream with n > 1 is not supported yet", param="n")
        prompt_ids = engine.prompt_ids(prompt)
        new_tokens = engine.plan(request, prompt_ids, max_tokens)
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            return StreamingResponse(stream(request, prompt_ids, new_tokens, ident, created, chat), media_type="text/event-stream")
        engine.metrics.waiting += 1
        try:
            result = engine.generate(request, prompt_ids, new_tokens)
        finally:
            engine.metrics.waiting -= 1
        engine.metrics.requests[200] += 1
        usage = result.usage
        if chat:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons))
            ]
            return {"id": ident, "object": "chat.completion", "created": created, "model": request.model, "choices": choices, "usage": usage}
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason} for i, (text, reason) in enumerate(zip(result.texts, result.finish_reasons))]
        return {"id": ident, "object": "text_completion", "created": created, "model": request.model, "choices": choices, "usage": usage}

    def stream(request: Sampling, prompt_ids: list[int], new_tokens: int, ident: str, created: int, chat: bool):
        """Server-sent events: text as it is generated (held back by the longest stop string, so a
        stop string is never sent), the finish reason, usage if asked, then [DONE]."""
        streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        outcome: dict = {}

        def run():
            try:
                outcome["result"] = engine.generate(request, prompt_ids, new_tokens, streamer)
            except BaseException as err:  # noqa: BLE001  (reported to the client below)
                outcome["error"] = err
                streamer.end()

        def event(delta: str | None, reason: str | None = None, usage: dict | None = None) -> str:
            if chat:
                choice = {"index": 0, "delta": {} if delta is None else {"content": delta}, "finish_reason": reason}
                chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": request.model, "choices": [choice]}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
                chunk = {"id": ident, "object": "text_completion", "created": created, "model": request.model, "choices": [choice]}
            if usage is not None:
                chunk |= {"choices": [], "usage": usage}
            return f"data: {json.dumps(chunk)}\n\n"

        engine.metrics.waiting += 1
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        hold = max((len(s) for s in request.stops), default=1) - 1
        text, sent = "", 0
        try:
            if chat:
                yield f"data: {json.dumps({'id': ident, 'object': 'chat.completion.chunk', 'created': created, 'model': request.model, 'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}]})}\n\n"
            for piece in streamer:
                kept = cut_at_stop(text + piece, request.stops)
                stopped = len(kept) < len(text + piece)
                text = kept
                safe = len(text) if stopped else max(sent, len(text) - hold)
                if safe > sent:
                    yield event(text[sent:safe])
                    sent = safe
            worker.join()
        finally:
            engine.metrics.waiting -= 1
        if "error" in outcome:
            yield f"data: {json.dumps({'error': {'message': str(outcome['error']), 'type': 'server_error', 'param': None, 'code': 500}})}\n\n"
            return
        result: Generation = outcome["result"]
        final = result.texts[0]
        if len(final) > sent:
            yield event(final[sent:])
        yield event(None, result.finish_reasons[0])
        if (request.stream_options or {}).get("include_usage"):
            yield event(None, usage=result.usage)
        engine.metrics.requests[200] += 1
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = await parse(request, CompletionRequest)
        return await run_in_threadpool(respond, parsed, parsed.prompt, parsed.max_tokens, False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed = await parse(request, ChatRequest)
        messages = [m.model_dump() for m in parsed.messages]
        return await run_in_threadpool(respond, parsed, messages, parsed.max_completion_tokens or parsed.max_tokens, True)

    class LoadAdapter(BaseModel):
        lora_name: str = Field(min_length=1)
        lora_path: str | None = None

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        parsed = await parse(request, LoadAdapter)
        if settings.adapter_dir is None:
            raise ServeError(400, "adapter loading is off: start the server with --adapter-dir DIR")
        if not parsed.lora_path:
            raise ServeError(400, "lora_path: required", param="lora_path")
        path = (settings.adapter_dir / parsed.lora_path).resolve()
        if not path.is_relative_to(settings.adapter_dir.resolve()):
            raise ServeError(400, f"lora_path: {parsed.lora_path} is outside --adapter-dir", param="lora_path")
        if parsed.lora_name == settings.base_name:
            raise ServeError(400, f"lora_name: {parsed.lora_name} is the base model's name", param="lora_name")
        try:
            adapter = read_lora_adapter(parsed.lora_name, path)
            with engine.lock:
                engine.adapters.load(adapter)
        except TunelabError as err:
            raise ServeError(400, str(err), param="lora_path") from None
        return {"status": "loaded", "lora_name": parsed.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        parsed = await parse(request, LoadAdapter)
        if parsed.lora_name not in engine.adapters.slots:
            raise ServeError(404, f"The model `{parsed.lora_name}` is not a loaded adapter", "not_found_error", "lora_name")
        with engine.lock:
            engine.adapters.unload(parsed.lora_name)
        return {"status": "unloaded", "lora_name": parsed.lora_name}

    return app


def build_engine(model_name: str, adapters: dict[str, str], settings: ServerSettings, device: str = "auto") -> Engine:
    """Load the base model and the named adapters (run or peft directories)."""
    from tunelab.config.schema import ModelConfig
    from tunelab.models.loader import load_model

    model, tokenizer = load_model(ModelConfig(name=model_name, device=device))
    adapter_set = AdapterSet(model)
    for name, source in adapters.items():
        if name == settings.base_name:
            raise TunelabError(f"adapter name '{name}' is the base model's name")
        adapter_set.load(read_lora_adapter(name, source))
    return Engine(model, tokenizer, adapter_set, settings)
