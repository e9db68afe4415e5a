"""Which kernel runs, dispatched by device: C++ on the CPU (cpu.py), Triton on CUDA
(triton_gather.py, triton_attention.py: torch custom ops `dejavu::*`), plain torch where neither
is available (reference.py holds what they all compute). The gathers read only the selected rows
of a weight, in place; `attention` picks the decode kernel or SDPA."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import DejavuError
from . import cpu
from .reference import ACTIVATIONS, lazy_fill, lazy_units, mlp_activation, rope_cache_reference, unit_rows


@functools.cache
def _triton():
    try:
        from . import triton_attention, triton_gather
        return triton_gather, triton_attention
    except Exception:  # no triton: torch below
        return None


class InputRule(NamedTuple):
    """Input-side sparsity for one projection: input channel k of a token counts where
    |x_k| * scale[k] > threshold (scale None: 1); threshold a 0-dim fp32 tensor on the weights' device."""
    threshold: torch.Tensor
    scale: torch.Tensor | None = None

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        score = x.float().abs()
        return (score * self.scale if self.scale is not None else score) > self.threshold


def is_input_major(w: torch.Tensor) -> bool:
    """w [N, K] stored transposed (Transformer.to_input_major): input channel k is a contiguous row."""
    return w.dim() == 2 and w.stride(0) == 1 and w.stride(1) == w.shape[0] and w.shape[0] > 1


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           rule: InputRule | None = None) -> torch.Tensor:
    """x [..., K] @ w[N, K].T + bias, the dense projection of every path; with `rule`, input-side
    sparsity as decode runs it: only the input channels that pass for some row of x (a batch
    shares the union) are read. One token on CUDA with an input-major weight: Triton's
    input_gather (the passing channels packed, then only their rows read); on the CPU one C++
    call selects and gathers the passing rows; anything else computes the same in torch, except
    that on CUDA a batch keeps each row's own channels (what the masked evaluation computes; a
    row's answer then never depends on the others, as serving wants)."""
    if rule is None:
        return F.linear(x, w, bias)
    K = x.shape[-1]
    if x.is_cuda and x.numel() == K and is_input_major(w) and _triton() is not None:
        return _triton()[0].input_gather(x, w.t(), rule.scale, rule.threshold, bias)
    if x.is_cuda:
        return F.linear(x * rule.keep(x).to(x.dtype), w, bias)
    if is_input_major(w) and cpu.usable(x):
        out = cpu.input_gather(x.reshape(-1, K), w.t(), rule.threshold, rule.scale, bias)
        return out.view(*x.shape[:-1], w.shape[0])
    return F.linear(x * rule.keep(x).reshape(-1, K).any(0).to(x.dtype), w, bias)


def mlp_down(h: torch.Tensor, w_out_t: torch.Tensor, b_out: torch.Tensor | None, act: str, gated: bool,
             rule: InputRule | None = None) -> torch.Tensor:
    """The MLP from its up side h [..., d_ff * n_in] (gate and up interleaved per neuron) to its
    output: activations, then W_down (with `rule`: input-side sparsity, as linear). On CUDA decode
    rows the activations are one kernel, or with a rule for one token computed inside input_gather."""
    if h.is_cuda and _triton() is not None and h.numel() // h.shape[-1] <= 32:
        tg = _triton()[0]
        if rule is not None and h.numel() == h.shape[-1]:
            return tg.input_gather(h, w_out_t, rule.scale, rule.threshold, b_out, act, gated)
        return linear(tg.mlp_act(h, act, gated), w_out_t.t(), b_out, rule)
    return linear(mlp_activation(h.unflatten(-1, (-1, 2 if gated else 1)), act), w_out_t.t(), b_out, rule)


def require_output_major(w: torch.Tensor):
    if w.stride(-1) != 1:
        raise DejavuError("neuron and head selection gather rows of the output-major layout, and this model's "
                          "weights are input-major (converted for input-side sparsity): load the model again "
                          "without converting it to use neuron or head selection")


def _each_row(gather, x: torch.Tensor, idx: torch.Tensor, width: int, free=None) -> torch.Tensor:
    """A gather with a set per row (idx [B, m], one token per row) where no kernel takes it: row by
    row. A free row (first index negative) gets `free` (a bias) or zeros, as the Triton kernels give."""
    x2 = x.reshape(idx.shape[0], -1)
    out = x2.new_zeros(idx.shape[0], width)
    for r in range(idx.shape[0]):
        if idx[r, 0] >= 0:
            out[r] = gather(x2[r:r + 1], idx[r])[0]
        elif free is not None:
            out[r] = free
    return out.view(*x.shape[:-1], width)


def gather_matvec(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None = None,
                  unit: int = 1) -> torch.Tensor:
    """x [..., d], w [N, d] (rows may be strided), idx [m] -> [..., m * unit] = x @ w[rows].T + bias[rows],
    rows = unit_rows(idx, unit). idx [B, m]: a set per row (one token per row; a free row's first
    index is negative: it gets zeros, and gather_axpy gives it the bias), in every gather below."""
    require_output_major(w)
    if x.is_cuda and _triton() is not None and (idx.dim() == 2 or x.numel() // x.shape[-1] <= 32):
        return _triton()[0].gather_matvec(x, w, idx, bias, unit)
    if idx.dim() == 2:
        return _each_row(lambda x1, i: gather_matvec(x1, w, i, bias, unit), x, idx, idx.shape[1] * unit)
    rows = unit_rows(idx, unit)
    out = cpu.gather_matvec(x, w, rows)
    return out + bias[rows] if bias is not None else out


def gather_axpy(a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None = None,
                unit: int = 1) -> torch.Tensor:
    """a [..., m * unit], w [N, d], idx [m] -> [..., d] = a @ w[rows] + bias, rows = unit_rows(idx, unit)"""
    if a.is_cuda and _triton() is not None and (idx.dim() == 2 or a.numel() // a.shape[-1] <= 32):
        return _triton()[0].gather_axpy(a, w, idx, bias, unit)
    if idx.dim() == 2:
        return _each_row(lambda a1, i: gather_axpy(a1, w, i, bias, unit), a, idx, w.shape[1], free=bias)
    out = cpu.gather_axpy(a, w, unit_rows(idx, unit))
    return out + bias if bias is not None else out


def gather_qkv_lazily(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor,
                      turn: torch.Tensor, window: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Lazy K/V fill in one pass: x [S, d] the layer's kept inputs, w = wqkv, idx the query heads,
    turn the heads refreshed in turn, window [W] slots, kv [2, kv_heads, S, hd] one layer's K and V.
    Writes K/V of heads idx ++ turn for every window slot into kv; -> [1, len(idx) * hd], the query
    heads' Q for the window's last slot (the current token)."""
    hd, kv_heads = kv.shape[-1], kv.shape[1]
    n_q_heads = w.shape[0] // hd - 2 * kv_heads
    if x.is_cuda and _triton() is not None:
        return _triton()[0].gather_qkv_lazily(x, w, bias, idx, turn, n_q_heads, window, kv)
    return lazy_fill(gather_matvec(x[window], w, lazy_units(idx, turn, n_q_heads, kv_heads), bias, unit=hd),
                     idx, turn, window, kv)


def gather_act(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, idx: torch.Tensor,
               act: str) -> torch.Tensor:
    """x [..., d], w_in [d_ff, n_in, d], b_in [d_ff, n_in] or None, idx [m] -> [..., m]:
    act(gate) * up (n_in 2) or act(fc1 + bias) (n_in 1) for the neurons idx."""
    require_output_major(w_in)
    if x.is_cuda and _triton() is not None and (idx.dim() == 2 or x.numel() // x.shape[-1] <= 32):
        return _triton()[0].gather_act(x, w_in, b_in, idx, act)
    if idx.dim() == 2:
        return _each_row(lambda x1, i: gather_act(x1, w_in, b_in, i, act), x, idx, idx.shape[1])
    n_in = w_in.shape[1]
    rows = (idx[:, None] * n_in + torch.arange(n_in, device=idx.device)).flatten()
    h = gather_matvec(x, w_in.flatten(0, 1), rows).unflatten(-1, (len(idx), n_in))
    return mlp_activation(h + b_in[idx] if b_in is not None else h, act)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, head_idx: torch.Tensor,
                     n_heads: int, length: torch.Tensor, key_valid: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token's attention for the query heads head_idx: q [B, m, hd], one layer's cache
    [B, n_kv_heads, S, hd], length a device tensor, 0-dim or per row [B] (keys 0..length-1), key_valid [B, S]."""
    if q.is_cuda and _triton() is not None:
        return _triton()[1].decode_attention(q, k_cache, v_cache, head_idx, n_heads, length, key_valid, scale)
    L = int(length.max())  # torch path: host sync is fine off the GPU
    slot, last = torch.arange(L, device=q.device), length.reshape(-1, 1) - 1
    mask = ((key_valid[:, :L] & (slot <= last)) | (slot == last))[:, None, None]
    k, v = head_groups(k_cache[:, :, :L], v_cache[:, :, :L], head_idx, n_heads)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale)[:, :, 0]


def head_groups(k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor, n_heads: int):
    """k, v [B, kv_heads, keys, hd] -> the K/V group of each query head in `heads` ([m], or [B, m]
    a set per row; a free row's negative ids read group 0): [B, m, keys, hd]."""
    group = heads.clamp(min=0) // (n_heads // k.shape[1])
    if heads.dim() == 1:
        return k[:, group], v[:, group]
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    return k[rows, group], v[rows, group]


def rope_cache(qkv: torch.Tensor, rope, pos, kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """One decode token per row: qkv [B, (n_heads + 2 kv_heads) * hd], rope (cos, sin) or None, pos
    the cache slot (an int or a device tensor), kv [2, B, kv_heads, S, hd] one layer's cache ->
    q [B, n_heads * hd] with RoPE; K (with RoPE) and V written at the slot. On CUDA one Triton kernel
    (triton_attention.rope_cache), where torch runs about a dozen."""
    if qkv.is_cuda and _triton() is not None:
        return _triton()[1].rope_cache(qkv, rope, pos, kv, n_heads)
    return rope_cache_reference(qkv, rope, pos, kv, n_heads)


def new_token_attention(qkv: torch.Tensor, rope, pos, kv: torch.Tensor, n_heads: int, mask: "AttentionMask",
                        scale: float | None, softcap: float) -> torch.Tensor | None:
    """One decode token per row at device positions on CUDA: rope_cache and attention over every
    head, with RoPE and the cache write done inside the decode kernel (one kernel fewer) ->
    [B, 1, n_heads, hd]. None where that does not apply: rope_cache, then attention."""
    if not (qkv.is_cuda and mask.length is not None and isinstance(pos, torch.Tensor) and not softcap
            and _triton() is not None):
        return None
    hd = kv.shape[-1]
    return _triton()[1].rope_cache_attention(qkv, rope, pos, kv, _all_heads(n_heads, qkv.device), mask.length,
                                             mask.key_valid, scale or hd ** -0.5)[:, None]


@functools.cache
def _all_heads(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)  # made once: no arange kernel in every layer of every step


class AttentionMask(NamedTuple):
    """The keys each query sees. `dense` [B, 1, T, keys] (boolean) serves SDPA. For tokens at device
    positions over the whole cache (static shapes) also `length`, a 0-dim device tensor (keys
    0..length-1), and `key_valid` [B, S] (padding slots False): what the decode kernel reads instead."""
    dense: torch.Tensor
    length: torch.Tensor | None = None  # 0-dim, or one per row [B] (rows on their own timelines)
    key_valid: torch.Tensor | None = None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
              heads: torch.Tensor | None = None, n_heads: int | None = None, scale: float | None = None,
              softcap: float = 0.0) -> torch.Tensor:
    """q [B, m, T, hd] of the query heads `heads` (None: all m heads), k, v [B, kv_heads, keys, hd]
    -> [B, T, m, hd]. One token over the whole cache on CUDA: the decode kernel, which reads only
    the selected heads' K/V groups; else SDPA, each selected head over its own K/V group."""
    B, m, T, hd = q.shape
    n_heads = n_heads or m
    if mask.length is not None and T == 1 and q.is_cuda and not softcap:
        idx = heads if heads is not None else _all_heads(n_heads, q.device)
        return decode_attention(q[:, :, 0], k, v, idx, n_heads, mask.length, mask.key_valid, scale or hd ** -0.5)[:, None]
    if heads is not None:
        k, v = head_groups(k, v, heads, n_heads)
    if softcap:  # SDPA has no soft-cap: the scores in torch (Gemma 2), every device
        return softcap_attention(q, k, v, mask.dense, scale or hd ** -0.5, softcap)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=heads is None and m != k.shape[1],
                                       scale=scale)
    return y.transpose(1, 2)


def softcap_attention(q, k, v, mask, scale: float, cap: float) -> torch.Tensor:
    """Attention with soft-capped logits, cap * tanh(q.k * scale / cap), as Gemma 2 computes it:
    q [B, m, T, hd], k, v [B, kv, keys, hd] (kv divides m), mask [B, 1, T, keys] -> [B, T, m, hd]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / cap) * cap
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
    return (p @ v).transpose(1, 2)


def sparse_mlp(mlp, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """MLP output for the neurons idx only: the up side (rows, bias, activation) in one gather,
    then the down side over the same neurons."""
    return gather_axpy(gather_act(x, mlp.w_in, mlp.b_in, idx, mlp.cfg.act), mlp.w_out_t, idx, mlp.b_out)


def sparse_mlp_reference(mlp, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The same in plain torch (gathers the rows into temporaries)."""
    out = mlp.activations(x, idx) @ mlp.w_out_t[idx]
    return out + mlp.b_out if mlp.b_out is not None else out


@functools.cache
def _triton_topk():
    try:
        from . import triton_topk
        return triton_topk
    except Exception:
        return None


def topk_indices(scores: torch.Tensor, k: int, live: torch.Tensor | None = None) -> torch.Tensor:
    """One token's selection: scores [n] -> the indices of its k largest, as a set (int64 [k]).
    On CUDA, past one program's chunk (MLP neurons, not heads), three Triton kernels: 11 us where
    torch.topk's chain of small kernels takes 31 (OPT-30B's 28672 neurons, H200; triton_topk.py).
    scores [B, n]: each row's own top-k, ascending ([B, k]; a row's never depends on the others);
    with `live` [B], a free row (0) gets indices -1 (on CUDA without reading its scores)."""
    if scores.dim() == 2:
        if scores.is_cuda and _triton_topk() is not None:
            return _triton_topk().topk_indices(scores, k, live)
        idx = scores.topk(k, dim=-1, sorted=False).indices.sort(-1).values
        return idx if live is None else torch.where(live[:, None] != 0, idx, -1)
    if scores.is_cuda and _triton_topk() is not None and len(scores) > _triton_topk().CHUNK:
        return _triton_topk().topk_indices(scores, k)
    return scores.topk(k, sorted=False).indices


def argmax_finite(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [rows, V] -> (logits.argmax(-1), isfinite(logits).all(-1)): the greedy token and the
    guard's check of a decode step. On CUDA two Triton kernels for both (triton_topk.py)."""
    if logits.is_cuda and _triton_topk() is not None:
        return _triton_topk().argmax_finite(logits)
    return logits.argmax(-1), torch.isfinite(logits).all(-1)


@functools.cache
def norm_kernels():
    """The Triton norm for decode rows on CUDA (triton_norm.py), or None without triton."""
    try:
        from . import triton_norm as module
        return module
    except Exception:
        return None
