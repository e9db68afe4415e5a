"""Prometheus figures of the server: requests by route template and status, tokens, failures,
latency and time to first token, the scheduler's queue and batch, achieved density, the guard."""
from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest


class Metrics:
    def __init__(self, scheduler):
        disable_created_metrics()  # no *_created timestamp series: counters and gauges only
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dejavu_requests", "HTTP requests answered, by route template and status "
                                "(unknown paths: 'other')", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("dejavu_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.tokens = Counter("dejavu_generated_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("dejavu_cancelled_requests", "jobs stopped early, by reason (disconnect, timeout)",
                                 ["reason"], registry=r)
        self.failed = Counter("dejavu_failed_requests", "jobs failed in the scheduler, by reason", ["reason"],
                              registry=r)
        self.latency = Histogram("dejavu_request_seconds", "time from arrival to the last token", registry=r,
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
        self.first_token = Histogram("dejavu_time_to_first_token_seconds", "time from arrival to the first token",
                                     registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
        Gauge("dejavu_queue_length", "jobs waiting for a place in the batch", registry=r
              ).set_function(lambda: len(scheduler.waiting) + len(scheduler.inbox))
        Gauge("dejavu_running_requests", "jobs in the running batch", registry=r
              ).set_function(lambda: len(scheduler.rows))
        Gauge("dejavu_tokens_per_second", "tokens generated per second over the last 10 s", registry=r
              ).set_function(scheduler.recent_tokens_per_s)
        self.batch_rows = Histogram("dejavu_decode_batch_rows", "requests decoded together, per decode step",
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64))
        density = Gauge("dejavu_achieved_density", "units computed per decode token / all units, since start "
                        "(union over the batch; 1 for dense decode)", ["part"], registry=r)
        for part in ("mlp", "attn"):
            density.labels(part).set_function(lambda p=part: scheduler.density(p))
        if hasattr(scheduler, "mode"):  # the GPU step: measured ms of each mode at start-up, and the choice
            step_ms = Gauge("dejavu_step_ms", "one decode step's time over every row, measured at start-up: dense "
                            "(the same with any number of live rows), sparse with 1 live row and with every row "
                            "live (each row gathers its own units)", ["mode", "live_rows"], registry=r)
            measured = lambda key: math.nan if (scheduler.mode or {}).get(key) is None else scheduler.mode[key]
            for mode, rows, key in (("dense", "any", "dense_ms"), ("sparse", "1", "sparse_ms"),
                                    ("sparse", str(scheduler.batch_size), "sparse_all_ms")):
                step_ms.labels(mode, rows).set_function(lambda key=key: measured(key))
            Gauge("dejavu_step_sparse", "1 where the server decodes sparse (its step with one live row measured "
                  "faster than the dense step), else 0", registry=r
                  ).set_function(lambda: float((scheduler.mode or {}).get("sparse", False)))
        if scheduler.guard is not None:  # guard.py's figures: sampled dense checks of the sparse decode
            g = scheduler.guard.metrics
            for name, doc, get in (
                    ("checked_steps", "decode steps also run dense to check the sparse one", lambda: g.checked),
                    ("agreement", "top-1 agreement of sparse with dense, mean over checks", lambda: g.agreement_mean),
                    ("agreement_rolling", "top-1 agreement over the guard's current window",
                     lambda: g.agreement_rolling),
                    ("kl", "KL(dense || sparse) of the next-token distribution, mean over checks, nats",
                     lambda: g.kl_mean),
                    ("trips", "times the rolling agreement fell below the threshold", lambda: g.trips),
                    ("fallbacks", "batches finished dense after a trip", lambda: g.fallbacks),
                    ("mlp_recall", "MLP selector recall of the oracle top-k, mean over checks",
                     lambda: g.mlp_recall_mean),
                    ("attn_recall", "head selector recall of the oracle top-k, mean over checks",
                     lambda: g.attn_recall_mean)):
                Gauge(f"dejavu_guard_{name}", doc, registry=r).set_function(
                    lambda get=get: math.nan if get() is None else float(get()))

    def text(self) -> str:
        return generate_latest(self.registry).decode()
