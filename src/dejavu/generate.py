"""Prefill and decode over the static KV cache, one step at a time (sampling.py picks the tokens)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import DejavuError
from .model import Transformer
from .sampling import sample


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DejavuError("every prompt needs at least one token: give some text")
    n = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_id] * (n - len(p)) + list(p) for p in prompts])
    pad = torch.tensor([n - len(p) for p in prompts])
    return tokens, pad


@dataclass
class GenerationStats:
    batch: int = 1
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    lossless: object = None  # speculative.LosslessStats in lossless mode

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps * self.batch / self.decode_seconds if self.decode_seconds else 0.0


def stop_list(eos_id) -> list[int]:
    """eos_id as a list: None, one id, or several (the first is what finished rows repeat)."""
    return [] if eos_id is None else [int(eos_id)] if isinstance(eos_id, int) else [int(i) for i in eos_id]


def end_rows(nxt: torch.Tensor, done: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """Rows already done repeat the first stop id; a stop id ends its row (`done` in place)."""
    if len(stops):
        nxt = torch.where(done, stops[0], nxt)
        done |= torch.isin(nxt, stops)
    return nxt


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | list[int] | tuple[int, ...] | None = None, pad_id: int = 0, seed: int | None = None,
             stats: GenerationStats | None = None, sparsity=None, guard=None) -> Iterator[torch.Tensor]:
    """Yields the next token of every sequence [B] per step; a row ends at any id of `eos_id`
    (one id or several) and then repeats the first.

    Prompts of different lengths are left-padded; the cache masks the padding. With
    `sparsity` (sparse.Gathered or Masked) the decode steps run sparse; the prefill stays
    dense, so the KV cache of the prompt is exact (lossless mode, where the sparse model
    only drafts: speculative.generate_lossless). With `guard`
    (guard.Guard, which holds its own sparse decoder) the decode steps run sparse with
    sampled dense checks and fall back to dense when they disagree.
    """
    tokens, pad = left_pad(prompts, pad_id)
    B, T = tokens.shape
    total = T + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise DejavuError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"context of {model.cfg.max_seq_len} tokens: shorten the prompt or ask for fewer tokens")
    if graph_step_applies(model, B, sparsity, guard):
        yield from generate_graph(model, tokens, pad, max_new_tokens, temperature, top_p, eos_id, seed, stats,
                                  sparsity, guard)
        return
    gen = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    cache = model.new_cache(B, total)
    cache.set_padding(pad)
    stats = stats if stats is not None else GenerationStats()
    stats.batch, stats.prompt_tokens = B, int((T - pad).sum())

    t0 = time.perf_counter()
    logits = model(tokens.to(model.device), cache, 0)[:, -1]
    nxt = sample(logits, temperature, top_p, gen)
    if nxt.is_cuda:
        torch.cuda.synchronize()
    stats.prefill_seconds = time.perf_counter() - t0
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    stops = torch.tensor(stop_list(eos_id), dtype=torch.long, device=model.device)
    if guard is not None:
        guard.begin()
    for step in range(max_new_tokens):
        nxt = end_rows(nxt, done, stops)
        stats.new_tokens += 1
        yield nxt
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        t = time.perf_counter()
        if guard is not None:
            logits = guard.step(nxt[:, None], cache, T + step)[:, -1]
        else:
            logits = model(nxt[:, None], cache, T + step, sparsity=sparsity)[:, -1]
        nxt = sample(logits, temperature, top_p, gen)
        if nxt.is_cuda:
            torch.cuda.synchronize()  # the step is timed to its end, not to its launch
        dt = time.perf_counter() - t
        stats.decode_seconds += dt
        stats.decode_steps += 1


def generate_ids(model: Transformer, prompts: list[list[int]], max_new_tokens: int, **kw) -> list[list[int]]:
    """All new tokens per prompt, cut after the first stop token."""
    steps = list(generate(model, prompts, max_new_tokens, **kw))
    out = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]
    stops = set(stop_list(kw.get("eos_id")))
    return [next((row[:i + 1] for i, t in enumerate(row) if t in stops), row) for row in out]


# ---------------------------------------------------------------- CUDA: the graph step

CHUNK = 8  # graph steps between two looks at the host (stop tokens, streaming)


def graph_step_applies(model: Transformer, batch: int, sparsity, guard) -> bool:
    """On CUDA every step replays one CUDA graph (engine.py): dense, or gathered sparse with
    static shapes (batch 1, or a fixed-size union), or guarded at batch 1 (its checks replay the
    dense graph too). Masked sparsity and guarded batches run eager."""
    if model.device.type != "cuda":
        return False
    if guard is not None:
        return batch == 1
    if sparsity is None:
        return True
    from .sparse import Gathered, InputSparsity
    if isinstance(sparsity, InputSparsity):
        return sparsity.gathered  # the rule sits in the projections: static shapes at any batch
    return isinstance(sparsity, Gathered) and (batch == 1 or sparsity.cap is not None)


def guarded_step(dec, guard):
    """A checked step on the graphs: the sparse step, then the dense step over the same token and
    slot (its exact K/V stay in the cache); the sparse token goes on unless the check trips the
    guard. After a trip the decode replays the dense graph, or a new sparse one at the raised
    densities. The recall of the selectors is not measured here (it needs the eager probe)."""
    from . import engine
    B = dec.batch
    token, pos = dec.tokens.clone(), dec.pos.clone()
    dec.check_room(1)
    dec.graphs[B, True].replay()
    sparse_logits, sparse_token = dec.outputs[B, True].clone(), dec.tokens.clone()
    dec.tokens.copy_(token)
    dec.pos.copy_(pos)
    dec.graphs[B, False].replay()
    dec.at = [a + 1 for a in dec.at]
    guard.advance(1, checked=True)
    if not guard.check(dec.outputs[B, False][:, None], sparse_logits[:, None]):
        dec.tokens.copy_(sparse_token)
    elif guard.dense:
        dec.sparsity = None  # the dense graph from here on
    else:
        dec.sparsity = engine.side_stream(guard.sparse)
        dec.capture()  # the raised densities' graph


def generate_graph(model: Transformer, tokens: torch.Tensor, pad: torch.Tensor, max_new_tokens: int,
                   temperature: float, top_p: float, eos_id, seed: int | None, stats: GenerationStats | None,
                   sparsity, guard=None) -> Iterator[torch.Tensor]:
    """generate() on CUDA: eager dense prefill, then CHUNK graph replays at a time with the pick
    on the device (sampling.sample_rows), stop tokens checked between chunks; a chunk that
    passes a row's stop token costs at most CHUNK - 1 wasted steps, never a wrong token. With a
    guard, a chunk ends at each checked step (guarded_step)."""
    from . import engine
    B, T = tokens.shape
    if guard is not None:
        guard.begin()
        sparsity = guard.sparse  # None when the guard starts dense
    engine.side_stream(sparsity)
    dec = engine.GraphDecoder(model, B, T + max_new_tokens, sparsity, sampling=temperature > 0)
    dec.cache.set_padding(pad)
    if temperature > 0:
        seeds = None if seed is None else [seed * 1_000_003 + b for b in range(B)]  # one stream per row
        dec.set_sampling(temperature, top_p, seeds)
    stats = stats if stats is not None else GenerationStats()
    stats.batch, stats.prompt_tokens = B, int((T - pad).sum())
    stops = torch.tensor(stop_list(eos_id), dtype=torch.long, device=model.device)
    dec.capture()  # compiles and captures: not part of the prefill's time
    if guard is not None and sparsity is not None:
        dec.capture(sparse=False)  # the checks' dense step
    t0 = time.perf_counter()
    dec.prefill(tokens.to(model.device))
    torch.cuda.synchronize()
    stats.prefill_seconds = time.perf_counter() - t0
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    left = max_new_tokens
    while left > 0:
        n = min(CHUNK, left)
        last = n == left  # no step after the last token asked for
        checked = guard is not None and guard.unchecked_ahead() < n - last
        if checked:  # the chunk ends with the checked step
            n, last = guard.unchecked_ahead() + 1, False
        t = time.perf_counter()
        out, _ = dec.decode(n, last_step=not (last or checked))  # synchronizes: the chunk is done
        if guard is not None:
            guard.advance(n - 1 if checked else n - last)
        if checked:
            guarded_step(dec, guard)
        stats.decode_seconds += time.perf_counter() - t
        stats.decode_steps += n - last
        left -= n
        for i in range(n):
            stats.new_tokens += 1
            yield end_rows(out[:, i], done, stops)
            if bool(done.all()):
                return
