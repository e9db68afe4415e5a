"""The continuous-batching loop: which queued requests run next, and one model step at a time.

One thread (the only one that touches the model) keeps a running batch. Between decode steps it
admits queued jobs, prefills them, then runs one decode step for every row at once: with
--predictors the gathered sparse path over the batch's union of selected units (sparse.Gathered),
else dense. Each row is sampled with its own settings and checked on its own: a row whose logits
are not finite, or whose handling raises (while it starts or while it steps), fails alone.

The batch shares one slot timeline in one static KV cache (model.KVCache): a job joins at the
current slot with its prompt placed just before it (the slots before the prompt are padding,
masked as in left-padded batches), so a job can join while the others decode if its prompt fits
before the current slot and its max_tokens before the end of the cache. A new batch starts at
slot 0 with jobs whose longest prompt plus largest max_tokens fit the model's context together;
the others wait (first come, first served) to join later or to start the next batch. Every job
fits the context alone (the HTTP side checks), so every job runs.

Tensor parallelism (`serve --tp N`, Mirror below): every rank runs this loop on its shard, and
rank 0, the only one that takes requests, tells the others before each iteration what changed.
"""
from __future__ import annotations

import random
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field


import torch

from ..errors import DejavuError
from ..sampling import sample
from ..tp import same_on_every_rank

# Test-only fault injection (`dejavu serve --test-faults`): a request whose `user` field is one of
# these misbehaves on purpose, so tests can check that one bad request does not hurt the others.
FAULT_NAN = "dejavu-test-fault:nan-cache"  # poisons the row's own KV cache: the real forward then gives NaN logits
FAULT_RAISE = "dejavu-test-fault:raise"    # raises while the scheduler handles the row's token
FAULT_START = "dejavu-test-fault:start"    # raises while the scheduler starts the row
FAULTS = (FAULT_NAN, FAULT_RAISE, FAULT_START)


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop_ids: frozenset[int]
    deliver: object               # thread-safe callable: puts an event into the handler's queue
    seed: int | None = None
    fault: str | None = None      # test-only, see FAULT_*
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False       # the scheduler drops the row: finished, failed, or stopped by the handler
    answered: bool = False        # the handler has its last event (end, error, timeout, a stop string)
    released: bool = False
    out: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    uid: int = -1                 # with --tp: the job's number on every rank
    withdrawn: bool = False       # with --tp: the handler stopped it; every rank drops it at the next tick

    def spec(self) -> dict:
        """What another rank needs to run the same job (Mirror)."""
        return dict(prompt=self.prompt, max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    stop_ids=self.stop_ids, seed=self.seed, fault=self.fault, uid=self.uid)


def _no_delivery(event):
    """Ranks other than 0 answer nobody: rank 0 delivers."""


class Mirror:
    """Tensor-parallel serving: every rank runs the scheduler's iterations on its shard of the
    model, so that their forwards (and the all-reduces inside) pair up one for one. Rank 0 alone
    takes requests; before each iteration it sends what changed since the last one (the jobs that
    arrived, each sampled one with a seed so that every rank draws alike; the jobs the handlers
    withdrew; whether to stop) and the other ranks apply it. Every other decision follows from the
    same logits, which the all-reduces make the same on every rank. Rank 0 ticks at least every
    half second while idle, so the others never wait long in a collective."""

    def __init__(self):
        import torch.distributed as dist
        self.dist, self.rank = dist, dist.get_rank()
        self.next_uid = 0
        self.jobs: dict[int, Job] = {}  # live jobs by uid, for withdrawals

    def tick(self, s: "Scheduler"):
        message = None
        if self.rank == 0:
            with s.cond:
                new = list(s.inbox)
                s.inbox.clear()
                s.waiting.extend(new)
            for job in new:
                job.uid, self.next_uid = self.next_uid, self.next_uid + 1
                if job.temperature > 0 and job.seed is None:
                    job.seed = random.randrange(2 ** 62)
                self.jobs[job.uid] = job
            gone = [uid for uid, job in self.jobs.items() if job.withdrawn and not job.cancelled]
            message = ([job.spec() for job in new], gone, s.stopping)
        box = [message]
        self.dist.broadcast_object_list(box, src=0)
        specs, gone, stopping = box[0]
        if self.rank:
            for spec in specs:
                job = self.jobs[spec["uid"]] = Job(deliver=_no_delivery, **spec)
                s.waiting.append(job)
            s.stopping = stopping
        for uid in gone:
            self.jobs[uid].cancelled = True
        self.jobs = {uid: job for uid, job in self.jobs.items() if not job.cancelled}


class Scheduler:
    def __init__(self, model, sparsity=None, guard=None, batch_size: int = 8, max_queue: int = 64,
                 sparse_max_batch: int = 1, batch_wait: float = 0.02, mirror: Mirror | None = None):
        self.model, self.sparsity, self.guard = model, sparsity, guard  # guard: guard.Guard, has its own decoder
        self.mirror = mirror          # tensor parallelism: the ranks' iterations kept in step
        self.inbox: deque[Job] = deque()  # with a mirror: submitted, not yet sent to the other ranks
        self.sparse_max_batch = sparse_max_batch  # larger batches decode dense: their union is nearly everything
        self.batch_size, self.max_queue, self.batch_wait = batch_size, max_queue, batch_wait
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.rows: list[Job] = []     # the running batch, in cache row order
        self.cache = None
        self.slot = 0                 # the slot the next decode step writes
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.kept = {"mlp": [0, 0], "attn": [0, 0]}      # units computed, units in all, over decode steps
        self.metrics = None           # metrics.Metrics, set by the app before the loop runs
        self.stopping = False

    # -- called from the HTTP side
    def submit(self, job: Job) -> bool:
        with self.cond:
            if len(self.waiting) + len(self.inbox) >= self.max_queue:
                return False
            (self.inbox if self.mirror is not None else self.waiting).append(job)
            self.cond.notify()
            return True

    def withdraw(self, job: Job):
        if self.mirror is not None:  # every rank drops it at the same iteration
            job.withdrawn = True
            return
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
        if sparse is not None and sparse.input_side:  # every neuron and head runs (on fewer input channels)
            sparse = None
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

    # -- the scheduler thread
    def run(self):
        leader = self.mirror is None or self.mirror.rank == 0  # the other ranks wait in the mirror's tick
        while True:
            with self.cond:
                while leader and not self.rows and not self.waiting and not self.inbox and not self.stopping:
                    if not self.cond.wait(timeout=0.5) and self.mirror is not None:
                        break  # tick anyway: the other ranks wait in a collective
            if leader and not self.rows:
                time.sleep(self.batch_wait)  # let requests that arrive together start together
            if self.mirror is not None:
                self.mirror.tick(self)
            if self.stopping:
                break
            try:
                self.admit()
                if self.rows:
                    self.step()
            except Exception as e:  # the batch's forward failed: fail its jobs, keep serving
                traceback.print_exc(file=sys.stderr)
                for job in self.rows:
                    self.fail(job, "exception", f"the server failed on this batch ({type(e).__name__}: {e})")
                self.reset()

    def reset(self):
        """No running batch (after a failed forward)."""
        self.rows, self.cache = [], None

    def fits(self, job: Job) -> bool:
        """Can the job join the running batch now: its prompt before the current slot, its new
        tokens before the end of the cache."""
        return len(job.prompt) <= self.slot and self.slot + job.max_tokens <= self.cache.max_seq_len

    def pick(self) -> list[Job]:
        """Queued jobs for the batch, first come first served: those that join the running batch,
        or those that start a new one together within the model's context."""
        new: list[Job] = []
        with self.cond:
            while self.waiting and len(self.rows) + len(new) < self.batch_size:
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                    continue
                if self.rows and not self.fits(job):
                    break  # waits for a later slot, or for this batch to drain
                if new and (max(len(j.prompt) for j in new + [job]) + max(j.max_tokens for j in new + [job])
                            > self.model.cfg.max_seq_len):
                    break  # together they would outgrow the context: it starts the next batch
                new.append(self.waiting.popleft())
        return new

    def admit(self):
        """Take queued jobs into the batch and prefill them."""
        new = [job for job in self.pick() if self.start(job)]
        if not new:
            return
        if not self.rows:  # a new batch at slot 0, with room for jobs to join while it runs
            self.slot = max(len(j.prompt) for j in new)
            need = self.slot + max(j.max_tokens for j in new)
            self.cache = self.model.new_cache(0, min(self.model.cfg.max_seq_len, 2 * need))
            if self.guard is not None:
                self.guard.begin()  # the guard's window (and a fallback to dense) lasts one batch
        try:
            parts = [(new, *self.prefill(new))]
        except Exception:  # one of these prompts breaks the forward: prefill each alone, so it fails alone
            traceback.print_exc(file=sys.stderr)
            parts = []
            for job in new:
                try:
                    parts.append(([job], *self.prefill([job])))
                except Exception as e:
                    traceback.print_exc(file=sys.stderr)
                    self.fail(job, "exception", f"the server failed on this prompt ({type(e).__name__}: {e})")
        for jobs, _, cache in parts:
            self.join(jobs, cache)
            self.metrics.prompt_tokens.inc(sum(len(j.prompt) for j in jobs))
        for jobs, logits, _ in parts:  # after every join: take() may drop finished rows from the cache
            self.take(jobs, logits)
        if not self.rows:
            self.cache = None

    def start(self, job: Job) -> bool:
        """Per-job setup before the prefill; what raises here fails this job alone."""
        try:
            if job.fault == FAULT_START:
                raise RuntimeError("test fault: an exception while starting this request")
            if job.seed is not None:
                job.generator = torch.Generator(device=self.model.device).manual_seed(job.seed)
            return True
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            self.fail(job, "exception", f"internal error starting this request ({type(e).__name__}: {e})")
            return False

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
            if not job.cancelled and finite[i] and job.temperature > 0:
                try:
                    greedy[i] = int(sample(logits[i:i + 1], job.temperature, job.top_p, job.generator)[0])
                except Exception as e:
                    traceback.print_exc(file=sys.stderr)
                    self.fail(job, "exception", f"internal error in this request ({type(e).__name__}: {e})")
            self.deliver_token(job, greedy[i], finite[i])
        self.count_step(len(jobs))
        self.drop_finished()

    def deliver_token(self, job: Job, t: int, finite: bool):
        """Check and deliver one picked token of a job; the job ends at a stop id or its max_tokens."""
        if job.cancelled:
            return
        if not finite:
            self.fail(job, "non_finite", f"the model produced non-finite logits at token {len(job.out) + 1} "
                                         "of this request; it was stopped (other requests are unaffected)")
            return
        try:
            if job.fault == FAULT_RAISE and job.out:
                raise RuntimeError("test fault: an exception while handling this request's token")
            job.out.append(t)
            self.metrics.tokens.inc()
            if len(job.out) == 1:
                self.metrics.first_token.observe(time.monotonic() - job.arrival)
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

    def count_step(self, tokens: int):
        self.recent.append((time.monotonic(), tokens))
        while self.recent and self.recent[0][0] < time.monotonic() - 60:
            self.recent.popleft()

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


# ---------------------------------------------------------------- CUDA: the graph step


class GraphScheduler(Scheduler):
    """The same loop on CUDA over engine.GraphDecoder: each request gets a row of one preallocated
    cache (its own timeline from slot 0), joins as soon as a row is free (a dense eager prefill of
    its prompt) and leaves when it ends; nothing is re-captured or copied when requests come and
    go. The pick runs in the graph (sampling.sample_rows: per-request temperature, top-p, seed).

    Every step replays one graph over every row (free rows stand still), so a request's tokens do
    not depend on what else runs, to the bit, in bf16 too: the matmuls keep their shapes (cuBLAS
    picks its kernel, and so the rounding, by batch size), and sparse rows select on their own
    (sparse.Gathered.per_row: each row its own top-k, gathered row by row; a free row computes
    nothing, so a step costs what its live rows select). Sparse or dense is chosen once, at
    start-up, by measurement: sparse where its step with one live row beats the dense step.
    Per-row gathers do not share weight reads, so a sparse step grows with its live rows, and past
    some load it is slower than the dense one; switching by load would make answers depend on it,
    so `mode` reports the measured ms at one and at every row instead."""

    def __init__(self, model, sparsity=None, batch_size: int = 8, max_queue: int = 64, batch_wait: float = 0.02,
                 mirror: Mirror | None = None):
        from ..engine import GraphDecoder, side_stream
        super().__init__(model, sparsity, None, batch_size, max_queue, batch_size, batch_wait, mirror)
        try:
            self.dec = GraphDecoder(model, batch_size, model.cfg.max_seq_len, None, lazy_kv=False, sampling=True)
        except torch.cuda.OutOfMemoryError:
            gb = 2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * model.cfg.max_seq_len \
                * model.dtype.itemsize * batch_size / 1e9
            raise DejavuError(f"a KV cache of {batch_size} rows x {model.cfg.max_seq_len} tokens ({gb:.1f} GB) does "
                              f"not fit beside the model on this GPU: lower --batch-size") from None
        if sparsity is not None and not sparsity.input_side:
            side_stream(sparsity)  # lookahead predictors beside the main stream
            self.sparsity = sparsity.per_row(self.dec.live)
        self.slots: list[Job | None] = [None] * batch_size
        self.reset()  # every row free
        # measured at start-up: {"sparse": chosen, "dense_ms", "sparse_ms" (one live row), "sparse_all_ms"}
        self.mode: dict | None = None

    def reset(self):
        for r in range(len(self.slots)):
            self.dec.free_row(r)
        self.slots = [None] * len(self.slots)
        self.rows = []

    def warm(self):
        """Capture the dense step and, with --sparse, the sparse one, and measure them (once, while
        every row is free: a timed replay steps rows forward); progress on stderr."""
        if self.mode is not None:
            return
        assert all(job is None for job in self.slots), "the steps are measured before any request runs"
        t, n = time.perf_counter(), self.batch_size
        self.dec.capture(n, sparse=False)
        mode = {"sparse": False, "dense_ms": self.dec.time_step(n, False), "sparse_ms": None, "sparse_all_ms": None}
        if self.sparsity is not None:
            try:
                self.dec.capture(n, sparse=True, sparsity=self.sparsity)
                mode["sparse_ms"] = self.dec.time_step(n, True, live=1)
                mode["sparse_all_ms"] = self.dec.time_step(n, True, live=n)
                mode["sparse"] = same_on_every_rank(mode["sparse_ms"] < mode["dense_ms"])  # rank 0's timing decides
            except Exception as e:  # a selector without a static-shape step: the server decodes dense
                print(f"dejavu serve: no sparse step ({type(e).__name__}: {str(e)[:200]}); it decodes dense",
                      file=sys.stderr)
        self.mode = mode
        sparse = "" if mode["sparse_ms"] is None else (
            f", sparse {mode['sparse_ms']:.2f} ms with 1 live row, {mode['sparse_all_ms']:.2f} with {n}")
        print(f"dejavu serve: steps captured and measured in {time.perf_counter() - t:.1f} s: dense "
              f"{mode['dense_ms']:.2f} ms/step (any number of live rows){sparse} -> "
              f"{'sparse' if mode['sparse'] else 'dense'}", file=sys.stderr, flush=True)

    def admit(self):
        self.warm()  # before the first request takes a row
        free = [r for r, job in enumerate(self.slots) if job is None]
        with self.cond:
            new = []
            while self.waiting and len(new) < len(free):
                job = self.waiting.popleft()
                if not job.cancelled:
                    new.append(job)
        for job in new:
            if not self.start(job):
                continue
            if len(job.prompt) + job.max_tokens > self.dec.cache.max_seq_len:
                self.fail(job, "exception", f"the prompt ({len(job.prompt)} tokens) and max_tokens "
                                            f"({job.max_tokens}) exceed the context of {self.dec.cache.max_seq_len}")
                continue
            row = free.pop(0)
            try:
                seed = job.seed if job.seed is not None else int(torch.randint(0, 2 ** 62, ()))
                self.dec.prefill_row(row, job.prompt, job.temperature, job.top_p, seed % 2 ** 62)
                if job.fault == FAULT_NAN:  # test-only: a real non-finite value in this row's own cache
                    self.dec.cache.k[0, row, :, len(job.prompt) - 1] = float("nan")
                t, finite = int(self.dec.tokens[row, 0]), bool(self.dec.finite[row])
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                self.dec.free_row(row)
                free.insert(0, row)
                self.fail(job, "exception", f"the server failed on this prompt ({type(e).__name__}: {e})")
                continue
            self.slots[row] = job
            self.rows.append(job)
            self.metrics.prompt_tokens.inc(len(job.prompt))
            self.deliver_token(job, t, finite)
        self.drop_finished()

    @torch.inference_mode()
    def step(self):
        busy = [r for r, job in enumerate(self.slots) if job is not None]
        sparse = self.mode["sparse"]
        tokens, finite = self.dec.step(self.batch_size, sparse)
        self.count_graph_units(sparse, len(busy))
        self.metrics.batch_rows.observe(len(busy))
        for r in busy:
            self.deliver_token(self.slots[r], tokens[r], finite[r])
        self.count_step(len(busy))
        self.drop_finished()

    def count_graph_units(self, sparse: bool, busy: int):
        """One step's units for the achieved densities: what the graph computes per live row."""
        cfg = self.model.cfg
        units = self.dec.units.get((self.batch_size, sparse), {}) if sparse and not self.sparsity.input_side else {}
        for part, size in (("mlp", cfg.d_ff), ("attn", cfg.n_heads)):
            kept, total = units.get(part, (0, 0))
            frac = kept / total if total else 1.0
            self.kept[part][0] += frac * busy * size * cfg.n_layers
            self.kept[part][1] += busy * size * cfg.n_layers

    def drop_finished(self):
        for r, job in enumerate(self.slots):
            if job is not None and job.cancelled:
                if job in self.rows:
                    self.rows.remove(job)
                self.slots[r] = None
                self.dec.free_row(r)
                if job.fault == FAULT_NAN:  # the poisoned slot must not reach a later request's free-row step
                    self.dec.cache.kv[:, :, r].zero_()
