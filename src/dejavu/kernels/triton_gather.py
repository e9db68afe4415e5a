"""Triton kernels for gathered decode on the GPU (their fp32 torch references: reference.py).

gather_matvec  out[b, j] = W[idx[j]] . x[b]        selected rows of wq (or any row-major weight)
gather_act     out[b, j] = act(gate_j . x[b]) * (up_j . x[b])   or  act(fc1_j . x[b] + bias_j)
                                                   the MLP up side: a neuron's n_in adjacent rows
                                                   of w_in [d_ff, n_in, d] in one pass, fused
gather_axpy    out[b]   = sum_j a[b, j] W[idx[j]]  selected rows of w_out_t / wo_t (transposed
                                                   layouts: a neuron's or head's slice is a row)
input_gather   out      = sum_k x[k] W_t[k] over the channels k whose |x_k| (* scale) passes a
                                                   threshold: only those rows of the input-major
                                                   weight read (packed per split by a kernel before,
                                                   or skipped by masked loads)
idx [m] is one set shared by the batch (its union); gather_matvec, gather_act and gather_axpy also
take idx [B, m], a set per row (the grid's last axis is the row: a row's result never depends on
the other rows, so an answer does not depend on what else is batched), where a row whose first
index is negative computes nothing (a free serving row; its output is the bias, or zero).
Only the selected rows are read, straight from the weight (no gathered temporary). All use
tl.dot over a batch padded to 16 (batch 1-32 share the loaded weight tile); fp32 accumulation;
deterministic (gather_axpy sums per-program fp32 partials in a fixed order; an atomic counter,
zero at rest, only says which program is last).

Each kernel is a torch custom op (torch.library.triton_op, namespace `dejavu`), so torch.compile
traces through it and CUDA graphs capture it: no host synchronisation, indices stay on the
device, output shapes depend only on input shapes. Outputs (and gather_axpy's partials) are
allocated inside the op: under a CUDA graph they come from the graph's private pool, so the
addresses are the same on every replay and no two graphs share a buffer. The plain functions below are the engine's API.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .reference import ACTIVATIONS

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter, for checking without a GPU
# Programmatic dependent launch (Hopper on): each kernel of a decode step is launched while the one
# before it drains, and waits for its outputs in _wait_for_inputs. DEJAVU_PDL=0 turns it off.
PDL = (os.environ.get("DEJAVU_PDL", "1") != "0" and not INTERPRET and torch.cuda.is_available()
       and torch.cuda.get_device_capability()[0] >= 9)
USE_GDC = tl.constexpr(PDL)


@triton.jit
def _wait_for_inputs():
    """First thing in every kernel: wait until the kernel before has finished and its writes are
    visible (a no-op without PDL), then let the next kernel's programs launch (they wait too)."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def _traced(*tensors) -> bool:
    """Under torch.compile's tracing: no launch options, no global buffers. Its tensors (fake,
    functional, meta) have no data to launch a kernel on; eager ones do. A launch's tensors are
    all one or the other: the first decides."""
    if torch.compiler.is_compiling():
        return True
    t = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if t is None:
        return False
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta":
        return True
    try:
        t.data_ptr()
    except RuntimeError:
        return True
    return False


class _Interpreted:
    """Launcher for an interpreted kernel (TRITON_INTERPRET=1, CPU tensors). torch.compile can't
    trace the interpreter, so launches on fake tensors (shape propagation) are skipped."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if not _traced(*args):
                self.kernel[grid](*args, **kwargs)
        return launch


class _Dependent:
    """Launcher with programmatic dependent launch. A plain launch (the kernel itself, not torch's
    wrapper, which outside a triton_op would route every eager launch through its tracing
    machinery); under torch.compile's tracing, torch's wrapper, which takes no launch options
    (there the kernels run as plain launches, the wait a no-op). The wrapper is made at trace
    time: made inside a triton_op's eager run, wrap_triton returns the bare kernel."""

    def __init__(self, kernel):
        assert "_wait_for_inputs()" in kernel.src, f"{kernel.fn.__name__} launched dependent must wait for its inputs"
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if _traced(*args):
                wrap_triton(self.kernel)[grid](*args, **kwargs)
            else:
                self.kernel[grid](*args, launch_pdl=True, **kwargs)
        return launch


_launchers: dict = {}


def launcher(kernel):
    if not (INTERPRET or PDL):
        return wrap_triton(kernel)  # made per launch: what it returns depends on where it is made
    if id(kernel) not in _launchers:
        _launchers[id(kernel)] = _Interpreted(kernel) if INTERPRET else _Dependent(kernel)
    return _launchers[id(kernel)]


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
    (a head's head_dim rows), so callers pass head indices, not expanded rows. A negative index
    (a free row's) reads row 0's place, never loaded: its loop runs no steps."""
    units = tl.maximum(tl.load(idx_ptr + offs_m // UNIT, mask=m_mask, other=0).to(tl.int64), 0)
    return units * UNIT + offs_m % UNIT


@triton.jit
def _own_row(idx_ptr, a_ptr, out_ptr, stride_i, stride_a, stride_o, n):
    """With a set per row (stride_i > 0), program axis 1 is the row: its index set, input and output
    rows; a row whose first index is negative gets n = 0 (nothing to read). One set: unchanged."""
    if stride_i > 0:
        r = tl.program_id(1).to(tl.int64)
        idx_ptr += r * stride_i
        a_ptr += r * stride_a
        out_ptr += r * stride_o
        n = tl.where(tl.load(idx_ptr) < 0, 0, n)
    return idx_ptr, a_ptr, out_ptr, n


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
def _gather_matvec_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, out_ptr, B, M, K, stride_w, stride_x, stride_o, stride_i,
                          UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    _wait_for_inputs()
    pid = tl.program_id(0)
    idx_ptr, x_ptr, out_ptr, K = _own_row(idx_ptr, x_ptr, out_ptr, stride_i, stride_x, stride_o, K)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = _rows(idx_ptr, offs_m, m_mask, UNIT)
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    acc = _rows_dot_x(w_ptr, b_ptr, rows, m_mask & (K > 0), stride_w, x_ptr, offs_b * stride_x, b_mask, K, HAS_BIAS,
                      BLOCK_B, BLOCK_M, BLOCK_K, PRECISION)  # a free row (K 0): zeros, no bias
    tl.store(out_ptr + offs_b[None, :] * stride_o + offs_m[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & b_mask[None, :])


@triton.jit
def _qkv_lazy_kernel(x_ptr, win_ptr, w_ptr, b_ptr, idx_ptr, turn_ptr, q_ptr, kv_ptr, B, M, N_Q, N_TURN, K, N_Q_HEADS,
                     KV_HEADS, stride_x, stride_w, stride_kv_r, stride_kv_h, stride_kv_s, UNIT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr):
    _wait_for_inputs()
    # as _gather_matvec_kernel, over the cache rows of the window's slots. Output units: the N_Q
    # query heads idx, then K and then V of heads = idx ++ turn (no concatenation kernels before);
    # the epilogue writes the Q units' last row to q and the K/V rows into their cache slots
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    slot = offs_m // UNIT
    n_heads = N_Q + N_TURN
    is_q = slot < N_Q
    part = tl.where(is_q, 0, tl.where(slot < N_Q + n_heads, 1, 2))                # Q, K, V
    i = tl.where(is_q, slot, slot - N_Q - (part - 1) * n_heads)                    # index into idx ++ turn
    from_idx = i < N_Q
    head = tl.where(from_idx, tl.load(idx_ptr + i, mask=m_mask & from_idx, other=0),
                    tl.load(turn_ptr + (i - N_Q), mask=m_mask & ~from_idx, other=0)).to(tl.int64)
    units = tl.where(is_q, head, N_Q_HEADS + (part - 1) * KV_HEADS + head)        # the head's rows of wqkv
    rows = units * UNIT + offs_m % UNIT
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    slots = tl.load(win_ptr + offs_b, mask=b_mask, other=0).to(tl.int64)
    acc = _rows_dot_x(w_ptr, b_ptr, rows, m_mask, stride_w, x_ptr, slots * stride_x, b_mask, K, HAS_BIAS, BLOCK_B,
                      BLOCK_M, BLOCK_K, PRECISION)
    out = acc.to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + offs_m[:, None] + offs_b[None, :] * 0, out,
             mask=(m_mask & is_q)[:, None] & (offs_b == B - 1)[None, :])  # the current token: the last slot
    dest = (part - 1) * stride_kv_r + head * stride_kv_h + offs_m % UNIT
    tl.store(kv_ptr + dest[:, None] + slots[None, :] * stride_kv_s, out,
             mask=(m_mask & ~is_q)[:, None] & b_mask[None, :])


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """ACT of fp32 g: 'silu', 'gelu_tanh' or 'relu'."""
    if ACT == "silu":
        a = g * tl.sigmoid(g)
    elif ACT == "gelu_tanh":  # 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3)
        a = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    else:
        a = tl.maximum(g, 0.0)
    return a


@triton.jit
def _mlp_act(h_ptr, offs, mask, ACT: tl.constexpr, GATED: tl.constexpr):
    """The activations of the MLP's channels offs from its up side h: act(gate) * up with gate and up
    interleaved (h[2k], h[2k + 1], w_in's layout), or act(h[k]); fp32."""
    if GATED:
        g = tl.load(h_ptr + 2 * offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + 2 * offs + 1, mask=mask, other=0.0).to(tl.float32)
        a = _activation(g, ACT) * u
    else:
        a = _activation(tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32), ACT)
    return a


@triton.jit
def _act_kernel(h_ptr, out_ptr, K, total, ACT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr):
    _wait_for_inputs()
    # out[b, k] = the activation of channel k of row b (rows of h are 2K or K wide)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    row, k = offs // K, offs % K
    a = _mlp_act(h_ptr + row * (2 * K if GATED else K), k, mask, ACT, GATED)
    tl.store(out_ptr + offs, a.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_act_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, out_ptr, B, M, K, stride_wn, stride_wi, stride_bn, stride_bi,
                       stride_x, stride_o, stride_i, N_IN: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    _wait_for_inputs()
    # as _gather_matvec_kernel, with a second accumulator for the up rows (adjacent to the gate rows)
    pid = tl.program_id(0)
    idx_ptr, x_ptr, out_ptr, K = _own_row(idx_ptr, x_ptr, out_ptr, stride_i, stride_x, stride_o, K)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = _rows(idx_ptr, offs_m, m_mask, 1)
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
    if HAS_BIAS:  # not for a free row (K 0): its activations are zero
        bias_mask = m_mask & (K > 0)
        gate += tl.load(b_ptr + rows * stride_bn, mask=bias_mask, other=0.0).to(tl.float32)[:, None]
        if N_IN == 2:
            up += tl.load(b_ptr + rows * stride_bn + stride_bi, mask=bias_mask, other=0.0).to(tl.float32)[:, None]
    a = _activation(gate, ACT)
    if N_IN == 2:
        a = a * up
    tl.store(out_ptr + offs_b[None, :] * stride_o + offs_m[:, None], a.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & b_mask[None, :])


@triton.jit
def _gather_axpy_kernel(a_ptr, w_ptr, idx_ptr, n_ptr, x_ptr, scale_ptr, t_ptr, b_ptr, part_ptr, count_ptr, out_ptr, B,
                        M, N, S, rows_per_split, stride_a, stride_w, stride_s, stride_p, stride_o, stride_i, stride_r,
                        UNIT: tl.constexpr, HAS_N: tl.constexpr, MASK: tl.constexpr, HAS_SCALE: tl.constexpr,
                        ACT: tl.constexpr,
                        GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    _wait_for_inputs()
    # program (column block, split[, row]): its share of the selected rows, into its own fp32
    # partial. Input-side (one token, split s owns channels s * rows_per_split on): with HAS_N, idx
    # and a hold each split's passing channels packed at its segment's front (by _compact_kernel),
    # n[s] of them; with MASK, split s walks all its channels of x and loads only the rows of those
    # that pass (a masked load reads nothing). With a set per row, a row's partials and counters are
    # its own (stride_r apart)
    pid_n, pid_s = tl.program_id(0), tl.program_id(2)
    idx_ptr, a_ptr, out_ptr, M = _own_row(idx_ptr, a_ptr, out_ptr, stride_i, stride_a, stride_o, M)
    if stride_i > 0:
        part_ptr += tl.program_id(1).to(tl.int64) * stride_r
        count_ptr += tl.program_id(1) * tl.num_programs(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    if M > 0:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        start = pid_s * rows_per_split
        end = tl.minimum(start + rows_per_split, M)
        if HAS_N:
            end = start + tl.load(n_ptr + pid_s)
        if MASK:
            t = tl.load(t_ptr)
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < end
            if MASK:  # one token: row 0 of a is x's passing channels, the rest zero
                x, m_mask = _passing(x_ptr, scale_ptr, t, offs_m, m_mask, HAS_SCALE, ACT, GATED)
                x = tl.where(m_mask, x, 0.0)  # a failing channel counts for nothing, even a NaN or inf
                a = tl.where(offs_b[:, None] == 0, x.to(a_ptr.dtype.element_ty)[None, :], 0.0)
                rows = offs_m.to(tl.int64)
            else:
                rows = _rows(idx_ptr, offs_m, m_mask, UNIT)
                a = tl.load(a_ptr + offs_b[:, None] * stride_a + offs_m[None, :],
                            mask=b_mask[:, None] & m_mask[None, :], other=0.0)
            w = tl.load(w_ptr + rows[:, None] * stride_w + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                        other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        _sum_splits(acc, part_ptr, count_ptr, b_ptr, out_ptr, pid_n, pid_s, S, offs_b, offs_n, b_mask, n_mask,
                    stride_s, stride_p, stride_o, HAS_BIAS, BLOCK_B, BLOCK_N)
    elif pid_s == 0:  # a free row: its output is the bias (or zero), no weight read, no partials
        total = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        if HAS_BIAS:
            total += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_b[:, None] * stride_o + offs_n[None, :], total.to(out_ptr.dtype.element_ty),
                 mask=b_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_splits(acc, part_ptr, count_ptr, b_ptr, out_ptr, pid_n, pid_s, S, offs_b, offs_n, b_mask, n_mask,
                stride_s, stride_p, stride_o, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-K epilogue: store this program's fp32 partial; the column block's last split to finish
    adds the partials in split order (deterministic), adds the bias, casts and writes the output: no
    second kernel. (The threadfence-reduction pattern: every thread's partial is stored before the
    count moves.) The last program zeroes the counter again: zero at rest, for the next call on the
    stream (a dependent launch counts only after this kernel has finished)."""
    mask = b_mask[:, None] & n_mask[None, :]
    tile = offs_b[:, None] * stride_p + offs_n[None, :]
    tl.store(part_ptr + pid_s * stride_s + tile, acc, mask=mask)
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == S - 1:
        tl.store(count_ptr + pid_n, 0)
        total = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for s in range(0, S):
            total += tl.load(part_ptr + s * stride_s + tile, mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            total += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_b[:, None] * stride_o + offs_n[None, :], total.to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _passing(x_ptr, scale_ptr, t, offs, inside, HAS_SCALE: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr):
    """(x's channels offs, which of them pass: |x| (* scale) > t). With ACT, x is the MLP's up side
    and the channels are its activations (computed here, rounded to x's dtype as the dense path)."""
    if ACT != "":
        x = _mlp_act(x_ptr, offs, inside, ACT, GATED).to(x_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    score = tl.abs(x.to(tl.float32))
    if HAS_SCALE:
        score = score * tl.load(scale_ptr + offs, mask=inside, other=0.0)
    return x, inside & (score > t)


@triton.jit
def _compact(x_ptr, scale_ptr, t_ptr, val_ptr, idx_ptr, lo, hi, HAS_SCALE: tl.constexpr, ACT: tl.constexpr,
             GATED: tl.constexpr, BLOCK: tl.constexpr):
    """The channels lo..hi-1 of x that pass (_passing): their values and indices packed from val[lo],
    idx[lo] on, in order; returns how many."""
    t = tl.load(t_ptr)
    base = tl.full((), 0, tl.int32)
    for k0 in range(lo, hi, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x, keep = _passing(x_ptr, scale_ptr, t, offs, offs < hi, HAS_SCALE, ACT, GATED)
        pos = lo + base + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(val_ptr + pos, x.to(val_ptr.dtype.element_ty), mask=keep)
        tl.store(idx_ptr + pos, offs, mask=keep)
        base += tl.sum(keep.to(tl.int32), 0)
    return base


@triton.jit
def _compact_kernel(x_ptr, scale_ptr, t_ptr, val_ptr, idx_ptr, n_ptr, K, SEG, HAS_SCALE: tl.constexpr,
                    ACT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr):
    _wait_for_inputs()
    # program p: segment p of x (SEG channels), packed at the segment's front; how many in n[p]
    p = tl.program_id(0)
    lo = p * SEG
    tl.store(n_ptr + p, _compact(x_ptr, scale_ptr, t_ptr, val_ptr, idx_ptr, lo, tl.minimum(lo + SEG, K), HAS_SCALE,
                                 ACT, GATED, BLOCK))


def _tile(M: int, x: torch.Tensor, block_m: int, block_k: int, B: int = 0, stages: int = 0) -> tuple[int, int, int]:
    """Rows per program, columns per step, pipeline stages. 64 x 128 where that still gives two
    programs per SM, else 32 x 256 (a decode step's gathers have a few thousand rows); a fourth
    stage in flight where programs are fewer than two per SM. Measured on the H200
    (scripts/sweep_gather_tiles.py, docs/perf-notes.md): 10% of the OPT-66B up side 63% -> 75%
    of the copy bandwidth, Llama-3-70B 58% -> 81%. The x tile caps the step (fp32 or a batch of
    32: shared memory)."""
    sms, block_b = sm_count(x), _block_b(B or x.shape[0])
    block_m = block_m or (64 if triton.cdiv(M, 64) >= 2 * sms else 32)
    block_k = block_k or max(128, min(8192 // block_m, 32768 // (x.element_size() * block_b)))
    few = triton.cdiv(M, block_m) < 2 * sms
    fits = 4 * (block_m + block_b) * block_k * x.element_size() <= 160 * 1024
    return block_m, block_k, stages or (4 if few and fits else 3)


@triton_op("dejavu::gather_matvec", mutates_args=())
def _gather_matvec_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor, unit: int,
                      block_m: int, block_k: int) -> torch.Tensor:
    x = x.contiguous()
    (B, K), M = x.shape, idx.shape[-1] * unit
    out = torch.empty(B, M, device=x.device, dtype=x.dtype)  # graph pool under CUDA graphs
    rows, per_row = _sets(idx, B)
    block_m, block_k, stages = _tile(M, x, block_m, block_k, per_row)
    launcher(_gather_matvec_kernel)[(triton.cdiv(M, block_m), rows)](
        x, w, bias if bias is not None else x, idx, out, per_row, M, K, w.stride(0), x.stride(0), out.stride(0),
        idx.stride(0) if idx.dim() == 2 else 0, UNIT=unit, HAS_BIAS=bias is not None, BLOCK_B=_block_b(per_row),
        BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=_precision(x), num_stages=stages)
    return out


@triton_op("dejavu::gather_qkv_lazily", mutates_args=("kv",))
def _gather_qkv_lazily_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor,
                          turn: torch.Tensor, n_q_heads: int, window: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    (_, K), hd = x.shape, kv.shape[-1]
    n_q, n_turn = idx.numel(), turn.numel()
    B, M = window.numel(), (n_q + 2 * (n_q + n_turn)) * hd
    q = torch.empty(1, n_q * hd, device=x.device, dtype=x.dtype)  # graph pool under CUDA graphs
    block_m, block_k, stages = _tile(M, x, 0, 0, B)
    launcher(_qkv_lazy_kernel)[(triton.cdiv(M, block_m),)](
        x, window, w, bias if bias is not None else x, idx, turn, q, kv, B, M, n_q, n_turn, K, n_q_heads,
        kv.shape[1], x.stride(0), w.stride(0), kv.stride(0), kv.stride(1), kv.stride(2), UNIT=hd,
        HAS_BIAS=bias is not None, BLOCK_B=_block_b(B), BLOCK_M=block_m, BLOCK_K=block_k, PRECISION=_precision(x),
        num_stages=stages)
    return q


@triton_op("dejavu::gather_act", mutates_args=())
def _gather_act_op(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, idx: torch.Tensor, act: str,
                   block_m: int, block_k: int, num_warps: int, num_stages: int) -> torch.Tensor:
    x = x.contiguous()
    (B, K), M = x.shape, idx.shape[-1]
    out = torch.empty(B, M, device=x.device, dtype=x.dtype)  # graph pool under CUDA graphs
    bias = b_in if b_in is not None else x  # a placeholder pointer, never read
    rows, per_row = _sets(idx, B)
    block_m, block_k, num_stages = _tile(M, x, block_m, block_k, per_row, stages=num_stages)
    launcher(_gather_act_kernel)[(triton.cdiv(M, block_m), rows)](
        x, w_in, bias, idx, out, per_row, M, K, w_in.stride(0), w_in.stride(1), bias.stride(0), bias.stride(-1),
        x.stride(0), out.stride(0), idx.stride(0) if idx.dim() == 2 else 0, N_IN=w_in.shape[1], ACT=act,
        HAS_BIAS=b_in is not None, BLOCK_B=_block_b(per_row), BLOCK_M=block_m, BLOCK_K=block_k,
        PRECISION=_precision(x), num_warps=num_warps, num_stages=num_stages)
    return out


def _sets(idx: torch.Tensor, B: int) -> tuple[int, int]:
    """(index sets, rows each covers): (1, B) for one set shared by the batch, (B, 1) for a set per row."""
    if idx.dim() == 1:
        return 1, B
    assert idx.shape[0] == B and idx.stride(-1) == 1 and (B == 1 or idx.stride(0) > 0), \
        f"a set per row needs idx [{B}, m] with a row each, got {tuple(idx.shape)} strides {idx.stride()}"
    return B, 1


def _splits(M: int, col_blocks: int, block_m: int, programs_per_sm: int, t: torch.Tensor) -> tuple[int, int]:
    """Split-K: (splits, rows per split) so that about programs_per_sm programs run per SM."""
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(programs_per_sm * sm_count(t), col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    return triton.cdiv(M, rows_per_split), rows_per_split


COUNTERS_PER_STREAM = 1 << 16
_counter_buffers: dict = {}


def _counters(t: torch.Tensor, n: int) -> torch.Tensor:
    """gather_axpy's completion counters (one per column block and row): zero at rest, since each
    column block's last program zeroes its own again, so no memset kernel per call. One buffer per
    stream: calls on one stream never count at once, and calls in flight together on different
    streams (or threads, or graphs captured on different streams) never share a counter. A CUDA graph
    keeps the buffer of the stream it was captured on: replay the graphs of one capture stream one
    at a time (as every caller here does)."""
    if _traced(t):  # a global tensor can't enter a trace: the traced graph's own, zeroed
        return torch.zeros(n, device=t.device, dtype=torch.int32)
    key = (t.device, torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0)
    if key not in _counter_buffers and t.is_cuda and torch.cuda.is_current_stream_capturing():
        # a buffer made now would come from the graph's pool, zeroed only when that graph replays:
        # this call's own, zeroed inside the graph (capture_graph warms up on its capture stream, so
        # its graphs find the buffer)
        return torch.zeros(n, device=t.device, dtype=torch.int32)
    assert n <= COUNTERS_PER_STREAM, f"gather_axpy: {n} column blocks x rows, at most {COUNTERS_PER_STREAM}"
    if key not in _counter_buffers:
        _counter_buffers[key] = torch.zeros(COUNTERS_PER_STREAM, device=t.device, dtype=torch.int32)
    return _counter_buffers[key]


def _launch_axpy(a, w, idx, bias, unit, splits, rows_per_split, block_m, block_n, num_warps, num_stages, n=None,
                 rule=None):
    """gather_axpy's kernel over `splits` splits of `rows_per_split` entries of a and idx -> out [B, N]
    in a's dtype. With n: only the first n[s] of split s count. With rule (x, scale, threshold, act,
    gated): no a or idx, split s reads the rows of its segment's channels of x that pass."""
    (B, M), N = a.shape, w.shape[1]
    col_blocks = triton.cdiv(N, block_n)
    rows, per_row = _sets(idx, B)
    partial = torch.empty(rows, splits, per_row, N, device=a.device, dtype=torch.float32)  # graph pool under graphs
    counts = _counters(a, rows * col_blocks)
    out = torch.empty(B, N, device=a.device, dtype=a.dtype)
    x, scale, threshold, act, gated = rule or (a, None, partial, "", False)
    launcher(_gather_axpy_kernel)[(col_blocks, rows, splits)](
        a, w, idx, n if n is not None else idx, x, scale if scale is not None else x, threshold,
        bias if bias is not None else partial, partial, counts, out, per_row, M, N, splits, rows_per_split,
        a.stride(0), w.stride(0), partial.stride(1), partial.stride(2), out.stride(0),
        idx.stride(0) if idx.dim() == 2 else 0, partial.stride(0), UNIT=unit, HAS_N=n is not None,
        MASK=rule is not None, HAS_SCALE=scale is not None, ACT=act, GATED=gated, HAS_BIAS=bias is not None,
        BLOCK_B=_block_b(per_row), BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=_precision(a), num_warps=num_warps,
        num_stages=num_stages)
    return out


@triton_op("dejavu::gather_axpy", mutates_args=())
def _gather_axpy_op(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor, unit: int,
                    block_m: int, block_n: int, num_warps: int, num_stages: int, programs_per_sm: int) -> torch.Tensor:
    a = a.contiguous()
    # with a set per row, split as for one row: a lone live row (the others free) runs as fast as alone
    splits, rows_per_split = _splits(a.shape[1], triton.cdiv(w.shape[1], block_n), block_m, programs_per_sm, a)
    return _launch_axpy(a, w, idx, bias, unit, splits, rows_per_split, block_m, block_n, num_warps, num_stages)


# Where a split's segment of channels is short (few column blocks make many splits), its programs
# walk it with masked row loads; where it is long (wide outputs: gate/up) a packing kernel first
# pays, so the gather's steps load full tiles (H200, scripts/sweep_input_tiles.py).
MASK_MAX_SEGMENT = 512


@triton_op("dejavu::input_gather", mutates_args=())
def _input_gather_op(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
                     threshold: torch.Tensor, act: str, gated: bool, block_m: int, block_n: int, num_warps: int,
                     num_stages: int, programs_per_sm: int, pack: str) -> torch.Tensor:
    x = x.contiguous()
    K = w_t.shape[0]
    splits, seg = _splits(K, triton.cdiv(w_t.shape[1], block_n), block_m, programs_per_sm, x)
    if pack == "mask" or (pack == "auto" and seg <= MASK_MAX_SEGMENT):
        return _launch_axpy(x[:, :K], w_t, x[0], bias, 1, splits, seg, block_m, block_n, num_warps,
                            num_stages or 3, rule=(x, scale, threshold, act, gated))
    values = torch.empty(1, K, device=x.device, dtype=x.dtype)  # graph pool under CUDA graphs
    idx = torch.empty(K, device=x.device, dtype=torch.int32)
    n = torch.empty(splits, device=x.device, dtype=torch.int32)
    launcher(_compact_kernel)[(splits,)](x, scale if scale is not None else x, threshold, values, idx, n, K, seg,
                                         HAS_SCALE=scale is not None, ACT=act, GATED=gated,
                                         BLOCK=min(4096, triton.next_power_of_2(seg)), num_warps=4)
    return _launch_axpy(values, w_t, idx, bias, 1, splits, seg, block_m, block_n, num_warps, num_stages or 2, n=n)


def input_gather(x: torch.Tensor, w_t: torch.Tensor, scale: torch.Tensor | None, threshold: torch.Tensor,
                 bias: torch.Tensor | None = None, act: str = "", gated: bool = False, block_m: int = 64,
                 block_n: int = 128, num_warps: int = 4, num_stages: int = 0, programs_per_sm: int = 4,
                 pack: str = "auto") -> torch.Tensor:
    """Input-side sparsity for one token: x [..., K] (one row), w_t [K, N] input-major -> [..., N] =
    sum over the channels k with |x_k| (* scale[k]) > threshold of x_k w_t[k] (+ bias), reading only
    the passing channels' rows. pack "kernel": a kernel first packs each gather_axpy split's passing
    channels (segment s: split s's channels); "mask": no packing, split s walks its channels and loads
    only the passing ones' rows; "auto": mask where segments are short. num_stages 0: 3 masked, 2
    packed (H200). Static shapes, no sync.
    With `act`, x is the MLP's up side h [..., 2K] (gated: gate and up interleaved) or [..., K], and
    the channels are its activations, computed where they are scored (the down projection)."""
    assert w_t.stride(1) == 1 and x.numel() == x.shape[-1] == w_t.shape[0] * (2 if act and gated else 1)
    assert pack in ("auto", "kernel", "mask"), f"pack must be auto, kernel or mask, got {pack!r}"
    out = torch.ops.dejavu.input_gather(x.reshape(1, -1), w_t, bias, scale, threshold, act, gated, block_m, block_n,
                                        num_warps, num_stages, programs_per_sm, pack)
    return out.view(*x.shape[:-1], w_t.shape[1])


@triton_op("dejavu::mlp_act", mutates_args=())
def _mlp_act_op(h: torch.Tensor, act: str, gated: bool) -> torch.Tensor:
    h = h.contiguous()
    K = h.shape[-1] // (2 if gated else 1)
    out = torch.empty(*h.shape[:-1], K, device=h.device, dtype=h.dtype)  # graph pool under CUDA graphs
    launcher(_act_kernel)[(triton.cdiv(out.numel(), 1024),)](h, out, K, out.numel(), ACT=act, GATED=gated, BLOCK=1024)
    return out


def mlp_act(h: torch.Tensor, act: str, gated: bool) -> torch.Tensor:
    """The MLP's activations from its up side h [..., 2K] (gate and up interleaved) or [..., K]: one
    kernel where torch runs two (act on a strided view, then the product)."""
    assert act in ACTIVATIONS, f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}"
    return torch.ops.dejavu.mlp_act(h, act, gated)


def gather_matvec(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None = None,
                  unit: int = 1, block_m: int = 0, block_k: int = 0) -> torch.Tensor:
    """x [..., d], w [N, d] (rows may be strided, columns contiguous), idx [m] -> [..., m * unit]
    = x @ w[rows].T (+ bias[rows]), rows = the `unit` rows of each index (a head's head_dim rows)."""
    assert w.stride(1) == 1, "weight rows must be contiguous"
    out = torch.ops.dejavu.gather_matvec(x.reshape(-1, x.shape[-1]), w, bias, idx, unit, block_m, block_k)
    return out.view(*x.shape[:-1], idx.shape[-1] * unit)


def gather_qkv_lazily(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor,
                      turn: torch.Tensor, n_q_heads: int, window: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """The lazy K/V fill's one pass (the lazy K/V fill, model.LazyKVCache). x [S, d]: the layer's kept inputs;
    w [(n_q_heads + 2 kv_heads) * hd, d]: wqkv; idx: the query heads; turn: the heads refreshed in
    turn; window [W] slots; kv [2, kv_heads, S, hd] (K and V of one layer). Writes K/V of heads
    idx ++ turn for every window slot into kv, returns idx's Q [1, len(idx) * hd] for the last slot."""
    assert w.stride(1) == 1 and x.stride(1) == 1 and kv.stride(-1) == 1 and window.numel() <= 32
    return torch.ops.dejavu.gather_qkv_lazily(x, w, bias, idx, turn, n_q_heads, window, kv)


def gather_act(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, idx: torch.Tensor, act: str,
               block_m: int = 0, block_k: int = 0, num_warps: int = 4, num_stages: int = 0) -> torch.Tensor:
    """x [..., d], w_in [d_ff, n_in, d], b_in [d_ff, n_in] or None, idx [m] -> a [..., m]:
    act(gate) * up for n_in = 2 (SwiGLU 'silu', GeGLU 'gelu_tanh'), act(fc1 + bias) for n_in = 1."""
    assert w_in.stride(2) == 1 and w_in.shape[1] in (1, 2), "w_in must be [d_ff, n_in, d] with contiguous rows"
    assert act in ACTIVATIONS, f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}"
    out = torch.ops.dejavu.gather_act(x.reshape(-1, x.shape[-1]), w_in, b_in, idx, act, block_m, block_k, num_warps,
                                      num_stages)
    return out.view(*x.shape[:-1], idx.shape[-1])


def gather_axpy(a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None = None,
                unit: int = 1, block_m: int = 64, block_n: int = 128, num_warps: int = 4, num_stages: int = 2,
                programs_per_sm: int = 4) -> torch.Tensor:
    """a [..., m * unit], w [N, d] (rows may be strided), idx [m] -> [..., d] = a @ w[rows] (+ bias).
    The selected rows are split across programs too (d / block_n column blocks alone are too
    few to fill the GPU); the fp32 partials are summed in a fixed order: deterministic."""
    assert w.stride(1) == 1, "weight rows must be contiguous"
    out = torch.ops.dejavu.gather_axpy(a.reshape(-1, a.shape[-1]), w, bias, idx, unit, block_m, block_n, num_warps,
                                       num_stages, programs_per_sm)
    return out.view(*a.shape[:-1], w.shape[1])

