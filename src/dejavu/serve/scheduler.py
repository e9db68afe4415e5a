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
"""
from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import torch

from ..sampling import sample

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


class Scheduler:
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
        self.metrics = None           # metrics.Metrics, set by the app before the loop runs
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
                    self.fail(job, "exception", f"the server failed on this batch ({type(e).__name__}: {e})")
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
