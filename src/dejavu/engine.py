"""The GPU decode engine: model.py's decode step captured whole in one CUDA graph.

Prefill runs eagerly and dense. Each new token then replays the graph: embedding, every block
(dense, or gathered sparse with the lookahead predictors on a side stream), logits, the pick
(greedy, or sampling.sample_rows with per-row settings in device buffers) written back into the
input buffer, position + 1. The KV cache, the input token and the
position live on the device, so a step never waits for the host; the host only launches
`graph.replay()` and records an event per token for timing.
"""
from __future__ import annotations

import statistics

import torch

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


class GraphDecoder:
    """Decode of a batch with a CUDA-graph step. `sparsity` (a sparse.Gathered, or None for
    dense) is captured as it is: fixed k per layer, so the step's shapes never change.
    `lazy_kv` (default: where it applies) computes K/V for the selected heads only.
    `sampling`: the step draws each row's next token with sampling.sample_rows (per-row
    temperature, top-p and seed in device buffers, set by `set_sampling`); without it the
    step takes the argmax (no softmax or sort over the vocabulary)."""

    def __init__(self, model: Transformer, batch: int, max_seq_len: int, sparsity=None, lazy_kv: bool | None = None,
                 sampling: bool = False):
        if model.device.type != "cuda":
            raise ValueError("the CUDA-graph decoder needs the model on a CUDA device")
        self.model, self.sparsity, self.sampling = model, sparsity, sampling
        if lazy_kv is None:
            lazy_kv = lazy_kv_applies(model, batch, sparsity)
        self.cache = model.new_cache(batch, max_seq_len, lazy_window=LAZY_WINDOW if lazy_kv else 0)
        dev = model.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros((), dtype=torch.long, device=dev)
        self.at = 0  # the host's copy of pos: the capacity check needs no sync
        self.temperature = torch.zeros(batch, device=dev)
        self.top_p = torch.ones(batch, device=dev)
        self.seed = torch.zeros(batch, dtype=torch.long, device=dev)
        self.logits = None
        self.graph = None

    def set_sampling(self, temperature: float, top_p: float = 1.0, seeds: list[int] | None = None):
        """Every row's temperature and top-p; `seeds` one per row (None: drawn at random)."""
        if not self.sampling and temperature > 0:
            raise ValueError("this decoder was built greedy (sampling=False)")
        self.temperature.fill_(temperature)
        self.top_p.fill_(top_p)
        seeds = seeds if seeds is not None else torch.randint(0, 2 ** 62, (len(self.seed),)).tolist()
        self.seed.copy_(torch.tensor(seeds, dtype=torch.long))

    def _pick(self, logits, pos):
        if not self.sampling:
            return logits.argmax(-1)
        return sample_rows(logits, self.temperature, self.top_p, self.seed, (pos - self.cache.pad))

    def _step(self):
        self.logits = self.model(self.tokens, self.cache, self.pos, self.sparsity)[:, -1]
        self.pos += 1
        self.tokens.copy_(self._pick(self.logits, self.pos)[:, None])

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor):
        """prompt [B, T] token ids (already left-padded, cache.set_padding done by the caller
        if needed). Dense, eager; leaves the first new token in the input buffer."""
        T = prompt.shape[1]
        if T > self.cache.max_seq_len:
            raise DejavuError(f"a prompt of {T} tokens does not fit a cache of {self.cache.max_seq_len}")
        if self.graph is None:
            self.capture()  # first: its warm-up writes slots 0 and 1, which the prefill then rewrites
        logits = self.model(prompt, self.cache, 0)[:, -1]
        self.pos.fill_(T)
        self.at = T
        self.tokens.copy_(self._pick(logits, self.pos)[:, None])

    def capture(self):
        """Warm-up on a side stream (Triton compiles, cuBLAS picks kernels), then capture, both at
        position 0 of the cache: the prefill that follows rewrites what they wrote."""
        self.pos.zero_()
        saved = self.tokens.clone(), self.pos.clone()
        warm = torch.cuda.Stream()
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(warm)
        self.tokens.copy_(saved[0])
        self.pos.copy_(saved[1])
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.tokens.copy_(saved[0])
        self.pos.copy_(saved[1])

    def check_room(self, steps: int):
        """Refuse, before anything runs, `steps` replays that would write past the cache."""
        if self.at + steps > self.cache.max_seq_len:
            raise DejavuError(f"{steps} more decode steps from position {self.at} would run past the cache of "
                              f"{self.cache.max_seq_len} tokens: ask for fewer new tokens or build a larger cache")

    @torch.no_grad()
    def decode(self, n: int, last_step: bool = True) -> tuple[torch.Tensor, list[float]]:
        """n tokens after prefill -> (tokens [B, n], ms per token from CUDA events). The first
        token is the one in the input buffer; each replay produces the next. `last_step` False:
        no replay after the n-th token (the caller wants no more)."""
        steps = n if last_step else n - 1
        self.check_room(steps)
        out = torch.empty(self.tokens.shape[0], n, dtype=torch.long, device=self.tokens.device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        for i in range(n):
            out[:, i] = self.tokens[:, 0]
            if i < steps:
                self.graph.replay()
                events[i].record()
        self.at += steps
        torch.cuda.synchronize()
        return out, [a.elapsed_time(b) for a, b in zip(events, events[1:])]


def greedy(model: Transformer, prompt: torch.Tensor, n: int, sparsity=None):
    """Convenience: prefill + n graph steps -> (tokens [B, n], median ms per token)."""
    dec = GraphDecoder(model, prompt.shape[0], prompt.shape[1] + n + 2, sparsity)
    dec.prefill(prompt)
    tokens, ms = dec.decode(n)
    return tokens, statistics.median(ms)
