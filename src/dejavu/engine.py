"""The GPU decode engine: model.py's decode step captured whole in one CUDA graph.

Prefill runs eagerly and dense. Each new token then replays the graph: embedding, every block
(dense, or gathered sparse with the lookahead predictors on a side stream), logits, the pick
(greedy, or sampling.sample_rows with per-row settings in device buffers) written back into the
input buffer, position + 1. The KV cache, the input token and the
position live on the device, so a step never waits for the host; the host only launches
`graph.replay()` and records an event per token for timing.
"""
from __future__ import annotations

import gc
import statistics

import torch

from . import kernels
from .errors import DejavuError
from .model import Transformer
from .sampling import sample_rows


LAZY_WINDOW = 32  # positions a lazy K/V fill recomputes (the gather kernels take up to 32 rows at once)


def lazy_kv_applies(model: Transformer, batch: int, sparsity) -> bool:
    """Lazy K/V fill (model.LazyKVCache) where it saves weight reads: head-sparse
    decode of a multi-head model without RoPE (OPT), batch 1."""
    c = model.cfg
    return (batch == 1 and sparsity is not None and getattr(sparsity, "head_sel", None) is not None
            and c.n_kv_heads == c.n_heads and c.positions != "rope")


def side_stream(sparsity):
    """Gives a sparse.Gathered without one a CUDA stream for its lookahead predictors, which then
    select beside the main stream (batch 1, or a set per row). -> sparsity (None and others: as is)."""
    if getattr(sparsity, "side_stream", False) is None:
        sparsity.side_stream = torch.cuda.Stream()
    return sparsity


WARM_UPS = 2  # eager runs before a capture: Triton compiles, cuBLAS picks its kernels
CALLS = WARM_UPS + 1  # times capture_graph calls its step


def capture_graph(step) -> torch.cuda.CUDAGraph:
    """`step` (no arguments; every tensor it touches stays where it is) warmed up on a side stream,
    then captured on that stream (buffers the kernels keep per stream exist before the capture). It
    runs WARM_UPS times for real: the caller makes that harmless."""
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        for _ in range(WARM_UPS):
            step()
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    gc.disable()  # a collection inside the capture could destroy another graph and invalidate this one
    try:
        with torch.cuda.graph(graph, stream=warm):
            step()
    finally:
        gc.enable()
    return graph


class GraphDecoder:
    """Decode of up to `batch` rows with CUDA-graph steps. `sparsity` (a sparse.Gathered, or None
    for dense) is captured as it is: fixed k per layer, so the step's shapes never change.
    `lazy_kv` (default: where it applies) computes K/V for the selected heads only.
    `sampling`: the step draws each row's next token with sampling.sample_rows (per-row
    temperature, top-p and seed in device buffers); without it the step takes the argmax (no
    softmax or sort over the vocabulary).

    Each row has its own next cache slot (`pos[b]`). generate() starts every row together
    (left-padded prompts, `prefill`, then `decode`). Serving (serve/scheduler.py) prefills a
    request into a free row while the others decode (`prefill_row`), steps the first n rows
    (`step`, n a bucket: 1, 2, 4, ... up to `batch`, one graph per bucket and mode, captured on
    first use) and frees the row when the request ends (`free_row`): nothing is re-captured and
    no cache is copied. A free row (`live[b]` 0) stands still; what it computes is never read."""

    def __init__(self, model: Transformer, batch: int, max_seq_len: int, sparsity=None, lazy_kv: bool | None = None,
                 sampling: bool = False):
        if model.device.type != "cuda":
            raise ValueError("the CUDA-graph decoder needs the model on a CUDA device")
        self.model, self.sparsity, self.sampling, self.batch = model, sparsity, sampling, batch
        if lazy_kv is None:
            lazy_kv = lazy_kv_applies(model, batch, sparsity)
        self.cache = model.new_cache(batch, max_seq_len, lazy_window=LAZY_WINDOW if lazy_kv else 0)
        dev = model.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self.live = torch.ones(batch, dtype=torch.long, device=dev)
        self.finite = torch.ones(batch, dtype=torch.bool, device=dev)  # the last step's logits were finite
        self.at = [0] * batch  # the host's copy of pos: the capacity check needs no sync
        self.live_rows = set(range(batch))  # the host's copy of live
        self.temperature = torch.zeros(batch, device=dev)
        self.top_p = torch.ones(batch, device=dev)
        self.seed = torch.zeros(batch, dtype=torch.long, device=dev)
        self.logits = None
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (rows, sparse) -> graph
        self.units: dict[tuple[int, bool], dict] = {}  # (rows, sparse) -> units one replay computes
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}  # (rows, sparse) -> the graph's logits

    @property
    def graph(self):
        return self.graphs.get((self.batch, self.sparsity is not None))

    def set_sampling(self, temperature: float, top_p: float = 1.0, seeds: list[int] | None = None):
        """Every row's temperature and top-p; `seeds` one per row (None: drawn at random)."""
        if not self.sampling and temperature > 0:
            raise ValueError("this decoder was built greedy (sampling=False)")
        self.temperature.fill_(temperature)
        self.top_p.fill_(top_p)
        seeds = seeds if seeds is not None else torch.randint(0, 2 ** 62, (len(self.seed),)).tolist()
        self.seed.copy_(torch.tensor(seeds, dtype=torch.long))

    def _pick(self, logits, rows: slice, greedy: torch.Tensor | None = None):
        """The rows' next tokens; `greedy`: their argmax where the caller has it already."""
        if not self.sampling:
            return logits.argmax(-1) if greedy is None else greedy
        return sample_rows(logits, self.temperature[rows], self.top_p[rows], self.seed[rows],
                           self.pos[rows] - self.cache.pad[rows], greedy)

    def _step(self, n: int, sparsity):
        cache = self.cache if n == self.batch else self.cache.rows(slice(0, n))
        self.logits = self.model(self.tokens[:n], cache, self.pos[:n], sparsity)[:, -1]
        greedy, self.finite[:n] = kernels.argmax_finite(self.logits)
        self.pos[:n] += self.live[:n]
        self.tokens[:n] = self._pick(self.logits, slice(0, n), greedy)[:, None]

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor):
        """prompt [B, T] token ids for every row (already left-padded, cache.set_padding done by the
        caller if needed). Dense, eager; leaves the first new token in the input buffer."""
        T = prompt.shape[1]
        if T > self.cache.max_seq_len:
            raise DejavuError(f"a prompt of {T} tokens does not fit a cache of {self.cache.max_seq_len}")
        if self.graph is None:
            self.capture()  # first: its warm-up writes slot 0, which the prefill then rewrites
        logits = self.model(prompt, self.cache, 0)[:, -1]
        self.pos.fill_(T)
        self.live.fill_(1)
        self.at = [T] * self.batch
        self.live_rows = set(range(self.batch))
        self.tokens.copy_(self._pick(logits, slice(None))[:, None])

    @torch.no_grad()
    def prefill_row(self, row: int, prompt: list[int], temperature: float = 0.0, top_p: float = 1.0,
                    seed: int = 0):
        """One request into a free row while the other rows decode: its own settings, a dense eager
        prefill of its prompt at slots 0..T-1 of its row, its first token left in the input buffer
        (from the same pick as the steps). -> the prompt's last logits [vocab]."""
        T = len(prompt)
        if not 0 < T < self.cache.max_seq_len:
            raise DejavuError(f"a prompt of {T} tokens does not fit a cache of {self.cache.max_seq_len}")
        if temperature > 0 and not self.sampling:
            raise ValueError("this decoder was built greedy (sampling=False)")
        rows = slice(row, row + 1)
        view = self.cache.rows(rows)
        view.key_valid.fill_(True)
        view.pad.zero_()
        self.temperature[row], self.top_p[row], self.seed[row] = temperature, top_p, seed
        logits = self.model(torch.tensor([prompt], device=self.model.device), view, 0)[:, -1]
        self.pos[row] = T
        self.live[row] = 1
        self.at[row] = T
        self.live_rows.add(row)
        self.finite[row] = torch.isfinite(logits).all()
        self.tokens[rows] = self._pick(logits, rows)[:, None]
        return logits[0]

    def free_row(self, row: int):
        """The row's request ended: the row stands still (at slot 0, always inside the cache) until a
        prefill takes it again."""
        self.live[row] = 0
        self.pos[row] = 0
        self.at[row] = 0
        self.live_rows.discard(row)

    def capture(self, rows: int | None = None, sparse: bool = True, sparsity=None):
        """The step of the first `rows` rows (default all), sparse (with `sparsity`, default the
        decoder's) or dense, as a graph. Warm-up on a side stream (Triton compiles, cuBLAS picks
        kernels), then capture, every row standing still: each writes only its next slot, which its
        own next step rewrites before anything reads it."""
        n = rows or self.batch
        sparsity = (sparsity or self.sparsity) if sparse else None
        sparse = sparsity is not None
        saved = self.tokens.clone(), self.pos.clone(), self.live.clone()
        self.live.zero_()
        before = {k: list(v) for k, v in getattr(sparsity, "kept", {}).items()}
        graph = capture_graph(lambda: self._step(n, sparsity))
        self.units[n, sparse] = {k: [(v[0] - before[k][0]) // CALLS, (v[1] - before[k][1]) // CALLS]
                                 for k, v in getattr(sparsity, "kept", {}).items()}
        self.graphs[n, sparse] = graph
        self.outputs[n, sparse] = self.logits
        for buf, value in zip((self.tokens, self.pos, self.live), saved):
            buf.copy_(value)
        return graph

    def check_room(self, steps: int, rows: int | None = None):
        """Refuse, before anything runs, `steps` replays that would write past the cache (for the
        live rows among the first `rows`)."""
        at = max((self.at[r] for r in range(rows or self.batch) if r in self.live_rows), default=0)
        if at + steps > self.cache.max_seq_len:
            raise DejavuError(f"{steps} more decode steps from position {at} would run past the cache of "
                              f"{self.cache.max_seq_len} tokens: ask for fewer new tokens or build a larger cache")

    @torch.no_grad()
    def step(self, rows: int, sparse: bool) -> tuple[list[int], list[bool]]:
        """Serving: one replay over the first `rows` rows (the free ones among them stand still) of
        the graph `capture` made for them -> each row's next token and whether its logits were
        finite (one copy to the host)."""
        graph = self.graphs[rows, sparse]
        self.check_room(1, rows)
        graph.replay()
        for r in range(rows):
            if r in self.live_rows:
                self.at[r] += 1
        tokens, finite = torch.stack((self.tokens[:rows, 0], self.finite[:rows].long())).tolist()
        return tokens, [bool(f) for f in finite]

    @torch.no_grad()
    def time_step(self, rows: int, sparse: bool, replays: int = 8, live: int = 0) -> float:
        """Median ms of the step over `rows` rows, the first `live` of them live and the others
        standing still (serving measures which mode pays). The input buffer and positions are
        restored after; the live rows' cache slots written are ones their next steps rewrite, so
        call it on free rows only."""
        graph = self.graphs[rows, sparse]
        saved = self.tokens.clone(), self.pos.clone(), self.live.clone()
        self.live.zero_()
        self.live[:live] = 1
        events = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
        events[0].record()
        for e in events[1:]:
            graph.replay()
            e.record()
        for buf, value in zip((self.tokens, self.pos, self.live), saved):
            buf.copy_(value)
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in zip(events, events[1:]))

    @torch.no_grad()
    def decode(self, n: int, last_step: bool = True) -> tuple[torch.Tensor, list[float]]:
        """n tokens of every row after prefill -> (tokens [B, n], ms per token from CUDA events). The
        first token is the one in the input buffer; each replay produces the next. `last_step`
        False: no replay after the n-th token (the caller wants no more)."""
        steps = n if last_step else n - 1
        self.check_room(steps)
        graph = self.graph or self.capture()
        out = torch.empty(self.batch, n, dtype=torch.long, device=self.tokens.device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        for i in range(n):
            out[:, i] = self.tokens[:, 0]
            if i < steps:
                graph.replay()
                events[i].record()
        self.at = [a + steps for a in self.at]
        torch.cuda.synchronize()
        return out, [a.elapsed_time(b) for a, b in zip(events, events[1:])]


def greedy(model: Transformer, prompt: torch.Tensor, n: int, sparsity=None):
    """Convenience: prefill + n graph steps -> (tokens [B, n], median ms per token)."""
    dec = GraphDecoder(model, prompt.shape[0], prompt.shape[1] + n + 2, sparsity)
    dec.prefill(prompt)
    tokens, ms = dec.decode(n)
    return tokens, statistics.median(ms)
