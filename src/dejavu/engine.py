"""The GPU decode engine: model.py's decode step captured whole in one CUDA graph.

Prefill runs eagerly and dense. Each new token then replays the graph: embedding, every block
(dense, or gathered sparse with the lookahead predictors on a side stream), logits, the greedy
pick written back into the input buffer, position + 1. The KV cache, the input token and the
position live on the device, so a step never waits for the host; the host only launches
`graph.replay()` and records an event per token for timing.
"""
from __future__ import annotations

import statistics

import torch

from .model import Transformer


LAZY_WINDOW = 32  # positions a lazy K/V fill recomputes (the gather kernels take up to 32 rows at once)


def lazy_kv_applies(model: Transformer, batch: int, sparsity) -> bool:
    """Lazy K/V fill (model.Attention.fill_kv_lazily) where it saves weight reads: head-sparse
    decode of a multi-head model without RoPE (OPT), batch 1."""
    c = model.cfg
    return (batch == 1 and sparsity is not None and getattr(sparsity, "head_sel", None) is not None
            and c.n_kv_heads == c.n_heads and c.positions != "rope")


class GraphDecoder:
    """Greedy decode of a batch with a CUDA-graph step. `sparsity` (a sparse.Gathered, or None
    for dense) is captured as it is: fixed k per layer, so the step's shapes never change.
    `lazy_kv` (default: where it applies) computes K/V for the selected heads only."""

    def __init__(self, model: Transformer, batch: int, max_seq_len: int, sparsity=None, lazy_kv: bool | None = None):
        if model.device.type != "cuda":
            raise ValueError("the CUDA-graph decoder needs the model on a CUDA device")
        self.model, self.sparsity = model, sparsity
        if lazy_kv is None:
            lazy_kv = lazy_kv_applies(model, batch, sparsity)
        self.cache = model.new_cache(batch, max_seq_len, lazy_window=LAZY_WINDOW if lazy_kv else 0)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
        self.pos = torch.zeros((), dtype=torch.long, device=model.device)
        self.logits = None
        self.graph = None

    def _step(self):
        self.logits = self.model(self.tokens, self.cache, self.pos, self.sparsity)[:, -1]
        self.tokens.copy_(self.logits.argmax(-1, keepdim=True))
        self.pos += 1

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor):
        """prompt [B, T] token ids (already left-padded, cache.set_padding done by the caller
        if needed). Dense, eager; leaves the first new token in the input buffer."""
        logits = self.model(prompt, self.cache, 0)[:, -1]
        self.tokens.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(prompt.shape[1])
        if self.graph is None:
            self._capture()

    def _capture(self):
        # Warm-up on a side stream first (Triton compiles, cuBLAS picks kernels), then capture.
        # Neither changes the state: the warm-up's writes land in slots that decoding rewrites.
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

    @torch.no_grad()
    def decode(self, n: int) -> tuple[torch.Tensor, list[float]]:
        """n greedy tokens after prefill -> (tokens [B, n], ms per token from CUDA events).
        The first token is the prefill's pick; each replay produces the next."""
        out = torch.empty(self.tokens.shape[0], n, dtype=torch.long, device=self.tokens.device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            out[:, i] = self.tokens[:, 0]
            self.graph.replay()
            events[i].record()
        torch.cuda.synchronize()
        return out, [a.elapsed_time(b) for a, b in zip(events, events[1:])]


def greedy(model: Transformer, prompt: torch.Tensor, n: int, sparsity=None):
    """Convenience: prefill + n graph steps -> (tokens [B, n], median ms per token)."""
    dec = GraphDecoder(model, prompt.shape[0], prompt.shape[1] + n + 2, sparsity)
    dec.prefill(prompt)
    tokens, ms = dec.decode(n)
    return tokens, statistics.median(ms)
