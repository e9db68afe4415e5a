"""Decode attention (one query token) for the selected query heads only, in Triton (its fp32 torch
reference: reference.py).

Flash-decoding: the valid keys 0..length-1 are cut into n_splits chunks; program (b, head, split)
reads its chunk of the head's K/V group once and writes its fp32 running max, sum and unnormalised
output; a second kernel combines the splits (with one split, the split kernel writes the output
itself). `length` is a device tensor read by the kernels, and
the chunk size follows it, so the grid is static (sized for the cache, S) and one CUDA graph serves
every step: splits past the end run no iterations. Only the selected heads' groups are read
(query head h reads KV group h // (n_heads / n_kv_heads)); with head_idx = arange(n_heads) it is
dense GQA/MHA decode attention. Padding slots (key_valid False) are skipped; the query's own slot
(length - 1) always counts, as in Transformer.attention_mask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .triton_gather import _wait_for_inputs, launcher, sm_count


@triton.jit
def _roped(row_ptr, offs, d_mask, cos_ptr, sin_ptr, ROPE: tl.constexpr, HD: tl.constexpr):
    """One head's HD values from row_ptr in fp32, with RoPE: x cos + rotate_half(x) sin."""
    y = tl.load(row_ptr + offs, mask=d_mask, other=0.0).to(tl.float32)
    if ROPE:
        rot = tl.load(row_ptr + (offs + HD // 2) % HD, mask=d_mask, other=0.0).to(tl.float32)
        rot = tl.where(offs < HD // 2, -rot, rot)
        y = y * tl.load(cos_ptr + offs, mask=d_mask, other=0.0).to(tl.float32) \
            + rot * tl.load(sin_ptr + offs, mask=d_mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _keys(k_ptr, v_ptr, valid_ptr, offs_s, end, length, offs_d, d_mask, stride_ks, stride_vs):
    """One tile of keys: (K, V, valid) of slots offs_s below end; valid: not padding, or the query's
    own slot. K and V loads wait only for the range, not for key_valid: the three go out together."""
    in_range = offs_s < end
    valid = in_range & ((tl.load(valid_ptr + offs_s, mask=in_range, other=0) != 0) | (offs_s == length - 1))
    kv_mask = in_range[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + offs_s[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + offs_s[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v, valid


@triton.jit
def _attend_tile(q, k, v, valid, m_i, l_i, acc):
    """Online softmax over one tile of keys -> (m, l, acc). A padding slot's V counts for nothing,
    even a NaN."""
    s = tl.where(valid, tl.sum(k.to(tl.float32) * q[None, :], 1), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a chunk of padding only: no NaN
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe)
    v = tl.where(valid[:, None], v, 0.0)
    return m_new, l_i * alpha + tl.sum(p, 0), acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, head_ptr, len_ptr, valid_ptr, m_ptr, l_ptr, o_ptr, out_ptr, cos_ptr,
                         sin_ptr, pos_ptr, M, KV, group, scale, n_splits, stride_len, stride_head, stride_qb, stride_qh,
                         stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_valid, stride_cos,
                         stride_pos, NEW_TOKEN: tl.constexpr, ROPE: tl.constexpr, FINAL: tl.constexpr,
                         HD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # With NEW_TOKEN only the token's projection comes from the kernel before: the cache (this
    # token's slot aside), lengths, positions and RoPE tables were written by kernels that finished
    # before that one started. So the first tile of keys is loaded before waiting for it (a
    # dependent launch runs this while the projection drains)
    if not NEW_TOKEN:
        _wait_for_inputs()
    pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // M, pid_bh % M
    head = tl.maximum(tl.load(head_ptr + b * stride_head + h), 0)  # a free row's -1: head 0
    kv = (head // group).to(tl.int64)
    length = tl.load(len_ptr + b * stride_len)
    chunk = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_S) * BLOCK_S
    start = pid_s * chunk
    end = tl.minimum(start + chunk, length)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HD
    k_ptr += b.to(tl.int64) * stride_kb + kv * stride_kh
    v_ptr += b.to(tl.int64) * stride_vb + kv * stride_vh
    valid_ptr += b * stride_valid
    offs_s = start + tl.arange(0, BLOCK_S)
    k, v, valid = _keys(k_ptr, v_ptr, valid_ptr, offs_s, end, length, offs_d, d_mask, stride_ks, stride_vs)
    if NEW_TOKEN:
        # q_ptr: the token's projection [B, (M + 2 KV) * HD], every head. RoPE on its Q and K here;
        # its K and V stand in for the cache's slot `at`, and the group's first head writes them
        # there (no other program reads that slot from memory in this step)
        at = tl.load(pos_ptr + b * stride_pos)
        _wait_for_inputs()
        row = q_ptr + b.to(tl.int64) * stride_qb
        cos, sin = cos_ptr + b * stride_cos, sin_ptr + b * stride_cos
        q = _roped(row + head * HD, offs_d, d_mask, cos, sin, ROPE, HD).to(q_ptr.dtype.element_ty)
        k_new = _roped(row + (M + kv) * HD, offs_d, d_mask, cos, sin, ROPE, HD).to(k_ptr.dtype.element_ty)
        v_new = tl.load(row + (M + KV + kv) * HD + offs_d, mask=d_mask, other=0.0).to(v_ptr.dtype.element_ty)
        if (head % group == 0) & (pid_s == 0):
            tl.store(k_ptr + at * stride_ks + offs_d, k_new, mask=d_mask)
            tl.store(v_ptr + at * stride_vs + offs_d, v_new, mask=d_mask)
        k = tl.where((offs_s == at)[:, None], k_new[None, :], k)
        v = tl.where((offs_s == at)[:, None], v_new[None, :], v)
    else:
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0)
    q = (q.to(tl.float32) * scale).to(tl.float32)  # under torch.compile `scale` arrives as fp64: keep fp32
    m_i = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), 0)  # fp32 scalars for the loop
    l_i = tl.sum(tl.zeros((BLOCK_S,), tl.float32), 0)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc)  # the first tile, loaded above
    for s0 in range(start + BLOCK_S, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        k, v, valid = _keys(k_ptr, v_ptr, valid_ptr, offs_s, end, length, offs_d, d_mask, stride_ks, stride_vs)
        if NEW_TOKEN:
            k = tl.where((offs_s == at)[:, None], k_new[None, :], k)
            v = tl.where((offs_s == at)[:, None], v_new[None, :], v)
        m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc)
    if FINAL:  # one split: the output itself (bitwise what the combine kernel gives for one split)
        tl.store(out_ptr + pid_bh * HD + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty), mask=d_mask)
        return
    part = pid_bh * n_splits + pid_s
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    tl.store(o_ptr + part * HD + offs_d, acc, mask=d_mask)


@triton.jit
def _decode_reduce_kernel(m_ptr, l_ptr, o_ptr, out_ptr, n_splits, HD: tl.constexpr,
                          BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    _wait_for_inputs()
    pid = tl.program_id(0)  # b * heads + head
    offs_s = tl.arange(0, BLOCK_SPLITS)
    s_mask = offs_s < n_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HD
    part = pid * n_splits + offs_s
    m = tl.load(m_ptr + part, mask=s_mask, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=s_mask, other=0.0)
    o = tl.load(o_ptr + part[:, None] * HD + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    w = tl.exp(m - tl.max(m, 0))  # the max is finite: the query's own slot is always valid
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + pid * HD + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _n_splits(B: int, heads: int, S: int, block_s: int, device_sms: int) -> int:
    """Enough (batch, head, split) programs to fill the GPU about twice, from the static sizes only."""
    return max(1, min(triton.cdiv(S, block_s), triton.cdiv(2 * device_sms, B * heads), 64))


def _attend(q, k_cache, v_cache, head_idx, n_heads, length, key_valid, scale, n_splits, block_s, new_token=None):
    """The split and combine kernels. new_token (cos, sin, pos): q is the token's raw
    projection [B, (n_heads + 2 kv_heads) * hd], roped and written into the cache by the split kernel."""
    B, KV, S, hd = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    M = head_idx.shape[-1]
    per_row = head_idx.dim() == 2  # serving: split as for one row, so that a lone live row runs as fast as alone
    n_splits = n_splits or _n_splits(1 if per_row else B, M, S, block_s, sm_count(q))
    # fp32 partials and the output: allocated here, from the graph's pool under CUDA graphs
    m = torch.empty(B * M * n_splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    o = torch.empty(B * M * n_splits, hd, device=q.device, dtype=torch.float32)
    out = torch.empty(B, M, hd, device=q.device, dtype=q.dtype)
    block_d = triton.next_power_of_2(hd)
    cos, sin, pos = new_token or (None, None, None)
    launcher(_decode_split_kernel)[(B * M, n_splits)](
        q, k_cache, v_cache, head_idx, length, key_valid, m, l, o, out, cos if cos is not None else q,
        sin if sin is not None else q, pos if pos is not None else length, M, KV, n_heads // KV, scale, n_splits,
        1 if length.numel() > 1 else 0, head_idx.stride(0) if per_row else 0, q.stride(0),
        q.stride(1) if q.dim() == 3 else hd, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), key_valid.stride(0),
        cos.stride(0) if cos is not None else 0, 1 if pos is not None and pos.numel() > 1 else 0,
        NEW_TOKEN=new_token is not None, ROPE=cos is not None, FINAL=n_splits == 1, HD=hd,
        BLOCK_S=block_s, BLOCK_D=block_d, num_stages=2)  # inductor's default stages overflow shared memory
    if n_splits > 1:
        launcher(_decode_reduce_kernel)[(B * M,)](m, l, o, out, n_splits, HD=hd,
                                                  BLOCK_SPLITS=triton.next_power_of_2(n_splits), BLOCK_D=block_d)
    return out


@triton_op("dejavu::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, head_idx: torch.Tensor,
                         n_heads: int, length: torch.Tensor, key_valid: torch.Tensor, scale: float,
                         n_splits: int = 0, block_s: int = 64) -> torch.Tensor:
    return _attend(q.contiguous(), k_cache, v_cache, head_idx, n_heads, length, key_valid, scale, n_splits, block_s)


@triton_op("dejavu::rope_cache_attention", mutates_args=("kv",))
def _rope_cache_attention_op(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                             pos: torch.Tensor, kv: torch.Tensor, heads: torch.Tensor, length: torch.Tensor,
                             key_valid: torch.Tensor, scale: float) -> torch.Tensor:
    return _attend(qkv, kv[0], kv[1], heads, heads.shape[-1], length, key_valid, scale, 0, 64, (cos, sin, pos))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, head_idx: torch.Tensor,
                     n_heads: int, length: torch.Tensor, key_valid: torch.Tensor, scale: float,
                     n_splits: int = 0, block_s: int = 64) -> torch.Tensor:
    """q [B, m, hd] (the selected heads' queries), k_cache / v_cache [B, n_kv_heads, S, hd] (one
    layer of the static cache), head_idx [m] query head ids (or [B, m], a set per row; a negative
    id, a free serving row's, reads head 0), length: int64 device tensor, 0-dim or
    one per row [B] (keys 0..length-1, length >= 1), key_valid [B, S] bool -> [B, m, hd]. n_splits
    0: chosen from the static sizes."""
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "K/V cache rows must be contiguous"
    assert n_heads % k_cache.shape[1] == 0, "n_heads must be a multiple of the KV heads"
    assert key_valid.dtype == torch.bool and length.numel() in (1, q.shape[0])
    return torch.ops.dejavu.decode_attention(q, k_cache, v_cache, head_idx, n_heads, length, key_valid, scale,
                                             n_splits, block_s)


@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kv_ptr, slot, stride_pos, H, KV, stride_qkv, stride_cos,
                       stride_q, stride_kv_r, stride_kv_b, stride_kv_h, stride_kv_s, SLOT_ON_DEVICE: tl.constexpr,
                       ROPE: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr):
    _wait_for_inputs()
    # program (b, head of Q, K or V): RoPE on Q and K (x cos + rotate_half(x) sin, fp32), then Q to
    # q and K, V into their cache slot
    b, head = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    d_mask = offs < HD
    row = qkv_ptr + b.to(tl.int64) * stride_qkv + head * HD
    if head < H + KV:
        y = _roped(row, offs, d_mask, cos_ptr + b * stride_cos, sin_ptr + b * stride_cos, ROPE, HD)
    else:
        y = tl.load(row + offs, mask=d_mask, other=0.0).to(tl.float32)
    if head < H:
        tl.store(q_ptr + b.to(tl.int64) * stride_q + head * HD + offs, y.to(q_ptr.dtype.element_ty), mask=d_mask)
    else:
        if SLOT_ON_DEVICE:
            at = tl.load(pos_ptr + b * stride_pos)
        else:
            at = slot
        part = (head - H) // KV  # 0: K, 1: V
        dest = kv_ptr + part * stride_kv_r + b.to(tl.int64) * stride_kv_b + ((head - H) % KV) * stride_kv_h \
            + at * stride_kv_s
        tl.store(dest + offs, y.to(kv_ptr.dtype.element_ty), mask=d_mask)


@triton_op("dejavu::rope_cache", mutates_args=("kv",))
def _rope_cache_op(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, pos: torch.Tensor | None,
                   slot: int, kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, hd, KV = qkv.shape[0], kv.shape[-1], kv.shape[2]
    q = torch.empty(B, n_heads * hd, device=qkv.device, dtype=qkv.dtype)  # graph pool under CUDA graphs
    launcher(_rope_cache_kernel)[(B, n_heads + 2 * KV)](
        qkv, cos if cos is not None else qkv, sin if sin is not None else qkv, pos if pos is not None else qkv, q, kv,
        slot, 1 if pos is not None and pos.numel() > 1 else 0, n_heads, KV, qkv.stride(0), cos.stride(0) if cos is not None else 0, q.stride(0), kv.stride(0),
        kv.stride(1), kv.stride(2), kv.stride(3), SLOT_ON_DEVICE=pos is not None, ROPE=cos is not None, HD=hd,
        BLOCK_D=triton.next_power_of_2(hd))
    return q


def rope_cache(qkv: torch.Tensor, rope, pos, kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """One decode token per row: qkv [B, (n_heads + 2 kv_heads) * hd] (Q, K, V heads in a row),
    rope (cos, sin) [B, 1, 1, hd] or None, pos the cache slot (an int, or a device tensor: one slot, or
    one per row),
    kv [2, B, kv_heads, S, hd] (one layer's K and V) -> q [B, n_heads * hd] with RoPE; K (with RoPE)
    and V written into their slot. One kernel where the eager step runs about a dozen."""
    assert qkv.stride(-1) == 1 and kv.stride(-1) == 1
    cos, sin = rope if rope is not None else (None, None)
    if cos is not None:
        cos, sin = cos.reshape(qkv.shape[0], -1), sin.reshape(qkv.shape[0], -1)
    device_pos = pos.reshape(-1) if isinstance(pos, torch.Tensor) else None
    return torch.ops.dejavu.rope_cache(qkv, cos, sin, device_pos, 0 if device_pos is not None else int(pos), kv,
                                       n_heads)


def rope_cache_attention(qkv: torch.Tensor, rope, pos: torch.Tensor, kv: torch.Tensor, heads: torch.Tensor,
                         length: torch.Tensor, key_valid: torch.Tensor, scale: float) -> torch.Tensor:
    """rope_cache, then decode_attention over every head (heads = arange(n_heads)), in the
    attention's two kernels: the split kernel ropes the token's Q and K from qkv itself, uses its
    K and V from there and writes them into the cache slot pos. Same arguments as those two (pos a
    device tensor) -> [B, n_heads, hd], bitwise what they give."""
    assert qkv.stride(-1) == 1 and kv.stride(-1) == 1 and heads.dim() == 1
    assert key_valid.dtype == torch.bool and length.numel() in (1, qkv.shape[0])
    cos, sin = rope if rope is not None else (None, None)
    if cos is not None:
        cos, sin = cos.reshape(qkv.shape[0], -1), sin.reshape(qkv.shape[0], -1)
    return torch.ops.dejavu.rope_cache_attention(qkv, cos, sin, pos.reshape(-1), kv, heads, length, key_valid, scale)
