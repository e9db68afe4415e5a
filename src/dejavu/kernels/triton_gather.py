"""Triton kernels for gathered decode on the GPU, each beside its torch reference.

gather_matvec  out[b, j] = W[idx[j]] . x[b]        selected rows of w_in (gate/up/fc1) or wq
gather_axpy    out[b]   = sum_j a[b, j] W[idx[j]]  selected rows of w_out_t / wo_t (transposed
                                                   layouts: a neuron's or head's slice is a row)
Only the selected rows are read, straight from the weight (no gathered temporary). Both use
tl.dot over a batch padded to 16 (batch 1-32 share the loaded weight tile); fp32 accumulation;
deterministic (no atomics: gather_axpy sums per-program fp32 partials in a fixed order).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_matvec_kernel(x_ptr, w_ptr, idx_ptr, out_ptr, B, M, K, stride_w, stride_x, stride_o,
                          BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = tl.load(idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_ptr + rows[:, None] * stride_w + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        xt = tl.load(x_ptr + offs_b[None, :] * stride_x + offs_k[:, None], mask=k_mask[:, None] & b_mask[None, :],
                     other=0.0)
        acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    tl.store(out_ptr + offs_b[None, :] * stride_o + offs_m[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & b_mask[None, :])


@triton.jit
def _gather_axpy_kernel(a_ptr, w_ptr, idx_ptr, out_ptr, B, M, N, rows_per_split, stride_a, stride_w, stride_s,
                        stride_o, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr):
    # program (column block, split): its share of the selected rows, into its own fp32 partial
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    start = pid_s * rows_per_split
    for m0 in range(start, start + rows_per_split, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = (offs_m < M) & (offs_m < start + rows_per_split)
        rows = tl.load(idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        a = tl.load(a_ptr + offs_b[:, None] * stride_a + offs_m[None, :], mask=b_mask[:, None] & m_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + rows[:, None] * stride_w + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                    other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    tl.store(out_ptr + pid_s * stride_s + offs_b[:, None] * stride_o + offs_n[None, :], acc,
             mask=b_mask[:, None] & n_mask[None, :])


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"  # fp32 stays exact fp32 (tests compare modes)


def _block_b(B: int) -> int:
    if B > 32:
        raise ValueError(f"gathered GPU kernels take batches up to 32, got {B}")
    return max(16, triton.next_power_of_2(B))


def gather_matvec(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, block_m: int = 64,
                  block_k: int = 128) -> torch.Tensor:
    """x [..., d], w [N, d] (rows may be strided, columns contiguous), idx [m] -> [..., m]."""
    assert w.stride(1) == 1, "weight rows must be contiguous"
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    B, K = x2.shape
    M = idx.numel()
    out = torch.empty(B, M, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, block_m),)
    _gather_matvec_kernel[grid](x2, w, idx, out, B, M, K, w.stride(0), x2.stride(0), out.stride(0),
                                BLOCK_B=_block_b(B), BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=_precision(x2))
    return out.view(*x.shape[:-1], M)


def gather_axpy(a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, block_m: int = 64,
                block_n: int = 128) -> torch.Tensor:
    """a [..., m], w [N, d] (rows may be strided), idx [m] -> [..., d] = a @ w[idx].
    The selected rows are split across programs too (d / block_n column blocks alone are too
    few to fill the GPU); the fp32 partials are summed in a fixed order: deterministic."""
    assert w.stride(1) == 1, "weight rows must be contiguous"
    a2 = a.reshape(-1, a.shape[-1]).contiguous()
    B, M = a2.shape
    N = w.shape[1]
    col_blocks = triton.cdiv(N, block_n)
    target = 4 * _sm_count(a.device.index or 0)
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(target, col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty(splits, B, N, device=a.device, dtype=torch.float32)
    _gather_axpy_kernel[(col_blocks, splits)](a2, w, idx, partial, B, M, N, rows_per_split, a2.stride(0),
                                               w.stride(0), partial.stride(0), partial.stride(1),
                                               BLOCK_B=_block_b(B), BLOCK_M=block_m, BLOCK_N=block_n,
                                               PRECISION=_precision(a2))
    return partial.sum(0).to(a.dtype).view(*a.shape[:-1], N)


def gather_matvec_reference(x, w, idx):
    return (x.float() @ w[idx].float().T).to(x.dtype)


def gather_axpy_reference(a, w, idx):
    return (a.float() @ w[idx].float()).to(a.dtype)
