"""The HTTP side: FastAPI routes, the API key, body limits, and `serve()`.

Handlers (on uvicorn's event loop) validate the request (protocol.py), tokenize it on a worker
thread, put a `Job` in the scheduler's queue (HTTP 429 when the queue is full), then read the
job's events (tokens, end, error) and answer in JSON or as server-sent events, detokenizing
incrementally. They cancel the job when the client goes away or the request runs past its timeout.
Every error, 404 and 405 included, is an OpenAI error object.
"""
from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from ..detokenize import Detokenizer
from ..errors import DejavuError
from .metrics import Metrics
from .protocol import (ApiError, ChatRequest, CompletionRequest, Sampling, error_body, prompt_of, unsupported,
                       validation_message)
from .scheduler import FAULTS, GraphScheduler, Job, Mirror, Scheduler

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for completions; chat runs to the context or limit


@dataclass
class Settings:
    api_key: str | None = None
    request_timeout: float = 300.0
    max_tokens_limit: int = 1024
    test_faults: bool = False
    max_request_bytes: int = 4 * 2 ** 20  # larger bodies get 413 before they are read
    read_timeout: float = 30.0            # seconds to send the request headers, and then the body
    keep_alive_timeout: int = 5           # seconds an idle keep-alive connection stays open


# ---------------------------------------------------------------- ASGI gate: key, body, counts

def route_label(routes, scope) -> str:
    """The route template the path matches (a fixed 'other' for unknown paths): a bounded label."""
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return route.path
    return "other"


class Gate:
    """ASGI middleware: the API key on every route but /health, the body size and read time, a count
    per route and status, and an OpenAI 500 for anything that escapes a handler. (Plain ASGI rather
    than @app.middleware: that wrapper hides client disconnects from handlers.)"""

    def __init__(self, app, routes, settings: Settings, metrics: Metrics):
        self.app, self.routes, self.settings, self.metrics = app, routes, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, started = route_label(self.routes, scope), False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests.labels(route, message["status"]).inc()
            await send(message)

        async def refuse(status, message, kind, headers=None):
            await JSONResponse(error_body(message, kind), status_code=status, headers=headers)(
                scope, receive, counting_send)

        s = self.settings
        if s.api_key and scope["path"] != "/health":
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), s.api_key.encode()):
                return await refuse(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the server "
                                         "was started with --api-key or DEJAVU_API_KEY)", "authentication_error",
                                    {"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            too_big = (f"the request body is larger than this server's limit of {s.max_request_bytes} bytes "
                       "(--max-request-bytes)")
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if length.isdigit() and int(length) > s.max_request_bytes:
                return await refuse(413, too_big, "invalid_request_error")
            body, more = bytearray(), True
            try:
                async with asyncio.timeout(s.read_timeout):
                    while more:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return
                        body += message.get("body", b"")
                        more = message.get("more_body", False)
                        if len(body) > s.max_request_bytes:
                            return await refuse(413, too_big, "invalid_request_error")
            except TimeoutError:
                return await refuse(408, f"the request body did not arrive within {s.read_timeout:g} s",
                                    "invalid_request_error")
            receive = replay(bytes(body), receive)
        try:
            await self.app(scope, receive, counting_send)
        except Exception as e:  # a bug: its traceback goes to the log, the client gets an OpenAI 500
            traceback.print_exc(file=sys.stderr)
            if not started:
                await refuse(500, f"internal server error ({type(e).__name__})", "server_error")


def replay(body: bytes, receive):
    """An ASGI receive that hands the body read already, then waits on the connection (disconnects)."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return again


# ---------------------------------------------------------------- text in, text out

class ChatTokenizer:
    """Chat messages -> prompt ids, where the template's text may hold control tokens and the
    messages' text never does: the template is rendered around placeholders, its own text
    tokenized as usual, each message's text with special tokens split into plain text."""

    def __init__(self, tok):
        self.tok, self.mark = tok, f"dejavu{secrets.token_hex(8)}"

    def __call__(self, messages: list[dict]) -> list[int]:
        tok = self.tok
        marked = [dict(m, content=f"{self.mark}{i}{self.mark}") for i, m in enumerate(messages)]
        text = tok.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
        ids = []
        for k, piece in enumerate(re.split(f"{self.mark}(\\d+){self.mark}", text)):
            if k % 2:  # a message's text
                ids += tok(messages[int(piece)]["content"], add_special_tokens=False,
                           split_special_tokens=True).input_ids
            elif piece:
                ids += tok(piece, add_special_tokens=False).input_ids
        return ids


# ---------------------------------------------------------------- the app

def create_app(loaded, scheduler: Scheduler, settings: Settings) -> FastAPI:
    tok, model_name, ctx = loaded.tokenizer, loaded.name, loaded.model.cfg.max_seq_len
    vocab = loaded.model.cfg.vocab_size
    app = FastAPI(title="dejavu", description="OpenAI-compatible completions with contextual sparsity")
    metrics = scheduler.metrics = Metrics(scheduler)
    stop_ids = frozenset(loaded.stop_ids or {tok.eos_token_id} - {None})
    chat_tokens = ChatTokenizer(tok) if tok.chat_template is not None else None
    # A token decodes to at most this many characters, so a text longer than ctx * this cannot fit:
    # refused before the tokenizer sees it.
    max_chars = ctx * max(len(t) for t in tok.get_vocab())
    tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="dejavu-tokenize")  # off the event loop, one at a time
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind, e.param), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = validation_message(e)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = {404: f"no route {request.method} {request.url.path} (see /v1/models, /v1/completions, "
                        "/v1/chat/completions, /health, /metrics)",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, e.detail)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(message, kind), status_code=e.status_code, headers=e.headers)

    app.add_middleware(Gate, routes=app.router.routes, settings=settings, metrics=metrics)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dejavu"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    def check(req: Sampling):
        """What can be refused before tokenizing."""
        if req.model != model_name:
            raise ApiError(404, f"model '{req.model}' is not served here; this server serves '{model_name}' "
                                "(see /v1/models)", param="model", kind="not_found_error")
        unsupported(req)

    def too_long(chars: int):
        if chars > max_chars:
            raise ApiError(400, f"the prompt has {chars} characters, more than the model's context of {ctx} "
                                "tokens can hold: shorten the prompt", param="prompt")

    async def tokenize(fn, *args) -> list[int]:
        return list(await asyncio.get_running_loop().run_in_executor(tokenizer_thread, fn, *args))

    def prompt_ids(text: str) -> list[int]:
        return tok(text).input_ids

    def make_job(req: Sampling, prompt: list[int], max_tokens: int | None, default_tokens: int) -> Job:
        if not prompt:
            raise ApiError(400, "the prompt is empty: give some text to continue", param="prompt")
        if len(prompt) >= ctx:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the model's context is {ctx} tokens "
                                "(prompt and new tokens together): shorten the prompt", param="prompt")
        limit = min(settings.max_tokens_limit, ctx - len(prompt))
        if max_tokens is not None and max_tokens > limit:
            why = (f"this server's limit of {settings.max_tokens_limit} (--max-tokens-limit)"
                   if limit == settings.max_tokens_limit else
                   f"the {limit} tokens left in the model's context of {ctx} after the prompt's {len(prompt)}")
            raise ApiError(400, f"max_tokens {max_tokens} exceeds {why}", param="max_tokens")
        fault = req.user if settings.test_faults and req.user in FAULTS else None
        return Job(prompt=prompt, max_tokens=max_tokens or min(default_tokens, limit), temperature=req.temperature,
                   top_p=req.top_p, stop_ids=frozenset() if req.ignore_eos else stop_ids, deliver=None,
                   seed=req.seed, fault=fault)

    async def events(request: Request, job: Job):
        """The job's events, until its end. Stops the job when the client goes away, when the
        request runs past its timeout, or when the caller closes this generator early."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job.deliver = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        if not scheduler.submit(job):
            raise ApiError(429, f"the server is busy: {scheduler.max_queue} requests are already queued "
                                "(--max-queue); retry later", kind="rate_limit_error", headers={"Retry-After": "1"})
        deadline, checked = job.arrival + settings.request_timeout, time.monotonic()
        try:
            while True:
                if time.monotonic() >= deadline:
                    job.answered = True
                    metrics.cancelled.labels("timeout").inc()
                    yield ("error", f"the request timed out after {settings.request_timeout:g} s "
                                    "(--request-timeout)", 504)
                    return
                if time.monotonic() - checked > 0.25:  # a client that went away stops its job
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=min(deadline - time.monotonic(), 0.25))
                except asyncio.TimeoutError:
                    continue
                job.answered = ev[0] != "token"
                yield ev
                if job.answered:
                    return
        finally:
            release(job)

    def release(job: Job):
        """Stops the job if it still runs (a no-op for a finished one); counts a client that left."""
        if not job.released:
            job.released = True
            if not job.answered:
                metrics.cancelled.labels("disconnect").inc()
            scheduler.withdraw(job)

    def stop_strings(req: Sampling) -> list[str]:
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        return stops

    async def run(request: Request, req: Sampling, job: Job, chat: bool):
        stops = stop_strings(req)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        stream = events(request, job)
        try:
            first = await anext(stream)  # raises ApiError(429) before any response starts
        except StopAsyncIteration:
            return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
        if first[0] == "error":  # failed or timed out before its first token: a plain HTTP error
            await stream.aclose()
            raise ApiError(first[2] if len(first) > 2 else 500, first[1], kind="server_error")

        text = Detokenizer(tok, job.stop_ids)
        longest_stop = max((len(s) for s in stops), default=0)
        searched = 0  # text before this offset holds no stop string

        def read(ev) -> str | None:
            """Takes one event into the text; the finish reason once the text is complete."""
            nonlocal searched
            finish = ev[1] if ev[0] == "end" else None
            if ev[0] == "token":
                text.add(ev[1])
            elif finish:
                text.flush()
            if stops:
                cuts = [i for s in stops if (i := text.text.find(s, max(0, searched - longest_stop + 1))) >= 0]
                searched = len(text.text)
                if cuts:
                    text.text, finish = text.text[:min(cuts)], "stop"
                    job.answered = True  # a stop string ends the job here
            return finish

        def usage():
            n = len(job.out)
            return {"prompt_tokens": len(job.prompt), "completion_tokens": n, "total_tokens": len(job.prompt) + n}

        def choice(content: str | None, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
            if delta:
                return {"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}

        obj = ("chat.completion.chunk" if req.stream else "chat.completion") if chat else "text_completion"

        def body(choices: list, with_usage: bool = False) -> dict:
            b = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": choices}
            if with_usage:
                b["usage"] = usage()
            return b

        async def all_events():
            yield first
            async for ev in stream:
                yield ev

        if not req.stream:
            finish = None
            try:
                async for ev in all_events():
                    if ev[0] == "error":
                        raise ApiError(ev[2] if len(ev) > 2 else 500, ev[1], kind="server_error")
                    if finish := read(ev):
                        break
            finally:
                release(job)
                await stream.aclose()
            if finish is None:  # the client went away
                return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
            metrics.latency.observe(time.monotonic() - job.arrival)
            return JSONResponse(body([choice(text.text, finish, False)], with_usage=True))

        async def sse():
            try:
                async for chunk in sse_chunks():
                    yield chunk
            finally:  # finished, or the client went away mid-stream: stop the job now
                release(job)
                await stream.aclose()

        async def sse_chunks():
            def data(b: dict) -> str:
                return f"data: {json.dumps(b)}\n\n"
            sent = 0
            if chat:
                yield data(body([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
            async for ev in all_events():
                if ev[0] == "error":
                    yield data(error_body(ev[1], "server_error"))
                    return
                finish = read(ev)
                # hold back what could be the start of a stop string
                ready = len(text.text) if finish else len(text.text) - max(longest_stop - 1, 0)
                if ready > sent:
                    yield data(body([choice(text.text[sent:ready], None, True)]))
                    sent = ready
                if finish:
                    yield data(body([choice(None if chat else "", finish, True)]))
                    if req.stream_options and req.stream_options.include_usage:
                        yield data(body([], with_usage=True))
                    yield "data: [DONE]\n\n"
                    metrics.latency.observe(time.monotonic() - job.arrival)
                    return

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        check(req)
        prompt = prompt_of(req)
        if isinstance(prompt, str):
            too_long(len(prompt))
            ids = await tokenize(prompt_ids, prompt)
        else:
            if any(t >= vocab for t in prompt):
                raise ApiError(400, f"prompt: token ids must be below the vocabulary size {vocab}", param="prompt")
            ids = list(prompt)
        job = make_job(req, ids, req.max_tokens, COMPLETION_DEFAULT_TOKENS)
        return await run(request, req, job, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatRequest):
        check(req)
        if chat_tokens is None:
            raise ApiError(400, f"{model_name} has no chat template: use /v1/completions")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        too_long(sum(len(m["content"]) for m in msgs))
        ids = await tokenize(chat_tokens, msgs)
        job = make_job(req, ids, req.max_completion_tokens or req.max_tokens, ctx)
        return await run(request, req, job, chat=True)

    return app


# ---------------------------------------------------------------- serve()

def warm_up(scheduler: Scheduler, tok):
    """One short request through the scheduler before the port opens: first-use kernel builds and
    allocations happen here, not in the first client's latency."""
    done = threading.Event()
    job = Job(prompt=tok("Hello").input_ids, max_tokens=4, temperature=0.0, top_p=1.0, stop_ids=frozenset(),
              deliver=lambda ev: done.set() if ev[0] != "token" else None)
    scheduler.submit(job)
    if not done.wait(timeout=600):
        raise DejavuError("the server did not answer a warm-up request within 10 minutes")


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose first request's headers have not all
    arrived within `seconds` (uvicorn bounds only the idle time between requests)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.loop.call_later(seconds, self.close_if_no_request)

        def close_if_no_request(self):
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()
    return Protocol


def make_scheduler(loaded, sparsity, guard, batch_size: int, max_queue: int, sparse_max_batch: int,
                   mirror: Mirror | None = None) -> Scheduler:
    """The CUDA-graph scheduler on a GPU (unguarded), else the eager one; with a mirror, one rank's
    part of a tensor-parallel server."""
    if loaded.model.device.type == "cuda" and guard is None:  # the CUDA-graph step (the guard's checks run eager)
        scheduler = GraphScheduler(loaded.model, sparsity, batch_size=batch_size, max_queue=max_queue,
                                   mirror=mirror)
        scheduler.warm()
    else:
        scheduler = Scheduler(loaded.model, sparsity, guard, batch_size=batch_size, max_queue=max_queue,
                              sparse_max_batch=sparse_max_batch, mirror=mirror)
    return scheduler


def follow(loaded, sparsity, batch_size: int, max_queue: int, sparse_max_batch: int):
    """Ranks 1..N-1 of `dejavu serve --tp N`: the same scheduler on this rank's shard, driven by
    rank 0 (no HTTP); returns when rank 0 stops."""
    scheduler = make_scheduler(loaded, sparsity, None, batch_size, max_queue, sparse_max_batch, Mirror())
    scheduler.metrics = Metrics(scheduler)
    scheduler.run()


def serve(loaded, sparsity, guard, host: str, port: int, batch_size: int, max_queue: int, sparse_max_batch: int,
          settings: Settings):
    """Rank 0 (the only rank, without --tp) of the server: HTTP on host:port until stopped."""
    import torch.distributed as dist

    import uvicorn
    mirror = Mirror() if dist.is_initialized() and dist.get_world_size() > 1 else None
    scheduler = make_scheduler(loaded, sparsity, guard, batch_size, max_queue, sparse_max_batch, mirror)
    app = create_app(loaded, scheduler, settings)
    thread = threading.Thread(target=scheduler.run, name="dejavu-scheduler", daemon=True)
    thread.start()
    warm_up(scheduler, loaded.tokenizer)
    if isinstance(scheduler, GraphScheduler):
        mode = ("dense" if sparsity is None else
                "sparse, each row its own selection (answers do not depend on the load)" if scheduler.mode["sparse"]
                else "dense (its step measured faster than the sparse one)")
        mode += ", CUDA graphs"
    elif sparsity is None:
        mode = "dense"
    elif sparsity.input_side:
        mode = (f"sparse ({sparsity.selector.name}, thresholds set for {sparsity.target:g} of the input "
                f"channels; batches of more than {sparse_max_batch} decode dense)")
    else:
        mode = (f"sparse (MLP density {scheduler.density('mlp'):.2f}, attention {scheduler.density('attn'):.2f} on "
                f"the warm-up{', guarded' if guard is not None else ''}; batches of more than {sparse_max_batch} "
                "decode dense)")
    if loaded.model.device.type == "cuda" and guard is not None:
        mode += (", eager steps: the guarded server has no CUDA graphs yet, so on a GPU it decodes slower than "
                 "the unguarded one (dejavu generate --guard replays graphs at batch 1)")
    print(f"dejavu serve: {loaded.name}, {mode} decode, batch up to {batch_size}, queue up to {max_queue}; "
          f"http://{host}:{port}/v1" + (" (API key required)" if settings.api_key else ""), file=sys.stderr)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=settings.keep_alive_timeout,
                    http=header_timeout_protocol(settings.read_timeout))
    finally:
        scheduler.stopping = True
        if mirror is not None:
            thread.join(timeout=60)  # its last tick tells the other ranks to stop
