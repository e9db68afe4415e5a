"""`dejavu serve`: an OpenAI-compatible HTTP server, dense or sparse decode.

Two sides, one queue between them:
  HTTP handlers (FastAPI on uvicorn's event loop) validate the request, tokenize it, put a `Job`
  in the engine's queue (HTTP 429 when the queue is full), then read the job's events (tokens, end,
  error) and answer in JSON or as server-sent events. They cancel the job when the client goes
  away or the request runs past its timeout.
  The engine (one thread, the only one that touches the model) keeps a running batch. Between
  decode steps it admits queued jobs (continuous batching), prefills them, then runs one decode
  step for every row at once: with --predictors the gathered sparse path over the batch's union
  of selected units (sparse.Gathered), else dense. Each row is sampled with its own settings and
  checked on its own: a row whose logits are not finite, or whose handling raises, fails alone.

The batch shares one slot timeline in one static KV cache (model.KVCache): a job joins at the
current slot with its prompt placed just before it (the slots before the prompt are padding,
masked as in left-padded batches), so a job can join while the others decode if its prompt fits
before the current slot and its max_tokens before the end of the cache. Jobs that do not fit
wait (first come, first served) until the batch drains and a new one starts at slot 0.
"""
from __future__ import annotations

import asyncio
import json
import math
import secrets
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from .sampling import sample
from .errors import DejavuError

# Test-only fault injection (`dejavu serve --test-faults`): a request whose `user` field is one of
# these misbehaves on purpose, so tests can check that one bad request does not hurt the others.
FAULT_NAN = "dejavu-test-fault:nan-cache"  # poisons the row's own KV cache: the real forward then gives NaN logits
FAULT_RAISE = "dejavu-test-fault:raise"    # raises while the engine handles the row's token
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>")


# ---------------------------------------------------------------- requests (OpenAI's schema)

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown fields are refused with their name


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False  # an extension (as vLLM's): run to max_tokens, for load tests and benchmarks


class CompletionRequest(Sampling):
    prompt: str | list[str]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem in words that name the field, e.g. "unknown field 'foo'"."""
    e = exc.errors()[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    where = ".".join(loc) or "body"
    if e["type"] == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})", None
    if e["type"] == "extra_forbidden":
        return f"unknown field '{where}': this server takes the OpenAI fields it implements only", where
    if e["type"] == "missing":
        return f"missing field '{where}'", where
    return f"{where}: {e['msg']} (got {e.get('input')!r})", where


# ---------------------------------------------------------------- metrics

class Metrics:
    def __init__(self, engine: "Engine"):
        disable_created_metrics()  # no *_created timestamp series: counters and gauges only
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dejavu_requests", "HTTP requests answered, by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("dejavu_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.tokens = Counter("dejavu_generated_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("dejavu_cancelled_requests", "jobs stopped early, by reason (disconnect, timeout)",
                                 ["reason"], registry=r)
        self.failed = Counter("dejavu_failed_requests", "jobs failed in the engine, by reason", ["reason"], registry=r)
        self.latency = Histogram("dejavu_request_seconds", "time from arrival to the last token", registry=r,
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
        self.first_token = Histogram("dejavu_time_to_first_token_seconds", "time from arrival to the first token",
                                     registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
        Gauge("dejavu_queue_length", "jobs waiting for a place in the batch", registry=r
              ).set_function(lambda: len(engine.waiting))
        Gauge("dejavu_running_requests", "jobs in the running batch", registry=r).set_function(lambda: len(engine.rows))
        Gauge("dejavu_tokens_per_second", "tokens generated per second over the last 10 s", registry=r
              ).set_function(engine.recent_tokens_per_s)
        self.batch_rows = Histogram("dejavu_decode_batch_rows", "requests decoded together, per decode step",
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64))
        density = Gauge("dejavu_achieved_density", "units computed per decode token / all units, since start "
                        "(union over the batch; 1 for dense decode)", ["part"], registry=r)
        for part in ("mlp", "attn"):
            density.labels(part).set_function(lambda p=part: engine.density(p))
        if engine.guard is not None:  # guard.py's figures: sampled dense checks of the sparse decode
            g = engine.guard.metrics
            for name, doc, get in (
                    ("checked_steps", "decode steps also run dense to check the sparse one", lambda: g.checked),
                    ("agreement", "top-1 agreement of sparse with dense, mean over checks", lambda: g.agreement_mean),
                    ("agreement_rolling", "top-1 agreement over the guard's current window",
                     lambda: g.agreement_rolling),
                    ("kl", "KL(dense || sparse) of the next-token distribution, mean over checks, nats",
                     lambda: g.kl_mean),
                    ("trips", "times the rolling agreement fell below the threshold", lambda: g.trips),
                    ("fallbacks", "batches finished dense after a trip", lambda: g.fallbacks),
                    ("mlp_recall", "MLP selector recall of the oracle top-k, mean over checks", lambda: g.mlp_recall_mean),
                    ("attn_recall", "head selector recall of the oracle top-k, mean over checks",
                     lambda: g.attn_recall_mean)):
                Gauge(f"dejavu_guard_{name}", doc, registry=r).set_function(
                    lambda get=get: math.nan if get() is None else float(get()))


# ---------------------------------------------------------------- the engine

@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop_ids: set[int]
    deliver: object               # thread-safe callable: puts an event into the handler's queue
    seed: int | None = None
    fault: str | None = None      # test-only, see FAULT_*
    cancelled: bool = False       # the engine drops the row: finished, failed, or stopped by the handler
    answered: bool = False        # the handler has its last event (end, error, timeout, a stop string)
    released: bool = False
    out: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


class Engine:
    def __init__(self, model, sparsity=None, guard=None, batch_size: int = 8, max_queue: int = 64,
                 sparse_max_batch: int = 1, batch_wait: float = 0.02):
        self.model, self.sparsity, self.guard = model, sparsity, guard  # guard: guard.Guard, has its own decoder
        self.sparse_max_batch = sparse_max_batch  # larger batches decode dense: their union is nearly everything
        self.batch_size, self.max_queue, self.batch_wait = batch_size, max_queue, batch_wait
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.rows: list[Job] = []     # the running batch, in cache row order
        self.cache = None
        self.slot = 0                 # the slot the next decode step writes
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.kept = {"mlp": [0, 0], "attn": [0, 0]}      # units computed, units in all, over decode steps
        self.metrics: Metrics | None = None
        self.stopping = False

    # -- called from the HTTP side
    def submit(self, job: Job) -> bool:
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                return False
            self.waiting.append(job)
            self.cond.notify()
            return True

    def withdraw(self, job: Job):
        job.cancelled = True
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)

    def density(self, part: str) -> float:
        kept, total = self.kept[part]
        return kept / total if total else 1.0

    def count_units(self, sparse, rows: int):
        """Adds one decode step's units to the achieved densities (a dense step computes them all)."""
        cfg = self.model.cfg
        for part, n in (("mlp", cfg.d_ff), ("attn", cfg.n_heads)):
            kept, total = sparse.kept[part] if sparse is not None else (0, 0)
            if total == 0:  # this part ran dense
                kept = total = rows * n * cfg.n_layers
            self.kept[part][0] += kept
            self.kept[part][1] += total
            if sparse is not None:
                sparse.kept[part] = [0, 0]

    def recent_tokens_per_s(self, window: float = 10.0) -> float:
        cutoff = time.monotonic() - window
        return sum(n for t, n in list(self.recent) if t >= cutoff) / window

    # -- the engine thread
    def run(self):
        while not self.stopping:
            with self.cond:
                while not self.rows and not self.waiting and not self.stopping:
                    self.cond.wait(timeout=0.5)
            if not self.rows:
                time.sleep(self.batch_wait)  # let requests that arrive together start together
            try:
                self.admit()
                if self.rows:
                    self.step()
            except Exception as e:  # the batch's forward failed: fail its jobs, keep serving
                traceback.print_exc(file=sys.stderr)
                for job in self.rows:
                    self.fail(job, "exception", f"the engine failed on this batch ({type(e).__name__}: {e})")
                self.rows, self.cache = [], None

    def fits(self, job: Job) -> bool:
        return len(job.prompt) <= self.slot and self.slot + job.max_tokens <= self.cache.max_seq_len

    def admit(self):
        """Take queued jobs into the batch, first come first served, and prefill them."""
        new: list[Job] = []
        with self.cond:
            while self.waiting and len(self.rows) + len(new) < self.batch_size:
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                    continue
                if self.rows and not self.fits(job):
                    break  # waits for this batch to drain
                new.append(self.waiting.popleft())
        if not new:
            return
        if not self.rows:  # a new batch at slot 0, with room for jobs to join while it runs
            self.slot = max(len(j.prompt) for j in new)
            need = self.slot + max(j.max_tokens for j in new)
            self.cache = self.model.new_cache(0, min(self.model.cfg.max_seq_len, 2 * need))
            if self.guard is not None:
                self.guard.begin()  # the guard's window (and a fallback to dense) lasts one batch
        try:
            logits, cache = self.prefill(new)
        except Exception as e:  # these prompts failed: fail them, the running batch goes on
            traceback.print_exc(file=sys.stderr)
            for job in new:
                self.fail(job, "exception", f"the engine failed on this prompt ({type(e).__name__}: {e})")
            return
        self.join(new, cache)
        self.metrics.prompt_tokens.inc(sum(len(j.prompt) for j in new))
        self.take(new, logits)

    @torch.inference_mode()
    def prefill(self, jobs: list[Job]):
        """Each prompt fills the slots just before the current one; earlier slots are padding."""
        n = max(len(j.prompt) for j in jobs)
        tokens = torch.tensor([[0] * (n - len(j.prompt)) + j.prompt for j in jobs], device=self.model.device)
        cache = self.model.new_cache(len(jobs), self.cache.max_seq_len)
        cache.set_padding(torch.tensor([self.slot - len(j.prompt) for j in jobs]))
        logits = self.model(tokens, cache, self.slot - n)[:, -1]
        for i, j in enumerate(jobs):
            if j.fault == FAULT_NAN:  # test-only: a real non-finite value in this row's own cache
                cache.k[0, i, :, self.slot - 1] = float("nan")
            if j.seed is not None:
                j.generator = torch.Generator(device=self.model.device).manual_seed(j.seed)
        return logits, cache

    def join(self, jobs: list[Job], cache):
        c = self.cache
        c.kv = torch.cat([c.kv, cache.kv], 2)
        c.key_valid, c.pad = torch.cat([c.key_valid, cache.key_valid]), torch.cat([c.pad, cache.pad])
        self.rows += jobs

    @torch.inference_mode()
    def step(self):
        """One decode step for every row of the batch."""
        last = torch.tensor([[j.out[-1]] for j in self.rows], device=self.model.device)
        sparse = self.sparsity is not None and len(last) <= self.sparse_max_batch  # the union grows with the batch
        if sparse and self.guard is not None:  # sparse, with sampled dense checks and a fallback to dense
            logits = self.guard.step(last, self.cache, self.slot)[:, -1]
            self.count_units(self.guard.sparse, len(last))
        else:
            logits = self.model(last, self.cache, self.slot, sparsity=self.sparsity if sparse else None)[:, -1]
            self.count_units(self.sparsity if sparse else None, len(last))
        self.metrics.batch_rows.observe(len(last))
        self.slot += 1
        self.take(self.rows, logits)

    def take(self, jobs: list[Job], logits: torch.Tensor):
        """Sample, check and deliver one token per job (logits [len(jobs), vocab]); drop finished rows."""
        finite = torch.isfinite(logits).all(-1).tolist()
        greedy = logits.argmax(-1).tolist()
        for i, job in enumerate(jobs):
            if job.cancelled:
                continue
            if not finite[i]:
                self.fail(job, "non_finite", f"the model produced non-finite logits at token {len(job.out) + 1} "
                                             "of this request; it was stopped (other requests are unaffected)")
                continue
            try:
                if job.fault == FAULT_RAISE and job.out:
                    raise RuntimeError("test fault: an exception while handling this request's token")
                t = greedy[i] if job.temperature == 0 else int(sample(logits[i:i + 1], job.temperature, job.top_p,
                                                                      job.generator)[0])
                job.out.append(t)
                self.metrics.tokens.inc()
                if t in job.stop_ids:
                    job.deliver(("end", "stop"))
                    job.cancelled = True
                else:
                    job.deliver(("token", t))
                    if len(job.out) >= job.max_tokens:
                        job.deliver(("end", "length"))
                        job.cancelled = True
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                self.fail(job, "exception", f"internal error in this request ({type(e).__name__}: {e})")
        self.recent.append((time.monotonic(), len(jobs)))
        while self.recent and self.recent[0][0] < time.monotonic() - 60:
            self.recent.popleft()
        self.drop_finished()

    def fail(self, job: Job, reason: str, message: str):
        self.metrics.failed.labels(reason).inc()
        job.cancelled = True
        job.deliver(("error", message))

    def drop_finished(self):
        keep = [i for i, j in enumerate(self.rows) if not j.cancelled]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
            return
        idx = torch.tensor(keep, device=self.model.device)
        c = self.cache
        c.kv, c.key_valid, c.pad = c.kv[:, :, idx], c.key_valid[idx], c.pad[idx]


# ---------------------------------------------------------------- the HTTP side

@dataclass
class Settings:
    api_key: str | None = None
    request_timeout: float = 300.0
    max_tokens_limit: int = 1024
    test_faults: bool = False


class AuthAndCount:
    """ASGI middleware: the API key on every route but /health, and a count per route and status.
    (Plain ASGI rather than @app.middleware: that wrapper hides client disconnects from handlers.)"""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key and path != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                self.metrics.requests.labels(path, 401).inc()
                response = JSONResponse(error_body("missing or wrong API key: send 'Authorization: Bearer <key>' "
                                                   "(the server was started with --api-key or DEJAVU_API_KEY)",
                                                   "authentication_error"), status_code=401)
                return await response(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.requests.labels(path if status != 404 else "other", status).inc()
            await send(message)
        await self.app(scope, receive, counting_send)


def create_app(loaded, engine: Engine, settings: Settings) -> FastAPI:
    tok, model_name, ctx = loaded.tokenizer, loaded.name, loaded.model.cfg.max_seq_len
    app = FastAPI(title="dejavu", description="OpenAI-compatible completions with contextual sparsity")
    metrics = engine.metrics = Metrics(engine)
    eos = {tok.eos_token_id} - {None}
    end_of_turn = eos | {tok.convert_tokens_to_ids(t) for t in END_OF_TURN if t in tok.get_vocab()}
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = validation_message(e)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    app.add_middleware(AuthAndCount, api_key=settings.api_key, metrics=metrics)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dejavu"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    def make_job(req: Sampling, prompt: list[int], max_tokens: int | None, stop_ids: set[int]) -> Job:
        if req.model != model_name:
            raise ApiError(404, f"model '{req.model}' is not served here; this server serves '{model_name}' "
                                "(see /v1/models)", param="model")
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
        fault = req.user if settings.test_faults and req.user in (FAULT_NAN, FAULT_RAISE) else None
        return Job(prompt=prompt, max_tokens=max_tokens or limit, temperature=req.temperature, top_p=req.top_p,
                   stop_ids=set() if req.ignore_eos else stop_ids, deliver=None, seed=req.seed, fault=fault)

    async def events(request: Request, job: Job):
        """The job's events, until its end. Stops the job when the client goes away, when the
        request runs past its timeout, or when the caller closes this generator early."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job.deliver = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
        if not engine.submit(job):
            raise ApiError(429, f"the server is busy: {engine.max_queue} requests are already queued "
                                "(--max-queue); retry later", kind="rate_limit_error")
        deadline, checked = time.monotonic() + settings.request_timeout, time.monotonic()
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
            engine.withdraw(job)

    def stop_strings(req: Sampling) -> list[str]:
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        return stops

    async def run(request: Request, req: Sampling, prompt: list[int], max_tokens: int | None, chat: bool):
        stops = stop_strings(req)
        job = make_job(req, prompt, max_tokens, end_of_turn if chat else eos)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        t0 = time.monotonic()
        stream = events(request, job)
        try:
            first = await anext(stream)  # raises ApiError(429) before any response starts
        except StopAsyncIteration:
            return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
        if first[0] == "error":  # failed or timed out before its first token: a plain HTTP error
            await stream.aclose()
            raise ApiError(first[2] if len(first) > 2 else 500, first[1], kind="server_error")

        def text_so_far() -> tuple[str, bool]:
            """Decoded text, cut at the first stop string (True when one was seen)."""
            text = tok.decode([t for t in job.out if t not in job.stop_ids], skip_special_tokens=True)
            cuts = [text.find(s) for s in stops if s in text]
            return (text[:min(cuts)], True) if cuts else (text, False)

        def usage():
            n = len(job.out)
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        def choice(text: str | None, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if delta:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

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
                    if ev[0] == "end":
                        finish = ev[1]
                    elif len(job.out) == 1:
                        metrics.first_token.observe(time.monotonic() - t0)
                    if stops and text_so_far()[1]:
                        finish, job.answered = "stop", True  # a stop string ends the job here
                        break
            finally:
                release(job)
                await stream.aclose()
            if finish is None:  # the client went away
                return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
            text, _ = text_so_far()
            metrics.latency.observe(time.monotonic() - t0)
            return JSONResponse(body([choice(text, finish, False)], with_usage=True))

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
            sent, hold = "", max((len(s) for s in stops), default=1) - 1
            if chat:
                yield data(body([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
            async for ev in all_events():
                if ev[0] == "error":
                    yield data(error_body(ev[1], "server_error"))
                    return
                if len(job.out) == 1 and ev[0] == "token":
                    metrics.first_token.observe(time.monotonic() - t0)
                text, seen = text_so_far()
                finish = "stop" if seen else (ev[1] if ev[0] == "end" else None)
                job.answered |= seen  # a stop string ends the job here
                # hold back an incomplete UTF-8 character and what could be the start of a stop string
                ready = text if finish else text[:len(text) - hold] if hold else text
                if not finish and ready.endswith("\ufffd"):
                    ready = ready[:-1]
                if len(ready) > len(sent):
                    yield data(body([choice(ready[len(sent):], None, True)]))
                    sent = ready
                if finish:
                    yield data(body([choice(None if chat else "", finish, True)]))
                    if req.stream_options and req.stream_options.include_usage:
                        yield data(body([], with_usage=True))
                    yield "data: [DONE]\n\n"
                    metrics.latency.observe(time.monotonic() - t0)
                    return

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, f"prompt: one prompt per request, got {len(prompts)} (send them as separate "
                                "requests; the server batches them)", param="prompt")
        return await run(request, req, tok(prompts[0]).input_ids, req.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatRequest):
        if tok.chat_template is None:
            raise ApiError(400, f"{model_name} has no chat template: use /v1/completions")
        msgs = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                 "".join(p.text for p in m.content)} for m in req.messages]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        return await run(request, req, list(ids), req.max_completion_tokens or req.max_tokens, chat=True)

    return app


def warm_up(engine: Engine, tok):
    """One short request through the engine before the port opens: first-use kernel builds and
    allocations happen here, not in the first client's latency."""
    done = threading.Event()
    job = Job(prompt=tok("Hello").input_ids, max_tokens=4, temperature=0.0, top_p=1.0, stop_ids=set(),
              deliver=lambda ev: done.set() if ev[0] != "token" else None)
    engine.submit(job)
    if not done.wait(timeout=600):
        raise DejavuError("the engine did not answer a warm-up request within 10 minutes")


def serve(loaded, sparsity, guard, host: str, port: int, batch_size: int, max_queue: int, sparse_max_batch: int,
          settings: Settings):
    import uvicorn
    engine = Engine(loaded.model, sparsity, guard, batch_size=batch_size, max_queue=max_queue,
                    sparse_max_batch=sparse_max_batch)
    app = create_app(loaded, engine, settings)
    thread = threading.Thread(target=engine.run, name="dejavu-engine", daemon=True)
    thread.start()
    warm_up(engine, loaded.tokenizer)
    mode = "dense" if sparsity is None else (f"sparse (MLP density {engine.density('mlp'):.2f}, attention "
                                             f"{engine.density('attn'):.2f} on the warm-up"
                                             f"{', guarded' if guard is not None else ''}; batches of more "
                                             f"than {sparse_max_batch} decode dense)")
    print(f"dejavu serve: {loaded.name}, {mode} decode, batch up to {batch_size}, queue up to {max_queue}; "
          f"http://{host}:{port}/v1" + (" (API key required)" if settings.api_key else ""), file=sys.stderr)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.stopping = True
