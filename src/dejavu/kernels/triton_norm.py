"""LayerNorm / RMSNorm for decode rows on the GPU: one program per row, the whole row in
registers. torch's layer_norm takes ~12 us on one 7168-wide row (H100: one block walks the
row); this takes a few, and runs twice per layer in every decode step, dense or sparse.
Rounding as model.Norm: LayerNorm in fp32 then cast; RMSNorm casts x * rstd before the weight.
With a residual r it also adds x + r first (rounded to x's dtype, as torch adds) and writes that
sum: the block's residual add and the next norm in one kernel. Given the input-side rule of the
projection that reads the norm (one token), it also packs the channels that pass for that
projection's gather (triton_gather.Packing): no packing kernel between them."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gather import Packing, _wait_for_inputs, input_splits, launcher


@triton.jit
def _count_in_segment(a, first_a, b, first_b):
    """Segmented sum: a running count that restarts where a segment starts (first_b)."""
    return tl.where(first_b != 0, b, a + b), first_a | first_b


@triton.jit
def _norm_kernel(x_ptr, r_ptr, sum_ptr, w_ptr, b_ptr, out_ptr, t_ptr, scale_ptr, val_ptr, idx_ptr, n_ptr, N, SEG, eps,
                 stride_x, stride_r, stride_o, RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, PACK: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    _wait_for_inputs()
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_o + offs, x, mask=mask)
    x = x.to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0) if HAS_WEIGHT else 1.0
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        y = xc * rstd * w
        if HAS_BIAS:
            y += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, y, mask=mask)
    if PACK:  # one row: the channels passing the rule, packed from the front of each SEG-channel segment
        score = tl.abs(y.to(tl.float32))
        if HAS_SCALE:
            score = score * tl.load(scale_ptr + offs, mask=mask, other=0.0)
        keep = mask & (score > tl.load(t_ptr))  # a NaN fails
        count, _ = tl.associative_scan((keep.to(tl.int32), (offs % SEG == 0).to(tl.int32)), 0, _count_in_segment)
        at = (offs // SEG) * SEG + count - 1
        tl.store(val_ptr + at, y, mask=keep)
        tl.store(idx_ptr + at, offs, mask=keep)
        tl.store(n_ptr + offs // SEG, count, mask=mask & ((offs % SEG == SEG - 1) | (offs == N - 1)))


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, rms: bool,
         residual: torch.Tensor | None = None, rule=None):
    """norm(x), or with a residual (x + residual, norm(x + residual)). weight None: no scale. With
    rule (kernels.InputRule with its projection's width) and one row: the norm carries a Packing of
    its passing channels, which that projection's input_gather reads instead of packing them."""
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    out = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    total = torch.empty_like(out) if residual is not None else out
    N = x2.shape[1]
    block = triton.next_power_of_2(N)
    packing = None
    if rule is not None and rule.width and x2.shape[0] == 1:
        splits, seg = input_splits(N, rule.width, x2)
        packing = Packing(rule.threshold, rule.scale, splits, seg, torch.empty_like(out),
                          torch.empty(N, device=x.device, dtype=torch.int32),
                          torch.empty(splits, device=x.device, dtype=torch.int32))
    pack_args = (out,) * 5  # placeholders, never read
    if packing is not None:
        pack_args = (rule.threshold, rule.scale if rule.scale is not None else out, packing.values, packing.idx,
                     packing.n)
    launcher(_norm_kernel)[(x2.shape[0],)](
        x2, r2, total, weight, bias, out, *pack_args, N, packing.segment if packing is not None else N, eps,
        x2.stride(0), r2.stride(0), out.stride(0), RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, PACK=packing is not None,
        HAS_SCALE=packing is not None and rule.scale is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)))
    h = out.view(x.shape)
    if packing is not None:
        h.packing = packing
    return h if residual is None else (total.view(x.shape), h)


def norm_reference(x, weight, bias, eps, rms):
    if not rms:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
