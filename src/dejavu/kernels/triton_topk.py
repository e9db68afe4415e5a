"""Top-k indices of one score vector, or of each row of a batch on its own: the decode step's
selection, in 3 kernels (bf16/fp16; 5 for fp32). torch.topk on 28672 scores (OPT-30B's neurons) is a chain of ~8 small
kernels taking ~31 us; on the side stream that chain outlasts the layer's attention and sits on
the critical path (docs/perf-notes.md).

Radix select, 8 bits of an order-preserving key per pass, every pass spread over programs of
CHUNK scores. Pass p: each program rebuilds the key prefix that passes 0..p-1 fixed (from their
per-program histograms, a few KB), then stores the 256-bin histogram of digit p among its keys
that share that prefix. No atomics, nothing to reset between calls. The last kernel rebuilds the
threshold key T, keeps every key above T and as many equal to T as are still wanted (lowest
index first), and writes each kept index at its rank: the program's offset (kept keys in
programs before it, from the same histograms) plus a prefix sum within the program. So indices
come out in ascending order and the result is deterministic. Rows are the grid's second axis:
a row's indices never depend on the other rows."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gather import _wait_for_inputs, launcher

CHUNK = 1024


@triton.jit
def _keys(s_ptr, offs, valid, KEY_BITS: tl.constexpr):
    """Unsigned keys ordered as the scores: a negative float has every bit flipped, a positive one its sign."""
    if KEY_BITS == 16:
        bits = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        key = (bits ^ tl.where(bits >= 0x8000, 0xFFFF, 0x8000)).to(tl.uint32)
    else:
        bits = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.uint32, bitcast=True)
        key = bits ^ ((bits.to(tl.int32, bitcast=True) >> 31).to(tl.uint32, bitcast=True) | 0x80000000)
    return key


@triton.jit
def _threshold(hist_ptr, k, G, pid, PASSES: tl.constexpr, G_BLOCK: tl.constexpr):
    """From the histograms of passes 0..PASSES-1: the key prefix they fixed, how many keys with
    exactly that prefix are still wanted, and, in programs before pid, how many keys lie above the
    prefix and how many share it."""
    rows = tl.arange(0, G_BLOCK)[:, None]
    bins = tl.arange(0, 256)
    prefix = tl.program_id(0).to(tl.uint32) * 0
    want = k
    above_before = 0
    equal_before = 0
    for q in tl.static_range(PASSES):
        h = tl.load(hist_ptr + (q * G + rows) * 256 + bins[None, :], mask=rows < G, other=0)  # [G_BLOCK, 256]
        total = tl.sum(h, 0)
        digit = tl.max(tl.where(tl.cumsum(total, 0, reverse=True) >= want, bins, 0), 0)
        want -= tl.sum(tl.where(bins > digit, total, 0), 0)
        earlier = rows < pid
        above_before += tl.sum(tl.sum(tl.where(earlier & (bins[None, :] > digit), h, 0), 1), 0)
        equal_before = tl.sum(tl.sum(tl.where(earlier & (bins[None, :] == digit), h, 0), 1), 0)
        prefix = (prefix << 8) | digit.to(tl.uint32)
    return prefix, want, above_before, equal_before


@triton.jit
def _radix_pass_kernel(s_ptr, hist_ptr, live_ptr, n, k, G, stride_s, PASS: tl.constexpr, KEY_BITS: tl.constexpr,
                       CHUNK: tl.constexpr, G_BLOCK: tl.constexpr, HAS_LIVE: tl.constexpr):
    _wait_for_inputs()
    pid, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    s_ptr += row * stride_s
    hist_ptr += row * (KEY_BITS // 8) * G * 256
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    valid = offs < n
    if HAS_LIVE:  # a free row: no key read (its write kernel writes -1)
        valid = valid & (tl.load(live_ptr + row) != 0)
    key = _keys(s_ptr, offs, valid, KEY_BITS)
    match = valid
    if PASS > 0:
        prefix, _, _, _ = _threshold(hist_ptr, k, G, pid, PASS, G_BLOCK)
        match = valid & ((key >> (KEY_BITS - 8 * PASS)) == prefix)
    digit = ((key >> (KEY_BITS - 8 * (PASS + 1))) & 255).to(tl.int32)
    tl.store(hist_ptr + (PASS * G + pid) * 256 + tl.arange(0, 256), tl.histogram(digit, 256, mask=match))


@triton.jit
def _radix_write_kernel(s_ptr, hist_ptr, out_ptr, live_ptr, n, k, G, stride_s, KEY_BITS: tl.constexpr,
                        CHUNK: tl.constexpr, G_BLOCK: tl.constexpr, HAS_LIVE: tl.constexpr):
    _wait_for_inputs()
    pid, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    s_ptr += row * stride_s
    hist_ptr += row * (KEY_BITS // 8) * G * 256
    out_ptr += row * k
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    valid = offs < n
    live = True
    if HAS_LIVE:
        live = tl.load(live_ptr + row) != 0
    if live:
        key = _keys(s_ptr, offs, valid, KEY_BITS)
        t, want, above_before, equal_before = _threshold(hist_ptr, k, G, pid, KEY_BITS // 8, G_BLOCK)
        equal = valid & (key == t)
        keep = valid & ((key > t) | (equal & (equal_before + tl.cumsum(equal.to(tl.int32), 0) <= want)))
        pos = above_before + tl.minimum(equal_before, want) + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out_ptr + pos, offs.to(tl.int64), mask=keep)
    else:  # a free row's set: -1 throughout
        tl.store(out_ptr + offs, tl.full((CHUNK,), -1, tl.int64), mask=offs < k)


def topk_indices(scores: torch.Tensor, k: int, live: torch.Tensor | None = None) -> torch.Tensor:
    """scores [n], or [rows, n] each row on its own (on CUDA) -> int64 [k] / [rows, k]: the indices of
    the k largest, ascending. Ties at the threshold go to the lowest indices; -0.0 ranks below +0.0.
    `live` [rows] (nonzero: live): a free row's scores are not read and its indices are -1."""
    n = scores.shape[-1]
    assert scores.dim() in (1, 2) and 0 < k <= n, \
        f"topk_indices: 1-D or 2-D scores and 0 < k <= n, got {tuple(scores.shape)}, k={k}"
    one = scores.dim() == 1
    rows = 1 if one else scores.shape[0]
    scores = scores.reshape(rows, n)
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    key_bits = 16 if scores.dtype in (torch.bfloat16, torch.float16) else 32
    chunk = min(CHUNK, triton.next_power_of_2(n))
    G = triton.cdiv(n, chunk)
    hist = torch.empty(rows, key_bits // 8, G, 256, device=scores.device, dtype=torch.int32)
    out = torch.empty(rows, k, device=scores.device, dtype=torch.int64)
    common = dict(KEY_BITS=key_bits, CHUNK=chunk, G_BLOCK=triton.next_power_of_2(G), HAS_LIVE=live is not None,
                  num_warps=4)
    live = live if live is not None else out
    for p in range(key_bits // 8):
        launcher(_radix_pass_kernel)[(G, rows)](scores, hist, live, n, k, G, scores.stride(0), PASS=p, **common)
    launcher(_radix_write_kernel)[(G, rows)](scores, hist, out, live, n, k, G, scores.stride(0), **common)
    return out[0] if one else out


ARGMAX_CHUNK = 4096


@triton.jit
def _argmax_chunk_kernel(x_ptr, val_ptr, idx_ptr, bad_ptr, n, G, stride_x, CHUNK: tl.constexpr):
    _wait_for_inputs()
    # program (chunk, row): the chunk's largest value and its first index, a NaN counting as the
    # largest (torch.argmax's rule: the first NaN wins), and whether any value is inf or NaN
    pid, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < n, other=float("-inf")).to(tl.float32)
    nan = x != x
    score = tl.where(nan, float("inf"), x)
    best = tl.max(score, 0)
    first = tl.min(tl.where(score == best, offs, n), 0)
    first_nan = tl.min(tl.where(nan, offs, n), 0)
    out = row * G + pid
    tl.store(val_ptr + out, tl.where(first_nan < n, float("nan"), best))
    tl.store(idx_ptr + out, tl.where(first_nan < n, first_nan, first))
    tl.store(bad_ptr + out, tl.max(((tl.abs(score) == float("inf")) & (offs < n)).to(tl.int32), 0))


@triton.jit
def _argmax_rows_kernel(val_ptr, idx_ptr, bad_ptr, token_ptr, finite_ptr, n, G, G_BLOCK: tl.constexpr):
    _wait_for_inputs()
    # program (row): the chunks' winners combined by the same rule
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_BLOCK)
    val = tl.load(val_ptr + row * G + g, mask=g < G, other=float("-inf"))
    idx = tl.load(idx_ptr + row * G + g, mask=g < G, other=n)
    nan = val != val
    score = tl.where(nan, float("inf"), val)
    best = tl.max(score, 0)
    token = tl.where(tl.max(nan.to(tl.int32), 0) > 0, tl.min(tl.where(nan, idx, n), 0),
                     tl.min(tl.where(score == best, idx, n), 0))
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(finite_ptr + row, tl.max(tl.load(bad_ptr + row * G + g, mask=g < G, other=0), 0) == 0)


def argmax_finite(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, n] -> (each row's argmax, int64 [rows], torch.argmax's answer: the first largest, a
    NaN the largest; whether each row is all finite, bool [rows]). Two kernels where torch runs two
    single-row reductions of ~22 us each on a 128k vocabulary (H200)."""
    rows, n = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    G = triton.cdiv(n, ARGMAX_CHUNK)
    val = torch.empty(rows, G, device=x.device, dtype=torch.float32)
    idx = torch.empty(rows, G, device=x.device, dtype=torch.int32)
    bad = torch.empty(rows, G, device=x.device, dtype=torch.int32)
    token = torch.empty(rows, device=x.device, dtype=torch.int64)
    finite = torch.empty(rows, device=x.device, dtype=torch.bool)
    launcher(_argmax_chunk_kernel)[(G, rows)](x, val, idx, bad, n, G, x.stride(0), CHUNK=ARGMAX_CHUNK, num_warps=8)
    launcher(_argmax_rows_kernel)[(rows,)](val, idx, bad, token, finite, n, G, G_BLOCK=triton.next_power_of_2(G),
                                           num_warps=1)
    return token, finite
