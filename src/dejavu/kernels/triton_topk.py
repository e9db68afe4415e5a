"""Top-k indices of one score row in one Triton program: the decode step's selection.

torch.topk on a 28672-wide row (OPT-30B's neurons, k = 10%) is a radix select of about eight
kernels; on the side stream that chain is what the MLP waits for (measured on the H200: replacing
it with a copy takes OPT-30B's sparse step from 6.53 to 5.90 ms). Here the whole row sits in one
program's registers: a 32-step bisection on the scores' order-preserving integer keys finds the
k-th largest key, then a prefix sum writes the indices above it and, for ties, the first ones at
it, so exactly k come out (ascending within each group, which also helps the gathers' locality).
A torch custom op (`dejavu::topk_indices`): CUDA-graph capturable, no host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .triton_gather import launcher

MAX_WIDTH = 65536  # registers: wider rows go to torch.topk


@triton.jit
def _topk_kernel(s_ptr, out_ptr, N, K, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    bits = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving: a negative float's magnitude bits flip
    key = tl.where(mask, key, -2147483648)    # padding: the smallest key
    lo = tl.full((), -2147483648, tl.int64)   # at least K keys >= lo
    hi = tl.full((), 2147483647, tl.int64)
    for _ in range(33):  # bisection: the largest t with at least K keys >= t, the K-th largest key
        mid = (lo + hi + 1) >> 1
        if tl.sum((key >= mid).to(tl.int32), axis=0) >= K:
            lo = mid
        else:
            hi = mid - 1
    above = key > lo
    at = key == lo
    n_above = tl.sum(above.to(tl.int32), axis=0)
    pos_above = tl.cumsum(above.to(tl.int32), axis=0) - 1
    pos_at = n_above + tl.cumsum(at.to(tl.int32), axis=0) - 1
    pos = tl.where(above, pos_above, pos_at)
    tl.store(out_ptr + pos, offs.to(tl.int64), mask=above | (at & (pos_at < K)))


@triton_op("dejavu::topk_indices", mutates_args=())
def _topk_indices_op(scores: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.empty(k, device=scores.device, dtype=torch.int64)  # graph pool under CUDA graphs
    block = triton.next_power_of_2(scores.numel())
    launcher(_topk_kernel)[(1,)](scores, out, scores.numel(), k, BLOCK=block,
                                 num_warps=max(1, min(32, block // 1024)))
    return out


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [n] (contiguous, n <= MAX_WIDTH), 1 <= k <= n -> the indices of the k largest [k]
    (int64, unordered between ties as torch.topk with sorted=False)."""
    assert scores.dim() == 1 and scores.is_contiguous() and 1 <= k <= scores.numel() <= MAX_WIDTH
    return torch.ops.dejavu.topk_indices(scores, k)
