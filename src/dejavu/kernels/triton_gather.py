"""Triton kernels for gathered decode on the GPU, each beside its torch reference (fp32).

gather_matvec  out[b, j] = W[idx[j]] . x[b]        selected rows of wq (or any row-major weight)
gather_act     out[b, j] = act(gate_j . x[b]) * (up_j . x[b])   or  act(fc1_j . x[b] + bias_j)
                                                   the MLP up side: a neuron's n_in adjacent rows
                                                   of w_in [d_ff, n_in, d] in one pass, fused
gather_axpy    out[b]   = sum_j a[b, j] W[idx[j]]  selected rows of w_out_t / wo_t (transposed
                                                   layouts: a neuron's or head's slice is a row)
Only the selected rows are read, straight from the weight (no gathered temporary). All use
tl.dot over a batch padded to 16 (batch 1-32 share the loaded weight tile); fp32 accumulation;
deterministic (no atomics: gather_axpy sums per-program fp32 partials in a fixed order).

Each kernel is a torch custom op (torch.library.triton_op, namespace `dejavu`), so torch.compile
traces through it and CUDA graphs capture it: no host synchronisation, indices stay on the
device, output shapes depend only on input shapes. Outputs (and gather_axpy's partials) are
allocated inside the op: under a CUDA graph they come from the graph's private pool, so the
addresses are the same on every replay. The plain functions below are the engine's API.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import ACTIVATIONS, unit_rows

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter, for checking without a GPU


class _Interpreted:
    """Launcher for an interpreted kernel (TRITON_INTERPRET=1, CPU tensors). torch.compile can't
    trace the interpreter, so launches on fake tensors (shape propagation) are skipped."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if not any(isinstance(a, torch.Tensor) and torch._subclasses.fake_tensor.is_fake(a) for a in args):
                self.kernel[grid](*args, **kwargs)
        return launch


def launcher(kernel):
    return _Interpreted(kernel) if INTERPRET else wrap_triton(kernel)


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    return _sm_count(t.device.index or 0) if t.is_cuda else 4  # CPU: the interpreter


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"  # fp32 stays exact fp32 (tests compare modes)


def _block_b(B: int) -> int:
    if B > 32:
        raise ValueError(f"gathered GPU kernels take batches up to 32, got {B}")
    return max(16, triton.next_power_of_2(B))


@triton.jit
def _rows(idx_ptr, offs_m, m_mask, UNIT: tl.constexpr):
    """Weight rows of the output positions offs_m: unit idx[j // UNIT] owns rows UNIT*idx .. +UNIT-1
    (a head's head_dim rows), so callers pass head indices, not expanded rows."""
    units = tl.load(idx_ptr + offs_m // UNIT, mask=m_mask, other=0).to(tl.int64)
    return units * UNIT + offs_m % UNIT


@triton.jit
def _rows_dot_x(w_ptr, b_ptr, rows, m_mask, stride_w, x_ptr, x_offs, b_mask, K, HAS_BIAS: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc[m, b] = w[rows[m]] . x[b] (+ bias[rows[m]]) in fp32; x_offs [BLOCK_B]: where each x row starts."""
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_ptr + rows[:, None] * stride_w + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        xt = tl.load(x_ptr + x_offs[None, :] + offs_k[:, None], mask=k_mask[:, None] & b_mask[None, :], other=0.0)
        acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=m_mask, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _gather_matvec_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, out_ptr, B, M, K, stride_w, stride_x, stride_o,
                          UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = _rows(idx_ptr, offs_m, m_mask, UNIT)
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    acc = _rows_dot_x(w_ptr, b_ptr, rows, m_mask, stride_w, x_ptr, offs_b * stride_x, b_mask, K, HAS_BIAS, BLOCK_B,
                      BLOCK_M, BLOCK_K, PRECISION)
    tl.store(out_ptr + offs_b[None, :] * stride_o + offs_m[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & b_mask[None, :])


@triton.jit
def _qkv_lazy_kernel(x_ptr, win_ptr, w_ptr, b_ptr, idx_ptr, q_ptr, kv_ptr, B, M, MQ, K, N_Q_HEADS, KV_HEADS,
                     stride_x, stride_w, stride_kv_r, stride_kv_h, stride_kv_s, UNIT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr):
    # as _gather_matvec_kernel, over the cache rows of the window's slots; the epilogue writes the Q
    # units' last row to q and the K/V units' rows into their cache slots (no index_copy after)
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    units = tl.load(idx_ptr + offs_m // UNIT, mask=m_mask, other=0).to(tl.int64)
    rows = units * UNIT + offs_m % UNIT
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    slots = tl.load(win_ptr + offs_b, mask=b_mask, other=0).to(tl.int64)
    acc = _rows_dot_x(w_ptr, b_ptr, rows, m_mask, stride_w, x_ptr, slots * stride_x, b_mask, K, HAS_BIAS, BLOCK_B,
                      BLOCK_M, BLOCK_K, PRECISION)
    out = acc.to(q_ptr.dtype.element_ty)
    is_q = offs_m < MQ
    tl.store(q_ptr + offs_m[:, None] + offs_b[None, :] * 0, out,
             mask=(m_mask & is_q)[:, None] & (offs_b == B - 1)[None, :])  # the current token: the last slot
    kv_unit = tl.maximum(units - N_Q_HEADS, 0)
    dest = (kv_unit // KV_HEADS) * stride_kv_r + (kv_unit % KV_HEADS) * stride_kv_h + offs_m % UNIT
    tl.store(kv_ptr + dest[:, None] + slots[None, :] * stride_kv_s, out,
             mask=(m_mask & ~is_q)[:, None] & b_mask[None, :])


@triton.jit
def _gather_act_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, out_ptr, B, M, K, stride_wn, stride_wi, stride_bn, stride_bi,
                       stride_x, stride_o, N_IN: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # as _gather_matvec_kernel, with a second accumulator for the up rows (adjacent to the gate rows)
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = tl.load(idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    gate = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_ptr + offs_b[None, :] * stride_x + offs_k[:, None], mask=k_mask[:, None] & b_mask[None, :],
                     other=0.0)
        w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :]
        w_mask = m_mask[:, None] & k_mask[None, :]
        gate = tl.dot(tl.load(w_ptrs, mask=w_mask, other=0.0), xt, gate, input_precision=PRECISION)
        if N_IN == 2:
            up = tl.dot(tl.load(w_ptrs + stride_wi, mask=w_mask, other=0.0), xt, up, input_precision=PRECISION)
    if HAS_BIAS:
        gate += tl.load(b_ptr + rows * stride_bn, mask=m_mask, other=0.0).to(tl.float32)[:, None]
        if N_IN == 2:
            up += tl.load(b_ptr + rows * stride_bn + stride_bi, mask=m_mask, other=0.0).to(tl.float32)[:, None]
    if ACT == "silu":
        a = gate * tl.sigmoid(gate)
    elif ACT == "gelu_tanh":  # 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3)
        a = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
    else:
        a = tl.maximum(gate, 0.0)
    if N_IN == 2:
        a = a * up
    tl.store(out_ptr + offs_b[None, :] * stride_o + offs_m[:, None], a.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & b_mask[None, :])


@triton.jit
def _gather_axpy_kernel(a_ptr, w_ptr, idx_ptr, out_ptr, B, M, N, rows_per_split, stride_a, stride_w, stride_s,
                        stride_o, UNIT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
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
        rows = _rows(idx_ptr, offs_m, m_mask, UNIT)
        a = tl.load(a_ptr + offs_b[:, None] * stride_a + offs_m[None, :], mask=b_mask[:, None] & m_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + rows[:, None] * stride_w + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                    other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    tl.store(out_ptr + pid_s * stride_s + offs_b[:, None] * stride_o + offs_n[None, :], acc,
             mask=b_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, b_ptr, out_ptr, S, N, stride_s, stride_p, stride_o, HAS_BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    # out[b] = sum over splits (in order: deterministic) + bias, cast: one kernel instead of three
    pid_b, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + s * stride_s + pid_b * stride_p + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_b * stride_o + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def _tile(M: int, x: torch.Tensor, block_m: int, block_k: int, B: int = 0) -> tuple[int, int]:
    """Rows per program and columns per step: 64 x 128, or fewer rows when that leaves SMs idle
    (a decode step's gathers have a few thousand rows: 64 per program gives ~50 programs for 132
    SMs), with longer steps so that each program keeps as many bytes in flight; the x tile caps
    the step (fp32 or a batch of 32: shared memory)."""
    if not block_m:
        block_m = next((bm for bm in (64, 32) if triton.cdiv(M, bm) >= sm_count(x)), 16)
    x_cap = 32768 // (x.element_size() * _block_b(B or x.shape[0]))
    return block_m, block_k or max(128, min(8192 // block_m, x_cap))


@triton_op("dejavu::gather_matvec", mutates_args=())
def _gather_matvec_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor, unit: int,
                      block_m: int, block_k: int) -> torch.Tensor:
    x = x.contiguous()
    (B, K), M = x.shape, idx.numel() * unit
    out = torch.empty(B, M, device=x.device, dtype=x.dtype)  # graph pool under CUDA graphs
    block_m, block_k = _tile(M, x, block_m, block_k)
    launcher(_gather_matvec_kernel)[(triton.cdiv(M, block_m),)](
        x, w, bias if bias is not None else x, idx, out, B, M, K, w.stride(0), x.stride(0), out.stride(0),
        UNIT=unit, HAS_BIAS=bias is not None, BLOCK_B=_block_b(B), BLOCK_M=block_m, BLOCK_K=block_k,
        PRECISION=_precision(x))
    return out


@triton_op("dejavu::gather_qkv_lazily", mutates_args=("kv",))
def _gather_qkv_lazily_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, units: torch.Tensor, n_q: int,
                          n_q_heads: int, window: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    (_, K), hd = x.shape, kv.shape[-1]
    B, M = window.numel(), units.numel() * hd
    q = torch.empty(1, n_q * hd, device=x.device, dtype=x.dtype)  # graph pool under CUDA graphs
    block_m, block_k = _tile(M, x, 0, 0, B)
    launcher(_qkv_lazy_kernel)[(triton.cdiv(M, block_m),)](
        x, window, w, bias if bias is not None else x, units, q, kv, B, M, n_q * hd, K, n_q_heads, kv.shape[1],
        x.stride(0), w.stride(0), kv.stride(0), kv.stride(1), kv.stride(2), UNIT=hd, HAS_BIAS=bias is not None,
        BLOCK_B=_block_b(B), BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=_precision(x))
    return q


@triton_op("dejavu::gather_act", mutates_args=())
def _gather_act_op(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, idx: torch.Tensor, act: str,
                   block_m: int, block_k: int) -> torch.Tensor:
    x = x.contiguous()
    (B, K), M = x.shape, idx.numel()
    out = torch.empty(B, M, device=x.device, dtype=x.dtype)  # graph pool under CUDA graphs
    bias = b_in if b_in is not None else x  # a placeholder pointer, never read
    block_m, block_k = _tile(M, x, block_m, block_k)
    launcher(_gather_act_kernel)[(triton.cdiv(M, block_m),)](
        x, w_in, bias, idx, out, B, M, K, w_in.stride(0), w_in.stride(1), bias.stride(0), bias.stride(-1),
        x.stride(0), out.stride(0), N_IN=w_in.shape[1], ACT=act, HAS_BIAS=b_in is not None,
        BLOCK_B=_block_b(B), BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=_precision(x))
    return out


@triton_op("dejavu::gather_axpy", mutates_args=())
def _gather_axpy_op(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor, unit: int,
                    block_m: int, block_n: int) -> torch.Tensor:
    a = a.contiguous()
    (B, M), N = a.shape, w.shape[1]
    col_blocks = triton.cdiv(N, block_n)
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(4 * sm_count(a), col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty(splits, B, N, device=a.device, dtype=torch.float32)  # graph pool under CUDA graphs
    launcher(_gather_axpy_kernel)[(col_blocks, splits)](
        a, w, idx, partial, B, M, N, rows_per_split, a.stride(0), w.stride(0), partial.stride(0), partial.stride(1),
        UNIT=unit, BLOCK_B=_block_b(B), BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(a))
    out = torch.empty(B, N, device=a.device, dtype=a.dtype)
    launcher(_sum_splits_kernel)[(B, triton.cdiv(N, 1024))](
        partial, bias if bias is not None else partial, out, splits, N, partial.stride(0), partial.stride(1),
        out.stride(0), HAS_BIAS=bias is not None, BLOCK_N=1024)
    return out


def gather_matvec(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None = None,
                  unit: int = 1, block_m: int = 0, block_k: int = 0) -> torch.Tensor:
    """x [..., d], w [N, d] (rows may be strided, columns contiguous), idx [m] -> [..., m * unit]
    = x @ w[rows].T (+ bias[rows]), rows = the `unit` rows of each index (a head's head_dim rows)."""
    assert w.stride(1) == 1, "weight rows must be contiguous"
    out = torch.ops.dejavu.gather_matvec(x.reshape(-1, x.shape[-1]), w, bias, idx, unit, block_m, block_k)
    return out.view(*x.shape[:-1], idx.numel() * unit)


def gather_qkv_lazily(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, units: torch.Tensor, n_q: int,
                      n_q_heads: int, window: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """The lazy K/V fill's one pass (model.Attention.qkv_lazily). x [S, d]: the layer's kept inputs;
    w [(n_q_heads + 2 kv_heads) * hd, d]: wqkv; units: the first n_q are Q heads, the rest K
    (n_q_heads + h) and V (n_q_heads + kv_heads + h) heads; window [W] slots; kv [2, kv_heads, S, hd]
    (K and V of one layer). Writes the K/V units' rows for every window slot into kv, returns the
    Q units' [1, n_q * hd] for the last slot."""
    assert w.stride(1) == 1 and x.stride(1) == 1 and kv.stride(-1) == 1 and window.numel() <= 32
    return torch.ops.dejavu.gather_qkv_lazily(x, w, bias, units, n_q, n_q_heads, window, kv)


def gather_qkv_lazily_reference(x, w, bias, units, n_q, n_q_heads, window, kv):
    """The same in torch (fp32 output; writes kv in its dtype)."""
    hd, kv_heads = kv.shape[-1], kv.shape[1]
    out = gather_matvec_reference(x[window], w, units, bias, unit=hd)        # [W, units * hd]
    kv_unit = units[n_q:] - n_q_heads
    vals = out[:, n_q * hd:].view(len(window), -1, hd).to(kv.dtype)         # [W, kv units, hd]
    kv[(kv_unit // kv_heads)[None, :], (kv_unit % kv_heads)[None, :], window[:, None]] = vals
    return out[-1:, :n_q * hd]


def gather_act(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, idx: torch.Tensor, act: str,
               block_m: int = 0, block_k: int = 0) -> torch.Tensor:
    """x [..., d], w_in [d_ff, n_in, d], b_in [d_ff, n_in] or None, idx [m] -> a [..., m]:
    act(gate) * up for n_in = 2 (SwiGLU 'silu', GeGLU 'gelu_tanh'), act(fc1 + bias) for n_in = 1."""
    assert w_in.stride(2) == 1 and w_in.shape[1] in (1, 2), "w_in must be [d_ff, n_in, d] with contiguous rows"
    assert act in ACTIVATIONS, f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}"
    out = torch.ops.dejavu.gather_act(x.reshape(-1, x.shape[-1]), w_in, b_in, idx, act, block_m, block_k)
    return out.view(*x.shape[:-1], idx.numel())


def gather_axpy(a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None = None,
                unit: int = 1, block_m: int = 64, block_n: int = 128) -> torch.Tensor:
    """a [..., m * unit], w [N, d] (rows may be strided), idx [m] -> [..., d] = a @ w[rows] (+ bias).
    The selected rows are split across programs too (d / block_n column blocks alone are too
    few to fill the GPU); the fp32 partials are summed in a fixed order: deterministic."""
    assert w.stride(1) == 1, "weight rows must be contiguous"
    out = torch.ops.dejavu.gather_axpy(a.reshape(-1, a.shape[-1]), w, bias, idx, unit, block_m, block_n)
    return out.view(*a.shape[:-1], w.shape[1])


def gather_matvec_reference(x, w, idx, bias=None, unit=1):
    rows = unit_rows(idx, unit)
    out = x.float() @ w[rows].float().T
    return out + bias[rows].float() if bias is not None else out


def gather_act_reference(x, w_in, b_in, idx, act):
    h = torch.einsum("...d,mid->...mi", x.float(), w_in[idx].float())
    h = h + b_in[idx].float() if b_in is not None else h
    a = ACTIVATIONS[act](h[..., 0])
    return a * h[..., 1] if w_in.shape[1] == 2 else a


def gather_axpy_reference(a, w, idx, bias=None, unit=1):
    out = a.float() @ w[unit_rows(idx, unit)].float()
    return out + bias.float() if bias is not None else out
